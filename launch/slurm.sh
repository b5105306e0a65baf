#!/usr/bin/env bash
# webmcse on Slurm: `sbatch launch/slurm.sh configs/X.yaml [key=value ...]`
#
# Every #SBATCH default below can be overridden on the sbatch command line, e.g.
#   sbatch --nodes=4 --time=48:00:00 --partition=gpu --account=myproj launch/slurm.sh configs/X.yaml
# One `accelerate launch` runs per node (srun, one task per node) and starts one rank per GPU.
# Preemption and time limits: Slurm sends USR1 five minutes before the end; the ranks agree on a
# step, commit a checkpoint and exit, and the job requeues itself and resumes from it (same data
# position, same MLflow run). A job that ends normally is not requeued. Guide: docs/SLURM.md.
#
#SBATCH --job-name=webmcse
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: sbatch launch/slurm.sh CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
# In a batch job this script runs from Slurm's spool copy: find the checkout from the submit folder.
root=${WEBMCSE_ROOT:-}
if [[ -z "$root" ]]; then
  if [[ -f "${SLURM_SUBMIT_DIR:-.}/launch/env.sh" ]]; then root=${SLURM_SUBMIT_DIR:-.}
  else root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); fi
fi
if [[ ! -f "$root/launch/env.sh" ]]; then
  echo "cannot find the webmcse checkout: submit from its folder (sbatch launch/slurm.sh ...) or set" \
       "WEBMCSE_ROOT" >&2
  exit 2
fi
export WEBMCSE_ROOT=$(cd "$root" && pwd)
source "$WEBMCSE_ROOT/launch/env.sh"
cd "${SLURM_SUBMIT_DIR:-$WEBMCSE_ROOT}"

config=$1
shift
overrides=("$@")
# A requeued job keeps its id, so this run name (and its checkpoints, data position and MLflow
# run) is the same after every restart. An explicit train.run_name=... wins.
if ! printf '%s\n' "${overrides[@]}" | grep -q '^train\.run_name='; then
  overrides+=("train.run_name=${SLURM_JOB_NAME:-webmcse}-${SLURM_JOB_ID:-local}")
fi
# Fail here, with the config's own message, rather than on every node.
resolved=$(python -m trainer.config --config "$config" "${overrides[@]}" --get train.output_dir --get train.run_name) \
  || exit 2
run_dir="$(sed -n 1p <<<"$resolved")/$(sed -n 2p <<<"$resolved")"
mkdir -p "$run_dir"
log_dir="$run_dir/slurm/${SLURM_JOB_ID:-local}.${SLURM_RESTART_COUNT:-0}"
mkdir -p "$log_dir"

gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}  # "gpu:8" -> 8
export WEBMCSE_PROCS_PER_NODE=${WEBMCSE_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# The rendezvous address: the head node's NodeAddr when Slurm knows one (node names need not
# resolve in DNS), else its name.
head_addr=$(scontrol show node "$head_node" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export WEBMCSE_HEAD=${head_addr:-$head_node}
# This script runs on the head node: take a port that is free there now (a fixed port can still
# be held by the previous run of a requeued job).
export WEBMCSE_PORT=${WEBMCSE_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
echo "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES:-1} node(s) x" \
     "$WEBMCSE_PROCS_PER_NODE process(es); run folder $run_dir; logs $log_dir"

# Markers of an earlier run of this job (the trainer also clears them once it starts).
rm -f "$run_dir/STOP" "$run_dir/PREEMPTED"
stop_requested=0
on_signal() {
  stop_requested=1
  echo "$(date +%T) received $1: asking every rank to checkpoint and stop"
  touch "$run_dir/STOP"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output="$log_dir/node%n.log" \
  "$WEBMCSE_ROOT/launch/node.sh" "$config" "${overrides[@]}" &
srun_pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid"
  rc=$?
done
wait "$srun_pid" 2>/dev/null
rc=${rc:-$?}

if [[ -f "$run_dir/PREEMPTED" ]]; then
  echo "$(date +%T) checkpoint committed ($(cat "$run_dir/PREEMPTED")); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if [[ $stop_requested -eq 1 && $rc -ne 0 ]]; then
  echo "stop was requested but no checkpoint was committed (exit $rc); not requeueing" >&2
fi
echo "$(date +%T) training finished with exit code $rc"
exit "$rc"
