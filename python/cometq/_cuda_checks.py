"""Argument checks of the CUDA extension's raw ops, in Python (no extension needed to import).

``cometq._cuda_register`` runs these before every ``torch.ops.cometq_C`` call.  They mirror
the TORCH_CHECKs of ``csrc/torch_bindings.cpp`` (same conditions, same key phrases in the
messages), raising ValueError / TypeError.
"""
from __future__ import annotations

import functools

import torch

from .layout import BLOCK_K
from .reference import check_group_size

#: the device type the raw ops take (a module attribute so the CPU tests can exercise the checks)
DEVICE_TYPE = "cuda"


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> tuple:
    """torch.cuda.get_device_capability, once per device (the eager w16 path asks on every call)."""
    return tuple(torch.cuda.get_device_capability(index))


def capability_of(dev: torch.device):
    """The compute capability of a CUDA ``dev`` (its index, or the current device); None elsewhere."""
    if dev.type != "cuda":
        return None
    return device_capability(dev.index if dev.index is not None else torch.cuda.current_device())


#: csrc/cometq_kernels.h COMETQ_W16_TILE_*: every tile id, and the wgmma kernel's (sm_90, G >= 128)
W16_TILE_IDS = (0, 1, 2, 3, 4, 5, 6, 7, 8)
W16_WGMMA_TILE_IDS = (4, 5, 6, 7, 8)


def _scale_mode(scale_mode) -> str:
    if scale_mode not in ("block", "class"):
        raise ValueError(f"scale_mode must be one of ('block', 'class'), got {scale_mode!r}")
    return scale_mode


# --------------------------------------------------------------------------
# argument checks in Python, before the raw ops
# --------------------------------------------------------------------------
# The raw ops check everything again with TORCH_CHECK, but on the lent H100's image (torch
# 2.11.0+cu130, extension built by its /opt/gcc toolchain) any C++ exception thrown out of
# cometq._C killed the process with SIGSEGV instead of raising (GPU runs 3 and 4,
# 2026-11-27).  So every input the C++ side would reject is rejected here first, with
# ValueError / TypeError naming the argument, its shape and its value.
def _cuda_tensor(name: str, t, device: torch.device, dtypes, ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != DEVICE_TYPE:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device} (shape {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device} (shape {tuple(t.shape)})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype} "
                        f"(shape {tuple(t.shape)})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INT_MAX = 2 ** 31 - 1


def check_quantize_act_inputs(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float) -> None:
    """What ``cometq_C::quantize_act`` checks, as ValueError / TypeError."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dev = x.device
    _cuda_tensor("x", x, dev, _FLOATS)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _cuda_tensor("perm", perm, dev, None, 1)
    _cuda_tensor("block_bits", block_bits, dev, None, 1)
    m, k = x.shape
    if k < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    nb = (k + BLOCK_K - 1) // BLOCK_K
    if perm.shape[0] != k:
        raise ValueError(f"perm shape {tuple(perm.shape)} must be ({k},) for x shape {tuple(x.shape)}")
    if block_bits.shape[0] != nb:
        raise ValueError(f"block_bits shape {tuple(block_bits.shape)} must be ({nb},) for K={k}")
    if not 0 <= int(n_int8) <= nb:
        raise ValueError(f"n_int8={n_int8} out of range [0, {nb}]")
    _scale_mode(scale_mode)
    if not 0.0 < float(int4_clip) <= 1.0:  # (also rejects NaN)
        raise ValueError(f"int4_clip must be in (0, 1], got int4_clip={float(int4_clip):g}")
    if m > _INT_MAX or k > _INT_MAX:
        raise ValueError(f"x shape {tuple(x.shape)} too large")


def check_w4ax_gemm_inputs(q4, q8, a_scales, block_bits, qweight, w_scales, w_offsets, group_size, bias,
                           out_dtype, scale_mode: str, split_k: int) -> None:
    """What ``cometq_C::w4ax_gemm`` checks, as ValueError / TypeError."""
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"qweight must be a torch.Tensor, got {type(qweight).__name__}")
    dev = qweight.device
    _cuda_tensor("qweight", qweight, dev, (torch.uint8,))
    _cuda_tensor("q4", q4, dev, (torch.uint8,), 2)
    _cuda_tensor("q8", q8, dev, (torch.int8,), 2)
    _cuda_tensor("a_scales", a_scales, dev, (torch.float32,), 2)
    _cuda_tensor("block_bits", block_bits, dev, None, 1)
    _cuda_tensor("w_scales", w_scales, dev, (torch.float32,), 2)
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    nb = block_bits.shape[0]
    if nb < 1:
        raise ValueError(f"block_bits must be 1-D and non-empty, got shape {tuple(block_bits.shape)}")
    half = BLOCK_K // 2
    w_k_pad = _weight_k_pad(qweight)
    k_pad = nb * BLOCK_K
    if w_k_pad != k_pad:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} holds K_pad={w_k_pad} but block_bits has {nb} "
                         f"blocks (K_pad={k_pad})")
    m, n = a_scales.shape[0], qweight.shape[0]
    if q4.shape[0] != m or q8.shape[0] != m:
        raise ValueError(f"q4 {tuple(q4.shape)}, q8 {tuple(q8.shape)} and a_scales {tuple(a_scales.shape)} must "
                         "have the same number of rows M")
    if q4.shape[1] % half or q8.shape[1] % BLOCK_K:
        raise ValueError(f"q4 shape {tuple(q4.shape)} / q8 shape {tuple(q8.shape)} are not whole {half}-byte INT4 "
                         f"/ {BLOCK_K}-byte INT8 blocks")
    if q4.shape[1] // half + q8.shape[1] // BLOCK_K != nb:
        raise ValueError(f"q4 {tuple(q4.shape)} + q8 {tuple(q8.shape)} do not cover the {nb} blocks of "
                         f"K_pad={k_pad}")
    ns = nb if _scale_mode(scale_mode) == "block" else 2
    if a_scales.shape[1] != ns:
        raise ValueError(f"a_scales shape {tuple(a_scales.shape)} needs {ns} columns in {scale_mode} mode")
    _check_weight_side(w_scales, w_offsets, bias, group_size, n, k_pad, dev)
    if int(split_k) < 0:
        raise ValueError(f"split_k must be >= 0 (0 = auto), got {split_k}")
    if m > _INT_MAX or n > _INT_MAX or nb > (1 << 20):
        raise ValueError(f"problem too large (M={m}, N={n}, blocks={nb})")
    why = gemm_extent_problem(q4, q8, a_scales, qweight, w_scales)
    if why is not None:
        raise ValueError(why)


def _check_weight_side(w_scales, w_offsets, bias, group_size, n: int, k_pad: int, dev) -> None:
    """Scales / offsets ``[N, K_pad/G]`` under the format's group rule, bias ``[N]`` (both GEMMs)."""
    g = check_group_size(group_size, k_pad)  # the format's rule (the kernels' TORCH_CHECK is the same)
    if tuple(w_scales.shape) != (n, k_pad // g):
        raise ValueError(f"w_scales shape {tuple(w_scales.shape)} != ({n}, {k_pad // g}) for "
                         f"group_size={group_size}")
    if w_offsets is not None:
        _cuda_tensor("w_offsets", w_offsets, dev, (torch.float32,))
        if tuple(w_offsets.shape) != (n, k_pad // g):
            raise ValueError(f"w_offsets shape {list(w_offsets.shape)} != w_scales shape ({n}, {k_pad // g}) "
                             f"for group_size={group_size}")
    if bias is not None:
        _cuda_tensor("bias", bias, dev, _FLOATS)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({n},)")


def _weight_k_pad(qweight) -> int:
    """K_pad of a row-major ``[N, K_pad/2]`` qweight or of its block-major ``[N, NB, 64]`` view
    (strides ``(64, N*64, 1)``, layout.weights_block_major); ValueError for anything else."""
    half = BLOCK_K // 2
    if qweight.dim() == 3:
        n = qweight.shape[0]
        if qweight.shape[2] != half or qweight.stride() != (half, n * half, 1):
            raise ValueError(f"qweight must be 2-D [N, K_pad/2] or the block-major view [N, NB, {half}] with "
                             f"strides ({half}, N*{half}, 1), got shape {tuple(qweight.shape)} strides "
                             f"{qweight.stride()}")
        return qweight.shape[1] * BLOCK_K
    if qweight.dim() == 2:
        return qweight.shape[1] * 2
    raise ValueError(f"qweight must be 2-D [N, K_pad/2] or the block-major view [N, NB, {half}], "
                     f"got shape {tuple(qweight.shape)}")


def check_w16_gemm_inputs(a, qweight, w_scales, w_offsets, group_size, bias, out_dtype, split_k: int,
                          tile: int) -> None:
    """What ``cometq_C::w16_gemm`` checks, as ValueError / TypeError (``a`` is made contiguous and
    16-byte aligned by the caller)."""
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"qweight must be a torch.Tensor, got {type(qweight).__name__}")
    dev = qweight.device
    _cuda_tensor("a", a, dev, (torch.float16, torch.bfloat16), 2)
    _cuda_tensor("qweight", qweight, dev, (torch.uint8,))
    _cuda_tensor("w_scales", w_scales, dev, (torch.float32,), 2)
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    m, k_pad = a.shape
    if k_pad < BLOCK_K or k_pad % BLOCK_K:
        raise ValueError(f"a shape {tuple(a.shape)} must be [M, K_pad] with K_pad a positive multiple of {BLOCK_K}")
    w_k_pad = _weight_k_pad(qweight)
    if w_k_pad != k_pad:
        raise ValueError(f"qweight shape {tuple(qweight.shape)} holds K_pad={w_k_pad} but a shape {tuple(a.shape)} "
                         f"has K_pad={k_pad}")
    n = qweight.shape[0]
    _check_weight_side(w_scales, w_offsets, bias, group_size, n, k_pad, dev)
    if int(split_k) < 0:
        raise ValueError(f"split_k must be >= 0 (0 = auto), got {split_k}")
    if tile not in W16_TILE_IDS:
        raise ValueError(f"tile must be 0 (by M), 1 (64 x 256, 8 warps), 2 (32 x 128), 3 (16 x 128) or a wgmma tile "
                         f"4 (64 x 128), 5 (64 x 64), 6 (32 x 128), 7 (64 x 256), 8 (16 x 128), got {tile!r}")
    if tile in W16_WGMMA_TILE_IDS:
        g = k_pad if group_size in (None, -1) else int(group_size)
        if g < BLOCK_K:
            raise ValueError(f"tile={tile} (a wgmma tile) needs a weight group of at least {BLOCK_K} channels "
                             f"(one group per row and K block), got group_size={group_size}")
        cap = capability_of(dev)
        if cap != (9, 0):
            raise ValueError(f"tile={tile} is a wgmma tile, which needs an sm_90 (Hopper) GPU; this device is "
                             + (f"sm_{cap[0]}{cap[1]}" if cap else str(dev)))
    if m > _INT_MAX or n > _INT_MAX or k_pad // BLOCK_K > (1 << 20):
        raise ValueError(f"problem too large (M={m}, N={n}, blocks={k_pad // BLOCK_K})")
    why = w16_extent_problem(a, qweight, w_scales)
    if why is not None:
        raise ValueError(why)


def w16_extent_problem(a, qweight, w_scales):
    """Why the CUDA w16 GEMM cannot address these operands, or None (32-bit row offsets, as
    :func:`gemm_extent_problem`; cometq_w16_offsets_fit)."""
    ld_w = qweight.shape[1] if qweight.dim() == 2 else BLOCK_K // 2
    extents = {"a": a.shape[0] * a.shape[1] * a.element_size(), "qweight": qweight.shape[0] * ld_w,
               "w_scales": w_scales.shape[0] * w_scales.shape[1]}
    big = {k: v for k, v in extents.items() if v > _INT_MAX}
    if big:
        return (f"operands too large for the CUDA w16 GEMM's 32-bit row offsets: {big} (each must be < 2^31; "
                f"a {tuple(a.shape)}, qweight {tuple(qweight.shape)}, w_scales {tuple(w_scales.shape)})")
    return None


def gemm_extent_problem(q4, q8, a_scales, qweight, w_scales):
    """Why the CUDA GEMM cannot address these operands, or None: it forms each row's offset in 32
    bits (csrc/w4ax_gemm.cu load_stage; cometq_gemm_offsets_fit), so every operand must span fewer
    than 2^31 bytes over its rows (the fp32 scales: elements)."""
    m, n = a_scales.shape[0], qweight.shape[0]
    ld_w = qweight.shape[1] if qweight.dim() == 2 else BLOCK_K // 2  # (block-major: 64-byte rows per block)
    extents = {"q4": m * q4.shape[1], "q8": m * q8.shape[1], "a_scales": m * a_scales.shape[1], "qweight": n * ld_w,
               "w_scales": n * w_scales.shape[1]}
    big = {k: v for k, v in extents.items() if v > _INT_MAX}
    if big:
        return (f"operands too large for the CUDA GEMM's 32-bit row offsets: {big} (each must be < 2^31; "
                f"q4 {tuple(q4.shape)}, q8 {tuple(q8.shape)}, a_scales {tuple(a_scales.shape)}, qweight "
                f"{tuple(qweight.shape)}, w_scales {tuple(w_scales.shape)})")
    return None




# --------------------------------------------------------------------------
# KV4 decode attention (csrc/kv4_attention.cu)
# --------------------------------------------------------------------------
#: what the CUDA kernel handles (cometq_kv4_attention_supported in csrc/kv4_attention.cu)
KV4_ATTN_HEAD_DIMS = (64, 128)
KV4_ATTN_MAX_QPK = 8
#: int32 tensors the kernel reads one element at a time (no 16-byte alignment needed: a decode
#: batch's ``seq_ids`` is an offset view of the runner's persistent slot buffer)
KV4_ATTN_INDEX_TENSORS = ("block_tables", "quant_lens", "tail_lens", "seq_ids")


def kv4_attention_supported(head_dim: int, group_size: int, qpk: int) -> bool:
    """The C interface's rule: head_dim 64 or 128; the key group whole 16-token tiles
    (``group_size % 16 == 0``) and the value group dividing head_dim; 1..8 query heads per KV head."""
    return (head_dim in KV4_ATTN_HEAD_DIMS and group_size >= 16 and group_size % 16 == 0
            and head_dim % group_size == 0 and 1 <= qpk <= KV4_ATTN_MAX_QPK)


def kv4_attention_unsupported(q, k_packed, tail_k, group_size: int, key_axis: str, value_axis: str):
    """Why the CUDA kernel cannot run this pool / query (a string), or None when it can.  It runs
    the serving pool's default format: keys per channel, values per token, an fp16 or bf16 query
    and tail (one dtype)."""
    if (key_axis, value_axis) != ("channel", "token"):
        return f"axes key={key_axis!r}, value={value_axis!r} (the CUDA kernel: key 'channel', value 'token')"
    if q.dtype not in (torch.float16, torch.bfloat16) or tail_k.dtype != q.dtype:
        return f"q dtype {q.dtype}, tail dtype {tail_k.dtype} (the CUDA kernel: float16 or bfloat16, one for both)"
    if q.dim() != 3 or k_packed.dim() != 4 or k_packed.shape[1] == 0 or q.shape[1] % k_packed.shape[1]:
        return f"q shape {tuple(q.shape)} / k_packed shape {tuple(k_packed.shape)}"
    if not kv4_attention_supported(q.shape[2], int(group_size), q.shape[1] // k_packed.shape[1]):
        return (f"head_dim={q.shape[2]}, group_size={group_size}, query heads per kv head="
                f"{q.shape[1] // k_packed.shape[1]}")
    for name, t in (("q", q), ("tail_k", tail_k)):  # read in 16-byte vectors (the pool's are allocations)
        if not t.is_contiguous() or (t.numel() and t.data_ptr() % 16):
            return f"{name} not contiguous and 16-byte aligned (shape {tuple(t.shape)}, strides {t.stride()})"
    return None


def check_kv4_attention_inputs(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, tail_k, tail_v,
                               block_tables, quant_lens, tail_lens, seq_ids, group_size: int,
                               num_splits: int) -> None:
    """The TORCH_CHECKs of ``cometq_C::kv4_decode_attention`` (csrc/torch_bindings.cpp), in Python."""
    _cuda_tensor("q", q, q.device if isinstance(q, torch.Tensor) else None, (torch.float16, torch.bfloat16), 3)
    dev = q.device
    named = dict(k_packed=k_packed, k_scale=k_scale, k_zero=k_zero, v_packed=v_packed, v_scale=v_scale,
                 v_zero=v_zero, tail_k=tail_k, tail_v=tail_v, block_tables=block_tables, quant_lens=quant_lens,
                 tail_lens=tail_lens, seq_ids=seq_ids)
    for name, t in named.items():
        dt = ((torch.uint8,) if name.endswith("packed") else (torch.int32,)
              if name in ("block_tables", "quant_lens", "tail_lens", "seq_ids") else (q.dtype,)
              if name.startswith("tail_") else (torch.float16,))
        _cuda_tensor(name, t, dev, dt)
    for name, t in dict(q=q, **named).items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")
        if t.numel() and t.data_ptr() % 16 and name not in KV4_ATTN_INDEX_TENSORS:
            raise ValueError(f"{name} data must be 16-byte aligned, got an offset view (shape {tuple(t.shape)})")
    if k_packed.dim() != 4:
        raise ValueError(f"k_packed must be [NB, H, BS, D/2], got shape {tuple(k_packed.shape)}")
    b, hq, d = q.shape
    nb, h, bs, _ = k_packed.shape
    g = int(group_size)
    if k_packed.shape[3] * 2 != d:
        raise ValueError(f"k_packed shape {tuple(k_packed.shape)} does not hold head_dim {d} of q shape "
                         f"{tuple(q.shape)}")
    if v_packed.shape != k_packed.shape:
        raise ValueError(f"v_packed shape {tuple(v_packed.shape)} != k_packed shape {tuple(k_packed.shape)}")
    if h == 0 or hq % h:
        raise ValueError(f"q heads {hq} (q shape {tuple(q.shape)}) not a multiple of kv heads {h}")
    if g <= 0 or bs % g:
        raise ValueError(f"block_size {bs} (k_packed shape {tuple(k_packed.shape)}) must be a multiple of "
                         f"group_size={g}")
    if not kv4_attention_supported(d, g, hq // h):
        raise ValueError(f"unsupported case head_dim={d}, group_size={g}, query heads per kv head={hq // h} "
                         "(needs head_dim 64 or 128, group_size a multiple of 16 dividing head_dim, <= 8 query "
                         "heads per kv head)")
    ks, vs = (nb, h, bs // g, d), (nb, h, bs, d // g)
    if tuple(k_scale.shape) != ks or tuple(k_zero.shape) != ks:
        raise ValueError(f"k_scale {tuple(k_scale.shape)} / k_zero {tuple(k_zero.shape)} must be {ks} (keys per "
                         f"channel, group_size={g})")
    if tuple(v_scale.shape) != vs or tuple(v_zero.shape) != vs:
        raise ValueError(f"v_scale {tuple(v_scale.shape)} / v_zero {tuple(v_zero.shape)} must be {vs} (values "
                         f"per token, group_size={g})")
    if tail_k.dim() != 4 or tuple(tail_k.shape[1:]) != (h, g, d):
        raise ValueError(f"tail_k shape {tuple(tail_k.shape)} must be [S, {h}, {g}, {d}]")
    if tail_v.shape != tail_k.shape:
        raise ValueError(f"tail_v shape {tuple(tail_v.shape)} != tail_k shape {tuple(tail_k.shape)}")
    s = tail_k.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != s:
        raise ValueError(f"block_tables shape {tuple(block_tables.shape)} must be [{s}, max_blocks]")
    if tuple(quant_lens.shape) != (s,) or tuple(tail_lens.shape) != (s,):
        raise ValueError(f"quant_lens {tuple(quant_lens.shape)} and tail_lens {tuple(tail_lens.shape)} must be "
                         f"[{s}]")
    if tuple(seq_ids.shape) != (b,):
        raise ValueError(f"seq_ids shape {tuple(seq_ids.shape)} must be [{b}] (q shape {tuple(q.shape)})")
    if not 1 <= int(num_splits) <= 1024:
        raise ValueError(f"num_splits must be in [1, 1024], got {num_splits}")
    if b > 65535 or h > 65535 or nb * h * bs > (1 << 40):
        raise ValueError(f"problem too large (B={b}, H={h}, pool rows={nb * h * bs})")
