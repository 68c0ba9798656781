"""A plain serve(sock) callable that knows nothing about stopping: the usual
accept loop. fugue ends it by making accept() fail once the worker drains; the
connection threads it started finish on their own (keep-alive is answered with
Connection: close by checking fugue.worker's drain state)."""

import threading

from kit import main
from plain_app import Handler, client  # noqa: F401 - the same HTTP handler


class Draining:
    """plain_app's Handler asks STOP.is_set(): here that is the worker's drain state."""

    def is_set(self):
        import fugue.worker

        return bool(fugue.worker.current and fugue.worker.current.draining)


def serve(sock):
    import plain_app

    plain_app.STOP = Draining()
    while True:
        conn, addr = sock.accept()  # raises OSError when fugue drains: serve() ends
        threading.Thread(target=client, args=(conn, addr)).start()


if __name__ == "__main__":
    main(serve)
