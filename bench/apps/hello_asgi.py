"""Hello ASGI app for the overhead benchmark: the twin of hello_wsgi.py.

    hello from pid 4242

Answers lifespan (startup/shutdown complete) so every server runs it the same
way, and every HTTP request with a short text body and a Content-Length, so
keep-alive works under every server.
"""

import os



async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    # Built per request, as hello_wsgi does: a server that forks after
    # importing the app must still say which process answered.
    body = f"hello from pid {os.getpid()}\n".encode("ascii")
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
