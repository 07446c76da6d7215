import os

import pytest
import torch

# Multi-process tests spawn fresh interpreters; keep each to one thread so a 2-core CI
# machine is not oversubscribed.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def has_cuda_extension() -> bool:
    import torch_swiftep

    return torch.cuda.is_available() and torch_swiftep.CUDA_EXTENSION_ERROR is None


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
