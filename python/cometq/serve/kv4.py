"""Adapter: :class:`cometq.paged.MultiLayerKV4Pool` behind the runner's :class:`KVPool` interface.

The 4-bit pool itself does the block accounting: one allocator, one block table
per sequence shared by every layer, and an explicit all-or-nothing
``reserve``.  The engine's ``reserve``/``free``/``num_used_blocks`` are the
pool's, so there is no second ledger to keep in step.  The only state kept
here is the map from engine sequence ids (an ever-growing counter) to pool
slots (``0 .. max_seqs-1``).

Accounting is exact: a sequence of ``n`` tokens owns the blocks its 4-bit part
fills (a staged pool -- per-channel keys -- keeps the last ``n mod G`` tokens
in its full-precision tail, which needs no block).  The engine reserves the
whole length of a step's chunk before the forward, so no layer's append can
run out of blocks mid-forward.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..paged import KV4PoolExhausted, MultiLayerKV4Pool, PagedKV4Config, canonical_device, default_num_splits
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
        # the base class's ledger is not used: the KV4 pool's allocator is the only one
        del self._alloc, self._tables, self._capacity
        self.config = PagedKV4Config(num_blocks=num_blocks, num_kv_heads=n_kv_heads, head_dim=head_dim,
                                     block_size=block_size, group_size=group_size, key_axis=key_axis,
                                     value_axis=value_axis, max_seqs=max_seqs, tail_dtype=tail_dtype)
        self.device = canonical_device(device)
        self.max_seqs = max_seqs
        self.backend = backend
        self.kv = MultiLayerKV4Pool(self.config, num_layers, self.device)
        self.layers = [self.kv.layer(i) for i in range(num_layers)]  # one-layer views (shared allocator)
        self._slot: Dict[int, int] = {}

    # -- bookkeeping: all delegated to the pool's allocator -------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.kv.num_used_blocks

    def blocks_for(self, n_tokens: int) -> int:
        return self.kv.blocks_for(n_tokens)

    def blocks_needed(self, seq_id: int, n_tokens: int) -> int:
        if seq_id in self._slot:
            return self.kv.blocks_needed(self._slot[seq_id], n_tokens)
        return self.kv.blocks_for(n_tokens)

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._slot

    def seq_ids(self) -> List[int]:
        return list(self._slot)

    def block_table(self, seq_id: int) -> List[int]:
        return self.kv.blocks_of(self._slot_of(seq_id))

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Room for ``n_tokens`` tokens in total (all layers); raises :class:`PoolExhausted`, changing nothing."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
        new = seq_id not in self._slot
        try:
            if new:
                self._slot[seq_id] = self.kv.add_sequence()
            self.kv.reserve(self._slot[seq_id], n_tokens)
        except KV4PoolExhausted as e:
            if new and seq_id in self._slot:
                self.kv.free(self._slot.pop(seq_id))
            raise PoolExhausted(f"sequence {seq_id}: {e}") from e

    def free(self, seq_id: int) -> None:
        """Return every block of ``seq_id`` (no-op for an unknown id)."""
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            self.kv.free(slot)

    # -- prefix caching: the 4-bit pool's (a block holds whole quantization groups) ---------
    def enable_prefix_caching(self) -> None:
        self.kv.enable_prefix_caching()

    @property
    def prefix_cache(self):
        return self.kv.prefix_cache

    def match_prefix(self, token_blocks):
        return self.kv.match_prefix(token_blocks)

    def adopt(self, seq_id: int, blocks: Sequence[int]) -> None:
        if seq_id in self._slot:
            raise ValueError(f"adopt needs a new sequence; {seq_id} exists")
        try:
            slot = self.kv.add_sequence()
        except KV4PoolExhausted as e:
            raise PoolExhausted(f"sequence {seq_id}: {e}") from e
        try:
            self.kv.adopt(slot, blocks)
        except Exception:
            self.kv.free(slot)
            raise
        self._slot[seq_id] = slot

    def register_block(self, seq_id: int, index: int, parent: int, tokens: tuple) -> int:
        return self.kv.register_block(self._slot_of(seq_id), index, parent, tokens)

    def _slot_of(self, seq_id: int) -> int:
        if seq_id not in self._slot:
            raise KeyError(f"unknown sequence {seq_id}")
        return self._slot[seq_id]

    def _check_at_end(self, layer: int, seq_id: int, slot: int, start: int) -> None:
        n = self.kv.seq_len(slot, layer)
        if n != start:
            raise ValueError(f"KV4 pool appends at the end: sequence {seq_id} holds {n} tokens in layer {layer}, "
                             f"write starts at {start}")

    # -- data path ------------------------------------------------------------------
    def write(self, layer, seq_id, start, k, v):
        self._check_kv(k, v)
        slot = self._slot_of(seq_id)
        self._check_at_end(layer, seq_id, slot, start)
        self.kv.append(layer, slot, k.transpose(0, 1), v.transpose(0, 1), backend=self.backend)

    def write_prefill(self, layer: int, seq_ids: Sequence[int], starts: Sequence[int], ks: Sequence[torch.Tensor],
                      vs: Sequence[torch.Tensor]) -> None:
        """Prefill chunks of several sequences in one batched append: ``ks[i], vs[i] [n_i, Hkv, D]`` at
        positions ``starts[i]..`` (each at the end of its sequence)."""
        if not len(seq_ids) == len(starts) == len(ks) == len(vs):
            raise ValueError(f"need one start, k and v per sequence: {len(seq_ids)} seq_ids, {len(starts)} starts, "
                             f"{len(ks)} k, {len(vs)} v")
        slots = []
        for s, st, k, v in zip(seq_ids, starts, ks, vs):
            self._check_kv(k, v)
            slots.append(self._slot_of(s))
            self._check_at_end(layer, s, slots[-1], st)
        self.kv.append_prefill(layer, slots, [k.transpose(0, 1) for k in ks], [v.transpose(0, 1) for v in vs],
                               backend=self.backend)

    def _slots_of(self, seq_ids) -> List[int]:
        slot = self._slot
        try:
            return [slot[s] for s in seq_ids]
        except KeyError:
            return [self._slot_of(s) for s in seq_ids]  # raises naming the unknown id

    def write_decode(self, layer, seq_ids, starts, k, v):
        slots = self._slots_of(seq_ids)
        self.kv._check_layer(layer)
        ql, tl = self.kv._qlen[layer], self.kv._tlen[layer]  # direct reads: this runs per layer per step
        for s, sl, st in zip(seq_ids, slots, starts):
            if ql[sl] + tl[sl] != st:
                self._check_at_end(layer, s, sl, st)  # raises with the full message
        self.kv.append_decode(layer, slots, k, v, backend=self.backend)

    def read(self, layer, seq_id, length, dtype):
        slot = self._slot_of(seq_id)
        n = self.kv.seq_len(slot, layer)
        if length > n:
            raise ValueError(f"sequence {seq_id} holds {n} tokens, {length} requested")
        k, v = self.kv.gather(slot, layer, length, dtype)  # dequantizes only the prefix's blocks
        return k.transpose(0, 1), v.transpose(0, 1)

    def decode_attention(self, layer, seq_ids, lengths, q, scale):
        slots = self._slots_of(seq_ids)
        self.kv._check_layer(layer)
        ql, tl = self.kv._qlen[layer], self.kv._tlen[layer]
        for s, sl, n in zip(seq_ids, slots, lengths):
            have = ql[sl] + tl[sl]
            if have != n:
                raise ValueError(f"decode over {n} tokens but sequence {s} holds {have} in layer {layer}")
        return self.kv.decode_attention(layer, q, slots, sm_scale=scale, backend=self.backend)

    # -- device-side decode steps (full-step CUDA graphs, ModelRunner.enable_cuda_graphs) --
    def device_decode_supported(self, graphs: bool = True) -> bool:
        """Whether :meth:`decode_layer_device` can run inside a CUDA graph here: the decode
        append resolves to Triton and the attention to Triton or CUDA (the CUDA backend's
        attention -- csrc/kv4_attention.cu or, for what it does not handle, the Triton kernel --
        reads nothing back either) on this pool's device (the reference ops read lengths back to
        the host).  Without graphs (``graphs=False``) any backend runs the step."""
        if not graphs:
            return True
        from ..ops import resolve_backend

        try:
            return (resolve_backend("kv4_decode_append", self.device, self.backend) == "triton"
                    and resolve_backend("kv4_decode_attention", self.device, self.backend) in ("triton", "cuda"))
        except (RuntimeError, ValueError):
            return False

    def check_decode_step(self, seq_ids: Sequence[int], starts: Sequence[int]) -> List[int]:
        """Check a decode step of one token per sequence at positions ``starts`` (each sequence
        holds exactly ``starts[i]`` tokens in every layer and has room for one more); returns
        the pool slots.  Changes nothing."""
        slots = self._slots_of(seq_ids)
        try:
            self.kv.check_decode_step(slots, starts)
        except ValueError as e:
            raise ValueError(f"{e} (engine sequences {list(seq_ids)} are pool slots {slots})") from None
        return slots

    def advance_decode_step(self, seq_ids: Sequence[int]) -> None:
        """Move the host ledger of every layer by one token per sequence (the device appends of
        the step, :meth:`decode_layer_device`, move the device lengths the same way)."""
        self.kv.advance_decode_step(self._slots_of(seq_ids))

    def decode_num_splits(self, batch: int) -> int:
        """Split-K count of decode attention for a captured step of ``batch`` rows: fixed per
        graph, so sized for the longest sequence the pool can hold (a split past a sequence's
        last block exits at once)."""
        return default_num_splits(batch, self.n_kv_heads, self.config.blocks_per_seq, self.kv.num_sms)

    def decode_layer_device(self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor,
                            append_slots: torch.Tensor, attn_slots: torch.Tensor, scale: float,
                            num_splits: int) -> torch.Tensor:
        """Append ``k, v [B, Hkv, D]`` (int32 ``append_slots``, -1 = padding) and attend with
        ``q [B, H, D]`` over ``attn_slots`` in ``layer``: device tensors only, no host reads."""
        self.kv.decode_append_device(layer, k, v, append_slots, self.backend)
        return self.kv.decode_attention_device(layer, q, attn_slots, scale, num_splits, self.backend)

    def memory_bytes(self) -> int:
        return self.kv.memory_bytes()
