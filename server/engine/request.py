"""A generation request as the engine sees it, and the stream of outputs it produces."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = sampled token's logprob plus top-k
    prompt_logprobs: int | None = None  # same, for prompt tokens (echo)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    constraint: Any = None  # structured.TokenConstraint of this request alone: its grammar state, advanced per token
    return_logits: bool = False  # internal (tests, RL rollouts): raw next-token logits of every step
    return_hidden: bool = False  # internal (reward scoring): final normed hidden state before each sampled token


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    text: str = ""  # new text since the previous output
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, with the first output
    logits: list = field(default_factory=list)  # [V] fp32 tensors, only with params.return_logits
    hidden: list = field(default_factory=list)  # [H] tensors, only with params.return_hidden
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OutputStream:
    """Thread-safe channel from the engine thread to one consumer, sync or asyncio."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._q: queue.Queue | None = None if loop is not None else queue.Queue()

    def put(self, out: RequestOutput) -> None:
        if self._aq is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, out)
            except RuntimeError:  # consumer's loop closed: nobody is listening any more
                pass
        else:
            self._q.put(out)

    async def aget(self) -> RequestOutput:
        return await self._aq.get()

    def get(self, timeout: float | None = None) -> RequestOutput:
        return self._q.get(timeout=timeout)

    def get_nowait(self) -> RequestOutput:
        return self._q.get_nowait()


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Any = None  # AdapterVersion or None (base model)
    stream: OutputStream | None = None
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which the request is aborted
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the engine, read by front ends / telemetry
    first_token_at: float | None = None
    admitted_at: float | None = None
    finished_at: float | None = None

    @property
    def adapter_ref(self) -> str | None:
        return None if self.adapter is None else self.adapter.ref

    def cancel(self) -> None:
        self.cancelled.set()
