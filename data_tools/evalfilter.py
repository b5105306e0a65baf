"""Evaluation hygiene (opt-in): keep the evaluation sets out of the training data.

MCSE is scored on STS, and STS-B's image-caption genre (and STS12-15's MSRvid/images
subsets) were written from the same caption corpora that grounding trains on (Flickr30k,
COCO, video descriptions): a web crawl or a COCO train dump can hold those very sentences,
and an image-text retrieval test set's photos can reappear under other URLs. Two filters,
both counted as ``eval_overlap``:

- ``--eval-sts DIR`` (SentEval layout, as ``fetch-eval-data`` writes it): every sentence of
  STS12-16, STS-B dev/test and SICK trial/test. A training caption that matches one after
  normalisation is removed from its record; a record left with no caption is dropped.
  Normalisation lower-cases, applies NFKC and keeps only letters and digits, so SentEval's
  Moses-tokenised ``a man is n't playing .`` matches the raw caption ``A man isn't playing.``
- ``--eval-images DIR`` (a webmcse pairs dataset, whose sample json already holds each
  photo's phash, or any folder of images): a training image within
  ``--eval-near-dup-distance`` bits of an evaluation photo's 64-bit phash is dropped — the
  same perceptual hash and index as near-duplicate dedup, so re-encodes and resizes match.

STS-B train is not an evaluation split and is left in.
"""

from __future__ import annotations

import csv
import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.dedup import NearDupIndex, image_phash
from data_tools.sources import IMAGE_EXTS, InputError

REASON = "eval_overlap"
_STS_TASKS = ("STS12-en-test", "STS13-en-test", "STS14-en-test", "STS15-en-test", "STS16-en-test")


def match_form(text: str) -> str:
    """Lower-case letters and digits only (NFKC first): tokenisation and punctuation vanish."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).lower() if ch.isalnum())


def _tsv_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def sts_sentences(sts_dir: str | Path) -> tuple[set[str], list[str]]:
    """(match forms of every evaluation sentence, files read). InputError if none is found."""
    root = Path(sts_dir)
    if not root.is_dir():
        raise InputError(f"--eval-sts {root}: no such folder (fetch it with `webmcse-data fetch-eval-data DIR`)")
    files: list[tuple[Path, list[int], bool]] = []  # (file, sentence columns, has header)
    for task in _STS_TASKS:
        files += [(p, [0, 1], False) for p in sorted((root / task).glob("STS.input.*.txt"))]
    files += [(root / "STSBenchmark" / f"sts-{s}.csv", [5, 6], False) for s in ("dev", "test")]
    files += [(root / "SICK" / f"SICK_{s}.txt", [1, 2], True) for s in ("trial", "test_annotated")]
    found = [f for f in files if f[0].is_file()]
    if not found:
        raise InputError(f"--eval-sts {root}: no STS files found (expected SentEval's layout: STS12-en-test/, "
                         f"STSBenchmark/, SICK/; `webmcse-data fetch-eval-data DIR` writes it)")
    sentences: set[str] = set()
    for path, cols, header in found:
        for row in _tsv_rows(path)[1 if header else 0:]:
            for c in cols:
                if c < len(row) and (form := match_form(row[c])):
                    sentences.add(form)
    return sentences, [str(f[0]) for f in found]


def eval_phashes(folder: str | Path) -> list[int]:
    """64-bit phashes of an evaluation set's photos: from a webmcse pairs dataset's sample
    json (no decode), else by decoding every image file under the folder."""
    import io

    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--eval-images {root}: no such folder")
    hashes: list[int] = []
    if (root / "manifest.json").is_file():
        from data_tools.shards import load_manifest, read_shard

        manifest = load_manifest(root)
        if manifest["kind"] != "pairs":
            raise InputError(f"--eval-images {root}: a {manifest['kind']} dataset; give a pairs dataset or "
                             f"a folder of images")
        for entry in manifest["shards"]:
            for sample in read_shard(root / entry["name"]):
                meta = json.loads(sample.get("json", b"{}"))
                if isinstance(meta.get("phash"), str):
                    hashes.append(int(meta["phash"], 16))
                    continue
                data = next((sample[e] for e in ("jpg", "png", "webp") if e in sample), None)
                if data is not None:
                    with Image.open(io.BytesIO(data)) as img:
                        hashes.append(image_phash(img))
        return hashes
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        try:
            with Image.open(path) as img:
                img.load()
                hashes.append(image_phash(img))
        except Exception:  # an unreadable file in the evaluation folder is not a photo to protect
            continue
    if not hashes:
        raise InputError(f"--eval-images {root}: no images found (give a pairs dataset or a folder of images)")
    return hashes


@dataclass
class EvalFilter:
    """The loaded filters; :meth:`check` is applied to each record in the writer process."""

    sentences: set[str]
    photos: NearDupIndex | None
    describe: dict[str, Any]
    captions_removed: int = 0

    @classmethod
    def load(cls, sts_dir: str | Path | None, images_dir: str | Path | None, distance: int) -> EvalFilter | None:
        if sts_dir is None and images_dir is None:
            return None
        sentences: set[str] = set()
        desc: dict[str, Any] = {}
        h = hashlib.sha256()
        if sts_dir is not None:
            sentences, files = sts_sentences(sts_dir)
            for s in sorted(sentences):
                h.update(s.encode("utf-8") + b"\n")
            desc["sts"] = {"dir": str(sts_dir), "files": len(files), "sentences": len(sentences)}
        photos = None
        if images_dir is not None:
            hashes = eval_phashes(images_dir)
            photos = NearDupIndex(distance)
            for v in hashes:
                photos.add(v)
            h.update(b"photos" + b"".join(v.to_bytes(8, "big") for v in sorted(hashes)))
            desc["images"] = {"dir": str(images_dir), "photos": len(hashes), "near_dup_distance": distance}
        desc["digest"] = h.hexdigest()
        return cls(sentences, photos, desc)

    def check(self, captions: list[str], phash: int | None) -> tuple[list[str], str | None]:
        """(captions to keep, drop reason or None)."""
        if self.photos is not None and phash is not None and self.photos.find(phash) is not None:
            return captions, REASON
        if self.sentences:
            kept = [c for c in captions if match_form(c) not in self.sentences]
            if len(kept) != len(captions):
                self.captions_removed += len(captions) - len(kept)
                if not kept:
                    return [], REASON
                return kept, None
        return captions, None
