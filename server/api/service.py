"""What both front ends (HTTP and gRPC) do with a generation request, in one place.

Resolve the model name to (adapter, version), turn messages or text into
prompt token ids, build the engine request, and read its outputs. Front ends
only translate their wire format to these calls and back.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from loraplex.adapters_store.refs import parse_ref

from . import auth
from ..engine import Engine
from .errors import BadRequest, InternalError, NotFound
from .generation_params import MAX_NAME_CHARS, MAX_STICKY_KEY_CHARS, GenerationParams
from ..engine.chat_format import render_conversation
from ..engine.loading import LoadedBase
from ..engine.structured import GrammarCompiler
from ..engine.request import OutputStream, Request, RequestOutput, SamplingParams, TokenLogprob


_CUT_SLACK = 16


@dataclass
class Generation:
    """The collected result of one request (one choice)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GenerationService:
    def __init__(self, engine: Engine, store, base: LoadedBase, telemetry=None):
        self.engine = engine
        self.store = store
        self.base = base
        self.tokenizer = base.tokenizer
        self.telemetry = telemetry
        self.ready = False
        self._heads: dict = {}
        self.vocab_size = base.model.config.vocab_size  # width of the logits; token ids below it are valid
        self.grammars = GrammarCompiler(self.tokenizer, engine.eos_ids, self.vocab_size)

    @property
    def model_id(self) -> str:
        return self.base.model_id

    # --- routing ------------------------------------------------------------------
    def resolve(self, model: str | None, sticky_key: str | None = None):
        """Model name -> AdapterVersion, or None for the base model. `name@N` pins version N."""
        if not model or not isinstance(model, str):
            raise BadRequest("'model' is required", param="model")
        if len(model) > MAX_NAME_CHARS:
            raise BadRequest(f"'model' is longer than {MAX_NAME_CHARS} characters", param="model")
        if sticky_key is not None and len(sticky_key) > MAX_STICKY_KEY_CHARS:
            raise BadRequest(f"the session / user key is longer than {MAX_STICKY_KEY_CHARS} characters", param="user")
        if model in (self.model_id, "default"):
            return None
        name, version = parse_ref(model, param="model")  # the one name@version parser: ASCII digits, 400 otherwise
        try:
            name = auth.resolve_model(name)  # the caller's tenant: its own adapter, else a shared one; 404 otherwise
            return self.store.resolve(name, version=version, sticky_key=sticky_key)
        except NotFound as e:
            raise NotFound(f"model {model!r} does not exist: it is neither the base model {self.model_id!r} nor a "
                           "registered adapter", param="model") from e

    # --- prompts ------------------------------------------------------------------
    # These tokenize: front ends call them off their event loop (asyncio.to_thread), so a long prompt never
    # holds up /health or another request's stream.
    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = render_conversation(self.tokenizer, messages, tools, add_generation_prompt=True)
        return self._encode(text, add_special_tokens=False, param="messages")

    def text_prompt_ids(self, text: str, param: str = "prompt") -> list[int]:
        return self._encode(text, add_special_tokens=True, param=param)

    def _encode(self, text: str, *, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of `text`, giving up as soon as a prefix of it is already longer than the context.

        Tokenizing costs time in the length of the text, and nothing longer than the context can be served, so
        prefixes of growing length (cut at whitespace, where pre-tokenizers split anyway) are tried first: a
        21 MB prompt is refused after tokenizing a few times the context's worth of characters, not 21 MB.
        """
        limit = self.engine.max_model_len
        try:
            text.encode("utf-8")  # tokenizers refuse lone surrogates with a TypeError: say what is wrong instead
            size = 4 * limit
            while size < len(text):
                cut = text.rfind(" ", size // 2, size)
                prefix = self.tokenizer.encode(text[: cut if cut > 0 else size], add_special_tokens=add_special_tokens)
                if len(prefix) > limit + _CUT_SLACK:  # a cut word may take a few tokens more than in the whole text
                    raise BadRequest(f"the prompt is longer than the model's context of {limit} tokens", param=param)
                size *= 4
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except UnicodeEncodeError as e:
            raise BadRequest("the prompt is not valid Unicode (it holds a lone surrogate)", param=param) from e

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        v = len(self.tokenizer)
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= max(v, self.base.model.config.vocab_size):
                raise BadRequest(f"token id {t!r} is outside the vocabulary (0..{v - 1})", param=param)
        return ids

    def default_max_tokens(self, prompt_len: int) -> int:
        return max(1, self.engine.max_model_len - prompt_len)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def conversation_ids(self, messages: list[dict]) -> list[int]:
        """A whole conversation (no generation prompt), tokenized as the trainer tokenizes it for reward models."""
        text = render_conversation(self.tokenizer, messages)
        return self._encode(text, add_special_tokens=False, param="messages")

    async def score(self, adapter, prompt_ids: list[int], loop) -> float:
        """Reward of a sequence under a reward adapter: its score head on the last token's final hidden state."""
        from loraplex.adapters_store import load_score_head

        if adapter is None or getattr(adapter.manifest, "kind", "lora") != "reward":
            raise BadRequest("'model' must name a reward adapter (trained with method: reward)", param="model")
        head = self._heads.get(adapter.ref)
        if head is None:
            head = self._heads[adapter.ref] = load_score_head(adapter.path)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, return_hidden=True)
        req = self.submit(prompt_ids, params, adapter, loop=loop)
        g_hidden = None
        async for out in self.stream(req):
            if out.hidden and g_hidden is None:
                g_hidden = out.hidden[0]
            if out.finished and out.error:
                raise InternalError(out.error)
        w, b = head["weight"].float(), head.get("bias")
        return float(g_hidden @ w[0] + (b.float()[0] if b is not None else 0.0))

    # --- running ------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter, *, loop=None,
               deadline_s: float | None = None, request_id: str | None = None) -> Request:
        return self._submit_all([self._request(prompt_ids, params, adapter, loop, deadline_s, request_id)])[0]

    def submit_choices(self, prompts: list[list[int]], gp: GenerationParams, max_tokens: int, adapter, *, loop=None,
                       deadline_s: float | None = None, request_id: str | None = None, constraint=None,
                       **extra) -> list[Request]:
        """The `gp.n` choices of every prompt (choice i seeded seed + i), queued all or none: a 429 holds no slot.

        `constraint` (structured.TokenConstraint): the answer's grammar; every choice gets its own state of it."""
        reqs = []
        for ids in prompts:
            for i in range(gp.n):
                one = gp.n * len(prompts) == 1
                rid = None if request_id is None else (request_id if one else f"{request_id}-{len(reqs)}")
                c = None if constraint is None else constraint.copy()
                params = gp.sampling(max_tokens, i, constraint=c, **extra)
                reqs.append(self._request(ids, params, adapter, loop, deadline_s, rid))
        return self._submit_all(reqs)

    @staticmethod
    def _request(prompt_ids, params, adapter, loop, deadline_s, request_id) -> Request:
        return Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            params=params,
            adapter=adapter,
            stream=OutputStream(loop),
            deadline=None if deadline_s is None else time.monotonic() + deadline_s,
        )

    def _submit_all(self, reqs: list[Request]) -> list[Request]:
        self.engine.submit_many(reqs)
        auth.charge_tokens(sum(len(r.prompt_ids) for r in reqs))  # against the calling tenant's tokens per minute
        if self.telemetry is not None:
            for req in reqs:
                self.telemetry.request_started(req)
        return reqs

    async def stream(self, req: Request):
        """Async iterator over a request's outputs; cancels the request if the consumer goes away."""
        try:
            while True:
                out: RequestOutput = await req.stream.aget()
                if out.finished:
                    auth.charge_tokens(out.completion_tokens)
                yield out
                if out.finished:
                    return
        finally:
            req.cancel()  # no-op when finished; frees the batch slot when the client left early

    async def collect(self, req: Request) -> Generation:
        g = Generation()
        async for out in self.stream(req):
            merge(g, out)
        return g


def merge(g: Generation, out: RequestOutput) -> None:
    g.text += out.text
    g.token_ids += out.token_ids
    g.logprobs += out.logprobs
    if out.prompt_logprobs is not None:
        g.prompt_logprobs = out.prompt_logprobs
    g.prompt_tokens = out.prompt_tokens or g.prompt_tokens
    g.completion_tokens = out.completion_tokens or g.completion_tokens
    if out.finished:
        g.finish_reason = out.finish_reason
        if out.error:
            raise InternalError(out.error)


async def gather_streams(reqs: list[Request], service: GenerationService):
    """Merges several requests' outputs into one async stream of (index, output)."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, r):
        try:
            async for out in service.stream(r):
                await q.put((i, out))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        left = len(reqs)
        while left:
            i, out = await q.get()
            if out is None:
                left -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for r in reqs:
            r.cancel()
