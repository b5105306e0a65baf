"""Run control that keeps every rank in step: stop requests and a heartbeat watchdog.

**Stop requests** (preemption, time limit, an operator): a rank learns of one from SIGUSR1 or
SIGTERM, or from a ``STOP`` file in the run folder (what launch/slurm.sh creates when Slurm
warns that the job will end). Ranks check every few steps and agree with one all-reduce, so
all of them stop after the same step, checkpoint together and exit.

**Heartbeat watchdog** (hangs): every rank writes a small heartbeat file in the run folder as
it makes progress (every step); a thread on every rank watches all of them. When heartbeats
stop changing for ``distributed.heartbeat_timeout_s`` (ranks that declared they wait for rank 0
are exempt), the stalled rank is the one that stopped earliest: the others soon block in the
next collective, one step further. It is named in an error and the process exits non-zero,
which makes the launcher take the whole job down instead of leaving it waiting forever.
Staleness is judged on the watcher's own clock (when it last saw the file change), so clock
skew between nodes does not matter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from trainer import dist

log = logging.getLogger("webmcse.control")

STOP_FILE = "STOP"
PREEMPTED_FILE = "PREEMPTED"
HEARTBEAT_DIR = ".heartbeat"
EXIT_STALLED = 3


class StopRequest:
    """Signals and the STOP file, agreed across ranks every ``every`` steps."""

    def __init__(self, run_dir: Path, every: int) -> None:
        self.stop_file = run_dir / STOP_FILE
        self.every = max(1, every)
        self._flag = False
        self._reason = ""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            # Outside the main thread (tests) signals cannot be hooked; the STOP file still works.
            with contextlib.suppress(ValueError):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._flag = True
        self._reason = signal.Signals(signum).name

    def local(self) -> bool:
        if self.stop_file.exists():
            self._reason = self._reason or f"{self.stop_file} exists"
            return True
        return self._flag

    def agreed(self, step: int, device: Any = "cpu") -> bool:
        """Every rank calls this at every step; only every ``every`` steps does it communicate."""
        if step % self.every != 0:
            return False
        return dist.all_reduce_max(1.0 if self.local() else 0.0, device) > 0

    @property
    def reason(self) -> str:
        return self._reason or "another rank was asked to stop"


class Watchdog:
    """Heartbeat files + a watcher thread that names a stalled rank and ends the process."""

    def __init__(self, run_dir: Path, rank: int, world: int, timeout_s: float) -> None:
        self.dir = run_dir / HEARTBEAT_DIR
        self.rank = rank
        self.world = world
        self.timeout = timeout_s
        self._count = 0
        self._step: int | None = None
        self._waiting = False
        self._last_write = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.timeout <= 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.beat(force=True)
        self._thread = threading.Thread(target=self._watch, name="webmcse-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int | None = None, force: bool = False) -> None:
        """Record progress; a new step is always written, other beats at most every few s."""
        if self.timeout <= 0:
            return
        self._count += 1
        now = time.monotonic()
        new_step = step is not None and step != self._step
        if not (force or new_step) and now - self._last_write < min(5.0, self.timeout / 4):
            return
        if step is not None:
            self._step = step
        self._last_write = now
        path = self.dir / f"rank{self.rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"beat": self._count, "step": self._step, "waiting": self._waiting,
                                   "pid": os.getpid()}))
        os.replace(tmp, path)

    def waiting(self, flag: bool) -> None:
        """Declare that this rank is blocked waiting for rank 0 (not stalled)."""
        self._waiting = flag
        self.beat(force=True)

    def _watch(self) -> None:
        seen: dict[int, tuple[str, float]] = {}
        interval = min(2.0, self.timeout / 4)
        while not self._stop.wait(interval):
            now = time.monotonic()
            infos: dict[int, dict[str, Any]] = {}
            stale: dict[int, float] = {}
            for r in range(self.world):
                try:
                    text = (self.dir / f"rank{r}.json").read_text()
                except OSError:
                    text = ""
                prev = seen.get(r)
                if prev is None or prev[0] != text:
                    seen[r] = (text, now)
                    continue
                try:
                    infos[r] = json.loads(text) if text else {}
                except json.JSONDecodeError:
                    infos[r] = {}
                if not infos[r].get("waiting"):
                    stale[r] = now - prev[1]
            if not stale or max(stale.values()) <= self.timeout:
                continue
            steps = {r: infos[r].get("step") if infos[r].get("step") is not None else -1 for r in infos}
            low = min(steps[r] for r in stale)
            culprits = sorted(r for r in stale if steps[r] == low)
            ahead = max(steps.values())
            who = (f"rank {culprits[0]}" if len(culprits) == 1 else
                   f"ranks {', '.join(map(str, culprits))} (cannot tell which)")
            log.error("%s has made no progress for %.0f s (stuck after step %s%s); stopping the job "
                      "(distributed.heartbeat_timeout_s=%s)", who, max(stale[r] for r in culprits), low,
                      f"; other ranks reached step {ahead}" if ahead > low else "", self.timeout)
            logging.shutdown()
            os._exit(EXIT_STALLED)

    def close(self) -> None:
        self._stop.set()
