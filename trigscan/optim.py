"""Adam for trigger variables: the update of ``torch.optim.Adam`` at its
defaults (no weight decay, no AMSGrad), without what it costs to construct.

``torch.optim.Optimizer.__init__`` imports ``torch._dynamo``, once per
process: 1.2 s on the 2-vCPU Xeon VM, a quarter of a whole NC scan of a
zoo model and half of a 30-epoch one (docs/trojanzoo.md). The scanners
need none of that machinery. This class computes the same single-tensor
update, bit for bit (``tests/test_optim.py`` runs both side by side), and
its ``state_dict`` has torch's layout, so checkpoints written while the
scanners used ``torch.optim.Adam`` still resume.
"""
from __future__ import annotations

from typing import Iterable

import torch


class Adam:
    """Adam over a list of tensors with ``requires_grad``. ``step()`` updates
    every tensor whose ``.grad`` is set, as ``torch.optim.Adam.step`` does."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = list(params)
        if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in self.params):
            raise TypeError("params: expected tensors with requires_grad=True")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        # per tensor: None until its first step, then {"step", "exp_avg", "exp_avg_sq"}
        self.state: list[dict | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drop the gradients (torch's ``set_to_none=True``): the next backward writes fresh ones."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.state[i] is None:
                self.state[i] = {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            state = self.state[i]
            state["step"] += 1
            grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
            # torch's order of operations, so that the results agree to the bit
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = float(state["step"])
            step_size = self.lr / (1 - beta1 ** step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict:
        """``torch.optim.Adam.state_dict()``'s layout (the tensors themselves, not copies)."""
        state = {i: {"step": torch.tensor(float(s["step"])), "exp_avg": s["exp_avg"],
                     "exp_avg_sq": s["exp_avg_sq"]}
                 for i, s in enumerate(self.state) if s is not None}
        group = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": 0,
                 "amsgrad": False, "maximize": False, "params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, saved: dict) -> None:
        """Restore a state saved by ``state_dict`` (this class's or torch.optim.Adam's)."""
        (group,) = saved["param_groups"]
        if len(group["params"]) != len(self.params):
            raise ValueError(f"optimizer: saved for {len(group['params'])} tensor(s), this scan has {len(self.params)}")
        state: list[dict | None] = [None] * len(self.params)
        for index, s in saved["state"].items():
            p = self.params[int(index)]
            moments = {}
            for name in ("exp_avg", "exp_avg_sq"):
                if s[name].shape != p.shape:
                    raise ValueError(f"optimizer: {name} of tensor {index} has shape {tuple(s[name].shape)}, "
                                     f"expected {tuple(p.shape)}")
                moments[name] = s[name].to(device=p.device, dtype=p.dtype).clone()
            state[int(index)] = {"step": int(s["step"]), **moments}
        self.state = state
