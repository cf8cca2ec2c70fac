#!/usr/bin/env bash
# The prepared device check (issue 24): bench/device_check.py's sections on a lent GPU, at most 8 minutes.
#   bash bench/device_check.sh [--cpu] [OUT_FOLDER]        (default folder: $OUT, else bench/results/device_check)
# It installs the repo into the Python it finds (no index: the device machine has torch, Lightning and
# torchmetrics; hydra-core, omegaconf and antlr4 travel as wheels in .whl/ where they are missing), prints the
# machine line and writes device_check.json / .md. --cpu: small sizes on the CPU, as CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PYTHON" -c "import fim_lightning, recipes" 2>/dev/null || ! command -v "$(dirname "$PYTHON")/fim-evaluate" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
"$PYTHON" -c "from recipes.common import machine; print('machine:', machine())"
exec timeout 480 "$PYTHON" bench/device_check.py "$@"
