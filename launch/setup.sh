#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv and install webmcse into it.
#
#   bash launch/setup.sh            # dev + sample extras (tests, quickstart)
#   WEBMCSE_EXTRAS=sample bash launch/setup.sh
#   WEBMCSE_TORCH="torch==2.5.1 torchvision==0.20.1" bash launch/setup.sh   # your CUDA build
#
# torch and torchvision are installed in the same pip command as the project: installing
# torch first and the rest later lets pip swap torch for another build underneath you.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
EXTRAS=${WEBMCSE_EXTRAS:-dev,sample}
case "$(uname -m)" in
  aarch64|arm64) default_torch="torch==2.9.1 torchvision==0.24.1" ;;
  *)             default_torch="torch==2.14.1 torchvision==0.29.1" ;;  # matching pair; PyPI's
                                                                     # torchvision needs its own torch
esac
TORCH=${WEBMCSE_TORCH:-$default_torch}

stamp="$(cat pyproject.toml; echo "$TORCH|$EXTRAS|$($PYTHON --version 2>&1)")"
stamp_hash=$(printf '%s' "$stamp" | sha256sum | cut -c1-16)
if [[ -x $VENV/bin/python && -f $VENV/.webmcse-installed ]] \
   && [[ "$(cat $VENV/.webmcse-installed)" == "$stamp_hash" ]]; then
  echo "setup: reusing $VENV (up to date)"
  exit 0
fi

start=$(date +%s)
if [[ ! -x $VENV/bin/python ]]; then
  echo "setup: creating $VENV with $($PYTHON --version 2>&1)"
  $PYTHON -m venv $VENV
fi
echo "setup: installing webmcse[$EXTRAS] with $TORCH (first time: several minutes)"
# shellcheck disable=SC2086
$VENV/bin/python -m pip install --disable-pip-version-check --progress-bar on \
  $TORCH -e ".[$EXTRAS]"
echo "$stamp_hash" > $VENV/.webmcse-installed
echo "setup: done in $(( $(date +%s) - start )) s"
