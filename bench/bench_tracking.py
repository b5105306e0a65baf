"""Time the training loop spends in tracking calls, with the server up and with it down.

The loop only enqueues (the asynchronous MLflow tracker sends in a background thread), so the
time per logging call should be microseconds whether or not the tracking server answers.

    python bench/bench_tracking.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402


def per_call(tracker, calls: int) -> list[float]:
    times = []
    metrics = {f"train/m{i}": float(i) for i in range(12)}  # what one log point sends
    for step in range(calls):
        t0 = time.perf_counter()
        tracker.log_metrics(metrics, step)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from trainer.config import TrackingConfig
    from trainer.tracking import MLflowTracker

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        local = MLflowTracker(TrackingConfig(uri=f"sqlite:///{tmp}/bench.db", experiment="bench",
                                             system_metrics=False), "bench", run_dir=Path(tmp))
        t = per_call(local, args.calls)
        t0 = time.perf_counter()
        local.finish()
        rows.append(("local sqlite store", t, time.perf_counter() - t0))
        down = MLflowTracker(TrackingConfig(uri="http://127.0.0.1:9", experiment="bench", system_metrics=False,
                                            flush_timeout_s=2), "bench", run_dir=Path(tmp))
        t = per_call(down, args.calls)
        t0 = time.perf_counter()
        down.finish()
        rows.append(("server unreachable (spooled)", t, time.perf_counter() - t0))
    table = "| tracking target | median per call (µs) | p99 (µs) | max (ms) | drain at finish (s) |\n"
    table += "| --- | ---: | ---: | ---: | ---: |\n"
    for name, t, drain in rows:
        srt = sorted(t)
        table += (f"| {name} | {statistics.median(t) * 1e6:.1f} | {srt[int(0.99 * len(srt))] * 1e6:.1f} | "
                  f"{max(t) * 1e3:.2f} | {drain:.1f} |\n")
    body = (f"{args.calls} calls of `log_metrics` with 12 metrics each (one training log point) from the loop's "
            f"thread.\n\n{table}\nThe loop pays microseconds per log point; sending happens in the tracker's "
            f"thread. With the server down the calls cost the same, the unsent operations are kept, and "
            f"`finish` gives up after `tracking.flush_timeout_s` (2 s here) and spools them to disk.")
    print(body)
    if not args.no_write:
        write_section("tracking", "Time spent in tracking per step", body,
                      "python bench/bench_tracking.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
