"""``create_app(engine, settings)``: every route of the server in one table, and the error handlers.

Routes are thin: parse the protocol, call the ``DataPlane`` (which calls the engine), format the answer.
Errors raised anywhere become protocol bodies through ``ptmserve.server.errors`` (which applies the
one table of ``ptmserve.protocol.errors``) only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from ptmserve.errors import PtmError
from ptmserve.protocol.errors import error_body, router_error_kind
from ptmserve.server.completions import ChatRequest, CompletionRequest
from ptmserve.server.dataplane import ClientDisconnected, DataPlane, EngineLike
from ptmserve.server.errors import error_response, invalid_input_from
from ptmserve.server.generate import GenerateRequest, GenerateRoutes
from ptmserve.server.kserve import KServeRoutes
from ptmserve.server.middleware import Guard, HttpMetrics
from ptmserve.server.openai import EmbeddingRequest, OpenAIRoutes
from ptmserve.server.schemas import (
    INFER_REQUEST_SCHEMA,
    REPOSITORY_INDEX_SCHEMA,
    model_request_schema,
    request_schema,
)
from ptmserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

# Status answered when the client disconnected before its answer (nginx's convention; never sent).
CLIENT_CLOSED = 499


def create_app(engine: EngineLike, settings: ServerSettings, *, owns_engine: bool = False) -> FastAPI:
    """The ASGI app serving ``engine`` over KServe v2 (with Triton's generate extension) and OpenAI.

    Args:
        engine: a ``ptmserve.engine.engine.Engine`` (or anything with its API).
        settings: HTTP limits and auth.
        owns_engine: close the engine (draining for ``settings.drain_seconds``) when the app shuts down.
    """
    plane = DataPlane(engine, settings)
    kserve = KServeRoutes(plane)
    generate = GenerateRoutes(plane)
    openai = OpenAIRoutes(plane)
    http_metrics = HttpMetrics()

    async def metrics() -> Response:
        # Off the event loop: a worker pool's engine metrics are read from its worker processes.
        text = await asyncio.to_thread(generate_latest, engine.metrics.registry)
        text += generate_latest(http_metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    infer_body = {"requestBody": {"required": True, "content": {"application/json": INFER_REQUEST_SCHEMA}}}
    index_body = {"requestBody": {"content": {"application/json": REPOSITORY_INDEX_SCHEMA}}}
    model_body = {"requestBody": {"content": {"application/json": model_request_schema()}}}
    generate_body = request_schema(GenerateRequest)
    m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    # (method, path, endpoint, OpenAPI extras). Order matters where a literal segment could also match
    # a {model} parameter: /v2/models/stats comes before /v2/models/{model}.
    routes: list[tuple[str, str, Callable[..., Any], dict[str, Any] | None]] = [
        ("GET", "/v2", kserve.server_metadata, None),
        ("GET", "/v2/health/live", kserve.live, None),
        ("GET", "/v2/health/ready", kserve.ready, None),
        ("GET", "/v2/models/stats", kserve.all_stats, None),
        ("GET", m, kserve.model_metadata, None),
        ("GET", mv, kserve.model_metadata_version, None),
        ("GET", f"{m}/ready", kserve.model_ready, None),
        ("GET", f"{mv}/ready", kserve.model_ready_version, None),
        ("GET", f"{m}/config", kserve.model_config, None),
        ("GET", f"{mv}/config", kserve.model_config_version, None),
        ("GET", f"{m}/stats", kserve.model_stats, None),
        ("GET", f"{mv}/stats", kserve.model_stats_version, None),
        ("POST", f"{m}/infer", kserve.infer, infer_body),
        ("POST", f"{mv}/infer", kserve.infer_version, infer_body),
        ("POST", f"{m}/generate", generate.generate, generate_body),
        ("POST", f"{mv}/generate", generate.generate, generate_body),
        ("POST", f"{m}/generate_stream", generate.generate_stream, generate_body),
        ("POST", f"{mv}/generate_stream", generate.generate_stream, generate_body),
        ("POST", "/v2/repository/index", kserve.repository_index, index_body),
        ("POST", "/v2/repository/models/{model}/load", kserve.load, model_body),
        ("POST", "/v2/repository/models/{model}/unload", kserve.unload, model_body),
        ("GET", "/v1/models", openai.models, None),
        ("GET", "/v1/models/{model}", openai.model, None),
        ("POST", "/v1/embeddings", openai.embeddings, request_schema(EmbeddingRequest)),
        ("POST", "/v1/completions", openai.completions, request_schema(CompletionRequest)),
        ("POST", "/v1/chat/completions", openai.chat_completions, request_schema(ChatRequest)),
        ("GET", "/metrics", metrics, None),
    ]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        plane.draining = True
        if owns_engine:
            logger.info("closing the engine (drain up to %.1f s)", settings.drain_seconds)
            await asyncio.to_thread(engine.close, settings.drain_seconds)

    app = FastAPI(title="ptmserve", lifespan=lifespan)
    for method, path, endpoint, extra in routes:
        app.add_api_route(path, endpoint, methods=[method], openapi_extra=extra, response_class=Response)
    _install_error_handlers(app)
    app.add_middleware(Guard, settings=settings, metrics=http_metrics)
    app.state.plane = plane
    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def on_ptm_error(request: Request, exc: Exception) -> Response:
        return error_response(exc, request.url.path)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(invalid_input_from(exc.errors()), request.url.path)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = router_error_kind(exc.status_code)
        message = {404: f"no route {request.method} {request.url.path}"}.get(exc.status_code, str(exc.detail))
        body = error_body(kind, message, request.url.path)
        return Response(body, status_code=kind.status, media_type="application/json", headers=exc.headers)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    app.add_exception_handler(PtmError, on_ptm_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnected, on_disconnect)
