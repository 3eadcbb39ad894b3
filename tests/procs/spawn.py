"""Start test processes (warm: tests/procs/warm.py) and read their JSON lines with deadlines (a test must
never hang)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
from typing import Any

from tests.conftest import ROOT, child_env
from tests.procs.warm import popen


class Proc:
    def __init__(self, args: list[str], *, env: dict | None = None, stdin: bool = False, warm: bool = True):
        start = popen if warm else subprocess.Popen
        self.p = start([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.PIPE if stdin else None, text=True, env=env or child_env(), cwd=ROOT)
        self._q: queue.Queue = queue.Queue()
        self._err: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self._err.extend(self.p.stderr), daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            line = line.strip()
            if line.startswith("{"):
                self._q.put(json.loads(line))
        self._q.put(None)

    def next(self, timeout: float = 60) -> dict[str, Any]:
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s; stderr:\n{self.stderr()}") from None
        if item is None:
            raise AssertionError(f"process exited ({self.p.wait(5)}) early; stderr:\n{self.stderr()}")
        return item

    def send(self, line: str) -> None:
        """One line to the process's stdin (started with ``stdin=True``)."""
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def stderr(self) -> str:
        return "".join(self._err)[-5000:]

    def wait(self, timeout: float = 60) -> int:
        return self.p.wait(timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


def write_spec(spec: list) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(spec, f)
    f.close()
    return f.name


def start_receiver(endpoint: str, spec_path: str, *, versions: int = 1, mode: str = "model",
                   timeout: float = 30, min_version: int = 1) -> Proc:
    return Proc(["-m", "tests.procs.receiver", "--endpoint", endpoint, "--spec", spec_path, "--versions",
                 str(versions), "--mode", mode, "--timeout", str(timeout), "--min-version", str(min_version)])
