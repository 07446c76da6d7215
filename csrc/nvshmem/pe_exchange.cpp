// Several NVSHMEM PEs through the scale-out transport: one process per PE, started by the caller
// (tests/test_nvshmem_link.py starts WORLD of them, on one GPU or one each). Every PE sends rows
// to every PE (itself and its own node included: the transport addresses PEs, not nodes) with
// put_rows over several channels, waits for its signals with wait_signals, and compares every
// row it received, and the rows nobody wrote, with what the senders' pattern says. Uneven
// traffic: PE s sends rows_between(s, d) rows to PE d, from 0 to kMaxRowsPerPair.
//
//   pe_exchange RANK WORLD RANKS_PER_NODE UID_FILE [ABSENT_PE]
//
// UID_FILE carries the NVSHMEM unique id from PE 0 to the others (PE 0 writes it, the others
// wait for it, bounded). With ABSENT_PE, that PE takes part in the collectives (allocations,
// finalize) but never sends: every other PE's wait must give up within its bound and name it
// (PE and node); the absent PE itself receives everything. Prints one line per check and
// "all checks passed"; exit status 0 when every check passes. No torch.
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "nvshmem/engine.h"
#include "nvshmem/transport.h"
#include "swiftep/protocol.h"

namespace sn = swiftep::nvshmem;

namespace {

constexpr int kSrcRows = 16;          // rows of each PE's (private, registered) source buffer
constexpr int kMaxRowsPerPair = 4;    // rows one PE sends another at most
constexpr int64_t kRowBytes = 528;    // an odd multiple of 16 bytes
constexpr int kChannels = 2;
constexpr uint64_t kEpoch = 1;
constexpr int64_t kWaitMs = 20000;    // the exchange: generous (PEs may take turns on one GPU)
constexpr int64_t kAbsentWaitMs = 1500;  // the wait that must give up
constexpr int kUidWaitSeconds = 60;

int rank = -1, failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("PE %d: %s  %s\n", rank, ok ? "ok  " : "FAIL", what.c_str());
  std::fflush(stdout);
  if (!ok) ++failures;
}

bool ok_status(const sn::Status& s, const std::string& what) {
  check(s.ok(), what + (s.ok() ? "" : ": " + s.message));
  return s.ok();
}

// Rows PE s sends PE d: 0..kMaxRowsPerPair, uneven, zero for some pairs.
int rows_between(int s, int d) { return (3 * s + 5 * d + 1) % (kMaxRowsPerPair + 1); }
// The source row of PE s's j-th row to PE d (rows may repeat).
int source_row(int d, int j) { return (3 * d + 5 * j) % kSrcRows; }
// Where the j-th row from PE s lands on its destination: the pair's block, reversed.
int destination_row(int s, int j) { return s * kMaxRowsPerPair + (kMaxRowsPerPair - 1 - j); }
uint8_t pattern(int pe, int row, int64_t byte) {
  return static_cast<uint8_t>(pe * 131 + row * 17 + byte * 7 + 1);
}

template <typename T>
T* device_copy(const std::vector<T>& host) {
  void* ptr = nullptr;
  if (host.empty() || cudaMalloc(&ptr, host.size() * sizeof(T)) != cudaSuccess) return nullptr;
  cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(ptr);
}

// PE 0 writes the id (to a temporary name, then renamed: nobody reads half a file); the
// others wait for the file, at most kUidWaitSeconds.
bool exchange_unique_id(const std::string& path, std::vector<uint8_t>* id) {
  if (rank == 0) {
    if (!ok_status(sn::unique_id_bytes(id), "unique id")) return false;
    const std::string tmp = path + ".tmp";
    std::ofstream(tmp, std::ios::binary)
        .write(reinterpret_cast<const char*>(id->data()), static_cast<std::streamsize>(id->size()));
    check(std::rename(tmp.c_str(), path.c_str()) == 0, "unique id written to " + path);
    return true;
  }
  for (int tenth = 0; tenth < kUidWaitSeconds * 10; ++tenth) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      id->assign(sn::kUniqueIdBytes, 0);
      in.read(reinterpret_cast<char*>(id->data()), static_cast<std::streamsize>(id->size()));
      if (in.gcount() == static_cast<std::streamsize>(sn::kUniqueIdBytes)) return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  check(false, "no unique id at " + path + " after " + std::to_string(kUidWaitSeconds) +
                   " s (PE 0 writes it)");
  return false;
}

struct Plan {  // this PE's sends: items grouped by destination PE
  std::vector<int32_t> src_rows, dst_rows, offsets{0}, pes;
};

Plan send_plan(int world) {
  Plan plan;
  for (int d = 0; d < world; ++d) {
    for (int j = 0; j < rows_between(rank, d); ++j) {
      plan.src_rows.push_back(source_row(d, j));
      plan.dst_rows.push_back(destination_row(rank, j));
    }
    plan.offsets.push_back(static_cast<int32_t>(plan.src_rows.size()));
    plan.pes.push_back(d);  // a destination with no rows still gets its signal
  }
  return plan;
}

// Every received row as the sender's pattern says; every other row still zero (an absent PE
// sends nothing, not even to itself).
void check_received(const uint8_t* dst, int world, int absent) {
  std::vector<uint8_t> got(static_cast<size_t>(world) * kMaxRowsPerPair * kRowBytes);
  cudaMemcpy(got.data(), dst, got.size(), cudaMemcpyDeviceToHost);
  int64_t bad_rows = 0, rows = 0;
  for (int s = 0; s < world; ++s) {
    for (int j = 0; j < kMaxRowsPerPair; ++j) {
      const bool sent = s != absent && j < rows_between(s, rank);
      const uint8_t* row = &got[static_cast<size_t>(destination_row(s, j)) * kRowBytes];
      bool same = true;
      for (int64_t b = 0; b < kRowBytes; ++b) {
        same = same && row[b] == (sent ? pattern(s, source_row(rank, j), b) : 0);
      }
      rows += sent;
      bad_rows += !same;
    }
  }
  check(bad_rows == 0, std::to_string(rows) + " rows received from " + std::to_string(world) +
                           " PEs as sent, the rest untouched (" + std::to_string(bad_rows) +
                           " wrong)");
}

int run(int world, int ranks_per_node, const std::string& uid_file, int absent) {
  std::vector<uint8_t> id;
  if (!exchange_unique_id(uid_file, &id)) return 1;
  int devices = 0;
  cudaGetDeviceCount(&devices);
  if (devices == 0) {
    check(false, "no GPU");
    return 1;
  }
  cudaSetDevice(rank % devices);
  if (!ok_status(sn::init(rank, world, id), "init as PE " + std::to_string(rank) + " of " +
                                                std::to_string(world))) {
    return 1;
  }
  void *dst = nullptr, *signals = nullptr, *fence = nullptr;
  const size_t dst_bytes = static_cast<size_t>(world) * kMaxRowsPerPair * kRowBytes;
  const size_t signal_bytes = static_cast<size_t>(world) * kChannels * sizeof(uint64_t);
  if (!ok_status(sn::malloc_symmetric(dst_bytes, &dst), "symmetric rows") ||
      !ok_status(sn::malloc_symmetric(signal_bytes, &signals), "symmetric signals")) {
    return 1;
  }
  cudaMemset(dst, 0, dst_bytes);
  cudaMemset(signals, 0, signal_bytes);
  cudaDeviceSynchronize();
  // A symmetric allocation ends with a barrier of every PE: after it, no PE can put into rows
  // or signals another PE has not zeroed yet.
  ok_status(sn::malloc_symmetric(16, &fence), "barrier (a collective allocation)");

  std::vector<uint8_t> rows(static_cast<size_t>(kSrcRows) * kRowBytes);
  for (int r = 0; r < kSrcRows; ++r) {
    for (int64_t b = 0; b < kRowBytes; ++b) rows[r * kRowBytes + b] = pattern(rank, r, b);
  }
  const Plan plan = send_plan(world);
  uint8_t* src = device_copy(rows);
  int32_t* src_rows = device_copy(plan.src_rows.empty() ? std::vector<int32_t>{0}
                                                        : plan.src_rows);
  int32_t* dst_rows = device_copy(plan.dst_rows.empty() ? std::vector<int32_t>{0}
                                                        : plan.dst_rows);
  int32_t* offsets = device_copy(plan.offsets);
  int32_t* pes = device_copy(plan.pes);
  int64_t* status = device_copy(std::vector<int64_t>(swiftep::kStatusWords, 0));
  ok_status(sn::register_local(src, rows.size()), "register the source rows");
  if (rank != absent) {
    const sn::RowPutParams put{src, kSrcRows, static_cast<uint8_t*>(dst),
                               world * kMaxRowsPerPair, kRowBytes, src_rows, dst_rows, offsets,
                               pes, world, kChannels, static_cast<uint64_t*>(signals), kEpoch,
                               rank, status, nullptr};
    check(sn::launch_put_rows(put, nullptr) == cudaSuccess,
          "put " + std::to_string(plan.src_rows.size()) + " rows to " + std::to_string(world) +
              " PEs over " + std::to_string(kChannels) + " channels");
  }
  // Every PE waits for every PE's signals, except that the absent PE, which sends nothing,
  // does not wait for itself.
  std::vector<int32_t> senders;
  for (int s = 0; s < world; ++s) {
    if (!(rank == absent && s == absent)) senders.push_back(s);
  }
  int32_t* sender_pes = device_copy(senders);
  const bool must_give_up = absent >= 0 && rank != absent;
  const int64_t bound_ms = must_give_up ? kAbsentWaitMs : kWaitMs;
  const sn::SignalWaitParams wait{static_cast<uint64_t*>(signals), sender_pes,
                                  static_cast<int32_t>(senders.size()), kChannels, kEpoch, rank,
                                  ranks_per_node, bound_ms, status, nullptr};
  const auto t0 = std::chrono::steady_clock::now();
  check(sn::launch_wait_signals(wait, nullptr) == cudaSuccess, "launch wait_signals");
  check(cudaDeviceSynchronize() == cudaSuccess, "kernels finished");
  const double waited_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::vector<int64_t> record(swiftep::kStatusWords);
  cudaMemcpy(record.data(), status, record.size() * sizeof(int64_t), cudaMemcpyDeviceToHost);
  if (must_give_up) {
    check(record[0] == swiftep::kStatusTimeout && record[1] == absent &&
              record[3] == static_cast<int64_t>(kEpoch),
          "the wait gave up naming PE " + std::to_string(absent) + " (node " +
              std::to_string(absent / ranks_per_node) + "): record {" +
              std::to_string(record[0]) + ", " + std::to_string(record[1]) + ", " +
              std::to_string(record[2]) + ", " + std::to_string(record[3]) + "}");
    check(waited_ms < bound_ms + 5000, "gave up " + std::to_string(waited_ms) +
                                           " ms after the wait began (bound " +
                                           std::to_string(bound_ms) + " ms)");
  } else {
    check(record[0] == 0, "no error recorded (code " + std::to_string(record[0]) + ")");
    check_received(static_cast<const uint8_t*>(dst), world, absent);
    std::printf("PE %d: exchange waited %.1f ms\n", rank, waited_ms);
  }
  ok_status(sn::unregister_local(src), "unregister the source rows");
  for (void* p : {fence, signals, dst}) ok_status(sn::free_symmetric(p), "free");
  ok_status(sn::finalize(), "finalize");
  for (void* p : {static_cast<void*>(src), static_cast<void*>(src_rows),
                  static_cast<void*>(dst_rows), static_cast<void*>(offsets),
                  static_cast<void*>(pes), static_cast<void*>(sender_pes),
                  static_cast<void*>(status)}) {
    cudaFree(p);
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    std::fprintf(stderr, "usage: %s RANK WORLD RANKS_PER_NODE UID_FILE [ABSENT_PE]\n", argv[0]);
    return 2;
  }
  rank = std::atoi(argv[1]);
  const int world = std::atoi(argv[2]), ranks_per_node = std::atoi(argv[3]);
  const int absent = argc == 6 ? std::atoi(argv[5]) : -1;
  if (world < 1 || rank < 0 || rank >= world || ranks_per_node < 1 ||
      world % ranks_per_node != 0 || absent >= world || (absent >= 0 && world < 2)) {
    std::fprintf(stderr, "pe_exchange: bad arguments: RANK=%s WORLD=%s RANKS_PER_NODE=%s "
                 "ABSENT_PE=%s (0 <= RANK < WORLD, WORLD a multiple of RANKS_PER_NODE, "
                 "ABSENT_PE < WORLD, and WORLD >= 2 with one)\n", argv[1], argv[2], argv[3], argc == 6 ? argv[5] : "-");
    return 2;
  }
  const int rc = run(world, ranks_per_node, argv[4], absent);
  std::printf("PE %d: %s\n", rank, rc == 0 ? "all checks passed" : "some checks FAILED");
  return rc;
}
