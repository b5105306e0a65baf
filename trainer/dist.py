"""The only module that touches torch.distributed: rank helpers and collectives.

Everything else asks this module for ranks, gathers and agreements, so the loss code stays
pure and runs unchanged at world size 1 without a process group.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch
import torch.distributed as dist

_LONG_GROUP: Any = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank: from the process group, else the launcher's environment, else 0."""
    if is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def local_rank() -> int:
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_main() -> bool:
    return rank() == 0


def _multi() -> bool:
    return is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows along dim 0 (W*B rows), keeping the autograd graph.

    The backward of an all-gather is a reduce-scatter (sum) of the incoming gradients, so each
    rank receives the gradient that *every* rank's loss sends to its own rows. Summed over
    ranks (DDP/DeepSpeed average, and every rank's loss is a mean over its B rows) this is
    exactly the gradient of the global-batch loss. ``accelerator.gather`` and a plain
    ``dist.all_gather`` have no backward and would silently drop the cross-rank terms.
    """
    if not _multi():
        return x_BD
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(x_BD.contiguous(), gather_dim=0, group=dist.group.WORLD)
    # Functional collectives return a lazily-waited tensor; materialise it here so callers
    # see an ordinary tensor.
    return out.wait() if hasattr(out, "wait") else out


def all_gather_no_grad(x_BD: torch.Tensor) -> torch.Tensor:
    if not _multi():
        return x_BD
    parts = [torch.empty_like(x_BD) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x_BD.contiguous())
    return torch.cat(parts)


def all_reduce_max(value: float, device: Any = "cpu") -> float:
    """Agreement primitive: any rank raising a flag raises it for all."""
    if not _multi():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(value: float, device: Any = "cpu") -> float:
    if not _multi():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (for gradients kept outside the wrapped model)."""
    if _multi():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _multi():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def setup_long_waits(timeout_s: float) -> None:
    """Create (on every rank, collectively) the gloo group used for long waits."""
    global _LONG_GROUP
    if _multi() and _LONG_GROUP is None:
        _LONG_GROUP = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout_s))


def wait_for_main(what: str) -> None:
    """All ranks meet here after rank 0 finished a long solo task (evaluation, export).

    The meeting happens on a separate gloo group with its own long timeout, so the default
    group's collective timeout (NCCL's watchdog on GPUs) never fires while rank 0 works; if
    the wait itself times out, the monitored barrier's error names the rank that is missing.
    """
    if not _multi():
        return
    group = _LONG_GROUP if _LONG_GROUP is not None else None
    try:
        dist.monitored_barrier(group=group, wait_all_ranks=True)
    except RuntimeError as exc:
        raise RuntimeError(f"waiting for rank 0 to finish {what}: {exc}") from exc


def barrier() -> None:
    if _multi():
        dist.barrier()
