"""CPU emulation of the CUDA kernels' index math (csrc/w4ax_gemm.cu, csrc/act_quant.cu).

No GPU is needed to check the part of a tensor-core kernel that is easiest to
get wrong: which bytes each lane loads, how they are permuted and converted,
and how the mma fragments pair them.  This file transcribes the kernels'
formulas (shared-memory loader with its padding and swizzle, per-lane fragment
loads, INT4->INT8 conversion, byte permutes, sub-segment masks, split-K ranges,
flush and epilogue) into numpy, and executes the mma instructions from their
PTX ISA fragment definitions (written independently of the kernel's k-slot
permutation).  The result is held to the reference like the real kernel.

If you change an index formula in csrc/, change it here too: the emulation is
only as good as the transcription.  The real kernels are tested on a GPU by
tests/test_cuda_ops.py.
"""
from __future__ import annotations

import os
import re
import zlib

import numpy as np
import pytest
import torch

from cometq import reference as R
from cometq.layout import BLOCK_K, ActivationLayout
from cometq.testing import GEMM_FP32_ATOL, GEMM_FP32_RTOL, byte_perm, rand_activation, rand_weight

ROW4, ROW8 = 96, 128
MASK = np.uint32(0xF0F0F0F0)


# --------------------------------------------------------------------------
# bit helpers (cometq_device.cuh)
# --------------------------------------------------------------------------
def nib_lo_x16(w):
    return (w << np.uint32(4)) & MASK


def nib_hi_x16(w):
    return w & MASK


def _cuda_asm(name):
    """The PTX string of a cometq_device.cuh helper's inline asm, operands renamed %N -> $N (run_ptx)."""
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "cometq_device.cuh")).read()
    body = src[src.index(f"uint32_t {name}("):]
    asm = re.search(r'asm\("([^"]*)"', body).group(1)
    return re.sub(r"%(\d)", r"$\1", asm)


def and3_f0(x, keep):
    """and3_f0 (cometq_device.cuh): x & keep & 0xF0F0F0F0 as one lop3 -- executed from its PTX."""
    from cometq.testing import run_ptx

    x = np.asarray(x, np.uint64) & np.uint64(0xFFFFFFFF)
    keep = np.broadcast_to(np.asarray(keep, np.uint64), x.shape)
    return run_ptx(_cuda_asm("and3_f0"), {"$1": x, "$2": keep})["$0"].astype(np.uint32)


def bytes_even(p, q):
    return byte_perm(p, q, 0x6420)


def bytes_odd(p, q):
    return byte_perm(p, q, 0x7531)


def _s8(w):
    """uint32 [32] -> int8 [32, 4] (byte 0 first)."""
    return w.astype("<u4").view(np.uint8).reshape(-1, 4).view(np.int8).astype(np.int64)


def _s4(w):
    """uint32 [32] -> signed nibbles [32, 8] (nibble 0 first)."""
    n = np.stack([(w >> np.uint32(4 * i)) & np.uint32(0xF) for i in range(8)], axis=1).astype(np.int64)
    return n - ((n & 8) << 1)


LANE = np.arange(32)
G, T = LANE >> 2, LANE & 3


# --------------------------------------------------------------------------
# mma.sync from the PTX ISA fragment tables (independent of the kernel's choices)
# --------------------------------------------------------------------------
def mma_s8_m16n8k32(c, a0, a1, a2, a3, b0, b1):
    A = np.zeros((16, 32), np.int64)
    B = np.zeros((32, 8), np.int64)
    for j in range(4):
        A[G, 4 * T + j] = _s8(a0)[:, j]
        A[G + 8, 4 * T + j] = _s8(a1)[:, j]
        A[G, 16 + 4 * T + j] = _s8(a2)[:, j]
        A[G + 8, 16 + 4 * T + j] = _s8(a3)[:, j]
        B[4 * T + j, G] = _s8(b0)[:, j]
        B[16 + 4 * T + j, G] = _s8(b1)[:, j]
    return _acc(c, A @ B)


def mma_s4_m16n8k64(c, a0, a1, a2, a3, b0, b1):
    A = np.zeros((16, 64), np.int64)
    B = np.zeros((64, 8), np.int64)
    for j in range(8):
        A[G, 8 * T + j] = _s4(a0)[:, j]
        A[G + 8, 8 * T + j] = _s4(a1)[:, j]
        A[G, 32 + 8 * T + j] = _s4(a2)[:, j]
        A[G + 8, 32 + 8 * T + j] = _s4(a3)[:, j]
        B[8 * T + j, G] = _s4(b0)[:, j]
        B[32 + 8 * T + j, G] = _s4(b1)[:, j]
    return _acc(c, A @ B)


def _acc(c, D):
    # C/D fragment: c0,c1 row g cols 2t,2t+1; c2,c3 row g+8
    c[:, 0] += D[G, 2 * T]
    c[:, 1] += D[G, 2 * T + 1]
    c[:, 2] += D[G + 8, 2 * T]
    c[:, 3] += D[G + 8, 2 * T + 1]
    assert np.abs(c).max() < 2**31
    return c


def _ld32(smem, off):
    off = np.asarray(off)
    b = smem[off[:, None] + np.arange(4)[None, :]].astype(np.uint32)
    return b[:, 0] | (b[:, 1] << np.uint32(8)) | (b[:, 2] << np.uint32(16)) | (b[:, 3] << np.uint32(24))


# --------------------------------------------------------------------------
# the GEMM kernel, transcribed
# --------------------------------------------------------------------------
def block_table(block_bits, n4, n8):
    is8 = [int(b == 8) for b in block_bits]
    info = []
    for b in range(len(is8)):
        slot = sum(1 for j in range(b) if is8[j] == is8[b])
        info.append((slot, bool(is8[b]), slot < (n8 if is8[b] else n4)))
    return info


def split_range(info, z, splits, cost8):
    nb = len(info)
    if splits <= 1:
        return 0, nb
    total = sum(cost8 if i8 else 1 for _, i8, _ in info)
    prefix, begin, end, found = 0, 0, 0, False
    for b in range(nb):
        if (prefix * splits) // total == z:
            if not found:
                begin = b
            found, end = True, b + 1
        prefix += cost8 if info[b][1] else 1
    return (begin, end) if found else (0, 0)


def block_table_warp(block_bits, n4, n8):
    """csrc/cometq_device.cuh build_block_table as written: one warp; rounds of 8 chunks whose
    bits are all loaded first (blocks past nb read as 0), then per chunk of 32 blocks slots from
    ballots (rank = earlier chunks' class count + popc(ballot & lanes below))."""
    nb, info = len(block_bits), [None] * len(block_bits)
    base8 = base4 = 0
    for c0 in range(0, nb, 256):
        bits = [[int(block_bits[b]) if b < nb else 0 for b in range(c0 + 32 * i, c0 + 32 * i + 32)] for i in range(8)]
        for i in range(8):
            c = c0 + 32 * i
            if c >= nb:
                break
            base8, base4 = _block_table_chunk(bits[i], c, nb, n4, n8, info, base8, base4)
    return info


def _block_table_chunk(bits, c, nb, n4, n8, info, base8, base4):
    """One chunk of build_block_table: lanes c .. c + 31 with their loaded bits; fills ``info``
    and returns the class counts after the chunk."""
    lanes = [c + lane for lane in range(32)]
    is8 = [b < nb and bits[lane] == 8 for lane, b in enumerate(lanes)]
    m8 = sum(1 << lane for lane in range(32) if is8[lane])
    m4 = sum(1 << lane for lane in range(32) if lanes[lane] < nb and not is8[lane])
    for lane, b in enumerate(lanes):
        if b < nb:
            below = (1 << lane) - 1
            slot = base8 + bin(m8 & below).count("1") if is8[lane] else base4 + bin(m4 & below).count("1")
            info[b] = (slot, bool(is8[lane]), slot < (n8 if is8[lane] else n4))
    return base8 + bin(m8).count("1"), base4 + bin(m4).count("1")


def block_slot_warp(block_bits, b, n4, n8):
    """csrc/act_quant.cu block_slot as written: one warp finds block b's own slot, counting the
    INT8 blocks before b: rounds of 8 chunks x 32 lanes (loads of blocks >= b read as 0), one
    ballot per chunk."""
    n8_before = 0
    for c0 in range(0, b, 256):
        bits = [[int(block_bits[c0 + 32 * i + lane]) if c0 + 32 * i + lane < b else 0 for lane in range(32)]
                for i in range(8)]
        n8_before += sum(sum(x == 8 for x in chunk) for chunk in bits)
    is8 = int(block_bits[b]) == 8
    slot = n8_before if is8 else b - n8_before
    return slot, is8, slot < (n8 if is8 else n4)


def split_range_warp(info, z, splits, cost8):
    """csrc/w4ax_gemm.cu split_range as written: one warp, a shuffle scan of the costs per 32-block
    chunk and a ballot of the blocks slice z owns (first set bit / last set bit)."""
    nb = len(info)
    if splits <= 1:
        return 0, nb
    cost = [(cost8 if info[b][1] else 1) if b < nb else 0 for b in range(-(-nb // 32) * 32)]
    total = sum(cost)
    prefix, first, last = 0, -1, -1
    for c in range(0, nb, 32):
        w = cost[c:c + 32]
        incl = list(np.cumsum(w))
        mine = [c + lane < nb and ((prefix + incl[lane] - w[lane]) * splits) // total == z for lane in range(32)]
        if any(mine):
            lanes = [lane for lane in range(32) if mine[lane]]
            if first < 0:
                first = c + lanes[0]
            last = c + lanes[-1]
        prefix += incl[31]
    return (0, 0) if first < 0 else (first, last + 1)


def test_warp_block_table_and_split_range_equal_the_definitions():
    """The ballot / shuffle-scan versions the kernels run compute exactly the serial definitions:
    random block maps of 1..300 blocks (several 32-block chunks, ragged last chunk), inconsistent
    class widths (invalid slots), every split count up to 40, both cost ratios."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        nb = int(rng.integers(1, 300))
        bits = list(np.where(rng.random(nb) < rng.random(), 8, 4))
        n8 = sum(1 for b in bits if b == 8) - int(trial % 5 == 0)  # sometimes one slot too few
        n4 = nb - sum(1 for b in bits if b == 8)
        ref = block_table(bits, n4, n8)
        assert block_table_warp(bits, n4, n8) == ref
        assert [block_slot_warp(bits, b, n4, n8) for b in range(nb)] == ref
        for splits in (1, 2, 3, 7, 32, 40):
            for cost8 in (1, 2):
                got = [split_range_warp(ref, z, splits, cost8) for z in range(splits)]
                assert got == [split_range(ref, z, splits, cost8) for z in range(splits)], (nb, splits, cost8)


def emulate_gemm(q4, q8, a_scales, block_bits, qweight, w_scales, group, scale_mode, *, use_s4, cfg, split_k=1,
                 w_offsets=None):
    BM, BN, WARPS_M, WARPS_N = cfg
    WM, WN = BM // WARPS_M, BN // WARPS_N
    MT, NT = WM // 16, WN // 8
    M, N = a_scales.shape[0], qweight.shape[0]
    nb = len(block_bits)
    n4, n8 = q4.shape[1] // 64, q8.shape[1] // 128
    q4b, q8b, wb = q4.reshape(M, -1), q8.view(np.uint8).reshape(M, -1), qweight
    info = block_table_warp(block_bits, n4, n8)
    seg = min(group, BLOCK_K)
    segs_per_step = 1 if seg >= 64 else 64 // seg
    gpb_log2 = 0 if group >= BLOCK_K else {16: 3, 32: 2, 64: 1}[group]  # groups_per_block_log2
    # split-K slabs: split z stores its partial tiles into ws[z] (no zeroing: every element of
    # every slab is written exactly once -- checked below), the finalize kernel sums them in order
    ws = np.full((split_k, M, N), np.nan, np.float32)
    written = np.zeros((split_k, M, N), np.int64)
    for bz in range(split_k):
        kb_begin, kb_end = split_range_warp(info, bz, split_k, 2 if use_s4 else 1)
        for by in range((M + BM - 1) // BM):
            for bx in range((N + BN - 1) // BN):
                m0, n0 = by * BM, bx * BN
                for warp in range(WARPS_M * WARPS_N):
                    warp_m, warp_n = warp // WARPS_N, warp % WARPS_N
                    wm0, wn0 = warp_m * WM, warp_n * WN
                    acc = np.zeros((MT, NT, 32, 4), np.float32)
                    iacc = np.zeros((MT, NT, 32, 4), np.int64)
                    has_off = w_offsets is not None  # the HAS_OFF template parameter
                    # the ones tile's C fragment: c0 = row g, c2 = row g + 8 sums (c1, c3 the same)
                    isum = np.zeros((MT, 32, 4), np.int64)
                    for b in range(kb_begin, kb_end):
                        slot, is8, valid = info[b]
                        if not valid:
                            continue
                        # ---- load_stage: thread tid copies chunks i = 0, 1, ... of rows tid/4 + i*THREADS/4
                        # (INT8: tid/8 + i*THREADS/8), 16-byte column tid%4 (tid%8): copy_row_chunk's
                        # clamped 32-bit row offset from the block's base, zero-filled past the edge
                        sA = np.zeros(BM * ROW8, np.uint8)
                        sB = np.zeros(BN * ROW4, np.uint8)
                        threads = 32 * WARPS_M * WARPS_N

                        def copy_row_chunk(dst, dst_off, base_flat, row, limit, ld, col):
                            ok = row < limit
                            off = (row if ok else limit - 1) * ld + col
                            dst[dst_off:dst_off + 16] = base_flat[off:off + 16] if ok else 0

                        for tid in range(threads):
                            r4, c4, r8, c8 = tid >> 2, tid & 3, tid >> 3, tid & 7
                            if is8:
                                for i in range(-(-(BM * 8) // threads)):
                                    if tid + i * threads >= BM * 8:
                                        break
                                    r = r8 + i * (threads // 8)
                                    dst = r * ROW8 + ((c8 ^ ((r8 & 1) << 2)) << 4)  # (r & 1 == r8 & 1)
                                    copy_row_chunk(sA, dst, q8b.reshape(-1)[slot * 128:], m0 + r, M, q8b.shape[1],
                                                   c8 * 16)
                            else:
                                for i in range(-(-(BM * 4) // threads)):
                                    if tid + i * threads >= BM * 4:
                                        break
                                    r = r4 + i * (threads // 4)
                                    copy_row_chunk(sA, r * ROW4 + c4 * 16, q4b.reshape(-1)[slot * 64:], m0 + r, M,
                                                   q4b.shape[1], c4 * 16)
                            for i in range(-(-(BN * 4) // threads)):
                                if tid + i * threads >= BN * 4:
                                    break
                                r = r4 + i * (threads // 4)
                                copy_row_chunk(sB, r * ROW4 + c4 * 16, wb.reshape(-1)[b * 64:], n0 + r, N, wb.shape[1],
                                               c4 * 16)
                        # the stage's scale area: [a_scale BM | w_scale GPB x BN | w_offset GPB x BN]
                        n_w = BN << gpb_log2
                        sS = np.full(BM + 2 * n_w, np.nan, np.float32)  # (NaN: a slot never written shows)
                        a_col = b if scale_mode == 0 else int(is8)
                        for r in range(BM):
                            sS[r] = a_scales[min(m0 + r, M - 1), a_col]
                        if gpb_log2 > 0:
                            grp0 = b << gpb_log2
                        elif group & (group - 1) == 0:
                            grp0 = (b * BLOCK_K) >> (group.bit_length() - 1)  # (b*128) >> (__ffs(G) - 1)
                        else:
                            grp0 = (b * BLOCK_K) // group
                        for c in range(n_w):
                            gi, r = c // BN, c % BN  # group-major
                            gn = min(n0 + r, N - 1)
                            sS[BM + c] = w_scales[gn, grp0 + gi]
                            if w_offsets is not None:
                                sS[BM + n_w + c] = w_offsets[gn, grp0 + gi]
                        # ---- compute
                        a_sc = np.zeros((MT, 2, 32), np.float32)
                        for i in range(MT):
                            for h in range(2):
                                a_sc[i, h] = sS[wm0 + i * 16 + G + 8 * h]
                        conv = np.float32(1 / 16) if is8 else (np.float32(1) if use_s4 else np.float32(1 / 256))
                        for ks in range(2):
                            braw = []
                            for j in range(NT):
                                r = wn0 + j * 8 + G
                                off = r * ROW4 + ks * 32 + T * 8
                                braw.append((_ld32(sB, off), _ld32(sB, off + 4)))
                            # A operand registers, once per k-step: afr[i][h] = (reg0, reg1, reg2, reg3)
                            afr = {}
                            for i in range(MT):
                                rows = [wm0 + i * 16 + G + 8 * rh for rh in range(2)]
                                if is8:
                                    v = []
                                    for r in rows:
                                        ch = ks * 4 + T
                                        off = r * ROW8 + ((ch ^ ((r & 1) << 2)) << 4)
                                        v.append(tuple(_ld32(sA, off + 4 * k) for k in range(4)))
                                    (x0, y0, z0, v0), (x1, y1, z1, v1) = v
                                    afr[i, 0] = (bytes_even(x0, y0), bytes_even(x1, y1), bytes_odd(x0, y0), bytes_odd(x1, y1))
                                    afr[i, 1] = (bytes_even(z0, v0), bytes_even(z1, v1), bytes_odd(z0, v0), bytes_odd(z1, v1))
                                else:
                                    (x0, y0), (x1, y1) = [(_ld32(sA, r * ROW4 + ks * 32 + T * 8), _ld32(sA, r * ROW4 + ks * 32 + T * 8 + 4)) for r in rows]
                                    if use_s4:
                                        afr[i, 0] = (x0, x1, y0, y1)
                                    else:
                                        afr[i, 0] = (nib_lo_x16(x0), nib_lo_x16(x1), nib_hi_x16(x0), nib_hi_x16(x1))
                                        afr[i, 1] = (nib_lo_x16(y0), nib_lo_x16(y1), nib_hi_x16(y0), nib_hi_x16(y1))
                            s4_mma = use_s4 and not is8
                            for sub in range(segs_per_step):
                                my_subseg = (16 * T) // seg
                                keep = np.where((segs_per_step == 1) | (my_subseg == sub), 0xFFFFFFFF, 0).astype(np.uint32)
                                for j in range(NT):
                                    w0, w1 = braw[j][0] & keep, braw[j][1] & keep
                                    if s4_mma:
                                        for i in range(MT):
                                            mma_s4_m16n8k64(iacc[i, j], *afr[i, 0], w0, w1)
                                    else:
                                        if use_s4:  # (sm_8x: INT8 blocks only; masked words, then converted)
                                            b00, b01, b10, b11 = nib_lo_x16(w0), nib_hi_x16(w0), nib_lo_x16(w1), nib_hi_x16(w1)
                                        else:  # sm_90: the raw words converted with the mask as the LOP3's third input
                                            r0, r1 = braw[j]
                                            b00, b01 = and3_f0(r0 << np.uint32(4), keep), and3_f0(r0, keep)
                                            b10, b11 = and3_f0(r1 << np.uint32(4), keep), and3_f0(r1, keep)
                                        for i in range(MT):
                                            mma_s8_m16n8k32(iacc[i, j], *afr[i, 0], b00, b01)
                                            mma_s8_m16n8k32(iacc[i, j], *afr[i, 1], b10, b11)
                                if has_off:
                                    # activation row sums: one more n8 tile against B = ones, masked like the weights
                                    ones = keep & np.uint32(0x11111111 if s4_mma else 0x01010101)
                                    for i in range(MT):
                                        if s4_mma:
                                            mma_s4_m16n8k64(isum[i], *afr[i, 0], ones, ones)
                                        else:
                                            mma_s8_m16n8k32(isum[i], *afr[i, 0], ones, ones)
                                            mma_s8_m16n8k32(isum[i], *afr[i, 1], ones, ones)
                                if seg <= 64 or ks == 1:
                                    gi = 0 if seg == BLOCK_K else ks * segs_per_step + sub
                                    # (the definition: the segment's weight group is its first channel // G)
                                    seg_start = b * BLOCK_K + (0 if seg == BLOCK_K else ks * 64 + sub * seg)
                                    assert grp0 + gi == seg_start // group
                                    a_off = np.zeros((MT, 2, 32), np.float32)
                                    if has_off:
                                        for i in range(MT):
                                            # every column of the ones tile is the row sum
                                            assert np.array_equal(isum[i, :, 0], isum[i, :, 1])
                                            assert np.array_equal(isum[i, :, 2], isum[i, :, 3])
                                            for rh in range(2):
                                                x16 = not (is8 or use_s4)  # INT4 blocks on the s8 path: x16 operands
                                                sm = isum[i, :, 2 * rh] >> 4 if x16 else isum[i, :, 2 * rh]
                                                assert not x16 or not (isum[i, :, 2 * rh] & 15).any()  # the shift is exact
                                                a_off[i, rh] = a_sc[i, rh] * sm.astype(np.float32)
                                        isum[:] = 0
                                    for j in range(NT):
                                        # ws_row / wo_row + 8j: one float2 of columns wn0 + 8j + 2t, + 1
                                        ws_row = BM + gi * BN + wn0 + 2 * T
                                        wo_row = ws_row + (BN << gpb_log2)
                                        assert ((ws_row + j * 8) % 2 == 0).all()  # 8-byte aligned pairs
                                        w_sc = [sS[ws_row + j * 8 + c] * conv for c in range(2)]
                                        w_of = [sS[wo_row + j * 8 + c] if has_off else np.float32(0)
                                                for c in range(2)]
                                        for i in range(MT):
                                            for e in range(4):
                                                acc[i, j, :, e] += iacc[i, j, :, e].astype(np.float32) * (a_sc[i, e >> 1] * w_sc[e & 1])
                                                if has_off:
                                                    acc[i, j, :, e] += a_off[i, e >> 1] * w_of[e & 1]
                                                iacc[i, j, :, e] = 0
                    # ---- epilogue (split-K: a plain store into this split's slab)
                    for i in range(MT):
                        for j in range(NT):
                            for e in range(4):
                                m = m0 + wm0 + i * 16 + G + 8 * (e >> 1)
                                n = n0 + wn0 + j * 8 + 2 * T + (e & 1)
                                ok = (m < M) & (n < N)
                                ws[bz, m[ok], n[ok]] = acc[i, j, ok, e]
                                np.add.at(written, (bz, m[ok], n[ok]), 1)
    assert (written == 1).all(), "a slab element written twice or never"
    out = ws[0].copy()  # splitk_finalize_kernel: the slabs summed in split order
    for z in range(1, split_k):
        out += ws[z]
    return out


def _operands(m, n, k, bits, group, scale_mode, seed, *, sym=True, int4_clip=1.0):
    gen = torch.Generator().manual_seed(seed)
    lay = ActivationLayout(torch.randperm(k, generator=gen), torch.tensor(bits, dtype=torch.int32), int4_clip)
    x = rand_activation(m, k, outliers=3, generator=gen)
    qa = R.quantize_activation(x, lay, scale_mode)
    w = rand_weight(n, k, generator=gen)
    if not sym:
        # a per-row shift, so the offsets are far from zero (what asymmetric weights are for)
        w = w + 0.5 * torch.randn(n, 1, generator=gen)
    qw = R.quantize_weight_rtn(w[:, lay.perm], group, sym=sym)
    return qa, qw


# (BM, BN, WARPS_M, WARPS_N) of CfgSmall / CfgMid / CfgLarge in csrc/w4ax_gemm.cu
CFGS = {"small": (16, 64, 1, 4), "mid": (64, 64, 2, 2), "large": (128, 64, 4, 2)}


@pytest.mark.parametrize(
    "bits,group,scale_mode,use_s4,cfg,split_k",
    [
        ((4, 8, 4, 8, 8), -1, "block", True, "small", 1),
        ((4, 8, 4, 8, 8), -1, "block", False, "small", 1),
        ((8, 4, 4, 4, 8), 128, "class", True, "mid", 1),
        ((8, 4, 4, 4, 8), 128, "class", False, "mid", 3),
        ((4, 4, 4, 4, 4), 64, "block", True, "small", 2),
        ((8, 8, 8, 8, 8), 32, "block", False, "small", 1),
        ((4, 8, 8, 4, 4), 16, "class", True, "small", 5),
        ((4, 8, 8, 4, 4), 16, "block", False, "mid", 1),
        ((4, 4, 8, 4, 4), 640, "block", True, "small", 4),
        ((8, 4, 4, 8, 4), 128, "block", True, "large", 1),
        ((8, 4, 4, 8, 4), 64, "class", False, "large", 2),
    ],
)
def test_emulated_gemm_matches_reference(bits, group, scale_mode, use_s4, cfg, split_k):
    # odd M (2 M tiles on "small"; rows in every warp row of "large"), N past one 64-wide tile, K = 4.5 blocks
    m, n, k = (70 if cfg == "large" else 17), 72, 576
    qa, qw = _operands(m, n, k, list(bits), group, scale_mode, seed=zlib.crc32(repr((bits, group, scale_mode)).encode()))
    g_eff = qw.group_width
    y = emulate_gemm(
        qa.q4.numpy(), qa.q8.numpy(), qa.scales.numpy(), list(bits), qw.qweight.numpy(), qw.scales.numpy(),
        g_eff, 0 if scale_mode == "block" else 1, use_s4=use_s4, cfg=CFGS[cfg], split_k=split_k,
    )
    ref = R.w4ax_gemm(qa, qw, out_dtype=torch.float64).float()
    torch.testing.assert_close(torch.from_numpy(y), ref, rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)


def test_emulated_gemm_integer_exact():
    """Unit scales: the fp32 result is the exact integer sum of the segment accumulators."""
    m, n, k = 3, 16, 256
    bits = [8, 4]
    qa, qw = _operands(m, n, k, bits, 32, "block", seed=7)
    ones_a, ones_w = torch.ones_like(qa.scales), torch.ones_like(qw.scales)
    qa1 = R.QuantizedActivation(qa.q4, qa.q8, ones_a, qa.layout, "block")
    qw1 = R.QuantizedWeight(qw.qweight, ones_w, qw.in_features, qw.group_size)
    want = R.w4ax_int_accumulators(qa1, qw1).sum(-1).float()
    for use_s4 in (True, False):
        y = emulate_gemm(qa.q4.numpy(), qa.q8.numpy(), ones_a.numpy(), bits, qw.qweight.numpy(), ones_w.numpy(),
                         32, 0, use_s4=use_s4, cfg=CFGS["small"])
        assert torch.equal(torch.from_numpy(y), want)


@pytest.mark.parametrize(
    "bits,group,scale_mode,use_s4,cfg,split_k",
    [
        ((4, 8, 4, 8, 8), -1, "block", True, "small", 1),
        ((8, 4, 4, 4, 8), 128, "class", False, "mid", 3),
        ((4, 4, 4, 4, 4), 64, "block", True, "small", 2),
        ((8, 8, 8, 8, 8), 32, "block", False, "small", 1),
        ((4, 8, 8, 4, 4), 16, "class", True, "small", 5),
        ((4, 8, 8, 4, 4), 16, "block", False, "mid", 1),
        ((4, 4, 8, 4, 4), 640, "block", False, "small", 4),
        ((8, 4, 4, 8, 4), 32, "class", True, "large", 2),
    ],
)
def test_emulated_asymmetric_gemm_matches_reference(bits, group, scale_mode, use_s4, cfg, split_k):
    """Asymmetric weights (w_offsets) and clipped INT4 activations: the offset term's
    row sums (an MMA against a ones tile), the x16 shift and sub-segment masks vs reference.w4ax_gemm."""
    m, n, k = (70 if cfg == "large" else 17), 72, 576
    key = zlib.crc32(repr(("asym", bits, group, scale_mode)).encode())
    qa, qw = _operands(m, n, k, list(bits), group, scale_mode, seed=key, sym=False, int4_clip=0.85)
    assert qw.offsets is not None and float(qw.offsets.abs().mean()) > 0.1
    y = emulate_gemm(
        qa.q4.numpy(), qa.q8.numpy(), qa.scales.numpy(), list(bits), qw.qweight.numpy(), qw.scales.numpy(),
        qw.group_width, 0 if scale_mode == "block" else 1, use_s4=use_s4, cfg=CFGS[cfg], split_k=split_k,
        w_offsets=qw.offsets.numpy(),
    )
    ref = R.w4ax_gemm(qa, qw, out_dtype=torch.float64)
    torch.testing.assert_close(torch.from_numpy(y), ref.float(), rtol=GEMM_FP32_RTOL, atol=GEMM_FP32_ATOL)
    # the offset term matters here: dropping it is far outside the tolerance (the test can fail)
    qw_sym = R.QuantizedWeight(qw.qweight, qw.scales, qw.in_features, qw.group_size)
    assert (R.w4ax_gemm(qa, qw_sym, out_dtype=torch.float64) - ref).abs().max() > 100 * GEMM_FP32_ATOL


@pytest.mark.parametrize("group", [16, 32, 64, 128, 640])
@pytest.mark.parametrize("use_s4", [True, False])
def test_emulated_activation_sums_exact(group, use_s4):
    """w_scales = 0, integer offsets, unit activation scales: y[m, n] = sum_s off[n, s] * asum[m, s]
    exactly, i.e. the row sums are exact integers for every segment width, including
    -8 nibbles and -128 bytes (raw random bytes)."""
    gen = torch.Generator().manual_seed(group * 2 + use_s4)
    m, n, bits = 19, 24, [8, 4, 4, 8, 4]
    lay = ActivationLayout(torch.arange(576), torch.tensor(bits, dtype=torch.int32))
    q4 = torch.randint(0, 256, (m, lay.n_int4 * 64), generator=gen, dtype=torch.int32).to(torch.uint8)
    q8 = torch.randint(-128, 128, (m, lay.n_int8 * 128), generator=gen, dtype=torch.int32).to(torch.int8)
    qa = R.QuantizedActivation(q4, q8, torch.ones(m, lay.n_blocks), lay, "block")
    qweight = torch.randint(0, 256, (n, lay.k_pad // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    ns = lay.k_pad // group
    offsets = torch.randint(-3, 4, (n, ns), generator=gen).float()
    qw = R.QuantizedWeight(qweight, torch.zeros(n, ns), 576, group, offsets)
    want = (R.w4ax_act_sums(qa, qw).double() @ offsets.double().repeat_interleave(max(1, group // 128), 1).T)
    assert torch.equal(R.w4ax_gemm(qa, qw, out_dtype=torch.float64), want)
    assert float(want.abs().max()) < 2**24
    y = emulate_gemm(q4.numpy(), q8.numpy(), qa.scales.numpy(), bits, qweight.numpy(), qw.scales.numpy(), group, 0,
                     use_s4=use_s4, cfg=CFGS["small"], split_k=2, w_offsets=offsets.numpy())
    assert torch.equal(torch.from_numpy(y).double(), want)


def test_split_ranges_partition_blocks_by_cost():
    info = block_table([8, 4, 4, 8, 8, 4, 4, 4, 4], 6, 3)
    for splits in range(1, 12):
        for cost8 in (1, 2):
            covered = []
            for z in range(splits):
                b0, b1 = split_range(info, z, splits, cost8)
                covered += list(range(b0, b1))
            assert covered == list(range(9)), (splits, cost8, covered)


def test_conversion_tricks():
    """nib_lo/hi_x16 give 16x the even/odd nibbles; bytes_even/odd de-interleave bytes."""
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**32, size=32, dtype=np.uint64).astype(np.uint32)
    nib = _s4(w)
    assert np.array_equal(_s8(nib_lo_x16(w)), 16 * nib[:, 0::2])
    assert np.array_equal(_s8(nib_hi_x16(w)), 16 * nib[:, 1::2])
    # the masked forms (sm_90's B conversion): the lop3 LUT is a & b & c, the mask all-or-nothing
    for keep in (np.uint32(0xFFFFFFFF), np.uint32(0)):
        assert np.array_equal(and3_f0(w << np.uint32(4), keep), nib_lo_x16(w) & keep)
        assert np.array_equal(and3_f0(w, keep), nib_hi_x16(w) & keep)
    p = rng.integers(0, 2**32, size=32, dtype=np.uint64).astype(np.uint32)
    q = rng.integers(0, 2**32, size=32, dtype=np.uint64).astype(np.uint32)
    allb = np.concatenate([_s8(p), _s8(q)], axis=1)
    assert np.array_equal(_s8(bytes_even(p, q)), allb[:, 0::2])
    assert np.array_equal(_s8(bytes_odd(p, q)), allb[:, 1::2])


# --------------------------------------------------------------------------
# act_quant, transcribed (one CTA per row, warp per block, lane = 4 channels)
# --------------------------------------------------------------------------
def emulate_act_quant(x, perm, block_bits, n_int8, scale_mode, int4_clip=1.0, fake=False):
    """"block" mode: act_quant_block_kernel (a warp per (row, block), its own slot by block_slot);
    "class" mode: act_quant_kernel (a CTA per row, the block table).  Same per-lane math.
    ``fake``: the FAKE output instead (fake_store_lane): fp32 ``[M, nb*128]``, returned alone."""
    x = x.astype(np.float32)
    M, K = x.shape
    nb = len(block_bits)
    n4 = nb - n_int8
    if scale_mode == 0:
        info = [block_slot_warp(block_bits, b, n4, n_int8) for b in range(nb)]
    else:
        info = block_table_warp(block_bits, n4, n_int8)
    q4 = np.zeros((M, n4 * 64), np.uint8)
    q8 = np.zeros((M, n_int8 * 128), np.int8)
    scales = np.zeros((M, nb if scale_mode == 0 else 2), np.float32)
    out = np.full((M, nb * 128), np.nan, np.float32)  # (every element must be written)
    for m in range(M):
        def gather(b):
            j = b * 128 + np.arange(128)
            v = np.zeros(128, np.float32)
            v[j < K] = x[m, perm[j[j < K]]]
            return v.reshape(32, 4)  # [lane, i]
        absmax = np.array([np.abs(gather(b)).max() for b in range(nb)], np.float32)
        clip = np.float32(int4_clip)  # the bindings pass static_cast<float>(int4_clip)
        if scale_mode == 0:
            is8 = np.array(block_bits) == 8
            s = np.where(is8, absmax / np.float32(127), (absmax * clip) / np.float32(7)).astype(np.float32)
            scales[m] = s
        else:
            is8 = np.array(block_bits) == 8
            a4 = absmax[~is8].max() if (~is8).any() else np.float32(0)
            a8 = absmax[is8].max() if is8.any() else np.float32(0)
            a4 = np.float32(a4) * clip  # __fmul_rn after the class max
            s4, s8 = np.float32(a4) / np.float32(7), np.float32(a8) / np.float32(127)
            scales[m] = (s4, s8)
            s = np.where(is8, s8, s4).astype(np.float32)
        for b in range(nb):
            slot, is8b, valid = info[b]
            qmax = np.float32(127 if is8b else 7)
            d = np.float32(1) if s[b] == 0 else np.float32(s[b])
            q = np.clip(np.rint(gather(b) / d), -qmax, qmax).astype(np.int64)  # [32, 4]
            if fake:
                # lane l: o[0] = (q[l,0], q[l,2]) at b*128 + 2l; o[32] (+64 elements) = (q[l,1], q[l,3])
                v = q.astype(np.float32) * np.float32(s[b])
                for lane in range(32):
                    at = b * 128 + 2 * lane
                    out[m, at: at + 2] = (v[lane, 0], v[lane, 2])
                    out[m, at + 64: at + 66] = (v[lane, 1], v[lane, 3])
                continue
            if is8b:
                q8[m, slot * 128: slot * 128 + 128] = q.reshape(-1).astype(np.int8)
            else:
                byte0 = (q[:, 0] & 0xF) | ((q[:, 1] & 0xF) << 4)
                byte1 = (q[:, 2] & 0xF) | ((q[:, 3] & 0xF) << 4)
                q4[m, slot * 64: slot * 64 + 64] = np.stack([byte0, byte1], 1).reshape(-1).astype(np.uint8)
    if fake:
        return out
    return q4, q8, scales


@pytest.mark.parametrize("bits", [(4, 4, 4, 4, 4), (8, 8, 8, 8, 8), (8, 4, 8, 4, 4), (4, 4, 8, 8, 4)])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_emulated_act_quant_is_bit_identical(bits, scale_mode):
    gen = torch.Generator().manual_seed(sum(bits))
    m, k = 3, 576
    lay = ActivationLayout(torch.randperm(k, generator=gen), torch.tensor(bits, dtype=torch.int32))
    x = rand_activation(m, k, outliers=4, generator=gen)
    ref = R.quantize_activation(x, lay, scale_mode)
    q4, q8, sc = emulate_act_quant(x.numpy(), lay.perm.numpy(), list(bits), lay.n_int8, 0 if scale_mode == "block" else 1)
    assert torch.equal(torch.from_numpy(q4), ref.q4)
    assert torch.equal(torch.from_numpy(q8), ref.q8)
    assert torch.equal(torch.from_numpy(sc), ref.scales)


def _f32(x):
    """A Fraction rounded to the nearest float32 (ties to even; subnormals), as a Fraction."""
    from fractions import Fraction as F

    if x == 0:
        return F(0)
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while F(2) ** e > a:
        e -= 1
    while F(2) ** (e + 1) <= a:
        e += 1
    ulp = F(2) ** (max(e, -126) - 23)
    m = a / ulp
    fl = m.numerator // m.denominator
    if m - fl > F(1, 2) or (m - fl == F(1, 2) and fl % 2):
        fl += 1
    return (1 if x > 0 else -1) * fl * ulp


def test_act_quant_division_fast_path_is_correctly_rounded():
    """csrc/act_quant.cu quantize4: the quotient v / d as the division's fast path with the
    reciprocal refined once per block (r = fma(r0, fma(-d, r0, 1), r0); y = v * r;
    q = fma(r, fma(-d, y, v), y)) must be the correctly rounded quotient -- the bits __fdiv_rn
    (and the reference's IEEE division) give -- for any r0 within the 1-ulp error bound of
    rcp.approx, for block scales in the kernel's fast range [2^-60, 2^60].  Exact rational
    arithmetic, half the quotients within 2^-30 .. 2^-10 of a half-integer (where a last-bit
    error would change the rounded integer)."""
    import random
    import struct
    from fractions import Fraction as F

    def step(x, k):  # the float32 k ulps from x (x > 0)
        return F(struct.unpack("<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", float(x)))[0] + k))[0])

    rng = random.Random(20261127)
    for _ in range(800):
        qmax = rng.choice([7, 127])
        d = _f32(F(rng.uniform(0.5, 2.0)) * F(2) ** rng.randint(-60, 59))
        if rng.random() < 0.5:
            target = rng.randint(-qmax, qmax) + 0.5 + rng.choice([-1, 1]) * rng.random() * 2.0 ** -rng.randint(10, 30)
        else:
            target = rng.uniform(-qmax, qmax)
        v = _f32(F(target) * d)
        exact = _f32(v / d)
        for k in (-1, 0, 1):
            r0 = step(_f32(1 / d), k)
            r = _f32(r0 * _f32(1 - d * r0) + r0)
            y = _f32(v * r)
            assert _f32(r * _f32(v - d * y) + y) == exact, (float(v), float(d), k)


@pytest.mark.parametrize("bits", [(4, 4, 4, 4, 4), (8, 4, 8, 4, 4)])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_emulated_fake_act_quant_is_the_reference(bits, scale_mode):
    """The FAKE output's lane -> element mapping (fake_store_lane: two pair stores per lane into the
    half-split order) equals ``ops.fake_quant_act``'s reference, bit for bit (fp32 out; fp16 / bf16
    round the same products once)."""
    from cometq import ops

    gen = torch.Generator().manual_seed(7 * sum(bits))
    m, k = 3, 576
    lay = ActivationLayout(torch.randperm(k, generator=gen), torch.tensor(bits, dtype=torch.int32), 0.9)
    x = rand_activation(m, k, outliers=4, generator=gen)
    ref = ops.fake_quant_act(x, lay.perm, lay.block_bits, lay.n_int8, scale_mode, torch.float32,
                             backend="reference", int4_clip=0.9)
    out = emulate_act_quant(x.numpy(), lay.perm.numpy(), list(bits), lay.n_int8, 0 if scale_mode == "block" else 1,
                            int4_clip=0.9, fake=True)
    assert torch.equal(torch.from_numpy(out), ref)


@pytest.mark.parametrize("clip", [0.9, 0.55, 1 / 3])
@pytest.mark.parametrize("bits", [(4, 4, 4, 4, 4), (8, 4, 8, 4, 4), (8, 8, 8, 8, 8)])
@pytest.mark.parametrize("scale_mode", ["block", "class"])
def test_emulated_act_quant_clip_is_bit_identical(clip, bits, scale_mode):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((clip, bits, scale_mode)).encode()))
    m, k = 4, 576
    lay = ActivationLayout(torch.randperm(k, generator=gen), torch.tensor(bits, dtype=torch.int32), clip)
    x = rand_activation(m, k, outliers=4, generator=gen)
    ref = R.quantize_activation(x, lay, scale_mode)
    q4, q8, sc = emulate_act_quant(x.numpy(), lay.perm.numpy(), list(bits), lay.n_int8,
                                   0 if scale_mode == "block" else 1, int4_clip=clip)
    assert torch.equal(torch.from_numpy(q4), ref.q4)
    assert torch.equal(torch.from_numpy(q8), ref.q8)
    assert torch.equal(torch.from_numpy(sc), ref.scales)
    if lay.n_int4:  # the clip is live: some INT4 values saturate, and the scales differ from the unclipped ones
        plain = R.quantize_activation(x, ActivationLayout(lay.perm, lay.block_bits), scale_mode)
        assert not torch.equal(plain.scales, ref.scales)
        assert (ref.int_blocks()[:, ~(lay.block_bits == 8).repeat_interleave(BLOCK_K)].abs() == 7).sum() > \
            (plain.int_blocks()[:, ~(lay.block_bits == 8).repeat_interleave(BLOCK_K)].abs() == 7).sum()
    if lay.n_int8:  # INT8 blocks are never clipped
        plain = R.quantize_activation(x, ActivationLayout(lay.perm, lay.block_bits), scale_mode)
        assert torch.equal(plain.q8, ref.q8)


# --------------------------------------------------------------------------
# shared-memory layout invariant (static index math, not a timing)
# --------------------------------------------------------------------------
def _max_ways(addrs, width):
    """Largest number of distinct 4-byte words one bank serves in one access phase."""
    banks = {}
    for a in addrs:
        for w in range(width // 4):
            word = a // 4 + w
            banks.setdefault(word % 32, set()).add(word)
    return max(len(v) for v in banks.values())


@pytest.mark.parametrize("ks", [0, 1])
@pytest.mark.parametrize("row0", [0, 16, 48])
def test_fragment_reads_hit_each_bank_once(ks, row0):
    """The padded 96-byte rows (8-byte reads, half-warp phases) and the XOR-swizzled
    128-byte INT8 rows (16-byte reads, quarter-warp phases) are bank-conflict free."""
    lanes = range(32)
    u2 = [(row0 + (ln >> 2)) * ROW4 + ks * 32 + (ln & 3) * 8 for ln in lanes]
    assert [_max_ways(u2[h * 16:(h + 1) * 16], 8) for h in range(2)] == [1, 1]
    u4 = []
    for ln in lanes:
        r, ch = row0 + (ln >> 2), ks * 4 + (ln & 3)
        u4.append(r * ROW8 + ((ch ^ ((r & 1) << 2)) << 4))
    assert [_max_ways(u4[q * 8:(q + 1) * 8], 16) for q in range(4)] == [1, 1, 1, 1]
    # without the swizzle the same reads would conflict (the test can fail)
    plain = [(row0 + (ln >> 2)) * ROW8 + ((ks * 4 + (ln & 3)) << 4) for ln in lanes]
    assert max(_max_ways(plain[q * 8:(q + 1) * 8], 16) for q in range(4)) == 2
