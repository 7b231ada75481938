"""Helpers shared by the cometq Triton kernels (import triton here, never in __init__).

Why the helpers look the way they do:

* ``rint_rne``: ``torch.round`` rounds half to even.  libdevice ``rint`` does the
  same on the GPU, but the Triton interpreter (how CI runs these kernels on CPU)
  has no libdevice.  The classic magic-number trick ``(y + 1.5*2**23) - 1.5*2**23``
  is exact round-half-to-even in IEEE fp32 for ``|y| < 2**22`` and is plain
  arithmetic, so the *same* code runs in the interpreter and on the GPU (LLVM does
  not reassociate ``fadd`` without fast-math flags, which Triton does not set;
  tests/test_triton_aot.py checks the PTX keeps both adds).  Every caller feeds it
  ``|y| <= qmax * (1 + 2 ulp) <= 128``.
* ``unpack_lo``/``unpack_hi``: the INT4 format puts the even K index in the low
  nibble (two's complement).  Written with int8 shifts, the compiled code is
  dominated by byte shuffles: Triton keeps int8 tensors four to a 32-bit register
  and LLVM lowers each int8 shift by extracting the byte (``PRMT``), shifting it
  and inserting it back -- in the SASS of the decode GEMM (``nvdisasm`` of the AOT
  cubin) one 128-channel block iteration is 550-1000 instructions per thread, 190-400
  of them ``PRMT``, for 8 MMAs: issue-bound at ~1 TB/s of weights, about what the H100
  measured.  Compiled for a GPU they therefore run as inline PTX on whole 32-bit words
  (``pack=4``: four bytes per register, every byte lane independent)::

      lo = (w & 0x0F0F0F0F) | ((w & 0x08080808) * 30)     # 0x08 * 30 = 0xF0: sign bits, no carries
      hi = ((w >> 4) & 0x0F0F0F0F) | (((w >> 4) & 0x08080808) * 30)

  about one instruction per value instead of six (checked exhaustively against the
  shift form in tests/test_triton_aot.py).  The interpreter cannot run PTX, so under
  ``TRITON_INTERPRET=1`` the shift form runs (``_ASM_UNPACK``, fixed at import).
"""
from __future__ import annotations

import os
import weakref
from typing import Dict

import torch
import triton
import triton.language as tl

#: 1.5 * 2**23: adding then subtracting it rounds an fp32 to an integer (RNE).
_RNE_MAGIC = 12582912.0


def cometq_autotune():
    """The ``cometq.autotune`` module, imported on first use (the package imports the kernels, so
    not at import time): the kernels' own tuners follow its timing mode and ``frozen()``."""
    import cometq.autotune

    return cometq.autotune


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def rint_rne(y):
    """Round fp32 ``y`` (|y| < 2**22) to the nearest integer, ties to even (== torch.round)."""
    return (y + 12582912.0) - 12582912.0


#: the division's fast path in :func:`quotient_rn` (off in the interpreter, whose ``fma`` rounds twice)
FAST_DIV = tl.constexpr(not interpreting())


@triton.jit
def quotient_rn(x, d, FAST: tl.constexpr):
    """``x / d`` correctly rounded (the bits of ``tl.math.div_rn``) for scales ``d`` broadcast
    over ``x`` (pass them at their own granularity -- a block's, a group's --: the reciprocal is
    computed once per element of ``d``).  Why not ``div_rn`` per value: it compiles to MUFU.RCP, five FFMAs,
    an FCHK and a branch to a slow path per value (~10 SASS instructions with the branch
    bookkeeping: ~150 of the act-quant gather kernel's ~500 per thread at K = 4096), and such
    kernels are issue-bound before they are bandwidth-bound.  FAST: the reciprocal once per block,
    three FFMAs per value -- the sequence of csrc/act_quant.cu's ``quantize4``::

        r0 = 1 / d (IEEE);  r = fma(r0, fma(-d, r0, 1), r0)                 per block
        t = x * r;  quotient = fma(r, fma(-d, t, x), t)                     per value

    correctly rounded whenever no intermediate is subnormal or overflows, which holds for every
    ``|x / d| >= 2^-2`` when all of the row's scales lie in [2^-60, 2^60] (below 2^-2 the quotient
    rounds to 0 whatever its last bit); tests/test_cuda_emulation.py proves the sequence with
    exact rationals (r0 within 1 ulp of 1/d, quotients within 2^-30 of a half-integer).  A row
    with a scale outside that range takes ``div_rn`` for every value (one uniform branch)."""
    if FAST:
        inr = ((d >= 8.673617379884035e-19) & (d <= 1.152921504606847e18)).to(tl.int32)  # 2^-60, 2^60
        if tl.min(tl.reshape(inr, (d.numel,)), axis=0) == 1:
            r0 = tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d)
            r = tl.fma(r0, tl.fma(-d, r0, 1.0), r0)
            t = x * r
            y = tl.fma(r, tl.fma(-d, t, x), t)
        else:
            y = tl.math.div_rn(x, d)
    else:
        y = tl.math.div_rn(x, d)
    return y


#: inline-PTX nibble unpack on whole words (see the module doc); off in the interpreter
_ASM_UNPACK = tl.constexpr(not interpreting())

_ASM_LO = tl.constexpr("""{
.reg .b32 t;
and.b32 t, $1, 0x08080808;
mul.lo.u32 t, t, 30;
and.b32 $0, $1, 0x0F0F0F0F;
or.b32 $0, $0, t;
}""")

_ASM_HI = tl.constexpr("""{
.reg .b32 s, t;
shr.u32 s, $1, 4;
and.b32 t, s, 0x08080808;
mul.lo.u32 t, t, 30;
and.b32 $0, s, 0x0F0F0F0F;
or.b32 $0, $0, t;
}""")


@triton.jit
def unpack_lo(p):
    """uint8 bytes -> int8 value of the low nibble (even K index), sign-extended."""
    if _ASM_UNPACK:
        return tl.inline_asm_elementwise(_ASM_LO, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
    else:
        p8 = p.to(tl.int8, bitcast=True)
        return (p8 << 4) >> 4


@triton.jit
def unpack_hi(p):
    """uint8 bytes -> int8 value of the high nibble (odd K index), sign-extended."""
    if _ASM_UNPACK:
        return tl.inline_asm_elementwise(_ASM_HI, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return p.to(tl.int8, bitcast=True) >> 4


def checks_with_sync() -> bool:
    """Content checks that need a device->host sync (e.g. block_bits vs q8 width) run on
    CPU always and on CUDA only with ``COMETQ_SYNC_CHECKS=1``: at decode a sync costs
    more than the GEMM.  Shape checks are always on."""
    return os.environ.get("COMETQ_SYNC_CHECKS", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


_DUMMIES = {}


def dummy(device, dtype=torch.float32) -> torch.Tensor:
    """A 1-element tensor to stand in for an absent/empty operand (cached: no allocation
    or fill kernel per call).

    Triton's launcher rejects null pointers on some drivers, and empty tensors
    (e.g. ``q8`` of a pure-W4A4 layer) may have one; the kernel never reads it.
    """
    key = (str(torch.device(device)), dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def nonempty(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() > 0 else dummy(t.device, t.dtype)


_DERIVED: Dict[tuple, tuple] = {}


def derived(t: torch.Tensor, tag: str, fn):
    """``fn(t)``, cached per tensor *object* while it is alive and unmodified.

    For small tables computed from a layer's long-lived metadata (the block map):
    a decode step then launches no argsort / cumsum / cast kernels per call (the
    first H100 profile counted ~10 such 1-2 us kernels around each quantize + GEMM
    pair, more GPU time than the GEMM at M=1).  Keyed on ``id``, ``data_ptr``,
    ``_version`` (in-place writes bump it) and device; the weakref check guards
    against a new tensor reusing a dead one's id.
    """
    key = (id(t), t.data_ptr(), t._version, str(t.device), tag)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1]
    val = fn(t)
    if len(_DERIVED) > 4096:
        _DERIVED.clear()
    _DERIVED[key] = (weakref.ref(t), val)
    return val
