"""Run every bench/bench_*.py script one after another and print their tables (``make bench``).

The same as ``hotweights bench --dir bench``; every option of that command works here, e.g.
``python bench/run_all.py --only core`` or ``--quick`` (smoke-sized runs) or ``--json``.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hotweights_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--dir", HERE, *sys.argv[1:]]))
