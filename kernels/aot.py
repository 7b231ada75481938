"""Ahead-of-time compile every cometq Triton kernel variant for sm_80 / sm_90, no GPU needed.

The interpreter (how CI runs the kernels) accepts programs the GPU compiler
rejects (dot shapes, dtype mixes, shared-memory overflow, layouts), so this
compiles the real thing with ``triton.compile(ASTSource(...), target=GPUTarget)``
and checks properties of the generated code that numerics depend on:

* activation quantization divides with ``div.rn.f32`` (IEEE, not ``div.full``),
  keeps both adds of the round-half-to-even trick and the INT4 clip's own fp32
  multiply (``(absmax * clip) / 7``, never a reciprocal or a fused op);
* every GEMM config issues tensor-core int8 MMAs (``mma.sync`` on sm_80,
  ``wgmma`` on sm_90 for 64-row-or-larger MMA tiles with >= 4 warps) and streams
  global memory in 16-byte vectors;
* split-K / stream-K: ATOMIC kernels issue fp32 atomics, the deterministic
  (WORKSPACE) kernels and the reduction kernel never do, and the reduction reads
  the fp32 partials in 16-byte vectors.

Compiles mirror the JIT's specialization of a real launch (16-byte aligned
pointers, strides that are multiples of 16, unit strides as constants), so the
PTX checked here is the PTX a GPU run would get for Llama-sized shapes.

Run as ``python -m cometq.kernels.aot --arch 80 --arch 90 [--level full|ci|quick] [--json PATH]``
in a process *without* ``TRITON_INTERPRET=1`` (the interpreter replaces jit
functions).  Exit status 1 if anything failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # pragma: no cover - guarded by the test
    raise RuntimeError("cometq.kernels.aot must run without TRITON_INTERPRET=1 (the interpreter replaces jit functions)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from .act_quant import ROWS_BLOCK_M, _gather_warps, act_quant_gather_kernel, act_quant_kernel, split_rows_kernel  # noqa: E402
from .dequant_gemm import dequant_act_kernel, dequant_weight_kernel  # noqa: E402
from .fp8_gemm import fp8_act_operand_kernel, fp8_epilogue_kernel, fp8_weight_operand_kernel  # noqa: E402
from .w16_gemm import w16_gemm_kernel, w16_reduce_kernel  # noqa: E402
from .w4ax_gemm import (  # noqa: E402
    GemmConfig,
    gen_configs,
    tma_split_rows,
    w4ax_gemm_kernel,
    w4ax_gemm_persistent_kernel,
    w4ax_gemm_tma_kernel,
    w4ax_reduce_kernel,
)

_TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}

#: Llama-3-8B/70B layer shapes (N, K) used to enumerate the generated configs.
SHAPES = {
    "8B.qkv": (6144, 4096), "8B.o": (4096, 4096), "8B.gate_up": (28672, 4096), "8B.down": (4096, 14336),
    "70B.qkv": (10240, 8192), "70B.gate_up": (57344, 8192), "70B.down": (8192, 28672),
}
M_BUCKETS = (16, 64, 256, 1024, 4096)


def _act_sig(x_dtype: str, out: str = "fp16") -> Dict[str, str]:
    return dict(x_ptr=_TY[x_dtype], perm_ptr="*i64", bits_ptr="*i32", slot_ptr="*i32", q4_ptr="*u8", q8_ptr="*i8",
                s_ptr="*fp32", M="i32", K="i32", NB="i32", int4_clip="fp32", stride_xm="i32", stride_xk="i32",
                stride_q4m="i32", stride_q8m="i32", stride_sm="i32", out_ptr=_TY[out], stride_om="i32")


def _gemm_sig(out: str, bias: str, persistent: bool) -> Dict[str, str]:
    sig = dict(order_ptr="*i32", q4_ptr="*u8", q8_ptr="*i8", as_ptr="*fp32", w_ptr="*u8", ws_ptr="*fp32",
               wo_ptr="*fp32", bias_ptr=_TY[bias], out_ptr=_TY[out], dbg_ptr="*i32", dsum_ptr="*i32",
               part_ptr="*fp32", M="i32", N="i32", NB="i32", N8="i32", GROUP="i32")
    if persistent:
        sig = dict(items_ptr="*i32", starts_ptr="*i32", slots_ptr="*i32", **sig)
    else:
        sig["SPLIT"] = "i32"
    sig.update(stride_q4m="i32", stride_q8m="i32", stride_asm="i32", stride_wn="i32", stride_wb="i32", stride_wsn="i32",
               stride_won="i32", stride_om="i32", stride_on="i32", stride_dm="i32", stride_dn="i32", stride_dsm="i32")
    if not persistent:
        sig["cnt_ptr"] = "*i32"  # the in-kernel split-K reduction's tile counters (FIXUP)
    return sig


def _full_sig(kernel, sig: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = dict(sig)
    for k in constexprs:
        sig[k] = "constexpr"
    missing = set(kernel.arg_names) - set(sig)
    extra = set(sig) - set(kernel.arg_names)
    if missing or extra:
        raise RuntimeError(f"{kernel.__name__}: AOT signature out of date (missing {sorted(missing)}, extra {sorted(extra)})")
    return {k: sig[k] for k in kernel.arg_names}


def _tma_sig(out: str, bias: str, block_m: int, block_n: int, a_split: bool = False) -> Dict[str, str]:
    """Signature of ``w4ax_gemm_tma_kernel``: the three operands are host TMA descriptors
    (``tensordesc<dtype[box]>``; the launcher encodes them per call).  ``a_split``: split
    activation rows (A_SPLIT: boxes of 64 int8 columns, ``w4ax_gemm.tma_split_rows``)."""
    a8 = f"tensordesc<i8[{block_m}, 64]>" if a_split else f"tensordesc<i8[{block_m}, 128]>"
    return dict(order_ptr="*i32", a4_desc=f"tensordesc<u8[{block_m}, 64]>", a8_desc=a8,
                w_desc=f"tensordesc<u8[{block_n}, 64]>", as_ptr="*fp32", ws_ptr="*fp32", bias_ptr=_TY[bias],
                out_ptr=_TY[out], dbg_ptr="*i32", part_ptr="*fp32", M="i32", N="i32", NB="i32", N8="i32",
                GROUP="i32", SPLIT="i32", stride_asm="i32", stride_wsn="i32", stride_om="i32", stride_on="i32", stride_dm="i32", stride_dn="i32",
                wo_ptr="*fp32", dsum_ptr="*i32", stride_won="i32", stride_dsm="i32", cnt_ptr="*i32")


def tma_meta(class_mode: bool = False, group: int = 128, k_pad: int = 4096, bias: bool = True, debug: bool = False,
             ordered: bool = True, split: bool = False, asym: bool = False, fixup: bool = False) -> Dict[str, object]:
    """Constexprs of a TMA-kernel launch (see :func:`gemm_meta`); ``split``: split-K pieces into the
    deterministic workspace (WORKSPACE); ``asym``: the offset term (ASYM); ``fixup``: the in-kernel
    split-K reduction (FIXUP)."""
    return dict(CLASS_MODE=class_mode, INT_ACC=class_mode and (group <= 0 or group >= k_pad), HAS_BIAS=bias,
                DEBUG=debug, ORDERED=ordered, WORKSPACE=split, W_BLOCK_MAJOR=False, ASYM=asym,
                FIXUP=fixup and split)


def _reduce_sig(out: str, bias: str) -> Dict[str, str]:
    return dict(red_ptr="*i32", part_ptr="*fp32", bias_ptr=_TY[bias], out_ptr=_TY[out], M="i32", N="i32",
                SLOTS="i32", stride_om="i32", stride_on="i32")


def gemm_meta(group: int = 128, k_pad: int = 4096, class_mode: bool = False, bias: bool = True,
              debug: bool = False, evict: str = "", asym: bool = False, det: bool = False,
              ordered: bool = False) -> Dict[str, object]:
    """Constexprs of a GEMM launch; ``det``: the deterministic workspace store (WORKSPACE) instead
    of a direct store / fp32 atomics (pair it with ``ATOMIC=False``); ``ordered``: an INT8-first
    block map (block i at list position i, no ``order`` load)."""
    seg = min(128, group if group > 0 else k_pad)
    return dict(CLASS_MODE=class_mode, SEGS=128 // seg, SEG_H=seg // 2, H_LOAD=max(seg // 2, 32),
                INT_ACC=class_mode and (group <= 0 or group >= k_pad), HAS_BIAS=bias, DEBUG=debug, EVICT_W=evict,
                ASYM=asym, WORKSPACE=det, ORDERED=ordered)


def all_configs(quick: bool = False) -> List[GemmConfig]:
    """Every distinct config gen_configs produces for the Llama shapes (n_int8 = 0 and 12.5%)."""
    seen: List[GemmConfig] = []
    shapes = list(SHAPES.values())[:2] if quick else list(SHAPES.values())
    for n, k in shapes:
        for mb in M_BUCKETS:
            for n8 in (0, k // 128 // 8):
                for c in gen_configs(mb, n, k, n8, interpret=False):
                    if c not in seen and not c.dequant:  # (the dequant path's kernels: dequant_jobs)
                        seen.append(c)
    return seen


#: Integer arguments a real launch passes as multiples of 16 (Llama shapes: K_pad/2, n*64,
#: n*128, N; the debug buffer).  The JIT specializes such values (and every torch
#: pointer, 16-byte aligned) with ``tt.divisibility=16``; without mirroring that here
#: the AOT code would not vectorize loads the way the real one does.
_DIVISIBLE = {"stride_q4m", "stride_q8m", "stride_wn", "stride_wb", "stride_om", "N", "stride_dm", "stride_dn", "stride_xm", "K",
              "stride_ow", "stride_w8n", "stride_ym"}
#: Arguments equal to 1 in every real launch (unit strides): the JIT turns them into constants.
_UNIT = ("stride_on", "stride_xk")


def _specialize(kernel, constexprs: Dict[str, object]) -> Tuple[Dict[str, object], Dict[tuple, list]]:
    cons = dict(constexprs)
    for name in _UNIT:
        if name in kernel.arg_names:
            cons.setdefault(name, 1)
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        if name in cons:
            continue
        if name.endswith("_ptr") or name in _DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return cons, attrs


def _compile(kernel, sig, constexprs, arch: int, num_warps: int, num_stages: int):
    cons, attrs = _specialize(kernel, constexprs)
    src = ASTSource(kernel, _full_sig(kernel, sig, cons), constexprs=cons, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def jobs(quick: bool = False) -> List[Tuple[str, object, Dict[str, str], Dict[str, object], int, int, str]]:
    """(name, kernel, signature, constexprs, num_warps, num_stages, kind) for every variant to compile."""
    out = []
    # activation quantization: both scale modes x input dtypes, gather and identity
    for xd in ("fp16", "bf16", "fp32"):
        for cm in (False, True):
            for ident in ((False, True) if xd == "fp16" else (False,)):
                for bm in (16, 32):
                    out.append((f"act_quant[{xd},class={cm},ident={ident},BM={bm}]", act_quant_kernel, _act_sig(xd),
                                dict(BLOCK_M=bm, CLASS_MODE=cm, IDENTITY=ident, FAKE=False, ROWS=False), 4, 1, "act"))
    # the fused dequant route's activation operand (FAKE: q * scale stored as 16-bit, no packing):
    # fp16 / bf16 inputs into their own dtype, both scale modes, gather and identity
    for xd in ("fp16", "bf16"):
        for cm in (False, True):
            for ident in (False, True):
                out.append((f"act_quant[{xd},class={cm},ident={ident},BM=32,fake]", act_quant_kernel,
                            _act_sig(xd, xd), dict(BLOCK_M=32, CLASS_MODE=cm, IDENTITY=ident, FAKE=True, ROWS=False),
                            4, 1, "act"))
    # block mode by rows (ROWS: a program walks every block of ROWS_BLOCK_M rows; M >= ROWS_MIN_M),
    # packed for every input dtype and FAKE for the 16-bit ones, gather and identity
    for xd in ("fp16", "bf16", "fp32"):
        for ident in (False, True):
            for fake in ((False, True) if xd != "fp32" else (False,)):
                tag = f"act_quant[{xd},class=False,ident={ident},BM={ROWS_BLOCK_M},rows{',fake' if fake else ''}]"
                out.append((tag, act_quant_kernel, _act_sig(xd, xd if fake else "fp16"),
                            dict(BLOCK_M=ROWS_BLOCK_M, CLASS_MODE=False, IDENTITY=ident, FAKE=fake, ROWS=True), 4, 1,
                            "act"))
    # the gather kernel (a row per program, permuted on chip by tl.gather): every row tile from
    # SmolLM2's 576 channels (KP 1024) to Llama-70B's 28672 (KP 32768), both scale modes, packed
    # and FAKE, gather and identity (fp16); bf16 / fp32 inputs at Llama-8B's 4096
    gather_kps = (1024, 4096, 16384, 32768)
    for kp in gather_kps:
        for cm in (False, True):
            for ident in (False, True):
                for fake in (False, True):
                    tag = f"act_quant_gather[fp16,KP={kp},class={cm},ident={ident}{',fake' if fake else ''}]"
                    out.append((tag, act_quant_gather_kernel, dict(_act_sig("fp16", "fp16"), perm_ptr="*i32"),
                                dict(KP=kp, CLASS_MODE=cm, IDENTITY=ident, FAKE=fake), _gather_warps(kp), 1,
                                "act_gather"))
    for xd in ("bf16", "fp32"):
        for fake in ((False, True) if xd != "fp32" else (False,)):
            tag = f"act_quant_gather[{xd},KP=4096,class=False,ident=False{',fake' if fake else ''}]"
            out.append((tag, act_quant_gather_kernel, dict(_act_sig(xd, xd if fake else "fp16"), perm_ptr="*i32"),
                        dict(KP=4096, CLASS_MODE=False, IDENTITY=False, FAKE=fake), _gather_warps(4096), 1,
                        "act_gather"))
    # the split-row repack the Hopper TMA GEMM reads at token tiles > 16
    out.append(("split_rows[BM=32]", split_rows_kernel,
                dict(q4_ptr="*u8", q8_ptr="*i8", out_ptr="*i8", M="i32", N8="i32", stride_q4m="i32",
                     stride_q8m="i32", stride_om="i32", BLOCK_M="constexpr"), dict(BLOCK_M=32), 4, 1, "repack"))
    # the dequant path (large M: dequantize both operands, cuBLAS): its two kernels, block and
    # class mode activations, symmetric and asymmetric weights
    for cm in (False, True):
        out.append((f"dequant_act[fp16,class={cm}]", dequant_act_kernel,
                    dict(q4_ptr="*u8", q8_ptr="*i8", as_ptr="*fp32", bits_ptr="*i32", slot_ptr="*i32", out_ptr="*fp16",
                         M="i32",
                         stride_q4m="i32", stride_q8m="i32", stride_asm="i32", stride_om="i32",
                         BLOCK_M="constexpr", CLASS_MODE="constexpr"), dict(BLOCK_M=32, CLASS_MODE=cm), 4, 1, "dequant"))
    for asym in (False, True):
        for whole in (False, True):  # groups inside a block (G = 32 / 64) or spanning it (G >= 128)
            out.append((f"dequant_weight[fp16,asym={asym},whole_block_groups={whole}]", dequant_weight_kernel,
                        dict(qw_ptr="*u8", ws_ptr="*fp32", wo_ptr="*fp32", out_ptr="*fp16", N="i32", GROUP="i32",
                             stride_wn="i32", stride_wb="i32", stride_wsn="i32", stride_won="i32", stride_ow="i32",
                             BLOCK_N="constexpr", ASYM="constexpr", WHOLE_BLOCK_GROUPS="constexpr"),
                        dict(BLOCK_N=64, ASYM=asym, WHOLE_BLOCK_GROUPS=whole), 4, 1, "dequant"))
    # the FP8 route's operand kernels (large M, sm_90: the FP8 block form of both operands)
    for cm, asym in ((False, False), (True, False), (False, True)):
        out.append((f"fp8_operand_act[class={cm},asym={asym}]", fp8_act_operand_kernel,
                    dict(q4_ptr="*u8", q8_ptr="*i8", as_ptr="*fp32", bits_ptr="*i32", slot_ptr="*i32", src_ptr="*i32",
                         out_ptr="*u8", sa_ptr="*fp32", xs_ptr="*fp32", M="i32", NB="i32", stride_q4m="i32",
                         stride_q8m="i32", stride_asm="i32", stride_om="i32", stride_saj="i32", BLOCK_M="constexpr",
                         CLASS_MODE="constexpr", ASYM="constexpr"),
                    dict(BLOCK_M=32, CLASS_MODE=cm, ASYM=asym), 4, 1, "dequant"))
    # the epilogue: the asymmetric offset term (+ bias) in place, or a bf16 GEMM output converted to
    # fp16 (+ bias) where cuBLAS has no fp16 block-scaled output
    for ydt, odt, offs, bias in (("fp16", "fp16", True, False), ("bf16", "bf16", True, True),
                                 ("bf16", "fp16", False, True), ("bf16", "fp16", True, False)):
        out.append((f"fp8_epilogue[{ydt}->{odt},offsets={offs},bias={bias}]", fp8_epilogue_kernel,
                    dict(y_ptr=_TY[ydt], out_ptr=_TY[odt], xs_ptr="*fp32", wo_ptr="*fp32", bias_ptr="*fp32", M="i32",
                         N="i32", NB="i32", GROUP="i32", stride_ym="i32", stride_om="i32", stride_won="i32",
                         BLOCK_M="constexpr", BLOCK_N="constexpr", NB_P2="constexpr", HAS_OFFSETS="constexpr",
                         HAS_BIAS="constexpr", PRECISION="constexpr"),
                    dict(BLOCK_M=64, BLOCK_N=64, NB_P2=128 if offs else 16, HAS_OFFSETS=offs, HAS_BIAS=bias,
                         PRECISION="tf32x3"), 4, 1, "fp8_epilogue"))
    out.append(("fp8_operand_weight", fp8_weight_operand_kernel,
                dict(qw_ptr="*u8", ws_ptr="*fp32", src_ptr="*i32", out_ptr="*u8", sb_ptr="*fp32", N="i32", GROUP="i32",
                     stride_wn="i32", stride_wb="i32", stride_wsn="i32", stride_w8n="i32", BLOCK_N="constexpr"),
                dict(BLOCK_N=64), 4, 1, "dequant"))
    # the w16 route (small M: weights dequantized in registers, 16-bit MMA): the default tiles
    # (16 and 64 rows x 64 weight rows), fp16 (exponent-trick dequant) and bf16 operands,
    # symmetric / asymmetric weights, groups inside or spanning a block; split-K partials are fp32
    for dt in ("fp16", "bf16"):
        for bm in (16, 64):
            for asym in (False, True):
                for whole in (False, True):
                    if dt == "bf16" and (bm == 16 or not whole):
                        continue
                    for fixup in (False, True):  # (the in-kernel split-K reduction: the 64-row asym tiles)
                        if fixup and (bm != 64 or not asym or not whole):
                            continue
                        out.append((f"w16{'-fixup' if fixup else ''}[{dt},{bm}x64,asym={asym},"
                                    f"whole_block_groups={whole}]", w16_gemm_kernel,
                                    dict(a_ptr=f"*{dt}", qw_ptr="*u8", ws_ptr="*fp32", wo_ptr="*fp32", out_ptr="*fp32",
                                         M="i32", N="i32", NB="i32", GROUP="i32", stride_am="i32", stride_wn="i32",
                                         stride_wb="i32", stride_wsn="i32", stride_won="i32", stride_os="i32",
                                         stride_om="i32", cnt_ptr="*i32", bias_ptr=f"*{dt}", y_ptr=f"*{dt}",
                                         stride_ym="i32"),
                                    dict(BLOCK_M=bm, BLOCK_N=64, ASYM=asym, WHOLE_BLOCK_GROUPS=whole,
                                         MAGIC=dt == "fp16", NUM_STAGES=3, FIXUP=fixup, HAS_BIAS=fixup), 4, 3,
                                    "w16"))
    # the other tuning candidates of kernels/w16_gemm.py w16_configs (the default's 64-row weight
    # tile is above): 32 / 128 weight rows, 8 warps at 128, the 4-stage pipeline -- fp16 operands,
    # asymmetric whole-block groups (W4AxConfig()'s format), every token tile
    for bm in (16, 32, 64):
        for bn, warps, stages in ((64, 4, 4), (32, 4, 3), (128, 4, 3), (128, 8, 3)):
            out.append((f"w16-cand[fp16,{bm}x{bn},warps={warps},stages={stages}]", w16_gemm_kernel,
                        dict(a_ptr="*fp16", qw_ptr="*u8", ws_ptr="*fp32", wo_ptr="*fp32", out_ptr="*fp32",
                             M="i32", N="i32", NB="i32", GROUP="i32", stride_am="i32", stride_wn="i32",
                             stride_wb="i32", stride_wsn="i32", stride_won="i32", stride_os="i32",
                             stride_om="i32", cnt_ptr="*i32", bias_ptr="*fp16", y_ptr="*fp16", stride_ym="i32"),
                        dict(BLOCK_M=bm, BLOCK_N=bn, ASYM=True, WHOLE_BLOCK_GROUPS=True, MAGIC=True,
                             NUM_STAGES=stages, FIXUP=False, HAS_BIAS=False), warps, stages, "w16"))
    # the w16 split-K reduction (fp32 partials -> out dtype, ordered, + bias)
    for dt in ("fp16", "bf16"):
        out.append((f"w16_reduce[{dt}]", w16_reduce_kernel,
                    dict(part_ptr="*fp32", bias_ptr=f"*{dt}", y_ptr=f"*{dt}", M="i32", N="i32", SPLIT="i32",
                         stride_os="i32", stride_om="i32", stride_ym="i32"),
                    dict(BLOCK=1024, HAS_BIAS=True), 4, 1, "reduce"))
    # every generated GEMM config (block mode, group 128, fp16 out, bias), symmetric and
    # asymmetric weights (ASYM: offset term, an extra row-sum + rank-1 update per segment)
    for asym in (False, True):
        for c in all_configs(quick):
            atomic = c.split > 1
            out.append((f"gemm{'-asym' if asym else ''}[{c}]", w4ax_gemm_kernel,
                        _gemm_sig("fp32" if atomic else "fp16", "fp16", False),
                        dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m, ATOMIC=atomic,
                             SWAP_AB=c.swap_ab, INTERLEAVE8=c.interleave8,
                             # symmetric entries compile the INT8-first (ORDERED) variant calibrated
                             # layers run, asymmetric ones the general order-table variant
                             **gemm_meta(evict="evict_first" if c.block_m <= 64 else "", asym=asym,
                                         ordered=not asym)),
                        c.num_warps, c.num_stages, "gemm"))
    # deterministic twins of the split configs (workspace store instead of atomics; fp16 out,
    # written by the reduction) and the reduction kernel for each split tile shape
    split_cfgs = [c for c in all_configs(quick) if c.split > 1]
    for asym in (False, True):
        for c in split_cfgs:
            out.append((f"gemm-det{'-asym' if asym else ''}[{c}]", w4ax_gemm_kernel, _gemm_sig("fp16", "fp16", False),
                        dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m, ATOMIC=False,
                             SWAP_AB=c.swap_ab, INTERLEAVE8=c.interleave8,
                             **gemm_meta(evict="evict_first" if c.block_m <= 64 else "", asym=asym, det=True)),
                        c.num_warps, c.num_stages, "gemm"))
    # the in-kernel split-K reduction (COMETQ_SPLITK_FIXUP) on the first deterministic split config
    for asym in (False, True):
        c = split_cfgs[0]
        out.append((f"gemm-det-fixup{'-asym' if asym else ''}[{c}]", w4ax_gemm_kernel, _gemm_sig("fp16", "fp16", False),
                    dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m, ATOMIC=False,
                         SWAP_AB=c.swap_ab, INTERLEAVE8=c.interleave8, FIXUP=True,
                         **gemm_meta(evict="evict_first" if c.block_m <= 64 else "", asym=asym, det=True)),
                    c.num_warps, c.num_stages, "gemm"))
    reduce_tiles = []
    for c in split_cfgs + [GemmConfig(128, 128), GemmConfig(64, 128)]:  # + the persistent tiles below
        if (c.block_m, c.block_n, c.group_m) not in reduce_tiles:
            reduce_tiles.append((c.block_m, c.block_n, c.group_m))
    for bm, bn, gm in reduce_tiles:
        for od, bias, table in (("fp16", True, False), ("bf16", False, True), ("fp32", True, True)):
            out.append((f"reduce[{od},bias={bias},table={table},{bm}x{bn},group_m={gm}]", w4ax_reduce_kernel,
                        _reduce_sig(od, "fp16"),
                        dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gm, HAS_BIAS=bias, HAS_TABLE=table), 4, 1, "reduce"))
    # feature variants on a representative config (128x128, 8 warps) and a decode config
    variants = [
        ("class,per-channel(int32 runs)", dict(class_mode=True, group=-1), "bf16", False, False),
        ("class,g128", dict(class_mode=True, group=128), "fp16", False, False),
        ("block,g64", dict(group=64), "fp32", False, False),
        ("block,g32(masked)", dict(group=32), "fp16", False, False),
        ("block,g16(masked)", dict(group=16), "fp16", False, False),
        ("block,nobias,debug", dict(bias=False, debug=True), "fp16", False, False),
        ("block,g128,atomic", dict(group=128), "fp32", True, False),
        ("swap,class,per-channel", dict(class_mode=True, group=-1), "fp16", False, True),
        ("swap,block,g64,debug", dict(group=64, debug=True), "fp16", False, True),
        ("swap,block,g32(masked),atomic", dict(group=32), "fp32", True, True),
        ("interleave8,class,per-channel", dict(class_mode=True, group=-1), "fp16", False, False),
        ("interleave8,swap,block,g64,debug", dict(group=64, debug=True), "fp32", False, True),
        ("interleave8,block,g32(masked),atomic", dict(group=32), "fp32", True, False),
        # asymmetric weights: every path (tiled / split-K atomics; persistent below), swap_ab and
        # interleave8, both scale modes, per-channel (int32 runs + per-run activation sums) and groups
        ("asym,class,per-channel(int32 runs)", dict(class_mode=True, group=-1, asym=True), "bf16", False, False),
        ("asym,block,g128", dict(group=128, asym=True), "fp16", False, False),
        ("asym,block,g64,atomic", dict(group=64, asym=True), "fp32", True, False),
        ("asym,block,g32(masked)", dict(group=32, asym=True), "fp16", False, False),
        ("asym,block,g16(masked)", dict(group=16, asym=True), "fp16", False, False),
        ("asym,class,per-channel,nobias,debug,atomic", dict(class_mode=True, group=-1, bias=False, debug=True,
                                                            asym=True), "fp32", True, False),
        ("asym,swap,class,per-channel", dict(class_mode=True, group=-1, asym=True), "fp16", False, True),
        ("asym,swap,block,g32(masked),atomic", dict(group=32, asym=True), "fp32", True, True),
        ("asym,swap,class,g128,debug", dict(class_mode=True, group=128, debug=True, asym=True), "fp16", False, True),
        ("asym,interleave8,class,per-channel,atomic", dict(class_mode=True, group=-1, asym=True), "fp32", True, False),
        ("asym,interleave8,swap,block,g64,debug", dict(group=64, debug=True, asym=True), "fp32", False, True),
        ("asym,interleave8,block,g128", dict(group=128, asym=True), "fp16", False, False),
        # deterministic reduction: the workspace store (split-K pieces), symmetric and asymmetric
        ("det,block,g128", dict(group=128, det=True), "fp16", False, False),
        ("det,asym,swap,block,g32(masked)", dict(group=32, asym=True, det=True), "bf16", False, True),
        ("det,asym,class,per-channel,debug", dict(class_mode=True, group=-1, asym=True, debug=True, det=True),
         "fp32", False, False),
    ]
    for name, kw, od, atomic, swap in variants:
        for bm, bn, w, s in ((128, 128, 8, 3), (16, 64, 4, 4)):
            out.append((f"gemm-variant[{name},{bm}x{bn}]", w4ax_gemm_kernel, _gemm_sig(od, "fp32", False),
                        dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, ATOMIC=atomic, SWAP_AB=swap,
                             INTERLEAVE8="interleave8" in name, **gemm_meta(**kw)),
                        w, s, "gemm"))
    # persistent stream-K kernel: atomic (split tiles), whole-tile and deterministic (workspace)
    # schedules, symmetric and asymmetric
    for asym in (False, True):
        for reduce in ("atomic", "direct", "det"):
            atomic = reduce == "atomic"
            for cm in (False, True):
                for bm, bn, w, s, swap in ((128, 128, 8, 3, False), (64, 128, 4, 4, False), (64, 128, 4, 4, True)):
                    tag = f"atomic={atomic}" if reduce != "det" else "det"
                    out.append((f"persistent[{'asym,' if asym else ''}{tag},class={cm},"
                                f"swap+interleave8={swap},{bm}x{bn}]",
                                w4ax_gemm_persistent_kernel, _gemm_sig("fp32" if atomic else "fp16", "fp16", True),
                                dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, ATOMIC=atomic, SWAP_AB=swap, INTERLEAVE8=swap,
                                     **gemm_meta(class_mode=cm, group=-1 if cm else 128, asym=asym,
                                                 det=reduce == "det")), w, s, "gemm"))
    for job in out:  # the pointer kernel's in-kernel split-K reduction: off unless a job turns it on
        if job[1] is w4ax_gemm_kernel:
            job[3].setdefault("FIXUP", False)
    return out + tma_jobs()


def tma_configs(asym: bool = False) -> List[GemmConfig]:
    """Every distinct TMA-kernel config gen_configs offers (all M buckets; split factors share a
    binary, so configs differing only in ``split`` (> 1) are one compile: see :func:`dedupe`)."""
    seen: List[GemmConfig] = []
    for mb in M_BUCKETS:
        for c in gen_configs(mb, 4096, 4096, 4, interpret=False, tma="only", asym=asym):
            if c not in seen:
                seen.append(c)
    return seen


def tma_jobs() -> list:
    """The Hopper TMA kernel (sm_90 only: TMA does not exist before Hopper and the dispatcher
    never offers it there): every config (decode split-K ones with the workspace store) in
    block mode (g128, symmetric and asymmetric) and class mode per-channel (int32 runs),
    INT8-first maps; and the
    remaining features on the first tile (class g128, debug stores, a general block order,
    fp32 / bf16 out, no bias)."""
    out = []
    # asymmetric g128 block mode (W4AxConfig()'s default format, serving's): every config the
    # ASYM candidates hold
    for c, asym in [(c, False) for c in tma_configs()] + [(c, True) for c in tma_configs(asym=True)]:
        modes = ((("block,g128,asym", dict(asym=True)),) if asym else
                 (("block,g128", dict()), ("class,per-channel", dict(class_mode=True, group=-1))))
        for mode, kw in modes:
            sp = tma_split_rows(c, mode.startswith("class"))
            out.append((f"gemm-tma[{mode},{c}]", w4ax_gemm_tma_kernel,
                        _tma_sig("fp16", "fp16", c.block_m, c.block_n, sp),
                        dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m, A_SPLIT=sp,
                             **tma_meta(split=c.split > 1, **kw)),
                        c.num_warps, c.num_stages, "tma"))
    c = next(c for c in tma_configs() if c.split == 1)
    for name, kw, od in (("block,g128,weights-block-major", dict(), "fp16"),
                         ("class,g128,unordered", dict(class_mode=True, group=128, ordered=False), "bf16"),
                         ("block,per-channel,debug,nobias", dict(group=-1, debug=True, bias=False), "fp32"),
                         ("class,per-channel,debug,unordered", dict(class_mode=True, group=-1, debug=True,
                                                                   ordered=False), "fp16"),
                         ("class,per-channel,asym,debug", dict(class_mode=True, group=-1, debug=True, asym=True),
                          "fp16"),
                         ("block,g256,asym,debug,unordered", dict(group=256, debug=True, asym=True, ordered=False),
                          "bf16")):
        sp = tma_split_rows(c, bool(kw.get("class_mode")))
        out.append((f"gemm-tma-variant[{name},{c}]", w4ax_gemm_tma_kernel, _tma_sig(od, "fp16", c.block_m, c.block_n, sp),
                    dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m, A_SPLIT=sp,
                         **dict(tma_meta(**kw), W_BLOCK_MAJOR="weights-block-major" in name)),
                    c.num_warps, c.num_stages, "tma"))
    # the in-kernel split-K reduction (COMETQ_SPLITK_FIXUP) on every decode split config, the serving format
    for c in [c for c in tma_configs(asym=True) if c.split > 1]:
        sp = tma_split_rows(c, False)
        out.append((f"gemm-tma-variant[block,g128,asym,splitk-fixup,{c}]", w4ax_gemm_tma_kernel,
                    _tma_sig("fp16", "fp16", c.block_m, c.block_n, sp),
                    dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m, A_SPLIT=sp,
                         **tma_meta(split=True, asym=True, fixup=True)),
                    c.num_warps, c.num_stages, "tma"))
    return out


def _key(job) -> tuple:
    name, kernel, sig, cons, w, s, kind = job
    return (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(cons.items())), w, s)


def dedupe(todo):
    """Drop jobs that compile to the same binary (configs differing only in the runtime split)."""
    seen, out = set(), []
    for j in todo:
        k = _key(j)
        if k not in seen:
            seen.add(k)
            out.append(j)
    return out


def ci_subset(todo, arch: int):
    """The representative set CI compiles on every run (the full set: ``level="full"``).

    sm_90 (the target): every distinct generated GEMM config (and every TMA-kernel config in
    both scale modes, with its feature variants), every activation
    quantizer mode, every feature variant on the decode tile (the asymmetric ones
    included: tiled and split-K, swap_ab, interleave8, both scale modes), the
    persistent kernel in both scale modes (and its asymmetric swap variant), and
    the asymmetric twins of three generated configs (a split-K decode config, a
    swap_ab and an interleave8 prefill config), the deterministic reduction
    (workspace-store variants on the decode tile, the deterministic persistent
    kernel at 64x128 (sym block mode, asym class mode + swap/interleave8), the
    reduce kernel for every decode split tile and 64x128) and the deterministic
    twin of the first split-K config (sym and asym).
    sm_80: one of each kernel family, one asymmetric kernel per path, one
    deterministic split-K, persistent and reduce kernel.  Skipped in CI: the
    128x128 feature variants and group 16 (same code path as group 32, 15 s of
    compile), fp32/bf16 inputs of the quantizer on sm_80, the other asymmetric and
    deterministic generated configs.
    """
    keep = []
    asym_cfgs = _ci_asym_configs(todo)
    det_cfgs = set()
    for prefix in ("gemm-det[", "gemm-det-asym[", "gemm-det-fixup[", "gemm-det-fixup-asym["):
        first = next((j[0] for j in todo if j[0].startswith(prefix)), None)
        if first is not None:
            det_cfgs.add(first)
    for j in todo:
        name = j[0]
        if arch >= 90:
            if name.startswith(("gemm[", "gemm-tma[", "gemm-tma-variant[")) or name in asym_cfgs or name in det_cfgs:
                keep.append(j)
            elif name.startswith("act_quant[") and "BM=32" in name and ("fp16" in name or "class=False" in name):
                keep.append(j)
            elif name.startswith("act_quant[fp16,") and ",rows" in name:
                keep.append(j)  # block mode by rows: packed and FAKE, gather and identity
            elif name.startswith("act_quant_gather[") and ("ident=False" in name or "KP=4096" in name):
                keep.append(j)  # the gather kernel: every tile size and mode (identity at one size)
            elif name.startswith(("split_rows[", "dequant_", "fp8_operand", "w16[", "w16-fixup[", "w16_reduce[",
                                  "w16-cand[")):
                keep.append(j)
            elif name.startswith("gemm-variant[") and "16x64" in name and "g16" not in name:
                keep.append(j)
            elif name.startswith("persistent[atomic=True") and "64x128" in name:
                keep.append(j)
            elif name.startswith("persistent[asym,atomic=True") and "swap+interleave8=True,64x128" in name:
                keep.append(j)
            elif name in ("persistent[det,class=False,swap+interleave8=False,64x128]",
                          "persistent[asym,det,class=True,swap+interleave8=True,64x128]"):
                keep.append(j)  # deterministic stream-K: both scale modes, swap+interleave8 or not
            elif name.startswith("reduce[") and ("16x" in name or "64x128" in name):
                keep.append(j)  # the reduction for every decode split tile and the persistent 64x128
        else:
            if name in ("act_quant[fp16,class=False,ident=False,BM=32]", "act_quant[fp16,class=True,ident=False,BM=32]",
                        "act_quant[fp16,class=False,ident=False,BM=32,fake]",
                        f"act_quant[fp16,class=False,ident=False,BM={ROWS_BLOCK_M},rows,fake]",
                        "act_quant_gather[fp16,KP=4096,class=False,ident=False]",
                        "act_quant_gather[fp16,KP=32768,class=False,ident=False,fake]",
                        "act_quant_gather[fp16,KP=16384,class=True,ident=False]",
                        "split_rows[BM=32]", "dequant_act[fp16,class=False]", "dequant_weight[fp16,asym=True]",
                        "w16[fp16,64x64,asym=True,whole_block_groups=True]",
                        "w16[bf16,64x64,asym=False,whole_block_groups=True]",
                        "w16-fixup[fp16,64x64,asym=True,whole_block_groups=True]", "w16_reduce[fp16]",
                        "w16-cand[fp16,64x128,warps=8,stages=3]"):
                keep.append(j)
            elif name.startswith("gemm-variant[class,per-channel") or name.startswith("gemm-variant[block,g64,16x64"):
                keep.append(j)
            elif name.startswith("persistent[atomic=True,class=False,swap+interleave8=False,64x128"):
                keep.append(j)
            elif name.startswith("gemm-det-fixup["):
                keep.append(j)  # the in-kernel split-K reduction's counter atomics on sm_80 too
            elif name in ("gemm-variant[asym,class,per-channel(int32 runs),16x64]",
                          "gemm-variant[asym,block,g64,atomic,16x64]",
                          "persistent[asym,atomic=True,class=True,swap+interleave8=True,64x128]",
                          "gemm-variant[det,block,g128,16x64]",
                          "persistent[asym,det,class=False,swap+interleave8=False,64x128]",
                          "reduce[fp16,bias=True,table=False,16x64,group_m=1]",
                          "reduce[fp32,bias=True,table=True,64x128,group_m=8]"):
                keep.append(j)
    return keep


def _ci_asym_configs(todo) -> set:
    """Names of the asymmetric twins of three generated configs CI compiles for sm_90:
    the first split-K (decode) one, the first swap_ab and the first interleave8 one."""
    picks = {}
    for name, _, _, cons, _, _, _ in todo:
        if not name.startswith("gemm-asym["):
            continue
        if cons["ATOMIC"]:
            picks.setdefault("splitk", name)
        if cons["SWAP_AB"] and not cons["ATOMIC"]:
            picks.setdefault("swap", name)
        if cons["INTERLEAVE8"]:
            picks.setdefault("interleave8", name)
    return set(picks.values())


def _wgmma_a_regs(ptx: str) -> int:
    """How many wgmma instructions take A from registers (``{...}`` list) rather than a smem descriptor."""
    n = 0
    for line in ptx.splitlines():
        line = line.strip()
        if line.startswith("wgmma.mma_async"):
            ops = line.split(None, 1)[1]
            # operands: {d...}, a, b-desc, ...  -> A in registers when the 2nd operand is a {...} list
            rest = ops.split("}", 1)[1].lstrip(", ").lstrip()
            n += rest.startswith("{")
    return n


def check_code(kind: str, arch: int, constexprs: Dict[str, object], num_warps: int, ptx: str) -> Optional[str]:
    """Return a problem description, or None if the generated code has the properties we rely on."""
    if kind == "act":
        if "div.rn.f32" not in ptx or "div.full" in ptx or "div.approx" in ptx:
            return "activation quantization must use IEEE div.rn.f32"
        if ptx.count("0f4B400000") == 0 or ptx.count("0f4B400000") != ptx.count("0fCB400000"):
            return "round-half-even adds (+/- 1.5*2^23) were folded or lost"
        if "mul.f32" not in ptx and "mul.rn.f32" not in ptx:
            # the INT4 clip is its own fp32 multiply before the division (spec op order)
            return "INT4 clip multiply (absmax * int4_clip) missing"
        return None
    if kind == "act_gather":
        base = check_code("act", arch, constexprs, num_warps, ptx)
        if base:
            return base
        # the row read with 16-byte loads and permuted through shared memory (tl.gather), the
        # quotient by the reciprocal's fast path (_quotient: fma.rn beside the guarded div.rn)
        if "ld.global.v4" not in ptx:
            return "the row is not read with 16-byte loads"
        if not constexprs.get("IDENTITY") and "ld.shared" not in ptx:
            return "the permutation does not go through shared memory"
        if "fma.rn.f32" not in ptx:
            return "no fma.rn.f32: the division's fast path is missing"
        return None
    if kind == "repack":
        # word-wide nibble unpack (inline PTX, kernels/_common.py) and 16-byte row stores
        if "0x0F0F0F0F" not in ptx:
            return "the INT4 unpack is not the word-wide inline PTX"
        if _wide_stores(ptx) == 0:
            return "no 16-byte stores of the split rows"
        return None
    if kind == "dequant":
        # the nibbles unpacked by the word-wide inline PTX, 16-byte stores of the 16-bit operand rows
        if "0x0F0F0F0F" not in ptx:
            return "the INT4 unpack is not the word-wide inline PTX"
        if _wide_stores(ptx) == 0:
            return "no 16-byte stores of the dequantized rows"
        return None
    if kind == "fp8_epilogue":
        # the offset term on tensor cores at ~fp32 precision (tf32x3: three tf32 MMAs per product)
        if constexprs.get("HAS_OFFSETS") and "mma" not in ptx:
            return "the offset term's dot is not on tensor cores"
        return None
    if kind == "w16":
        # 16-bit tensor-core MMAs (wgmma on sm_90 with the dequantized weights as the
        # register-sourced A operand, mma.sync before); fp16 weights by the exponent trick (no
        # int -> float conversion of the nibbles: one I2F at most, outside the inner loop)
        if arch >= 90 and constexprs.get("BLOCK_N", 64) < 64:
            # a 32-row weight tile is below wgmma's 64-row M (one warpgroup): mma.sync, registers only
            if "mma.sync" not in ptx:
                return "no tensor-core mma.sync (32-row weight tile)"
        elif arch >= 90:
            if "wgmma.mma_async" not in ptx:
                return "no wgmma"
            if _wgmma_a_regs(ptx) != ptx.count("wgmma.mma_async"):
                return "the dequantized weights are not wgmma's register operand (a shared-memory round trip)"
        elif "mma.sync" not in ptx:
            return "no tensor-core mma.sync"
        if constexprs.get("MAGIC") and ptx.count("cvt.rn.f16.s32") + ptx.count("cvt.rn.f16.s16") > 0:
            return "fp16 weights converted from integers (the exponent trick was lost)"
        if constexprs.get("MAGIC") and "0x64646464" not in ptx:
            return "the fp16 nibble unpack is not the word-wide inline PTX"
        if constexprs.get("FIXUP"):
            # the in-kernel split-K reduction: a gpu-scope acq_rel counter, the partials read from L2
            if not any("atom" in ln and ".acq_rel" in ln and ".gpu" in ln and ".add" in ln for ln in ptx.splitlines()):
                return "FIXUP: no gpu-scope acq_rel atomic add on the tile counter"
            if "ld.global.cg" not in ptx:
                return "FIXUP: the other splits' partials are not read with ld.global.cg"
        return None
    if kind == "tma":
        # operands by TMA (bulk tensor copies), weights unpacked in registers as wgmma's A operand
        if arch < 90:
            return "the TMA kernel is compiled for sm_90+ only"
        if "cp.async.bulk.tensor" not in ptx:
            return "no TMA (cp.async.bulk.tensor) loads"
        if "wgmma" not in ptx or ".s8" not in ptx:
            return "expected int8 wgmma"
        if _wgmma_a_regs(ptx) == 0:
            return "no wgmma takes the unpacked weights (A) from registers"
        if constexprs.get("FIXUP"):
            # the in-kernel split-K reduction: a gpu-scope acq_rel counter, the slots read from L2
            if not any("atom" in ln and ".acq_rel" in ln and ".gpu" in ln and ".add" in ln for ln in ptx.splitlines()):
                return "FIXUP: no gpu-scope acq_rel atomic add on the tile counter"
            if "ld.global.cg" not in ptx:
                return "FIXUP: the other pieces' slots are not read with ld.global.cg"
        return None
    if kind == "reduce":
        # deterministic reduction: plain loads in a fixed order, no atomics, 16-byte vectors
        if _atomics(ptx):
            return "the deterministic reduction must not use atomics"
        if _wide_loads(ptx) == 0:
            return "no 16-byte loads of the fp32 partials"
        return None
    if constexprs.get("FIXUP"):
        # in-kernel split-K reduction: the tile counter's acq_rel add and its reset are the only
        # atomics (the partial sums are plain stores / .cg loads: the result stays deterministic)
        if not any("atom" in ln and ".acq_rel" in ln and ".gpu" in ln and ".add" in ln for ln in ptx.splitlines()):
            return "FIXUP: no gpu-scope acq_rel atomic add on the tile counter"
        if _atomics(ptx) != 2 or "ld.global.cg" not in ptx:
            return f"FIXUP: expected the counter's add + reset and .cg slot loads, got {_atomics(ptx)} atomics"
    elif constexprs.get("WORKSPACE"):
        # deterministic pieces: plain stores into the workspace, never an atomic
        if _atomics(ptx):
            return "deterministic (WORKSPACE) kernel issues atomics"
        if "st.global" not in ptx:
            return "deterministic (WORKSPACE) kernel stores nothing"
    elif constexprs.get("ATOMIC") and not _atomics(ptx):
        return "split-K (ATOMIC) kernel has no fp32 atomics"
    mma_m = constexprs["BLOCK_N"] if constexprs.get("SWAP_AB") else constexprs["BLOCK_M"]
    if arch >= 90 and mma_m >= 64 and num_warps >= 4:
        if "wgmma" not in ptx:
            return "expected wgmma for a >=64-row tile on sm_90"
    elif "mma.sync" not in ptx and "wgmma" not in ptx:
        return "no tensor-core MMA in the GEMM"
    if ".s8" not in ptx:
        return "MMA is not int8"
    if _wide_loads(ptx) == 0:
        return "no 16-byte global loads (weights must stream in 16-byte vectors)"
    return None


_ATOMIC_OP = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red)\.global")


#: sm_90 per-SM limits (H100): registers, shared memory (bytes, incl. 1 KB reserved per CTA), CTAs
_SM90 = dict(regs=65536, smem=233472, ctas=32, warps=64)


def occupancy_sm90(registers: int, shared: int, num_warps: int) -> int:
    """CTAs of one kernel that fit an sm_90 SM at once (registers allocated per warp in units of
    256, shared memory + 1 KB per CTA, at most 64 warps / 32 CTAs): the static occupancy the
    register and shared-memory numbers imply."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = _SM90["regs"] // max(1, per_warp * num_warps)
    by_smem = _SM90["smem"] // (shared + 1024)
    return max(0, min(by_regs, by_smem, _SM90["ctas"], _SM90["warps"] // num_warps))


def _atomics(ptx: str) -> int:
    """Global atomic instructions (``atom.global...`` / ``red.global...``, predicated or not)."""
    return sum(1 for line in ptx.splitlines() if _ATOMIC_OP.match(line))


def _wide_stores(ptx: str) -> int:
    return len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx))


def _wide_loads(ptx: str) -> int:
    """16-byte global loads: ``cp.async ... 0x10`` (pipelined into shared memory) or ``ld.global.v4.b32``."""
    n = 0
    for line in ptx.splitlines():
        if ("cp.async.cg.shared.global" in line or "cp.async.ca.shared.global" in line) and "0x10" in line:
            n += 1
        elif "ld.global" in line and ".v4.b32" in line:
            n += 1
    return n


def run(archs: List[int], level: str = "full", shard: Tuple[int, int] = (0, 1)) -> List[dict]:
    """Compile and check; ``level`` "full" (every variant), "ci" (:func:`ci_subset`), "quick" (configs of 2 shapes).
    ``shard = (i, n)``: only every n-th job from the i-th on (per arch), so n processes share the work."""
    if level not in ("full", "ci", "quick"):
        raise ValueError(f"level must be full, ci or quick, got {level!r}")
    i_shard, n_shard = shard
    if not (n_shard >= 1 and 0 <= i_shard < n_shard):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    results = []
    base = dedupe(jobs(quick=level == "quick"))
    for arch in archs:
        todo = ci_subset(base, arch) if level == "ci" else base
        for name, kernel, sig, cons, w, s, kind in todo[i_shard::n_shard]:
            if kind == "tma" and arch < 90:
                continue  # no TMA before Hopper (the dispatcher never offers the kernel there)
            t0 = time.time()
            rec = dict(name=name, arch=arch, ok=False)
            try:
                k = _compile(kernel, sig, cons, arch, w, s)
                ptx = k.asm["ptx"]
                problem = check_code(kind, arch, cons, w, ptx)
                rec.update(ok=problem is None, problem=problem, shared=k.metadata.shared,
                           wgmma=ptx.count("wgmma.mma_async"), wgmma_a_in_regs=_wgmma_a_regs(ptx),
                           wide_loads=_wide_loads(ptx))
                if arch == 90 and name.startswith(("gemm[", "gemm-tma[", "gemm-asym[")):  # generated configs: registers / spills
                    from .kv4_aot import ptxas_usage

                    rec.update(ptxas_usage(ptx, arch))
                    if rec.get("registers"):
                        rec["ctas_per_sm"] = occupancy_sm90(rec["registers"], k.metadata.shared, w)
                    rec["wgmma_wait0"] = len(re.findall(r"wgmma\.wait_group\.sync\.aligned 0", ptx))
                    rec["tma_loads"] = ptx.count("cp.async.bulk.tensor")
                    from .kv4_aot import loop_profile

                    rec.update(loop_profile(k.asm["cubin"]))
            except Exception as e:  # noqa: BLE001 - reported per variant
                rec.update(error=f"{type(e).__name__}: {str(e)[:400]}")
            rec["seconds"] = round(time.time() - t0, 2)
            results.append(rec)
            print(("ok  " if rec["ok"] else "FAIL"), f"sm_{arch}", name, rec.get("problem") or rec.get("error") or "",
                  f"{rec['seconds']}s", flush=True)
    return results


def resource_table(res: List[dict]) -> str:
    """Markdown: registers, spills, shared memory, CTAs per SM of every generated sm_90 config
    (the static side of a GEMM's speed, readable without a GPU)."""
    rows = [r for r in res if r["arch"] == 90 and r["name"].startswith(("gemm[", "gemm-tma[")) and r.get("ok")]
    out = ["| kernel / config | registers | spill B | smem KB | CTAs/SM | warps/SM | TMA loads | wgmma wait 0 "
           "| loop instr. | PRMT | conversions |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = re.search(r"block_m=(\d+), block_n=(\d+), group_m=\d+, split=(\d+), num_warps=(\d+), num_stages=(\d+), "
                      r"swap_ab=(\w+), interleave8=(\w+)", r["name"])
        if m is None:
            continue
        bm, bn, split, w, st, swap, il8 = m.groups()
        kind = r["name"].split("[", 1)[0] + ("[" + r["name"].split("[", 1)[1].split(",GemmConfig")[0] + "]"
                                             if r["name"].startswith("gemm-tma[") else "")
        flags = "".join(f for f, on in ((" swap", swap == "True"), (" il8", il8 == "True")) if on)
        cfg = f"{bm}x{bn} w{w} s{st}{' split' if int(split) > 1 else ''}{flags}"
        ctas = r.get("ctas_per_sm")
        out.append(f"| {kind} {cfg} | {r.get('registers')} | {r.get('spill_bytes')} | {r.get('shared', 0) / 1024:.0f} | "
                   f"{ctas} | {ctas * int(w) if ctas is not None else '-'} | {r.get('tma_loads', 0)} | "
                   f"{r.get('wgmma_wait0', 0)} | {r.get('loop_instructions', '-')} | {r.get('loop_prmt', '-')} | "
                   f"{r.get('loop_conversions', '-')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (80, 90); repeatable")
    ap.add_argument("--level", default="full", choices=("full", "ci", "quick"),
                    help="full: every variant; ci: the representative CI set; quick: configs of 2 shapes")
    ap.add_argument("--json", help="write per-variant results here")
    ap.add_argument("--table", help="write a markdown table of the generated configs' sm_90 resources here")
    ap.add_argument("--shard", default="0/1", help="I/N: compile every N-th job from the I-th on (N processes "
                    "share the work; merge their --json files)")
    args = ap.parse_args(argv)
    try:
        i_shard, n_shard = (int(v) for v in args.shard.split("/"))
    except ValueError:
        ap.error(f"--shard must be I/N, got {args.shard!r}")
    res = run(args.arch or [80, 90], level=args.level, shard=(i_shard, n_shard))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.table:
        with open(args.table, "w") as f:
            f.write(resource_table(res))
    bad = [r for r in res if not r["ok"]]
    print(f"{len(res) - len(bad)}/{len(res)} variants compiled and checked")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
