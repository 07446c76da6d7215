// The scale-out transport, host interface: the plain parameter structs and the launchers of the
// cross-node hop of the hierarchical throughput dispatch (docs/design.md, "Scale-out"). Raw
// pointers, no torch and no NVSHMEM headers (transport.cuh holds the device code).
//
// The hop: rank r of node n sends one row per (token, destination node) to its peer on each
// other node (the rank with r's local index there), which forwards it over NVLink. Here that is
// generic: destination d (a PE) gets items [dest_offsets[d], dest_offsets[d + 1]); item i copies
// row src_rows[i] of the local `src` into row dst_rows[i] of the symmetric `dst` on that PE.
// Each destination is served by `channels` blocks (several NVSHMEM queues per peer, so one slow
// queue does not serialize a node's traffic); each block, after its rows, sets ONE signal on the
// destination PE: signals[my_pe * channels + channel] = epoch. The receiver waits (bounded) until
// every (source PE, channel) signal it expects has reached the epoch.
//
// Status record (int64[kStatusWords] in device memory, zeroed by the caller before the call; the
// first error of the call wins): {code, arg0, arg1, arg2} with the codes of protocol.h:
//   kStatusTimeout  {source PE waited for, channel, epoch}
//   kStatusBadIndex {item, 0 = source row / 1 = destination row / 2 = destination PE, value}
// (The cross-node signal is not yet a wait name of ops/protocol.py: that comes with the op.)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace swiftep {
namespace nvshmem {

// put_rows: every block is one (destination, channel); grid = num_dests * channels.
struct RowPutParams {
  const uint8_t* src;           // local rows; symmetric, or register_local'd for remote transports
  int64_t src_rows_total;       // rows of src (bounds src_rows)
  uint8_t* dst;                 // symmetric receive buffer (this PE's address of it)
  int64_t dst_rows_total;       // rows of dst on every PE (bounds dst_rows)
  int64_t row_bytes;            // bytes per row of both, > 0 and a multiple of 16
  const int32_t* src_rows;      // [num_items] device
  const int32_t* dst_rows;      // [num_items] device
  const int32_t* dest_offsets;  // [num_dests + 1] device, non-decreasing from 0
  const int32_t* dest_pes;      // [num_dests] device: the PE of each destination
  int32_t num_dests;            // 0: nothing is launched
  int32_t channels;             // blocks per destination, >= 1
  uint64_t* signals;            // symmetric [n_pes * channels]
  uint64_t epoch;               // > 0, larger than every earlier call's on these signals
  int32_t my_pe;
  int64_t* status;              // device int64[kStatusWords]
  // Optional (nullptr: unused): the epoch is epoch + *epoch_ptr, read by the kernel, so a CUDA
  // graph that advances *epoch_ptr before each put replays with a fresh epoch (epoch may then
  // be 0).
  const uint64_t* epoch_ptr;
};

// wait_signals: one block; its threads wait for the (source, channel) pairs between them.
struct SignalWaitParams {
  uint64_t* signals;        // symmetric [n_pes * channels] (this PE's copy)
  const int32_t* src_pes;   // [num_srcs] device: the PEs that send to this one this call
  int32_t num_srcs;
  int32_t channels;
  uint64_t epoch;           // the epoch the senders set
  int32_t my_pe;
  int32_t ranks_per_node;   // names the node of a PE (pe / ranks_per_node) in a timeout
  int64_t timeout_ms;       // bound of every wait (%globaltimer), > 0
  int64_t* status;          // device int64[kStatusWords]
  const uint64_t* epoch_ptr;  // as RowPutParams::epoch_ptr
};

// Both return cudaErrorInvalidValue for parameters out of range (checked on the host, before
// anything is launched), else the launch's error. NVSHMEM must be initialized (engine.h). Plain
// launches, not nvshmemx_collective_launch: no NVSHMEM barrier or collective runs inside, and
// the one wait is the bounded poll of transport.cuh, which gives up instead of hanging.
cudaError_t launch_put_rows(const RowPutParams& p, cudaStream_t stream);
cudaError_t launch_wait_signals(const SignalWaitParams& p, cudaStream_t stream);

}  // namespace nvshmem
}  // namespace swiftep
