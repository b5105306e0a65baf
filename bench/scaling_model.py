"""Analytic memory and communication model behind docs/SCALING.md.

Parameter counts come from the real architectures (transformers configs, built on the meta
device: no weights, no download). Memory per GPU follows the ZeRO paper's accounting for
mixed-precision Adam (2 bytes bf16 weights + 2 bytes bf16 gradients + 12 bytes fp32 master
weights and Adam moments per parameter) plus activations (Korthikanti et al.'s per-layer
estimate s*b*h*(34 + 5*a*s/h) bytes). Communication is per GPU per step with ring collectives.

    python bench/scaling_model.py          # prints the tables and rewrites them in docs/SCALING.md
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "SCALING.md"
GB = 1024**3
SEQ = 32  # max_len
PROJ = 256  # grounding dimension


@dataclass
class Arch:
    name: str
    params: int
    hidden: int
    layers: int
    heads: int


def count(name: str) -> Arch:
    import torch
    from transformers import AutoModel, BertConfig, RobertaConfig

    cfg = {
        "BERT-base": BertConfig(),
        "BERT-large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                 intermediate_size=4096),
        "RoBERTa-large": RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                       hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096),
    }[name]
    with torch.device("meta"):
        model = AutoModel.from_config(cfg, add_pooling_layer=False)
    h = cfg.hidden_size
    heads = h * h + h + h * PROJ + PROJ + 1280 * PROJ + PROJ  # MLP + text head + image head (1280-d)
    n = sum(p.numel() for p in model.parameters()) + heads
    return Arch(name, n, h, cfg.num_hidden_layers, cfg.num_attention_heads)


def model_state_gb(a: Arch, stage: str, n_gpus: int) -> float:
    p = a.params
    if stage == "DDP":
        b = 16 * p
    elif stage == "ZeRO-1":
        b = 4 * p + 12 * p / n_gpus
    elif stage == "ZeRO-2":
        b = 2 * p + 14 * p / n_gpus
    else:
        b = 16 * p / n_gpus
    return b / GB


def activations_gb(a: Arch, sentences: int, checkpointing: bool = False) -> float:
    tokens = 2 * sentences * SEQ  # two dropout views
    if checkpointing:  # only each layer's input is kept (bf16), plus one layer being recomputed
        per_layer = 2 * a.hidden
        return (tokens * per_layer * a.layers + tokens * (34 * a.hidden + 5 * a.heads * SEQ)) / GB
    return tokens * (34 * a.hidden + 5 * a.heads * SEQ) * a.layers / GB


def comm_mb(a: Arch, n: int, b: int, stage: str) -> tuple[float, float]:
    """(gradient/parameter traffic, embedding gather traffic) in MB received per GPU per step."""
    ring = 2 * (n - 1) / n
    grad_bytes = 2 * a.params  # bf16 gradients
    if stage in ("DDP", "ZeRO-1"):
        weights = ring * grad_bytes  # all-reduce
    elif stage == "ZeRO-2":
        weights = ring * grad_bytes  # reduce-scatter grads + all-gather updated weights
    else:
        weights = 1.5 * ring * grad_bytes  # + parameter all-gathers in forward and backward
    # Gathered per step: z2 (hidden) and the image projection; backward sends the same back.
    emb = 2 * (n - 1) * b * (a.hidden + PROJ) * 2  # bf16, forward gather + backward reduce-scatter
    return weights / 1e6, emb / 1e6


def tables() -> str:
    archs = [count(n) for n in ("BERT-base", "BERT-large", "RoBERTa-large")]
    out = ["| model | parameters | hidden | layers |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {a.name} | {a.params / 1e6:.0f}M | {a.hidden} | {a.layers} |" for a in archs]
    out += ["", "**Model state per GPU (GiB), bf16 + fp32 Adam, 8 GPUs / 64 GPUs:**", "",
            "| model | DDP | ZeRO-1 | ZeRO-2 | ZeRO-3 |", "| --- | ---: | ---: | ---: | ---: |"]
    for a in archs:
        cells = [f"{model_state_gb(a, s, 8):.2f} / {model_state_gb(a, s, 64):.2f}"
                 for s in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")]
        out.append(f"| {a.name} | " + " | ".join(cells) + " |")
    out += ["", f"**Activations per GPU (GiB), max_len {SEQ}, two views per sentence:**", "",
            "| model | 64 sent. | 256 sent. | 1024 sent. | 1024 sent., checkpointing |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for a in archs:
        out.append(f"| {a.name} | {activations_gb(a, 64):.2f} | {activations_gb(a, 256):.2f} | "
                   f"{activations_gb(a, 1024):.1f} | {activations_gb(a, 1024, True):.2f} |")
    out += ["", "**Traffic received per GPU per step (MB): weights (gradient all-reduce or ZeRO's "
            "collectives) vs gathered embeddings (64 sentences per GPU):**", "",
            "| model | GPUs | DDP / ZeRO-1 weights | ZeRO-3 weights | embeddings | global batch |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for a in archs:
        for n in (8, 64, 512):
            w, e = comm_mb(a, n, 64, "DDP")
            w3, _ = comm_mb(a, n, 64, "ZeRO-3")
            out.append(f"| {a.name} | {n} | {w:.0f} | {w3:.0f} | {e:.1f} | {64 * n} |")
    return "\n".join(out)


def main() -> None:
    body = tables()
    print(body)
    if "--no-write" in sys.argv or not DOC.exists():
        return
    text = DOC.read_text(encoding="utf-8")
    block = f"<!-- tables -->\n{body}\n<!-- /tables -->"
    new = re.sub(r"<!-- tables -->.*?<!-- /tables -->", lambda _: block, text, flags=re.S)
    DOC.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
