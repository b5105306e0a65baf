"""Crash-safe checkpoints and model export.

A training checkpoint is a folder ``run_dir/checkpoints/step_XXXXXXXX/`` holding the model
and optimizer (DeepSpeed's own files under ``ds/`` for ZeRO runs), the LR schedule, every
rank's RNG state and data position, and the trainer state. It is written into a hidden
``.step_XXXXXXXX.tmp`` folder by all ranks; once every rank is done, rank 0 hashes every file
into ``COMMITTED`` (written last, fsynced) and renames the folder into place. Only folders with
a valid ``COMMITTED`` count: a crash at any moment leaves either the previous checkpoint or
the new one, never a half-written one that looks complete. Old checkpoints are deleted only
after the new one is committed. Loading verifies sizes and sha256 first; a damaged checkpoint
is reported by file name and the previous one is tried. DeepSpeed's ``latest`` file is never
trusted: its checkpoint is loaded by explicit tag and a failed load is an error.

Model export (``best/``, ``final/``) uses the same temp-and-rename discipline.

    python -m trainer.checkpoint export runs/RUN/checkpoints/step_00001000 OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("webmcse.checkpoint")

COMMIT_MARKER = "COMMITTED"
CKPT_SUBDIR = "checkpoints"
DS_TAG = "state"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


# ------------------------------------------------------------------------------ helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def committed_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoint folders, newest first (half-written ones are ignored)."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
             and (p / COMMIT_MARKER).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _is_deepspeed(accelerator: Any) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


# ------------------------------------------------------------------------------ save


def save_checkpoint(run_dir: Path, step: int, accelerator: Any, model: Any, optimizer: Any, scheduler: Any,
                    trainer_state: dict[str, Any], data_state: dict[str, Any], keep: int,
                    barrier: Any) -> Path:
    """Write and commit a checkpoint; every rank must call it. ``barrier()`` is a collective
    wait that all ranks run (the long-wait barrier, so slow storage cannot time it out)."""
    rank = accelerator.process_index
    root = run_dir / CKPT_SUBDIR
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    t0 = time.perf_counter()
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()

    _write_json(tmp / f"data_rank{rank}.json", data_state)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if _is_deepspeed(accelerator):
        # All ranks write their partitions. The tag is ours; DeepSpeed's `latest` file is ignored.
        model.save_checkpoint(str(tmp / "ds"), tag=DS_TAG)
    elif accelerator.is_main_process:
        from safetensors.torch import save_file

        state = accelerator.get_state_dict(model, unwrap=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_json(tmp / "trainer_state.json", trainer_state)
    barrier()  # every rank's files are written and closed

    if accelerator.is_main_process:
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = str(path.relative_to(tmp))
            files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        _write_json(tmp / COMMIT_MARKER, {"step": step, "world_size": accelerator.num_processes,
                                          "deepspeed": _is_deepspeed(accelerator), "files": files,
                                          "time": time.time()})
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. preemption right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _rotate(root, keep)
        log.info("checkpoint %s committed in %.1f s", final, time.perf_counter() - t0)
    barrier()
    return final


def _rotate(root: Path, keep: int) -> None:
    """Delete committed checkpoints beyond the newest ``keep``, and stale temp folders."""
    committed = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                        and (p / COMMIT_MARKER).is_file()), key=lambda p: p.name, reverse=True)
    for old in committed[max(1, keep):]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------ load


def verify(ckpt: Path, files: list[str] | None = None) -> dict[str, Any]:
    """Check a checkpoint's files against its commit marker; raise naming the first bad file."""
    marker = ckpt / COMMIT_MARKER
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{marker}: unreadable commit marker ({exc})") from None
    listed = meta.get("files", {})
    for rel in files if files is not None else list(listed):
        entry = listed.get(rel)
        path = ckpt / rel
        if entry is None:
            raise CheckpointError(f"{path}: not listed in {marker}")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the commit recorded {entry['bytes']}")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: content does not match its recorded sha256 (corrupted)")
    return meta


def load_data_states(ckpt: Path) -> list[dict[str, Any]]:
    """Every rank's saved data position, in rank order: a resume with another layout re-deals
    the epoch in progress from all of them."""
    meta = json.loads((ckpt / COMMIT_MARKER).read_text(encoding="utf-8"))
    out = []
    for rank in range(int(meta.get("world_size", 1))):
        path = ckpt / f"data_rank{rank}.json"
        out.append(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})
    return out


def load_checkpoint(ckpt: Path, accelerator: Any, model: Any, optimizer: Any,
                    scheduler: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Restore model, optimizer and schedule; return (trainer_state, this rank's data state,
    this rank's RNG state). Every rank calls it; rank 0 has verified the files beforehand.
    The RNG state is returned rather than set: the caller sets it once nothing else will draw
    from the generators before the first step."""
    rank = accelerator.process_index
    meta = json.loads((ckpt / COMMIT_MARKER).read_text(encoding="utf-8"))
    if meta.get("world_size") != accelerator.num_processes and meta.get("deepspeed"):
        raise CheckpointError(f"{ckpt}: a DeepSpeed ZeRO checkpoint of world size {meta.get('world_size')} cannot "
                              f"load at world size {accelerator.num_processes} (its shards are per rank): resume "
                              f"with {meta.get('world_size')} processes, or export full weights with `python -m "
                              f"trainer.checkpoint export {ckpt} OUT` and start from model.name_or_path=OUT "
                              f"(DeepSpeed's `python -m deepspeed.checkpoint.ds_to_universal --input_folder "
                              f"{ckpt}/ds/{DS_TAG} "
                              f"--output_folder DIR` converts the optimizer state for DeepSpeed's own loader)")
    if _is_deepspeed(accelerator):
        path, _ = model.load_checkpoint(str(ckpt / "ds"), tag=DS_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{ckpt / 'ds'}: DeepSpeed found no checkpoint with tag {DS_TAG!r}")
    else:
        from safetensors.torch import load_file

        state = load_file(str(ckpt / "model.safetensors"))
        accelerator.unwrap_model(model).load_state_dict(state, strict=True)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    data_file = ckpt / f"data_rank{rank}.json"
    data_state = json.loads(data_file.read_text(encoding="utf-8")) if data_file.is_file() else {}
    rng_file = ckpt / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return trainer_state, data_state, rng


# ------------------------------------------------------------------------------ export


def export_model(model: Any, tokenizer: Any, folder: str | Path, info: dict[str, Any]) -> Path:
    """Save ``model`` (an MCSEModel) + tokenizer in Hugging Face format, atomically."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer, extra=info)
    (tmp / COMMIT_MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def is_committed(folder: str | Path) -> bool:
    return (Path(folder) / COMMIT_MARKER).is_file()


def full_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint, plain or ZeRO (any stage), without a process group."""
    verify(ckpt)
    if (ckpt / "ds").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "ds"), tag=DS_TAG)
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """Rebuild the run's model from its saved config, load the checkpoint's full weights and
    export it (Hugging Face format + heads) to ``out``."""
    from transformers import AutoTokenizer

    from trainer.config import load_config
    from trainer.engine import build_model
    from trainer.model import resolve_name

    run_dir = ckpt.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    state = full_weights(ckpt)
    image_dim = int(state["image_head.dense.weight"].shape[1]) if "image_head.dense.weight" in state else 0
    model = build_model(cfg, image_dim, pretrained=False)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(resolve_name(cfg.model.name_or_path))
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    return export_model(model, tokenizer, out, {"step": trainer_state.get("step"), "source": str(ckpt),
                                                "eval_pooler": cfg.eval.pooler})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.checkpoint")
    sub = p.add_subparsers(dest="verb", required=True)
    e = sub.add_parser("export", help="full fp32 weights of a (ZeRO) checkpoint -> Hugging Face folder")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("out", type=Path)
    v = sub.add_parser("verify", help="check a checkpoint's files against its commit marker")
    v.add_argument("checkpoint", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.verb == "verify":
            meta = verify(args.checkpoint)
            print(f"{args.checkpoint}: step {meta['step']}, {len(meta['files'])} files verified")
        else:
            print(f"exported to {export_checkpoint(args.checkpoint, args.out)}")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
