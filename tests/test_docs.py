"""Docs never drift from the code: TUNING.md is regenerated from SyncConfig, the earlier guide's
names are all accounted for, ARCHITECTURE.md covers every module, and every metric name the docs or
the dashboard mention exists."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from hotweights_trainer import SyncConfig, metrics
from hotweights_trainer.config import SETTINGS, default_of, field_docs

from tests.conftest import ROOT, run_python

TUNING = ROOT / "docs" / "TUNING.md"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
SEED = ROOT.parent / "shared" / "seed" / "TUNING.md"  # the original guide, next to the checkout when present
SEED_NAMES = ROOT / "tests" / "data" / "seed_tuning_names.txt"  # its HOTWEIGHTS_* names, kept with the tests


def _generator():
    spec = importlib.util.spec_from_file_location("gen_tuning_doc", ROOT / "scripts" / "gen_tuning_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- TUNING.md
def test_tuning_doc_is_regenerated_identically(tmp_path):
    # As CI or a contributor runs it: the committed file equals what the config generates now.
    proc = run_python(["scripts/gen_tuning_doc.py", "--check"], check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    # ... and the check has teeth: an edited copy is reported with a diff.
    stale = tmp_path / "TUNING.md"
    stale.write_text(TUNING.read_text().replace("| `32` |", "| `64` |", 1))
    proc = run_python(["scripts/gen_tuning_doc.py", "--check", "--output", str(stale)], check=False)
    assert proc.returncode == 1 and "-| `HOTWEIGHTS_BUCKET_MB`" in proc.stdout and "out of date" in proc.stderr


def test_tuning_doc_gives_every_knob_default_meaning_and_group():
    text = TUNING.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    for st in SETTINGS:
        env = SyncConfig.env_name(st.flat)
        rows = [ln for ln in text.splitlines() if ln.startswith(f"| `{env}` |")]
        assert len(rows) == 1, env
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[0])[1:-1]]
        assert cells[1].startswith(f"`{st.path}`"), env  # the section field it is
        default = default_of(st.flat)
        expected = "(empty)" if default is None else f"`{int(default) if isinstance(default, bool) else default}`"
        assert cells[3] == expected, env
        assert cells[4] == field_docs()[st.flat].replace("|", "\\|"), env
        # Where it applies: the row sits under its section's heading.
        group = next(s for s in sections if f"| `{env}` |" in s)
        assert group.splitlines()[0].strip() == st.section.KEY, env


def _seed_names() -> set[str]:
    lines = SEED_NAMES.read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def test_seed_guide_names_are_fields_or_explained():
    gen = _generator()
    missing = gen.unexplained_seed_names("\n".join(sorted(_seed_names())), TUNING.read_text())
    assert not missing, f"seed guide names neither a SyncConfig field nor listed as not applicable: {missing}"


def test_seed_name_list_matches_the_original_guide():
    # The list above is a copy so the check runs anywhere; where the original sits next to the
    # checkout, the copy must not have drifted from it.
    if not SEED.exists():
        pytest.skip("the original tuning guide is not next to this checkout")
    gen = _generator()
    assert _seed_names() == set(gen._NAME.findall(SEED.read_text(encoding="utf-8", errors="replace")))


def test_seed_check_flags_unexplained_names():
    gen = _generator()
    doc = TUNING.read_text()
    seed = "use HOTWEIGHTS_BUCKET_MB and HOTWEIGHTS_MAGIC_TURBO=1 and HOTWEIGHTS_REQUIRE"
    assert gen.unexplained_seed_names(seed, doc) == ["HOTWEIGHTS_MAGIC_TURBO"]
    explained = doc + "| `HOTWEIGHTS_MAGIC_TURBO` | never existed: it only set a simulated bandwidth |\n"
    assert gen.unexplained_seed_names(seed, explained) == []
    no_reason = doc + "| `HOTWEIGHTS_MAGIC_TURBO` |  |\n"
    assert gen.unexplained_seed_names(seed, no_reason) == ["HOTWEIGHTS_MAGIC_TURBO"]


# ---------------------------------------------------------------- ARCHITECTURE.md
def test_architecture_covers_every_module():
    text = ARCHITECTURE.read_text()
    package = ROOT / "hotweights_trainer"
    # Every module with code in it (empty __init__.py files only mark packages).
    modules = sorted(p.relative_to(ROOT).as_posix() for p in package.rglob("*.py") if p.stat().st_size > 0)
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/ARCHITECTURE.md needs a paragraph for: {missing}"
    for state in ("sending", "waiting", "committed", "aborted"):
        assert f"`{state}`" in text


# ---------------------------------------------------------------- metric names in docs and dashboard
def _exported_names() -> set[str]:
    """Every sample name the registry can export (counters with _total, histograms with their series)."""
    names = set()
    for fam in metrics.REGISTRY.collect():
        suffixes = {"counter": ("_total",), "histogram": ("", "_bucket", "_count", "_sum"),
                    "gauge": ("",)}.get(fam.type, ("",))
        names |= {fam.name + s for s in suffixes}
    return names


def _mentioned(text: str) -> set[str]:
    # Names followed by ".ext" are files or modules (hotweights_sidecar.json, hotweights_trainer.kv).
    found = re.findall(r"\bhotweights_[a-z0-9_]+(?![a-z0-9_]|\.[A-Za-z])", text)
    return {m for m in found if m != "hotweights_trainer"}


def test_documented_metrics_exist():
    exported = _exported_names()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), DASHBOARD]:
        unknown = _mentioned(path.read_text()) - exported
        assert not unknown, f"{path.name} mentions metrics that do not exist: {sorted(unknown)}"


def test_dashboard_is_valid_and_complete():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(t.get("datasource") for p in dash["panels"] for t in p.get("targets", []))
    used = set().union(*(_mentioned(e) for e in exprs))
    # Every exported metric has a panel, so new metrics get one when they land.
    families = {fam.name for fam in metrics.REGISTRY.collect()}
    unpanelled = {f for f in families if not any(u.startswith(f) for u in used)}
    assert not unpanelled, f"docs/grafana-dashboard.json has no panel for: {sorted(unpanelled)}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
