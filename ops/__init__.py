"""Op contracts: one schema per op, the single source of truth.

The Python registration (``torch_swiftep/_library.py``), the CUDA binding
(``csrc/binding/swiftep_ops.cpp`` implements exactly these schemas), the fake kernels (beside each
schema), the docs (``docs/ops.md``, generated) and the opcheck test (which enumerates the
registered ops) all follow the files in this folder. To add an op, add a module here and list it
in ``CONTRACTS``.
"""
from . import combine, dispatch, dispatch_layout, low_latency_combine, low_latency_dispatch
from ._contract import NAMESPACE, OpContract

CONTRACTS: tuple[OpContract, ...] = (
    dispatch_layout.CONTRACT,
    dispatch.CONTRACT,
    combine.CONTRACT,
    low_latency_dispatch.CONTRACT,
    low_latency_combine.CONTRACT,
)

__all__ = ["CONTRACTS", "NAMESPACE", "OpContract"]
