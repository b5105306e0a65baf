"""Fork-based multi-rank job runner with fault injection, for the reliability drills.

Run as a script with a JSON spec: the driver imports the training stack once and, for every
job, forks one process per rank (env:// rendezvous on 127.0.0.1, gloo) that runs the real
entry point `trainer.run.main`. Like torchrun, the first rank that fails takes the others
down. The driver never computes with torch itself, so forking after the import is safe.

    python tests/harness.py SPEC.json RESULT.json

A spec is {"jobs": [{"name", "args": [...], "world": N, "faults": [...]}, ...]}. Faults are
installed in the child before the run starts, by patching the trainer's own functions:

- kill_after_step {rank, step}: SIGKILL right after optimizer step `step` (counted from the
  start of this job);
- kill_before_commit {step}: SIGKILL after every file of checkpoint `step` is written, before
  its commit marker;
- kill_in_rotation {step}: SIGKILL after checkpoint `step` committed, before old ones are deleted;
- nan_at_step {rank, step}: a NaN loss on that rank at that step;
- stall_at_step {rank, step}: the rank stops making progress at that step;
- slow_eval {seconds_per_batch}: rank 0's evaluation batches take that much longer;
- record_dropout_seeds {path}: (a probe) append the torch seed each step starts from to path.rank<R>.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _install(faults: list[dict[str, Any]], rank: int) -> None:
    import trainer.checkpoint as ckpt
    import trainer.step as step_mod
    import trainer.train as train_mod

    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    for f in faults:
        kind = f["kind"]
        if f.get("rank", rank) != rank:
            continue
        if kind in ("kill_after_step", "stall_at_step"):
            real_step, count = train_mod.train_step, [0]

            def patched(*a: Any, _real=real_step, _f=f, _count=count, **k: Any) -> Any:
                out = _real(*a, **k)
                _count[0] += 1
                if _count[0] == _f["step"]:
                    if _f["kind"] == "kill_after_step":
                        die()
                    time.sleep(3600)
                return out

            train_mod.train_step = patched
        elif kind == "nan_at_step":
            real_loss, count = step_mod.mcse_loss, [0]

            def nan_loss(*a: Any, _real=real_loss, _f=f, _count=count, **k: Any) -> Any:
                out = _real(*a, **k)
                _count[0] += 1
                if _count[0] == _f["step"]:
                    out["loss"] = out["loss"] * float("nan")
                return out

            step_mod.mcse_loss = nan_loss
        elif kind == "kill_before_commit":
            real_write = ckpt._write_json

            def write(path: Path, obj: Any, _real=real_write, _f=f) -> None:
                if path.name == ckpt.COMMIT_MARKER and obj.get("step") == _f["step"]:
                    die()
                _real(path, obj)

            ckpt._write_json = write
        elif kind == "kill_in_rotation":
            real_rotate = ckpt._rotate

            def rotate(root: Path, keep: int, _real=real_rotate, _f=f) -> None:
                if (root / ckpt.step_dir_name(_f["step"])).is_dir():
                    die()
                _real(root, keep)

            ckpt._rotate = rotate
        elif kind == "slow_eval":
            real_make = train_mod.make_encoder

            def slow_encoder(*a: Any, _real=real_make, _f=f, **k: Any) -> Any:
                beat = k.get("on_batch") or (lambda: None)

                def slow_beat() -> None:  # every evaluation batch takes `seconds_per_batch` longer
                    time.sleep(_f["seconds_per_batch"])
                    beat()

                k["on_batch"] = slow_beat
                return _real(*a, **k)

            train_mod.make_encoder = slow_encoder
        elif kind == "record_dropout_seeds":  # a probe, not a fault: the seed each step ran with
            real_step = train_mod.train_step

            def recording(*a: Any, _real=real_step, _f=f, **k: Any) -> Any:
                import torch

                with open(f"{_f['path']}.rank{rank}", "a", encoding="utf-8") as fh:
                    fh.write(f"{torch.initial_seed()}\n")
                return _real(*a, **k)

            train_mod.train_step = recording
        else:
            raise ValueError(f"unknown fault {kind}")


def run_job(job: dict[str, Any], logs: Path, timeout: float = 600) -> dict[str, Any]:
    world = int(job.get("world", 1))
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    pids: dict[int, int] = {}
    t0 = time.time()
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # child: one rank
            code = 1
            try:
                log_fd = os.open(logs / f"{job['name']}.rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)})
                _install(job.get("faults", []), rank)
                from trainer.run import main

                code = main(job["args"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids[pid] = rank
    statuses: dict[int, dict[str, Any]] = {}
    first_failure: float | None = None
    while pids:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.time() - t0 > timeout:
                for p in pids:
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.05)
            continue
        rank = pids.pop(pid)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        statuses[rank] = {"exit": code, "signal": sig, "seconds": time.time() - t0}
        if (sig or code) and first_failure is None:  # like torchrun: one failure ends the job
            first_failure = time.time() - t0
            for p in pids:
                os.kill(p, signal.SIGKILL)
    ok = all(s["exit"] == 0 for s in statuses.values())
    return {"name": job["name"], "ok": ok, "ranks": statuses, "seconds": time.time() - t0,
            "first_failure_s": first_failure}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    logs = Path(spec.get("logs", out.parent / "logs"))
    # Import the whole stack once, before forking (no torch computation happens here).
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, BertModel  # noqa: F401

    import trainer.run
    import trainer.train  # noqa: F401

    results = [run_job(job, logs, spec.get("timeout", 600)) for job in spec["jobs"]]
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
