"""Host compiler choice for building ``cometq._C`` (``cometq._toolchain``, used by setup.py).

A compiler that links a static copy of the C++ runtime into the extension makes every
TORCH_CHECK crash (measured on the lent H100 image); the probe must spot such a compiler and
the chooser must swap it for one that links the shared runtime."""
import os
import shutil
import stat
import subprocess

import pytest

from cometq import _toolchain as T

HAVE_GXX = shutil.which("g++") is not None and shutil.which("nm") is not None


def _static_runtime_available() -> bool:
    if not HAVE_GXX:
        return False
    out = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(out) and os.path.exists(out)


def _wrapper(tmp_path, name: str, extra: str) -> str:
    p = tmp_path / name
    p.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} "$@" {extra}\n')
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


@pytest.mark.skipif(not HAVE_GXX, reason="needs g++ and nm")
def test_probe_system_compiler_links_shared_runtime():
    assert T.links_static_cxx_runtime(shutil.which("g++")) is False


@pytest.mark.skipif(not _static_runtime_available(), reason="needs a static libstdc++")
def test_probe_spots_static_runtime_and_chooser_swaps_it(tmp_path):
    bad = _wrapper(tmp_path, "g++", "-static-libstdc++ -static-libgcc")
    assert T.links_static_cxx_runtime(bad) is True
    out = T.choose_host_compiler({"CXX": bad}, candidates=(shutil.which("g++"),))
    assert out["CXX"] == shutil.which("g++")
    assert os.path.basename(out.get("CC", "gcc")).endswith(("gcc", "cc"))


def test_probe_unknown_when_compiler_missing(tmp_path):
    assert T.links_static_cxx_runtime(str(tmp_path / "no-such-g++")) is None
    broken = _wrapper(tmp_path, "broken-g++", "-this-flag-does-not-exist") if HAVE_GXX else None
    if broken:
        assert T.links_static_cxx_runtime(broken) is None


def test_chooser_logic_with_fake_probe(tmp_path):
    good, bad = _wrapper(tmp_path, "good-g++", ""), _wrapper(tmp_path, "bad-g++", "")
    verdict = {bad: True, good: False}
    calls = []

    def probe(cxx):
        calls.append(cxx)
        return verdict.get(cxx)

    # a compiler that links the shared runtime (or one the probe cannot judge) is kept
    assert T.choose_host_compiler({"CXX": good}, candidates=(bad,), probe=probe) == {}
    assert T.choose_host_compiler({"CXX": str(tmp_path / "x")}, candidates=(good,), probe=probe) == {}
    # a static-runtime compiler is swapped for the first candidate that links the shared one
    assert T.choose_host_compiler({"CXX": bad}, candidates=(bad, str(tmp_path / "missing"), good),
                                  probe=probe) == {"CXX": good}
    # ... and kept when no candidate is better (nothing to swap to)
    assert T.choose_host_compiler({"CXX": bad}, candidates=(bad,), probe=probe) == {}
    # opt-out and forcing
    calls.clear()
    assert T.choose_host_compiler({"CXX": bad, "COMETQ_KEEP_CXX": "1"}, candidates=(good,), probe=probe) == {}
    assert calls == []
    assert T.choose_host_compiler({"COMETQ_HOST_CXX": good}, probe=probe)["CXX"] == good
    with pytest.raises(ValueError, match="COMETQ_HOST_CXX"):
        T.choose_host_compiler({"COMETQ_HOST_CXX": str(tmp_path / "nope")}, probe=probe)
