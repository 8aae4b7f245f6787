"""Connections between the engine's process and the processes it starts (model workers, engine
replicas): the child connects back to a listener of the parent and the two exchange pickled
messages (multiprocessing's Connection). Local children reach a Unix socket in a private
directory; children elsewhere (Ray actors on other machines) a TCP port, and prove they know the
listener's random key first (multiprocessing's challenge). A child that exits closes its end:
its connection reads end-of-file at once, which is how a dead child is noticed."""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from fastllm.distributed.errors import WorkerError


class Listener:
    def __init__(self, tcp_host: str | None = None):
        """Unix socket (tcp_host None) or TCP on tcp_host (an address the children can reach)."""
        self.authkey = secrets.token_bytes(32)
        self._dir = None
        if tcp_host is None:
            self._dir = tempfile.mkdtemp(prefix="fastllm-")  # mode 0700: this user's only
            self.address: str | tuple[str, int] = os.path.join(self._dir, "engine.sock")
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(self.address)
        else:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sock.bind((tcp_host, 0))
            self.address = (tcp_host, self._sock.getsockname()[1])
        self._sock.listen(64)

    def accept(self, count: int, alive, timeout: float) -> dict[int, Connection]:
        """The connections of ``count`` children, keyed by the id each sends first. ``alive()``
        returns None, or why a child is gone (then WorkerError); so does ``timeout``."""
        deadline = time.monotonic() + timeout
        conns: dict[int, Connection] = {}
        while len(conns) < count:
            if not select.select([self._sock], [], [], 0.5)[0]:
                gone = alive()
                if gone:
                    raise WorkerError(gone)
                if time.monotonic() > deadline:
                    raise WorkerError(f"{count - len(conns)} process(es) did not connect within "
                                      f"{timeout:.0f} s")
                continue
            sock, _ = self._sock.accept()
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, self.authkey)
                answer_challenge(conn, self.authkey)
                ident = conn.recv()
            except (OSError, EOFError, Exception):  # noqa: BLE001 - a stranger, or a dead child
                conn.close()
                continue
            conns[int(ident)] = conn
        return conns

    def close(self) -> None:
        self._sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def connect(address, authkey: bytes, ident: int) -> Connection:
    """The child's side: connects, authenticates and says who it is."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address if isinstance(address, str) else tuple(address))
    conn = Connection(sock.detach())
    answer_challenge(conn, authkey)
    deliver_challenge(conn, authkey)
    conn.send(ident)
    return conn


def node_ip() -> str:
    """This machine's address as other machines reach it (the default route's interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: it only picks a route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def ignore_stop_signals() -> None:
    """For a child process: Ctrl-C or a service manager's SIGTERM reach the whole process group,
    but the engine's process decides when its children stop (a server drains its requests
    first); a child ends when its connection to the engine closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# How long a worker or replica may take to load its share of the model before the engine gives up.
STARTUP_TIMEOUT_S = float(os.environ.get("FASTLLM_WORKER_STARTUP_TIMEOUT", "600"))

# The connection key a child process reads (and removes) from its environment.
AUTHKEY_ENV = "FASTLLM_ENGINE_AUTHKEY"


def start_child(module: str, address, authkey: bytes, index: int) -> subprocess.Popen:
    """``python -m module address index`` with the key in its environment (not its command line,
    which other users can read) and this process's fastllm first on its path."""
    env = dict(os.environ)
    env[AUTHKEY_ENV] = authkey.hex()
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen([sys.executable, "-m", module, str(address), str(index)], env=env)


def child_authkey() -> bytes:
    """The key start_child passed, taken out of the environment."""
    return bytes.fromhex(os.environ.pop(AUTHKEY_ENV))

