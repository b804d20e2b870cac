"""stamp, T=10 triggers, N=64 images of 3x32x32, mask [T,1,H,W]:
forward alone, and forward + backward (gradients for mask and pattern), fused
kernel vs plain PyTorch; plus the memory-copy bandwidth the forward is measured
against."""
import pytest
import torch

import variants

FWD = ["fused", "naive", "lerp", "lerp_out"]
FB = ["fused", "fused_ops", "naive", "lerp_autograd", "manual"]
DRAM_COPY_BYTES = 256 << 20


@pytest.fixture(scope="module")
def case():
    return variants.StampCase()


@pytest.mark.benchmark(group="stamp forward")
@pytest.mark.parametrize("variant", FWD)
def bench_stamp_forward(bench, case, variant):
    bench(getattr(case, "fwd_" + variant), rounds=300, bytes_moved=case.bytes_moved(),
          out_bytes=4 * case.grad.numel())


@pytest.mark.benchmark(group="stamp forward+backward")
@pytest.mark.parametrize("variant", FB)
def bench_stamp_forward_backward(bench, case, variant):
    bench(getattr(case, "fb_" + variant), rounds=200)


@pytest.fixture(scope="module")
def tiny_case():
    return variants.StampCase(T=1, N=1, C=1, H=2, W=2)


@pytest.mark.benchmark(group="stamp forward+backward, per-call overhead (T=N=C=1, 2x2)")
@pytest.mark.parametrize("variant", ["fused", "fused_ops", "manual"])
def bench_stamp_forward_backward_overhead(bench, tiny_case, variant):
    """Four pixels: what a call costs apart from the arithmetic (dispatch, autograd)."""
    bench(getattr(tiny_case, "fb_" + variant), rounds=2000, warmup=50)


@pytest.mark.benchmark(group="memory copy")
@pytest.mark.parametrize("size", ["dram", "stamp-size"])
def bench_copy_bandwidth(bench, case, size):
    """dst.copy_(src): 'dram' 256 MiB (8x the L3 of this machine), 'stamp-size' as
    large as the stamp output (cache-resident, like the stamp benchmark itself)."""
    nbytes = DRAM_COPY_BYTES if size == "dram" else 4 * case.grad.numel()
    src, dst = variants.copy_bandwidth_buffers(nbytes)
    bench(lambda: dst.copy_(src), rounds=30 if size == "dram" else 300,
          bytes_moved=2 * nbytes)


def test_agree_stamp(case):
    ref = case.fwd_fused()
    for v in FWD[1:]:
        torch.testing.assert_close(getattr(case, "fwd_" + v)(), ref)
    ref = case.fb_fused()
    for v in FB[1:]:
        for a, b in zip(getattr(case, "fb_" + v)(), ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
