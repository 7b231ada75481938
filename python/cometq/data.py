"""Text every Python has, for calibration and perplexity: the stdlib's ``pydoc_data.topics``.

The topics are concatenated in sorted key order into one corpus.  By token
position, the first ``CALIB_FRACTION`` is the calibration slice and evaluation
windows are taken from ``EVAL_START`` on, so the two never overlap.
"""
from __future__ import annotations

from typing import List, Optional

import torch

CALIB_FRACTION = 0.4
EVAL_START = 0.5


def corpus_text() -> str:
    """All of ``pydoc_data.topics`` as one string (deterministic order)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_tokens(tokenizer) -> torch.Tensor:
    """The corpus tokenized once, as int64 ``[n_tokens]`` (no special tokens)."""
    ids = tokenizer(corpus_text(), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    tokens: torch.Tensor, seq_len: int = 512, n_samples: int = 16, fraction: float = CALIB_FRACTION
) -> List[torch.Tensor]:
    """Non-overlapping ``[1, seq_len]`` windows from the calibration slice."""
    if seq_len < 1 or n_samples < 1:
        raise ValueError(f"seq_len and n_samples must be >= 1, got {seq_len}, {n_samples}")
    end = int(tokens.numel() * fraction)
    n = min(n_samples, end // seq_len)
    if n == 0:
        raise ValueError(f"calibration slice has {end} tokens, fewer than seq_len={seq_len}")
    return [tokens[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(n)]


def evaluation_windows(
    tokens: torch.Tensor, seq_len: int = 512, n_windows: Optional[int] = 40, start: float = EVAL_START
) -> List[torch.Tensor]:
    """Non-overlapping ``[1, seq_len]`` windows from ``start`` (a fraction of the corpus) on."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    begin = int(tokens.numel() * start)
    avail = (tokens.numel() - begin) // seq_len
    n = avail if n_windows is None else min(n_windows, avail)
    if n == 0:
        raise ValueError(f"evaluation slice has {tokens.numel() - begin} tokens, fewer than seq_len={seq_len}")
    return [tokens[begin + i * seq_len : begin + (i + 1) * seq_len].unsqueeze(0) for i in range(n)]
