#!/usr/bin/env bash
# bergson 2.5.1 beside `hyperinf index` on the same rows, SmolLM2-135M-Instruct, CPU, one thread.
#
#   bash benchmarks/peer_bergson/run.sh OUT_DIR
#
# bergson's metadata pulls torchvision / torchaudio / bitsandbytes (a CUDA torch), so it is installed
# --no-deps beside this project's .venv (never into it), with the pure-Python packages it imports and
# optree (a compiled wheel torchopt needs):
#   .venv/bin/pip install --target /tmp/bergson-pkgs --no-deps bergson==2.5.1
#   .venv/bin/pip install --target /tmp/bergson-deps --no-deps jaxtyping ml_dtypes natsort petname \
#       simple-parsing torchopt wadler_lindig docstring_parser typing_inspect mypy_extensions optree graphviz
# train.jsonl: 200 short texts on 4 topics (50 each, the topic tagged in the text); query.jsonl: 10 questions.
set -euo pipefail
OUT=${1:?output folder}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY="$ROOT/.venv/bin/python"
MODEL=$("$PY" -c "from hyperinf.app.causal_lm import smollm2_folder; print(smollm2_folder())")
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
cd "$OUT"
B="env PYTHONPATH=/tmp/bergson-pkgs:/tmp/bergson-deps /usr/bin/time -v $PY -m bergson"
$B build bergson/train_idx --model "$MODEL" --precision fp32 --projection_dim 16 --token_batch_size 512 \
    --dataset "$HERE/train.jsonl" --prompt_column text 2> bergson-build.time
$B build bergson/query_idx --model "$MODEL" --precision fp32 --projection_dim 16 \
    --dataset "$HERE/query.jsonl" --prompt_column text 2> bergson-query.time
# every linear layer of the decoder, as bergson attributes; its loss is summed over the tokens; 210 blocks
H="/usr/bin/time -v $ROOT/.venv/bin/hyperinf index"
$H build --model smollm2 --blocks model.layers --train "$HERE/train.jsonl" --format text --loss-reduction sum \
    --dtype float32 --dim 53760 --out ours/index --no-progress 2> ours-build.time
for method in tracin hyperinf; do
    $H query --index ours/index --target "$HERE/query.jsonl" --method "$method" -k 200 --out "ours/$method" \
        2> "ours-query-$method.time"
done
"$PY" "$HERE/compare.py" "$OUT"
