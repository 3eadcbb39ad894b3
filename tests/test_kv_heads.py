"""Head maps: the documented formula, permutation checks, map sources; and ``hotweights kv-check``."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotweights_trainer.cli import main as cli_main
from hotweights_trainer.errors import KVMigrationError
from hotweights_trainer.kv.heads import (HeadCounts, check_map_fits, derive_head_map, expansion_index,
                                         load_head_map, validate_head_map)
from tests.conftest import run_python


def test_derived_maps_follow_the_documented_formula():
    counts = HeadCounts(8, 2)  # G = 4
    assert counts.group_size == 4
    # into grouped: m[kv*G + g] = g*KvH + kv
    assert derive_head_map(counts, "grouped") == [0, 2, 4, 6, 1, 3, 5, 7]
    # into interleaved: m[g*KvH + kv] = kv*G + g
    assert derive_head_map(counts, "interleaved") == [0, 4, 1, 5, 2, 6, 3, 7]
    assert expansion_index(counts, "grouped") == [0, 0, 0, 0, 1, 1, 1, 1]
    assert expansion_index(counts, "interleaved") == [0, 1, 0, 1, 0, 1, 0, 1]
    assert derive_head_map(HeadCounts(4, 4), "grouped") == [0, 1, 2, 3]  # MHA: nothing to reorder


@settings(max_examples=60, deadline=None)
@given(kv_heads=st.integers(1, 8), group=st.integers(1, 8))
def test_derived_map_converts_each_expanded_order_into_the_other(kv_heads, group):
    counts = HeadCounts(kv_heads * group, kv_heads)
    kv = torch.arange(kv_heads).float().view(1, kv_heads, 1, 1) + 1
    grouped = kv.repeat_interleave(group, dim=1)   # slot kv*G+g holds kv
    interleaved = kv.repeat(1, group, 1, 1)        # slot g*KvH+kv holds kv
    to_g, to_i = derive_head_map(counts, "grouped"), derive_head_map(counts, "interleaved")
    assert sorted(to_g) == list(range(counts.heads)) and sorted(to_i) == list(range(counts.heads))
    assert torch.equal(interleaved[:, to_g], grouped) and torch.equal(grouped[:, to_i], interleaved)
    assert [to_i[j] for j in to_g] == list(range(counts.heads))  # inverse permutations


@pytest.mark.parametrize("bad,words", [
    ([1, 1], "not a permutation"), ([0, 3], "outside 0..1"), ([], "empty"), ("[0,1]", "list of integers"),
    ([True, False], "list of integers"), ([0, 1, 2], "3 entries"),
])
def test_invalid_maps_are_named(bad, words):
    with pytest.raises(KVMigrationError, match=words):
        validate_head_map(bad, 2)


def test_head_counts_and_map_sources(tmp_path):
    with pytest.raises(KVMigrationError, match="do not divide"):
        HeadCounts(6, 4)
    with pytest.raises(KVMigrationError, match="positive"):
        HeadCounts(0, 1)
    counts = HeadCounts(8, 2)
    assert check_map_fits([1, 0], counts) == "compact" and check_map_fits(list(range(8)), counts) == "expanded"
    assert counts.layout_of(2) == "compact" and counts.layout_of(8) == "expanded"
    with pytest.raises(KVMigrationError, match="neither fits"):
        counts.layout_of(4)
    with pytest.raises(KVMigrationError, match="4 entries"):
        check_map_fits([0, 1, 2, 3], counts)
    path = tmp_path / "m.json"
    path.write_text("[2, 0, 1]")
    assert load_head_map(None, str(path)) == [2, 0, 1] and load_head_map("[1, 0]", None) == [1, 0]
    assert load_head_map(None, None) is None
    with pytest.raises(KVMigrationError, match="only one"):
        load_head_map("[0]", str(path))


# ------------------------------------------------------------------------------------- kv-check
def kv_check(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["kv-check", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_kv_check_prints_the_derived_map_group_size_and_validity(capsys):
    code, out, _ = kv_check(capsys, "--heads", "8", "--kv-heads", "2", "--order", "grouped")
    assert code == 0
    assert "group size (G): 4" in out and "[0, 2, 4, 6, 1, 3, 5, 7]" in out
    assert "interleaved -> grouped" in out and "valid permutation" in out
    code, out, _ = kv_check(capsys, "--heads", "8", "--kv-heads", "2", "--order", "interleaved", "--json")
    report = json.loads(out)
    assert code == 0 and report["map"] == [0, 4, 1, 5, 2, 6, 3, 7] and report["group_size"] == 4
    assert report["valid"] and report["layout"] == "expanded" and report["source"] == "derived"


def test_kv_check_explicit_maps(capsys, tmp_path):
    code, out, _ = kv_check(capsys, "--heads", "8", "--kv-heads", "2", "--map", "[1, 0]", "--json")
    report = json.loads(out)
    assert code == 0 and report["valid"] and report["layout"] == "compact" and report["map"] == [1, 0]
    path = tmp_path / "map.json"
    path.write_text(json.dumps(list(reversed(range(8)))))
    code, out, _ = kv_check(capsys, "--heads", "8", "--kv-heads", "2", "--map-file", str(path))
    assert code == 0 and "valid permutation for a cache with repeated KV heads" in out


@pytest.mark.parametrize("args,words", [
    (["--heads", "8", "--kv-heads", "3"], "do not divide"),
    (["--heads", "8", "--kv-heads", "2", "--map", "[0,1,2,3]"], "has 4 entries"),
    (["--heads", "8", "--kv-heads", "2", "--map", "[0,0]"], "not a permutation"),
    (["--heads", "8", "--kv-heads", "2", "--map", "[0,"], "not valid JSON"),
    (["--heads", "8", "--kv-heads", "2", "--map-file", "/nonexistent/map.json"], "cannot read"),
])
def test_kv_check_rejects_incompatible_input_with_exit_1(capsys, args, words):
    code, out, err = kv_check(capsys, *args)
    assert code == 1 and words in err and "INVALID" in out
    code, out, _ = kv_check(capsys, *args, "--json")
    report = json.loads(out)
    assert code == 1 and not report["valid"] and words in report["error"]


def test_kv_check_as_a_user_runs_it():
    ok = run_python(["-m", "hotweights_trainer", "kv-check", "--heads", "4", "--kv-heads", "2", "--order", "grouped"],
                    timeout=60)
    assert "[0, 2, 1, 3]" in ok.stdout and "group size (G): 2" in ok.stdout
    bad = run_python(["-m", "hotweights_trainer", "kv-check", "--heads", "4", "--kv-heads", "2", "--map", "[0,1,2]"],
                     timeout=60, check=False)
    assert bad.returncode == 1 and "3 entries" in bad.stderr


def test_kv_check_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["kv-check", "--heads", "4"])
    assert exc.value.code == 2 and "--kv-heads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["kv-check", "--heads", "4", "--kv-heads", "2", "--map", "[1,0]", "--map-file", "m.json"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
