// Device internals: addresses of the workspace's regions and control fields, own and peers'
// (the slots kEpoch*, kDone* and the trace constants come from swiftep/protocol.h), the phase
// tracer and the tagged counts of the low-latency dispatch.
#pragma once

#include <cstdint>

#include "device/ptx.cuh"
#include "swiftep/params.h"

namespace swiftep {

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
__device__ __forceinline__ int64_t* ctrl_abort(const CommParams& c) {
  return at_offset<int64_t>(c.workspace, c.off_abort);
}

// Phase trace of one low-latency call (ops/protocol.py TRACE_*): mark(point) stamps %globaltimer into
// ctrl.trace[epoch % kTraceCalls][point] when ctrl.trace_on is set, else does nothing (one
// predicated branch). Built by the one thread that stamps.
struct Tracer {
  int64_t* row;  // nullptr: tracing off
  __device__ __forceinline__ void mark(int point) const {
    if (row != nullptr) row[point] = static_cast<int64_t>(globaltimer_ns());
  }
  // A stamp taken earlier (a kernel's start, before the tracer could be built).
  __device__ __forceinline__ void mark_at(int point, uint64_t ns) const {
    if (row != nullptr) row[point] = static_cast<int64_t>(ns);
  }
};

// ctrl.trace_on, loaded at a kernel's start and used later (make_tracer): nothing on the call's
// path waits for this load.
__device__ __forceinline__ int64_t load_trace_on(const CommParams& c) {
  return ld_volatile_i64(at_offset<const int64_t>(c.workspace, c.off_trace_on));
}

__device__ __forceinline__ Tracer make_tracer(const CommParams& c, int64_t epoch,
                                              int64_t trace_on) {
  if (trace_on == 0) return Tracer{nullptr};
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

// Low-latency counts: ll_counts[parity][source][0, E] (int64, tagged: tag_count), inside the
// workspace at base. Entry E is the source's grid size of that call.
__device__ __forceinline__ int64_t* ll_counts_at(uint8_t* base, int64_t epoch, int source,
                                                 const CommParams& c) {
  const int64_t parity = epoch & 1;
  return at_offset<int64_t>(base, c.off_ll_counts) +
         (parity * c.world_size + source) * (static_cast<int64_t>(c.num_experts) + 1);
}

// A count stored with its call's epoch as a tag (high 32 bits): one 8-byte store is both the
// value and its flag, so readers need no separate flag and writers no fence before it.
__device__ __forceinline__ int64_t tag_count(int64_t epoch, int64_t count) {
  return static_cast<int64_t>((static_cast<uint64_t>(epoch) << 32) |
                              static_cast<uint32_t>(count));
}
__device__ __forceinline__ bool has_tag(int64_t tagged, int64_t epoch) {
  return static_cast<uint32_t>(static_cast<uint64_t>(tagged) >> 32) ==
         static_cast<uint32_t>(epoch);
}
// The count a tagged value carries (its low 32 bits).
__device__ __forceinline__ int64_t tagged_count(int64_t tagged) {
  return static_cast<int64_t>(static_cast<uint32_t>(tagged));
}

}  // namespace swiftep
