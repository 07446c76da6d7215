// A C interface to the scale-out engine and transport (engine.h, transport.h), for Python's
// ctypes (torch_swiftep/nvshmem_engine.py): the library it lives in, libswiftep_nvshmem.so, needs
// neither torch nor Python to build, so the CPU CI builds, links and loads the very library a GPU
// job uses. Every call that can fail returns its engine Code (0 = ok) and writes the message,
// NUL-terminated and cut to fit, into (err, err_len). The launchers return a cudaError_t.
// The parameter structs are passed by pointer as laid out in transport.h; Python checks its
// mirror of them against swiftep_nvshmem_layout() before the first launch.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "nvshmem/engine.h"
#include "nvshmem/transport.h"

namespace sn = swiftep::nvshmem;

namespace {

int report(const sn::Status& status, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0) {
    const size_t n = std::min(status.message.size(), err_len - 1);
    std::memcpy(err, status.message.data(), n);
    err[n] = '\0';
  }
  return static_cast<int>(status.code);
}

// Field offsets of both parameter structs, in declaration order, then their sizes.
#define SWIFTEP_PUT_FIELDS(X)                                                                   \
  X(src) X(src_rows_total) X(dst) X(dst_rows_total) X(row_bytes) X(src_rows) X(dst_rows)        \
  X(dest_offsets) X(dest_pes) X(num_dests) X(channels) X(signals) X(epoch) X(my_pe) X(status)  \
  X(epoch_ptr)
#define SWIFTEP_WAIT_FIELDS(X)                                                                  \
  X(signals) X(src_pes) X(num_srcs) X(channels) X(epoch) X(my_pe) X(ranks_per_node)            \
  X(timeout_ms) X(status) X(epoch_ptr)
#define SWIFTEP_PUT_OFFSET(f) offsetof(sn::RowPutParams, f),
#define SWIFTEP_WAIT_OFFSET(f) offsetof(sn::SignalWaitParams, f),

const std::vector<int64_t>& layout() {
  static const std::vector<int64_t> values = [] {
    std::vector<int64_t> v{SWIFTEP_PUT_FIELDS(SWIFTEP_PUT_OFFSET)
                               SWIFTEP_WAIT_FIELDS(SWIFTEP_WAIT_OFFSET)};
    v.push_back(sizeof(sn::RowPutParams));
    v.push_back(sizeof(sn::SignalWaitParams));
    return v;
  }();
  return values;
}

}  // namespace

extern "C" {

// Offsets of RowPutParams' 16 fields, SignalWaitParams' 10, then the two sizes (28 values).
// Returns how many values there are; writes at most `capacity` of them.
int swiftep_nvshmem_layout(int64_t* out, int capacity) {
  const std::vector<int64_t>& v = layout();
  for (int i = 0; i < capacity && i < static_cast<int>(v.size()); ++i) out[i] = v[i];
  return static_cast<int>(v.size());
}

const char* swiftep_nvshmem_header_version() { return sn::header_version(); }

size_t swiftep_nvshmem_unique_id_bytes() { return sn::kUniqueIdBytes; }

int swiftep_nvshmem_unique_id(uint8_t* out, size_t len, char* err, size_t err_len) {
  std::vector<uint8_t> id;
  const sn::Status status = sn::unique_id_bytes(&id);
  if (status.ok()) {
    if (out == nullptr || len != id.size()) {
      return report({sn::Code::kInvalidArgument, "unique_id: the buffer must hold " +
                                                     std::to_string(id.size()) + " bytes, got " +
                                                     std::to_string(len)},
                    err, err_len);
    }
    std::memcpy(out, id.data(), id.size());
  }
  return report(status, err, err_len);
}

int swiftep_nvshmem_init(int rank, int world, const uint8_t* id, size_t len, char* err,
                         size_t err_len) {
  const std::vector<uint8_t> bytes = id == nullptr ? std::vector<uint8_t>()
                                                   : std::vector<uint8_t>(id, id + len);
  return report(sn::init(rank, world, bytes), err, err_len);
}

int swiftep_nvshmem_my_pe() { return sn::my_pe(); }
int swiftep_nvshmem_n_pes() { return sn::n_pes(); }

int swiftep_nvshmem_malloc(size_t bytes, void** ptr, char* err, size_t err_len) {
  return report(sn::malloc_symmetric(bytes, ptr), err, err_len);
}

int swiftep_nvshmem_free(void* ptr, char* err, size_t err_len) {
  return report(sn::free_symmetric(ptr), err, err_len);
}

int swiftep_nvshmem_register(void* ptr, size_t bytes, char* err, size_t err_len) {
  return report(sn::register_local(ptr, bytes), err, err_len);
}

int swiftep_nvshmem_unregister(void* ptr, char* err, size_t err_len) {
  return report(sn::unregister_local(ptr), err, err_len);
}

int swiftep_nvshmem_finalize(char* err, size_t err_len) {
  return report(sn::finalize(), err, err_len);
}

int swiftep_nvshmem_put_rows(const sn::RowPutParams* p, void* stream) {
  if (p == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(sn::launch_put_rows(*p, static_cast<cudaStream_t>(stream)));
}

int swiftep_nvshmem_wait_signals(const sn::SignalWaitParams* p, void* stream) {
  if (p == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(sn::launch_wait_signals(*p, static_cast<cudaStream_t>(stream)));
}

const char* swiftep_nvshmem_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
