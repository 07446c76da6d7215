// Device internals: status reporting and the one bounded spin-wait every cross-rank wait goes
// through.
//
// Status semantics: ctrl.status holds the first error of the current call (the first kernel of
// each dispatch resets it). The winner of the atomicCAS on the code writes the arguments, then
// mirrors the record to the host-mapped int64[4] at ctrl.host_status_ptr (when non-zero) with
// the code written last, so the host never reads a code with stale arguments.
#pragma once

#include <cstdint>
#include <cstdio>

#include "device/ctrl.cuh"
#include "device/ptx.cuh"
#include "swiftep/protocol.h"

namespace swiftep {

constexpr int64_t kNsPerMs = 1000000;
// A spin-wait looks at the call's status and the clock once per kPollsPerCheck polls: an
// acquire load orders the status load after it, so checking at every poll would put a second
// load latency between two looks at the flag.
constexpr int kPollsPerCheck = 16;

// Called by one thread at the start of a dispatch call, before any kernel of the call reports.
// No fence: the block barrier after it orders it before its block's reports, and a fence
// would not order it before another block's (which nothing in the grid waits for), while it
// kept the resetting block (in the low-latency dispatch, the one that publishes the counts)
// one memory round trip behind the others.
__device__ __forceinline__ void reset_status(const CommParams& c) {
  volatile int64_t* status = ctrl_status(c);
  for (int i = 0; i < kStatusWords; ++i) status[i] = 0;
}

__device__ __forceinline__ void report_status(const CommParams& c, int64_t code, int64_t arg0,
                                              int64_t arg1, int64_t arg2) {
  int64_t* status = ctrl_status(c);
  const unsigned long long previous = atomicCAS(reinterpret_cast<unsigned long long*>(status),
                                                0ull, static_cast<unsigned long long>(code));
  if (previous != 0ull) return;  // an earlier error of this call is kept
  volatile int64_t* dev = status;
  dev[1] = arg0;
  dev[2] = arg1;
  dev[3] = arg2;
  __threadfence();
  const int64_t host_ptr = *at_offset<volatile int64_t>(c.workspace, c.off_host_status_ptr);
  if (host_ptr != 0) {
    volatile int64_t* host = reinterpret_cast<volatile int64_t*>(host_ptr);
    host[1] = arg0;
    host[2] = arg1;
    host[3] = arg2;
    __threadfence_system();  // arguments land before the code the host polls
    host[0] = code;
    __threadfence_system();
  }
}

// Records TIMEOUT {peer, what, call epoch} (first error of the call) and prints one line with
// the value waited for and the last one seen. Out of line: it carries the printf.
static __device__ __noinline__ void report_wait_timeout(const CommParams& c, int peer,
                                                        int64_t what, int64_t epoch,
                                                        int64_t wanted, int64_t seen) {
  report_status(c, kStatusTimeout, peer, what, epoch);
  printf("swiftep: rank %d block %d thread %d timed out after %lld ms waiting for rank %d "
         "(%s, call %lld: wanted %lld, saw %lld)\n",
         c.rank, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x),
         static_cast<long long>(c.timeout_ms), peer, wait_name(what),
         static_cast<long long>(epoch), static_cast<long long>(wanted),
         static_cast<long long>(seen));
}

// Whether a spinning wait should stop without a record of its own: another wait of this call
// already timed out or gave up, or a peer announced in ctrl.abort that it failed (its host
// writes 1 + its rank into every peer's workspace when it rejects a call's inputs), which this
// wait then records as PEER_FAILED {that rank, what, epoch}. Either way the call's results are
// invalid and the host raises; without the announcement a rejected call would cost every peer
// a full timeout_s.
static __device__ __noinline__ bool should_give_up(const CommParams& c, const int64_t* status,
                                                   int64_t what, int64_t epoch) {
  const int64_t code = ld_volatile_i64(status);
  if (code == kStatusTimeout || code == kStatusPeerFailed) return true;
  const int64_t failed = ld_volatile_i64(ctrl_abort(c));
  if (failed == 0) return false;
  report_status(c, kStatusPeerFailed, failed - 1, what, epoch);
  return true;
}

// The spinning part of wait_value_geq, out of line.
static __device__ __noinline__ bool wait_value_geq_slow(const CommParams& c, const int64_t* flag,
                                                        int64_t wanted, int64_t epoch, int peer,
                                                        int64_t what) {
  const uint64_t deadline = globaltimer_ns() + static_cast<uint64_t>(c.timeout_ms) * kNsPerMs;
  const int64_t* status = ctrl_status(c);
  for (int poll = 1;; ++poll) {
    if (ld_acquire_sys_i64(flag) >= wanted) return true;
    if (poll % kPollsPerCheck != 0) continue;
    if (should_give_up(c, status, what, epoch)) return false;
    if (globaltimer_ns() > deadline) {
      report_wait_timeout(c, peer, what, epoch, wanted, ld_acquire_sys_i64(flag));
      return false;
    }
  }
}

// The spinning part of wait_tagged, out of line.
static __device__ __noinline__ int64_t wait_tagged_slow(const CommParams& c,
                                                        const int64_t* slot, int64_t epoch,
                                                        int peer, int64_t what) {
  const uint64_t deadline = globaltimer_ns() + static_cast<uint64_t>(c.timeout_ms) * kNsPerMs;
  const int64_t* status = ctrl_status(c);
  for (int poll = 1;; ++poll) {
    const int64_t tagged = ld_volatile_i64(slot);
    if (has_tag(tagged, epoch)) return tagged_count(tagged);
    if (poll % kPollsPerCheck != 0) continue;
    if (should_give_up(c, status, what, epoch)) return -1;
    if (globaltimer_ns() > deadline) {
      report_wait_timeout(c, peer, what, epoch, epoch,
                          static_cast<int64_t>(static_cast<uint64_t>(tagged) >> 32));
      return -1;
    }
  }
}

// The count at *slot (own workspace, stored by rank `peer` with tag_count) for this epoch:
// waits (bounded, as wait_flag_geq) until the slot carries the epoch's tag. -1 on timeout.
__device__ __forceinline__ int64_t wait_tagged(const CommParams& c, const int64_t* slot,
                                               int64_t epoch, int peer, int64_t what) {
  const int64_t tagged = ld_volatile_i64(slot);
  if (has_tag(tagged, epoch)) return tagged_count(tagged);
  return wait_tagged_slow(c, slot, epoch, peer, what);
}

// Waits until *flag >= wanted (the flag lives in this rank's workspace and is released by rank
// `peer`, or added to by its blocks). Acquire loads: what the peer wrote before its release is
// visible on return true. Bounded by c.timeout_ms of %globaltimer; on expiry records TIMEOUT
// {peer, what, epoch}, prints one line and returns false. Also gives up early (false, no new
// record) when another wait of this call already timed out, so a missing rank costs one timeout,
// not one per wait, and at once when a peer announced that it failed (should_give_up).
__device__ __forceinline__ bool wait_value_geq(const CommParams& c, const int64_t* flag,
                                               int64_t wanted, int64_t epoch, int peer,
                                               int64_t what) {
  if (ld_acquire_sys_i64(flag) >= wanted) return true;
  return wait_value_geq_slow(c, flag, wanted, epoch, peer, what);
}

// Waits until the epoch flag *flag >= epoch (wait_value_geq).
__device__ __forceinline__ bool wait_flag_geq(const CommParams& c, const int64_t* flag,
                                              int64_t epoch, int peer, int64_t what) {
  return wait_value_geq(c, flag, epoch, epoch, peer, what);
}

// Threads [0, world_size) of the block each wait for one peer's flag in flags[] (own workspace,
// one int64 per source rank). Returns, to every thread of the block, whether all arrived.
// Must be called by all threads of the block.
__device__ __forceinline__ bool block_wait_all_peers(const CommParams& c, const int64_t* flags,
                                                     int64_t epoch, int64_t what) {
  bool ok = true;
  for (int peer = threadIdx.x; peer < c.world_size; peer += blockDim.x) {
    ok = wait_flag_geq(c, flags + peer, epoch, peer, what) && ok;
  }
  return __syncthreads_and(ok) != 0;
}

// Releases flags[rank] = epoch in every peer's workspace (own included). Each calling thread
// must have fenced its own prior writes; the block barrier before it makes them cumulative.
__device__ __forceinline__ void block_release_to_all_peers(const CommParams& c, int64_t off_flags,
                                                           int64_t epoch) {
  for (int peer = threadIdx.x; peer < c.world_size; peer += blockDim.x) {
    int64_t* flag = at_offset<int64_t>(peer_base(c, peer), off_flags) + c.rank;
    st_release_sys_i64(flag, epoch);
  }
}

}  // namespace swiftep
