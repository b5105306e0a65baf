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
    write_section_to(DOC, name, title, body, command)


def write_section_to(doc: Path, name: str, title: str, body: str, command: str, *,
                     stamp: str | None = None) -> None:
    """Replace (or append) the section `name` of any copy of BENCHMARKS.md.

    `stamp` replaces the "Measured <today> at commit <HEAD> on <this machine>" line: figures
    measured on another machine (a lent GPU) keep the machine, date and commit they were
    measured on. The file is replaced by rename, so an interrupted write leaves it whole.
    """
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER
    if stamp is None:
        stamp = f"Measured {_dt.date.today().isoformat()} at commit {git_rev()} on {machine()}."
    section = (f"<!-- bench:{name} -->\n## {title}\n\n{body.strip()}\n\n"
               f"{stamp}\n"
               f"Command: `{command.strip()}`\n<!-- /bench:{name} -->")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    found = pattern.search(text)
    text = pattern.sub(lambda _: section, text) if found else text.rstrip() + "\n\n" + section + "\n"
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(doc)
