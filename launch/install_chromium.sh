#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_browser.py, which opens `mlflow ui`
# the way a user does) where it is missing and we can: running as root with apt-get (a fresh CI
# machine; about a minute after apt-get update). Anywhere else it does nothing and the browser
# test skips with its reason. Never fails the caller: a failed install only means that test skips.
# WEBMCSE_INSTALL_CHROMIUM=0 turns it off; the apt output goes to WEBMCSE_CHROMIUM_LOG (default
# .venv/chromium-install.log).
set -uo pipefail

[[ ${WEBMCSE_INSTALL_CHROMIUM:-1} == 1 ]] || exit 0
command -v chromium >/dev/null && exit 0
[[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || exit 0

log=${WEBMCSE_CHROMIUM_LOG:-.venv/chromium-install.log}
[[ $log == */* ]] && mkdir -p "${log%/*}" 2>/dev/null
echo "tests: installing Chromium for the MLflow UI browser test; WEBMCSE_INSTALL_CHROMIUM=0 skips this"
start=$(date +%s)
if { timeout 300 apt-get update -qq \
     && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
          chromium fonts-liberation; } >"$log" 2>&1; then
  echo "tests: Chromium installed in $(( $(date +%s) - start )) s"
else
  echo "tests: could not install Chromium (see $log); the browser test will skip"
fi
exit 0
