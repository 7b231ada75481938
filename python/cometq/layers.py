"""Elementwise pieces of a Llama-family layer, as fused ops: the references (the HF math).

A decode step of a small batch is a long chain of tiny kernels: Hugging Face's
``LlamaRMSNorm`` is 8 of them (cast, pow, mean, add, rsqrt, mul, cast, mul),
rotate-half RoPE 5 per tensor, ``act_fn(gate) * up`` 2.  Inside a CUDA graph each
still costs a launch slot and a ramp (a few us), ~800 per step on a 32-layer model --
comparable to the GEMM time at batch 1.  The serving runner
(:class:`cometq.serve.runner.ModelRunner`, ``fused_ops``) replaces them with one kernel
each (Triton, ``kernels/layer_ops.py``), like vLLM's ``fused_add_rms_norm`` /
``rotary_embedding`` / ``silu_and_mul`` custom ops:

* ``rms_norm(x, weight, eps)`` -- ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``;
* ``add_rms_norm(x, residual, weight, eps) -> (y, h)`` -- ``h = x + residual`` (in x's
  dtype, what the unfused ``h = h + o`` stores) and ``y = rms_norm(h)``;
* ``rope_qkv(qkv, cos, sin, n_q, n_kv) -> (q, k, v)`` -- a fused q/k/v projection's output
  ``[T, (n_q + 2 n_kv) * D]`` split into heads, rotate-half RoPE on q and k
  (``x * cos + rotate_half(x) * sin`` with ``cos / sin [T, D]``), v copied: three
  contiguous tensors;
* ``silu_mul(x) -> silu(x[:, :I]) * x[:, I:]`` for a fused gate/up output ``[T, 2I]``.

The functions here are the numerical spec (the exact HF / runner formulas, op by op in
the input dtype); the kernels compute in fp32 and round once per stored value, so they
agree within :data:`LAYER_OPS_RTOL` (tests: ``tests/test_layer_ops.py``).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["rms_norm_reference", "add_rms_norm_reference", "rope_qkv_reference", "silu_mul_reference",
           "LAYER_OPS_RTOL", "LAYER_OPS_ATOL"]

#: kernel vs reference: the reference rounds after every op in the input dtype (fp16: 2^-11
#: relative each), the kernel once; a few roundings apart plus fp32 summation order
LAYER_OPS_RTOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}
LAYER_OPS_ATOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` over the last dim of ``x [T, C]``."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * torch.rsqrt(var + eps)).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; ``(rms_norm(h), h)``."""
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int,
                       n_kv: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``qkv [T, (n_q + 2 n_kv) * D]`` into ``q [T, n_q, D]``, ``k, v [T, n_kv, D]`` and
    apply rotate-half RoPE (``cos / sin [T, D]``, the HF ``apply_rotary_pos_emb`` math) to q, k."""
    t = qkv.shape[0]
    d = qkv.shape[1] // (n_q + 2 * n_kv)
    q, k, v = qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1)
    q, k = q.reshape(t, n_q, d), k.reshape(t, n_kv, d)
    c, s = cos[:, None, :], sin[:, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s, v.reshape(t, n_kv, d).contiguous()


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[T, 2I]`` gate/up output (gate first)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
