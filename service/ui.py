"""The web dashboard: static HTML/JS from ``service/static/`` at ``/ui`` (no build step, no CDN).

The page itself needs no key; it asks for one and sends it as ``Authorization: Bearer`` on every API
call, so the dashboard sees exactly what the key's organization sees through the API.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

STATIC_DIR = Path(__file__).resolve().parent / "static"


def ui_router() -> Router:
    return create_static_files_router(
        path="/ui", directories=[STATIC_DIR], html_mode=True, name="ui", include_in_schema=False,
        cache_control=CacheControlHeader(no_cache=True),
    )
