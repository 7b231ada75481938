"""Does a programmatic dependent launch of the wgmma w16 GEMM pay at decode (gpu_check stage ``pdl``)?

The decode step runs, per layer and linear, the CUDA act-quant kernel (the activations quantized
and dequantized: A') and then the w16 GEMM on A'.  With ``COMETQ_W16_PDL=1`` the GEMM (wgmma
tiles) is launched as a programmatic dependent of the act-quant kernel, which signals
``griddepcontrol.launch_dependents`` first thing: the GEMM's CTAs start while the act-quant pass
runs, prefetch their first weight stages, and wait (``griddepcontrol.wait``) for A'.  This script
captures 32 "layers" x (qkv, o, gate_up, down) act-quant + GEMM pairs of the Llama-3-8B decode
shapes (M = 64, asymmetric g128 weights, 25 % INT8 blocks) in one CUDA graph and times its replay
with plain and with PDL launches, same tile (``--tile``, default 4) and split; it also checks that
both give the same bits.  Writes ``--out`` (JSON) and prints a line per mode.
"""
from __future__ import annotations

import argparse
import json

import torch

SHAPES = {"8B.qkv": (6144, 4096), "8B.o": (4096, 4096), "8B.gate_up": (28672, 4096), "8B.down": (4096, 14336)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tile", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="pdl.json")
    args = ap.parse_args()
    report: dict = {"m": args.m, "layers": args.layers, "tile": args.tile}
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        report["skipped"] = "needs an sm_90 device"
    else:
        try:
            import cometq._cuda_register as CR
        except Exception as e:  # noqa: BLE001 - no extension
            CR, report["skipped"] = None, f"no extension: {type(e).__name__}: {str(e)[:200]}"
        if CR is not None:
            report.update(run(CR, args))
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps(report)[:1500])
    return 0


def run(CR, args) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    ops = []
    for name, (n, k) in SHAPES.items():
        qweight = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g)
        sc = torch.rand(n, k // 128, device=dev, generator=g) * 0.01 + 1e-3
        off = torch.randn(n, k // 128, device=dev, generator=g) * 0.01
        perm = torch.randperm(k, device=dev, generator=g)
        bits = ((torch.arange(k // 128, device=dev) % 4) == 0).to(torch.int32) * 4 + 4
        x = torch.randn(args.m, k, device=dev, generator=g).half()
        ops.append((name, x, perm, bits, int((bits == 8).sum()), qweight, sc, off))

    def layer(pdl):
        outs = []
        for name, x, perm, bits, n8, qweight, sc, off in ops:
            a = CR.cuda_fake_quant_act(x, perm, bits, n8, "block", 1.0, torch.float16)
            outs.append(CR.cuda_w16_gemm(a, qweight, sc, off, 128, None, torch.float16, split_k=0, tile=args.tile,
                                         pdl=pdl))
        return outs

    res = {}
    same = all(torch.equal(p, q) for p, q in zip(layer(False), layer(True)))
    res["same_bits"] = same
    for pdl in (False, True):
        layer(pdl)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(args.layers):
                layer(pdl)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph.replay()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        times.sort()
        res["pdl" if pdl else "plain"] = {"median_ms": times[len(times) // 2], "min_ms": times[0],
                                          "per_layer_us": 1000 * times[len(times) // 2] / args.layers}
    res["pdl_vs_plain"] = res["plain"]["median_ms"] / res["pdl"]["median_ms"]
    return res


if __name__ == "__main__":
    raise SystemExit(main())
