"""Builds trigscan._C, the operator library behind torch.ops.trigscan.

Install with `pip install --no-build-isolation -e .` (torch must already be
installed: the extension links the torch it is built against). For development,
`python setup.py build_ext --inplace` rebuilds incrementally with ninja.

Switches (environment variables):
  TRIGSCAN_CUDA=1|0     force the CUDA kernels on / off (default: on when torch is a
                        CUDA build and nvcc is found, GPU or not)
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default below when unset)
  TRIGSCAN_DEBUG=1      -O0 -g
  MAX_JOBS              parallel compile jobs (ninja)
"""
import glob
import json
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;8.6;9.0;12.0+PTX"


def find_cuda_home():
    """The toolkit root: CUDA_HOME if set, else the real nvcc's grandparent.

    /usr/local/bin/nvcc may be a wrapper script; torch would then guess
    /usr/local and fail to link cudart, so resolve to a directory whose lib
    folder has libcudart.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        home_path = Path(home)
        if (home_path / "bin" / "nvcc").exists() and (
            glob.glob(str(home_path / "lib*" / "libcudart.so*"))
            or glob.glob(str(home_path / "targets" / "*" / "lib" / "libcudart.so*"))
        ):
            return str(home_path)
    return None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

switch = os.environ.get("TRIGSCAN_CUDA", "").strip()
cuda_possible = torch.version.cuda is not None and cuda_home is not None
if switch == "1" and not cuda_possible:
    raise SystemExit(
        "TRIGSCAN_CUDA=1 but CUDA cannot be built: "
        f"torch {torch.__version__} is {'a CPU build' if torch.version.cuda is None else 'a CUDA build'}"
        f", nvcc toolkit {'found at ' + cuda_home if cuda_home else 'not found'}."
    )
build_cuda = cuda_possible if switch == "" else switch == "1"
if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # Without a visible GPU torch cannot pick architectures itself.
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

debug = os.environ.get("TRIGSCAN_DEBUG") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
# -ffp-contract=off / --fmad=false: no fused multiply-adds the other device would
# not make, so shared arithmetic rounds identically on CPU and GPU.
# -fno-math-errno / -fno-trapping-math change no value (errno and FP exception
# flags only); without them GCC will not vectorise sqrtf or if-convert the
# branch-free math of csrc/common/math.h.
cxx_flags = opt + ["-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
nvcc_flags = opt + ["--fmad=false"]

sources = ["csrc/trigscan.cpp", "csrc/checks.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
extension_kwargs = dict(
    name="trigscan._C",
    extra_compile_args={"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
    py_limited_api=True,
)
if build_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    extension_kwargs["extra_compile_args"]["nvcc"] = nvcc_flags
    extension_kwargs["extra_compile_args"]["cxx"].append("-DWITH_CUDA")
    extension = CUDAExtension(sources=sources, **extension_kwargs)
else:
    extension = CppExtension(sources=sources, **extension_kwargs)

build_info = {
    "cuda_compiled": build_cuda,
    "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
    "cuda_home": cuda_home if build_cuda else None,
    "torch_built_with": torch.__version__,
    "cuda_version": torch.version.cuda if build_cuda else None,
    "cxx_flags": cxx_flags,
    "nvcc_flags": nvcc_flags if build_cuda else None,
    "debug": debug,
}
print("trigscan build configuration:", json.dumps(build_info, indent=2))
(ROOT / "trigscan" / "_build_info.json").write_text(json.dumps(build_info, indent=2) + "\n")

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    package_data={"trigscan": ["_build_info.json"]},
)
