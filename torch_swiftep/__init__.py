"""torch_swiftep: expert-parallel dispatch/combine for Mixture-of-Experts in PyTorch.

    comm = torch_swiftep.Communicator(group, torch_swiftep.CommConfig(
        num_experts=256, hidden=7168, num_topk=8, max_tokens_per_rank=4096))
    handle = comm.dispatch(x, topk_idx, topk_weights)        # expert-major rows, no host sync
    out = experts(handle.recv_x, handle.expert_offsets)      # e.g. torch._grouped_mm(offs=)
    y = comm.combine(out, handle)                            # weighted, float32 accumulation

The ops are torch.ops.swiftep.* (contracts in ops/, docs/ops.md); torch_swiftep.reference is the
pure-torch reference every backend is tested against.
"""
from . import _library, reference  # noqa: F401  (_library registers the ops)
from ._library import CUDA_EXTENSION_ERROR, registered_ops
from .activations import swiglu_rows
from .agreement import BrokenCommunicatorError
from .communicator import (
    Communicator,
    DispatchResult,
    LowLatencyDispatchResult,
    PendingCall,
)
from .fp8 import dequantize_fp8, quantize_fp8
from .plan import CommConfig, Plan
from .status import SwiftepError, SwiftepIndexError

__version__ = "0.1.0"

__all__ = [
    "BrokenCommunicatorError",
    "CUDA_EXTENSION_ERROR",
    "CommConfig",
    "Communicator",
    "DispatchResult",
    "LowLatencyDispatchResult",
    "PendingCall",
    "Plan",
    "SwiftepError",
    "SwiftepIndexError",
    "dequantize_fp8",
    "quantize_fp8",
    "reference",
    "registered_ops",
    "swiglu_rows",
]
