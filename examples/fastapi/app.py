"""A FastAPI app with a websocket, served by fugue (ASGI: uvicorn in every worker).

    pip install 'fugue-daemon[asgi]' fastapi
    cd examples/fastapi && fuguectl start -c fugue.toml
    # the same, as a gunicorn user would write it:
    #   fuguectl start -w 2 -b 127.0.0.1:8000 -k uvicorn.workers.UvicornWorker app:app
    curl http://127.0.0.1:8000/
    python3 -m websockets ws://127.0.0.1:8000/ws      # type a line, get it back

Edit VERSION and `fuguectl reload -c fugue.toml` (or kill -HUP the master): the new
generation takes over once it is ready; an edit that does not import is rolled back.
A websocket keeps its worker across a reload until it ends, or until graceful_timeout,
when it is closed with code 1012 (service restart) and the client reconnects.
"""

import os

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse

import fugue

VERSION = "v1"

app = FastAPI()


def whoami():
    return (f"fastapi worker {fugue.worker_id()} pid {os.getpid()} "
            f"generation {fugue.generation()} version {VERSION}")


@app.get("/", response_class=PlainTextResponse)
def hello():
    return f"hello from {whoami()}\n"


@app.websocket("/ws")
async def echo(websocket: WebSocket):
    await websocket.accept()
    await websocket.send_text(f"connected to {whoami()}")
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{text} (from {whoami()})")
    except WebSocketDisconnect:
        pass
