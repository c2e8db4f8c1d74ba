"""``maskrcnn serve``: a model behind a local web page and a JSON API (Starlette, served by uvicorn).

Needs the ``serve`` extra (``pip install -e ".[serve]"``: starlette, uvicorn, python-multipart). See
:mod:`maskrcnn.serve.app` for the endpoints, their errors and limits, and :mod:`maskrcnn.serve.page` for
the page.
"""

from maskrcnn.serve.app import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    Predictor,
    RequestError,
    bind_socket,
    create_app,
    serve,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "Predictor",
    "RequestError",
    "bind_socket",
    "create_app",
    "serve",
]
