"""launch/install_chromium.sh: installs Chromium for the browser test only where it is missing
and installable, and never fails the test command. Run against a fake apt-get/id on a PATH
without Chromium."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .fake_apt import apt_calls, fake_bin, run_script

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "install_chromium.sh"


def _fake_bin(tmp_path: Path, uid: int, apt_rc: int, chromium: bool = False) -> Path:
    return fake_bin(tmp_path, uid, apt_rc, present="chromium" if chromium else None)


def _run(tmp_path: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_script(SCRIPT, tmp_path, bin_dir, "WEBMCSE_CHROMIUM_LOG", **env)


def test_installs_debian_chromium_as_root_when_missing(tmp_path: Path) -> None:
    out = _run(tmp_path, _fake_bin(tmp_path, uid=0, apt_rc=0))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    calls = apt_calls(tmp_path)
    assert calls[0] == "update -qq"
    install = calls[1].split()
    assert install[:2] == ["install", "-y"] and "--no-install-recommends" in install
    assert "chromium" in install
    assert "Chromium installed in" in out.stdout


@pytest.mark.parametrize(("uid", "chromium", "env"), [
    (1000, False, {}),                                 # not root: cannot install
    (0, True, {}),                                     # already installed
    (0, False, {"WEBMCSE_INSTALL_CHROMIUM": "0"}),     # turned off
])
def test_does_nothing_where_it_should_not_install(tmp_path: Path, uid: int, chromium: bool,
                                                  env: dict[str, str]) -> None:
    out = _run(tmp_path, _fake_bin(tmp_path, uid=uid, apt_rc=0, chromium=chromium), **env)
    assert out.returncode == 0, out.stderr
    assert apt_calls(tmp_path) == []
    assert out.stdout == ""


def test_a_failed_install_does_not_fail_the_test_command(tmp_path: Path) -> None:
    out = _run(tmp_path, _fake_bin(tmp_path, uid=0, apt_rc=100))
    assert out.returncode == 0, out.stderr
    assert apt_calls(tmp_path) == ["update -qq"]
    assert "could not install Chromium" in out.stdout and str(tmp_path / "install.log") in out.stdout


def test_the_test_command_calls_it_before_the_tests() -> None:
    lines = (SCRIPT.parent / "test.sh").read_text().splitlines()
    calls = [i for i, line in enumerate(lines) if line.startswith("bash launch/install_chromium.sh")]
    pytest_line = next(i for i, line in enumerate(lines) if "pytest" in line and line.startswith("exec"))
    assert len(calls) == 1 and calls[0] < pytest_line
