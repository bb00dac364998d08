"""GET /: the web chat page (plain HTML/CSS/JS shipped in the package, talking to POST /chat)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parent.parent / "static"
# Only the page's own files are served (never anything else on disk), with fixed types.
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# The page loads nothing from elsewhere: no CDN, no inline script, media previews from blob: URLs.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False, tags=["web"])


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    headers = {**HEADERS, "Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"}
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=headers)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file '{name}'")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
