#!/usr/bin/env bash
# The evidence data of docs/RESULTS.md, from the offline copies in ../shared/data:
#   data/coco_mini/all        239 COCO photos x 5 captions, EfficientNet-Lite0 features
#   data/coco_mini/train      139 of them for training
#   data/coco_mini/heldout    100 held out by image (never trained on): retrieval
#   data/coco_mini/shuffled   the training photos with every caption moved to another photo
#                             (MCSE's shuffled-image control)
#   data/wiki1m_11913         the first 11,913 Wiki1M sentences
#
#   bash bench/prepare_coco_mini.sh [SHARED_DATA_DIR]     (about a minute on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shared=${1:-../shared/data}
bin=.venv/bin
out=data/coco_mini
$bin/webmcse-data shard-pairs "$shared/pairs/coco_mini/captions.jsonl" --out $out/all --shard-size 40 --overwrite
$bin/webmcse-data embed $out/all --encoder efficientnet_lite0
$bin/webmcse-data split $out/all --holdout 100 --seed 0 --train-out $out/train --heldout-out $out/heldout \
  --shard-size 20 --overwrite
$bin/webmcse-data corrupt $out/train --out $out/shuffled --p 1 --kinds swap --seed 0 --shard-size 20 --overwrite
$bin/webmcse-data shard-text "$shared/text/wiki1m_for_simcse.first11913.txt" --out data/wiki1m_11913 \
  --shard-size 1000 --overwrite
