"""The browser playground: a static page at `/` and `/playground` that talks to this server's own
`/v1/*` API with `fetch`, like any other client (so it needs the API key, if any, for those calls).

Plain HTML, CSS and JavaScript from `server/static/`, shipped as package data: no CDN, no build step.
`chatserve serve --no-playground` leaves it out.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
PAGE = STATIC_DIR / "playground.html"
ASSETS_PATH = "/playground/static"

# The page loads only its own files and talks only to this origin: nothing from a CDN, works offline.
# Images are data: URLs (from the file picker) and blob:s; no inline scripts or style attributes.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'; form-action 'none'"
)
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def mount_playground(app: FastAPI) -> None:
    """Serve the page at `/` and `/playground`, its files under `/playground/static/`."""

    async def page():
        return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def slash():
        return RedirectResponse("/playground", status_code=308)

    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/playground", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/playground/", slash, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="playground-static")
