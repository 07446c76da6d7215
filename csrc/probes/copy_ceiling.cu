// The copy ceiling the benchmarks quote their figures against: the library's own bulk copy
// (copy_rows_tma_kernel, ops/combine/copy_rows.cuh: one thread per SM drives a ring of TMA
// copies global -> shared -> global) on a large device-to-device copy, at each block count given.
// Torch-free; built by torch_swiftep/bench/copy_ceiling.py with nvcc:
//
//   copy_ceiling BYTES BLOCKS...   ->   one line per block count: "BLOCKS PAYLOAD_GBPS"
//
// Payload GB/s = bytes copied per second (read + write traffic is twice that).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ops/combine/copy_rows.cuh"

namespace {

bool ok(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  std::fprintf(stderr, "copy_ceiling: %s: %s\n", what, cudaGetErrorString(err));
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: copy_ceiling BYTES BLOCKS...\n");
    return 2;
  }
  const int64_t row_bytes = swiftep::kCopyChunkBytes;
  const int64_t rows = std::atoll(argv[1]) / row_bytes;
  const int64_t bytes = rows * row_bytes;
  uint8_t *src = nullptr, *dst = nullptr;
  int32_t* counts = nullptr;
  const int32_t rows32 = static_cast<int32_t>(rows);
  if (!ok(cudaMalloc(&src, bytes), "cudaMalloc") || !ok(cudaMalloc(&dst, bytes), "cudaMalloc") ||
      !ok(cudaMalloc(&counts, sizeof(int32_t)), "cudaMalloc") ||
      !ok(cudaMemset(src, 1, bytes), "cudaMemset") ||
      !ok(cudaMemcpy(counts, &rows32, sizeof(rows32), cudaMemcpyHostToDevice), "cudaMemcpy"))
    return 1;
  const int smem = static_cast<int>(swiftep::kCopyStages * swiftep::kCopyChunkBytes);
  if (!ok(cudaFuncSetAttribute(swiftep::copy_rows_tma_kernel,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
          "cudaFuncSetAttribute"))
    return 1;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int a = 2; a < argc; ++a) {
    const int blocks = std::atoi(argv[a]);
    swiftep::CopyRowsParams p{};
    p.dst = dst;
    p.src = src;
    p.row_bytes = row_bytes;
    p.group_rows = rows;
    p.num_groups = 1;
    p.counts = counts;
    p.num_sms = blocks;
    auto launch = [&] {
      swiftep::copy_rows_tma_kernel<<<blocks, swiftep::kCopyTmaThreads, smem>>>(p);
    };
    launch();  // warm-up
    if (!ok(cudaGetLastError(), "launch") || !ok(cudaDeviceSynchronize(), "warm-up copy")) return 1;
    constexpr int kReps = 5;
    cudaEventRecord(start);
    for (int r = 0; r < kReps; ++r) launch();
    cudaEventRecord(stop);
    if (!ok(cudaEventSynchronize(stop), "copy")) return 1;
    float ms = 0.f;
    cudaEventElapsedTime(&ms, start, stop);
    std::printf("%d %.1f\n", blocks, static_cast<double>(bytes) * kReps / (ms * 1e-3) / 1e9);
  }
  return 0;
}
