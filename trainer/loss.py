"""MCSE's contrastive objectives as pure functions of embeddings.

Every loss takes *local rows* and *global columns*: on rank r with B rows per rank, the
positive of row i is column ``offset + i`` with ``offset = r * B``. At world size 1 the
columns are the rows' own batch and ``offset = 0``; with W ranks the caller passes columns
gathered with an autograd-aware all-gather (see trainer/dist.py), which makes the summed
gradient equal to that of one process holding the whole batch. This module never talks to
other processes itself: the gather is injected by the caller.

Shape suffixes: B local rows, G = W*B global columns, D embedding dim, P grounding dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def info_nce(query_BD: torch.Tensor, keys_GD: torch.Tensor, temperature: float | torch.Tensor,
             offset: int = 0) -> torch.Tensor:
    """Cross-entropy of cosine logits; row i's positive is column offset + i.

    Inputs are L2-normalised here (cosine similarity, as MCSE's nn.CosineSimilarity), and
    the logits are computed in float32 whatever the autocast dtype: a 0.05 temperature
    multiplies rounding errors by 20 (float64 stays float64 for exactness tests).
    """
    q_BD = F.normalize(_at_least_fp32(query_BD), dim=-1)
    k_GD = F.normalize(_at_least_fp32(keys_GD), dim=-1)
    logits_BG = q_BD @ k_GD.T / temperature
    labels_B = torch.arange(q_BD.shape[0], device=q_BD.device) + offset
    return F.cross_entropy(logits_BG, labels_B)


def simcse_loss(z1_BD: torch.Tensor, z2_GD: torch.Tensor, temperature: float | torch.Tensor,
                offset: int = 0) -> torch.Tensor:
    """Unsupervised SimCSE: view 1 of sentence i against view 2 of every sentence."""
    return info_nce(z1_BD, z2_GD, temperature, offset)


def grounding_loss(text_views_VBP: list[torch.Tensor], image_GP: torch.Tensor,
                   temperature: float | torch.Tensor, offset: int = 0) -> torch.Tensor:
    """MCSE's multimodal term (text -> image), averaged over the dropout views."""
    terms = [info_nce(t_BP, image_GP, temperature, offset) for t_BP in text_views_VBP]
    return torch.stack(terms).mean()


def image_to_text_loss(image_BP: torch.Tensor, text_views_VGP: list[torch.Tensor],
                       temperature: float | torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The reverse direction (image -> text), averaged over the dropout views."""
    terms = [info_nce(image_BP, t_GP, temperature, offset) for t_GP in text_views_VGP]
    return torch.stack(terms).mean()


@dataclass
class MCSEOutputs:
    """What the model hands to the loss for one batch of B sentences (two dropout views)."""

    sim_views: tuple[torch.Tensor, torch.Tensor]
    """(z1_BD, z2_BD): MLP outputs for the text-text term."""
    ground_views: tuple[torch.Tensor, torch.Tensor] | None = None
    """(g1_BP, g2_BP): text projections into the grounding space (caption batches only)."""
    image_BP: torch.Tensor | None = None
    """Image projections into the grounding space (caption batches only)."""
    temperatures: torch.Tensor | None = None
    """(τ, τ_vl) when the model learns them; None means the configured constants."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor field in a fixed order (gradient caching stores and replays these)."""
        out = [*self.sim_views]
        if self.ground_views is not None and self.image_BP is not None:
            out += [*self.ground_views, self.image_BP]
        if self.temperatures is not None:
            out.append(self.temperatures)
        return out

    def with_tensors(self, tensors: list[torch.Tensor]) -> MCSEOutputs:
        """The same structure over replacement tensors (inverse of :meth:`tensors`)."""
        it = iter(tensors)
        out = MCSEOutputs(sim_views=(next(it), next(it)))
        if self.ground_views is not None and self.image_BP is not None:
            out.ground_views = (next(it), next(it))
            out.image_BP = next(it)
        if self.temperatures is not None:
            out.temperatures = next(it)
        return out


def mcse_loss(
    out: MCSEOutputs,
    *,
    temperature: float | torch.Tensor,
    temperature_vl: float | torch.Tensor,
    lambda_mm: float,
    symmetric: bool = False,
    gather: Gather = _identity,
    offset: int = 0,
) -> dict[str, torch.Tensor]:
    """Total loss and its terms: L_simcse (+ λ·L_mm on caption batches).

    Learned temperatures in ``out.temperatures`` take precedence over the constants."""
    if out.temperatures is not None:
        temperature, temperature_vl = out.temperatures[0], out.temperatures[1]
    z1_BD, z2_BD = out.sim_views
    terms = {"loss_simcse": simcse_loss(z1_BD, gather(z2_BD), temperature, offset)}
    total = terms["loss_simcse"]
    if out.ground_views is not None and out.image_BP is not None:
        image_GP = gather(out.image_BP)
        mm = grounding_loss(list(out.ground_views), image_GP, temperature_vl, offset)
        if symmetric:
            text_GP = [gather(g) for g in out.ground_views]
            mm = 0.5 * (mm + image_to_text_loss(out.image_BP, text_GP, temperature_vl, offset))
        terms["loss_mm"] = mm
        total = total + lambda_mm * mm
    terms["loss"] = total
    return terms
