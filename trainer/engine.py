"""Building the training engine: Accelerator (plain, DDP or DeepSpeed ZeRO 1/2/3), model,
optimizer and learning-rate schedule.

The choices here are the ones that silently break contrastive training when left to
defaults: DataLoaders are never dispatched from rank 0 (our streams are already per rank),
the LR scheduler is stepped by us once per optimizer step (Accelerate would step a prepared
scheduler once per *process*), DeepSpeed on CPU gets gloo, and DDP tolerates the grounding
heads sitting idle on text-only steps.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer import dist
from trainer.config import BatchLayout, Config, ConfigError, batch_layout, effective_lr
from trainer.model import MCSEModel, resolve_name

log = logging.getLogger("webmcse.engine")


def launch_layout(cfg: Config) -> BatchLayout:
    """The batch layout for the world size the launcher started (read before any process group
    exists, so a global batch that does not fit fails before anything is loaded)."""
    return batch_layout(cfg, dist.world_size())


def _deepspeed_config(cfg: Config) -> dict[str, Any] | None:
    """The DeepSpeed config to use, from the run config or `accelerate launch --use_deepspeed`."""
    d = cfg.distributed
    path = d.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    use_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if path:
        try:
            ds = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"distributed.deepspeed_config={path}: file not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    elif d.zero_stage >= 0 or use_env:
        env_stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
        stage = d.zero_stage if d.zero_stage >= 0 else env_stage
        ds = {"zero_optimization": {"stage": stage}}
    else:
        return None
    ds = copy.deepcopy(ds)
    zero = ds.setdefault("zero_optimization", {})
    if d.zero_stage >= 0:
        zero["stage"] = d.zero_stage
    if zero.get("stage") == 3:
        # Needed to save/export full weights from a ZeRO-3 run.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    layout = launch_layout(cfg)
    ds["train_micro_batch_size_per_gpu"] = layout.chunk_size
    ds["gradient_accumulation_steps"] = layout.chunks
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    ds.setdefault("steps_per_print", 10**9)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"DeepSpeed config {path or '(built-in)'}: remove the '{key}' section; "
                             f"webmcse builds the optimizer and schedule from the optim config")
    return ds


def build_accelerator(cfg: Config) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
    )

    on_cpu = not torch.cuda.is_available()
    ds = _deepspeed_config(cfg)
    kwargs: dict[str, Any] = {
        "mixed_precision": cfg.train.precision,
        "gradient_accumulation_steps": launch_layout(cfg).chunks,
        "dataloader_config": DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        # Text-only steps leave the grounding heads without gradients.
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
    }
    timeout = datetime.timedelta(seconds=cfg.distributed.timeout_s)
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["kwargs_handlers"].append(InitProcessGroupKwargs(backend="gloo", timeout=timeout))
    else:
        kwargs["kwargs_handlers"].append(InitProcessGroupKwargs(timeout=timeout))
    if ds is not None:
        from accelerate.utils import DeepSpeedPlugin

        if on_cpu:
            import deepspeed

            # The shared-memory comm op is JIT-compiled on first use (minutes); gloo does the job.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
    elif on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["cpu"] = True  # without it each CPU rank would silently train alone as world 1
    if cfg.train.compile:
        kwargs["dynamo_backend"] = "inductor"
    return Accelerator(**kwargs)


def zero_stage(accelerator: Any) -> int:
    """ZeRO stage of the run (-1 when DeepSpeed is not used)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else -1


def load_image_tower(cfg: Config) -> Any:
    """The run's image tower (data_tools' ImageEncoder: model, preprocessing, dim) or None."""
    if not cfg.model.image_tower:
        return None
    from data_tools.encoders import load_image_encoder

    return load_image_encoder(cfg.model.image_tower)


def check_tower_chunking(cfg: Config, tower: Any, layout: BatchLayout) -> None:
    """Refuse a trained image tower whose train-mode BatchNorm would make gradient caching
    inexact: a chunk's batch statistics differ from the whole batch's, so the replayed chunks
    would not reproduce the cached embeddings."""
    if tower is None or not cfg.model.train_image_tower or layout.chunks == 1:
        return
    norms = sorted({type(m).__name__ for m in tower.model.modules()
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
    if norms:
        raise ConfigError(f"model.train_image_tower with gradient caching ({layout.chunks} chunks of "
                          f"{layout.chunk_size}): {cfg.model.image_tower} has {', '.join(norms)} layers, whose "
                          f"batch statistics make chunked training inexact; raise data.max_device_batch to "
                          f"{layout.device_batch}, freeze the tower, or use a tower without BatchNorm (a ViT)")


def build_model(cfg: Config, image_dim: int, pretrained: bool = True, tower: Any = None) -> MCSEModel:
    """The MCSE model of a run; ``pretrained=False`` builds the same architecture with
    untrained weights (a container for weights loaded next)."""
    lo = cfg.loss
    if tower is None and cfg.model.image_tower:
        tower = load_image_tower(cfg)
    model = MCSEModel.from_pretrained_encoder(
        resolve_name(cfg.model.name_or_path), image_dim=tower.dim if tower is not None else image_dim,
        proj_dim=cfg.model.proj_dim, pooler=cfg.model.pooler, mlp_head=cfg.model.mlp_head,
        dropout=cfg.model.dropout,
        learnable_temperatures=(lo.temperature, lo.temperature_vl) if lo.learnable_temperature else None,
        load_weights=pretrained, image_tower=tower.model if tower is not None else None,
        image_tower_spec=cfg.model.image_tower, train_image_tower=cfg.model.train_image_tower)
    if cfg.train.grad_checkpointing:
        enable_checkpointing(model.encoder)
    enable_packing(model.encoder)  # after: the packed forward checkpoints its layers when asked
    return model


def enable_checkpointing(encoder: Any) -> None:
    """Activation checkpointing of the encoder (non-reentrant: works with DDP's
    find_unused_parameters and keeps the dropout RNG state for the recomputation)."""
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---------------------------------------------------------------- packed (unpadded) encoder


def packable(encoder: Any) -> bool:
    """Whether the encoder is a BERT-style bidirectional stack whose training forward can run
    on its real tokens only (BERT, RoBERTa and their relatives such as MiniLM): embeddings,
    then layers of self-attention (query/key/value, output with residual LayerNorm) and a
    feed-forward block, absolute positions, no decoder or cross-attention parts."""
    config = getattr(encoder, "config", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if config is None or layers is None or not hasattr(encoder, "embeddings"):
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(config, "chunk_size_feed_forward", 0):
        return False
    for layer in layers:
        attn = getattr(getattr(layer, "attention", None), "self", None)
        if attn is None or not all(hasattr(attn, a) for a in ("query", "key", "value", "dropout",
                                                               "num_attention_heads", "attention_head_size")):
            return False
        if not all(hasattr(layer, a) for a in ("intermediate", "output")) or not hasattr(layer.attention, "output"):
            return False
    return True


def enable_packing(encoder: Any) -> bool:
    """Train on real tokens only: the encoder's forward, in training mode, drops the padding
    before the layers and restores the padded layout at the end.

    Batches are padded to their longest sentence, and at max_len 32 a third of Wiki1M's
    positions are padding (68% of them are real tokens): every linear layer, LayerNorm, GELU
    and dropout of a padded forward spends that third on positions whose outputs nothing reads
    (attention masks them as keys, pooling ignores them). Here each layer's projections and
    feed-forward block run on the [tokens, hidden] matrix of real tokens; only the attention
    itself scatters queries, keys and values back to [batch, heads, length, head_dim] (with
    the same key mask as the padded model) and gathers the result. The outputs at real
    positions are those of the padded forward (tests/test_speed_step.py); padded positions of
    the returned last_hidden_state are zero. Parameters, their names and the saved model are
    untouched: only this instance's forward is replaced, and only in training mode; evaluation,
    hidden-state outputs and unsupported architectures use the encoder's own forward.

    On CUDA the token index would cost a host sync per step (the number of real tokens sizes
    the packed matrix), and small encoders there are bound by kernel launches, not by padded
    arithmetic: packing is used for batches on the CPU.
    """
    if not packable(encoder) or getattr(encoder, "_webmcse_padded_forward", None) is not None:
        return False
    import types

    encoder._webmcse_padded_forward = encoder.forward
    encoder.forward = types.MethodType(_packed_forward, encoder)
    return True


def _packed_forward(self: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                    return_dict: bool = True, **kwargs: Any) -> Any:
    padded = self._webmcse_padded_forward
    if (not self.training or output_hidden_states or kwargs or input_ids is None or attention_mask is None
            or input_ids.device.type != "cpu"):
        return padded(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)
    from transformers.modeling_outputs import BaseModelOutput

    B, L = input_ids.shape
    keys_B11L = attention_mask.bool()[:, None, None, :]
    index_T = attention_mask.reshape(-1).nonzero().squeeze(1)  # real tokens, row-major
    emb_BLH = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    H = emb_BLH.shape[-1]
    h_TH = emb_BLH.reshape(B * L, H).index_select(0, index_T)

    def to_heads(x_TH: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
        full = x_TH.new_zeros(B * L, x_TH.shape[-1]).index_copy(0, index_T, x_TH)
        return full.view(B, L, heads, dim).transpose(1, 2)

    def run_layer(layer: Any, h_TH: torch.Tensor) -> torch.Tensor:
        attn = layer.attention.self
        heads, dim = attn.num_attention_heads, attn.attention_head_size
        q, k, v = (to_heads(proj(h_TH), heads, dim) for proj in (attn.query, attn.key, attn.value))
        ctx_BhLd = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=keys_B11L, dropout_p=attn.dropout.p if attn.training else 0.0, scale=dim ** -0.5)
        ctx_TH = ctx_BhLd.transpose(1, 2).reshape(B * L, heads * dim).index_select(0, index_T)
        a_TH = layer.attention.output(ctx_TH, h_TH)
        return layer.output(layer.intermediate(a_TH), a_TH)

    # Activation checkpointing as the encoder's own (enable_checkpointing): one checkpoint per
    # layer, non-reentrant, the RNG state kept so the recomputation draws the same dropout.
    # The flag sits on the encoder stack (transformers 4) or on each layer (transformers 5).
    stack_flag = getattr(self.encoder, "gradient_checkpointing", False)
    for layer in self.encoder.layer:
        if torch.is_grad_enabled() and (stack_flag or getattr(layer, "gradient_checkpointing", False)):
            from torch.utils.checkpoint import checkpoint

            h_TH = checkpoint(run_layer, layer, h_TH, use_reentrant=False)
        else:
            h_TH = run_layer(layer, h_TH)
    last_BLH = h_TH.new_zeros(B * L, H).index_copy(0, index_T, h_TH).view(B, L, H)
    return BaseModelOutput(last_hidden_state=last_BLH) if return_dict else (last_BLH,)


HEAD_PREFIXES = ("text_head.", "image_head.")


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, head_lr: float = 0.0) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and temperatures (every tensor of rank < 2); the
    grounding heads at their own learning rate when one is set. Empty groups are left out."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name)
        head = bool(head_lr) and name.startswith(HEAD_PREFIXES)
        groups.setdefault((decay, head), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": head_lr if head else lr}
            for (decay, head), params in sorted(groups.items())]


def _training_devices(model: torch.nn.Module) -> set[str]:
    """Device types the parameters live on now and, once an Accelerator exists, the one
    ``prepare`` will move them to (the optimizer is built before the move)."""
    types = {p.device.type for p in model.parameters()}
    from accelerate.state import PartialState

    if PartialState._shared_state != {}:  # an Accelerator (or its state) exists: its device is final
        types.add(PartialState().device.type)
    return types


def adamw_kernel(model: torch.nn.Module) -> dict[str, bool]:
    """The fastest AdamW implementation torch has for every parameter's device and dtype.

    The per-parameter for-loop torch falls back to on CPU launches ~10 small ops per tensor
    (16 ms a step on a 4.4M-parameter BERT, against 1.9 ms fused). Fused kernels exist for CPU
    and CUDA (and MPS/XPU); multi-tensor (foreach) kernels for CUDA/XPU only. All three compute
    the same update; fused and foreach only group the arithmetic differently (float-rounding
    differences, tests/test_speed_step.py)."""
    from torch.utils._foreach_utils import (
        _get_foreach_kernels_supported_devices,
        _get_fused_kernels_supported_devices,
    )

    devices = _training_devices(model)
    floating = all(p.is_floating_point() for p in model.parameters() if p.requires_grad)
    if floating and devices <= set(_get_fused_kernels_supported_devices()):
        return {"fused": True}
    if devices <= set(_get_foreach_kernels_supported_devices()):
        return {"foreach": True}
    return {}


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = effective_lr(cfg)
    # A torch optimizer also under DeepSpeed: ZeRO partitions it like its own (its flat fp32
    # partitions run through the same fused kernel), and nothing has to be JIT-compiled
    # (FusedAdam/CPUAdam).
    return torch.optim.AdamW(param_groups(model, o.weight_decay, lr, o.head_lr), lr=lr,
                             betas=(o.betas[0], o.betas[1]), eps=o.eps, **adamw_kernel(model))


def lr_lambda(kind: str, warmup: int, total: int) -> Any:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """Created on the *unprepared* optimizer and stepped by the loop once per optimizer step."""
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.schedule, o.warmup_steps, total_steps))


def full_state_dict(accelerator: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) weights on rank 0; collective under ZeRO-3, so call it on every rank."""
    state = accelerator.get_state_dict(model, unwrap=True)
    if not accelerator.is_main_process:
        return None
    # A copy, never a view of live parameters (on CPU `.cpu()` would alias them).
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@contextlib.contextmanager
def unsharded_construction(accelerator: Any) -> Iterator[None]:
    """Build models normally even while a ZeRO-3 run is active.

    With ZeRO-3, Accelerate registers the DeepSpeed config with transformers, which then
    partitions every model it constructs (a collective). A model built by rank 0 alone must
    not be partitioned, so the registration is lifted for the duration and restored after.
    (Accelerate's own ``zero3_init_context_manager(enable=False)`` re-registers the config
    and does not stop the partitioning.)
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def eval_copy(accelerator: Any, model: Any, cfg: Config, image_dim: int) -> Any:
    """A model rank 0 can evaluate and export alone; None on other ranks.

    Every rank must call it: under ZeRO-3 the weights are sharded, so they are gathered
    (collectively) and loaded into an unsharded twin built on rank 0 outside ZeRO-3's
    partitioning context. Otherwise it is simply the unwrapped training model.
    """
    if zero_stage(accelerator) != 3:
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    with unsharded_construction(accelerator):
        twin = build_model(cfg, image_dim, pretrained=False)
    twin.load_state_dict(state, strict=True)
    return twin.to(accelerator.device)
