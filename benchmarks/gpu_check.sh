#!/usr/bin/env bash
# One prepared GPU check: everything the project wants measured on a GPU, in one call of under 10 minutes.
#
#   bash benchmarks/gpu_check.sh                      # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu-smoke          # the same steps on tiny shapes on the CPU: checks the script
#
# On a GPU machine without network (a bare PyTorch image that cannot fetch minillm's assets or install it):
#   here:   python benchmarks/offline_bundle.py pack .gpu_check      # ~7 MiB, git-ignored; copy it along
#   there:  bash benchmarks/gpu_check.sh --bundle .gpu_check --tar RESULTS.tar.gz
# The bundle's wheels are installed into a temporary folder, and SmolLM2 (sweep, reproduce) gets random weights
# in its shape: its real weights do not travel (see offline_bundle.py). minillm itself runs from this tree.
#
# Options: --out DIR (default docs/benchmarks/gpu_check, or /tmp/minillm-gpu-check-smoke with --cpu-smoke),
#          --keep-dir DIR (keep the 7B-shape checkpoint there and reuse it on reruns; default: a temporary
#          folder, deleted at the end), --budget SECONDS (default 570), --bundle DIR (above),
#          --tar FILE (also pack OUT into this one .tar.gz at the end: one file to bring back).
#
# Steps, each under its own `timeout` (so that one hang cannot eat the budget) and each logged to OUT/NAME.log;
# a failing step is recorded and the script goes on:
#   1. load_memory  a Llama-2-7B-shape checkpoint with random bf16 weights (benchmarks/bench_load_memory.py writes
#                   it), loaded onto the device: peak device memory against the weights
#   2. model        forward and decode tokens/s, ours against transformers, on that checkpoint, same device, bf16
#                   (benchmarks/bench_model.py): also the device's matmul peak, the decode's matmul floor and the
#                   peak device memory
#   3. ops          ops and host round-trips per decode step, counted on the device, and ms per step
#                   (benchmarks/bench_ops.py)
#   4. sweep        the sweep against the paper's approach on a small grid, both on the device
#                   (benchmarks/bench_sweep.py, SmolLM2-135M)
#   5. reproduce    `minillm reproduce --quick` on the device
#   6. compiled     the compiled decode step (a CUDA graph) against eager: kernels, launches and ms per step
#                   (benchmarks/bench_ops.py --compile)
#   7. packed       a packed decode step (one run at every other k, as sweeps decode) against the same runs'
#                   own steps: launches and ms per step (benchmarks/bench_ops.py --packed)
# Steps 6 and 7 come last, so that they only get what the budget has left.
# Then OUT/summary.md: the device (nvidia-smi), the commit, each step's exit status and time, and the end of
# each log.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="" KEEP="" SMOKE=0 BUDGET=570 BUNDLE="" TAR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --keep-dir) KEEP="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --bundle) BUNDLE="$(cd "$2" && pwd)" || exit 2; shift 2 ;;
        --tar) TAR="$2"; shift 2 ;;
        --cpu-smoke|--dry-run) SMOKE=1; shift ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    OUT="${OUT:-/tmp/minillm-gpu-check-smoke}"
    export OMP_NUM_THREADS=1
    CKPT_ARGS=(--tiny --layers 2)
    MODEL_ARGS=(--dtypes bfloat16 --repeats 1 --threads 1)
    OPS_ARGS=(--kv-heads 8 --dtypes bfloat16 --batches 1 --time-steps 2)
    SWEEP_ARGS=(--limit capitals=2 --layers 15 --kinds random,skip_attention)
    COMPILED_ARGS=(--kinds baseline --kv-heads 8 --dtypes bfloat16 --batches 1 --time-steps 2)
    PACKED_ARGS=(--kinds random --kv-heads 8 --dtypes bfloat16 --batches 1 --time-steps 2)
    # name, seconds: generous on a shared CPU; the GPU budget below is what must fit 10 minutes
    TIMEOUTS=(load_memory=120 model=300 ops=240 sweep=240 reproduce=300 compiled=300 packed=300)
else
    DEVICE=cuda
    OUT="${OUT:-docs/benchmarks/gpu_check}"
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: this torch sees no CUDA device; run with --cpu-smoke to check the script on the CPU" >&2
        exit 2
    fi
    CKPT_ARGS=(--layers 32)
    MODEL_ARGS=(--dtypes bfloat16 --repeats 3 --threads 4)
    OPS_ARGS=(--dtypes bfloat16 --time-steps 16)
    SWEEP_ARGS=(--limit capitals=8,context-qa=2 --layers 0,15)
    COMPILED_ARGS=(--kinds baseline,random --kv-heads 8 --dtypes bfloat16 --batches 8 --time-steps 16)
    PACKED_ARGS=(--kinds random --kv-heads 32 --dtypes bfloat16 --batches 8 --time-steps 8)
    # Each step's timeout is cut to what is left of the 570 s budget. The first four's sum leaves reproduce at
    # least 70 s (it took 72 s in the CPU smoke run), and up to 150 s when they finish early; `compiled` and
    # `packed` run on what is left after it.
    TIMEOUTS=(load_memory=200 model=150 ops=70 sweep=80 reproduce=150 compiled=150 packed=120)
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="${KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/minillm-gpu-check-XXXXXX")}"
STEPS="$OUT/steps.tsv"
printf 'step\texit\tseconds\tcommand\n' > "$STEPS"

# minillm runs from this tree, installed or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ "$COMMIT" != unknown ] && ! git diff --quiet HEAD && COMMIT="$COMMIT (with uncommitted changes)"
SMOLLM2_NOTE=""
if [ -n "$BUNDLE" ]; then
    echo "== bundle $BUNDLE: wheels into $ROOT/site, minillm's cache in $ROOT/cache"
    "$PY" -m pip install --quiet --no-index --no-deps --target "$ROOT/site" "$BUNDLE"/wheels/*.whl || exit 1
    # No network there: transformers must not try the hub either (every model here is a local folder).
    export PYTHONPATH="$ROOT/site:$PYTHONPATH" MINILLM_CACHE="$ROOT/cache" HF_HUB_OFFLINE=1
    "$PY" benchmarks/offline_bundle.py unpack "$BUNDLE" "$MINILLM_CACHE" || exit 1
    [ "$COMMIT" = unknown ] && COMMIT="$(cut -c1-7 "$BUNDLE/commit") (from the bundle)"
    [ -f "$MINILLM_CACHE/models/smollm2-135m/RANDOM_WEIGHTS" ] && SMOLLM2_NOTE="SmolLM2-135M in the sweep and \
reproduce steps has random weights in its shape (its real weights do not travel in the bundle): those steps \
measure speed and whether both sides of the sweep agree, not the model's scores, and answers run longer than \
with SmolLM2's own weights."
fi

timeout_of() {  # the timeout of a step, cut to what is left of the budget
    local want
    for entry in "${TIMEOUTS[@]}"; do [ "${entry%%=*}" = "$1" ] && want="${entry#*=}"; done
    local left=$((BUDGET - SECONDS))
    [ "$SMOKE" = 1 ] && left=$want  # the smoke run checks the script, not the budget
    echo $(( want < left ? want : left ))
}

step() {  # step NAME COMMAND...: run it under its timeout, log it, record exit status and seconds
    local name="$1"; shift
    local limit; limit="$(timeout_of "$name")"
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, the budget is spent"
        printf '%s\tskipped\t0\t%s\n' "$name" "$*" >> "$STEPS"
        return
    fi
    echo "== $name (timeout ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    [ $status = 124 ] && echo "(timed out after $limit s)" >> "$OUT/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$*" >> "$STEPS"
    echo "   exit $status after $((SECONDS - start)) s; log: $OUT/$name.log"
}

# The checkpoint's folder, as bench_load_memory.py names it (written by step 1, read by step 2).
CKPT="$("$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from bench_load_memory import checkpoint_folder, shape
tiny = '--tiny' in sys.argv
print(checkpoint_folder(Path(sys.argv[1]), shape(int(sys.argv[-1]), tiny)))" "$ROOT" "${CKPT_ARGS[@]}")"

step load_memory "$PY" benchmarks/bench_load_memory.py --keep-dir "$ROOT" --runs bfloat16 --device "$DEVICE" \
    "${CKPT_ARGS[@]}"
step model "$PY" benchmarks/bench_model.py --model "$CKPT" --device "$DEVICE" --json "$OUT/model.json" \
    "${MODEL_ARGS[@]}"
step ops "$PY" benchmarks/bench_ops.py --device "$DEVICE" --out "$OUT/ops.md" "${OPS_ARGS[@]}"
step sweep "$PY" benchmarks/bench_sweep.py --device "$DEVICE" --csv "$OUT/sweep.csv" "${SWEEP_ARGS[@]}"
rm -rf "$OUT/reproduce"  # an earlier check's run there would be resumed (and measure nothing) or refused
step reproduce "$PY" -m evals.cli reproduce --quick --device "$DEVICE" --out "$OUT/reproduce"
step compiled "$PY" benchmarks/bench_ops.py --device "$DEVICE" --out "$OUT/compiled.md" --compile "${COMPILED_ARGS[@]}"
step packed "$PY" benchmarks/bench_ops.py --device "$DEVICE" --out "$OUT/packed.md" --packed "${PACKED_ARGS[@]}"

[ -z "$KEEP" ] && rm -rf "$ROOT"

# ----------------------------------------------------------------------------- summary.md
excerpt() {  # the results part of a step's output (its last 30 lines when that part is missing)
    local text=""
    case "$1" in
        model) text="$(sed -n '/^dtype /,$p' "$OUT/model.log")" ;;
        ops|compiled|packed) [ -f "$OUT/$1.md" ] && text="$(grep '^|' "$OUT/$1.md")" ;;
        sweep) text="$(sed -n '/^the whole sweep/,$p' "$OUT/sweep.log")" ;;
    esac
    if [ -n "$text" ]; then echo "$text"; else tail -n 30 "$OUT/$1.log"; fi
}

{
    echo "# GPU check$([ "$SMOKE" = 1 ] && echo ' (CPU smoke run on tiny shapes: checks the script, measures nothing)')"
    echo
    echo "Command: \`bash benchmarks/gpu_check.sh$([ "$SMOKE" = 1 ] && echo ' --cpu-smoke')$([ -n "$BUNDLE" ] && echo ' --bundle ...')\`, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, total $SECONDS s."
    echo
    [ -n "$SMOLLM2_NOTE" ] && { echo "$SMOLLM2_NOTE"; echo; }
    echo "## Device"
    echo
    echo '```'
    if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "no nvidia-smi on this machine"; fi
    "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
import torch
from common import machine_header, parse_device
print(machine_header(parse_device('$DEVICE')))"
    echo '```'
    echo
    echo "## Steps"
    echo
    echo "| step | exit | seconds | command |"
    echo "|---|---:|---:|---|"
    tail -n +2 "$STEPS" | while IFS=$'\t' read -r name status seconds command; do
        echo "| [$name]($name.log) | $status | $seconds | \`$command\` |"
    done
    echo
    echo "Exit 124: the step's timeout; the end of its log still holds what it measured until then."
    for name in load_memory model ops sweep reproduce compiled packed; do
        [ -f "$OUT/$name.log" ] || continue
        echo
        echo "## $name"
        echo
        echo '```'
        excerpt "$name"
        echo '```'
    done
} > "$OUT/summary.md"
echo "summary: $OUT/summary.md"
if [ -n "$TAR" ]; then
    tar -czf "$TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "packed: $TAR"
fi
