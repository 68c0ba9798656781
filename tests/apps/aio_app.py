"""An asyncio connection handler speaking just enough HTTP/1.1 (GET, keep-alive).

It ends keep-alive itself when fugue drains (fugue.on_takedown): the next
request on a connection is answered with Connection: close, never dropped.
"""

import asyncio
import urllib.parse

import fugue
from kit import greeting, main

draining = asyncio.Event()
fugue.on_takedown(draining.set)


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            url = urllib.parse.urlsplit(target)
            if url.path == "/slow":
                await asyncio.sleep(float(dict(urllib.parse.parse_qsl(url.query)).get("s", 1)))
            close = draining.is_set() or b"connection: close" in head.lower()
            body = greeting("asyncio").encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
                         % (len(body), b"Connection: close\r\n" if close else b"") + body)
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


if __name__ == "__main__":
    main(handle)
