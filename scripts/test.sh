#!/usr/bin/env bash
# The whole test suite: set up with the dev extras, make sure Debian's chromium is there for the
# browser test, then unit tests, magics, widgets, the tutorial notebooks (nbval) and the browser
# test in one pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[dev]"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "warning: chromium is missing (apt-get install chromium); the browser test will be skipped" >&2
  fi
fi
. .venv/bin/activate
export MPLBACKEND=Agg PYTHONHASHSEED=0
python -m pytest --nbval-lax -p no:cacheprovider tests notebooks "$@"
