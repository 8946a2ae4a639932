#!/usr/bin/env bash
# One GPU check (issue 13 §3): correctness on the GPU, attention speed and memory, a few bf16 training
# steps of the 109M model, all written to ONE results file. Budget: under 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh                       # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --out results.md      # choose the results file
#   benchmarks/gpu_check.sh --dry-run             # the same code paths on the CPU at tiny shapes (CI)
#
# Stages (each under its own time limit; a failing stage is recorded and the next one still runs):
#   1. environment: nvidia-smi, Python / torch / Triton / CUDA versions, date
#   2. pytest -m gpu tests/test_kernels.py tests/test_attention_flex.py   (kernels and flex vs reference)
#   3. benchmarks/bench_attention.py: T = 1K..16K, head dim 64, bf16, 32K tokens per batch, 16 heads;
#      SDPA, FlexAttention and the Triton kernels (softplus, lssa, lssar), forward and forward+backward
#      time, TFLOP/s, peak memory; then the issue-13 targets (lssa <= 1.2x SDPA, lssar <= 1.5x, kernel
#      at least as fast as flex, memory linear in T) and the recommended `auto` order per variant
#   4. benchmarks/bench_pretrain.py: bf16 training steps of model=vafa109m (softmax, lssa, lssar) on the
#      default backend (auto) and with attention.backend=flex
# The exit status is 0 when every stage ran (targets missed are reported, not failures), else 1.
# Dry run: TRITON_INTERPRET=1, unfused FlexAttention (forward only on the CPU), tiny shapes, model=tiny;
# its numbers mean nothing — it only proves the script still works (tests/test_gpu_check.py runs it).
set -uo pipefail

DRY=0
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$ROOT" || exit 1
# the interpreter: $PYTHON, else the checkout's .venv if there is one, else python on PATH
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python; fi
STAMP="$(date -u +%Y%m%dT%H%MZ)"
if [[ -z "$OUT" ]]; then
  OUT="$ROOT/benchmarks/gpu_check-$STAMP$([[ $DRY == 1 ]] && echo -dry).md"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=()

if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1 GRAVPROBE_FLEX_COMPILE=0 CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  T_ENV=300; T_PYTEST=300; T_ATTN=300; T_TRAIN=300; T_FLEX=300   # generous: CI machines may be loaded
  ATTN_ARGS=(--dry-run --seq-lens 32 --impls sdpa kernel flex --variants lssar)
  TRAIN_ARGS=(--models tiny --device cpu --batch 2 --seq-len 16 --seconds 0.1 --rounds 1 --warmup 0
              --variants softmax lssar)
  FLEX_TRAIN=0                  # FlexAttention has no CPU backward: its training stage is GPU-only
else
  T_ENV=30; T_PYTEST=120; T_ATTN=180; T_TRAIN=60; T_FLEX=75   # + 15 for nvidia-smi: 480 s at most
  ATTN_ARGS=(--device cuda --seq-lens 1024 2048 4096 8192 16384 --head-dim 64 --heads 16 --tokens 32768
             --dtype bfloat16 --impls sdpa kernel flex --warmup 3 --repeats 10)
  TRAIN_ARGS=(--models vafa109m --device cuda --batch 8 --seconds 6 --rounds 1 --warmup 2
              --variants softmax lssa lssar)
  FLEX_TRAIN=1
fi

section() { printf '\n## %s\n\n' "$1" >> "$OUT"; }
# run NAME LIMIT CMD...: run with a time limit, output into the results file as a code block
run() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  echo ">>> $name" >&2
  timeout "$limit" "$@" > "$WORK/out.txt" 2>&1
  rc=$?
  { echo '```'; echo "\$ $*"; tail -n 150 "$WORK/out.txt"; echo '```'
    echo "exit status $rc after $((SECONDS - t0)) s (limit $limit s)"; } >> "$OUT"
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name (exit $rc$([[ $rc == 124 ]] && echo ', time limit'))")
  fi
  return 0
}

{
  echo "# GPU check $([[ $DRY == 1 ]] && echo '(DRY RUN on the CPU: numbers meaningless)')"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); host: $(hostname); git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- command: benchmarks/gpu_check.sh $([[ $DRY == 1 ]] && echo --dry-run)"
} > "$OUT"

section "1. Environment"
if [[ $DRY == 0 ]]; then run nvidia-smi 15 nvidia-smi; fi
run versions "$T_ENV" "$PY" -c "import platform, torch, triton; print('python', platform.python_version()); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); \
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"

section "2. Correctness on the GPU (pytest -m gpu)"
run pytest-gpu "$T_PYTEST" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py \
  tests/test_attention_flex.py

section "3. Attention speed and memory (bench_attention.py)"
run bench-attention "$T_ATTN" "$PY" benchmarks/bench_attention.py "${ATTN_ARGS[@]}" --json "$WORK/attention.json"

section "4. Training steps (bench_pretrain.py, bf16 on CUDA)"
run bench-pretrain-auto "$T_TRAIN" "$PY" benchmarks/bench_pretrain.py "${TRAIN_ARGS[@]}" --clock wall
if [[ $FLEX_TRAIN == 1 ]]; then
  run bench-pretrain-flex "$T_FLEX" "$PY" benchmarks/bench_pretrain.py "${TRAIN_ARGS[@]}" --clock wall \
    --override attention.backend=flex
fi

section "Summary"
if [[ ${#FAILED[@]} -eq 0 ]]; then
  echo "every stage ran (targets: see section 3)" >> "$OUT"
  echo "gpu_check: every stage ran; results in $OUT" >&2
  exit 0
fi
printf -- '- FAILED: %s\n' "${FAILED[@]}" >> "$OUT"
echo "gpu_check: failed stages: ${FAILED[*]}; results in $OUT" >&2
exit 1
