"""End-to-end serving benchmark (throughput, TTFT, TPOT): cometq W4Ax-KV4 vs cometq FP vs HF generate.

    python bench/bench_serving.py --quick          # smoke run on a tiny random model
    python bench/bench_serving.py                  # GPU: Llama-3-8B-shaped random model, batch 1..64, 1024/512
                                                   # CPU: SmolLM2-135M, small sizes
Same as ``cometq bench``; the logic lives in ``cometq.serve.bench``.
"""
import sys

from cometq.serve.bench import main

if __name__ == "__main__":
    sys.exit(main())
