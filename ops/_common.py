"""Argument blocks shared by the communication ops' schemas and docs."""

# The communicator state every communication op takes after its tensors: the rank's workspace
# (mutated: peers and this rank write into it), the peer table, the process group (CPU backend)
# and the plan (ops/protocol.py PLAN_FIELDS), plus the SM budget of this call.
COMM_ARGS = """Tensor(a!) workspace,
    Tensor peer_ptrs,
    str group_name,
    int[] plan,
    int num_sms"""

COMM_DOC = """workspace: [workspace_bytes], uint8: this rank's fused buffer (symmetric on GPUs); its
  regions (ops/protocol.py REGIONS) are the windows the results are read from.
peer_ptrs: [world_size], int64, on the workspace's device: base address of every rank's
  workspace (CUDA backend); empty on CPU.
group_name: the process group (CPU backend; "" for a world of one).
plan: the integer list of torch_swiftep.plan.Plan.as_list() (fields: ops/protocol.py).
num_sms: SMs the kernels may use (CUDA backend)."""

QUANTIZE_DOC = """quantize_fp8: x is bf16/fp16/fp32 (no x_scales); the kernel quantizes each token
  to FP8 e4m3 with one float32 scale per 128 channels (torch_swiftep.fp8.quantize_fp8, bit for
  bit) on its way out, so the windows receive FP8 rows and their scales as if x had been
  quantized first, without the extra kernels and round trip through memory."""
