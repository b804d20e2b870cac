"""One NES step of B3D: nes_sample_stamp + nes_grad (T=10, k=50, so 2k = 100
query rows, N=32), fused kernels vs plain PyTorch with materialised samples.
Each variant's peak memory is measured in a fresh subprocess (memory.py)."""
import pytest
import torch

import memory
import variants

VARIANTS = ["fused", "fused_prealloc", "naive", "best", "best_prealloc"]
ROUNDS = {"fused": 15, "fused_prealloc": 15, "naive": 5, "best": 10, "best_prealloc": 15}
# Steady state of a scan loop, where one step follows another: on this
# project's VMs memory freed for a couple of seconds is handed back to the host
# (virtio-balloon free page reporting), and the next first touch of it costs a
# host page fault -- the first few steps after a pause are several times slower.
WARMUP = {"fused": 5, "fused_prealloc": 5, "naive": 2, "best": 5, "best_prealloc": 5}


@pytest.fixture(scope="module", params=list(variants.NES_SHAPES))
def case(request):
    C, H, W = variants.NES_SHAPES[request.param]
    c = variants.NesCase(C=C, H=H, W=W)
    c.name = request.param
    return c


@pytest.mark.parametrize("variant", VARIANTS)
def bench_nes_step(bench, case, variant):
    bench.benchmark.group = f"nes step {case.name}"
    rss = memory.measure("nes", case.name, variant, "rss")
    prof = memory.measure("nes", case.name, variant, "profiler")
    bench(getattr(case, variant), rounds=ROUNDS[variant], warmup=WARMUP[variant],
          out_bytes=case.out_bytes(), samples_bytes=case.samples_bytes(),
          peak_rss_bytes=rss["peak_bytes"], peak_profiler_bytes=prof["peak_bytes"])


def test_agree_nes():
    """The baselines compute the same function (different random streams):
    feed them the kernel's own samples and compare."""
    c = variants.NesCase(C=3, H=8, W=8, N=4, k=6)
    out, gm, gp = c.fused()
    masks, eps = torch.ops.trigscan.nes_samples(c.theta_m, c.theta_p, c.k, c.seed, c.offset)
    from trigscan import reference
    ref_out = reference.nes_sample_stamp(c.x, masks, eps, c.theta_m, c.theta_p, c.sigma, False)
    ref_gm, ref_gp = reference.nes_grad(c.losses, masks, eps, c.theta_m, c.sigma, False, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gm, ref_gm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gp, ref_gp, rtol=1e-4, atol=1e-4)
    # the best-form baseline, given the same samples
    b_out, b_gm, b_gp = c._best(torch.empty(c.out_shape), masks, eps)
    torch.testing.assert_close(b_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_gm, gm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_gp, gp, rtol=1e-4, atol=1e-4)
    p_out, p_gm, p_gp = c.fused_prealloc()  # the reused buffer holds the same batch
    assert torch.equal(p_out, out) and torch.equal(p_gm, gm) and torch.equal(p_gp, gp)
    for v in ("naive", "best", "best_prealloc"):  # shapes of the random-stream variants
        assert [t.shape for t in getattr(c, v)()] == [out.shape, gm.shape, gp.shape]


@pytest.mark.parametrize("variant", ["prealloc_fill", "fresh_fill"])
def bench_nes_write_floor(bench, case, variant):
    """What writing the query batch alone costs: fill_ into the reused buffer
    (floor of best_prealloc) or into a fresh torch.empty (4 KiB page faults)."""
    bench.benchmark.group = f"nes output write floor {case.name}"
    if variant == "prealloc_fill":
        buf = torch.empty(case.out_shape).fill_(0)
        fn = lambda: buf.fill_(1.0)  # noqa: E731
    else:
        fn = lambda: torch.empty(case.out_shape).fill_(1.0)  # noqa: E731
    bench(fn, rounds=15, warmup=5, out_bytes=case.out_bytes())
