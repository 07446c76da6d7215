"""What every CUDA test file shares: its skip marks and the environment of ranks that are
processes sharing one GPU (torch symmetric memory across overlapping devices, multicast off,
lazy kernel loading: one rank per process, so nothing spins while a kernel loads)."""
import pytest
import torch

import torch_swiftep as ts
from torch_swiftep.launch import NO_MULTICAST_ENV

GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(ts.CUDA_EXTENSION_ERROR is not None,
                       reason=f"CUDA extension not built: {ts.CUDA_EXTENSION_ERROR}"),
]
ENV = {"TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1", **NO_MULTICAST_ENV,
       "CUDA_MODULE_LOADING": "LAZY"}
