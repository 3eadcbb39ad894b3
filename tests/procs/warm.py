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

Protocol, one Unix stream connection per child: the client sends one JSON line ``{"argv", "env",
"cwd", "new_session", "netns"}`` together with three file descriptors (stdin, stdout, stderr, SCM_RIGHTS);
the server answers ``{"pid": N}`` once the child runs and ``{"status": S}`` (a ``waitpid`` status)
when it has gone, or ``{"error": TEXT}``. A client that disconnects takes its child with it
(SIGKILL), and the server exits, killing its children, when its stdin closes (its test process left).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import logging
import re
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

# Imported once in the server; what the suite's children import before doing anything.
PRELOAD = ("numpy", "torch", "hotweights_trainer", "hotweights_trainer.transports.shm",
           "hotweights_trainer.transports.torchdist", "hotweights_trainer.transports.ucx",
           "hotweights_trainer.cli", "tests.procs.common")
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


# ---------------------------------------------------------------------------------------------- server
def _send(conn: socket.socket, obj: dict) -> None:
    try:
        conn.sendall(json.dumps(obj).encode() + b"\n")
    except OSError:
        pass  # the client went away; its child is killed when the server notices


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("request cut short")
        data += more
    conn.settimeout(None)
    if len(fds) != 3:
        raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
    return json.loads(data), fds


class _Child:
    """What a forked child runs, once the server's loop has returned (no server frame is left)."""

    def __init__(self, request: dict, fds: list[int], server_path: str, server_env: dict[str, str]):
        self.request = request
        self.fds = fds
        self.server_path = server_path
        self.server_env = server_env

    def setup(self) -> None:
        """Session, namespace, stdio, directory, environment: done before the client learns the pid,
        as ``Popen`` returns only once its child has them (a caller may ``killpg`` it at once)."""
        req = self.request
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if req.get("new_session"):
            os.setsid()
        if req.get("netns"):
            _enter_netns(req["netns"])
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in set(self.fds):
            if fd > 2:
                os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        threads = req["env"].get("OMP_NUM_THREADS")
        if threads != self.server_env.get("OMP_NUM_THREADS") and threads and threads.isdigit():
            import torch  # libgomp read OMP_NUM_THREADS when the server loaded it: set it as a start would

            torch.set_num_threads(int(threads))
        _route_children(self.server_path, self.server_env)

    def run(self) -> Any:
        argv = list(self.request["argv"][1:])
        if os.environ.get("PYTHONUNBUFFERED") or argv[0] == "-u":
            argv = [a for a in argv[:1] if a != "-u"] + argv[1:]
            import io

            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                          errors="backslashreplace")
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        base = sys.path[1:]
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # a fresh interpreter seeds numpy from the OS
        import types

        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = main
        try:
            if argv[0] == "-c":
                sys.argv = ["-c", *argv[2:]]
                sys.path[:] = ["", *extra, *base]
                exec(compile(argv[1], "<string>", "exec"), main.__dict__)
            elif argv[0] == "-m":
                import runpy

                sys.argv = ["-m", *argv[2:]]
                sys.path[:] = [os.getcwd(), *extra, *base]
                runpy._run_module_as_main(argv[1], alter_argv=True)
            else:
                path = argv[0]
                sys.argv = argv
                sys.path[:] = [os.path.dirname(os.path.abspath(path)), *extra, *base]
                main.__file__ = path
                with open(path, "rb") as f:
                    source = f.read()
                exec(compile(source, path, "exec"), main.__dict__)
        except SystemExit as exc:
            return exc.code
        except BaseException:
            sys.excepthook(*sys.exc_info())
            return 1
        return 0


def _enter_netns(name: str) -> None:
    """Join network namespace ``name`` as ``ip netns exec NAME`` does before it runs a program: the
    namespace, then a private mount namespace with ``/sys`` mounted afresh, so that what a library
    reads there (UCX lists network devices in /sys/class/net) is this namespace's."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what} for network namespace {name!r}: {os.strerror(err)}")

    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        check(libc.setns(fd, 0x40000000), "setns")  # CLONE_NEWNET
    finally:
        os.close(fd)
    check(libc.unshare(0x00020000), "unshare")  # CLONE_NEWNS
    check(libc.mount(b"", b"/", b"none", (1 << 19) | 16384, None), "mount --make-rslave /")  # MS_SLAVE|MS_REC
    check(libc.umount2(b"/sys", 2), "umount /sys")  # MNT_DETACH
    check(libc.mount(name.encode(), b"/sys", b"sysfs", 0, None), "mount /sys")


def serve(path: str) -> Optional[_Child]:
    """The server loop; returns a :class:`_Child` in each forked child, None when the server is done."""
    for name in PRELOAD:
        __import__(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the test process's to handle; it closes us
    server_env = dict(os.environ)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    by_conn: dict[int, int] = {}
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    try:
        while True:
            watch = [srv, wake_r, 0, *children.values()]
            ready, _, _ = select.select(watch, [], [], 1.0)
            if 0 in ready and not os.read(0, 4096):
                break  # the test process left
            if wake_r in ready:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            _reap(children, by_conn)
            for conn in [c for c in ready if isinstance(c, socket.socket) and c is not srv]:
                pid = by_conn.get(conn.fileno())
                if pid is not None and conn.recv(1, socket.MSG_PEEK) == b"":
                    _kill(pid)  # the client went away: its child goes too
            if srv in ready:
                conn, _ = srv.accept()
                try:
                    request, fds = _receive_request(conn)
                except (OSError, ValueError) as exc:
                    _send(conn, {"error": f"bad request: {exc}"})
                    conn.close()
                    continue
                _preload(request.get("preload") or [])
                sys.stdout.flush()
                sys.stderr.flush()
                set_r, set_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    for c in (srv, *children.values(), conn):
                        c.close()
                    for fd in (wake_r, wake_w, set_r):
                        os.close(fd)
                    child = _Child(request, fds, path, server_env)
                    try:
                        child.setup()
                    except BaseException as exc:  # noqa: BLE001 - reported to the client, as exec errors are
                        os.write(set_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
                        os._exit(127)
                    os.close(set_w)  # EOF: set up
                    return child
                os.close(set_w)
                for fd in fds:
                    os.close(fd)
                failed = _read_all(set_r, 30.0)
                children[pid] = conn
                by_conn[conn.fileno()] = pid
                _send(conn, {"error": failed} if failed else {"pid": pid})
    finally:
        if os.getpid() == _server_pid:
            for pid in list(children):
                _kill(pid)
            srv.close()
    return None


def _read_all(fd: int, timeout: float) -> str:
    """What a child writes to ``fd`` before closing it (its set-up error, or nothing)."""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        else:
            data = b"child did not finish its set-up in time"
    finally:
        os.close(fd)
    return data.decode(errors="replace")


def _preload(names: list[str]) -> None:
    for name in names:
        module, _, attr = str(name).partition(":")
        try:
            mod = importlib.import_module(module)
            if attr:
                getattr(mod, attr)
        except Exception as exc:  # noqa: BLE001 - the child imports it itself and reports what fails
            log.debug("warm-start server could not preload %s: %s", name, exc)


def _reap(children: dict[int, socket.socket], by_conn: dict[int, int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            by_conn.pop(conn.fileno(), None)
            _send(conn, {"status": status})
            conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_server_pid = os.getpid()


def _exit(code: Any) -> None:
    """End a child as the interpreter would, minus tearing down the modules it inherited.

    Threads are joined, atexit handlers run and stdio is flushed, in the interpreter's order; then the
    process ends. Tearing down torch's modules object by object costs a child about 0.7 CPU-seconds
    here (each page it touches is copied from the server first) and does nothing a test looks at.
    """
    import atexit as _atexit

    threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at interpreter exit
    _atexit._run_exitfuncs()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def main() -> Any:
    child = serve(sys.argv[1])
    if child is None:
        return 0
    _exit(child.run())


# ---------------------------------------------------------------------------------------------- client
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
        proc = _ORIGINAL_POPEN([sys.executable, "-m", "tests.procs.warm", path], cwd=ROOT, env=env,
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
        env_dict = {os.fsdecode(k): os.fsdecode(v) for k, v in (env if env is not None else os.environ).items()}
        plain = (preexec_fn is None and not pass_fds and not shell and close_fds and executable is None
                 and gid is None and not gids and uid is None and umask < 0 and all(r in (None, -1) for r in rest))
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
        request = {"argv": command, "env": env_dict, "cwd": os.fsdecode(cwd) if cwd is not None else os.getcwd(),
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


if __name__ == "__main__":
    sys.exit(main())
