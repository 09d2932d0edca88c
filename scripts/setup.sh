#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the CPU wheel of torch==2.13.0 installed FIRST (any
# other spec, or letting a dependency pull torch, downloads GBs of CUDA wheels), then vlmlab.
#   bash scripts/setup.sh            # the package
#   bash scripts/setup.sh "[dev]"    # plus notebook, test and browser-test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".${extras}"
