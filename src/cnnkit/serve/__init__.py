"""Serve a trained run over HTTP: `cnnkit serve RUN` (a page to draw or upload on, and a JSON API).

Needs the optional `serve` extra (FastAPI, uvicorn, python-multipart): `pip install 'cnnkit[serve]'`.
Importing this package does not import them; `create_app` and `serve` do, and say how to install them
when they are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cnnkit.errors import CnnkitError

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["create_app", "serve"]

_SERVE_MODULES = {"fastapi", "starlette", "pydantic", "uvicorn", "python_multipart", "multipart"}


def _app_module():
    try:
        from cnnkit.serve import app
    except ImportError as error:
        if (error.name or "").split(".")[0] not in _SERVE_MODULES:
            raise
        raise CnnkitError(f"serving needs FastAPI, uvicorn and python-multipart ({error.name} is not installed): "
                          "pip install 'cnnkit[serve]'") from None
    return app


def create_app(run_dir: str | Path, max_upload_mb: float = 10, **options) -> FastAPI:
    """The FastAPI app serving the run in `run_dir`; see cnnkit.serve.app.create_app."""
    return _app_module().create_app(run_dir, max_upload_mb, **options)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10,
          **options) -> None:
    """Serve the run until Ctrl+C, on 127.0.0.1 unless told otherwise; see cnnkit.serve.app.serve."""
    _app_module().serve(run_dir, host, port, max_upload_mb, **options)
