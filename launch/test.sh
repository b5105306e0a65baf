#!/usr/bin/env bash
# Set up .venv (or reuse it) and run the test suite. CI runs exactly this (.ci/run).
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
# The Slurm drill (tests/test_slurm.py) needs a real Slurm. Where the suite runs as root with
# apt-get and Slurm is missing (a fresh CI machine), install Debian's slurm-wlm (~10 s after
# apt-get update); anywhere else the drill skips and says why. WEBMCSE_INSTALL_SLURM=0 turns it off.
if [[ ${WEBMCSE_INSTALL_SLURM:-1} == 1 ]] && ! command -v slurmd >/dev/null \
   && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "tests: installing Slurm (slurmctld slurmd slurm-client) for the Slurm drill; WEBMCSE_INSTALL_SLURM=0 skips this"
  slurm_start=$(date +%s)
  if { timeout 300 apt-get update -qq \
       && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client; } >.venv/slurm-install.log 2>&1; then
    echo "tests: Slurm installed in $(( $(date +%s) - slurm_start )) s"
  else
    echo "tests: could not install Slurm (see .venv/slurm-install.log); the Slurm drill will skip"
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
