"""trigscan.optim.Adam against torch.optim.Adam: the same update to the bit,
the same state_dict layout (checkpoints move both ways), and scans that are
bitwise the scans torch's optimiser gives."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import trigscan
import trigscan.scanners.b3d as b3d_module
import trigscan.scanners.base as base_module
from trigscan.optim import Adam


def random_problem(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [tuple(int(n) for n in torch.randint(1, 6, (int(torch.randint(1, 5, (1,), generator=g)),),
                                                   generator=g)) for _ in range(3)]
    params = [torch.randn(s, generator=g) for s in shapes]
    lr = float(torch.rand(1, generator=g)) * 0.2 + 1e-3
    betas = (float(torch.rand(1, generator=g)) * 0.9, 0.5 + float(torch.rand(1, generator=g)) * 0.499)
    return g, params, lr, betas


def run(optimizers, params_sets, g, steps, first=0):
    """The same random gradients into every optimiser's tensors; tensor 1 gets
    no gradient on every third step (torch then leaves it and its state alone)."""
    for step in range(first, first + steps):
        grads = [torch.randn(p.shape, generator=g) * 10 ** float(torch.randint(-3, 3, (1,), generator=g))
                 for p in params_sets[0]]
        for optimizer, params in zip(optimizers, params_sets):
            optimizer.zero_grad()  # torch's default is set_to_none=True too
            for i, (p, grad) in enumerate(zip(params, grads)):
                if not (i == 1 and step % 3 == 0):
                    p.grad = grad.clone()
            optimizer.step()


@pytest.mark.parametrize("seed", range(6))
def test_update_is_torchs_to_the_bit(seed):
    g, params, lr, betas = random_problem(seed)
    ours = [p.clone().requires_grad_(True) for p in params]
    theirs = [p.clone().requires_grad_(True) for p in params]
    run([Adam(ours, lr=lr, betas=betas), torch.optim.Adam(theirs, lr=lr, betas=betas)], [ours, theirs], g, 25)
    for a, b, start in zip(ours, theirs, params):
        assert torch.equal(a, b)
        assert not torch.equal(a, start)  # the steps moved it


@pytest.mark.parametrize("direction", ["ours to torch", "torch to ours"])
def test_state_dict_moves_between_the_two(direction):
    g, params, lr, betas = random_problem(7)
    make = {"ours": Adam, "torch": torch.optim.Adam}
    first, second = direction.split(" to ")
    a = [p.clone().requires_grad_(True) for p in params]
    reference = [p.clone().requires_grad_(True) for p in params]
    opt_a, opt_ref = make[first](a, lr=lr, betas=betas), make[first](reference, lr=lr, betas=betas)
    run([opt_a, opt_ref], [a, reference], g, 10)
    resumed = [p.detach().clone().requires_grad_(True) for p in a]
    opt_resumed = make[second](resumed, lr=lr, betas=betas)
    opt_resumed.load_state_dict(opt_a.state_dict())
    run([opt_resumed, opt_ref], [resumed, reference], g, 10, first=10)
    for x, y in zip(resumed, reference):
        assert torch.equal(x, y)


def test_bad_state_and_params_are_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="params"):
        Adam([torch.zeros(3)], lr=0.1)
    opt = Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match="shape"):
        Adam([torch.zeros(4, requires_grad=True)], lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match="saved for 1 tensor.*has 2"):
        Adam([p, torch.zeros(3, requires_grad=True)], lr=0.1).load_state_dict(saved)


@pytest.fixture(scope="module")
def small_scan():
    """A random small CNN scripted, as scans of a TorchScript model go through the
    fast copy, and 40 random 12x12 images."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.rand(40, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    return torch.jit.script(net), x


@pytest.mark.parametrize("method, options", [("nc", {"max_steps": 30}), ("pixel", {"max_steps": 20}),
                                              ("b3d", {"max_steps": 4, "k": 4})])
def test_scans_are_those_of_torchs_adam(monkeypatch, small_scan, method, options):
    model, x = small_scan
    ours = trigscan.scan(model, x, method=method, seed=3, progress=False, **options)
    monkeypatch.setattr(base_module, "Adam", torch.optim.Adam)
    monkeypatch.setattr(b3d_module, "Adam", torch.optim.Adam)
    theirs = trigscan.scan(model, x, method=method, seed=3, progress=False, **options)
    assert ours.statistics == theirs.statistics
    for a, b in zip(ours.per_class, theirs.per_class):
        assert a.steps == b.steps
        for key in a.trigger:
            assert torch.equal(a.trigger[key], b.trigger[key])


def test_a_scan_does_not_import_dynamo(small_scan, tmp_path):
    """What the class exists for: torch._dynamo costs ~1 s to import."""
    model = tmp_path / "model.pt"
    torch.jit.save(small_scan[0], str(model))
    code = ("import sys, torch, trigscan\n"
            f"m = trigscan.load_model({str(model)!r})\n"
            "x = torch.rand(20, 1, 12, 12)\n"
            "trigscan.scan(m, x, method='nc', max_steps=2, progress=False)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
