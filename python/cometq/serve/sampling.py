"""Sampling parameters, token sampling and incremental detokenization."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["SamplingParams", "sample_token", "IncrementalDetokenizer", "make_generator"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding options (OpenAI semantics).

    * ``temperature == 0`` is greedy (argmax); otherwise logits / temperature.
    * ``top_k``: keep the k most likely tokens (0 = off); ``top_p``: nucleus (1 = off).
    * ``seed``: a per-request ``torch.Generator`` seed (same seed + same prompt = same text).
    * ``stop``: strings that end generation (not included in the text);
      ``stop_token_ids``: token ids that end generation (EOS is one unless ``ignore_eos``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or not math.isfinite(self.temperature) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an int (64-bit) or None, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if len(self.stop) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(self.stop)}")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a tuple of ints >= 0, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: Optional[int], device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed if seed is not None else int.from_bytes(os.urandom(8), "little")) % (2**64))
    return g


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """One token from float logits ``[V]``: greedy, or temperature -> top-k -> top-p -> multinomial."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sx, si = torch.sort(x, descending=True)
        probs = torch.softmax(sx, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        sx = sx.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, si, sx)
    probs = torch.softmax(x, dim=-1)
    gen_dev = generator.device if generator is not None else probs.device
    return int(torch.multinomial(probs.to(gen_dev), 1, generator=generator))


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, never emitting half a character.

    Byte-level BPE tokens can split a UTF-8 character; decoding such a prefix
    gives U+FFFD.  As in vLLM, the text of ``tokens[prefix:]`` is compared with
    that of ``tokens[prefix:read]`` and the difference is released only when it
    does not end in U+FFFD.  A few prompt tokens seed the window so tokenizers
    that drop a leading space when decoding alone (SentencePiece) stay exact.

    Stop strings: text that could still be the start of a stop string is held
    back while streaming, so a stop string never leaks into the stream.
    """

    CONTEXT = 5

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.ids: List[int] = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # full decoded output text so far (cut at a stop string)
        self.sent = 0  # chars of self.text already handed out
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> Optional[str]:
        """Add a token; returns the stop string hit (text then ends before it), else None."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            return self._append(new_text[len(prefix_text):])
        return None

    def flush(self) -> None:
        """At the end: release a trailing incomplete character as U+FFFD (nothing is lost silently)."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text):
            self._append(new_text[len(prefix_text):])

    def _append(self, delta: str) -> Optional[str]:
        self.prefix, self.read = self.read, len(self.ids)
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        hit, at = None, None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (at is None or i < at):
                hit, at = s, i
        if hit is not None:
            self.text = self.text[:at]
        return hit

    def take(self, final: bool) -> str:
        """Text not yet handed out; while not final, keep back what could start a stop string."""
        upto = len(self.text) if final or not self.stop else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
