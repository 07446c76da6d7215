"""The CUDA kernels and launchers (csrc/device, csrc/ops) compile with plain nvcc for sm_90a (no
torch headers, no GPU needed), and the binding layer (csrc/binding) passes a syntax check against
torch's headers."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not pathlib.Path(
    "/usr/local/cuda/bin/nvcc").exists(), reason="nvcc not installed")
def test_kernels_compile_with_nvcc(tmp_path):
    script = ROOT / "scripts" / "check_cuda_compile.sh"
    assert script.exists(), "scripts/check_cuda_compile.sh is missing"
    env = dict(os.environ, SWIFTEP_PTXAS_LOG_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_kernels_include_no_torch_headers():
    """Only csrc/binding sees torch: kernels, launchers and the host interface are torch-free."""
    for path in (ROOT / "csrc").rglob("*"):
        if not path.is_file() or (ROOT / "csrc" / "binding") in path.parents:
            continue
        text = path.read_text()
        for banned in ("#include <torch", "#include <ATen", "#include <c10",
                       '#include "torch', '#include "ATen'):
            assert banned not in text, f"{path.relative_to(ROOT)} includes {banned}"


def test_binding_includes_only_the_host_interface():
    """The binding includes the host interface (csrc/include/swiftep), never device internals
    (csrc/device) or an op's kernels and launchers (csrc/ops)."""
    binding = list((ROOT / "csrc" / "binding").glob("*"))
    assert any(p.suffix == ".cpp" for p in binding), "csrc/binding has no .cpp files"
    for path in binding:
        for line in path.read_text().splitlines():
            if line.startswith("#include"):
                assert '"device/' not in line and '"ops/' not in line and ".cuh" not in line, \
                    f"{path.relative_to(ROOT)}: {line}"
