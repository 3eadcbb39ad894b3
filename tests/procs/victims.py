"""A fork server of receivers that SIGKILL themselves mid-version (for repeated kill-and-continue tests).

Starting a receiver process costs seconds of imports; this process pays them once, then forks one
real receiver process per ``V:I`` line read on stdin. That child follows --endpoint like
tests/procs/tx_receiver.py and SIGKILLs itself when bucket I of version V arrives. Lines out:
``{"ready": true}`` once, then per child ``{"spawned": PID}`` and, when it has gone,
``{"exited": PID, "signal": N}`` (N = 0 when it was not killed by a signal). A child whose server
goes away exits too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from hotweights_trainer import SyncConfig, WeightReceiver
from hotweights_trainer.transports import torchdist  # noqa: F401 - imported once here, not in every child

from tests.procs.common import SpecModule, load_spec


def _child(args: argparse.Namespace, die: tuple[int, int], server_gone: int) -> None:
    model = SpecModule(load_spec(args.spec))
    cfg = SyncConfig(transport=args.transport, timeout_s=args.timeout)
    with WeightReceiver(args.endpoint, model=model, config=cfg) as rx:
        deliver = rx.on_bucket

        def on_bucket(version, index, data):
            if (version, index) == die:
                os.kill(os.getpid(), signal.SIGKILL)
            deliver(version, index, data)

        rx.on_bucket = on_bucket
        os.read(server_gone, 1)  # blocks until the server exits (EOF): nothing outlives the test


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--transport", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        die = tuple(int(x) for x in line.split(":"))
        gone_r, gone_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(gone_w)
            try:
                _child(args, die, gone_r)
            finally:
                os._exit(0)
        os.close(gone_r)
        print(json.dumps({"spawned": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        os.close(gone_w)
        print(json.dumps({"exited": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
