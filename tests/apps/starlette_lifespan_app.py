"""A Starlette app with lifespan handlers, for the preload framework check.

The lifespan startup must run in each worker (its own event loop), never in the mold.
"""

import contextlib
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


@contextlib.asynccontextmanager
async def lifespan(app):
    with open("lifespan.log", "a") as f:
        f.write(f"startup {os.getpid()}\n")
    app.state.started_in = os.getpid()
    yield


async def index(request):
    return JSONResponse({"pid": os.getpid(), "started_in": request.app.state.started_in})


app = Starlette(routes=[Route("/", index)], lifespan=lifespan)
