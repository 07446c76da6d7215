"""The NVSHMEM build unit (csrc/nvshmem: the scale-out engine and transport) compiles with
-rdc=true, device-links against libnvshmem_device.a and links against libnvshmem_host.so of the
pip package nvidia-nvshmem-cu13 (scripts/check_nvshmem_link.sh; no GPU needed), and stays
torch-free."""
import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNIT = ROOT / "csrc" / "nvshmem"


def _nvcc_missing():
    return shutil.which("nvcc") is None and not pathlib.Path("/usr/local/cuda/bin/nvcc").exists()


def _nvshmem_missing():
    if os.environ.get("NVSHMEM_HOME"):
        return False
    try:
        return importlib.util.find_spec("nvidia.nvshmem") is None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return True


@pytest.mark.slow
@pytest.mark.skipif(_nvcc_missing(), reason="nvcc not installed")
@pytest.mark.skipif(_nvshmem_missing(), reason="NVSHMEM not installed: pip install "
                    "nvidia-nvshmem-cu13 (the `test` extra) or set NVSHMEM_HOME")
def test_nvshmem_unit_compiles_and_links():
    script = ROOT / "scripts" / "check_nvshmem_link.sh"
    assert script.exists(), "scripts/check_nvshmem_link.sh is missing"
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout


def test_nvshmem_unit_includes_no_torch_headers():
    sources = [p for p in UNIT.rglob("*") if p.is_file()]
    assert any(p.suffix == ".cu" for p in sources), "csrc/nvshmem has no .cu files"
    for path in sources:
        for line in path.read_text().splitlines():
            if line.startswith("#include"):
                for banned in ("torch", "ATen", "c10/", "pybind11", "Python.h"):
                    assert banned not in line, f"{path.relative_to(ROOT)}: {line}"


def test_nvshmem_host_interface_needs_no_nvshmem_headers():
    """engine.h and transport.h are what a binding includes: no NVSHMEM (nor device) headers, so
    the binding compiles without NVSHMEM's include path; only the .cu/.cuh files see NVSHMEM."""
    for name in ("engine.h", "transport.h"):
        for line in (UNIT / name).read_text().splitlines():
            if line.startswith("#include"):
                assert "nvshmem.h" not in line and "nvshmemx.h" not in line \
                    and ".cuh" not in line, f"csrc/nvshmem/{name}: {line}"
