"""What stands between a browser and ``cav ui``: an ASGI middleware in front of Gradio's app (``serve`` installs it).

Gradio serves a file by the path in the request, trusts any ``localhost`` origin, fetches URLs it is given and has
no login rate limit; this closes each of those for the one user a ``cav ui`` server has:

- same origin only: a request that names another origin (``Origin``), or that a browser marks as sent from another
  site (``Sec-Fetch-Site``: a page on another local port is "same-site"), is refused, HTTP and websocket alike;
  on a loopback address the ``Host`` must be that address (a DNS-rebinding page is another host);
- files: Gradio's file route serves only Gradio's own upload/output folder (no URL, no path outside it, no path
  through a symlink); the app's outputs under ``--runs`` are served by ``/cav/runs/<path>`` (relative, so no
  server path appears in the page), media and images only; every file answer says ``nosniff`` and is sandboxed,
  so an uploaded ``.html`` is never a page of this origin;
- ``/login``: at most ``attempts`` failed logins per client address in ``window`` seconds, then 429.
"""

from __future__ import annotations

import mimetypes
import os
import re
import time
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
RUNS_ROUTE = "/cav/runs/"
FILE_ROUTE = re.compile(r"^(?:/gradio_api)?/(file=|file/|proxy=)(.*)$", re.S)  # gradio's routes that open a path
SERVED = {".mp4", ".gif", ".png", ".jpg", ".jpeg", ".webm"}  # what the page shows from --runs
FILE_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", b"sandbox"),
                (b"cache-control", b"no-store")]


def plain_path(path: Path, root: Path) -> Path | None:
    """``path`` when it lies under ``root`` without a symlink on the way (nor ``..``), else None."""
    root, path = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    here = root
    for part in rel.parts:
        here = here / part
        if here.is_symlink():
            return None
    return path if path.is_file() and Path(os.path.realpath(path)) == Path(os.path.realpath(root)) / rel else None


class Guard:
    """ASGI middleware: same-origin requests, own files only, rate-limited logins (see the module's docstring)."""

    def __init__(self, app, *, runs: Path, uploads: Path, host: str, port: int, attempts: int = 5,
                 window: float = 60.0):
        self.app = app
        self.runs, self.uploads = Path(runs).resolve(), Path(uploads).resolve()
        self.hosts = {f"{h}:{port}" for h in LOOPBACK} if host in LOOPBACK else None  # None: any (auth required)
        self.attempts, self.window = attempts, window
        self.failures: dict[str, list[float]] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self.foreign(headers, scope)
        if refused:
            return await self._refuse(scope, receive, send, 403, refused)
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(RUNS_ROUTE):
            return await self._runs_file(scope, receive, send, path[len(RUNS_ROUTE):])
        route = FILE_ROUTE.match(path)
        if route or "proxy=" in path:
            target = route.group(2) if route and route.group(1) != "proxy=" else ""  # the server decoded it already
            if not target or plain_path(Path(target), self.uploads) is None:
                return await self._refuse(scope, receive, send, 403, "cav ui serves only its own files")
            return await self.app(scope, receive, self._file_headers(send))
        if scope["type"] == "http" and scope["method"] == "POST" and path.rstrip("/").endswith("/login"):
            return await self._login(scope, receive, send)
        return await self.app(scope, receive, send)

    def foreign(self, headers: dict, scope: dict) -> str | None:
        """Why a request is not this page's own (None: it is). Opening the app's page from a link elsewhere (a
        top-level navigation to ``/``) is not refused: it has no effect and its answer goes to the user's tab."""
        host = headers.get("host", "")
        if self.hosts is not None and host not in self.hosts:
            return f"unknown host '{host}'"
        origin = headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != host:
            return "cross-origin requests are refused"
        opening = scope.get("method") == "GET" and scope.get("path") == "/" and \
            headers.get("sec-fetch-mode") == "navigate"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none") and not opening:
            return "cross-site requests are refused"
        return None

    async def _runs_file(self, scope, receive, send, rel: str):
        from starlette.responses import FileResponse

        file = plain_path(self.runs / rel, self.runs) if rel and not any(
            p.startswith(".") for p in Path(rel).parts) else None
        if file is None or file.suffix.lower() not in SERVED:
            return await self._refuse(scope, receive, send, 404, "no such file under the runs folder")
        media = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return await FileResponse(file, media_type=media)(scope, receive, self._file_headers(send))

    async def _login(self, scope, receive, send):
        client = (scope.get("client") or ("?", 0))[0]
        now = time.monotonic()
        recent = [t for t in self.failures.get(client, []) if now - t < self.window]
        self.failures[client] = recent
        if len(recent) >= self.attempts:
            return await self._refuse(scope, receive, send, 429, "too many failed logins: wait a minute")

        async def watch(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.failures.setdefault(client, []).append(time.monotonic())
            await send(message)

        return await self.app(scope, receive, watch)

    @staticmethod
    def _file_headers(send):
        async def add(message):
            if message["type"] == "http.response.start":
                names = {k for k, _ in FILE_HEADERS}
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names] + \
                    FILE_HEADERS
            await send(message)
        return add

    @staticmethod
    async def _refuse(scope, receive, send, status: int, why: str):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        from starlette.responses import PlainTextResponse

        return await PlainTextResponse(why, status_code=status)(scope, receive, send)
