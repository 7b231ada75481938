"""Test setup shared by every test file.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must
be set before any @triton.jit module is imported, so it is set here, first.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# GPU runs: take the first GEMM config per shape bucket instead of timing every candidate
os.environ.setdefault("COMETQ_GEMM_TUNE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"


def pytest_runtest_logreport(report):
    """COMETQ_FAIL_LOG=path: append each failure (test id + traceback) to that file the moment
    it is reported, so a run killed at a time limit (the GPU check's stages) still says which
    tests failed and why; a crashed xdist worker is reported here too.  Runs in the xdist
    controller, so one process writes the file."""
    path = os.environ.get("COMETQ_FAIL_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # (workers' reports reach the controller's hook as well)
    text = getattr(report, "longreprtext", "") or str(report.longrepr)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"=== FAILED {report.nodeid} ({report.when})\n{text[-4000:]}\n\n")


def pytest_collection_finish(session):
    """Start the compile jobs of the selected tests that wait on compilers (tests/_background.py):
    each test module with a ``background_start(names)`` gets the names of its selected tests."""
    import _background

    if not _background.enabled() or session.config.option.collectonly:
        return
    selected: dict = {}
    for item in session.items:
        mod = getattr(item, "module", None)
        if mod is not None and callable(getattr(mod, "background_start", None)):
            selected.setdefault(mod, set()).add(getattr(item, "originalname", None) or item.name)
    for mod, names in selected.items():
        mod.background_start(names)


def pytest_sessionfinish(session, exitstatus):
    import _background

    _background.kill_all()
