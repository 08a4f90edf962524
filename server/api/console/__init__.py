"""The web console: a single-page app at /console over the server's own public API, plus the few JSON endpoints it
needs that the API does not have yet.

Why it lives in the server process: the people it is for (a product manager who uploads examples, starts a run
and ships the result) should not have to run anything beside `loraplex serve`. The page is static files shipped in
the Python package (`static/`, with uPlot vendored as its built file, pinned by `package.json` /
`package-lock.json`), so no Node.js is needed at run time; everything it shows comes from HTTP calls any client
could make, with the signed-in key sent as `Authorization: Bearer ...`. What the page shows is decided by the
key's scopes from `GET /v1/me`; the server still enforces them on every call, the page only hides what would fail.

The endpoints of our own (`api.py`) are small and cheap: a per-version metrics summary computed from the
telemetry's in-memory window on a worker thread (never on the event loop), a dataset preview that checks an
uploaded file the way the trainer will before any job exists, the planned steps of a job's `method` from the
trainer's own resolver, and a one-click canary for a finished job that reuses the trainer's canary split. Jobs
themselves are created through the fine-tuning API, with the body an API client would send.
"""
from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"


def console_routes(state) -> list:
    """The routes to add to the server's app: the page at /console and the console's JSON endpoints."""
    from starlette.responses import RedirectResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from .api import ConsoleApi

    api = ConsoleApi(state)

    async def to_slash(request):
        return RedirectResponse("/console/", status_code=307)

    return [
        *api.routes(),
        Route("/console", to_slash, methods=["GET"]),
        Mount("/console", app=StaticFiles(directory=STATIC_DIR, html=True), name="console"),
    ]
