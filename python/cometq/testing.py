"""Shared test helpers: named tolerances and random inputs (never zeros).

Kernels are held to the reference ops: integer parts exactly (``torch.equal``),
float outputs within the tolerances below.  Each constant says why it is what it is.
"""
from __future__ import annotations

import torch

#: fp32 epilogue vs the reference's float64 epilogue: only summation order and
#: one rounding differ, so a few fp32 ulps relative to the output's scale.
GEMM_FP32_RTOL = 1e-5
GEMM_FP32_ATOL = 1e-4
#: fp16/bf16 outputs: one final rounding to the output dtype (2**-11 / 2**-8
#: relative) on top of the fp32 epilogue.
GEMM_FP16_RTOL = 2e-3
GEMM_BF16_RTOL = 1.6e-2
#: KV4 decode attention: softmax and the weighted sum in fp32 over dequantized
#: values that are bit-identical to the reference's, so only summation order.
ATTN_RTOL = 1e-3
ATTN_ATOL = 1e-3


def rand_activation(m: int, k: int, *, outliers: int = 0, dtype=torch.float32, device="cpu", generator=None):
    """Normal activations; ``outliers`` channels scaled by ~50x like real LLM inputs."""
    x = torch.randn(m, k, generator=generator, device=device)
    if outliers:
        idx = torch.randperm(k, generator=generator, device=device)[:outliers]
        x[:, idx] *= 50.0
    return x.to(dtype)


def rand_weight(n: int, k: int, *, dtype=torch.float32, device="cpu", generator=None):
    return (torch.randn(n, k, generator=generator, device=device) * k**-0.5).to(dtype)
