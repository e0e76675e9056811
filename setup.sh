#!/usr/bin/env bash
# Sets cnnlab up from nothing: a virtual environment in .venv with PyTorch and cnnlab.
#   bash setup.sh        what `cnnlab` needs
#   bash setup.sh test   also the test tools, and Chromium (Debian's package) for the report's browser test
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision are pinned as a pair: mismatched builds fail at import.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    if command -v apt-get >/dev/null 2>&1; then
      $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null \
        || echo "setup.sh: could not install chromium; the report's browser test will be skipped"
    else
      echo "setup.sh: no apt-get; install Chromium yourself or the report's browser test will be skipped"
    fi
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
echo "cnnlab is set up: .venv/bin/cnnlab --help"
