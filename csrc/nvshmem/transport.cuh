// The scale-out transport, device side: the put kernel of the cross-node hop and the bounded
// signal wait of its receiver (parameters and protocol in transport.h). NVSHMEM device calls
// only; compiled with -rdc=true and device-linked against libnvshmem_device.a. No torch.
//
// Ordering, per (block, destination): every warp issues its rows with
// nvshmemx_putmem_nbi_warp; after a block barrier, thread 0 calls nvshmem_fence (its default
// covers every queue of this PE, and its __threadfence_system, after the barrier, the stores the
// block's threads made over NVLink/P2P: NVSHMEM's own block put-with-signal orders its signal the
// same way), sets the signal (nvshmemx_signal_op, NVSHMEM_SIGNAL_SET to the epoch) and calls
// nvshmem_quiet, so the rows have left `src` when the kernel ends. A receiver that sees the
// signal at the epoch may read the rows.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>
#include <cstdio>

#include "device/ptx.cuh"
#include "nvshmem/transport.h"
#include "swiftep/protocol.h"

namespace swiftep {
namespace nvshmem {

constexpr int kThreadsPerWarp = 32;
// Warps per put block: each warp issues its own puts (one network write per row over IBGDA), so
// a channel keeps several rows in flight.
constexpr int kPutWarps = 8;
constexpr int kPutThreads = kPutWarps * kThreadsPerWarp;
// Threads of the wait kernel: each waits for (source, channel) pairs in turn.
constexpr int kWaitThreads = 128;
// A bounded wait looks at the clock and the call's status once per this many polls (as
// csrc/device/wait.cuh does): the signal load stays the only load in the hot loop.
constexpr int kSignalPollsPerCheck = 16;
constexpr uint64_t kNanosPerMs = 1000000;
// Second argument of a kStatusBadIndex record: which index was out of range.
constexpr int64_t kBadSourceRow = 0;
constexpr int64_t kBadDestinationRow = 1;
constexpr int64_t kBadPe = 2;

// Records {code, a0, a1, a2} unless an earlier error of this call holds the record.
__device__ __forceinline__ void report_first(int64_t* status, int64_t code, int64_t a0,
                                             int64_t a1, int64_t a2) {
  const unsigned long long previous =
      atomicCAS(reinterpret_cast<unsigned long long*>(status), 0ull,
                static_cast<unsigned long long>(code));
  if (previous != 0ull) return;
  volatile int64_t* record = status;
  record[1] = a0;
  record[2] = a1;
  record[3] = a2;
  __threadfence_system();
}

// -------------------------------------------------------------------------------- sending

// Rows of one (destination, channel): items channel, channel + channels, ... of the
// destination's range, taken in turn by the block's warps. Every branch is warp-uniform, as the
// warp-collective put requires.
// The call's epoch: RowPutParams / SignalWaitParams::epoch plus *epoch_ptr when given.
template <typename Params>
__device__ __forceinline__ uint64_t call_epoch(const Params& p) {
  return p.epoch + (p.epoch_ptr != nullptr ? *p.epoch_ptr : 0);
}

__global__ void __launch_bounds__(kPutThreads) put_rows_kernel(const RowPutParams p) {
  const int dest = static_cast<int>(blockIdx.x) / p.channels;
  const int channel = static_cast<int>(blockIdx.x) % p.channels;
  const int pe = p.dest_pes[dest];
  if (pe < 0 || pe >= nvshmem_n_pes()) {  // block-uniform: no puts, no signal
    if (threadIdx.x == 0) report_first(p.status, kStatusBadIndex, dest, kBadPe, pe);
    return;
  }
  const int64_t end = p.dest_offsets[dest + 1];
  const int warp = static_cast<int>(threadIdx.x) / kThreadsPerWarp;
  const bool lane0 = threadIdx.x % kThreadsPerWarp == 0;
  const int64_t stride = static_cast<int64_t>(p.channels) * kPutWarps;
  for (int64_t item = p.dest_offsets[dest] + channel + static_cast<int64_t>(warp) * p.channels;
       item < end; item += stride) {
    const int64_t src_row = p.src_rows[item];
    const int64_t dst_row = p.dst_rows[item];
    if (src_row < 0 || src_row >= p.src_rows_total) {
      if (lane0) report_first(p.status, kStatusBadIndex, item, kBadSourceRow, src_row);
      continue;
    }
    if (dst_row < 0 || dst_row >= p.dst_rows_total) {
      if (lane0) report_first(p.status, kStatusBadIndex, item, kBadDestinationRow, dst_row);
      continue;
    }
    nvshmemx_putmem_nbi_warp(p.dst + dst_row * p.row_bytes, p.src + src_row * p.row_bytes,
                             static_cast<size_t>(p.row_bytes), pe);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t* signal = p.signals + static_cast<int64_t>(p.my_pe) * p.channels + channel;
    nvshmem_fence();
    nvshmemx_signal_op(signal, call_epoch(p), NVSHMEM_SIGNAL_SET, pe);
    nvshmem_quiet();
  }
}

// -------------------------------------------------------------------------------- receiving

// Records TIMEOUT {source PE, channel, epoch} (first error of the call) and prints one line
// naming the PE and node waited for. Out of line: it carries the printf.
static __device__ __noinline__ void report_signal_timeout(const SignalWaitParams& p, int src_pe,
                                                          int channel, uint64_t seen) {
  report_first(p.status, kStatusTimeout, src_pe, channel, static_cast<int64_t>(p.epoch));
  printf("swiftep: PE %d (node %d) timed out after %lld ms waiting for PE %d (node %d), "
         "channel %d: wanted signal >= %llu, saw %llu\n",
         p.my_pe, p.my_pe / p.ranks_per_node, static_cast<long long>(p.timeout_ms), src_pe,
         src_pe / p.ranks_per_node, channel, static_cast<unsigned long long>(p.epoch),
         static_cast<unsigned long long>(seen));
}

// The spinning part of wait_signal_geq, out of line: polls nvshmem_signal_fetch until the
// signal reaches the epoch (true), another wait of this call failed (false, no new record), or
// timeout_ms of %globaltimer passed (false, TIMEOUT recorded).
static __device__ __noinline__ bool wait_signal_slow(const SignalWaitParams& p, uint64_t* signal,
                                                     int src_pe, int channel) {
  const uint64_t deadline =
      globaltimer_ns() + static_cast<uint64_t>(p.timeout_ms) * kNanosPerMs;
  for (int poll = 1;; ++poll) {
    if (nvshmem_signal_fetch(signal) >= p.epoch) return true;
    if (poll % kSignalPollsPerCheck != 0) continue;
    if (ld_volatile_i64(p.status) != 0) return false;
    if (globaltimer_ns() > deadline) {
      report_signal_timeout(p, src_pe, channel, nvshmem_signal_fetch(signal));
      return false;
    }
  }
}

// Waits, bounded, until signals[src_pe * channels + channel] >= epoch. Never calls NVSHMEM's
// unbounded wait before the value is there: once it is, nvshmem_signal_wait_until returns at
// once and performs NVSHMEM's consistency step, so the rows that came before the signal are
// visible to this thread (a block barrier after the waits extends that to the block).
__device__ __forceinline__ bool wait_signal_geq(const SignalWaitParams& p, int src_pe,
                                                int channel) {
  uint64_t* signal = p.signals + static_cast<int64_t>(src_pe) * p.channels + channel;
  if (nvshmem_signal_fetch(signal) < p.epoch && !wait_signal_slow(p, signal, src_pe, channel)) {
    return false;
  }
  nvshmem_signal_wait_until(signal, NVSHMEM_CMP_GE, p.epoch);
  return true;
}

// One block: thread t waits for pairs t, t + blockDim.x, ... of (source, channel).
__global__ void __launch_bounds__(kWaitThreads) wait_signals_kernel(const SignalWaitParams params) {
  SignalWaitParams p = params;  // the waits below compare against the call's epoch
  p.epoch = call_epoch(params);
  const int pairs = p.num_srcs * p.channels;
  for (int pair = static_cast<int>(threadIdx.x); pair < pairs; pair += blockDim.x) {
    const int src = pair / p.channels;
    const int src_pe = p.src_pes[src];
    if (src_pe < 0 || src_pe >= nvshmem_n_pes()) {
      report_first(p.status, kStatusBadIndex, src, kBadPe, src_pe);
      continue;
    }
    wait_signal_geq(p, src_pe, pair % p.channels);
  }
}

}  // namespace nvshmem
}  // namespace swiftep
