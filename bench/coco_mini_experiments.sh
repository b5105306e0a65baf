#!/usr/bin/env bash
# The experiments of docs/RESULTS.md on the 239 shared COCO photos (CPU; see the doc for the
# wall time of each step). Every training run goes through the normal entry point.
#
#   bash bench/prepare_coco_mini.sh                 # data (once)
#   bash bench/coco_mini_experiments.sh curve       # one MCSE run: the STS-B dev / retrieval curve
#   bash bench/coco_mini_experiments.sh noise       # noisy copies of the training photos (p = 0.2, 0.4, 0.6)
#   bash bench/coco_mini_experiments.sh bootstrap [SRC...]  # offline defence: cross-fitted short runs, then score-pairs
#                                                   # (SRC: train, noisy_p04 — both by default)
#   bash bench/coco_mini_experiments.sh sweep       # 11 arms x 3 seeds, one table (runs/sweeps/coco_mini/sweep.md)
#   .venv/bin/python bench/noise_report.py          # tables + plot from the sweep
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bin=.venv/bin
cfg=configs/coco_mini.yaml
launch="$bin/accelerate launch --config_file configs/accelerate/cpu.yaml --num_cpu_threads_per_process $(nproc)"
data=data/coco_mini
# Equal steps for every arm; the model compared is the last step's (no best-on-dev selection).
sweep_common=(train.save_best=false eval.every_steps=0 eval.at_start=false eval.dev_task= eval.retrieval_every=false)
noise_tasks="eval.final_tasks=[stsb_dev],eval.align_uniform=false"
# The two scored halves of a dataset as two caption sources (equal weights: the halves are the same size).
scored() { echo "data.sources.1.path=$data/scored_$1_f0,data.sources.2.kind=pairs,data.sources.2.path=$data/scored_$1_f1"; }

case "${1:-}" in
  curve)
    $launch trainer/run.py --config $cfg train.run_name=coco_mini-curve ;;
  noise)
    for p in 0.2 0.4 0.6; do
      $bin/webmcse-data corrupt $data/train --out $data/noisy_p${p/./} --p $p --seed 0 --shard-size 20 --overwrite
    done
    # The ground-truth filter of the p = 0.4 copy: the bound on what any caption filter can recover.
    $bin/python bench/oracle_filter.py $data/noisy_p04 --out $data/oracle_p04 --shard-size 20 --overwrite ;;
  bootstrap)
    # Cross-fitted: each half of the (noisy) photos trains a short run whose grounding heads score
    # the other half's captions, so no caption is scored by a model that memorised it; the best
    # 60% of each half's captions are kept. Done on the clean data too, to measure the cost.
    srcs=("${@:2}"); [ ${#srcs[@]} -gt 0 ] || srcs=(train noisy_p04)
    for src in "${srcs[@]}"; do
      $bin/webmcse-data split $data/$src --holdout 0.5 --seed 1 --train-out $data/${src}_f0 \
        --heldout-out $data/${src}_f1 --shard-size 20 --overwrite
      for f in 0 1; do
        $launch trainer/run.py --config $cfg "${sweep_common[@]}" train.max_steps=50 eval.final_tasks=[] \
          eval.retrieval_path= eval.align_uniform=false tracking.backend=none data.sources.1.path=$data/${src}_f$f \
          train.run_name=coco_mini-bootstrap-${src}_f$f train.resume=never train.output_dir=runs/bootstrap
      done
      for f in 0 1; do
        other=$(( 1 - f ))
        $bin/webmcse-data score-pairs $data/${src}_f$f --model runs/bootstrap/coco_mini-bootstrap-${src}_f$other/final \
          --out $data/scored_${src}_f$f --top-fraction 0.6 --shard-size 20 --overwrite
      done
    done ;;
  sweep)
    $bin/python -m trainer.sweep --config $cfg --seeds 0,1,2 --name coco_mini \
      --launcher "$launch" "${sweep_common[@]}" \
      --arm mcse \
      --arm simcse:loss.lambda_mm=0 \
      --arm shuffled:data.sources.1.path=$data/shuffled \
      --arm noise20:data.sources.1.path=$data/noisy_p02,$noise_tasks \
      --arm noise40:data.sources.1.path=$data/noisy_p04,$noise_tasks \
      --arm noise60:data.sources.1.path=$data/noisy_p06,$noise_tasks \
      --arm robust0:loss.robust_drop=0.4,loss.robust_warmup_steps=30,$noise_tasks \
      --arm robust40:data.sources.1.path=$data/noisy_p04,loss.robust_drop=0.4,loss.robust_warmup_steps=30,$noise_tasks \
      --arm scored0:$(scored train),$noise_tasks \
      --arm scored40:$(scored noisy_p04),$noise_tasks \
      --arm oracle40:data.sources.1.path=$data/oracle_p04,$noise_tasks \
      --note "configs/coco_mini.yaml, last step of each run, 100 held-out photos." ;;
  *)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
