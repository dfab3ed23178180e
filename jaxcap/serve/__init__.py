"""``jaxcap serve``: a trained run behind an HTTP endpoint, with dynamic batching.

* ``app``: the endpoints (``POST /v1/captions``, ``GET /v1/model``, ``/healthz``,
  ``/readyz``, the page at ``/``), what a request meets on its way, and the
  service's health;
* ``limits``: every bound the server keeps and the guards that hold it (the body
  limit, the search options' ranges, the decode budget);
* ``batcher``: the queue, the dynamic batches and the compiled programs they run.

Why FastAPI on uvicorn: the API documents itself (``/docs``, ``/openapi.json``)
from the same declarations that parse and check the requests, multipart
uploads come with it, and it is plain ASGI, so the body limit and the batcher
are ordinary asyncio code. The page at ``/`` is one static HTML file.
"""

from jaxcap.serve.app import Served, Service, check_arguments, create_app, main
from jaxcap.serve.batcher import DynamicBatcher, QueueFull
from jaxcap.serve.limits import BodyLimit, Limits, OptionError, ServeError

__all__ = ["BodyLimit", "DynamicBatcher", "Limits", "OptionError", "QueueFull", "ServeError",
           "Served", "Service", "check_arguments", "create_app", "main"]
