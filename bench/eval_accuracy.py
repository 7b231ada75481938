"""Perplexity table of docs/ACCURACY.md (SmolLM2-135M, pydoc_data corpus, CPU).

    python bench/eval_accuracy.py --windows 16 --seq-len 512 --calib 16 --json /tmp/acc.json

Thin wrapper over ``python -m cometq.eval`` (see cometq/eval.py for the schemes).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from cometq.eval import main  # noqa: E402

if __name__ == "__main__":
    main()
