"""A worker running its app: load the target (app, script or module), the startup
check, pick the adapter and serve until stopped; the worker's exit status.

Who calls it: `python -m fugue._boot` calls `main()` (attach to the master, become
the worker: fugue.worker, then `run_target`); fugue.start in a worker calls `serve`;
a preload mold (fugue.mold) runs `run_target` and, in each forked worker, goes on in
`serve`. A failure before the app serves is one line to the master (Runtime.fail)
and exit 1; no application code runs before privileges were dropped.
"""

import json
import logging
import os
import runpy
import sys
import traceback

from . import protocol, worker
from .adapters.base import describe_exception
from .worker import WorkerExit
from .workers import ENV_CHANNEL, ENV_TARGET

log = logging.getLogger("fugue")

# Options the worker takes from the app's own fugue.start call (the new code), not the master.
APP_OWNED = ("wait_ready", "startup_check", "adapter")
# Adapters that run the `warmup` requests (an http.server handler under socketserver/handler).
HTTP_KINDS = ("wsgi", "asgi", "socketserver", "handler")

def resolve(spec):
    """'module:attr.sub' -> the object."""
    import importlib

    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def serve(target, local_options=None):
    """Run `target` in this worker until it is stopped. Called by fugue.start in a worker.

    In a preload mold (fugue.mold) the first half runs once in the mold, which then
    forks the workers; each forked worker returns from `fork_workers` and goes on here.
    """
    rt = worker.current
    checked = False
    if getattr(rt, "is_mold", False):
        rt.fork_workers(target, local_options)  # mold.MoldRuntime: returns only in a forked worker
        rt, checked = worker.current, True
    opts = dict(rt.options)
    # What the new code says about itself wins: it is what is being deployed.
    local = {k: v for k, v in (local_options or {}).items() if k in APP_OWNED or callable(v)}
    opts.update(local)
    if "wait_ready" in local:  # an early fugue.ready() counts; wait_ready=False in the new code too
        rt._app_ready = rt._ready_called or not local["wait_ready"]
    if not checked:
        run_startup_check(rt, opts.get("startup_check"))
    rt.run_after_fork()
    from .adapters import pick

    try:
        adapter = pick(target, opts)
    except Exception as e:  # noqa: BLE001
        rt.fail(str(e))
    rt.adapter = adapter
    if opts.get("warmup") and adapter.kind not in HTTP_KINDS:
        log.warning("warmup skipped: the %s adapter does not speak HTTP", adapter.kind)
    try:
        adapter.run(rt)
    except Exception as e:  # noqa: BLE001 - the server library failed: the master's line says why
        log.exception("the %s adapter failed", adapter.kind)
        rt._send(protocol.FAILED, reason=f"the {adapter.kind} adapter failed: {describe_exception(e)}")
        raise WorkerExit(1) from None
    raise WorkerExit(0)


def run_startup_check(rt, check):
    """The startup_check option: in each exec'd worker, or once in a preload mold."""
    if not check:
        return
    try:
        fn = resolve(check) if isinstance(check, str) else check
        fn()
    except Exception as e:  # noqa: BLE001 - any failure of the check fails the worker
        rt.fail(f"startup_check failed: {describe_exception(e)}")


def run_target(rt, target):
    """Import and run the app named by `target` (app, script or module); never returns.

    A failure before the app serves is one line on the channel (rt.fail) and exit 1.
    """
    status = 0
    try:
        if not rt.is_mold:  # a forked worker opens its own after the fork (fugue.mold)
            worker._open_access_log(rt)
        if "app" in target:
            try:
                obj = resolve(target["app"])
            except Exception as e:  # noqa: BLE001 - the reason goes to the master
                worker.current.fail(describe_exception(e))
            serve(obj)
        elif "script" in target:
            sys.argv = list(target.get("argv") or [target["script"]])
            sys.path.insert(0, os.path.dirname(target["script"]))
            try:
                runpy.run_path(target["script"], run_name="__main__")
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as e:  # noqa: BLE001 - SyntaxError, ImportError, anything
                traceback.print_exc()
                worker.current.fail(describe_exception(e))
            worker.current.fail("the script returned without calling fugue.start()")
        elif "module" in target:
            sys.argv = [target["module"]] + list(target.get("argv") or [])[1:]
            try:
                runpy.run_module(target["module"], run_name="__main__", alter_sys=True)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as e:  # noqa: BLE001
                traceback.print_exc()
                worker.current.fail(describe_exception(e))
            worker.current.fail(f"module {target['module']} returned without calling fugue.start()")
        else:
            worker.current.fail(f"unknown worker target {target!r}")
    except WorkerExit as e:
        status = e.code
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        # current, not rt: in a worker forked from a mold, current is the worker's runtime.
        if not worker.current._ready_sent and status:
            worker.current._send(protocol.FAILED, reason=f"the app exited with status {status} before it was ready")
    finally:
        sys.stdout.flush() if sys.stdout else None
        sys.stderr.flush() if sys.stderr else None
    os._exit(status or 0)


def main():
    fd = int(os.environ.pop(ENV_CHANNEL))
    target = json.loads(os.environ.pop(ENV_TARGET, "{}"))
    rt = worker.become_worker(*worker.attach(fd))
    run_target(rt, target)
