#!/usr/bin/env python
"""Fused activation quantization throughput (GB/s) vs device copy bandwidth, on one GPU.

A thin front end of ``bench_gemm.py --what act_quant`` (same options; writes gemm.json/gemm.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemm import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--what") for a in argv):
        argv = ["--what", "act_quant"] + argv
    sys.exit(main(argv))
