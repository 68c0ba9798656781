"""An ASGI 3 app (served by uvicorn) with a lifespan: / greets, /slow?s=N sleeps first.

behaviour.json {"lifespan_fails": true} makes its lifespan startup fail.
"""

import asyncio
import urllib.parse

from kit import BEHAVIOUR, IN_WORKER, greeting, main

state = {"started": False}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if IN_WORKER and BEHAVIOUR.get("lifespan_fails"):
                    await send({"type": "lifespan.startup.failed", "message": "no database on purpose"})
                    return
                state["started"] = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode()))
    if scope["path"] == "/slow":
        await asyncio.sleep(float(query.get("s", 1)))
    body = greeting(f"asgi lifespan={state['started']}").encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    main(app)
