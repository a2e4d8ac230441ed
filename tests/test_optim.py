"""The optimizers of harness/core/optim.py step exactly as torch.optim's do (they exist only so that a job
never imports torch._dynamo), and their state dicts load into torch.optim's and the other way round."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from harness.core import optim
from tests.conftest import REPO


def model_and_groups(seed: int = 0) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2))
    model[4].weight.requires_grad_(False)  # a frozen tensor: never stepped
    decayed = [model[0].weight, model[3].weight]
    plain = [model[0].bias, model[1].weight, model[1].bias, model[3].bias]
    # Three groups as the trainer builds them: decayed, not decayed, and one with its own lr and a
    # parameter that gets no gradient in some steps.
    return model, [{"params": decayed, "weight_decay": 0.05}, {"params": plain, "weight_decay": 0.0},
                   {"params": [model[4].bias], "weight_decay": 0.01, "lr": 0.02}]


def run_steps(model: nn.Module, opt, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(8, 6, generator=g)
        for i, group in enumerate(opt.param_groups):  # the schedule sets every group's lr each step
            group["lr"] = 0.1 * (1 + step) / 4 if i < 2 else group["lr"]
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = out.pow(2).mean() if step % 2 else out[:, 0].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step % 3 == 1:
            model[4].bias.grad = None  # a parameter without a gradient this step is left alone
        opt.step()


def same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            other = sb["state"][i][key]
            if key == "step":
                assert float(value) == float(other)
            else:
                assert torch.equal(value, other), (i, key)


CASES = {
    "sgd": (lambda g: optim.SGD(g, lr=0.1, momentum=0.9),
            lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, foreach=True)),
    "sgd dampening": (lambda g: optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.1),
                      lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.1, foreach=True)),
    "sgd nesterov": (lambda g: optim.SGD(g, lr=0.1, momentum=0.8, nesterov=True),
                     lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.8, nesterov=True, foreach=True)),
    "adam": (lambda g: optim.Adam(g, lr=1e-2), lambda g: torch.optim.Adam(g, lr=1e-2, foreach=True)),
    "adam single-tensor": (lambda g: optim.Adam(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
                           lambda g: torch.optim.Adam(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, foreach=False)),
    "adamw": (lambda g: optim.AdamW(g, lr=1e-2), lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_steps_equal_torch_optim(case):
    ours_of, theirs_of = CASES[case]
    ours_model, ours_groups = model_and_groups()
    theirs_model, theirs_groups = model_and_groups()
    ours, theirs = ours_of(ours_groups), theirs_of(theirs_groups)
    run_steps(ours_model, ours, 7)
    run_steps(theirs_model, theirs, 7)
    for (name, a), b in zip(ours_model.named_parameters(), theirs_model.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(ours_model[0].weight, model_and_groups()[0][0].weight)  # it did train
    same_state(ours, theirs)


@pytest.mark.parametrize("case", ["sgd", "adam", "adamw"])
def test_state_dicts_resume_across_torch_optim_and_ours(case):
    """A checkpoint's optimizer state written by either resumes in the other (checkpoints written before
    this module replaced torch.optim resume), and the continued run equals an uninterrupted one."""
    ours_of, theirs_of = CASES[case]
    whole_model, whole_groups = model_and_groups()
    whole = theirs_of(whole_groups)
    run_steps(whole_model, whole, 8)
    for first, second in ((theirs_of, ours_of), (ours_of, theirs_of)):
        model, groups = model_and_groups()
        before = first(groups)
        run_steps(model, before, 4)
        saved = {"model": model.state_dict(), "optimizer": before.state_dict()}
        model, groups = model_and_groups(seed=1)  # another initialisation: everything comes from the checkpoint
        model.load_state_dict(saved["model"])
        after = second(groups)
        after.load_state_dict(saved["optimizer"])
        run_steps(model, after, 4, first=4)
        for a, b in zip(model.parameters(), whole_model.parameters()):
            assert torch.equal(a, b)


def test_a_state_dict_of_another_model_is_refused():
    _, groups = model_and_groups()
    opt = optim.SGD(groups, lr=0.1, momentum=0.9)
    other = optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="other parameter groups"):
        opt.load_state_dict(other.state_dict())


def test_a_training_step_does_not_import_the_compiler():
    code = ("import sys, torch\n"
            "from omegaconf import OmegaConf\n"
            "from harness.core.optim import build_optimizer\n"
            "for name in ('sgd', 'lars', 'adam', 'adamw'):\n"
            "    model = torch.nn.Linear(4, 3)\n"
            "    cfg = OmegaConf.create({'optimizer': name, 'weight_decay': 1e-4, 'momentum': 0.9})\n"
            "    opt = build_optimizer(model, cfg, 0.1)\n"
            "    model(torch.randn(2, 4)).sum().backward()\n"
            "    opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_lars_scales_each_tensor_by_its_clipped_trust_ratio_and_skips_excluded_groups():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(3)
    start_w, start_b = w.detach().clone(), b.detach().clone()
    lr, wd, eta = 0.5, 1e-2, 0.02
    opt = optim.LARS([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
                     lr=lr, eta=eta)
    opt.step()
    d = w.grad + wd * start_w
    trust = min(eta * start_w.norm() / (d.norm() + 1e-8) / lr, 1.0)  # clip_lr: the trust ratio over lr, at most 1
    assert torch.allclose(w.detach(), start_w - lr * trust * d, atol=1e-7)
    assert torch.equal(b.detach(), start_b - lr * b.grad)  # excluded: a plain SGD step
    opt.step()  # the second step adds to the momentum buffer: 0.9 × the first direction + this one
    assert torch.allclose(opt.state[b]["momentum_buffer"], 1.9 * b.grad)
