#!/usr/bin/env bash
# Issue 20's accelerator check, prepared to run in at most 8 minutes on one H100: the anchor FedAvg round
# at 128, 2,048 and 32,768 clients (faxbridge auto, jit+vmap, the hand-written scan of vmap blocks) and
# the big-model transformer round, written to benchmarks/results-gpu.md (and .json). It needs no GPU:
# `--small` runs it at tiny sizes on the CPU (tests/test_benchmarks.py does), `--out FILE` writes elsewhere.
#
# On the device machine (no network; its python3 has jax with CUDA, but not drjax, the transformer's
# third row): carry the drjax wheel, fetched here once into an ignored folder,
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps -d .whl drjax==0.2.1
# and run, with carry [".whl"] and timeout_s 560:
#   bash benchmarks/device_check.sh --out "$OUT/results-gpu.md"
# then copy results-gpu.md (and .json) from the returned files into benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Carried wheels (see above) go to a folder of their own, ahead of the machine's packages.
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/faxbridge-site .whl/*.whl
  export PYTHONPATH="/tmp/faxbridge-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
"$PY" -c "import drjax" 2>/dev/null || echo "warning: drjax is not importable by $PY: the transformer" \
  "round will fail (its row says so); carry its wheel (see the top of this script)" >&2
# The whole check stays inside 8 minutes; each size and the transformer have limits of their own.
exec timeout 470 "$PY" benchmarks/device_check.py "$@"
