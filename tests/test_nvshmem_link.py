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

from torch_swiftep.launch import NO_MULTICAST_ENV, rank_gpu

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


# ------------------------------------------------------- the engine from Python (ctypes)
def _library(build) -> str:
    return str(build["dir"] / "libswiftep_nvshmem.so")


@_with(NEEDS_BUILD)
def test_engine_library_loads_with_the_layout_python_mirrors(build):
    from torch_swiftep import nvshmem_engine as ne

    lib = ne.load_library(_library(build))
    assert lib.swiftep_nvshmem_header_version().decode().count(".") == 2
    assert lib.swiftep_nvshmem_unique_id_bytes() == 128


@_with(NEEDS_BUILD)
def test_engine_command_line_checks_a_built_library(build, capsys):
    from torch_swiftep import nvshmem_engine as ne

    assert ne.main(["--dir", str(build["dir"])]) == 0
    assert "parameter layout matches" in capsys.readouterr().out


def test_engine_library_missing_is_a_clear_error(tmp_path, monkeypatch):
    from torch_swiftep import nvshmem_engine as ne

    monkeypatch.delenv(ne.LIB_ENV, raising=False)
    monkeypatch.setattr(ne, "DEFAULT_DIR", tmp_path)
    with pytest.raises(ne.NvshmemError, match="SWIFTEP_NVSHMEM_LIB is not set"):
        ne.load_library()
    with pytest.raises(ne.NvshmemError, match="does not exist"):
        ne.load_library(str(tmp_path / "nope.so"))
    (tmp_path / "bad.so").write_text("not a library")
    with pytest.raises(ne.NvshmemError, match="does not load"):
        ne.load_library(str(tmp_path / "bad.so"))


def _start_without_gpu(rank, world, library):
    from torch_swiftep import nvshmem_engine as ne

    try:
        ne.NvshmemEngine.start(library=library)
    except ne.NvshmemError as exc:
        return str(exc)
    return "started"


@_with(NEEDS_BUILD)
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: init would run")
def test_engine_start_without_a_gpu_refuses_on_every_rank(build):
    from torch_swiftep.launch import run_world

    for msg in run_world(2, _start_without_gpu, _library(build), timeout_s=120):
        assert "no current CUDA device" in msg, msg


def _engine_exchange(rank, world, library):
    """Every PE puts (3 * rank + d) % 4 rows of 528 bytes to every PE d over 2 channels, waits
    for its signals, and compares what it received with what the senders hold."""
    import torch.distributed as dist

    from torch_swiftep import nvshmem_engine as ne

    torch.cuda.set_device(rank_gpu(rank, torch.cuda.device_count()))  # one GPU, or one per PE
    engine = ne.NvshmemEngine.start(library=library)
    width, per_pair, channels = 528, 4, 2
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randint(0, 256, (8, width), generator=gen, dtype=torch.uint8)
               for _ in range(world)]  # every PE's rows, drawn alike everywhere
    count = [[(3 * s + d) % (per_pair + 1) for d in range(world)] for s in range(world)]
    dst = engine.alloc(world * per_pair * width).view(world * per_pair, width)
    signals = engine.alloc(world * channels * 8).view(torch.int64)
    dst.zero_()
    signals.zero_()
    torch.cuda.synchronize()
    dist.barrier()  # nobody puts before every PE has zeroed its buffers
    src = sources[rank].cuda()
    engine.register(src)
    items = [(j % 8, rank * per_pair + j, d) for d in range(world) for j in range(count[rank][d])]
    as_i32 = lambda values: torch.tensor(values, dtype=torch.int32, device="cuda")  # noqa: E731
    offsets = [0]
    for d in range(world):
        offsets.append(offsets[-1] + count[rank][d])
    status = torch.zeros(4, dtype=torch.int64, device="cuda")
    engine.put_rows(src, dst, as_i32([i[0] for i in items] or [0]),
                    as_i32([i[1] for i in items] or [0]), as_i32(offsets),
                    as_i32(list(range(world))), channels=channels, signals=signals, epoch=1,
                    status=status)
    engine.wait_signals(signals, as_i32(list(range(world))), channels=channels, epoch=1,
                        ranks_per_node=2, timeout_ms=30000, status=status)
    torch.cuda.synchronize()
    want = torch.zeros(world * per_pair, width, dtype=torch.uint8)
    for s in range(world):
        for j in range(count[s][rank]):
            want[s * per_pair + j] = sources[s][j % 8]
    errors = [] if torch.equal(dst.cpu(), want) else [f"PE {rank}: received rows differ"]
    if int(status[0]) != 0:
        errors.append(f"PE {rank}: status {status.tolist()}")
    engine.unregister(src)
    dist.barrier()  # every PE has read its rows before the buffers go
    engine.free(signals.view(torch.uint8).view(-1))
    engine.free(dst.view(-1))
    engine.finalize()
    return errors


@_with(NEEDS_GPU)
def test_engine_from_python_exchanges_rows(build):
    from torch_swiftep.launch import run_world

    results = run_world(4, _engine_exchange, _library(build), env=dict(NO_MULTICAST_ENV),
                        timeout_s=240)
    assert not [e for r in results for e in r], results
