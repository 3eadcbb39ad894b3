"""Real multi-host fleets on one machine: network namespaces joined by a bridge, links shaped with ``tc tbf``.

Each *host* is a network namespace with its own stack and one veth link to a *switch* namespace
that holds the bridge, so every packet stays inside namespaces this module created (nothing is
attached to the machine's own network). Host ``i`` gets ``SUBNET.(i+1)/24``. Both directions of each
link are shaped (``tbf`` on the host end shapes what the host sends, on the switch end what it
receives), so a publisher that sends H copies pays H times on its own link, as on a real cluster.
Namespaces share ``/dev/shm``: give each host's local endpoint its own name (:meth:`Netns.local`).

Needs root (``ip netns``, ``tc``); :func:`available` says whether it works here and why not.
Every namespace (and with it every veth and the bridge) is deleted by :meth:`Netns.close`.

``python scripts/netns_fleet.py --hosts 3 --receivers 2 --mb 64`` runs one fleet with relays and
prints per-version times; the tests (``tests/fleet/``) and ``bench/bench_fleet.py`` use
the same class.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

from ..config import child_environ
from ..errors import ConfigError, HotweightsError

log = logging.getLogger(__name__)

SUBNET = "10.77.0"
"""Addresses the hosts get, inside the namespaces only (never on the machine's own interfaces)."""


class NetnsError(HotweightsError, RuntimeError):
    """Building or changing the namespace topology failed (the ``ip``/``tc`` command and its output)."""


def _run(args: Sequence[str], timeout: float = 20.0) -> str:
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(args)}: {exc}") from None
    if out.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {out.returncode}: {out.stderr.strip()[:500]}")
    return out.stdout


def available() -> tuple[bool, str]:
    """(True, "") when namespaces, veth pairs and tbf can be created here; else (False, why)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"the {tool!r} command (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    probe = Netns(1, rate="100mbit")
    try:
        probe.open()
    except NetnsError as exc:
        return False, str(exc)
    finally:
        probe.close()
    return True, ""


class Netns:
    """``n_hosts`` hosts on one shaped switch. Use as a context manager (or ``open`` / ``close``).

    ``rate``: the tbf rate of every link in each direction (``None``: unshaped). Names carry a random
    prefix, so concurrent runs never collide. ``popen`` starts processes (``subprocess.Popen`` by
    default) and is given ``ip netns exec NAME argv...`` with ``Popen``'s keyword arguments.
    """

    def __init__(self, n_hosts: int, *, rate: Optional[str] = "500mbit", burst: str = "256kb",
                 latency: str = "50ms", prefix: Optional[str] = None,
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen):
        if not 1 <= n_hosts <= 200:
            raise ConfigError(f"n_hosts must be 1..200, got {n_hosts}")
        self.n_hosts = n_hosts
        self.rate = rate
        self.burst = burst
        self.latency = latency
        # Interface names are at most 15 characters: prefix (7) + "h" + index (3) + end (1).
        self.prefix = prefix or f"hw{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}sw"
        self._made: list[str] = []
        self._procs: list[Proc] = []
        self._popen = popen

    # ---------------------------------------------------------------- topology
    def ns(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def local(self, i: int) -> str:
        """A host-local shm:// endpoint name, unique across hosts (namespaces share /dev/shm)."""
        return f"shm://{self.prefix}h{i}"

    def _veth(self, i: int) -> tuple[str, str]:
        return f"{self.prefix}h{i}a", f"{self.prefix}h{i}b"

    def open(self) -> "Netns":
        try:
            self._add_ns(self.switch)
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for i in range(self.n_hosts):
                ns = self.ns(i)
                self._add_ns(ns)
                host_end, switch_end = self._veth(i)
                _run(["ip", "link", "add", host_end, "netns", ns, "type", "veth", "peer", "name", switch_end,
                      "netns", self.switch])
                _run(["ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", host_end])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "-n", ns, "link", "set", host_end, "up"])
                _run(["ip", "-n", self.switch, "link", "set", switch_end, "master", "br0"])
                _run(["ip", "-n", self.switch, "link", "set", switch_end, "up"])
                if self.rate:
                    self.shape(ns, host_end)
                    self.shape(self.switch, switch_end)
        except BaseException:
            self.close()
            raise
        log.info("netns: %d host(s) %s on %s.0/24, links %s", self.n_hosts,
                 ", ".join(self.ns(i) for i in range(self.n_hosts)), SUBNET, self.rate or "unshaped")
        return self

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._made.append(ns)

    def shape(self, ns: str, dev: str) -> None:
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
              "rate", str(self.rate), "burst", self.burst, "latency", self.latency])

    def link(self, i: int, up: bool) -> None:
        """Take host ``i``'s link down (a cable pulled) or bring it back."""
        _run(["ip", "-n", self.ns(i), "link", "set", self._veth(i)[0], "up" if up else "down"])

    # ---------------------------------------------------------------- processes
    def spawn(self, i: int, argv: Sequence[str], *, env: Optional[dict[str, str]] = None,
              stdin: Optional[int] = None) -> "Proc":
        """Start ``argv`` inside host ``i`` (own process group; its output is collected line by line)."""
        popen = self._popen(["ip", "netns", "exec", self.ns(i), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=stdin, text=True, env=env, start_new_session=True)
        proc = Proc(popen, host=i)
        self._procs.append(proc)
        return proc

    def stop(self, proc: "Proc", sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal one process started here (and its group) and reap it."""
        proc = proc.popen
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop every process started here, then delete every namespace (with them their veths and the
        bridge)."""
        for proc in self._procs:
            try:
                self.stop(proc, signal.SIGKILL, timeout=5.0)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("netns: could not stop pid %d: %s", proc.pid, exc)
        self._procs.clear()
        for ns in reversed(self._made):
            try:
                _run(["ip", "netns", "del", ns])
            except NetnsError as exc:
                log.warning("netns: %s", exc)
        self._made.clear()

    def __enter__(self) -> "Netns":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def child_env(**extra: str) -> dict[str, str]:
    """Environment for the fleet's processes: this package importable, UCX quiet."""
    env = child_environ()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    env.update(extra)
    return env


class Proc:
    """A process in a host namespace whose stdout JSON lines and stderr tail are collected by threads
    (so a chatty child never blocks on a full pipe, and waits for a line have deadlines)."""

    def __init__(self, popen: subprocess.Popen, host: int):
        self.popen = popen
        self.pid = popen.pid
        self.host = host
        self.rows: list[dict] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._done = 0
        for stream, sink in ((popen.stdout, self._row), (popen.stderr, self._err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream, sink) -> None:
        for line in stream:
            with self._cond:
                sink(line)
                self._cond.notify_all()
        with self._cond:
            self._done += 1
            self._cond.notify_all()

    def _row(self, line: str) -> None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return
        if isinstance(row, dict):
            self.rows.append(row)

    def _err(self, line: str) -> None:
        self.stderr.append(line)
        del self.stderr[:-200]

    def poll(self) -> Optional[int]:
        return self.popen.poll()

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def matching(self, want: dict[str, object]) -> list[dict]:
        with self._cond:
            return [r for r in self.rows if all(r.get(k) == v for k, v in want.items())]

    def wait_for(self, want: dict[str, object], timeout: float) -> dict:
        """The first JSON line whose fields include ``want``; NetnsError after ``timeout`` or an exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.rows:
                    if all(r.get(k) == v for k, v in want.items()):
                        return r
                if self._done == 2:
                    raise NetnsError(f"pid {self.pid} on host {self.host} exited ({self.popen.poll()}) "
                                     f"before printing {want}: {''.join(self.stderr[-20:])[-2000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NetnsError(f"pid {self.pid} on host {self.host}: no line with {want} within "
                                     f"{timeout:.0f}s; stderr: {''.join(self.stderr[-20:])[-2000:]}")
                self._cond.wait(left)


def start_fleet(net: Netns, *, receivers: int, topology: str, port: int = 29500, transport: str = "auto",
                timeout_s: float = 30.0, bucket_mb: int = 4, env: Optional[dict[str, str]] = None,
                verbose: bool = False, fallback: bool = False) -> tuple[list[Proc], list[list[Proc]]]:
    """Relays and receivers on hosts 1..H-1 (host 0 is the publisher's). ``topology``: ``chain``
    (each relay follows the previous host's), ``tree`` (every relay follows the publisher) or
    ``star`` (no relays: every receiver follows the publisher over the network). ``fallback``
    (chain): each relay also lists the host two up the chain, to route around a dead relay."""
    py = [sys.executable, "-m", "hotweights_trainer", *(["-v"] if verbose else [])]
    common = ["--timeout", str(timeout_s)]
    env = env or child_env()
    relays: list[Proc] = []
    rxs: list[list[Proc]] = []
    for i in range(1, net.n_hosts):
        upstream = f"tcp://{net.ip(0)}:{port}"
        if topology == "chain" and i > 1:
            upstream = f"tcp://{net.ip(i - 1)}:{port}"
        if topology == "star":
            endpoint = upstream
        else:
            argv = [*py, "relay", "--upstream", upstream, "--local", net.local(i), "--json", "--transport",
                    transport, "--bucket-mb", str(bucket_mb), *common]
            if fallback and topology == "chain" and i > 1:
                argv += ["--upstream", f"tcp://{net.ip(i - 2)}:{port}"]
            if topology == "chain" and i < net.n_hosts - 1:
                argv += ["--serve", f"tcp://{net.ip(i)}:{port}"]
            relays.append(net.spawn(i, argv, env=env))
            endpoint = net.local(i)
        rx_transport = transport if topology == "star" else "auto"
        rx_argv = [*py, "receive", "--endpoint", endpoint, "--json", "--transport", rx_transport,
                   "--timeout", str(max(timeout_s, 120.0))]
        rxs.append([net.spawn(i, rx_argv, env=env) for _ in range(receivers)])
    for proc in relays:
        proc.wait_for({"event": "ready"}, max(timeout_s, 90.0))  # imports on a busy machine
    return relays, rxs
