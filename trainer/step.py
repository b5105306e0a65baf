"""One optimizer step: forward, MCSE loss with gathered negatives, backward, clip, update.

When the per-device batch exceeds ``data.max_device_batch``, the step uses gradient caching
(GradCache): every chunk of the rank's batch (every batch field: tokens, masks, image
features or decoded images) is first encoded without a graph, the loss is computed over the whole
global batch on those cached embeddings, and each chunk is then re-encoded with a graph and
back-propagated with its slice of the embedding gradient. Three details make it exact:

- the dropout masks of the second pass equal the first pass's (RNG state replayed per chunk);
- the cached embeddings are leaves whose gradients include what *other* ranks' losses send
  back through the autograd all-gather;
- a learned temperature receives its gradient once per step, from the cached-loss backward,
  not once per chunk (the K-times-too-large gradient of open_clip's accum-freq).

Gradient synchronisation happens once per step: Accelerate's ``accumulate`` keeps DDP in
``no_sync`` and DeepSpeed off its accumulation boundary until the last chunk.

Host syncs: a step reads one value back from the device, the agreement on whether its loss
and gradient norm are finite (under DeepSpeed, whose update runs inside the backward, on the
loss before the backward). The loss terms and the gradient norm stay on the device as
detached scalars; the loop reads them once per logging window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer import dist
from trainer.config import Config, chunk_size
from trainer.loss import mcse_loss


@dataclass
class StepResult:
    terms: dict[str, torch.Tensor | float]
    """The step's loss terms (and robust-loss fractions) as detached scalars where they were
    computed: reading a device tensor is a host sync, so the loop sums them on the device and
    reads them once per logging window."""
    grad_norm_t: torch.Tensor | None
    """Gradient norm before clipping (None when the update was skipped)."""
    skipped: bool = False
    """True when some rank saw a non-finite loss or gradient and every rank skipped the update."""

    @property
    def losses(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.terms.items()}

    @property
    def grad_norm(self) -> float | None:
        return float(self.grad_norm_t) if self.grad_norm_t is not None else None


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with train.nonfinite=stop (raised on every rank together)."""


def _agreed_bad(*values: torch.Tensor | float | None, device: Any) -> bool:
    """True on every rank if any of the values is non-finite on any rank. The one host sync
    of a step: the flags are combined on the device and read back once."""
    flags = [~torch.isfinite(torch.as_tensor(v)).all() for v in values if v is not None]
    bad = bool(torch.stack(flags).any()) if flags else False
    return dist.all_reduce_max(1.0 if bad else 0.0, device) > 0


def _loss_kwargs(cfg: Config, offset: int, step: int) -> dict[str, Any]:
    lo = cfg.loss
    drop = lo.robust_drop if step >= lo.robust_warmup_steps else 0.0
    return {"temperature": lo.temperature, "temperature_vl": lo.temperature_vl, "lambda_mm": lo.lambda_mm,
            "symmetric": lo.symmetric, "gather": dist.all_gather_with_grad, "offset": offset, "robust_drop": drop}


def _terms(losses: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], device: Any
           ) -> dict[str, torch.Tensor | float]:
    """The loss terms for logging, detached and left on the device, plus what the robust loss
    dropped: the global fraction, and where the data carries the noise lab's ground truth, the
    share of the dropped pairs that were really corrupted (two small all-reduces, robust steps
    only)."""
    values: dict[str, torch.Tensor | float] = {k: v.detach() for k, v in losses.items() if not k.startswith("_")}
    keep = losses.get("_keep")
    if keep is not None:
        dropped = ~keep.detach()
        n_rows = dist.all_reduce_sum(float(keep.numel()), device)
        n_drop = dist.all_reduce_sum(float(dropped.sum()), device)
        values["robust_dropped_frac"] = n_drop / n_rows
        if "noisy" in batch:
            hit = dist.all_reduce_sum(float((dropped & batch["noisy"].to(dropped.device)).sum()), device)
            values["robust_dropped_noisy_frac"] = hit / n_drop if n_drop else float("nan")
    return values


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _chunks(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Split every per-sentence field; a field that is not per-sentence cannot be chunked and
    is refused rather than silently dropped (a dropped image field would remove the
    image-text term)."""
    n = batch["input_ids"].shape[0]
    odd = [k for k, v in batch.items() if not (torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n)]
    if odd:
        raise ValueError(f"gradient caching: batch fields {odd} are not per-sentence tensors of {n} rows")
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def forward_backward(model: Any, batch: dict[str, torch.Tensor], cfg: Config,
                     accelerator: Any, step: int = 0) -> tuple[dict[str, float], bool]:
    """Loss terms of this rank's batch, and whether the backward ran; gradients are left in
    the parameters. A non-finite loss on any rank means no rank runs the backward."""
    terms, ran = _forward_backward(model, batch, cfg, accelerator, step, loss_gate=True)
    return {k: float(v) for k, v in terms.items()}, ran


def _forward_backward(model: Any, batch: dict[str, torch.Tensor], cfg: Config, accelerator: Any, step: int,
                      loss_gate: bool) -> tuple[dict[str, torch.Tensor | float], bool]:
    """forward_backward with the terms left on the device. ``loss_gate``: agree on a finite
    loss before the backward (a host sync; needed where the backward also updates, DeepSpeed);
    without it the backward always runs and the caller agrees once, after clipping."""
    B = batch["input_ids"].shape[0]
    kwargs = _loss_kwargs(cfg, offset=accelerator.process_index * B, step=step)
    chunk = chunk_size(B, cfg.data.max_device_batch)
    if chunk >= B:
        with accelerator.autocast():
            losses = mcse_loss(model(_model_inputs(batch)), **kwargs)
        values = _terms(losses, batch, accelerator.device)
        if loss_gate and _agreed_bad(values["loss"], device=accelerator.device):
            return values, False
        accelerator.backward(losses["loss"])
        return values, True
    return _cached_forward_backward(model, batch, chunk, kwargs, accelerator, loss_gate)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "noisy"}


def _cached_forward_backward(model: Any, batch: dict[str, torch.Tensor], chunk: int, loss_kwargs: dict[str, Any],
                             accelerator: Any, loss_gate: bool) -> tuple[dict[str, torch.Tensor | float], bool]:
    device = batch["input_ids"].device
    parts = _chunks(_model_inputs(batch), chunk)
    K = len(parts)

    # Pass 1: embeddings of every chunk, no graph; remember each chunk's RNG state.
    states, outs = [], []
    with torch.no_grad():
        for part in parts:
            states.append(_rng_state(device))
            with accelerator.autocast():
                outs.append(model(part))
    resume_state = _rng_state(device)
    per_chunk = [o.tensors() for o in outs]
    has_tau = outs[0].temperatures is not None
    n_rows = len(per_chunk[0]) - int(has_tau)
    cached = [torch.cat([p[i] for p in per_chunk]) for i in range(n_rows)]
    if has_tau:
        cached.append(per_chunk[0][-1])
    leaves = [t.detach().requires_grad_(True) for t in cached]

    # The loss over the full global batch, differentiated w.r.t. the cached embeddings only.
    with accelerator.autocast():
        losses = mcse_loss(outs[0].with_tensors(leaves), **loss_kwargs)
    values = _terms(losses, batch, device)
    if loss_gate and _agreed_bad(values["loss"], device=device):
        _set_rng_state(resume_state, device)
        return values, False
    losses["loss"].backward()
    grads = [leaf.grad for leaf in leaves]

    # Pass 2: replay each chunk with its RNG state and push its slice of the gradient into
    # the parameters. The surrogate's gradient w.r.t. the chunk's embeddings is exactly that
    # slice; x K undoes the 1/K that Accelerate and DeepSpeed apply for K accumulation steps.
    for k, part in enumerate(parts):
        _set_rng_state(states[k], device)
        rows = slice(k * chunk, (k + 1) * chunk)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = model(part).tensors()
            # d(sum(t * g))/dt = g whatever the product's precision; g is cast to t's dtype
            # exactly as autograd would cast it in an uncached backward.
            surrogate = sum((t * g[rows].to(t.dtype)).sum()
                            for t, g in zip(out[:n_rows], grads[:n_rows], strict=True))
            if has_tau and k == K - 1:
                surrogate = surrogate + (out[-1] * grads[-1].to(out[-1].dtype)).sum()
            accelerator.backward(surrogate * K)
    _set_rng_state(resume_state, device)
    return values, True


def train_step(model: Any, optimizer: Any, scheduler: Any, batch: dict[str, torch.Tensor], cfg: Config,
               accelerator: Any, step: int = 0) -> StepResult:
    """forward_backward, then clip, update, schedule and zero the gradients.

    Non-finite values are agreed across ranks before anything is applied, in one host sync:
    plain and DDP runs always run the backward and agree on the loss and the gradient norm
    together before the optimizer step (a non-finite loss gives a non-finite norm anyway; the
    wasted backward happens only on bad steps); under DeepSpeed the update happens inside its
    backward, so the loss is agreed before the backward and only that check applies there.
    With train.nonfinite=skip every rank then skips the update; with stop every rank raises.
    """
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
    terms, ran = _forward_backward(model, batch, cfg, accelerator, step, loss_gate=deepspeed)
    norm_t = None
    if ran:
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = accelerator.clip_grad_norm_(model.parameters(), clip)
        norm_t = torch.as_tensor(norm).detach() if norm is not None else None
        if not deepspeed and _agreed_bad(terms["loss"], norm_t, device=accelerator.device):
            ran = False
    if not ran and cfg.train.nonfinite == "stop":
        raise NonFiniteError(f"non-finite loss or gradient (loss {float(terms['loss'])}, gradient norm "
                             f"{float(norm_t) if norm_t is not None else None}) on at least one rank; stopping "
                             f"before the optimizer step (train.nonfinite=stop)")
    if ran:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(terms, norm_t if ran else None, skipped=not ran)
