"""The GET routes beside generation: /health (liveness), /ready (readiness, false while draining),
/metrics (Prometheus, server/metrics.py) and /v1/models (the served models, server/routing.py)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from . import openapi
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .plumbing import ServerContext
from .protocol import Health, ModelCard, ModelHealth, ModelList
from .routing import ServedModel


def _model_health(m: ServedModel) -> ModelHealth:
    e = m.engine
    return ModelHealth(
        status="ok" if e.alive else "unavailable", running=e.num_running, waiting=e.num_waiting, stats=dict(e.stats)
    )


def add_ops_routes(app: FastAPI, ctx: ServerContext) -> None:
    """Add /health, /ready, /metrics, /v1/models and /v1/models/{model_id} to the app."""
    router, metrics = ctx.router, ctx.metrics

    @app.get(
        "/health",
        responses={
            **openapi.ok(Health, "Every model's engine is running."),
            503: {"model": Health, "description": "An engine is not running (`models` says which)."},
        },
    )
    async def health():
        """Liveness: every engine loop runs. Per model under `models`; the top level sums them (and,
        with one model, names it and gives its counters, as before several could be served)."""
        per = {m.name: _model_health(m) for m in router.models}
        ok = all(h.status == "ok" for h in per.values())
        body = Health(
            status="ok" if ok else "unavailable",
            running=sum(h.running for h in per.values()),
            waiting=sum(h.waiting for h in per.values()),
            models=per,
        )
        if router.single:
            body.model, body.stats = router.models[0].name, per[router.models[0].name].stats
        return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=200 if ok else 503)

    @app.get(
        "/ready",
        responses={
            200: {"description": "Every model is loaded and its engine loop runs."},
            503: {"description": "Not ready: an engine down, or draining."},
        },
    )
    async def ready():
        """Readiness (load balancers, Kubernetes): every configured model is loaded (the app exists
        only once they are) and its engine loop runs; unlike /health, false while the server drains."""
        names = [m.name for m in router.models]
        down = [m.name for m in router.models if not m.engine.alive]
        if not down and not ctx.draining:
            return {"status": "ready", "models": names}
        return JSONResponse(
            {"status": "draining" if ctx.draining else "unavailable", "models": names, "unavailable": down},
            status_code=503,
        )

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get(
        "/v1/models",
        responses={**openapi.ok(ModelList, "Every name a served model answers to."), **openapi.errors(401)},
    )
    async def models():
        return ModelList(
            data=[ModelCard(id=name, created=m.created) for m in router.models for name in m.names]
        ).model_dump()

    @app.get(
        "/v1/models/{model_id:path}",
        responses={**openapi.ok(ModelCard, "The model, by any of its names."), **openapi.errors(401, 404)},
    )
    async def model(model_id: str):
        found = router.lookup(model_id)
        if found is None:
            raise router.not_found(model_id)
        served, name = found
        return ModelCard(id=name, created=served.created).model_dump()
