"""Sampling parameters, token sampling and incremental detokenization."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["SamplingParams", "TokenLogprob", "TokenText", "sample_token", "process_logits", "token_logprobs",
           "IncrementalDetokenizer", "make_generator", "bytes_to_unicode", "MAX_LOGPROBS"]

MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (vLLM's default max_logprobs)


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
    * Logit processing before temperature / top-k / top-p (and before the argmax of greedy
      decoding), in vLLM's order: ``min_tokens`` (the stop token ids and EOS cannot be chosen
      before that many output tokens), ``logit_bias`` (``((token_id, bias), ...)``, bias in
      [-100, 100], added), ``repetition_penalty`` (> 0, 1 = off; HF / CTRL rule on every token of
      prompt and output: a positive logit is divided by it, a negative one multiplied), then
      ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2], 0 = off; OpenAI's rule on the
      output so far: ``logit[t] -= frequency * count[t] + presence * (count[t] > 0)``).
    * ``logprobs``: return each output token's log-probability and the ``logprobs`` most likely
      alternatives (0..MAX_LOGPROBS; None = off); ``prompt_logprobs``: the same for the prompt's
      tokens (the first has none).  Log-probabilities are those of the model's own distribution
      (log-softmax of the raw logits, before penalties and temperature: vLLM's default
      ``raw_logprobs``), so they do not depend on how a token was sampled.
    * ``response_format="json_object"``: OpenAI's JSON mode -- after logit processing, every token
      that cannot continue a JSON object is masked (:mod:`cometq.serve.structured`), so the output
      is always a prefix of one object, and the request ends ("stop") when the object closes;
      ``"json_schema"`` with ``json_schema`` (the schema's JSON text): the same for documents of
      that schema (:class:`cometq.serve.schema.JsonSchemaGrammar` lists the keywords);
      ``"choice"`` with ``choices``: the output is exactly one of those strings (vLLM's
      ``guided_choice``); ``"regex"`` with ``regex``: the output matches the pattern whole
      (vLLM's ``guided_regex``; :mod:`cometq.serve.regex` lists the syntax).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    min_tokens: int = 0
    response_format: Optional[str] = None  # "json_object" / "json_schema" (cometq.serve.structured)
    json_schema: Optional[str] = None  # response_format "json_schema": the schema as JSON text
    choices: Tuple[str, ...] = ()  # response_format "choice": the strings the output may be
    regex: Optional[str] = None  # response_format "regex": the pattern the whole output matches

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
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not math.isfinite(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        v = self.repetition_penalty
        if not _is_num(v) or not math.isfinite(v) or not 0 < v <= 2:
            raise ValueError(f"repetition_penalty must be a number in (0, 2], got {v!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}] or None, got {v!r}")
        lb = self.logit_bias
        if not isinstance(lb, tuple) or not all(
                isinstance(e, tuple) and len(e) == 2 and _is_int(e[0]) and e[0] >= 0 and _is_num(e[1])
                and math.isfinite(e[1]) and -100 <= e[1] <= 100 for e in lb):
            raise ValueError(f"logit_bias must be a tuple of (token id >= 0, bias in [-100, 100]) pairs, got {lb!r}")
        if len({t for t, _ in lb}) != len(lb):
            raise ValueError(f"logit_bias names a token twice: {lb!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.response_format not in (None, "json_object", "json_schema", "choice", "regex"):
            raise ValueError("response_format must be None, 'json_object', 'json_schema', 'choice' or 'regex', got "
                             f"{self.response_format!r}")
        if (self.response_format == "regex") != (self.regex is not None):
            raise ValueError(f"regex goes with response_format='regex' and only with it, got {self.regex!r}")
        if self.regex is not None:
            from .regex import regex_grammar

            regex_grammar(self.regex)  # (compiles it: unsupported syntax fails here, naming it)
        if (self.response_format == "choice") != bool(self.choices):
            raise ValueError(f"choices go with response_format='choice' and only with it, got {self.choices!r}")
        if self.choices and (not isinstance(self.choices, tuple) or len(self.choices) > 256 or not all(
                isinstance(c, str) and c for c in self.choices) or len(set(self.choices)) != len(self.choices)):
            raise ValueError(f"choices must be a tuple of 1-256 distinct non-empty strings, got {self.choices!r}")
        if (self.response_format == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema (the schema's JSON text) goes with response_format='json_schema' and only "
                             f"with it, got response_format={self.response_format!r}")
        if self.json_schema is not None:
            if not isinstance(self.json_schema, str):
                raise ValueError(f"json_schema must be the schema as JSON text, got {type(self.json_schema).__name__}")
            from .schema import schema_grammar

            schema_grammar(self.json_schema)  # (compiles it: an unsupported schema fails here, naming why)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @cached_property  # (frozen: computed once; the engine asks per request and step)
    def processes_logits(self) -> bool:
        """Penalties, a logit bias or min_tokens: the logits are changed before sampling."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias) or self.min_tokens > 0)

    @cached_property
    def device_greedy(self) -> bool:
        """The token is the argmax of the raw logits and nothing else is asked of them: the step's
        device-side argmax serves it (and async scheduling may feed it back on the device)."""
        return self.greedy and not self.processes_logits and self.logprobs is None and self.response_format is None


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: the chosen token's, the ``top`` alternatives
    (``[(token_id, logprob)]``, most likely first) and the chosen token's ``rank`` (1 + the number
    of strictly more likely tokens, vLLM's; 0: not computed)."""

    token_id: int
    logprob: float
    top: Tuple[Tuple[int, float], ...] = ()
    rank: int = 0


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                   output_ids: Sequence[int], eos_ids: Sequence[int] = ()) -> torch.Tensor:
    """``logits`` ``[V]`` after the request's logit processing (see :class:`SamplingParams`: min_tokens
    -- ``eos_ids`` are the EOS ids it holds back unless ``ignore_eos`` --, logit bias, repetition /
    frequency / presence penalties), as a new float32 tensor (the input unchanged).  Token ids
    outside ``[0, V)`` are ignored."""
    x = logits.float().clone()
    V = x.numel()
    if len(output_ids) < params.min_tokens:
        held = [t for t in tuple(params.stop_token_ids) + (() if params.ignore_eos else tuple(eos_ids)) if 0 <= t < V]
        if held:
            x[torch.tensor(held, dtype=torch.long)] = float("-inf")
    if params.logit_bias:
        ids = [t for t, _ in params.logit_bias if t < V]
        if ids:
            x[torch.tensor(ids, dtype=torch.long)] += torch.tensor([b for t, b in params.logit_bias if t < V],
                                                                  dtype=x.dtype)
    if params.repetition_penalty != 1:
        seen = torch.tensor([t for t in list(prompt_ids) + list(output_ids) if 0 <= t < V], dtype=torch.long)
        if seen.numel():
            seen = torch.unique(seen)
            v = x[seen]
            x[seen] = torch.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if (params.frequency_penalty != 0 or params.presence_penalty != 0) and len(output_ids):
        out = torch.tensor([t for t in output_ids if 0 <= t < V], dtype=torch.long)
        counts = torch.bincount(out, minlength=V).to(x.dtype)
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(x.dtype)
    return x


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], k: int) -> List[TokenLogprob]:
    """Log-probabilities of ``token_ids[i]`` under row ``i`` of ``logits`` ``[N, V]`` (log-softmax in
    float32), their ranks and each row's ``k`` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    chosen_t = lp.gather(1, ids[:, None])
    ranks = ((lp > chosen_t).sum(dim=-1) + 1).tolist()
    chosen = chosen_t[:, 0].tolist()
    if k:
        tv, ti = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(a, b)) for a, b in zip(ti.tolist(), tv.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(int(t), float(c), top, int(r)) for t, c, top, r in zip(ids.tolist(), chosen, tops, ranks)]


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


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable-character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    bs += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """What a token is when it stands alone (log-probability reports): its bytes, and its text --
    the UTF-8 decoding of those bytes, or ``bytes:\\xNN...`` (OpenAI's form) where a token is part
    of a multi-byte character, so two such tokens never share a name.  Bytes come from the
    tokenizer's piece: byte-level BPE (GPT-2's alphabet), SentencePiece byte fallback
    (``<0xNN>``), else the decoded text."""

    def __init__(self, tokenizer, cache_size: int = 1 << 17):
        self.tok = tokenizer
        self._inv = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict = {}
        self._cache_size = cache_size

    def _bytes(self, t: int) -> bytes:
        s = self.tok.decode([t])
        if "\ufffd" not in s:
            return s.encode("utf-8")
        piece = self.tok.convert_ids_to_tokens(t)
        if isinstance(piece, str):
            m = _BYTE_PIECE.match(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if piece and all(c in self._inv for c in piece):
                return bytes(self._inv[c] for c in piece)
        return s.encode("utf-8")

    def __call__(self, t: int):
        """(text, bytes) of token ``t``."""
        hit = self._cache.get(t)
        if hit is None:
            b = self._bytes(t)
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
            hit = (text, b)
            if len(self._cache) < self._cache_size:
                self._cache[t] = hit
        return hit


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
