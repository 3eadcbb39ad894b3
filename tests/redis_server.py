"""A real ``redis-server`` on a free port for tests: start, stop (optionally keeping its data), restart.

Persistence is off unless ``persistent=True`` (then an append-only file in ``workdir`` survives a
restart, as in a production Redis with ``appendonly yes``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, require


class RedisServer:
    def __init__(self, workdir: Path, *, persistent: bool = False):
        self.workdir = Path(workdir)
        self.persistent = persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.workdir), "--appendonly", "yes" if self.persistent else "no",
                "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise AssertionError("redis-server did not answer within 10s")

    def ping(self) -> bool:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() == "PONG"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()  # like a crash: nothing flushed beyond what appendfsync already wrote
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=5).stdout


@pytest.fixture
def redis_server(tmp_path):
    require("redis")
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def have_redis_server() -> bool:
    return shutil.which("redis-server") is not None
