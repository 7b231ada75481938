"""Paged KV storage for the serving runner.

Two pools share one interface (:class:`KVPool`):

* :class:`PagedFPPool` -- full-precision (fp16/bf16/fp32) K/V in fixed-size
  blocks.  This is the "cometq FP16 path" baseline and the fallback when the
  4-bit pool is not available.
* :class:`KV4PagedPool` (in :mod:`cometq.serve.kv4`) -- an adapter over
  :mod:`cometq.paged`, the packed 4-bit pool read by ``cometq::kv4_decode_attention``.

Block bookkeeping (free list, per-sequence block tables, token counts) is the
pool's job; the runner only asks for capacity (``reserve``), writes K/V of
every layer at explicit positions, and reads or attends.  Capacity is reserved
for all layers at once: a sequence owns the same block ids in every layer, so
one block table per sequence is enough (as in vLLM).

Layout of :class:`PagedFPPool` (per layer)::

    k[layer]: [num_blocks, block_size, n_kv_heads, head_dim]
    token t of sequence s lives at block_table[s][t // block_size], row t % block_size
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..paged import BlockAllocator, PrefixCaching, _cat_rows, canonical_device, to_device_ints

__all__ = ["PoolExhausted", "KVPool", "PagedFPPool"]


class PoolExhausted(RuntimeError):
    """Not enough free blocks for a reservation (the engine waits or preempts)."""


class KVPool(PrefixCaching):
    """Block bookkeeping shared by every pool (subclasses own the tensors)."""

    kind = "abstract"

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int):
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self._alloc = BlockAllocator(num_blocks)
        self._tables: Dict[int, List[int]] = {}
        self._capacity: Dict[int, int] = {}

    def device_decode_supported(self, graphs: bool = True) -> bool:
        """Whether the pool has device-side decode ops for full-step CUDA graphs (the KV4 pool
        does; this one's decode path keeps host-side bookkeeping per layer)."""
        return False

    # -- bookkeeping -----------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self._alloc.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._alloc.num_free

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def blocks_needed(self, seq_id: int, n_tokens: int) -> int:
        """Extra blocks ``seq_id`` needs to hold ``n_tokens`` tokens in total."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, self.blocks_for(n_tokens) - have)

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> List[int]:
        return list(self._tables)

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Make room for ``n_tokens`` tokens in total (all layers); raises :class:`PoolExhausted`."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        need = self.blocks_needed(seq_id, n_tokens)
        if need > self._alloc.num_free:
            raise PoolExhausted(
                f"sequence {seq_id} needs {need} more blocks for {n_tokens} tokens, {self._alloc.num_free} free"
            )
        table = self._tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._alloc.take())
        self._capacity[seq_id] = max(self._capacity.get(seq_id, 0), n_tokens)
        self._on_reserve(seq_id, n_tokens)

    def free(self, seq_id: int) -> None:
        """Return every block of ``seq_id`` (no-op for an unknown id)."""
        table = self._tables.pop(seq_id, None)
        self._capacity.pop(seq_id, None)
        if table:
            self._alloc.release(table)
        self._on_free(seq_id)

    # -- prefix caching (paged.PrefixCache: full blocks shared by content; queries: PrefixCaching) ----
    def adopt(self, seq_id: int, blocks: Sequence[int]) -> None:
        """Start the new sequence ``seq_id`` with the cached ``blocks`` as its first tokens (all layers)."""
        if seq_id in self._tables:
            raise ValueError(f"adopt needs a new sequence; {seq_id} exists")
        self._alloc.check_cached(blocks)
        for b in blocks:
            self._alloc.share(b)
        self._tables[seq_id] = list(blocks)
        n = len(blocks) * self.block_size
        self._capacity[seq_id] = n
        self._on_reserve(seq_id, n)

    def register_block(self, seq_id: int, index: int, parent: int, tokens: tuple) -> int:
        """Name block ``index`` of ``seq_id`` (written in every layer) in the prefix cache; returns its node."""
        cache = self._alloc.cache
        if cache is None:
            raise RuntimeError("prefix caching is off (enable_prefix_caching())")
        table = self.block_table(seq_id)
        if len(tokens) != self.block_size or not 0 <= index < len(table):
            raise ValueError(f"block {index} of sequence {seq_id} ({len(table)} blocks) with {len(tokens)} tokens "
                             f"(block size {self.block_size})")
        return cache.insert(parent, tokens, table[index])

    def block_table(self, seq_id: int) -> List[int]:
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence {seq_id}")
        return self._tables[seq_id]

    def _slot_list(self, seq_id: int, start: int, n: int) -> List[int]:
        """Flat slot indices (block * block_size + row) of tokens [start, start + n), host ints."""
        table = self.block_table(seq_id)
        if start < 0 or start + n > len(table) * self.block_size:
            raise ValueError(
                f"tokens [{start}, {start + n}) of sequence {seq_id} exceed its reservation "
                f"({len(table)} blocks of {self.block_size})"
            )
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, start + n)]

    def _slots(self, seq_id: int, start: int, n: int, device) -> torch.Tensor:
        """:meth:`_slot_list` on ``device`` (pinned, non-blocking: no stream sync)."""
        return to_device_ints(self._slot_list(seq_id, start, n), torch.long, device)

    # hooks for subclasses
    def _on_reserve(self, seq_id: int, n_tokens: int) -> None:
        pass

    def _on_free(self, seq_id: int) -> None:
        pass

    # -- data path (subclasses) ---------------------------------------------------
    def write(self, layer: int, seq_id: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V ``[n, n_kv_heads, head_dim]`` of tokens ``[start, start + n)``."""
        raise NotImplementedError

    def write_decode(self, layer: int, seq_ids: Sequence[int], starts: Sequence[int], k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """One token per sequence: ``k, v [B, n_kv_heads, head_dim]`` at positions ``starts[b]``."""
        for i, (s, st) in enumerate(zip(seq_ids, starts)):
            self.write(layer, s, st, k[i:i + 1], v[i:i + 1])

    def read(self, layer: int, seq_id: int, length: int, dtype: torch.dtype):
        """K, V ``[length, n_kv_heads, head_dim]`` (dequantized for 4-bit pools)."""
        raise NotImplementedError

    def decode_attention(self, layer: int, seq_ids: Sequence[int], lengths: Sequence[int], q: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """Attention of one query token per sequence: ``q [B, n_heads, D]`` -> ``[B, n_heads, D]``
        over the first ``lengths[b]`` cached tokens of ``seq_ids[b]`` (already written)."""
        raise NotImplementedError

    def memory_bytes(self) -> int:
        raise NotImplementedError

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        want = (self.n_kv_heads, self.head_dim)
        if k.dim() != 3 or tuple(k.shape[1:]) != want or k.shape != v.shape:
            raise ValueError(
                f"k and v must both be [n, {want[0]}, {want[1]}], got {tuple(k.shape)} and {tuple(v.shape)}"
            )


def padded_decode_attention(q: torch.Tensor, keys: List[torch.Tensor], values: List[torch.Tensor],
                            scale: float) -> torch.Tensor:
    """Reference batched decode attention over ragged caches (GQA aware).

    ``q [B, H, D]``; ``keys[b], values[b]``: ``[T_b, Hkv, D]``.  Pads to the longest
    cache and masks the padding, one SDPA call for the batch.
    """
    b, h, d = q.shape
    t_max = max(k.shape[0] for k in keys)
    hkv = keys[0].shape[1]
    kp = q.new_zeros(b, t_max, hkv, d)
    vp = q.new_zeros(b, t_max, hkv, d)
    mask = torch.zeros(b, 1, 1, t_max, dtype=torch.bool, device=q.device)
    for i, (k, v) in enumerate(zip(keys, values)):
        n = k.shape[0]
        kp[i, :n] = k.to(q.dtype)
        vp[i, :n] = v.to(q.dtype)
        mask[i, ..., :n] = True
    return _masked_decode_sdpa(q, kp, vp, mask, scale)


def _masked_decode_sdpa(q, kp, vp, mask, scale):
    """``q [B, H, D]``, ``kp/vp [B, T, Hkv, D]``, ``mask [B, 1, 1, T]`` -> ``[B, H, D]``."""
    rep = q.shape[1] // kp.shape[2]
    kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)
    if rep > 1:
        kp, vp = kp.repeat_interleave(rep, dim=1), vp.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q[:, :, None, :], kp, vp, attn_mask=mask, scale=scale)
    return out[:, :, 0, :]


class PagedFPPool(KVPool):
    """Full-precision paged K/V (the unquantized baseline)."""

    kind = "fp"

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                         n_kv_heads=n_kv_heads, head_dim=head_dim)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"dtype must be fp16/bf16/fp32, got {dtype}")
        self.dtype = dtype
        self.device = canonical_device(device)
        shape = (num_layers, num_blocks * block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self._dec_key = None  # cache of the decode gather indices of the current step
        self._wr_key = None  # cache of the decode write slots of the current step
        self._pf_key = None  # cache of the prefill chunks' write slots of the current step

    def _chunk_slots(self, seq_ids, starts, lengths) -> torch.Tensor:
        """Device slots of the step's prefill chunks, concatenated; built once per step (every
        layer writes the same slots) with a pinned non-blocking copy.  (H100 run 5: building them
        per layer and chunk from a pageable tensor synced the stream 256 times per 8 x 1024-token
        prefill step of this baseline.)"""
        key = tuple(zip(seq_ids, starts, lengths))
        if self._pf_key != key:
            flat: List[int] = []
            for s, st, n in key:
                flat += self._slot_list(s, st, n)
            self._pf_key, self._pf_slots = key, to_device_ints(flat, torch.long, self.device)
        return self._pf_slots

    def write(self, layer, seq_id, start, k, v):
        self.write_prefill(layer, [seq_id], [start], [k], [v])

    def write_prefill(self, layer, seq_ids, starts, ks, vs):
        """Chunks of several sequences at once: ``ks[i], vs[i] [n_i, n_kv_heads, head_dim]`` at
        positions ``starts[i]..`` (one index write per layer for all of them)."""
        if not len(seq_ids) == len(starts) == len(ks) == len(vs):
            raise ValueError(f"need one start, k and v per sequence: {len(seq_ids)} seq_ids, {len(starts)} starts, "
                             f"{len(ks)} k, {len(vs)} v")
        for k, v in zip(ks, vs):
            self._check_kv(k, v)
        slots = self._chunk_slots(list(seq_ids), list(starts), [k.shape[0] for k in ks])
        # (back-to-back chunks of the step's K / V -- every fresh prompt of a prefill step -- are one view)
        k = _cat_rows(list(ks))
        v = _cat_rows(list(vs))
        self.k[layer, slots] = k.to(self.dtype)
        self.v[layer, slots] = v.to(self.dtype)

    def _on_reserve(self, seq_id, n_tokens):
        self._dec_key = self._wr_key = self._pf_key = None  # a block table changed: per-step caches are stale

    def _on_free(self, seq_id):
        self._dec_key = self._wr_key = self._pf_key = None

    def write_decode(self, layer, seq_ids, starts, k, v):
        # one token per sequence: one scatter for the batch; the slot vector is the same for
        # every layer of a step, so it is built (and copied to the device) once per step
        self._check_kv(k, v)
        if k.shape[0] != len(seq_ids) or len(starts) != len(seq_ids):
            raise ValueError(f"need one k/v row and one start per sequence: {len(seq_ids)} seq_ids, "
                             f"{len(starts)} starts, k shape {tuple(k.shape)}")
        key = (tuple(seq_ids), tuple(starts))
        if self._wr_key != key:
            bs, flat = self.block_size, []
            for s, st in zip(seq_ids, starts):
                table = self.block_table(s)
                if not 0 <= st < len(table) * bs:
                    raise ValueError(f"token {st} of sequence {s} exceeds its reservation ({len(table)} blocks of {bs})")
                flat.append(table[st // bs] * bs + st % bs)
            self._wr_key, self._wr_slots = key, to_device_ints(flat, torch.long, self.device)
        self.k[layer, self._wr_slots] = k.to(self.dtype)
        self.v[layer, self._wr_slots] = v.to(self.dtype)

    def read(self, layer, seq_id, length, dtype):
        slots = self._slots(seq_id, 0, length, self.device)
        return self.k[layer, slots].to(dtype), self.v[layer, slots].to(dtype)

    def decode_attention(self, layer, seq_ids, lengths, q, scale):
        # cometq::paged_decode_attention reads the pool in place (Triton kernel on CUDA, the
        # torch reference elsewhere).  The [B, max_blocks] int32 block tables and [B] lengths
        # are built once per step and reused by every layer (same sequences, same lengths).
        # (Until 2026-11-27 this gathered a padded [B, T_max, Hkv, D] copy of K and V per layer,
        # expanded it Hq / Hkv times and ran masked SDPA: 148.7 ms per output token on the H100
        # at batch 64 / 1024 + 512 tokens, twice HF generate's -- too weak a baseline.)
        key = (tuple(seq_ids), tuple(lengths))
        if self._dec_key != key:
            bs = self.block_size
            tables = [self.block_table(s) for s in seq_ids]
            for s, n, t in zip(seq_ids, lengths, tables):
                if not 0 <= n <= len(t) * bs:
                    raise ValueError(f"tokens [0, {n}) of sequence {s} exceed its reservation "
                                     f"({len(t)} blocks of {bs})")
            nb = max(1, max(len(t) for t in tables))
            tab = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.int32)
            lens = torch.tensor(list(lengths), dtype=torch.int32)
            pin = self.device.type == "cuda"  # pinned + non_blocking: no stream sync
            self._dec_key = key
            self._dec_tables = (tab.pin_memory() if pin else tab).to(self.device, non_blocking=pin)
            self._dec_lens = (lens.pin_memory() if pin else lens).to(self.device, non_blocking=pin)
        return ops.paged_decode_attention(q, self.k[layer], self.v[layer], self._dec_tables,
                                          self._dec_lens, self.block_size, scale)

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
