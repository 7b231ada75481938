"""Host C++ compiler choice for building ``cometq._C`` (used by ``setup.py``; stdlib only).

Why this exists: a C++ compiler that links its own *static* copy of the C++ runtime into
shared libraries (``-static-libstdc++``, as the ``/opt/gcc`` wrapper on the lent H100 image
does) makes every C++ exception thrown inside ``cometq._C`` -- each ``TORCH_CHECK`` -- crash
the process with SIGSEGV instead of raising: the exception is allocated and thrown by the
library's private runtime but unwound and caught by the ``libstdc++.so`` that torch uses.
Measured on the H100 (2026-11-27, ``bench/diag_toolchain.sh``): 9/9 raw-op error paths
crash with the bindings linked by ``/opt/gcc/bin/g++``, 9/9 raise ``RuntimeError`` with the
same objects linked by ``/usr/bin/g++``.

:func:`choose_host_compiler` probes a compiler by linking a tiny throwing shared library and
reading whether it *defines* the C++ runtime's ``__cxa_allocate_exception``; when the
configured compiler does and another one on the machine does not, the build uses the other.
"""
import os
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional

# a symbol only a (static) copy of the C++ runtime defines; a normal shared library imports it
RUNTIME_SYMBOL = "__cxa_allocate_exception"
FALLBACK_CXX = ("/usr/bin/g++", "/usr/bin/c++", "g++", "c++")

_PROBE_SRC = """
#include <stdexcept>
extern "C" int cometq_probe(int x) {
  try { if (x) throw std::runtime_error("probe"); } catch (const std::exception&) { return 1; }
  return 0;
}
"""


def links_static_cxx_runtime(cxx: str, nm: Optional[str] = None) -> Optional[bool]:
    """Does ``cxx -shared`` put a copy of the C++ runtime into the library?  ``None`` when it
    cannot tell (the compiler or ``nm`` is missing, or the probe does not build)."""
    exe = shutil.which(cxx)
    nm = nm or shutil.which("nm")
    if exe is None or nm is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE_SRC)
        try:
            subprocess.run([exe, "-shared", "-fPIC", "-O1", src, "-o", lib], check=True, capture_output=True,
                           timeout=120)
            out = subprocess.run([nm, "-D", "--defined-only", lib], check=True, capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return any(line.split()[-1] == RUNTIME_SYMBOL for line in out.splitlines() if line.strip())


def _c_compiler_beside(cxx: str) -> Optional[str]:
    """The C driver next to a C++ driver (``/usr/bin/g++`` -> ``/usr/bin/gcc``), if it exists."""
    exe = shutil.which(cxx)
    if exe is None:
        return None
    d, base = os.path.split(exe)
    for a, b in (("g++", "gcc"), ("c++", "cc"), ("clang++", "clang")):
        if base.endswith(a):
            cand = os.path.join(d, base[: -len(a)] + b)
            if os.path.exists(cand):
                return cand
    return None


def choose_host_compiler(env: Optional[Dict[str, str]] = None, candidates=FALLBACK_CXX,
                         probe=links_static_cxx_runtime) -> Dict[str, str]:
    """The ``CC`` / ``CXX`` environment overrides the build should use (empty: keep the
    configured compiler).  ``COMETQ_HOST_CXX`` forces a compiler; ``COMETQ_KEEP_CXX=1`` skips
    the probe.  ``probe(cxx) -> True / False / None`` is injectable for tests."""
    env = dict(os.environ if env is None else env)
    forced = env.get("COMETQ_HOST_CXX")
    if forced:
        if shutil.which(forced) is None:
            raise ValueError(f"COMETQ_HOST_CXX={forced!r} is not an executable on PATH")
        out = {"CXX": forced}
        cc = _c_compiler_beside(forced)
        if cc:
            out["CC"] = cc
        return out
    if env.get("COMETQ_KEEP_CXX", "0") == "1":
        return {}
    current = env.get("CXX") or "c++"
    if probe(current) is not True:
        return {}
    seen: List[str] = [shutil.which(current) or current]
    for cand in candidates:
        exe = shutil.which(cand)
        if exe is None or exe in seen or os.path.realpath(exe) in {os.path.realpath(s) for s in seen}:
            continue
        seen.append(exe)
        if probe(exe) is False:
            out = {"CXX": exe}
            cc = _c_compiler_beside(exe)
            if cc:
                out["CC"] = cc
            return out
    return {}
