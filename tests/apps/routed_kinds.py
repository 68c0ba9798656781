"""Routed-mode test apps of every adapter kind (WSGI, ASGI, asyncio), answering with their kind
and the client address they see."""
import os


def wsgi_app(environ, start_response):
    body = f"wsgi pid {os.getpid()} peer {environ.get('REMOTE_ADDR')}:{environ.get('REMOTE_PORT')}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    client = scope.get("client") or ("?", "?")
    body = f"asgi pid {os.getpid()} peer {client[0]}:{client[1]}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def aio_handler(reader, writer):
    peer = writer.get_extra_info("peername")
    while True:
        line = await reader.readline()
        if not line or line in (b"\r\n", b"\n"):
            break
    body = f"asyncio pid {os.getpid()} peer {peer[0]}:{peer[1]}\n".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()
