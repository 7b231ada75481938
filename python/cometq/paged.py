"""Paged 4-bit KV pool for serving, and the pure-torch references of its ops.

Pool layout (one pool per attention layer; copy of this section lives in docs/FORMAT.md)
-------------------------------------------------------------------------------------------
Names: ``NB`` blocks, ``H`` KV heads, ``BS`` tokens per block, ``D`` head_dim,
``G`` quantization group size, ``S`` sequence slots, ``MB`` max blocks per sequence.
``BS`` is a multiple of ``G`` so a block always holds whole quantization groups
(with per-channel keys and ``BS == G`` a block *is* one group).

* ``k_packed``, ``v_packed``: uint8 ``[NB, H, BS, D/2]``; byte ``j`` of a token
  holds channel ``2j`` in the low nibble and ``2j+1`` in the high nibble
  (unsigned 0..15, :func:`cometq.layout.pack_uint4`).
* ``k_scale``, ``k_zero`` (and ``v_*``): float16, shaped by the axis of K (V):

  - ``"token"``:   ``[NB, H, BS, D/G]`` (one scale/zero per token and G channels);
  - ``"channel"``: ``[NB, H, BS/G, D]`` (one scale/zero per channel and G tokens).

  Dequantization: ``x = q * scale + zero`` (float32 math), exactly
  :func:`cometq.reference.dequantize_kv4` of the block viewed as a
  :class:`~cometq.reference.KV4Tensor` ``[H, BS, D]``.
* ``tail_k``, ``tail_v``: ``tail_dtype`` ``[S, H, G, D]``: the full-precision
  staging tail, used only when an axis is ``"channel"`` ("staged" pools): new
  tokens wait there until G of them form a group, which is then quantized into
  the sequence's blocks in one go.  Token-axis-only pools quantize every new
  token immediately (tail length stays 0).
* ``block_tables``: int32 ``[S, MB]``; entry ``i`` of slot ``s`` is the physical
  block holding tokens ``[i*BS, (i+1)*BS)`` of that sequence (-1 = unused).
* ``quant_lens``: int32 ``[S]`` tokens stored 4-bit; ``tail_lens``: int32 ``[S]``
  tokens in the tail.  Logical sequence = the quantized tokens then the tail.

Blocks are owned by exactly one sequence (no sharing) and go back to the free
list when the sequence is freed.  Allocation is all-or-nothing: an append that
needs more blocks than are free raises :class:`KV4PoolExhausted` (a
``RuntimeError`` a scheduler can catch to preempt) before touching any state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .layout import check_tensor
from .reference import FLOAT_DTYPES, KV4_AXES, KV4Tensor, dequantize_kv4, quantize_kv4

__all__ = [
    "KV4PoolExhausted",
    "PagedKV4Config",
    "PagedKV4Pool",
    "kv4_quantize_append_reference",
    "kv4_decode_attention_reference",
    "pool_scale_shape",
    "default_num_splits",
]


class KV4PoolExhausted(RuntimeError):
    """Not enough free blocks (or sequence slots) for a request; no state was changed."""


def pool_scale_shape(axis: str, num_blocks: int, heads: int, block_size: int, head_dim: int, group_size: int):
    if axis == "token":
        return (num_blocks, heads, block_size, head_dim // group_size)
    return (num_blocks, heads, block_size // group_size, head_dim)


def _pos_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


@dataclass(frozen=True)
class PagedKV4Config:
    """Geometry of a paged KV4 pool (see the module doc for the layout)."""

    num_blocks: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 64
    group_size: int = 32  # defaults = KV4Config's, chosen by accuracy (docs/KV4.md)
    key_axis: str = "channel"
    value_axis: str = "token"
    max_seqs: int = 64
    max_blocks_per_seq: Optional[int] = None  # default: num_blocks
    tail_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        for n in ("num_blocks", "num_kv_heads", "head_dim", "block_size", "max_seqs"):
            _pos_int(n, getattr(self, n))
        _pos_int("group_size", self.group_size, 2)
        if self.group_size % 2:
            raise ValueError(f"group_size must be even, got {self.group_size}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for 4-bit packing, got {self.head_dim}")
        for n in ("key_axis", "value_axis"):
            if getattr(self, n) not in KV4_AXES:
                raise ValueError(f"{n} must be one of {KV4_AXES}, got {getattr(self, n)!r}")
        if "token" in (self.key_axis, self.value_axis) and self.head_dim % self.group_size:
            raise ValueError(f"axis 'token' needs head_dim % group_size == 0, got head_dim={self.head_dim}, group_size={self.group_size}")
        if self.block_size % self.group_size:
            raise ValueError(f"block_size={self.block_size} must be a multiple of group_size={self.group_size} (whole groups per block)")
        if self.max_blocks_per_seq is not None:
            _pos_int("max_blocks_per_seq", self.max_blocks_per_seq)
        if self.tail_dtype not in FLOAT_DTYPES:
            raise TypeError(f"tail_dtype must be one of {FLOAT_DTYPES}, got {self.tail_dtype}")

    @property
    def staged(self) -> bool:
        """True when new tokens wait in the full-precision tail until a group fills."""
        return "channel" in (self.key_axis, self.value_axis)

    @property
    def blocks_per_seq(self) -> int:
        return self.max_blocks_per_seq or self.num_blocks

    @property
    def max_tokens_per_seq(self) -> int:
        return self.blocks_per_seq * self.block_size + (self.group_size - 1 if self.staged else 0)

    def bytes_per_block(self) -> int:
        """Bytes of K+V data, scales and zeros of one block (all heads)."""
        per = self.num_kv_heads * self.block_size * self.head_dim // 2
        sc = 0
        for ax in (self.key_axis, self.value_axis):
            sc += 2 * 2 * math.prod(pool_scale_shape(ax, 1, self.num_kv_heads, self.block_size, self.head_dim, self.group_size))
        return 2 * per + sc


# --------------------------------------------------------------------------
# reference ops (pure torch)
# --------------------------------------------------------------------------
def kv4_quantize_append_reference(x, packed, scale, zero, block_ids, offsets, group_size: int, axis: str) -> None:
    """Quantize rows of new K or V and write them into a paged pool, in place.

    ``x``: float ``[n, H, T, D]`` (T = 1 for one token per row; T = G for
    ``axis="channel"``, which quantizes one whole group per row); row ``i`` goes
    to block ``block_ids[i]``, token offsets ``offsets[i] .. offsets[i]+T-1``
    (for ``"channel"`` the offset is a multiple of G).  Quantization is exactly
    :func:`cometq.reference.quantize_kv4` of ``x[i]``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=4)
    n, h, t, d = x.shape
    if axis not in KV4_AXES:
        raise ValueError(f"axis must be one of {KV4_AXES}, got {axis!r}")
    if axis == "channel" and t != group_size:
        raise ValueError(f"axis='channel' appends one whole group per row: x shape {tuple(x.shape)} needs T == group_size={group_size}")
    bs = packed.shape[2]
    for i in range(n):
        q = quantize_kv4(x[i], group_size, axis)
        b, o = int(block_ids[i]), int(offsets[i])
        if not (0 <= b < packed.shape[0]) or not (0 <= o and o + t <= bs):
            raise ValueError(f"row {i}: block {b} / offset {o} (+{t}) outside pool {tuple(packed.shape)}")
        packed[b, :, o : o + t] = q.packed
        if axis == "token":
            scale[b, :, o : o + t] = q.scale
            zero[b, :, o : o + t] = q.zero
        else:
            if o % group_size:
                raise ValueError(f"row {i}: channel-group offset {o} is not a multiple of group_size={group_size}")
            scale[b, :, o // group_size] = q.scale[:, 0]
            zero[b, :, o // group_size] = q.zero[:, 0]


def _gather_kv4(packed, scale, zero, blocks, n_tokens, group_size, axis, dtype=torch.float32):
    """Dequantize the first ``n_tokens`` of a sequence's blocks -> ``[H, n_tokens, D]``."""
    nb = len(blocks)
    if nb == 0:
        h, d = packed.shape[1], packed.shape[3] * 2
        return torch.zeros(h, 0, d, dtype=dtype, device=packed.device)
    idx = torch.as_tensor(blocks, dtype=torch.long, device=packed.device)

    def cat(t):  # [nb, H, R, C] -> [H, nb*R, C]
        t = t.index_select(0, idx)
        return t.permute(1, 0, 2, 3).reshape(t.shape[1], nb * t.shape[2], t.shape[3])

    kv = KV4Tensor(cat(packed), cat(scale), cat(zero), axis, group_size)
    return dequantize_kv4(kv, dtype)[:, :n_tokens]


def kv4_decode_attention_reference(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
    block_tables, quant_lens, tail_lens, seq_ids, group_size: int, key_axis: str, value_axis: str,
    sm_scale: float,
):
    """Single-query attention of ``q [B, Hq, D]`` over paged KV4 sequences.

    Row ``b`` reads slot ``s = seq_ids[b]``: its ``quant_lens[s]`` 4-bit tokens
    (through ``block_tables[s]``) followed by ``tail_lens[s]`` full-precision
    tail tokens.  Query head ``h`` uses KV head ``h // (Hq / H)`` (GQA).  All math
    in float32; returns ``q.dtype``.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    bsz, hq, d = q.shape
    h = k_packed.shape[1]
    if hq % h:
        raise ValueError(f"q heads {hq} not a multiple of kv heads {h} (q shape {tuple(q.shape)})")
    bs = k_packed.shape[2]
    out = torch.empty_like(q)
    for b in range(bsz):
        s = int(seq_ids[b])
        lq, lt = int(quant_lens[s]), int(tail_lens[s])
        if lq + lt < 1:
            raise ValueError(f"sequence slot {s} (batch row {b}) is empty: attention needs >= 1 cached token")
        nblk = -(-lq // bs)
        blocks = [int(x) for x in block_tables[s, :nblk]]
        k = _gather_kv4(k_packed, k_scale, k_zero, blocks, lq, group_size, key_axis)
        v = _gather_kv4(v_packed, v_scale, v_zero, blocks, lq, group_size, value_axis)
        if lt:
            k = torch.cat([k, tail_k[s, :, :lt].float()], dim=1)
            v = torch.cat([v, tail_v[s, :, :lt].float()], dim=1)
        k = k.repeat_interleave(hq // h, dim=0)
        v = v.repeat_interleave(hq // h, dim=0)
        sc = torch.einsum("hd,htd->ht", q[b].float(), k) * sm_scale
        p = torch.softmax(sc, dim=-1)
        out[b] = torch.einsum("ht,htd->hd", p, v).to(q.dtype)
    return out


def default_num_splits(batch: int, kv_heads: int, max_blocks: int, num_sms: int = 132) -> int:
    """Split-K partitions so ``batch * kv_heads * splits`` programs fill ~2 waves of
    SMs (132 on H100), never more splits than the longest sequence has blocks."""
    want = -(-2 * num_sms // max(1, batch * kv_heads))
    return max(1, min(want, max_blocks, 64))


# --------------------------------------------------------------------------
# the pool
# --------------------------------------------------------------------------
class PagedKV4Pool:
    """A paged KV4 pool for one attention layer (layout in the module doc).

    Host-side bookkeeping (free list, block lists, lengths) lives in Python so
    scheduling decisions never synchronize with the GPU; the int32 tables the
    kernels read are mirrored on ``device``.
    """

    def __init__(self, config: PagedKV4Config, device="cpu"):
        if not isinstance(config, PagedKV4Config):
            raise TypeError(f"config must be a PagedKV4Config, got {type(config).__name__}")
        self.config = c = config
        self.device = torch.device(device)
        nb, h, bs, d, g = c.num_blocks, c.num_kv_heads, c.block_size, c.head_dim, c.group_size
        kw = dict(device=self.device)
        self.k_packed = torch.zeros(nb, h, bs, d // 2, dtype=torch.uint8, **kw)
        self.v_packed = torch.zeros(nb, h, bs, d // 2, dtype=torch.uint8, **kw)
        self.k_scale = torch.zeros(pool_scale_shape(c.key_axis, nb, h, bs, d, g), dtype=torch.float16, **kw)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros(pool_scale_shape(c.value_axis, nb, h, bs, d, g), dtype=torch.float16, **kw)
        self.v_zero = torch.zeros_like(self.v_scale)
        tg = g if c.staged else 0
        self.tail_k = torch.zeros(c.max_seqs, h, tg, d, dtype=c.tail_dtype, **kw)
        self.tail_v = torch.zeros(c.max_seqs, h, tg, d, dtype=c.tail_dtype, **kw)
        self.block_tables = torch.full((c.max_seqs, c.blocks_per_seq), -1, dtype=torch.int32, **kw)
        self.quant_lens = torch.zeros(c.max_seqs, dtype=torch.int32, **kw)
        self.tail_lens = torch.zeros(c.max_seqs, dtype=torch.int32, **kw)
        # host mirrors
        self._free_blocks: List[int] = list(range(nb - 1, -1, -1))  # pop() hands out low ids first
        self._free_slots: List[int] = list(range(c.max_seqs - 1, -1, -1))
        self._blocks: Dict[int, List[int]] = {}
        self._qlen: Dict[int, int] = {}
        self._tlen: Dict[int, int] = {}

    # -- bookkeeping ----------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def sequences(self) -> List[int]:
        return sorted(self._blocks)

    def seq_len(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return self._qlen[seq_id] + self._tlen[seq_id]

    def blocks_of(self, seq_id: int) -> List[int]:
        self._check_seq(seq_id)
        return list(self._blocks[seq_id])

    def _check_seq(self, seq_id) -> None:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id not in self._blocks:
            raise KeyError(f"unknown sequence id {seq_id!r} (live: {self.sequences})")

    def add_sequence(self) -> int:
        """Reserve a sequence slot; raises :class:`KV4PoolExhausted` when all are taken."""
        if not self._free_slots:
            raise KV4PoolExhausted(f"no free sequence slot (max_seqs={self.config.max_seqs})")
        s = self._free_slots.pop()
        self._blocks[s], self._qlen[s], self._tlen[s] = [], 0, 0
        self.quant_lens[s] = 0
        self.tail_lens[s] = 0
        return s

    def free_sequence(self, seq_id: int) -> None:
        """Return a sequence's blocks and slot to the pool."""
        self._check_seq(seq_id)
        blocks = self._blocks.pop(seq_id)
        self._free_blocks.extend(reversed(blocks))
        del self._qlen[seq_id], self._tlen[seq_id]
        self.block_tables[seq_id] = -1
        self.quant_lens[seq_id] = 0
        self.tail_lens[seq_id] = 0
        self._free_slots.append(seq_id)

    def blocks_needed(self, seq_id: int, n_new: int) -> int:
        """Extra blocks an append of ``n_new`` tokens would allocate."""
        self._check_seq(seq_id)
        q, t = self._plan_lengths(seq_id, n_new)
        return -(-q // self.config.block_size) - len(self._blocks[seq_id])

    def _plan_lengths(self, seq_id, n_new):
        g = self.config.group_size
        q, t = self._qlen[seq_id], self._tlen[seq_id]
        if self.config.staged:
            full = (t + n_new) // g
            return q + full * g, (t + n_new) - full * g
        return q + n_new, 0

    def _reserve(self, plan: Dict[int, int]) -> None:
        """Allocate blocks for {seq_id: n_new}; all-or-nothing."""
        need, mb = 0, self.config.blocks_per_seq
        for s, n in plan.items():
            extra = self.blocks_needed(s, n)
            if len(self._blocks[s]) + extra > mb:
                raise KV4PoolExhausted(
                    f"sequence {s} would need {len(self._blocks[s]) + extra} blocks > max_blocks_per_seq={mb} "
                    f"(length {self.seq_len(s)} + {n} tokens)"
                )
            need += extra
        if need > len(self._free_blocks):
            raise KV4PoolExhausted(f"append needs {need} blocks, only {len(self._free_blocks)} free of {self.config.num_blocks}")
        for s, n in plan.items():
            for _ in range(self.blocks_needed(s, n)):
                b = self._free_blocks.pop()
                self.block_tables[s, len(self._blocks[s])] = b
                self._blocks[s].append(b)

    # -- appends ----------------------------------------------------------------
    def _check_kv(self, k, v, lead: int):
        c = self.config
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=3)
            if x.shape[0] != lead or x.shape[1] != c.num_kv_heads or x.shape[2] != c.head_dim:
                raise ValueError(f"{name} shape {tuple(x.shape)} != expected ({lead}, {c.num_kv_heads}, {c.head_dim})")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device}, pool is on {self.device}")

    def append(self, seq_id: int, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> None:
        """Append ``T`` tokens ``k, v [H, T, D]`` (prefill or one step) to one sequence."""
        self._check_seq(seq_id)
        c = self.config
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=3)
            if x.shape[0] != c.num_kv_heads or x.shape[2] != c.head_dim or x.shape != k.shape:
                raise ValueError(f"{name} shape {tuple(x.shape)} != expected ({c.num_kv_heads}, T, {c.head_dim})")
        n = k.shape[1]
        if n == 0:
            return
        self._reserve({seq_id: n})
        s, g, bs = seq_id, c.group_size, c.block_size
        q0, t0 = self._qlen[s], self._tlen[s]
        if not c.staged:
            pos = torch.arange(q0, q0 + n)
            blocks = torch.tensor([self._blocks[s][p // bs] for p in pos.tolist()], dtype=torch.int32)
            self._quantize_rows(k.transpose(0, 1)[:, :, None], v.transpose(0, 1)[:, :, None], blocks, pos % bs, backend)
            self._qlen[s] = q0 + n
        else:
            seq_k = torch.cat([self.tail_k[s, :, :t0].to(k.dtype), k], dim=1)
            seq_v = torch.cat([self.tail_v[s, :, :t0].to(v.dtype), v], dim=1)
            full = seq_k.shape[1] // g
            if full:
                xk = seq_k[:, : full * g].reshape(c.num_kv_heads, full, g, c.head_dim).transpose(0, 1)
                xv = seq_v[:, : full * g].reshape(c.num_kv_heads, full, g, c.head_dim).transpose(0, 1)
                pos = torch.arange(full) * g + q0
                blocks = torch.tensor([self._blocks[s][p // bs] for p in pos.tolist()], dtype=torch.int32)
                self._quantize_rows(xk, xv, blocks, pos % bs, backend)
            rest = seq_k.shape[1] - full * g
            self.tail_k[s, :, :rest] = seq_k[:, full * g :].to(c.tail_dtype)
            self.tail_v[s, :, :rest] = seq_v[:, full * g :].to(c.tail_dtype)
            self._qlen[s], self._tlen[s] = q0 + full * g, rest
        self.quant_lens[s] = self._qlen[s]
        self.tail_lens[s] = self._tlen[s]

    def append_decode(self, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> None:
        """One new token per sequence, batched: ``k, v [n, H, D]`` for ``seq_ids`` (distinct)."""
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must be distinct, got {seq_ids}")
        for s in seq_ids:
            self._check_seq(s)
        self._check_kv(k, v, len(seq_ids))
        if not seq_ids:
            return
        self._reserve({s: 1 for s in seq_ids})
        c = self.config
        g, bs = c.group_size, c.block_size
        if not c.staged:
            pos = [self._qlen[s] for s in seq_ids]
            blocks = torch.tensor([self._blocks[s][p // bs] for s, p in zip(seq_ids, pos)], dtype=torch.int32)
            offs = torch.tensor([p % bs for p in pos], dtype=torch.int32)
            self._quantize_rows(k[:, :, None], v[:, :, None], blocks, offs, backend)
            for s in seq_ids:
                self._qlen[s] += 1
        else:
            slots = torch.tensor(seq_ids, dtype=torch.long, device=self.device)
            tpos = torch.tensor([self._tlen[s] for s in seq_ids], dtype=torch.long, device=self.device)
            self.tail_k[slots, :, tpos] = k.to(c.tail_dtype)
            self.tail_v[slots, :, tpos] = v.to(c.tail_dtype)
            full = [i for i, s in enumerate(seq_ids) if self._tlen[s] + 1 == g]
            for s in seq_ids:
                self._tlen[s] += 1
            if full:
                fs = torch.tensor([seq_ids[i] for i in full], dtype=torch.long, device=self.device)
                pos = [self._qlen[seq_ids[i]] for i in full]
                blocks = torch.tensor([self._blocks[seq_ids[i]][p // bs] for i, p in zip(full, pos)], dtype=torch.int32)
                offs = torch.tensor([p % bs for p in pos], dtype=torch.int32)
                self._quantize_rows(self.tail_k[fs], self.tail_v[fs], blocks, offs, backend)
                for i in full:
                    s = seq_ids[i]
                    self._qlen[s] += g
                    self._tlen[s] = 0
        idx = torch.tensor(seq_ids, dtype=torch.long, device=self.device)
        self.quant_lens[idx] = torch.tensor([self._qlen[s] for s in seq_ids], dtype=torch.int32, device=self.device)
        self.tail_lens[idx] = torch.tensor([self._tlen[s] for s in seq_ids], dtype=torch.int32, device=self.device)

    def _quantize_rows(self, xk, xv, blocks, offsets, backend):
        from . import ops

        blocks = blocks.to(self.device)
        offsets = offsets.to(device=self.device, dtype=torch.int32)
        c = self.config
        ops.kv4_quantize_append(xk.contiguous(), self.k_packed, self.k_scale, self.k_zero, blocks, offsets, c.group_size, c.key_axis, backend)
        ops.kv4_quantize_append(xv.contiguous(), self.v_packed, self.v_scale, self.v_zero, blocks, offsets, c.group_size, c.value_axis, backend)

    # -- reads ----------------------------------------------------------------
    def gather(self, seq_id: int, dtype=torch.float32):
        """Dequantized ``(k, v)`` ``[H, T, D]`` of one sequence (tests / debugging only)."""
        self._check_seq(seq_id)
        c = self.config
        q, t = self._qlen[seq_id], self._tlen[seq_id]
        blocks = self._blocks[seq_id][: -(-q // c.block_size)]
        k = _gather_kv4(self.k_packed, self.k_scale, self.k_zero, blocks, q, c.group_size, c.key_axis, dtype)
        v = _gather_kv4(self.v_packed, self.v_scale, self.v_zero, blocks, q, c.group_size, c.value_axis, dtype)
        k = torch.cat([k, self.tail_k[seq_id, :, :t].to(dtype)], 1)
        v = torch.cat([v, self.tail_v[seq_id, :, :t].to(dtype)], 1)
        return k, v

    def default_num_splits(self, seq_ids: Sequence[int], num_sms: int = 132) -> int:
        """Split-K partitions for a decode batch (see :func:`default_num_splits`)."""
        if not seq_ids:
            return 1
        longest = max(-(-self._qlen[s] // self.config.block_size) for s in seq_ids)
        return default_num_splits(len(seq_ids), self.config.num_kv_heads, longest, num_sms)

    def decode_attention(self, q: torch.Tensor, seq_ids: Sequence[int], sm_scale: Optional[float] = None,
                         num_splits: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
        """``cometq::kv4_decode_attention`` of ``q [len(seq_ids), Hq, D]`` over these sequences."""
        from . import ops

        seq_ids = list(seq_ids)
        for s in seq_ids:
            self._check_seq(s)
            if self.seq_len(s) < 1:
                raise ValueError(f"sequence {s} is empty: append tokens before attending")
        c = self.config
        sm = float(sm_scale) if sm_scale is not None else c.head_dim ** -0.5
        ns = int(num_splits) if num_splits is not None else self.default_num_splits(seq_ids)
        ids = torch.tensor(seq_ids, dtype=torch.int32, device=self.device)
        return ops.kv4_decode_attention(
            q, self.k_packed, self.k_scale, self.k_zero, self.v_packed, self.v_scale, self.v_zero,
            self.tail_k, self.tail_v, self.block_tables, self.quant_lens, self.tail_lens, ids,
            c.group_size, c.key_axis, c.value_axis, sm, ns, backend,
        )
