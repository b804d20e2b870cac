"""Plain-PyTorch expressions of every kernel's formula.

They are the oracle of the kernel tests and the "plain PyTorch" side of the
benchmarks, and they document the maths in the most readable form. They
broadcast over triggers and materialise every intermediate; the kernels
compute the same values without doing so.
"""
from __future__ import annotations

import torch


def squash(z: torch.Tensor) -> torch.Tensor:
    """g(z) = (tanh z + 1) / 2, the box constraint of methods.md."""
    return (torch.tanh(z) + 1) / 2


def stamp(x, mask, pattern):
    """[T, N, C, H, W]: (1 - m) x + m p for every trigger and image."""
    m, p = mask[:, None], pattern[:, None]
    return (1 - m) * x[None] + m * p


def nes_rows(masks, eps, theta_m, theta_p, sigma, joint):
    """The (mask, pattern) of every query row from materialised samples
    masks [T,k,Cm,H,W] and eps [T,k,C,H,W]: returns [T,S,Cm,H,W] and [T,S,C,H,W]."""
    k = masks.shape[1]
    mean_mask = squash(theta_m)[:, None]
    noisy_pattern = squash(theta_p[:, None] + sigma * eps)
    if joint:
        return masks, noisy_pattern
    rows_mask = torch.cat([masks, mean_mask.expand(-1, k, -1, -1, -1)], dim=1)
    rows_pattern = torch.cat([squash(theta_p)[:, None].expand(-1, k, -1, -1, -1), noisy_pattern],
                             dim=1)
    return rows_mask, rows_pattern


def nes_sample_stamp(x, masks, eps, theta_m, theta_p, sigma, joint):
    """[T, S, N, C, H, W] from materialised samples (see nes_rows)."""
    rows_mask, rows_pattern = nes_rows(masks, eps, theta_m, theta_p, sigma, joint)
    m, p = rows_mask[:, :, None], rows_pattern[:, :, None]
    return (1 - m) * x[None, None] + m * p


def nes_grad(losses, masks, eps, theta_m, sigma, joint, baseline):
    """NES estimates from losses [T, S] and materialised samples."""
    k = masks.shape[1]
    f_mask = losses[:, :k]
    f_pattern = losses[:, :k] if joint else losses[:, k:]
    if baseline:
        f_mask = f_mask - f_mask.mean(dim=1, keepdim=True)
        f_pattern = f_pattern - f_pattern.mean(dim=1, keepdim=True)
    expand = (slice(None), slice(None), None, None, None)
    grad_m = (f_mask[expand] * 2 * (masks - squash(theta_m)[:, None])).mean(dim=1)
    grad_p = (f_pattern[expand] * eps).sum(dim=1) / (k * sigma)
    return grad_m, grad_p


def pixel_perturbation(b, maxp, use_tanh):
    return squash(b) * maxp if use_tanh else torch.clamp(b * maxp, 0, maxp)


def pixel_stamp(x, b_p, b_n, maxp=1.0, use_tanh=False):
    """[T, N, C, H, W]: clip(x + P(b_p) - P(b_n), 0, maxp)."""
    delta = pixel_perturbation(b_p, maxp, use_tanh) - pixel_perturbation(b_n, maxp, use_tanh)
    return torch.clamp(x[None] + delta[:, None], 0, maxp)


def pixel_size_loss(b_p, b_n, gamma=10.0):
    """[T]: sum_{h,w} max_c g(b_p / gamma) + sum_{h,w} max_c g(b_n / gamma)."""
    size_p = squash(b_p / gamma).max(dim=1).values.sum(dim=(1, 2))
    size_n = squash(b_n / gamma).max(dim=1).values.sum(dim=(1, 2))
    return size_p + size_n
