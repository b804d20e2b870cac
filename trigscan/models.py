"""Model adapters: what a scanner sees of the model under inspection.

A white-box model is an ``nn.Module`` (or TorchScript module) mapping images in
[0, 1] to logits; normalisation (mean/std) is applied here, never by a scanner.
Outputs are checked at the boundary, so a model that returns the wrong shape or
NaN fails with a clear error instead of silently poisoning a scan.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn


class ModelError(RuntimeError):
    """The model under inspection raised or returned something unusable."""


def _as_channel_tensor(values, name: str, channels: int) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"{name}: expected 1 or {channels} values, got {t.numel()}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: values must be finite, got {t.tolist()}")
    return t.view(1, -1, 1, 1)


class WhiteBoxModel(nn.Module):
    """Wraps a module that maps normalised images to logits.

    mean/std: per-channel normalisation applied to [0, 1] images before the module.
    """

    access = "white"

    def __init__(self, module: nn.Module, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"model: expected an nn.Module or TorchScript module, got {type(module).__name__}")
        if std is not None and any(float(s) <= 0 for s in torch.as_tensor(std).flatten()):
            raise ValueError(f"std: must be > 0, got {std}")
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._mean, self._std = mean, std
        self.num_classes: int | None = None

    @property
    def device(self) -> torch.device:
        for tensor in list(self.module.parameters()) + list(self.module.buffers()):
            return tensor.device
        return torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mean is not None:
            x = x - _as_channel_tensor(self._mean, "mean", x.shape[1]).to(x.device)
        if self._std is not None:
            x = x / _as_channel_tensor(self._std, "std", x.shape[1]).to(x.device)
        try:
            out = self.module(x)
        except Exception as exc:  # the model is untrusted: report, don't crash
            raise ModelError(
                f"model raised {type(exc).__name__} on a batch of shape {tuple(x.shape)}: {exc}"
            ) from exc
        return check_logits(out, x.shape[0], self.num_classes)

    def probe(self, images: torch.Tensor) -> int:
        """Run the model on a couple of images; learn and return the class count."""
        with torch.no_grad():
            out = self(images[:2].to(self.device))
        if out.shape[1] < 2:
            raise ModelError(f"model returns {out.shape[1]} class score(s); a classifier needs >= 2")
        self.num_classes = int(out.shape[1])
        return self.num_classes


def check_logits(out, batch: int, num_classes: int | None) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model returned {type(out).__name__}, expected a tensor of class scores")
    if out.dim() != 2 or out.shape[0] != batch:
        raise ModelError(f"model returned shape {tuple(out.shape)}, expected [{batch}, classes]")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ModelError(f"model returned {out.shape[1]} classes, earlier {num_classes}")
    if not torch.isfinite(out).all():
        raise ModelError("model returned NaN or infinite scores")
    return out


def as_white_box(model, mean=None, std=None) -> WhiteBoxModel:
    if isinstance(model, WhiteBoxModel):
        if mean is not None or std is not None:
            raise ValueError("mean/std: the model is already wrapped with its normalisation")
        return model
    return WhiteBoxModel(model, mean, std)


def load_torchscript(path) -> nn.Module:
    """Load a TorchScript file. TorchScript archives hold code and tensors, not
    pickled Python objects, so loading one does not run arbitrary Python."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model: no such file {path}")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ValueError(
            f"model: {path} is not a TorchScript archive ({exc}). Pickled models are refused: "
            "export with torch.jit.script/trace and torch.jit.save, or use ONNX."
        ) from exc
