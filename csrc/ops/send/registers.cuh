// The throughput data kernel's send through registers (an A/B variant: -DSWIFTEP_DISPATCH_REG=1
// builds it; the staged send of staged.cuh stays the default until the variant is measured).
//
// Why: the staged send is bound by the SM's shared-memory path (ncu: L1/TEX 98%, DRAM 8%,
// docs/perf-notes.md): each row is written into shared memory once by its bulk load and read
// K times by its K bulk stores. Here each lane loads its 16-byte vectors of the row into
// registers (kRegUnroll at once) and stores each to every destination row with plain 16-byte
// stores: no shared memory at all, the register-load combine's recipe (kernel_ldg.cuh), which
// moved that kernel from the same kind of bound to the copy ceiling.
//
// Whole tokens only (units.per_token == 1, the large calls: each warp a token at a time), no
// quantization, x and its rows 16-byte aligned: the data kernel checks. The destinations' rows
// are complete when the kernel's completion fences run (plain stores: every thread's
// system-scope fence before its block counts itself done orders them, as for the metadata).
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "ops/send/units.cuh"
#include "swiftep/params.h"

namespace swiftep {

#ifndef SWIFTEP_DISPATCH_REG
#define SWIFTEP_DISPATCH_REG 0
#endif
constexpr bool kDispatchReg = SWIFTEP_DISPATCH_REG != 0;
// 16-byte vectors a lane holds at once (registers: 4 per vector).
constexpr int kRegUnroll = 4;

template <typename IdxT>
__device__ void send_tokens_reg(const DispatchParams& p, const SendWindow& win,
                                const SendUnits& units, const int32_t* rows) {
  const CommParams& c = p.comm;
  const int lane = lane_id();
  const int64_t vecs = p.x_row_bytes / 16;
  const uint4* x = static_cast<const uint4*>(p.x);
  for (int64_t u = units.first; u < units.end; u += units.step) {
    const int64_t n = units.token(u);
    const PairDest mine = unit_dest<IdxT>(p, units, u, lane, rows, 0);
    send_metadata(p, win, n, mine);
    const uint8_t* my_target = row_address(c, win, mine, p.out_row_bytes);
    const uint4* src = x + n * vecs;
    for (int64_t v0 = lane; v0 < vecs; v0 += kWarpSize * kRegUnroll) {
      uint4 r[kRegUnroll];
#pragma unroll
      for (int i = 0; i < kRegUnroll; ++i) {  // every load first, then the stores
        const int64_t v = v0 + i * kWarpSize;
        r[i] = v < vecs ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
      }
      for (int k = 0; k < p.num_topk; ++k) {
        uint4* target = reinterpret_cast<uint4*>(
            __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(my_target), k));
        if (target == nullptr) continue;  // warp-uniform: slot k sends nothing
#pragma unroll
        for (int i = 0; i < kRegUnroll; ++i) {
          const int64_t v = v0 + i * kWarpSize;
          if (v < vecs) target[v] = r[i];
        }
      }
    }
  }
}

}  // namespace swiftep
