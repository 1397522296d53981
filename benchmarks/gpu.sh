#!/usr/bin/env bash
# Every GPU benchmark of benchmarks/RESULTS.md in one go, sized to finish in under 9 minutes on one H100:
#   0. first, the correctness of the trainer's CUDA-graph path: replayed graphs against the eager static update
#      (the CUDA-only tests of tests/test_static_update.py; skipped on a CPU, and when pytest is not installed)
#   1. training, gpt2.md, batch 8:  ours at the pipeline's defaults (bf16, bucketing), ours fp32, ours in static shapes
#      (eager), ours + CUDA graphs (the trainer's --cuda_graphs on), reference-equivalent, transformers + peft (bf16)
#   2. training, gpt2.md, batch 64: ours defaults, ours + CUDA graphs, transformers + peft bf16 (MFU target)
#   3. decoding, gpt2.md, the whole E2E test set (630 MRs): ours in bf16 (default) and fp32, reference-equivalent
#      mode on 48 lines (projected), with the eos emulation and without
#
# Needs a Python with a CUDA build of torch and the project's `bench` extra (transformers, peft, psutil):
#   pip install -e '.[bench]'   (then PYTHON=python bash benchmarks/gpu.sh)
# Results: benchmarks/out/gpu/*.json and the full log benchmarks/out/gpu/gpu.log.
#
# BENCH_TINY=1 shrinks everything (gpt2.tiny, a few updates, 4 MRs) and runs on BENCH_DEVICE (default cpu):
# a seconds-long check that the script and the benchmarks still work, e.g. on a machine without a GPU. There the
# CUDA-graph rows are skipped, each with its reason in the table; the static-shape row runs the same update eagerly.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${BENCH_OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: >"$LOG"

if [[ "${BENCH_TINY:-0}" == 1 ]]; then
  DEVICE=${BENCH_DEVICE:-cpu}
  SIZE=(--tiny)
  TRAIN8=(--warmup 1 --updates 2)
  TRAIN64=(--batch 16 --warmup 1 --updates 2)
  DECODE=(--tiny)
  LIMITS=(300 300 300)
else
  DEVICE=${BENCH_DEVICE:-cuda}
  SIZE=(--model_card gpt2.md)
  TRAIN8=(--warmup 10 --updates 100 --ref_warmup 2 --ref_updates 10)
  TRAIN64=(--batch 64 --warmup 5 --updates 30)
  DECODE=(--model_card gpt2.md --mrs 0 --reference_lines 48 --stop_after auto,0 --precision bf16,fp32)
  LIMITS=(210 110 200)  # seconds per step, under 9 minutes together at worst; expected ~7 minutes in all
fi

"$PYTHON" - "$DEVICE" <<'EOF'
import sys
import torch
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"error: {device} asked for, but torch {torch.__version__} sees no CUDA device; set PYTHON to a CUDA build "
             "(or BENCH_TINY=1 BENCH_DEVICE=cpu for the smoke test)")
for name in ("transformers", "peft", "tiktoken"):
    try:
        __import__(name)
    except ImportError:
        sys.exit(f"error: {name} is not installed for {sys.executable}; pip install -e '.[bench]'")
print(f"gpu.sh: torch {torch.__version__} on {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}")
EOF

run() {  # run <name> <seconds> <command...>: one benchmark with a time limit, its output in the log, failures counted
  local name=$1 limit=$2
  shift 2
  STEPS=$((STEPS + 1))
  echo "== $name: $*" | tee -a "$LOG"
  if timeout "$limit" "$@" 2>>"$LOG.stderr" | tee -a "$LOG"; then
    echo "== $name: ok" | tee -a "$LOG"
  else
    echo "== $name: FAILED (status ${PIPESTATUS[0]}; see $LOG.stderr)" | tee -a "$LOG"
    FAILED+=("$name")
  fi
}

FAILED=()
STEPS=0
START=$SECONDS
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  run graph_check 120 "$PYTHON" -m pytest tests/test_static_update.py -q -rs -k "replayed or warm_up"
else
  echo "== graph_check: skipped (pytest is not installed for $PYTHON; pip install -e '.[dev]' to run it)" | tee -a "$LOG"
fi
run train_b8 "${LIMITS[0]}" "$PYTHON" benchmarks/bench_train.py --device "$DEVICE" "${SIZE[@]}" "${TRAIN8[@]}" \
  --variants ours,ours_fp32,ours_static,ours_graph,reference,peft_bf16 --out "$OUT/train_b8.json"
run train_b64 "${LIMITS[1]}" "$PYTHON" benchmarks/bench_train.py --device "$DEVICE" "${SIZE[@]}" "${TRAIN64[@]}" \
  --variants ours,ours_graph,peft_bf16 --out "$OUT/train_b64.json"
run decode "${LIMITS[2]}" "$PYTHON" benchmarks/bench_decode.py --device "$DEVICE" "${DECODE[@]}" --out "$OUT/decode.json"

echo "gpu.sh: $((STEPS - ${#FAILED[@]}))/$STEPS steps done in $((SECONDS - START)) s on $DEVICE -> $OUT" \
  "${FAILED[*]:+(FAILED: ${FAILED[*]})}" | tee -a "$LOG"
[[ ${#FAILED[@]} -eq 0 ]]
