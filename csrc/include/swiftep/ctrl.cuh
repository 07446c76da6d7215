// Addresses of the workspace's regions and control fields, own and peers'.
#pragma once

#include <cstdint>

#include "swiftep/params.h"
#include "swiftep/plan_fields.h"
#include "swiftep/ptx.cuh"

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

// Phase trace of one low-latency call (plan.py TRACE_*): mark(point) stamps %globaltimer into
// ctrl.trace[epoch % kTraceCalls][point] when ctrl.trace_on is set, else does nothing (one
// predicated branch). Built by the one thread that stamps.
struct Tracer {
  int64_t* row;  // nullptr: tracing off
  __device__ __forceinline__ void mark(int point) const {
    if (row != nullptr) row[point] = static_cast<int64_t>(globaltimer_ns());
  }
};

__device__ __forceinline__ Tracer make_tracer(const CommParams& c, int64_t epoch) {
  if (*at_offset<volatile int64_t>(c.workspace, c.off_trace_on) == 0) return Tracer{nullptr};
  return Tracer{at_offset<int64_t>(c.workspace, c.off_trace) +
                (epoch % kTraceCalls) * kTracePoints};
}

// counts[parity][source][expert] (int32), inside the workspace at base.
__device__ __forceinline__ int32_t* counts_at(uint8_t* base, int64_t off_counts, int64_t epoch,
                                              int source, const CommParams& c) {
  const int64_t parity = epoch & 1;
  return at_offset<int32_t>(base, off_counts) +
         (parity * c.world_size + source) * static_cast<int64_t>(c.num_experts);
}

}  // namespace swiftep
