#!/usr/bin/env bash
# Submits the whole pipeline: the extraction array, then curvature once every array task
# succeeded, then query once curvature succeeded (afterok dependencies). A failed job
# cancels the jobs waiting on it (--kill-on-invalid-dep=yes) instead of leaving them
# pending forever. Prints the job ids, one `stage=ID` line each:
#
#   extract=1234
#   curvature=1235
#   query=1236
#
# Settings (environment variables):
#   LORIF_CONFIG           recipe YAML                               (default configs/tiny.yaml)
#   LORIF_INDEX            index directory, --run.index_dir          (default: the recipe's)
#   LORIF_ARGS             extra overrides passed to every stage (split on spaces)
#   LORIF_PYTHON           Python with lorif_dist installed (default .venv/bin/python in
#                          LORIF_WORKDIR if it exists, else python3)
#   LORIF_WORKDIR          directory the jobs run in                 (default: the repository)
#   LORIF_NUM_TASKS        extraction array tasks                     (default 2)
#   LORIF_RANKS            srun ranks per extraction array task       (default 2)
#   LORIF_CURVATURE_RANKS  ranks of the curvature job                 (default LORIF_RANKS)
#   LORIF_QUERY_RANKS      ranks of the query job                     (default LORIF_RANKS)
#   LORIF_LAUNCHER         srun | mpiexec | srun-mpi for curvature and query (default srun)
#   LORIF_LOG_DIR          where the jobs' output files go            (default LORIF_WORKDIR)
#   LORIF_SBATCH_ARGS      sbatch options for all three jobs, e.g. "--account=proj --time=8:00:00"
#   LORIF_EXTRACT_SBATCH, LORIF_CURVATURE_SBATCH, LORIF_QUERY_SBATCH
#                          sbatch options for one job, e.g. for GPUs on the extraction only:
#                          LORIF_EXTRACT_SBATCH="--partition=gpu --gpus-per-task=1"
#                          LORIF_CURVATURE_SBATCH="--partition=cpu"
# The templates' own #SBATCH lines are the defaults; options given here win over them.
#
#   bash slurm/chain.sh
#   LORIF_CONFIG=configs/olmo3-7b-sft.yaml LORIF_INDEX=/scratch/olmo-idx LORIF_NUM_TASKS=16 \
#     LORIF_RANKS=8 LORIF_EXTRACT_SBATCH="--partition=gpu --gpus-per-task=1" bash slurm/chain.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LORIF_WORKDIR=${LORIF_WORKDIR:-$(dirname "$here")}
export LORIF_NUM_TASKS=${LORIF_NUM_TASKS:-2}
ranks=${LORIF_RANKS:-2}
log_dir=${LORIF_LOG_DIR:-$LORIF_WORKDIR}
mkdir -p "$log_dir"
for name in LORIF_NUM_TASKS LORIF_RANKS LORIF_CURVATURE_RANKS LORIF_QUERY_RANKS; do
  value=${!name:-1}
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "$name: expected a number >= 1, got '$value'" >&2; exit 2; }
done
read -r -a common <<<"${LORIF_SBATCH_ARGS:-}"
read -r -a extract_opts <<<"${LORIF_EXTRACT_SBATCH:-}"
read -r -a curvature_opts <<<"${LORIF_CURVATURE_SBATCH:-}"
read -r -a query_opts <<<"${LORIF_QUERY_SBATCH:-}"

submit() {
  # --parsable prints "jobid" (or "jobid;cluster"); keep the id.
  local out
  out=$(sbatch --parsable --chdir="$LORIF_WORKDIR" "$@")
  echo "${out%%;*}"
}

extract=$(submit "${common[@]}" --array="0-$((LORIF_NUM_TASKS - 1))" --ntasks="$ranks" \
  --output="$log_dir/lorif-extract-%A_%a.out" "${extract_opts[@]}" "$here/extract.sbatch")
curvature=$(submit "${common[@]}" --ntasks="${LORIF_CURVATURE_RANKS:-$ranks}" \
  --dependency="afterok:$extract" --kill-on-invalid-dep=yes \
  --output="$log_dir/lorif-curvature-%j.out" "${curvature_opts[@]}" "$here/curvature.sbatch")
query=$(submit "${common[@]}" --ntasks="${LORIF_QUERY_RANKS:-$ranks}" \
  --dependency="afterok:$curvature" --kill-on-invalid-dep=yes \
  --output="$log_dir/lorif-query-%j.out" "${query_opts[@]}" "$here/query.sbatch")

echo "extract=$extract"
echo "curvature=$curvature"
echo "query=$query"
