"""The serving engine: request queue, continuous-batching scheduler, sampling, streaming outputs.

Scheduler policy (one ``step()`` = one forward of the runner):

1. Aborted requests are removed and their KV blocks freed.
2. Running sequences, oldest admission first, each get their next chunk: one
   token when decoding, up to the remaining token budget when their prompt is
   still being prefilled (chunked prefill).  Capacity is reserved in the pool
   before the forward.  If the pool is full, the *newest* running sequence is
   preempted (blocks freed, put back at the head of the queue; it is later
   recomputed from prompt + tokens generated so far, so its output continues
   where it stopped) -- never dropped, never mixed with another.
3. While token budget, sequence slots and free blocks remain, waiting requests
   are admitted in FIFO order (no overtaking: the head of the queue waits until
   it fits).
4. One forward over all chunks; sequences whose chunk reached their last token
   sample one token (penalties applied first; log-probabilities recorded where asked, and
   prompt log-probabilities from the prefill chunks' own rows); outputs are pushed to each
   request's callback.
5. Async scheduling (``EngineConfig.async_scheduling``, full-step decode graphs only): when
   the next step is sure to run the same greedy decode batch, it is queued on the GPU before
   this step's tokens are read (fed by the device); the following ``step()`` reads it.  Rows
   of requests that stopped or were aborted meanwhile are dropped; outputs do not change.

A request whose prompt + max_tokens cannot fit the whole pool (or the model's
context) is rejected at submission, so every admitted request can always
finish once it runs alone: preemption cannot livelock.
"""
from __future__ import annotations

import itertools
import threading
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence

import torch

from .kv import KVPool, PoolExhausted
from .regex import regex_grammar
from .runner import Chunk, ModelRunner
from .sampling import (IncrementalDetokenizer, SamplingParams, TokenLogprob, make_generator, process_logits,
                       sample_token, token_logprobs)
from .schema import schema_grammar
from .structured import JSON_OBJECT, TokenMasker, choice_grammar, grammar_feed, masker_for

__all__ = ["EngineConfig", "RequestOutput", "Request", "Engine", "EngineLoop", "RequestRejected"]


class RequestRejected(ValueError):
    """A request that can never be served (too long, bad tokens); ``param`` names the field."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler limits.

    * ``max_num_seqs``: sequences running at once (batch size cap).
    * ``max_num_batched_tokens``: tokens per step (decode tokens + prefill chunks).
    * ``max_model_len``: prompt + output tokens per request (default: the model's
      context, capped by what the pool holds).
    * ``max_queue``: waiting requests beyond which submissions are rejected.
    * ``enable_prefix_caching``: full KV blocks stay readable by content after their request
      ends; a new (or recomputed) request whose tokens start with cached blocks adopts them and
      prefills only the rest (vLLM's automatic prefix caching; :class:`cometq.paged.PrefixCache`).
      Requests that ask for prompt log-probabilities compute their whole prompt.  A request
      whose next uncached blocks another running request is computing right now (the ``n``
      choices of one prompt, a batch of prompts with a common head) waits for them instead of
      computing them again, when they are at least half of what it would compute: it is skipped
      at admission (requests behind it still start) until the blocks are named, then adopts them.
    * ``async_scheduling``: while the GPU runs decode step N, queue step N+1 before reading
      N's tokens (the host's bookkeeping, streaming and launch of a step then overlap the
      GPU's previous step instead of idling it).  Applies where the runner has full-step
      decode graphs (``ModelRunner.enable_cuda_graphs`` with the KV4 pool) and the step
      after N is sure to run the same requests (all plain greedy -- no penalties, no
      log-probabilities -- and decoding, none reaching
      ``max_tokens`` at N, no request waiting for a free slot, no abort pending); a request
      that stops at N (a stop token or string) has its extra step's token dropped.
      Outputs are identical either way.
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: Optional[int] = None
    max_queue: int = 1024
    async_scheduling: bool = True
    enable_prefix_caching: bool = False

    def __post_init__(self):
        for n in ("max_num_seqs", "max_num_batched_tokens", "max_queue"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be an int >= 1, got {v!r}")
        for n in ("async_scheduling", "enable_prefix_caching"):
            if not isinstance(getattr(self, n), bool):
                raise TypeError(f"{n} must be a bool, got {getattr(self, n)!r}")
        v = self.max_model_len
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
            raise ValueError(f"max_model_len must be an int >= 2 or None, got {v!r}")


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the previous output
    token_ids: List[int]  # new token ids since the previous output
    finished: bool
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    # params.logprobs set: one entry per token of token_ids
    logprobs: Optional[List[TokenLogprob]] = None
    # params.prompt_logprobs set: one entry per prompt token (None for the first), in the first output
    prompt_logprobs: Optional[List[Optional[TokenLogprob]]] = None


_WAITING, _RUNNING, _FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: List[int]
    params: SamplingParams
    callback: Optional[Callable[[RequestOutput], None]] = None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: List[int] = field(default_factory=list)
    status: str = _WAITING
    num_computed: int = 0  # tokens of prompt+output whose K/V are in the pool
    seq_id: int = -1
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    generator: Optional[torch.Generator] = None
    detok: Optional[IncrementalDetokenizer] = None
    output_logprobs: List[TokenLogprob] = field(default_factory=list)  # params.logprobs set: one per output id
    prompt_logprobs: Optional[List[Optional[TokenLogprob]]] = None  # params.prompt_logprobs: filled by prefill
    _sent_ids: int = 0
    _sent_prompt_logprobs: bool = False
    cache_nodes: List[int] = field(default_factory=list)  # prefix cache nodes of its full blocks, in order
    block_hashes: List[int] = field(default_factory=list)  # chain hashes of its leading full blocks (prefix caching)
    grammar: Optional[object] = None  # JSON mode / schema: the output's grammar (cometq.serve.structured)
    json_state: Optional[object] = None  # ... and its state after the output so far

    @property
    def all_ids(self) -> List[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """``len(all_ids)`` without building the list (the scheduler asks per request per step)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, stop: int) -> List[int]:
        """``all_ids[start:stop]`` (0 <= start <= stop) without concatenating prompt and output."""
        p = self.prompt_ids
        n = len(p)
        if stop <= n:
            return p[start:stop]
        if start >= n:
            return self.output_ids[start - n:stop - n]
        return p[start:] + self.output_ids[:stop - n]


class Engine:
    """Synchronous engine: ``add_request`` then call ``step()`` until ``has_work()`` is False."""

    def __init__(self, runner: ModelRunner, tokenizer=None, config: EngineConfig = EngineConfig(),
                 eos_token_ids: Sequence[int] = ()):
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.runner = runner
        self.pool: KVPool = runner.pool
        self.tokenizer = tokenizer
        self.config = config
        pool_tokens = self.pool.num_blocks * self.pool.block_size
        self.max_model_len = min(config.max_model_len or runner.max_positions, runner.max_positions, pool_tokens)
        self.max_num_seqs = min(config.max_num_seqs, getattr(self.pool, "max_seqs", config.max_num_seqs))
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.waiting: Deque[Request] = deque()
        self.running: List[Request] = []
        self.requests: Dict[str, Request] = {}
        self._aborts: List[str] = []
        self._lock = threading.Lock()  # guards waiting/requests/_aborts against submitting threads
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        # statistics (read by /metrics)
        self.stats = dict(steps=0, prompt_tokens=0, generation_tokens=0, preemptions=0, finished=0, aborted=0,
                          rejected=0, errors=0, ttft_sum=0.0, ttft_count=0, tpot_sum=0.0, tpot_count=0,
                          e2e_sum=0.0, e2e_count=0, prefix_query_tokens=0, prefix_hit_tokens=0,
                          prefix_deferrals=0)
        self._prefix = config.enable_prefix_caching
        if self._prefix:
            if not hasattr(self.pool, "enable_prefix_caching"):
                raise ValueError(f"enable_prefix_caching: the {type(self.pool).__name__} pool cannot share blocks")
            self.pool.enable_prefix_caching()
        self._tok_events: Deque = deque()  # (time, tokens) for a recent tokens/s rate
        # what the last step ran: (decode sequences, prefill chunks, prefill tokens); benchmarks
        # read it to tell a slow prefill step from a slow decode step
        self.last_step_shape = (0, 0, 0)
        # async scheduling: the decode step queued ahead (its future, requests and sequence ids),
        # and how many steps were queued that way
        self._ahead: Optional[tuple] = None
        self._async = config.async_scheduling
        self.async_steps = 0
        self.async_dropped = 0  # rows computed ahead for requests that had stopped meanwhile
        self._json_masker: Optional[TokenMasker] = None  # built on the first JSON-mode request

    def json_masker(self) -> TokenMasker:
        """The vocabulary's JSON-mode masker (token bytes in a trie; ~1 s for a 49k vocabulary)."""
        if self._json_masker is None:
            self._json_masker = masker_for(self.tokenizer, self.runner.vocab_size)  # (shared per tokenizer)
        return self._json_masker

    # -- submission ---------------------------------------------------------------
    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        n = len(prompt_ids)
        if n == 0:
            raise RequestRejected("prompt is empty", param="prompt", code="empty_prompt")
        v = self.runner.vocab_size
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < v]
        if bad:
            raise RequestRejected(f"prompt token ids out of range [0, {v}): {bad[:5]}", param="prompt",
                                  code="invalid_token")
        bad = [t for t, _ in params.logit_bias if t >= v]
        if bad:
            raise RequestRejected(f"logit_bias names token ids out of range [0, {v}): {bad[:5]}", param="logit_bias",
                                  code="invalid_token")
        if params.response_format is not None and self.tokenizer is None:
            raise RequestRejected("response_format (JSON mode) needs the engine's tokenizer (the tokens' bytes)",
                                  param="response_format", code="unsupported_value")
        if n + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds the "
                f"maximum context length {self.max_model_len}",
                param="max_tokens" if n < self.max_model_len else "prompt", code="context_length_exceeded")

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
                    callback: Optional[Callable[[RequestOutput], None]] = None,
                    request_id: Optional[str] = None) -> Request:
        """Queue a request (thread-safe); raises :class:`RequestRejected` if it can never run."""
        prompt_ids = list(prompt_ids)
        try:
            self.validate(prompt_ids, params)
        except RequestRejected:
            self.stats["rejected"] += 1
            raise
        if params.response_format is not None:
            self.json_masker()  # (built once, here rather than inside a step)
        with self._lock:
            if len(self.waiting) >= self.config.max_queue:
                self.stats["rejected"] += 1
                raise RequestRejected(f"queue full ({self.config.max_queue} waiting requests)", code="queue_full")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self.requests:
                raise RequestRejected(f"duplicate request id {rid!r}", param="request_id")
            req = Request(rid, prompt_ids, params, callback)
            req.generator = make_generator(params.seed, "cpu")
            if params.response_format is not None:
                fmt = params.response_format
                req.grammar = (JSON_OBJECT if fmt == "json_object" else choice_grammar(params.choices)
                               if fmt == "choice" else regex_grammar(params.regex) if fmt == "regex"
                               else schema_grammar(params.json_schema))
                req.json_state = req.grammar.start
            if self.tokenizer is not None:
                req.detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop)
            self.requests[rid] = req
            self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); its blocks are freed at the next step."""
        with self._lock:
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self._aborts)

    # -- internals -------------------------------------------------------------------
    def _emit(self, req: Request, final: bool = False, error: Optional[str] = None) -> None:
        text = req.detok.take(final) if req.detok is not None else ""
        new_ids = req.output_ids[req._sent_ids:]
        lps = req.output_logprobs[req._sent_ids:len(req.output_ids)] if req.params.logprobs is not None else None
        req._sent_ids = len(req.output_ids)
        if req.callback is None or not (text or new_ids or final):
            return
        plp = None
        if req.params.prompt_logprobs is not None and not req._sent_prompt_logprobs:
            plp, req._sent_prompt_logprobs = req.prompt_logprobs, True
        out = RequestOutput(req.request_id, text, new_ids, final, req.finish_reason if final else None,
                            len(req.prompt_ids), len(req.output_ids), error, lps, plp)
        try:
            req.callback(out)
        except Exception:  # a broken consumer must not take the engine down
            traceback.print_exc()

    def _release(self, req: Request) -> None:
        if req.seq_id >= 0:
            self.pool.free(req.seq_id)
            req.seq_id = -1
        req.num_computed = 0
        req.cache_nodes = []

    def _prefix_blocks(self, req: Request) -> List[tuple]:
        """The token tuples of the full blocks a request may take from the cache (at least its
        last token is left to compute: its logits are needed)."""
        bs = self.pool.block_size
        n_full = (req.num_tokens - 1) // bs
        toks = req.token_slice(0, n_full * bs)
        return [tuple(toks[i * bs:(i + 1) * bs]) for i in range(n_full)]

    @staticmethod
    def _chain_hashes(req: Request, blocks: List[tuple]) -> List[int]:
        """``hash((hash of the blocks before, block tokens))`` of each of ``blocks`` (the request's
        leading full blocks, which never change once full), cached on the request.  Only used to
        spot blocks another request is computing: a collision can only make a request wait for
        a step it did not need to."""
        hs = req.block_hashes
        h = hs[-1] if hs else 0
        for b in blocks[len(hs):]:
            h = hash((h, b))
            hs.append(h)
        return hs[:len(blocks)]

    def _pending_blocks(self) -> set:
        """Chain hashes of the full blocks running requests have still to compute."""
        bs = self.pool.block_size
        pending = set()
        for r in self.running:
            self._add_pending(r, pending, bs)
        return pending

    def _add_pending(self, req: Request, pending: set, bs: int) -> None:
        n_full = req.num_tokens // bs
        first = req.num_computed // bs
        if n_full > first and req.seq_id >= 0:
            toks = req.token_slice(0, n_full * bs)
            pending.update(self._chain_hashes(req, [tuple(toks[i * bs:(i + 1) * bs]) for i in range(n_full)])[first:])

    def _should_wait(self, req: Request, blocks: List[tuple], hit: int, pending: set) -> bool:
        """The blocks after the ``hit`` cached ones are being computed by another request and make
        up at least half of what ``req`` would compute: wait for them to be named."""
        if hit >= len(blocks) or not pending:
            return False
        hs = self._chain_hashes(req, blocks)
        run = 0
        while hit + run < len(hs) and hs[hit + run] in pending:
            run += 1
        return run > 0 and 2 * run * self.pool.block_size >= req.num_tokens - hit * self.pool.block_size

    def _adopt_cached_prefix(self, req: Request, blocks: List[tuple], hit: List[tuple]) -> None:
        """Prefix caching: start a request that holds no blocks with the ``hit`` = ``match_prefix``
        ``(node, block)`` pairs of its leading full ``blocks``."""
        if hit:
            seq = next(self._seq_ids)
            try:
                self.pool.adopt(seq, [b for _, b in hit])
            except PoolExhausted:  # no sequence slot free: compute it all when it is admitted
                return
            req.seq_id = seq
            req.num_computed = len(hit) * self.pool.block_size
            req.cache_nodes = [node for node, _ in hit]

    def _register_full_blocks(self, req: Request) -> None:
        """Name the request's newly completed full blocks in the prefix cache."""
        bs = self.pool.block_size
        full, k = req.num_computed // bs, len(req.cache_nodes)
        if full <= k:
            return
        parent = req.cache_nodes[-1] if k else 0  # (PrefixCache.ROOT)
        toks = req.token_slice(k * bs, full * bs)
        for i in range(k, full):
            parent = self.pool.register_block(req.seq_id, i, parent, tuple(toks[(i - k) * bs:(i - k + 1) * bs]))
            req.cache_nodes.append(parent)

    def _finish(self, req: Request, reason: str, error: Optional[str] = None) -> None:
        if req.status == _FINISHED:
            return
        self._release(req)
        if req in self.running:
            self.running.remove(req)
        with self._lock:
            if req in self.waiting:
                self.waiting.remove(req)
            self.requests.pop(req.request_id, None)
        req.status = _FINISHED
        req.finish_reason = reason
        req.finish_time = time.monotonic()
        if req.detok is not None and reason != "abort":
            req.detok.flush()
        st = self.stats
        if reason == "abort":
            st["aborted"] += 1
        elif reason == "error":
            st["errors"] += 1
        else:
            st["finished"] += 1
            st["e2e_sum"] += req.finish_time - req.arrival
            st["e2e_count"] += 1
            if req.first_token_time is not None and len(req.output_ids) > 1:
                st["tpot_sum"] += (req.finish_time - req.first_token_time) / (len(req.output_ids) - 1)
                st["tpot_count"] += 1
        self._emit(req, final=True, error=error)

    def _preempt(self, req: Request) -> None:
        self._release(req)
        self.running.remove(req)
        req.status = _WAITING
        req.num_preemptions += 1
        self.stats["preemptions"] += 1
        with self._lock:
            self.waiting.appendleft(req)

    def _process_aborts(self) -> None:
        with self._lock:
            ids, self._aborts = self._aborts, []
        for rid in ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, "abort")

    def _reserve(self, req: Request, n_tokens: int) -> bool:
        if req.seq_id < 0:
            req.seq_id = next(self._seq_ids)
        try:
            self.pool.reserve(req.seq_id, n_tokens)
            return True
        except PoolExhausted:
            return False

    def schedule(self) -> List[tuple]:
        """Pick this step's chunks: [(request, n_tokens)] (capacity already reserved)."""
        budget = self.config.max_num_batched_tokens
        plan: List[tuple] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._reserve(req, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                plan.append((req, n))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: it was the last running one
        pending = self._pending_blocks() if self._prefix else None
        skip = 0  # waiting requests passed over this step (waiting for another's blocks)
        while budget > 0 and len(self.running) < self.max_num_seqs:
            with self._lock:  # (other threads only append to the queue)
                if skip >= len(self.waiting):
                    break
                req = self.waiting[skip]
            queried = 0
            if self._prefix and req.seq_id < 0 and req.params.prompt_logprobs is None:
                blocks = self._prefix_blocks(req)
                hit = self.pool.match_prefix(blocks) if blocks else []
                if self._should_wait(req, blocks, len(hit), pending):
                    skip += 1
                    self.stats["prefix_deferrals"] += 1
                    continue
                queried = len(blocks) * self.pool.block_size
                self._adopt_cached_prefix(req, blocks, hit)
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._reserve(req, req.num_computed + n):
                if req.seq_id >= 0 and (req.cache_nodes or not self.pool.has_seq(req.seq_id)):
                    self._release(req)  # (an adopted prefix is matched again when it fits)
                    req.seq_id = -1
                break
            self.stats["prefix_query_tokens"] += queried
            self.stats["prefix_hit_tokens"] += req.num_computed if queried else 0
            with self._lock:
                self.waiting.remove(req)  # (identity: Request compares by id)
            req.status = _RUNNING
            self.running.append(req)
            plan.append((req, n))
            budget -= n
            if pending is not None:
                self._add_pending(req, pending, self.pool.block_size)
        return plan

    def step(self) -> int:
        """One scheduler iteration; returns the number of tokens run through the model.

        With async scheduling a step may have been queued by the previous call: this call then
        queues the one after it (when the batch stays the same) and reads the queued one's tokens."""
        self._process_aborts()
        if self._ahead is not None:
            fut, reqs, seq_ids = self._ahead
            self._ahead = None
            live = [r.status == _RUNNING and r.seq_id == s for r, s in zip(reqs, seq_ids)]
            self.async_dropped += live.count(False)
            if any(live):
                plan = [(r, 1) for r in reqs]
                self.last_step_shape = (len(reqs), 0, 0)
                if all(live):
                    self._queue_ahead(plan, fut)
                return self._read_future(plan, fut, live)
        plan = self.schedule()
        if not plan:
            return 0
        chunks = [Chunk(r.seq_id, r.token_slice(r.num_computed, r.num_computed + n), r.num_computed) for r, n in plan]
        n_dec = sum(1 for c in chunks if c.is_decode)
        self.last_step_shape = (n_dec, len(chunks) - n_dec, sum(len(c.tokens) for c in chunks if not c.is_decode))
        fut = None
        extra, spans = self._prompt_logprob_rows(plan)
        try:
            if (self._async and n_dec == len(chunks) and all(r.params.device_greedy for r, _ in plan)
                    and self.runner.supports_async_decode(len(chunks))):
                fut = self.runner.decode_async(chunks)  # None: run it through forward
            if fut is None:
                logits = self.runner.forward(chunks, extra_rows=extra) if extra else self.runner.forward(chunks)
                self._prefetch_masks(plan)  # (while the device runs the step: nothing has synchronized yet)
        except Exception as e:  # fail this step's requests loudly, keep serving the others
            traceback.print_exc()
            for r, _ in plan:
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")
            return 0
        if fut is not None:
            self._queue_ahead(plan, fut)
            return self._read_future(plan, fut, [True] * len(plan))
        if extra:
            self._record_prompt_logprobs(spans, logits[len(plan):].cpu())
            logits = logits[:len(plan)]
        # one device->host transfer per step: argmax of every row, and the logits themselves
        # only when some request samples, has its logits processed or wants log-probabilities (its
        # torch.Generator and token history live on the CPU)
        greedy = logits.argmax(dim=-1).tolist()
        host = logits.cpu() if any(not r.params.device_greedy for r, _ in plan) else None
        return self._process(plan, greedy, host)

    def _prefetch_masks(self, plan: List[tuple]) -> None:
        """Compute (into the masker's cache) the token masks this step's constrained samplers will
        apply, between queueing the forward and reading its logits: on a GPU the host's mask work
        then overlaps the device's step instead of following it."""
        for req, n in plan:
            if (req.grammar is not None and req.json_state is not None and req.num_computed + n >= req.num_tokens
                    and not req.grammar.done(req.json_state)):
                self._json_masker.allowed(req.json_state, req.grammar)

    def _prompt_logprob_rows(self, plan: List[tuple]):
        """Rows of this step's tokens whose logits give prompt log-probabilities not computed yet
        (row of position p -> the log-probability of prompt token p + 1), and per request the
        ``(request, first position, end position)`` they cover.  A recomputed (preempted) prompt
        is not scored twice."""
        extra: List[int] = []
        spans = []
        off = 0
        for req, n in plan:
            if req.params.prompt_logprobs is not None:
                if req.prompt_logprobs is None:
                    req.prompt_logprobs = [None]  # the first prompt token has no log-probability
                a = max(req.num_computed, len(req.prompt_logprobs) - 1)
                b = min(req.num_computed + n, len(req.prompt_ids) - 1)
                if b > a:
                    extra.extend(range(off + a - req.num_computed, off + b - req.num_computed))
                    spans.append((req, a, b))
            off += n
        return extra, spans

    def _record_prompt_logprobs(self, spans, rows: torch.Tensor) -> None:
        k = 0
        for req, a, b in spans:
            req.prompt_logprobs.extend(token_logprobs(rows[k:k + b - a], req.prompt_ids[a + 1:b + 1],
                                                      req.params.prompt_logprobs))
            k += b - a

    def _can_queue_ahead(self, reqs: List[Request]) -> bool:
        """Is the step after the one in flight sure to run exactly ``reqs``, one decode token
        each (what the scheduler would plan once that step's tokens are in)?"""
        if not self._async or self.running != reqs or len(reqs) > self.config.max_num_batched_tokens:
            return False
        with self._lock:
            if self._aborts or (self.waiting and len(self.running) < self.max_num_seqs):
                return False
        for r in reqs:
            # the step in flight adds one output token: the request must go on after it
            if (not r.params.device_greedy or r.num_computed + 1 != r.num_tokens or len(r.output_ids) + 1 >= r.params.max_tokens
                    or r.num_tokens + 1 >= self.max_model_len):
                return False
        return True

    def _queue_ahead(self, plan: List[tuple], fut) -> None:
        """Async scheduling: queue the step after ``fut``'s before reading ``fut``'s tokens."""
        reqs = [r for r, _ in plan]
        if not self._can_queue_ahead(reqs):
            return
        # room for the queued step's token (the one in flight has its room already); no preemption
        # here -- a full pool just means the next step is scheduled the ordinary way
        if not all(self._reserve(r, r.num_computed + 2) for r in reqs):
            return
        try:
            nxt = self.runner.decode_continue(fut)
        except Exception as e:  # noqa: BLE001 - an engine/runner mismatch: serve on synchronously
            warnings.warn(f"async scheduling disabled: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            self._async = False
            return
        self._ahead = (nxt, reqs, [r.seq_id for r in reqs])
        self.async_steps += 1

    def _read_future(self, plan: List[tuple], fut, live: List[bool]) -> int:
        try:
            toks = fut.tokens()
        except Exception as e:  # a device error: fail the step's requests (as a failed forward does)
            traceback.print_exc()
            for (r, _), ok in zip(plan, live):
                if ok:
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")
            return 0
        return self._process(plan, toks, None, live)

    def _process(self, plan: List[tuple], greedy: List[int], host: Optional[torch.Tensor],
                 live: Optional[List[bool]] = None) -> int:
        """Account a finished step: ``greedy`` = each row's argmax token, ``host`` = its logits
        on the CPU (for sampling requests); rows not ``live`` (their request stopped, was aborted
        or preempted while the step was queued ahead) are dropped."""
        now = time.monotonic()
        self.stats["steps"] += 1
        n_tok = 0
        for i, (req, n) in enumerate(plan):
            if live is not None and not live[i]:
                continue
            req.num_computed += n
            n_tok += n
            if self._prefix:
                self._register_full_blocks(req)
            if req.num_computed < req.num_tokens:
                continue  # mid-prefill chunk: nothing to sample yet
            p, lp = req.params, None
            if p.device_greedy:
                tok = greedy[i]
            else:
                row = host[i]
                x = (process_logits(row, p, req.prompt_ids, req.output_ids, self.eos_token_ids)
                     if p.processes_logits else row)
                if req.grammar is not None:  # JSON mode / schema / choice: only tokens that continue it
                    pre = x
                    x = self._json_masker.apply(x.clone(), req.json_state, req.grammar)
                    eos = [t for t in self.eos_token_ids if t < x.numel()] if not p.ignore_eos else []
                    if eos and getattr(req.grammar, "can_end", None) and req.grammar.can_end(req.json_state):
                        x[eos] = pre[eos]  # (a complete choice that a longer one extends: EOS may end it)
                    if not bool(torch.isfinite(x).any()):
                        self._finish(req, "error", error="no token of the vocabulary continues the JSON output")
                        continue
                tok = sample_token(x, p, req.generator)
                if p.logprobs is not None:
                    lp = token_logprobs(row[None], [tok], p.logprobs)[0]
            if req.first_token_time is None:
                req.first_token_time = now
                self.stats["ttft_sum"] += now - req.arrival
                self.stats["ttft_count"] += 1
                self.stats["prompt_tokens"] += len(req.prompt_ids)
            self._on_token(req, tok, lp)
        self._tok_events.append((now, n_tok))
        return n_tok

    def _on_token(self, req: Request, tok: int, lp: Optional[TokenLogprob] = None) -> None:
        p = req.params
        self.stats["generation_tokens"] += 1
        is_stop_id = tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids)
        if is_stop_id:
            self._finish(req, "stop")
            return
        req.output_ids.append(tok)
        if lp is not None:
            req.output_logprobs.append(lp)
        hit = req.detok.add(tok) if req.detok is not None else None
        closed = False
        if req.grammar is not None:
            req.json_state = grammar_feed(req.grammar, req.json_state, self._json_masker.token_bytes[tok] or b"\x00")
            if req.json_state is None:  # (masked tokens cannot be chosen: a broken invariant, said loudly)
                self._finish(req, "error", error=f"token {tok} does not continue the JSON output")
                return
            closed = req.grammar.done(req.json_state)
        if hit is not None or closed:  # (JSON mode / schema: the document closed)
            self._finish(req, "stop")
        elif len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, "length")
        else:
            self._emit(req)

    def fail_all(self, message: str) -> None:
        for req in list(self.running) + list(self.waiting):
            self._finish(req, "error", error=message)

    # -- start-up -----------------------------------------------------------------------
    def warmup(self, prompt_len: int = 16, max_tokens: int = 3, batch_sizes: Optional[Sequence[int]] = None,
               prefill_len: Optional[int] = None) -> List[int]:
        """Run throw-away requests before serving, so first-time work -- kernel compiles, backend
        and launch-config tuning, a CUDA graph capture per decode batch bucket -- happens here and
        not inside the first users' requests (vLLM profiles and captures at start-up too).

        One round per batch size (default: the runner's decode-graph buckets up to
        ``max_num_seqs`` when graphs are on, else 1 and ``max_num_seqs``), each ``batch`` prompts
        of ``prompt_len`` tokens generating ``max_tokens`` greedy tokens; then one prompt of
        ``prefill_len`` tokens (default: a full step's token budget, capped by the context; 0
        skips it) for the large-M GEMM shapes of long prompts.  Must run before any request is
        queued; the statistics are reset afterwards.  Returns the batch sizes run."""
        if self.has_work():
            raise RuntimeError("warmup() must run before any request is queued")
        if prompt_len < 1 or max_tokens < 1:
            raise ValueError(f"prompt_len and max_tokens must be >= 1, got {prompt_len} and {max_tokens}")
        prompt_len = max(1, min(prompt_len, self.max_model_len - max_tokens))
        if prompt_len + max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens={max_tokens} does not fit the context length {self.max_model_len}")
        if batch_sizes is None:
            graphs = getattr(self.runner, "_graphs", None)
            if graphs is not None:
                batch_sizes = [b for b in graphs.buckets if b <= self.max_num_seqs]
            else:
                batch_sizes = sorted({1, self.max_num_seqs})
        sizes = [int(b) for b in batch_sizes]
        bad = [b for b in sizes if not 1 <= b <= self.max_num_seqs]
        if bad:
            raise ValueError(f"warm-up batch sizes must lie in [1, {self.max_num_seqs}], got {bad}")
        if prefill_len is None:
            prefill_len = self.config.max_num_batched_tokens
        if isinstance(prefill_len, bool) or not isinstance(prefill_len, int) or prefill_len < 0:
            raise ValueError(f"prefill_len must be an int >= 0, got {prefill_len!r}")
        prefill_len = min(prefill_len, self.max_model_len - 1)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        vocab = self.runner.vocab_size
        rounds = [[prompt_len] * b for b in sizes] + ([[prefill_len]] if prefill_len > prompt_len else [])
        for lens in rounds:
            for i, n in enumerate(lens):
                self.add_request([(7 * i + j) % vocab for j in range(n)],
                                 params if n + max_tokens <= self.max_model_len else
                                 SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            while self.has_work():
                self.step()
        for k, v in self.stats.items():  # a fresh start for /metrics
            self.stats[k] = type(v)(0)
        self._tok_events.clear()
        with self._lock:
            self.requests.clear()
        return sizes

    # -- convenience ------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_steps: int = 100000):
        """Run prompts to completion (synchronously); returns the output token id lists."""
        reqs = [self.add_request(p, params) for p in prompts]
        for _ in range(max_steps):
            if not self.has_work():
                break
            self.step()
        else:
            raise RuntimeError(f"generate did not finish in {max_steps} steps")
        return [r.output_ids for r in reqs]

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        ev = self._tok_events
        while ev and now - ev[0][0] > window:
            ev.popleft()
        if not ev:
            return 0.0
        span = max(now - ev[0][0], 1e-3)
        return sum(n for _, n in ev) / span

    def snapshot(self) -> dict:
        with self._lock:
            waiting = len(self.waiting)
        return dict(self.stats, waiting=waiting, running=len(self.running),
                    kv_blocks_used=self.pool.num_used_blocks, kv_blocks_total=self.pool.num_blocks,
                    tokens_per_second=self.tokens_per_second())


class EngineLoop:
    """Runs ``engine.step()`` in a background thread; thread-safe submit/abort."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05):
        self.engine = engine
        self._cv = threading.Condition()
        self._stop = False
        self._idle_wait = idle_wait
        self._thread = threading.Thread(target=self._run, name="cometq-engine", daemon=True)
        self.error: Optional[str] = None

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt_ids, params, callback, request_id=None) -> Request:
        req = self.engine.add_request(prompt_ids, params, callback, request_id)
        self.wake()
        return req

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.wake()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    break
                if not self.engine.has_work():
                    self._cv.wait(self._idle_wait)
                    continue
            try:
                self.engine.step()
            except Exception as e:  # scheduler bug: fail requests instead of hanging clients
                traceback.print_exc()
                self.error = f"{type(e).__name__}: {e}"
                self.engine.fail_all(self.error)
        self.engine.fail_all("server shutting down")
