"""Adapter: :class:`cometq.paged.PagedKV4Pool` (one per layer) behind the runner's :class:`KVPool` interface.

The 4-bit pool keeps its own free list per layer; this adapter keeps the
engine-facing bookkeeping (one block table per sequence, all layers at once)
and maps each engine sequence id to a pool *slot*, the same slot in every
layer (every layer sees the same allocation calls in the same order).

Accounting is conservative: the engine reserves ``ceil(tokens / block_size)``
blocks per sequence, while a staged pool (per-channel keys) stores up to G-1
recent tokens in its full-precision tail without a block.  So the layer pools
never run out before the engine's accounting does, and ``KV4PoolExhausted``
cannot surprise the runner mid-step.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..paged import PagedKV4Config, PagedKV4Pool
from .kv import KVPool, PoolExhausted

__all__ = ["KV4PagedPool"]


class KV4PagedPool(KVPool):
    """Packed 4-bit K/V for every layer; decode reads it through ``cometq::kv4_decode_attention``."""

    kind = "kv4"

    def __init__(self, *, num_layers: int, num_blocks: int, n_kv_heads: int, head_dim: int, block_size: int = 32,
                 group_size: int = 32, key_axis: str = "channel", value_axis: str = "token", max_seqs: int = 64,
                 tail_dtype: torch.dtype = torch.float16, device="cpu", backend: Optional[str] = None):
        super().__init__(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                         n_kv_heads=n_kv_heads, head_dim=head_dim)
        self.config = PagedKV4Config(num_blocks=num_blocks, num_kv_heads=n_kv_heads, head_dim=head_dim,
                                     block_size=block_size, group_size=group_size, key_axis=key_axis,
                                     value_axis=value_axis, max_seqs=max_seqs, tail_dtype=tail_dtype)
        self.device = torch.device(device)
        self.max_seqs = max_seqs
        self.backend = backend
        self.layers = [PagedKV4Pool(self.config, self.device) for _ in range(num_layers)]
        self._slot: Dict[int, int] = {}

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        new = seq_id not in self._slot
        if new:
            if len(self._slot) >= self.max_seqs:
                raise PoolExhausted(f"no free KV4 sequence slot (max_seqs={self.max_seqs})")
            slots = {p.add_sequence() for p in self.layers}
            if len(slots) != 1:  # layers are driven identically; a mismatch is a bookkeeping bug
                raise RuntimeError(f"KV4 layer pools disagree on the slot of sequence {seq_id}: {slots}")
            self._slot[seq_id] = slots.pop()
        try:
            super().reserve(seq_id, n_tokens)
        except PoolExhausted:
            if new:
                self._on_free(seq_id)
            raise

    def _on_free(self, seq_id: int) -> None:
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            for p in self.layers:
                p.free_sequence(slot)

    def _slot_of(self, seq_id: int) -> int:
        if seq_id not in self._slot:
            raise KeyError(f"unknown sequence {seq_id}")
        return self._slot[seq_id]

    def write(self, layer, seq_id, start, k, v):
        self._check_kv(k, v)
        p, s = self.layers[layer], self._slot_of(seq_id)
        if p.seq_len(s) != start:
            raise ValueError(f"KV4 pool appends at the end: sequence {seq_id} holds {p.seq_len(s)} tokens, "
                             f"write starts at {start}")
        if start + k.shape[0] > self._capacity.get(seq_id, 0):
            raise ValueError(f"tokens [{start}, {start + k.shape[0]}) exceed the reservation of sequence {seq_id}")
        p.append(s, k.transpose(0, 1), v.transpose(0, 1), backend=self.backend)

    def write_decode(self, layer, seq_ids, starts, k, v):
        p = self.layers[layer]
        slots = [self._slot_of(s) for s in seq_ids]
        for s, sl, st in zip(seq_ids, slots, starts):
            if p.seq_len(sl) != st:
                raise ValueError(f"KV4 pool appends at the end: sequence {s} holds {p.seq_len(sl)} tokens, "
                                 f"write at {st}")
        p.append_decode(slots, k, v, backend=self.backend)

    def read(self, layer, seq_id, length, dtype):
        k, v = self.layers[layer].gather(self._slot_of(seq_id), dtype)
        if k.shape[1] < length:
            raise ValueError(f"sequence {seq_id} holds {k.shape[1]} tokens, {length} requested")
        return k[:, :length].transpose(0, 1), v[:, :length].transpose(0, 1)

    def decode_attention(self, layer, seq_ids, lengths, q, scale):
        p = self.layers[layer]
        slots = [self._slot_of(s) for s in seq_ids]
        for s, sl, n in zip(seq_ids, slots, lengths):
            if p.seq_len(sl) != n:
                raise ValueError(f"decode over {n} tokens but sequence {s} holds {p.seq_len(sl)}")
        return p.decode_attention(q, slots, sm_scale=scale, backend=self.backend)

    def memory_bytes(self) -> int:
        tails = 2 * self.layers[0].tail_k.numel() * self.layers[0].tail_k.element_size()
        return self.num_layers * (self.config.bytes_per_block() * self.num_blocks + tails)
