"""Ahead-of-time compile the KV4 Triton kernels (and the Llama-layer elementwise kernels the
serving runner uses beside them, ``layer_ops.py``) for sm_80 / sm_90 (no GPU needed).

The interpreter accepts programs the GPU compiler rejects (dot shapes, dtype
mixes, layouts), so CI also compiles the real thing with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and checks
properties the numerics depend on:

* the append kernel divides with ``div.rn.f32`` (IEEE), like the reference;
* the attention kernel's fp16/bf16 variants use tensor-core MMAs.

Run as ``python -m cometq.kernels.kv4_aot --arch 80 --arch 90 [--quick | --ci]`` in a
process *without* ``TRITON_INTERPRET=1``.  Exit status 1 if anything failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # pragma: no cover - guarded by the test
    raise RuntimeError("cometq.kernels.kv4_aot must run without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from .kv4_append import decode_append_chunk, decode_append_warps, kv4_append_kernel, kv4_decode_append_kernel  # noqa: E402
from .layer_ops import rms_norm_kernel, rope_qkv_kernel, silu_mul_kernel  # noqa: E402
from .kv4_attention import _DOT, attention_configs, attention_meta, kv4_attn_reduce_kernel, kv4_attn_split_kernel  # noqa: E402
from .paged_attention import NUM_WARPS as PAGED_WARPS, TILE as PAGED_TILE, paged_attn_split_kernel  # noqa: E402

_TY = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _sig(kernel, ptrs: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for a in kernel.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in ptrs:
            sig[a] = ptrs[a]
        elif a in ("qk_scale", "eps"):
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


def jobs(quick: bool = False) -> List[tuple]:
    out = []
    for axis_ch in (False, True):
        for xd in (torch.float16, torch.float32) if not quick else (torch.float16,):
            ce = dict(T_IN=32 if axis_ch else 1, HALF_D=64, GROUP=32, AXIS_CHANNEL=axis_ch)
            ptrs = dict(x_ptr=_TY[xd], packed_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16", block_ptr="*i32",
                        offset_ptr="*i32")
            out.append((f"append[{'channel' if axis_ch else 'token'},{xd}]", kv4_append_kernel, ptrs, ce, 4, "append"))
    axes = [("channel", "token"), ("token", "token"), ("channel", "channel")]
    dts = (torch.float16, torch.bfloat16) if not quick else (torch.float16,)
    for qd in dts:
        for ka, va in axes if not quick else axes[:1]:
            for qpk in (1, 4, 8):
                for splits in (1, 8):
                    tail = 32 if "channel" in (ka, va) else 0
                    # one split: the launcher's direct store (the split kernel writes the output)
                    ce = attention_meta(qd, qpk, 128, 64, 32, tail, ka, va, splits, direct=splits == 1)
                    ptrs = {n: "*u8" for n in ("kp_ptr", "vp_ptr")}
                    ptrs.update({n: "*fp16" for n in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr", "tk_ptr", "tv_ptr")})
                    ptrs.update({n: "*i32" for n in ("bt_ptr", "qlen_ptr", "tlen_ptr", "sid_ptr")})
                    ptrs.update({n: "*fp32" for n in ("po_ptr", "pm_ptr", "pl_ptr")})
                    ptrs["q_ptr"] = _TY[qd]
                    if splits == 1:
                        ptrs["po_ptr"] = _TY[qd]
                    out.append((f"attn[{qd},{ka}/{va},qpk={qpk},splits={splits}]", kv4_attn_split_kernel, ptrs, ce, 4,
                                "attn"))
                    if ka == "channel":  # the folded-key variant (FOLD_K), same pools
                        ce_f = attention_meta(qd, qpk, 128, 64, 32, tail, ka, va, splits, fold_k=True,
                                              direct=splits == 1)
                        out.append((f"attn-fold[{qd},{ka}/{va},qpk={qpk},splits={splits}]", kv4_attn_split_kernel,
                                    ptrs, ce_f, 4, "attn"))
        # the other launch configs the tuner times (fewer warps, 16-token tiles, lazy rescale),
        # on the default pool format (K per channel, V per token, G 32) at GQA 4
        ka, va = axes[0]
        ptrs = {n: "*u8" for n in ("kp_ptr", "vp_ptr")}
        ptrs.update({n: "*fp16" for n in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr", "tk_ptr", "tv_ptr")})
        ptrs.update({n: "*i32" for n in ("bt_ptr", "qlen_ptr", "tlen_ptr", "sid_ptr")})
        ptrs.update({n: "*fp32" for n in ("po_ptr", "pm_ptr", "pl_ptr")})
        ptrs["q_ptr"] = _TY[qd]
        for cfg in attention_configs(64, 32, False, ka, va)[1:]:
            ce = attention_meta(qd, 4, 128, 64, 32, 32, ka, va, 8, config=cfg)
            out.append((f"attn-cfg[{qd},{ka}/{va},qpk=4,splits=8,w{cfg.num_warps},t{cfg.tile}"
                        f"{',lazy' if cfg.lazy else ''}]", kv4_attn_split_kernel, ptrs, ce, cfg.num_warps, "attn"))
        # the device-side decode append (one token per sequence, lengths advanced on the device)
        for ka, va in (axes[0], axes[1]) if not quick else axes[:1]:
            ptrs = dict(k_ptr=_TY[qd], v_ptr=_TY[qd], kp_ptr="*u8", vp_ptr="*u8", tk_ptr="*fp16", tv_ptr="*fp16",
                        bt_ptr="*i32", lens_ptr="*i32", slot_ptr="*i32", cnt_ptr="*i32")
            ptrs.update({n: "*fp16" for n in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")})
            # G = 32 (the pool default) and 64 (bench_serving's: group = block size), one program per
            # (row, head) and the per-row loop over heads (no counters while capturing)
            for g, per_head in ((32, True), (64, True), (32, False)) if not quick else ((32, True),):
                ce = dict(HALF_D=64, GROUP=g, BLOCK_SIZE=64, STAGED="channel" in (ka, va),
                          K_CHANNEL=ka == "channel", V_CHANNEL=va == "channel", PER_HEAD=per_head,
                          CHUNK=decode_append_chunk(128, g))
                out.append((f"decode_append[{qd},{ka}/{va},G{g}{',per-head' if per_head else ''}]",
                            kv4_decode_append_kernel, ptrs, ce, decode_append_warps(ce["STAGED"], g), "append"))
        # the serving runner's fused layer ops (Llama-3-8B widths; SmolLM2's 576 pads to 1024)
        out.append((f"layer_rms_norm[{qd},res]", rms_norm_kernel,
                    dict(x_ptr=_TY[qd], r_ptr=_TY[qd], w_ptr=_TY[qd], y_ptr=_TY[qd], h_ptr=_TY[qd]),
                    dict(BLOCK_C=4096, HAS_RES=True), 4, "layer"))
        out.append((f"layer_rope_qkv[{qd}]", rope_qkv_kernel,
                    {n: _TY[qd] for n in ("x_ptr", "cos_ptr", "sin_ptr", "q_ptr", "k_ptr", "v_ptr")},
                    dict(NQ=32, NKV=8, D=128, BLOCK_H=32), 4, "layer"))
        out.append((f"layer_silu_mul[{qd}]", silu_mul_kernel, dict(x_ptr=_TY[qd], y_ptr=_TY[qd]), dict(BLOCK=2048), 4,
                    "layer"))
        ce = dict(HQ=32, SPLITS_P2=8, D=128)
        ptrs = dict(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", out_ptr=_TY[qd])
        out.append((f"reduce[{qd}]", kv4_attn_reduce_kernel, ptrs, ce, 4, "reduce"))
        # the FP16 baseline's paged decode attention (paged_attention.py): Llama-3-8B heads, block 16
        for qpk in (1, 4, 8) if not quick else (4,):
            for direct in (True, False):
                ce = dict(QPK=qpk, BLOCK_H=max(16, qpk), D=128, BLOCK_SIZE=16, TILE=PAGED_TILE, DOT_DTYPE=_DOT[qd],
                          DIRECT=direct)
                ptrs = dict(q_ptr=_TY[qd], k_ptr=_TY[qd], v_ptr=_TY[qd], bt_ptr="*i32", len_ptr="*i32")
                ptrs.update({n: _TY[qd] if direct else "*fp32" for n in ("po_ptr", "pm_ptr", "pl_ptr")})
                out.append((f"paged[{qd},qpk={qpk},{'direct' if direct else 'split'}]", paged_attn_split_kernel, ptrs,
                            ce, PAGED_WARPS, "paged"))
    return out


#: the CI set: both append axes, the attention kernel at the GQA extremes (the
#: 16-row padding of QPK=1 and QPK=8) with split-K, bf16 once, and the reduce
CI_SET = ("append[token,torch.float16]", "append[channel,torch.float16]",
          "attn[torch.float16,channel/token,qpk=1,splits=8]", "attn[torch.float16,channel/token,qpk=8,splits=1]",
          "attn[torch.bfloat16,channel/channel,qpk=4,splits=8]", "reduce[torch.float16]",
          "attn-fold[torch.float16,channel/token,qpk=4,splits=8]",
          "attn-cfg[torch.float16,channel/token,qpk=4,splits=8,w2,t32,lazy]",
          "attn-cfg[torch.float16,channel/token,qpk=4,splits=8,w1,t32,lazy]",
          "attn-cfg[torch.float16,channel/token,qpk=4,splits=8,w1,t16,lazy]",
          "decode_append[torch.float16,channel/token,G64,per-head]", "decode_append[torch.float16,channel/token,G32]",
          "decode_append[torch.float16,token/token,G32,per-head]", "layer_rms_norm[torch.float16,res]",
          "layer_rope_qkv[torch.float16]", "layer_silu_mul[torch.float16]",
          "paged[torch.float16,qpk=4,direct]", "paged[torch.bfloat16,qpk=8,split]")


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread of a kernel's PTX, from Triton's bundled ``ptxas -v``
    (what the GPU will run, without a GPU: occupancy steps at 168 / 128 registers for 4 warps)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        r = subprocess.run([getattr(tool, "path", str(tool)), f"-arch={sm}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}


def loop_profile(cubin: bytes) -> dict:
    """Static instruction mix of a kernel's main loop, from the SASS (Triton's bundled ``nvdisasm``).

    The innermost backward-branch loops are found in the disassembly and the longest one is
    reported: its instruction count (per thread per iteration: one K block for the GEMMs, one
    token tile for attention), and how many of those are byte permutes (``PRMT``: int8 element
    shuffles) and conversions (``I2F``/``F2F``/``F2FP``: issued at 1/8 of the FP32 rate on Hopper).
    Divided into an iteration's bytes this bounds what issue rate alone allows -- the check a
    machine without a GPU can make on a memory-bound kernel.  Empty if nvdisasm is missing."""
    import collections
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, timeout=300).stdout
    ins, labels = [], {}
    for line in text.splitlines():
        m = re.match(r"^\s*(\.L\w+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*);", line)
        if m:
            ins.append((m.group(1), m.group(2)))
    loops = []
    for i, (op, rest) in enumerate(ins):
        m = re.search(r"(\.L\w+)", rest) if op.startswith("BRA") else None
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append((labels[m.group(1)], i))
    inner = [l for l in loops if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in loops)]
    if not inner:
        return {}
    a, b = max(inner, key=lambda x: x[1] - x[0])
    ops = collections.Counter(op.split(".")[0] for op, _ in ins[a:b + 1])
    return {"loop_instructions": b - a + 1, "loop_prmt": ops["PRMT"],
            "loop_conversions": ops["I2F"] + ops["F2F"] + ops["F2FP"] + ops["I2FP"]}


def _attrs(kernel, ce) -> Dict[tuple, list]:
    """The JIT's specialization of a real launch: every pointer and every integer argument that is
    a multiple of 16 gets ``tt.divisibility=16`` (what lets loads vectorize to 16 bytes and go
    through ``cp.async``).  Strides are those of the default pools (head_dim 128, block 64,
    G = 32): all multiples of 16 except a per-token scale row (D/G = 4 values)."""
    small = set()
    if ce.get("K_TOK_DIV") == 1:
        small.add("stride_kst")
    if ce.get("V_TOK_DIV") == 1:
        small.add("stride_vst")
    attrs = {}
    for i, a in enumerate(kernel.arg_names):
        if a in ce:
            continue
        if a.endswith("_ptr") or (a.startswith("stride_") and a not in small):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_all(archs, quick: bool = False, ci: bool = False) -> List[dict]:
    results = []
    for arch in archs:
        for name, kernel, ptrs, ce, warps, kind in jobs(quick and not ci):
            if ci and name not in CI_SET:
                continue
            r = {"name": name, "arch": arch, "ok": False}
            try:
                src = ASTSource(kernel, _sig(kernel, ptrs, ce), constexprs=ce,
                                attrs=_attrs(kernel, ce) if kind in ("attn", "paged") else None)
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
                ptx = k.asm["ptx"]
                checks = []
                if kind == "append":
                    checks.append(("div.rn.f32", "div.rn.f32" in ptx))
                if name.startswith("decode_append") and "per-head" in name:
                    # a row's programs count themselves in: a CTA barrier, then one gpu-scope
                    # acq_rel atomic (every warp's reads of the lengths precede the count)
                    at = ptx.find("atom.global.gpu.acq_rel.add")
                    checks.append(("bar.sync then atom.acq_rel", at > 0 and "bar.sync" in ptx[:at]))
                if kind in ("attn", "paged") and "fp32" not in name:
                    checks.append(("tensor-core mma", "mma" in ptx))
                if kind == "attn":
                    # the packed K and V bytes stream through cp.async (software-pipelined: the
                    # next tiles are in flight while this one is dequantized)
                    checks.append(("cp.async K/V stream", "cp.async" in ptx))
                bad = [c for c, ok in checks if not ok]
                r.update(ok=not bad, failed_checks=bad, shared=k.metadata.shared)
                if name.startswith("decode_append"):
                    r.update(ptxas_usage(ptx, arch))  # (the flush's registers: no spills)
                if kind in ("attn", "paged"):
                    r.update(ptxas_usage(ptx, arch))
                    r.update(loop_profile(k.asm["cubin"]))
                    if r.get("loop_instructions"):
                        # issue cost of 32 tokens for the whole program (all its warps)
                        r["warp_instructions_per_32_tokens"] = r["loop_instructions"] * warps * 32 // ce["TILE"]
            except Exception as e:  # noqa: BLE001 - reported per variant
                r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            results.append(r)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", default=None)
    ap.add_argument("--quick", action="store_true", help="fp16, one axis pair")
    ap.add_argument("--ci", action="store_true", help="the minimal CI_SET only")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = compile_all(a.arch or [80, 90], a.quick, a.ci)
    bad = [r for r in res if not r["ok"]]
    for r in res:
        print(("ok  " if r["ok"] else "FAIL"), r["arch"], r["name"], r.get("error", ""), r.get("failed_checks", ""))
    print(f"{len(res) - len(bad)}/{len(res)} compiled")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
