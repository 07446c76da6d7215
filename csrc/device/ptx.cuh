// Device internals: one __forceinline__ wrapper per PTX instruction, named after it. No torch.
//
// Memory-ordering vocabulary used across the kernels:
// - Flags (epochs) are published with st_release_sys_i64 after the data they guard, and read
//   with ld_acquire_sys_i64; both at system scope because peers are other GPUs (or other
//   processes time-sharing this GPU) reading over NVLink / the same HBM.
// - Bulk copies (cp.async.bulk, "TMA") run in the async proxy. Their completion is observed
//   through an mbarrier (loads) or a bulk group wait (stores); fence_proxy_async orders them
//   against ordinary (generic proxy) accesses of the same thread.
#pragma once

#include <cstdint>

namespace swiftep {

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ------------------------------------------------------------------------------- mbarrier
// Initialise an mbarrier in shared memory with the number of arrivals that completes a phase.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrive_count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(arrive_count)
               : "memory");
}

// Makes mbarrier.init visible to the async proxy (TMA completes transactions on it).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Arrive once and announce `bytes` of transactions the phase must also wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// True once the phase with the given parity has completed (acquire at CTA scope by default:
// the bytes the TMA wrote into shared memory are visible to this thread afterwards).
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "  selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Local TMA completion needs no bound: a bulk load either completes or faults the kernel.
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait_parity(bar, parity)) {
  }
}

// ------------------------------------------------------------------------ bulk copies (TMA)
// global -> shared, completion counted in bytes on `bar`. src, dst, bytes: 16-byte multiples.
__device__ __forceinline__ void tma_load_1d(void* smem_dst, const void* gmem_src, uint32_t bytes,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(smem_dst)),
      "l"(gmem_src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// shared -> global (own or a peer's memory), tracked by the bulk group of the issuing thread.
__device__ __forceinline__ void tma_store_1d(void* gmem_dst, const void* smem_src,
                                             uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem_dst),
               "r"(smem_addr(smem_src)), "r"(bytes)
               : "memory");
}

// Closes the current bulk group of this thread (all tma_store_1d issued since the last commit).
__device__ __forceinline__ void bulk_commit_group() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Waits until at most N bulk groups of this thread are pending (their writes are complete).
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// Waits until at most N bulk groups still have to READ their shared-memory source: after it,
// the source buffers of the older groups may be overwritten (writes may still be in flight).
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Orders this thread's generic-proxy accesses of shared memory against later async-proxy
// (bulk copy) accesses of it, e.g. ordinary stores into smem followed by a bulk store of it.
__device__ __forceinline__ void fence_proxy_async_shared_cta() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Same, for all state spaces: used after bulk stores complete, before the flag release, so the
// async-proxy writes are ordered before the generic-proxy fence/release that publishes them.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async;" ::: "memory");
}

// ---------------------------------------------------------------- flags and plain accesses
// Acquire at system scope: data written by the peer before its release is visible afterwards.
__device__ __forceinline__ int64_t ld_acquire_sys_i64(const int64_t* ptr) {
  int64_t value;
  asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

// Release at system scope: every write this thread performed (or observed, cumulatively)
// before it is visible to a peer that acquires the new value.
__device__ __forceinline__ void st_release_sys_i64(int64_t* ptr, int64_t value) {
  asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Volatile loads bypass the (non-coherent) L1: used for control data peers write into this
// rank's workspace (counts), read after an acquire of the guarding flag.
__device__ __forceinline__ int32_t ld_volatile_i32(const int32_t* ptr) {
  int32_t value;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

__device__ __forceinline__ int64_t ld_volatile_i64(const int64_t* ptr) {
  int64_t value;
  asm volatile("ld.volatile.global.s64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

// A relaxed (volatile) 8-byte store, single-copy atomic: a tagged count (tag_count) a peer polls.
__device__ __forceinline__ void st_volatile_i64(int64_t* ptr, int64_t value) {
  asm volatile("st.volatile.global.s64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// *ptr += value, a release at system scope: what this thread (and, through a block barrier
// before it, its block) wrote is visible to whoever acquires the new sum.
__device__ __forceinline__ void red_release_sys_add_i64(int64_t* ptr, int64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Nanoseconds of the GPU's global timer: the clock of every bounded wait.
__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

}  // namespace swiftep
