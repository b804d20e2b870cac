"""The CUDA side of trigscan._C, in three tiers.

1. Build and registration (any machine): when the extension was built with
   CUDA, every op has a CUDA kernel. With TRIGSCAN_EXPECT_CUDA=1 (the CI job that
   builds with TRIGSCAN_CUDA=1) a CPU-only build *fails* these tests instead of
   skipping them, so CI cannot silently lose the CUDA build.
2. Host emulation (any machine with g++ and the source tree): the CUDA kernels
   and launchers of csrc/cuda/kernels_impl.cuh, compiled with g++ and run one
   std::thread per CUDA thread (csrc/cuda/emulator/host_emulator.cc), must give
   bit-identical results to the CPU kernels for every op. This checks the
   kernels' indexing, chunking, grid-stride loops, barriers and summation
   orders without a GPU; it does not check device arithmetic.
3. GPU (needs_cuda, skipped without a device): every op on CUDA vs CPU, and
   opcheck on CUDA. They exist for the day a GPU is lent.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import trigscan
from trigscan._extension import OP_NAMES

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
EXPECT_CUDA = os.environ.get("TRIGSCAN_EXPECT_CUDA", "") == "1"
ops = torch.ops.trigscan

needs_gpu = [
    pytest.mark.needs_cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]


def gpu_test(fn):
    for mark in reversed(needs_gpu):
        fn = mark(fn)
    return fn


def _require_cuda_build():
    """Skip (or, under TRIGSCAN_EXPECT_CUDA=1, fail) unless _C was built with CUDA."""
    info = trigscan.build_info()
    if EXPECT_CUDA:
        assert info["loaded"], f"trigscan._C did not load: {info['load_error']}"
        assert info.get("cuda_compiled"), (
            "TRIGSCAN_EXPECT_CUDA=1 but trigscan._C was built without CUDA "
            f"(build info: torch {info.get('torch_built_with')}, cuda {info.get('cuda_version')}); "
            "build with TRIGSCAN_CUDA=1 against a CUDA torch"
        )
        return info
    if not info["loaded"]:
        pytest.skip(f"trigscan._C is not built: {info['load_error']}")
    if not info.get("cuda_compiled"):
        pytest.skip("trigscan._C is a CPU-only build (build with TRIGSCAN_CUDA=1; "
                    "set TRIGSCAN_EXPECT_CUDA=1 to make this a failure)")
    return info


def _require_ops():
    if not trigscan.has_ops():
        pytest.skip(f"trigscan._C is not built: {trigscan.build_info()['load_error']}")


# ---------------------------------------------------------------------------
# 1. Build and registration
# ---------------------------------------------------------------------------
def test_cuda_build_matches_torch():
    info = _require_cuda_build()
    assert torch.version.cuda is not None, "built with CUDA but the running torch is a CPU build"
    assert info.get("cuda_version") == torch.version.cuda, (
        f"_C was built against CUDA {info.get('cuda_version')}, "
        f"torch runs CUDA {torch.version.cuda}"
    )
    assert info.get("cuda_arch_list"), "the build did not record its CUDA architectures"


@pytest.mark.parametrize("op", OP_NAMES)
def test_every_op_has_a_cuda_kernel(op):
    info = _require_cuda_build()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"trigscan::{op}", "CUDA"), (
        f"trigscan::{op} has no CUDA kernel although _C was built with CUDA"
    )
    assert "CUDA" in info["ops"][op]


def _find_cuobjdump():
    """cuobjdump from PATH, the toolkit, or the nvidia-cuda-cuobjdump wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels

        for base in getattr(nvidia, "__path__", []):
            candidates += sorted(Path(base).glob("cu*/bin/cuobjdump"))
            candidates.append(Path(base) / "cuda_cuobjdump" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


def _expected_targets(arch_list):
    """TORCH_CUDA_ARCH_LIST ("8.0;8.6;9.0;12.0+PTX") -> ({"sm_80", ...}, {"sm_120"})."""
    cubins, ptx = set(), set()
    for entry in arch_list.replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        name = "sm_" + entry.removesuffix("+PTX").replace(".", "")
        cubins.add(name)
        if entry.endswith("+PTX"):
            ptx.add(name)
    return cubins, ptx


def test_cuda_build_holds_a_cubin_per_architecture():
    info = _require_cuda_build()
    tool = _find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    import trigscan._C as ext

    listing = {}
    for kind in ("elf", "ptx"):
        result = subprocess.run([tool, f"--list-{kind}", ext.__file__], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        listing[kind] = {part.rsplit(".", 1)[0].rsplit(".", 1)[-1]
                         for line in result.stdout.splitlines() if ":" in line
                         for part in [line.split(":", 1)[1].strip()]}
    cubins, ptx = _expected_targets(info["cuda_arch_list"])
    assert listing["elf"] == cubins, f"cubins {sorted(listing['elf'])}, expected {sorted(cubins)}"
    assert ptx <= listing["ptx"], f"PTX {sorted(listing['ptx'])}, expected {sorted(ptx)}"


def test_cpu_only_build_registers_no_cuda_kernel():
    """The converse: cuda_compiled tells the truth about a CPU-only build too."""
    _require_ops()
    if trigscan.build_info().get("cuda_compiled"):
        pytest.skip("CUDA build (checked by test_every_op_has_a_cuda_kernel)")
    for op in OP_NAMES:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"trigscan::{op}", "CUDA"), op


# ---------------------------------------------------------------------------
# Test inputs, shared by the emulator and GPU tiers
# ---------------------------------------------------------------------------
# (T, N, C, Cm, H, W): broadcast and per-channel masks, H*W not a multiple of 4
# (Philox blocks straddling channels), H*W > 256 (several nes_sample_stamp
# chunks), totals above 4 * 256 (the emulator's grid cap: grid-stride loops).
STAMP_SHAPES = [
    (2, 3, 3, 1, 5, 5),
    (2, 3, 3, 3, 5, 5),
    (3, 4, 3, 1, 7, 9),
    (3, 4, 3, 3, 7, 9),
    (1, 1, 1, 1, 1, 1),
    (2, 2, 4, 1, 1, 3),
]
# (T, N, C, Cm, H, W, k)
NES_SHAPES = [
    (2, 2, 3, 1, 5, 5, 3),
    (2, 2, 3, 3, 5, 5, 3),
    (2, 1, 3, 1, 17, 17, 2),
    (1, 2, 3, 3, 17, 17, 2),
    (3, 1, 1, 1, 1, 1, 5),
    (2, 1, 2, 2, 3, 3, 4),
]
# (T, N, C, H, W)
PIXEL_SHAPES = [
    (2, 3, 3, 4, 4),
    (3, 2, 3, 17, 17),
    (1, 1, 1, 1, 1),
    (2, 2, 1, 5, 3),
]
SEED, OFFSET, SIGMA = 0xDEADBEEFCAFE, 7, 0.3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def stamp_case(shape, dtype, seed=0):
    T, N, C, Cm, H, W = shape
    g = _gen(seed)
    x = torch.rand(N, C, H, W, generator=g, dtype=dtype)
    mask = torch.rand(T, Cm, H, W, generator=g, dtype=dtype)
    pattern = torch.rand(T, C, H, W, generator=g, dtype=dtype)
    grad = torch.randn(T, N, C, H, W, generator=g, dtype=dtype)
    return x, mask, pattern, grad


def nes_case(shape, joint, seed=0):
    T, N, C, Cm, H, W, k = shape
    g = _gen(seed)
    x = torch.rand(N, C, H, W, generator=g)
    theta_m = 2 * torch.randn(T, Cm, H, W, generator=g)
    theta_p = 2 * torch.randn(T, C, H, W, generator=g)
    losses = torch.randn(T, k if joint else 2 * k, generator=g)
    return x, theta_m, theta_p, losses


def pixel_case(shape, dtype, maxp, seed=0):
    """Random values mixed with ones that land exactly on the clip bounds, and
    channel ties for the size loss's first-max rule."""
    T, N, C, H, W = shape
    g = _gen(seed)
    special = torch.tensor([0.0, 0.25, 0.5, 1.0, -1.0, 1.5], dtype=dtype)

    def mixed(*size):  # b * maxp lands exactly on 0 and maxp for b = 0, 1
        values = torch.randn(*size, generator=g, dtype=dtype)
        pick = special[torch.randint(0, len(special), size, generator=g)]
        return torch.where(torch.rand(*size, generator=g) < 0.4, pick, values)

    x = torch.where(torch.rand(N, C, H, W, generator=g) < 0.3,
                    special[:4][torch.randint(0, 4, (N, C, H, W), generator=g)] * maxp,
                    maxp * torch.rand(N, C, H, W, generator=g, dtype=dtype))
    b_p, b_n = mixed(T, C, H, W), mixed(T, C, H, W)
    if C > 1:
        tie = torch.rand(T, H, W, generator=g) < 0.3
        b_p[:, 1] = torch.where(tie, b_p[:, 0], b_p[:, 1])
        b_n[:, C - 1] = torch.where(tie, b_n[:, 0], b_n[:, C - 1])
    grad = torch.randn(T, N, C, H, W, generator=g, dtype=dtype)
    grad_loss = torch.randn(T, generator=g, dtype=dtype)
    return x, b_p, b_n, grad, grad_loss


DTYPES = [torch.float32, torch.float64]


# ---------------------------------------------------------------------------
# 2. Host emulation of the CUDA kernels
# ---------------------------------------------------------------------------
_I64, _I32, _U64, _U32 = ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32
_P, _F, _D = ctypes.c_void_p, ctypes.c_float, ctypes.c_double
_SHAPE = ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = {
    "emu_stamp_forward": [_I32, _P, _P, _P, _P, _SHAPE],
    "emu_stamp_backward": [_I32, _P, _P, _P, _P, _P, _P, _P, _SHAPE],
    "emu_nes_sample_stamp": [_P, _P, _P, _P, _SHAPE, _I64, _I32, _F, _U64, _U32],
    "emu_nes_grad": [_P, _P, _P, _P, _P, _SHAPE, _I64, _I32, _F, _U64, _U32, _I32],
    "emu_nes_samples": [_P, _P, _P, _SHAPE, _I64, _U64, _U32],
    "emu_pixel_stamp_forward": [_I32, _P, _P, _P, _P, _SHAPE, _D, _I32],
    "emu_pixel_stamp_backward": [_I32, _P, _P, _P, _P, _P, _P, _P, _SHAPE, _D, _I32],
    "emu_pixel_size_loss_forward": [_I32, _P, _P, _P, _SHAPE, _D],
    "emu_pixel_size_loss_backward": [_I32, _P, _P, _P, _P, _P, _SHAPE, _D],
}


class Emulator:
    """ctypes face of host_emulator.cc: same arguments as the ops (CPU tensors),
    outputs pre-filled with NaN so an element no thread writes is caught."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.lib.emu_launch_count.restype = ctypes.c_int64

    def launches(self):
        return self.lib.emu_launch_count()

    def _call(self, name, *args):
        rc = getattr(self.lib, name)(*args)
        assert rc == 0, f"{name}: {self.lib.emu_last_error().decode()}"

    @staticmethod
    def _shape(T, N, C, Cm, HW):
        return (ctypes.c_int64 * 5)(T, N, C, Cm, HW)

    @staticmethod
    def _out(*size, dtype=torch.float32):
        return torch.full(size, float("nan"), dtype=dtype)

    @staticmethod
    def _dt(t):
        return 0 if t.dtype == torch.float32 else 1

    def stamp(self, x, mask, pattern):
        (N, C, H, W), T, Cm = x.shape, pattern.shape[0], mask.shape[1]
        out = self._out(T, N, C, H, W, dtype=x.dtype)
        self._call("emu_stamp_forward", self._dt(x), x.data_ptr(), mask.data_ptr(),
                   pattern.data_ptr(), out.data_ptr(), self._shape(T, N, C, Cm, H * W))
        return out

    def stamp_backward(self, grad, x, mask, pattern):
        (N, C, H, W), T, Cm = x.shape, pattern.shape[0], mask.shape[1]
        gx, gm, gp = (self._out(*t.shape, dtype=t.dtype) for t in (x, mask, pattern))
        self._call("emu_stamp_backward", self._dt(x), grad.data_ptr(), x.data_ptr(),
                   mask.data_ptr(), pattern.data_ptr(), gx.data_ptr(), gm.data_ptr(),
                   gp.data_ptr(), self._shape(T, N, C, Cm, H * W))
        return gx, gm, gp

    def nes_sample_stamp(self, x, theta_m, theta_p, k, sigma, seed, offset, joint):
        (N, C, H, W), T, Cm = x.shape, theta_p.shape[0], theta_m.shape[1]
        out = self._out(T, k if joint else 2 * k, N, C, H, W)
        self._call("emu_nes_sample_stamp", x.data_ptr(), theta_m.data_ptr(), theta_p.data_ptr(),
                   out.data_ptr(), self._shape(T, N, C, Cm, H * W), k, int(joint), sigma, seed,
                   offset)
        return out

    def nes_grad(self, losses, theta_m, theta_p, k, sigma, seed, offset, joint, baseline):
        (T, C, H, W), Cm = theta_p.shape, theta_m.shape[1]
        gm, gp = self._out(*theta_m.shape), self._out(*theta_p.shape)
        self._call("emu_nes_grad", losses.data_ptr(), theta_m.data_ptr(), theta_p.data_ptr(),
                   gm.data_ptr(), gp.data_ptr(), self._shape(T, 0, C, Cm, H * W), k, int(joint),
                   sigma, seed, offset, int(baseline))
        return gm, gp

    def nes_samples(self, theta_m, theta_p, k, seed, offset):
        (T, C, H, W), Cm = theta_p.shape, theta_m.shape[1]
        masks, noise = self._out(T, k, Cm, H, W), self._out(T, k, C, H, W)
        self._call("emu_nes_samples", theta_m.data_ptr(), masks.data_ptr(), noise.data_ptr(),
                   self._shape(T, 0, C, Cm, H * W), k, seed, offset)
        return masks, noise

    def pixel_stamp(self, x, b_p, b_n, maxp, use_tanh):
        (N, C, H, W), T = x.shape, b_p.shape[0]
        out = self._out(T, N, C, H, W, dtype=x.dtype)
        self._call("emu_pixel_stamp_forward", self._dt(x), x.data_ptr(), b_p.data_ptr(),
                   b_n.data_ptr(), out.data_ptr(), self._shape(T, N, C, C, H * W), maxp,
                   int(use_tanh))
        return out

    def pixel_stamp_backward(self, grad, x, b_p, b_n, maxp, use_tanh):
        (N, C, H, W), T = x.shape, b_p.shape[0]
        gx, gp, gn = (self._out(*t.shape, dtype=t.dtype) for t in (x, b_p, b_n))
        self._call("emu_pixel_stamp_backward", self._dt(x), grad.data_ptr(), x.data_ptr(),
                   b_p.data_ptr(), b_n.data_ptr(), gx.data_ptr(), gp.data_ptr(), gn.data_ptr(),
                   self._shape(T, N, C, C, H * W), maxp, int(use_tanh))
        return gx, gp, gn

    def pixel_size_loss(self, b_p, b_n, gamma):
        T, C, H, W = b_p.shape
        out = self._out(T, dtype=b_p.dtype)
        self._call("emu_pixel_size_loss_forward", self._dt(b_p), b_p.data_ptr(), b_n.data_ptr(),
                   out.data_ptr(), self._shape(T, 0, C, C, H * W), gamma)
        return out

    def pixel_size_loss_backward(self, grad, b_p, b_n, gamma):
        T, C, H, W = b_p.shape
        gp, gn = self._out(*b_p.shape, dtype=b_p.dtype), self._out(*b_n.shape, dtype=b_n.dtype)
        self._call("emu_pixel_size_loss_backward", self._dt(b_p), grad.data_ptr(),
                   b_p.data_ptr(), b_n.data_ptr(), gp.data_ptr(), gn.data_ptr(),
                   self._shape(T, 0, C, C, H * W), gamma)
        return gp, gn


# A grid cap of 4 blocks makes the grid-stride loops stride on small inputs.
EMULATOR_FLAGS = ["-std=c++20", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-pthread",
                  "-DTRIGSCAN_CUDA_MAX_BLOCKS=4"]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    source = CUDA_SRC / "emulator" / "host_emulator.cc"
    if not source.exists():
        pytest.skip("the CUDA sources are not here (installed package, not a checkout)")
    compiler = shlex.split(os.environ.get("CXX", ""))
    compiler = compiler or [shutil.which("g++") or shutil.which("c++")]
    if compiler[0] is None:
        pytest.skip("no C++ compiler to build the CUDA host emulator")
    _require_ops()
    lib = tmp_path_factory.mktemp("cuda_emulator") / "emulator.so"
    result = subprocess.run([*compiler, *EMULATOR_FLAGS, str(source), "-o", str(lib)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"building the CUDA host emulator failed:\n{result.stderr}"
    return Emulator(lib)


def assert_same(actual, expected):
    """Bit-identical (NaN in `actual` means an element no thread wrote)."""
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not actual.isnan().any(), "an output element was never written"
    if not torch.equal(actual, expected):
        diff = (actual - expected).abs()
        raise AssertionError(f"{int((diff > 0).sum())} of {diff.numel()} elements differ, "
                             f"max |diff| {diff.max().item():.3g}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STAMP_SHAPES)
def test_emulated_stamp_matches_cpu(emu, shape, dtype):
    x, mask, pattern, grad = stamp_case(shape, dtype)
    assert_same(emu.stamp(x, mask, pattern), ops.stamp.default(x, mask, pattern))
    assert_same(emu.stamp_backward(grad, x, mask, pattern),
                ops.stamp_backward.default(grad, x, mask, pattern))


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("shape", NES_SHAPES)
def test_emulated_nes_matches_cpu(emu, shape, joint):
    k = shape[-1]
    x, theta_m, theta_p, losses = nes_case(shape, joint)
    args = (k, SIGMA, SEED, OFFSET, joint)
    assert_same(emu.nes_sample_stamp(x, theta_m, theta_p, *args),
                ops.nes_sample_stamp.default(x, theta_m, theta_p, *args))
    for baseline in (False, True):
        assert_same(emu.nes_grad(losses, theta_m, theta_p, *args, baseline),
                    ops.nes_grad.default(losses, theta_m, theta_p, *args, baseline))
    assert_same(emu.nes_samples(theta_m, theta_p, k, SEED, OFFSET),
                ops.nes_samples.default(theta_m, theta_p, k, SEED, OFFSET))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PIXEL_SHAPES)
def test_emulated_pixel_ops_match_cpu(emu, shape, dtype):
    for maxp in (1.0, 0.5):
        x, b_p, b_n, grad, grad_loss = pixel_case(shape, dtype, maxp)
        for use_tanh in (False, True):
            assert_same(emu.pixel_stamp(x, b_p, b_n, maxp, use_tanh),
                        ops.pixel_stamp.default(x, b_p, b_n, maxp, use_tanh))
            assert_same(emu.pixel_stamp_backward(grad, x, b_p, b_n, maxp, use_tanh),
                        ops.pixel_stamp_backward.default(grad, x, b_p, b_n, maxp, use_tanh))
    for gamma in (10.0, 0.7):
        assert_same(emu.pixel_size_loss(b_p, b_n, gamma),
                    ops.pixel_size_loss.default(b_p, b_n, gamma))
        assert_same(emu.pixel_size_loss_backward(grad_loss, b_p, b_n, gamma),
                    ops.pixel_size_loss_backward.default(grad_loss, b_p, b_n, gamma))


def test_emulated_launchers_skip_empty_work(emu):
    """A zero-sized grid is a CUDA error: launchers with nothing to do must not launch."""
    empty = torch.empty(0)
    p = empty.data_ptr()
    before = emu.launches()
    for shape in [(0, 2, 3, 1, 4), (2, 0, 3, 1, 4), (2, 2, 0, 1, 4), (2, 2, 3, 1, 0)]:
        s = emu._shape(*shape)
        for dt in (0, 1):
            emu._call("emu_stamp_forward", dt, p, p, p, p, s)
            emu._call("emu_pixel_stamp_forward", dt, p, p, p, p, s, 1.0, 0)
        emu._call("emu_nes_sample_stamp", p, p, p, p, s, 3, 0, 0.5, 1, 0)
    for shape in [(0, 1, 3, 1, 4), (2, 1, 3, 1, 0)]:
        s = emu._shape(*shape)
        emu._call("emu_nes_grad", p, p, p, p, p, s, 3, 0, 0.5, 1, 0, 0)
        emu._call("emu_nes_samples", p, p, p, s, 3, 1, 0)
        emu._call("emu_pixel_size_loss_backward", 0, p, p, p, p, p, s, 1.0)
    emu._call("emu_nes_samples", p, p, p, emu._shape(2, 1, 3, 1, 4), 0, 1, 0)
    emu._call("emu_pixel_size_loss_forward", 0, p, p, p, emu._shape(0, 1, 3, 3, 4), 1.0)
    assert emu.launches() == before


# ---------------------------------------------------------------------------
# 3. On a GPU
# ---------------------------------------------------------------------------
def _cuda(*tensors):
    return tuple(t.cuda() for t in tensors)


def _cpu(result):
    if isinstance(result, (tuple, list)):
        return tuple(r.cpu() for r in result)
    return result.cpu()


def assert_close_or_equal(actual, expected, exact):
    actual, expected = _cpu(actual), _cpu(expected)
    if exact:
        assert_same(actual, expected)
    else:
        torch.testing.assert_close(actual, expected)


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STAMP_SHAPES)
def test_cuda_stamp_matches_cpu(shape, dtype):
    # Same element formula and the same per-element summation order, no FMA
    # contraction on either side: forward and backward are bit-identical.
    args = stamp_case(shape, dtype)
    x, mask, pattern, grad = args
    assert_close_or_equal(ops.stamp.default(*_cuda(x, mask, pattern)),
                          ops.stamp.default(x, mask, pattern), exact=True)
    assert_close_or_equal(ops.stamp_backward.default(*_cuda(grad, x, mask, pattern)),
                          ops.stamp_backward.default(grad, x, mask, pattern), exact=True)
    assert_close_or_equal(ops.stamp_backward.default(*_cuda(grad, x, mask, pattern), False),
                          ops.stamp_backward.default(grad, x, mask, pattern, False), exact=True)


@gpu_test
@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("shape", NES_SHAPES)
def test_cuda_nes_matches_cpu(shape, joint):
    # Sampling is integer Philox plus shared float32 exp/log/sincos: bit-identical.
    k = shape[-1]
    x, theta_m, theta_p, losses = nes_case(shape, joint)
    args = (k, SIGMA, SEED, OFFSET, joint)
    xc, tmc, tpc, lc = _cuda(x, theta_m, theta_p, losses)
    assert_close_or_equal(ops.nes_sample_stamp.default(xc, tmc, tpc, *args),
                          ops.nes_sample_stamp.default(x, theta_m, theta_p, *args), exact=True)
    out = torch.full_like(ops.nes_sample_stamp.default(xc, tmc, tpc, *args), float("nan"))
    ops.nes_sample_stamp_out.default(xc, tmc, tpc, *args, out)
    assert_close_or_equal(out, ops.nes_sample_stamp.default(x, theta_m, theta_p, *args),
                          exact=True)
    for baseline in (False, True):
        assert_close_or_equal(ops.nes_grad.default(lc, tmc, tpc, *args, baseline),
                              ops.nes_grad.default(losses, theta_m, theta_p, *args, baseline),
                              exact=True)
    assert_close_or_equal(ops.nes_samples.default(tmc, tpc, k, SEED, OFFSET),
                          ops.nes_samples.default(theta_m, theta_p, k, SEED, OFFSET), exact=True)


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PIXEL_SHAPES)
def test_cuda_pixel_ops_match_cpu(shape, dtype):
    # float32 squash uses the shared exp_f: exact. float64 squash calls the
    # platform exp (glibc vs libdevice), so tanh-path float64 values are close.
    for maxp in (1.0, 0.5):
        x, b_p, b_n, grad, grad_loss = pixel_case(shape, dtype, maxp)
        xc, pc, nc, gc, glc = _cuda(x, b_p, b_n, grad, grad_loss)
        for use_tanh in (False, True):
            exact = dtype == torch.float32 or not use_tanh
            assert_close_or_equal(ops.pixel_stamp.default(xc, pc, nc, maxp, use_tanh),
                                  ops.pixel_stamp.default(x, b_p, b_n, maxp, use_tanh), exact)
            assert_close_or_equal(
                ops.pixel_stamp_backward.default(gc, xc, pc, nc, maxp, use_tanh),
                ops.pixel_stamp_backward.default(grad, x, b_p, b_n, maxp, use_tanh), exact)
            assert_close_or_equal(
                ops.pixel_stamp_backward.default(gc, xc, pc, nc, maxp, use_tanh, False),
                ops.pixel_stamp_backward.default(grad, x, b_p, b_n, maxp, use_tanh, False), exact)
    exact = dtype == torch.float32
    for gamma in (10.0, 0.7):
        assert_close_or_equal(ops.pixel_size_loss.default(pc, nc, gamma),
                              ops.pixel_size_loss.default(b_p, b_n, gamma), exact)
        assert_close_or_equal(ops.pixel_size_loss_backward.default(glc, pc, nc, gamma),
                              ops.pixel_size_loss_backward.default(grad_loss, b_p, b_n, gamma),
                              exact)


@gpu_test
def test_cuda_ops_run_on_the_current_stream_and_device():
    x, mask, pattern, _ = stamp_case(STAMP_SHAPES[2], torch.float32)
    expected = ops.stamp.default(x, mask, pattern)
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    xc, mc, pc = (t.to(device) for t in (x, mask, pattern))
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        out = ops.stamp.default(xc, mc, pc)
    stream.synchronize()
    assert out.device == device
    assert_same(out.cpu(), expected)


def _opcheck_samples():
    x, mask, pattern, grad = stamp_case(STAMP_SHAPES[0], torch.float32)
    nx, theta_m, theta_p, losses = nes_case(NES_SHAPES[0], joint=False)
    k = NES_SHAPES[0][-1]
    px, b_p, b_n, pgrad, grad_loss = pixel_case(PIXEL_SHAPES[0], torch.float32, 1.0)
    samples = [
        ("stamp", (x, mask, pattern)),
        ("stamp_backward", (grad, x, mask, pattern)),
        ("nes_sample_stamp", (nx, theta_m, theta_p, k, SIGMA, SEED, OFFSET, False)),
        ("nes_sample_stamp_out", (nx, theta_m, theta_p, k, SIGMA, SEED, OFFSET, False,
                                  torch.empty(theta_p.shape[0], 2 * k, *nx.shape))),
        ("nes_grad", (losses, theta_m, theta_p, k, SIGMA, SEED, OFFSET, False, True)),
        ("nes_samples", (theta_m, theta_p, k, SEED, OFFSET)),
        ("pixel_stamp", (px, b_p, b_n, 1.0, False)),
        ("pixel_stamp_backward", (pgrad, px, b_p, b_n, 1.0, True)),
        ("pixel_size_loss", (b_p, b_n, 10.0)),
        ("pixel_size_loss_backward", (grad_loss, b_p, b_n, 10.0)),
    ]
    return [pytest.param(name, args, id=name) for name, args in samples]


def test_opcheck_samples_cover_every_op():
    assert sorted(p.values[0] for p in _opcheck_samples()) == sorted(OP_NAMES)


@gpu_test
@pytest.mark.parametrize("name,args", _opcheck_samples())
def test_opcheck_on_cuda(name, args):
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    if name in ("stamp", "pixel_stamp", "pixel_size_loss"):
        grad_args = tuple(a.detach().clone().requires_grad_(a.is_floating_point())
                          if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(ops, name).default, grad_args)
    torch.library.opcheck(getattr(ops, name).default, args)
