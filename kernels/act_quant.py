"""Fused FMPQ activation quantization: permute + absmax + INT4/INT8 quantize + pack, one kernel.

Output layout (owned by :mod:`cometq.layout`, produced bit-identically to
:func:`cometq.reference.quantize_activation`)::

    x [M, K] (fp16/bf16/fp32, original channel order)
        gather by perm, zero-pad to K_pad, cut 128-channel blocks b = 0..NB-1
    block b INT8 -> q8[m, slot[b]*128 : +128]  int8, value order = K order
    block b INT4 -> q4[m, slot[b]*64  : +64 ]  uint8, byte j = (q[2j] & 0xF) | (q[2j+1] << 4)
    scales: "block" mode [M, NB] (absmax_b / qmax_b), "class" mode [M, 2] (col 0 INT4, col 1 INT8)

INT4 clip (``ActivationLayout.int4_clip``, a runtime fp32 argument so one
compiled kernel serves every layer): INT4 blocks use ``(absmax * clip) / 7``
(block mode) and the INT4 class ``(amax4 * clip) / 7`` (class mode): one fp32
multiply, then the IEEE division, exactly the reference's op order (a
pre-divided ``clip / 7`` would round differently).  ``clip == 1`` multiplies
by one, which is exact, so the unclipped results are bit-identical.  Values
beyond the clipped range saturate at +-7 in the existing clamp.  INT8 blocks
are never clipped.

How a program works: it owns ``BLOCK_M`` tokens and one block (block mode) or
all blocks of the row (class mode).  It reads the block's 128 channels as two
``[BLOCK_M, 64]`` halves: the even and the odd permuted channels.  Those halves
are exactly the low and high nibbles of the 64 packed INT4 bytes, so packing is
``lo | hi << 4`` with no shuffle; for an INT8 block the halves are joined back
into K order in registers and stored as one contiguous 128-byte row.  The gather by ``perm`` costs nothing extra because the halves are
strided anyway.

Class mode needs the absmax of *all* INT4 blocks (and all INT8 blocks) of a token
before quantizing any of them, so a class-mode program walks the row twice:
pass 1 reduces the class absmaxes (reading x), pass 2 quantizes (reading x
again, from L2 for any realistic row: 8 KiB fp16 per token for K=4096).  Block
mode is a single pass with one program per (token tile, block), so decode
(M=1) still spreads over NB programs.

Numerics match the reference exactly: fp32 math, IEEE division (``div_rn``,
not the approximate ``div.full``), round-half-to-even, clamp to +-qmax, a block
with absmax 0 divides by 1.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from cometq.layout import BLOCK_K, INT4_QMAX, INT8_QMAX, SCALE_MODES, ActivationLayout, check_tensor, padded_k

from ._common import (FAST_DIV, checks_with_sync, derived, dummy, interpreting, next_pow2, nonempty, quotient_rn,
                      rint_rne, unpack_hi, unpack_lo)

__all__ = ["quantize_act_triton", "fake_quant_act_triton", "quantize_activation_triton", "act_quant_kernel",
           "act_quant_gather_kernel", "split_rows_triton", "split_rows_kernel"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)

# The kernel spells qmax as the literals 7.0 / 127.0 (module globals are not
# visible to @triton.jit code unless constexpr); refuse to load if the format changed.
if (INT4_QMAX, INT8_QMAX) != (7, 127):  # pragma: no cover
    raise ImportError(f"act_quant kernel hard-codes qmax 7/127 but the format says {INT4_QMAX}/{INT8_QMAX}")


@triton.jit
def _load_halves(x_ptr, perm_ptr, rm, m_mask, b, K, stride_xm, stride_xk, IDENTITY: tl.constexpr):
    """Even and odd permuted channels of block ``b`` as fp32 ``[BLOCK_M, 64]``; padding reads 0."""
    rows = x_ptr + rm[:, None] * stride_xm
    if IDENTITY:
        # no gather: one contiguous (vectorized) row load, split into even/odd in registers
        k = b * 128 + tl.arange(0, 128)
        x = tl.load(rows + k[None, :] * stride_xk, mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        xe, xo = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], 64, 2)))
    else:
        j = tl.arange(0, 64)
        ke = b * 128 + 2 * j  # permuted (padded) channel index of the low nibbles
        ko = ke + 1
        me = ke < K
        mo = ko < K
        ce = tl.load(perm_ptr + ke, mask=me, other=0)
        co = tl.load(perm_ptr + ko, mask=mo, other=0)
        xe = tl.load(rows + ce[None, :] * stride_xk, mask=m_mask[:, None] & me[None, :], other=0.0).to(tl.float32)
        xo = tl.load(rows + co[None, :] * stride_xk, mask=m_mask[:, None] & mo[None, :], other=0.0).to(tl.float32)
    return xe, xo


@triton.jit
def _quantize_store(xe, xo, s, qmax, is8, slot, rm, m_mask, q4_ptr, q8_ptr, stride_q4m, stride_q8m,
                    b, out_ptr, stride_om, FAKE: tl.constexpr):
    """Quantize one block with per-row scale ``s`` [BLOCK_M] and write it to q4 or q8 -- or, FAKE,
    write ``q * s`` (16-bit) to block ``b`` of ``out`` in the dequant path's half-split K order."""
    d = tl.where(s == 0.0, 1.0, s)[:, None]
    qe = rint_rne(tl.math.div_rn(xe, d))
    qo = rint_rne(tl.math.div_rn(xo, d))
    qe = tl.minimum(tl.maximum(qe, -qmax), qmax).to(tl.int32)
    qo = tl.minimum(tl.maximum(qo, -qmax), qmax).to(tl.int32)
    j = tl.arange(0, 64)
    if FAKE:
        # what dequant_act_kernel makes of the packed block (int -> fp32, times the fp32 scale,
        # rounded once to the 16-bit type): the same bits, without the packed round trip through
        # memory (the large-M dequant path: kernels/dequant_gemm.py, w4ax_linear_dequant)
        dst = out_ptr + rm.to(tl.int64)[:, None] * stride_om + b * 128 + j[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(dst, (qe.to(tl.float32) * s[:, None]).to(ty), mask=m_mask[:, None])
        tl.store(dst + 64, (qo.to(tl.float32) * s[:, None]).to(ty), mask=m_mask[:, None])
    elif is8:
        # back to K order in registers (join -> [BM, 64, 2] -> [BM, 128]: each thread
        # holds both values of a pair), then one contiguous 128-byte row store
        q = tl.reshape(tl.join(qe.to(tl.int8), qo.to(tl.int8)), (qe.shape[0], 128))
        k = tl.arange(0, 128)
        tl.store(q8_ptr + rm[:, None] * stride_q8m + slot * 128 + k[None, :], q, mask=m_mask[:, None])
    else:
        byte = (qe & 0xF) | ((qo & 0xF) << 4)
        tl.store(q4_ptr + rm[:, None] * stride_q4m + slot * 64 + j[None, :], byte.to(tl.uint8), mask=m_mask[:, None])


@triton.jit
def act_quant_kernel(
    x_ptr, perm_ptr, bits_ptr, slot_ptr, q4_ptr, q8_ptr, s_ptr,
    M, K, NB, int4_clip,
    stride_xm, stride_xk, stride_q4m, stride_q8m, stride_sm,
    out_ptr, stride_om,
    BLOCK_M: tl.constexpr,
    CLASS_MODE: tl.constexpr,
    IDENTITY: tl.constexpr,
    FAKE: tl.constexpr = False,
    ROWS: tl.constexpr = False,
):
    """Permute + quantize + pack (module doc); FAKE: the dequantized values instead (``out``
    ``[M, K_pad]`` 16-bit, half-split K order, no q4 / q8 / scales written).  ROWS (block mode):
    a program walks every block of its rows instead of owning one block (see ``ROWS_MIN_M``)."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    if CLASS_MODE:
        # pass 1: class absmax over every block of the row
        a4 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        a8 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for b in range(0, NB):
            xe, xo = _load_halves(x_ptr, perm_ptr, rm, m_mask, b, K, stride_xm, stride_xk, IDENTITY)
            am = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
            is8 = tl.load(bits_ptr + b) == 8
            a8 = tl.where(is8, tl.maximum(a8, am), a8)
            a4 = tl.where(is8, a4, tl.maximum(a4, am))
        # clip first (fp32 multiply), then the IEEE division: the reference's op order
        s4 = tl.math.div_rn(a4 * int4_clip, 7.0)
        s8 = tl.math.div_rn(a8, 127.0)
        if not FAKE:
            tl.store(s_ptr + rm * stride_sm, s4, mask=m_mask)
            tl.store(s_ptr + rm * stride_sm + 1, s8, mask=m_mask)
        # pass 2: quantize every block with its class scale (x comes from L2)
        for b in range(0, NB):
            xe, xo = _load_halves(x_ptr, perm_ptr, rm, m_mask, b, K, stride_xm, stride_xk, IDENTITY)
            is8 = tl.load(bits_ptr + b) == 8
            slot = tl.load(slot_ptr + b)
            s = tl.where(is8, s8, s4)
            qmax = tl.where(is8, 127.0, 7.0)
            _quantize_store(xe, xo, s, qmax, is8, slot, rm, m_mask, q4_ptr, q8_ptr, stride_q4m, stride_q8m,
                            b, out_ptr, stride_om, FAKE)
    elif ROWS:
        # block mode, every block of the program's rows: the permuted gathers of a row come back to
        # the same SM, whose L1 serves the 32-byte sectors the row's other blocks touch again (one
        # program per (rows, block) fetches a sector per channel: up to 16x the row's bytes)
        for b in range(0, NB):
            _block_mode_block(x_ptr, perm_ptr, bits_ptr, slot_ptr, q4_ptr, q8_ptr, s_ptr, K, int4_clip, stride_xm,
                              stride_xk, stride_q4m, stride_q8m, stride_sm, out_ptr, stride_om, rm, m_mask, b,
                              IDENTITY, FAKE)
    else:
        _block_mode_block(x_ptr, perm_ptr, bits_ptr, slot_ptr, q4_ptr, q8_ptr, s_ptr, K, int4_clip, stride_xm,
                          stride_xk, stride_q4m, stride_q8m, stride_sm, out_ptr, stride_om, rm, m_mask,
                          tl.program_id(1), IDENTITY, FAKE)


@triton.jit
def _block_mode_block(x_ptr, perm_ptr, bits_ptr, slot_ptr, q4_ptr, q8_ptr, s_ptr, K, int4_clip, stride_xm,
                      stride_xk, stride_q4m, stride_q8m, stride_sm, out_ptr, stride_om, rm, m_mask, b,
                      IDENTITY: tl.constexpr, FAKE: tl.constexpr):
    """Block mode, block ``b`` of rows ``rm``: its own absmax scale, quantize, store."""
    xe, xo = _load_halves(x_ptr, perm_ptr, rm, m_mask, b, K, stride_xm, stride_xk, IDENTITY)
    am = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
    is8 = tl.load(bits_ptr + b) == 8
    slot = tl.load(slot_ptr + b)
    qmax = tl.where(is8, 127.0, 7.0)
    # INT4 blocks: (absmax * clip) / 7; INT8 blocks keep their absmax (they hold the outliers)
    s = tl.math.div_rn(tl.where(is8, am, am * int4_clip), qmax)
    if not FAKE:
        tl.store(s_ptr + rm * stride_sm + b, s, mask=m_mask)
    _quantize_store(xe, xo, s, qmax, is8, slot, rm, m_mask, q4_ptr, q8_ptr, stride_q4m, stride_q8m,
                    b, out_ptr, stride_om, FAKE)



@triton.jit
def act_quant_gather_kernel(
    x_ptr, perm_ptr, bits_ptr, slot_ptr, q4_ptr, q8_ptr, s_ptr,
    M, K, NB, int4_clip,
    stride_xm, stride_xk, stride_q4m, stride_q8m, stride_sm,
    out_ptr, stride_om,
    KP: tl.constexpr,
    CLASS_MODE: tl.constexpr,
    IDENTITY: tl.constexpr,
    FAKE: tl.constexpr,
):
    """One token per program, the whole row in registers: the same outputs as
    :func:`act_quant_kernel` (block or class mode, packed or FAKE), bit for bit.

    Why: the other kernels gather ``x[m, perm[k]]`` straight from global memory, one 2-byte load
    per channel, each its own 32-byte sector -- L1-wavefront-bound, not bandwidth-bound (run 9,
    H200, K = 4096, M = 8192: 225 GB/s against 1190 GB/s without the permutation; the prefill
    step's act-quant took 20 % of its kernel time).  Here the row is read once with contiguous,
    vectorized loads, and ``tl.gather`` permutes it on chip (Triton lowers a cross-warp gather
    through shared memory: 2-byte reads from random banks, a few-way conflicts at worst)::

        x[m, 0 : KP]   (contiguous, zero past K)
          --tl.gather(perm)-->  xg[p] = x[m, perm[p]]            p = b*128 + 2*j + h  (K order)
          --reshape-->          [NBP, 64, 2]  (block b, pair j, half h: h = 0 even / 1 odd channel)
          absmax over (j, h) per block; class mode: max over the INT4 / INT8 blocks of the row
          q = clamp(rint(xg / s))          (IEEE division, ties to even: the reference's order)
          FAKE : (q * s) as [NBP, 2, 64] -> out[m, b*128 + h*64 + j]   (half-split order)
          INT8 : q as [NBP, 128]         -> q8[m, slot[b]*128 + k]      (K order)
          INT4 : lo | hi << 4 [NBP, 64]  -> q4[m, slot[b]*64 + j]

    ``KP`` = next power of two >= ``NB * 128`` (tensor shapes are powers of two); blocks
    ``b >= NB`` are masked out of every store.  Register use grows with ``KP`` (the launcher
    keeps ``KP <= GATHER_MAX_KP``)."""
    m = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, KP)
    real = p < K
    row = x_ptr + m * stride_xm
    if IDENTITY:
        xg = tl.load(row + p * stride_xk, mask=real, other=0.0)
    else:
        x = tl.load(row + p * stride_xk, mask=real, other=0.0)
        src = tl.load(perm_ptr + p, mask=real, other=0).to(tl.int32)
        src = tl.minimum(tl.maximum(src, 0), KP - 1)  # a bad perm entry cannot address outside the tile
        xg = tl.where(real, tl.gather(x, src, 0), 0.0)
    NBP: tl.constexpr = KP // 128
    x3 = tl.reshape(xg.to(tl.float32), (NBP, 64, 2))
    am = tl.max(tl.max(tl.abs(x3), axis=2), axis=1)  # [NBP]
    bi = tl.arange(0, NBP)
    bmask = bi < NB
    is8 = tl.load(bits_ptr + bi, mask=bmask, other=4) == 8
    slot = tl.load(slot_ptr + bi, mask=bmask, other=0)
    qmax = tl.where(is8, 127.0, 7.0)
    if CLASS_MODE:
        # (blocks past NB read as INT4 and hold zeros: they change neither maximum)
        a4 = tl.max(tl.where(is8, 0.0, am), axis=0)
        a8 = tl.max(tl.where(is8, am, 0.0), axis=0)
        s4 = tl.math.div_rn(a4 * int4_clip, 7.0)
        s8 = tl.math.div_rn(a8, 127.0)
        s = tl.where(is8, s8, s4)
        if not FAKE:
            tl.store(s_ptr + m * stride_sm, s4)
            tl.store(s_ptr + m * stride_sm + 1, s8)
    else:
        s = tl.math.div_rn(tl.where(is8, am, am * int4_clip), qmax)
        if not FAKE:
            tl.store(s_ptr + m * stride_sm + bi, s, mask=bmask)
    d = tl.where(s == 0.0, 1.0, s)[:, None, None]
    q = rint_rne(quotient_rn(x3, d, FAST_DIV))
    q = tl.minimum(tl.maximum(q, -qmax[:, None, None]), qmax[:, None, None])
    if FAKE:
        v = (q * s[:, None, None]).to(out_ptr.dtype.element_ty)
        v = tl.reshape(tl.permute(v, (0, 2, 1)), (KP,))  # [NBP, 2, 64]: the half-split order
        tl.store(out_ptr + m * stride_om + p, v, mask=p < NB * 128)
    else:
        qi = q.to(tl.int32)
        k = tl.arange(0, 128)
        q8 = tl.reshape(qi, (NBP, 128)).to(tl.int8)
        tl.store(q8_ptr + m * stride_q8m + slot[:, None] * 128 + k[None, :], q8, mask=(is8 & bmask)[:, None])
        lo, hi = tl.split(qi)
        byte = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
        j = tl.arange(0, 64)
        tl.store(q4_ptr + m * stride_q4m + slot[:, None] * 64 + j[None, :], byte,
                 mask=((~is8) & bmask)[:, None])

#: block mode from this many rows on: one program per ``ROWS_BLOCK_M`` rows walks all their blocks
#: (``act_quant_kernel``'s ROWS) instead of one program per (row tile, block).  The per-block
#: programs gather a block's 128 permuted channels from all over the row, each 2-byte load a
#: 32-byte sector, on whichever SM the block lands: at M = 4096 the FAKE twin took 1.00 ms where
#: quantize + dequantize took 0.52 (H100 run 7).  Below it, the per-block grid keeps small M
#: (decode) spread over many programs.  Same bits either way.
ROWS_MIN_M = 256
ROWS_BLOCK_M = 8

#: the gather kernel (:func:`act_quant_gather_kernel`, one row per program, permuted on chip) from
#: this many rows on, and for class mode at every M (its two-pass kernel re-gathers each row: 3 GB/s
#: at M = 64 in run 9).  Below it the per-block grid spreads a few tokens over many programs.
#: Unmeasured guess (eighteenth session): the act_quant bench's "gather" columns decide it.
GATHER_MIN_M = 16
#: the largest power-of-two row tile the gather kernel holds (Llama-70B's down_proj: K = 28672)
#: and the most shared memory its on-chip permutation may stage (the tile in x's dtype)
GATHER_MAX_KP = 32768
GATHER_MAX_SMEM = 64 * 1024


def _class_slot(block_bits: torch.Tensor) -> torch.Tensor:
    # same table as ActivationLayout.class_slot(), computed on-device without a sync
    is8 = (block_bits == 8).to(torch.int32)
    c8 = torch.cumsum(is8, 0) - is8
    c4 = torch.cumsum(1 - is8, 0) - (1 - is8)
    return torch.where(is8.bool(), c8, c4).to(torch.int32)


def block_tables(block_bits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(bits int32 [nb], class slots int32 [nb])`` of a block map, computed once per map tensor
    (cached: no cast / cumsum kernels per call); shared with :mod:`cometq.kernels.dequant_gemm`."""
    return (derived(block_bits, "act_quant.bits_i32", lambda t: t.to(torch.int32)),
            derived(block_bits, "act_quant.class_slot", _class_slot))


def _block_m(m: int) -> int:
    if interpreting():
        # the interpreter pays per program: one big tile
        return max(16, min(64, next_pow2(m)))
    return 16 if m <= 16 else 32


def quantize_act_triton(
    x: torch.Tensor,
    perm: torch.Tensor,
    block_bits: torch.Tensor,
    n_int8: int,
    scale_mode: str = "block",
    *,
    identity_perm: bool = False,
    block_m: Optional[int] = None,
    int4_clip: float = 1.0,
    rows: Optional[bool] = None,
    gather: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensor-level activation quantization (signature of ``cometq.ops._ref_quantize_act``).

    ``int4_clip`` in (0, 1]: INT4 scales are ``(absmax * int4_clip) / 7`` (see module doc).

    ``identity_perm=True`` skips the gather (the caller vouches that ``perm`` is
    ``arange(K)``; :func:`quantize_activation_triton` passes the layout's cached flag).
    ``rows`` (block mode): one program per row tile walking all its blocks (True) or one per
    (row tile, block) (False); None: by ``ROWS_MIN_M``.  ``gather``: one program per token,
    the row permuted on chip (:func:`act_quant_gather_kernel`); None: from ``GATHER_MIN_M`` rows
    (class mode: always) unless ``rows`` is given or the row is over the kernel's limits.  Same
    bits in every case.
    """
    m, k, nb = _check_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip)
    n4 = nb - n_int8
    q4 = torch.empty(m, n4 * BLOCK_K // 2, dtype=torch.uint8, device=x.device)
    q8 = torch.empty(m, n_int8 * BLOCK_K, dtype=torch.int8, device=x.device)
    scales = torch.empty(m, nb if scale_mode == "block" else 2, dtype=torch.float32, device=x.device)
    if m == 0:
        return q4, q8, scales
    _launch_act(x, perm, block_bits, scale_mode, int4_clip, identity_perm, block_m, nonempty(q4), nonempty(q8),
                scales, q4.stride(0) if q4.numel() else 0, q8.stride(0) if q8.numel() else 0, None, rows, gather)
    return q4, q8, scales


def fake_quant_act_triton(
    x: torch.Tensor,
    perm: torch.Tensor,
    block_bits: torch.Tensor,
    n_int8: int,
    scale_mode: str = "block",
    *,
    out_dtype: torch.dtype = torch.float16,
    identity_perm: bool = False,
    block_m: Optional[int] = None,
    int4_clip: float = 1.0,
    rows: Optional[bool] = None,
    gather: Optional[bool] = None,
) -> torch.Tensor:
    """The dequant path's activation operand straight from ``x``: ``A' [M, K_pad]`` in ``out_dtype``
    (fp16 / bf16 / fp32), each block's ``q * scale`` in the half-split K order of
    :mod:`cometq.kernels.dequant_gemm` -- bit for bit what ``dequant_act_kernel`` makes of
    :func:`quantize_act_triton`'s output, in one pass (no packed activation written and read back).
    Arguments as :func:`quantize_act_triton`."""
    m, k, nb = _check_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip)
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    out = torch.empty(m, nb * BLOCK_K, dtype=out_dtype, device=x.device)
    if m:
        d8, d4 = dummy(x.device, torch.int8), dummy(x.device, torch.uint8)
        _launch_act(x, perm, block_bits, scale_mode, int4_clip, identity_perm, block_m, d4, d8,
                    dummy(x.device), 0, 0, out, rows, gather)
    return out


def _check_act_args(x, perm, block_bits, n_int8, scale_mode, int4_clip):
    """The shared argument checks of the two entry points; returns ``(M, K, n_blocks)``."""
    check_tensor("x", x, dtypes=_FLOAT, ndim=2)
    check_tensor("perm", perm, dtypes=(torch.int64, torch.int32), ndim=1)
    check_tensor("block_bits", block_bits, ndim=1)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    m, k = x.shape
    if perm.shape[0] != k:
        raise ValueError(f"perm shape {tuple(perm.shape)} must be ({k},) for x shape {tuple(x.shape)}")
    nb = padded_k(k) // BLOCK_K
    if block_bits.shape[0] != nb:
        raise ValueError(f"block_bits shape {tuple(block_bits.shape)} must be ({nb},) for K={k}")
    if isinstance(n_int8, bool) or not isinstance(n_int8, int) or not 0 <= n_int8 <= nb:
        raise ValueError(f"n_int8 must be an int in [0, {nb}], got {n_int8!r}")
    if isinstance(int4_clip, bool) or not isinstance(int4_clip, (int, float)):
        raise TypeError(f"int4_clip must be a float, got {int4_clip!r}")
    if not 0.0 < float(int4_clip) <= 1.0:
        raise ValueError(f"int4_clip must be in (0, 1], got {int4_clip!r}")
    for name, t in (("perm", perm), ("block_bits", block_bits)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.device.type != "cuda" or checks_with_sync():  # free on CPU; a device sync on CUDA (opt-in)
        got = int((block_bits == 8).sum())
        if got != n_int8:
            raise ValueError(f"n_int8={n_int8} but block_bits holds {got} INT8 blocks")
    return m, k, nb


def _use_rows(m: int, scale_mode: str, rows: Optional[bool]) -> bool:
    if rows is not None and not isinstance(rows, bool):
        raise TypeError(f"rows must be a bool or None, got {rows!r}")
    if scale_mode == "class":
        return False  # class mode walks whole rows anyway (two passes)
    return m >= ROWS_MIN_M if rows is None else rows


def gather_kp(k: int) -> int:
    """The gather kernel's row tile for ``K`` channels: the next power of two >= ``K_pad``."""
    return next_pow2(padded_k(k))


def _use_gather(m: int, k: int, x_dtype: torch.dtype, scale_mode: str, rows: Optional[bool],
                gather: Optional[bool]) -> bool:
    if gather is not None and not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool or None, got {gather!r}")
    kp = gather_kp(k)
    fits = kp <= GATHER_MAX_KP and kp * torch.tensor([], dtype=x_dtype).element_size() <= GATHER_MAX_SMEM
    if gather:
        if not fits:
            raise ValueError(f"gather=True: K={k} needs a {kp}-channel row tile in {x_dtype}, over the gather "
                             f"kernel's limits ({GATHER_MAX_KP} channels, {GATHER_MAX_SMEM} bytes)")
        return True
    if gather is False or rows is not None or not fits:
        return False  # an explicit grid choice keeps its kernel
    return scale_mode == "class" or m >= GATHER_MIN_M


def _gather_warps(kp: int) -> int:
    # ~16 channels per thread up to 8 K channels, 32-64 beyond (16 warps is the most a CTA has)
    return 4 if kp <= 2048 else 8 if kp <= 4096 else 16


def _launch_act(x, perm, block_bits, scale_mode, int4_clip, identity_perm, block_m, q4k, q8k, scales,
                stride_q4m, stride_q8m, out, rows: Optional[bool] = None, gather: Optional[bool] = None):
    m, k = x.shape
    nb = block_bits.shape[0]
    # per block map, computed once (a layer's map is a long-lived tensor): no cumsum /
    # cast kernels per call
    bits, slot = block_tables(block_bits)
    class_mode = scale_mode == "class"
    fake = out is not None
    if _use_gather(m, k, x.dtype, scale_mode, rows, gather):
        kp = gather_kp(k)
        # int32 channel indices (cached per perm tensor): every program reads the whole table,
        # 4 bytes per channel instead of 8 -- at K = 4096 an int64 table is 4x the row's fp16 bytes
        perm32 = perm if perm.dtype == torch.int32 or identity_perm else derived(
            perm, "act_quant.perm_i32", lambda t: t.to(torch.int32))
        act_quant_gather_kernel[(m,)](
            x, perm32, bits, slot, q4k, q8k, scales,
            m, k, nb, float(int4_clip),
            x.stride(0), x.stride(1), stride_q4m, stride_q8m, scales.stride(0) if not fake else 0,
            out if fake else dummy(x.device, torch.float16), out.stride(0) if fake else 0,
            KP=kp, CLASS_MODE=class_mode, IDENTITY=bool(identity_perm), FAKE=fake,
            num_warps=_gather_warps(kp),
        )
        return
    by_rows = _use_rows(m, scale_mode, rows)
    bm = block_m or (ROWS_BLOCK_M if by_rows and not interpreting() else _block_m(m))
    grid = (triton.cdiv(m, bm),) if class_mode or by_rows else (triton.cdiv(m, bm), nb)
    act_quant_kernel[grid](
        x, perm, bits, slot, q4k, q8k, scales,
        m, k, nb, float(int4_clip),
        x.stride(0), x.stride(1), stride_q4m, stride_q8m, scales.stride(0) if not fake else 0,
        out if fake else dummy(x.device, torch.float16), out.stride(0) if fake else 0,
        BLOCK_M=bm, CLASS_MODE=class_mode, IDENTITY=bool(identity_perm), FAKE=fake, ROWS=by_rows,
        num_warps=4,
    )


def quantize_activation_triton(x: torch.Tensor, layout: ActivationLayout, scale_mode: str = "block"):
    """Dataclass-level twin of :func:`cometq.reference.quantize_activation`."""
    from cometq.reference import QuantizedActivation

    if not isinstance(layout, ActivationLayout):
        raise TypeError(f"layout must be an ActivationLayout, got {type(layout).__name__}")
    q4, q8, sc = quantize_act_triton(
        x, layout.perm, layout.block_bits, layout.n_int8, scale_mode, identity_perm=layout.is_identity_perm,
        int4_clip=layout.int4_clip,
    )
    return QuantizedActivation(q4, q8, sc, layout, scale_mode)


@triton.jit
def split_rows_kernel(q4_ptr, q8_ptr, out_ptr, M, N8, stride_q4m, stride_q8m, stride_om, BLOCK_M: tl.constexpr):
    """One (token tile, list position) of :func:`cometq.layout.split_activation_rows`: an INT8
    slot's 128 bytes split into even / odd channels (a register reshape), an INT4 slot's 64
    packed bytes unpacked into low / high nibbles; both stored as two 64-byte int8 halves."""
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    j = tl.arange(0, 64)
    if i < N8:
        k = tl.arange(0, 128)
        x = tl.load(q8_ptr + rm[:, None] * stride_q8m + i * 128 + k[None, :], mask=m_mask[:, None], other=0)
        lo, hi = tl.split(tl.reshape(x, (BLOCK_M, 64, 2)))
    else:
        p = tl.load(q4_ptr + rm[:, None] * stride_q4m + (i - N8) * 64 + j[None, :], mask=m_mask[:, None], other=0)
        lo = unpack_lo(p)
        hi = unpack_hi(p)
    row = out_ptr + rm[:, None] * stride_om + i * 128 + j[None, :]
    tl.store(row, lo, mask=m_mask[:, None])
    tl.store(row + 64, hi, mask=m_mask[:, None])


def split_rows_triton(q4: torch.Tensor, q8: torch.Tensor) -> torch.Tensor:
    """:func:`cometq.layout.split_activation_rows` on the device (bit-identical)."""
    check_tensor("q4", q4, dtypes=(torch.uint8,), ndim=2)
    check_tensor("q8", q8, dtypes=(torch.int8,), ndim=2)
    if q4.shape[0] != q8.shape[0] or q4.shape[1] % (BLOCK_K // 2) or q8.shape[1] % BLOCK_K:
        raise ValueError(f"q4 {tuple(q4.shape)} / q8 {tuple(q8.shape)} are not [M, n4*64] / [M, n8*128] "
                         "of one activation")
    if q4.device != q8.device:
        raise ValueError(f"q4 is on {q4.device} but q8 is on {q8.device}")
    m = q4.shape[0]
    n8 = q8.shape[1] // BLOCK_K
    nb = n8 + q4.shape[1] // (BLOCK_K // 2)
    out = torch.empty(m, nb * BLOCK_K, dtype=torch.int8, device=q4.device)
    if m == 0 or nb == 0:
        return out
    bm = max(16, min(64, next_pow2(m))) if interpreting() else 32
    split_rows_kernel[(triton.cdiv(m, bm), nb)](
        nonempty(q4), nonempty(q8), out, m, n8, q4.stride(0) if q4.numel() else 0,
        q8.stride(0) if q8.numel() else 0, out.stride(0), BLOCK_M=bm, num_warps=4)
    return out
