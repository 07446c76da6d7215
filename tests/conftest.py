import os

# Before CUDA initializes: the one-process emulated world needs eager kernel loading
# (Communicator.emulated_world explains why). Spawned ranks of the multi-process GPU tests set
# their own value. torch is imported only in pytest_configure, after this.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
# Multi-process tests spawn fresh interpreters; keep each to one thread so a 2-core CI
# machine is not oversubscribed.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
