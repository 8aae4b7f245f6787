"""The model's workers as a group the engine's process drives: each worker is a process (``mp``:
``python -m fastllm.distributed.mp_workers`` on this machine; ``ray``: a Ray actor, see
``ray_workers``) connected back to the engine (``procs``). A step's plan is pickled once and
written to every connection; only the last rank answers (a worker that fails answers with its
error).

    engine process ── conn ──> rank 0 ─┐
                   ── conn ──> rank 1 ─┼─ torch.distributed (gloo / NCCL): all-reduce,
                   <─ conn ─── rank N-1┘  all-gather, stage-to-stage send/recv

Fresh interpreters: no worker inherits the engine's threads, and the caller's main module is not
re-imported as multiprocessing's spawn would. A worker that exits (killed, crashed) is seen at
once: by a watcher thread while the engine idles, and by the step that waits on it (its
connection reads end-of-file). The group then stops every worker, since the survivors may wait
in a collective for the one that is gone.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
import traceback

from fastllm.config import EngineArgs
from fastllm.distributed.errors import WorkerError
from fastllm.distributed.procs import (
    STARTUP_TIMEOUT_S,
    Listener,
    child_authkey,
    connect,
    ignore_stop_signals,
    start_child,
)

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_main(address, authkey: bytes, rank: int) -> None:
    """A worker: connects to the engine, receives its arguments, builds its Worker, answers
    ("ok", kv_blocks), then serves calls until the engine says "shutdown" or the connection
    closes (the engine is gone)."""
    import faulthandler
    import signal

    # kill -USR1 <worker pid> prints where it is (a worker waiting on a peer, say).
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    ignore_stop_signals()
    conn = connect(address, authkey, rank)
    args, init_method, device, threads = conn.recv()
    logging.basicConfig(level=os.environ.get("FASTLLM_LOGGING_LEVEL", "INFO").upper(),
                        format=f"%(levelname)s %(asctime)s worker {rank}: %(message)s")
    try:
        from fastllm.distributed.worker import Worker

        worker = Worker(args, rank, init_method, device, threads)
        conn.send(("ok", worker.kv_blocks()))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the engine
        conn.send(("error", _describe(e)))
        return
    while True:
        try:
            method, call_args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if method == "shutdown":
            break
        try:
            result = getattr(worker, method)(*call_args)
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", _describe(e)))
            continue
        # A step answers from the last rank only; other calls from every rank.
        if method != "execute" or worker.is_output_rank:
            conn.send_bytes(pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL))
    worker.close()


def _describe(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip() + "\n" + \
        "".join(traceback.format_tb(e.__traceback__))


class LocalLauncher:
    """Workers as processes of this machine, one GPU each (cuda:rank) or the CPU."""

    tcp_host = None  # a Unix socket

    def __init__(self, device: str):
        self.device = device
        self.procs: list[subprocess.Popen] = []

    def start(self, address, authkey: bytes, world: int) -> None:
        self.procs += [start_child("fastllm.distributed.mp_workers", address, authkey, rank)
                       for rank in range(world)]

    def init_method(self) -> str:
        return f"tcp://127.0.0.1:{free_port()}"

    def device_of(self, rank: int) -> str:
        return f"cuda:{rank}" if self.device == "cuda" else "cpu"

    def gone(self) -> str | None:
        for rank, proc in enumerate(self.procs):
            if proc.poll() is not None:
                return f"worker {rank} (pid {proc.pid}) exited with code {proc.returncode}"
        return None

    def wait_any_exit(self) -> int | None:
        """Blocks until a worker exits; its rank (None: cannot watch here)."""
        fds = {}
        try:
            for rank, proc in enumerate(self.procs):
                fds[os.pidfd_open(proc.pid)] = rank
            ready, _, _ = select.select(list(fds), [], [])
            return fds[ready[0]]
        except (AttributeError, OSError):  # no pidfd: the steps still notice
            return None
        finally:
            for fd in fds:
                os.close(fd)

    def describe_exit(self, rank: int) -> str:
        proc = self.procs[rank]
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return f"worker {rank} (pid {proc.pid}) closed its connection"
        return f"worker {rank} (pid {proc.pid}) exited with code {code}"

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not exit after SIGKILL", proc.pid)

    def wait_exit(self, timeout: float) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass


class WorkerGroup:
    """The workers of one engine (see the module's docstring)."""

    def __init__(self, args: EngineArgs, launcher, on_dead=None):
        """Starts tp x pp workers through ``launcher`` and waits until each loaded its share;
        raises WorkerError naming a worker that failed. ``on_dead(message)`` is called (from a
        watcher thread or the step) when a worker exits or fails while the engine runs."""
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        self.world_size = world
        self.launcher = launcher
        self.on_dead = on_dead
        self.dead: str | None = None
        self._closing = False
        self._early: dict[int, object] = {}
        self.conns = []
        listener = Listener(launcher.tcp_host)
        try:
            launcher.start(listener.address, listener.authkey, world)
            by_rank = listener.accept(world, launcher.gone, STARTUP_TIMEOUT_S)
            self.conns = [by_rank[rank] for rank in range(world)]
            init_method = launcher.init_method()
            threads = worker_threads(world)
            for rank, conn in enumerate(self.conns):
                conn.send((args, init_method, launcher.device_of(rank), threads))
            self.kv_blocks = [self._answer(rank, STARTUP_TIMEOUT_S) for rank in range(world)]
        except BaseException:
            self.shutdown()
            raise
        finally:
            listener.close()
        self._watcher = threading.Thread(target=self._watch, name="fastllm-worker-watch",
                                         daemon=True)
        self._watcher.start()

    # ---- calls -------------------------------------------------------------------------------

    def call_all(self, method: str, *call_args):
        """Runs a method on every worker; returns their results in rank order."""
        self._send(method, call_args)
        return [self._answer(rank) for rank in range(self.world_size)]

    def execute(self, snapshot: dict, return_logits: bool):
        """One step on every worker; the last rank's StepOutputs."""
        self._send("execute", (snapshot, return_logits))
        return self._answer(self.world_size - 1, only_this_rank=True)

    def _send(self, method: str, call_args: tuple) -> None:
        self._check_alive()
        payload = pickle.dumps((method, call_args), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(payload)
            except OSError as e:
                self._fail(f"worker {rank} is unreachable ({e})")
                self._check_alive()

    def _answer(self, rank: int, timeout: float | None = None, only_this_rank: bool = False):
        """Waits for worker ``rank``'s answer. Every connection is watched: one that closes is
        a worker that exited, and one that reports an error failed; either fails the group.
        Answers of other ranks that come first are kept for their turn (with only_this_rank,
        any other answer is an error: only the last rank answers a step)."""
        watched = {conn: r for r, conn in enumerate(self.conns)}
        while True:
            self._check_alive()
            if rank in self._early:
                return self._early.pop(rank)
            ready = multiprocessing.connection.wait(list(watched), timeout)
            if not ready:
                self._fail(f"worker {rank} did not answer within {timeout:.0f} s")
                continue
            for conn in ready:
                r = watched[conn]
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    self._fail(self.launcher.describe_exit(r))
                    break
                if status == "error":
                    self._fail(self._root_cause(f"worker {r} failed: {value}"))
                    break
                if only_this_rank and r != rank:
                    self._fail(f"worker {r} answered out of turn")
                    break
                self._early[r] = value

    # ---- failure -----------------------------------------------------------------------------

    def _watch(self) -> None:
        rank = self.launcher.wait_any_exit()
        if rank is not None and not self._closing:
            self._fail(self.launcher.describe_exit(rank))

    def _root_cause(self, message: str) -> str:
        """A worker's error, or first the exit of a peer when one has gone: a rank that dies
        makes the survivors' next send or receive fail within milliseconds, often before its
        process is reaped, so the launcher is given a moment to see it."""
        deadline = time.monotonic() + 1.0
        while True:
            gone = self.launcher.gone()
            if gone is not None:
                return f"{gone} (then {message.splitlines()[0]})"
            if time.monotonic() > deadline:
                return message
            time.sleep(0.05)

    def _fail(self, message: str) -> None:
        """Marks the group dead (once) and stops every worker."""
        if self.dead is not None or self._closing:
            return
        self.dead = message
        logger.error("distributed executor stopped: %s", message)
        self.launcher.kill()
        if self.on_dead is not None:
            self.on_dead(message)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerError(self.dead)
        if self._closing:
            raise WorkerError("the workers were shut down")

    def shutdown(self) -> None:
        """Stops the workers (asks first, then kills what is left); safe to call again."""
        if self._closing:
            return
        self._closing = True
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("shutdown", ())))
            except OSError:
                pass
        self.launcher.wait_exit(5)
        self.launcher.kill()
        for conn in self.conns:
            conn.close()


def worker_threads(world_size: int) -> int:
    """Torch threads per worker: FASTLLM_WORKER_THREADS, else the machine's cores shared."""
    raw = os.environ.get("FASTLLM_WORKER_THREADS")
    if raw:
        return max(1, int(raw))
    return max(1, (os.cpu_count() or 1) // world_size)


if __name__ == "__main__":
    worker_main(sys.argv[1], child_authkey(), int(sys.argv[2]))
