"""The playground: a chat page for people, served from the package's own `web/` folder at `/playground`.

This module owns the page's routes and their security headers. `/playground` and `/playground/` answer the
page; `/playground/<file>` answers only the files shipped in `qwen_api/web` (a fixed list read at startup,
so no path from a request ever reaches the file system). Every answer carries a Content-Security-Policy that
lets the page load scripts and styles from this server alone and talk to nothing else, so even text that
slipped into the page as markup could neither run inline script nor send anything elsewhere. The page is
open like `/`: it holds no secret, and the API calls it makes carry the key the person types in.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

# 'none' by default; each kind of resource the page needs is allowed from this origin only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded server's page is seen at once
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """Every servable file of `qwen_api/web`, by name: its bytes and media type."""
    web = files("qwen_api") / "web"
    assets = {}
    for entry in web.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in MEDIA_TYPES:
            assets[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    if "index.html" not in assets:
        raise RuntimeError("the playground's files are missing from the qwen_api package (qwen_api/web)")
    return assets


def create_router() -> APIRouter:
    """The playground's routes, with the page's files read once from the installed package."""
    assets = _load_assets()
    router = APIRouter(include_in_schema=False)

    def answer(name: str) -> Response:
        if name not in assets:
            raise HTTPException(status_code=404, detail="Not Found")
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    @router.get("/playground")
    @router.get("/playground/")
    async def page() -> Response:
        return answer("index.html")

    @router.get("/playground/{name}")
    async def asset(name: str) -> Response:
        return answer(name)

    return router
