"""The dashboard's HTTP interface (Starlette): pages, their main sections, their models as JSON, and the
server-sent event stream of changes.

==========================  ====================================================================
``GET /``                   redirects to ``/cluster``
``GET /{page}``             the whole page (pages: model.PAGES)
``GET /fragment/{page}``    its main section alone (what the page's script fetches on a change)
``GET /api/{page}``         its model as JSON
``GET /events``             server-sent events: ``change`` with the changed tables, comma-separated
``GET /static/...``         the script, the style sheet and the vendored chart library (uPlot)
==========================  ====================================================================

An unknown page is a 404 naming the pages. The models read the control store with blocking calls: they run
in Starlette's worker threads, never on the event loop that serves the event streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tessera.dashboard import render
from tessera.dashboard.live import PAGE_TABLES, Broadcaster
from tessera.dashboard.model import PAGES, Source, page_model

STATIC = Path(__file__).parent / "static"
#: Sent with every page and model: a page is always the cluster as it is now.
NO_STORE = {"Cache-Control": "no-store"}


def create_app(source: Source, broadcaster: Broadcaster, *, jaeger_ui_url: str = "",
               heartbeat_s: float = 15.0) -> Starlette:
    """The ASGI app over ``source`` (the cluster), with change events from ``broadcaster``."""

    async def model(name: str) -> dict[str, Any]:
        return await run_in_threadpool(page_model, name, source, jaeger_ui_url)

    def known(handler: Callable[[str], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            name = request.path_params["page"]
            if name not in PAGES:
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": f"unknown page {name!r}", "pages": list(PAGES)}, status_code=404)
                return HTMLResponse(render.not_found(name), status_code=404)
            out: Response = await handler(name)
            return out

        return endpoint

    async def page(name: str) -> Response:
        return HTMLResponse(render.page(await model(name)), headers=NO_STORE)

    async def fragment(name: str) -> Response:
        return HTMLResponse(render.main(await model(name)), headers=NO_STORE)

    async def api(name: str) -> Response:
        return JSONResponse(await model(name), headers=NO_STORE)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            async for tables in broadcaster.changes(heartbeat_s=heartbeat_s):
                if await request.is_disconnected():
                    return
                yield f"event: change\ndata: {','.join(sorted(tables))}\n\n" if tables else ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def index(_: Request) -> Response:
        return RedirectResponse("/cluster")

    async def tables(_: Request) -> Response:
        return JSONResponse({p: sorted(t) for p, t in PAGE_TABLES.items()})

    return Starlette(routes=[
        Route("/", index),
        Route("/events", events),
        Route("/page-tables", tables),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/fragment/{page}", known(fragment)),
        Route("/api/{page}", known(api)),
        Route("/{page}", known(page)),
    ])
