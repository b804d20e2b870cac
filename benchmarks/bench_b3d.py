"""One B3D iteration (T=10 classes, k=50, N=32 images, 1x24x24), the model
forward excluded: the scanner's fused path (nes_sample_stamp in query chunks,
nes_grad, closed-form cost term, Adam) against the same iteration in plain
PyTorch (torch.bernoulli / torch.randn samples, broadcast stamping of the whole
[T, 2k, N, C, H, W] query batch, gradients from the materialised samples).

The model is a stub that returns fixed probabilities (its forward costs
nothing), so the times are what B3D adds on top of the model's. Peak memory of
one iteration is measured in a fresh process per (variant, k):

    python -m pytest benchmarks/bench_b3d.py               # times + memory table
    python benchmarks/bench_b3d.py fused 50                # one peak, JSON
    python benchmarks/bench_b3d.py onnx ZOO badnets-cnn-grey  # ONNX Runtime images/s
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from trigscan import ops  # noqa: E402
from trigscan.reference import squash  # noqa: E402
from trigscan.scanners.b3d import B3D  # noqa: E402

K_VALUES = (25, 50, 100, 200)


class Stub:
    """The model, minus its forward: fixed class probabilities for any batch."""

    def __init__(self, rows: int, classes: int = 10):
        self.probs = torch.softmax(torch.randn(rows, classes, generator=torch.Generator().manual_seed(0)), 1)
        self.log_probs = self.probs.log()

    def __call__(self, images):
        return self.probs[:images.shape[0]]

    def log_probabilities(self, images):
        return self.log_probs[:images.shape[0]]


class Iteration:
    def __init__(self, k=50, T=10, N=32, shape=(1, 24, 24), max_batch_images=8192):
        g = torch.Generator().manual_seed(1)
        self.scanner = B3D(k=k, batch_size=N, max_batch_images=max_batch_images)
        self.k, self.T, self.sigma = k, T, self.scanner.config.sigma
        self.x = torch.rand(N, *shape, generator=g)
        self.theta_m = torch.randn(T, 1, *shape[1:], generator=g).requires_grad_(True)
        self.theta_p = torch.randn(T, *shape, generator=g).requires_grad_(True)
        self.targets = torch.arange(T) % 10
        self.cost = torch.full((T,), 1e-3)
        self.model = Stub(T * 2 * k * N)
        self.optimizer = torch.optim.Adam([self.theta_m, self.theta_p], lr=0.05, betas=(0.5, 0.9))
        self.step = 0

    def _finish(self, grad_m, grad_p, mask):
        grad_m += self.cost.view(-1, 1, 1, 1) * 2 * mask * (1 - mask)
        self.theta_m.grad, self.theta_p.grad = grad_m, grad_p
        self.optimizer.step()
        self.step += 1

    def fused(self):
        """What B3D._scan does in one iteration (all classes active)."""
        tm, tp = self.theta_m.detach(), self.theta_p.detach()
        losses = self.scanner._query_losses(self.model, self.x, tm, tp, self.targets, 0, self.step)
        mask, pattern = squash(tm), squash(tp)
        B3D._mean_trigger_asr(self.model, self.x, mask, pattern, self.targets)
        grad_m, grad_p = ops.nes_grad(losses, tm, tp, self.k, self.sigma, 0, self.step)
        self._finish(grad_m, grad_p, mask)

    def plain(self):
        """The same iteration with materialised samples and query batch."""
        T, k, sigma, x = self.T, self.k, self.sigma, self.x
        tm, tp = self.theta_m.detach(), self.theta_p.detach()
        mask, pattern = squash(tm), squash(tp)
        masks = torch.bernoulli(mask[:, None].expand(T, k, *mask.shape[1:]))     # [T, k, 1, H, W]
        eps = torch.randn(T, k, *tp.shape[1:])                                    # [T, k, C, H, W]
        noisy = squash(tp[:, None] + sigma * eps)
        m_rows = (1 - masks[:, :, None]) * x + masks[:, :, None] * pattern[:, None, None]
        p_rows = (1 - mask[:, None, None]) * x + mask[:, None, None] * noisy[:, :, None]
        queries = torch.cat([m_rows, p_rows], dim=1)                              # [T, 2k, N, C, H, W]
        n = x.shape[0]
        log_p = self.model.log_probabilities(queries.reshape(-1, *x.shape[1:])).view(T, 2 * k, n, -1)
        losses = -log_p.gather(3, self.targets.view(T, 1, 1, 1).expand(T, 2 * k, n, 1)).squeeze(3).mean(dim=2)  # [T, 2k]
        B3D._mean_trigger_asr(self.model, x, mask, pattern, self.targets)
        f_m, f_p = losses[:, :k, None, None, None], losses[:, k:, None, None, None]
        grad_m = (f_m * 2 * (masks - mask[:, None])).mean(dim=1)
        grad_p = (f_p * eps).sum(dim=1) / (k * sigma)
        self._finish(grad_m, grad_p, mask)


def peak_memory(variant: str, k: int) -> dict:
    """Peak memory of one iteration in a fresh process, after a warm-up iteration:
    peak_bytes from torch's allocator (tensors only; what the assertion uses)
    and peak_rss_bytes (every touched page, but also glibc's caching of freed
    blocks, so it moves by a chunk or two from run to run)."""
    proc = subprocess.run([sys.executable, __file__, variant, str(k)], capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["fused", "plain"])
def bench_b3d_iteration(bench, variant):
    bench.benchmark.group = "b3d iteration T=10 k=50 N=32 1x24x24, model forward excluded"
    it = Iteration()
    peak = peak_memory(variant, 50)
    bench(getattr(it, variant), rounds=10 if variant == "fused" else 5, warmup=3,
          peak_bytes=peak["peak_bytes"], peak_rss_bytes=peak["peak_rss_bytes"])


def test_peak_memory_of_the_fused_path_does_not_grow_with_k():
    """The fused path holds one query chunk (max_batch_images images) whatever k
    is; the plain path holds the whole query batch, 2k N images per class."""
    peaks = {(v, k): peak_memory(v, k) for v in ("fused", "plain") for k in K_VALUES}
    fused = {k: peaks["fused", k]["peak_bytes"] for k in K_VALUES}
    plain = {k: peaks["plain", k]["peak_bytes"] for k in K_VALUES}
    MiB = 2 ** 20
    print("\npeak memory of one iteration (MiB; torch allocator / RSS), T=10 N=32 1x24x24, "
          "max_batch_images=8192")
    print("k      " + "  ".join(f"{k:>13}" for k in K_VALUES))
    for v in ("fused", "plain"):
        print(f"{v:6} " + "  ".join(f"{peaks[v, k]['peak_bytes'] / MiB:6.1f}/{peaks[v, k]['peak_rss_bytes'] / MiB:6.1f}"
                                    for k in K_VALUES))
    chunk = 8192 * 24 * 24 * 4  # bytes of the query images of one chunk
    assert max(fused.values()) < 1.5 * chunk, fused
    assert max(fused.values()) - min(fused.values()) < 0.05 * chunk, fused
    assert plain[200] > 4 * fused[200], (plain, fused)


def onnx_throughput(zoo: str, names: list[str], seconds: float = 2.0) -> None:
    """Images per second of zoo models under ONNX Runtime, as trigscan.load_onnx
    sets it up (2 intra-op threads), per batch size: the model's share of a scan."""
    import time

    import numpy as np

    from trigscan.models import load_onnx

    for name in names:
        model = load_onnx(f"{zoo}/{name}/model.onnx")
        for batch in (64, 256, 1024, 4096):
            x = torch.from_numpy(np.random.default_rng(0).random((batch, *model.input_shape), np.float32))
            model.fn(x)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                model.fn(x)
                n += batch
            print(f"{name:24} {'x'.join(map(str, model.input_shape)):8} batch {batch:5}: "
                  f"{n / (time.perf_counter() - t0):8.0f} images/s", flush=True)


if __name__ == "__main__":
    import memory

    torch.set_num_threads(2)
    if sys.argv[1] == "onnx":  # python benchmarks/bench_b3d.py onnx ZOO NAME...
        onnx_throughput(sys.argv[2], sys.argv[3:])
        sys.exit()
    variant, k = sys.argv[1], int(sys.argv[2])
    it = Iteration(k=k)
    run = getattr(it, variant)
    run()  # warm-up: thread pools, lazily loaded code
    rss, _ = memory.peak_rss(run)
    allocated, _ = memory.peak_profiler(run)
    print(json.dumps({"variant": variant, "k": k, "peak_rss_bytes": rss, "peak_bytes": allocated}))
