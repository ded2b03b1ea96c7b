# Why Starlette (+ uvicorn): the board is a dozen JSON routes, four static files and one token
# stream. Starlette gives exactly that (routing, StaticFiles, StreamingResponse for server-sent
# events, a TestClient that drives the real app in tests) in two small pure-Python packages with
# no torch and no compiled parts, and runs on uvicorn, a plain ASGI server. Flask has no ASGI
# streaming; FastAPI adds pydantic-driven routing we do not need (our schema comes from spec.py).
"""`kubetune board`: a local web UI over local runs (`./saves`) or a cluster's FineTuneJobs.

`create_app(backend, ...)` builds the ASGI app of the HTTP contract in `API.md`; `serve(args)` is
the CLI command. The app itself is torch-free: the training stack is imported on the first chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..api.errors import UserError
from . import forms
from .common import BoardError

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> set[str]:
    """`Host` header values that name the bound address (all loopback names when it is loopback)."""
    names = set(LOOPBACK_NAMES) if is_loopback(host) else {host}
    out = set()
    for n in names:
        shown = f"[{n}]" if ":" in n else n
        out |= {f"{shown}:{port}"} | ({shown} if port == 80 else set())
    return out


def run_dashboard(base: str | None, name: str, namespace: str | None) -> str | None:
    """--grafana-url with the kubetune dashboard's variables (dashboards/kubetune.json: `namespace`,
    `job`) set to this run."""
    if not base:
        return None
    from urllib.parse import urlencode

    params = {**({"var-namespace": namespace} if namespace else {}), "var-job": name}
    return base + ("&" if "?" in base else "?") + urlencode(params)


def _error(err: BoardError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class HostGuard:
    """DNS-rebinding and cross-site guard. A page of another site can make the browser send
    requests here (a form POST, or a name it re-points at 127.0.0.1): those carry a foreign
    `Host` (rebinding) or `Origin` (cross-site). Every request must name the bound address in
    `Host`; a state-changing one (POST, PUT, PATCH, DELETE) with an `Origin` must come from the
    board's own origin. With --allow-remote on a wildcard address any Host is accepted, but the
    Origin must still match the Host."""

    def __init__(self, app, hosts: set[str] | None):
        self.app = app
        self.hosts = hosts  # None: any Host (a wildcard bind with --allow-remote)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        problem = None
        if self.hosts is not None and host not in self.hosts:
            problem = f"Host {host!r} is not the board's address ({', '.join(sorted(self.hosts))})"
        elif scope["method"] in STATE_CHANGING:
            origin = headers.get("origin")
            if origin is not None:
                o = urlsplit(origin)
                if origin == "null" or o.scheme not in ("http", "https") or o.netloc != host:
                    problem = f"cross-origin request from {origin!r} refused (the board accepts only its own pages)"
            elif headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
                problem = "cross-site request refused (the board accepts only its own pages)"
        if problem:
            resp = JSONResponse({"error": problem, "field": None}, status_code=403)
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def render_page(name: str, title: str, scripts: tuple[str, ...]) -> str:
    """The HTML of one page: static/page.html (head, top bar, common.js) around static/<name>.part.html
    (the page's <main>) and the page's own scripts."""
    frame = (STATIC / "page.html").read_text()
    main = (STATIC / f"{name}.part.html").read_text()
    tags = "".join(f'  <script src="/static/{s}"></script>\n' for s in scripts)
    return (frame.replace("<!--title-->", html.escape(title)).replace("<!--page-->", name)
            .replace("<!--scripts-->", tags).replace("<!--main-->", main))


def create_app(backend, host: str = "127.0.0.1", port: int = 8765, grafana_url: str | None = None,
               hosts: set[str] | None | str = "auto", chat=None) -> Any:
    """The board's ASGI app over `backend` (LocalBackend or ClusterBackend). `hosts`: the `Host`
    values accepted ("auto": those of host:port; None: any)."""
    from .chat import ChatModels

    chat_models = chat or ChatModels()

    def page(name: str, title: str, scripts: tuple[str, ...]):
        async def handler(request: Request) -> Response:
            try:
                return HTMLResponse(render_page(name, title, scripts))
            except FileNotFoundError as err:
                return JSONResponse({"error": f"{Path(err.filename).name} is missing from {STATIC}", "field": None},
                                    status_code=404)
        return handler

    async def call(fn, *args):
        try:
            return await run_in_threadpool(fn, *args)
        except BoardError:
            raise
        except UserError as err:
            raise BoardError(422, err.message, err.where) from None

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise BoardError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BoardError(400, "the request body must be a JSON object")
        return body

    def handles(fn):
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except BoardError as err:
                return _error(err)
        return wrapped

    @handles
    async def info(request: Request) -> Response:
        return JSONResponse({**backend.info(), "grafanaUrl": grafana_url, "version": __version__})

    @handles
    async def runs(request: Request) -> Response:
        return JSONResponse({"items": await call(backend.list_runs)})

    @handles
    async def run(request: Request) -> Response:
        detail = await call(backend.get_run, request.path_params["name"])
        return JSONResponse({**detail, "grafanaUrl": run_dashboard(grafana_url, detail["name"], detail.get("namespace"))})

    @handles
    async def history(request: Request) -> Response:
        return JSONResponse(await call(backend.history, request.path_params["name"]))

    @handles
    async def logs(request: Request) -> Response:
        try:
            tail = int(request.query_params.get("tail", "200"))
        except ValueError:
            raise BoardError(400, "tail must be a whole number", "tail") from None
        return JSONResponse(await call(backend.logs, request.path_params["name"], tail))

    def action(method: str):
        @handles
        async def handler(request: Request) -> Response:
            await call(getattr(backend, method), request.path_params["name"])
            return JSONResponse({"ok": True})
        return handler

    @handles
    async def schema(request: Request) -> Response:
        return JSONResponse({"schema": forms.spec_schema(), "llamafactoryNames": forms.llamafactory_names()})

    @handles
    async def presets(request: Request) -> Response:
        return JSONResponse({"presets": await call(forms.presets)})

    def output_root(job):
        saves = backend.info().get("saves")
        return str(Path(saves) / job.metadata.name) if saves else None

    @handles
    async def validate(request: Request) -> Response:
        body = await body_of(request)
        return JSONResponse(await call(forms.validate_body, body, output_root))

    @handles
    async def create(request: Request) -> Response:
        body = await body_of(request)
        if not isinstance(body.get("job"), dict) and not isinstance(body.get("yaml"), str):
            raise BoardError(400, 'give the job as {"job": {...}}', "job")
        text = forms.job_text(body)
        job, errors = await call(forms.load_text, text)
        if errors:
            first = errors[0]
            return JSONResponse({"error": first["message"] if len(errors) == 1 else
                                 f"the job has {len(errors)} problems; the first: {first['message']}",
                                 "field": first["field"], "errors": errors}, status_code=422)
        import yaml

        doc = body["job"] if isinstance(body.get("job"), dict) else yaml.safe_load(text)
        name = await call(backend.create, doc)
        return JSONResponse({"name": name}, status_code=201)

    @handles
    async def chat_route(request: Request) -> Response:
        name = request.path_params["name"]
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BoardError(400, 'messages must be a non-empty list of {"role", "content"}', "messages")
        try:
            max_new = int(body.get("maxNewTokens") or 128)
        except (TypeError, ValueError):
            raise BoardError(400, "maxNewTokens must be a whole number", "maxNewTokens") from None
        if not 1 <= max_new <= 4096:
            raise BoardError(400, "maxNewTokens must be between 1 and 4096", "maxNewTokens")
        source = await call(backend.chat_source, name)

        def events():
            pieces = []
            try:
                for piece in chat_models.stream(source["path"], source.get("template"), messages, max_new):
                    pieces.append(piece)
                    yield f"data: {json.dumps({'token': piece})}\n\n"
                yield f"data: {json.dumps({'done': True, 'text': ''.join(pieces).strip()})}\n\n"
            except Exception as err:  # noqa: BLE001 - the stream is already open: say it in the stream
                msg = err.message if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
                yield f"data: {json.dumps({'error': msg})}\n\n"

        return StreamingResponse(iterate_in_threadpool(events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", None) or "not found"
        return JSONResponse({"error": f"{detail}: {request.method} {request.url.path}", "field": None},
                            status_code=status)

    routes = [
        Route("/", page("runs", "Runs", ("runs.js",))),
        Route("/runs/{name}", page("run", "Run", ("chart.js", "run.js"))),
        Route("/new", page("new", "New run", ("new.js",))),
        Mount("/static", app=StaticFiles(directory=str(STATIC), check_dir=False), name="static"),
        Route("/api/info", info),
        Route("/api/runs", runs, methods=["GET"]),
        Route("/api/runs", create, methods=["POST"]),
        Route("/api/runs/{name}", run, methods=["GET"]),
        Route("/api/runs/{name}", action("delete"), methods=["DELETE"]),
        Route("/api/runs/{name}/history", history),
        Route("/api/runs/{name}/logs", logs),
        Route("/api/runs/{name}/suspend", action("suspend"), methods=["POST"]),
        Route("/api/runs/{name}/resume", action("resume"), methods=["POST"]),
        Route("/api/runs/{name}/chat", chat_route, methods=["POST"]),
        Route("/api/schema", schema),
        Route("/api/presets", presets),
        Route("/api/validate", validate, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        start = getattr(backend, "start", None)
        if start is not None:
            start()  # cluster mode: observe the loss while the board runs
        try:
            yield
        finally:
            backend.stop_all()

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.backend = backend
    guard_hosts = allowed_hosts(host, port) if hosts == "auto" else hosts
    if hosts == "auto" and host in ("0.0.0.0", "::", ""):
        guard_hosts = None  # a wildcard bind (--allow-remote): any name of this machine
    return HostGuard(app, guard_hosts)


# ------------------------------------------------------------------------------------- the CLI


def choose_backend(args):
    """--mode, or cluster when a kubeconfig loads and local otherwise; says which on stderr."""
    from .cluster import ClusterBackend, kubeconfig_usable
    from .local import LocalBackend

    mode = args.mode
    if mode is None:
        ok, why = kubeconfig_usable(args.kubeconfig, args.context)
        mode = "cluster" if ok else "local"
        reason = "a kubeconfig is usable" if ok else f"no usable kubeconfig: {why}"
        print(f"kubetune board: {mode} mode ({reason}; --mode local|cluster to choose)", file=sys.stderr)
    if mode == "cluster":
        try:
            return ClusterBackend(args.kubeconfig, args.context, args.namespace)
        except BoardError as err:
            raise UserError(err.message, "--kubeconfig") from None
    return LocalBackend(args.saves)


def serve(args) -> int:
    host = args.host
    if not is_loopback(host) and not args.allow_remote:
        print(f"error: --host {host}: the board listens only on this machine (127.0.0.1, ::1, localhost) unless "
              "--allow-remote is given; anyone who reaches the port can start, stop and delete runs as you",
              file=sys.stderr)
        return 2
    if not is_loopback(host):
        print(f"WARNING: --allow-remote: listening on {host}:{args.port}. Anyone who can reach this port acts "
              "with your kubeconfig (cluster mode) or on this machine (local mode): starting, stopping and "
              "deleting runs. There is no login. Use it only on a trusted network.", file=sys.stderr)
    backend = choose_backend(args)
    app = create_app(backend, host=host, port=args.port, grafana_url=args.grafana_url)
    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    where = f"namespace {backend.info()['namespace']}" if backend.mode == "cluster" else f"runs in {backend.saves}"
    print(f"kubetune board: http://{shown}:{args.port}/ ({backend.mode} mode, {where}); Ctrl-C stops it",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host.strip("[]"), port=args.port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass
    return 0
