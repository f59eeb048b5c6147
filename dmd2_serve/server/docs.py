"""``/docs`` and ``/redoc`` that work on an air-gapped host.

FastAPI's documentation pages load Swagger UI's and ReDoc's script and style from cdn.jsdelivr.net,
so on a GPU host without internet they stay blank. The same assets ship in the ``fastapi-offline``
wheel (Swagger UI 5, which reads the OpenAPI 3.1 schema FastAPI writes); this module serves them
from there and points the two pages at them, with FastAPI's own page templates.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request

ASSETS_PATH = "/docs-assets"  # where the bundled scripts and styles are served
PAGES = ("/docs", "/redoc")


def assets_folder() -> Path | None:
    """The folder of Swagger UI's and ReDoc's files in the installed ``fastapi-offline`` (None: not installed)."""
    try:
        return Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None


def serve_docs_offline(app: FastAPI) -> str | None:
    """Replace ``app``'s ``/docs`` and ``/redoc`` with pages whose scripts and styles it serves itself
    (under :data:`ASSETS_PATH`); the schema stays at ``app.openapi_url``, and FastAPI's OAuth2 redirect
    page (no assets) stays as it is. Returns why the pages were left as FastAPI's, if they were (a
    dependency, so missing only from an install made with ``--no-deps``)."""
    folder = assets_folder()
    if folder is None:
        return ("/docs and /redoc load their scripts from cdn.jsdelivr.net (blank without internet):"
                " pip install fastapi-offline for pages that work offline")
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in PAGES]
    app.mount(ASSETS_PATH, StaticFiles(directory=folder), name="docs-assets")
    redirect = app.swagger_ui_oauth2_redirect_url

    def root(request: Request) -> str:  # behind a proxy's path prefix (as FastAPI's own pages: no trailing /)
        return str(request.scope.get("root_path", "")).rstrip("/")

    def assets(request: Request) -> str:
        return f"{root(request)}{ASSETS_PATH}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=f"{root(request)}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root(request)}{redirect}" if redirect else None, init_oauth=app.swagger_ui_init_oauth,
            swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets(request)}/swagger-ui.css",
            swagger_favicon_url=f"{assets(request)}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=f"{root(request)}{app.openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets(request)}/redoc.standalone.js",
            redoc_favicon_url=f"{assets(request)}/favicon.png", with_google_fonts=False)
    return None
