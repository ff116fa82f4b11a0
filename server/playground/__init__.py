"""The playground: a page at ``GET /`` that evaluates micrograd programs through ``POST /rpc``.

The page, its script and its style sheet are package data beside this
module, served from memory (no CDN, no network needed). The script parses
the program into a node list in the browser and calls JSON-RPC ``Evaluate``;
nothing on either side evaluates the program as code. The routes are added
to the HTTP server's own application, so whatever guards ``/rpc`` (its
middlewares) guards the page too. ``--no-playground`` leaves them out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

__all__ = ["ASSETS", "PATHS", "add_routes", "asset"]

ASSETS = {
    "index.html": "text/html",
    "playground.js": "text/javascript",
    "playground.css": "text/css",
}
"""The files of the page and their content types."""

PATHS = ("/", "/playground/playground.js", "/playground/playground.css")
"""The URL paths the playground answers."""


def asset(name: str) -> bytes:
    """The bytes of one of the page's files, read from the installed package."""
    return resources.files(__name__).joinpath(name).read_bytes()


def add_routes(app: web.Application) -> None:
    """Serve the page at ``GET /`` and its script and style under ``/playground/``."""
    files = {name: asset(name) for name in ASSETS}

    def handler(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body = files[name]
        kind = ASSETS[name]
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if name == "index.html":  # only our own files; no eval, no inline script
            headers["Content-Security-Policy"] = (
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:"
            )

        async def serve(request: web.Request) -> web.Response:
            return web.Response(
                body=body,
                content_type=kind,
                charset="utf-8",
                headers=headers,
            )

        return serve

    app.router.add_get("/", handler("index.html"))
    app.router.add_get("/playground/playground.js", handler("playground.js"))
    app.router.add_get("/playground/playground.css", handler("playground.css"))
