#!/usr/bin/env bash
# Issue 14 on one GPU (H100/H200), in under 8 minutes: compiled kernel tests,
# attention kernels vs cuDNN/XLA, 1B-preset training (pallas/cudnn/xla) and
# greedy decode, merged into ONE JSON file with the targets judged.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT.json]
#
# OUT.json defaults to $OUT/gpu.json (the device tool's $OUT), else ./gpu.json;
# the parts' logs go beside it as gpu_logs.tar.gz. --dry-run: every part on CPU
# with tiny shapes (kernels interpreted), the same JSON keys, in a few minutes.
# Each part runs in its own process under `timeout` (seconds below, override
# with T_KERNELS=... etc.); one that fails or times out is recorded and the
# script goes on. ONLY="attention train_pallas" runs just those parts (a
# rerun inside a short lease; the others are reported "not run"). Python: $PYTHON, else (dry run) the checkout's .venv, else
# python3 (on the device machine: the image's, with its preinstalled jax+CUDA).
# jaxlm is imported from this checkout through a symlink, not pip-installed, so
# no other jax (or anything else) is fetched.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
DEST=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) DEST=$arg ;;
  esac
done
[ -n "$DEST" ] || DEST=${OUT:-.}/gpu.json
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK/path" && ln -sfn "$REPO" "$WORK/path/jaxlm"
export PYTHONPATH="$WORK/path:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  DRYARG=--dry-run
  # generous: a shared 2-core CI box compiles slowly (5 min idle, 10+ loaded)
  T_ENV=${T_ENV:-120} T_KERNELS=${T_KERNELS:-600} T_ATTN=${T_ATTN:-400}
  T_TRAIN=${T_TRAIN:-400} T_DECODE=${T_DECODE:-400}
  # a few kernel tests, interpreted: the plumbing, not the kernels
  KTESTS=(tests/test_kernels_decode.py -k "gqa4_len1 or reads_only or combine")
else
  DRYARG=
  # at most 15 + 90 + 120 + 3 x 55 + 2 x 40 = 470 s (7.8 min), plus the report
  T_ENV=${T_ENV:-15} T_KERNELS=${T_KERNELS:-90} T_ATTN=${T_ATTN:-120}
  T_TRAIN=${T_TRAIN:-55} T_DECODE=${T_DECODE:-40}
  KTESTS=(tests/test_kernels.py tests/test_kernels_decode.py tests/test_kernels_tpu.py)
fi

part() {  # part NAME TIMEOUT CMD...: run CMD time-boxed, log and status into $WORK
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && [ "$name" != env ]; then return; fi
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timeout_s\": $limit}" >"$WORK/$name.status"
  echo "   rc=$rc in $((SECONDS - t0)) s"
  tail -n 3 "$WORK/$name.log" | cut -c1-200
}

START=$SECONDS
part env "$T_ENV" "$PY" benchmarks/gpu_env.py "$WORK/env.json" $DRYARG
# The kernel tests with compiled kernels (JAXLM_KERNELS_COMPILED=1: interpret
# only on CPU); JAX_PLATFORMS empty on the GPU so tests/conftest.py's CPU
# default does not apply.
part kernel_tests "$T_KERNELS" env JAXLM_KERNELS_COMPILED=1 JAX_PLATFORMS="${JAX_PLATFORMS:-}" \
  "$PY" -m pytest "${KTESTS[@]}" -v -p no:cacheprovider -p no:xdist \
  --junitxml="$WORK/kernel_tests.xml" -o junit_family=xunit1
part attention "$T_ATTN" "$PY" benchmarks/attention_gpu.py $DRYARG --iters 10 --out "$WORK/attention.json"
for impl in pallas cudnn xla; do
  part "train_$impl" "$T_TRAIN" "$PY" benchmarks/train_gpu.py --impl "$impl" $DRYARG \
    --out "$WORK/train_$impl.json"
done
for impl in auto pallas; do
  part "decode_$impl" "$T_DECODE" "$PY" benchmarks/decode_gpu.py --impl "$impl" $DRYARG \
    $([ "$DRY" = 1 ] && echo "--batches 1 2" || echo "--batches 1 64") --out "$WORK/decode_$impl.json"
done
echo "== all parts in $((SECONDS - START)) s"
"$PY" benchmarks/gpu_report.py "$WORK" "$DEST"
RC=$?
tar -czf "$(dirname "$DEST")/gpu_logs.tar.gz" -C "$WORK" . 2>/dev/null || true
rm -rf "$WORK"
exit $RC
