"""The engine: one thread that owns the model and runs the continuous-batching loop.

Front ends call `submit` (any thread) and read the request's `OutputStream`;
they never touch tensors. Everything that mutates engine state (adapter
slots, KV caches, the queue) happens on the engine thread; other threads
hand work over through `call`.

The loop outlives any request: what fails while admitting a request fails
that request alone, a failed step fails the requests of that step, and an
error escaping even that aborts what is queued and carries on. Should the
thread end anyway, `failure` says why and `failed` is set at once: every
queued request gets an error, `submit` answers 503, the server's health turns
bad and `loraplex serve` exits non-zero so a supervisor restarts it.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from loraplex.adapters_store import StoreError

from .adapter_pool import AdapterPool
from .detokenizer import IncrementalDetokenizer
from loraplex.adapters_store.errors import InvalidArgument, ResourceExhausted, ServiceUnavailable
from .model_runner import ModelRunner, StepBatch
from .request import Request, RequestOutput
from .sampler import make_generator, sample_rows, token_logprob
from .structured import step_bitmask
from .scheduler import Scheduler, Sequence

log = logging.getLogger("loraplex.engine")


@dataclass
class EngineConfig:
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_queue: int = 512
    kv_cache_tokens: int = 65536
    max_model_len: int | None = None
    # Reuse computed prefixes per adapter version (server/engine/prefix_cache.py). Off by default here: an engine
    # whose weights change in place under one name (the trainer's rollouts, `AdapterPool.put`) must not
    # reuse keys its old weights computed; the server turns it on (`--no-prefix-caching` turns it off).
    prefix_caching: bool = False


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, config: EngineConfig, *, eos_token_ids: set[int], telemetry=None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = set(eos_token_ids)
        self.telemetry = telemetry
        self.pool = AdapterPool(runner.lora_modules, config.max_loras, cpu_capacity=config.max_cpu_loras, on_event=self._pool_event)
        if config.prefix_caching:
            runner.kv.enable_prefix_caching()
        self.scheduler = Scheduler(
            self.pool, runner.kv, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, on_prefix_lookup=self._prefix_lookup,
        )
        self.max_model_len = runner.max_model_len
        self._inbox: deque[Request] = deque()
        self._calls: deque = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.failure: str | None = None  # why the loop thread ended when it was not asked to
        self.failed = threading.Event()
        self.steps = 0
        self.last_batch_size = 0
        self.tokens_generated = 0
        self.mask_seconds = 0.0  # grammar masks of constrained rows, summed over steps
        self.masked_steps = 0
        self.prefix_queried = 0  # prompt tokens looked up in the prefix cache at admission
        self.prefix_hits = 0  # of which were found there
        self.idle_release_s = 30.0  # idle this long, the KV arenas give back the rows no sequence holds

    # --- any thread -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def new_request_id(self) -> str:
        return uuid.uuid4().hex

    def submit(self, req: Request) -> Request:
        """Queues a request; raises InvalidArgument (too long) or ResourceExhausted. The adapter is pinned until it finishes."""
        return self.submit_many([req])[0]

    def submit_many(self, reqs: list[Request]) -> list[Request]:
        """Queues all of `reqs` (the choices of one API request) or none of them."""
        for req in reqs:
            n = len(req.prompt_ids)
            if n == 0:
                raise InvalidArgument("the prompt is empty", param="prompt")
            if n + req.params.max_tokens > self.max_model_len:
                raise InvalidArgument(
                    f"prompt ({n} tokens) plus max_tokens ({req.params.max_tokens}) exceeds the model's context of "
                    f"{self.max_model_len} tokens",
                    param="max_tokens",
                )
        if len(reqs) > self.config.max_queue:
            raise InvalidArgument(f"{len(reqs)} choices in one request exceed the queue's capacity "
                             f"({self.config.max_queue})", param="n")
        with self._cv:
            if self.failure is not None:
                raise ServiceUnavailable("the engine has stopped; the server is restarting")
            if len(self._inbox) + len(self.scheduler.waiting) + len(reqs) > self.config.max_queue:
                raise ResourceExhausted(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            for req in reqs:
                if req.adapter is not None:
                    self.pool.pin(req.adapter)
            self._inbox.extend(reqs)
            self._cv.notify_all()
        return reqs

    def call(self, fn, timeout: float | None = 30.0):
        """Runs `fn()` on the engine thread between steps and returns its result (re-raising its error)."""
        if self._thread is None or threading.current_thread() is self._thread:  # no loop thread: the caller drives
            return fn()
        done = threading.Event()
        box: dict = {}

        def run():
            try:
                box["v"] = fn()
            except BaseException as e:  # handed back to the caller
                box["e"] = e
            done.set()

        with self._cv:
            self._calls.append(run)
            self._cv.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("engine did not run the call in time")
        if "e" in box:
            raise box["e"]
        return box.get("v")

    def state(self) -> dict:
        """A snapshot for health checks, metrics and tests."""
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting) + len(self._inbox),
            "running_ids": [q.req.request_id for q in list(s.running)],
            # adapter refs (None: the base) of the running and waiting requests: the gateway's adapter affinity
            "running_adapters": [q.req.adapter_ref for q in list(s.running)],
            "waiting_adapters": [q.req.adapter_ref for q in list(s.waiting)] + [r.adapter_ref for r in list(self._inbox)],
            "max_loras": self.config.max_loras,
            "kv_used_tokens": self.runner.kv.held_tokens,  # rows sequences hold
            "kv_allocated_tokens": self.runner.kv.used_tokens,  # with the spare rows kept for the next burst
            "kv_budget_tokens": self.runner.kv.budget_tokens,
            "steps": self.steps,
            "last_batch_size": self.last_batch_size,
            "preemptions": s.preemptions,
            "mask_seconds": self.mask_seconds,
            "masked_steps": self.masked_steps,
            "prefix_cache_tokens": self.runner.kv.cached_tokens,
            "prefix_cache_hit_tokens": self.prefix_hits,
            "prefix_cache_query_tokens": self.prefix_queried,
            **self.pool.stats(),
        }

    def in_use(self, ref: str) -> bool:
        return self.pool.pinned(ref) > 0

    # --- engine thread ----------------------------------------------------------
    def _prefix_lookup(self, req: Request, prompt_tokens: int, cached_tokens: int) -> None:
        self.prefix_queried += prompt_tokens
        self.prefix_hits += cached_tokens
        if self.telemetry is not None:
            self.telemetry.prefix_lookup(req.adapter_ref, prompt_tokens, cached_tokens)

    def _pool_event(self, kind: str, ref: str, **kw) -> None:
        if self.telemetry is not None:
            self.telemetry.adapter_event(kind, ref, **kw)

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    s = self.scheduler
                    while not (self._stop or self._inbox or self._calls or s.running or s.waiting):
                        if not self._cv.wait(self.idle_release_s):  # idle: a burst's memory goes back
                            s.kv.release_spare_rows()
                    if self._stop:
                        break
                try:
                    self._iterate()
                except Exception:  # outside any request's own handling: fail what is queued, keep serving
                    log.exception("engine iteration failed; aborting every queued and running request")
                    self._fail_all("internal engine error")
        except BaseException as e:
            self.failure = f"the engine loop stopped: {type(e).__name__}"
            log.critical("%s", self.failure, exc_info=e)
            raise
        finally:
            with self._cv:
                if self.failure is None and not self._stop:
                    self.failure = "the engine loop stopped"
                stopped_by_failure = self.failure is not None
            if stopped_by_failure:
                self.failed.set()
                self._fail_all("the engine stopped")
            else:
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(seq, "abort")

    def _fail_all(self, error: str) -> None:
        """Ends every request the engine holds with an error, each on its own so one failure cannot stop the rest."""
        with self._cv:
            inbox = list(self._inbox)
            self._inbox.clear()
        for req in inbox:
            self._reject(req, error)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            try:
                self._finish(seq, "error", error=error)
            except Exception:
                log.exception("could not finish request %s", seq.req.request_id)
                for queue in (self.scheduler.running, self.scheduler.waiting):
                    if seq in queue:
                        queue.remove(seq)

    def _reject(self, req: Request, error: str) -> None:
        """Fails a request that never became a sequence: its client gets the error, its adapter pin is released."""
        try:
            if req.adapter is not None:
                self.pool.unpin(req.adapter.ref)
            req.finished_at = time.monotonic()
            if req.stream is not None:
                req.stream.put(RequestOutput(req.request_id, finished=True, finish_reason="error", error=error,
                                             prompt_tokens=len(req.prompt_ids)))
            if self.telemetry is not None:
                self.telemetry.request_finished(req, "error", 0, len(req.prompt_ids))
        except Exception:
            log.exception("could not fail request %s cleanly", req.request_id)

    def run_until_idle(self) -> None:
        """Drives the loop on the caller's thread until every submitted request has finished.

        For an engine that was never `start()`ed and has one user that blocks on
        its results anyway (the trainer's rollouts): no thread hand-off per step,
        and no second thread competing with the model's own intra-op threads.
        """
        if self._thread is not None:
            raise RuntimeError("run_until_idle is for engines without a loop thread")
        while self._inbox or self._calls or self.scheduler.running or self.scheduler.waiting:
            self._iterate()

    def _iterate(self) -> None:
        with self._cv:
            new = list(self._inbox)
            self._inbox.clear()
            calls = list(self._calls)
            self._calls.clear()
        for fn in calls:
            fn()
        for req in new:
            try:
                self._enqueue(req)
            except Exception:  # this request's own parameters: it fails, the others go on
                log.exception("could not admit request %s", req.request_id)
                self._reject(req, "the request could not be started")
        try:
            self._step()
        except Exception:
            log.exception("engine step failed; aborting the requests of that step")
            for seq in list(self.scheduler.running):
                self._finish(seq, "error", error="internal engine error")

    def _enqueue(self, req: Request) -> None:
        p = req.params
        seq = Sequence(
            req=req,
            all_ids=list(req.prompt_ids),
            num_prompt=len(req.prompt_ids),
            gen=make_generator(p.seed),
            detok=IncrementalDetokenizer(self.tokenizer, p.stop, p.include_stop_str_in_output),
            prompt_logprobs=[None] if p.prompt_logprobs is not None else None,
        )
        self.scheduler.waiting.append(seq)

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            r = seq.req
            if r.cancelled.is_set() or (r.deadline is not None and now > r.deadline):
                self._finish(seq, "abort")

    def _step(self) -> None:
        """One engine step: schedule -> prepare -> forward -> sample -> advance."""
        self._reap()
        plan = self.scheduler.schedule()
        for seq, err in plan.failed:  # an adapter that cannot fill a slot fails its own request, nothing else
            log.warning("request %s: %s", seq.req.request_id, err)
            self._finish(seq, "error", error=str(err) if isinstance(err, StoreError) else "internal engine error")
        if not plan.items:
            if self.scheduler.waiting and not self.scheduler.running:
                time.sleep(0.001)  # waiting on capacity that only a finishing request frees: none running
            return
        batch = self.runner.prepare(plan.items)
        logits, hidden = self.runner.forward(batch)
        logits = logits.cpu()
        self.steps += 1
        self.last_batch_size = len(plan.items)
        self.scheduler.computed(plan.items)
        self._prompt_logprobs(batch, logits)
        masks = self._grammar_masks(batch.sample_rows)
        rows = [(row, seq.req.params, seq.gen, seq.output_ids) for seq, row in batch.sample_rows]
        drawn = sample_rows(logits, rows, masks)
        for (seq, row), (token, entry) in zip(batch.sample_rows, drawn):
            self._advance(seq, token, entry, logits[row], hidden[row] if seq.req.params.return_hidden else None)

    def _prompt_logprobs(self, batch: StepBatch, logits: torch.Tensor) -> None:
        for seq, row, pos in batch.prompt_rows:
            k = seq.req.params.prompt_logprobs
            end = min(seq.num_computed, seq.num_prompt - 1)
            lps = torch.log_softmax(logits[row : row + (end - pos)], dim=-1)
            for j in range(end - pos):
                seq.prompt_logprobs.append(token_logprob(lps[j], seq.all_ids[pos + j + 1], k))

    def _grammar_masks(self, samplers: list[tuple[Sequence, int]]):
        """Token masks of the constrained rows of this step (None when no row is constrained)."""
        masks = step_bitmask([(i, seq.req.params.constraint) for i, (seq, _) in enumerate(samplers)
                              if seq.req.params.constraint is not None])
        if masks is not None:
            self.mask_seconds += masks.seconds
            self.masked_steps += 1
        return masks

    def _advance(self, seq: Sequence, token: int, entry, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        req, p = seq.req, seq.req.params
        seq.all_ids.append(token)
        self.tokens_generated += 1
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        out = RequestOutput(req.request_id, token_ids=[token])
        if p.return_logits:
            out.logits.append(logits.clone())
        if hidden is not None:
            out.hidden.append(hidden.float().cpu())
        if entry is not None:
            out.logprobs.append(entry)
        reason = None
        complete = p.constraint is not None and p.constraint.advance(token)  # the grammar allows nothing more
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        else:
            seq.detok.add(token)
            if seq.detok.stopped or complete:
                reason = "stop"
            elif len(seq.output_ids) >= p.max_tokens or len(seq.all_ids) >= self.max_model_len:
                reason = "length"
        out.text = seq.detok.take(final=reason is not None)
        if reason is not None:
            self._finish(seq, reason, last=out)
        else:
            self._emit(seq, out)

    def _emit(self, seq: Sequence, out: RequestOutput) -> None:
        out.prompt_tokens = seq.num_prompt
        out.completion_tokens = len(seq.output_ids)
        if seq.prompt_logprobs is not None and not seq.sent_prompt_logprobs:
            out.prompt_logprobs = seq.prompt_logprobs
            seq.sent_prompt_logprobs = True
        if seq.req.stream is not None:
            seq.req.stream.put(out)

    def _finish(self, seq: Sequence, reason: str, *, last: RequestOutput | None = None, error: str | None = None) -> None:
        if seq.finished:
            return
        self.scheduler.finish(seq)
        req = seq.req
        req.finished_at = time.monotonic()
        if req.adapter is not None:
            self.pool.unpin(req.adapter.ref)
        out = last or RequestOutput(req.request_id, text=seq.detok.take(final=True))
        out.finished = True
        out.finish_reason = reason
        out.error = error
        self._emit(seq, out)
        if self.telemetry is not None:
            self.telemetry.request_finished(req, reason, len(seq.output_ids), seq.num_prompt)
