"""Triton: the W4Ax linear on 16-bit tensor cores with weights dequantized in registers (the
``w16`` route, small M).

Why another route.  At decode sizes (M <= 256) a W4Ax GEMM should be bound by its weight bytes,
but the integer kernels are bound by instruction issue: per 128-channel K block each warp
unpacks INT4 weights to INT8, runs the INT8 MMAs, then converts its INT32 accumulators to float
and rescales them by the token's block scale and the weight's group scale -- per output
element, every block.  H100 run 7 (Llama-3-8B geometry, batch 64): 4.24 ms of W4Ax GEMM per
decode step against cuBLAS FP16's 5.38 ms, ~0.9 TB/s of weight bytes; static SASS counts put
that kernel at ~1000 instructions per warp per K block, which is what 0.9 TB/s works out to at 4
instructions per clock per SM.

This route moves the per-token-per-block activation scale out of the K loop: the activations
are quantized and dequantized once per call (``A'[m, k] = q_a * s_a[m, block]`` in fp16 / bf16
/ fp32, :func:`cometq.kernels.act_quant.fake_quant_act_triton`, an [M, K] pass that is small
at decode), so the K loop is the W4A16 GEMM of Marlin / GPTQ kernels::

    for each 128-channel block b of this program's K range:
        W'[n, b] = q_w[n, b] * s_w[n, group] (+ o_w[n, group])     in registers, no shared round trip
        acc[n, m] += W'[n, b] . A'[m, b]                             16-bit MMA, fp32 accumulate

with no epilogue per block.  The product is computed transposed (``acc = W' A'^T``, weights
on the MMA's M side): on Hopper the dequantized weights are then wgmma's register-sourced A
operand and only the activation tile goes through shared memory (the layout of vLLM's
Machete).  fp16 weights are dequantized with the exponent trick: the biased nibble ``u ^ 8`` OR
``0x6400`` is the fp16 number ``1032 + v`` (exact), so ``v`` is one fp16 subtraction away and no
int-to-float conversion is issued.

Numerics: the dequant path's (:mod:`cometq.kernels.dequant_gemm`): each operand element is
rounded to the 16-bit dtype before the MMA (the weight here after two fp16 operations, a
subtraction that is exact and an FMA), so results agree with the integer-exact reference within
:data:`cometq.kernels.dequant_gemm.DEQUANT_GEMM_RTOL`, not bit for bit.  K order: the half-split
order of the dequant path (even channels of a block, then odd: what the nibbles give).

Split-K: with few N tiles (N = 4096 at BLOCK_N = 64 is 64 programs) the K blocks are cut into
``split`` runs; each writes an fp32 partial ``[split, M, N]``, and one ordered sum
``((P_0 + P_1) + ...) + bias``, cast to the output dtype, combines them: a small reduce kernel
(``w16_reduce_kernel``; it replaced a torch sum, a bias add and a cast -- three launches per
split linear of a decode step), or with ``COMETQ_SPLITK_FIXUP=1`` the tile's last split program
itself (the in-kernel reduction of :mod:`cometq.kernels.w4ax_gemm`: a gpu-scope acq_rel counter
per tile, ``cometq._counters``), the same adds in the same order -- the same bits.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

from cometq._counters import tile_counters

from ._common import _ASM_UNPACK, dummy, interpreting

# fp16 weights from packed nibbles on whole 32-bit words (four bytes per register, ``pack=4``):
# t = (w & 0x0F0F0F0F) ^ 0x08080808 (one lop3: the biased nibbles u ^ 8 = v + 8), then two
# byte permutes put each biased nibble under an 0x64 exponent byte -- the fp16 numbers 1032 + v,
# element i (byte i of w) in the low / high half of output register i // 2.  7 instructions per
# 8 weights, where the Triton integer form compiled to ~16 (LOP3 / PRMT / SHF per byte lane).
# Checked exhaustively against the integer form in tests/test_w16_gemm.py (the PTX model of
# cometq.testing.run_ptx); the interpreter runs the integer form.
_ASM_F16_LO = tl.constexpr("""{
.reg .b32 t;
lop3.b32 t, $2, 0x0F0F0F0F, 0x08080808, 0x6A;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
}""")

_ASM_F16_HI = tl.constexpr("""{
.reg .b32 s, t;
shr.u32 s, $2, 4;
lop3.b32 t, s, 0x0F0F0F0F, 0x08080808, 0x6A;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
}""")


@triton.jit
def _biased_f16(p, HI: tl.constexpr):
    """uint8 bytes -> fp16 ``1032 + v`` of the low (even channel) or high nibble ``v`` (exact)."""
    if _ASM_UNPACK:
        return tl.inline_asm_elementwise(_ASM_F16_HI if HI else _ASM_F16_LO, "=r,=r,r", [p], dtype=tl.float16,
                                         is_pure=True, pack=4)
    else:
        u = (p.to(tl.int32) >> 4) & 0xF if HI else p.to(tl.int32) & 0xF
        return ((u ^ 8) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)

__all__ = ["W16Config", "w16_config", "w16_gemm", "w4ax_linear_w16", "w16_gemm_kernel", "w16_reduce_kernel",
           "W16_MAX_M"]

#: rows up to which :func:`cometq.ops.w4ax_linear_eager` times this route beside quantize + GEMM
W16_MAX_M = 256


@triton.jit
def _dequant_half(p, sc, of, HI: tl.constexpr, ASYM: tl.constexpr, MAGIC: tl.constexpr, DT: tl.constexpr):
    """Packed bytes ``p`` -> ``DT`` weights ``v * sc (+ of)`` of their low or high nibbles ``v``."""
    if MAGIC:
        # fp16 bits 0x6400 | (u ^ 8) = 1024 + (v + 8), exact; minus 1032 -> v (exact in fp16)
        h = _biased_f16(p, HI) - 1032.0
        w = h * sc.to(tl.float16)
        if ASYM:
            w = w + of.to(tl.float16)
        return w
    else:
        u = (p.to(tl.int32) >> 4) & 0xF if HI else p.to(tl.int32) & 0xF
        v = ((u ^ 8) - 8).to(tl.float32)
        # the spec (ops._ref_w16_gemm) rounds s and o to the operand dtype first, then v * s (+ o)
        # once: v * s is exact in fp32 (4 x 8 significant bits for bf16), so the one rounding is
        # the `.to(DT)` below.  (Run 9, H200: with the fp32 scales unrounded every weight of a
        # group carried the same bf16 scale error, 1.3x the bf16 test's tolerance.)
        w = v * sc.to(DT).to(tl.float32)
        if ASYM:
            w = w + of.to(DT).to(tl.float32)
        return w.to(DT)


@triton.jit
def _sum_splits(part_ptr, offs, mask, SPLIT, stride_os, bias_ptr, rn, nm, HAS_BIAS: tl.constexpr,
                CACHE: tl.constexpr):
    """``((P_0 + P_1) + ... + P_{SPLIT-1}) + bias`` at ``offs`` (fp32, in split order): the one
    sequence of adds both reductions (:func:`w16_reduce_kernel`, the in-kernel FIXUP) run."""
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=CACHE)
    for s in range(1, SPLIT):
        acc += tl.load(part_ptr + s * stride_os + offs, mask=mask, other=0.0, cache_modifier=CACHE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)
    return acc


@triton.jit
def w16_reduce_kernel(part_ptr, bias_ptr, y_ptr, M, N, SPLIT, stride_os, stride_om, stride_ym,
                      BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y[m, n] = cast(((P_0 + P_1) + ...) + bias)`` for the ``[SPLIT, M, N]`` fp32 partials;
    ``BLOCK`` elements of one row per program (grid ``(M, cdiv(N, BLOCK))``)."""
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    nm = rn < N
    acc = _sum_splits(part_ptr, m * stride_om + rn, nm, SPLIT, stride_os, bias_ptr, rn, nm, HAS_BIAS, "")
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=nm)


@triton.jit
def w16_gemm_kernel(
    a_ptr, qw_ptr, ws_ptr, wo_ptr, out_ptr,
    M, N, NB, GROUP,
    stride_am, stride_wn, stride_wb, stride_wsn, stride_won, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ASYM: tl.constexpr, WHOLE_BLOCK_GROUPS: tl.constexpr,
    MAGIC: tl.constexpr, NUM_STAGES: tl.constexpr,
    cnt_ptr=None, bias_ptr=None, y_ptr=None, stride_ym=0,
    FIXUP: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
):
    """``out[s, m, n] = sum over this split's blocks of A'[m, b] . W'[n, b]`` (fp32, or the
    output dtype when there is one split).  Grid ``(m tiles * n tiles, split)``.  FIXUP: after
    its partial, a program counts its tile's finished splits (``cnt_ptr``, one int32 per tile,
    zero between GEMMs); the last one writes ``y = cast(sum of the partials + bias)`` for the tile
    (:func:`w16_reduce_kernel`'s adds, in its order) and puts the counter back to 0.  Ordering as
    in ``w4ax_gemm._splitk_fixup``: every thread's partial stores, a CTA barrier, the release half
    of the acq_rel atomic; the last program's acquire half orders its ``.cg`` (L2) loads."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    per = tl.cdiv(NB, n_splits)
    b0 = split * per
    b1 = tl.minimum(b0 + per, NB)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    nm = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    j = tl.arange(0, 64)
    DT: tl.constexpr = a_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for b in tl.range(b0, b1, num_stages=NUM_STAGES):
        # weights: 64 packed bytes per row per block (low nibble = even channel)
        p = tl.load(qw_ptr + rn64[:, None] * stride_wn + b * stride_wb + j[None, :], mask=nm[:, None], other=0)
        if WHOLE_BLOCK_GROUPS:
            g = (b * 128) // GROUP
            sc = tl.load(ws_ptr + rn64 * stride_wsn + g, mask=nm, other=0.0)[:, None]
            of = sc
            if ASYM:
                of = tl.load(wo_ptr + rn64 * stride_won + g, mask=nm, other=0.0)[:, None]
        else:
            # channels 2j and 2j+1 share a group (G is even): one [rows, 64] gather for both halves
            g = (b * 128 + 2 * j) // GROUP
            sc = tl.load(ws_ptr + rn64[:, None] * stride_wsn + g[None, :], mask=nm[:, None], other=0.0)
            of = sc
            if ASYM:
                of = tl.load(wo_ptr + rn64[:, None] * stride_won + g[None, :], mask=nm[:, None], other=0.0)
        w_lo = _dequant_half(p, sc, of, False, ASYM, MAGIC, DT)
        w_hi = _dequant_half(p, sc, of, True, ASYM, MAGIC, DT)
        # activations: A' block b in the half-split order (even channels, then odd)
        abase = a_ptr + rm64[:, None] * stride_am + b * 128 + j[None, :]
        a_lo = tl.load(abase, mask=mm[:, None], other=0.0)
        a_hi = tl.load(abase + 64, mask=mm[:, None], other=0.0)
        if DT == tl.float32:
            acc += tl.dot(w_lo, tl.trans(a_lo), input_precision="ieee")
            acc += tl.dot(w_hi, tl.trans(a_hi), input_precision="ieee")
        else:
            acc += tl.dot(w_lo, tl.trans(a_lo))
            acc += tl.dot(w_hi, tl.trans(a_hi))
    # acc is [n, m]: store transposed
    offs = rm64[None, :] * stride_om + rn64[:, None]
    mask = nm[:, None] & mm[None, :]
    tl.store(out_ptr + split * stride_os + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if FIXUP:
        tl.debug_barrier()
        prev = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if prev == n_splits - 1:
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
            y = _sum_splits(out_ptr, offs, mask, n_splits, stride_os, bias_ptr, rn64[:, None], nm[:, None], HAS_BIAS,
                            ".cg")
            tl.store(y_ptr + rm64[None, :] * stride_ym + rn64[:, None], y.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class W16Config:
    """Launch config of :func:`w16_gemm_kernel`: tile sizes, warps, pipeline stages, split-K."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    split: int = 1

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v!r}")
        if self.num_warps not in (1, 2, 4, 8):
            raise ValueError(f"num_warps must be 1, 2, 4 or 8, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {self.num_stages!r}")
        if not isinstance(self.split, int) or self.split < 1:
            raise ValueError(f"split must be an int >= 1, got {self.split!r}")


def _split_for(m: int, n: int, nb: int, bm: int, bn: int, programs_per_sm: int, num_sms: int) -> int:
    """K splits for ~``programs_per_sm`` programs per SM (never fewer than 4 blocks per split)."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return max(1, min(programs_per_sm * num_sms // max(1, tiles), nb // 4 if nb >= 4 else 1))


def _token_tile(m: int) -> int:
    """The token tile of every candidate: the whole M up to 64 rows (a power of two >= 16)."""
    return min(64, max(16, triton.next_power_of_2(max(1, m))))


def w16_config(m: int, n: int, nb: int, num_sms: int = 132) -> W16Config:
    """The default config: the whole M (up to 64 rows) in one tile, 64 weight rows per program,
    and enough K splits for ~2 programs per SM (never fewer than 4 blocks per split)."""
    bm = _token_tile(m)
    return W16Config(bm, 64, 4, 3, _split_for(m, n, nb, bm, 64, 2, num_sms))


def w16_configs(m: int, n: int, nb: int, num_sms: int = 132) -> List[W16Config]:
    """The tuning candidates of one shape, :func:`w16_config` first (what an untuned call runs):
    the same tile with a 4-stage pipeline and with ~1 / ~4 programs per SM, 32 weight rows per
    program (more programs for a small N; below wgmma's 64-row M, so mma.sync on Hopper too) and
    128 (half the activation-tile reloads per weight byte; 4 or 8 warps).  Five compiled variants
    per token tile, every one compiled ahead of time for sm_80 / sm_90 (kernels/aot.py; static:
    no spills on sm_90, 107-255 registers; 64 x 128 with 4 warps spills 132 B on sm_80).  From a
    32-token tile on, also the default tile with half the tokens (twice the programs, each weight
    tile read once per token tile; H200 run 10: the w16 GEMMs ran at M = 64 at ~200 TFLOP/s, a
    third of the MMA peak, with ~2 programs per SM -- latency-bound, not byte-bound); its kernel
    is the smaller token tile's default, compiled ahead of time as such."""
    d = w16_config(m, n, nb, num_sms)
    bm = d.block_m
    cands = [d, W16Config(bm, 64, 4, 4, d.split),
             W16Config(bm, 64, 4, 3, _split_for(m, n, nb, bm, 64, 1, num_sms)),
             W16Config(bm, 64, 4, 3, _split_for(m, n, nb, bm, 64, 4, num_sms)),
             W16Config(bm, 32, 4, 3, _split_for(m, n, nb, bm, 32, 2, num_sms)),
             W16Config(bm, 128, 4, 3, _split_for(m, n, nb, bm, 128, 2, num_sms)),
             W16Config(bm, 128, 8, 3, _split_for(m, n, nb, bm, 128, 2, num_sms))]
    if bm >= 32 and m > bm // 2:
        cands.append(W16Config(bm // 2, 64, 4, 3, _split_for(m, n, nb, bm // 2, 64, 2, num_sms)))
    out: List[W16Config] = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


#: tuned choices per (token tile, N, K blocks, weight format, operand dtype, SMs, timing mode)
_W16_CHOICE: Dict[tuple, W16Config] = {}
_W16_FILE_READ: set = set()


@functools.lru_cache(maxsize=4096)
def _default_config(m: int, n: int, nb: int, num_sms: int) -> W16Config:
    return w16_config(m, n, nb, num_sms)


def _tuning_allowed(dev: torch.device) -> bool:
    from cometq import autotune

    if dev.type != "cuda" or interpreting() or os.environ.get("COMETQ_GEMM_TUNE", "1") == "0":
        return False
    return not (autotune.frozen_now() or torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling())


def select_w16_config(m: int, n: int, nb: int, asym: bool, dtype: torch.dtype, num_sms: int, bench_fn=None, *,
                      graph: bool = False, device_name: str = "") -> W16Config:
    """The config a call without one runs: a choice tuned earlier for this case (in this process,
    or in the ``COMETQ_GEMM_CONFIG_CACHE`` file of :mod:`cometq.kernels.w4ax_gemm`, keyed by
    ``device_name`` and the Triton version), else -- with ``bench_fn(cfg) -> time`` -- the fastest
    of :func:`w16_configs` (stored in both), else the default.  ``graph``: timed as CUDA-graph
    replays (the serving runner's decode graphs), kept apart from eager choices."""
    from .w4ax_gemm import ENV_CONFIG_CACHE, _file_configs, _file_key, _save_file_config, m_bucket

    # per token tile and M bucket (eager serving sees every batch size from 1 to 256: one tuning
    # per bucket, not per M); a choice made at one M of the bucket is a valid launch at another
    bm = _token_tile(m)
    key = ("w16", bm, m_bucket(m), n, nb, bool(asym), str(dtype).replace("torch.", ""), num_sms) + \
        (("graph",) if graph else ())
    hit = _W16_CHOICE.get(key)
    if hit is not None:
        return hit
    path = os.environ.get(ENV_CONFIG_CACHE)
    fkey = _file_key(key, device_name) if path else None
    if path and (path, fkey) not in _W16_FILE_READ:
        _W16_FILE_READ.add((path, fkey))  # (read once per key: a miss is not looked up per call)
        stored = _file_configs(path).get(fkey)
        try:
            cfg = W16Config(**stored) if isinstance(stored, dict) else None
        except (TypeError, ValueError):
            cfg = None
        if cfg is not None and cfg.block_m in {c.block_m for c in w16_configs(m, n, nb, num_sms)}:
            _W16_CHOICE[key] = cfg
            return cfg
    if bench_fn is None:
        return _default_config(m, n, nb, num_sms)  # untuned: nothing cached, a later call may tune
    cands = w16_configs(m, n, nb, num_sms)
    times = []
    for c in cands:
        try:
            times.append((bench_fn(c), c))
        except Exception:  # a config the compiler rejects (e.g. out of registers) is skipped
            continue
    best = min(times, key=lambda t: t[0])[1] if times else cands[0]
    _W16_CHOICE[key] = best
    if path and times:
        _save_file_config(path, fkey, best)
    return best


def w16_gemm(a: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, w_offsets: Optional[torch.Tensor],
             group: int, bias: Optional[torch.Tensor], out_dtype: torch.dtype, stride_wb: Optional[int] = None,
             config: Optional[W16Config] = None) -> torch.Tensor:
    """``y = A' @ W'^T (+ bias)`` with ``W'`` dequantized in registers.  ``a [M, K_pad]``: the
    16-bit (or fp32) activation operand in the half-split K order; ``qweight`` ``[N, K_pad/2]``
    uint8 or the block-major ``[N, nb, 64]`` view of :func:`cometq.layout.weights_block_major`
    (``stride_wb`` default: 64, or the view's block stride N * 64); ``group``
    the resolved weight group width (K_pad for per-channel weights).  Shapes are the caller's
    (the ops layer checks them)."""
    m, k_pad = a.shape
    n = qweight.shape[0]
    nb = k_pad // 128
    if stride_wb is None:
        stride_wb = qweight.stride(1) if qweight.dim() == 3 else 64
    stride_wn = qweight.stride(0)
    if m == 0 or n == 0:
        y = torch.zeros(m, n, dtype=out_dtype, device=a.device)
        return y + bias.to(out_dtype) if bias is not None and m else y
    dev = a.device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    cfg = config
    if cfg is None:
        bench_fn, graph, name = None, False, ""
        if dev.type == "cuda" and not interpreting():
            from cometq import autotune

            from .w4ax_gemm import ENV_CONFIG_CACHE, _device_name

            graph = autotune.timing_mode() == "graph"
            name = _device_name(dev) if os.environ.get(ENV_CONFIG_CACHE) else ""
            if _tuning_allowed(dev):
                def run(c):
                    return w16_gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype, stride_wb, c)

                if graph:
                    bench_fn = lambda c: autotune.cuda_graph_timer(lambda: run(c), dev)  # noqa: E731
                else:
                    from triton.testing import do_bench

                    bench_fn = lambda c: do_bench(lambda: run(c), warmup=5, rep=20)  # noqa: E731
        cfg = select_w16_config(m, n, nb, w_offsets is not None, a.dtype, sms, bench_fn, graph=graph,
                                device_name=name)
    split = max(1, min(cfg.split, nb))
    direct = split == 1 and bias is None
    out = torch.empty((m, n) if direct else (split, m, n), dtype=out_dtype if direct else torch.float32, device=dev)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    y = None if direct else torch.empty((m, n), dtype=out_dtype, device=dev)
    fixup = not direct and split > 1 and _splitk_fixup_enabled()
    w16_gemm_kernel[(tiles, split)](
        a, qweight, w_scales, w_offsets if w_offsets is not None else w_scales, out,
        m, n, nb, group,
        a.stride(0), stride_wn, stride_wb, w_scales.stride(0), w_offsets.stride(0) if w_offsets is not None else 0,
        0 if direct else out.stride(0), out.stride(-2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ASYM=w_offsets is not None, WHOLE_BLOCK_GROUPS=group >= 128,
        MAGIC=a.dtype == torch.float16, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        cnt_ptr=tile_counters(dev, tiles) if fixup else dummy(dev, torch.int32),
        bias_ptr=bias if bias is not None else dummy(dev), y_ptr=y if y is not None else out,
        stride_ym=y.stride(0) if y is not None else 0, FIXUP=fixup, HAS_BIAS=bias is not None,
    )
    if direct:
        return out
    if not fixup:
        block = min(1024, triton.next_power_of_2(n))
        w16_reduce_kernel[(m, triton.cdiv(n, block))](
            out, bias if bias is not None else dummy(dev), y, m, n, split, out.stride(0), out.stride(1), y.stride(0),
            BLOCK=block, HAS_BIAS=bias is not None, num_warps=4)
    return y


def _splitk_fixup_enabled() -> bool:
    from .w4ax_gemm import splitk_fixup_enabled  # (the one switch for the Triton GEMMs' in-kernel reduction)

    return splitk_fixup_enabled()


def w4ax_linear_w16(x, perm, block_bits, n_int8: int, scale_mode: str, int4_clip: float, qweight, w_scales,
                    w_offsets, group: int, bias, out_dtype: torch.dtype, *, identity_perm: bool = False,
                    stride_wb: Optional[int] = None, config: Optional[W16Config] = None) -> torch.Tensor:
    """The whole W4Ax linear on the ``w16`` route from ``x [M, K]``: ``A'`` by
    :func:`cometq.kernels.act_quant.fake_quant_act_triton` (the activations quantized to
    INT4/INT8 and back in one pass), then :func:`w16_gemm`.  Same operands, rounded the same
    way, as :func:`cometq.kernels.dequant_gemm.w4ax_linear_dequant` (which materializes ``W'``
    and calls cuBLAS); ``group``: the resolved weight group width."""
    from .act_quant import fake_quant_act_triton
    from .dequant_gemm import _operand_dtype

    a = fake_quant_act_triton(x, perm, block_bits, n_int8, scale_mode, out_dtype=_operand_dtype(out_dtype),
                              identity_perm=identity_perm, int4_clip=int4_clip)
    return w16_gemm(a, qweight, w_scales, w_offsets, group, bias, out_dtype, stride_wb, config)
