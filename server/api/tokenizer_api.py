"""vLLM's tokenizer endpoints, so evaluation harnesses (lm-evaluation-harness probes them) need no local tokenizer.

`POST /tokenize` takes `prompt` (text, tokenized as /v1/completions does) or
`messages` (rendered by the chat template as /v1/chat/completions does) and
answers `{"count", "max_model_len", "tokens"}` (plus `token_strs` when
`return_token_strs`); `POST /detokenize` turns `tokens` back into `prompt`;
`GET /tokenizer_info` describes the tokenizer. The tokenizer is the base
model's, which every adapter shares.
"""
from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from .errors import BadRequest
from .generation_params import MAX_MESSAGES, MAX_NAME_CHARS
from .tools import template_messages


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeRequest(_Body):
    model: str | None = Field(None, max_length=MAX_NAME_CHARS)
    prompt: str | None = None
    messages: list[dict] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = Field(None, max_length=MAX_NAME_CHARS)
    tokens: list[int]


class TokenizerRoutes:
    def __init__(self, service):
        self.service = service

    def _check_model(self, model: str | None) -> None:
        if model is not None:
            self.service.resolve(model)  # 404 for a model that does not exist, as the other endpoints answer

    async def tokenize(self, request: HttpRequest) -> JSONResponse:
        from .openai_api import parse_body

        s = self.service
        body: TokenizeRequest = await parse_body(request, TokenizeRequest)
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.prompt is not None:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await asyncio.to_thread(s.tokenizer.encode, body.prompt, add_special_tokens=special)
        else:
            msgs = template_messages(body.messages)
            ids = await asyncio.to_thread(s.chat_prompt_ids, msgs) if body.add_generation_prompt else \
                await asyncio.to_thread(s.conversation_ids, msgs)
        out = {"count": len(ids), "max_model_len": s.engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = s.tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(out)

    async def detokenize(self, request: HttpRequest) -> JSONResponse:
        from .openai_api import parse_body

        s = self.service
        body: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
        self._check_model(body.model)
        s.check_token_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": s.tokenizer.decode(body.tokens)})

    async def tokenizer_info(self, request: HttpRequest) -> JSONResponse:
        t = self.service.tokenizer
        return JSONResponse({
            "tokenizer_class": type(t).__name__, "vocab_size": len(t),
            "model_max_length": self.service.engine.max_model_len,
            "bos_token": t.bos_token, "eos_token": t.eos_token, "pad_token": t.pad_token, "unk_token": t.unk_token,
            "chat_template": t.chat_template,
            "added_tokens": {str(i): tok.content for i, tok in t.added_tokens_decoder.items()},
        })
