"""The only module that touches torch.distributed: rank helpers and collectives.

Everything else asks this module for ranks and gathers, so that the loss code stays pure and
runs unchanged at world size 1 without a process group.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def is_main() -> bool:
    return rank() == 0


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows along dim 0 (W*B rows), keeping the autograd graph.

    The backward of an all-gather is a reduce-scatter of the incoming gradients, so each
    rank receives the gradient that every rank's loss sends to its own rows: summed across
    ranks this is exactly the gradient of the global-batch loss. (``accelerator.gather`` and a
    plain ``dist.all_gather`` have no backward and would silently drop those terms.)
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return x_BD
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    return all_gather_tensor_autograd(x_BD.contiguous(), gather_dim=0, group=dist.group.WORLD)


def barrier() -> None:
    if is_initialized():
        dist.barrier()
