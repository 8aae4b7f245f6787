"""The OpenAI-compatible HTTP server (FastAPI + uvicorn).

    fastllm-serve [MODEL] [flags]
    python -m fastllm.entrypoints.openai.api_server [flags]
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import importlib
import inspect
import json
import logging
import os
import socket
import sys
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastllm.config import EngineArgs
from fastllm.distributed.errors import WorkerError
from fastllm.engine.async_llm import (
    AsyncLLM,
    serve_large_allocations_from_mmap,
    served_model_names,
)
from fastllm.entrypoints.openai.cli_args import ignored_flag_warnings, parse_args
from fastllm.entrypoints.openai.errors import APIError, error_body
from fastllm.entrypoints.openai.http_protocol import OrderlyHttpToolsProtocol
from fastllm.entrypoints.openai.metrics import ServerMetrics
from fastllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from fastllm.entrypoints.openai.serving_chat import OpenAIServingChat
from fastllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from fastllm.entrypoints.openai.serving_models import OpenAIServingModels
from fastllm.torch_extra import TorchMissingError
from fastllm.version import __version__

logger = logging.getLogger("fastllm.server")

_STATIC = Path(__file__).parent / "static"


def error_response(message: str, status: int, err_type: str, param: str | None = None
                   ) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, status, err_type, param))


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs.from_namespace(ns)


def load_chat_template(value: str | None) -> str | None:
    """--chat-template takes a file path or the template itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        return Path(value).read_text(encoding="utf-8")
    if any(c in value for c in "{%}"):
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and it does not look like a "
                     f"jinja template")


def build_engine(ns: argparse.Namespace) -> AsyncLLM:
    """The server's engine, with its collaborators: the metrics it reports to (labelled with the
    first served name) and the default guided-decoding backend."""
    args = engine_args_from(ns)
    modules = parse_lora_modules(getattr(ns, "lora_modules", None))
    if modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    metrics = ServerMetrics(served_model_names(args)[0])
    backend = getattr(ns, "guided_decoding_backend", None)
    if args.data_parallel_size > 1 or args.engine_use_ray:
        # Engine replicas in processes (or Ray actors) of their own, behind the same API.
        from fastllm.engine.data_parallel import DataParallelLLM

        engine = DataParallelLLM(args, metrics=metrics, guided_decoding_backend=backend)
    else:
        engine = AsyncLLM(args, metrics=metrics, guided_decoding_backend=backend)
    for name, path, base in modules:
        engine.serve_lora(name, path, base)
        logger.info("serving LoRA adapter %s from %s", name, path)
    return engine


def parse_lora_modules(specs: list[str] | None) -> list[tuple[str, str, str | None]]:
    """--lora-modules entries: name=path, or a JSON object with name, path and optionally
    base_model_name."""
    out = []
    for spec in specs or []:
        if spec.lstrip().startswith("{"):
            try:
                d = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"--lora-modules {spec!r}: invalid JSON ({e})") from None
            if not isinstance(d, dict) or not d.get("name") or not d.get("path"):
                raise ValueError(f"--lora-modules {spec!r}: the JSON form needs name and path")
            out.append((str(d["name"]), str(d["path"]), d.get("base_model_name")))
            continue
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {spec!r}: expected name=path")
        out.append((name, path, None))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("--lora-modules names must be distinct")
    return out


def build_app(engine: AsyncLLM, ns: argparse.Namespace) -> FastAPI:
    """The app serving ``engine`` (built by :func:`build_engine`, which gives it its metrics)."""
    metrics = engine.metrics
    if metrics is None:
        raise ValueError("the server's engine needs its metrics: build it with build_engine()")
    names = list(engine.model_info.served_model_names)
    shared = {"chat_template": load_chat_template(ns.chat_template),
              "max_log_len": ns.max_log_len, "log_requests": not ns.disable_log_requests,
              "return_tokens_as_token_ids": bool(getattr(ns, "return_tokens_as_token_ids",
                                                         False))}
    completion_serving = OpenAIServingCompletion(engine, names, **shared)
    chat_serving = OpenAIServingChat(engine, names, ns.response_role,
                                     getattr(ns, "enable_auto_tool_choice", False),
                                     getattr(ns, "tool_call_parser", None), **shared)
    models_serving = OpenAIServingModels(engine, names, ns.model, **shared)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        stats_task = None
        if not ns.disable_log_stats:
            interval = float(os.environ.get("FASTLLM_LOG_STATS_INTERVAL", "10"))
            stats_task = asyncio.ensure_future(_log_stats(engine, interval))
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            engine.shutdown()

    app = FastAPI(title="fastllm", version=__version__, lifespan=lifespan,
                  root_path=ns.root_path or "")
    app.state.engine = engine

    app.add_middleware(CORSMiddleware, allow_origins=ns.allowed_origins,
                       allow_credentials=ns.allow_credentials, allow_methods=ns.allowed_methods,
                       allow_headers=ns.allowed_headers)

    api_key = ns.api_key
    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def check_api_key(request: Request, call_next):
            if request.method != "OPTIONS" and request.url.path.startswith(
                    f"{app.root_path}/v1"):
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return error_response("missing or invalid API key", 401,
                                          "AuthenticationError")
            return await call_next(request)

    for spec in ns.middleware:
        module_name, _, attr = spec.rpartition(".")
        obj = getattr(importlib.import_module(module_name), attr)
        if inspect.isclass(obj):
            app.add_middleware(obj)
        elif inspect.iscoroutinefunction(obj):
            app.middleware("http")(obj)
        else:
            raise ValueError(f"--middleware {spec}: neither a class nor an async function")

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError):
        return error_response(exc.message, exc.status, exc.err_type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []) if x != 'body')}: "
                        f"{e.get('msg')}" for e in errors) or "invalid request"
        return error_response(msg, 400, "BadRequestError", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException):
        phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else "error"
        return error_response(str(exc.detail or phrase), exc.status_code,
                              "NotFoundError" if exc.status_code == 404 else phrase)

    @app.exception_handler(Exception)
    async def on_internal_error(_: Request, exc: Exception):
        logger.exception("internal error while serving a request")
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500,
                              "InternalServerError")

    @app.exception_handler(ValueError)
    async def on_value_error(_: Request, exc: ValueError):
        return error_response(str(exc), 400, "BadRequestError")

    @app.get("/health")
    async def health():
        models_serving.health()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return models_serving.version()

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(engine.stats()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return models_serving.models()

    if os.environ.get("FASTLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in (
            "1", "true", "yes", "on"):
        # Adapters load and unload while serving (the specification's opt-in: anyone who can
        # reach the API can make the server read a path).
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: LoadLoRAAdapterRequest):
            message = await asyncio.to_thread(models_serving.load_lora_adapter, request)
            return PlainTextResponse(message)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: UnloadLoRAAdapterRequest):
            return PlainTextResponse(models_serving.unload_lora_adapter(request))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        return await models_serving.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        return models_serving.detokenize(request)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request):
        result = await completion_serving.completions(request, raw_request)
        if request.stream:
            return StreamingResponse(result, media_type="text/event-stream")
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request):
        result = await chat_serving.chat(request, raw_request)
        if request.stream:
            return StreamingResponse(result, media_type="text/event-stream")
        return JSONResponse(result)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse((_STATIC / "playground.html").read_text(encoding="utf-8"))

    return app


async def _log_stats(engine: AsyncLLM, interval: float = 10.0) -> None:
    last_tokens = 0
    while True:
        await asyncio.sleep(interval)
        s = engine.stats()
        rate = (s.num_generated_tokens - last_tokens) / interval
        last_tokens = s.num_generated_tokens
        hit = 100.0 * s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0
        logger.info("running: %d, waiting: %d, generation: %.1f tok/s, KV usage: %.1f%%, "
                    "prefix hit rate: %.1f%%, preemptions: %d", s.num_running, s.num_waiting,
                    rate, 100.0 * s.kv_usage, hit, s.num_preemptions)
        if s.spec_verify_steps:
            logger.info("speculative decoding: %.1f%% of drafts accepted, %.2f tokens per "
                        "verify step", 100.0 * s.spec_accepted_tokens / max(s.spec_draft_tokens, 1),
                        (s.spec_accepted_tokens + s.spec_verify_steps) / s.spec_verify_steps)


def _listen_socket(host: str, port: int) -> socket.socket:
    """Binds the server's socket before anything else starts, so a taken port fails at once with
    one line instead of after the model loaded and readiness was already logged."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with fastllm's shutdown: the first SIGINT/SIGTERM stops accepting and
        lets in-flight requests run for --shutdown-timeout seconds, then aborts what is left (each
        client still gets its last chunk, finish_reason "abort"); a second signal aborts at once.
        The process then exits 0: uvicorn's own handler would re-raise the signal afterwards
        (a KeyboardInterrupt traceback, or death by SIGTERM)."""

        def __init__(self, config, engine: AsyncLLM, drain_s: float, on_started):
            super().__init__(config)
            self.engine = engine
            self.drain_s = drain_s
            self.on_started = on_started
            self.aborted = False
            self.loop: asyncio.AbstractEventLoop | None = None
            self.exit_code = 0
            self._watch: asyncio.Task | None = None

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets=sockets)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                self._watch = self.loop.create_task(self.exit_when_engine_dies())
                self.on_started(self.servers[0].sockets[0].getsockname())

        async def exit_when_engine_dies(self) -> None:
            """A dead engine (a distributed worker died) ends the server with exit code 1: its
            requests in flight already failed, and no later one can run."""
            why = await self.engine.wait_dead()
            logger.error("the engine stopped (%s): the server exits", why)
            self.exit_code = 1
            self.should_exit = True

        def handle_exit(self, sig: int, frame) -> None:
            if self.loop is None:
                return
            if not self.should_exit:
                self.should_exit = True
                self.loop.call_soon_threadsafe(self.start_drain)
            elif not self.aborted:
                self.loop.call_soon_threadsafe(self.abort_all)
            else:
                self.force_exit = True

        def start_drain(self) -> None:
            in_flight = self.engine.num_unfinished_requests
            if in_flight:
                logger.info("shutting down: %d request(s) in flight get %.1f s to finish",
                            in_flight, self.drain_s)
            self.loop.call_later(self.drain_s, self.abort_all)

        def abort_all(self) -> None:
            if self.aborted:
                return
            self.aborted = True
            n = self.engine.abort_all()
            if n:
                logger.warning("shutting down: aborted %d unfinished request(s)", n)

    return Server


def run(ns: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=os.environ.get("FASTLLM_LOGGING_LEVEL", "INFO").upper(),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    for line in ignored_flag_warnings(ns):
        logger.warning(line)
    host = ns.host or "0.0.0.0"
    try:
        sock = _listen_socket(host, ns.port)
    except OSError as e:
        print(f"fastllm-serve: cannot listen on {host}:{ns.port}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    serve_large_allocations_from_mmap()
    try:
        engine = build_engine(ns)
        app = build_app(engine, ns)
    except (ValueError, TorchMissingError) as e:  # a bad flag or model, or a missing extra
        sock.close()
        print(f"fastllm-serve: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:  # a model worker or engine replica failed while it loaded
        sock.close()
        print(f"fastllm-serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while the model loads: nothing to drain yet
        sock.close()
        return 130
    scheme = "https" if ns.ssl_certfile else "http"

    def announce(address) -> None:
        stats, info = engine.stats(), engine.model_info
        logger.info("fastllm %s serving %s at %s://%s:%d (KV cache: %d blocks x %d tokens, "
                    "max_model_len %d, ready in %.2f s)", __version__,
                    info.source_name, scheme, host, address[1], stats.num_total_blocks,
                    info.block_size, info.max_model_len, info.startup_seconds)

    config = uvicorn.Config(app, host=host, port=ns.port, log_level=ns.uvicorn_log_level,
                            ssl_keyfile=ns.ssl_keyfile, ssl_certfile=ns.ssl_certfile,
                            ssl_ca_certs=ns.ssl_ca_certs, ssl_cert_reqs=ns.ssl_cert_reqs,
                            root_path=ns.root_path or "", http=OrderlyHttpToolsProtocol,
                            # A last resort after our own abort at the deadline: the aborted
                            # streams need a moment to send their final chunks.
                            timeout_graceful_shutdown=ns.shutdown_timeout + 5)
    server = _server_class()(config, engine, ns.shutdown_timeout, announce)
    try:
        server.run(sockets=[sock])
    finally:
        # A forced exit (a third signal) skips the lifespan shutdown; the engine loop still stops.
        engine.shutdown()
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
