#!/usr/bin/env bash
# Started by launch/slurm.sh through `srun`, once per node: one `accelerate launch` that starts
# this node's ranks and joins the others through a c10d rendezvous on the head node.
#   node.sh CONFIG [key=value ...]      (arguments reach the trainer untouched)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$WEBMCSE_ROOT"

: "${WEBMCSE_HEAD:?set by launch/slurm.sh}" "${WEBMCSE_PORT:?set by launch/slurm.sh}"
: "${WEBMCSE_PROCS_PER_NODE:?set by launch/slurm.sh}"
nnodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
config=$1
shift

launcher=(accelerate launch --num_machines "$nnodes" --machine_rank "$node_rank"
          --num_processes "$((nnodes * WEBMCSE_PROCS_PER_NODE))"
          --main_process_ip "$WEBMCSE_HEAD" --main_process_port "$WEBMCSE_PORT"
          --rdzv_backend c10d)
# The head node hosts the rendezvous store and the others only connect to it. Saying so
# explicitly matters when several Slurm "nodes" share one host (multiple-slurmd mode): each
# would otherwise see a local address and race to bind the port.
if [[ "$node_rank" -eq 0 ]]; then launcher+=(--rdzv_conf is_host=true)
else launcher+=(--rdzv_conf is_host=false); fi
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
  # e.g. configs/accelerate/zero3.yaml (its DeepSpeed launcher is "standard": one launch per node)
  launcher+=(--config_file "$ACCELERATE_CONFIG")
else
  # DDP; DeepSpeed comes from the run config (distributed.zero_stage / deepspeed_config)
  launcher+=(--multi_gpu --mixed_precision no --dynamo_backend no)
fi
echo "node $node_rank/$nnodes on $(hostname): $WEBMCSE_PROCS_PER_NODE process(es), rendezvous $WEBMCSE_HEAD:$WEBMCSE_PORT"
exec "${launcher[@]}" trainer/run.py --config "$config" "$@"
