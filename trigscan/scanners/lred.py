"""L-RED (Xiang et al., ICASSP 2021) and its U-RED baseline: reverse-engineering
imperceptible additive backdoor patterns with a few clean images per class.

Per putative target t (all targets are one batch), with D_s the clean images
of class s:
  q_st(v) = fraction of D_s classified as t after x -> clip(x + v, 0, 1)
  Q_t(v, w) = sum_{s != t} w_s q_st(v)
  J_t(v, w) = sum_{s != t} w_s mean_{x in D_s} log p(t | clip(x + v))
Algorithm 1: v = 0, w uniform over s != t; repeat: v += delta grad J / ||grad J||;
stop when Q_t >= pi; else w = softmax_{s != t}(q_st / T) with T = -log Q_t when
Q_t > 0, uniform otherwise. U-RED keeps w uniform. Statistic r_t = 1/||v_t||_2;
a Gamma null fitted to all r but the largest gives the order-statistic
p-value 1 - G(r_max)^K; backdoored iff it is below phi, target argmax r.
Ours: by default the verdict reads that p-value calibrated by Monte Carlo
draws from the fitted null (trigscan.detect.gamma_order_pvalue), because the
plain one is far from uniform under the null; calibration_draws=0 is the paper's.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..checkpoint import restore_into
from ..detect import check_calibration_draws, gamma_order_pvalue
from ..result import Anomaly, ClassResult, ScanResult
from . import register
from .base import Scanner, model_scores, progress_bar


@dataclasses.dataclass
class LREDConfig:
    images_per_class: int = 8  # the paper: 8 (2 in the data-limited case)
    delta: float = 1e-2  # step in L2 norm per iteration, [0, 1] pixels (paper: 1e-4; see docs)
    max_steps: int = 1000  # tau_max; ||v|| <= delta * max_steps
    pi: float = 0.9  # target misclassification fraction
    phi: float = 0.05  # detection threshold on the p-value
    # > 0: the verdict uses the Monte Carlo calibrated p-value (ours, docs/lred.md:
    # the plain one flags ~25% of null models at phi = 0.05 with 10 classes); 0: the paper's
    calibration_draws: int = 10000
    learn_weights: bool = True  # False: U-RED

    def __post_init__(self):
        check_calibration_draws(self.calibration_draws)  # at construction, not after the scan


@register("lred")
class LRED(Scanner):
    """L-RED. Needs labels (the clean images' classes); uses up to
    ``images_per_class`` images of each class (at least 2 each). Resumable:
    with a checkpoint, v, the source weights and the counters are saved after
    every step (the image subset is drawn again from the seed)."""

    needs_labels = True
    resumable = True  # v, weights and counters saved after every step
    Config = LREDConfig

    def _scan(self, model, images, labels, classes, seed, show, checkpoint=None) -> ScanResult:
        cfg = self.config
        if len(classes) < 3:  # refused before the optimisation, not after it
            raise ValueError(f"classes: L-RED's test fits its null to all statistics but the largest, "
                             f"so it needs at least 3 putative targets; got {len(classes)}")
        num_classes = model.num_classes
        generator = torch.Generator().manual_seed(seed)
        x, y, notes = self._per_class_subset(model, images, labels, num_classes, generator)
        device = x.device
        members = F.one_hot(y, num_classes).float()  # [M, K]
        members = members / members.sum(0, keepdim=True)  # column s averages over D_s
        targets = torch.tensor(classes, device=device)
        k = len(classes)
        not_self = torch.ones(k, num_classes, device=device)
        not_self[torch.arange(k), targets] = 0
        uniform = not_self / not_self.sum(1, keepdim=True)
        weights = uniform.clone()
        v = torch.zeros(k, *x.shape[1:], device=device)
        steps = torch.zeros(k, dtype=torch.long)
        reached = torch.zeros(k, dtype=torch.bool, device=device)
        final_q = torch.zeros(k, device=device)
        # everything an iteration reads besides the fixed subset (re-drawn from the seed)
        live = {"v": v, "weights": weights, "steps": steps, "reached": reached, "final_q": final_q}
        bar = progress_bar(cfg.max_steps, f"{self.name} ({k} classes)", show)
        first, complete = 0, False
        state = checkpoint.load() if checkpoint is not None else None
        if state is not None:
            with checkpoint.restoring():
                restore_into(live, state)
                first, complete = int(state["step"]), bool(state.get("complete"))
            bar.update(first)
        for step in range(first, cfg.max_steps + 1):  # a complete state starts past the end
            rows = (~reached).nonzero().flatten()
            if rows.numel() == 0:
                break
            delta = v[rows].clone().requires_grad_(True)
            stamped = (x[None] + delta[:, None]).clamp(0, 1)  # [Ka, M, C, H, W]
            logits = model(stamped.flatten(0, 1)).view(rows.numel(), x.shape[0], -1)
            t = targets[rows]
            log_p = logits.log_softmax(dim=2).gather(2, t.view(-1, 1, 1).expand(-1, x.shape[0], 1))
            hits = (logits.argmax(dim=2) == t[:, None]).float()
            q = hits.detach() @ members  # [Ka, K]: q_st for every source s
            q_weighted = (weights[rows] * q).sum(dim=1)
            final_q[rows] = q_weighted
            done = q_weighted >= cfg.pi
            reached[rows[done]] = True
            if step == cfg.max_steps or bool(done.all()):
                break
            if cfg.learn_weights:
                weights[rows] = self._temperature_weights(q, q_weighted, not_self[rows],
                                                          uniform[rows])
            objective = ((log_p.squeeze(2) @ members) * weights[rows]).sum()
            (grad,) = torch.autograd.grad(objective, delta)
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            moving = ~done
            v[rows[moving]] = (delta.detach() + cfg.delta * grad / norm)[moving]
            steps[rows[moving].cpu()] += 1
            bar.update(1)
            bar.set_postfix(found=int(reached.sum()))
            if checkpoint is not None:
                checkpoint.save({**live, "step": step + 1})
        if checkpoint is not None and not complete:
            checkpoint.save({**live, "step": cfg.max_steps + 1, "complete": True}, force=True)
        bar.close()

        norms = v.flatten(1).norm(dim=1).clamp_min(cfg.delta)  # v = 0 only if Q >= pi at once
        r = (1.0 / norms).cpu()
        per_class = [ClassResult(
            target=cls, statistic=float(r[i]), asr=float(final_q[i]), converged=bool(reached[i]),
            steps=int(steps[i]), stop_reason="reached pi" if bool(reached[i]) else
            "max_steps; never reached pi (statistic from the final v)",
            trigger={"perturbation": v[i].detach().cpu()}) for i, cls in enumerate(classes)]
        test = gamma_order_pvalue(r.tolist(), cfg.calibration_draws, seed, cfg.phi)
        p_value = test.get("calibrated_p_value", test["p_value"])
        # a pattern that never reached pi is no evidence of a backdoor
        backdoored = p_value < cfg.phi and per_class[test["index"]].converged
        details = {"shape": test["shape"], "scale": test["scale"], "order_statistic_p_value": test["p_value"]}
        if cfg.calibration_draws:
            details.update(calibration_draws=cfg.calibration_draws, raw_level=test["raw_level"])
        anomaly = Anomaly(kind="gamma", values=r.tolist(), threshold=cfg.phi, side="high",
                          p_value=p_value, details=details)
        return ScanResult(method=self.name, backdoored=backdoored,
                          targets=[classes[test["index"]]] if backdoored else [],
                          per_class=per_class, anomaly=anomaly, config=self.get_params(),
                          seed=seed, elapsed_s=0.0, notes=notes)

    @staticmethod
    def _temperature_weights(q, q_weighted, not_self, uniform):
        """w_s = softmax_{s != t}(q_st / T), T = -log Q_t; uniform where Q_t = 0."""
        temperature = -torch.log(q_weighted.clamp(min=1e-30, max=1.0))
        logits = (q / temperature.clamp_min(1e-12)[:, None]).masked_fill(not_self == 0, -math.inf)
        return torch.where((q_weighted > 0)[:, None], logits.softmax(dim=1), uniform)

    def _per_class_subset(self, model, images, labels, num_classes, generator):
        """Up to images_per_class images of every class (random, seeded), drawn among
        the images the model classifies correctly: the paper assumes its clean
        detection images are, and one the model already sends to t would count as
        a misclassification that v did not cause. A class with fewer than 2 such
        images is drawn from all its images instead, and the returned notes say so."""
        n = self.config.images_per_class
        if n < 2:
            raise ValueError(f"images_per_class: L-RED needs at least 2, got {n}")
        predicted = model_scores(model, images).argmax(1)
        chosen, fallback = [], []
        for c in range(num_classes):
            of_class = (labels == c).nonzero().flatten().cpu()
            if of_class.numel() < 2:
                raise ValueError(f"labels: class {c} has {of_class.numel()} image(s); L-RED needs "
                                 "at least 2 clean images of every class")
            idx = of_class[(predicted[of_class.to(predicted.device)] == c).cpu()]
            if idx.numel() < 2:
                fallback.append(f"{c} ({idx.numel()} of {of_class.numel()})")
                idx = of_class
            chosen.append(idx[torch.randperm(idx.numel(), generator=generator)[:n]])
        notes = [] if not fallback else [
            "fewer than 2 correctly classified images in class(es) " + ", ".join(fallback) +
            ": drawn from all their images (the paper assumes correctly classified ones)"]
        chosen = torch.cat(chosen).to(images.device)
        return images[chosen], labels[chosen], notes


@register("ured")
class URED(LRED):
    """U-RED: L-RED with the source weights fixed to uniform (the paper's baseline)."""

    @dataclasses.dataclass
    class Config(LREDConfig):
        learn_weights: bool = False
