"""The weights sidecar (write, validate, compare) and ``hotweights opt-check`` as a user runs it."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotweights_trainer.errors import SidecarError
from hotweights_trainer.optim import SIDECAR_NAME, compare, model_fingerprints, read_sidecar, write_sidecar
from hotweights_trainer.optim.sidecar import parse_sidecar
from tests.conftest import run_python


def small_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
                               torch.nn.Linear(6, 2).to(torch.bfloat16))


def test_sidecar_round_trip_and_compare(tmp_path):
    model = small_model()
    path = write_sidecar(tmp_path, model, step=7, version=3)
    assert path == tmp_path / SIDECAR_NAME
    sidecar = read_sidecar(tmp_path)
    assert (sidecar.step, sidecar.version) == (7, 3)
    assert set(sidecar.tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert sidecar.tensors["2.weight"].dtype == "torch.bfloat16"
    assert compare(sidecar, model_fingerprints(model)).updated == []
    with torch.no_grad():
        model[0].bias[1] += 1.0
        model[2].weight.data = model[2].weight.data.float()  # same values, other dtype: other bytes
    diff = compare(sidecar, model_fingerprints(model))
    assert diff.updated == ["0.bias", "2.weight"] and diff.shape_changed == []
    assert len(diff.unchanged) == 2 and not diff.missing and not diff.new
    assert [p.name for p in tmp_path.iterdir()] == [SIDECAR_NAME]  # no temp files left behind


def valid_doc() -> dict:
    return {"format": "hotweights-weights-sidecar", "format_version": 1, "step": 2, "version": None,
            "tensors": {"w": {"digest": "0123456789abcdef", "shape": [2, 3], "dtype": "torch.float32"}}}


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(format_version=2), "format_version"),
    (lambda d: d.update(tensors=[]), "tensors"),
    (lambda d: d.update(step=-1), "step"),
    (lambda d: d.update(version="3"), "version"),
    (lambda d: d["tensors"]["w"].update(digest="xyz"), "digest"),
    (lambda d: d["tensors"]["w"].update(shape=[2, -3]), "shape"),
    (lambda d: d["tensors"]["w"].update(shape="2x3"), "shape"),
    (lambda d: d["tensors"]["w"].update(dtype="torch.evil"), "dtype"),
    (lambda d: d["tensors"].update(v=5), "'v'"),
])
def test_malformed_sidecar_is_a_typed_error(mutate, needle):
    doc = valid_doc()
    parse_sidecar(doc)
    mutate(doc)
    with pytest.raises(SidecarError, match=needle):
        parse_sidecar(doc)


def test_missing_or_unreadable_sidecar(tmp_path):
    with pytest.raises(SidecarError, match="no hotweights sidecar"):
        read_sidecar(tmp_path)
    (tmp_path / SIDECAR_NAME).write_bytes(b"{not json")
    with pytest.raises(SidecarError, match="not readable JSON"):
        read_sidecar(tmp_path)
    with pytest.raises(SidecarError, match="does not exist"):
        write_sidecar(tmp_path / "absent", small_model())


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**60) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)
_FIELDS = ["format", "format_version", "step", "version", "tensors", "digest", "shape", "dtype"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(_FIELDS), value=_json)
def test_fuzzed_sidecar_fields_never_escape_as_other_errors(key, value):
    doc = valid_doc()
    target = doc["tensors"]["w"] if key in ("digest", "shape", "dtype") else doc
    target[key] = value
    try:
        parse_sidecar(doc)
    except SidecarError:
        pass


def save_checkpoint(folder, model) -> None:
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    write_sidecar(folder, model, step=5, version=2)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The same entry point as the ``hotweights`` command, in this process (no interpreter start-up)."""
    from hotweights_trainer.cli import main

    try:
        rc = main(["opt-check", *argv])
    except SystemExit as exc:  # argparse usage errors exit 2
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_opt_check_counts_text_and_json(capsys, monkeypatch):
    # As a user runs it: a real `python -m hotweights_trainer` process.
    text = run_python(["-m", "hotweights_trainer", "opt-check", "--updated", "3", "--unchanged", "10",
                       "--policy", "attenuate", "--attenuation", "0.5"]).stdout
    assert "preserved         10" in text and "attenuated         3" in text
    assert "reset              0" in text
    assert "sqrt(a) = 0.7071" in text and "a / sqrt(a)" in text
    rc, out, _ = cli(capsys, "--updated", "3", "--unchanged", "10", "--policy", "reset", "--json")
    out = json.loads(out)
    assert rc == 0 and (out["preserved"], out["attenuated"], out["reset"]) == (10, 0, 3)
    assert out["effective_update_scale"] is None and out["moment_scale"] == 0.0
    monkeypatch.setenv("HOTWEIGHTS_OPT_POLICY", "attenuate")
    monkeypatch.setenv("HOTWEIGHTS_OPT_ATTENUATION", "0.25")
    rc, out, _ = cli(capsys, "--updated", "1", "--unchanged", "1", "--json")
    out = json.loads(out)
    assert out["policy"] == "attenuate" and out["effective_update_scale"] == 0.5 and out["attenuated"] == 1


def test_opt_check_rejects_bad_input(capsys):
    bad = run_python(["-m", "hotweights_trainer", "opt-check", "--updated", "1", "--unchanged", "1",
                      "--policy", "zero"], check=False)
    assert bad.returncode == 1 and "optimizer policy must be one of preserve, reset, attenuate" in bad.stderr
    rc, _, err = cli(capsys, "--updated", "1", "--unchanged", "1", "--policy", "attenuate",
                     "--attenuation", "2")
    assert rc == 1 and "within [0, 1]" in err
    rc, _, err = cli(capsys, "--updated", "1", "--unchanged", "-1")
    assert rc == 1 and "non-negative" in err
    assert cli(capsys, "--updated", "1")[0] == 2
    assert cli(capsys, "--checkpoint", "x", "--updated", "1")[0] == 2


def test_opt_check_checkpoint_preview(tmp_path, capsys):
    model = small_model()
    ckpt = tmp_path / "checkpoint-5"
    save_checkpoint(ckpt, model)
    with torch.no_grad():
        model[0].weight.mul_(2)
    save_checkpoint(tmp_path / "swapped", model)
    from safetensors.torch import save_file

    swapped = tmp_path / "swapped" / "model.safetensors"
    args = ["-m", "hotweights_trainer", "opt-check", "--checkpoint", str(ckpt), "--policy", "reset"]
    out = json.loads(run_python(args + ["--weights", str(swapped), "--json"]).stdout)
    assert out["updated_names"] == ["0.weight"] and (out["preserved"], out["reset"]) == (3, 1)
    assert (out["step"], out["version"]) == (5, 2)
    rc, same, _ = cli(capsys, "--checkpoint", str(ckpt), "--policy", "reset", "--json")
    same = json.loads(same)  # the checkpoint's own weights: nothing changed
    assert (same["preserved"], same["reset"], same["updated_names"]) == (4, 0, [])
    rc, text, _ = cli(capsys, "--checkpoint", str(ckpt), "--weights", str(swapped), "--policy", "attenuate",
                      "--attenuation", "0.5")
    assert "updated: 0.weight" in text and "attenuated         1" in text and "(step 5, version 2)" in text
    # A resized tensor is always reset, whatever the policy.
    resized = dict(model.state_dict())
    resized["2.bias"] = torch.zeros(3, dtype=torch.bfloat16)
    save_file(resized, str(tmp_path / "resized.safetensors"))
    rc, out, _ = cli(capsys, "--checkpoint", str(ckpt), "--policy", "preserve", "--json",
                     "--weights", str(tmp_path / "resized.safetensors"))
    out = json.loads(out)
    assert out["shape_changed"] == ["2.bias"] and out["reset"] == 1 and out["preserved"] == 3
    rc, _, err = cli(capsys, "--checkpoint", str(tmp_path))
    assert rc == 1 and "no hotweights sidecar" in err
    rc, _, err = cli(capsys, "--checkpoint", str(ckpt), "--weights", str(tmp_path / "nothing-here"))
    assert rc == 1 and "no weights to compare" in err
