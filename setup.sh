#!/usr/bin/env bash
# Sets cnnlab up from nothing: a virtual environment in .venv with PyTorch, cnnlab and the test tools.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision are pinned as a pair: mismatched builds fail at import.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
echo "cnnlab is set up: .venv/bin/cnnlab --help"
