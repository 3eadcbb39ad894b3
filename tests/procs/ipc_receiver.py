"""tests/procs/tx_receiver.py with the cuda_ipc transport on host memory (no GPU here).

    python -m tests.procs.ipc_receiver IPC_DIR  [tx_receiver arguments...]
"""

from __future__ import annotations

import sys

from tests.procs import host_ipc, tx_receiver

if __name__ == "__main__":
    host_ipc.install(sys.argv[1])
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    sys.exit(tx_receiver.main())
