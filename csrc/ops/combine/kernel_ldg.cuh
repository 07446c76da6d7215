// The throughput combine (the default; -DSWIFTEP_COMBINE_LDG=0 builds the staged TMA combine of
// kernel.cuh for this window instead, for A/B runs): no shared-memory stages, no mbarriers, no
// TMA. Each warp takes whole tokens; each lane loads its 16-byte vectors of up to kLdgSlots
// source rows at once with vector loads straight into registers (kLdgUnroll vectors per slot
// in flight, kLdgSlots * kLdgUnroll loads per lane; reduce_rows reshapes those loads for a
// token with fewer valid slots), then reduces them in float32.
//
// Why: the TMA combine is issue-bound at ~2,000 warp instructions per (token, chunk) item while
// DRAM idles (docs/perf-notes.md): its per-item mbarrier round trip, the lane-0 bulk-load issue
// loop and two stages per warp leave little in flight per warp. Here every lane has 16 loads in
// flight and the only per-token bookkeeping is the routing metadata. Measured at 4096
// tokens/rank, 4 SMs/rank: 2.12 ms against the TMA combine's 5.11 ms (docs/perf-notes.md).
// Same contract and results as combine_kernel (the same float32 order of the slots); launched
// by launcher.cu for the throughput window when rows and pointers are 16-byte aligned.
// kFromTable (launch_combine_from_table): the rows are read where the experts wrote them, in
// each owner's own expert_out (torch's symmetric memory pool), instead of the owner's combine
// window; same flags, waits and slot rules (combine_slot). Each owner stores (segment, byte
// offset) of its expert_out in its ctrl.combine_segment before it releases its flags; after the
// flags, every block reads them once per owner and finds the owner's row 0 at
// table.bases[segment][owner] + offset. The owner's choice cannot be known on this rank's host:
// its pool picks among free segments by its own addresses.
//
// The loads are __ldg (the non-coherent path). That is sound here: a window row is written by
// kernels that finished before its owner released its combine flag, this kernel loads no row
// before it has seen every owner's flag, and no row changes until every rank's combine is done
// (the next dispatch waits for that); the read-only cache holds nothing from an earlier kernel.
// The same holds for a table row: the owner's GEMM wrote it before the owner's flag release, and
// it is not written again before the owner's next GEMM, after the next dispatch's count barrier.
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "ops/combine/kernel.cuh"
#include "swiftep/params.h"

namespace swiftep {

#ifndef SWIFTEP_COMBINE_LDG
#define SWIFTEP_COMBINE_LDG 1
#endif
#ifndef SWIFTEP_COMBINE_LDG_WARPS
#define SWIFTEP_COMBINE_LDG_WARPS 16
#endif
#ifndef SWIFTEP_COMBINE_LDG_UNROLL
#define SWIFTEP_COMBINE_LDG_UNROLL 2
#endif

constexpr bool kCombineLdg = SWIFTEP_COMBINE_LDG != 0;
// Source rows whose vectors are loaded together (a token with more valid slots takes rounds).
constexpr int kLdgSlots = 8;
// Vectors per slot and lane in flight at once (32 * kLdgUnroll vectors of the row per round).
// 2 at 16 warps measured best (docs/perf-notes.md); 4 needs more registers than 16 warps leave.
constexpr int kLdgUnroll = SWIFTEP_COMBINE_LDG_UNROLL;
// Warps of a block: a warp's loads wait on memory, so more warps per SM keep more in flight
// (8 warps: 3.50 ms, 16: 2.12 ms at the measured shape).
constexpr int kLdgWarps = SWIFTEP_COMBINE_LDG_WARPS;
constexpr int kLdgThreads = kLdgWarps * kWarpSize;

// Block-wide: row 0 of every owner's expert_out, as mapped in this process, into rows[owner]:
// in its segment, or its combine window when it published kStagedSegment (nullptr when the
// owner's flag never came, or its segment is not in the table: then the status says which
// owner, and y is invalid). After the flags: the owner stored its (segment, offset) before it
// released them.
__device__ __forceinline__ void load_owner_rows(const CommParams& c, const SegmentTable& table,
                                                int64_t win_off_x, bool peers_ready,
                                                const uint8_t** rows) {
  for (int owner = threadIdx.x; owner < c.world_size; owner += blockDim.x) {
    const uint8_t* row0 = nullptr;
    if (peers_ready) {
      const int64_t* where = at_offset<const int64_t>(peer_base(c, owner), c.off_combine_segment);
      const int64_t segment = ld_volatile_i64(where);
      const int64_t offset = ld_volatile_i64(where + 1);
      const int64_t base = segment >= 0 && segment < table.num_segments
                               ? table.bases[segment * c.world_size + owner]
                               : 0;
      if (segment == kStagedSegment) {  // the owner staged its rows into its window
        row0 = at_offset<const uint8_t>(peer_base(c, owner), win_off_x);
      } else if (base != 0) {
        row0 = reinterpret_cast<const uint8_t*>(base) + offset;
      } else if (blockIdx.x == 0) {
        report_status(c, kStatusBadSegment, owner, segment, table.num_segments);
      }
    }
    rows[owner] = row0;
  }
  __syncthreads();
}

// Lane k's source row of token n (slot k) in its owner's expert_out, whose row 0 is at
// owner_rows[owner], or nullptr: combine_source's rules (and an owner with no row 0).
template <typename IdxT>
__device__ __forceinline__ const uint8_t* combine_table_source(const CombineParams& p,
                                                               const CombineWindow& win,
                                                               const uint8_t* const* owner_rows,
                                                               int64_t n, int k,
                                                               bool peers_ready) {
  int owner = 0;
  int32_t row = 0;
  if (!combine_slot<IdxT>(p, win, n, k, peers_ready, &owner, &row)) return nullptr;
  const uint8_t* row0 = owner_rows[owner];
  return row0 == nullptr ? nullptr : row0 + row * p.out_row_bytes;
}

// out[0, vecs) = sum over the set bits k of valid, in ascending order, of weights[k] * the
// 16-byte vectors of sources[k] (float32 accumulation, written in T). Whole warp; sources and
// weights in shared memory, written before a __syncwarp. Every lane has up to kSlots * kUnroll
// vector loads in flight at once (kSlots rows at a time, kUnroll vectors of each), in rounds
// of kSlots rows when there are more. reduce_rows below picks the shape by the row count.
template <typename T, int kSlots, int kUnroll>
__device__ __forceinline__ void reduce_rows_rounds(const uint8_t* const* sources,
                                                const float* weights, uint32_t valid, uint4* out,
                                                int64_t vecs) {
  constexpr int kElemsPerVec = 16 / sizeof(T);
  const int lane = lane_id();
  for (int64_t v0 = lane; v0 < vecs; v0 += kWarpSize * kUnroll) {
    float acc[kUnroll][kElemsPerVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kElemsPerVec; ++e) acc[u][e] = 0.f;
    }
    for (uint32_t rest = valid; rest != 0;) {  // warp-uniform: rounds of kSlots slots
      int slot[kSlots];
      uint4 raw[kSlots][kUnroll];
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {  // every load of the round first ...
        slot[s] = rest != 0 ? __ffs(rest) - 1 : -1;
        rest = rest != 0 ? rest & (rest - 1) : 0;
        const uint4* row =
            slot[s] >= 0 ? reinterpret_cast<const uint4*>(sources[slot[s]]) : nullptr;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + u * kWarpSize;
          raw[s][u] = row != nullptr && v < vecs ? __ldg(row + v) : make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {  // ... then the reduction, slots in order
        if (slot[s] < 0) continue;
        const float w = weights[slot[s]];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) accumulate_vec16<T>(acc[u], raw[s][u], w);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * kWarpSize;
      if (v < vecs) out[v] = pack_vec16<T>(acc[u]);
    }
  }
}

// reduce_rows_rounds for at most kSlots rows (popc(valid) <= kSlots): one round, so no
// float32 accumulator lives across loads; the sum of each vector is formed after its loads
// and stored at once (kSlots * kUnroll * 4 registers of loads, 8 of sum). Same operations in
// the same order as reduce_rows_rounds, so the same bits.
template <typename T, int kSlots, int kUnroll>
__device__ __forceinline__ void reduce_rows_one_round(const uint8_t* const* sources,
                                                      const float* weights, uint32_t valid,
                                                      uint4* out, int64_t vecs) {
  constexpr int kElemsPerVec = 16 / sizeof(T);
  const int lane = lane_id();
  const uint4* row[kSlots];
  float w[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {  // slots in ascending order; nullptr past the last
    const int slot = valid != 0 ? __ffs(valid) - 1 : -1;
    valid = valid != 0 ? valid & (valid - 1) : 0;
    row[s] = slot >= 0 ? reinterpret_cast<const uint4*>(sources[slot]) : nullptr;
    w[s] = slot >= 0 ? weights[slot] : 0.f;
  }
  for (int64_t v0 = lane; v0 < vecs; v0 += kWarpSize * kUnroll) {
    uint4 raw[kSlots][kUnroll];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {  // every load first ...
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * kWarpSize;
        raw[s][u] = row[s] != nullptr && v < vecs ? __ldg(row[s] + v) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // ... then each vector's sum, slots in order
      float acc[kElemsPerVec];
#pragma unroll
      for (int e = 0; e < kElemsPerVec; ++e) acc[e] = 0.f;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (row[s] != nullptr) accumulate_vec16<T>(acc, raw[s][u], w[s]);
      }
      const int64_t v = v0 + u * kWarpSize;
      if (v < vecs) out[v] = pack_vec16<T>(acc);
    }
  }
}

// Build-time switch for A/B runs (scripts/combine_variants.sh): 0 reduces every item in rounds
// of the caller's fixed shape, as before v10 (docs/perf-notes.md).
#ifndef SWIFTEP_COMBINE_SHAPE_BY_ROWS
#define SWIFTEP_COMBINE_SHAPE_BY_ROWS 1
#endif

// reduce_rows_rounds' result with kLoads = kSlots * kUnroll loads per lane in flight whatever
// the item's row count: 1, 2, 4 or 8 rows x kLoads / rows vectors in one round, rounds of
// kSlots x kUnroll past 8 rows. Why: a lane's loads in flight bound these loops (v9), and an
// item with fewer rows than kSlots left the rest of its budget unused: a combine_partials pair
// (4 rows at EP2, 1.5 at EP8), its reduce (a token's owner ranks), and any combine whose call
// carries a part of each token's slots (chunks of experts, docs/pipelining.md).
template <typename T, int kSlots = kLdgSlots, int kUnroll = kLdgUnroll>
__device__ __forceinline__ void reduce_rows(const uint8_t* const* sources, const float* weights,
                                            uint32_t valid, uint4* out, int64_t vecs) {
  constexpr int kLoads = kSlots * kUnroll;
  static_assert(kLoads % 8 == 0, "reduce_rows shapes 8 rows x kLoads / 8 vectors");
  if constexpr (SWIFTEP_COMBINE_SHAPE_BY_ROWS == 0) {
    reduce_rows_rounds<T, kSlots, kUnroll>(sources, weights, valid, out, vecs);
    return;
  }
  const int rows = __popc(valid);  // warp-uniform
  if (rows <= 1) {
    reduce_rows_one_round<T, 1, kLoads>(sources, weights, valid, out, vecs);
  } else if (rows <= 2) {
    reduce_rows_one_round<T, 2, kLoads / 2>(sources, weights, valid, out, vecs);
  } else if (rows <= 4) {
    reduce_rows_one_round<T, 4, kLoads / 4>(sources, weights, valid, out, vecs);
  } else if (rows <= 8) {
    reduce_rows_one_round<T, 8, kLoads / 8>(sources, weights, valid, out, vecs);
  } else {
    reduce_rows_rounds<T, kSlots, kUnroll>(sources, weights, valid, out, vecs);
  }
}

// table: the segment table and this rank's (segment, offset) when kFromTable, unused otherwise.
template <typename T, typename IdxT, bool kFromTable>
__global__ void __launch_bounds__(kLdgThreads)
    combine_ldg_kernel(const __grid_constant__ CombineParams p, CombineWindow win,
                       SegmentTable table) {
  __shared__ float weights[kLdgWarps][kMaxTopk];
  __shared__ const uint8_t* sources[kLdgWarps][kMaxTopk];
  __shared__ const uint8_t* owner_rows[kFromTable ? kMaxTableRanks : 1];
  const CommParams& c = p.comm;
  const int warp = warp_id();
  const int lane = lane_id();
  const int64_t epoch = ctrl_epoch(c)[win.epoch_slot];  // the matching dispatch's epoch
  // This rank's window was filled by kernels that finished before this one (stream order).
  if (blockIdx.x == 0) {
    if constexpr (kFromTable) {  // where the peers find this rank's rows, before the release
      if (threadIdx.x == 0) {
        int64_t* where = at_offset<int64_t>(c.workspace, c.off_combine_segment);
        where[0] = table.segment;
        where[1] = table.offset;
      }
      __syncthreads();
    }
    block_release_to_all_peers(c, win.off_flags, epoch);
  }
  const bool peers_ready =
      block_wait_all_peers(c, at_offset<int64_t>(c.workspace, win.off_flags), epoch,
                           win.wait_what);  // on timeout: no remote reads, y = 0
  if constexpr (kFromTable) load_owner_rows(c, table, win.off_x, peers_ready, owner_rows);

  const int64_t num_warps_total = static_cast<int64_t>(gridDim.x) * kLdgWarps;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kLdgWarps + warp; n < p.num_tokens;
       n += num_warps_total) {
    const uint8_t* src = kFromTable
                             ? combine_table_source<IdxT>(p, win, owner_rows, n, lane, peers_ready)
                             : combine_source<IdxT>(p, win, n, lane, peers_ready);
    const uint32_t valid = __ballot_sync(kFullMask, src != nullptr);
    if (lane < p.num_topk) {
      sources[warp][lane] = src;
      weights[warp][lane] = p.topk_weights[n * p.num_topk + lane];
    }
    __syncwarp();
    reduce_rows<T>(sources[warp], weights[warp], valid,
                       reinterpret_cast<uint4*>(static_cast<uint8_t*>(p.y) + n * p.out_row_bytes),
                       p.out_row_bytes / 16);
    __syncwarp();  // sources/weights are rewritten by the next token
  }
}

}  // namespace swiftep
