"""Build of torch_swiftep.

Pure Python unless a CUDA build of torch is importable at build time (install with
`pip install --no-build-isolation -e .` on a GPU machine): then the CUDA extension
torch_swiftep._C is compiled from csrc/ for sm_90a. SWIFTEP_SKIP_CUDA=1 forces pure Python;
SWIFTEP_CUDA_ARCH picks another arch; SWIFTEP_NVCC_FLAGS adds nvcc flags (tuning variants).
The contracts in ops/ are the subpackage torch_swiftep.ops (torch_swiftep/ops links to ../ops).
"""
import glob
import os
import sys

from setuptools import setup

PACKAGES = [
    "torch_swiftep",
    "torch_swiftep.backends",
    "torch_swiftep.bench",
    "torch_swiftep.integrations",
    "torch_swiftep.ops",
]


def shared_libstdcxx_link_args():
    """Bind the extension to the process's shared libstdc++ (the one torch uses).

    Some toolchains link a private static libstdc++ into every shared object; inside a torch
    process that second C++ runtime has no initialised locale, and the first error message
    that formats a number (a TORCH_CHECK) crashed in ostream. Naming libstdc++.so.6 before the
    driver's own libraries resolves every C++ runtime symbol against the shared library.
    SWIFTEP_SHARED_LIBSTDCXX=0 leaves the link to the toolchain.
    """
    if not sys.platform.startswith("linux") or os.environ.get("SWIFTEP_SHARED_LIBSTDCXX") == "0":
        return []
    return ["-Wl,--push-state,--no-as-needed", "-l:libstdc++.so.6", "-Wl,--pop-state"]


def cuda_extension():
    if os.environ.get("SWIFTEP_SKIP_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:  # isolated build env without torch: pure Python
        return [], {}
    if torch.version.cuda is None:
        return [], {}
    arch = os.environ.get("SWIFTEP_CUDA_ARCH", "90a")
    # csrc/ops: the kernels' launchers; csrc/probes holds standalone programs, not extension code
    sources = (sorted(glob.glob("csrc/ops/**/*.cu", recursive=True))
               + sorted(glob.glob("csrc/binding/*.cpp")))
    ext = CUDAExtension(
        name="torch_swiftep._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc/include"), os.path.abspath("csrc")],
        extra_link_args=shared_libstdcxx_link_args(),
        extra_compile_args={
            # No -std: torch's extension builder picks the standard its headers expect
            # (C++17 for torch 2.11, C++20 for newer releases).
            "cxx": ["-O3"],
            "nvcc": ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                     "--expt-relaxed-constexpr", "-lineinfo"]
            # tuning variants: SWIFTEP_NVCC_FLAGS="-DSWIFTEP_COMBINE_WARPS=4"
            + os.environ.get("SWIFTEP_NVCC_FLAGS", "").split(),
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(
    packages=PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
