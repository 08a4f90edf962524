"""Per-adapter-version telemetry: Prometheus metrics, OpenTelemetry spans, and a rolling window per version.

The engine calls `request_started` / `request_finished` / `adapter_event`;
`/metrics` renders the Prometheus registry; `/v1/routes/{name}/compare` and
route guards read the rolling window (`VersionWindow`), which keeps the last
N outcomes of every version in memory.

Spans: one per request (adapter, version, prompt/completion tokens, queue
time, time to first token), one per adapter load / eviction, and the trainer
can open its own through the same tracer. The exporter is chosen by
`LORAPLEX_OTEL_EXPORTER` = none (default) | console | otlp; with otlp the
standard `OTEL_EXPORTER_OTLP_ENDPOINT` applies, and nothing breaks when no
collector is listening (export happens in a background batch processor).
"""
from __future__ import annotations

import os
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def make_tracer(exporter: str | None = None):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    exporter = (exporter or os.environ.get("LORAPLEX_OTEL_EXPORTER") or "none").lower()
    provider = TracerProvider(resource=Resource.create({"service.name": "loraplex"}))
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as e:  # optional dependency
            raise RuntimeError("LORAPLEX_OTEL_EXPORTER=otlp needs `pip install opentelemetry-exporter-otlp-proto-http`") from e
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter != "none":
        raise ValueError(f"LORAPLEX_OTEL_EXPORTER={exporter!r}: use none, console or otlp")
    return provider, provider.get_tracer("loraplex")


@dataclass
class Outcome:
    at: float
    ok: bool
    latency: float
    ttft: float | None
    completion_tokens: int


class VersionWindow:
    """The last `size` outcomes of every served version, for canary comparison and guards."""

    def __init__(self, size: int = 2000):
        self.size = size
        self._d: dict[str, deque[Outcome]] = defaultdict(lambda: deque(maxlen=size))
        self._lock = threading.Lock()

    def add(self, ref: str, o: Outcome) -> None:
        with self._lock:
            self._d[ref].append(o)

    def outcomes(self, ref: str, since: float | None = None, last: int | None = None) -> list[Outcome]:
        with self._lock:
            xs = list(self._d.get(ref, ()))
        if since is not None:
            xs = [o for o in xs if o.at >= since]
        if last is not None:
            xs = xs[-last:]
        return xs

    @staticmethod
    def summary(xs: list[Outcome]) -> dict:
        def pct(vals, q):
            if not vals:
                return None
            vals = sorted(vals)
            return vals[min(len(vals) - 1, int(q * len(vals)))]

        lat = [o.latency for o in xs if o.ok]
        n = len(xs)
        errors = sum(1 for o in xs if not o.ok)
        return {
            "requests": n,
            "errors": errors,
            "error_rate": (errors / n) if n else None,
            "p50_latency_s": pct(lat, 0.5),
            "p95_latency_s": pct(lat, 0.95),
            "p50_ttft_s": pct([o.ttft for o in xs if o.ttft is not None], 0.5),
            "mean_output_tokens": (sum(o.completion_tokens for o in xs if o.ok) / len(lat)) if lat else None,
        }


class Telemetry:
    def __init__(self, base_id: str, exporter: str | None = None):
        self.base_id = base_id
        self.registry = CollectorRegistry()
        r = self.registry
        lbl = ["adapter", "version"]
        self.requests = Counter("loraplex_requests", "Finished requests", lbl + ["finish_reason"], registry=r)
        self.errors = Counter("loraplex_request_errors", "Requests that failed or were aborted by the server", lbl, registry=r)
        self.tokens_in = Counter("loraplex_prompt_tokens", "Prompt tokens", lbl, registry=r)
        self.tokens_out = Counter("loraplex_completion_tokens", "Completion tokens", lbl, registry=r)
        self.latency = Histogram("loraplex_request_latency_seconds", "Arrival to last token", lbl, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Arrival to first token", lbl, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loraplex_queue_time_seconds", "Arrival to admission into the batch", lbl, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting for the batch", registry=r)
        self.running = Gauge("loraplex_running_requests", "Requests in the running batch", registry=r)
        self.batch_size = Gauge("loraplex_batch_size", "Sequences in the last engine step", registry=r)
        self.resident = Gauge("loraplex_resident_adapters", "Adapter versions resident per tier", ["tier"], registry=r)
        self.load_time = Histogram("loraplex_adapter_load_seconds", "Adapter load time (disk to CPU tier)", lbl, buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("loraplex_rejected_requests", "Requests refused with a client error (4xx), by reason",
                                ["protocol", "status", "reason"], registry=r)
        self.evictions = Counter("loraplex_adapter_evictions", "Adapter versions evicted from a slot", lbl, registry=r)
        # The names vLLM exports, which the Kubernetes Gateway API Inference Extension (llm-d's endpoint picker)
        # and AIBrix read to route LoRA traffic with adapter affinity: a loraplex pod is routable as a vLLM pod.
        # lora_requests_info carries the adapters in its labels; its value is the time of the sample, as vLLM's.
        self.vllm_lora_info = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests (vLLM's names)",
                                    ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the running batch (vLLM's name)",
                                  ["model_name"], registry=r)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled (vLLM's name)",
                                  ["model_name"], registry=r)
        self.vllm_kv = Gauge("vllm:gpu_cache_usage_perc", "KV-cache usage, 1 = full (vLLM's older name)",
                             ["model_name"], registry=r)
        self.vllm_kv_new = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full (vLLM's name)",
                                 ["model_name"], registry=r)
        self.prefix_queries = Counter("loraplex_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache",
                                      lbl, registry=r)
        self.prefix_hits = Counter("loraplex_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", lbl,
                                   registry=r)
        self.prefix_hit_rate = Gauge("loraplex_prefix_cache_hit_rate", "Cached share of prompt tokens since start", lbl,
                                     registry=r)
        self._prefix_totals: dict[tuple[str, str], list[int]] = {}
        self.window = VersionWindow()
        self.provider, self.tracer = make_tracer(exporter)
        self.listeners: list = []  # callables(ref, outcome): route guards
        self.engine = None
        self.store = None

    @staticmethod
    def _labels(ref: str | None, base_id: str) -> tuple[str, str]:
        if ref is None:
            return base_id, "base"
        name, _, ver = ref.partition("@")
        return name, ver

    def request_started(self, req) -> None:
        pass  # spans are recorded at the end with explicit start times (no context crosses threads)

    def request_finished(self, req, reason: str, completion_tokens: int, prompt_tokens: int) -> None:
        ref = req.adapter_ref
        a, v = self._labels(ref, self.base_id)
        now = time.monotonic()
        latency = now - req.arrival
        ttft = None if req.first_token_at is None else req.first_token_at - req.arrival
        queue = None if req.admitted_at is None else req.admitted_at - req.arrival
        ok = reason in ("stop", "length")
        self.requests.labels(a, v, reason).inc()
        if reason == "error":
            self.errors.labels(a, v).inc()
        self.tokens_in.labels(a, v).inc(prompt_tokens)
        self.tokens_out.labels(a, v).inc(completion_tokens)
        if ok:
            self.latency.labels(a, v).observe(latency)
        if ttft is not None:
            self.ttft.labels(a, v).observe(ttft)
        if queue is not None:
            self.queue_time.labels(a, v).observe(queue)
        if reason != "abort":  # a client hanging up is not the version's fault
            o = Outcome(time.time(), reason != "error", latency, ttft, completion_tokens)
            self.window.add(ref or self.base_id, o)
            for fn in list(self.listeners):
                try:
                    fn(ref, o)
                except Exception:
                    pass
        end_ns = time.time_ns()
        start_ns = end_ns - int(latency * 1e9)
        span = self.tracer.start_span("loraplex.request", start_time=start_ns)
        span.set_attribute("loraplex.request_id", req.request_id)
        span.set_attribute("loraplex.adapter", a)
        span.set_attribute("loraplex.adapter_version", v)
        span.set_attribute("loraplex.prompt_tokens", prompt_tokens)
        span.set_attribute("loraplex.completion_tokens", completion_tokens)
        span.set_attribute("loraplex.finish_reason", reason)
        if queue is not None:
            span.set_attribute("loraplex.queue_time_s", queue)
        if ttft is not None:
            span.set_attribute("loraplex.time_to_first_token_s", ttft)
        span.end(end_time=end_ns)

    def request_rejected(self, protocol: str, status: int | str, reason: str) -> None:
        """A request refused before or instead of being served (HTTP 4xx, a gRPC client-error code)."""
        self.rejected.labels(protocol, str(status), reason).inc()

    def prefix_lookup(self, ref: str | None, prompt_tokens: int, cached_tokens: int) -> None:
        """Engine thread, at a request's admission: how much of its prompt the prefix cache held."""
        a, v = self._labels(ref, self.base_id)
        self.prefix_queries.labels(a, v).inc(prompt_tokens)
        self.prefix_hits.labels(a, v).inc(cached_tokens)
        tot = self._prefix_totals.setdefault((a, v), [0, 0])
        tot[0] += prompt_tokens
        tot[1] += cached_tokens
        self.prefix_hit_rate.labels(a, v).set(tot[1] / tot[0] if tot[0] else 0.0)

    def adapter_event(self, kind: str, ref: str, **kw) -> None:
        a, v = self._labels(ref, self.base_id)
        if kind == "load":
            self.load_time.labels(a, v).observe(kw.get("seconds", 0.0))
        elif kind == "evict":
            self.evictions.labels(a, v).inc()
        span = self.tracer.start_span(f"loraplex.adapter.{kind}")
        span.set_attribute("loraplex.adapter", a)
        span.set_attribute("loraplex.adapter_version", v)
        if "seconds" in kw:
            span.set_attribute("loraplex.seconds", kw["seconds"])
        span.end()

    def render(self) -> bytes:
        eng = self.engine
        if eng is not None:
            st = eng.state()
            self.queue_depth.set(st["waiting"])
            self.running.set(st["running"])
            self.batch_size.set(st["last_batch_size"])
            self.resident.labels("gpu_slot" if str(eng.runner.device).startswith("cuda") else "slot").set(st["slots_used"])
            self.resident.labels("cpu").set(st["cpu_resident"])
            self._vllm_metrics(st)
        if self.store is not None:
            self.resident.labels("disk").set(len(self.store.list()))
        return generate_latest(self.registry)

    @staticmethod
    def _adapter_names(refs) -> str:
        """Adapter names (a gateway routes by the model name clients send: the bare name; the version is ours to
        pick), sorted, comma-separated as vLLM writes them; the base model is not an adapter."""
        return ",".join(sorted({ref.partition("@")[0] for ref in refs if ref is not None}))

    def _vllm_metrics(self, st: dict) -> None:
        self.vllm_lora_info.clear()  # one sample: the current sets (a router reads the latest one)
        self.vllm_lora_info.labels(self._adapter_names(st["running_adapters"]), self._adapter_names(st["waiting_adapters"]),
                                   str(st["max_loras"])).set(time.time())
        self.vllm_running.labels(self.base_id).set(st["running"])
        self.vllm_waiting.labels(self.base_id).set(st["waiting"])
        usage = st["kv_used_tokens"] / st["kv_budget_tokens"] if st["kv_budget_tokens"] else 0.0
        self.vllm_kv.labels(self.base_id).set(usage)
        self.vllm_kv_new.labels(self.base_id).set(usage)

    def shutdown(self) -> None:
        self.provider.shutdown()
