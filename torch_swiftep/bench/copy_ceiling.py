"""The copy ceiling the GPU benchmarks compare against, measured in the same run: the library's
own bulk copy (one thread per SM driving TMA copies, csrc/ops/combine/copy_rows.cuh) at a given
number of SMs, built from a source checkout with nvcc (csrc/probes/copy_ceiling.cu).

    ceiling = copy_ceiling_gbps([8, 32])   # {8: payload GB/s, 32: ...}, or {} with a reason printed
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROBE = ROOT / "csrc" / "probes" / "copy_ceiling.cu"
COPY_BYTES = 512 << 20  # 10x the 50-60 MB L2, and quick (the probe times 6 copies per count)


def _build(out_dir: pathlib.Path) -> pathlib.Path:
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                "bin", "nvcc")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major >= 9 else "")
    exe = out_dir / "copy_ceiling"
    subprocess.run([nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                    "-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc" / "include"),
                    str(PROBE), "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe


def copy_ceiling_gbps(sm_counts, nbytes: int = COPY_BYTES) -> dict[int, float]:
    """{SMs: payload GB/s of the bulk copy with one block per SM}. Empty (and a printed reason)
    when the probe cannot be built here (no source checkout, no nvcc, no GPU)."""
    if not PROBE.exists() or not torch.cuda.is_available():
        print(f"copy ceiling: not measured (needs a GPU and the source checkout's {PROBE})")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = _build(pathlib.Path(tmp))
            out = subprocess.run([str(exe), str(nbytes), *map(str, sm_counts)], check=True,
                                 capture_output=True, text=True, timeout=300).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            print(f"copy ceiling: not measured ({str(detail).strip()[:300]})")
            return {}
    return {int(b): float(g) for b, g in (line.split() for line in out.splitlines())}
