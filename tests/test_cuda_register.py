"""The "cuda" backend without the compiled extension: a clear ImportError, a clear RuntimeError."""
from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

from cometq import ops

_BUILT = importlib.util.find_spec("cometq._C") is not None


@pytest.mark.skipif(_BUILT, reason="cometq._C is built here")
def test_import_without_extension_raises_clear_import_error():
    sys.modules.pop("cometq._cuda_register", None)
    with pytest.raises(ImportError, match=r"cometq\._C \(the CUDA extension\) is not built.*pip install"):
        importlib.import_module("cometq._cuda_register")
    assert "cometq._cuda_register" not in sys.modules


@pytest.mark.skipif(_BUILT, reason="cometq._C is built here")
def test_cuda_backend_request_names_the_missing_extension():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available for op 'w4ax_gemm'.*not built"):
        ops.resolve_backend("w4ax_gemm", torch.device("cuda"), "cuda")
    # auto never picks an unavailable backend
    assert ops.resolve_backend("w4ax_gemm", torch.device("cpu"), "auto") == "reference"
