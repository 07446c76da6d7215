// Launchers of the scale-out transport (transport.h): host-side checks of the parameters, then
// the kernels of transport.cuh.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "nvshmem/transport.cuh"

namespace swiftep {
namespace nvshmem {

namespace {

// Bulk copies and NVSHMEM's 16-byte transfers want rows that keep 16-byte alignment.
constexpr int64_t kRowAlign = 16;
constexpr int64_t kMaxGridBlocks = 0x7fffffff;

bool valid_put(const RowPutParams& p) {
  const bool pointers = p.src != nullptr && p.dst != nullptr && p.src_rows != nullptr &&
                        p.dst_rows != nullptr && p.dest_offsets != nullptr &&
                        p.dest_pes != nullptr && p.signals != nullptr && p.status != nullptr;
  const bool shape = p.row_bytes > 0 && p.row_bytes % kRowAlign == 0 &&
                     p.src_rows_total >= 0 && p.dst_rows_total >= 0 && p.num_dests >= 0 &&
                     p.channels >= 1 &&
                     static_cast<int64_t>(p.num_dests) * p.channels <= kMaxGridBlocks;
  return pointers && shape && (p.epoch > 0 || p.epoch_ptr != nullptr) && p.my_pe >= 0;
}

bool valid_wait(const SignalWaitParams& p) {
  const bool pointers = p.signals != nullptr && p.status != nullptr &&
                        (p.num_srcs == 0 || p.src_pes != nullptr);
  return pointers && p.num_srcs >= 0 && p.channels >= 1 &&
         (p.epoch > 0 || p.epoch_ptr != nullptr) && p.my_pe >= 0 &&
         p.ranks_per_node >= 1 && p.timeout_ms > 0;
}

}  // namespace

cudaError_t launch_put_rows(const RowPutParams& p, cudaStream_t stream) {
  if (!valid_put(p)) return cudaErrorInvalidValue;
  if (p.num_dests == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>(static_cast<int64_t>(p.num_dests) * p.channels);
  put_rows_kernel<<<blocks, kPutThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_wait_signals(const SignalWaitParams& p, cudaStream_t stream) {
  if (!valid_wait(p)) return cudaErrorInvalidValue;
  if (p.num_srcs == 0) return cudaSuccess;
  wait_signals_kernel<<<1, kWaitThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nvshmem
}  // namespace swiftep
