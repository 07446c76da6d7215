// Addresses of the workspace's regions and control fields, own and peers'.
#pragma once

#include <cstdint>

#include "swiftep/params.h"

namespace swiftep {

// Slots of ctrl.epoch (int64[4]).
constexpr int kEpochThroughput = 0;
constexpr int kEpochLowLatency = 1;

// Slots of ctrl.blocks_done (int32[8]): one grid-completion counter per kernel that uses the
// last-block-done pattern, so kernels of the two paths never share a counter.
constexpr int kDoneDispatchData = 0;
constexpr int kDoneLowLatencyDispatch = 1;

template <typename T>
__device__ __forceinline__ T* at_offset(uint8_t* base, int64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

__device__ __forceinline__ uint8_t* peer_base(const CommParams& c, int peer) {
  return reinterpret_cast<uint8_t*>(c.peer_ptrs[peer]);
}

// Own ctrl fields.
__device__ __forceinline__ int64_t* ctrl_epoch(const CommParams& c) {
  return at_offset<int64_t>(c.workspace, c.off_epoch);
}
__device__ __forceinline__ int32_t* ctrl_blocks_done(const CommParams& c) {
  return at_offset<int32_t>(c.workspace, c.off_blocks_done);
}
__device__ __forceinline__ int64_t* ctrl_status(const CommParams& c) {
  return at_offset<int64_t>(c.workspace, c.off_status);
}

// counts[parity][source][expert] (int32), inside the workspace at base.
__device__ __forceinline__ int32_t* counts_at(uint8_t* base, int64_t off_counts, int64_t epoch,
                                              int source, const CommParams& c) {
  const int64_t parity = epoch & 1;
  return at_offset<int32_t>(base, off_counts) +
         (parity * c.world_size + source) * static_cast<int64_t>(c.num_experts);
}

}  // namespace swiftep
