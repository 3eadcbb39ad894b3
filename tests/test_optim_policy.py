"""Optimizer-state policies on real torch optimizers, checked numerically."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hotweights_trainer.errors import ConfigError
from hotweights_trainer.optim import apply_policy, effective_update_scale, expected_counts

OPTIMIZERS = {
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
}
# Other implementations of the same update: fused kernels (a tensor step) and the per-tensor loop.
VARIANTS = {
    "adamw_fused": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, fused=True)),
    "adam_loop_amsgrad": (torch.optim.Adam, dict(lr=1e-2, foreach=False, amsgrad=True)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
}
UPDATED = {"0.weight", "2.bias"}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def loss_on(model: torch.nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


def trained(kind: str, steps: int = 3):
    cls, kw = {**OPTIMIZERS, **VARIANTS}[kind]
    model = make_model()
    opt = cls(model.parameters(), **kw)
    for s in range(steps):
        opt.zero_grad()
        loss_on(model, s).backward()
        opt.step()
    return model, opt


def snapshot(model, opt) -> dict[str, dict]:
    return {name: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                   for k, v in opt.state.get(p, {}).items()}
            for name, p in model.named_parameters()}


def step(model, opt, seed: int = 99) -> None:
    opt.zero_grad()
    loss_on(model, seed).backward()
    opt.step()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_preserve_keeps_every_state(kind):
    model, opt = trained(kind)
    before = snapshot(model, opt)
    report = apply_policy(opt, UPDATED, policy="preserve", model=model)
    after = snapshot(model, opt)
    for name in before:
        assert before[name].keys() == after[name].keys()
        for key in before[name]:
            assert torch.equal(torch.as_tensor(before[name][key]), torch.as_tensor(after[name][key]))
    assert (report.preserved, report.attenuated, report.reset) == (4, 0, 0)
    assert sorted(report.updated) == sorted(UPDATED)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS) + sorted(VARIANTS))
def test_attenuate_scales_every_moment_and_keeps_step(kind):
    model, opt = trained(kind)
    before = snapshot(model, opt)
    report = apply_policy(opt, UPDATED, policy="attenuate", attenuation=0.3, model=model)
    after = snapshot(model, opt)
    moments = 0
    for name, state in before.items():
        for key, old in state.items():
            new = after[name][key]
            if key == "step" or name not in UPDATED:
                assert torch.equal(torch.as_tensor(old), torch.as_tensor(new)), (name, key)
            else:
                assert torch.equal(new, old * 0.3), (name, key)
                assert not torch.equal(new, old)
                moments += 1
    expected_keys = {"adam": 2, "adamw": 2, "sgd_momentum": 1, "adamw_fused": 2, "adam_loop_amsgrad": 3,
                     "sgd_nesterov": 1}[kind]
    assert moments == expected_keys * len(UPDATED)
    assert (report.preserved, report.attenuated, report.reset) == (2, 2, 0)
    step(model, opt)  # the next step runs on the attenuated state


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS) + sorted(VARIANTS) + ["adagrad"])
def test_reset_next_step_equals_fresh_optimizers_first_step(kind):
    if kind == "adagrad":  # creates its state in the constructor, not on first sight
        cls, kw = torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.25)
        model = make_model()
        opt = cls(model.parameters(), **kw)
        for s in range(3):
            step(model, opt, s)
    else:
        cls, kw = {**OPTIMIZERS, **VARIANTS}[kind]
        model, opt = trained(kind)
    control_model, control_opt = copy.deepcopy((model, opt))  # same run without the policy
    report = apply_policy(opt, UPDATED, policy="reset", model=model)
    assert (report.preserved, report.attenuated, report.reset) == (2, 0, 2)

    params = dict(model.named_parameters())
    fresh_params = {n: torch.nn.Parameter(params[n].detach().clone()) for n in sorted(UPDATED)}
    step(model, opt)
    # A brand-new optimizer over copies of the updated parameters, given the same gradients.
    fresh_opt = cls(list(fresh_params.values()), **kw)
    for n, fp in fresh_params.items():
        fp.grad = params[n].grad.clone()
    fresh_opt.step()
    for n, fp in fresh_params.items():
        assert torch.equal(params[n], fp), n
    step(control_model, control_opt)
    control = dict(control_model.named_parameters())
    for n in params:
        same = torch.equal(params[n], control[n])
        assert same == (n not in UPDATED), n  # unchanged parameters step exactly as without the policy


def test_attenuated_adam_update_scales_by_sqrt_a():
    """Scaling both moments by a scales m / sqrt(v) by a / sqrt(a) = sqrt(a) (with no new gradient)."""
    a = 0.25
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-12)
    for s in range(3):
        step(model, opt, s)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    apply_policy(opt, {p for p in model.parameters()}, policy="attenuate", attenuation=a)
    deltas = []
    for m, o in ((model, opt), (twin_model, twin_opt)):
        before = [p.detach().clone() for p in m.parameters()]
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        o.step()
        deltas.append(torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(m.parameters(), before)]))
    torch.testing.assert_close(deltas[0], math.sqrt(a) * deltas[1], rtol=1e-4, atol=1e-9)
    assert effective_update_scale("attenuate", a) == math.sqrt(a)


@pytest.mark.parametrize("policy", ["preserve", "attenuate"])
def test_shape_change_resets_under_every_policy(policy):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    # The output dimension grew (as with a resized vocabulary): the stored moments no longer fit.
    model.weight.data = torch.randn(5, 4)
    model.bias.data = torch.randn(5)
    report = apply_policy(opt, {"weight"}, policy=policy, attenuation=0.5, model=model)
    assert report.shape_changed == ["weight", "bias"]
    assert report.reset == 2 and report.preserved == 0 and report.attenuated == 0
    assert model.weight not in opt.state and model.bias not in opt.state
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()  # a valid structure again: the step re-creates the state with the new shapes
    assert opt.state[model.weight]["exp_avg"].shape == (5, 4)


def test_unmapped_frozen_and_no_state_are_reported():
    model = make_model()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    updated = {"0.weight", "0.bias", "no.such.weight", torch.zeros(2)}
    report = apply_policy(opt, updated, policy="reset", model=model)
    assert "no.such.weight" in report.unmapped and "<tensor (2,)>" in report.unmapped
    assert report.not_in_optimizer == ["0.bias"]
    assert report.no_state == 1 and report.reset == 0 and report.preserved == 2  # never stepped: no state


def test_parameters_and_param_names_resolve_without_model():
    model = make_model()
    opt = torch.optim.Adam(model.named_parameters(), lr=1e-2)  # groups carry param_names
    for s in range(2):
        step(model, opt, s)
    by_name = apply_policy(opt, {"2.weight"}, policy="reset")
    assert by_name.updated == ["2.weight"] and by_name.reset == 1
    by_param = apply_policy(opt, [model[0].weight], policy="attenuate", attenuation=0.5)
    assert by_param.updated == ["0.weight"] and by_param.attenuated == 1


@pytest.mark.parametrize("policy,attenuation", [("bogus", 0.5), ("reset", -0.1), ("attenuate", 1.5),
                                                ("attenuate", float("nan")), ("attenuate", True),
                                                ("attenuate", "0.5")])
def test_bad_policy_or_attenuation_raises_config_error_and_changes_nothing(policy, attenuation):
    model, opt = trained("adam")
    before = snapshot(model, opt)
    with pytest.raises(ConfigError) as info:
        apply_policy(opt, UPDATED, policy=policy, attenuation=attenuation, model=model)
    assert ("policy" in str(info.value)) if policy == "bogus" else ("attenuation" in str(info.value))
    after = snapshot(model, opt)
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])


def test_bad_updated_argument_is_a_config_error():
    model, opt = trained("adam")
    with pytest.raises(ConfigError, match="set of parameter names"):
        apply_policy(opt, "0.weight", policy="reset", model=model)
    with pytest.raises(ConfigError, match="int"):
        apply_policy(opt, {3}, policy="reset", model=model)
    with pytest.raises(ConfigError, match="resolve names"):
        apply_policy(opt, {"0.weight"}, policy="reset")  # no model, no param_names


class NeedsExtraArg(torch.optim.Adagrad):
    """An eagerly initialising optimizer that cannot be re-constructed from its defaults."""

    def __init__(self, params, tag, lr=0.1):
        self.tag = tag
        super().__init__(params, lr=lr)


def test_reset_falls_back_to_zeroing_when_no_probe_can_be_built():
    model = make_model()
    opt = NeedsExtraArg(model.parameters(), tag="x")
    for s in range(2):
        step(model, opt, s)
    report = apply_policy(opt, {"0.weight"}, policy="reset", model=model)
    state = opt.state[model[0].weight]
    assert report.reset == 1 and report.notes
    assert float(state["step"]) == 0.0 and torch.count_nonzero(state["sum"]) == 0
    step(model, opt)  # structure intact: no KeyError


def test_expected_counts_match_a_real_application():
    model, opt = trained("adamw")
    for policy in ("preserve", "reset", "attenuate"):
        model, opt = trained("adamw")
        report = apply_policy(opt, UPDATED, policy=policy, attenuation=0.5, model=model)
        want = expected_counts(len(UPDATED), 4 - len(UPDATED), policy, 0.5)
        assert (want["preserved"], want["attenuated"], want["reset"]) == (
            report.preserved, report.attenuated, report.reset)
    with pytest.raises(ConfigError):
        expected_counts(-1, 2, "reset", 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "capturable"])
def test_reset_and_attenuate_on_cuda_state(impl):
    """CUDA optimizers keep ``step`` as a device tensor (fused / capturable): same guarantees."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    model = make_model().cuda()
    kw = {"fused": True} if impl == "fused" else {"capturable": True, "foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **kw)
    x, y = torch.randn(16, 6, device="cuda"), torch.randn(16, 3, device="cuda")

    def one_step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    for _ in range(3):
        one_step()
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in opt.state[params["2.weight"]].items()}
    apply_policy(opt, {"2.weight"}, policy="attenuate", attenuation=0.5, model=model)
    assert torch.equal(opt.state[params["2.weight"]]["exp_avg"], before["exp_avg"] * 0.5)
    assert torch.equal(opt.state[params["2.weight"]]["step"], before["step"])
    apply_policy(opt, {"0.weight"}, policy="reset", model=model)
    fresh = torch.nn.Parameter(params["0.weight"].detach().clone())
    one_step()
    fresh.grad = params["0.weight"].grad.clone()
    fresh_opt = torch.optim.AdamW([fresh], lr=1e-2, **kw)
    fresh_opt.step()
    torch.testing.assert_close(params["0.weight"], fresh, rtol=0, atol=0)
    assert opt.state[params["0.weight"]]["step"].device.type == "cuda"
