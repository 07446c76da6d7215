// The kernel of the local dispatch_layout op: per-rank and per-expert counts of one rank's
// routing, and which ranks each token goes to.
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "swiftep/params.h"

namespace swiftep {

template <typename IdxT>
__global__ void dispatch_layout_kernel(const __grid_constant__ LayoutParams p) {
  const int num_local = p.num_experts / p.world_size;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; n < p.num_tokens;
       n += stride) {
    for (int k = 0; k < p.num_topk; ++k) {
      // Out-of-range entries are treated as "no expert" (this op has no status word).
      const int64_t e = load_index<IdxT>(p.topk_idx, n * p.num_topk + k);
      if (!is_expert(e, p.num_experts)) continue;
      atomicAdd(p.num_tokens_per_expert + e, 1);
      const int rank = static_cast<int>(e / num_local);
      bool first_for_rank = true;  // count a token once per rank even with several experts there
      for (int k2 = 0; k2 < k; ++k2) {
        const int64_t e2 = load_index<IdxT>(p.topk_idx, n * p.num_topk + k2);
        if (is_expert(e2, p.num_experts) && e2 / num_local == rank) first_for_rank = false;
      }
      if (first_for_rank) {
        atomicAdd(p.num_tokens_per_rank + rank, 1);
        p.is_token_in_rank[n * p.world_size + rank] = true;
      }
    }
  }
}

}  // namespace swiftep
