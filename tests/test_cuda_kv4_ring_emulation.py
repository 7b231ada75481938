"""CPU emulation of launch variant 4 of csrc/kv4_attention.cu: the shared-memory ring.

Variant 4 (``kv4_attn_ring_kernel``) computes exactly what variant 0 computes, from operands read
out of a per-warp ring of shared-memory slots that cp.async fills ahead of the compute.  What can
go wrong is all index math, none of it visible without a GPU: which pool bytes each lane's 16-byte
copies take and where they land in a slot (padded V rows, zero-filled rows past the sequence's
end, partial scale chunks), whether what each lane then reads from the slot is byte for byte what
``load_tile`` reads from the pool, whether the ring's schedule (issue ahead, wait_group, warp
barriers, the block-table register per lane) ever reads a slot before its tile landed or reissues
it while it is still read, shared-memory bank conflicts of the reads, and the shared-memory budget
of 4 CTAs per SM.  This file transcribes ``ring_issue``, ``ring_read_tile``, ``ring_enter_group``,
the cursor of ``kv4_attn_ring_kernel`` and ``RingSlot`` into Python and checks each against ``load_tile``'s
reads (tests/test_cuda_kv4_emulation.py emulates that one, and the whole kernel, against the
reference).  On a GPU, tests/test_cuda_kv4_attention.py checks variant 4's output bit for bit
against variants 0-3.

If you change an index formula of the ring in csrc/kv4_attention.cu, change it here too.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

WARPS, STAGES = 4, 4  # kWarps, kRingStages
LANES = range(32)


# --------------------------------------------------------------------------
# RingSlot<D> (transcribed) and the constants read back from the source
# --------------------------------------------------------------------------
class Slot:
    def __init__(self, D):
        self.D = D
        self.v_stride = D // 2 + 16
        self.v = 16 * (D // 2)
        self.vs = self.v + 16 * self.v_stride
        self.vs_bytes = 16 * (D // 16) * 2
        self.vz = self.vs + self.vs_bytes
        self.ks = self.vz + self.vs_bytes
        self.kz = self.ks + 2 * D
        self.size = self.kz + 2 * D
        self.warp_bytes = STAGES * self.size
        self.cta_bytes = WARPS * self.warp_bytes


def _source():
    return open(os.path.join(os.path.dirname(__file__), "..", "csrc", "kv4_attention.cu")).read()


def test_transcribed_constants_match_the_source():
    src = _source()
    assert re.search(r"constexpr int kRingStages = (\d+);", src).group(1) == str(STAGES)
    assert re.search(r"constexpr int kWarps = (\d+);", src).group(1) == str(WARPS)
    body = src[src.index("struct RingSlot {"):src.index("};", src.index("struct RingSlot {"))]
    for line in ("kVStride = D / 2 + 16;", "kV = 16 * (D / 2);", "kVs = kV + 16 * kVStride;",
                 "kVsBytes = 16 * (D / 16) * 2;", "kVz = kVs + kVsBytes;", "kKs = kVz + kVsBytes;",
                 "kKz = kKs + 2 * D;", "kSize = kKz + 2 * D;", "kWarpBytes = kRingStages * kSize;"):
        assert line in body, line


@pytest.mark.parametrize("D", [64, 128])
def test_slot_layout_and_shared_memory_budget(D):
    L = Slot(D)
    # 16-byte cp.async destinations; areas in order, none overlapping
    assert all(x % 16 == 0 for x in (L.v_stride, L.v, L.vs, L.vz, L.ks, L.kz, L.size))
    assert L.v == 16 * (D // 2) and L.vs - L.v == 16 * L.v_stride and L.size - L.ks == 4 * D
    # the merge area (kHeads x D floats) of each warp lies inside its own ring
    assert L.warp_bytes >= 8 * D * 4
    # 4 CTAs per SM on sm_90 (228 KB per SM, 227 KB per CTA, 1 KB reserved per CTA): dynamic ring +
    # static s_ml (4 x 8 x 2 floats) + s_q (D/32 x 32 uint4); ptxas reports 2304 bytes static at D = 128
    static = WARPS * 8 * 2 * 4 + (D // 32) * 32 * 16
    assert 4 * (L.cta_bytes + static + 1024) <= 228 * 1024, (D, L.cta_bytes)
    if D == 128:
        assert L.size == 3328 and L.cta_bytes == 53248


# --------------------------------------------------------------------------
# ring_issue / ring_read_tile (transcribed) and load_tile's reads (the spec)
# --------------------------------------------------------------------------
def _pool(D, G, H, BS, NB, seed):
    rng = np.random.default_rng(seed)
    kp = rng.integers(0, 256, (NB, H, BS, D // 2), dtype=np.uint8)
    vp = rng.integers(0, 256, (NB, H, BS, D // 2), dtype=np.uint8)
    # scales / zeros as raw fp16 bit patterns (any value: the test follows bytes)
    ks = rng.integers(0, 1 << 16, (NB, H, BS // G, D), dtype=np.uint16)
    kz = rng.integers(0, 1 << 16, (NB, H, BS // G, D), dtype=np.uint16)
    vs = rng.integers(0, 1 << 16, (NB, H, BS, D // G), dtype=np.uint16)
    vz = rng.integers(0, 1 << 16, (NB, H, BS, D // G), dtype=np.uint16)
    return kp, vp, ks, kz, vs, vz


def ring_enter_group(D, G, H, BS, kvh, gi, phys, lq):
    """ring_enter_group: the cursor's per-group fields (u, tok0, ntile, row0, ks)."""
    in_blk = (gi * G) % BS
    return dict(u=0, tok0=gi * G, ntile=min(G, lq - gi * G + 15) // 16, row0=(phys * H + kvh) * BS + in_blk,
                ks=((phys * H + kvh) * (BS // G) + in_blk // G) * D)


def issue_args(cur, lq):
    """What issue_next passes ring_issue for the cursor's tile: (row0, n_valid, ks)."""
    u = cur["u"]
    return cur["row0"] + 16 * u, min(16, lq - cur["tok0"] - 16 * u), cur["ks"] if u == 0 else -1


def ring_issue(pool, D, G, row0, n_valid, ks, v_stride=None):
    """The slot bytes after one tile is copied (every lane's chunks); each byte is written at most once."""
    kp, vp, ksc, kzr, vs, vz = pool
    L = Slot(D)
    v_stride = L.v_stride if v_stride is None else v_stride
    slot = np.full(L.size, 0xEE, dtype=np.uint8)  # stale bytes from an earlier tile
    writes = np.zeros(L.size, dtype=np.int32)
    kb, vb = kp.reshape(-1), vp.reshape(-1)
    sb = {"vs": vs.reshape(-1).view(np.uint8), "vz": vz.reshape(-1).view(np.uint8),
          "ks": ksc.reshape(-1).view(np.uint8), "kz": kzr.reshape(-1).view(np.uint8)}

    def copy(dst, src, start, nbytes):  # cp.async 16 bytes, of which nbytes read (the rest zero-filled)
        assert 0 <= dst and dst + 16 <= L.size and dst % 16 == 0
        assert start % 16 == 0 and (nbytes == 0 or start + nbytes <= src.size)
        chunk = np.zeros(16, dtype=np.uint8)
        chunk[:nbytes] = src[start:start + nbytes]
        slot[dst:dst + 16] = chunk
        writes[dst:dst + 16] += 1

    CPR, NKV = D // 32, 16 * (D // 32)
    vpg = D // G
    for lane in LANES:
        for i in range(NKV // 32):
            c = lane + 32 * i
            r, pc = c // CPR, c % CPR
            copy(16 * c, kb, row0 * (D // 2) + 16 * c, 16 if r < n_valid else 0)
            copy(L.v + r * v_stride + 16 * pc, vb, row0 * (D // 2) + 16 * c, 16 if r < n_valid else 0)
        nvs = 2 * vpg
        if lane < 2 * nvs:
            zero = lane >= nvs
            c = lane - nvs if zero else lane
            valid = min(16, max(0, (n_valid * vpg - 8 * c) * 2))
            copy((L.vz if zero else L.vs) + 16 * c, sb["vz" if zero else "vs"], row0 * vpg * 2 + 16 * c, valid)
        if ks >= 0:
            NS = D // 8
            if lane < 2 * NS:
                zero = lane >= NS
                c = lane - NS if zero else lane
                copy((L.kz if zero else L.ks) + 16 * c, sb["kz" if zero else "ks"], ks * 2 + 16 * c, 16)
    assert writes.max() <= 1
    return slot


def issue_tile(pool, D, G, H, BS, kvh, gi, u, phys, lq, v_stride=None):
    """The slot after the cursor, entered at group gi, has advanced to tile u and issued it."""
    cur = ring_enter_group(D, G, H, BS, kvh, gi, phys, lq)
    cur["u"] = u
    return ring_issue(pool, D, G, *issue_args(cur, lq), v_stride=v_stride)


def ring_read_tile(slot, D, G, lane, v_stride=None):
    L = Slot(D)
    v_stride = L.v_stride if v_stride is None else v_stride
    g, t = lane >> 2, lane & 3
    vpg, vgrp = D // G, g * (D // 8) // G
    k = [bytes(slot[(g + 8 * h) * (D // 2) + t * (D // 8):][:D // 8]) for h in range(2)]
    v, sc, zr = [], [], []
    vs16, vz16 = slot[L.vs:L.vs + L.vs_bytes].view(np.uint16), slot[L.vz:L.vz + L.vs_bytes].view(np.uint16)
    for j in range(4):
        tok = 2 * t + (j & 1) + 8 * (j >> 1)
        v.append(bytes(slot[L.v + tok * v_stride + g * (D // 16):][:D // 16]))
        sc.append(int(vs16[tok * vpg + vgrp]))
        zr.append(int(vz16[tok * vpg + vgrp]))
    return k, v, sc, zr


def ring_read_key_scales(slot, D, lane):
    L = Slot(D)
    t = lane & 3
    at = lambda base: slot[base + t * (D // 32) * 16:][:D // 2].view(np.uint16).tolist()  # noqa: E731
    return at(L.ks), at(L.kz)


def load_tile_reads(pool, D, G, H, BS, kvh, gi, u, phys, lq, lane):
    """What load_tile (variants 0-3) puts in the lane's registers: the spec."""
    kp, vp, ks, kz, vs, vz = pool
    g, t = lane >> 2, lane & 3
    vgrp = g * (D // 8) // G
    tok0, in_blk = gi * G + 16 * u, (gi * G) % BS + 16 * u
    n_valid = min(16, lq - tok0)
    kr, vr = kp.reshape(-1, D // 2), vp.reshape(-1, D // 2)
    vsr, vzr = vs.reshape(-1, D // G), vz.reshape(-1, D // G)
    row0 = (phys * H + kvh) * BS + in_blk
    k = [bytes(kr[row0 + g + 8 * h, t * (D // 8):(t + 1) * (D // 8)]) if g + 8 * h < n_valid else bytes(D // 8)
         for h in range(2)]
    v, sc, zr = [], [], []
    for j in range(4):
        tok = 2 * t + (j & 1) + 8 * (j >> 1)
        ok = tok < n_valid
        v.append(bytes(vr[row0 + tok, g * (D // 16):(g + 1) * (D // 16)]) if ok else bytes(D // 16))
        sc.append(int(vsr[row0 + tok, vgrp]) if ok else 0)
        zr.append(int(vzr[row0 + tok, vgrp]) if ok else 0)
    srow = (phys * H + kvh) * (BS // G) + (gi * G) % BS // G
    kscale = ks.reshape(-1, D)[srow, t * (D // 4):(t + 1) * (D // 4)].tolist()
    kzero = kz.reshape(-1, D)[srow, t * (D // 4):(t + 1) * (D // 4)].tolist()
    return (k, v, sc, zr), (kscale, kzero)


CASES = [  # D, G, H, BS, lq (the last group partial where lq % G != 0)
    (128, 32, 2, 64, 200), (128, 64, 3, 64, 130), (128, 16, 1, 32, 57), (128, 128, 2, 128, 300),
    (64, 16, 2, 64, 75), (64, 32, 3, 32, 97), (64, 64, 1, 128, 129),
]


@pytest.mark.parametrize("D,G,H,BS,lq", CASES)
def test_slot_reads_are_load_tile_reads(D, G, H, BS, lq):
    """Every lane reads from its slot exactly the bytes / scales load_tile reads from the pool (zeros
    past the sequence's end), for every tile of every key group, and the group's key scales."""
    NB = 2 * (-(-lq // BS)) + 1
    pool = _pool(D, G, H, BS, NB, seed=D + G + lq)
    rng = np.random.default_rng(lq)
    blocks = rng.permutation(NB)  # the sequence's block table
    for kvh in range(H):
        for gi in range(-(-lq // G)):
            phys = int(blocks[gi * G // BS])
            for u in range(min(G, lq - gi * G + 15) // 16):
                slot = issue_tile(pool, D, G, H, BS, kvh, gi, u, phys, lq)
                for lane in LANES:
                    want, want_ks = load_tile_reads(pool, D, G, H, BS, kvh, gi, u, phys, lq, lane)
                    assert ring_read_tile(slot, D, G, lane) == want, (kvh, gi, u, lane)
                    if u == 0:
                        assert ring_read_key_scales(slot, D, lane) == want_ks


def test_the_slot_check_can_fail():
    """The same check with the V rows copied unpadded (the read side padded) fails."""
    D, G, H, BS, lq = CASES[0]
    pool = _pool(D, G, H, BS, 9, seed=1)
    slot = issue_tile(pool, D, G, H, BS, 1, 0, 0, 3, lq, v_stride=D // 2)
    want = [load_tile_reads(pool, D, G, H, BS, 1, 0, 0, 3, lq, lane)[0] for lane in LANES]
    assert [ring_read_tile(slot, D, G, lane) for lane in LANES] != want


# --------------------------------------------------------------------------
# shared-memory banks of the reads (one warp-wide request; 32 banks of 4 bytes)
# --------------------------------------------------------------------------
def _wavefronts(addrs, width):
    """Shared-memory wavefronts of one warp-wide load of `width` bytes per lane: lanes are served in
    phases of 128 bytes (32 lanes of 4, 16 of 8, 8 of 16); in a phase, distinct 4-byte words in one
    bank serialize."""
    per_phase = 128 // width
    total = 0
    for p0 in range(0, 32, per_phase):
        banks: dict = {}
        for a in addrs[p0:p0 + per_phase]:
            for w in range(a // 4, (a + width) // 4):
                banks.setdefault(w % 32, set()).add(w)
        total += max(len(s) for s in banks.values())
    return total


@pytest.mark.parametrize("D", [64, 128])
def test_slot_reads_are_bank_conflict_free(D):
    L = Slot(D)
    for h in range(2):  # K rows g, g + 8: D/8 bytes at t * D/8
        addrs = [((ln >> 2) + 8 * h) * (D // 2) + (ln & 3) * (D // 8) for ln in LANES]
        assert _wavefronts(addrs, D // 8) == 32 * (D // 8) // 128
    for j in range(4):  # V rows 2t + ...: D/16 bytes at g * D/16
        tok = lambda ln: 2 * (ln & 3) + (j & 1) + 8 * (j >> 1)  # noqa: E731
        addrs = [L.v + tok(ln) * L.v_stride + (ln >> 2) * (D // 16) for ln in LANES]
        assert _wavefronts(addrs, D // 16) == 32 * (D // 16) // 128, j
        # (the unpadded rows would conflict: the reason for the padding)
        flat = [L.v + tok(ln) * (D // 2) + (ln >> 2) * (D // 16) for ln in LANES]
        assert _wavefronts(flat, D // 16) > 32 * (D // 16) // 128


# --------------------------------------------------------------------------
# the warp's schedule: issue cursor, slots, wait_group, barriers, block-table registers
# --------------------------------------------------------------------------
D, H, KVH = 128, 3, 1  # (the schedule's pool geometry)


def _schedule(lq, G, BS, nsplit, split, warp, bt):
    """kv4_attn_ring_kernel's loop for one warp, transcribed, with the cp.async groups modelled:
    returns the (gi, u) tiles it computes, asserting at each read that the slot holds that tile and
    its copy group is complete, and at each issue that no lane still reads the slot."""
    ng = -(-lq // G)
    per = -(-ng // nsplit)
    g_begin = min(split * per, ng)
    g_end = min(g_begin + per, ng)
    g_first = g_begin + warp
    ntile = lambda gi: min(G, lq - gi * G + 15) // 16  # noqa: E731

    def group_block(k0, lane):
        gi = g_first + WARPS * (k0 + lane)
        return bt[gi * G // BS] if gi < g_end else 0

    # the cursor (RingCursor): group k, its per-group fields, the block-table registers
    cur = dict(k=0, phys=[group_block(0, ln) for ln in LANES])
    issuing = g_first < g_end

    def enter():  # ring_enter_group: phys by __shfl_sync from lane k & 31
        gi = g_first + WARPS * cur["k"]
        phys = cur["phys"][cur["k"] & 31]
        assert phys == bt[gi * G // BS], (gi, phys)
        cur.update(ring_enter_group(D, G, H, BS, KVH, gi, phys, lq), gi=gi)

    if issuing:
        enter()
    slots = [None] * STAGES  # tile held (or being copied into) each slot
    groups = []  # committed cp.async groups: the tile each copies (None: empty)
    done = 0  # groups known complete (waited on)
    last_read = {}  # slot -> tile index j that read it last

    def issue_next(s, j_now):
        nonlocal issuing
        if not issuing:
            return None
        assert last_read.get(s, -1) < j_now  # its last read came before the __syncwarp that starts step j_now
        row0, n_valid, ks = issue_args(cur, lq)
        gi, u = cur["gi"], cur["u"]
        # the copy's pool rows / key scales are those of tile u of group gi (load_tile's)
        phys = bt[gi * G // BS]
        assert row0 == (phys * H + KVH) * BS + (gi * G) % BS + 16 * u and n_valid == min(16, lq - gi * G - 16 * u)
        assert (ks >= 0) == (u == 0) and (u > 0 or ks == ((phys * H + KVH) * (BS // G) + (gi * G) % BS // G) * D)
        tile = (gi, u)
        slots[s] = tile
        cur["u"] += 1
        if cur["u"] == cur["ntile"]:
            cur["k"] += 1
            if cur["k"] & 31 == 0:
                cur["phys"] = [group_block(cur["k"], ln) for ln in LANES]
            issuing = g_first + WARPS * cur["k"] < g_end
            if issuing:
                enter()
        return tile

    for s in range(STAGES - 1):
        groups.append(issue_next(s, 0))
    computed, j = [], 0
    for gi in range(g_first, g_end, WARPS):
        for u in range(ntile(gi)):
            groups.append(issue_next((j + STAGES - 1) % STAGES, j))
            done = max(done, len(groups) - (STAGES - 1))  # cp.async.wait_group(S - 1)
            s = j % STAGES
            assert slots[s] == (gi, u), (j, slots[s], gi, u)
            assert (gi, u) in groups[:done]  # its copies have landed
            last_read[s] = j
            computed.append((gi, u))
            j += 1
    assert all(t is None for t in groups[done:])  # only empty groups left for the final wait_group(0)
    return computed


@pytest.mark.parametrize("lq,G,BS,nsplit", [(4096, 32, 64, 4), (4096, 64, 64, 1), (300, 16, 32, 3), (97, 32, 32, 1),
                                            (17, 16, 16, 2), (1, 16, 64, 1), (5000, 16, 16, 1)])
def test_ring_schedule(lq, G, BS, nsplit):
    """Every warp computes exactly its key groups' tiles, in variant 0's order, each from a slot its
    copies have filled; more than 32 groups per warp refill the block-table registers (5000 / 16)."""
    rng = np.random.default_rng(lq + G)
    bt = rng.permutation(-(-lq // BS) + 7).tolist()
    ng = -(-lq // G)
    for split in range(nsplit):
        per = -(-ng // nsplit)
        g_begin = min(split * per, ng)
        g_end = min(g_begin + per, ng)
        for warp in range(WARPS):
            want = [(gi, u) for gi in range(g_begin + warp, g_end, WARPS) for u in range(min(G, lq - gi * G + 15) // 16)]
            assert _schedule(lq, G, BS, nsplit, split, warp, bt) == want
