#!/usr/bin/env python3
"""Python servers under fugue: `--app` against uvicorn or gunicorn run as a foreign program.

    python3 bench/foreign.py                 # 5 reloads each, about a minute
    python3 bench/foreign.py --reloads 10

The same ASGI app (bench/apps/hello_asgi.py) is served by fugue three ways, 2 workers each:

    fugue --app                fuguectl start --app hello_asgi:app (uvicorn inside fugue's worker)
    uvicorn --fd 3 (foreign)   fuguectl start -- python -m uvicorn --fd 3 hello_asgi:app
    gunicorn (foreign)         fuguectl start -- python -m gunicorn -w 1
                               -k uvicorn.workers.UvicornWorker hello_asgi:app
                               (gunicorn finds the listener through LISTEN_FDS)

and reloaded (HUP) `reloads` times under loadgen.Load (32 keep-alive connections, every
request counted once: a success or one failure kind), waiting after each HUP for fugue's
"reload done" and for the old generation to be gone. The table gives the requests lost per
reload. The point: a foreign server drains on its own terms (uvicorn closes idle keep-alive
connections at once on SIGTERM, which races clients reusing them); with --app, fugue runs
the drain itself and keeps idle connections open until their client's next request.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time

try:  # run as a script (python3 bench/foreign.py) or imported as bench.*
    import contenders
    import proctree
    from loadgen import Load
except ModuleNotFoundError as e:
    if e.name not in ("contenders", "proctree", "loadgen"):
        sys.exit(f"{e.name} is not installed: pip install {e.name}")
    from bench import contenders, proctree
    from bench.loadgen import Load

WORKERS = 2
CONNS = 32


def scenarios(tmp: str) -> list:
    def sub(name):
        path = os.path.join(tmp, name)
        os.mkdir(path)
        return path

    py = sys.executable
    out = [
        ("fugue --app", contenders.FugueServer(sub("app"), "hello_asgi:app", WORKERS)),
        ("uvicorn --fd 3 (foreign)", contenders.FugueServer(
            sub("uvicorn"), workers=WORKERS,
            command=[py, "-m", "uvicorn", "--fd", "3", "--no-access-log", "hello_asgi:app"])),
    ]
    worker_class = contenders.uvicorn_worker_class()
    if worker_class:
        out.append((f"gunicorn -k {worker_class} (foreign)", contenders.FugueServer(
            sub("gunicorn"), workers=WORKERS,
            # gunicorn takes LISTEN_FDS itself (its systemd support): no -b
            command=[py, "-m", "gunicorn", "-w", "1", "-k", worker_class, "hello_asgi:app"])))
    return out


def reload_under_load(server, reloads: int) -> dict:
    load = Load("127.0.0.1", server.port, conns=CONNS, timeout=10.0).start()
    t0 = time.monotonic()
    try:
        time.sleep(1.0)  # a steady load before the first reload (a measurement window)
        for i in range(reloads):
            generation = i + 2
            offset = server.log_size()
            os.kill(server.master, signal.SIGHUP)
            proctree.wait_for(lambda: re.search(rf"reload done: generation {generation} serving",
                                                server.log_text(offset)), 60, f"reload {generation}")
            proctree.wait_for(lambda: len(re.findall(rf"generation {generation - 1}\) (?:stopped|killed)",
                                                     server.log_text(offset))) >= WORKERS,
                              90, f"generation {generation - 1} gone")
    finally:
        result = load.stop()
    return {"requests": result.requests, "failed": result.failed, "kinds": result.failures_text(),
            "seconds": time.monotonic() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=5)
    args = parser.parse_args(argv)
    absent = contenders.missing("uvicorn", "gunicorn")
    if absent:
        print(f"missing Python packages: pip install {' '.join(absent)}", file=sys.stderr)
        return 2
    proctree.become_subreaper()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fugue-bench-foreign-") as tmp:
        for label, server in scenarios(tmp):
            try:
                server.start()
                r = reload_under_load(server, args.reloads)
            finally:
                server.close()
            rows.append((label, r))
            print(f"  {label}: {r['requests']} requests, {r['failed']} failed", file=sys.stderr)
    print(f"{WORKERS} workers, {args.reloads} HUPs under {CONNS} keep-alive connections each; "
          f"{os.cpu_count()} CPUs shared by the load and the servers\n")
    print("| served by | requests | failed | failed per reload | failures by kind |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['requests']} | {r['failed']} | {r['failed'] / args.reloads:.1f} | "
              f"{r['kinds'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
