"""The console's own JSON endpoints, beside the public API the page otherwise uses.

- `GET /v1/console/metrics?window=S&step=S[&name=N]`: per adapter version, where it is resident and its request
  rate, error rate, median latency and median time to first token in `step`-second buckets over the last
  `window` seconds, from the telemetry's rolling window (the same outcomes that feed `/metrics`, route compare
  and guards). Computed on a worker thread: a few thousand outcomes per version, never on the event loop.
- `POST /v1/console/datasets/preview` (multipart `file`, optional `method`, `sequence_len`): `preview.py`.
- `POST /v1/console/plan {"method": {...}, "examples": N}`: the planned optimizer steps of a job body's `method`
  (the same object the page then sends to `POST /v1/fine_tuning/jobs`) over N examples, with every "auto"
  resolved: the trainer's own resolver (`trainer.hyperparams.resolve`) and `trainer.jobs.training_plan`, the
  calls job creation makes, so the number on the form is the number on the job.
- `POST /v1/console/jobs/{id}/canary {"percent": 10, "name": "support-bot"}`: gives the version a finished job
  registered `percent` of a name's traffic, scaling the current split into the rest (the trainer's
  `canary_weights`, the rule a job's own `canary:` follows) and keeping the route's sticky setting and guard;
  applied like `PUT /v1/routes/{name}` (version warmed first, guard armed). A job registers its own `ft-...`
  name; `name` ships that version into an existing adapter first, as its next version (the same files, validated
  again, lineage kept plus `copied_from`), once: a second click reuses the copy.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import auth
from ..caller import caller_of
from ..errors import ApiError, BadRequest, Conflict, Unavailable
from ..openai_api import parse_body
from .preview import PreviewError, check, private_tokenizer, read_rows

log = logging.getLogger("loraplex.console")

MAX_BUCKETS = 720


class CanaryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    percent: int = Field(10, ge=1, le=99)
    name: str | None = Field(None, min_length=1)  # the adapter whose traffic to split; default: the job's own


class PlanBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: dict  # a job body's `method`, as the page will send it; checked by `planned`
    examples: int = Field(ge=1)  # the valid records of the previewed file: what the uploaded JSONL will hold


def planned(method: dict, examples: int) -> dict:
    """The plan job creation makes of `method`'s hyperparameters over `examples` records: the fine-tuning API's
    own models check them (400 naming the field), the trainer's resolver fills in "auto", `training_plan` counts
    the steps. Only `method.type` and its hyperparameters matter here: a grader is checked when the job is
    created."""
    from types import SimpleNamespace

    from pydantic import ValidationError

    from loraplex.trainer.hyperparams import resolve
    from loraplex.trainer.job_request import METHODS, DpoHyperparameters, Hyperparameters
    from loraplex.trainer.jobs import plan_text, training_plan

    mtype = method.get("type")
    if mtype not in METHODS:
        raise BadRequest(f"'method.type' must be one of {', '.join(METHODS)}", param="method.type")
    block = method.get(mtype) or {}
    raw = block.get("hyperparameters", {}) if isinstance(block, dict) else None
    where = f"method.{mtype}.hyperparameters"
    try:
        hp = (DpoHyperparameters if mtype == "dpo" else Hyperparameters).model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join([where, *(str(p) for p in first["loc"] if not str(p).startswith(("int", "float", "literal")))])
        msgs = {m["msg"] for m in e.errors() if m["msg"] != "Input should be 'auto'"}
        raise BadRequest(f"invalid field '{loc}': {'; '.join(sorted(msgs)) or first['msg']} (or 'auto')",
                         param=loc) from None
    resolved = resolve(hp.model_dump(exclude_unset=True), examples, method=mtype)
    # the console sets no `loraplex.max_steps` or `loraplex.learning_rate`: the plan of a job body without them
    plan = training_plan(SimpleNamespace(max_steps=None, learning_rate=resolved["learning_rate"]), resolved)
    return {"object": "console.plan", "method": {"type": mtype}, "hyperparameters": resolved,
            "training_plan": plan, "text": plan_text(plan)}


def residency(pool, ref: str) -> str:
    """Where a version's weights are now, as the page shows it: "slot N", "cpu" (loaded) or "disk"."""
    tier, slot = pool.residency(ref)
    return f"slot {slot}" if tier == "slot" else tier


def version_series(window, refs: list[str], *, now: float, span: float, step: float) -> tuple[list[float], dict]:
    """Bucket start times and, per ref, totals over the span plus rps / error rate / p50 latency / p50 TTFT per bucket.

    Percentiles and rates use `VersionWindow.summary`, the rule route compare and guards use."""
    n = max(1, min(MAX_BUCKETS, math.ceil(span / step)))
    t0 = now - n * step
    times = [t0 + i * step for i in range(n)]
    out = {}
    for ref in refs:
        xs = window.outcomes(ref, since=t0)
        buckets: list[list] = [[] for _ in range(n)]
        for o in xs:
            buckets[min(n - 1, max(0, int((o.at - t0) // step)))].append(o)
        sums = [window.summary(b) for b in buckets]
        out[ref] = {
            **window.summary(xs),
            "series": {
                "requests_per_s": [s["requests"] / step for s in sums],
                "error_rate": [s["error_rate"] for s in sums],
                "p50_latency_s": [s["p50_latency_s"] for s in sums],
                "p50_ttft_s": [s["p50_ttft_s"] for s in sums],
            },
        }
    return times, out


class ConsoleApi:
    def __init__(self, state):
        self.state = state

    def _need(self, attr: str):
        obj = getattr(self.state, attr)
        if obj is None or self.state.draining:
            raise Unavailable(self.state.error or "the model is still loading")
        return obj

    def routes(self) -> list[Route]:
        def answer(fn):
            async def endpoint(request: HttpRequest):
                try:
                    return await fn(request)
                except ApiError as e:
                    return JSONResponse(e.body(), status_code=e.http_status)
                except Exception:
                    log.exception("internal error on %s %s", request.method, request.url.path)
                    return JSONResponse({"error": {"message": "internal server error", "type": "server_error",
                                                   "param": None, "code": None}}, status_code=500)

            return endpoint

        return [
            Route("/v1/console/metrics", answer(self.metrics), methods=["GET"]),
            Route("/v1/console/datasets/preview", answer(self.preview), methods=["POST"]),
            Route("/v1/console/plan", answer(self.plan), methods=["POST"]),
            Route("/v1/console/jobs/{job_id}/canary", answer(self.canary), methods=["POST"]),
        ]

    # --- metrics ------------------------------------------------------------------
    async def metrics(self, request: HttpRequest):
        q = request.query_params
        window, step = _positive(q, "window", 300.0), _positive(q, "step", 10.0)
        if window / step > MAX_BUCKETS:
            raise BadRequest(f"window / step may be at most {MAX_BUCKETS} buckets", param="step")
        body = await asyncio.to_thread(self._metrics, window, step, q.get("name"))
        return JSONResponse(body)

    def _metrics(self, window: float, step: float, name: str | None) -> dict:
        store, engine, tel = self._need("store"), self._need("engine"), self._need("telemetry")
        # the caller's tenant's adapters only (auth: another tenant's name is a 404 like an absent one)
        versions = store.versions(auth.own(name)) if name else [v for v in store.list() if auth.manages(v.name)]
        refs = [v.ref for v in versions]
        base_id = tel.base_id
        if not name:
            refs.append(base_id)
        times, data = version_series(tel.window, refs, now=time.time(), span=window, step=step)
        rows = []
        for v in versions:
            rows.append({"id": v.ref, "name": v.name, "version": v.version, "residency": residency(engine.pool, v.ref),
                         "in_flight": engine.pool.pinned(v.ref), **data[v.ref]})
        if not name:
            rows.append({"id": base_id, "name": base_id, "version": None, "residency": "base", "in_flight": None,
                         **data[base_id]})
        st = engine.state()
        return {"object": "console.metrics", "window_s": window, "step_s": step, "times": times, "versions": rows,
                "engine": {k: st[k] for k in ("running", "waiting", "slots_total", "slots_used", "cpu_resident",
                                              "kv_used_tokens", "kv_budget_tokens")}}

    # --- dataset preview ----------------------------------------------------------
    async def preview(self, request: HttpRequest):
        from loraplex.trainer.config import JobConfig
        from loraplex.trainer.job_request import METHODS

        form = await request.form()
        f = form.get("file")
        if not isinstance(f, UploadFile):
            raise BadRequest("multipart field 'file' is required", param="file")
        method = form.get("method") or None
        method = METHODS.get(method, method)  # the API's method.type (supervised, ...) or the trainer's name (sft, ...)
        seq = form.get("sequence_len") or str(JobConfig.model_fields["sequence_len"].default)
        if not str(seq).isdigit() or int(seq) < 8:
            raise BadRequest("'sequence_len' must be an integer of at least 8", param="sequence_len")
        data = await f.read()  # bounded by the server's upload limit (app.BodyLimit, --max-upload-bytes), as /v1/files
        base = self._need("extra").get("base")
        if base is None:
            raise Unavailable("the model is still loading")
        name = f.filename or "upload.jsonl"

        def run():
            rows = read_rows(name, data)
            body = check(rows, method, private_tokenizer(base.path), int(seq))
            if body["errors_total"] == 0 and rows.file_type != "jsonl":
                # /v1/files takes JSONL only: the page uploads these records, one JSON object a line, instead
                body["jsonl"] = "".join(json.dumps(_json_safe(r.record), ensure_ascii=False) + "\n" for r in rows.rows)
            return body

        try:
            body = await asyncio.to_thread(run)
        except PreviewError as e:
            raise BadRequest(str(e), param="file" if method is None or "method" not in str(e) else "method") from e
        # the API's method.type that runs this method; None for a method the fine-tuning API does not offer (reward)
        body["method_type"] = {v: k for k, v in METHODS.items()}.get(body["method"])
        return JSONResponse(_json_safe(body))

    # --- planned steps ------------------------------------------------------------
    async def plan(self, request: HttpRequest):
        body = await parse_body(request, PlanBody)
        return JSONResponse(planned(body.method, body.examples))

    # --- one-click canary ---------------------------------------------------------
    async def canary(self, request: HttpRequest):
        raw = await request.body()
        body = await parse_body(request, CanaryBody) if raw.strip() else CanaryBody()
        caller = caller_of(request)  # who changes the route, as every route change records it
        jid = request.path_params["job_id"]
        await asyncio.to_thread(auth.check_owner, "job", jid, f"no fine-tuning job {jid!r}", "fine_tuning_job_id")
        target = auth.own(body.name) if body.name else None  # a tenant ships into its own adapters only
        return JSONResponse(await asyncio.to_thread(self._canary, jid, body.percent, target, caller))

    def _canary(self, jid: str, percent: int, target: str | None, caller: str) -> dict:
        from loraplex.trainer.register import canary_weights

        from ..routes_api import route_json

        jobs, store, routes = self._need("jobs"), self._need("store"), self._need("routes")
        job = jobs.job(jid)  # JobError (404 for an unknown job) is one of the API's errors
        if job["status"] != "succeeded":
            raise Conflict(f"job {jid} is {job['status']}: only a succeeded job's version can take traffic")
        result = jobs.runs_dir / jid / "result.json"  # the job process's record of what it registered
        if not result.exists():
            raise Conflict(f"job {jid} left no record of the version it registered")
        r = json.loads(result.read_text())
        name, version = r["adapter"], int(r["version"])
        if target and target != name:
            name, version = target, self._ship(store.get(name, version), target, caller)
        current = store.get_route(name)
        has = current.versions.get(version, 0) if current else 0
        if has == percent:  # clicked again: the split is already what was asked
            return {"name": name, "version": version, "route": route_json(current)}
        if has:
            raise Conflict(f"{name}@{version} already takes {has}% of {name!r}'s traffic; change the split on its "
                           f"route (PUT /v1/routes/{name})")
        weights = canary_weights(store, name, version, percent)
        if weights is None:
            raise Conflict(f"{name}@{version} is the only version of {name!r}: it already takes all its traffic")
        route = routes.apply_set(name, weights, current.sticky if current else None,
                                 current.guard if current else None, caller)
        return {"name": name, "version": version, "route": route_json(route)}

    def _ship(self, src, target: str, caller: str) -> int:
        """`src`'s files as the next version of `target` (validated and warmed like any registration) -> its number;
        the version an earlier call made when there is one."""
        store, manager = self._need("store"), self._need("manager")
        for v in store.versions(target):  # AdapterNotFound (404) for a name that does not exist: never creates one
            if v.lineage.get("copied_from") == src.ref:
                return v.version
        return manager.register(target, str(src.path), {**src.lineage, "copied_from": src.ref}, caller).version


def _positive(q, key: str, default: float) -> float:
    raw = q.get(key)
    if raw is None:
        return default
    try:
        v = float(raw)
        if not math.isfinite(v) or v <= 0:
            raise ValueError
    except ValueError:
        raise BadRequest(f"query parameter '{key}' must be a positive number of seconds", param=key) from None
    return v


def _json_safe(obj):
    """Records from Parquet or JSON may hold NaN or non-JSON types (bytes, dates); show them, do not fail on them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)
