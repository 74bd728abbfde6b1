"""Prometheus metrics for GET /metrics, named after vLLM's set so existing Grafana boards map over.

Every series has a `model` label: with several models served, each has its own series (under the
model's id, its first served name). Per request (recorded by the routes through ``RequestTimer``):
requests by model, endpoint and status; end-to-end latency, time to first token, time per output
token and queue time histograms; prompt, generated and cached-prompt token counters. Per engine (read
at scrape time from the engine's own counters, so nothing is double-kept): running and waiting requests, KV blocks used
and free, KV usage, preemptions. Plus constraint compile time.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .logs import request_info

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
_TPOT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)


class _EngineCollector:
    """Gauges and counters the engines keep themselves, read when /metrics is scraped."""

    def __init__(self, engines: dict):
        self.engines = engines

    def collect(self):
        running = GaugeMetricFamily(
            "chatserve_num_requests_running", "Requests decoding or prefilling.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "chatserve_num_requests_waiting", "Requests queued for a free row or KV blocks.", labels=["model"]
        )
        used = GaugeMetricFamily("chatserve_kv_cache_blocks_used", "KV pool blocks held by requests.", labels=["model"])
        free = GaugeMetricFamily(
            "chatserve_kv_cache_blocks_free",
            "KV pool blocks free (some still hold reusable prefixes).",
            labels=["model"],
        )
        usage = GaugeMetricFamily(
            "chatserve_kv_cache_usage_perc", "Share of the KV pool held by requests (0-1).", labels=["model"]
        )
        preempt = CounterMetricFamily(
            "chatserve_num_preemptions", "Requests preempted because the KV pool was full.", labels=["model"]
        )
        for name, engine in self.engines.items():
            stats = engine.stats
            running.add_metric([name], engine.num_running)
            waiting.add_metric([name], engine.num_waiting)
            if "kv_blocks_total" in stats:
                total = stats["kv_blocks_total"]
                used.add_metric([name], stats.get("kv_blocks_used", 0))
                free.add_metric([name], stats.get("kv_blocks_free", total))
                usage.add_metric([name], stats.get("kv_blocks_used", 0) / total if total else 0.0)
            preempt.add_metric([name], stats.get("preemptions", 0))
        yield from (running, waiting, used, free, usage, preempt)


class Metrics:
    def __init__(self, engines: dict):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "chatserve_requests",
            "HTTP requests by model, endpoint and status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.e2e = Histogram(
            "chatserve_e2e_request_latency_seconds",
            "Request arrival to its last byte.",
            ["model", "endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "chatserve_time_to_first_token_seconds",
            "Request arrival to its first token.",
            ["model"],
            buckets=_TTFT,
            registry=r,
        )
        self.tpot = Histogram(
            "chatserve_time_per_output_token_seconds",
            "Mean time between a request's tokens.",
            ["model"],
            buckets=_TPOT,
            registry=r,
        )
        self.queue = Histogram(
            "chatserve_request_queue_time_seconds",
            "Time a request waited before its prefill began.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "chatserve_prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "chatserve_prompt_tokens_cached", "Prompt tokens served from the prefix cache.", ["model"], registry=r
        )
        self.generation_tokens = Counter("chatserve_generation_tokens", "Generated tokens.", ["model"], registry=r)
        self.compile = Histogram(
            "chatserve_constraint_compile_seconds",
            "json_schema / tools constraint compiles (cached ones included).",
            ["model"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        r.register(_EngineCollector(engines))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, model: str) -> RequestTimer:
        return RequestTimer(self, model)


class RequestTimer:
    """One generation's timings from its arrival; ``finish(last_event)`` records them once.

    Requests by status and end-to-end latency are recorded for every request by ``MetricsMiddleware``.
    """

    def __init__(self, metrics: Metrics, model: str):
        self.m, self.model = metrics, model
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.recorded = False

    def first(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def finish(self, event) -> None:
        if self.recorded or event is None:
            return
        self.recorded = True
        m, model, now = self.m, self.model, time.perf_counter()
        if self.first_token is not None and event.completion_tokens:
            m.ttft.labels(model).observe(self.first_token - self.arrival)
            if event.completion_tokens > 1:
                m.tpot.labels(model).observe((now - self.first_token) / (event.completion_tokens - 1))
        if getattr(event, "queue_time", None) is not None:
            m.queue.labels(model).observe(event.queue_time)
        m.prompt_tokens.labels(model).inc(event.prompt_tokens)
        m.cached_tokens.labels(model).inc(event.cached_tokens)
        m.generation_tokens.labels(model).inc(event.completion_tokens)


class MetricsMiddleware:
    """Pure ASGI (so client disconnects still reach the routes): counts every /v1 request by
    model, endpoint and status and times it to its last byte, streams included.

    The model is the one the route picked (server/logs.py's ``note(request, model=...)``); a
    request refused before that (bad JSON, unknown model, /v1/models) counts under ``model``:
    the one model's name when there is one, "" when there are several."""

    def __init__(self, app, metrics: Metrics, model: str = ""):
        self.app, self.metrics, self.model = app, metrics, model

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"].split("/v1/", 1)[1].split("/")[0] or "v1"
        if scope["path"].startswith("/v1/chat/"):
            endpoint = "chat/completions"
        start = time.perf_counter()
        status = {"code": 500, "done": False}
        info = request_info(scope)

        def record():
            if not status["done"]:
                status["done"] = True
                m, model = self.metrics, info.get("model", self.model)
                m.requests.labels(model, endpoint, str(status["code"])).inc()
                m.e2e.labels(model, endpoint).observe(time.perf_counter() - start)

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, sending)
        finally:
            record()  # a client that left mid-stream is counted too
