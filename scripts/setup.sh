#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with everything the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# lpips' own requirements would pull torchvision and with it a CUDA torch: take the package alone.
.venv/bin/python -m pip install -q --no-deps lpips==0.1.4
