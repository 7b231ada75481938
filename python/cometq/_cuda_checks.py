"""Argument checks of the CUDA extension's raw ops, in Python (no extension needed to import).

``cometq._cuda_register`` runs these before every ``torch.ops.cometq_C`` call.  They mirror
the TORCH_CHECKs of ``csrc/torch_bindings.cpp`` (same conditions, same key phrases in the
messages), raising ValueError / TypeError.
"""
from __future__ import annotations

import torch

from .layout import BLOCK_K
from .reference import check_group_size

#: the device type the raw ops take (a module attribute so the CPU tests can exercise the checks)
DEVICE_TYPE = "cuda"


def _scale_mode(scale_mode) -> str:
    if scale_mode not in ("block", "class"):
        raise ValueError(f"scale_mode must be one of ('block', 'class'), got {scale_mode!r}")
    return scale_mode


# --------------------------------------------------------------------------
# argument checks in Python, before the raw ops
# --------------------------------------------------------------------------
# The raw ops check everything again with TORCH_CHECK, but on the lent H100's image (torch
# 2.11.0+cu130, extension built by its /opt/gcc toolchain) any C++ exception thrown out of
# cometq._C killed the process with SIGSEGV instead of raising (GPU runs 3 and 4,
# 2026-11-27).  So every input the C++ side would reject is rejected here first, with
# ValueError / TypeError naming the argument, its shape and its value.
def _cuda_tensor(name: str, t, device: torch.device, dtypes, ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != DEVICE_TYPE:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device} (shape {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device} (shape {tuple(t.shape)})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype} "
                        f"(shape {tuple(t.shape)})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INT_MAX = 2 ** 31 - 1


def check_quantize_act_inputs(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float) -> None:
    """What ``cometq_C::quantize_act`` checks, as ValueError / TypeError."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dev = x.device
    _cuda_tensor("x", x, dev, _FLOATS)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _cuda_tensor("perm", perm, dev, None, 1)
    _cuda_tensor("block_bits", block_bits, dev, None, 1)
    m, k = x.shape
    if k < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    nb = (k + BLOCK_K - 1) // BLOCK_K
    if perm.shape[0] != k:
        raise ValueError(f"perm shape {tuple(perm.shape)} must be ({k},) for x shape {tuple(x.shape)}")
    if block_bits.shape[0] != nb:
        raise ValueError(f"block_bits shape {tuple(block_bits.shape)} must be ({nb},) for K={k}")
    if not 0 <= int(n_int8) <= nb:
        raise ValueError(f"n_int8={n_int8} out of range [0, {nb}]")
    _scale_mode(scale_mode)
    if not 0.0 < float(int4_clip) <= 1.0:  # (also rejects NaN)
        raise ValueError(f"int4_clip must be in (0, 1], got int4_clip={float(int4_clip):g}")
    if m > _INT_MAX or k > _INT_MAX:
        raise ValueError(f"x shape {tuple(x.shape)} too large")


def check_w4ax_gemm_inputs(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias,
                           out_dtype, scale_mode: str, split_k: int) -> None:
    """What ``cometq_C::w4ax_gemm`` checks, as ValueError / TypeError."""
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"qweight must be a torch.Tensor, got {type(qweight).__name__}")
    dev = qweight.device
    _cuda_tensor("qweight", qweight, dev, (torch.uint8,))
    _cuda_tensor("q4", q4, dev, (torch.uint8,), 2)
    _cuda_tensor("q8", q8, dev, (torch.int8,), 2)
    _cuda_tensor("a_scales", a_scales, dev, (torch.float32,), 2)
    _cuda_tensor("block_bits", block_bits, dev, None, 1)
    _cuda_tensor("w_scales", w_scales, dev, (torch.float32,), 2)
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    nb = block_bits.shape[0]
    if nb < 1:
        raise ValueError(f"block_bits must be 1-D and non-empty, got shape {tuple(block_bits.shape)}")
    half = BLOCK_K // 2
    if qweight.dim() == 3:
        n = qweight.shape[0]
        if qweight.shape[2] != half or qweight.stride() != (half, n * half, 1):
            raise ValueError(f"qweight must be 2-D [N, K_pad/2] or the block-major view [N, NB, {half}] with "
                             f"strides ({half}, N*{half}, 1), got shape {tuple(qweight.shape)} strides "
                             f"{qweight.stride()}")
        w_k_pad = qweight.shape[1] * BLOCK_K
    elif qweight.dim() == 2:
        w_k_pad = qweight.shape[1] * 2
    else:
        raise ValueError(f"qweight must be 2-D [N, K_pad/2] or the block-major view [N, NB, {half}], "
                         f"got shape {tuple(qweight.shape)}")
    k_pad = nb * BLOCK_K
    if w_k_pad != k_pad:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} holds K_pad={w_k_pad} but block_bits has {nb} "
                         f"blocks (K_pad={k_pad})")
    m, n = a_scales.shape[0], qweight.shape[0]
    if q4.shape[0] != m or q8.shape[0] != m:
        raise ValueError(f"q4 {tuple(q4.shape)}, q8 {tuple(q8.shape)} and a_scales {tuple(a_scales.shape)} must "
                         "have the same number of rows M")
    if q4.shape[1] % half or q8.shape[1] % BLOCK_K:
        raise ValueError(f"q4 shape {tuple(q4.shape)} / q8 shape {tuple(q8.shape)} are not whole {half}-byte INT4 "
                         f"/ {BLOCK_K}-byte INT8 blocks")
    if q4.shape[1] // half + q8.shape[1] // BLOCK_K != nb:
        raise ValueError(f"q4 {tuple(q4.shape)} + q8 {tuple(q8.shape)} do not cover the {nb} blocks of "
                         f"K_pad={k_pad}")
    ns = nb if _scale_mode(scale_mode) == "block" else 2
    if a_scales.shape[1] != ns:
        raise ValueError(f"a_scales shape {tuple(a_scales.shape)} needs {ns} columns in {scale_mode} mode")
    g = check_group_size(group_size, k_pad)  # the format's rule (the kernel's TORCH_CHECK is the same)
    if tuple(w_scales.shape) != (n, k_pad // g):
        raise ValueError(f"w_scales shape {tuple(w_scales.shape)} != ({n}, {k_pad // g}) for "
                         f"group_size={group_size}")
    if w_offsets is not None:
        _cuda_tensor("w_offsets", w_offsets, dev, (torch.float32,))
        if tuple(w_offsets.shape) != (n, k_pad // g):
            raise ValueError(f"w_offsets shape {list(w_offsets.shape)} != w_scales shape ({n}, {k_pad // g}) "
                             f"for group_size={group_size}")
    if bias is not None:
        _cuda_tensor("bias", bias, dev, _FLOATS)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({n},)")
    if int(split_k) < 0:
        raise ValueError(f"split_k must be >= 0 (0 = auto), got {split_k}")
    if m > _INT_MAX or n > _INT_MAX or nb > (1 << 20):
        raise ValueError(f"problem too large (M={m}, N={n}, blocks={nb})")


