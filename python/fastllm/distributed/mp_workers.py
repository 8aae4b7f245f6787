"""The ``mp`` backend: the workers as local processes (``python -m fastllm.distributed.mp_workers``:
fresh interpreters, so none inherits the engine's threads, and the caller's main module is not
re-imported as multiprocessing's spawn would), each with a Unix socket connection to the engine's
process. A step's plan is pickled once and written to every connection; only the last rank
answers (a worker that fails answers with its error).

    engine process ── pipe ──> rank 0 ─┐
                   ── pipe ──> rank 1 ─┼─ torch.distributed (gloo / NCCL): all-reduce,
                   <─ pipe ─── rank N-1┘  all-gather, stage-to-stage send/recv

A worker that exits (killed, crashed) is seen at once, as its connection's end of file: by a
watcher thread while the engine idles, and by the step that waits on it.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import pickle
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection

from fastllm.config import EngineArgs
from fastllm.distributed.errors import WorkerError

logger = logging.getLogger(__name__)

# How long a worker may take to load its share of the model before the engine gives up.
STARTUP_TIMEOUT_S = float(os.environ.get("FASTLLM_WORKER_STARTUP_TIMEOUT", "600"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker_main(address: str, rank: int) -> None:
    """A worker process: connects to the engine, receives its arguments, builds its Worker,
    answers ("ok", kv_blocks), then serves calls until the engine says "shutdown" or the
    connection closes (the engine is gone)."""
    import faulthandler
    import signal

    # kill -USR1 <worker pid> prints where it is (a worker waiting on a peer, say).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    conn = Connection(sock.detach())
    conn.send(rank)
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


class MultiprocWorkers:
    """The workers of one engine as local processes (see the module's docstring)."""

    def __init__(self, args: EngineArgs, device: str, on_dead=None):
        """Starts tp x pp workers and waits until each loaded its share; raises ValueError /
        WorkerError naming a worker that failed. ``on_dead(message)`` is called (from a watcher
        thread) when a worker exits while the engine runs."""
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        self.world_size = world
        self.on_dead = on_dead
        self.dead: str | None = None
        self._closing = False
        self._early: dict[int, object] = {}
        init_method = f"tcp://127.0.0.1:{free_port()}"
        threads = worker_threads(world)
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection | None] = [None] * world
        self._socket_dir = tempfile.mkdtemp(prefix="fastllm-workers-")  # private (0700)
        address = os.path.join(self._socket_dir, "engine.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address)
            listener.listen(world)
            env = dict(os.environ)
            # The workers import the fastllm this process runs.
            package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (package_root, env.get("PYTHONPATH", "")) if p)
            for rank in range(world):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fastllm.distributed.mp_workers", address,
                     str(rank)], env=env))
            self._accept(listener, world)
            for rank, conn in enumerate(self.conns):
                dev = f"cuda:{rank}" if device == "cuda" else "cpu"
                conn.send((args, init_method, dev, threads))
            self.kv_blocks = [self._answer(rank, STARTUP_TIMEOUT_S) for rank in range(world)]
        except BaseException:
            self.shutdown()
            raise
        finally:
            listener.close()
        self._watcher = threading.Thread(target=self._watch, name="fastllm-worker-watch",
                                         daemon=True)
        self._watcher.start()

    def _accept(self, listener: socket.socket, world: int) -> None:
        """Takes each worker's connection (it sends its rank first)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for _ in range(world):
            while not select.select([listener], [], [], 1.0)[0]:
                for rank, proc in enumerate(self.procs):
                    if proc.poll() is not None:
                        raise WorkerError(f"worker {rank} exited with code {proc.returncode} "
                                          "before it connected")
                if time.monotonic() > deadline:
                    raise WorkerError(f"the workers did not connect within "
                                      f"{STARTUP_TIMEOUT_S:.0f} s")
            sock, _ = listener.accept()
            conn = Connection(sock.detach())
            self.conns[conn.recv()] = conn

    # ---- calls -------------------------------------------------------------------------------

    def call_all(self, method: str, *call_args):
        """Runs a method on every worker; returns their results in rank order."""
        self._send(method, call_args, range(self.world_size))
        return [self._answer(rank) for rank in range(self.world_size)]

    def execute(self, snapshot: dict, return_logits: bool):
        """One step on every worker; the last rank's StepOutputs."""
        self._send("execute", (snapshot, return_logits), range(self.world_size))
        return self._answer(self.world_size - 1, any_rank_fails=True)

    def _send(self, method: str, call_args: tuple, ranks) -> None:
        self._check_alive()
        payload = pickle.dumps((method, call_args), protocol=pickle.HIGHEST_PROTOCOL)
        for rank in ranks:
            try:
                self.conns[rank].send_bytes(payload)
            except OSError as e:
                self._fail(f"worker {rank} is unreachable ({e})")
                self._check_alive()

    def _answer(self, rank: int, timeout: float | None = None, any_rank_fails: bool = False):
        """Waits for worker ``rank``'s answer; a worker exiting meanwhile (or, with
        any_rank_fails, any worker reporting an error) fails the group."""
        # Every connection is watched: one that closes is a worker that exited. Answers of
        # other ranks that come first are kept for their turn.
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
                    self._fail(self._exit_message(r))
                    break
                if status == "error":
                    self._fail(f"worker {r} failed: {value}")
                    break
                if any_rank_fails and r != rank:
                    self._fail(f"worker {r} answered out of turn")
                    break
                self._early[r] = value

    def _exit_message(self, rank: int) -> str:
        proc = self.procs[rank]
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        how = f"exited with code {code}" if code is not None else "closed its connection"
        return f"worker {rank} (pid {proc.pid}) {how}"

    # ---- failure -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Waits for any worker to exit (pidfd: readable when the process ends)."""
        fds = {}
        try:
            for rank, proc in enumerate(self.procs):
                fds[os.pidfd_open(proc.pid)] = rank
        except (AttributeError, OSError):  # no pidfd here: steps still see a dead worker
            for fd in fds:
                os.close(fd)
            return
        try:
            ready, _, _ = select.select(list(fds), [], [])
            if not self._closing:
                self._fail(self._exit_message(fds[ready[0]]))
        finally:
            for fd in fds:
                os.close(fd)

    def _fail(self, message: str) -> None:
        """Marks the group dead (once) and stops every worker: the survivors may wait in a
        collective for the one that failed, which would never return."""
        if self.dead is not None or self._closing:
            return
        self.dead = message
        logger.error("distributed executor stopped: %s", message)
        self._terminate()
        if self.on_dead is not None:
            self.on_dead(message)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerError(self.dead)

    def _terminate(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not exit after SIGKILL", proc.pid)

    def shutdown(self) -> None:
        """Stops the workers (asks first, then kills what is left); safe to call again."""
        if self._closing:
            return
        self._closing = True
        for conn, proc in zip(self.conns, self.procs):
            if conn is not None and proc.poll() is None:
                try:
                    conn.send_bytes(pickle.dumps(("shutdown", ())))
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._terminate()
        for conn in self.conns:
            if conn is not None:
                conn.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def worker_threads(world_size: int) -> int:
    """Torch threads per worker: FASTLLM_WORKER_THREADS, else the machine's cores shared."""
    raw = os.environ.get("FASTLLM_WORKER_THREADS")
    if raw:
        return max(1, int(raw))
    return max(1, (os.cpu_count() or 1) // world_size)


if __name__ == "__main__":
    _worker_main(sys.argv[1], int(sys.argv[2]))
