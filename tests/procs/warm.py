"""Warm starts for the suite's Python child processes: a fork server that has done the imports.

Most children the tests start are ``python -m tests.procs.X``, ``python script.py`` or ``python -c
CODE`` runs that spend one to three CPU-seconds importing torch and hotweights_trainer before their
first line of work; on a two-core machine those imports were a large share of the suite's time. One
server per test process pays them once and forks a child per request. Each child is still its own
process, with its own pid, stdio, environment, working directory and exit status, killed by signals
like any other; it only starts with those modules already imported. Nothing of hotweights_trainer is
initialised in the server (no transport, no publisher, no thread), so each child builds its own state
as a fresh interpreter would.

:func:`popen` is ``subprocess.Popen`` for test code: it starts eligible command lines warm and
everything else (other programs, interpreter flags, an environment that must act at interpreter start)
cold. ``ip netns exec NAME python ...`` runs warm too: the child joins the namespace itself.
``--cold-start`` on the pytest command line turns warm starts off.

This module is the client side; the server and the protocol are in :mod:`tests.procs.warm_server`.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

# Environment read when an interpreter, its allocator or a library the server imported (torch,
# libgomp) starts: a request that sets these differently from the server is started cold. What
# libraries read later (UCX_*, OMPI_*, HOTWEIGHTS_*) reaches the child's own environment. Not
# LD_LIBRARY_PATH: libraries that test processes import append to it (vLLM's cv2 does), and the
# suite's children load nothing through it.
_AT_START = ("PYTHON", "LD_PRELOAD", "OMP_", "GOMP_", "MALLOC_", "GLIBC_TUNABLES", "TORCH_LOGS",
             "TORCH_SHOW_CPP_STACKTRACES", "TORCH_CPP_LOG_LEVEL")
_PER_CHILD = {"PYTHONPATH", "PYTHONUNBUFFERED"}
# Heavy libraries a request may ask the server to import before it forks (once; later children find
# them imported too): picked from the command's source text unless the caller names them.
_ON_DEMAND = {"transformers": ("transformers", "transformers:Trainer", "transformers:TrainingArguments"),
              "peft": ("peft",), "trl": ("trl",)}
_READY_S = 120.0


class _Server:
    """A warm-start server: where to ask (``path``) and the environment it started with (``env``)."""

    def __init__(self, path: str, env: dict[str, str], proc: Optional[subprocess.Popen] = None):
        self.path = path
        self.env = env
        self.proc = proc

    @classmethod
    def start(cls) -> "_Server":
        """This test process's server (started on first use, closed at exit)."""
        from tests.conftest import ROOT, environment_for_children

        path = os.path.join(tempfile.mkdtemp(prefix="hotweights-warm-"), "sock")
        # From the environment the test process started with: libraries that tests run in-process
        # add variables to it later (vLLM sets LD_PRELOAD), which must not become the server's.
        env = environment_for_children(_STARTING_ENV, {})
        proc = _ORIGINAL_POPEN([sys.executable, "-m", "tests.procs.warm_server", path], cwd=ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready, _, _ = select.select([proc.stdout], [], [], _READY_S)
        line = proc.stdout.readline() if ready else b""
        if not line.startswith(b"{"):
            proc.kill()
            raise RuntimeError(f"the warm-start server did not start within {_READY_S:.0f}s")
        server = cls(path, env, proc)
        atexit.register(server.close)
        return server

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # the server kills what it still runs and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))
        except OSError:
            pass


_ORIGINAL_POPEN = subprocess.Popen
_STARTING_ENV = dict(os.environ)  # imported by tests/conftest.py, before any test runs
_server: Optional[_Server] = None
_cold_keys: set[str] = set()
_server_lock = threading.Lock()
enabled = True


def _get_server() -> Optional[_Server]:
    global _server, enabled
    with _server_lock:
        if _server is None and enabled:
            try:
                _server = _Server.start()
            except (OSError, RuntimeError) as exc:
                log.warning("starting test children cold: %s", exc)
                enabled = False
        return _server if enabled else None


def _route_children(path: str, env: dict[str, str]) -> None:
    """(in a warm child) Start this process's own Python children warm too, whoever starts them: a
    launcher (torchrun, ``accelerate launch``, ``deepspeed``) starting its ranks, a recipe its
    inference process, a notebook kernel what its cells run."""
    global _server
    _server = _Server(path, env)
    subprocess.Popen = WarmPopen  # type: ignore[misc]


def _netns_split(args: list[str]) -> tuple[Optional[str], list[str]]:
    """(namespace, command) of ``ip netns exec NAME command...``; (None, args) for anything else."""
    if len(args) > 4 and args[:3] == ["ip", "netns", "exec"]:
        return args[3], args[4:]
    return None, args


def _python_argv(args: list[str]) -> Optional[list[str]]:
    """``args`` as ``[python, ...]`` when it runs this interpreter: directly, or through a console
    script of its environment (``torchrun``, ``accelerate``, ``deepspeed``: Python files whose
    ``#!`` line names it)."""
    if not args:
        return None
    if args[0] == sys.executable:
        return args
    if os.path.dirname(args[0]) == os.path.dirname(sys.executable):
        try:
            with open(args[0], "rb") as f:
                first = f.readline(512)
        except OSError:
            return None
        if first.strip() == b"#!" + sys.executable.encode():
            return [sys.executable, *args]
    return None


def eligible(args: list[str], env: dict[str, str], server_env: dict[str, str]) -> bool:
    """Whether ``args`` (with ``env``) runs the same warm as cold."""
    argv = _python_argv(_netns_split(args)[1])
    if argv is None or len(argv) < 2:
        return False
    rest = argv[2:] if argv[1] == "-u" else argv[1:]
    if not rest or not (rest[0] in ("-c", "-m") and len(rest) > 1 or not rest[0].startswith("-")):
        return False
    for key in set(env) | set(server_env):
        if key.startswith(_AT_START) and key not in _PER_CHILD and env.get(key) != server_env.get(key):
            if key == "OMP_NUM_THREADS" and str(env.get(key, "")).isdigit():
                continue  # applied in the child through torch (libgomp read it when the server started)
            if key not in _cold_keys:
                _cold_keys.add(key)
                log.info("starting children cold while %s differs from the warm-start server's", key)
            return False
    return True


class WarmPopen(subprocess.Popen):
    """``subprocess.Popen`` (same API) whose child is forked by the warm-start server when it can be
    (:func:`eligible`, and no ``preexec_fn``, ``pass_fds``, shell or inherited descriptors); any other
    command starts as ``Popen`` starts it."""

    def __init__(self, args: Any, *, preload: Optional[list[str]] = None, **kw: Any):
        self._preload = preload
        self._conn: Optional[socket.socket] = None
        self._buf = b""
        super().__init__(args, **kw)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, *rest):
        server = _get_server() if enabled else None
        argv = [os.fsdecode(a) for a in args] if isinstance(args, (list, tuple)) else None
        source = env if env is not None else os.environ
        env_dict = {os.fsdecode(k): os.fsdecode(v) for k, v in source.items()}
        plain = (preexec_fn is None and not pass_fds and not shell and close_fds and executable is None
                 and gid is None and not gids and uid is None and umask < 0
                 and all(r in (None, -1) for r in rest))
        if server is None or argv is None or not plain or not eligible(argv, env_dict, server.env):
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                                          startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread,
                                          c2pwrite, errread, errwrite, restore_signals, gid, gids, uid, umask,
                                          start_new_session, *rest)
        netns, command = _netns_split(argv)
        command = _python_argv(command)
        preload = self._preload if self._preload is not None else preload_for(command)
        fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
               errwrite if errwrite != -1 else 2]
        request = {"argv": command, "env": env_dict,
                   "cwd": os.fsdecode(cwd) if cwd is not None else os.getcwd(),
                   "new_session": bool(start_new_session), "netns": netns, "preload": preload}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(30)
            conn.connect(server.path)
            data = json.dumps(request).encode() + b"\n"
            sent = socket.send_fds(conn, [data], fds)
            conn.sendall(data[sent:])
            reply = self._line(conn, 60)
        except BaseException:
            conn.close()
            raise
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        if "pid" not in reply:
            conn.close()
            raise OSError(f"warm start of {args!r} failed: {reply.get('error', reply)}")
        self._conn = conn
        self.pid = reply["pid"]
        self._child_created = True

    def _line(self, conn: socket.socket, timeout: Optional[float]) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            conn.settimeout(left)
            try:
                chunk = conn.recv(4096)
            except (socket.timeout, BlockingIOError):
                raise TimeoutError from None
            if not chunk:
                raise ConnectionError("the warm-start server went away")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def _try_wait(self, wait_flags):
        if self._conn is None:
            return super()._try_wait(wait_flags)
        try:
            reply = self._line(self._conn, 0 if wait_flags & os.WNOHANG else None)
        except TimeoutError:
            return (0, 0)
        except ConnectionError:
            log.warning("lost the exit status of warm child %d (server gone)", self.pid)
            return (self.pid, 255 << 8)
        self._conn.close()
        return (self.pid, reply["status"])

    def _internal_poll(self, _deadstate=None, **kw: Any):
        if self._conn is None:
            return super()._internal_poll(_deadstate=_deadstate, **kw)
        if self.returncode is None:
            if not self._waitpid_lock.acquire(False):
                return None
            try:
                if self.returncode is None:
                    pid, sts = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(sts)
            finally:
                self._waitpid_lock.release()
        return self.returncode


def _source(argv: list[str]) -> str:
    """The text of what ``python argv...`` runs first (``-c`` code, a script, a module's file)."""
    rest = argv[2:] if argv[1] == "-u" else argv[1:]
    try:
        if rest[0] == "-c":
            return rest[1]
        if rest[0] == "-m":
            spec = importlib.util.find_spec(rest[1])
            path = spec.origin if spec is not None else None
        else:
            path = rest[0]
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (ImportError, OSError, TypeError, ValueError, IndexError):
        return ""


def preload_names(lib: str) -> list[str]:
    """What the server imports for heavy library ``lib`` (transformers, peft, trl)."""
    return list(_ON_DEMAND[lib])


def preload_for(argv: list[str]) -> list[str]:
    """The heavy libraries ``python argv...`` names in its own source (a hint: missing one costs time)."""
    text = _source(argv)
    return [name for lib, names in _ON_DEMAND.items() if re.search(rf"\b{lib}\b", text) for name in names]


def popen(args: list[str], *, preload: Optional[list[str]] = None, **kw: Any) -> subprocess.Popen:
    """``subprocess.Popen(args, **kw)``, started warm when it can be; ``preload``: modules (``module`` or
    ``module:attribute``) the server imports first (default: :func:`preload_for`)."""
    return WarmPopen(args, preload=preload, **kw) if enabled else _ORIGINAL_POPEN(args, **kw)


def run(args: list[str], *, timeout: Optional[float] = None, input: Any = None, check: bool = False,
        capture_output: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` through :func:`popen`."""
    if capture_output:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    if input is not None:
        kw["stdin"] = subprocess.PIPE
    with popen(args, **kw) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            exc.stdout, exc.stderr = proc.communicate()
            raise
        except BaseException:
            proc.kill()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result
