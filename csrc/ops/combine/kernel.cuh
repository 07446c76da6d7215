// Both combines (throughput and low latency): one pull-combine kernel over either path's combine
// window (CombineWindow). Launched by launcher.cu beside it; the staging copy that fills a
// window from expert_out is copy_rows.cuh.
//
// Block 0 releases combine_flags[rank] = epoch into every peer: stream order guarantees the
// kernels that filled this rank's combine window (experts, or the staging copy) have finished.
// Every block then waits (bounded) for every owner's flag, and each warp takes (token, hidden
// chunk) items: lane 0 bulk-loads the chunk of the token's K rows from the owners' combine
// windows into a shared stage; the warp reduces them in float32 with the top-k weights and
// writes y in expert_out's dtype. A token with no valid row gets zeros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "device/common.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Tuning knobs, overridable at build time (SWIFTEP_NVCC_FLAGS="-DSWIFTEP_COMBINE_WARPS=4 ...")
// so variants can be measured side by side; docs/perf-notes.md records what was measured.
#ifndef SWIFTEP_COMBINE_WARPS
#define SWIFTEP_COMBINE_WARPS 8
#endif
#ifndef SWIFTEP_COMBINE_STAGES
#define SWIFTEP_COMBINE_STAGES 2
#endif
#ifndef SWIFTEP_COMBINE_MAX_CHUNK
#define SWIFTEP_COMBINE_MAX_CHUNK 4096
#endif

// Warps of a combine block; each has kCombineStages stages of K chunks in shared memory.
constexpr int kCombineWarps = SWIFTEP_COMBINE_WARPS;
constexpr int kCombineThreads = kCombineWarps * kWarpSize;
// Stages per warp: the loads of the next items overlap the reduction of the current one.
constexpr int kCombineStages = SWIFTEP_COMBINE_STAGES;
// Cap of one row chunk (bytes of one bulk load); shrunk further to fit shared memory.
constexpr int64_t kMaxCombineChunkBytes = SWIFTEP_COMBINE_MAX_CHUNK;
// Smallest chunk a small call cuts rows into: one 16-byte vector per lane.
constexpr int64_t kMinCombineChunkBytes = 16 * 32;
// 16-byte vectors one lane reduces per item at most: the launcher never picks a chunk above
// kMaxCombineChunkBytes (even_chunk_bytes rounds down to it), so the accumulators fit.
constexpr int kMaxCombineVecsPerLane = static_cast<int>(kMaxCombineChunkBytes / 16 / 32);
static_assert(kMaxCombineChunkBytes % (16 * 32) == 0, "chunk cap: whole vectors per lane");

// The path a combine kernel serves.
struct CombineWindow {
  int64_t off_x;        // combine window region (throughput or low latency)
  int64_t off_flags;    // combine_flags or ll_combine_flags
  int32_t epoch_slot;   // kEpochThroughput or kEpochLowLatency
  int32_t wait_what;    // kWaitCombine or kWaitLlCombine
  int64_t window_rows;  // rows of the window: a token_rows entry past it is ignored
};

// How one combine call splits its rows (chosen by the launcher).
struct CombineShape {
  int64_t chunk_bytes;  // row chunk of one item (staged path)
  bool use_tma;         // window pitch and y are 16-byte aligned: the staged path
};

// ------------------------------------------------------------------ element conversions
template <typename T>
struct ElemOps;

template <>
struct ElemOps<__nv_bfloat16> {
  __device__ static float load_cg(const __nv_bfloat16* p) {
    return __bfloat162float(__ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p))));
  }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static float2 pair_to_float2(uint32_t bits) {
    __nv_bfloat162 h;
    memcpy(&h, &bits, sizeof(bits));
    return __bfloat1622float2(h);
  }
  __device__ static uint32_t float2_to_pair(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    uint32_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
};

template <>
struct ElemOps<__half> {
  __device__ static float load_cg(const __half* p) {
    return __half2float(__ushort_as_half(__ldcg(reinterpret_cast<const unsigned short*>(p))));
  }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static float2 pair_to_float2(uint32_t bits) {
    __half2 h;
    memcpy(&h, &bits, sizeof(bits));
    return __half22float2(h);
  }
  __device__ static uint32_t float2_to_pair(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    uint32_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
};

template <>
struct ElemOps<float> {
  __device__ static float load_cg(const float* p) { return __ldcg(p); }
  __device__ static float from_float(float v) { return v; }
};

// acc[0, 16 / sizeof(T)) += w * (the 16 bytes in raw, as T).
template <typename T>
__device__ __forceinline__ void accumulate_vec16(float* acc, uint4 raw, float w) {
  if constexpr (sizeof(T) == 4) {
    acc[0] += w * __uint_as_float(raw.x);
    acc[1] += w * __uint_as_float(raw.y);
    acc[2] += w * __uint_as_float(raw.z);
    acc[3] += w * __uint_as_float(raw.w);
  } else {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = ElemOps<T>::pair_to_float2(words[i]);
      acc[2 * i] += w * f.x;
      acc[2 * i + 1] += w * f.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack_vec16(const float* acc) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]),
                      __float_as_uint(acc[3]));
  } else {
    return make_uint4(ElemOps<T>::float2_to_pair(acc[0], acc[1]),
                      ElemOps<T>::float2_to_pair(acc[2], acc[3]),
                      ElemOps<T>::float2_to_pair(acc[4], acc[5]),
                      ElemOps<T>::float2_to_pair(acc[6], acc[7]));
  }
}

// ------------------------------------------------------------------------- item sources
// Whether lane k of token n (slot k) has a source row, and which: the owner's rank and the row.
// The one place of the rules (every owner's flag seen, k < K, the row inside the window, a
// valid expert) for both sources: the owner's combine window (combine_source) and a table of
// the owners' rows (combine_table_source, kernel_ldg.cuh).
template <typename IdxT>
__device__ __forceinline__ bool combine_slot(const CombineParams& p, const CombineWindow& win,
                                             int64_t n, int k, bool peers_ready, int* owner,
                                             int32_t* row) {
  if (!peers_ready || k >= p.num_topk) return false;
  *row = p.token_rows[n * p.num_topk + k];
  const int64_t e = load_index<IdxT>(p.topk_idx, n * p.num_topk + k);
  if (*row < 0 || *row >= win.window_rows || !is_expert(e, p.comm.num_experts)) return false;
  *owner = static_cast<int>(e / p.comm.num_local_experts);
  return true;
}

// Lane k's source row of token n (slot k) in its owner's combine window, or nullptr.
template <typename IdxT>
__device__ __forceinline__ const uint8_t* combine_source(const CombineParams& p,
                                                         const CombineWindow& win, int64_t n,
                                                         int k, bool peers_ready) {
  int peer = 0;
  int32_t row = 0;
  if (!combine_slot<IdxT>(p, win, n, k, peers_ready, &peer, &row)) return nullptr;
  return at_offset<uint8_t>(peer_base(p.comm, peer), win.off_x) + row * p.out_row_bytes;
}

// --------------------------------------------------------------------------- the kernel
// One function on purpose (longer than the project's ~80 lines): split into plain/staged helpers
// it compiled to a different schedule and measured 1.5-2% slower on the H200 at every
// throughput point (same registers), so the kernel stays as it was measured
// (docs/perf-notes.md, "Structure change").
template <typename T, typename IdxT>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const __grid_constant__ CombineParams p, CombineWindow win,
                   int64_t chunk_bytes, bool use_tma) {
  __shared__ __align__(8) uint64_t bars[kCombineWarps][kCombineStages];
  __shared__ float weights[kCombineWarps][kMaxTopk];
  __shared__ const uint8_t* sources[kCombineWarps][kMaxTopk];
  const CommParams& c = p.comm;
  const int warp = warp_id();
  const int lane = lane_id();
  // Low-latency calls: thread 0 of block 0 stamps the phase trace (ctrl.trace_on; its load is
  // only waited for once the release is out). Past the wait below, its tracer is read back
  // from shared memory (written before that wait's barrier): kept in a register across the
  // wait, it made ptxas spill.
  const bool tracer_thread =
      blockIdx.x == 0 && threadIdx.x == 0 && win.epoch_slot == kEpochLowLatency;
  const uint64_t start_ns = globaltimer_ns();
  const int64_t trace_on = tracer_thread ? load_trace_on(c) : 0;
  const int64_t epoch = ctrl_epoch(c)[win.epoch_slot];  // the matching dispatch's epoch

  // No fence before the release: what it publishes (this rank's combine window) was written by
  // kernels that finished before this one started (stream order).
  if (blockIdx.x == 0) block_release_to_all_peers(c, win.off_flags, epoch);
  const Tracer trace = tracer_thread ? make_tracer(c, epoch, trace_on) : Tracer{nullptr};
  trace.mark_at(kTrace_combine_start, start_ns);
  trace.mark(kTrace_combine_released);
  __shared__ Tracer trace_after_wait;
  if (threadIdx.x == 0) trace_after_wait = trace;
  auto mark = [&](int point) {
    if (threadIdx.x == 0) trace_after_wait.mark(point);
  };
  const bool peers_ready =
      block_wait_all_peers(c, at_offset<int64_t>(c.workspace, win.off_flags), epoch,
                           win.wait_what);  // on timeout: no remote reads, y = 0
  mark(kTrace_combine_arrived);

  const int64_t row_bytes = p.out_row_bytes;
  const int64_t num_warps_total = static_cast<int64_t>(gridDim.x) * kCombineWarps;
  const int64_t global_warp = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;
  uint8_t* y = static_cast<uint8_t*>(p.y);

  if (!use_tma) {  // rows not 16-byte aligned: element loads straight from the owners
    const int hidden = p.hidden;
    for (int64_t n = global_warp; n < p.num_tokens; n += num_warps_total) {
      const uint8_t* src = combine_source<IdxT>(p, win, n, lane, peers_ready);
      if (lane < p.num_topk) {
        sources[warp][lane] = src;
        weights[warp][lane] = p.topk_weights[n * p.num_topk + lane];
      }
      __syncwarp();
      T* out = reinterpret_cast<T*>(y + n * row_bytes);
      for (int i = lane; i < hidden; i += kWarpSize) {
        float acc = 0.f;
        for (int k = 0; k < p.num_topk; ++k) {
          const T* row = reinterpret_cast<const T*>(sources[warp][k]);
          if (row != nullptr) acc += weights[warp][k] * ElemOps<T>::load_cg(row + i);
        }
        out[i] = ElemOps<T>::from_float(acc);
      }
      __syncwarp();  // sources/weights are rewritten by the next token
    }
    mark(kTrace_combine_end);
    return;
  }

  uint64_t* my_bars = bars[warp];
  init_warp_barriers(my_bars, kCombineStages);
  const int64_t stage_bytes = chunk_bytes * p.num_topk;
  uint8_t* stages = dynamic_smem() + warp * kCombineStages * stage_bytes;
  const int64_t chunks = ceil_div(row_bytes, chunk_bytes);
  // Items are (token, chunk). With at least as many tokens as warps, a warp takes whole tokens
  // (its i-th item: token global_warp + (i / chunks) * num_warps_total, chunk i % chunks), so a
  // token's metadata is read once. A smaller call (decode) deals the items of all tokens round
  // robin over every warp instead: one token's chunks are then reduced side by side, not one
  // after another on one warp.
  const bool by_token = p.num_tokens >= num_warps_total;
  const int64_t total_items = static_cast<int64_t>(p.num_tokens) * chunks;
  int64_t num_items = 0;
  if (by_token) {
    const int64_t num_mine =
        global_warp < p.num_tokens ? ceil_div(p.num_tokens - global_warp, num_warps_total) : 0;
    num_items = num_mine * chunks;
  } else if (global_warp < total_items) {
    num_items = ceil_div(total_items - global_warp, num_warps_total);
  }
  auto item_token = [&](int64_t item) -> int64_t {
    return by_token ? global_warp + (item / chunks) * num_warps_total
                    : (global_warp + item * num_warps_total) / chunks;
  };
  auto item_offset = [&](int64_t item) -> int64_t {
    return (by_token ? item % chunks : (global_warp + item * num_warps_total) % chunks) *
           chunk_bytes;
  };

  // By token, a token's chunks are consecutive items, so its metadata (lane k: the source row of
  // slot k) is read from global memory once per token, not once per chunk: those dependent
  // loads sat on every item's critical path. The load side runs kCombineStages items ahead of the
  // reduce side, so each keeps its own copy.
  int64_t load_token = -1;
  const uint8_t* load_src = nullptr;
  uint32_t load_valid = 0;

  // Whole warp (shuffles); lane 0 issues the bulk loads of item's valid rows on its stage.
  auto issue_loads = [&](int64_t item) {
    const int stage = static_cast<int>(item % kCombineStages);
    const int64_t n = item_token(item);
    const int64_t offset = item_offset(item);
    const uint32_t bytes = static_cast<uint32_t>(min(chunk_bytes, row_bytes - offset));
    if (n != load_token) {  // warp-uniform
      load_token = n;
      load_src = combine_source<IdxT>(p, win, n, lane, peers_ready);
      load_valid = __ballot_sync(kFullMask, load_src != nullptr);
    }
    uint8_t* stage_base = stages + stage * stage_bytes;
    if (lane == 0) mbarrier_arrive_expect_tx(my_bars + stage, __popc(load_valid) * bytes);
    for (int k = 0; k < p.num_topk; ++k) {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(load_src), k));
      if (lane == 0 && src != nullptr)
        tma_load_1d(stage_base + k * chunk_bytes, src + offset, bytes, my_bars + stage);
    }
  };

  for (int64_t item = 0; item < num_items && item < kCombineStages; ++item) issue_loads(item);
  constexpr int kElemsPerVec = 16 / sizeof(T);
  int64_t token = -1;  // the reduce side's token and its valid slots
  uint32_t valid = 0;
  for (int64_t item = 0; item < num_items; ++item) {
    const int stage = static_cast<int>(item % kCombineStages);
    const uint32_t parity = static_cast<uint32_t>((item / kCombineStages) & 1);
    const int64_t n = item_token(item);
    const int64_t offset = item_offset(item);
    const int64_t bytes = min(chunk_bytes, row_bytes - offset);
    if (n != token) {  // warp-uniform; the previous item's trailing __syncwarp freed weights
      token = n;
      valid = __ballot_sync(kFullMask,
                            combine_source<IdxT>(p, win, n, lane, peers_ready) != nullptr);
      if (lane < p.num_topk) weights[warp][lane] = p.topk_weights[n * p.num_topk + lane];
    }
    mbarrier_wait_parity(my_bars + stage, parity);  // every lane: the TMA bytes are visible
    __syncwarp();                                   // and so are the weights
    const uint8_t* stage_base = stages + stage * stage_bytes;
    uint4* out = reinterpret_cast<uint4*>(y + n * row_bytes + offset);
    // Slots outer, the lane's vectors inner, accumulators in registers: one weight load and one
    // base address per slot, and no per-vector branch on the slot's validity (the combine was
    // issue-bound on exactly that bookkeeping; docs/perf-notes.md, v3).
    const int num_vecs = static_cast<int>(bytes / 16);
    float acc[kMaxCombineVecsPerLane][kElemsPerVec];
#pragma unroll
    for (int i = 0; i < kMaxCombineVecsPerLane; ++i) {
#pragma unroll
      for (int e = 0; e < kElemsPerVec; ++e) acc[i][e] = 0.f;
    }
    for (uint32_t rest = valid; rest != 0; rest &= rest - 1) {  // warp-uniform: valid slots
      const int k = __ffs(rest) - 1;
      const float w = weights[warp][k];
      const uint4* src = reinterpret_cast<const uint4*>(stage_base + k * chunk_bytes);
#pragma unroll
      for (int i = 0; i < kMaxCombineVecsPerLane; ++i) {
        const int v = lane + i * kWarpSize;
        if (v < num_vecs) accumulate_vec16<T>(acc[i], src[v], w);
      }
    }
#pragma unroll
    for (int i = 0; i < kMaxCombineVecsPerLane; ++i) {
      const int v = lane + i * kWarpSize;
      if (v < num_vecs) out[v] = pack_vec16<T>(acc[i]);
    }
    __syncwarp();  // every lane is done with this stage (and the weights) before the refill
    if (item + kCombineStages < num_items) issue_loads(item + kCombineStages);
  }
  mark(kTrace_combine_end);
}

}  // namespace swiftep
