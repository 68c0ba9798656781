"""A WSGI app (served by waitress): / greets, /slow?s=N sleeps first, /crash at import via behaviour."""

import time
import urllib.parse

from kit import greeting, main


def app(environ, start_response):
    query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
    if environ["PATH_INFO"] == "/slow":
        time.sleep(float(query.get("s", 1)))
    body = greeting("wsgi").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


if __name__ == "__main__":
    main(app)
