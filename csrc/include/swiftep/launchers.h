// The host interface, part 2: the launchers (raw pointers + a stream, no torch). Each computes
// its launch configuration once, checks that it fits the device's shared memory, and launches;
// the result says which of the two failed, if any.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "swiftep/params.h"

namespace swiftep {

// Shared-memory feasibility of a call.
struct SmemCheck {
  bool ok;
  int64_t needed_bytes;     // dynamic shared memory the kernel would need (at its minimum)
  int64_t available_bytes;  // what the device allows per block for that kernel
};

// What a launcher did. smem.ok false: the configuration does not fit (nothing was launched,
// error is cudaErrorInvalidValue); else error is the cudaError_t of the launches (or of the
// device queries before them; cudaErrorInvalidValue when the parameters are inconsistent).
struct LaunchResult {
  cudaError_t error;
  SmemCheck smem;
};

// dispatch_layout: num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank (zeroed by the
// caller). Out-of-range indices count as no expert.
LaunchResult launch_dispatch_layout(const LayoutParams& params, cudaStream_t stream);

// swiglu_rows: one grid-stride elementwise kernel over the valid rows only (their count is
// read on the device). cudaErrorInvalidValue (nothing launched) when num_row_ends < 1.
LaunchResult launch_swiglu_rows(const SwigluRowsParams& params, cudaStream_t stream);

// Throughput dispatch: the counts/rows kernel (one block) then the data kernel.
LaunchResult launch_dispatch(const DispatchParams& params, cudaStream_t stream);

// Low-latency dispatch: one kernel.
LaunchResult launch_low_latency_dispatch(const DispatchParams& params, cudaStream_t stream);

// Pull combine over the throughput / low-latency combine windows (one kernel, two windows).
LaunchResult launch_combine(const CombineParams& params, cudaStream_t stream);
LaunchResult launch_low_latency_combine(const CombineParams& params, cudaStream_t stream);

// combine_partials (ops/combine/partials_kernel.cuh): each owner reduces its slots of every
// token from expert_out in place (16-byte aligned, rows at params.out_row_bytes, a multiple of
// 16) and pushes one partial per (token, owner) to the token's rank, which sums them in rank
// order. Error cudaErrorInvalidValue (nothing launched) when the alignment does not hold.
LaunchResult launch_combine_partials(const CombineParams& params, const void* expert_out,
                                     cudaStream_t stream);

// The throughput combine (same window flags and epochs as launch_combine) reading row `row` of
// owner r in r's own expert_out instead of r's combine window, found through table (r's
// (segment, offset) read from r's workspace, then table.bases): each rank's expert_out in
// place (torch's symmetric memory pool), no staging copy. Error cudaErrorInvalidValue (nothing
// launched) when table.bases is null, the world is larger than the kernel's owner table, or
// out_row_bytes or y is not 16-byte aligned.
LaunchResult launch_combine_from_table(const CombineParams& params, const SegmentTable& table,
                                       cudaStream_t stream);

// Stages expert_out's valid rows into a combine window.
LaunchResult launch_copy_rows(const CopyRowsParams& params, cudaStream_t stream);

}  // namespace swiftep
