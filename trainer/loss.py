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
    return info_nce_rows(query_BD, keys_GD, temperature, offset).mean()


def info_nce_rows(query_BD: torch.Tensor, keys_GD: torch.Tensor, temperature: float | torch.Tensor,
                  offset: int = 0) -> torch.Tensor:
    """:func:`info_nce` per row (no mean): loss_B[i] for row i against all G columns."""
    q_BD = F.normalize(_at_least_fp32(query_BD), dim=-1)
    k_GD = F.normalize(_at_least_fp32(keys_GD), dim=-1)
    logits_BG = q_BD @ k_GD.T / temperature
    labels_B = torch.arange(q_BD.shape[0], device=q_BD.device) + offset
    return F.cross_entropy(logits_BG, labels_B, reduction="none")


def robust_grounding_loss(rows_B: torch.Tensor, drop_fraction: float, gather: Gather,
                          offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grounding term without the pairs it fits worst: of the G pairs of the *global*
    batch, the floor(fraction x G) with the highest per-pair loss are left out, and the rest
    averaged. Every rank gathers the same G detached losses and ranks them the same way (ties
    by global position), so all ranks drop the same pairs without another message. Each rank
    returns its share scaled so that the ranks' mean is (1/K) x the kept pairs' sum — the
    gradient of one process holding the global batch. Returns (loss, keep mask of local rows)."""
    B = rows_B.shape[0]
    all_G = gather(rows_B.detach())
    G = all_G.shape[0]
    n_drop = int(drop_fraction * G)
    order_G = torch.sort(all_G, descending=True, stable=True).indices
    keep_G = torch.ones(G, dtype=torch.bool, device=rows_B.device)
    keep_G[order_G[:n_drop]] = False
    keep_B = keep_G[offset:offset + B]
    scale = G / (B * (G - n_drop))
    return (rows_B * keep_B).sum() * scale, keep_B


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


class MCSEOutputs(dict):
    """What the model hands to the loss for one batch of B sentences (two dropout views).

    A dict of tensors (keys z1, z2: MLP outputs for the text-text term; g1, g2 and image:
    grounding-space projections on caption batches; tau: learned (τ, τ_vl) when the model
    learns them) so that DDP and DeepSpeed ZeRO-3 can see every output tensor; the
    properties give the structured view the loss reads.
    """

    _ORDER = ("z1", "z2", "g1", "g2", "image", "tau")

    @classmethod
    def build(cls, sim_views: tuple[torch.Tensor, torch.Tensor],
              ground_views: tuple[torch.Tensor, torch.Tensor] | None = None,
              image_BP: torch.Tensor | None = None, temperatures: torch.Tensor | None = None) -> MCSEOutputs:
        out = cls(z1=sim_views[0], z2=sim_views[1])
        if ground_views is not None and image_BP is not None:
            out.update(g1=ground_views[0], g2=ground_views[1], image=image_BP)
        if temperatures is not None:
            out["tau"] = temperatures
        return out

    @property
    def sim_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self["z1"], self["z2"]

    @property
    def ground_views(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self["g1"], self["g2"]) if "g1" in self else None

    @property
    def image_BP(self) -> torch.Tensor | None:
        return self.get("image")

    @property
    def temperatures(self) -> torch.Tensor | None:
        return self.get("tau")

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor in a fixed order (gradient caching stores and replays these)."""
        return [self[k] for k in self._ORDER if k in self]

    def with_tensors(self, tensors: list[torch.Tensor]) -> MCSEOutputs:
        """The same structure over replacement tensors (inverse of :meth:`tensors`)."""
        keys = [k for k in self._ORDER if k in self]
        return MCSEOutputs(zip(keys, tensors, strict=True))


def mcse_loss(
    out: MCSEOutputs,
    *,
    temperature: float | torch.Tensor,
    temperature_vl: float | torch.Tensor,
    lambda_mm: float,
    symmetric: bool = False,
    gather: Gather = _identity,
    offset: int = 0,
    robust_drop: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Total loss and its terms: L_simcse (+ λ·L_mm on caption batches), and ``view_cos``, the
    mean cosine between the two dropout views of each local sentence (not a loss: 1.0 means
    dropout is off and SimCSE gets no positive signal).

    Learned temperatures in ``out.temperatures`` take precedence over the constants. With
    ``robust_drop`` > 0 the grounding term leaves out that fraction of the global batch's pairs
    (:func:`robust_grounding_loss`); ``_keep`` then marks the local pairs kept."""
    if out.temperatures is not None:
        temperature, temperature_vl = out.temperatures[0], out.temperatures[1]
    z1_BD, z2_BD = out.sim_views
    terms = {"loss_simcse": simcse_loss(z1_BD, gather(z2_BD), temperature, offset)}
    with torch.no_grad():  # a diagnostic: exactly 1 when the two dropout views are identical
        terms["view_cos"] = F.cosine_similarity(_at_least_fp32(z1_BD), _at_least_fp32(z2_BD), dim=-1).mean()
    total = terms["loss_simcse"]
    if out.ground_views is not None and out.image_BP is not None:
        image_GP = gather(out.image_BP)
        if robust_drop > 0:
            rows_B = torch.stack([info_nce_rows(t, image_GP, temperature_vl, offset) for t in out.ground_views]).mean(0)
            if symmetric:
                text_GP = [gather(g) for g in out.ground_views]
                back_B = torch.stack([info_nce_rows(out.image_BP, t, temperature_vl, offset) for t in text_GP]).mean(0)
                rows_B = 0.5 * (rows_B + back_B)
            mm, terms["_keep"] = robust_grounding_loss(rows_B, robust_drop, gather, offset)
        else:
            mm = grounding_loss(list(out.ground_views), image_GP, temperature_vl, offset)
            if symmetric:
                text_GP = [gather(g) for g in out.ground_views]
                mm = 0.5 * (mm + image_to_text_loss(out.image_BP, text_GP, temperature_vl, offset))
        terms["loss_mm"] = mm
        total = total + lambda_mm * mm
    terms["loss"] = total
    return terms
