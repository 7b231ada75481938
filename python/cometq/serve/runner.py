"""Model runner: a gpt-fast style forward of a Llama-family HF model over a paged KV pool.

The runner borrows the HF model's modules (embeddings, per-layer norms,
q/k/v/o projections -- plain ``nn.Linear`` or cometq ``W4AxLinear`` after
``quantize_`` --, MLP, rotary embedding, final norm, lm_head) and writes its own
forward over a *flattened, ragged* batch: the tokens of every scheduled chunk
are concatenated into one ``[T_total, hidden]`` matrix so every linear layer
runs once per step for the whole batch (that is where W4Ax pays off), and only
attention is per sequence:

* prefill chunk (``start == 0`` or more than one token): causal attention of
  the chunk's queries over ``cached prefix (read back from the pool) + the
  chunk's own fresh full-precision K/V``; the chunk's K/V are then in the pool
  (quantized to 4 bits for a KV4 pool);
* decode token (one token, ``start > 0``): all decode queries of a step go
  through the pool's batched ``decode_attention`` (for KV4: the
  ``cometq::kv4_decode_attention`` op reading packed 4-bit K/V).

Supported: LlamaForCausalLM and models with the same module tree (Mistral,
Qwen2, Qwen3's q/k norms, SmolLM2).  Sliding-window attention is not
implemented: the runner caps the context at the window, where it is exact.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import autotune
from ..paged import to_device_ints
from .kv import KVPool, PagedFPPool

__all__ = ["Chunk", "DecodeFuture", "ModelRunner", "model_geometry"]


@dataclass
class Chunk:
    """Tokens ``[start, start + len(tokens))`` of sequence ``seq_id`` to run this step."""

    seq_id: int
    tokens: List[int]
    start: int

    @property
    def is_decode(self) -> bool:
        return len(self.tokens) == 1 and self.start > 0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def model_geometry(model):
    """(num_layers, n_heads, n_kv_heads, head_dim, max_positions) of a Llama-family model."""
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    max_pos = getattr(cfg, "max_position_embeddings", 2048)
    sw = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        sw = None
    if isinstance(sw, int) and sw > 0:
        max_pos = min(max_pos, sw)
    return cfg.num_hidden_layers, n_heads, n_kv, head_dim, max_pos


class ModelRunner:
    """Runs chunks of many sequences through ``model`` against ``pool``."""

    def __init__(self, model, pool: KVPool, *, fuse: bool = True, fused_ops: Optional[bool] = None,
                 fused_ops_backend: Optional[str] = None):
        inner = getattr(model, "model", None)
        missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, n)]
        if inner is None or missing or not hasattr(model, "lm_head"):
            raise TypeError(
                f"{type(model).__name__} is not a Llama-family causal LM (missing model.{missing or 'model'} / lm_head)"
            )
        for i, layer in enumerate(inner.layers):
            att = getattr(layer, "self_attn", None)
            need = ("q_proj", "k_proj", "v_proj", "o_proj")
            if att is None or not all(hasattr(att, n) for n in need) or not hasattr(layer, "mlp"):
                raise TypeError(f"layer {i} of {type(model).__name__} lacks self_attn.{{q,k,v,o}}_proj / mlp")
        self.model = model
        self.inner = inner
        self.num_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.max_positions = model_geometry(model)
        if (pool.num_layers, pool.n_kv_heads, pool.head_dim) != (self.num_layers, self.n_kv_heads, self.head_dim):
            raise ValueError(
                f"pool geometry (layers={pool.num_layers}, kv_heads={pool.n_kv_heads}, head_dim={pool.head_dim}) "
                f"does not match the model ({self.num_layers}, {self.n_kv_heads}, {self.head_dim})"
            )
        self.pool = pool
        self.scale = getattr(inner.layers[0].self_attn, "scaling", self.head_dim ** -0.5)
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.vocab_size = model.config.vocab_size
        # device feedback of greedy tokens (decode_continue) is safe only when every logit row's
        # argmax is a valid input id: a head wider than the vocabulary / embedding (padded heads)
        # could feed an id the host check (_flatten) never saw -- an out-of-range embedding read
        head = getattr(model, "lm_head", None)
        head_rows = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [None])[0]
        self._feedback_ok = head_rows is not None and head_rows <= min(self.vocab_size,
                                                                       inner.embed_tokens.num_embeddings)
        if not isinstance(fuse, bool):
            raise TypeError(f"fuse must be a bool, got {fuse!r}")
        # per layer: fused q/k/v and gate/up projections (None where the modules differ)
        self._qkv_fused: List = [None] * self.num_layers
        self._mlp_fused: List = [None] * self.num_layers
        self._fused_keys: Dict = {}  # (table, layer) -> weakrefs to the weights a fusion was checked against
        self.graph_resets = 0  # times the captured decode graphs were dropped (reset_cuda_graphs)
        if fuse:
            self.fuse_projections()
        # one-kernel RMSNorm / add+RMSNorm / RoPE split / SiLU-and-mul (cometq.layers) instead of
        # the HF modules' ~25 tiny kernels per layer; None: on where the Triton kernels run (CUDA)
        if fused_ops is not None and not isinstance(fused_ops, bool):
            raise TypeError(f"fused_ops must be a bool or None, got {fused_ops!r}")
        self._fops_backend = fused_ops_backend
        self._fops = self._fused_ops_available() if fused_ops is None else fused_ops
        if self._fops and not self._fused_ops_supported():
            raise ValueError(f"fused_ops=True needs RMSNorm layers (weight, variance_epsilon), SiLU MLPs and "
                             f"rotate-half RoPE over the whole head_dim; {type(model).__name__} has other modules")

    _NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
    _SILUS = ("SiLU", "SiLUActivation")

    def _fused_ops_supported(self) -> bool:
        """The layer modules are the ones :mod:`cometq.layers` reproduces (HF RMSNorm math, SiLU)."""
        inner = self.inner
        norms = [inner.norm] + [m for layer in inner.layers for m in (layer.input_layernorm,
                                                                      layer.post_attention_layernorm)]
        ok = all(type(m).__name__ in self._NORMS and hasattr(m, "variance_epsilon") for m in norms)
        acts = [getattr(layer.mlp, "act_fn", None) for layer in inner.layers]
        return ok and all(type(a).__name__ in self._SILUS for a in acts)

    def _fused_ops_available(self) -> bool:
        from ..ops import resolve_backend

        if self.device.type != "cuda" or not self._fused_ops_supported():
            return False
        try:
            return all(resolve_backend(op, self.device, self._fops_backend) == "triton"
                       for op in ("rms_norm", "add_rms_norm", "rope_qkv", "silu_mul"))
        except (RuntimeError, ValueError):
            return False

    @property
    def fused_ops(self) -> bool:
        """Whether the layer's elementwise pieces run as the fused ops (``cometq.layers``)."""
        return self._fops

    def _fop(self, op: str):
        """The fused layer op's backend function, resolved once (the runner builds its arguments:
        no per-call validation layer; ``ops.layer_op_impl``)."""
        impls = self.__dict__.setdefault("_fop_impls", {})
        key = (op, self._fops_backend)
        fn = impls.get(key)
        if fn is None:
            from ..ops import layer_op_impl

            fn = impls[key] = layer_op_impl(op, self.device, self._fops_backend)
        return fn

    def _norm(self, mod, h: torch.Tensor) -> torch.Tensor:
        if self._fops:
            return self._fop("rms_norm")(h, mod.weight, mod.variance_epsilon)
        return mod(h)

    def fuse_projections(self) -> int:
        """Fuse each layer's q/k/v and gate/up projections (:func:`cometq.nn.fuse_linears`): one
        GEMM (and, for W4Ax layers, one activation quantization) per group instead of 3 / 2.
        The model's own modules keep working (their weights become views of the fused ones).
        Returns how many groups were fused."""
        from ..nn import fuse_linears

        n = new = 0
        for li, layer in enumerate(self.inner.layers):
            att = layer.self_attn
            if self._qkv_fused[li] is None:
                f = fuse_linears([att.q_proj, att.k_proj, att.v_proj])
                if f is not None:
                    self._qkv_fused[li] = f
                    new += 1
            mlp = layer.mlp
            if self._mlp_fused[li] is None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj",
                                                                            "act_fn")):
                f = fuse_linears([mlp.gate_proj, mlp.up_proj])
                if f is not None:
                    self._mlp_fused[li] = f
                    new += 1
            n += (self._qkv_fused[li] is not None) + (self._mlp_fused[li] is not None)
        if new and hasattr(self, "graph_resets"):
            self.reset_cuda_graphs()  # graphs captured on the unfused weights (now replaced by views)
        return n

    @classmethod
    def with_fp_pool(cls, model, *, num_blocks: int, block_size: int = 16, dtype=None, fuse: bool = True,
                     fused_ops: Optional[bool] = None):
        nl, _, nkv, hd, _ = model_geometry(model)
        w = model.model.embed_tokens.weight
        pool = PagedFPPool(num_layers=nl, num_blocks=num_blocks, block_size=block_size, n_kv_heads=nkv,
                           head_dim=hd, dtype=dtype or w.dtype, device=w.device)
        return cls(model, pool, fuse=fuse, fused_ops=fused_ops)

    @classmethod
    def with_kv4_pool(cls, model, *, num_blocks: int, block_size: int = 32, group_size: Optional[int] = None,
                      max_seqs: int = 64, key_axis: str = "channel", value_axis: str = "token",
                      backend: Optional[str] = None, fuse: bool = True, fused_ops: Optional[bool] = None):
        from .kv4 import KV4PagedPool

        if group_size is None:  # 32 (docs/KV4.md default) unless the blocks are smaller
            group_size = min(32, block_size)
        nl, _, nkv, hd, _ = model_geometry(model)
        w = model.model.embed_tokens.weight
        pool = KV4PagedPool(num_layers=nl, num_blocks=num_blocks, n_kv_heads=nkv, head_dim=hd,
                            block_size=block_size, group_size=group_size, key_axis=key_axis,
                            value_axis=value_axis, max_seqs=max_seqs, device=w.device, backend=backend)
        return cls(model, pool, fuse=fuse, fused_ops=fused_ops)

    @classmethod
    def build(cls, model, *, kv4: bool, num_blocks: int, block_size: int = 32, max_seqs: int = 64,
              fuse: bool = True, fused_ops: Optional[bool] = None, **kw):
        """A runner with a KV4 pool (``kv4=True``) or a full-precision paged pool in the model's dtype.
        ``fuse``: fuse q/k/v and gate/up projections (:meth:`fuse_projections`); ``fused_ops``: the
        one-kernel RMSNorm / RoPE split / SiLU-and-mul (:mod:`cometq.layers`; None: on with CUDA)."""
        if kv4:
            return cls.with_kv4_pool(model, num_blocks=num_blocks, block_size=block_size, max_seqs=max_seqs,
                                     fuse=fuse, fused_ops=fused_ops, **kw)
        return cls.with_fp_pool(model, num_blocks=num_blocks, block_size=block_size, fuse=fuse, fused_ops=fused_ops)

    # ------------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [T, H, D]; cos/sin [T, D] -> broadcast over heads (HF apply_rotary_pos_emb math)
        return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]

    def _prefill_attention(self, q, k_all, v_all, start: int) -> torch.Tensor:
        """q ``[n, H, D]`` at positions start..start+n-1; k_all/v_all ``[start+n, Hkv, D]``."""
        n = q.shape[0]
        rep = self.n_heads // self.n_kv_heads
        qh = q.transpose(0, 1)[None]  # [1, H, n, D]
        kh = k_all.transpose(0, 1)[None]  # [1, Hkv, T, D]
        vh = v_all.transpose(0, 1)[None]
        if start == 0:
            # causal, no mask: GQA inside SDPA (flash supports it), no [H, T, D] K/V copies
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=rep > 1)
        else:
            # a continued chunk needs a mask, which the GQA-capable fused kernels do not take:
            # expand the heads so the masked call stays on a fused (memory-efficient) kernel
            kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
            qi = torch.arange(n, device=q.device)[:, None] + start
            kj = torch.arange(start + n, device=q.device)[None, :]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=kj <= qi, scale=self.scale)
        return out[0].transpose(0, 1)

    def _prefill_attention_batch(self, q, k, v) -> torch.Tensor:
        """Fresh prompts of equal length: q ``[G, n, H, D]``, k/v ``[G, n, Hkv, D]`` -> ``[G, n, H, D]``
        (causal, positions 0..n-1; the same math as :meth:`_prefill_attention` with ``start == 0``)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        return out.transpose(1, 2)

    # the pieces of a layer around attention (shared by the eager forward and the decode graphs)
    def _embed(self, ids_t: torch.Tensor, pos_t: torch.Tensor):
        h = self.inner.embed_tokens(ids_t)  # [T, hidden]
        cos, sin = self.inner.rotary_emb(h[None], pos_t[None])
        return h, cos[0].to(h.dtype), sin[0].to(h.dtype)

    def _qkv(self, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x: Optional[torch.Tensor] = None):
        """Pre-attention half of a layer: ``q [T, H, D]``, ``k, v [T, Hkv, D]`` (RoPE applied).
        ``x``: the input norm of ``h`` when the caller already has it (a fused add + norm)."""
        att, t = layer.self_attn, h.shape[0]
        if x is None:
            x = self._norm(layer.input_layernorm, h)
        fused = self._current_fused(self._qkv_fused, self._layer_index(layer), (att.q_proj, att.k_proj, att.v_proj))
        if fused is not None and self._fops and not hasattr(att, "q_norm") and cos.shape[-1] == self.head_dim:
            # split + RoPE + v copy in one kernel (the unfused path: ~11 kernels)
            return self._fop("rope_qkv")(fused(x), cos, sin, self.n_heads, self.n_kv_heads)
        if fused is not None:
            nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = fused(x).split([nq, nkv, nkv], dim=-1)
            q = q.reshape(t, self.n_heads, self.head_dim)
            k = k.reshape(t, self.n_kv_heads, self.head_dim)
            v = v.reshape(t, self.n_kv_heads, self.head_dim).contiguous()  # (q, k: RoPE makes new tensors)
        else:
            q = att.q_proj(x).view(t, self.n_heads, self.head_dim)
            k = att.k_proj(x).view(t, self.n_kv_heads, self.head_dim)
            v = att.v_proj(x).view(t, self.n_kv_heads, self.head_dim)
        if hasattr(att, "q_norm"):  # Qwen3-style per-head norms, before RoPE
            q, k = att.q_norm(q), att.k_norm(k)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _finish_layer(self, layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Post-attention half of a layer: o_proj + residual, MLP + residual (``attn [T, H*D]``)."""
        h, mlp_out = self._finish_layer_deferred(layer, h, attn)
        return h + mlp_out

    def _finish_layer_deferred(self, layer, h: torch.Tensor, attn: torch.Tensor):
        """:meth:`_finish_layer` without the last residual add: ``(h, mlp_out)``, the layer's output
        being ``h + mlp_out`` (a caller with the fused ops adds it inside the next norm)."""
        o = layer.self_attn.o_proj(attn)
        if self._fops:
            norm = layer.post_attention_layernorm
            x, h = self._fop("add_rms_norm")(o, h, norm.weight, norm.variance_epsilon)
        else:
            h = h + o
            x = layer.post_attention_layernorm(h)
        mlp = layer.mlp
        fused = self._current_fused(self._mlp_fused, self._layer_index(layer), (getattr(mlp, "gate_proj", None),
                                                                             getattr(mlp, "up_proj", None)))
        if fused is None:
            return h, layer.mlp(x)
        gu = fused(x)
        if self._fops and mlp.gate_proj.out_features == mlp.up_proj.out_features:
            return h, mlp.down_proj(self._fop("silu_mul")(gu))
        gate, up = gu.split([mlp.gate_proj.out_features, mlp.up_proj.out_features], dim=-1)
        return h, mlp.down_proj(mlp.act_fn(gate) * up)

    @staticmethod
    def _weights_of(parts) -> list:
        return [getattr(p, "qweight", None) if hasattr(p, "qweight") else getattr(p, "weight", None) for p in parts]

    def _current_fused(self, table: List, li: int, parts):
        """The fused module of ``parts`` if it still backs them, else a fresh fusion (or None).

        The model's modules view the fused weights; if the model was moved (``.to``), cast,
        re-quantized or reloaded since, they hold new tensor objects and the old fusion is stale
        (an identity check per group and step against weak references: in-place updates keep
        the objects, and the views, valid)."""
        from ..nn import fuse_linears

        f = table[li]
        if f is None:
            return None
        current = self._weights_of(parts)
        seen = self._fused_keys.get((id(table), li))
        if seen is None or any(r() is not t for r, t in zip(seen, current)):
            w = f.qweight if hasattr(f, "qweight") else f.weight
            ptr = w.untyped_storage().data_ptr()
            for p in parts:
                mine = getattr(p, "qweight", None) if hasattr(p, "qweight") else getattr(p, "weight", None)
                if mine is None or mine.device != w.device or mine.untyped_storage().data_ptr() != ptr:
                    # (forward runs under inference_mode: a fusion made there would own inference
                    # tensors, which the model's modules -- views of them -- cannot use outside it)
                    with torch.inference_mode(False):
                        table[li] = f = fuse_linears(list(parts))
                    # the old fusion's weights are now freed: a decode graph captured on them would
                    # read freed memory at its next replay (GPU run 6: two runners sharing one
                    # model took its fused weights from each other; the first runner's batch-1
                    # graph then produced NaN logits -> token 0).  Captured again on next use.
                    self.reset_cuda_graphs()
                    break
            self._fused_keys[(id(table), li)] = [weakref.ref(t) for t in self._weights_of(parts)]
        return f

    def reset_cuda_graphs(self) -> int:
        """Forget every captured decode graph (they are captured again on next use); returns how
        many batch buckets were dropped.  Called when the runner re-fuses projections (the model's
        weights changed identity); call it after replacing the model's weight tensors yourself --
        a graph replays the tensors it was captured on (in-place updates are seen, replaced
        tensors are not)."""
        g = getattr(self, "_graphs", None)
        if g is None or not g._by_size:
            return 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no replay of a dropped graph is still running
        n = len(g._by_size)
        g._by_size.clear()
        g._pool = None
        self.graph_resets += 1
        return n

    def _layer_index(self, layer) -> int:
        idx = getattr(self, "_layer_ids", None)
        if idx is None:
            idx = self._layer_ids = {id(m): i for i, m in enumerate(self.inner.layers)}
        return idx[id(layer)]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self._norm(self.inner.norm, h)).float()

    def enable_cuda_graphs(self, max_batch: int = 64, *, graphs: bool = True, full: Optional[bool] = None) -> None:
        """Run pure-decode steps of up to ``max_batch`` sequences through CUDA graphs.

        Two schemes, per padded batch size (buckets captured on first use, after an eager
        warm-up that compiles and tunes every kernel):

        * **full** (``full=True``; the default where the pool supports it -- the KV4 pool
          with its Triton kernels): the whole decode step, every layer's KV4 append and
          attention included, is ONE graph.  The pool's device-side ops take only slot ids
          from a static buffer and read/advance the lengths in device memory
          (``cometq::kv4_decode_append``); the host checks the step and advances its own
          ledger by the same rule (``check/advance_decode_step``), so nothing is read back.
          Attention uses a fixed split count per bucket (``decode_num_splits``); padding
          rows append nothing (slot -1) and attend over a real sequence (dropped).
        * **piecewise** (``full=False``; the full-precision pool): everything but attention
          is captured (vLLM's piecewise scheme): one graph for embedding + layer 0's
          pre-attention half, one per layer boundary and one for the last layer + norm +
          lm_head; the KV writes and decode attention run eagerly between them on the real
          rows (that pool's bookkeeping is host-side).

        Measured on an H100 (bench/RESULTS.md): eager launches cost 2-10x the GPU time of
        each small-M op, so a decode step was ~95 % Python.  ``graphs=False`` runs the same
        code eagerly (the CPU tests check the step split and the padding against the plain
        forward that way).  Graphs hold the weights' and the pool's addresses: enable them
        once the model is final (replacing its tensors afterwards, e.g. ``model.to`` or a
        reload, needs ``disable_cuda_graphs`` and a new ``enable_cuda_graphs``).
        """
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        if full is not None and not isinstance(full, bool):
            raise TypeError(f"full must be a bool or None, got {full!r}")
        ok = bool(getattr(self.pool, "device_decode_supported", lambda g: False)(graphs))
        if full and not ok:
            raise ValueError(f"full-step decode graphs need a pool with device-side decode ops (the KV4 pool with "
                             f"Triton kernels); this runner has {type(self.pool).__name__} "
                             f"(backend {getattr(self.pool, 'backend', None)!r}) on {self.device}")
        self._graphs = _DecodeGraphs(self, max_batch, graphs, ok if full is None else full)

    def disable_cuda_graphs(self) -> None:
        self._graphs = None

    def _flatten(self, chunks: Sequence[Chunk]):
        """Checked token ids, positions and row offsets of a step's chunks, concatenated."""
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        ids, pos, offsets = [], [], []
        for c in chunks:
            if not c.tokens:
                raise ValueError(f"chunk of sequence {c.seq_id} has no tokens")
            if c.start + len(c.tokens) > self.max_positions:
                raise ValueError(
                    f"sequence {c.seq_id} reaches position {c.start + len(c.tokens)} > max {self.max_positions}"
                )
            offsets.append(len(ids))
            ids.extend(c.tokens)
            pos.extend(range(c.start, c.start + len(c.tokens)))
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids, pos, offsets

    # -- asynchronous greedy decode (the engine's async scheduling) ---------------------
    def supports_async_decode(self, batch: int) -> bool:
        """Whether :meth:`decode_async` / :meth:`decode_continue` run a pure-decode step of
        ``batch`` sequences here: full-step decode graphs are on (``enable_cuda_graphs``; run
        eagerly with ``graphs=False``), the batch fits them, and every argmax of the LM head is
        a valid token id (no head rows past the vocabulary)."""
        g = getattr(self, "_graphs", None)
        return g is not None and g.full and g.fits(batch) and self._feedback_ok

    @torch.inference_mode()
    def decode_async(self, chunks: Sequence[Chunk]) -> Optional["DecodeFuture"]:
        """Queue a pure-decode step and return at once: a :class:`DecodeFuture` of each row's
        greedy token (the argmax of its logits, computed inside the step), or ``None`` where
        the step cannot run that way (no full-step graphs, a batch they do not fit, a chunk
        that is not a decode token, a capture that failed) -- run :meth:`forward` then.
        Checks and pool effects are :meth:`forward`'s."""
        if not chunks or not self.supports_async_decode(len(chunks)) or not all(c.is_decode for c in chunks):
            return None
        ids, pos, _ = self._flatten(chunks)
        try:
            return self._graphs.run_full(chunks, ids, pos, future=True)
        except _CaptureFailed as e:  # raised before the step touched the pool (see forward)
            self._capture_failed(e)
            return None

    def _capture_failed(self, e: "_CaptureFailed") -> None:
        """A bucket's warm-up or capture raised: that batch bucket runs eagerly from now on, the
        others keep their graphs (GPU run 6: one bucket's failure turned every decode step of
        the run eager, 58 ms per step for 10 ms of GPU work) -- unless :data:`MAX_CAPTURE_FAILURES`
        buckets failed, which looks systematic: then every decode step runs eagerly."""
        g = self._graphs
        g.failed[e.bucket] = str(e)
        if len(g.failed) >= MAX_CAPTURE_FAILURES:
            warnings.warn(f"{e}; {len(g.failed)} decode graph buckets failed ({sorted(g.failed)}): decode steps "
                          "run eagerly from now on", RuntimeWarning, stacklevel=3)
            self._graphs = None
        else:
            warnings.warn(f"{e}; decode steps of batch bucket {e.bucket} run eagerly from now on (the other "
                          "buckets keep their graphs)", RuntimeWarning, stacklevel=3)

    @torch.inference_mode()
    def decode_continue(self, prev: "DecodeFuture") -> "DecodeFuture":
        """Queue the decode step after ``prev``'s without waiting for ``prev``: the same
        sequences, one position on, each fed the token ``prev`` produces -- on the device (the
        step graph writes its argmax ids and the next positions into its own input buffer), so
        the host neither reads ``prev``'s tokens nor copies anything to the GPU.  ``prev`` must
        be the last step run on its batch bucket; the pool must hold room for one more token
        per sequence (``pool.reserve``).  Raises ``ValueError`` / ``RuntimeError`` before
        touching the pool."""
        g = getattr(self, "_graphs", None)
        if g is None or not isinstance(prev, DecodeFuture) or prev.graphs is not g:
            raise RuntimeError("decode_continue needs a DecodeFuture of this runner's current decode graphs")
        return g.continue_full(prev)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk], *, all_logits: bool = False,
                extra_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run one step.  Returns logits (float32) of each chunk's last token ``[len(chunks), V]``
        (or of every token ``[T_total, V]`` with ``all_logits``); ``extra_rows`` (indices into the
        step's concatenated tokens, chunk after chunk) appends those tokens' logits after the last
        tokens' rows (prompt log-probabilities).  The chunks' K/V are written to the pool, which
        must already hold capacity for them (``pool.reserve``)."""
        ids, pos, offsets = self._flatten(chunks)
        t = len(ids)
        dev = self.device
        extra = list(extra_rows or ())
        bad = [r for r in extra if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < t]
        if bad:
            raise ValueError(f"extra_rows must index the step's {t} tokens, got {bad[:5]}")
        if all_logits and extra:
            raise ValueError("extra_rows and all_logits exclude each other (all_logits returns every row)")
        graphs = getattr(self, "_graphs", None)
        if (graphs is not None and not all_logits and not extra and all(c.is_decode for c in chunks)
                and graphs.fits(len(chunks))):
            try:
                if graphs.full:  # one host->device copy of its own (ids, positions, slots)
                    return graphs.run_full(chunks, ids, pos)
                return graphs.run(chunks, to_device_ints(ids, torch.long, self.device),
                                  to_device_ints(pos, torch.long, self.device))
            except _CaptureFailed as e:  # raised before the step touched the pool: run it eagerly
                self._capture_failed(e)
        # pinned, non-blocking copies: no CPU-GPU sync before the step's kernels are queued
        h, cos, sin = self._embed(to_device_ints(ids, torch.long, dev), to_device_ints(pos, torch.long, dev))
        dec = [i for i, c in enumerate(chunks) if c.is_decode]
        pre = [i for i, c in enumerate(chunks) if not c.is_decode]
        dec_rows = to_device_ints([offsets[i] for i in dec], torch.long, dev)
        dec_ids = [chunks[i].seq_id for i in dec]
        dec_starts = [chunks[i].start for i in dec]
        H, D = self.n_heads, self.head_dim
        by_len: dict = {}
        for i in pre:
            if chunks[i].start == 0 and len(chunks[i].tokens) > 1:
                by_len.setdefault(len(chunks[i].tokens), []).append(i)
        same_len = [g for g in by_len.values() if len(g) > 1]
        grouped = {i for g in same_len for i in g}
        # a group's rows: a slice when its chunks sit back to back in the step (every fresh prompt
        # of a prefill-only step, in order): views instead of a row gather, a stack of K and V and a
        # scatter of the output (run 7's 8 x 1024 prefill: ~9 ms of the step's index / cat kernels)
        same_rows = []
        for g in same_len:
            n = len(chunks[g[0]].tokens)
            a = offsets[g[0]]
            if all(offsets[i] == a + j * n for j, i in enumerate(g)):
                same_rows.append(slice(a, a + len(g) * n))
            else:
                same_rows.append(to_device_ints([r for i in g for r in range(offsets[i], offsets[i] + n)],
                                                torch.long, dev))
        whole = len(same_rows) == 1 and isinstance(same_rows[0], slice) and same_rows[0] == slice(0, t)
        for li, layer in enumerate(self.inner.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            out = None if whole else torch.empty_like(q)  # (whole: the grouped attention's result is it)
            if pre:
                # cached prefixes are read before this step's K/V land (a staged KV4 tail may turn
                # into 4-bit groups on the write), then all chunks are written in one batched call
                prefixes = [self.pool.read(li, chunks[i].seq_id, chunks[i].start, q.dtype) if chunks[i].start
                            else None for i in pre]
                kcs = [k[offsets[i]:offsets[i] + len(chunks[i].tokens)] for i in pre]
                vcs = [v[offsets[i]:offsets[i] + len(chunks[i].tokens)] for i in pre]
                if len(pre) > 1 and hasattr(self.pool, "write_prefill"):
                    self.pool.write_prefill(li, [chunks[i].seq_id for i in pre], [chunks[i].start for i in pre],
                                            kcs, vcs)
                else:
                    for i, kc, vc in zip(pre, kcs, vcs):
                        self.pool.write(li, chunks[i].seq_id, chunks[i].start, kc, vc)
                # fresh prompts of one length share a batched causal SDPA call (a batch of equal
                # prompts -- the serving benchmark's -- was one call per sequence per layer)
                for group, rows in zip(same_len, same_rows):
                    n, G = len(chunks[group[0]].tokens), len(group)
                    qs = q[rows].reshape(G, n, H, D)
                    if isinstance(rows, slice):
                        ks, vs = k[rows].reshape(G, n, -1, D), v[rows].reshape(G, n, -1, D)
                    else:
                        ks = torch.stack([kcs[pre.index(i)] for i in group])
                        vs = torch.stack([vcs[pre.index(i)] for i in group])
                    res = self._prefill_attention_batch(qs, ks, vs).reshape(G * n, H, D)
                    if whole:
                        out = res
                    else:
                        out[rows] = res
                for i, prefix, kc, vc in zip(pre, prefixes, kcs, vcs):
                    if i in grouped:
                        continue
                    o, n, c = offsets[i], len(chunks[i].tokens), chunks[i]
                    if prefix is not None:
                        kc, vc = torch.cat([prefix[0], kc]), torch.cat([prefix[1], vc])
                    out[o:o + n] = self._prefill_attention(q[o:o + n], kc, vc, c.start)
            if dec:
                # decode rows beside prefill chunks: their attention is microseconds of a long
                # step, so a first-time tuning of its launch config (every candidate compiled and
                # timed: seconds; GPU run 5 saw 2-10 s steps while the decode batch grew during
                # prefill) must not stall it -- untuned unless a choice exists (autotune.frozen)
                with autotune.frozen() if pre else contextlib.nullcontext():
                    self.pool.write_decode(li, dec_ids, dec_starts, k[dec_rows], v[dec_rows])
                    out[dec_rows] = self.pool.decode_attention(
                        li, dec_ids, [st + 1 for st in dec_starts], q[dec_rows], self.scale
                    ).to(out.dtype)
            h = self._finish_layer(layer, h, out.reshape(t, H * D))
        if not all_logits:
            last = to_device_ints([o + len(c.tokens) - 1 for o, c in zip(offsets, chunks)] + extra, torch.long, dev)
            h = h[last]
        return self._head(h)


class _CaptureFailed(RuntimeError):
    """Warm-up or capture of a decode graph failed (nothing was written to the pool yet)."""

    def __init__(self, msg: str, bucket: int):
        super().__init__(msg)
        self.bucket = bucket


#: decode graph buckets whose capture may fail before every decode step runs eagerly (see
#: ``ModelRunner._capture_failed``)
MAX_CAPTURE_FAILURES = 3


def _capture(fn, what: str, bucket: int):
    """Run a bucket's warm-up + capture ``fn``; any failure becomes :class:`_CaptureFailed`."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported (with its type) and handled by the caller
        raise _CaptureFailed(f"CUDA graph capture of {what} failed: {type(e).__name__}: {e}", bucket) from e


def _graph_buckets(max_batch: int) -> List[int]:
    """Padded batch sizes: powers of two to 16, then steps of 16 (every GEMM shape-bucket
    edge -- 16, 64, 256 -- is a graph bucket, so padding never moves a step to another
    GEMM config), capped at ``max_batch``."""
    out, b = [], 1
    while b < min(16, max_batch):
        out.append(b)
        b *= 2
    b = 16
    while b < max_batch:
        out.append(b)
        b += 16
    out.append(max_batch)
    return sorted(set(out))


class _DecodeBucket:
    """Static buffers, piece outputs and graphs of one padded batch size."""

    def __init__(self, runner: "ModelRunner", bp: int):
        dev = runner.device
        self.bp = bp
        self.ids = torch.zeros(bp, dtype=torch.long, device=dev)
        self.pos = torch.ones(bp, dtype=torch.long, device=dev)
        self.attn = torch.zeros(bp, runner.n_heads * runner.head_dim, dtype=runner.dtype, device=dev)
        n = runner.num_layers
        self.q: List[Optional[torch.Tensor]] = [None] * n
        self.k: List[Optional[torch.Tensor]] = [None] * n
        self.v: List[Optional[torch.Tensor]] = [None] * n
        self.h = self.cos = self.sin = self.logits = None
        self.graphs: List = []
        # full-step mode: int32 [4, bp] = token ids, positions, append slots (-1: padding row),
        # attention slots (padding rows repeat a real one); one host->device copy per step
        self.meta = torch.zeros(4, bp, dtype=torch.int32, device=dev)
        self.num_splits = 1
        # full-step mode: each row's argmax token (written by the step, read by DecodeFuture),
        # pinned host copies of it (a ring: a step may be queued while the previous one's
        # tokens are still being read) and the future of the last step run on this bucket
        self.next_ids: Optional[torch.Tensor] = None
        self._host_ids = [None] * 3
        self._launches = 0
        self.last: Optional["DecodeFuture"] = None


class DecodeFuture:
    """The greedy tokens of a queued full-step decode step (:meth:`ModelRunner.decode_async`).

    ``tokens()`` waits for that step only (a CUDA event after the device->host copy of its
    argmax ids), not for steps queued after it."""

    def __init__(self, graphs: "_DecodeGraphs", st: _DecodeBucket, seq_ids: List[int], starts: List[int]):
        self.graphs, self.bucket = graphs, st
        self.seq_ids, self.starts = seq_ids, starts
        b = len(seq_ids)
        src = st.next_ids[:b]
        if src.device.type == "cuda":
            i = st._launches % len(st._host_ids)
            buf = st._host_ids[i]
            if buf is None:
                buf = st._host_ids[i] = torch.empty(st.bp, dtype=src.dtype, pin_memory=True)
            self._host = buf[:b]
            self._host.copy_(src, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = src.clone(), None
        st._launches += 1
        self._tokens: Optional[List[int]] = None

    def tokens(self) -> List[int]:
        """Each row's argmax token id (waits for the step)."""
        if self._tokens is None:
            if self._event is not None:
                self._event.synchronize()
            self._tokens = self._host.tolist()
        return self._tokens


class _DecodeGraphs:
    """Piecewise decode graphs of a :class:`ModelRunner` (see ``enable_cuda_graphs``)."""

    def __init__(self, runner: "ModelRunner", max_batch: int, use_graphs: bool, full: bool = False):
        self.r = runner
        self.max_batch = max_batch
        self.use_graphs = use_graphs
        self.full = full
        self.buckets = _graph_buckets(max_batch)
        self._by_size: Dict[int, _DecodeBucket] = {}
        self._pool = None
        self.failed: Dict[int, str] = {}  # bucket -> why its capture failed (those run eagerly)

    def fits(self, b: int) -> bool:
        """A batch of ``b`` decode rows runs on these graphs (its bucket's capture has not failed)."""
        return 1 <= b <= self.max_batch and self._bucket_size(b) not in self.failed

    def _bucket_size(self, b: int) -> int:
        return next(x for x in self.buckets if x >= b)

    # piece i of num_layers + 1: reads bucket state, writes its outputs into it
    def _piece(self, st: _DecodeBucket, i: int) -> None:
        r, layers = self.r, self.r.inner.layers
        if i == 0:
            st.h, st.cos, st.sin = r._embed(st.ids, st.pos)
        else:
            st.h = r._finish_layer(layers[i - 1], st.h, st.attn)
        if i < len(layers):
            st.q[i], st.k[i], st.v[i] = r._qkv(layers[i], st.h, st.cos, st.sin)
        else:
            st.logits = r._head(st.h)

    def _prepare(self, bp: int) -> _DecodeBucket:
        st = self._by_size.get(bp)
        if st is not None:
            return st
        st = _DecodeBucket(self.r, bp)
        n_pieces = self.r.num_layers + 1
        if self.use_graphs:
            _capture(lambda: self._capture_pieces(st, n_pieces), f"the piecewise decode step at batch {bp}", bp)
        self._by_size[bp] = st
        return st

    def _capture_pieces(self, st: _DecodeBucket, n_pieces: int) -> None:
        # eager warm-up on a side stream: compiles / autotunes every kernel of this shape and
        # fills every per-shape cache, so nothing inside the capture allocates host state,
        # launches a benchmark or syncs
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        # backend choices made here are timed as graph replays (GPU time): what these calls
        # will cost, where an eager timing would measure their Python launch (cometq.autotune)
        with torch.cuda.stream(s), autotune.timing("graph"):
            for _ in range(2):
                for i in range(n_pieces):
                    self._piece(st, i)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for i in range(n_pieces):
            g = torch.cuda.CUDAGraph()
            # thread_local: the server's other threads may touch CUDA while the engine thread captures.
            # The capture runs in the warm-up's timing mode: the choices are looked up by mode, and
            # under the eager key a capture finds none (no measuring while capturing) and records
            # the fixed order -- run 5's decode graphs ran the CUDA GEMM on every projection,
            # though the GEMM bench's graph replays measured Triton faster on 8B.gate_up (84 vs 124 us)
            with autotune.timing("graph"), torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
                self._piece(st, i)
            st.graphs.append(g)

    def _run_piece(self, st: _DecodeBucket, i: int) -> None:
        if self.use_graphs:
            st.graphs[i].replay()
        else:
            self._piece(st, i)

    def run(self, chunks: Sequence[Chunk], ids_t: torch.Tensor, pos_t: torch.Tensor) -> torch.Tensor:
        r = self.r
        b = len(chunks)
        st = self._prepare(self._bucket_size(b))
        # rows >= b keep the previous step's (valid) ids / positions: their outputs are dropped
        st.ids[:b].copy_(ids_t)
        st.pos[:b].copy_(pos_t)
        seq_ids = [c.seq_id for c in chunks]
        starts = [c.start for c in chunks]
        lens = [s + 1 for s in starts]
        self._run_piece(st, 0)
        for li in range(r.num_layers):
            r.pool.write_decode(li, seq_ids, starts, st.k[li][:b], st.v[li][:b])
            o = r.pool.decode_attention(li, seq_ids, lens, st.q[li][:b], r.scale)
            st.attn[:b].copy_(o.reshape(b, -1))
            self._run_piece(st, li + 1)
        return st.logits[:b].clone()

    # -- full-step mode: the whole decode step (appends and attention too) in one graph ----
    def _step(self, st: _DecodeBucket) -> None:
        r = self.r
        bp = st.bp
        h, cos, sin = r._embed(st.meta[0], st.meta[1])
        pending = None  # fused ops: a layer's MLP output, added to h inside the next norm (one kernel less)
        for li, layer in enumerate(r.inner.layers):
            x = None
            if pending is not None:
                norm = layer.input_layernorm
                x, h = r._fop("add_rms_norm")(pending, h, norm.weight, norm.variance_epsilon)
            q, k, v = r._qkv(layer, h, cos, sin, x)
            o = r.pool.decode_layer_device(li, k, v, q, st.meta[2], st.meta[3], r.scale, st.num_splits)
            o = o.reshape(bp, -1).to(h.dtype)
            if r.fused_ops:
                h, pending = r._finish_layer_deferred(layer, h, o)
            else:
                h = r._finish_layer(layer, h, o)
        if pending is not None:
            norm = r.inner.norm
            x, _ = r._fop("add_rms_norm")(pending, h, norm.weight, norm.variance_epsilon)
            st.logits = r.model.lm_head(x).float()
        else:
            st.logits = r._head(h)
        # device feedback (async scheduling, decode_continue): each row's greedy token and the
        # next position become the inputs of a replay that follows with no host copy in between
        # (a plain run_full overwrites them); padding rows follow row 0 -- their outputs are
        # dropped and they append nothing (slot -1)
        st.next_ids = st.logits.argmax(dim=-1)
        st.meta[0].copy_(st.next_ids)
        st.meta[1].add_(1)

    def _prepare_full(self, bp: int, host_meta: torch.Tensor) -> _DecodeBucket:
        st = self._by_size.get(bp)
        if st is not None:
            return st
        st = _DecodeBucket(self.r, bp)
        st.num_splits = self.r.pool.decode_num_splits(bp)
        if self.use_graphs:
            _capture(lambda: self._capture_full(st, host_meta), f"the full decode step at batch {bp}", bp)
        self._by_size[bp] = st
        return st

    def _capture_full(self, st: _DecodeBucket, host_meta: torch.Tensor) -> None:
        # warm-up (compile, autotune, per-shape caches) and capture with every append slot -1:
        # nothing is written to the pool; attention reads the step's real sequences
        warm = host_meta.clone()
        warm[2] = -1
        warm = warm.to(st.meta.device)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), autotune.timing("graph"):  # (see _capture_pieces)
            for _ in range(2):
                st.meta.copy_(warm)  # (each run advances the positions: the step's device feedback)
                self._step(st)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with autotune.timing("graph"), torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            self._step(st)  # (the warm-up's timing mode: see _capture_pieces)
        st.graphs.append(g)

    def run_full(self, chunks: Sequence[Chunk], ids: List[int], pos: List[int], future: bool = False):
        """One full decode step: its logits ``[b, V]``, or (``future``) a :class:`DecodeFuture`
        of its greedy tokens without waiting for the step."""
        pool = self.r.pool
        b = len(chunks)
        bp = self._bucket_size(b)
        seq_ids = [c.seq_id for c in chunks]
        starts = [c.start for c in chunks]
        # checks every sequence and layer before anything runs (raises, changing nothing)
        slots = pool.check_decode_step(seq_ids, starts)
        pad = bp - b
        host = torch.tensor([ids + ids[:1] * pad, pos + pos[:1] * pad, slots + [-1] * pad,
                             slots + slots[:1] * pad], dtype=torch.int32)
        st = self._prepare_full(bp, host)
        pool.advance_decode_step(seq_ids)  # the host ledger moves as the device lengths will
        if st.meta.device.type == "cuda":
            st.meta.copy_(host.pin_memory(), non_blocking=True)
        else:
            st.meta.copy_(host)
        self._launch(st)
        st.last = DecodeFuture(self, st, seq_ids, starts) if future else None
        return st.last if future else st.logits[:b].clone()

    def _launch(self, st: _DecodeBucket) -> None:
        if self.use_graphs:
            st.graphs[0].replay()
        else:
            self._step(st)

    def continue_full(self, prev: DecodeFuture) -> DecodeFuture:
        """The step after ``prev``'s on the same bucket, fed by the device (see ``_step``)."""
        st = prev.bucket
        if st.last is not prev or self._by_size.get(st.bp) is not st:
            raise RuntimeError("decode_continue: another step ran on this batch bucket after the one continued "
                               "(its inputs are no longer the device feedback of that step)")
        seq_ids, starts = prev.seq_ids, [s + 1 for s in prev.starts]
        top = max(starts)
        if top >= self.r.max_positions:
            raise ValueError(f"sequence {seq_ids[starts.index(top)]} reaches position {top + 1} > max "
                             f"{self.r.max_positions}")
        pool = self.r.pool
        pool.check_decode_step(seq_ids, starts)  # raises, changing nothing
        pool.advance_decode_step(seq_ids)
        self._launch(st)
        st.last = DecodeFuture(self, st, seq_ids, starts)
        return st.last
