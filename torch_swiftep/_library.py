"""Registers torch.ops.swiftep.* from the contracts in ops/, once, at import.

Schemas and fakes come from the contracts; CPU kernels from backends/cpu.py; CUDA kernels from
the compiled extension torch_swiftep._C (csrc/binding), whose import runs its
TORCH_LIBRARY_IMPL registration. Without the extension, CUDA calls raise an error that says so.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from .backends import cpu
from .ops import CONTRACTS, NAMESPACE

_LIB = torch.library.Library(NAMESPACE, "DEF")
for _contract in CONTRACTS:
    _LIB.define(_contract.schema_one_line())
    torch.library.register_fake(_contract.qualname, _contract.fake, lib=_LIB)
    _LIB.impl(_contract.name, getattr(cpu, _contract.name), "CPU")

CUDA_EXTENSION_ERROR: str | None = None
try:
    importlib.import_module("torch_swiftep._C")
except ImportError as exc:  # a CPU-only install, or an extension built against another torch
    CUDA_EXTENSION_ERROR = str(exc)


def _missing_cuda(name: str):
    def kernel(*args, **kwargs):
        raise RuntimeError(
            f"swiftep::{name} got CUDA tensors, but the CUDA extension torch_swiftep._C is not "
            f"available ({CUDA_EXTENSION_ERROR}). Install on a machine with a CUDA build of "
            "torch and nvcc: pip install --no-build-isolation -e ."
        )

    return kernel


if CUDA_EXTENSION_ERROR is not None:
    if torch.cuda.is_available():
        warnings.warn(f"torch_swiftep: CUDA extension not loaded: {CUDA_EXTENSION_ERROR}",
                      stacklevel=2)
    for _contract in CONTRACTS:
        _LIB.impl(_contract.name, _missing_cuda(_contract.name), "CUDA")


def registered_ops() -> list[str]:
    """Every op registered under torch.ops.swiftep (read from torch, not from ops/)."""
    prefix = f"{NAMESPACE}::"
    return sorted(name[len(prefix):] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith(prefix))
