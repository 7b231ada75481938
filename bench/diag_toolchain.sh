#!/usr/bin/env bash
# Why do C++ exceptions out of cometq._C crash the process (lent H100 image, 2026-11-27)?
# Run after the extension is built (bench/gpu_check.sh's `toolchain` stage):
#
#   W=/some/dir PY=python3 bash bench/diag_toolchain.sh
#
# writes $W/toolchain.txt: the compilers (CC/CXX, /opt/gcc, /usr/bin), torch's build
# config, how the built library links the C++ runtime (ldd; whether it DEFINES __cxa_* /
# _Unwind_* itself, i.e. a static libstdc++/libgcc copy), its .comment section; then
# bench/diag_raw_errors.py against (a) the built library and (b) a library whose bindings
# are recompiled by another C++ compiler (/usr/bin/g++ unless ALT_CXX is set) and linked
# with the same kernel objects.  (b) raising where (a) crashes pins it on the compiler.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
W=${W:-/tmp/diag_toolchain}
mkdir -p "$W/alt"
T="$W/toolchain.txt"
SO=$(ls python/cometq/_C*.so 2>/dev/null | head -1)
{
  echo "== compilers"
  echo "CC=${CC:-} CXX=${CXX:-}"
  for c in "${CXX:-}" /opt/gcc/bin/g++ /usr/bin/g++ g++; do
    [ -n "$c" ] && command -v "$c" >/dev/null && echo "$c: $("$c" --version 2>&1 | head -1)"
  done
  echo "== torch"
  $PY -c "import torch; print(torch.__config__.show())" 2>&1 | head -12
  $PY -c "import torch; print('cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)" 2>&1
  echo "== library $SO"
  [ -n "$SO" ] && {
    ldd "$SO"
    echo "-- C++ runtime symbols DEFINED in the library (non-empty: a static copy)"
    nm -D --defined-only "$SO" 2>/dev/null | grep -E " (__cxa_|_Unwind_|__gxx_personality)" | head -20
    # a toolchain whose crtbegin registers EH frames itself (__register_frame_info: no
    # .eh_frame_hdr lookup) hands the runtime libgcc_s a struct of ITS version -- a known
    # way to crash in libgcc's linear_search_fdes on the first exception (pytorch#117597)
    echo "-- EH frame registration / lookup table"
    nm -D "$SO" 2>/dev/null | grep -E "register_frame" || echo "(no __register_frame_info reference)"
    readelf -S "$SO" 2>/dev/null | grep -E "eh_frame" || echo "(no .eh_frame sections?)"
    echo "-- .comment"
    readelf -p .comment "$SO" 2>/dev/null | tail -n +2
  }
} > "$T" 2>&1

echo "== (a) raw-op errors, built library" >> "$T"
timeout 120 $PY bench/diag_raw_errors.py >> "$T" 2>&1
echo "rc=$?" >> "$T"

ALT_CXX=${ALT_CXX:-/usr/bin/g++}
OBJS=$(ls build/temp*/csrc/*.o 2>/dev/null | grep -v torch_bindings)
if [ -n "$SO" ] && [ -x "$ALT_CXX" ] && [ -n "$OBJS" ]; then
  echo "== (b) bindings compiled by $ALT_CXX ($("$ALT_CXX" --version | head -1))" >> "$T"
  cat > "$W/alt/flags.py" <<'EOF'
import sysconfig
from torch.utils import cpp_extension as ce
try:
    inc = ce.include_paths(device_type="cuda")
except TypeError:  # older torch: include_paths with cuda=True
    inc = ce.include_paths(cuda=True)
print(" ".join("-I" + p for p in inc + [sysconfig.get_paths()["include"], (ce.CUDA_HOME or "/usr/local/cuda") + "/include"]))
EOF
  FLAGS=$($PY "$W/alt/flags.py")
  LIBS=$($PY -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
  if timeout 240 "$ALT_CXX" -O2 -fPIC -std=c++17 -Icsrc $FLAGS -DTORCH_API_INCLUDE_EXTENSION_H \
       -DTORCH_EXTENSION_NAME=_C_alt -c csrc/torch_bindings.cpp -o "$W/alt/torch_bindings.o" >> "$T" 2>&1 &&
     "$ALT_CXX" -shared "$W/alt/torch_bindings.o" $OBJS -L"$LIBS" -L/usr/local/cuda/lib64 -lc10 -ltorch \
       -ltorch_cpu -ltorch_python -lcudart -lc10_cuda -ltorch_cuda -Wl,-rpath,"$LIBS" \
       -o "$W/alt/_C_alt.so" >> "$T" 2>&1; then
    timeout 120 $PY bench/diag_raw_errors.py --library "$W/alt/_C_alt.so" >> "$T" 2>&1
    echo "rc=$?" >> "$T"
  else
    echo "alternative build failed" >> "$T"
  fi
fi
cat "$T"
