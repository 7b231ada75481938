#!/usr/bin/env bash
# Build the CUDA extension here, without a GPU, against the GPU image's torch (2.11.0+cu130):
# the check that catches what would otherwise fail in the first minutes of a lent GPU's
# bench/gpu_check.sh (run 9's extension did not build there).  CI cannot do it: its CPU torch has
# no c10/cuda headers, so tests/test_cuda_compile.py skips the bindings file there.
#
#   scripts/check_gpu_image_build.sh [VENV_DIR]   (default: /tmp/cometq-gpu-image-venv)
#
# Creates VENV_DIR with torch==$COMETQ_IMAGE_TORCH (a CUDA build: ~5 GB with its nvidia-* wheels;
# reused when present) and triton 3.6.0, builds cometq._C for sm_90a (COMETQ_CUDA_ARCHS to change)
# in a clean clone of this checkout's HEAD, then imports it (the library loads on a machine
# without a GPU; its ops register as torch.ops.cometq_C.*).  Needs nvcc (CUDA_HOME or
# /usr/local/cuda).  Exit status: non-zero when anything fails.
# COMETQ_IMAGE_TESTS=1 also runs the CPU test suite under that torch (~25 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/cometq-gpu-image-venv}"
TORCH_PIN="${COMETQ_IMAGE_TORCH:-2.11.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "check_gpu_image_build: no nvcc under CUDA_HOME=$CUDA_HOME" >&2
  exit 2
fi
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
quiet "$VENV/bin/python" -m pip install -q "torch==$TORCH_PIN" "triton==3.6.0" "numpy<2.4" ninja setuptools wheel
quiet "$VENV/bin/python" -m pip install -q -r <(grep -v '^torch==' requirements-ci.txt)
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'torch $TORCH_PIN here is not a CUDA build'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q . "$work/src"
cd "$work/src"
start=$(date +%s)
COMETQ_CUDA_ARCHS="${COMETQ_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$VENV/bin/python" setup.py build_ext --inplace > "$work/build.log" 2>&1 || {
  grep -n "error" "$work/build.log" | head -40 >&2
  echo "check_gpu_image_build: the extension did not build against torch $TORCH_PIN" >&2
  exit 1
}
echo "built cometq._C against torch $TORCH_PIN in $(( $(date +%s) - start )) s"
PYTHONPATH=python:. "$VENV/bin/python" - <<'EOF'
import torch
import cometq._C  # noqa: F401  (loads the library: its ops register)
want = ("quantize_act", "fake_quant_act", "w4ax_gemm", "w16_gemm", "kv4_decode_attention")
missing = [n for n in want if not hasattr(torch.ops.cometq_C, n)]
assert not missing, f"cometq._C registers no {missing}"
for n in want:
    print(getattr(torch.ops.cometq_C, n).default._schema)
print("cometq._C loads and registers", len(want), "ops")
EOF
if [ "${COMETQ_IMAGE_TESTS:-0}" = "1" ]; then
  PYTHONPATH=python:. "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests
fi
