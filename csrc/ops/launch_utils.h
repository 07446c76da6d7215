// Host helpers shared by the op launchers (csrc/ops/*/launcher.cu): per-(kernel, device)
// shared-memory limits, the one-time raise of a kernel's dynamic shared-memory attribute, the
// row chunking of the pipelines and the grid clamp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "swiftep/launchers.h"
#include "swiftep/params.h"

namespace swiftep {

// Kernels launch with at most 48 KiB of dynamic shared memory unless the attribute is raised.
struct KernelSmem {
  int64_t max_dynamic;  // opt-in limit of the device minus the kernel's static shared memory
  int64_t configured;   // largest cudaFuncAttributeMaxDynamicSharedMemorySize set so far
};

inline std::mutex& kernel_smem_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline std::map<std::pair<const void*, int>, KernelSmem>& kernel_smem_table() {
  static std::map<std::pair<const void*, int>, KernelSmem> table;
  return table;
}

// Looks up (and caches) the limits of `kernel` on the current device.
inline cudaError_t kernel_smem(const void* kernel, KernelSmem* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(kernel_smem_mutex());
  auto key = std::make_pair(kernel, device);
  auto it = kernel_smem_table().find(key);
  if (it == kernel_smem_table().end()) {
    int optin = 0;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    cudaFuncAttributes attr{};
    err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    KernelSmem info{static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes),
                    static_cast<int64_t>(attr.maxDynamicSharedSizeBytes)};
    it = kernel_smem_table().emplace(key, info).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// Raises the kernel's dynamic shared-memory limit to at least `bytes` (once per device).
inline cudaError_t ensure_dynamic_smem(const void* kernel, int64_t bytes) {
  KernelSmem info{};
  cudaError_t err = kernel_smem(kernel, &info);
  if (err != cudaSuccess) return err;
  if (bytes <= info.configured) return cudaSuccess;
  if (bytes > info.max_dynamic) return cudaErrorInvalidValue;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  int device = 0;
  cudaGetDevice(&device);
  std::lock_guard<std::mutex> lock(kernel_smem_mutex());
  KernelSmem& entry = kernel_smem_table()[std::make_pair(kernel, device)];
  if (bytes > entry.configured) entry.configured = bytes;
  return cudaSuccess;
}

// Splits a row of row_bytes into equal chunks of at most cap bytes (16-byte multiples).
// Returns the chunk size, or 0 when cap < 16. row_bytes must be a multiple of 16.
inline int64_t even_chunk_bytes(int64_t row_bytes, int64_t cap) {
  cap = cap / 16 * 16;
  if (cap < 16) return 0;
  if (row_bytes <= 0) return 16;
  const int64_t num_chunks = (row_bytes + cap - 1) / cap;
  const int64_t chunk = (row_bytes + num_chunks - 1) / num_chunks;
  return (chunk + 15) / 16 * 16;
}

// The chunk of x's row one dispatch pipeline stage holds, at most cap bytes. When the kernel
// quantizes, a chunk is a whole number of 128-channel blocks, at most 32 (one scale per lane).
inline int64_t dispatch_chunk_bytes(const DispatchParams& p, int64_t cap) {
  if (!p.quantize_fp8) return even_chunk_bytes(p.x_row_bytes, cap);
  const int64_t block_bytes = static_cast<int64_t>(kFp8Block) * dtype_bytes(p.x_dtype);
  const int64_t row_blocks = p.x_row_bytes / block_bytes;
  int64_t max_blocks = cap / block_bytes;
  if (max_blocks > 32) max_blocks = 32;
  if (max_blocks < 1 || row_blocks < 1) return 0;
  const int64_t chunks = (row_blocks + max_blocks - 1) / max_blocks;
  return (row_blocks + chunks - 1) / chunks * block_bytes;
}

inline int64_t clamp_blocks(int64_t wanted, int32_t num_sms) {
  if (wanted > num_sms) wanted = num_sms;
  return wanted < 1 ? 1 : wanted;
}

// A launcher's result: the launches' error (shared memory fitted), or the refusal of a
// configuration that does not fit (nothing launched).
inline LaunchResult launch_result(cudaError_t error) { return {error, {true, 0, 0}}; }
inline LaunchResult smem_refused(const SmemCheck& smem) { return {cudaErrorInvalidValue, smem}; }

}  // namespace swiftep
