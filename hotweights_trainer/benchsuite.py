"""The benchmark suite: discover ``bench/bench_*.py`` scripts, run each in its own process, collect tables.

Benchmarks are scripts outside the package that print Markdown tables (``| a | b |`` rows); the
suite runs them one after another -- never in parallel, they would measure each other -- each with a
deadline, and parses the tables out of their output so ``hotweights bench --json`` returns data.

A script that declares a ``--quick`` option (a smoke-sized run that checks it works; its numbers mean
nothing) gets it when the suite runs with ``quick=True``; scripts without one are skipped then, with
the reason recorded.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import ConfigError, SyncTimeoutError

log = logging.getLogger(__name__)

PATTERN = "bench_*.py"
QUICK_FLAG = "--quick"


@dataclass
class BenchRun:
    """One script's run: everything measured, nothing assumed."""

    script: str
    returncode: Optional[int] = None
    seconds: float = 0.0
    output: str = ""
    tables: list[list[dict[str, str]]] = field(default_factory=list)
    skipped: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.returncode == 0 and self.error is None)

    def to_dict(self) -> dict:
        return dict(asdict(self), ok=self.ok)


def find_bench_dir(explicit: Optional[str] = None) -> Path:
    """``explicit``, else the ``bench/`` next to this package in a source checkout, else ``./bench``."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_dir():
            raise ConfigError(f"benchmark directory {explicit!r} does not exist")
        return path
    for cand in (Path(__file__).resolve().parents[1] / "bench", Path.cwd() / "bench"):
        if cand.is_dir() and any(cand.glob(PATTERN)):
            return cand
    raise ConfigError("no bench/ directory with bench_*.py scripts found (the suite ships with the source "
                      "checkout, not the installed package); run from the checkout or pass --dir")


def discover(bench_dir: Path, only: Sequence[str] = ()) -> list[Path]:
    """Scripts in ``bench_dir``, sorted; ``only`` filters by name (``core`` or ``bench_core.py``)."""
    scripts = sorted(bench_dir.glob(PATTERN))
    if only:
        wanted = {o.removesuffix(".py").removeprefix("bench_") for o in only}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            raise ConfigError(f"no benchmark named {', '.join(sorted(unknown))} in {bench_dir} "
                              f"(have: {', '.join(s.stem.removeprefix('bench_') for s in scripts) or 'none'})")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    return scripts


def supports_quick(script: Path) -> bool:
    return QUICK_FLAG in script.read_text(encoding="utf-8", errors="replace")


def parse_tables(text: str) -> list[list[dict[str, str]]]:
    """Markdown tables in ``text`` as lists of {header: cell} rows (separator rows dropped)."""
    tables: list[list[dict[str, str]]] = []
    header: Optional[list[str]] = None
    for line in text.splitlines() + [""]:
        s = line.strip()
        if not (s.startswith("|") and s.endswith("|") and len(s) > 1):
            header = None
            continue
        cells = [c.strip() for c in s[1:-1].split("|")]
        if header is None:
            header = cells
            tables.append([])
        elif all(c and set(c) <= set("-: ") for c in cells):
            continue
        elif len(cells) == len(header):
            tables[-1].append(dict(zip(header, cells)))
    return [t for t in tables if t]


def run_script(script: Path, *, quick: bool, timeout_s: float, python: str = sys.executable) -> BenchRun:
    """Run one script in its own process group with a deadline; the whole group dies on timeout."""
    run = BenchRun(script.name)
    if quick and not supports_quick(script):
        run.skipped = f"declares no {QUICK_FLAG} option"
        return run
    cmd = [python, str(script)] + ([QUICK_FLAG] if quick else [])
    log.info("running %s (deadline %.0fs)", " ".join(cmd), timeout_s)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=script.parent.parent, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate(timeout=30)
        run.error = str(SyncTimeoutError(f"{script.name} did not finish within {timeout_s:.0f}s; killed"))
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt): leave no benchmark running
            _kill_group(proc)
    run.seconds = time.perf_counter() - t0
    run.returncode = proc.returncode
    run.output = out or ""
    run.tables = parse_tables(run.output)
    if run.error is None and run.returncode != 0:
        run.error = f"{script.name} exited with status {run.returncode}"
    return run


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the script's own worker processes go too
    except ProcessLookupError:
        pass
    proc.wait(30)


def run_suite(scripts: Sequence[Path], *, quick: bool, timeout_s: float,
              on_done: Callable[[BenchRun], None] = lambda run: None,
              wrap: Callable = lambda it: it) -> list[BenchRun]:
    """Run ``scripts`` one after another; ``on_done`` sees each result as soon as it exists."""
    runs = []
    for script in wrap(scripts):
        run = run_script(script, quick=quick, timeout_s=timeout_s)
        runs.append(run)
        on_done(run)
    return runs


__all__ = ["BenchRun", "find_bench_dir", "discover", "supports_quick", "parse_tables", "run_script",
           "run_suite"]
