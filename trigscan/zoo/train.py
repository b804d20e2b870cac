"""Training, measuring and exporting zoo models."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import atomic_write
from ..scanners.base import model_scores
from .attacks import Rule


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int,
        lr: float = 2e-3, batch_size: int = 64) -> nn.Module:
    """Adam on cross-entropy with a cosine-decaying learning rate; batches shuffled
    by a generator from ``seed``.  Returns the model in eval mode.

    The decay to zero makes the final weights settle, so accuracy does not
    jitter from epoch to epoch (the zoo compares accuracies within 3 points).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            schedule.step()
    return model.eval()


def predict(model, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels for ``x``, in batches."""
    return model_scores(model, x, batch_size).argmax(1)


def accuracy(model, x, y) -> float:
    return float((predict(model, x) == y).float().mean())


def attack_success(model, x, y, rule: Rule, seed: int = 0) -> float:
    """Fraction of the rule's victims (true label not the target, in sources) that
    its attack-time trigger sends to the target."""
    victims = rule.victims(y)
    if not victims.any():
        raise ValueError(f"rule for target {rule.target}: the test set holds no victim images")
    stamped = rule.attack_trigger.apply(x[victims], generator=torch.Generator().manual_seed(seed))
    return float((predict(model, stamped) == rule.target).float().mean())


def confusion_into(model, x, y, classes: int) -> list[float]:
    """Natural "ASR" of a clean model: per class t, the fraction of other-class images predicted t."""
    pred = predict(model, x)
    return [float((pred[y != t] == t).float().mean()) for t in range(classes)]


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter (progress prints, deprecation warnings, registry logs)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def torchscript_bytes(model: nn.Module) -> bytes:
    # saved through a buffer: torch.jit.save names the archive after the file,
    # so writing a temporary file would change the bytes
    buf = io.BytesIO()
    with _quiet():
        torch.jit.save(torch.jit.script(model), buf)
    return buf.getvalue()


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """ONNX (torch.export-based exporter) with a dynamic batch axis; input "images", output "logits"."""
    with _quiet():
        program = torch.onnx.export(
            model, (example,), input_names=["images"], output_names=["logits"], dynamo=True,
            external_data=False, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    return program.model_proto.SerializeToString()


def save_model(model: nn.Module, folder, example: torch.Tensor) -> None:
    atomic_write(os.path.join(folder, "model.pt"), torchscript_bytes(model))
    atomic_write(os.path.join(folder, "model.onnx"), onnx_bytes(model, example))


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the state dict's tensors in order: equal digests, identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()
