#!/usr/bin/env bash
# Set up .venv (or reuse it) and run the test suite. CI runs exactly this (.ci/run).
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
bash launch/install_slurm.sh   # Slurm for the Slurm drill where it is missing and installable
bash launch/install_chromium.sh   # Chromium for the MLflow UI browser test where it is missing and installable
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
