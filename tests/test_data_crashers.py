"""Functions that kill the worker process running them, for tests/test_data_robust.py.

Spawned workers import the module of the function they run; this one imports only the
light data_tools.pipeline (no torch), so each fresh worker starts in well under a second.
"""

from __future__ import annotations

import os
from typing import Any

from data_tools import pipeline


def die_on_seven(x: int) -> int:
    if x == 7:
        os._exit(3)  # what a segfault or the OOM killer looks like to the pool
    return x * 10


def prepare_or_die(cfg: pipeline.PrepareConfig, chunk: list[Any]) -> list[pipeline.Prepared]:
    if any(p.key == "die" for p in chunk):
        os._exit(3)
    return pipeline.prepare_chunk(cfg, chunk)
