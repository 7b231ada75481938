"""CPU emulation of csrc/kv4_attention.cu (the CUDA paged KV4 decode attention kernel).

The kernel builds every tensor-core operand in registers from the packed pool bytes, with a
channel and token assignment that is easy to get wrong and impossible to check without a GPU
unless transcribed: which bytes each lane loads, how nibbles become fp16 pairs (byte permute +
lop3), how the key scales fold into the query and the offsets into a bias computed on the
MMA, how P reaches the PV MMA through movmatrix, the lazy online softmax, the key-group split
over warps and CTAs, the fp16 tail, the warp merge and the split reduce.  This file transcribes
the kernel into numpy with the 32 lanes of a warp as vectors, executes the MMA and movmatrix
instructions from their PTX ISA fragment definitions (independent of the kernel's channel
assignment), runs the kernel's lop3 from its PTX text (cometq.testing.run_ptx), and holds the
result to cometq.paged.kv4_decode_attention_reference like the real kernel
(tests/test_cuda_kv4_attention.py, on a GPU).

If you change an index formula in csrc/kv4_attention.cu, change it here too.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from cometq.paged import kv4_decode_attention_reference
from cometq.testing import ATTN_FP16_ATOL, ATTN_FP16_RTOL, byte_perm, run_ptx

LANE = np.arange(32)
G_, T_ = LANE >> 2, LANE & 3  # groupID, threadID_in_group
U32 = np.uint32
NEG = np.float32(-np.inf)
LAZY = 8.0
WARPS = 4


# --------------------------------------------------------------------------
# bit / fp16 helpers
# --------------------------------------------------------------------------
def _asm_lop3():
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "kv4_attention.cu")).read()
    body = src[src.index("uint32_t lop3_and_or("):]
    return re.sub(r"%(\d)", r"$\1", re.search(r'asm\("([^"]*)"', body).group(1))


def lop3_and_or(x, mask, bits):
    return (x & U32(mask)) | U32(bits)


def halves(u):
    """u32 words -> (low half, high half) as float16."""
    u = np.asarray(u, dtype=U32)
    return (u & U32(0xFFFF)).astype(np.uint16).view(np.float16), (u >> U32(16)).astype(np.uint16).view(np.float16)


def pack(lo, hi):
    lo = np.asarray(lo, dtype=np.float16).view(np.uint16).astype(U32)
    hi = np.asarray(hi, dtype=np.float16).view(np.uint16).astype(U32)
    return lo | (hi << U32(16))


def h2op(fn, *ws):
    """A half2 instruction: fn on float64 copies of the halves, one rounding to fp16."""
    parts = [halves(w) for w in ws]
    lo = fn(*[p[0].astype(np.float64) for p in parts])
    hi = fn(*[p[1].astype(np.float64) for p in parts])
    return pack(lo.astype(np.float16), hi.astype(np.float16))


def key_pair(w, sel):
    m = lop3_and_or(byte_perm(w, U32(0), sel * 0x1111), 0x00F0000F, 0x54006400)
    return h2op(lambda a, c: a - c, m, np.full_like(m, pack(np.float16(1024), np.float16(64))))


def mma_f16(c, a0, a1, a2, a3, b0, b1):
    """mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 from the PTX ISA fragment layouts."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for reg, (r0, k0) in zip((a0, a1, a2, a3), ((0, 0), (8, 0), (0, 8), (8, 8))):
        lo, hi = halves(reg)
        A[G_ + r0, 2 * T_ + k0], A[G_ + r0, 2 * T_ + k0 + 1] = lo, hi
    for reg, k0 in ((b0, 0), (b1, 8)):
        lo, hi = halves(reg)
        B[2 * T_ + k0, G_], B[2 * T_ + k0 + 1, G_] = lo, hi
    Dm = A @ B
    out = np.array(c, dtype=np.float64)
    out[:, 0] += Dm[G_, 2 * T_]
    out[:, 1] += Dm[G_, 2 * T_ + 1]
    out[:, 2] += Dm[G_ + 8, 2 * T_]
    out[:, 3] += Dm[G_ + 8, 2 * T_ + 1]
    return out.astype(np.float32)


def movmatrix_trans(x):
    """movmatrix.sync.aligned.m8n8.trans.b16: lane (g, t) holds M[g][2t], M[g][2t+1]; returns M^T's."""
    lo, hi = halves(x)
    M = np.zeros((8, 8), dtype=np.float16)
    M[G_, 2 * T_], M[G_, 2 * T_ + 1] = lo, hi
    return pack(M.T[G_, 2 * T_], M.T[G_, 2 * T_ + 1])


def shfl_xor(v, off):
    return v[LANE ^ off]


def words(buf, nbytes):
    """[32, nbytes] uint8 -> list of u32 words per lane."""
    return [buf[:, 4 * i:4 * i + 4].copy().view("<u4")[:, 0].astype(U32) for i in range(nbytes // 4)]


# --------------------------------------------------------------------------
# the kernel, per CTA (batch row b, kv head, split)
# --------------------------------------------------------------------------
def emulate(q, kp, ks, kz, vp, vs, vz, tk, tv, bt, qlen, tlen, sids, G, sm_scale, nsplit):
    B, Hq, D = q.shape
    NB, H, BS, _ = kp.shape
    qpk = Hq // H
    KC, QW = D // 16, D // 8
    vpg = D // G
    qk_scale = np.float32(sm_scale * 1.4426950408889634)
    kp_rows = kp.reshape(-1, D // 2)  # pool row (block * H + head) * BS + token
    vp_rows = vp.reshape(-1, D // 2)
    vs_rows, vz_rows = vs.reshape(-1, vpg), vz.reshape(-1, vpg)
    out = np.zeros((B, Hq, D), dtype=np.float32)  # rounded to the IO dtype by the caller (the kernel's store)
    part_o = np.zeros((B, Hq, nsplit, D), dtype=np.float32)
    part_ml = np.zeros((B, Hq, nsplit, 2), dtype=np.float32)
    for b in range(B):
        for kvh in range(H):
            for split in range(nsplit):
                slot = int(sids[b])
                lq, lt = int(qlen[slot]), int(tlen[slot])
                ng = (lq + G - 1) // G
                per = (ng + nsplit - 1) // nsplit
                g_begin = min(split * per, ng)
                g_end = min(g_begin + per, ng)
                tail = split == nsplit - 1 and lt > 0
                n_items = g_end - g_begin + (1 if tail else 0)
                # query of head g in shared memory: lane -> QW half2 (channels t*D/4 ..)
                qrow = np.zeros((32, D // 4), dtype=np.float32)
                ok = G_ < qpk
                for lane in range(32):
                    if ok[lane]:
                        h = kvh * qpk + G_[lane]
                        qrow[lane] = q[b, h, T_[lane] * (D // 4):(T_[lane] + 1) * (D // 4)].astype(np.float32)
                qsc = (qrow * qk_scale).astype(np.float16)
                s_q = [pack(qsc[:, 2 * j], qsc[:, 2 * j + 1]) for j in range(QW)]
                warps = []
                for warp in range(WARPS):
                    m = np.full((32, 2), NEG, dtype=np.float32)
                    lsum = np.zeros((32, 2), dtype=np.float32)
                    o = np.zeros((KC, 32, 4), dtype=np.float32)
                    vgrp = G_ * (D // 8) // G
                    for it in range(warp, n_items, WARPS):
                        gi = g_begin + it
                        if gi < g_end:
                            tok0 = gi * G
                            phys = int(bt[slot, tok0 // BS])
                            in_blk = tok0 % BS
                            head_row = (phys * H + kvh) * BS
                            srow = ((phys * H + kvh) * (BS // G) + in_blk // G)
                            sc_h = ks.reshape(-1, D)[srow]
                            z_h = kz.reshape(-1, D)[srow]
                            ksc = [pack(np.array([sc_h[T_[l] * (D // 4) + 2 * j] for l in range(32)]),
                                        np.array([sc_h[T_[l] * (D // 4) + 2 * j + 1] for l in range(32)]))
                                   for j in range(QW)]
                            kzw = [pack(np.array([z_h[T_[l] * (D // 4) + 2 * j] for l in range(32)]),
                                        np.array([z_h[T_[l] * (D // 4) + 2 * j + 1] for l in range(32)]))
                                   for j in range(QW)]
                            qs = s_q
                            qp = [h2op(lambda a, c: a * c, qs[j], ksc[j]) for j in range(QW)]
                            bias = np.zeros((32, 4), dtype=np.float32)
                            for c in range(KC):
                                bias = mma_f16(bias, kzw[2 * c], kzw[2 * c], kzw[2 * c + 1], kzw[2 * c + 1], qs[2 * c],
                                               qs[2 * c + 1])
                            ntile = min(G, lq - tok0 + 15) // 16
                            for u in range(ntile):
                                ttok = tok0 + 16 * u
                                row0 = head_row + in_blk + 16 * u
                                nv = min(16, lq - ttok)
                                # load_tile
                                kb = np.zeros((2, 32, D // 8), dtype=np.uint8)
                                for h in range(2):
                                    tok = G_ + 8 * h
                                    for lane in range(32):
                                        if tok[lane] < nv:
                                            kb[h, lane] = kp_rows[row0 + tok[lane], T_[lane] * (D // 8):
                                                                  (T_[lane] + 1) * (D // 8)]
                                vb = np.zeros((4, 32, D // 16), dtype=np.uint8)
                                scv = np.zeros((4, 32), dtype=np.float16)
                                zrv = np.zeros((4, 32), dtype=np.float16)
                                for j in range(4):
                                    tok = 2 * T_ + (j & 1) + 8 * (j >> 1)
                                    for lane in range(32):
                                        if tok[lane] < nv:
                                            vb[j, lane] = vp_rows[row0 + tok[lane], G_[lane] * (D // 16):
                                                                  (G_[lane] + 1) * (D // 16)]
                                            scv[j, lane] = vs_rows[row0 + tok[lane], vgrp[lane]]
                                            zrv[j, lane] = vz_rows[row0 + tok[lane], vgrp[lane]]
                                kw = [words(kb[h], D // 8) for h in range(2)]
                                acc = [bias.copy(), np.zeros_like(bias)]  # even / odd k-chunks
                                for c in range(KC):
                                    w, sel = (2 * c) // 4, (2 * c) % 4
                                    acc[c & 1] = mma_f16(acc[c & 1], key_pair(kw[0][w], sel), key_pair(kw[1][w], sel),
                                                         key_pair(kw[0][w], sel + 1), key_pair(kw[1][w], sel + 1),
                                                         qp[2 * c], qp[2 * c + 1])
                                s = (acc[0] + acc[1]).astype(np.float32)
                                if ttok + 16 > lq:
                                    s[ttok + G_ >= lq, 0:2] = NEG
                                    s[ttok + G_ + 8 >= lq, 2:4] = NEG
                                m, lsum, o, pb0, pb1 = softmax_tile(s, m, lsum, o)
                                # pv_tile
                                vw = [words(np.ascontiguousarray(vb[j]), max(4, D // 16)) for j in range(4)]
                                s01, z01 = pack(scv[0], scv[1]), pack(zrv[0], zrv[1])
                                s89, z89 = pack(scv[2], scv[3]), pack(zrv[2], zrv[3])
                                lo_off = pack(np.float16(1024), np.float16(1024))
                                hi_off = pack(np.float16(64), np.float16(64))
                                for i in range(KC):
                                    w, sel = i // 4, i % 4
                                    sel2 = sel * 0x0011 + (sel + 4) * 0x1100
                                    x01 = byte_perm(vw[0][w], vw[1][w], sel2)
                                    x89 = byte_perm(vw[2][w], vw[3][w], sel2)

                                    def deq(x, mask, bits, off, sc, zr):
                                        n = h2op(lambda a, c: a - c, lop3_and_or(x, mask, bits), np.full(32, off, U32))
                                        return h2op(lambda a, c, e: a * c + e, n, sc, zr)

                                    a0 = deq(x01, 0x000F000F, 0x64006400, lo_off, s01, z01)
                                    a1 = deq(x01, 0x00F000F0, 0x54005400, hi_off, s01, z01)
                                    a2 = deq(x89, 0x000F000F, 0x64006400, lo_off, s89, z89)
                                    a3 = deq(x89, 0x00F000F0, 0x54005400, hi_off, s89, z89)
                                    o[i] = mma_f16(o[i], a0, a1, a2, a3, pb0, pb1)
                        else:
                            # the fp16 tail
                            qs = s_q
                            base = tk[slot, kvh]  # [G, D] fp16
                            vbase = tv[slot, kvh]
                            u = 0
                            while u * 16 < lt:
                                s = np.zeros((32, 4), dtype=np.float32)
                                kr = []
                                for h in range(2):
                                    tok = 16 * u + G_ + 8 * h
                                    rows = np.zeros((32, D // 4), dtype=np.float16)
                                    for lane in range(32):
                                        if tok[lane] < lt:
                                            rows[lane] = base[tok[lane], T_[lane] * (D // 4):(T_[lane] + 1) * (D // 4)]
                                    kr.append([pack(rows[:, 2 * j], rows[:, 2 * j + 1]) for j in range(QW)])
                                for c in range(KC):
                                    s = mma_f16(s, kr[0][2 * c], kr[1][2 * c], kr[0][2 * c + 1], kr[1][2 * c + 1],
                                                qs[2 * c], qs[2 * c + 1])
                                s[16 * u + G_ >= lt, 0:2] = NEG
                                s[16 * u + G_ + 8 >= lt, 2:4] = NEG
                                m, lsum, o, pb0, pb1 = softmax_tile(s, m, lsum, o)
                                tk0 = 16 * u + 2 * T_
                                for i in range(KC):
                                    w = []
                                    for j in range(4):
                                        tok = tk0 + (j & 1) + 8 * (j >> 1)
                                        hv = np.zeros((32, 2), dtype=np.float16)
                                        for lane in range(32):
                                            if tok[lane] < lt:
                                                d0 = G_[lane] * (D // 8) + 2 * i
                                                hv[lane] = vbase[tok[lane], d0:d0 + 2]
                                        w.append(pack(hv[:, 0], hv[:, 1]))
                                    o[i] = mma_f16(o[i], byte_perm(w[0], w[1], 0x5410), byte_perm(w[0], w[1], 0x7632),
                                                   byte_perm(w[2], w[3], 0x5410), byte_perm(w[2], w[3], 0x7632), pb0,
                                                   pb1)
                                u += 1
                    for off in (4, 8, 16):
                        lsum = lsum + shfl_xor(lsum, off)
                    warps.append((m, lsum, o))
                # merge the warps (s_ml / s_o)
                s_ml = np.zeros((WARPS, 8, 2), dtype=np.float32)
                s_o = np.zeros((WARPS, 8, D), dtype=np.float32)
                for wi, (m, lsum, o) in enumerate(warps):
                    for lane in np.nonzero(G_ == 0)[0]:
                        for h in range(2):
                            s_ml[wi, 2 * T_[lane] + h] = (m[lane, h], lsum[lane, h])
                    for i in range(KC):
                        d = G_ * (D // 8) + 2 * i
                        s_o[wi, 2 * T_, d] = o[i][:, 0]
                        s_o[wi, 2 * T_ + 1, d] = o[i][:, 1]
                        s_o[wi, 2 * T_, d + 1] = o[i][:, 2]
                        s_o[wi, 2 * T_ + 1, d + 1] = o[i][:, 3]
                for h in range(qpk):
                    mw = s_ml[:, h, 0].max()
                    if mw != NEG:
                        f = np.exp2(s_ml[:, h, 0] - mw).astype(np.float32)
                        lt_ = np.float32((f * s_ml[:, h, 1]).sum())
                        acc = (f[:, None] * s_o[:, h]).sum(0).astype(np.float32)
                    else:
                        lt_, acc = np.float32(0), np.zeros(D, np.float32)
                    head = kvh * qpk + h
                    if nsplit == 1:
                        out[b, head] = acc / lt_ if lt_ > 0 else np.zeros(D)
                    else:
                        part_o[b, head, split] = acc
                        part_ml[b, head, split] = (mw, lt_)
    if nsplit > 1:  # kv4_attn_reduce_kernel
        for b in range(B):
            for h in range(Hq):
                ml = part_ml[b, h]
                mw = ml[:, 0].max()
                if mw == NEG:
                    out[b, h] = 0
                    continue
                f = np.exp2(ml[:, 0] - mw)
                lt_ = (f * ml[:, 1]).sum()
                out[b, h] = (f[:, None] * part_o[b, h]).sum(0) / lt_ if lt_ > 0 else 0
    return out


def softmax_tile(s, m, lsum, o):
    """softmax_tile: s [32 lanes, 4] (token g / g+8 x head 2t / 2t+1); returns the new state and P^T frags."""
    mx = np.stack([np.maximum(s[:, 0], s[:, 2]), np.maximum(s[:, 1], s[:, 3])], 1)
    for off in (4, 8, 16):
        mx = np.maximum(mx, shfl_xor(mx, off))
    move = mx > m + LAZY
    if move.any():
        alpha = np.where(move, np.exp2(np.where(move, m - mx, 0)).astype(np.float32), np.float32(1))
        m = np.where(move, mx, m)
        lsum = lsum * alpha
        o = o * alpha[None, :, [0, 1, 0, 1]]
    mu = np.where(m == NEG, np.float32(0), m)
    pr = np.exp2(s - mu[:, [0, 1, 0, 1]]).astype(np.float32)
    lsum = lsum + pr[:, [0, 1]] + pr[:, [2, 3]]
    pb0 = movmatrix_trans(pack(pr[:, 0].astype(np.float16), pr[:, 1].astype(np.float16)))
    pb1 = movmatrix_trans(pack(pr[:, 2].astype(np.float16), pr[:, 3].astype(np.float16)))
    return m, lsum, o, pb0, pb1


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def _pool(D, G, H, qpk, lengths, tails, BS=64, seed=0, kscale=0.08):
    """Random pool tensors in the kernel's format (keys per channel, values per token), blocks shuffled."""
    g = torch.Generator().manual_seed(seed)
    S = len(lengths)
    nblk = [-(-n // BS) for n in lengths]
    NB = sum(nblk) + 3
    kp = torch.randint(0, 256, (NB, H, BS, D // 2), dtype=torch.uint8, generator=g)
    vp = torch.randint(0, 256, (NB, H, BS, D // 2), dtype=torch.uint8, generator=g)
    # keys: per-channel outliers (a few channels with large scales), zeros around -7.5 scale
    ks = (torch.rand(NB, H, BS // G, D, generator=g) * kscale + 0.01)
    ks[..., :: max(1, D // 8)] *= 6
    kz = -7.5 * ks + torch.randn(NB, H, BS // G, D, generator=g) * 0.05
    vs = torch.rand(NB, H, BS, D // G, generator=g) * 0.2 + 0.01
    vz = -7.5 * vs + torch.randn(NB, H, BS, D // G, generator=g) * 0.1
    tk = torch.randn(S, H, G, D, generator=g)
    tv = torch.randn(S, H, G, D, generator=g)
    perm = torch.randperm(NB, generator=g).tolist()
    bt = torch.full((S, max(nblk) + 1), -1, dtype=torch.int32)
    k = 0
    for s, n in enumerate(nblk):
        for i in range(n):
            bt[s, i] = perm[k]
            k += 1
    h16 = lambda t: t.to(torch.float16)  # noqa: E731
    return (kp, h16(ks), h16(kz), vp, h16(vs), h16(vz), h16(tk), h16(tv), bt,
            torch.tensor(lengths, dtype=torch.int32), torch.tensor(tails, dtype=torch.int32))


CASES = [
    # D, G, kv heads, qpk, quantized lengths, tail lengths, splits
    (128, 32, 2, 4, [64, 160], [5, 0], 1),      # the serving default (Llama-3 heads): whole groups + a tail
    (128, 32, 1, 8, [96, 224, 32], [31, 17, 1], 3),
    (64, 16, 3, 3, [48, 16], [15, 3], 2),       # SmolLM2 geometry (9 / 3 heads, head_dim 64)
    (64, 32, 2, 1, [0, 64], [7, 0], 1),         # only a tail; GQA 1
    (128, 64, 1, 2, [37, 128], [0, 12], 5),     # quant_lens not a multiple of G (mask), more splits than groups
    (128, 16, 1, 5, [80], [9], 2),              # 5 heads: padded columns of the n8 tile
]


def _run(case, io=torch.float16, seed_q=7, sids=None):
    """(emulated kernel output, reference) for a case; ``io``: the query / tail / output dtype."""
    D, G, H, qpk, lens, tails, splits = case
    kp, ks, kz, vp, vs, vz, tk, tv, bt, ql, tl = _pool(D, G, H, qpk, lens, tails, seed=D + G + qpk)
    tk, tv = tk.to(io), tv.to(io)
    S = len(lens)
    if sids is None:
        sids = torch.tensor(list(range(S))[::-1] + [0], dtype=torch.int32)  # permuted, repeated rows
    q = (torch.randn(len(sids), H * qpk, D, generator=torch.Generator().manual_seed(seed_q)) * 1.5).to(io)
    sm = 1 / math.sqrt(D)
    # numpy has no bf16: the kernel reads bf16 as float and rounds to fp16, which fp32 -> fp16 reproduces
    npy = lambda t: (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # noqa: E731
    got = emulate(npy(q), npy(kp), npy(ks), npy(kz), npy(vp), npy(vs), npy(vz), npy(tk), npy(tv), npy(bt), npy(ql),
                  npy(tl), npy(sids), G, sm, splits)
    ref = kv4_decode_attention_reference(q, kp, ks, kz, vp, vs, vz, tk, tv, bt, ql, tl, sids, G, "channel", "token",
                                         sm)
    return torch.from_numpy(got).to(io), ref


@pytest.mark.parametrize("D,G,H,qpk,lens,tails,splits", CASES)
def test_emulated_kernel_matches_reference(D, G, H, qpk, lens, tails, splits):
    got, ref = _run((D, G, H, qpk, lens, tails, splits))
    torch.testing.assert_close(got.float(), ref.float(), rtol=ATTN_FP16_RTOL, atol=ATTN_FP16_ATOL)


@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_bf16_io(case):
    """bf16 query / tail / output (fp16 inside): off by at most an output rounding (measured: 1 bf16 ulp)."""
    got, ref = _run(case, io=torch.bfloat16)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=ATTN_FP16_RTOL, atol=ATTN_FP16_ATOL)


def test_emulation_detects_a_wrong_channel_map():
    """The harness can fail: the same case with the key nibble pairs read from the wrong bytes."""
    global key_pair
    D, G, H, qpk, lens, tails, splits = CASES[0]
    kp, ks, kz, vp, vs, vz, tk, tv, bt, ql, tl = _pool(D, G, H, qpk, lens, tails, seed=1)
    sids = torch.arange(len(lens), dtype=torch.int32)
    q = torch.randn(len(lens), H * qpk, D, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    ref = kv4_decode_attention_reference(q, kp, ks, kz, vp, vs, vz, tk, tv, bt, ql, tl, sids, G, "channel", "token",
                                         1 / math.sqrt(D))
    good = key_pair
    try:
        key_pair = lambda w, sel: good(w, sel ^ 1)  # noqa: E731 - swaps the p = 0 / 1 bytes
        got = emulate(*(t.numpy() for t in (q, kp, ks, kz, vp, vs, vz, tk, tv, bt, ql, tl, sids)), G,
                      1 / math.sqrt(D), splits)
    finally:
        key_pair = good
    got = torch.from_numpy(got).half().float()
    assert not torch.allclose(got, ref.float(), rtol=ATTN_FP16_RTOL, atol=ATTN_FP16_ATOL)


def test_nibble_pairs_and_lop3_from_the_kernel_ptx():
    """The kernel's lop3 (its PTX text, executed) is (a & b) | c, and the key / value pairs it builds
    are the fp16 values {1024 + low nibble, 64 + high nibble} of every byte (keys: minus the offsets)."""
    rng = np.random.default_rng(0)
    x, m, c = (rng.integers(0, 2 ** 32, 256, dtype=np.uint64) for _ in range(3))
    regs = run_ptx(_asm_lop3(), {"$1": x, "$2": m, "$3": c})
    assert np.array_equal(regs["$0"], (x & m) | c)
    b = np.arange(256, dtype=U32)
    w = b | (U32(0xA5) << U32(8)) | (U32(0x3C) << U32(16)) | (U32(0x81) << U32(24))  # byte 0 = b
    lo, hi = halves(lop3_and_or(byte_perm(w, U32(0), 0), 0x00F0000F, 0x54006400))
    assert np.array_equal(lo.astype(np.float64), 1024 + (b & 15)) and np.array_equal(hi.astype(np.float64), 64 + (b >> 4))
    lo, hi = halves(key_pair(w, 0))  # offsets subtracted: the nibbles themselves
    assert np.array_equal(lo.astype(np.float64), b & 15) and np.array_equal(hi.astype(np.float64), b >> 4)
    # value pairs: byte `sel` of two token rows -> {1024 + lo(row a), 1024 + lo(row b)} / {64 + hi(a), 64 + hi(b)}
    wb = b[::-1].copy() << U32(16)  # byte 2 of the second row
    x01 = byte_perm(w << U32(16), wb, 2 * 0x0011 + 6 * 0x1100)
    lo, hi = halves(lop3_and_or(x01, 0x000F000F, 0x64006400))
    assert np.array_equal(lo.astype(np.float64), 1024 + (b & 15))
    assert np.array_equal(hi.astype(np.float64), 1024 + (b[::-1] & 15))
    lo, hi = halves(lop3_and_or(x01, 0x00F000F0, 0x54005400))
    assert np.array_equal(lo.astype(np.float64), 64 + (b >> 4)) and np.array_equal(hi.astype(np.float64), 64 + (b[::-1] >> 4))


def test_movmatrix_and_mma_fragment_models():
    """The emulated instructions against plain matrix algebra (so the kernel transcription is
    checked against the ISA, not against itself)."""
    rng = np.random.default_rng(1)
    M = rng.standard_normal((8, 8)).astype(np.float16)
    x = pack(M[G_, 2 * T_], M[G_, 2 * T_ + 1])
    lo, hi = halves(movmatrix_trans(x))
    assert np.array_equal(lo, M.T[G_, 2 * T_]) and np.array_equal(hi, M.T[G_, 2 * T_ + 1])
    A = rng.standard_normal((16, 16)).astype(np.float16)
    Bm = rng.standard_normal((16, 8)).astype(np.float16)
    a = [pack(A[G_ + r, 2 * T_ + k], A[G_ + r, 2 * T_ + k + 1]) for r, k in ((0, 0), (8, 0), (0, 8), (8, 8))]
    bb = [pack(Bm[2 * T_ + k, G_], Bm[2 * T_ + k + 1, G_]) for k in (0, 8)]
    c = mma_f16(np.zeros((32, 4), np.float32), *a, *bb)
    ref = A.astype(np.float64) @ Bm.astype(np.float64)
    assert np.allclose(c[:, 0], ref[G_, 2 * T_]) and np.allclose(c[:, 3], ref[G_ + 8, 2 * T_ + 1])
