"""Paged 4-bit KV pool for serving, and the pure-torch references of its ops.

Pool layout (per attention layer; copy of this section lives in docs/FORMAT.md)
---------------------------------------------------------------------------------
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

Blocks are owned by one sequence and go back to the free list when it is freed -- unless
prefix caching is on (:class:`PrefixCache`): then a full block whose tokens are known stays
readable after its sequence is freed, and a later sequence that starts with the same tokens
adopts it (read-only: appends only ever write past a sequence's full blocks) instead of
computing it again; such blocks are reference-counted and evicted least recently used first
when the free list runs dry.  Allocation is all-or-nothing: a reservation
(or an append of :class:`PagedKV4Pool`, which reserves for itself) that needs
more blocks than are free raises :class:`KV4PoolExhausted` (a ``RuntimeError`` a
scheduler can catch to preempt) before touching any state.

Several layers, one allocator (:class:`MultiLayerKV4Pool`)
-----------------------------------------------------------
The per-layer tensors above are stacked along a leading layer dim ``L``
(``k_packed [L, NB, H, BS, D/2]``, ``tail_k [L, S, H, G, D]``, ...;
``k_packed[l]`` is layer ``l``'s contiguous one-layer pool).  ``block_tables
[S, MB]`` is shared: a sequence owns the same block ids in every layer, taken
by one ``reserve(seq, n_tokens)`` for all layers.  ``quant_lens``/``tail_lens``
are ``[L, S]`` because a forward pass writes its layers one after another.
A sequence of ``n`` tokens owns ``ceil(q(n) / BS)`` blocks, ``q(n) = n`` for
token-axis pools and ``q(n) = floor(n / G) * G`` for staged pools (the last
``n mod G`` tokens live in the tail, which needs no block).
:class:`PagedKV4Pool` is a one-layer view of it.
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .layout import canonical_device, check_tensor
from .reference import FLOAT_DTYPES, KV4_AXES, KV4Tensor, dequantize_kv4, quantize_kv4

__all__ = [
    "KV4PoolExhausted",
    "PagedKV4Config",
    "PagedKV4Pool",
    "MultiLayerKV4Pool",
    "BlockAllocator",
    "PrefixCache",
    "PrefixCaching",
    "kv4_quantize_append_reference",
    "kv4_decode_append_reference",
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


def to_device_ints(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small int tensor on ``device`` from host ints, without a stream sync.

    ``torch.tensor(list, device="cuda")`` copies from pageable memory and waits for the
    copy -- and so for every kernel queued before it: one such call per layer makes the
    CPU wait for the GPU at every layer of a decode step.  A pinned staging tensor and a
    ``non_blocking`` copy keep the CPU running ahead (PyTorch's pinned allocator holds the
    staging buffer until the copy has run)."""
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


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
def _cat_rows(parts: List[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` along dim 0 -- as a strided view, without a copy, when the parts are
    adjacent views of one tensor: the rows of a prefill step's fresh prompts, which sit back to
    back in the step's K / V (``[T, H, D]`` -> per prompt ``[n_i / G, H, G, D]`` views).  Why: the
    copy was one strided cat per prompt per layer for K and V (H100 run 7's 8 x 1024-token W4Ax
    prefill step: 576 ``CatArrayBatchedCopy`` launches, 6.7 ms); the append kernels index by
    strides.  Anything else (gaps between the parts, other strides, dtypes): the copy."""
    p0 = parts[0]
    if len(parts) == 1:
        return p0
    st, tail, item = p0.stride(), p0.shape[1:], p0.element_size()
    base = p0.untyped_storage().data_ptr()
    nxt = p0.data_ptr() + p0.shape[0] * st[0] * item
    for p in parts[1:]:
        if p.stride() != st or p.shape[1:] != tail or p.dtype != p0.dtype or p.device != p0.device \
                or p.untyped_storage().data_ptr() != base or p.data_ptr() != nxt:
            return torch.cat(parts)  # (one storage: adjacent addresses of two tensors are not a view)
        nxt += p.shape[0] * st[0] * item
    n = sum(p.shape[0] for p in parts)
    return p0.as_strided((n, *tail), st, p0.storage_offset())


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


def kv4_decode_append_reference(k, v, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                                block_tables, lens, slots, group_size: int, key_axis: str, value_axis: str) -> None:
    """One decode token per row into a one-layer pool, advancing the lengths -- the whole
    decode append, in place (the spec of the device-side kernel a CUDA graph can hold).

    ``k, v [B, H, D]``; ``lens`` int32 ``[2, S]`` (row 0 quant lengths, row 1 tail lengths);
    ``slots`` int32 ``[B]``, distinct, ``-1`` for a padding row (skipped).  For slot ``s``
    with ``q, t = lens[:, s]``:

    * staged pool (an axis is ``"channel"``): ``tail[s, :, t] = x`` (cast to the tail
      dtype); if ``t + 1 == G`` the tail's G tokens are quantized into block
      ``block_tables[s, q // BS]`` at row ``q % BS`` (as :func:`kv4_quantize_append_reference`)
      and ``lens[:, s] = (q + G, 0)``, else ``lens[1, s] = t + 1``;
    * token-axis pool: ``x`` is quantized into block ``block_tables[s, q // BS]`` at row
      ``q % BS`` and ``lens[0, s] = q + 1``.

    A destination block of ``-1`` (the token needs a block the sequence never reserved) is
    a ``ValueError`` here; the kernel skips such a row whole."""
    staged = "channel" in (key_axis, value_axis)
    bs, g = k_packed.shape[2], group_size
    for b, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        q, t = int(lens[0, s]), int(lens[1, s])
        flush = not staged or t + 1 == g
        blk = int(block_tables[s, q // bs]) if flush else 0
        if blk < 0:
            raise ValueError(f"row {b}: slot {s} holds {q} quantized tokens but has no block {q // bs} reserved")
        ids = torch.tensor([blk], dtype=torch.int32)
        offs = torch.tensor([q % bs], dtype=torch.int32)
        if staged:
            tail_k[s, :, t] = k[b].to(tail_k.dtype)
            tail_v[s, :, t] = v[b].to(tail_v.dtype)
            if flush:
                kv4_quantize_append_reference(tail_k[s][None], k_packed, k_scale, k_zero, ids, offs, g, key_axis)
                kv4_quantize_append_reference(tail_v[s][None], v_packed, v_scale, v_zero, ids, offs, g, value_axis)
                lens[0, s], lens[1, s] = q + g, 0
            else:
                lens[1, s] = t + 1
        else:
            kv4_quantize_append_reference(k[b][None, :, None], k_packed, k_scale, k_zero, ids, offs, g, key_axis)
            kv4_quantize_append_reference(v[b][None, :, None], v_packed, v_scale, v_zero, ids, offs, g, value_axis)
            lens[0, s] = q + 1


def _gather_kv4(packed, scale, zero, blocks, n_tokens, group_size, axis, dtype=torch.float32):
    """Dequantize the first ``n_tokens`` of a sequence's blocks -> ``[H, n_tokens, D]``.

    ``blocks``: host ints, or a long tensor already on the pool's device.  Host ints go
    through :func:`to_device_ints` (pinned, non-blocking): ``torch.as_tensor(list,
    device="cuda")`` waits for every queued kernel, and a chunked prefill reads a prefix
    per layer (H100 run 7: the serving steps with a continued chunk took ~90 ms more)."""
    nb = len(blocks)
    if nb == 0:
        h, d = packed.shape[1], packed.shape[3] * 2
        return torch.zeros(h, 0, d, dtype=dtype, device=packed.device)
    if isinstance(blocks, torch.Tensor):
        idx = blocks.to(device=packed.device, dtype=torch.long)
    else:
        idx = to_device_ints([int(b) for b in blocks], torch.long, packed.device)

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


def check_paged_tables(block_tables, lengths, block_size: int, n_slots: int):
    """Content checks of a paged cache's ``block_tables [B, NB]`` / ``lengths [B]`` (a device
    sync on CUDA): lengths in ``[0, NB * block_size]``, and every block a live token uses
    inside the cache's ``n_slots // block_size`` blocks.  Returns ``(live [B, T_max] bool,
    block id per token [B, T_max] int64)``."""
    bsz, nb = block_tables.shape
    lens = lengths.to(torch.long)
    if bsz and int(lens.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    t_max = int(lens.max()) if bsz else 0
    if t_max > nb * block_size:
        raise ValueError(f"length {t_max} exceeds the block table's {nb} blocks of {block_size} tokens "
                         f"(block_tables shape {tuple(block_tables.shape)})")
    pos = torch.arange(t_max, device=block_tables.device)
    live = pos[None, :] < lens[:, None]  # [B, T]
    phys = block_tables.to(torch.long)[:, pos // block_size]
    bad = live & ((phys < 0) | (phys * block_size >= n_slots))
    if bool(bad.any()):
        raise ValueError(f"block ids must be in [0, {n_slots // block_size}) for the cache of {n_slots} slots, got "
                         f"{sorted(set(phys[bad].tolist()))[:8]}")
    return live, phys


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lengths, block_size: int,
                                     sm_scale: float) -> torch.Tensor:
    """Single-query attention of ``q [B, Hq, D]`` over a paged *full-precision* K/V cache (the
    FP16 serving baseline's pool; spec of ``cometq::paged_decode_attention``).

    ``k_cache, v_cache [num_slots, Hkv, D]``: token ``t`` of batch row ``b`` sits in slot
    ``block_tables[b, t // block_size] * block_size + t % block_size``, for ``t < lengths[b]``.
    Query head ``h`` reads KV head ``h // (Hq / Hkv)`` (GQA).  Math in float32, returns
    ``q.dtype``; a row of length 0 attends to nothing and gives zeros (as the kernel does)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    if hq % hkv:
        raise ValueError(f"q heads {hq} not a multiple of kv heads {hkv} (q shape {tuple(q.shape)})")
    live, phys = check_paged_tables(block_tables, lengths, block_size, k_cache.shape[0])
    out = torch.zeros_like(q)
    if live.shape[1] == 0:
        return out
    pos = torch.arange(live.shape[1], device=q.device)
    slots = torch.where(live, phys * block_size + pos % block_size, torch.zeros((), dtype=torch.long, device=q.device))
    k, v = k_cache[slots].float(), v_cache[slots].float()  # [B, T, Hkv, D]
    qg = q.float().view(bsz, hkv, hq // hkv, d)
    sc = torch.einsum("bgrd,btgd->bgrt", qg, k) * sm_scale
    sc = sc.masked_fill(~live[:, None, None, :], float("-inf"))
    p = torch.softmax(sc, dim=-1).nan_to_num(0.0)  # a row of length 0: all -inf -> NaN -> 0
    out = torch.einsum("bgrt,btgd->bgrd", p, v).reshape(bsz, hq, d)
    return out.to(q.dtype)


def default_num_splits(batch: int, kv_heads: int, max_blocks: int, num_sms: int = 132) -> int:
    """Split-K partitions so ``batch * kv_heads * splits`` programs number ~6 per SM (132 SMs on
    H100), never more splits than the longest sequence has blocks.

    Measured on an H100 (bench/RESULTS.md, 2026-11-26; batch 16, context 4096, Llama-3-8B
    heads): 3 splits 239 us, 6 splits 191 us (best), 12 splits 199 us; batch 64: 1 split 691 us
    (best), 2 splits 701 us -- 6 x 132 programs gives 6 at batch 16 and keeps 1 at batch 64
    (where one split also skips the reduce launch).  The 1-2-warp launch configs hold more
    programs per SM; ``bench_attention.py --sweep`` measures them at 0.5-4x this count."""
    want = 6 * num_sms // max(1, batch * kv_heads)  # floor: batch 64 x 8 heads stays at 1 (measured best)
    return max(1, min(want, max_blocks, 64))


# --------------------------------------------------------------------------
# the pool: one shared allocator for all layers, and per-layer views
# --------------------------------------------------------------------------
class PrefixCache:
    """Full blocks known by content, for prefix sharing (vLLM's automatic prefix caching).

    A node is one full block: tokens ``[i*BS, (i+1)*BS)`` of a sequence whose first ``i`` blocks
    are the nodes on its path from the root, so a node's key is ``(parent node, its BS tokens)``
    -- exact token tuples, not hashes: two different prefixes never meet.  Each node names the
    physical block that holds it.  A block whose last owner is freed is *parked* (readable,
    evictable); the allocator evicts parked blocks least recently parked first when its free
    list is empty.  Sequences release their blocks last-first, so a prefix's later blocks leave
    before its earlier ones (an evicted node's descendants become unreachable and follow)."""

    ROOT = 0

    def __init__(self):
        self._node: Dict[tuple, int] = {}  # (parent node, tokens) -> node
        self._key: Dict[int, tuple] = {}  # node -> its key
        self._block: Dict[int, int] = {}  # node -> block
        self._node_of: Dict[int, int] = {}  # block -> node
        self._parked: "OrderedDict[int, None]" = OrderedDict()  # blocks without an owner, oldest first
        self._ids = itertools.count(self.ROOT + 1)

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def holds(self, block: int) -> bool:
        return block in self._node_of

    def match(self, token_blocks: Sequence[tuple]) -> List[Tuple[int, int]]:
        """The longest run of cached blocks that starts the token blocks: ``[(node, block)]``."""
        out, parent = [], self.ROOT
        for toks in token_blocks:
            node = self._node.get((parent, toks))
            if node is None:
                break
            out.append((node, self._block[node]))
            parent = node
        return out

    def insert(self, parent: int, tokens: tuple, block: int) -> int:
        """Name ``block`` the node ``(parent, tokens)`` and return the node; when that node exists
        already (another sequence computed the same prefix), return it and leave ``block`` unnamed."""
        key = (parent, tokens)
        node = self._node.get(key)
        if node is not None:
            return node
        if block in self._node_of:
            raise ValueError(f"block {block} already holds cached node {self._node_of[block]}")
        node = next(self._ids)
        self._node[key], self._key[node], self._block[node], self._node_of[block] = node, key, block, node
        return node

    def park(self, block: int) -> None:
        self._parked[block] = None

    def unpark(self, block: int) -> None:
        del self._parked[block]

    def evict(self) -> int:
        """Forget the least recently parked block's node and hand the block out."""
        block, _ = self._parked.popitem(last=False)
        node = self._node_of.pop(block)
        del self._node[self._key.pop(node)], self._block[node]
        return block


class BlockAllocator:
    """Free list and reference counts of a pool's blocks, with an optional :class:`PrefixCache`.

    ``take`` hands out a free block (low ids first), else evicts a parked cached one;
    ``share`` adds an owner to a cached block (un-parking it); ``release`` drops an owner: a
    block nobody owns goes back to the free list, or is parked when the cache names it."""

    def __init__(self, num_blocks: int, prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.free: List[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.ref: List[int] = [0] * num_blocks
        self.cache: Optional[PrefixCache] = PrefixCache() if prefix_caching else None

    @property
    def num_free(self) -> int:
        """Blocks a reservation can take: free ones and parked (evictable) cached ones."""
        return len(self.free) + (self.cache.num_parked if self.cache is not None else 0)

    def enable_prefix_caching(self) -> None:
        if self.cache is None:
            self.cache = PrefixCache()

    def take(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.cache is not None and self.cache.num_parked:
            b = self.cache.evict()
        else:
            raise RuntimeError("no free block (the caller checks num_free first)")
        self.ref[b] = 1
        return b

    def check_cached(self, blocks: Sequence[int]) -> None:
        bad = [b for b in blocks if self.cache is None or not self.cache.holds(b)]
        if bad:
            raise ValueError(f"blocks {bad[:5]} are not cached blocks: only cached blocks are shared")

    def share(self, b: int) -> None:
        if self.cache is None or not self.cache.holds(b):
            raise ValueError(f"block {b} is not a cached block: only cached blocks are shared")
        if self.ref[b] == 0:
            self.cache.unpark(b)
        self.ref[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one owner of each block (last block first, so free lists and the park order keep a
        sequence's early blocks longest)."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.cache is not None and self.cache.holds(b):
                    self.cache.park(b)
                else:
                    self.free.append(b)


class PrefixCaching:
    """The prefix-cache queries of a pool whose blocks come from ``self._alloc`` (a :class:`BlockAllocator`)."""

    _alloc: BlockAllocator

    def enable_prefix_caching(self) -> None:
        """Keep full blocks readable by content after their sequences leave (:class:`PrefixCache`)."""
        self._alloc.enable_prefix_caching()

    @property
    def prefix_cache(self) -> Optional[PrefixCache]:
        return self._alloc.cache

    def match_prefix(self, token_blocks: Sequence[tuple]) -> List[Tuple[int, int]]:
        """Cached ``(node, block)`` pairs for the leading full blocks of ``token_blocks`` (block_size
        tokens each); empty without prefix caching."""
        c = self._alloc.cache
        return c.match(token_blocks) if c is not None else []


class MultiLayerKV4Pool(PrefixCaching):
    """Paged KV4 storage for ``num_layers`` attention layers with ONE block allocator.

    A sequence owns one slot and one block table, shared by every layer: block
    id ``b`` of a sequence is ``k_packed[l, b]`` in every layer ``l`` (the
    per-layer tensors are the documented one-layer layout stacked along a
    leading layer dim, so ``k_packed[l]`` is contiguous and is what the ops
    read).  Capacity is claimed explicitly and up front with :meth:`reserve`
    (all-or-nothing, for all layers at once); appends only write into blocks
    the sequence already owns, so a forward pass can never run out of blocks
    half way through its layers.  Lengths are kept per layer
    (``quant_lens``/``tail_lens`` ``[L, S]``) because a forward writes layer 0
    before layer 1 reads anything.

    Host-side bookkeeping (free list, block lists, lengths) lives in Python so
    scheduling decisions never synchronize with the device; the int32 tables
    the kernels read are mirrored on ``device``.
    """

    def __init__(self, config: PagedKV4Config, num_layers: int, device="cpu"):
        if not isinstance(config, PagedKV4Config):
            raise TypeError(f"config must be a PagedKV4Config, got {type(config).__name__}")
        _pos_int("num_layers", num_layers)
        self.config = c = config
        self.num_layers = nl = num_layers
        self.device = canonical_device(device)
        nb, h, bs, d, g = c.num_blocks, c.num_kv_heads, c.block_size, c.head_dim, c.group_size
        kw = dict(device=self.device)
        self.k_packed = torch.zeros(nl, nb, h, bs, d // 2, dtype=torch.uint8, **kw)
        self.v_packed = torch.zeros(nl, nb, h, bs, d // 2, dtype=torch.uint8, **kw)
        self.k_scale = torch.zeros((nl,) + pool_scale_shape(c.key_axis, nb, h, bs, d, g), dtype=torch.float16, **kw)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros((nl,) + pool_scale_shape(c.value_axis, nb, h, bs, d, g), dtype=torch.float16, **kw)
        self.v_zero = torch.zeros_like(self.v_scale)
        tg = g if c.staged else 0
        self.tail_k = torch.zeros(nl, c.max_seqs, h, tg, d, dtype=c.tail_dtype, **kw)
        self.tail_v = torch.zeros(nl, c.max_seqs, h, tg, d, dtype=c.tail_dtype, **kw)
        self.block_tables = torch.full((c.max_seqs, c.blocks_per_seq), -1, dtype=torch.int32, **kw)
        # both length tables in one buffer: a decode step updates a layer's two rows with one write
        self._lens = torch.zeros(2, nl, c.max_seqs, dtype=torch.int32, **kw)
        self.quant_lens, self.tail_lens = self._lens[0], self._lens[1]
        # host mirrors
        self._alloc = BlockAllocator(nb)
        self._free_slots: List[int] = list(range(c.max_seqs - 1, -1, -1))
        self._blocks: Dict[int, List[int]] = {}
        self._qlen: List[List[int]] = [[0] * c.max_seqs for _ in range(nl)]
        self._tlen: List[List[int]] = [[0] * c.max_seqs for _ in range(nl)]
        # device copies of small host int tuples (slot ids, positions, lengths): the layers of
        # one decode step ask for the same tuples, so only the first layer copies
        self._ints_cache: Dict[tuple, torch.Tensor] = {}

    def _ints(self, values: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Cached :func:`to_device_ints` of a tuple (callers never write into the result)."""
        key = (values, dtype)
        t = self._ints_cache.get(key)
        if t is None:
            if len(self._ints_cache) >= 256:
                self._ints_cache.clear()
            t = self._ints_cache[key] = to_device_ints(values, dtype, self.device)
        return t

    # -- bookkeeping ----------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self._alloc.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.config.num_blocks - self._alloc.num_free

    @property
    def _free_blocks(self) -> List[int]:
        """Blocks on the free list (parked cached blocks are not on it)."""
        return self._alloc.free

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def sequences(self) -> List[int]:
        return sorted(self._blocks)

    def _check_seq(self, seq_id) -> None:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id not in self._blocks:
            raise KeyError(f"unknown sequence id {seq_id!r} (live: {self.sequences})")

    def _check_layer(self, layer) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def quant_len(self, seq_id: int, layer: int = 0) -> int:
        """Tokens of ``seq_id`` stored 4-bit in ``layer``."""
        self._check_seq(seq_id)
        self._check_layer(layer)
        return self._qlen[layer][seq_id]

    def tail_len(self, seq_id: int, layer: int = 0) -> int:
        """Tokens of ``seq_id`` waiting in the full-precision tail of ``layer``."""
        self._check_seq(seq_id)
        self._check_layer(layer)
        return self._tlen[layer][seq_id]

    def seq_len(self, seq_id: int, layer: int = 0) -> int:
        return self.quant_len(seq_id, layer) + self._tlen[layer][seq_id]

    def blocks_of(self, seq_id: int) -> List[int]:
        self._check_seq(seq_id)
        return list(self._blocks[seq_id])

    def quant_tokens_for(self, n_tokens: int) -> int:
        """4-bit tokens of a sequence holding ``n_tokens`` (a staged pool keeps the last
        ``n_tokens % G`` in the fp tail, which needs no block)."""
        g = self.config.group_size
        return n_tokens // g * g if self.config.staged else n_tokens

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks a sequence of ``n_tokens`` tokens owns: exactly what its 4-bit part fills."""
        return -(-self.quant_tokens_for(n_tokens) // self.config.block_size)

    def capacity(self, seq_id: int) -> int:
        """Largest length ``seq_id`` can reach with the blocks it owns now."""
        self._check_seq(seq_id)
        c = self.config
        return len(self._blocks[seq_id]) * c.block_size + (c.group_size - 1 if c.staged else 0)

    def blocks_needed(self, seq_id: int, n_tokens: int) -> int:
        """Extra blocks ``reserve(seq_id, n_tokens)`` would take (``n_tokens`` = total length)."""
        self._check_seq(seq_id)
        return max(0, self.blocks_for(n_tokens) - len(self._blocks[seq_id]))

    # -- slots, reservation, release ----------------------------------------------
    def add_sequence(self) -> int:
        """Take a sequence slot (no blocks yet); raises :class:`KV4PoolExhausted` when all are taken."""
        if not self._free_slots:
            raise KV4PoolExhausted(f"no free sequence slot (max_seqs={self.config.max_seqs})")
        s = self._free_slots.pop()
        self._blocks[s] = []
        for li in range(self.num_layers):
            self._qlen[li][s] = self._tlen[li][s] = 0
        self.quant_lens[:, s] = 0
        self.tail_lens[:, s] = 0
        return s

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Own enough blocks (in every layer) for ``seq_id`` to hold ``n_tokens`` tokens in total.

        All-or-nothing: raises :class:`KV4PoolExhausted` -- naming the sequence, the
        blocks wanted and the blocks free -- before changing anything.  Never shrinks.
        """
        self.reserve_many({seq_id: n_tokens})

    def reserve_many(self, plan: Dict[int, int]) -> None:
        """:meth:`reserve` for ``{seq_id: n_tokens}``, all-or-nothing across the sequences."""
        mb, total = self.config.blocks_per_seq, 0
        extra: Dict[int, int] = {}
        for s, n in plan.items():
            self._check_seq(s)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"n_tokens must be an int >= 0, got {n!r} for sequence {s}")
            have = len(self._blocks[s])
            want = self.blocks_for(n)
            if want > mb:
                raise KV4PoolExhausted(
                    f"sequence {s} would need {want} blocks > max_blocks_per_seq={mb} for {n} tokens "
                    f"(at most {self.config.max_tokens_per_seq} tokens per sequence)"
                )
            extra[s] = max(0, want - have)
            total += extra[s]
        if total > self._alloc.num_free:
            detail = ", ".join(f"sequence {s}: +{e}" for s, e in extra.items() if e)
            raise KV4PoolExhausted(
                f"reserve needs {total} blocks, only {self._alloc.num_free} free of {self.config.num_blocks} "
                f"({detail}); nothing was allocated"
            )
        for s, e in extra.items():
            blocks = self._blocks[s]
            for _ in range(e):
                b = self._alloc.take()
                self.block_tables[s, len(blocks)] = b
                blocks.append(b)

    def free(self, seq_id: int) -> None:
        """Return every block and the slot of ``seq_id`` to the pool (all layers)."""
        self._check_seq(seq_id)
        blocks = self._blocks.pop(seq_id)
        self._alloc.release(blocks)
        for li in range(self.num_layers):
            self._qlen[li][seq_id] = self._tlen[li][seq_id] = 0
        self.block_tables[seq_id] = -1
        self.quant_lens[:, seq_id] = 0
        self.tail_lens[:, seq_id] = 0
        self._free_slots.append(seq_id)

    # -- prefix caching (enable_prefix_caching / prefix_cache / match_prefix: BlockAllocator) ----
    def adopt(self, seq_id: int, blocks: Sequence[int]) -> None:
        """Start the fresh sequence ``seq_id`` with the cached ``blocks`` as its first
        ``len(blocks) * block_size`` tokens, in every layer (read-only for it: later appends
        write past them)."""
        self._check_seq(seq_id)
        c = self.config
        if self._blocks[seq_id] or any(self._qlen[li][seq_id] or self._tlen[li][seq_id] for li in range(self.num_layers)):
            raise ValueError(f"adopt needs a fresh sequence; {seq_id} holds {len(self._blocks[seq_id])} blocks")
        if len(blocks) > c.blocks_per_seq:
            raise KV4PoolExhausted(f"{len(blocks)} blocks > max_blocks_per_seq={c.blocks_per_seq}")
        self._alloc.check_cached(blocks)
        for b in blocks:
            self._alloc.share(b)
        n = len(blocks) * c.block_size  # (a multiple of G: blocks hold whole groups)
        self._blocks[seq_id] = list(blocks)
        if blocks:
            self.block_tables[seq_id, :len(blocks)] = torch.tensor(list(blocks), dtype=torch.int32)
        for li in range(self.num_layers):
            self._qlen[li][seq_id] = n
        self.quant_lens[:, seq_id] = n

    def register_block(self, seq_id: int, index: int, parent: int, tokens: tuple) -> int:
        """Name block ``index`` of ``seq_id`` -- full in every layer -- in the prefix cache under
        ``(parent, tokens)``; returns its node (an existing one when the content is cached already)."""
        self._check_seq(seq_id)
        cache, bs = self._alloc.cache, self.config.block_size
        if cache is None:
            raise RuntimeError("prefix caching is off (enable_prefix_caching())")
        if len(tokens) != bs:
            raise ValueError(f"a block holds {bs} tokens, got {len(tokens)}")
        if not 0 <= index < len(self._blocks[seq_id]) or any(
                self._qlen[li][seq_id] < (index + 1) * bs for li in range(self.num_layers)):
            raise ValueError(f"block {index} of sequence {seq_id} is not full in every layer")
        return cache.insert(parent, tokens, self._blocks[seq_id][index])

    # -- appends ----------------------------------------------------------------
    def _check_fits(self, layer: int, lengths: Dict[int, int]) -> None:
        for s, n in lengths.items():
            cap = self.capacity(s)
            if n > cap:
                raise ValueError(
                    f"layer {layer}: sequence {s} would reach {n} tokens but its reservation holds {cap} "
                    f"({len(self._blocks[s])} blocks); call reserve(seq, n_tokens) first"
                )

    def _check_rows(self, name, x, lead=None):
        c = self.config
        check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=3)
        if lead is not None:
            ok = x.shape == (lead, c.num_kv_heads, c.head_dim)
            want = f"({lead}, {c.num_kv_heads}, {c.head_dim})"
        else:
            ok = x.shape[0] == c.num_kv_heads and x.shape[2] == c.head_dim
            want = f"({c.num_kv_heads}, T, {c.head_dim})"
        if not ok:
            raise ValueError(f"{name} shape {tuple(x.shape)} != expected {want}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device}, pool is on {self.device}")

    def _check_ids(self, seq_ids) -> List[int]:
        # runs per layer per decode step for the whole batch: set operations and one type scan
        # instead of a Python-level check per id (the message path names the bad id)
        seq_ids = list(seq_ids)
        ids = set(seq_ids)
        if len(ids) != len(seq_ids):
            raise ValueError(f"seq_ids must be distinct, got {seq_ids}")
        if not ids <= self._blocks.keys() or any(type(s) is not int for s in seq_ids):
            for s in seq_ids:
                self._check_seq(s)
        return seq_ids

    def _check_decode_fits(self, layer: int, seq_ids: List[int]) -> None:
        """Every sequence can take one more token in ``layer`` (its reservation covers it)."""
        c = self.config
        bs, extra = c.block_size, (c.group_size - 1 if c.staged else 0)
        ql, tl, blocks = self._qlen[layer], self._tlen[layer], self._blocks
        for s in seq_ids:
            if ql[s] + tl[s] + 1 > len(blocks[s]) * bs + extra:
                self._check_fits(layer, {s: ql[s] + tl[s] + 1})  # raises with the full message

    def append(self, layer: int, seq_id: int, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> None:
        """Append ``T`` tokens ``k, v [H, T, D]`` to one sequence in ``layer``."""
        self.append_prefill(layer, [seq_id], [k], [v], backend)

    def append_prefill(self, layer: int, seq_ids: Sequence[int], ks: Sequence[torch.Tensor],
                       vs: Sequence[torch.Tensor], backend: Optional[str] = None) -> None:
        """Append ``ks[i], vs[i] [H, T_i, D]`` to sequence ``seq_ids[i]`` in ``layer``, for all i at once.

        The 4-bit rows of every sequence go through ONE ``cometq::kv4_quantize_append``
        call for K and one for V (token axis: one row per token; staged pools: one row
        per completed group of G tokens, tail first).  Quantization is per row, so the
        result is bit-identical to appending the sequences one after another.  All
        sequences must have been reserved for their new length; nothing is written if
        any check fails.  Every ``ks[i]``/``vs[i]`` must have the same dtype.
        """
        self._check_layer(layer)
        seq_ids = self._check_ids(seq_ids)
        ks, vs = list(ks), list(vs)
        if len(ks) != len(seq_ids) or len(vs) != len(seq_ids):
            raise ValueError(f"need one k and one v per sequence: {len(seq_ids)} seq_ids, {len(ks)} k, {len(vs)} v")
        dtypes = set()
        for i, (k, v) in enumerate(zip(ks, vs)):
            self._check_rows(f"ks[{i}]", k)
            self._check_rows(f"vs[{i}]", v)
            if k.shape != v.shape:
                raise ValueError(f"ks[{i}] shape {tuple(k.shape)} != vs[{i}] shape {tuple(v.shape)}")
            dtypes.update((k.dtype, v.dtype))
        if len(dtypes) > 1:
            raise TypeError(f"all k/v of one append_prefill must share a dtype, got {sorted(map(str, dtypes))}")
        L = layer
        self._check_fits(L, {s: self.seq_len(s, L) + k.shape[1] for s, k in zip(seq_ids, ks)})
        c = self.config
        g, bs, h, d = c.group_size, c.block_size, c.num_kv_heads, c.head_dim
        rows_k, rows_v, blocks, offs = [], [], [], []
        updates = []  # (seq, new quant len, new tail k, new tail v): applied after the quantize calls
        for s, k, v in zip(seq_ids, ks, vs):
            n = k.shape[1]
            if n == 0:
                continue
            table = self._blocks[s]
            q0, t0 = self._qlen[L][s], self._tlen[L][s]
            if not c.staged:
                rows_k.append(k.transpose(0, 1)[:, :, None])  # [T, H, 1, D]: one row per token
                rows_v.append(v.transpose(0, 1)[:, :, None])
                pos = range(q0, q0 + n)
                updates.append((s, q0 + n, None, None))
            else:
                if t0:
                    seq_k = torch.cat([self.tail_k[L, s, :, :t0].to(k.dtype), k], dim=1)
                    seq_v = torch.cat([self.tail_v[L, s, :, :t0].to(v.dtype), v], dim=1)
                else:  # a fresh sequence (every prompt's first chunk): no staged tail to prepend
                    seq_k, seq_v = k, v
                full = seq_k.shape[1] // g
                if full:  # [full, H, G, D]: one row per completed group
                    rows_k.append(seq_k[:, : full * g].reshape(h, full, g, d).transpose(0, 1))
                    rows_v.append(seq_v[:, : full * g].reshape(h, full, g, d).transpose(0, 1))
                pos = range(q0, q0 + full * g, g)
                updates.append((s, q0 + full * g, seq_k[:, full * g :], seq_v[:, full * g :]))
            blocks.extend(table[p // bs] for p in pos)
            offs.extend(p % bs for p in pos)
        if rows_k:
            # rows land past every quant length: invisible until the lengths below move
            self._quantize_rows(L, _cat_rows(rows_k), _cat_rows(rows_v), blocks, offs, backend)
        for s, q1, tk, tv in updates:
            self._qlen[L][s] = q1
            if tk is not None:
                rest = tk.shape[1]
                self.tail_k[L, s, :, :rest] = tk.to(c.tail_dtype)
                self.tail_v[L, s, :, :rest] = tv.to(c.tail_dtype)
                self._tlen[L][s] = rest
        self._sync_lens(L, seq_ids)

    def append_decode(self, layer: int, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor,
                      backend: Optional[str] = None) -> None:
        """One new token per sequence, batched: ``k, v [n, H, D]`` for ``seq_ids`` (distinct)."""
        self._check_layer(layer)
        seq_ids = self._check_ids(seq_ids)
        self._check_rows("k", k, len(seq_ids))
        self._check_rows("v", v, len(seq_ids))
        if not seq_ids:
            return
        L = layer
        self._check_decode_fits(L, seq_ids)
        c = self.config
        g, bs = c.group_size, c.block_size
        if self._device_append(backend):
            # one launch: the token (tails or blocks), the group it may complete, and both length
            # rows, all decided on the device from the lengths there (kv4_decode_append_kernel);
            # the host ledger advances by the same rule without reading anything back
            self.decode_append_device(L, k, v, self._ints(tuple(seq_ids), torch.int32), backend)
            self._advance_host(L, seq_ids)
            return
        if not c.staged:
            pos = [self._qlen[L][s] for s in seq_ids]
            blocks = [self._blocks[s][p // bs] for s, p in zip(seq_ids, pos)]
            self._quantize_rows(L, k[:, :, None], v[:, :, None], blocks, [p % bs for p in pos], backend)
            for s in seq_ids:
                self._qlen[L][s] += 1
        else:
            tl = self._tlen[L]
            slots = self._ints(tuple(seq_ids), torch.long)
            tpos = self._ints(tuple(tl[s] for s in seq_ids), torch.long)
            self.tail_k[L, slots, :, tpos] = k.to(c.tail_dtype)
            self.tail_v[L, slots, :, tpos] = v.to(c.tail_dtype)
            full = [s for s in seq_ids if self._tlen[L][s] + 1 == g]
            for s in seq_ids:
                self._tlen[L][s] += 1
            if full:  # these tails just completed a group: quantize it into the sequence's blocks
                fs = self._ints(tuple(full), torch.long)
                pos = [self._qlen[L][s] for s in full]
                blocks = [self._blocks[s][p // bs] for s, p in zip(full, pos)]
                self._quantize_rows(L, self.tail_k[L, fs], self.tail_v[L, fs], blocks, [p % bs for p in pos], backend)
                for s in full:
                    self._qlen[L][s] += g
                    self._tlen[L][s] = 0
        self._sync_lens(L, seq_ids)

    def _device_append(self, backend: Optional[str]) -> bool:
        """Whether decode appends of this pool run as the one-launch device append
        (``cometq::kv4_decode_append`` resolves to Triton for this pool's device) instead of
        the torch index writes + quantization launches."""
        from .ops import resolve_backend

        try:
            return resolve_backend("kv4_decode_append", self.device, backend) == "triton"
        except (RuntimeError, ValueError):
            return False

    def _advance_host(self, layer: int, seq_ids: Sequence[int]) -> None:
        """Advance the host ledger of ``layer`` by one token per sequence (the device append's rule)."""
        ql, tl = self._qlen[layer], self._tlen[layer]
        if not self.config.staged:
            for s in seq_ids:
                ql[s] += 1
            return
        g = self.config.group_size
        for s in seq_ids:
            if tl[s] + 1 == g:
                ql[s] += g
                tl[s] = 0
            else:
                tl[s] += 1

    # -- the device-side decode step (CUDA-graph capturable) ------------------------
    def check_decode_step(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> List[int]:
        """Host side of a decode step whose appends run on the device in every layer
        (:meth:`decode_append_device`, e.g. inside one captured graph): check that the
        sequences are distinct, that each holds ``lengths[i]`` tokens in *every* layer and has
        the block its next token lands in reserved.  Raises ``ValueError``; changes nothing.
        Then :meth:`advance_decode_step` moves the host ledger as the device lengths will move."""
        seq_ids = self._check_ids(seq_ids)
        lengths = list(lengths)
        if len(lengths) != len(seq_ids):
            raise ValueError(f"need one length per sequence: {len(seq_ids)} seq_ids, {len(lengths)} lengths")
        for L in range(self.num_layers):
            ql, tl = self._qlen[L], self._tlen[L]
            have = [ql[s] + tl[s] for s in seq_ids]
            if have != lengths:
                i = next(i for i, (h, n) in enumerate(zip(have, lengths)) if h != n)
                raise ValueError(f"layer {L}: sequence {seq_ids[i]} holds {have[i]} tokens, the decode step "
                                 f"expects {lengths[i]}")
        self._check_decode_fits(0, seq_ids)  # reservations are per sequence (all layers alike)
        return seq_ids

    def advance_decode_step(self, seq_ids: Sequence[int]) -> None:
        """Advance the host ledger of every layer by one token per sequence (after
        :meth:`check_decode_step`; the device appends of the step move the device lengths)."""
        for L in range(self.num_layers):
            self._advance_host(L, seq_ids)

    def decode_append_device(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                             backend: Optional[str] = None) -> None:
        """``cometq::kv4_decode_append`` into ``layer``: one token per row of ``k, v [B, H, D]`` for
        the int32 ``slots [B]`` (``-1``: padding row).  Reads nothing from the host and leaves
        the host ledger alone (:meth:`advance_decode_step` / :meth:`append_decode` keep it)."""
        from . import ops

        c, L = self.config, layer
        ops.kv4_decode_append(k, v, self.k_packed[L], self.k_scale[L], self.k_zero[L], self.v_packed[L],
                              self.v_scale[L], self.v_zero[L], self.tail_k[L], self.tail_v[L], self.block_tables,
                              self._lens[:, L], slots, c.group_size, c.key_axis, c.value_axis, backend,
                              check_pool=False)

    def decode_attention_device(self, layer: int, q: torch.Tensor, slots: torch.Tensor, sm_scale: float,
                                num_splits: int, backend: Optional[str] = None) -> torch.Tensor:
        """``cometq::kv4_decode_attention`` of ``q [B, Hq, D]`` over the int32 ``slots [B]`` (each a
        sequence holding >= 1 token; rows may repeat a slot), with no host-side reads."""
        from . import ops

        c, L = self.config, layer
        return ops.kv4_decode_attention(
            q, self.k_packed[L], self.k_scale[L], self.k_zero[L], self.v_packed[L], self.v_scale[L], self.v_zero[L],
            self.tail_k[L], self.tail_v[L], self.block_tables, self.quant_lens[L], self.tail_lens[L], slots,
            c.group_size, c.key_axis, c.value_axis, float(sm_scale), int(num_splits), backend, check_pool=False,
        )

    def _sync_lens(self, layer: int, seq_ids: List[int]) -> None:
        if not seq_ids:
            return
        idx = self._ints(tuple(seq_ids), torch.long)
        ql, tl = self._qlen[layer], self._tlen[layer]
        # one index_put for both tables (a kernel launch per layer per step on the GPU)
        vals = tuple(ql[s] for s in seq_ids) + tuple(tl[s] for s in seq_ids)
        self._lens[:, layer, idx] = self._ints(vals, torch.int32).view(2, len(seq_ids))

    def _quantize_rows(self, layer, xk, xv, blocks, offsets, backend):
        from . import ops

        blocks = self._ints(tuple(blocks), torch.int32)
        offsets = self._ints(tuple(offsets), torch.int32)
        c, L = self.config, layer
        # (any strides: the kernels index x by its strides -- a prefill step's rows are a strided view, _cat_rows)
        ops.kv4_quantize_append(xk, self.k_packed[L], self.k_scale[L], self.k_zero[L], blocks, offsets,
                                c.group_size, c.key_axis, backend)
        ops.kv4_quantize_append(xv, self.v_packed[L], self.v_scale[L], self.v_zero[L], blocks, offsets,
                                c.group_size, c.value_axis, backend)

    # -- reads ----------------------------------------------------------------
    def gather(self, seq_id: int, layer: int, n_tokens: Optional[int] = None, dtype=torch.float32):
        """Dequantized ``(k, v)`` ``[H, n, D]``: the first ``n_tokens`` tokens (default: all) of
        ``seq_id`` in ``layer``.  Only the blocks covering the prefix are dequantized
        (a prefix read by a chunked prefill does not pay for the whole sequence)."""
        self._check_layer(layer)
        self._check_seq(seq_id)
        L, c = layer, self.config
        q, t = self._qlen[L][seq_id], self._tlen[L][seq_id]
        if n_tokens is None:
            n_tokens = q + t
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or not 0 <= n_tokens <= q + t:
            raise ValueError(f"n_tokens must be an int in [0, {q + t}] (length of sequence {seq_id} in layer {L}), "
                             f"got {n_tokens!r}")
        nq = min(n_tokens, q)
        blocks = self._ints(tuple(self._blocks[seq_id][: -(-nq // c.block_size)]), torch.long)
        k = _gather_kv4(self.k_packed[L], self.k_scale[L], self.k_zero[L], blocks, nq, c.group_size, c.key_axis, dtype)
        v = _gather_kv4(self.v_packed[L], self.v_scale[L], self.v_zero[L], blocks, nq, c.group_size, c.value_axis,
                        dtype)
        nt = n_tokens - nq
        if nt:
            k = torch.cat([k, self.tail_k[L, seq_id, :, :nt].to(dtype)], 1)
            v = torch.cat([v, self.tail_v[L, seq_id, :, :nt].to(dtype)], 1)
        return k, v

    @property
    def num_sms(self) -> int:
        """Streaming multiprocessors of the pool's GPU (132, an H100's, off the GPU): what the
        default split counts are sized for."""
        n = self.__dict__.get("_num_sms")
        if n is None:
            n = 132
            if self.device.type == "cuda":
                n = torch.cuda.get_device_properties(self.device).multi_processor_count
            self._num_sms = n
        return n

    def default_num_splits(self, seq_ids: Sequence[int], layer: int = 0, num_sms: Optional[int] = None) -> int:
        """Split-K partitions for a decode batch (see :func:`default_num_splits`; ``num_sms``
        default: the pool's GPU's)."""
        if not seq_ids:
            return 1
        longest = max(-(-self._qlen[layer][s] // self.config.block_size) for s in seq_ids)
        return default_num_splits(len(seq_ids), self.config.num_kv_heads, longest, num_sms or self.num_sms)

    def decode_attention(self, layer: int, q: torch.Tensor, seq_ids: Sequence[int], sm_scale: Optional[float] = None,
                         num_splits: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
        """``cometq::kv4_decode_attention`` of ``q [len(seq_ids), Hq, D]`` over ``layer`` of these sequences."""
        from . import ops

        self._check_layer(layer)
        seq_ids = list(seq_ids)
        ql, tl = self._qlen[layer], self._tlen[layer]
        if not set(seq_ids) <= self._blocks.keys() or any(type(s) is not int for s in seq_ids):
            for s in seq_ids:
                self._check_seq(s)
        for s in seq_ids:
            if ql[s] + tl[s] < 1:
                raise ValueError(f"sequence {s} is empty in layer {layer}: append tokens before attending")
        c, L = self.config, layer
        sm = float(sm_scale) if sm_scale is not None else c.head_dim ** -0.5
        ns = int(num_splits) if num_splits is not None else self.default_num_splits(seq_ids, L)
        ids = self._ints(tuple(seq_ids), torch.int32)
        return ops.kv4_decode_attention(
            q, self.k_packed[L], self.k_scale[L], self.k_zero[L], self.v_packed[L], self.v_scale[L], self.v_zero[L],
            self.tail_k[L], self.tail_v[L], self.block_tables, self.quant_lens[L], self.tail_lens[L], ids,
            c.group_size, c.key_axis, c.value_axis, sm, ns, backend, check_pool=False,  # the pool built them
        )

    def memory_bytes(self) -> int:
        """Bytes of every layer's blocks (data + scales + zeros) and staging tails."""
        tails = 2 * self.tail_k.numel() * self.tail_k.element_size()
        return self.num_layers * self.config.bytes_per_block() * self.config.num_blocks + tails

    def layer(self, layer: int) -> "PagedKV4Pool":
        """A one-layer :class:`PagedKV4Pool` view of ``layer`` (shares storage and allocator)."""
        self._check_layer(layer)
        return PagedKV4Pool._view(self, layer)


class PagedKV4Pool:
    """A paged KV4 pool for one attention layer (layout in the module doc).

    A thin view of one layer of a :class:`MultiLayerKV4Pool`:
    ``PagedKV4Pool(config)`` owns a one-layer pool; ``multi.layer(i)`` views layer
    ``i`` of a shared one.  Unlike the multi-layer API, ``append`` and
    ``append_decode`` allocate what they need themselves (a :meth:`~MultiLayerKV4Pool.reserve`
    for the new length, all-or-nothing, shared by every layer) before writing.
    """

    def __init__(self, config: PagedKV4Config, device="cpu"):
        self._init(MultiLayerKV4Pool(config, 1, device), 0)

    @classmethod
    def _view(cls, pool: MultiLayerKV4Pool, layer: int) -> "PagedKV4Pool":
        self = cls.__new__(cls)
        self._init(pool, layer)
        return self

    def _init(self, pool: MultiLayerKV4Pool, layer: int) -> None:
        self.pool, self.layer = pool, layer
        self.config, self.device = pool.config, pool.device
        L = layer  # views of this layer's storage (contiguous: the layer dim leads)
        self.k_packed, self.v_packed = pool.k_packed[L], pool.v_packed[L]
        self.k_scale, self.k_zero = pool.k_scale[L], pool.k_zero[L]
        self.v_scale, self.v_zero = pool.v_scale[L], pool.v_zero[L]
        self.tail_k, self.tail_v = pool.tail_k[L], pool.tail_v[L]
        self.block_tables = pool.block_tables
        self.quant_lens, self.tail_lens = pool.quant_lens[L], pool.tail_lens[L]

    # -- bookkeeping (the shared allocator's) -----------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def sequences(self) -> List[int]:
        return self.pool.sequences

    def seq_len(self, seq_id: int) -> int:
        return self.pool.seq_len(seq_id, self.layer)

    def quant_len(self, seq_id: int) -> int:
        return self.pool.quant_len(seq_id, self.layer)

    def tail_len(self, seq_id: int) -> int:
        return self.pool.tail_len(seq_id, self.layer)

    def blocks_of(self, seq_id: int) -> List[int]:
        return self.pool.blocks_of(seq_id)

    def add_sequence(self) -> int:
        """Reserve a sequence slot; raises :class:`KV4PoolExhausted` when all are taken."""
        return self.pool.add_sequence()

    def free_sequence(self, seq_id: int) -> None:
        """Return a sequence's blocks and slot to the pool (every layer of it)."""
        self.pool.free(seq_id)

    def blocks_needed(self, seq_id: int, n_new: int) -> int:
        """Extra blocks an append of ``n_new`` tokens would allocate."""
        return self.pool.blocks_needed(seq_id, self.seq_len(seq_id) + n_new)

    # -- appends ----------------------------------------------------------------
    def append(self, seq_id: int, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> None:
        """Append ``T`` tokens ``k, v [H, T, D]`` (prefill or one step) to one sequence."""
        self.pool._check_seq(seq_id)
        for name, x in (("k", k), ("v", v)):
            self.pool._check_rows(name, x)
            if x.shape != k.shape:
                raise ValueError(f"{name} shape {tuple(x.shape)} != k shape {tuple(k.shape)}")
        if k.shape[1] == 0:
            return
        self.pool.reserve(seq_id, self.seq_len(seq_id) + k.shape[1])
        self.pool.append(self.layer, seq_id, k, v, backend)

    def append_decode(self, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> None:
        """One new token per sequence, batched: ``k, v [n, H, D]`` for ``seq_ids`` (distinct)."""
        seq_ids = self.pool._check_ids(seq_ids)
        self.pool._check_rows("k", k, len(seq_ids))
        self.pool._check_rows("v", v, len(seq_ids))
        if not seq_ids:
            return
        self.pool.reserve_many({s: self.seq_len(s) + 1 for s in seq_ids})
        self.pool.append_decode(self.layer, seq_ids, k, v, backend)

    # -- reads ----------------------------------------------------------------
    def gather(self, seq_id: int, dtype=torch.float32, n_tokens: Optional[int] = None):
        """Dequantized ``(k, v)`` ``[H, T, D]`` of one sequence (or its first ``n_tokens``)."""
        return self.pool.gather(seq_id, self.layer, n_tokens, dtype)

    def default_num_splits(self, seq_ids: Sequence[int], num_sms: Optional[int] = None) -> int:
        """Split-K partitions for a decode batch (see :func:`default_num_splits`)."""
        return self.pool.default_num_splits(seq_ids, self.layer, num_sms)

    def decode_attention(self, q: torch.Tensor, seq_ids: Sequence[int], sm_scale: Optional[float] = None,
                         num_splits: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
        """``cometq::kv4_decode_attention`` of ``q [len(seq_ids), Hq, D]`` over these sequences."""
        for s in seq_ids:
            self.pool._check_seq(s)
        return self.pool.decode_attention(self.layer, q, seq_ids, sm_scale, num_splits, backend)
