#!/usr/bin/env bash
# The whole tiny LDS run on CPU: inputs from PyPI (chitchat-dataset), base pretraining and
# SFT of a 0.43M-parameter Llama-style model, the LoRIF index and scores, then LDS (M x S
# retrainings, cached and resumable under runs/lds-tiny/lds) and tail-patch.
# Usage: bash launch/lds-tiny.sh [--section.field VALUE ...]   (overrides go to every stage)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
start=$(date +%s)
stamp() { echo "[lds-tiny] $1 after $(( $(date +%s) - start )) s"; }

"$PY" -m lorif_dist.evaluate.tiny --out runs/lds-tiny
stamp "inputs, base and final model ready"
"$PY" -m lorif_dist run --config configs/lds-tiny.yaml "$@"
stamp "index and scores ready"
"$PY" -m lorif_dist evaluate lds --config configs/lds-tiny.yaml "$@"
stamp "LDS done"
