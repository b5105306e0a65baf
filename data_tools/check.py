"""``verify`` and ``stats``: is a dataset folder exactly what its manifest says, and what is in it.

verify checks, per shard listed in the manifest: the file exists, its size and sha256 match,
the tar parses with only plain, expected members, and it holds ``n_samples`` samples; also
that sizes.json agrees. ``--decode`` additionally decodes every member (image fully, json,
UTF-8 text, ``emb.npy`` without pickle at the manifest's dimension), which is what a
training job would otherwise discover hours in. Problems name the shard (and sample).

A rewrite in progress (``embed``, ``filter-clip``: new shard files first, the manifest last)
is reported as pending, not as a problem: the manifest still lists complete files. Keys
must be unique across the whole dataset (checked with 8-byte hashes, 8 bytes per sample).

stats summarises counts, drop reasons, caption lengths (over every caption of every sample)
and image sizes from the sample json, so it needs no image decode; ``--plot`` draws the
histograms with matplotlib's Agg backend.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.shards import CLIP_STATE, EMBED_STATE, MANIFEST, SIZES, file_sha256, load_manifest

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
ALLOWED_MEMBERS = (*IMAGE_MEMBERS, "txt", "json", "emb.npy")


@dataclass
class VerifyReport:
    folder: Path
    n_shards: int = 0
    n_samples: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        head = (f"verify {self.folder}: {'OK' if self.ok else 'FAILED'} — {self.n_shards} shard(s), "
                f"{self.n_samples} sample(s) checked")
        lines = [head] + [f"  problem: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _decode_member(ext: str, data: bytes, emb_dim: int | None) -> str | None:
    """None if ``data`` decodes as its extension says, else the problem."""
    from PIL import Image

    try:
        if ext in IMAGE_MEMBERS:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
        elif ext == "txt":
            if not data.decode("utf-8").strip():
                return "empty caption"
        elif ext == "json":
            if not isinstance(json.loads(data), dict):
                return "json is not an object"
        elif ext == "emb.npy":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if emb_dim is not None and arr.shape != (emb_dim,):
                return f"emb.npy shape {arr.shape}, manifest says ({emb_dim},)"
            if not np.isfinite(arr).all():
                return "emb.npy has non-finite values"
    except Exception as exc:
        return f"{ext} does not decode ({type(exc).__name__}: {exc})"
    return None


def _check_tar(path: Path, kind: str, decode: bool, emb_dim: int | None) -> tuple[list[str], list[str]]:
    """(keys, problems) of one shard, read with tarfile (no webdataset: nothing decoded
    by extension, no pickle, links and nested names reported instead of followed)."""
    problems: list[str] = []
    keys: list[str] = []
    members: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                name = m.name
                if not m.isfile():
                    problems.append(f"{path.name}: member {name!r} is not a plain file")
                    continue
                key, dot, ext = name.partition(".")
                if not dot or "/" in name or name.startswith("."):
                    problems.append(f"{path.name}: unexpected member name {name!r}")
                    continue
                if ext not in ALLOWED_MEMBERS:
                    problems.append(f"{path.name}: {key}: unexpected member type .{ext}")
                    continue
                if not keys or keys[-1] != key:
                    if key in members:
                        problems.append(f"{path.name}: {key}: members not adjacent (key repeats)")
                    keys.append(key)
                members.setdefault(key, set()).add(ext)
                if decode:
                    fh = tf.extractfile(m)
                    problem = _decode_member(ext, fh.read() if fh else b"", emb_dim)
                    if problem:
                        problems.append(f"{path.name}: {key}: {problem}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        problems.append(f"{path.name}: not a readable tar ({type(exc).__name__}: {exc})")
        return keys, problems
    for key, exts in members.items():
        if "txt" not in exts:
            problems.append(f"{path.name}: {key}: no .txt member")
        if kind == "pairs" and not exts & set(IMAGE_MEMBERS) and "emb.npy" not in exts:
            problems.append(f"{path.name}: {key}: no image member")
        if emb_dim is not None and "emb.npy" not in exts:
            problems.append(f"{path.name}: {key}: no emb.npy although the manifest names an image encoder")
    return keys, problems


def _key_hash(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _pending(folder: Path, manifest: dict[str, Any], rep: VerifyReport) -> tuple[set[str], dict[str, int] | None]:
    """Notes on a rewrite in progress; (its new shard files, the sizes.json it may have
    written already) so neither counts as a problem."""
    files: set[str] = set()
    sizes: dict[str, int] | None = None
    listed = [s["name"] for s in manifest["shards"]]
    for state_name, verb in ((EMBED_STATE, "embed"), (CLIP_STATE, "filter-clip")):
        path = folder / state_name
        if not path.is_file():
            continue
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            rep.notes.append(f"{state_name}: unreadable ({exc}); the manifest's shards are what readers use")
            continue
        done = [e["shard"] for e in (state.get("done") or {}).values() if e.get("shard")]
        files |= {e["name"] for e in done}
        enc = f" --encoder {state['encoder']}" if state.get("encoder") else ""
        again = f"`webmcse-data {verb} {folder}{enc}`" + ("" if enc else " with the same options")
        if state.get("new_names") == listed:
            old = [n for n in state.get("replaces", []) if n not in listed and (folder / n).exists()]
            files |= set(old)
            rep.notes.append(f"pending: {verb} committed its manifest; {len(old)} replaced shard file(s) not deleted "
                             f"yet (run {again} again to finish)")
        else:
            if state.get("new_names"):
                sizes = {e["name"]: e["n_samples"] for e in done}
            rep.notes.append(f"pending: {verb} has written {len(done)} of {len(state.get('replaces', listed))} "
                             f"shard(s) under new names; the manifest still lists the previous, complete shards "
                             f"(run {again} to finish)")
    return files, sizes


def verify(dataset: str | Path, decode: bool = False) -> VerifyReport:
    folder = Path(dataset)
    manifest = load_manifest(folder)
    rep = VerifyReport(folder)
    enc = manifest.get("image_encoder")
    emb_dim = int(enc["dim"]) if isinstance(enc, dict) and enc.get("dim") else None
    listed = {s["name"] for s in manifest["shards"]}
    pending_files, pending_sizes = _pending(folder, manifest, rep)
    try:
        sizes = json.loads((folder / SIZES).read_text(encoding="utf-8"))
        if sizes != {s["name"]: s["n_samples"] for s in manifest["shards"]} and sizes != pending_sizes:
            rep.problems.append(f"{SIZES}: disagrees with {MANIFEST}")
    except (OSError, json.JSONDecodeError) as exc:
        rep.problems.append(f"{SIZES}: unreadable ({exc})")
    key_hashes: list[int] = []
    total = 0
    for entry in manifest["shards"]:
        name = entry["name"]
        path = folder / name
        rep.n_shards += 1
        if Path(name).name != name or not name.endswith(".tar"):
            rep.problems.append(f"{name}: suspicious shard name in the manifest")
            continue
        if not path.is_file():
            rep.problems.append(f"{name}: listed in the manifest but missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            rep.problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            rep.problems.append(f"{name}: sha256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}…")
        keys, problems = _check_tar(path, manifest["kind"], decode, emb_dim)
        n = len(keys)
        key_hashes.extend(_key_hash(k) for k in keys)
        rep.problems.extend(problems)
        rep.n_samples += n
        if n != entry["n_samples"]:
            rep.problems.append(f"{name}: {n} samples, manifest says {entry['n_samples']}")
        total += entry["n_samples"]
    if "n_samples" in manifest and manifest["n_samples"] != total:
        rep.problems.append(f"{MANIFEST}: n_samples {manifest['n_samples']} but its shards hold {total}")
    _duplicate_keys(folder, manifest, key_hashes, rep)
    extra = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed and p.name not in pending_files)
    if extra:
        rep.notes.append(f"{len(extra)} tar file(s) not in the manifest (ignored by readers): {', '.join(extra[:5])}")
    for tmp in folder.glob(".*.tmp"):
        rep.notes.append(f"{tmp.name}: leftover temp file of an interrupted write")
    return rep


def _duplicate_keys(folder: Path, manifest: dict[str, Any], hashes: list[int], rep: VerifyReport) -> None:
    """Keys repeated anywhere in the dataset (a reader would merge or confuse the samples).
    Sorted 8-byte hashes find candidates; a second pass names the actual keys."""
    if len(hashes) < 2:
        return
    arr = np.sort(np.array(hashes, dtype=np.uint64))
    dup = set(arr[1:][arr[1:] == arr[:-1]].tolist())
    if not dup:
        return
    seen: dict[str, str] = {}
    named = 0
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        if not path.is_file():
            continue
        try:
            keys, _ = _check_tar(path, manifest["kind"], False, None)
        except Exception:
            continue
        for key in dict.fromkeys(keys):
            if _key_hash(key) not in dup:
                continue
            if key in seen and seen[key] != entry["name"]:
                named += 1
                if named <= 10:
                    rep.problems.append(f"{entry['name']}: key {key!r} also used in {seen[key]} (keys must be unique)")
            seen.setdefault(key, entry["name"])
    if named > 10:
        rep.problems.append(f"... {named - 10} more keys used in more than one shard")


# --- stats --------------------------------------------------------------------------------------


@dataclass
class Stats:
    folder: Path
    manifest: dict[str, Any]
    caption_words: list[int] = field(default_factory=list)
    caption_chars: list[int] = field(default_factory=list)
    captions_per_sample: Counter = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    clip_scores: list[float] = field(default_factory=list)
    scanned: int = 0

    def render(self) -> str:
        m = self.manifest
        counts = m.get("counts", {})
        lines = [f"{self.folder}: {m['kind']} dataset, {m.get('n_samples', '?')} samples in {len(m['shards'])} "
                 f"shard(s), {sum(s['bytes'] for s in m['shards']) / 2**20:.1f} MiB"]
        if counts:
            lines.append(f"  input records seen: {counts.get('seen', '?')}, written: {counts.get('written', '?')}")
        dropped = counts.get("dropped", {})
        for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]):
            pct = f" ({100 * n / counts['seen']:.1f}%)" if counts.get("seen") else ""
            lines.append(f"  dropped {n:>9}{pct}  {reason}")
        enc = m.get("image_encoder")
        if enc:
            lines.append(f"  image features: {enc.get('name')} ({enc.get('dim')}-d)")
        lines.append(f"  scanned {self.scanned} samples, {len(self.caption_words)} captions")
        lines.append("  " + _describe("caption words", self.caption_words))
        lines.append("  " + _describe("caption chars", self.caption_chars))
        if self.captions_per_sample:
            dist = ", ".join(f"{k}: {v}" for k, v in sorted(self.captions_per_sample.items()))
            lines.append(f"  captions per sample: {dist}")
        if self.widths:
            lines.append("  " + _describe("image width", self.widths))
            lines.append("  " + _describe("image height", self.heights))
            lines.append("  " + _describe("image min side", [min(w, h) for w, h in zip(self.widths, self.heights,
                                                                                       strict=True)]))
        if self.clip_scores:
            lines.append("  " + _describe("clip score", self.clip_scores, "{:.3f}"))
        return "\n".join(lines)


def _describe(name: str, values: list[Any], fmt: str = "{:.0f}") -> str:
    if not values:
        return f"{name}: none"
    a = np.asarray(values, dtype=float)
    q = np.percentile(a, [0, 5, 50, 95, 100])
    return (f"{name}: mean {fmt.format(a.mean())}, min/p5/median/p95/max "
            + "/".join(fmt.format(v) for v in q))


def stats(dataset: str | Path, plot: str | Path | None = None, limit: int | None = None) -> Stats:
    """Counts from the manifest plus distributions from up to ``limit`` samples' txt/json."""
    from data_tools.shards import read_shard

    folder = Path(dataset)
    manifest = load_manifest(folder)
    st = Stats(folder, manifest)
    for entry in manifest["shards"]:
        for sample in read_shard(folder / entry["name"]):
            if limit is not None and st.scanned >= limit:
                break
            st.scanned += 1
            captions = [sample.get("txt", b"").decode("utf-8", "replace")]
            meta: Any = None
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = None
            if isinstance(meta, dict) and isinstance(meta.get("captions"), list) \
                    and all(isinstance(c, str) for c in meta["captions"]) and meta["captions"]:
                captions = meta["captions"]
            for text in captions:
                st.caption_words.append(len(text.split()))
                st.caption_chars.append(len(text))
            st.captions_per_sample[len(captions)] += 1
            if isinstance(meta, dict):
                if isinstance(meta.get("width"), int) and isinstance(meta.get("height"), int):
                    st.widths.append(meta["width"])
                    st.heights.append(meta["height"])
                if isinstance(meta.get("clip_score"), (int, float)):
                    st.clip_scores.append(float(meta["clip_score"]))
        if limit is not None and st.scanned >= limit:
            break
    if plot:
        _plot(st, Path(plot))
    return st


def _plot(st: Stats, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters
    import matplotlib.pyplot as plt

    panels = ["words", "sizes", "drops"] + (["clip"] if st.clip_scores else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, panel in zip(np.atleast_1d(axes), panels, strict=True):
        if panel == "words":
            ax.hist(st.caption_words, bins=min(50, max(5, len(set(st.caption_words)))), color="tab:blue")
            ax.set(title="caption length", xlabel="words", ylabel="samples")
        elif panel == "sizes":
            if st.widths:
                lo = [min(w, h) for w, h in zip(st.widths, st.heights, strict=True)]
                hi = [max(w, h) for w, h in zip(st.widths, st.heights, strict=True)]
                bins = np.linspace(min(lo), max(hi) + 1, 41)  # shared, so both are visible
                ax.hist(lo, bins=bins, color="tab:green", alpha=0.7, label="min side")
                ax.hist(hi, bins=bins, color="tab:orange", alpha=0.5, label="max side")
                ax.legend()
            ax.set(title="image size", xlabel="pixels", ylabel="samples")
        elif panel == "drops":
            dropped = st.manifest.get("counts", {}).get("dropped", {})
            items = sorted(dropped.items(), key=lambda kv: kv[1])
            ax.barh([k for k, _ in items] or ["(none)"], [v for _, v in items] or [0], color="tab:red")
            ax.set(title="dropped records", xlabel="count")
        else:
            ax.hist(st.clip_scores, bins=40, color="tab:purple")
            ax.set(title="CLIP score", xlabel="cosine", ylabel="samples")
    fig.suptitle(f"{st.folder.name}: {st.manifest.get('n_samples')} samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
