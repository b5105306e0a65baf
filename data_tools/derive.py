"""What every verb that writes a new dataset from an existing pairs dataset shares (split,
corrupt, score-pairs): the input checked and its shards listed, the output folder checked against
the input and made ready, the samples copied without their reader bookkeeping, and the manifest
of the copy, which keeps the source's fields (image encoder, filters) and says where it came from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_tools.shards import MANIFEST, DatasetError, file_sha256, load_manifest, read_shard

_OWN_FIELDS = ("shards", "n_samples", "created", "format", "version")


def open_pairs(src: Path, verb: str) -> tuple[dict[str, Any], list[Path]]:
    """The manifest and the non-empty shards of a pairs dataset."""
    manifest = load_manifest(src)
    if manifest["kind"] != "pairs":
        raise DatasetError(f"{src}: {verb} works on a pairs dataset; this one is kind {manifest['kind']!r}")
    return manifest, [src / sh["name"] for sh in manifest["shards"] if sh["n_samples"] > 0]


def prepare_output(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse an output that overlaps the input; replace an existing dataset only when asked,
    and never delete a folder that is not a webmcse dataset."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise DatasetError(f"{dst}: output overlaps the input dataset {src}; choose a separate folder")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise DatasetError(f"{dst}: folder exists and is not empty; pass --overwrite to replace it")
        if not (dst / MANIFEST).is_file():
            raise DatasetError(f"{dst}: not a webmcse dataset (no manifest.json); refusing to delete it, "
                               f"remove it yourself or choose another folder")
        shutil.rmtree(dst)


def samples(shards: list[Path]) -> Iterator[dict[str, Any]]:
    """Every sample of the shards in order, as members to write again (``__key__`` kept)."""
    for path in shards:
        for sample in read_shard(path):
            yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def captions_of(sample: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A pair sample's json metadata and its captions (the json list, else the txt member)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    caps = [c for c in meta.get("captions", []) if isinstance(c, str) and c]
    if not caps and "txt" in sample:
        caps = [sample["txt"].decode("utf-8")]
    return meta, caps


def derived_manifest(manifest: dict[str, Any], src: Path, record: str, details: dict[str, Any]) -> dict[str, Any]:
    """The source's manifest fields, plus ``record`` = details and where the copy came from."""
    info = {k: v for k, v in manifest.items() if k not in _OWN_FIELDS}
    info[record] = {**details, "from": str(src), "from_manifest_sha256": file_sha256(src / MANIFEST)}
    return info


def keep_captions(sample: dict[str, Any], meta: dict[str, Any], caps: list[str], keep: list[bool]) -> None:
    """Rewrite the sample with only the kept captions: every per-caption list of its metadata
    (the noise lab's ground truth included) cut to match, its json and its first caption (txt)."""
    for name in ("captions", "noise", "noise_from", "clean_captions"):
        if isinstance(meta.get(name), list) and len(meta[name]) == len(caps):
            meta[name] = [v for v, kp in zip(meta[name], keep, strict=True) if kp]
    if "captions" not in meta:
        meta["captions"] = [c for c, kp in zip(caps, keep, strict=True) if kp]
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    sample["txt"] = meta["captions"][0].encode("utf-8")
