#!/usr/bin/env bash
# Install Debian's Slurm for the Slurm drill (tests/test_slurm.py) where it is missing and we can:
# running as root with apt-get (a fresh CI machine; ~10 s after apt-get update). Anywhere else it
# does nothing and the drill skips with its reason. Never fails the caller: a failed install only
# means the drill skips. WEBMCSE_INSTALL_SLURM=0 turns it off; the apt output goes to
# WEBMCSE_SLURM_LOG (default .venv/slurm-install.log).
set -uo pipefail

[[ ${WEBMCSE_INSTALL_SLURM:-1} == 1 ]] || exit 0
command -v slurmd >/dev/null && exit 0
[[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || exit 0

log=${WEBMCSE_SLURM_LOG:-.venv/slurm-install.log}
echo "tests: installing Slurm (slurmctld slurmd slurm-client) for the Slurm drill; WEBMCSE_INSTALL_SLURM=0 skips this"
start=$(date +%s)
if { timeout 300 apt-get update -qq \
     && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends \
          slurmctld slurmd slurm-client; } >"$log" 2>&1; then
  echo "tests: Slurm installed in $(( $(date +%s) - start )) s"
else
  echo "tests: could not install Slurm (see $log); the Slurm drill will skip"
fi
exit 0
