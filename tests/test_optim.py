"""The reference AdamW and LR schedules (steps/training/optim.py) against independent references.

- AdamW: a float64, element-by-element transcription of the original's formula (and bitwise: the original's
  per-parameter loop, written out here); torch.optim.AdamW is shown to follow its own, different, formula.
- Schedules: multiplier vectors measured on the original code, and transformers' schedule functions.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from steps.model.gpt2 import CARDS, GPT2
from steps.model.lora import LoRAConfig, mark_only_lora_trainable
from steps.training.optim import (
    NO_SCHEDULE,
    SCHEDULES,
    AdamW,
    CapturableAdamW,
    build_scheduler,
    cycle_max_step,
    lr_multiplier,
    param_groups_for,
    parse_cycle,
)

SHAPES = [(3, 4), (5,), (2, 2, 3)]


# --------------------------------------------------------------------------------------------- helpers


def make_params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]


def make_grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """grads[t][i]: gradient of parameter i at update t, of mixed magnitudes so eps matters."""
    g = torch.Generator().manual_seed(seed)
    scales = [1.0, 0.05, 0.003]
    return [[torch.randn(shape, generator=g) * s for shape, s in zip(SHAPES, scales)] for _ in range(steps)]


def float64_reference(p0, grads, lr, betas, eps, wd, correct_bias, variant="reference", has_grad=None):
    """Element by element in float64. variant 'reference' is the original's formula; 'torch' is torch.optim.AdamW's doc formula.

    has_grad(t, i) -> bool says whether parameter i has a gradient at update t (else it is skipped entirely).
    """
    b1, b2 = betas
    out = []
    for i, p_init in enumerate(p0):
        p = p_init.detach().double().numpy().ravel().copy()
        m, v, t = np.zeros_like(p), np.zeros_like(p), 0
        for step, step_grads in enumerate(grads):
            if has_grad is not None and not has_grad(step, i):
                continue
            t += 1
            g = step_grads[i].double().numpy().ravel()
            for j in range(p.size):
                if variant == "torch":
                    p[j] = p[j] * (1 - lr * wd)
                m[j] = b1 * m[j] + (1 - b1) * g[j]
                v[j] = b2 * v[j] + (1 - b2) * g[j] * g[j]
                if variant == "reference":
                    denom = math.sqrt(v[j]) + eps
                    step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
                    p[j] = p[j] - step_size * m[j] / denom
                    p[j] = p[j] - lr * wd * p[j]
                else:
                    denom = math.sqrt(v[j]) / math.sqrt(1 - b2**t) + eps
                    p[j] = p[j] - lr / (1 - b1**t) * m[j] / denom
        out.append(p.reshape(p_init.shape))
    return out


def run_optimizer(opt, params, grads, has_grad=None, scheduler=None):
    for step, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = g.clone() if has_grad is None or has_grad(step, i) else None
        opt.step()
        if scheduler is not None:
            scheduler.step()


def original_loop_step(params, states, lr, betas, eps, wd, correct_bias):
    """The reference trainer's AdamW.step, one parameter at a time, in the same torch ops (the bitwise oracle)."""
    b1, b2 = betas
    for p, st in zip(params, states):
        if not st:
            st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        st["step"] += 1
        st["m"].mul_(b1).add_(p.grad, alpha=1.0 - b1)
        st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
        denom = st["v"].sqrt().add_(eps)
        step_size = lr
        if correct_bias:
            step_size = step_size * math.sqrt(1.0 - b2 ** st["step"]) / (1.0 - b1 ** st["step"])
        p.data.addcdiv_(st["m"], denom, value=-step_size)
        if wd > 0.0:
            p.data.add_(p.data, alpha=-lr * wd)


# --------------------------------------------------------------------------------------------- AdamW

CONFIG = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-2)  # a large eps makes its placement visible in the results


@pytest.mark.parametrize("correct_bias", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_float64_formula(correct_bias, wd):
    # parameter 2 gets no gradient at updates 0 and 1, so it must keep its own step count (t = 1 at update 2)
    def has_grad(step, i):
        return not (i == 2 and step < 2)

    params, grads = make_params(), make_grads(6)
    expected = float64_reference(params, grads, wd=wd, correct_bias=correct_bias, has_grad=has_grad, **CONFIG)
    opt = AdamW(params, weight_decay=wd, correct_bias=correct_bias, **CONFIG)
    run_optimizer(opt, params, grads, has_grad=has_grad)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().double().numpy(), e, rtol=0, atol=1e-6)  # measured: about 2e-7
    assert [opt.state[p]["step"] for p in params] == [6, 6, 4]


def test_adamw_fp32_error_is_far_below_the_formula_differences():
    """The tolerance above is meaningful: moving eps or the decay (torch's formula) shifts results 100x more."""
    params, grads = make_params(), make_grads(6)
    ours = float64_reference(params, grads, wd=0.1, correct_bias=True, **CONFIG)
    torchs = float64_reference(params, grads, wd=0.1, correct_bias=True, variant="torch", **CONFIG)
    assert max(np.abs(a - b).max() for a, b in zip(ours, torchs)) > 2e-4


def test_adamw_bitwise_equals_original_per_parameter_loop():
    params, grads = make_params(), make_grads(7)
    oracle = [nn.Parameter(p.detach().clone()) for p in params]
    states = [{} for _ in oracle]
    opt = AdamW(params, lr=3e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, correct_bias=True)
    for step_grads in grads:
        for p, q, g in zip(params, oracle, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        original_loop_step(oracle, states, 3e-3, (0.9, 0.999), 1e-6, 0.01, True)
    for p, q, st in zip(params, oracle, states):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], st["m"]) and torch.equal(opt.state[p]["exp_avg_sq"], st["v"])


def test_torch_adamw_follows_a_different_formula():
    """Why the original's AdamW is kept: torch.optim.AdamW adds eps after the bias correction and decays before the update.

    It matches the float64 transcription of *its* formula, and differs slightly from the reference's.
    """
    params, grads = make_params(), make_grads(6)
    torch_expected = float64_reference(params, grads, wd=0.1, correct_bias=True, variant="torch", **CONFIG)
    ours_expected = float64_reference(params, grads, wd=0.1, correct_bias=True, **CONFIG)
    opt = torch.optim.AdamW(params, weight_decay=0.1, foreach=True, **CONFIG)
    run_optimizer(opt, params, grads)
    got = [p.detach().double().numpy() for p in params]
    for p, e in zip(got, torch_expected):
        np.testing.assert_allclose(p, e, rtol=0, atol=2e-6)
    diff = max(np.abs(p - e).max() for p, e in zip(got, ours_expected))
    assert 2e-4 < diff < 0.05  # with these (amplifying) settings; about 1e-7 relative at eps=1e-6, wd=0.01


def test_adamw_skips_parameters_without_gradient():
    params = make_params()
    before = params[1].detach().clone()
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    run_optimizer(opt, params, make_grads(3), has_grad=lambda step, i: i != 1)
    assert torch.equal(params[1], before)  # not even decayed
    assert params[1] not in opt.state


def test_adamw_capturable_matches_default_path():
    """Device-side step counts and a device lr copied from LambdaLR's float give the same weights up to fp32 rounding."""
    grads = make_grads(8)
    results = []
    for capturable in (False, True):
        params = make_params()
        optimizer = CapturableAdamW if capturable else AdamW
        opt = optimizer(params, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, correct_bias=True)
        sched = build_scheduler(opt, "linear", warmup_step=2, max_step=8)
        run_optimizer(opt, params, grads, scheduler=sched)
        results.append(params)
        if capturable:
            assert isinstance(opt.state[params[0]]["step"], torch.Tensor) and opt.state[params[0]]["step"].item() == 8
            assert isinstance(opt.param_groups[0]["lr"], float)  # the schedule's state stays plain numbers
            opt.param_groups[0]["lr"] = 3e-3
            opt.load_lr()  # what a replay does first: the graph reads the device copy
            assert opt._device_lrs[0].item() == pytest.approx(3e-3, rel=1e-6)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(results[0][0], make_params()[0])


def test_adamw_capturable_with_two_groups_reads_each_groups_lr():
    """Two groups (weight decay and none, as --no_decay_bias makes) with same-shaped tensors: each group's step uses its
    own device lr and decay, as AdamW's does."""
    grads = [[g, g.clone()] for g, *_ in make_grads(5)]
    results = []
    for optimizer in (AdamW, CapturableAdamW):
        first, second = make_params()[0], make_params()[0]  # same shapes, same values: only the groups differ
        groups = [{"params": [first], "weight_decay": 0.1, "lr": 1e-2}, {"params": [second], "weight_decay": 0.0, "lr": 3e-2}]
        opt = optimizer(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, correct_bias=True)
        run_optimizer(opt, [first, second], grads)
        results.append((first.detach(), second.detach()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert not torch.allclose(results[1][0], results[1][1], atol=1e-3)  # the two groups really differ


# --------------------------------------------------------------------------------------------- resume


def save_and_load(obj) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def fresh_run(name: str, capturable: bool = False, seed: int = 0):
    params = make_params(seed)
    opt = (CapturableAdamW if capturable else AdamW)(params, lr=2e-3, weight_decay=0.01, correct_bias=True)
    sched = build_scheduler(opt, name, warmup_step=2, max_step=10, i_steps="0,3,6", i_lrs="0,0.003,0.001")
    return params, opt, sched


def resumed_as(optimizer: type[AdamW], params: list[nn.Parameter], previous: AdamW) -> AdamW:
    """A new optimizer of the given kind that continues from `previous`'s saved state."""
    opt = optimizer(params, lr=2e-3, weight_decay=0.01, correct_bias=True)
    opt.load_state_dict(save_and_load(previous.state_dict()))
    return opt


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("name", ["linear", "cosine", "cycle"])
def test_resume_from_state_dict_continues_identically(name, capturable):
    grads = make_grads(8)
    params, opt, sched = fresh_run(name, capturable)
    run_optimizer(opt, params, grads, scheduler=sched)

    params2, opt2, sched2 = fresh_run(name, capturable)
    run_optimizer(opt2, params2, grads[:3], scheduler=sched2)
    saved = save_and_load({"params": [p.detach() for p in params2], "optimizer": opt2.state_dict(), "scheduler": sched2.state_dict()})

    params3, opt3, sched3 = fresh_run(name, capturable, seed=99)  # different init: everything must come from the file
    with torch.no_grad():
        for p, q in zip(params3, saved["params"]):
            p.copy_(q)
    opt3.load_state_dict(saved["optimizer"])
    sched3.load_state_dict(saved["scheduler"])
    run_optimizer(opt3, params3, grads[3:], scheduler=sched3)

    for a, b in zip(params, params3):
        assert torch.equal(a, b)
    assert float(opt3.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"])
    assert sched3.last_epoch == sched.last_epoch == 8


def test_resume_across_modes_converts_step_counts():
    """A state saved by the default path continues on the capturable path (and back) with the right t."""
    grads = make_grads(6)
    params, opt, _ = fresh_run("none")
    run_optimizer(opt, params, grads)

    params2, opt2, _ = fresh_run("none")
    run_optimizer(opt2, params2, grads[:3])
    opt2 = resumed_as(CapturableAdamW, params2, opt2)
    run_optimizer(opt2, params2, grads[3:5])
    assert opt2.state[params2[0]]["step"].item() == 5
    opt2 = resumed_as(AdamW, params2, opt2)
    run_optimizer(opt2, params2, grads[5:])
    assert opt2.state[params2[0]]["step"] == 6
    for a, b in zip(params, params2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- parameter groups


def tiny_lora_model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(CARDS["gpt2.tiny"], lora=LoRAConfig(r=2, alpha=4, targets=("q", "v")))


def test_param_groups_hold_only_trainable_parameters():
    model = tiny_lora_model()
    mark_only_lora_trainable(model)
    groups = param_groups_for(model.named_parameters(), weight_decay=0.01, no_decay_bias=True)
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01
    assert {id(p) for p in groups[0]["params"]} == lora and len(lora) == 2 * CARDS["gpt2.tiny"].n_layer


def test_no_decay_group_is_biases_and_layer_norm_weights():
    model = tiny_lora_model()
    model.requires_grad_(True)
    # independent of names: every LayerNorm's parameters plus every parameter a module registered as `bias`
    expected = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    expected |= {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    decay, no_decay = param_groups_for(model.named_parameters(), weight_decay=0.01, no_decay_bias=True)
    assert {id(p) for p in no_decay["params"]} == expected and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (everything,) = param_groups_for(model.named_parameters(), weight_decay=0.01, no_decay_bias=False)
    assert len(everything["params"]) == len(list(model.parameters()))


def test_param_groups_refuse_a_model_without_trainable_parameters():
    model = tiny_lora_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups_for(model.named_parameters(), 0.01, True)


# --------------------------------------------------------------------------------------------- schedules

# LR multipliers per update, measured by running the original schedulers.
ORIGINAL_MULTIPLIERS = {
    "linear": (dict(warmup_step=3, max_step=10), [0, 0.3333, 0.6667, 1, 0.8571, 0.7143, 0.5714, 0.4286, 0.2857, 0.1429, 0, 0]),
    "cosine_reference": (dict(warmup_step=0, max_step=10), [0, 0.9755, 0.9045, 0.7939, 0.6545, 0.5, 0.3455, 0.2061, 0.0955, 0.0245, 0, 0]),
    "cycle": (dict(warmup_step=0, max_step=None, i_steps="0,4,8", i_lrs="0,1,.5"), [0, 0.25, 0.5, 0.75, 1, 0.875, 0.75, 0.625, 0.5, 0.5, 0.5]),
}


@pytest.mark.parametrize("name", list(ORIGINAL_MULTIPLIERS))
def test_multipliers_match_the_original(name):
    kwargs, expected = ORIGINAL_MULTIPLIERS[name]
    got = [lr_multiplier(name, s, **kwargs) for s in range(len(expected))]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_cosine_reference_with_warmup_jumps_at_the_end_of_warmup():
    # the original's values for W=3, T=10: 0, .333, .667, .794, .655, .5
    got = [lr_multiplier("cosine_reference", s, 3, 10) for s in range(6)]
    np.testing.assert_allclose(got, [0, 1 / 3, 2 / 3, 0.7939, 0.6545, 0.5], atol=1e-4)


def test_fixed_cosine_warms_up_then_decays_over_the_remaining_steps():
    W, T = 2, 12  # cosine over (s - W) / (T - W) = (s - 2) / 10
    points = {0: 0.0, 1: 0.5, 2: 1.0, 7: 0.5, 12: 0.0, 20: 0.0}
    for s, expected in points.items():
        assert lr_multiplier("cosine", s, W, T) == pytest.approx(expected, abs=1e-12)
    assert lr_multiplier("cosine", 4, W, T) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_schedules_match_transformers():
    schedules = pytest.importorskip("transformers.optimization")
    W, T = 4, 17
    references = {
        "linear": schedules.get_linear_schedule_with_warmup,
        "cosine": schedules.get_cosine_schedule_with_warmup,
        "constant": lambda opt, w, t: schedules.get_constant_schedule_with_warmup(opt, w),
    }
    for name, make in references.items():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        reference = make(opt, W, T).lr_lambdas[0]
        for s in range(T + 1):  # transformers' cosine rises again after T; ours stays at 0
            assert lr_multiplier(name, s, W, T) == pytest.approx(reference(s), abs=1e-12), (name, s)


def test_no_schedule_names_mean_constant_lr():
    assert set(NO_SCHEDULE) == {"inv_sqrt", "dev_perf", "none"} and set(NO_SCHEDULE) <= set(SCHEDULES)
    for name in NO_SCHEDULE:
        assert [lr_multiplier(name, s, 5, 10) for s in range(8)] == [1.0] * 8


def test_unknown_schedule_name_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of: linear, constant, cosine"):
        lr_multiplier("warmup_linear", 0, 0, 10)
    with pytest.raises(ValueError, match="unknown scheduler"):
        build_scheduler(AdamW([nn.Parameter(torch.zeros(1))]), "Linear", 0, 10)


def test_schedule_arguments_are_validated():
    opt = AdamW([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="max_step"):
        build_scheduler(opt, "linear", 0, None)
    with pytest.raises(ValueError, match="max_step >= 1"):
        build_scheduler(opt, "cosine_reference", 0, 0)
    with pytest.raises(ValueError, match="same number"):
        parse_cycle("0,4", "0.1")
    with pytest.raises(ValueError, match="integers"):
        parse_cycle("0,x", "0.1,0.2")
    with pytest.raises(ValueError, match="non-decreasing"):
        parse_cycle("5,4", "0.1,0.2")


def test_cycle_max_step_is_the_last_interval_step():
    assert cycle_max_step("0,4,8") == 8
    assert cycle_max_step("0") == 0  # the original's default turns max_step into 0
    assert cycle_max_step([0, 100, 2500]) == 2500


def test_lambda_lr_sets_base_times_multiplier_per_update():
    params = make_params()
    base = 2e-4
    opt = AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=base, weight_decay=0.01)
    sched = build_scheduler(opt, "linear", warmup_step=3, max_step=10)
    for k in range(12):
        expected = base * lr_multiplier("linear", k, 3, 10)
        assert [g["lr"] for g in opt.param_groups] == [expected, expected]  # exactly: LambdaLR computes base * λ
        opt.step()  # no gradients: a no-op, but the order torch expects
        sched.step()


def test_cycle_scheduler_sets_the_absolute_learning_rates():
    """As in the original, `--i_lrs` are learning rates, whatever `--lr` is."""
    opt = AdamW([nn.Parameter(torch.zeros(1))], lr=123.0)
    sched = build_scheduler(opt, "cycle", 0, cycle_max_step("0,4,8"), i_steps="0,4,8", i_lrs="0,1e-3,5e-4")
    got = []
    for _ in range(10):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [lr_multiplier("cycle", s, 0, 8, "0,4,8", "0,1e-3,5e-4") for s in range(10)]
    assert got == expected
    np.testing.assert_allclose(got[:6], [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 8.75e-4], atol=1e-9)
