"""A FastAPI app with a websocket, for the preload framework check."""

import os

from fastapi import FastAPI, WebSocket

app = FastAPI()


@app.get("/")
def index():
    return {"pid": os.getpid()}


@app.websocket("/ws")
async def echo(ws: WebSocket):
    await ws.accept()
    while True:
        text = await ws.receive_text()
        await ws.send_text(f"echo {text} from {os.getpid()}")
