"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions.

Bodies are parsed into pydantic models (a wrong type is a 400 naming the
field); each choice becomes one engine request; responses and SSE chunks
have the shapes the official `openai` client parses. Every response says
what served it: header `X-Loraplex-Adapter` and the body's
`system_fingerprint` (`name@version`, or the base model id).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse

from . import auth
from .errors import BadRequest, pydantic_error
from .request import SamplingParams, TokenLogprob
from .service import Generation, GenerationService, gather_streams, merge

MAX_TOP_LOGPROBS = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    n: int = Field(1, ge=1, le=64)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None


async def parse_body(request: HttpRequest, model: type[BaseModel]):
    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except json.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON body: {e.msg} at position {e.pos}") from e
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise pydantic_error(e) from e


def _served_by(adapter, service: GenerationService) -> str:
    return service.model_id if adapter is None else adapter.ref


def _sticky_key(body: _Sampling, request: HttpRequest) -> str | None:
    return request.headers.get("x-loraplex-session") or body.user


def _params(body: _Sampling, max_tokens: int, seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k if body.top_k and body.top_k > 0 else 0,
        seed=seed,
        stop=body.stop_list(),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
        **kw,
    )


def _message_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported", param=f"messages.{i}.content")
                parts.append(p["text"])
            content = "".join(parts)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content or ""})
    return out


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _headers(served: str) -> dict:
    return {"X-Loraplex-Adapter": served}


def _chat_logprob_entry(service: GenerationService, e: TokenLogprob) -> dict:
    def one(tid, lp):
        s = service.token_text(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    d = one(e.token_id, e.logprob)
    d["top_logprobs"] = [one(t, lp) for t, lp in e.top]
    return d


class RewardRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)


class OpenAIRoutes:
    def __init__(self, service: GenerationService):
        self.service = service

    async def models(self, request: HttpRequest) -> JSONResponse:
        s = self.service
        created = int(time.time())
        data = [{"id": s.model_id, "object": "model", "created": created, "owned_by": "loraplex", "root": str(s.base.path), "parent": None}]
        visible = [v for v in s.store.list() if auth.sees(v.name)]  # the caller's tenant's adapters and shared ones
        for v in visible:
            data.append({"id": v.ref, "object": "model", "created": int(v.created_at), "owned_by": "loraplex", "root": str(v.path), "parent": s.model_id})
        names = sorted({v.name for v in visible})
        for name in names:
            latest = s.store.get(name)
            data.append({"id": name, "object": "model", "created": int(latest.created_at), "owned_by": "loraplex", "root": str(latest.path), "parent": s.model_id})
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: HttpRequest):
        s = self.service
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        adapter = s.resolve(body.model, _sticky_key(body, request))
        prompt = s.chat_prompt_ids(_message_dicts(body.messages))
        max_tokens = body.max_completion_tokens or body.max_tokens or s.default_max_tokens(len(prompt))
        lp = (body.top_logprobs or 0) if body.logprobs else None
        reqs = []
        try:
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                reqs.append(s.submit(prompt, _params(body, max_tokens, seed, logprobs=lp), adapter, loop=_loop()))
        except Exception:
            for r in reqs:
                r.cancel()
            raise
        served = _served_by(adapter, s)
        rid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                self._chat_stream(body, reqs, rid, created, served),
                media_type="text/event-stream",
                headers=_headers(served),
            )
        gens = [Generation() for _ in reqs]
        async for i, out in gather_streams(reqs, s):
            merge(gens[i], out)
        choices = []
        for i, g in enumerate(gens):
            logprobs = None
            if body.logprobs:
                logprobs = {"content": [_chat_logprob_entry(s, e) for e in g.logprobs], "refusal": None}
            choices.append({"index": i, "message": {"role": "assistant", "content": g.text, "refusal": None}, "logprobs": logprobs, "finish_reason": g.finish_reason})
        completion = sum(g.completion_tokens for g in gens)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": served,
                "choices": choices,
                "usage": _usage(len(prompt), completion),
            },
            headers=_headers(served),
        )

    async def _chat_stream(self, body, reqs, rid, created, served):
        s = self.service

        def chunk(choices, usage=None):
            d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model, "system_fingerprint": served, "choices": choices}
            if body.stream_options and body.stream_options.include_usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        for i in range(len(reqs)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        completion = 0
        prompt_tokens = len(reqs[0].prompt_ids)
        async for i, out in gather_streams(reqs, s):
            logprobs = None
            if body.logprobs and out.logprobs:
                logprobs = {"content": [_chat_logprob_entry(s, e) for e in out.logprobs], "refusal": None}
            if out.text or logprobs is not None:
                yield chunk([{"index": i, "delta": {"content": out.text}, "logprobs": logprobs, "finish_reason": None}])
            if out.finished:
                if out.error:
                    yield f"data: {json.dumps({'error': {'message': out.error, 'type': 'server_error'}})}\n\n"
                    return
                completion += out.completion_tokens
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], _usage(prompt_tokens, completion))
        yield "data: [DONE]\n\n"

    async def rewards(self, request: HttpRequest):
        s = self.service
        body: RewardRequest = await parse_body(request, RewardRequest)
        adapter = s.resolve(body.model, request.headers.get("x-loraplex-session"))
        ids = s.conversation_ids(_message_dicts(body.messages))
        score = await s.score(adapter, ids, _loop())
        served = _served_by(adapter, s)
        return JSONResponse({"object": "reward", "model": body.model, "system_fingerprint": served, "score": score,
                             "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids)}}, headers=_headers(served))

    async def completions(self, request: HttpRequest):
        s = self.service
        body: CompletionRequest = await parse_body(request, CompletionRequest)
        if body.suffix:
            raise BadRequest("'suffix' is not supported", param="suffix")
        adapter = s.resolve(body.model, _sticky_key(body, request))
        prompts = _prompt_list(body.prompt, s)
        reqs, prompt_texts = [], []
        try:
            for pi, ids in enumerate(prompts):
                max_tokens = body.max_tokens if body.max_tokens is not None else 16
                prompt_texts.append(s.tokenizer.decode(ids))
                for i in range(body.n):
                    seed = None if body.seed is None else body.seed + i
                    p = _params(body, max_tokens, seed, logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None)
                    reqs.append(s.submit(ids, p, adapter, loop=_loop()))
        except Exception:
            for r in reqs:
                r.cancel()
            raise
        served = _served_by(adapter, s)
        rid = "cmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            return StreamingResponse(self._completion_stream(body, reqs, prompts, prompt_texts, rid, created, served), media_type="text/event-stream", headers=_headers(served))
        gens = [Generation() for _ in reqs]
        async for i, out in gather_streams(reqs, s):
            merge(gens[i], out)
        choices = []
        for i, g in enumerate(gens):
            pi = i // body.n
            text = (prompt_texts[pi] if body.echo else "") + g.text
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(prompts[pi] if body.echo else None, g.prompt_logprobs, g.logprobs)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": g.finish_reason})
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(g.completion_tokens for g in gens)
        return JSONResponse(
            {"id": rid, "object": "text_completion", "created": created, "model": body.model, "system_fingerprint": served, "choices": choices, "usage": _usage(prompt_tokens, completion)},
            headers=_headers(served),
        )

    def _completion_logprobs(self, prompt_ids, prompt_lps, lps: list[TokenLogprob]) -> dict:
        s = self.service
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = 0
        entries: list[tuple[int, TokenLogprob | None]] = []
        if prompt_ids is not None:
            plps = prompt_lps or [None] * len(prompt_ids)
            entries += [(t, plps[j] if j < len(plps) else None) for j, t in enumerate(prompt_ids)]
        entries += [(e.token_id, e) for e in lps]
        for tid, e in entries:
            txt = s.token_text(tid)
            tokens.append(txt)
            offsets.append(offset)
            offset += len(txt)
            token_lps.append(None if e is None else e.logprob)
            tops.append(None if e is None else {s.token_text(t): lp for t, lp in e.top})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    async def _completion_stream(self, body, reqs, prompts, prompt_texts, rid, created, served):
        def chunk(choices, usage=None):
            d = {"id": rid, "object": "text_completion", "created": created, "model": body.model, "system_fingerprint": served, "choices": choices}
            if body.stream_options and body.stream_options.include_usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        completion = 0
        started = set()
        async for i, out in gather_streams(reqs, self.service):
            pi = i // body.n
            text = out.text
            lp = None
            if i not in started:
                started.add(i)
                if body.echo:
                    text = prompt_texts[pi] + text
                    if body.logprobs is not None:
                        lp = self._completion_logprobs(prompts[pi], out.prompt_logprobs, out.logprobs)
            if lp is None and body.logprobs is not None:
                lp = self._completion_logprobs(None, None, out.logprobs)
            if out.finished and out.error:
                yield f"data: {json.dumps({'error': {'message': out.error, 'type': 'server_error'}})}\n\n"
                return
            if text or out.finished:
                yield chunk([{"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason if out.finished else None}])
            if out.finished:
                completion += out.completion_tokens
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], _usage(sum(len(p) for p in prompts), completion))
        yield "data: [DONE]\n\n"


def _prompt_list(prompt, service: GenerationService) -> list[list[int]]:
    if isinstance(prompt, str):
        return [service.text_prompt_ids(prompt)]
    if not prompt:
        raise BadRequest("'prompt' is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [service.check_token_ids(list(prompt), "prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [service.text_prompt_ids(p) for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [service.check_token_ids(list(p), f"prompt.{i}") for i, p in enumerate(prompt)]
    raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists", param="prompt")


def _loop():
    import asyncio

    return asyncio.get_running_loop()
