// Throughput dispatch, phase 2: the data kernel (phase 1, the counts kernel, is in
// counts_kernel.cuh beside it). It sends with the staged send (ops/send/staged.cuh); with
// dispatch_fanout (kFanout) a token's row goes once to each remote rank, and phase 3
// (fanout_kernel.cuh) copies it into the token's other rows there.
//
// Completion: after finish_bulk_stores, every thread fences at system scope before its block
// counts itself done; the last block releases the data flag into every peer, then waits
// (bounded) for every peer's data flag.
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "ops/send/staged.cuh"
#include "ops/send/units.cuh"
#include "swiftep/params.h"

namespace swiftep {

// How one throughput dispatch splits its data work (chosen by the launcher, launcher.cu).
struct DispatchShape {
  int64_t stage_bytes;  // one pipeline stage: a chunk of x's row (send_tokens)
  bool use_tma;         // x and its rows are 16-byte aligned: bulk copies (else warp copies)
  int per_token;        // units per token (SendUnits): 1, or num_topk for a small call
};

// num_sms blocks; shape.per_token units per token. Reads the epoch and token_rows phase 1
// left; sends; the last block releases data_flags[rank] = epoch on every peer and waits until
// every peer's rows have arrived here.
// shape is a plain value, not __grid_constant__: with it ptxas allocated 102 registers, without
// it 98 (96 with the three scalar arguments it replaces; the PTX differs only in operand order).
template <typename IdxT, bool kFanout>
__global__ void __launch_bounds__(kDispatchThreads)
    dispatch_data_kernel(const __grid_constant__ DispatchParams p,
                         const DispatchShape shape) {
  __shared__ __align__(8) uint64_t bars[kDispatchWarps][kDispatchStages];
  const CommParams& c = p.comm;
  const int64_t epoch = ctrl_epoch(c)[kEpochThroughput];  // bumped by phase 1 of this call
  const SendWindow win{c.off_recv_x, c.off_recv_scales, c.off_recv_src, c.off_recv_weights,
                       c.combine_partials ? c.off_pair_rows : -1,
                       static_cast<uint64_t>(epoch) << 32};
  init_warp_barriers(bars[warp_id()], kDispatchStages);
  const int64_t num_warps_total = static_cast<int64_t>(gridDim.x) * kDispatchWarps;
  const int64_t global_warp = static_cast<int64_t>(blockIdx.x) * kDispatchWarps + warp_id();
  uint8_t* stages = dynamic_smem() + warp_id() * kDispatchStages * shape.stage_bytes;
  const SendUnits units{global_warp, num_warps_total,
                        static_cast<int64_t>(p.num_tokens) * shape.per_token, shape.per_token, 1,
                        shape.per_token != 1};
  send_tokens<IdxT, kFanout>(p, win, units, p.token_rows, 0, stages, bars[warp_id()],
                             shape.stage_bytes, shape.use_tma, Tracer{nullptr});
  finish_bulk_stores();
  if (!block_done_is_last(c, kDoneDispatchData)) return;
  block_release_to_all_peers(c, c.off_data_flags, epoch);
  block_wait_all_peers(c, at_offset<int64_t>(c.workspace, c.off_data_flags), epoch, kWaitData);
}

}  // namespace swiftep
