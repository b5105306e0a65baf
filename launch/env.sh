# Site settings sourced by launch/slurm.sh on the batch node and by launch/node.sh on every
# node before the trainer starts. Edit this file (not the scripts) to adapt webmcse to a cluster.

# --- software environment -------------------------------------------------------------------
# The project's virtual environment (created by launch/setup.sh); a site may instead load
# modules or enter a container here, e.g.:
#   module load cuda/12.4 nccl
#   export WEBMCSE_PYTHON_ENV=/shared/envs/webmcse
WEBMCSE_ROOT=${WEBMCSE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
WEBMCSE_PYTHON_ENV=${WEBMCSE_PYTHON_ENV:-$WEBMCSE_ROOT/.venv}
export PATH="$WEBMCSE_PYTHON_ENV/bin:$PATH"

# --- threads --------------------------------------------------------------------------------
# One OpenMP thread per process unless the site knows better: N ranks x default threads
# oversubscribe the cores and slow data loading down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false

# --- NCCL (GPU clusters) --------------------------------------------------------------------
export NCCL_ASYNC_ERROR_HANDLING=1      # a failed collective raises instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# export NCCL_SOCKET_IFNAME=ib0         # the interface between nodes (InfiniBand / fast Ethernet)
# export NCCL_IB_HCA=mlx5               # InfiniBand adapters to use
# export NCCL_DEBUG=WARN                # INFO when diagnosing the network

# --- tracking -------------------------------------------------------------------------------
# A shared MLflow server for the whole cluster (docs/TRACKING.md); without it every job
# writes to sqlite:///mlflow.db in the submit folder.
# export MLFLOW_TRACKING_URI=http://mlflow.internal:5000

# --- no hub access on compute nodes ---------------------------------------------------------
# export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
