"""launch/install_slurm.sh: installs Slurm for the drill only where it is missing and installable,
and never fails the test command. Run against a fake apt-get/id on a PATH without Slurm."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .fake_apt import apt_calls, fake_bin, run_script

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "install_slurm.sh"


def _fake_bin(tmp_path: Path, uid: int, apt_rc: int, slurmd: bool = False) -> Path:
    return fake_bin(tmp_path, uid, apt_rc, present="slurmd" if slurmd else None)


def _run(tmp_path: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_script(SCRIPT, tmp_path, bin_dir, "WEBMCSE_SLURM_LOG", **env)


def test_installs_the_slurm_packages_as_root_when_missing(tmp_path: Path) -> None:
    out = _run(tmp_path, _fake_bin(tmp_path, uid=0, apt_rc=0))
    assert out.returncode == 0, out.stderr
    calls = apt_calls(tmp_path)
    assert calls[0] == "update -qq"
    assert calls[1].split()[-3:] == ["slurmctld", "slurmd", "slurm-client"]
    assert "Slurm installed in" in out.stdout


@pytest.mark.parametrize(("uid", "slurmd", "env"), [
    (1000, False, {}),                                # not root: cannot install
    (0, True, {}),                                    # already installed
    (0, False, {"WEBMCSE_INSTALL_SLURM": "0"}),       # turned off
])
def test_does_nothing_where_it_should_not_install(tmp_path: Path, uid: int, slurmd: bool,
                                                  env: dict[str, str]) -> None:
    out = _run(tmp_path, _fake_bin(tmp_path, uid=uid, apt_rc=0, slurmd=slurmd), **env)
    assert out.returncode == 0, out.stderr
    assert apt_calls(tmp_path) == []
    assert out.stdout == ""


def test_a_failed_install_does_not_fail_the_test_command(tmp_path: Path) -> None:
    out = _run(tmp_path, _fake_bin(tmp_path, uid=0, apt_rc=100))
    assert out.returncode == 0, out.stderr
    assert apt_calls(tmp_path) == ["update -qq"]
    assert "could not install Slurm" in out.stdout and str(tmp_path / "install.log") in out.stdout


def test_the_test_command_calls_it() -> None:
    text = (SCRIPT.parent / "test.sh").read_text()
    assert "bash launch/install_slurm.sh" in text
