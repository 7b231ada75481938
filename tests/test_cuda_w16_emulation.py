"""CPU emulation of csrc/w16_gemm.cu (the w16 route's CUDA GEMM): no GPU needed.

The kernel's correctness rests on index math a GPU test only catches as a wrong number: which
half-split position each MMA k slot carries on the weight (A) and activation (B) side, the
A' tile's chunk swizzle, the group of a thread's channels for G = 16 ... per channel, the
nibble -> fp16 / bf16 magic-exponent LOP3s, the split-K ranges and the epilogue's fragment ->
shared -> global indices.  This module replays the kernel with numpy, one thread's registers at
a time in the kernel's own order (lanes vectorized), from the same packed bytes and fp32 scales,
and compares with W' A'^T computed the obvious way: the W' values are identical by construction,
so the two sums differ only in fp32-vs-fp64 summation order.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

G_IDX = np.arange(32) // 4  # lane -> groupID g
T_IDX = np.arange(32) % 4   # lane -> threadID_in_group t

# tile variants of csrc/w16_gemm.cu: (BM tokens, warps); BN = 32 * warps
TILES = {"t16": (16, 4), "t32": (32, 4), "t64": (64, 4), "wide": (64, 8)}


# ---------------------------------------------------------------------------- bit tricks
def byte_perm(x: np.ndarray, y: int, sel: int) -> np.ndarray:
    """__byte_perm(x, y, sel) for uint32 arrays (no sign-replicate mode)."""
    pool = [(x >> (8 * i)) & 0xFF for i in range(4)] + [np.full_like(x, (y >> (8 * i)) & 0xFF) for i in range(4)]
    out = np.zeros_like(x)
    for i in range(4):
        out |= pool[(sel >> (4 * i)) & 7] << (8 * i)
    return out


def lop3_and_xor(x, mask, bits):
    return (x & np.uint32(mask)) ^ np.uint32(bits)


def _lanes16(u: np.ndarray, dtype) -> tuple:
    """uint32 -> (low, high) 16-bit lanes as float64 values of `dtype` (fp16 or bf16 bits)."""
    lo = (u & 0xFFFF).astype(np.uint16)
    hi = (u >> 16).astype(np.uint16)
    if dtype == "fp16":
        return lo.view(np.float16).astype(np.float64), hi.view(np.float16).astype(np.float64)
    conv = lambda h: (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    return conv(lo), conv(hi)


def _round(x: np.ndarray, dtype) -> np.ndarray:
    """Round float64 values once to fp16 / bf16 (round to nearest even), back as float64."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(torch.float16 if dtype == "fp16" else torch.bfloat16).to(torch.float64).numpy()


def dequant_pair(pair, s, o, hi: bool, dtype, asym: bool):
    """W16Op<T>::dequant on a byte pair word: two float64 values (already rounded to the dtype)."""
    if dtype == "fp16":
        magic = 0x54805480 if hi else 0x64086408
        m = lop3_and_xor(pair, 0x00F000F0 if hi else 0x000F000F, magic)
        bias = 72.0 if hi else 1032.0
    else:
        magic = 0x43084308
        m = lop3_and_xor((pair >> 4) if hi else pair, 0x000F000F, magic)
        bias = 136.0
    lo_v, hi_v = _lanes16(m, dtype)
    v = np.stack([lo_v - bias, hi_v - bias])  # HSUB2 of the same bits: exact
    assert np.all(v == np.round(v)) and np.all((v >= -8) & (v <= 7))
    w = v * s + o if asym else v * s      # exact in float64, then one rounding (HFMA2 / HMUL2)
    return _round(w, dtype)


# ---------------------------------------------------------------------------- definitions
def dequant_weights_half_split(qweight: np.ndarray, scales, offsets, group: int, dtype) -> np.ndarray:
    """W'[n, pos] in the half-split order, the definition: position p < 64 of block b is the low
    nibble of byte b*64 + p (channel 2p), p >= 64 the high nibble of byte b*64 + p - 64."""
    n, kb = qweight.shape
    nb = kb // 64
    q = qweight.reshape(n, nb, 64).astype(np.int32)
    lo = q & 0xF
    hi = (q >> 4) & 0xF
    v = np.concatenate([lo, hi], axis=2)  # [n, nb, 128] positions
    v = np.where(v >= 8, v - 16, v).astype(np.float64)
    pos = np.arange(128)
    chan = np.arange(nb)[:, None] * 128 + 2 * (pos % 64)[None, :] + (pos >= 64)[None, :]  # [nb, 128]
    grp = chan // group
    s = _round(scales.astype(np.float64), dtype)[:, grp]   # [n, nb, 128]
    w = v * s
    if offsets is not None:
        w = w + _round(offsets.astype(np.float64), dtype)[:, grp]
    return _round(w, dtype).reshape(n, nb * 128)


# ---------------------------------------------------------------------------- the kernel
def _ctas(M, N, nb, BM, BN, split):
    """(K blocks [kb0, kb1), m0, n0) of every CTA of a grid (N tiles, M tiles, splits): split z takes the
    contiguous run of ceil(nb / split) blocks the kernels give it (maybe none)."""
    per = -(-nb // split)
    for z in range(split):
        kb0 = min(nb, z * per)
        kb1 = min(nb, kb0 + per)
        for by in range(-(-M // BM)):
            for bx in range(-(-N // BN)):
                yield kb0, kb1, by * BM, bx * BN


def emulate_w16_gemm(a16: np.ndarray, qweight: np.ndarray, scales, offsets, group: int, dtype, tile: str,
                     split: int, block_major: bool = False) -> np.ndarray:
    """out[m, n] as csrc/w16_gemm.cu computes it (fp32 slabs summed in split order; float64 here)."""
    BM, WARPS = TILES[tile]
    BN = 32 * WARPS
    NT = BM // 8
    M, K_pad = a16.shape
    N = qweight.shape[0]
    nb = K_pad // 128
    gpb = 128 // group if group < 128 else 1
    gsh = 31 if group >= 128 else int(np.log2(group))
    asym = offsets is not None
    # global memory as the kernel sees it: qweight rows (or block-major [nb, N, 64]), A' bytes
    w_mem = np.ascontiguousarray(qweight.reshape(N, nb, 64).transpose(1, 0, 2)) if block_major else qweight
    a_bytes = a16.view(np.uint8).reshape(M, K_pad * 2)
    out = np.zeros((M, N))
    for kb0, kb1, m0, n0 in _ctas(M, N, nb, BM, BN, split):
        acc = np.zeros((WARPS, 2, NT, 4, 32))  # [warp][i][j][e][lane]
        for b in range(kb0, kb1):
            # ---- w16_load_stage: W tile rows (zero past N), A' tile swizzled, scale area
            sW = np.zeros((BN, 64), np.uint8)
            rows = np.arange(BN) + n0
            ok = rows < N
            if block_major:
                sW[ok] = w_mem[b, rows[ok]]
            else:
                sW[ok] = qweight[rows[ok], b * 64:(b + 1) * 64]
            sA = np.zeros((BM, 16, 16), np.uint8)
            for r in range(BM):
                if m0 + r < M:
                    src = a_bytes[m0 + r, b * 256:(b + 1) * 256].reshape(16, 16)
                    for c in range(16):
                        sA[r, c ^ (r & 1)] = src[c]
            wr = np.minimum(n0 + np.arange(BN), N - 1)
            grp0 = (b << int(np.log2(gpb))) if group < 128 else (b * 128) // group
            sS = np.stack([scales[wr, grp0 + gi] for gi in range(gpb)])        # [gpb, BN]
            sO = np.stack([offsets[wr, grp0 + gi] for gi in range(gpb)]) if asym else None
            sA_flat = sA.reshape(BM, 256)
            for w in range(WARPS):
                wr0 = 32 * w
                # wv[r]: 16 bytes at row wr0 + g + 8r, column 16t -> 4 little-endian words
                wv = [np.stack([sW[wr0 + G_IDX[ln] + 8 * r, 16 * T_IDX[ln]:16 * T_IDX[ln] + 16]
                                for ln in range(32)]) for r in range(4)]
                words = [np.ascontiguousarray(x).view("<u4").astype(np.uint32) for x in wv]  # [32, 4]
                s2 = o2 = None
                for q in range(2):
                    if q == 0 or gsh == 4:
                        gi = (32 * T_IDX + 16 * q) >> gsh
                        rowi = [wr0 + G_IDX + 8 * r for r in range(4)]
                        s2 = [sS[gi, rowi[r]] for r in range(4)]
                        o2 = [sO[gi, rowi[r]] if asym else np.zeros(32) for r in range(4)]
                        s2 = [_round(x.astype(np.float64), dtype) for x in s2]
                        o2 = [_round(x.astype(np.float64), dtype) for x in o2]
                    pr = [[[byte_perm(words[r][:, 2 * q + ss], 0, sel) for sel in (0x4140, 0x4342)]
                           for ss in range(2)] for r in range(4)]
                    for hi in range(2):
                        # af[ss][i][reg] -> (lo lane, hi lane) float64 values per lane
                        af = [[[dequant_pair(pr[2 * i + (reg & 1)][ss][reg >> 1], s2[2 * i + (reg & 1)],
                                             o2[2 * i + (reg & 1)], bool(hi), dtype, asym)
                                for reg in range(4)] for i in range(2)] for ss in range(2)]
                        chunk = hi * 8 + 2 * T_IDX + q
                        for j in range(NT):
                            tok = 8 * j + G_IDX
                            byte0 = tok * 256 + ((chunk ^ (G_IDX & 1)) << 4)
                            bv = np.stack([sA_flat[tok[ln], byte0[ln] - tok[ln] * 256:byte0[ln] - tok[ln] * 256
                                                   + 16] for ln in range(32)]).view("<u4").astype(np.uint32)
                            for ss in range(2):
                                b0 = np.stack(_lanes16(bv[:, 2 * ss], dtype))
                                b1 = np.stack(_lanes16(bv[:, 2 * ss + 1], dtype))
                                for i in range(2):
                                    acc[w, i, j] += mma_m16n8k16(af[ss][i], b0, b1)
        # ---- epilogue: fragments -> sC[token][n] -> out / the split's slab
        sC = np.zeros((BM, BN))
        for w in range(WARPS):
            for i in range(2):
                for j in range(NT):
                    for e in range(4):
                        n = 32 * w + 16 * i + G_IDX + 8 * (e >> 1)
                        m = 8 * j + 2 * T_IDX + (e & 1)
                        sC[m, n] = acc[w, i, j, e]
        rows = min(BM, M - m0)
        cols = min(BN, N - n0)
        out[m0:m0 + rows, n0:n0 + cols] += sC[:rows, :cols]
    return out


def mma_m16n8k16(a_regs, b0, b1) -> np.ndarray:
    """D = A B for one m16n8k16 from per-lane registers: a_regs[reg] = (lo, hi) values [2, 32],
    b0 / b1 = [2, 32].  Returns the C fragment [4, 32] (c0..c3 per lane)."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for ln in range(32):
        g, t = G_IDX[ln], T_IDX[ln]
        for reg, (row, k) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
            A[row, k] = a_regs[reg][0][ln]
            A[row, k + 1] = a_regs[reg][1][ln]
        B[2 * t, g], B[2 * t + 1, g] = b0[0][ln], b0[1][ln]
        B[2 * t + 8, g], B[2 * t + 9, g] = b1[0][ln], b1[1][ln]
    C = A @ B
    frag = np.zeros((4, 32))
    for ln in range(32):
        g, t = G_IDX[ln], T_IDX[ln]
        frag[:, ln] = C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]
    return frag


# ---------------------------------------------------------------------------- tests
def _case(m, n, nb, group, asym, dtype, seed):
    gen = np.random.default_rng(seed)
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    a = torch.from_numpy(gen.standard_normal((m, nb * 128))).to(tdt)
    a16 = a.view(torch.int16).numpy().view(np.float16 if dtype == "fp16" else np.uint16)
    a_vals = a.to(torch.float64).numpy()
    qweight = gen.integers(0, 256, size=(n, nb * 64), dtype=np.uint8)
    g = nb * 128 if group == -1 else group
    scales = (gen.random((n, nb * 128 // g)) * 0.02 + 0.001).astype(np.float32)
    offsets = (gen.standard_normal((n, nb * 128 // g)) * 0.01).astype(np.float32) if asym else None
    return a16, a_vals, qweight, scales, offsets, g


@pytest.mark.parametrize("tile,m,n,nb,group,asym,dtype,split", [
    ("t16", 1, 136, 2, 128, True, "fp16", 1),      # decode row, N past a tile edge
    ("t16", 5, 128, 3, 32, False, "fp16", 2),      # G = 32: one group per thread, split-K
    ("t32", 19, 72, 2, 16, True, "bf16", 1),       # G = 16: two groups per thread (q = 0 / 1)
    ("t64", 40, 130, 2, 64, True, "fp16", 3),      # G = 64, a split with no blocks (writes zeros)
    ("wide", 9, 260, 1, -1, False, "bf16", 1),     # per-channel scales, 8 warps
    ("t16", 40, 136, 2, 128, True, "fp16", 2),     # COMETQ_W16_TILE_N16: 3 token tiles, the last partial
    ("t32", 64, 130, 2, 32, False, "bf16", 1),     # COMETQ_W16_TILE_N32 at M = 64: 2 token tiles
])
def test_emulated_w16_gemm_is_the_definition(tile, m, n, nb, group, asym, dtype, split):
    a16, a_vals, qweight, scales, offsets, g = _case(m, n, nb, group, asym, dtype, seed=m * 131 + n)
    want = a_vals @ dequant_weights_half_split(qweight, scales, offsets, g, dtype).T
    # the ops layer's reference of the w16 GEMM is the same definition
    from cometq import ops
    from cometq.layout import weights_block_major

    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    a_t = torch.from_numpy(a_vals).to(tdt)
    qw_t = torch.from_numpy(qweight)
    off_t = None if offsets is None else torch.from_numpy(offsets)
    for qwt in (qw_t, weights_block_major(qw_t)):
        ref = ops._ref_w16_gemm(a_t, qwt, torch.from_numpy(scales), off_t, g, None, torch.float32)
        np.testing.assert_allclose(ref.double().numpy(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    for block_major in (False, True):
        got = emulate_w16_gemm(a16, qweight, scales, offsets, g, dtype, tile, split, block_major)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_magic_exponent_dequant_every_nibble_and_byte_lane():
    """Every stored byte through both PRMT selectors and both nibble masks gives v exactly
    (fp16 and bf16), with v the two's-complement nibble of the right byte."""
    byte = np.arange(256, dtype=np.uint32)
    word = byte | ((255 - byte) << 8) | (((byte * 7) & 0xFF) << 16) | (((byte * 13 + 5) & 0xFF) << 24)
    nib = lambda x: np.where(x >= 8, x.astype(np.int64) - 16, x).astype(np.float64)  # noqa: E731
    for dtype in ("fp16", "bf16"):
        for sel, (b_lo, b_hi) in ((0x4140, (0, 1)), (0x4342, (2, 3))):
            pair = byte_perm(word, 0, sel)
            for hi in (False, True):
                v = dequant_pair(pair, 1.0, 0.0, hi, dtype, asym=False)
                for lane, bi in enumerate((b_lo, b_hi)):
                    src = (word >> (8 * bi)) & 0xFF
                    want = nib((src >> 4) & 0xF if hi else src & 0xF)
                    assert np.array_equal(v[lane], want), (dtype, hex(sel), hi, lane)


def test_k_slots_cover_each_position_once_per_block():
    """Over a warp's 8 k steps x 16 slots the (thread, step, slot) -> half-split position map of the
    kernel header is a bijection onto 0..127, and weights and A' agree on it."""
    seen = {}
    for q in range(2):
        for ss in range(2):
            for hi in range(2):
                sp = 2 * q + ss
                for t in range(4):
                    j0 = 16 * t + 4 * sp + 64 * hi
                    for slot, pos in ((2 * t, j0), (2 * t + 1, j0 + 1), (2 * t + 8, j0 + 2), (2 * t + 9, j0 + 3)):
                        key = (q, ss, hi, slot)
                        assert key not in seen
                        seen[key] = pos
                        # A' side: chunk (hi * 8 + 2t + q), 16 bytes = positions 8 * chunk .. + 7;
                        # word 2 ss / 2 ss + 1 of it = b0 / b1
                        chunk = hi * 8 + 2 * t + q
                        word = 2 * ss + (slot >= 8)
                        assert 8 * chunk + 2 * word + (slot % 2) == pos
    assert sorted(seen.values()) == sorted(list(range(128)) * 1)


# ---------------------------------------------------------------------------- the wgmma kernel
# tile variants of w16_wgmma_kernel (csrc/w16_gemm.cu W16WgCfg): (BM tokens, MT m64 weight tiles per
# warpgroup, WG warpgroups)
WG_TILES = {"wg64": (64, 2, 1), "wg64r64": (64, 1, 1), "wg32": (32, 2, 1), "wg64w": (64, 2, 2), "wg16": (16, 2, 1)}
WG_LBO, WG_SBO = 8 * 128, 16 * 128


def wgmma_m64nk16(a_frag, smem: np.ndarray, start: int, n: int, dtype) -> np.ndarray:
    """One wgmma.m64nNk16 as the PTX ISA defines it, from the kernel's operands: ``a_frag[w][reg]`` =
    (lo, hi) float64 lane values [2, 32] of warp w's four A registers (the m16n8k16 A layout, warp w
    holding rows 16w .. 16w+15), B (16 x n, K-major, no swizzle) read through a descriptor with
    start address ``start``, LBO and SBO from the byte array ``smem``: element (k, j) is the 16-bit
    value at start + (j // 8) * SBO + (k // 8) * LBO + (j % 8) * 16 + (k % 8) * 2.  Returns the
    64 x n product (float64)."""
    A = np.zeros((64, 16))
    for w in range(4):
        for ln in range(32):
            g, t = G_IDX[ln], T_IDX[ln]
            for reg, (row, k) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                A[16 * w + row, k] = a_frag[w][reg][0][ln]
                A[16 * w + row, k + 1] = a_frag[w][reg][1][ln]
    B = np.zeros((16, n))
    for k in range(16):
        for j in range(n):
            off = start + (j // 8) * WG_SBO + (k // 8) * WG_LBO + (j % 8) * 16 + (k % 8) * 2
            bits = np.uint32(smem[off]) | (np.uint32(smem[off + 1]) << 8)
            B[k, j] = _lanes16(np.array([bits], np.uint32), dtype)[0][0]
    return A @ B


def emulate_w16_wgmma(a16: np.ndarray, qweight: np.ndarray, scales, offsets, group: int, dtype, tile: str,
                      split: int, block_major: bool = False) -> np.ndarray:
    """out[m, n] as w16_wgmma_kernel computes it: its stage loader's shared-memory layouts (the
    swizzled W tile, the core-matrix A' tile), its per-thread weight words and dequantization, the
    wgmma fragment / descriptor semantics of the PTX ISA, its epilogue indices (float64 sums)."""
    BM, MT, WG = WG_TILES[tile]
    BN, THREADS = 64 * MT * WG, 128 * WG
    assert group >= 128, "the wgmma kernel takes G >= 128 only"
    M, K_pad = a16.shape
    N = qweight.shape[0]
    nb = K_pad // 128
    asym = offsets is not None
    w_mem = np.ascontiguousarray(qweight.reshape(N, nb, 64).transpose(1, 0, 2)) if block_major else None
    a_bytes = a16.view(np.uint8).reshape(M, K_pad * 2)
    out = np.zeros((M, N))
    lanes = np.arange(32)
    g, t = G_IDX, T_IDX
    for kb0, kb1, m0, n0 in _ctas(M, N, nb, BM, BN, split):
        acc = np.zeros((WG, MT, 64, BM))  # the D tiles, row = weight row within the m64 tile
        for b in range(kb0, kb1):
            # ---- w16wg_load_stage, thread by thread (every destination written exactly once)
            sW = np.full(BN * 64, -1, np.int32)
            sA = np.full(BM * 256, -1, np.int32)
            for tid in range(THREADS):
                for i in range(BN * 4 // THREADS):
                    idx = tid + i * THREADS
                    r, j = idx >> 2, idx & 3
                    dst = r * 64 + ((j ^ ((r >> 1) & 3)) << 4)
                    assert np.all(sW[dst:dst + 16] == -1)
                    if n0 + r < N:
                        src = (w_mem[b, n0 + r, 16 * j:16 * j + 16] if block_major
                               else qweight[n0 + r, b * 64 + 16 * j:b * 64 + 16 * j + 16])
                    else:
                        src = np.zeros(16, np.uint8)
                    sW[dst:dst + 16] = src
                for i in range(BM * 16 // THREADS):
                    idx = tid + i * THREADS
                    r, c = (idx & 7) + ((idx >> 7) << 3), (idx >> 3) & 15
                    dst = (r >> 3) * WG_SBO + c * 128 + (r & 7) * 16
                    assert np.all(sA[dst:dst + 16] == -1)
                    sA[dst:dst + 16] = (a_bytes[m0 + r, b * 256 + 16 * c:b * 256 + 16 * c + 16]
                                        if m0 + r < M else 0)
            assert np.all(sW >= 0) and np.all(sA >= 0)
            sW8 = sW.astype(np.uint8)
            sA8 = sA.astype(np.uint8)
            wr = np.minimum(n0 + np.arange(BN), N - 1)
            grp = (b * 128) // group
            sS = scales[wr, grp]
            sO = offsets[wr, grp] if asym else np.zeros(BN)
            key = (g >> 1) & 3
            sel = np.where(t & 1, 0x4342, 0x4140)
            for c, wg, i in itertools.product(range(8), range(WG), range(MT)):
                frag_w = []
                for w in range(4):
                    regs = [None] * 4
                    for h in range(2):
                        rows = wg * 64 * MT + 64 * i + 16 * w + g + 8 * h
                        byte = rows * 64 + ((t >> 1) << 2) + (((c >> 1) ^ key) << 4) + 8 * (c & 1)
                        word = (sW8[byte].astype(np.uint32) | (sW8[byte + 1].astype(np.uint32) << 8)
                                | (sW8[byte + 2].astype(np.uint32) << 16)
                                | (sW8[byte + 3].astype(np.uint32) << 24))
                        pair = np.stack([byte_perm(word[ln:ln + 1], 0, int(sel[ln]))[0] for ln in lanes])
                        s = _round(sS[rows].astype(np.float64), dtype)
                        o = _round(sO[rows].astype(np.float64), dtype) if asym else np.zeros(32)
                        regs[h] = dequant_pair(pair, s, o, False, dtype, asym)      # a0 / a1
                        regs[2 + h] = dequant_pair(pair, s, o, True, dtype, asym)   # a2 / a3
                    frag_w.append(regs)
                acc[wg, i] += wgmma_m64nk16(frag_w, sA8, c * 128, BM, dtype)
        # ---- epilogue: D fragments -> sC[token][n] -> out / the split's slab
        sC = np.zeros((BM, BN))
        for wg, i, w in itertools.product(range(WG), range(MT), range(4)):
            for r in range(BM // 2):
                n = wg * 64 * MT + 64 * i + 16 * w + g + 8 * ((r >> 1) & 1)
                m = 8 * (r >> 2) + 2 * t + (r & 1)
                # the D fragment of the PTX ISA: element r of lane (g, t) in warp w of warpgroup wg
                sC[m, n] = acc[wg, i][16 * w + g + 8 * ((r >> 1) & 1), 8 * (r >> 2) + 2 * t + (r & 1)]
        rows = min(BM, M - m0)
        cols = min(BN, N - n0)
        out[m0:m0 + rows, n0:n0 + cols] += sC[:rows, :cols]
    return out


@pytest.mark.parametrize("tile,m,n,nb,group,asym,dtype,split", [
    ("wg64", 64, 136, 2, 128, True, "fp16", 1),     # N past a tile edge, asymmetric
    ("wg64", 40, 128, 3, -1, False, "bf16", 2),     # per-channel scales, a partial token tile, split-K
    ("wg64r64", 70, 72, 2, 128, True, "bf16", 1),   # two token tiles, the last with 6 rows
    ("wg32", 33, 130, 4, 256, False, "fp16", 3),    # G = 256 (two blocks per group), 3 splits
    ("wg64w", 64, 300, 2, 128, True, "bf16", 2),    # two warpgroups (256 rows), N past the tile edge
    ("wg16", 5, 130, 3, 128, True, "fp16", 2),      # the M <= 16 tile: 5 tokens, split-K
])
def test_emulated_w16_wgmma_is_the_definition(tile, m, n, nb, group, asym, dtype, split):
    a16, a_vals, qweight, scales, offsets, g = _case(m, n, nb, group, asym, dtype, seed=m * 7 + n)
    want = a_vals @ dequant_weights_half_split(qweight, scales, offsets, g, dtype).T
    for block_major in (False, True):
        got = emulate_w16_wgmma(a16, qweight, scales, offsets, g, dtype, tile, split, block_major)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_wgmma_k_steps_pair_a_and_b_on_the_same_positions():
    """Per k-step c the A fragment's k slots (thread t: 2t, 2t+1 of the low nibbles, 8+2t, 9+2t of the
    high ones of half-word 4c + t) and B's (chunk c, then chunk c + 8 of A') carry the same half-split
    positions, and over the 8 k-steps every position of the block once."""
    seen = []
    for c in range(8):
        for t in range(4):
            byte0 = 2 * (4 * c + t)                       # half-word 4c + t of the row's 64 bytes
            a_pos = {2 * t: byte0, 2 * t + 1: byte0 + 1, 8 + 2 * t: 64 + byte0, 9 + 2 * t: 64 + byte0 + 1}
            for slot, pos in a_pos.items():
                b_pos = 8 * (c if slot < 8 else c + 8) + slot % 8  # core matrix slot // 8, element slot % 8
                assert b_pos == pos, (c, t, slot)
                seen.append(pos)
    assert sorted(seen) == list(range(128))
