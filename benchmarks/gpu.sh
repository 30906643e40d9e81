#!/usr/bin/env bash
# The GPU rows of docs/PERFORMANCE.md, sized for a 15-minute lease of one GPU. Tables go to $OUT
# (default runs/bench-gpu), one file per benchmark, with the device's name in device.txt.
#
#   bash benchmarks/gpu.sh training    # SFT and DPO steps, eager and compiled: at most 5 minutes
#   bash benchmarks/gpu.sh rollouts    # GRPO step, generation at batch 64 and 256, eager and compiled: at most 8.5 minutes
#   bash benchmarks/gpu.sh             # both (over one device call's 10 minutes if every cap is reached)
#
# The GPU machine has torch, transformers and accelerate but not TRL; carry TRL and the embedded
# tokenizer with the working tree (both ignored by git). Prepare them once, here, in the repo root:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   mkdir -p .bench-cache/base-models && cp -r "$(python -c 'from posttrain.models import resolve_model_path as r
#   print(r("posttrain:tiny"))')" .bench-cache/base-models/
#
# `SIZE=tiny bash benchmarks/gpu.sh` runs the same suite on the embedded model: a check of this
# script on a CPU (its caps tripled: compiling takes minutes there).
set -uo pipefail
OUT=${OUT:-runs/bench-gpu}
SIZE=${SIZE:-110m}
GROUPS_TO_RUN=${*:-training rollouts}
mkdir -p "$OUT"
if ! python3 -c 'import trl' 2>/dev/null && [ -d .whl ]; then  # TRL from the carried wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d .bench-cache ] && export POSTTRAIN_CACHE=$PWD/.bench-cache
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
SCALE=1
[ "$SIZE" = tiny ] && SCALE=3

run() {  # run NAME CAP_S COMMAND...: the command's table in $OUT/NAME.md, its stderr in $OUT/NAME.err
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.err" || echo "$name failed or timed out (exit $?)" >> "$OUT/$name.md"
    cat "$OUT/$name.md"
}
STEPS=(--warmup 2 --steps 5)
GENERATION_STEPS=(--warmup 1 --steps 3)  # a step is a whole rollout of 256 tokens
[ "$SIZE" = tiny ] && GENERATION_STEPS=(--warmup 0 --steps 1)  # a CPU decodes batch 256 for ~17 s a rollout
for group in $GROUPS_TO_RUN; do
    case $group in
    training)
        # the 110m rows are 930-1014 tokens, little padding: the padded and padding-free sides are left out
        run sft 150 python3 -m benchmarks.sft_step --size "$SIZE" "${STEPS[@]}" --sides posttrain,posttrain-compiled,trl
        run dpo 150 python3 -m benchmarks.dpo_step --size "$SIZE" "${STEPS[@]}" --sides posttrain,posttrain-compiled,trl ;;
    rollouts)
        run grpo 200 python3 -m benchmarks.grpo_step --size "$SIZE" "${STEPS[@]}"
        run generation64 150 env BENCH_BATCH=64 python3 -m benchmarks.generation --size "$SIZE" "${GENERATION_STEPS[@]}"
        run generation256 150 env BENCH_BATCH=256 python3 -m benchmarks.generation --size "$SIZE" "${GENERATION_STEPS[@]}" ;;
    *) echo "unknown group '$group': expected training or rollouts" >&2; exit 2 ;;
    esac
done
