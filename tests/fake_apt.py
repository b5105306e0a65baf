"""A PATH for testing the launch/install_*.sh scripts without touching the machine: real
date/timeout/mkdir, a fake `id` that reports a chosen uid, an `apt-get` that records its
arguments and exits with a chosen code, and optionally the program the script looks for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def fake_bin(tmp_path: Path, uid: int, apt_rc: int, present: str | None = None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("date", "timeout", "mkdir"):
        real = shutil.which(tool)
        assert real, tool
        (bin_dir / tool).symlink_to(real)
    scripts = {
        "id": f"#!/bin/sh\necho {uid}\n",
        "apt-get": f'#!/bin/sh\necho "$@" >> "{tmp_path}/apt-calls"\nexit {apt_rc}\n',
    }
    if present:
        scripts[present] = "#!/bin/sh\nexit 0\n"
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(script: Path, tmp_path: Path, bin_dir: Path, log_var: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The script under that PATH only, its install log in tmp_path (named by ``log_var``)."""
    bash = shutil.which("bash")
    assert bash
    full_env = {"PATH": str(bin_dir), log_var: str(tmp_path / "install.log"), **env}
    return subprocess.run([bash, str(script)], cwd=tmp_path, env=full_env, text=True,
                          capture_output=True, timeout=60)


def apt_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "apt-calls"
    return calls.read_text().splitlines() if calls.exists() else []
