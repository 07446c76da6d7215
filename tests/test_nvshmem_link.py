"""The NVSHMEM build unit (csrc/nvshmem: the scale-out engine and transport) compiles with
-rdc=true, device-links against libnvshmem_device.a and links against libnvshmem_host.so of the
pip package nvidia-nvshmem-cu13 (scripts/check_nvshmem_link.sh; no GPU needed), and stays
torch-free. With a GPU, several PEs (one process each, csrc/nvshmem/pe_exchange.cpp) exchange
rows through the transport, grouped into nodes as the scale-out hop groups them, and a PE that
never sends is named by every other PE's bounded wait."""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import time

import pytest
import torch

from torch_swiftep.launch import NO_MULTICAST_ENV

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


def _with(marks):
    """Applies a list of pytest marks to a test."""
    def apply(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn
    return apply


NEEDS_BUILD = [
    pytest.mark.slow,
    pytest.mark.skipif(_nvcc_missing(), reason="nvcc not installed"),
    pytest.mark.skipif(_nvshmem_missing(), reason="NVSHMEM not installed: pip install "
                       "nvidia-nvshmem-cu13 (the `test` extra) or set NVSHMEM_HOME"),
]
NEEDS_GPU = NEEDS_BUILD + [
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """scripts/check_nvshmem_link.sh's stdout and its build directory, kept for the programs it
    links (pe_exchange)."""
    script = ROOT / "scripts" / "check_nvshmem_link.sh"
    assert script.exists(), "scripts/check_nvshmem_link.sh is missing"
    out = tmp_path_factory.mktemp("nvshmem_build")
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "SWIFTEP_NVSHMEM_BUILD_DIR": str(out)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"stdout": proc.stdout, "dir": out}


@_with(NEEDS_BUILD)
def test_nvshmem_unit_compiles_and_links(build):
    assert "all checks passed" in build["stdout"]


@_with(NEEDS_BUILD)
def test_pe_exchange_refuses_bad_arguments(build):
    for args in (["2", "2", "1", "uid"], ["0", "3", "2", "uid"], ["0", "1", "1", "uid", "0"]):
        proc = subprocess.run([str(build["dir"] / "pe_exchange"), *args], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and "bad arguments" in proc.stderr, (args, proc.stderr)


def run_pes(binary, world: int, ranks_per_node: int, workdir, absent=None,
            timeout_s: float = 180.0) -> list[tuple[int, str]]:
    """Starts one pe_exchange process per PE and returns (exit status, output) per PE; a PE
    still running after timeout_s is killed (exit status None) with all the others."""
    uid = workdir / f"uid_{world}_{ranks_per_node}_{absent}"
    env = {**os.environ, **NO_MULTICAST_ENV}
    tail = [] if absent is None else [str(absent)]
    procs = [subprocess.Popen([str(binary), str(r), str(world), str(ranks_per_node), str(uid),
                               *tail], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for r in range(world)]
    deadline = time.monotonic() + timeout_s
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            results.append((None, out))
    return results


@_with(NEEDS_GPU)
@pytest.mark.parametrize("world,ranks_per_node", [(2, 1), (4, 2), (8, 4), (8, 2)])
def test_pes_exchange_rows_across_nodes(build, tmp_path, world, ranks_per_node):
    results = run_pes(build["dir"] / "pe_exchange", world, ranks_per_node, tmp_path)
    for rank, (code, out) in enumerate(results):
        assert code == 0 and f"PE {rank}: all checks passed" in out, f"PE {rank}:\n{out}"
        print(next(line for line in out.splitlines() if "exchange waited" in line))


@_with(NEEDS_GPU)
def test_a_pe_that_never_sends_is_named_across_the_node_boundary(build, tmp_path):
    """World 4 as 2 nodes of 2; PE 3 (node 1) never sends: PEs 0-2 give up within the bound,
    naming PE 3 and its node; PE 3 still receives every row."""
    results = run_pes(build["dir"] / "pe_exchange", 4, 2, tmp_path, absent=3)
    for rank, (code, out) in enumerate(results):
        assert code == 0 and f"PE {rank}: all checks passed" in out, f"PE {rank}:\n{out}"
        if rank != 3:
            assert "the wait gave up naming PE 3 (node 1)" in out, out
            print(next(line for line in out.splitlines() if "gave up" in line and "ms" in line))


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
