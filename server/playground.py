"""``GET /playground``: the A/B playground, static files (HTML, CSS, a few JS modules) served from the package.

No build step and nothing from a CDN: the page works offline and inside the container. It only talks to this
server's own ``/v1`` API, so it needs no route of its own beyond these files (``--no-playground`` leaves them out).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import APIError

STATIC_DIR = Path(__file__).parent / "static"
_JAVASCRIPT = "text/javascript; charset=utf-8"  # browsers run an ES module only when it is served as JavaScript
_ASSETS = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": _JAVASCRIPT,  # the page's entry module; the others are what it imports
    "api.js": _JAVASCRIPT,
    "column.js": _JAVASCRIPT,
    "dom.js": _JAVASCRIPT,
    "edit.js": _JAVASCRIPT,
    "repro.js": _JAVASCRIPT,
    "stats.js": _JAVASCRIPT,
    "structured.js": _JAVASCRIPT,
}
# The page loads only same-origin files and talks only to this server: a browser that honours the policy refuses
# anything else (a stray CDN link, an injected script) instead of fetching it.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgraded server never runs an old script
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/playground")
async def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "playground.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/playground/{name}")
async def playground_asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)  # an allow-list: no path from the URL ever reaches the file system
    if media_type is None:
        raise APIError(404, f"no playground file {name!r}", code="not_found")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)
