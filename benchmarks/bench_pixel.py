"""PixelBackdoor: pixel_stamp + pixel_size_loss, forward + backward with b_p
and b_n requiring grad (T=10, N=64, 3x32x32, clip parametrisation)."""
import pytest
import torch

import variants

VARIANTS = ["fused", "naive", "best_autograd", "best_manual"]


@pytest.fixture(scope="module")
def case():
    return variants.PixelCase()


@pytest.mark.benchmark(group="pixel stamp+size forward+backward")
@pytest.mark.parametrize("variant", VARIANTS)
def bench_pixel_forward_backward(bench, case, variant):
    bench(getattr(case, variant), rounds=200)


def test_agree_pixel(case):
    ref = case.fused()
    for v in VARIANTS[1:]:
        for a, b in zip(getattr(case, v)(), ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
