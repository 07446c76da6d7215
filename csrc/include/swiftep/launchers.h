// Host launchers: raw pointers + a stream, no torch. Each returns the cudaError_t of its
// launches (cudaErrorInvalidValue when a size check fails; see the *_smem queries).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "swiftep/params.h"

namespace swiftep {

// Shared-memory feasibility of a call, for a clear host error before launching.
struct SmemCheck {
  bool ok;
  int64_t needed_bytes;     // dynamic shared memory the kernel would need (at its minimum)
  int64_t available_bytes;  // what the device allows per block for that kernel
};

// dispatch_layout: num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank (zeroed by the
// caller). Out-of-range indices count as no expert.
cudaError_t launch_dispatch_layout(const LayoutParams& params, cudaStream_t stream);

// Throughput dispatch: the counts/rows kernel (one block) then the data kernel.
SmemCheck dispatch_smem(const DispatchParams& params);
cudaError_t launch_dispatch(const DispatchParams& params, cudaStream_t stream);

// Low-latency dispatch: one kernel.
SmemCheck low_latency_dispatch_smem(const DispatchParams& params);
cudaError_t launch_low_latency_dispatch(const DispatchParams& params, cudaStream_t stream);

// Pull combine over the throughput / low-latency combine windows.
SmemCheck combine_smem(const CombineParams& params);
cudaError_t launch_combine(const CombineParams& params, cudaStream_t stream);
cudaError_t launch_low_latency_combine(const CombineParams& params, cudaStream_t stream);

// Stages expert_out's valid rows into a combine window.
cudaError_t launch_copy_rows(const CopyRowsParams& params, cudaStream_t stream);

}  // namespace swiftep
