// The host interface, part 1: the plain parameter structs the launchers take (raw pointers, no
// torch), filled by the binding from the op arguments and the decoded plan (CommParams, in the
// generated protocol.h).
#pragma once

#include <cstdint>

#include "swiftep/protocol.h"

namespace swiftep {

// Element type of expert outputs / combine results.
enum class DType : int32_t { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

SWIFTEP_HOST_DEVICE inline int dtype_bytes(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : 2;
}

// dispatch and low_latency_dispatch.
struct DispatchParams {
  CommParams comm;
  const void* x;             // [num_tokens, hidden], x_row_bytes per row
  DType x_dtype;             // x's element type when quantize_fp8 (else unused)
  bool quantize_fp8;         // quantize x to FP8 e4m3 + scales inside the kernel
  const float* x_scales;     // [num_tokens, scale_cols] (x given as FP8, else nullptr)
  const void* topk_idx;      // [num_tokens, num_topk], int64 or int32
  bool topk_idx_is_int64;
  const float* topk_weights; // [num_tokens, num_topk]
  int32_t num_tokens;        // may be 0
  int32_t num_topk;          // K of the tensors (<= the plan's num_topk)
  int64_t x_row_bytes;       // hidden * x's element size
  int64_t out_row_bytes;     // window pitch of this call: x_row_bytes, or hidden if quantizing
  int32_t scale_cols;        // hidden / 128 for FP8 (given or quantized here), else 0
  int32_t* expert_offsets;   // dispatch: [L + 1] out
  int32_t* recv_counts;      // low_latency_dispatch: [L] out
  int32_t* token_rows;       // [num_tokens, num_topk] out
  int32_t num_sms;           // most blocks a kernel of this op may use
};

// combine and low_latency_combine.
struct CombineParams {
  CommParams comm;
  const void* topk_idx;      // [num_tokens, num_topk], int64 or int32
  bool topk_idx_is_int64;
  const float* topk_weights; // [num_tokens, num_topk]
  const int32_t* token_rows; // [num_tokens, num_topk]: row on the owner, -1 = none
  int32_t num_tokens;
  int32_t num_topk;
  int32_t hidden;
  DType dtype;               // of expert_out and y
  int64_t out_row_bytes;     // hidden * element size: pitch of the combine window this call
  void* y;                   // [num_tokens, hidden] out
  int32_t num_sms;
};

// combine_symmetric's rows: every expert_out segment rendezvoused on the group, each rank's row
// 0 of it as mapped in this process (bases[segment * world_size + rank], 0 where unknown), and
// where this rank's expert_out of this call is in its own table (segment, byte offset;
// kStagedSegment: staged into this rank's combine window, which its peers read instead).
// Ranks one such combine serves: the kernel keeps the owners' row 0 addresses in shared memory.
constexpr int kMaxTableRanks = 256;
// The segment of an expert_out in no segment its peers know: staged into the combine window.
constexpr int64_t kStagedSegment = -1;
struct SegmentTable {
  const int64_t* bases;  // [num_segments, world_size], on the device
  int64_t num_segments;
  int64_t segment;
  int64_t offset;
};

// Stages expert_out into the combine window when it is not already there: the valid rows of
// each group (expert) only. Group g's rows start at g * group_rows; counts[g] rows are valid
// (throughput: one group, counts = &expert_offsets[L]; low latency: L groups of S rows).
struct CopyRowsParams {
  uint8_t* dst;
  const uint8_t* src;
  int64_t row_bytes;
  int64_t group_rows;
  int32_t num_groups;
  const int32_t* counts;  // [num_groups] on the device, clamped to group_rows
  int32_t num_sms;
};

// swiglu_rows (local; no workspace): out[i, c] = silu(gate_up[i, c]) * gate_up[i, width + c]
// for the rows i < row_ends[num_row_ends - 1] (read on the device, clamped to [0, rows]).
struct SwigluRowsParams {
  const void* gate_up;      // [rows, 2 * width], dtype
  void* out;                // [rows, width], dtype
  const int32_t* row_ends;  // [num_row_ends] on the device
  int32_t num_row_ends;     // >= 1
  int64_t rows;
  int64_t width;
  DType dtype;
};

// dispatch_layout (local; no workspace).
struct LayoutParams {
  const void* topk_idx;      // [num_tokens, num_topk], int64 or int32
  bool topk_idx_is_int64;
  int32_t num_tokens;
  int32_t num_topk;
  int32_t num_experts;
  int32_t world_size;
  int32_t* num_tokens_per_rank;    // [world_size], zeroed by the caller
  int32_t* num_tokens_per_expert;  // [num_experts], zeroed by the caller
  bool* is_token_in_rank;          // [num_tokens, world_size], zeroed by the caller
};

}  // namespace swiftep
