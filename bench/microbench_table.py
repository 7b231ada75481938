"""Markdown table of a ``pytest bench/test_microbench.py --benchmark-json=FILE`` run.

    python bench/microbench_table.py micro.json [--out micro.md]

Per case: microseconds per op (median of the timed calls / ``reps`` launches per call),
GB/s and TFLOP/s from the bytes / FLOPs the case declares, and the speed-up over the
group's peer measured in the same run (cuBLAS FP16 for linear layers, SDPA over fp16 K/V
for decode attention, the HF modules for the fused layer ops): ``peer time / this time``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

#: the peer each group is compared with (first one present)
BASELINES = ("fp16", "sdpa-fp16", "hf-module")


def rows(data: Dict) -> List[Dict]:
    out = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        reps = max(1, int(info.get("reps", 1)))
        us = b["stats"]["median"] / reps * 1e6
        out.append(dict(group=b.get("group") or "", system=info.get("system", b["name"]), us=us,
                        gbps=info.get("bytes", 0) / (us * 1e-6) / 1e9 if info.get("bytes") else None,
                        tflops=info.get("flops", 0) / (us * 1e-6) / 1e12 if info.get("flops") else None,
                        device=info.get("device", "")))
    return out


def markdown(data: Dict) -> str:
    rs = rows(data)
    devices = sorted({r["device"] for r in rs if r["device"]})
    lines = [f"device: {', '.join(devices) or 'unknown'}; "
             f"{data.get('datetime', '')} (pytest-benchmark, medians; GPU cases replay CUDA graphs)", "",
             "| group | system | us / op | GB/s | TFLOP/s | speed-up vs peer |", "|---|---|---|---|---|---|"]
    for group in sorted({r["group"] for r in rs}):
        g = [r for r in rs if r["group"] == group]
        base = next((r for name in BASELINES for r in g if r["system"] == name), None)
        for r in sorted(g, key=lambda r: r["us"]):
            ratio = f"{base['us'] / r['us']:.2f}x vs {base['system']}" if base is not None and r is not base else ""
            gbps = "" if r["gbps"] is None else f"{r['gbps']:.0f}"
            tflops = "" if r["tflops"] is None else f"{r['tflops']:.1f}"
            lines.append(f"| {group} | {r['system']} | {r['us']:.2f} | {gbps} | {tflops} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--out", help="write the table here too")
    a = ap.parse_args(argv)
    with open(a.json) as f:
        data = json.load(f)
    text = markdown(data)
    sys.stdout.write(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
