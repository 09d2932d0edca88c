#!/usr/bin/env bash
# The main job: set up, then caption the bundled sample images with the bundled model on CPU,
# print the table and the GPUs, and save a plan picture (vlmlab-demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
vlmlab demo "$@"
