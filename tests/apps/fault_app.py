"""The app of the fault and hostile-input tests: app.py's handler plus ways to misbehave.

python fault_app.py BIND WORKERS [OPTIONS_JSON]; behaviour.json in the working
directory shapes the generation (or the master) that imports it, as for app.py, plus:
  {"threaded": false}     one thread: a request runs on the worker's loop thread
  {"stubborn": true}      the worker ignores SIGTERM and its drain never ends
  {"worker_gate": PATH}   workers hold READY back until PATH exists
  {"master_gate": PATH}   a new master (USR2) waits for PATH before it takes the listeners
  {"handoff": [STEP...]}  a new master speaks to the old one itself, then stops:
                          "garbage", "truncated", "oversized", "fds", "silent", "exit"
Extra endpoints: /hang (never answers), /leak?mb=N (keeps N MB), /channel?what=... (the
worker sends that junk to its master: garbage, truncated, oversized, fds, flood),
/fork?setsid=0|1 (a child forked without exec, so it holds the listeners, sleeps forever;
with setsid=1 it leaves the worker's process group: answers "forked PID").
"""

import array
import http.server
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse

import fugue
import fugue.worker

from app import BEHAVIOUR, Handler as AppHandler

IN_WORKER = fugue.worker_id() is not None
UPGRADING = not IN_WORKER and os.environ.get("FUGUE_UPGRADE_SOCK")
HOARD = []


def wait_for_file(path):
    while not os.path.exists(path):
        time.sleep(0.01)


def junk(sock, what):
    """Misbehave on a SOCK_SEQPACKET peer of a master."""
    if what == "garbage":
        sock.send(b"\xff\x00 not json at all")
    elif what == "truncated":
        sock.send(b'{"type": "ready", "pid": 12')
    elif what == "oversized":
        for size in (1 << 21, (1 << 20) + 1, 200000):  # bigger than MAX_FRAME if the kernel lets us
            try:
                sock.send(b"[" * size)
                break
            except OSError:
                continue
    elif what == "fds":
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]
        r, w = os.pipe()
        fds += [r, w]
        try:
            sock.sendmsg([b'{"type": "hb"}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            sock.sendmsg([b'{"type": "hb"}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds[:2]))])
            sock.sendmsg([b"junk"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds[:1]))])
        finally:
            for fd in fds:
                os.close(fd)
    elif what == "flood":
        for i in range(2000):
            try:
                sock.send(json.dumps({"type": "hb", "stats": {"requests": i}}).encode())
            except BlockingIOError:
                break
    elif what == "counter_flood":  # heartbeats whose app counters have ever-new names
        for i in range(400):
            try:
                sock.send(json.dumps({"type": "hb", "stats": {"requests": i, "counters": {
                    f"c{i}-{j}-" + "x" * 200: 1 for j in range(200)}}}).encode())
            except BlockingIOError:
                time.sleep(0.001)
    elif what == "status_flood":  # fugue.server_status() asked in a loop, answers never read
        for i in range(3000):
            try:
                sock.send(json.dumps({"type": "status_request", "seq": i + 1}).encode())
            except BlockingIOError:
                time.sleep(0.001)
    elif what == "bad_fields":  # known types, fields of the wrong kind
        for msg in ({"type": "stats_reply", "seq": {"a": 1}}, {"type": "stats_reply", "seq": [1]},
                    {"type": "status_request", "seq": [1]}, {"type": "hb", "stats": {"requests": "lots"}},
                    {"type": "hb", "stats": [1, 2]}, {"type": "failed", "reason": {"x": [1]}},
                    {"type": "ready", "pid": "me"}):
            sock.send(json.dumps(msg).encode())
    elif what == "valid_json_wrong_type":
        sock.send(b'["type", "ready"]')
        sock.send(b'{"type": 7}')
        sock.send(b'{"type": "no-such-message"}')


class Handler(AppHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/hang":
            threading.Event().wait()
        elif url.path == "/leak":
            block = bytearray(int(query.get("mb", 10)) << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1  # touch every page: RSS, not just address space
            HOARD.append(block)
            return self.answer(f"holding {sum(len(b) for b in HOARD) >> 20} MB")
        elif url.path == "/fork":
            pid = os.fork()
            if pid == 0:
                try:
                    if query.get("setsid") == "1":
                        os.setsid()
                    while True:
                        time.sleep(3600)
                finally:
                    os._exit(0)
            return self.answer(f"forked {pid}")
        elif url.path == "/channel":
            rt = fugue.worker.current
            for what in query.get("what", "garbage").split(","):
                junk(rt.channel, what)
            return self.answer("sent")
        return super().do_GET()

    def answer(self, text):
        data = (text + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def misbehave_as_new_master(steps):
    """Connect to the old master's handoff socket as the new master would, then misbehave."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(os.environ["FUGUE_UPGRADE_SOCK"])
    _, fds, _, _ = socket.recv_fds(sock, 1 << 20, 16)
    for fd in fds:
        os.close(fd)
    for step in steps:
        if step == "silent":
            threading.Event().wait()  # until the old master gives up on us
        elif step == "exit":
            os._exit(3)
        else:
            junk(sock, step)
    print("fault_app: misbehaved on the handoff socket", flush=True)
    os._exit(4)


def main():
    if UPGRADING and BEHAVIOUR.get("master_gate"):
        wait_for_file(BEHAVIOUR["master_gate"])
    if UPGRADING and BEHAVIOUR.get("handoff"):
        misbehave_as_new_master(BEHAVIOUR["handoff"])
    bind = sys.argv[1] if len(sys.argv) > 1 else "0"
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    if IN_WORKER and BEHAVIOUR.get("stubborn"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fugue.on_takedown(lambda: threading.Event().wait())
    if BEHAVIOUR.get("worker_gate"):
        options["wait_ready"] = True
        if IN_WORKER:
            threading.Thread(target=lambda: (wait_for_file(BEHAVIOUR["worker_gate"]), fugue.ready()),
                             daemon=True).start()
    if BEHAVIOUR.get("threaded", True):
        server = http.server.ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
        server.daemon_threads = True
    else:
        server = http.server.HTTPServer(("", 0), Handler, bind_and_activate=False)
    if bind.isdigit():
        fugue.start(server, int(bind), "127.0.0.1", workers, options)
    else:
        fugue.start(server, bind, workers, options)


if __name__ == "__main__":
    main()
