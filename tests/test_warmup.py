"""warmup: a new worker GETs its own app before READY; a deploy that cannot serve is rolled back
with the path, the status and the exception in the reason. And the reasons of the failures
that happen before READY elsewhere: ASGI lifespan startup, a foreign program's last stderr line."""

import json
import re
import signal
import textwrap

import pytest

DJANGO_FILES = {
    "mysite/__init__.py": "",
    "mysite/settings.py": """
        SECRET_KEY = "test-only"
        DEBUG = False
        ALLOWED_HOSTS = ["*"]
        ROOT_URLCONF = "mysite.urls"
        INSTALLED_APPS = []
        MIDDLEWARE = []
        DATABASES = {}
        USE_TZ = True
        """,
    "mysite/urls.py": """
        from django.urls import path

        from . import views

        urlpatterns = [path("", views.index)]
        """,
    "mysite/views.py": """
        import os

        from django.http import HttpResponse


        def index(request):
            return HttpResponse(f"django version 1 pid {os.getpid()}")
        """,
    "mysite/wsgi.py": """
        import os

        from django.core.wsgi import get_wsgi_application

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
        application = get_wsgi_application()
        """,
}


def write_files(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))


def test_django_syntax_error_in_views_is_rolled_back_with_the_reason(fugue_proc, workdir):
    pytest.importorskip("django")
    write_files(workdir, DJANGO_FILES)
    (workdir / "fugue.toml").write_text(
        'app = "mysite.wsgi:application"\nbind = ["127.0.0.1:0"]\nworkers = 2\nwarmup = ["/"]\n')
    p = fugue_proc(["fuguectl", "start", "-c", "fugue.toml"]).started()
    assert p.body().startswith("django version 1")
    # Django imports the URL modules on the first request: the import passes, the requests fail.
    views = workdir / "mysite" / "views.py"
    views.write_text(views.read_text().replace("version 1", "version 2") + "\ndef broken(:\n    pass\n")
    p.signal(signal.SIGHUP)
    line = p.wait_log(r"reload failed: .*; generation 1 keeps serving").group(0)
    assert re.search(r"warmup GET / answered 500: SyntaxError: .* \(views\.py, line 9\)", line), line
    assert all(p.body().startswith("django version 1") for _ in range(6))
    p.wait_log(r"(?m)\] (INFO|ERROR) worker \d \(pid \d+, generation 2\) (killed|stopped|exited)", count=2)
    # Fixed, the next reload goes through.
    views.write_text(views.read_text().replace("\ndef broken(:\n    pass\n", ""))
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 3 serving")
    assert all(p.body().startswith("django version 2") for _ in range(6))


WSGI_BROKEN = """
    import os

    from kit import main


    def app(environ, start_response):
        if environ["PATH_INFO"] == "/health" and os.path.exists("broken"):
            raise LookupError(f"no database at {environ['HTTP_HOST']}")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok " + environ["HTTP_HOST"].encode()]


    if __name__ == "__main__":
        main(app)
    """

HANDLER_BROKEN = """
    import http.server
    import os

    from kit import main


    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health" and os.path.exists("broken"):
                self.send_error(503, "database down")
                return
            if self.path == "/health" and os.path.exists("raises"):
                raise ZeroDivisionError("division by zero in the handler")
            body = b"ok " + self.headers["Host"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass


    if __name__ == "__main__":
        main(Handler)
    """

ASGI_BROKEN = """
    import os

    from kit import main


    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if os.path.exists("lifespan"):
                        await send({"type": "lifespan.startup.failed",
                                    "message": "Traceback (most recent call last):\\n"
                                               '  File "app.py", line 12, in startup\\n'
                                               "ConnectionRefusedError: no database on port 5432"})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/health" and os.path.exists("broken"):
            raise KeyError("template base.html")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        host = dict(scope["headers"])[b"host"]
        await send({"type": "http.response.body", "body": b"ok " + host})


    if __name__ == "__main__":
        main(app)
    """

KINDS = [
    ("wsgi", WSGI_BROKEN, "broken", r"warmup GET /health answered 500: LookupError: no database at 127\.0\.0\.1:\d+ "
                                    r"\(served\.py, line \d+\)"),
    ("handler-5xx", HANDLER_BROKEN, "broken", r"warmup GET /health answered 503"),
    ("handler-raises", HANDLER_BROKEN, "raises", r"warmup GET /health failed: ZeroDivisionError: division by zero "
                                                 r"in the handler \(served\.py, line \d+\)"),
    ("asgi", ASGI_BROKEN, "broken", r"warmup GET /health answered 500: KeyError: 'template base\.html' "
                                    r"\(served\.py, line \d+\)"),
    ("asgi-lifespan", ASGI_BROKEN, "lifespan", r"ASGI lifespan startup failed: ConnectionRefusedError: no database "
                                               r"on port 5432 \(app\.py, line 12\)"),
]


@pytest.mark.parametrize("kind, source, flag, reason", KINDS, ids=[k[0] for k in KINDS])
def test_warmup_fails_the_reload_with_the_reason(fugue_proc, workdir, kind, source, flag, reason):
    (workdir / "served.py").write_text(textwrap.dedent(source).lstrip("\n"))
    p = fugue_proc(["served.py", "0", "2", json.dumps({"warmup": ["/", "/health"]})]).started()
    assert p.body().startswith(f"ok 127.0.0.1:{p.port}")
    (workdir / flag).write_text("")
    p.signal(signal.SIGHUP)
    line = p.wait_log(r"reload failed: .*; generation 1 keeps serving").group(0)
    assert re.search(reason, line), line
    assert p.body().startswith("ok ")
    p.wait_log(r"(?m)\] (INFO|ERROR) worker \d \(pid \d+, generation 2\) (killed|stopped|exited)", count=2)
    (workdir / flag).unlink()
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload done: generation 3 serving")
