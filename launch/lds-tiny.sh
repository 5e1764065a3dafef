#!/usr/bin/env bash
# The whole tiny LDS run on CPU: inputs from PyPI (chitchat-dataset), base pretraining and
# SFT of a 0.43M-parameter Llama-style model, the LoRIF index and scores, then LDS (M x S
# retrainings, cached and resumable under runs/lds-tiny/lds).
# Usage: bash launch/lds-tiny.sh [--section.field VALUE ...]   (overrides go to every stage)
# The retrainings are split over two single-threaded processes (one per core): a model this
# small runs no faster on two threads, and far slower when the cores are shared.
set -euo pipefail
cd "$(dirname "$0")/.."
# The environment launch/setup.sh made, unless PYTHON names another interpreter.
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python}; fi
WORKERS=${LDS_WORKERS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
stamp() { echo "[lds-tiny] $1 after $(( $(date +%s) - start )) s"; }

"$PY" -m lorif_dist.evaluate.tiny --out runs/lds-tiny --threads "$OMP_NUM_THREADS"
stamp "inputs, base and final model ready"
"$PY" -m lorif_dist run --config configs/lds-tiny.yaml "$@"
stamp "index and scores ready"
pids=()
for ((task = 0; task < WORKERS; task++)); do
  "$PY" -m lorif_dist evaluate lds --config configs/lds-tiny.yaml "$@" \
    --run.task_id "$task" --run.num_tasks "$WORKERS" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
stamp "retrainings done"
"$PY" -m lorif_dist evaluate lds --config configs/lds-tiny.yaml "$@"
stamp "LDS done"
