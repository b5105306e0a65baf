from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.__main__ import main as cli
from data_tools.commands import embed, shard_pairs, shard_text
from data_tools.shards import DatasetError, file_sha256, load_manifest, read_shard
from data_tools.sources import InputError

from .conftest import SAMPLE


def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def pairs_table(tmp_path: Path) -> Path:
    """Ten good rows plus one of each problem the filters must count."""
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(10):
        (img / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append({"key": f"k{i}", "file": f"img/{i}.jpg", "caption": f"a photo   number {i} &amp; more",
                     "extra": i})
    (img / "dup.jpg").write_bytes(jpeg(3))  # same bytes as row 3
    rows.append({"key": "dup", "file": "img/dup.jpg", "caption": "another caption for it"})
    (img / "s.jpg").write_bytes(jpeg(77))
    rows.append({"key": "short", "file": "img/s.jpg", "caption": "hi"})
    rows.append({"key": "missing", "file": "img/nope.jpg", "caption": "a missing image file"})
    (img / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404 not found</body></html>")
    rows.append({"key": "html", "file": "img/page.jpg", "caption": "an html page saved as jpg"})
    (img / "tiny.jpg").write_bytes(jpeg(99, (8, 8)))
    rows.append({"key": "tiny", "file": "img/tiny.jpg", "caption": "a very small picture"})
    full = jpeg(5, (200, 200))
    (img / "cut.jpg").write_bytes(full[: len(full) // 2])
    rows.append({"key": "cut", "file": "img/cut.jpg", "caption": "a truncated jpeg file"})
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        fh.write("{not json\n")
    return path


def test_shard_pairs_round_trip_and_drop_reasons(pairs_table: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    s = shard_pairs([pairs_table], out, max_count=4, progress=False)
    assert (s.seen, s.written) == (17, 10)
    assert s.dropped == {"duplicate": 1, "caption_too_short": 1, "image_missing": 1,
                         "image_is_html": 1, "image_too_small": 1, "image_truncated": 1, "bad_row": 1}
    m = load_manifest(out)
    assert m["kind"] == "pairs" and m["n_samples"] == 10
    assert m["counts"]["dropped"] == s.dropped
    assert [x["n_samples"] for x in m["shards"]] == [4, 4, 2]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {x["name"]: x["n_samples"] for x in m["shards"]}
    keys = []
    for entry in m["shards"]:
        assert file_sha256(out / entry["name"]) == entry["sha256"]
        assert (out / entry["name"]).stat().st_size == entry["bytes"]
        for sample in read_shard(out / entry["name"]):
            keys.append(sample["__key__"])
            meta = json.loads(sample["json"])
            assert sample["txt"].decode() == meta["captions"][0]
            assert meta["captions"][0].startswith("a photo number") and "&" in meta["captions"][0]
            assert meta["width"] == 64 and meta["height"] == 48
            assert meta["extra"] == int(sample["__key__"][1:])  # extra columns kept
            assert "jpg" in sample
    assert keys == [f"k{i}" for i in range(10)]
    assert not list(out.glob(".*tmp"))


def test_same_input_gives_byte_identical_shards(pairs_table: Path, tmp_path: Path) -> None:
    a = shard_pairs([pairs_table], tmp_path / "a", progress=False)
    b = shard_pairs([pairs_table], tmp_path / "b", progress=False)
    assert a.written == b.written
    ma, mb = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b")
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]


def test_csv_tsv_parquet_and_folder_inputs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "im").mkdir()
    for i in range(3):
        (tmp_path / "im" / f"p{i}.jpg").write_bytes(jpeg(10 + i))
        (tmp_path / "im" / f"p{i}.txt").write_text(f"first caption {i}\nsecond caption {i}\n")
    rows = [{"image_path": f"im/p{i}.jpg", "text": f"the caption of {i}"} for i in range(3)]
    for kind, delim in (("csv", ","), ("tsv", "\t")):
        with open(tmp_path / f"t.{kind}", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["image_path", "text"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    for name in ("t.csv", "t.tsv", "t.parquet"):
        s = shard_pairs([tmp_path / name], tmp_path / f"out_{name}", progress=False, dedup="none")
        assert s.written == 3, name
    s = shard_pairs([tmp_path / "im"], tmp_path / "out_folder", progress=False)
    assert s.written == 3
    samples = [x for sh in sorted((tmp_path / "out_folder").glob("*.tar")) for x in read_shard(sh)]
    assert json.loads(samples[0]["json"])["captions"] == ["first caption 0", "second caption 0"]


def test_bundled_sample_keeps_all_five_captions(tmp_path: Path) -> None:
    s = shard_pairs([SAMPLE / "coco_cc"], tmp_path / "ds", progress=False)
    assert s.written == 76 and s.dropped == {}
    first = next(read_shard(tmp_path / "ds" / "000000.tar"))
    meta = json.loads(first["json"])
    assert len(meta["captions"]) == 5 and meta["license"].startswith("Attribution")


def test_missing_caption_column_names_file_and_flag(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"file": "x.jpg", "title": "no caption column"}) + "\n")
    with pytest.raises(InputError, match=r"t\.jsonl: none of the columns .* caption column .* --caption-col"):
        shard_pairs([p], tmp_path / "o", progress=False)


def test_refuses_to_overwrite_without_flag(pairs_table: Path, tmp_path: Path) -> None:
    shard_pairs([pairs_table], tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="already holds a dataset; pass --overwrite"):
        shard_pairs([pairs_table], tmp_path / "o", progress=False)
    assert shard_pairs([pairs_table], tmp_path / "o", overwrite=True, progress=False).written == 10


def test_shard_text_normalises_and_counts(tmp_path: Path) -> None:
    import gzip

    p = tmp_path / "corpus.txt.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("First  sentence.\n\nSecond\tsentence &amp; more.\nFirst sentence.\n")
    s = shard_text([p], tmp_path / "t", dedup=True, progress=False)
    assert (s.seen, s.written) == (4, 2)
    assert s.dropped == {"empty": 1, "duplicate": 1}
    texts = [x["txt"].decode() for x in read_shard(tmp_path / "t" / "000000.tar")]
    assert texts == ["First sentence.", "Second sentence & more."]
    assert all("." not in x["__key__"] for x in read_shard(tmp_path / "t" / "000000.tar"))


def test_embed_adds_float16_features_and_records_encoder(sample_datasets: dict[str, Path]) -> None:
    m = load_manifest(sample_datasets["pairs"])
    assert m["image_encoder"]["name"] == "efficientnet_lite0" and m["image_encoder"]["dim"] == 1280
    for entry in m["shards"]:
        assert file_sha256(sample_datasets["pairs"] / entry["name"]) == entry["sha256"]
    sample = next(read_shard(sample_datasets["pairs"] / m["shards"][0]["name"]))
    emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
    assert emb.dtype == np.float16 and emb.shape == (1280,) and np.isfinite(emb).all()
    assert float(np.abs(emb).sum()) > 0


def test_embed_resumes_after_a_crash_and_does_not_trust_a_rebuilt_dataset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data_tools import encoders

    ds = tmp_path / "ds"
    shard_pairs([SAMPLE / "coco_cc"], ds, max_count=40, progress=False)  # shards of 40 + 36
    spec = "timm:test_efficientnet.r160_in1k:random"
    real_encode = encoders.ImageEncoder.encode
    calls: list[int] = []

    def crashing(self, images, device="cpu"):
        calls.append(len(images))
        if sum(calls) > 40:
            raise RuntimeError("killed")
        return real_encode(self, images, device)

    monkeypatch.setattr(encoders.ImageEncoder, "encode", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        embed(ds, spec, batch_size=20, progress=False)
    assert load_manifest(ds)["image_encoder"] is None  # manifest untouched until the end
    assert not list(ds.glob(".*.tar.tmp"))  # the interrupted shard left no temp file

    calls.clear()
    monkeypatch.setattr(encoders.ImageEncoder, "encode",
                        lambda self, images, device="cpu": calls.append(len(images)) or real_encode(self, images, device))
    embed(ds, spec, batch_size=20, progress=False)
    assert sum(calls) == 36  # only the unfinished shard was encoded again
    first = {s["name"]: s["sha256"] for s in load_manifest(ds)["shards"]}
    assert all("emb.npy" in x for sh in ds.glob("*.tar") for x in read_shard(sh))

    # Rebuilt shards are byte-identical to the pre-embed ones, yet must all be embedded again.
    shard_pairs([SAMPLE / "coco_cc"], ds, max_count=40, overwrite=True, progress=False)
    calls.clear()
    embed(ds, spec, batch_size=20, progress=False)
    assert sum(calls) == 76
    assert {s["name"]: s["sha256"] for s in load_manifest(ds)["shards"]} == first  # deterministic


def test_embed_requires_pairs_dataset(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("a sentence here\n")
    shard_text([tmp_path / "c.txt"], tmp_path / "t", progress=False)
    with pytest.raises(DatasetError, match="embed needs a pairs dataset"):
        embed(tmp_path / "t", "timm:test_efficientnet.r160_in1k:random", progress=False)


def test_cli_reports_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli(["shard-pairs", str(tmp_path / "nothing.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing.jsonl: no such file or folder" in err
    assert "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing created for a failed call


def test_tar_members_are_plain_and_keys_have_no_dots(sample_datasets: dict[str, Path]) -> None:
    first = load_manifest(sample_datasets["pairs"])["shards"][0]["name"]
    with tarfile.open(sample_datasets["pairs"] / first) as tf:
        names = tf.getnames()
    assert all("/" not in n and n.count(".") in (1, 2) for n in names)
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "json", "emb.npy"}
