from __future__ import annotations

import math

import pytest
import torch

from trainer.loss import MCSEOutputs, grounding_loss, image_to_text_loss, info_nce, mcse_loss, simcse_loss

R2 = math.sqrt(2.0)


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# z1 = (1,0), (0,1);  z2 = (1,0), (1,1).  Cosines: [[1, 1/√2], [0, 1/√2]].
Z1, Z2 = t([[1, 0], [0, 1]]), t([[1, 0], [1, 1]])


def test_simcse_loss_matches_hand_computation() -> None:
    tau = 0.5
    expected = (ce([1 / tau, (1 / R2) / tau], 0) + ce([0.0, (1 / R2) / tau], 1)) / 2
    assert simcse_loss(Z1, Z2, tau).item() == pytest.approx(expected, rel=1e-6)
    # scale invariance: cosine, not dot product
    assert simcse_loss(3 * Z1, 0.1 * Z2, tau).item() == pytest.approx(expected, rel=1e-6)


def test_offset_selects_the_positive_column() -> None:
    # Row 2 alone against both columns, as rank 1 of 2 with one row per rank would compute it.
    tau = 0.5
    assert info_nce(Z1[1:], Z2, tau, offset=1).item() == pytest.approx(ce([0.0, (1 / R2) / tau], 1), rel=1e-6)


def test_local_rows_with_offsets_average_to_the_global_loss() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    full = info_nce(q, k, 0.05)
    per_rank = [info_nce(q[r * 2:(r + 1) * 2], k, 0.05, offset=r * 2) for r in range(4)]
    assert torch.stack(per_rank).mean().item() == pytest.approx(full.item(), rel=1e-12)


def test_grounding_loss_averages_the_two_views_text_to_image() -> None:
    tau = 0.05
    img = t([[1, 0], [0, 1]])
    v1, v2 = t([[1, 0], [1, 1]]), t([[0, 1], [0, 1]])
    e1 = (ce([1 / tau, 0.0], 0) + ce([(1 / R2) / tau, (1 / R2) / tau], 1)) / 2
    e2 = (ce([0.0, 1 / tau], 0) + ce([0.0, 1 / tau], 1)) / 2
    assert grounding_loss([v1, v2], img, tau).item() == pytest.approx((e1 + e2) / 2, rel=1e-6)
    # the reverse direction puts images on the rows
    r1 = (ce([1 / tau, (1 / R2) / tau], 0) + ce([0.0, (1 / R2) / tau], 1)) / 2
    r2 = (ce([0.0, 0.0], 0) + ce([1 / tau, 1 / tau], 1)) / 2
    assert image_to_text_loss(img, [v1, v2], tau).item() == pytest.approx((r1 + r2) / 2, rel=1e-6)


def test_mcse_loss_combines_terms_with_lambda() -> None:
    img = t([[1, 0], [0, 1]])
    g1, g2 = t([[1, 0], [1, 1]]), t([[0, 1], [0, 1]])
    text_only = mcse_loss(MCSEOutputs.build((Z1, Z2)), temperature=0.05, temperature_vl=0.05, lambda_mm=0.1)
    assert set(text_only) == {"loss", "loss_simcse", "view_cos"}
    assert text_only["loss"].item() == pytest.approx(simcse_loss(Z1, Z2, 0.05).item())
    out = MCSEOutputs.build((Z1, Z2), (g1, g2), img)
    both = mcse_loss(out, temperature=0.05, temperature_vl=0.1, lambda_mm=0.1)
    mm = grounding_loss([g1, g2], img, 0.1).item()
    assert both["loss_mm"].item() == pytest.approx(mm)
    assert both["loss"].item() == pytest.approx(simcse_loss(Z1, Z2, 0.05).item() + 0.1 * mm)
    sym = mcse_loss(out, temperature=0.05, temperature_vl=0.1, lambda_mm=0.1, symmetric=True)
    assert sym["loss_mm"].item() == pytest.approx(0.5 * (mm + image_to_text_loss(img, [g1, g2], 0.1).item()))


def test_logits_are_at_least_float32() -> None:
    q = torch.randn(4, 8).to(torch.bfloat16)
    loss = info_nce(q, q, 0.05)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert info_nce(q.double(), q.double(), 0.05).dtype == torch.float64


def test_robust_drop_leaves_out_the_worst_pairs_of_the_global_batch() -> None:
    """Two ranks of two pairs each, simulated: per-pair losses 0.1, 2.0 | 0.5, 3.0. Dropping half
    of the global batch leaves out 3.0 and 2.0 on whichever rank they sit; the ranks' mean is the
    mean of the kept pairs, 0.3, with each kept pair's gradient 1/K = 1/2."""
    from trainer.loss import robust_grounding_loss

    rows = [torch.tensor([0.1, 2.0], dtype=torch.float64, requires_grad=True),
            torch.tensor([0.5, 3.0], dtype=torch.float64, requires_grad=True)]
    everyone = torch.cat([r.detach() for r in rows])
    outs = [robust_grounding_loss(rows[r], 0.5, lambda x: everyone, offset=2 * r) for r in range(2)]
    assert [o[1].tolist() for o in outs] == [[True, False], [True, False]]
    mean = (outs[0][0] + outs[1][0]) / 2  # what DDP's gradient averaging optimises
    assert float(mean) == pytest.approx(0.3, rel=1e-12)
    mean.backward()
    assert rows[0].grad.tolist() == [0.5, 0.0] and rows[1].grad.tolist() == [0.5, 0.0]
    # Ties are broken by global position, the same way on every rank.
    tie = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert robust_grounding_loss(tie, 0.5, lambda x: tie, 0)[1].tolist() == [False, False, True, True]


def test_robust_loss_with_nothing_to_drop_is_the_plain_loss_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(3)
    out = MCSEOutputs.build((torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)),
                            (torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)),
                            torch.randn(6, 4, generator=g))
    plain = mcse_loss(out, temperature=0.05, temperature_vl=0.05, lambda_mm=0.1)
    off = mcse_loss(out, temperature=0.05, temperature_vl=0.05, lambda_mm=0.1, robust_drop=0.0)
    assert set(off) == set(plain) and all(torch.equal(off[k], plain[k]) for k in plain)
    # A robust loss that keeps everything by construction (fraction below one pair) equals it too.
    tiny = mcse_loss(out, temperature=0.05, temperature_vl=0.05, lambda_mm=0.1, robust_drop=0.1)
    assert tiny["_keep"].all() and float(tiny["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-6)
