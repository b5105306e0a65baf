#!/usr/bin/env bash
# webmcse-data shard-pairs on many nodes: `sbatch launch/data_slurm.sh INPUT... --out DIR [shard-pairs options]`
#
# A job array: task i runs `webmcse-data shard-pairs INPUT... --out DIR --part i --parts N --resume`
# (N = the array size, or --parts N given explicitly), and the lowest task submits one dependent
# job that runs `webmcse-data merge DIR` once every task has succeeded. Size it on the command line:
#   sbatch --array=0-31 --cpus-per-task=32 --time=12:00:00 --partition=cpu launch/data_slurm.sh \
#          cc12m.parquet --out /data/cc12m --image-col url --caption-col caption
# A part that failed is rerun alone and resumes where it stopped; its task submits the merge again:
#   sbatch --array=7 launch/data_slurm.sh cc12m.parquet --out /data/cc12m ... --parts 32
# Extra sbatch options for the merge job (it holds the dedup state: ~0.2 GB per million rows):
#   export WEBMCSE_MERGE_SBATCH="--mem=64G --partition=bigmem"
# Guide: docs/DATA.md ("Many machines").
#
#SBATCH --job-name=webmcse-data
#SBATCH --array=0-3
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%A_%a.out
set -uo pipefail

if [[ ${1:-} != --merge && -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
  echo "usage: sbatch [--array=0-N-1] launch/data_slurm.sh INPUT... --out DIR [shard-pairs options]" \
       "(this script runs as a Slurm job array)" >&2
  exit 2
fi
# In a batch job this script runs from Slurm's spool copy: find the checkout from the submit folder.
root=${WEBMCSE_ROOT:-}
if [[ -z "$root" ]]; then
  if [[ -f "${SLURM_SUBMIT_DIR:-.}/launch/env.sh" ]]; then root=${SLURM_SUBMIT_DIR:-.}
  else root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); fi
fi
if [[ ! -f "$root/launch/env.sh" ]]; then
  echo "cannot find the webmcse checkout: submit from its folder (sbatch launch/data_slurm.sh ...) or set" \
       "WEBMCSE_ROOT" >&2
  exit 2
fi
export WEBMCSE_ROOT=$(cd "$root" && pwd)
source "$WEBMCSE_ROOT/launch/env.sh"
cd "${SLURM_SUBMIT_DIR:-$WEBMCSE_ROOT}"

if [[ $1 == --merge ]]; then  # the dependent job (submitted below): DIR [--overwrite]
  shift
  echo "job ${SLURM_JOB_ID:-?} on $(hostname): webmcse-data merge $*"
  exec python -m data_tools merge "$@" --no-progress
fi

# Pick out what this script needs from the shard-pairs arguments; pass everything else through.
args=()
out=""
parts=""
workers=""
overwrite=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; args+=("$1" "$2"); shift 2 ;;
    --out=*) out=${1#--out=}; args+=("$1"); shift ;;
    --parts) parts=$2; shift 2 ;;
    --parts=*) parts=${1#--parts=}; shift ;;
    --part|--part=*|--resume) echo "data_slurm.sh sets --part and --resume itself; drop $1" >&2; exit 2 ;;
    --workers|--workers=*) workers=set; args+=("$1"); shift ;;
    --overwrite) overwrite=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -z "$out" ]]; then
  echo "data_slurm.sh: --out DIR is required" >&2
  exit 2
fi
# Arrays are numbered from 0; N is their size unless --parts says otherwise (rerunning one part).
if [[ -z "$parts" && ${SLURM_ARRAY_TASK_MIN:-0} != 0 ]]; then
  echo "data_slurm.sh: number the array from 0 (--array=0-N-1), or pass --parts N when rerunning some parts" >&2
  exit 2
fi
parts=${parts:-$(( ${SLURM_ARRAY_TASK_MAX:-0} + 1 ))}
part=$SLURM_ARRAY_TASK_ID
if (( part >= parts )); then
  echo "array task $part is outside --parts $parts; use --array=0-$(( parts - 1 ))" >&2
  exit 2
fi
[[ -n "$workers" ]] || args+=(--workers "${SLURM_CPUS_PER_TASK:-1}")
[[ $overwrite == 1 ]] || args+=(--resume)  # a requeued or rerun task continues where it stopped

if [[ $part == "${SLURM_ARRAY_TASK_MIN:-0}" ]]; then
  # The merge waits for every task of this array; it is cancelled if one fails (rerun that part:
  # its task submits a new merge). The merge itself is idempotent and takes a lock.
  log_dir=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | head -n1 | cut -d= -f2)
  log_dir=$(dirname "${log_dir:-./x}")
  merge_cmd="exec bash $(printf %q "$WEBMCSE_ROOT/launch/data_slurm.sh") --merge $(printf %q "$out")"
  [[ $overwrite == 1 ]] && merge_cmd+=" --overwrite"
  # shellcheck disable=SC2086 # WEBMCSE_MERGE_SBATCH is a list of options
  merge_id=$(sbatch --parsable --dependency="afterok:${SLURM_ARRAY_JOB_ID}" --kill-on-invalid-dep=yes \
             --job-name="${SLURM_JOB_NAME:-webmcse-data}-merge" --ntasks=1 --cpus-per-task=1 \
             --output="$log_dir/${SLURM_JOB_NAME:-webmcse-data}-merge-%j.out" ${WEBMCSE_MERGE_SBATCH:-} \
             --wrap="$merge_cmd")
  if [[ -n "$merge_id" ]]; then
    echo "merge job ${merge_id%%;*} runs after array job $SLURM_ARRAY_JOB_ID: webmcse-data merge $out"
  else  # the parts are still worth running; the merge can be started by hand
    echo "could not submit the merge job; when every part is done run: webmcse-data merge $out" >&2
  fi
fi
echo "array job ${SLURM_ARRAY_JOB_ID} task $part of $parts on $(hostname): shard-pairs ${args[*]} --part $part --parts $parts"
exec python -m data_tools shard-pairs "${args[@]}" --part "$part" --parts "$parts" --no-progress
