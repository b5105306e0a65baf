"""MCSE's structure, checked against the method written out by hand.

The expected values are built here from the text encoder's hidden states, the image features
and each head's weight matrices with explicit formulas (tanh(x W^T + b), L2 norms, softmax
cross-entropy written as logsumexp), never by calling MCSEModel or trainer.loss, and then
compared with what the model and the training step produce:

- raw [CLS] -> MLP (Linear + Tanh) feeds the SimCSE term only;
- the pooled vector *before* the MLP (raw [CLS] under the `cls` pooler, the masked mean under
  `mean`) -> grounding head (Linear -> 256, Tanh) -> L2;
- image features, un-normalised -> image head (Linear -> 256, Tanh) -> L2;
- view 1 of every sentence is the first B rows of the doubled batch and is matched against view
  2 (SimCSE); both views are matched against the images and averaged (grounding);
- lambda multiplies the grounding term on caption batches and nothing on text batches.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.model import MCSEModel

from .conftest import ROOT

TAU, TAU_VL, LAMBDA = 0.05, 0.05, 0.3


@pytest.fixture()
def fresh_accelerator():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
B, L, IMAGE_DIM, PROJ = 6, 9, 20, 16


def _batch(caption: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (B, L), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(B, L, dtype=torch.long)
    for i, n in enumerate([9, 4, 7, 9, 3, 6]):  # padding, so mean pooling differs from a plain mean
        mask[i, n:] = 0
        ids[i, n:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if caption:
        # Large, shifted features: any normalisation before the image head changes the result.
        batch["image_emb"] = 7.0 * torch.randn(B, IMAGE_DIM, generator=g, dtype=torch.float64) + 3.0
    return batch


def _model(tiny_bert: Path, pooler: str, mlp: bool) -> MCSEModel:
    torch.manual_seed(0)
    model = MCSEModel.from_pretrained_encoder(str(tiny_bert), image_dim=IMAGE_DIM, proj_dim=PROJ, pooler=pooler,
                                              mlp_head=mlp, dropout=0.1)
    return model.double().train()


def _linear_tanh(x: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    w, b = head.dense.weight.detach(), head.dense.bias.detach()
    return torch.tanh(x @ w.T + b)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _xent_diag(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_i [ -cos(q_i, k_i)/tau + log sum_j exp(cos(q_i, k_j)/tau) ]"""
    logits = _unit(q) @ _unit(k).T / tau
    return (-logits.diagonal() + torch.logsumexp(logits, dim=1)).mean()


def _by_hand(model: MCSEModel, batch: dict[str, torch.Tensor], pooler: str, seed: int) -> dict[str, torch.Tensor]:
    """Every quantity of MCSE's forward pass and loss from the encoder's hidden states."""
    ids = torch.cat([batch["input_ids"], batch["input_ids"]])
    mask = torch.cat([batch["attention_mask"], batch["attention_mask"]])
    torch.manual_seed(seed)  # the same dropout masks as the model's own pass
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    if pooler == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).double()
        pooled = (hidden * m).sum(1) / m.sum(1)
    z = _linear_tanh(pooled, model.mlp) if model.mlp is not None else pooled
    out = {"z1": z[:B], "z2": z[B:]}
    out["loss_simcse"] = _xent_diag(out["z1"], out["z2"], TAU)
    out["view_cos"] = (_unit(out["z1"]) * _unit(out["z2"])).sum(-1).mean()
    out["loss"] = out["loss_simcse"]
    if "image_emb" in batch:
        g = _unit(_linear_tanh(pooled, model.text_head))
        v = _unit(_linear_tanh(batch["image_emb"], model.image_head))
        out.update(g1=g[:B], g2=g[B:], image=v)
        out["loss_mm"] = (_xent_diag(g[:B], v, TAU_VL) + _xent_diag(g[B:], v, TAU_VL)) / 2
        out["loss"] = out["loss_simcse"] + LAMBDA * out["loss_mm"]
    return out


@pytest.mark.parametrize("mlp", [True, False], ids=["mlp", "no-mlp"])
@pytest.mark.parametrize("pooler", ["cls", "mean"])
def test_forward_outputs_match_the_method(tiny_bert: Path, pooler: str, mlp: bool) -> None:
    from trainer.loss import mcse_loss

    model = _model(tiny_bert, pooler, mlp)
    for caption in (True, False):
        batch = _batch(caption, seed=3)
        want = _by_hand(model, batch, pooler, seed=11)
        torch.manual_seed(11)
        with torch.no_grad():
            got = model(batch)
            losses = mcse_loss(got, temperature=TAU, temperature_vl=TAU_VL, lambda_mm=LAMBDA)
        assert set(got) == ({"z1", "z2", "g1", "g2", "image"} if caption else {"z1", "z2"})
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12, msg=f"{pooler} {key}")
        assert set(losses) == ({"loss", "loss_simcse", "loss_mm", "view_cos"} if caption
                               else {"loss", "loss_simcse", "view_cos"})
        for key in losses:
            assert float(losses[key]) == pytest.approx(float(want[key]), rel=1e-10), (pooler, caption, key)
        # The two dropout views really differ (so which view feeds which term is observable).
        assert not torch.allclose(got["z1"], got["z2"])


def test_training_step_applies_lambda_to_caption_batches_only(tiny_bert: Path, fresh_accelerator) -> None:
    """The trainer's own step (the path every run takes) reports the hand-computed totals."""
    from accelerate import Accelerator

    from trainer.step import forward_backward

    cfg = load_config(ROOT / "tests" / "data" / "dist_base.yaml",
                      [f"loss.lambda_mm={LAMBDA}", f"loss.temperature={TAU}", f"loss.temperature_vl={TAU_VL}",
                       f"data.global_batch_size={B}"])
    acc = Accelerator(cpu=True)
    model = _model(tiny_bert, "cls", True)
    for caption in (True, False):
        batch = _batch(caption, seed=5)
        want = _by_hand(model, batch, "cls", seed=21)
        torch.manual_seed(21)
        losses, ran = forward_backward(model, batch, cfg, acc)
        model.zero_grad(set_to_none=True)
        assert ran
        assert losses["loss"] == pytest.approx(float(want["loss"]), rel=1e-10), caption
        if not caption:
            assert losses["loss"] == pytest.approx(float(want["loss_simcse"]), rel=1e-10)


def test_evaluation_poolers_match_their_definitions(tiny_bert: Path) -> None:
    model = _model(tiny_bert, "cls", True).eval()
    batch = _batch(False, seed=4)
    with torch.no_grad():
        out = model.encoder(**batch, output_hidden_states=True)
    last, first = out.last_hidden_state, out.hidden_states[1]
    m = batch["attention_mask"].unsqueeze(-1).double()
    want = {
        "cls_before_pooler": last[:, 0],                       # raw [CLS]: MCSE/SimCSE evaluation
        "cls": _linear_tanh(last[:, 0], model.mlp),            # [CLS] through the training MLP
        "mean": (last * m).sum(1) / m.sum(1),
        "avg_first_last": (((first + last) / 2) * m).sum(1) / m.sum(1),
    }
    for pooler, expected in want.items():
        torch.testing.assert_close(model.sentence_embedding(batch, pooler), expected, rtol=1e-10, atol=1e-12,
                                   msg=pooler)


def test_grounding_space_uses_the_pooled_vector_and_raw_image_features(tiny_bert: Path) -> None:
    """Retrieval's encoders (eval mode) are the training heads applied to the same inputs."""
    model = _model(tiny_bert, "cls", True).eval()
    batch = _batch(True, seed=6)
    with torch.no_grad():
        cls = model.encoder(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state[:, 0]
        text = model.grounding_text(batch)
        image = model.grounding_image(batch["image_emb"])
    torch.testing.assert_close(text, _unit(_linear_tanh(cls, model.text_head)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(image, _unit(_linear_tanh(batch["image_emb"], model.image_head)),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("init_range", [0.02, 0.05])
def test_mlp_is_initialised_like_bert_and_the_grounding_heads_like_pytorch(tmp_path: Path, init_range: float) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=256, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, initializer_range=init_range)
    torch.manual_seed(0)
    model = MCSEModel(BertModel(config, add_pooling_layer=False), image_dim=512, proj_dim=256)
    w = model.mlp.dense.weight.detach()
    assert float(w.mean()) == pytest.approx(0.0, abs=3 * init_range / 256)
    assert float(w.std()) == pytest.approx(init_range, rel=0.02)
    assert torch.count_nonzero(model.mlp.dense.bias) == 0
    # The grounding heads keep nn.Linear's default: uniform in +-1/sqrt(fan_in), bias too.
    for head, fan_in in ((model.text_head, 256), (model.image_head, 512)):
        bound = 1 / math.sqrt(fan_in)
        assert float(head.dense.weight.detach().abs().max()) <= bound
        assert float(head.dense.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert torch.count_nonzero(head.dense.bias) > 0


def test_gradient_caching_with_a_trained_image_tower_equals_one_big_batch(tiny_bert: Path,
                                                                           fresh_accelerator) -> None:
    """Every batch field (here decoded images) is chunked and every trainable part (here a
    small ViT with dropout) is replayed: the gradients equal those of the unsplit batch."""
    import copy

    import timm
    from accelerate import Accelerator

    from trainer.loss import mcse_loss
    from trainer.step import forward_backward

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=2, embed_dim=32, num_heads=2, drop_rate=0.1, proj_drop_rate=0.1)
    model = MCSEModel.from_pretrained_encoder(str(tiny_bert), image_dim=32, proj_dim=PROJ, dropout=0.1,
                                              image_tower=vit, image_tower_spec="test-vit",
                                              train_image_tower=True).double().train()
    reference = copy.deepcopy(model)
    batch = {k: v for k, v in _batch(False, seed=8).items()}
    batch["image"] = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = load_config(ROOT / "tests" / "data" / "dist_base.yaml",
                      [f"loss.lambda_mm={LAMBDA}", f"data.global_batch_size={B}", "data.max_device_batch=2"])
    acc = Accelerator(cpu=True, gradient_accumulation_steps=3)

    torch.manual_seed(99)
    losses, ran = forward_backward(model, batch, cfg, acc)  # 3 chunks of 2
    assert ran and "loss_mm" in losses

    # The reference: the three chunks encoded with a graph in the same order (same dropout
    # masks), their outputs joined, one loss over the whole batch, one backward.
    torch.manual_seed(99)
    parts = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, B, 2)]
    outs = [reference(p) for p in parts]
    joined = outs[0].with_tensors([torch.cat([o.tensors()[i] for o in outs]) for i in range(len(outs[0].tensors()))])
    want_losses = mcse_loss(joined, temperature=0.05, temperature_vl=0.05, lambda_mm=LAMBDA)
    want_losses["loss"].backward()
    assert losses["loss"] == pytest.approx(float(want_losses["loss"]), rel=1e-12)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    assert any(n.startswith("image_tower.") for n in want) and "image_head.dense.weight" in want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
