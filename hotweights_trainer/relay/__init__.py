"""Host relays: one network copy per host, pipelined from host to host.

- :mod:`.forward` -- how one version passes through a relay (the publisher and receiver hooks it uses);
- :mod:`.node` -- :class:`~.node.HostRelay`, the process behind ``hotweights relay``;
- :mod:`.netns` -- real multi-host fleets on one machine (network namespaces, a bridge, shaped links)
  for the tests, the benchmark and ``scripts/netns_fleet.py``.

``HostRelay`` is imported lazily: the publisher imports :mod:`.forward`, and :mod:`.node` imports the
publisher.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HostRelay"]


def __getattr__(name: str) -> Any:
    if name == "HostRelay":
        from .node import HostRelay

        return HostRelay
    raise AttributeError(name)
