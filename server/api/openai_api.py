"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions.

Bodies are parsed into pydantic models (a wrong type is a 400 naming the
field); each choice becomes one engine request; responses and SSE chunks
have the shapes the official `openai` client parses. Every response says
what served it: header `X-Loraplex-Adapter` and the body's
`system_fingerprint` (`name@version`, or the base model id).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from . import auth
from .errors import BadRequest, NotFound, pydantic_error
from .generation_params import (
    COMPLETION_DEFAULT_MAX_TOKENS, MAX_MESSAGES, MAX_N, MAX_NAME_CHARS, MAX_PROMPTS, MAX_TOKENS, GenerationParams,
    TopLogprobs, valid_text,
)
from ..engine.request import TokenLogprob
from .service import Generation, GenerationService, gather_streams, merge
from .structured_fields import AnswerFields, PlatformFields, ToolFields, ToolMessageFields, compile_answer
from .tools import ToolChoice, ToolStreamParser, check_tool_support, parse_tool_calls, template_messages

Text = Annotated[str, AfterValidator(valid_text)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, never silently ignored


class ChatMessage(_Body, ToolMessageFields):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[dict], None] = None
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # no effect: there is no network side channel to pad against


class _Sampling(GenerationParams):
    """An OpenAI body: the shared generation parameters plus the fields only the wire has."""

    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, never silently ignored
    model: str = Field(max_length=MAX_NAME_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Sampling, ToolFields, PlatformFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False  # chat spells "k alternatives" as logprobs: true + top_logprobs: k
    top_logprobs: TopLogprobs | None = None

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[Text, Annotated[list[Text], Field(max_length=MAX_PROMPTS)], list[int],
                  Annotated[list[list[int]], Field(max_length=MAX_PROMPTS)]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def candidates(self) -> int:
        """How many completions of each prompt to generate: `best_of` (OpenAI's rules), else `n`."""
        if self.best_of is None:
            return self.n
        if self.best_of < self.n:
            raise BadRequest(f"'best_of' ({self.best_of}) must be at least 'n' ({self.n})", param="best_of")
        if self.stream and self.best_of > 1:  # as OpenAI answers
            raise BadRequest("'best_of' cannot be used with 'stream': the best candidates are known only at the end",
                             param="best_of")
        return self.best_of


def best_candidates(gens: list[Generation], n: int) -> list[Generation]:
    """The `n` candidates with the highest mean logprob per token (OpenAI's "best"), best first."""
    def score(g: Generation) -> float:
        return sum(e.logprob for e in g.logprobs) / max(len(g.logprobs), 1)

    return sorted(gens, key=score, reverse=True)[:n]


MAX_JSON_DEPTH = 128  # nesting levels of a JSON body; deeper is refused before validation (and recursion) sees it


def _depth_exceeds(data, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def load_json(raw: bytes | str, what: str = "the JSON body", param: str | None = None):
    """JSON from a client: not UTF-8, malformed or nested too deep is a 400 naming `what`, never a 500."""
    try:
        data = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what} is not valid UTF-8 (byte {e.start})", param=param) from e
    except json.JSONDecodeError as e:
        raise BadRequest(f"{what} is malformed JSON: {e.msg} at position {e.pos}", param=param) from e
    except RecursionError as e:
        raise BadRequest(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", param=param) from e
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise BadRequest(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", param=param)
    return data


async def parse_body(request: HttpRequest, model: type[BaseModel]):
    raw = await request.body()
    data = load_json(raw or b"null", "the request body")
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


def _answer_params(service: GenerationService, body: _Sampling) -> dict:
    """Engine fields from the answer-shaping fields that are not a grammar."""
    return {"logit_bias": body.logit_bias_ids(service.vocab_size)}


def _message_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported", param=f"messages.{i}.content")
                try:
                    valid_text(p["text"])
                except ValueError as e:
                    raise BadRequest(f"messages[{i}].content: {e}", param=f"messages.{i}.content") from None
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
    model: str = Field(max_length=MAX_NAME_CHARS)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class OpenAIRoutes:
    def __init__(self, service: GenerationService):
        self.service = service

    async def models(self, request: HttpRequest) -> JSONResponse:
        s = self.service
        created = int(time.time())
        data = [{"id": s.model_id, "object": "model", "created": created, "owned_by": "loraplex", "root": s.model_id, "parent": None}]
        visible = [v for v in s.store.list() if auth.sees(v.name)]  # the caller's tenant's adapters and shared ones
        for v in visible:
            data.append({"id": v.ref, "object": "model", "created": int(v.created_at), "owned_by": "loraplex", "root": v.ref, "parent": s.model_id})
        names = sorted({v.name for v in visible})
        for name in names:
            latest = s.store.get(name)
            data.append({"id": name, "object": "model", "created": int(latest.created_at), "owned_by": "loraplex", "root": latest.ref, "parent": s.model_id})
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: HttpRequest) -> JSONResponse:
        """GET /v1/models/{id}: one entry of the list, or 404 naming the model."""
        want = request.path_params["model_id"]
        for m in json.loads((await self.models(request)).body)["data"]:
            if m["id"] == want:
                return JSONResponse(m)
        raise NotFound(f"model {want!r} does not exist", param="model")

    async def chat(self, request: HttpRequest):
        s = self.service
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        body.refuse_unsupported()
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        adapter = s.resolve(body.model, _sticky_key(body, request))
        tools = body.tool_choice_spec()
        if tools is not None and tools.tools:
            tools.fmt = check_tool_support(s.tokenizer)
        messages = template_messages([m.model_dump(exclude_none=True) for m in body.messages])
        shown = tools.tools if tools is not None and tools.tools else None  # what the template renders
        prompt = await asyncio.to_thread(s.chat_prompt_ids, messages, shown)
        max_tokens = body.max_completion_tokens or body.max_tokens or s.default_max_tokens(len(prompt))
        extra = _answer_params(s, body)
        constraint = await asyncio.to_thread(compile_answer, s.grammars, body, tools)
        if tools is not None and tools.mode == "auto" and not tools.parallel and tools.fmt.close:
            extra["stop"] = list(body.stop) + [tools.fmt.close]  # one call, then the answer ends
            extra["include_stop_str_in_output"] = True
        reqs = s.submit_choices([prompt], body, max_tokens, adapter, loop=_loop(), constraint=constraint, **extra)
        served = _served_by(adapter, s)
        rid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                self._chat_stream(body, reqs, rid, created, served, tools),
                media_type="text/event-stream",
                headers=_headers(served),
            )
        gens = await _collect_unless_disconnected(request, reqs, s)
        if gens is None:
            return Response(status_code=499)  # nobody reads it: the client is gone and its requests are cancelled
        choices = []
        for i, g in enumerate(gens):
            logprobs = None
            if body.logprobs:
                logprobs = {"content": [_chat_logprob_entry(s, e) for e in g.logprobs], "refusal": None}
            message = {"role": "assistant", "content": g.text, "refusal": None}
            finish = g.finish_reason
            if tools is not None and tools.tools:
                content, calls = parse_tool_calls(g.text, tools)
                message["content"] = content
                if calls:
                    message["tool_calls"] = [c.openai() for c in calls]
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
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

    async def _chat_stream(self, body, reqs, rid, created, served, tools: ToolChoice | None = None):
        s = self.service
        parsers = [ToolStreamParser(tools) if tools is not None and tools.tools else None for _ in reqs]

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
            text, p, new = out.text, parsers[i], []
            if p is not None:  # tool calls leave the content stream and go out whole, as OpenAI deltas
                seen = len(p.calls)
                text = p.feed(text) + (p.finish() if out.finished else "")
                new = list(enumerate(p.calls[seen:], seen))
            if text or logprobs is not None:
                yield chunk([{"index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}])
            for k, c in new:
                head = {"index": k, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
                yield chunk([{"index": i, "delta": {"tool_calls": [head]}, "logprobs": None, "finish_reason": None}])
                args = {"index": k, "function": {"arguments": c.arguments}}
                yield chunk([{"index": i, "delta": {"tool_calls": [args]}, "logprobs": None, "finish_reason": None}])
            if out.finished:
                if out.error:
                    yield f"data: {json.dumps({'error': {'message': out.error, 'type': 'server_error'}})}\n\n"
                    return
                completion += out.completion_tokens
                finish = out.finish_reason
                if p is not None and p.calls and finish == "stop":
                    finish = "tool_calls"
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], _usage(prompt_tokens, completion))
        yield "data: [DONE]\n\n"

    async def rewards(self, request: HttpRequest):
        s = self.service
        body: RewardRequest = await parse_body(request, RewardRequest)
        adapter = s.resolve(body.model, request.headers.get("x-loraplex-session"))
        ids = await asyncio.to_thread(s.conversation_ids, _message_dicts(body.messages))
        score = await s.score(adapter, ids, _loop())
        served = _served_by(adapter, s)
        return JSONResponse({"object": "reward", "model": body.model, "system_fingerprint": served, "score": score,
                             "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids)}}, headers=_headers(served))

    async def completions(self, request: HttpRequest):
        s = self.service
        body: CompletionRequest = await parse_body(request, CompletionRequest)
        if body.suffix:
            raise BadRequest("'suffix' is not supported", param="suffix")
        best_of = body.candidates()
        adapter = s.resolve(body.model, _sticky_key(body, request))
        prompts, prompt_texts = await asyncio.to_thread(_prompt_list, body.prompt, s)
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        extra = _answer_params(s, body)
        constraint = await asyncio.to_thread(compile_answer, s.grammars, body)
        # best_of candidates per prompt, each with its tokens' logprobs (to rank them), of which n are answered
        gp = body if best_of == body.n else body.model_copy(update={"n": best_of, "logprobs": body.logprobs or 0})
        reqs = s.submit_choices(prompts, gp, max_tokens, adapter, loop=_loop(), prompt_logprobs=echo_lp,
                                constraint=constraint, **extra)
        served = _served_by(adapter, s)
        rid = "cmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            return StreamingResponse(self._completion_stream(body, reqs, prompts, prompt_texts, rid, created, served), media_type="text/event-stream", headers=_headers(served))
        gens = await _collect_unless_disconnected(request, reqs, s)
        if gens is None:
            return Response(status_code=499)
        completion = sum(g.completion_tokens for g in gens)  # every candidate's tokens were generated
        if best_of != body.n:
            gens = [g for k in range(len(prompts))
                    for g in best_candidates(gens[k * best_of:(k + 1) * best_of], body.n)]
        choices = []
        for i, g in enumerate(gens):
            pi = i // body.n
            text = (prompt_texts[pi] if body.echo else "") + g.text
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(prompts[pi] if body.echo else None, g.prompt_logprobs, g.logprobs)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": g.finish_reason})
        prompt_tokens = sum(len(p) for p in prompts)
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
            # OpenAI's "up to logprobs + 1": the sampled token is listed even when it is not among the top k
            tops.append(None if e is None else {**{s.token_text(t): lp for t, lp in e.top}, txt: e.logprob})
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


def _prompt_list(prompt, service: GenerationService) -> tuple[list[list[int]], list[str]]:
    """(token ids, text) of every prompt; tokenizes and decodes, so it runs off the event loop."""
    ids = _prompt_ids(prompt, service)
    return ids, [service.tokenizer.decode(p) for p in ids]


def _prompt_ids(prompt, service: GenerationService) -> list[list[int]]:
    if isinstance(prompt, str):
        return [service.text_prompt_ids(prompt)]
    if not prompt:
        raise BadRequest("'prompt' is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [service.check_token_ids(list(prompt), "prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [service.text_prompt_ids(p, f"prompt.{i}") for i, p in enumerate(prompt)]
    if all(isinstance(p, list) for p in prompt):
        return [service.check_token_ids(list(p), f"prompt.{i}") for i, p in enumerate(prompt)]
    raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists", param="prompt")


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client hangs up (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect_unless_disconnected(request: HttpRequest, reqs,
                                      service: GenerationService) -> list[Generation] | None:
    """Every request's whole result, or None once the client has gone (its requests are cancelled then)."""
    gens = [Generation() for _ in reqs]

    async def collect():
        async for i, out in gather_streams(reqs, service):
            merge(gens[i], out)
        return gens

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # gather_streams cancels the engine requests on its way out
            for r in reqs:
                r.cancel()
    return work.result() if work.done() and not work.cancelled() else None


def _loop():
    return asyncio.get_running_loop()
