#!/usr/bin/env bash
# One-shot GPU check: build the CUDA extension, run the GPU tests, run the
# benchmarks that exist, write a JSON summary.  Meant for a GPU machine with the
# source tree copied, torch (CUDA build) preinstalled and no network:
#
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Writes under $OUT (default ./gpu_check_out):
#   build.log                 extension build output
#   pytest-gpu.xml / .log     `pytest -m gpu` JUnit XML and log
#   bench_gemm.json/.log, bench_attention.json/.log   (when the scripts exist; bench_gemm.json is a
#                             folder holding gemm.json / gemm.md; it also runs, Triton only, when the
#                             extension did not build)
#   cuda_timing.json/.log     a few timings of the cometq_C kernels vs fp16 matmul
#   autotune.json/.log        which backend `auto` picked per case, with the timings (cometq.autotune)
#   gpu_check_summary.json    what ran, how long, what passed
# Exit status: non-zero iff the build or the GPU tests failed (benchmarks never
# fail the check).  Whole script sized for ~8 minutes: every step has a time
# limit taken from a global budget (GPU_CHECK_BUDGET_S, default 470 s).
#
# Knobs: COMETQ_CUDA_ARCHS (default: the visible GPU's arch only, e.g. "90a"),
#        MAX_JOBS (default 16), PYTHON (default python), GPU_CHECK_BUDGET_S,
#        PYTEST_ARGS (extra pytest arguments).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
export MAX_JOBS=${MAX_JOBS:-16}
START=$SECONDS

remaining() { echo $((BUDGET - (SECONDS - START))); }
# limit CAP: the smaller of CAP and what is left of the budget (at least 10 s)
limit() { local r; r=$(remaining); [ "$r" -lt "$1" ] && echo $((r > 10 ? r : 10)) || echo "$1"; }
log() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*"; }

# ---------------------------------------------------------------- environment
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if [ -z "${COMETQ_CUDA_ARCHS:-}" ]; then
  CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  case "$CC" in
    90) COMETQ_CUDA_ARCHS="90a" ;;   # wgmma/arch-specific features need the "a" target
    "") COMETQ_CUDA_ARCHS="80;86;89;90a" ;;
    *) COMETQ_CUDA_ARCHS="$CC" ;;
  esac
fi
export COMETQ_CUDA_ARCHS
log "archs=$COMETQ_CUDA_ARCHS MAX_JOBS=$MAX_JOBS budget=${BUDGET}s out=$OUT"
$PY -c "import torch,sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---------------------------------------------------------------- build
log "building the extension"
B0=$SECONDS
BUILD_STATUS=fail
BUILD_HOW=none
if timeout "$(limit 300)" $PY -m pip install --no-deps --no-build-isolation -v -e . > "$OUT/build.log" 2>&1; then
  BUILD_HOW=pip-editable
elif timeout "$(limit 240)" $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
  BUILD_HOW=build_ext-inplace
  export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$BUILD_HOW" != none ] && $PY -c "import cometq._C, cometq._cuda_register" >> "$OUT/build.log" 2>&1; then
  BUILD_STATUS=ok
fi
BUILD_S=$((SECONDS - B0))
log "build: $BUILD_STATUS ($BUILD_HOW, ${BUILD_S}s); tail of build.log:"
tail -5 "$OUT/build.log"
# Without the extension the Triton kernels still run: a Python-only editable install
# (COMETQ_SKIP_CUDA=1, seconds) lets bench_gemm.py time the Triton backend anyway.
PYONLY=no
if [ "$BUILD_STATUS" != ok ]; then
  if $PY -c "import cometq.kernels" >> "$OUT/build.log" 2>&1; then
    PYONLY=yes
  elif COMETQ_SKIP_CUDA=1 timeout "$(limit 60)" $PY -m pip install --no-deps --no-build-isolation -e . \
      >> "$OUT/build.log" 2>&1 && $PY -c "import cometq.kernels" >> "$OUT/build.log" 2>&1; then
    PYONLY=yes
  fi
  log "python-only cometq (Triton benchmarks without the extension): $PYONLY"
fi

# ---------------------------------------------------------------- GPU tests
TEST_STATUS=skipped
TEST_S=0
if [ "$BUILD_STATUS" = ok ]; then
  log "pytest -m gpu"
  T0=$SECONDS
  # keep at least ~100 s for the benchmarks
  TLIM=$(limit $(( $(remaining) > 160 ? $(remaining) - 100 : 60 )))
  # shellcheck disable=SC2086
  timeout "$TLIM" $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
    --durations=15 ${PYTEST_ARGS:-} > "$OUT/pytest-gpu.log" 2>&1
  RC=$?
  TEST_S=$((SECONDS - T0))
  if [ $RC -eq 0 ]; then TEST_STATUS=ok; elif [ $RC -eq 124 ]; then TEST_STATUS=timeout; else TEST_STATUS=fail; fi
  log "tests: $TEST_STATUS (rc=$RC, ${TEST_S}s)"
  tail -15 "$OUT/pytest-gpu.log"
fi

# ---------------------------------------------------------------- benchmarks
BENCH_JSON="{"
sep=""
for name in bench_gemm bench_attention; do
  script="bench/$name.py"
  if [ ! -f "$script" ]; then
    BENCH_JSON="$BENCH_JSON$sep\"$name\": {\"status\": \"absent\"}"
    sep=", "
    continue
  fi
  # bench_gemm.py needs only Triton (the cuda column is added when the extension imports)
  CAN=no
  { [ "$BUILD_STATUS" = ok ] || { [ "$name" = bench_gemm ] && [ "$PYONLY" = yes ]; }; } && CAN=yes
  if [ "$CAN" != yes ] || [ "$(remaining)" -lt 20 ]; then
    BENCH_JSON="$BENCH_JSON$sep\"$name\": {\"status\": \"skipped\"}"
    sep=", "
    continue
  fi
  log "$script --quick"
  T0=$SECONDS
  LIM=$(limit 120)
  EXTRA=""
  # bench_gemm stops starting rows 15 s before its limit and rewrites its JSON after every
  # row, so a short slot still leaves results (decode rows of both shapes first)
  [ "$name" = bench_gemm ] && EXTRA="--time-budget $((LIM > 30 ? LIM - 15 : 15))"
  # shellcheck disable=SC2086
  timeout "$LIM" $PY "$script" --quick $EXTRA --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  RC=$?
  ST=ok
  [ $RC -eq 124 ] && ST=timeout
  [ $RC -ne 0 ] && [ $RC -ne 124 ] && ST=fail
  log "$name: $ST (rc=$RC, $((SECONDS - T0))s)"
  tail -5 "$OUT/$name.log"
  BENCH_JSON="$BENCH_JSON$sep\"$name\": {\"status\": \"$ST\", \"rc\": $RC, \"seconds\": $((SECONDS - T0))}"
  sep=", "
done
BENCH_JSON="$BENCH_JSON}"

# ---------------------------------------------------------------- CUDA kernel timing
# A few timings of the cometq_C kernels next to a torch fp16 matmul (reported,
# never asserted), so the first GPU session has numbers even without bench_gemm.py.
TIMING_STATUS=skipped
if [ "$BUILD_STATUS" = ok ] && [ "$(remaining)" -ge 30 ]; then
  log "CUDA kernel timing"
  OUT="$OUT" timeout "$(limit 90)" $PY - > "$OUT/cuda_timing.log" 2>&1 <<'EOF_T'
import json, os
import torch
from cometq import _cuda_register as C

torch.manual_seed(0)
dev = "cuda"
cc = torch.cuda.get_device_capability()
res = {"device": torch.cuda.get_device_name(0), "capability": list(cc), "unit": "microseconds", "rows": []}

def bench(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / iters

n = k = 4096
nb = k // 128
bits = torch.full((nb,), 4, dtype=torch.int32, device=dev)
bits[: nb // 8] = 8  # 1/8 of the blocks INT8 (COMET reports ~16% or less after calibration)
n8 = int((bits == 8).sum())
n4 = nb - n8
qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
w_scales = torch.rand(n, nb, device=dev) * 0.01
w16 = torch.randn(n, k, device=dev, dtype=torch.float16)
perm = torch.randperm(k, device=dev)
paths = ["s4", "s8"] if cc[0] == 8 else ["s8"]
for m in (1, 16, 64, 256, 1024, 4096):
    q4 = torch.randint(0, 256, (m, n4 * 64), dtype=torch.uint8, device=dev)
    q8 = torch.randint(-127, 128, (m, n8 * 128), dtype=torch.int8, device=dev)
    a_sc = torch.rand(m, nb, device=dev) * 0.01
    x16 = torch.randn(m, k, device=dev, dtype=torch.float16)
    row = {"M": m, "N": n, "K": k, "int8_blocks": n8}
    row["fp16_matmul_us"] = round(bench(lambda: x16 @ w16.T), 2)
    for p in paths:
        row[f"w4ax_{p}_us"] = round(bench(lambda: C.cuda_w4ax_gemm(
            q4, q8, a_sc, bits, qweight, w_scales, 128, None, torch.float16, "block", mma_path=p)), 2)
        row[f"w4ax_{p}_tops"] = round(2 * m * n * k / row[f"w4ax_{p}_us"] / 1e6, 2)
    row["quantize_act_us"] = round(bench(lambda: C.cuda_quantize_act(x16, perm, bits, n8, "block")), 2)
    res["rows"].append(row)
    print(row, flush=True)
with open(os.path.join(os.environ["OUT"], "cuda_timing.json"), "w") as fh:
    json.dump(res, fh, indent=2)
EOF_T
  RC=$?
  TIMING_STATUS=ok
  [ $RC -ne 0 ] && TIMING_STATUS="fail(rc=$RC)"
  log "cuda timing: $TIMING_STATUS"
  tail -8 "$OUT/cuda_timing.log"
fi
BENCH_JSON="${BENCH_JSON%\}}, \"cuda_timing\": {\"status\": \"$TIMING_STATUS\"}}"

# ---------------------------------------------------------------- auto dispatch decisions
# Which backend `auto` measures as faster per case (cometq.autotune), for the
# formats the accuracy work recommends (asym g32) and the fastest one (sym g128).
TUNE_STATUS=skipped
if [ "$BUILD_STATUS" = ok ] && [ "$(remaining)" -ge 30 ]; then
  log "auto dispatch (cometq.autotune)"
  OUT="$OUT" COMETQ_AUTOTUNE_CACHE="$OUT/autotune_cache.json" timeout "$(limit 60)" $PY - > "$OUT/autotune.log" 2>&1 <<'EOF_A'
import json, os
import torch
from cometq import autotune, ops, reference as R
from cometq.layout import ActivationLayout

torch.manual_seed(0)
dev = "cuda"
n, k = 4096, 4096
for sym, g in ((True, 128), (False, 32)):
    w = torch.randn(n, k, device=dev) * k ** -0.5
    qw = R.quantize_weight_rtn(w, g, sym=sym)
    bits = torch.full((k // 128,), 4, dtype=torch.int32, device=dev)
    bits[: k // 128 // 8] = 8
    lay = ActivationLayout(torch.randperm(k, device=dev), bits, 0.9)
    for m in (1, 16, 1024):
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        qa = ops.quantize_activation(x, lay)
        ops.w4ax_gemm_q(qa, qw, out_dtype=torch.float16)
torch.cuda.synchronize()
rep = autotune.report()
with open(os.path.join(os.environ["OUT"], "autotune.json"), "w") as fh:
    json.dump(rep, fh, indent=2, default=str)
print(autotune.format_report())
EOF_A
  RC=$?
  TUNE_STATUS=ok
  [ $RC -ne 0 ] && TUNE_STATUS="fail(rc=$RC)"
  log "autotune: $TUNE_STATUS"
  tail -12 "$OUT/autotune.log"
fi
BENCH_JSON="${BENCH_JSON%\}}, \"autotune\": {\"status\": \"$TUNE_STATUS\"}}"

# ---------------------------------------------------------------- summary
OUT="$OUT" BUILD_STATUS="$BUILD_STATUS" BUILD_HOW="$BUILD_HOW" BUILD_S="$BUILD_S" TEST_STATUS="$TEST_STATUS" \
  TEST_S="$TEST_S" BENCH_JSON="$BENCH_JSON" TOTAL_S="$((SECONDS - START))" $PY - <<'EOF'
import json, os
import xml.etree.ElementTree as ET

out = os.environ["OUT"]
summary = {
    "build": {"status": os.environ["BUILD_STATUS"], "how": os.environ["BUILD_HOW"], "seconds": int(os.environ["BUILD_S"]),
              "archs": os.environ.get("COMETQ_CUDA_ARCHS")},
    "tests": {"status": os.environ["TEST_STATUS"], "seconds": int(os.environ["TEST_S"])},
    "benchmarks": json.loads(os.environ["BENCH_JSON"]),
    "total_seconds": int(os.environ["TOTAL_S"]),
}
try:
    with open(os.path.join(out, "env.txt")) as fh:
        summary["env"] = fh.read().strip()
except OSError:
    pass
xml = os.path.join(out, "pytest-gpu.xml")
if os.path.exists(xml):
    try:
        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = []
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
        summary["tests"].update(counts, failed=failed[:50])
    except ET.ParseError as e:
        summary["tests"]["junit_error"] = str(e)
with open(os.path.join(out, "gpu_check_summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
print(json.dumps(summary, indent=2))
EOF

log "done in $((SECONDS - START))s"
[ "$BUILD_STATUS" = ok ] && [ "$TEST_STATUS" = ok ] && exit 0
exit 1
