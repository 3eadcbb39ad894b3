"""The fork server behind :mod:`tests.procs.warm`: imports once, forks a child per request.

Run as ``python -m tests.procs.warm_server SOCKET`` (the client starts one per test process). It
imports :data:`PRELOAD`, prints one JSON line when it listens, then serves until its stdin closes
(its test process left), killing the children it still runs.

Protocol, one Unix stream connection per child: the client sends one JSON line ``{"argv", "env",
"cwd", "new_session", "netns", "preload"}`` together with three file descriptors (stdin, stdout,
stderr, SCM_RIGHTS). The server imports ``preload`` (once), forks, and answers ``{"pid": N}`` once the
child has its session, namespace, stdio, directory and environment, then ``{"status": S}`` (a
``waitpid`` status) when the child has gone; or ``{"error": TEXT}``. A client that disconnects takes
its child with it (SIGKILL).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

from tests.procs.warm import _route_children

log = logging.getLogger(__name__)

# Imported once in the server; what the suite's children import before doing anything.
PRELOAD = ("numpy", "torch", "hotweights_trainer", "hotweights_trainer.transports.shm",
           "hotweights_trainer.transports.torchdist", "hotweights_trainer.transports.ucx",
           "hotweights_trainer.cli", "tests.procs.common")


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


if __name__ == "__main__":
    sys.exit(main())
