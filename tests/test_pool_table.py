"""The worker pool's bookkeeping as tables (fugue.pool): what an exit means, what a kill does.

No worker process: a FakeSystem "spawns" pids and records signals; the channels are
real socketpairs (HELLO really goes out). The process tests (test_core.py,
test_faults.py) are the proof; these are the spec of Pool.exited and Pool.kill.
"""

import signal
import socket

import pytest

from fugue import policy
from fugue.config import build
from fugue.loop import Loop
from fugue.policy import WorkerState
from fugue.pool import Pool
from fugue.system import System


class FakeSystem(System):
    def __init__(self):
        self.now = 100.0
        self.next_pid = 5000
        self.killed = []

    def monotonic(self):
        return self.now

    def kill(self, pid, signum=signal.SIGKILL):
        self.killed.append((pid, signum))

    def spawn_worker(self, argv, env, identity, working_path, stdout_fd, child_fd, target=None,
                     foreign_fds=None, loop=None, stderr_fd=None):
        self.next_pid += 1
        return self.next_pid


class Logs:
    worker_fd = None


@pytest.fixture
def pool(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    from fugue.fds import Listener

    cfg = build({"workers": 2, "graceful_timeout": 5}, start_dir=str(tmp_path))
    loop = Loop()
    p = Pool(cfg, {"app": "x:y"}, None, Logs(), [Listener(listener, "http", "127.0.0.1:0")], loop, "t",
             on_request=lambda w, msg: None, system=FakeSystem())
    yield p
    for w in list(p.workers.values()):
        w.channel.close()
    loop.close()
    listener.close()


EXIT_0, EXIT_1, KILLED = 0, 1 << 8, signal.SIGKILL

# (worker state, its generation, exit status, pending generation, serving generation, stopping)
#   -> (the rollback reason returned?, the slot refilled after a backoff?)
ROWS = [
    (WorkerState.READY, 1, EXIT_1, None, 1, None, False, True),        # a serving worker crashed
    (WorkerState.STARTING, 1, EXIT_1, None, 1, None, False, True),     # ... before READY
    (WorkerState.DRAINING, 1, EXIT_0, None, 2, None, False, False),    # retired cleanly
    (WorkerState.DRAINING, 1, EXIT_1, None, 1, "graceful", False, False),  # stopping
    (WorkerState.KILLED, 1, KILLED, None, 1, None, False, True),       # hung, killed: refill
    (WorkerState.KILLED, 1, KILLED, None, 1, "quick", False, False),   # quick stop
    (WorkerState.STARTING, 2, EXIT_1, 2, 1, None, True, False),        # the reload fails: roll back
    (WorkerState.READY, 2, KILLED, 2, 1, None, True, False),           # ... even once READY
    (WorkerState.KILLED, 2, KILLED, 2, 1, None, False, False),         # killed by the rollback itself
    (WorkerState.READY, 1, EXIT_1, 2, 1, None, False, True),           # the serving one during a reload
    (WorkerState.READY, 1, EXIT_1, None, 2, None, False, False),       # an old generation's
]


@pytest.mark.parametrize("state, gen, status, pending, serving, stopping, rolls_back, refilled", ROWS)
def test_what_an_exit_means(pool, state, gen, status, pending, serving, stopping, rolls_back, refilled):
    w = pool.spawn(1, gen, pool.system.now)
    w.state = state
    w.reason = "ImportError: no module named app" if state is WorkerState.STARTING else None
    pool.system.now += 0.5  # an early death: it counts as a failure for the backoff
    assert pool.pop(w.pid) is w and w.pid not in pool.workers
    got = pool.exited(w, status, pending=pending, serving=serving, stopping=stopping)
    if rolls_back:
        assert got.startswith(f"worker 1 (pid {w.pid}, generation {gen}) ")
        assert ("ImportError" in got) is (state is WorkerState.STARTING)
    else:
        assert got is None
    assert (1 in pool.not_before) is refilled
    assert pool.restarts.get(1, 0) == (1 if refilled else 0)
    if refilled:
        assert pool.not_before[1] == pool.system.now + policy.backoff_delay(pool.failures[1])
    assert w.channel.fileno() == -1  # closed


def test_hello_goes_out_with_the_listeners(pool):
    w = pool.spawn(2, 7, pool.system.now)
    assert (w.slot, w.generation, w.state) == (2, 7, WorkerState.STARTING)
    assert w.pid in pool.workers


def test_kill_once_and_say_if_it_was_new(pool):
    w = pool.spawn(1, 1, pool.system.now)
    assert pool.kill(w, "no heartbeat for 30s") is True
    assert w.state is WorkerState.KILLED and w.reason == "no heartbeat for 30s"
    assert pool.kill(w, "again") is False
    assert pool.system.killed == [(w.pid, signal.SIGKILL)]


def test_a_rollback_kills_the_starting_and_drains_the_ready(pool):
    starting, ready, other = (pool.spawn(1, 2, 0), pool.spawn(2, 2, 0), pool.spawn(1, 1, 0))
    ready.state = WorkerState.READY
    other.state = WorkerState.READY
    pool.stop_generation(2, "generation 2 rolled back", pool.system.now)
    assert starting.state is WorkerState.KILLED and (starting.pid, signal.SIGKILL) in pool.system.killed
    assert ready.state is WorkerState.DRAINING and ready.stop_deadline == pool.system.now + 5 + policy.KILL_MARGIN
    assert other.state is WorkerState.READY
    assert pool.draining_generations(serving=1) == [2]


@pytest.mark.parametrize("count, target, kept", [(3, 3, True), (1, 1, False), (-4, 0, False), (10 ** 6, 2, True)])
def test_scale(pool, count, target, kept):
    pool.not_before = {2: 1.0}
    pool.scale(count)
    assert pool.target_count == target
    assert (2 in pool.not_before) is kept


def test_messages_for_the_control_socket_go_to_it(pool):
    from fugue import protocol

    asked = []
    pool.on_request = lambda w, msg: asked.append(msg["type"])
    w = pool.spawn(1, 1, 0)
    pool.handle_message(w, {"type": protocol.STATS_REPLY, "seq": 3, "stats": {"requests": 4}})
    pool.handle_message(w, {"type": protocol.STATUS_REQUEST, "seq": 1})
    pool.handle_message(w, {"type": protocol.READY})
    assert w.state is WorkerState.READY and w.stats["requests"] == 4
    assert asked == [protocol.STATS_REPLY, protocol.STATUS_REQUEST]
