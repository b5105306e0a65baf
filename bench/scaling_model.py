"""Analytic memory, communication and step-time model behind docs/SCALING.md.

Parameter counts come from the real architectures (transformers configs, built on the meta
device: no weights, no download). Memory per GPU follows the ZeRO paper's accounting for
mixed-precision Adam (2 bytes bf16 weights + 2 bytes bf16 gradients + 12 bytes fp32 master
weights and Adam moments per parameter) plus activations (Korthikanti et al.'s per-layer
estimate s*b*h*(34 + 5*a*s/h) bytes). Communication is per GPU per step with ring collectives.

The step-time model (BERT-base, 8 -> 512 GPUs) adds up compute (the FLOPs of
bench/gpu_check.py's `step_flops` over an efficiency and a fixed per-step cost, fitted to the GPU
check's figures when docs/BENCHMARKS.md holds them), the exposed gradient all-reduce, the
embedding gathers of the contrastive loss and the DataLoader's supply (the per-worker rate
measured by bench/bench_stream.py); every hardware number it assumes is a field of `Cluster`.

    python bench/scaling_model.py          # prints the tables and rewrites them in docs/SCALING.md
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_check import Shape, read_embedded, step_flops  # noqa: E402

DOC = ROOT / "docs" / "SCALING.md"
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
GB = 1024**3
SEQ = 32  # max_len
PROJ = 256  # grounding dimension
IMAGE_DIM = 1280  # precomputed image features (EfficientNet-Lite0's pooled output)


@dataclass
class Arch:
    name: str
    params: int
    hidden: int
    layers: int
    heads: int
    intermediate: int = 0


def count(name: str) -> Arch:
    import torch
    from transformers import AutoModel, BertConfig, RobertaConfig

    cfg = {
        "BERT-base": BertConfig(),
        "BERT-large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                 intermediate_size=4096),
        "MiniLM-L6": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
        "RoBERTa-large": RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                       hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096),
    }[name]
    with torch.device("meta"):
        model = AutoModel.from_config(cfg, add_pooling_layer=False)
    h = cfg.hidden_size
    heads = h * h + h + h * PROJ + PROJ + 1280 * PROJ + PROJ  # MLP + text head + image head (1280-d)
    n = sum(p.numel() for p in model.parameters()) + heads
    return Arch(name, n, h, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size)


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
    # DDP under bf16 autocast keeps fp32 parameters, so it all-reduces fp32 gradients (the
    # trainer registers no compression hook); DeepSpeed with bf16 holds and reduces bf16 ones.
    grad_bytes = (4 if stage == "DDP" else 2) * a.params
    if stage in ("DDP", "ZeRO-1"):
        weights = ring * grad_bytes  # all-reduce
    elif stage == "ZeRO-2":
        weights = ring * grad_bytes  # reduce-scatter grads + all-gather updated weights
    else:
        weights = 1.5 * ring * grad_bytes  # + parameter all-gathers in forward and backward
    # Gathered per step: z2 (hidden, bf16) and the image projection (PROJ, counted at fp32);
    # the backward's reduce-scatter sends the same volume back.
    emb = 2 * (n - 1) * b * gather_bytes_per_sentence(a.hidden)
    return weights / 1e6, emb / 1e6


def gather_bytes_per_sentence(hidden: int) -> int:
    """Bytes one sentence adds to the loss's all-gathers: z2 in bf16 (2 x hidden) and the
    normalised image projection, counted at fp32 (CUDA autocast runs the norm in fp32)."""
    return 2 * hidden + 4 * PROJ


# ------------------------------------------------------------------------ step-time model


@dataclass(frozen=True)
class Cluster:
    """What the step-time model assumes about the machines: H100/H200 SXM nodes of 8 GPUs on
    NVSwitch, one 400 Gb/s InfiniBand NIC per GPU. Each figure is a lead to re-measure."""

    gpus_per_node: int = 8
    peak_tflops: float = 790.0
    """Dense bf16 matrix rate measured on an H200 of this workplace (8192^3, random data)."""
    fp32_tflops: float = 50.0
    """The loss's float32 logits run on the non-tensor-core fp32 units (67 TFLOP/s datasheet)."""
    nvlink_busbw: float = 400e9
    """NCCL bus bandwidth inside a node (8 x H100 SXM, NVSwitch), bytes/s."""
    ib_busbw: float = 45e9
    """Across nodes: 50 GB/s line rate per NIC, ~90% achieved, bytes/s."""
    hop_nvlink_s: float = 1e-6
    hop_ib_s: float = 4e-6
    """Latency per ring step of a small collective inside a node / across nodes."""
    gpu_mem_gib: float = 80.0
    """An H100's memory (an H200 has 141); the per-GPU batch is chunked beyond what fits."""
    workers_per_gpu: int = 8
    """DataLoader workers per GPU: a node has ~2 x 56 cores for 8 GPUs and their 8 rank processes."""
    bucket_bytes: float = 25e6
    """DDP's gradient bucket: the last one is reduced after the backward ends."""


@dataclass
class ComputeFit:
    """t_compute(F) = fixed_s + F / rate: a launch-bound floor plus the matrix work."""

    fixed_s: float = 0.008
    rate_tflops: float = 0.45 * 790.0
    source: str = ("assumed, no GPU has run bench/gpu_check.py yet: 8 ms per step of kernel launches, host "
                   "syncs and AdamW, matrix products at 45% of the 790 TFLOP/s measured peak")
    points: list[tuple[int, float, float]] = field(default_factory=list)
    """(global batch, measured step s, model FLOPs) the fit came from."""


def fit_compute(results: dict | None, cluster: Cluster) -> ComputeFit:
    """Least squares of step time on model FLOPs over the GPU check's BERT-base steps (world
    size 1: no communication), when a GPU run has written them into BENCHMARKS.md."""
    if not results or results.get("dry_run") or len(results.get("steps", [])) < 2 or results.get("bert"):
        return ComputeFit()
    pts = [(r["global_batch"], r["step_s"], r["model_flops"]) for r in results["steps"]]
    n = len(pts)
    mx = sum(f for _, _, f in pts) / n
    my = sum(t for _, t, _ in pts) / n
    slope = sum((f - mx) * (t - my) for _, t, f in pts) / sum((f - mx) ** 2 for _, _, f in pts)
    fixed = max(0.0, my - slope * mx)
    rate = 1.0 / slope / 1e12
    peak = results.get("measured_tflops") or cluster.peak_tflops
    return ComputeFit(fixed, rate, f"fitted to bench/gpu_check.py on {results['device']} (global batches "
                      f"{', '.join(str(b) for b, _, _ in pts)}): {fixed * 1e3:.1f} ms fixed per step, matrix "
                      f"products at {rate:.0f} TFLOP/s ({rate / peak:.0%} of its measured {peak:.0f})", pts)


def bert_shape(a: Arch) -> Shape:
    return Shape(a.layers, a.hidden, a.intermediate, SEQ, PROJ, IMAGE_DIM)


def max_chunk(a: Arch, cluster: Cluster) -> int:
    """Most sentences one GPU can encode at once (a power of two) next to DDP's model state."""
    free = cluster.gpu_mem_gib - model_state_gb(a, "DDP", 1) - 4.0  # CUDA context, allocator slack
    chunk = 1
    while activations_gb(a, chunk * 2) <= free:
        chunk *= 2
    return chunk


@dataclass
class Step:
    gpus: int
    global_batch: int
    per_gpu: int
    chunks: int
    compute_s: float
    reduce_s: float
    reduce_exposed_s: float
    gather_s: float
    gpu_s: float
    supply: float
    """Samples/s the DataLoader workers of one GPU deliver."""
    step_s: float
    bottleneck: str

    @property
    def samples_s(self) -> float:
        return self.global_batch / self.step_s


def ring_latency(n: int, cluster: Cluster) -> float:
    nodes = math.ceil(n / cluster.gpus_per_node)
    if nodes == 1:
        return (n - 1) * cluster.hop_nvlink_s
    return (n - nodes) * cluster.hop_nvlink_s + nodes * cluster.hop_ib_s


def busbw(n: int, cluster: Cluster) -> float:
    return cluster.nvlink_busbw if n <= cluster.gpus_per_node else cluster.ib_busbw


def step_time(a: Arch, n: int, global_batch: int, fit: ComputeFit, cluster: Cluster,
              worker_rate: float, grad_bytes_per_param: int = 4) -> Step:
    """One DDP step of caption batches (both loss terms) on n GPUs, bf16 autocast; gradients
    reduced in fp32 (4 bytes, what the trainer's DDP does) or bf16 (2: ZeRO-1/2 in bf16, or a
    DDP compression hook)."""
    b = global_batch // n
    chunk = max_chunk(a, cluster)
    chunks = max(1, math.ceil(b / chunk))
    f = step_flops(bert_shape(a), b, columns=global_batch)
    matrix = f["total"] - f["loss"]
    if chunks > 1:  # gradient caching encodes every chunk once more without a graph
        matrix += (f["dense"] + f["attention"] + f["heads"]) / 3 + f["image_head"] / 2
    work = matrix / (fit.rate_tflops * 1e12) + f["loss"] / (cluster.fp32_tflops * 1e12)
    compute = fit.fixed_s + work
    # Gradient all-reduce, overlapped with the backward (2/3 of the matrix work) bucket by
    # bucket; the last bucket always waits for the end of the backward.
    grad_bytes = grad_bytes_per_param * a.params
    if n > 1:
        reduce = 2 * (n - 1) / n * grad_bytes / busbw(n, cluster) + 2 * math.log2(n) * cluster.hop_ib_s
        exposed = max(reduce - 2 / 3 * work, reduce * cluster.bucket_bytes / grad_bytes)
        # The loss's two all-gathers and, in the backward, two reduce-scatters: on the critical path.
        local = b * gather_bytes_per_sentence(a.hidden)
        gather = 4 * ring_latency(n, cluster) + 2 * (n - 1) * local / busbw(n, cluster)
    else:
        reduce = exposed = gather = 0.0
    gpu = compute + exposed + gather
    supply = cluster.workers_per_gpu * worker_rate
    loader = b / supply  # prefetching overlaps it with the GPU's work; it only shows when slower
    parts = {"compute": compute, "grad reduce": exposed, "gather": gather, "loader": loader}
    return Step(n, global_batch, b, chunks, compute, reduce, exposed, gather, gpu, supply, max(gpu, loader),
                max(parts, key=parts.get))


GPUS = (8, 16, 32, 64, 128, 256, 512)
GLOBAL_BATCHES = (64, 1024, 4096, 16384, 32768)


def step_tables(a: Arch, fit: ComputeFit, cluster: Cluster, rates: dict[str, float]) -> str:
    feat = rates["features"]
    out = [f"Model: {a.name}, max_len {SEQ}, caption batches (SimCSE + image-text terms), DDP with bf16 "
           f"autocast. Compute: {fit.source}. Network: {cluster.nvlink_busbw / 1e9:.0f} GB/s bus bandwidth "
           f"inside a node of {cluster.gpus_per_node}, {cluster.ib_busbw / 1e9:.0f} GB/s per GPU across nodes, "
           f"{cluster.hop_nvlink_s * 1e6:.0f} / {cluster.hop_ib_s * 1e6:.0f} µs per ring step. Loader: "
           f"{cluster.workers_per_gpu} workers per GPU at {feat:,.0f} feature samples/s each (measured "
           f"here). GPU memory {cluster.gpu_mem_gib:.0f} GiB: per-GPU batches above "
           f"{max_chunk(a, cluster)} sentences use gradient caching.", "",
           "| global batch | GPUs | per GPU | chunks | compute (ms) | grad all-reduce: total / exposed (ms) | "
           "gather (ms) | loader need (workers/GPU) | step (ms) | samples/s | bottleneck | "
           "step with bf16 gradients (ms) |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for g in GLOBAL_BATCHES:
        for n in GPUS:
            if g % n or g // n < 1:
                continue
            st = step_time(a, n, g, fit, cluster, feat)
            half = step_time(a, n, g, fit, cluster, feat, grad_bytes_per_param=2)
            need = st.per_gpu / st.gpu_s / feat
            out.append(f"| {g} | {n} | {st.per_gpu} | {st.chunks} | {st.compute_s * 1e3:.1f} | "
                       f"{st.reduce_s * 1e3:.1f} / {st.reduce_exposed_s * 1e3:.1f} | {st.gather_s * 1e3:.2f} | "
                       f"{need:.1f} | {st.step_s * 1e3:.1f} | {st.samples_s:,.0f} | {st.bottleneck} | "
                       f"{half.step_s * 1e3:.1f} |")
    out += ["", "**Crossovers.** With the per-GPU batch fixed and GPUs added (the global batch grows with "
            "them), the gather's latency and volume grow with the GPU count while the compute stays; the first "
            "GPU count (powers of two up to 65,536) at which a component takes longer than the compute of a "
            "step:", "",
            "| per-GPU batch | compute (ms) | exposed fp32 all-reduce > compute from | gather > compute from | "
            "gather at 512 GPUs (ms) | samples/s one GPU consumes | feature workers needed | "
            "JPEG-decode workers needed |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in (1, 8, 64, 512):
        first: dict[str, int | None] = {"gather": None, "grad reduce": None}
        for n in (2**k for k in range(3, 17)):
            st = step_time(a, n, b * n, fit, cluster, feat)
            if first["gather"] is None and st.gather_s > st.compute_s:
                first["gather"] = n
            if first["grad reduce"] is None and st.reduce_exposed_s > st.compute_s:
                first["grad reduce"] = n
        solo = step_time(a, 1, b, fit, cluster, feat)
        big = step_time(a, 512, b * 512, fit, cluster, feat)
        consume = b / solo.gpu_s
        out.append(f"| {b} | {solo.compute_s * 1e3:.1f} | {_count(first['grad reduce'])} | "
                   f"{_count(first['gather'])} | {big.gather_s * 1e3:.2f} | {consume:,.0f} | {consume / feat:.1f} | "
                   f"{consume / rates['jpeg']:.0f} |")
    return "\n".join(out)


def _count(n: int | None) -> str:
    return f"{n:,}" if n else "never (<= 65,536)"


# ------------------------------------------------------------------------ the CPU figures


def _figure(text: str, pattern: str) -> float | None:
    m = re.search(pattern, text, re.S)
    return float(m.group(1).replace(",", "")) if m else None


def measured_rates(bench: str) -> dict[str, float]:
    """Per-worker stream rates of bench/bench_stream.py (one worker): (a) features, (b) JPEG."""
    row = re.search(r"\| 1 \| ([\d,]+) \| [\d,]+ \| ([\d,]+) \| [\d,]+ \|", bench)
    if not row:
        return {"features": 2000.0, "jpeg": 230.0, "source": 0.0}
    return {"features": float(row.group(1).replace(",", "")), "jpeg": float(row.group(2).replace(",", "")),
            "source": 1.0}


def cpu_check(bench: str) -> str:
    """The model's assumptions against what this machine measured (docs/BENCHMARKS.md)."""
    rows = ["| assumption | model's prediction | measured here | |", "| --- | --- | --- | --- |"]
    r1 = measured_rates(bench)
    two = _figure(bench, r"\| 2 \| ([\d,]+) \| [\d,]+ \| [\d,]+ \| [\d,]+ \|")
    if r1["source"] and two:
        pred = 2 * r1["features"]
        rows.append(f"| loader supply = workers x one worker's rate, while each worker has a core | 2 workers: "
                    f"{pred:,.0f} samples/s | {two:,.0f} ({two / pred:.0%}): 2 workers and the main process "
                    f"share 2 cores | holds with a core per worker; the model counts "
                    f"{Cluster().workers_per_gpu} workers per GPU on nodes with ~14 cores per GPU |")
    consume = _figure(bench, r"Trainer consumption on this machine.*?\*\*([\d.,]+) samples/s")
    if consume and r1["source"]:
        rows.append(f"| the loader is a bottleneck only when a GPU consumes more than its workers supply | "
                    f"CPU trainer ({consume:.1f} samples/s) far below one worker ({r1['features']:,.0f}) | "
                    f"stream {r1['features'] / consume:.0f}x consumption (bench_stream) | holds |")
    fwd = _figure(bench, r"\| encoder forward \| ([\d.]+) \|")
    bwd = _figure(bench, r"\| encoder backward \+ grad all-reduce \| ([\d.]+) \|")
    share = _figure(bench, r"\| loss \+ all-gathers \(fwd \+ bwd\) \| [\d.]+ \| ([\d.]+)%")
    if fwd and bwd:
        grad_mb = 2 * 1 / 2 * 4 * count("MiniLM-L6").params / 1e6
        rows.append(f"| backward = 2 x forward FLOPs, DDP's all-reduce overlapped with it | backward "
                    f"{2 * fwd:.3f} s from the measured forward {fwd:.3f} s, all-reduce hidden | backward + "
                    f"all-reduce {bwd:.3f} s ({bwd / fwd:.2f}x forward; MiniLM, gloo, world 2) | consistent: "
                    f"the {grad_mb:.0f} MB fp32 all-reduce adds nothing visible to the backward |")
    if share is not None:
        mini = count("MiniLM-L6")
        # fp32 on CPU: z2 (384) and the image projection (256), gathered forward and reduce-scattered
        # backward; each of the 2 ranks receives the other's 16 rows.
        emb = 2 * 1 * 16 * 4 * (mini.hidden + PROJ)
        grad = 2 * 1 / 2 * 4 * mini.params
        rows.append(f"| the gathers move little next to the gradients | world 2, 16 sentences per rank, fp32: "
                    f"{emb / 1e3:.0f} kB of embeddings vs {grad / 1e6:.0f} MB of gradients ({emb / grad:.2%}) | "
                    f"loss + gathers {share:.1f}% of a DDP step (MiniLM, gloo) | holds |")
    return "\n".join(rows)


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
            "| model | GPUs | DDP weights (fp32 grads) | ZeRO-1/2 weights (bf16) | ZeRO-3 weights | embeddings | "
            "global batch |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a in archs:
        for n in (8, 64, 512):
            w, e = comm_mb(a, n, 64, "DDP")
            w2, _ = comm_mb(a, n, 64, "ZeRO-2")
            w3, _ = comm_mb(a, n, 64, "ZeRO-3")
            out.append(f"| {a.name} | {n} | {w:.0f} | {w2:.0f} | {w3:.0f} | {e:.1f} | {64 * n} |")
    return "\n".join(out)


def blocks() -> dict[str, str]:
    """Every generated block of docs/SCALING.md, by the name of its HTML-comment markers."""
    cluster = Cluster()
    bench = BENCHMARKS.read_text(encoding="utf-8") if BENCHMARKS.exists() else ""
    fit = fit_compute(read_embedded(bench), cluster)
    return {"tables": tables(), "step-model": step_tables(count("BERT-base"), fit, cluster, measured_rates(bench)),
            "cpu-check": cpu_check(bench)}


def main() -> None:
    out = blocks()
    for body in out.values():
        print(body, end="\n\n")
    if "--no-write" in sys.argv or not DOC.exists():
        return
    text = DOC.read_text(encoding="utf-8")
    for name, body in out.items():
        block = f"<!-- {name} -->\n{body}\n<!-- /{name} -->"
        text, found = re.subn(rf"<!-- {name} -->.*?<!-- /{name} -->", lambda _, b=block: b, text, flags=re.S)
        if not found:
            raise SystemExit(f"{DOC}: no <!-- {name} --> ... <!-- /{name} --> block to fill; add the markers "
                             f"where the table belongs")
    tmp = DOC.with_name(DOC.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(DOC)


if __name__ == "__main__":
    main()
