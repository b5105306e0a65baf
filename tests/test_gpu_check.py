"""bench/gpu_check.py: its FLOP count, its dry run on CPU and the section it writes.

The dry run is the GPU check's whole plumbing on CPU (tiny BERT, fp32, two steps): the trainer's
step on the plain engine, gradient caching, ZeRO-2 and ZeRO-3 at world size 1, the gpu-marked
tests in a subprocess, and the section written into a copy of BENCHMARKS.md. It runs with
mlflow, open_clip, webdataset and imagehash made unimportable, as on the bare CUDA image the
real check runs on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu_check
from bench.report import DOC

from .conftest import ROOT

ABSENT_ON_GPU_IMAGE = ("mlflow", "open_clip", "webdataset", "imagehash")


def sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"<!-- bench:([\w-]+) -->(.*?)<!-- /bench:\1 -->", text, re.S))


def test_step_flops_equal_what_torch_counts_in_a_real_step() -> None:
    """The formula against torch's own count of every matrix product of a forward and backward
    through the MCSE model and loss (odd sizes, intermediate != 4h, so no term can hide)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    from trainer.loss import mcse_loss
    from trainer.model import MCSEModel

    b, s, proj, image_dim = 3, 7, 12, 5
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=40, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    model = MCSEModel(BertModel(config, add_pooling_layer=False), image_dim=image_dim, proj_dim=proj)
    batch = {"input_ids": torch.randint(5, 50, (b, s)), "attention_mask": torch.ones(b, s, dtype=torch.long),
             "image_emb": torch.randn(b, image_dim)}
    with FlopCounterMode(display=False) as counter:
        loss = mcse_loss(model(batch), temperature=0.05, temperature_vl=0.05, lambda_mm=0.01)["loss"]
        loss.backward()
    shape = gpu_check.Shape(layers=2, hidden=16, intermediate=40, seq=s, proj=proj, image_dim=image_dim)
    assert gpu_check.step_flops(shape, b)["total"] == counter.get_total_flops()


def test_bert_base_is_six_times_its_encoder_weights_per_token() -> None:
    """The figure the GPU section quotes: BERT-base's 12 layers hold 12 x (4 x 768² + 2 x 768 x
    3072) = 84.9 M matrix weights, 6 FLOPs each per token for forward and backward."""
    shape = gpu_check.bert_base()
    assert (shape.layers, shape.hidden, shape.intermediate, shape.seq) == (12, 768, 3072, 32)
    f = gpu_check.step_flops(shape, 1024)
    tokens = 2 * 1024 * 32
    assert f["dense"] == 6 * 84_934_656 * tokens
    assert 0.005 < f["attention"] / f["total"] < 0.01  # 4·s·h / (2·(4h² + 2hi)) = 0.69%


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    blocker = tmp / "site"
    blocker.mkdir()
    # None in sys.modules: `import x` fails and importlib.util.find_spec(x) says "absent".
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in ABSENT_ON_GPU_IMAGE))
    env = dict(os.environ, PYTHONPATH=str(blocker))
    before = hashlib.sha256(DOC.read_bytes()).hexdigest()
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--dry-run", "--out", str(tmp / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp / "out"
    return {"out": out, "results": json.loads((out / "gpu_check.json").read_text()), "stdout": proc.stdout,
            "doc_sha_before": before}


def test_dry_run_measures_every_stage_through_the_trainer(dry_run: dict[str, Any]) -> None:
    res = dry_run["results"]
    assert res["dry_run"] is True and res["errors"] == [] and res["skipped"] == []
    assert [r["global_batch"] for r in res["steps"]] == [4, 8]
    for r in res["steps"] + res["caching"] + res["engines"]:
        assert r["step_s"] > 0 and r["samples_s"] == pytest.approx(r["global_batch"] / r["step_s"])
        assert r["loss"] == r["loss"] and r["steps"] == 2
    # The count of one real trainer step equals the formula; gradient caching really ran in
    # chunks (one more forward pass: 4/3 of the model FLOPs executed).
    big = res["steps"][-1]
    assert big["counted_flops"] == pytest.approx(big["model_flops"], rel=1e-9)
    (cached,) = res["caching"]
    assert (cached["chunks"], cached["chunk_size"]) == (2, 4)
    assert 1.30 < cached["counted_flops"] / cached["model_flops"] < 1.36
    assert [r["engine"] for r in res["engines"]] == ["zero2", "zero3"]
    t = res["tests"]
    assert t["files"] == ["tests/test_precision.py"]  # the only file with gpu-marked tests
    assert t["skipped"] >= 1 and t["passed"] == t["failed"] == t["errors"] == 0  # no CUDA here


def test_dry_run_writes_only_its_section_of_a_copy(dry_run: dict[str, Any]) -> None:
    assert hashlib.sha256(DOC.read_bytes()).hexdigest() == dry_run["doc_sha_before"]  # real doc untouched
    real, copy = DOC.read_text(), (dry_run["out"] / "BENCHMARKS.md").read_text()
    assert copy.count("<!-- bench:gpu -->") == 1
    ours = sections(copy).pop("gpu")
    assert {k: v for k, v in sections(copy).items() if k != "gpu"} == \
        {k: v for k, v in sections(real).items() if k != "gpu"}
    assert "dry run on CPU" in ours and "| 8 |" in ours and "| zero3 |" in ours and "| 2 x 4 |" in ours
    embedded = gpu_check.read_embedded(ours)
    assert [s["global_batch"] for s in embedded["steps"]] == [4, 8]
    assert embedded["steps"][1]["step_s"] == dry_run["results"]["steps"][1]["step_s"]
    assert "GPU check (dry run)" in dry_run["stdout"]


def _measured(step_s: dict[int, float], zero2_s: float, mfu_peak: float) -> dict[str, Any]:
    """Results as a GPU run writes them, with figures chosen by hand."""
    shape = gpu_check.bert_base()
    plan = gpu_check.Plan.make(False, None)

    def rec(batch: int, t: float, engine: str = "plain") -> dict[str, Any]:
        flops = gpu_check.step_flops(shape, batch)["total"]
        return {"engine": engine, "global_batch": batch, "chunks": 1, "chunk_size": batch, "step_s": t,
                "samples_s": batch / t, "model_flops": flops, "tflops": flops / t / 1e12,
                "mfu": flops / t / 1e12 / mfu_peak, "peak_mem_gib": 3.0, "steps": 20, "loss": 4.0}

    import dataclasses

    return {"version": 1, "dry_run": False, "date": "2030-01-02", "commit": "unknown", "machine": "16 x TestCPU, NVIDIA H200",
            "device": "NVIDIA H200", "plan": dataclasses.asdict(plan), "shape": dataclasses.asdict(shape),
            "measured_tflops": mfu_peak, "spec_tflops": 989.4, "steps": [rec(b, t) for b, t in step_s.items()],
            "engines": [rec(1024, zero2_s, "zero2")], "caching": [], "skipped": [], "errors": [],
            "tests": {"files": ["tests/test_precision.py"], "passed": 4, "failed": 0, "errors": 0, "skipped": 0,
                      "bad": [], "seconds": 50.0}, "goals": {}, "command": "python bench/gpu_check.py --out /x"}


def test_apply_writes_the_section_of_a_gpu_run_with_its_machine_and_verdicts(tmp_path: Path) -> None:
    # BERT-base at 1024: 33.65 TFLOP per step (dense 33.40 + attention 0.23 + heads, logits);
    # 0.1 s per step is 336.5 TFLOP/s: 42.6% of 790, 34.0% of the datasheet's 989.4.
    res = _measured({64: 0.02, 256: 0.04, 1024: 0.1}, zero2_s=0.11, mfu_peak=790.0)
    (tmp_path / "r.json").write_text(json.dumps(res))
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(DOC.read_text())
    assert gpu_check.main(["--apply", str(tmp_path / "r.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    ours = sections(text)["gpu"]
    assert "NVIDIA H200, one GPU" in ours
    # The device's machine and date, and this checkout's commit (the device has no .git).
    assert re.search(r"Measured 2030-01-02 at commit \w+ on 16 x TestCPU, NVIDIA H200\.", ours)
    assert "42.6% of the measured peak" in ours and "(34.0% of the datasheet's): **met**" in ours
    assert "0.909x: **not met**" in ours  # 0.1 / 0.11
    assert "**4 passed, 0 failed, 0 errors, 0 skipped**" in ours
    assert {k: v for k, v in sections(text).items() if k != "gpu"} == \
        {k: v for k, v in sections(DOC.read_text()).items() if k != "gpu"}


def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = _measured({1024: 0.1}, zero2_s=0.1, mfu_peak=790.0)
    res["dry_run"] = True
    (tmp_path / "dry.json").write_text(json.dumps(res))
    doc = tmp_path / "B.md"
    assert gpu_check.main(["--apply", str(tmp_path / "dry.json"), "--doc", str(doc)]) == 2
    assert gpu_check.main(["--apply", str(tmp_path / "missing.json"), "--doc", str(doc)]) == 2
    assert gpu_check.main(["--dry-run", "--doc", str(DOC), "--out", str(tmp_path)]) == 2
    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == (4 if not torch.cuda.is_available() else 3)
    assert "dry run" in err[0] and "missing.json" in err[1] and "never writes the real" in err[2]
    assert not doc.exists()


# ------------------------------------------------------------------ bench/scaling_model.py's step-time model


def test_step_time_model_terms_by_hand() -> None:
    from bench import scaling_model as sm

    cluster = sm.Cluster()
    arch = sm.Arch("BERT-base", 110_000_000, 768, 12, 12, 3072)
    fit = sm.ComputeFit(fixed_s=0.010, rate_tflops=300.0)
    # One GPU: no communication; compute = 10 ms + matrix FLOPs / 300 T + logits / 50 T (fp32).
    one = sm.step_time(arch, 1, 1024, fit, cluster, 2000.0)
    f = gpu_check.step_flops(sm.bert_shape(arch), 1024)
    assert one.reduce_s == one.gather_s == 0.0
    assert one.compute_s == pytest.approx(0.010 + (f["total"] - f["loss"]) / 300e12 + f["loss"] / 50e12)
    # 64 sentences per GPU inside one node (8) and across two (16).
    inside, across = sm.step_time(arch, 8, 512, fit, cluster, 2000.0), sm.step_time(arch, 16, 1024, fit, cluster, 2000.0)
    # fp32 gradients: 2(N-1)/N x 440 MB over 400 GB/s (NVSwitch) or 45 GB/s (one NIC per GPU),
    # plus a tree's 2 log2(N) steps of 4 µs.
    assert inside.reduce_s == pytest.approx(2 * 7 / 8 * 440e6 / 400e9 + 2 * 3 * 4e-6)
    assert across.reduce_s == pytest.approx(2 * 15 / 16 * 440e6 / 45e9 + 2 * 4 * 4e-6)
    # Two gathers + two reduce-scatters, each a ring of 16 - 2 NVLink steps (1 µs) and 2 IB
    # steps (4 µs), receiving 15 x 64 x (2 x 768 + 4 x 256) bytes in each direction.
    assert across.gather_s == pytest.approx(4 * (14e-6 + 8e-6) + 2 * 15 * 64 * 2560 / 45e9)
    # DDP hides the all-reduce behind the backward (2/3 of the matrix work), all but the last
    # 25 MB bucket: inside the node 1.9 ms is hidden; across, 18.4 - 2/3 x 7.4 = 13.4 ms shows.
    g = gpu_check.step_flops(sm.bert_shape(arch), 64, columns=1024)
    work = (g["total"] - g["loss"]) / 300e12 + g["loss"] / 50e12
    assert across.reduce_exposed_s == pytest.approx(across.reduce_s - 2 / 3 * work)
    assert inside.reduce_exposed_s == pytest.approx(inside.reduce_s * 25e6 / 440e6)
    assert across.step_s == pytest.approx(0.010 + work + across.reduce_exposed_s + across.gather_s)
    assert inside.bottleneck == across.bottleneck == "compute"  # 17.4 ms of compute
    quick = sm.step_time(arch, 16, 1024, sm.ComputeFit(fixed_s=0.002, rate_tflops=300.0), cluster, 2000.0)
    assert quick.bottleneck == "grad reduce"  # 9.4 ms of compute < 13.4 ms exposed
    half = sm.step_time(arch, 16, 1024, fit, cluster, 2000.0, grad_bytes_per_param=2)
    assert half.reduce_s == pytest.approx(2 * 15 / 16 * 220e6 / 45e9 + 2 * 4 * 4e-6)
    # A slow loader (10 samples/s per worker, 8 workers) sets the step: 64 / 80 s.
    slow = sm.step_time(arch, 16, 1024, fit, cluster, 10.0)
    assert slow.bottleneck == "loader" and slow.step_s == pytest.approx(64 / 80)


def test_step_time_model_fits_the_gpu_check_and_ignores_dry_runs() -> None:
    from bench import scaling_model as sm

    shape = gpu_check.bert_base()
    steps = [{"global_batch": g, "model_flops": gpu_check.step_flops(shape, g)["total"]} for g in (64, 256, 1024)]
    for s in steps:  # measured steps of exactly 12 ms + FLOPs / 320 TFLOP/s
        s["step_s"] = 0.012 + s["model_flops"] / 320e12
        s["samples_s"] = s["global_batch"] / s["step_s"]
    gpu = {"device": "NVIDIA H200", "dry_run": False, "bert": {}, "measured_tflops": 780.0, "steps": steps}
    fit = sm.fit_compute(gpu, sm.Cluster())
    assert fit.fixed_s == pytest.approx(0.012) and fit.rate_tflops == pytest.approx(320.0)
    assert "NVIDIA H200" in fit.source and "41% of its measured 780" in fit.source
    assert sm.fit_compute({**gpu, "dry_run": True}, sm.Cluster()).source.startswith("assumed")
    assert sm.fit_compute({**gpu, "bert": {"hidden_size": 32}}, sm.Cluster()).source.startswith("assumed")
    # And the figures come back out of a section written by the check.
    res = _measured({64: 0.02, 256: 0.04, 1024: 0.1}, zero2_s=0.1, mfu_peak=790.0)
    res["goals"] = gpu_check.goals(res)
    back = gpu_check.read_embedded(gpu_check.render(res))
    assert sm.fit_compute(back, sm.Cluster()).points == [(r["global_batch"], r["step_s"], r["model_flops"])
                                                          for r in res["steps"]]


def test_loader_rates_are_read_from_the_stream_section() -> None:
    from bench import scaling_model as sm

    table = ("| DataLoader workers | (a) features | per worker | (b) JPEG | per worker |\n| ---: | ---: | ---: | ---: | ---: |\n"
             "| 1 | 2,500 | 2,500 | 240 | 240 |\n| 2 | 4,000 | 2,000 | 470 | 235 |\n")
    assert sm.measured_rates(table) == {"features": 2500.0, "jpeg": 240.0, "source": 1.0}
    assert sm.measured_rates("nothing measured")["source"] == 0.0
