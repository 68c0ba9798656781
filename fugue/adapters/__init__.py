"""Adapters: one module per kind of server; `pick` chooses one for a target.

A kind is registered as (name, "module:Class"); modules are imported only when
tried, so an adapter whose server library is not installed costs nothing until
someone asks for it, and then says which extra to install.
"""

import importlib

# Order matters for "auto": the most specific test first.
KINDS = [
    ("socketserver", "fugue.adapters.sockserver:SocketServerAdapter", None),
    ("handler", "fugue.adapters.sockserver:HandlerAdapter", None),
    ("asgi", "fugue.adapters.asgi:AsgiAdapter", "asgi"),
    ("asyncio", "fugue.adapters.aio:AsyncioAdapter", None),
    ("wsgi", "fugue.adapters.wsgi:WsgiAdapter", "wsgi"),
    ("callable", "fugue.adapters.plain:CallableAdapter", None),
]


def load(name):
    """The adapter class registered as `name` (ImportError names the extra to install)."""
    for kind, path, extra in KINDS:
        if kind == name:
            module, _, cls = path.partition(":")
            try:
                return getattr(importlib.import_module(module), cls)
            except ImportError as e:
                hint = f" (pip install 'fugue-daemon[{extra}]')" if extra else ""
                raise ValueError(f"the {name} adapter cannot be loaded: {e}{hint}") from None
    raise ValueError(f"unknown adapter {name!r}; known: {', '.join(k for k, _, _ in KINDS)}")


def available():
    return [kind for kind, _, _ in KINDS]


def pick(target, options):
    """An adapter instance for `target`: the named one, or the first that accepts it."""
    name = options.get("adapter") or "auto"
    if name != "auto":
        return load(name)(target, options)
    missing = []
    for kind, path, _ in KINDS:
        try:
            cls = load(kind)
        except ValueError as e:
            missing.append(str(e))
            continue
        if cls.accepts(target):
            return cls(target, options)
    if missing:  # a Flask app without waitress: say what to install, not what fugue serves
        raise ValueError(f"fugue cannot serve a {type(target).__name__} with the adapters it can load; "
                         + "; ".join(missing))
    raise ValueError(f"fugue cannot serve a {type(target).__name__}: give a socketserver server, "
                     "a request handler class, a WSGI app (environ, start_response), an ASGI app "
                     "async (scope, receive, send), an asyncio handler async (reader, writer) or "
                     "protocol class, a serve(sock) callable, or set the adapter option")
