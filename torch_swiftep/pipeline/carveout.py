"""Give the GEMMs only the SMs the communication kernels leave them (the SM carve-out).

Why: torch._grouped_mm (the experts) is a CUTLASS persistent kernel that launches one CTA per
SM it is told the GPU has and hands each CTA a fixed share of the tiles. Beside a
communication kernel holding s SMs, only G - s of those CTAs are resident; the other s wait for
a whole CTA to finish, so the GEMM takes up to twice as long (or, launched first, it holds every
SM and the communication kernel waits for it). Production MoE code sizes its GEMMs for the SMs
left to them (DeepEP's num_sms with DeepGEMM's set_num_sms, SGLang's two-batch overlap).

How, in PyTorch (read in pytorch/pytorch):
- `torch._C._set_sm_carveout_experimental(n)` sets `at::Context::_SMCarveout_EXPERIMENTAL`
  (aten/src/ATen/Context.cpp, `_setSMCarveout_EXPERIMENTAL`; it logs once that it is
  experimental). The bf16 grouped GEMM reads it at launch: aten/src/ATen/native/cuda/
  GroupMM.cu, `bf16bf16_grouped_gemm_impl_sm90_sm100`: `sm_count = multiProcessorCount -
  _SMCarveout_EXPERIMENTAL()`, `arguments.hw_info.sm_count = sm_count` (the persistent grid),
  reached from `_grouped_mm_cuda`'s fast path (aten/src/ATen/native/cuda/GroupedBlas.cpp:
  bf16 inputs, sm90/sm100). cuBLASLt matmuls read it too (`CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET`,
  e.g. aten/src/ATen/cuda/tunable/GemmCublasLt.h, `CublasltStandardGemmProblem::initialize`).
  It is a host-side, process-wide setting read when a kernel is launched: set it around the
  launches that must leave SMs free, and restore it (this module's `sm_carveout`).
- Green contexts (`torch.cuda.green_contexts.GreenContext`) are not used: they confine a
  context's kernels to a set of SMs, but the persistent GEMM still sizes its grid from the
  device's multiProcessorCount (GroupMM.cu above), so inside a green context of G - s SMs it
  runs its s extra CTAs as a second wave (the same 2x) unless the carve-out is set as well; in
  the releases that have them they need CUDA 12.8+ drivers, and the early API (set_context /
  pop_context) moves work to the green context's default stream with event syncs each time.

Fallback: without `_set_sm_carveout_experimental` (older torch, ROCm, CPU) `sm_carveout` does
nothing and the layer relies on its launch order and its high-priority communication stream;
`carveout_supported()` says which case holds, and the benchmark measures whether the GEMM
actually slows down with a carve-out (`calibrate.carveout_effect`).
"""
from __future__ import annotations

import contextlib

import torch

_SET = getattr(torch._C, "_set_sm_carveout_experimental", None)
_GET = getattr(torch._C, "_get_sm_carveout_experimental", None)


def carveout_supported() -> bool:
    """Whether this torch has the carve-out setting (it may still be ignored by a kernel)."""
    return _SET is not None and _GET is not None and torch.cuda.is_available()


@contextlib.contextmanager
def sm_carveout(sms: int):
    """GEMMs launched inside see `sms` fewer SMs (sms <= 0 or unsupported: no change). torch
    logs once that the setting is a "temporary experimental mitigation"."""
    if sms <= 0 or not carveout_supported():
        yield
        return
    previous = _GET()
    _SET(sms)
    try:
        yield
    finally:
        _SET(previous)
