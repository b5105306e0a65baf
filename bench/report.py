"""Shared by the benchmarks: machine description and section replacement in BENCHMARKS.md.

Each benchmark owns one section, delimited by HTML comments, and rewrites only that section,
so benchmarks can be re-run independently and the file keeps every figure with its command.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = """# Benchmarks

Every figure below was measured by a script in `bench/`, which rewrote its own section here
with the machine and the exact command. Re-run a script to refresh its section.

All figures so far are from CPU machines: no GPU was available where they were measured, so
NCCL, bf16, ZeRO-3 memory and samples/s/GPU figures are not here yet; docs/SCALING.md holds the
computed memory and traffic per GPU instead.
"""


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{os.cpu_count()} x {cpu}{mem}, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=DOC.parent.parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_section(name: str, title: str, body: str, command: str) -> None:
    """Replace (or append) the section `name` of docs/BENCHMARKS.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else HEADER
    stamp = _dt.date.today().isoformat()
    section = (f"<!-- bench:{name} -->\n## {title}\n\n{body.strip()}\n\n"
               f"Measured {stamp} at commit {git_rev()} on {machine()}.\n"
               f"Command: `{command.strip()}`\n<!-- /bench:{name} -->")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    found = pattern.search(text)
    text = pattern.sub(lambda _: section, text) if found else text.rstrip() + "\n\n" + section + "\n"
    DOC.write_text(text, encoding="utf-8")
