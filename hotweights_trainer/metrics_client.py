"""Read a running process's metrics: fetch its Prometheus exporter and parse the text, validated.

Each process keeps its metrics in its own registry (:mod:`.metrics`), so another process -- the
``hotweights metrics`` command, a test, a notebook -- reads them over HTTP from the exporter that
``SyncConfig.metrics_port`` starts. Everything read from the socket is size-capped and parsed by
prometheus_client's text parser; anything else is a :class:`MetricsError`.
"""

from __future__ import annotations

import logging
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families

from .errors import MetricsError

log = logging.getLogger(__name__)

PREFIX = "hotweights_"


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Family:
    """One metric: its name as declared (a counter's without ``_total``), type, help and samples."""

    name: str
    type: str
    help: str
    samples: list[Sample] = field(default_factory=list)

    def value(self, sample_name: Optional[str] = None, **labels: str) -> Optional[float]:
        """The value of the one sample with this name whose labels include ``labels`` (None if absent)."""
        hits = [s.value for s in self.samples if (sample_name is None or s.name == sample_name)
                and all(s.labels.get(k) == v for k, v in labels.items())]
        if len(hits) > 1:
            raise MetricsError(f"{sample_name or self.name} {labels}: {len(hits)} samples match; give more labels")
        return hits[0] if hits else None


def url_for(host: str, port: int) -> str:
    return f"http://{host}:{port}/metrics"


def fetch(url: str, *, timeout: float, max_bytes: int) -> str:
    """The exposition text at ``url`` (raises MetricsError when unreachable, too large or not text)."""
    if not url.startswith(("http://", "https://")):
        raise MetricsError(f"metrics URL must start with http:// or https://, got {url!r}")
    log.debug("scraping %s (deadline %.1fs)", url, timeout)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
            body = resp.read(max_bytes + 1)
    except (urllib.error.URLError, OSError) as exc:  # refused, timed out, HTTP error status
        raise MetricsError(f"cannot read metrics from {url}: {getattr(exc, 'reason', exc)}") from exc
    if len(body) > max_bytes:
        raise MetricsError(f"metrics from {url} exceed {max_bytes} bytes; refusing to parse them")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MetricsError(f"metrics from {url} are not UTF-8 text: {exc}") from exc


def parse(text: str, *, prefix: str = PREFIX) -> dict[str, Family]:
    """Families whose name starts with ``prefix`` ('' for all), keyed by name."""
    out: dict[str, Family] = {}
    try:
        for fam in text_string_to_metric_families(text):
            if not fam.name.startswith(prefix):
                continue
            samples = [Sample(s.name, dict(s.labels), float(s.value)) for s in fam.samples]
            out[fam.name] = Family(fam.name, fam.type, fam.documentation, samples)
    except (ValueError, TypeError, IndexError, KeyError) as exc:  # what the text parser raises on garbage
        raise MetricsError(f"not Prometheus text exposition format: {exc}") from exc
    # The text format exports each counter's and histogram's creation time as a separate gauge
    # family; it says nothing about a sync, so it is dropped where its metric is present.
    for name in [n for n in out if n.endswith("_created") and n[: -len("_created")] in out]:
        del out[name]
    return out


def scrape(url: str, *, timeout: float, max_bytes: int, prefix: str = PREFIX) -> dict[str, Family]:
    return parse(fetch(url, timeout=timeout, max_bytes=max_bytes), prefix=prefix)


def to_json(families: dict[str, Family]) -> dict[str, Any]:
    """A JSON-safe dict (NaN and infinities, which JSON lacks, as strings)."""
    def num(v: float) -> Any:
        return v if math.isfinite(v) else str(v)

    return {name: {"type": f.type, "help": f.help,
                   "samples": [{"name": s.name, "labels": s.labels, "value": num(s.value)} for s in f.samples]}
            for name, f in sorted(families.items())}


def summary_rows(families: dict[str, Family]) -> list[tuple[str, str, str]]:
    """(metric, labels, value) rows for people: histograms as count / sum / mean, buckets left out."""
    rows: list[tuple[str, str, str]] = []
    for name, fam in sorted(families.items()):
        if fam.type == "histogram":
            groups: dict[tuple, dict[str, float]] = {}
            for s in fam.samples:
                if s.name.endswith(("_count", "_sum")):
                    key = tuple(sorted(s.labels.items()))
                    groups.setdefault(key, {})[s.name.rsplit("_", 1)[1]] = s.value
            for key, g in sorted(groups.items()):
                count, total = g.get("count", 0.0), g.get("sum", 0.0)
                mean = f", mean {total / count * 1e3:.3f} ms" if count and name.endswith("_seconds") else ""
                rows.append((name, _labels(dict(key)), f"count {count:g}, sum {total:.6g}{mean}"))
            continue
        for s in fam.samples:
            rows.append((s.name, _labels(s.labels), f"{s.value:.15g}"))
    return rows


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


__all__ = ["Family", "Sample", "fetch", "parse", "scrape", "to_json", "summary_rows", "url_for", "PREFIX"]
