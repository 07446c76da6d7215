// A host program linked against the NVSHMEM build unit the way the torch extension will link it
// (scripts/check_nvshmem_link.sh builds and runs it). Linking proves every NVSHMEM symbol
// resolves; running it checks, without a GPU, the argument checks of engine.h and the launchers,
// that a unique id comes out of the pip package's bootstrap plugin, and that init refuses (with
// a message) instead of letting NVSHMEM exit the process. With a GPU it also runs one PE through
// the transport: init, symmetric buffers, put_rows to itself over 2 channels, wait_signals,
// the rows compared, a wait for a signal that never comes (bounded: it must time out), finalize.
// Exit status 0 when every check passes.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "nvshmem/engine.h"
#include "nvshmem/transport.h"
#include "swiftep/protocol.h"

namespace sn = swiftep::nvshmem;

namespace {

int failures = 0;

void check(bool ok, const char* what, const std::string& detail = "") {
  std::printf("%s  %s%s%s\n", ok ? "ok  " : "FAIL", what, detail.empty() ? "" : ": ",
              detail.c_str());
  if (!ok) ++failures;
}

void expect_code(const sn::Status& s, sn::Code code, const char* what) {
  check(s.code == code && (code == sn::Code::kOk || !s.message.empty()), what, s.message);
}

// Everything that must behave the same with or without a GPU.
void check_without_device(std::vector<uint8_t>* id) {
  check(!sn::is_initialized() && sn::my_pe() == -1 && sn::n_pes() == -1, "not initialized");
  void* ptr = nullptr;
  expect_code(sn::malloc_symmetric(64, &ptr), sn::Code::kNotInitialized, "malloc before init");
  expect_code(sn::finalize(), sn::Code::kOk, "finalize before init is a no-op");
  const std::vector<uint8_t> zeros(sn::kUniqueIdBytes, 0);
  expect_code(sn::init(0, 0, zeros), sn::Code::kInvalidArgument, "init world 0");
  expect_code(sn::init(2, 2, zeros), sn::Code::kInvalidArgument, "init rank 2 of 2");
  expect_code(sn::init(0, 1, std::vector<uint8_t>(3)), sn::Code::kInvalidArgument,
              "init with a 3-byte id");
  expect_code(sn::init(0, 1, zeros), sn::Code::kInvalidArgument, "init with a zero id");
  expect_code(sn::unique_id_bytes(id), sn::Code::kOk, "unique id from the UID bootstrap plugin");
  check(id->size() == sn::kUniqueIdBytes, "unique id size");
  sn::RowPutParams put{};
  check(sn::launch_put_rows(put, nullptr) == cudaErrorInvalidValue, "put_rows refuses nulls");
  sn::SignalWaitParams wait{};
  check(sn::launch_wait_signals(wait, nullptr) == cudaErrorInvalidValue,
        "wait_signals refuses nulls");
  std::printf("      NVSHMEM headers %s\n", sn::header_version());
}

template <typename T>
T* device_copy(const std::vector<T>& host) {
  void* ptr = nullptr;
  if (cudaMalloc(&ptr, host.size() * sizeof(T)) != cudaSuccess) return nullptr;
  cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(ptr);
}

std::vector<int64_t> read_status(const int64_t* status) {
  std::vector<int64_t> host(swiftep::kStatusWords);
  cudaMemcpy(host.data(), status, host.size() * sizeof(int64_t), cudaMemcpyDeviceToHost);
  return host;
}

// One PE sends 6 of its 8 rows to itself, permuted, over 2 channels, then waits for its signals.
void round_trip(const std::vector<uint8_t>& id) {
  constexpr int kRows = 8, kRowBytes = 64, kChannels = 2;
  expect_code(sn::init(0, 1, id), sn::Code::kOk, "init as PE 0 of 1");
  expect_code(sn::init(0, 1, id), sn::Code::kOk, "init again: no-op");
  expect_code(sn::init(0, 2, id), sn::Code::kWorldMismatch, "init as another world");
  void *dst = nullptr, *signals = nullptr;
  expect_code(sn::malloc_symmetric(kRows * kRowBytes, &dst), sn::Code::kOk, "malloc rows");
  expect_code(sn::malloc_symmetric(kChannels * sizeof(uint64_t), &signals), sn::Code::kOk,
              "malloc signals");
  if (dst == nullptr || signals == nullptr) return;
  cudaMemset(dst, 0, kRows * kRowBytes);
  cudaMemset(signals, 0, kChannels * sizeof(uint64_t));
  std::vector<uint8_t> rows(kRows * kRowBytes);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<uint8_t>(i * 7 + 1);
  const std::vector<int32_t> src_rows{0, 1, 2, 3, 4, 5}, dst_rows{7, 6, 5, 4, 3, 2};
  uint8_t* src = device_copy(rows);
  int32_t* d_src_rows = device_copy(src_rows);
  int32_t* d_dst_rows = device_copy(dst_rows);
  int32_t* offsets = device_copy(std::vector<int32_t>{0, 6});
  int32_t* pes = device_copy(std::vector<int32_t>{0});
  int64_t* status = device_copy(std::vector<int64_t>(swiftep::kStatusWords, 0));
  expect_code(sn::register_local(src, rows.size()), sn::Code::kOk, "register the source");
  const sn::RowPutParams put{src, kRows, static_cast<uint8_t*>(dst), kRows, kRowBytes,
                             d_src_rows, d_dst_rows, offsets, pes, 1, kChannels,
                             static_cast<uint64_t*>(signals), 1, 0, status, nullptr};
  check(sn::launch_put_rows(put, nullptr) == cudaSuccess, "launch put_rows");
  sn::SignalWaitParams wait{static_cast<uint64_t*>(signals), pes, 1, kChannels, 1, 0, 1,
                            10000, status, nullptr};
  check(sn::launch_wait_signals(wait, nullptr) == cudaSuccess, "launch wait_signals");
  check(cudaDeviceSynchronize() == cudaSuccess, "kernels finished");
  check(read_status(status)[0] == 0, "no error recorded");
  std::vector<uint8_t> got(rows.size());
  cudaMemcpy(got.data(), dst, got.size(), cudaMemcpyDeviceToHost);
  bool same = true;
  for (size_t i = 0; i < src_rows.size(); ++i) {
    same = same && std::memcmp(&got[dst_rows[i] * kRowBytes], &rows[src_rows[i] * kRowBytes],
                               kRowBytes) == 0;
  }
  check(same, "rows arrived where dst_rows says");
  wait.epoch = 2;  // nobody sends epoch 2: the wait must give up within the bound
  wait.timeout_ms = 200;
  check(sn::launch_wait_signals(wait, nullptr) == cudaSuccess, "launch a wait that times out");
  check(cudaDeviceSynchronize() == cudaSuccess, "timed-out wait returned");
  const std::vector<int64_t> record = read_status(status);
  check(record[0] == swiftep::kStatusTimeout && record[1] == 0 && record[3] == 2,
        "timeout recorded {PE 0, channel, epoch 2}");
  expect_code(sn::unregister_local(src), sn::Code::kOk, "unregister the source");
  expect_code(sn::finalize(), sn::Code::kInvalidArgument, "finalize refused while allocated");
  expect_code(sn::free_symmetric(dst), sn::Code::kOk, "free rows");
  expect_code(sn::free_symmetric(signals), sn::Code::kOk, "free signals");
  expect_code(sn::free_symmetric(signals), sn::Code::kInvalidArgument, "free twice refused");
  expect_code(sn::finalize(), sn::Code::kOk, "finalize");
  for (void* p : {static_cast<void*>(src), static_cast<void*>(d_src_rows),
                  static_cast<void*>(d_dst_rows), static_cast<void*>(offsets),
                  static_cast<void*>(pes), static_cast<void*>(status)}) {
    cudaFree(p);
  }
}

}  // namespace

int main() {
  std::vector<uint8_t> id;
  check_without_device(&id);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    expect_code(sn::init(0, 1, id), sn::Code::kNoDevice, "init without a GPU refuses");
    std::printf("      no GPU: the one-PE round trip is skipped\n");
  } else if (id.size() == sn::kUniqueIdBytes) {
    round_trip(id);
  }
  std::printf("%s\n", failures == 0 ? "all checks passed" : "some checks FAILED");
  return failures == 0 ? 0 : 1;
}
