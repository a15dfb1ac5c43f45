"""The rating workbench's web application (FastAPI; served by ``medrl ratings serve``).

Pages are rendered on the server (Jinja2) with one small plain-JavaScript file; there is
no front-end build. A rater opens ``http://HOST:PORT/#token=...`` (``medrl ratings
invite``): the token stays in the URL fragment, which browsers never send, the page posts
it once to ``/api/login``, and the server answers with an HttpOnly, SameSite=Strict
cookie. Every state-changing request must also carry the ``X-Medrl: 1`` header (a
cross-site form cannot set it). Bodies above :data:`MAX_BODY` bytes are refused before
they are read. Nothing the server sends names a generator, adapter, seed, score or file.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field

from rewards.agreement import agreement_report
from rewards.workbench.protocol import MAX_COMMENT, WorkbenchError
from rewards.workbench.store import Rater, Workbench

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "medrl_rater"
MAX_BODY = 16 * 1024
CSRF_HEADER = "x-medrl"
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=200)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    item_id: str = Field(max_length=64)
    nonce: str = Field(max_length=64)
    rating: int
    aspects: dict[str, float] = Field(default_factory=dict)
    comment: str = Field(default="", max_length=MAX_COMMENT)


class _LimitBody:
    """ASGI middleware: a request with a body must declare its length (411 otherwise; the
    page's fetch always does), and one over ``limit`` bytes gets 413 before anything of it
    is read (uvicorn does not deliver more than the declared length)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is None or not length.isdigit():
                await _refuse(send, 411, "send the body with a Content-Length")
                return
            if int(length) > self.limit:
                await _refuse(send, 413, f"request body over {self.limit} bytes")
                return
        await self.app(scope, receive, send)


async def _refuse(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(bench: Workbench) -> FastAPI:
    """The application serving ``bench``'s round."""
    app = FastAPI(title="medrl rating workbench", docs_url=None, redoc_url=None, openapi_url=None)
    pages = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
    )
    app.add_middleware(_LimitBody, limit=MAX_BODY)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _add_guards(app)
    _add_pages(app, bench, pages)
    _add_api(app, bench)
    return app


def _add_guards(app: FastAPI) -> None:
    """A refused request answers with its status; a state-changing one without the
    :data:`CSRF_HEADER` is refused (403); every response carries the security headers."""

    @app.exception_handler(WorkbenchError)
    async def refused(_: Request, exc: WorkbenchError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
            return JSONResponse(
                {"detail": f"missing the {CSRF_HEADER} header (requests come from the page)"},
                status_code=403,
            )
        response = await call_next(request)
        for name, value in _HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def _rater(bench: Workbench, request: Request, role: str = "rater") -> Rater:
    """The holder of the request's token cookie; WorkbenchError 403 unless their role is
    ``role``."""
    who = bench.who(request.cookies.get(COOKIE))
    if who.role != role:
        raise WorkbenchError(403, f"this page is for the {role} link, not the {who.role}'s")
    return who


def _add_pages(app: FastAPI, bench: Workbench, pages: Environment) -> None:
    """The rating page and the admin page (a login page for anyone but an admin)."""

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return pages.get_template("rate.html").render(round=bench.round)

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request) -> Response:
        try:
            _rater(bench, request, "admin")
        except WorkbenchError as exc:
            html = pages.get_template("login.html").render(round=bench.round, message=str(exc))
            return HTMLResponse(html, status_code=exc.status)
        return HTMLResponse(pages.get_template("admin.html").render(**admin_view(bench)))


def _add_api(app: FastAPI, bench: Workbench) -> None:
    """The page's JSON API (login, queue, answers, progress) and the images."""

    @app.post("/api/login")
    def login(body: Login) -> JSONResponse:
        who = bench.who(body.token)
        response = JSONResponse({"rater": who.rater_id, "role": who.role})
        response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", path="/")
        return response

    @app.post("/api/logout")
    def logout() -> JSONResponse:
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/api/state")
    def state(request: Request) -> dict[str, Any]:
        return bench.state(_rater(bench, request))

    @app.get("/api/item/{pos}")
    def item(pos: int, request: Request) -> dict[str, Any]:
        return bench.item(_rater(bench, request), pos)

    @app.get("/api/next")
    def next_item(request: Request, after: int = -1) -> dict[str, Any]:
        return {"pos": bench.next_pos(_rater(bench, request), after)}

    @app.post("/api/answer")
    def answer(body: Answer, request: Request) -> dict[str, Any]:
        return bench.submit(
            _rater(bench, request),
            body.item_id,
            body.nonce,
            body.rating,
            body.aspects,
            body.comment,
        )

    @app.get("/image/{item_id}")
    def image(item_id: str, request: Request) -> FileResponse:
        path = bench.image_file(_rater(bench, request), item_id)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private"})

    @app.get("/api/progress")
    def progress(request: Request) -> dict[str, Any]:
        _rater(bench, request, "admin")
        return admin_view(bench)


def admin_view(bench: Workbench) -> dict[str, Any]:
    """Progress, agreement between raters and each rater's self-agreement of the round."""
    frame = bench.round_ratings()
    agreement = agreement_report(frame) if len(frame) else None
    return {
        "round": bench.round,
        "protocol": bench.protocol,
        "images": len(bench.images),
        "progress": bench.progress(),
        "agreement": agreement,
        "self_agreement": bench.self_agreement(),
    }


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (the workbench's and ``medrl submit``'s test
    for "this stays on the machine")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(bench: Workbench, host: str = "127.0.0.1", port: int = 8787, allow_remote: bool = False):
    """Run the workbench until interrupted (uvicorn)."""
    import uvicorn

    if not is_loopback(host):
        if not allow_remote:
            raise ValueError(
                f"--host {host} is not a loopback address: raters' tokens and ratings would "
                "cross the network in plain HTTP. Reach 127.0.0.1 through an SSH tunnel "
                "(docs/rating.md), or pass --allow-remote behind your own TLS proxy"
            )
        log.warning(
            "serving on %s: every device that reaches it sees plain HTTP; put TLS in front", host
        )
    uvicorn.run(create_app(bench), host=host, port=port, log_level="warning")


class Background:
    """The workbench served from a thread (the tests and benchmarks/workbench_load.py):
    ``with Background(bench) as url: ...``; port 0 picks a free port."""

    def __init__(self, bench: Workbench, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        config = uvicorn.Config(create_app(bench), host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = None

    def __enter__(self) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the workbench server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
