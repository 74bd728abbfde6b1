"""The FastAPI app factory: ``create_app`` puts the app together from its parts and does nothing
else. Where each job lives:

- server/errors.py: the API's error type and its responses (404, 405 and 500 handlers too)
- server/auth.py: the API key check
- server/plumbing.py: what generation endpoints share (body limits, model choice, first event,
  disconnects, SSE framing) and ``ServerContext``, what the routes are given
- server/ops.py: /health, /ready, /metrics, /v1/models
- server/chat.py: /v1/chat/completions; server/completions.py: /v1/completions
- server/playground.py: the browser page; server/openapi.py: the schema's extras

No tensors here: the engine does the maths.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from . import __version__, openapi
from .auth import APIKeyMiddleware
from .chat import add_chat_completions
from .completions import add_completions
from .errors import add_error_handlers, error_response
from .logs import HEADER as REQUEST_ID_HEADER
from .logs import RequestLogMiddleware
from .media import MediaLimits
from .metrics import Metrics, MetricsMiddleware
from .ops import add_ops_routes
from .playground import mount_playground
from .plumbing import BODY_READ_TIMEOUT, MAX_BODY_BYTES, ServerContext
from .routing import ANY_MODEL, ModelRouter, serving_entries  # noqa: F401 (ANY_MODEL: re-exported)


def create_app(
    engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    served_names: set[str] | None = None,
    compile_timeout: float = 10.0,
    body_read_timeout: float | None = BODY_READ_TIMEOUT,
    media: MediaLimits | None = None,
    playground: bool = True,
    metrics: Metrics | None = None,
    protect_metrics: bool = False,
    allowed_origins: list[str] | None = None,
) -> FastAPI:
    """The app serving ``engine``: one Engine (named by its ``model_name``, ``served_names`` its
    aliases), or several models, each with its own engine: a dict ``{name: engine}`` (names of one
    engine are that model's aliases, the first its id) or a list of ``(names, engine)``. Requests
    are routed by their ``model`` field (server/routing.py). ``allowed_origins``: browser origins
    given CORS headers ("*": any); none by default."""
    app = FastAPI(title="chatserve", version=__version__)
    openapi.install(app, bearer_auth=bool(api_key))
    router = ModelRouter(serving_entries(engine, served_names))
    app.state.models = router
    metrics = metrics or Metrics({m.name: m.engine for m in router.models})
    app.state.draining = False  # set on SIGTERM (server/cli.py): new requests get 503, /ready says no
    ctx = ServerContext(
        router=router,
        metrics=metrics,
        state=app.state,
        max_body_bytes=max_body_bytes,
        body_read_timeout=body_read_timeout,
        compile_timeout=compile_timeout,
        media=media or MediaLimits(),
    )
    add_error_handlers(app)

    # Middlewares, innermost first (each added one wraps the ones before): metrics (per model, so
    # inside the routes' model choice), the API key, CORS (outside the key check, so preflights and
    # 401s carry CORS headers), then request ids and the access line around everything.
    one_model = router.models[0].name if router.single else ""
    app.add_middleware(MetricsMiddleware, metrics=metrics, model=one_model)
    if api_key:
        app.add_middleware(
            APIKeyMiddleware,
            api_key=api_key,
            on_error=error_response,
            protect=("/v1/", "/metrics") if protect_metrics else ("/v1/",),
        )
    if allowed_origins:
        # allow_headers "*": browser SDKs send headers of their own (openai's x-stainless-*) beside
        # Authorization and Content-Type; no credentials (cookies): the API key is a header
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestLogMiddleware, default_model=one_model or None)

    # Routes, in the order the OpenAPI schema lists them
    if playground:
        mount_playground(app)  # the browser page at / and /playground (server/playground.py)
    add_ops_routes(app, ctx)  # /health, /ready, /metrics, /v1/models (server/ops.py)
    add_chat_completions(app, ctx)  # POST /v1/chat/completions (server/chat.py)
    add_completions(app, ctx)  # POST /v1/completions (server/completions.py)
    return app
