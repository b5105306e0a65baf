"""The fast paths of the training step change how the step is computed, never what it computes.

- AdamW runs fused (CPU, CUDA) or multi-tensor where torch has those kernels, and its update is
  AdamW's: checked against the closed form of a first Adam step and against torch's for-loop.
- The encoder trains on real tokens only (packed): the hidden states at real positions and
  every gradient equal those of the padded forward; evaluation keeps the padded forward.
- A step reads one value back from the device (the non-finite agreement); the loss terms are
  read once per logging window.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from trainer import engine
from trainer.config import load_config
from trainer.engine import build_accelerator, build_model, build_optimizer, build_scheduler
from trainer.step import train_step

from .conftest import ROOT

LR = 1e-3


@pytest.fixture()
def fresh_accelerator():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def sentences(n: int) -> list[str]:
    lines = [ln for ln in (ROOT / "sample/wiki1m/wiki1m_first5000.txt").read_text().splitlines() if ln.strip()]
    # Mixed lengths, so that batches padded to their longest sentence hold real padding.
    return [ln if i % 2 else " ".join(ln.split()[:4]) for i, ln in enumerate(lines[:n])]


def text_batch(tokenizer, n: int = 8, max_len: int = 24) -> dict[str, torch.Tensor]:
    toks = tokenizer(sentences(n), max_length=max_len, truncation=True, padding="longest", return_tensors="pt")
    return {"input_ids": toks["input_ids"], "attention_mask": toks["attention_mask"]}


def setup(tiny_bert: Path, *extra: str, dtype: torch.dtype = torch.float32):
    cfg = load_config(ROOT / "tests/data/dist_base.yaml",
                      [f"model.name_or_path={tiny_bert}", "model.pooler=cls", "data.global_batch_size=8",
                       "model.proj_dim=16", "tracking.backend=none", f"optim.lr={LR}", *extra])
    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, 12).to(dtype)
    return cfg, acc, model


# ---------------------------------------------------------------- optimizer


def test_adamw_is_fused_on_cpu_and_falls_back_where_torch_has_no_fused_kernel(
        tiny_bert: Path, fresh_accelerator, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import _foreach_utils

    cfg, _, model = setup(tiny_bert)
    opt = build_optimizer(cfg, model)
    assert all(g["fused"] for g in opt.param_groups) and not any(g["foreach"] for g in opt.param_groups)
    # A device type with multi-tensor kernels only gets foreach; one with neither, the for-loop.
    monkeypatch.setattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    monkeypatch.setattr(_foreach_utils, "_get_foreach_kernels_supported_devices", lambda: ["cuda", "cpu"])
    assert engine.adamw_kernel(model) == {"foreach": True}
    monkeypatch.setattr(_foreach_utils, "_get_foreach_kernels_supported_devices", lambda: ["cuda"])
    assert engine.adamw_kernel(model) == {}
    opt = build_optimizer(cfg, model)
    assert not any(g["fused"] or g["foreach"] for g in opt.param_groups)


def _trained(tiny_bert: Path, kernel: dict[str, bool], steps: int, monkeypatch: pytest.MonkeyPatch,
             *extra: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    """Weights before and after `steps` trainer steps with the AdamW kernel forced to `kernel`."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(engine, "adamw_kernel", lambda model: kernel)
    cfg, acc, model = setup(tiny_bert, "optim.grad_clip=0", "optim.schedule=constant", *extra)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(cfg, model)
    assert bool(opt.param_groups[0]["fused"]) == bool(kernel.get("fused"))
    sched = build_scheduler(cfg, opt, 100)
    model, opt = acc.prepare(model, opt)
    model.train()
    data = text_batch(AutoTokenizer.from_pretrained(tiny_bert))
    for step in range(steps):
        torch.manual_seed(step)  # the same dropout masks for every kernel
        train_step(model, opt, sched, data, cfg, acc, step)
    after = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    return before, after, acc.unwrap_model(model)


def test_first_fused_adamw_step_is_the_closed_form(tiny_bert: Path, fresh_accelerator,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """From zero moments, Adam's first update is lr * g / (|g| + eps) per element (bias
    correction makes m_hat = g and v_hat = g^2), plus lr * wd * p for decayed tensors."""
    wd = 0.1
    before, after, _ = _trained(tiny_bert, {"fused": True}, 1, monkeypatch, f"optim.weight_decay={wd}")
    # The gradient of that step, recomputed on the initial weights with the same dropout masks.
    cfg, _, ref = setup(tiny_bert, "optim.grad_clip=0")
    ref.load_state_dict(before)
    ref.train()
    data = text_batch(AutoTokenizer.from_pretrained(tiny_bert))
    from trainer.loss import mcse_loss

    torch.manual_seed(0)
    mcse_loss(ref(data), temperature=cfg.loss.temperature, temperature_vl=cfg.loss.temperature_vl,
              lambda_mm=cfg.loss.lambda_mm)["loss"].backward()
    decayed = {id(p) for g in engine.param_groups(ref, wd, LR) if g["weight_decay"] for p in g["params"]}
    checked = 0
    for name, p in ref.named_parameters():
        if p.grad is None:
            continue
        g, p0 = p.grad.double(), before[name].double()
        want = p0 * (1 - LR * wd if id(p) in decayed else 1.0) - LR * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after[name].double(), want, rtol=0, atol=2e-6, msg=name)
        checked += 1
    assert checked >= 20


def test_fused_and_foreach_adamw_train_like_the_for_loop(tiny_bert: Path, fresh_accelerator,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    before, plain, _ = _trained(tiny_bert, {}, 4, monkeypatch)
    assert sum(not torch.equal(before[k], w) for k, w in plain.items()) >= 20  # the steps moved the weights
    for kernel in ({"fused": True}, {"foreach": True}):
        _, fast, _ = _trained(tiny_bert, kernel, 4, monkeypatch)
        for name, w in plain.items():
            if name.endswith("attention.self.key.bias"):
                # Softmax ignores a shift shared by every key, so this bias's true gradient is 0 and
                # its computed one is rounding noise, which Adam rescales to steps of about lr.
                continue
            torch.testing.assert_close(fast[name], w, rtol=1e-5, atol=1e-6, msg=f"{kernel} {name}")


# ---------------------------------------------------------------- packed encoder


def _encoder(path: Path, dropout: float = 0.0) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    return AutoModel.from_pretrained(path, config=config, add_pooling_layer=False).double()


def test_packed_encoder_equals_the_padded_one_at_real_tokens(tiny_bert: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = text_batch(tok, n=12)
    real = batch["attention_mask"].bool()
    assert (~real).sum() > 20  # the batch really holds padding
    padded = _encoder(tiny_bert).train()
    packed = copy.deepcopy(padded)
    assert engine.enable_packing(packed) and not engine.enable_packing(packed)  # once only

    out_padded = padded(**batch).last_hidden_state
    out_packed = packed(**batch).last_hidden_state
    torch.testing.assert_close(out_packed[real], out_padded[real], rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(out_packed[~real]) == 0  # the padded positions were never computed
    assert torch.count_nonzero(out_padded[~real]) > 0

    # Gradients of a loss on [CLS] and on a masked mean (what the poolers read).
    def loss(out: torch.Tensor) -> torch.Tensor:
        m = real.unsqueeze(-1).double()
        return out[:, 0].pow(2).sum() + ((out * m).sum(1) / m.sum(1)).sin().sum()

    loss(out_padded).backward()
    loss(out_packed).backward()
    grads = {n: p.grad for n, p in padded.named_parameters() if p.grad is not None}
    for name, p in packed.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-9, atol=1e-12, msg=name)
    assert len(grads) == len(list(packed.parameters()))

    # Evaluation (and anything asking for hidden states) uses the encoder's own forward.
    packed.eval()
    padded.eval()
    with torch.no_grad():
        assert torch.equal(packed(**batch).last_hidden_state, padded(**batch).last_hidden_state)
    # Parameters and names are untouched: the weights save and load as before.
    assert list(packed.state_dict()) == list(padded.state_dict())


def test_packed_training_keeps_dropout_and_the_mcse_model(tiny_bert: Path, fresh_accelerator) -> None:
    _, _, model = setup(tiny_bert, "model.dropout=0.1", dtype=torch.float64)
    assert model.encoder._webmcse_padded_forward is not None  # build_model packs by default
    model.train()
    batch = text_batch(AutoTokenizer.from_pretrained(tiny_bert))
    out = model(batch)
    z1, z2 = out.sim_views
    assert not torch.allclose(z1, z2)  # two dropout views
    # Without dropout the packed and the padded models give the same embeddings.
    _, _, model = setup(tiny_bert, "model.dropout=0", dtype=torch.float64)
    plain = copy.deepcopy(model)
    plain.encoder.forward = plain.encoder._webmcse_padded_forward
    model.train()
    plain.train()
    for a, b in zip(model(batch).tensors(), plain(batch).tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unsupported_encoders_are_left_padded(tiny_bert: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_bert)
    config.is_decoder = True
    decoder = AutoModel.from_config(config, add_pooling_layer=False)
    assert not engine.packable(decoder) and not engine.enable_packing(decoder)
    assert not engine.packable(torch.nn.Linear(2, 2))


def test_gradient_checkpointing_recomputes_the_packed_layers(tiny_bert: Path, fresh_accelerator) -> None:
    """With checkpointing the packed forward keeps no layer activations: every layer runs again
    in the backward pass (and, tests/test_distributed.py, gives the same gradients)."""
    batch = text_batch(AutoTokenizer.from_pretrained(tiny_bert))
    for flag, runs_per_layer in (("false", 1), ("true", 2)):
        _, _, model = setup(tiny_bert, f"train.grad_checkpointing={flag}")
        assert model.encoder._webmcse_padded_forward is not None
        calls: list[int] = []
        for i, layer in enumerate(model.encoder.encoder.layer):
            layer.intermediate.register_forward_hook(lambda *_, i=i, calls=calls: calls.append(i))
        model.train()
        out = model(batch)
        out.sim_views[0].sum().backward()
        layers = len(model.encoder.encoder.layer)
        assert sorted(calls) == sorted(list(range(layers)) * runs_per_layer), flag  # both views in one forward


# ---------------------------------------------------------------- host syncs


def test_a_step_reads_the_device_once(tiny_bert: Path, fresh_accelerator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way of reading a tensor's value on the host is counted during train_step: one
    read, the non-finite agreement. Terms and gradient norm come back as tensors."""
    cfg, acc, model = setup(tiny_bert)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, 100)
    model, opt = acc.prepare(model, opt)
    model.train()
    data = text_batch(AutoTokenizer.from_pretrained(tiny_bert))
    train_step(model, opt, sched, data, cfg, acc)  # first step: lazy state creation
    reads: list[str] = []
    for meth in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, meth)

        def counted(self, *a, _real=real, _meth=meth, **k):
            reads.append(_meth)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, counted)
    result = train_step(model, opt, sched, data, cfg, acc, 1)
    monkeypatch.undo()
    assert len(reads) == 1, reads
    assert not result.skipped and torch.is_tensor(result.terms["loss"]) and torch.is_tensor(result.grad_norm_t)
    assert result.losses["loss"] == pytest.approx(float(result.terms["loss"]))
