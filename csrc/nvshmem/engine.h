// The NVSHMEM engine of the scale-out transport, host side: one NVSHMEM instance per process,
// bootstrapped from a unique id that rank 0 creates and the process group carries to the others
// (its store), so no MPI launcher is involved. Plain C++: no torch, no CUDA and no NVSHMEM
// headers here, so a binding can include it without NVSHMEM's include path; engine.cu holds the
// NVSHMEM calls. Every call returns a Status (code + message naming the argument and its value)
// instead of aborting, except where NVSHMEM itself gives no choice: nvshmemx_init_attr exits the
// process when NVSHMEM fails to initialize, so init() checks everything it can before calling it.
//
// Order of use in a job of `world` processes, one GPU each (the process's current CUDA device):
//   rank 0: unique_id_bytes(&id); the process group's store carries `id` to every rank;
//   every rank: init(rank, world, id); malloc_symmetric(...) in the same order and sizes
//   everywhere (collective); kernels (transport.h); free_symmetric(...); finalize().
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace swiftep {
namespace nvshmem {

// Bytes of an NVSHMEM unique id (nvshmemx_uniqueid_t; engine.cu checks the size).
constexpr size_t kUniqueIdBytes = 128;
// Alignment of every symmetric allocation: bulk copies need 16 bytes, and 256 keeps rows at the
// offsets torch's allocator would give them.
constexpr size_t kSymmetricAlignment = 256;

enum class Code : int {
  kOk = 0,
  kInvalidArgument = 1,  // an argument out of range; the message names it and its value
  kNotInitialized = 2,   // the call needs init() first
  kWorldMismatch = 3,    // NVSHMEM already runs in this process as another rank or world
  kNoDevice = 4,         // no usable current CUDA device (init needs the GPU this process drives)
  kNvshmemFailed = 5,    // an NVSHMEM call returned an error; the message names the call
  kOutOfMemory = 6,      // the symmetric heap (NVSHMEM_SYMMETRIC_SIZE) has no room
};

struct Status {
  Code code = Code::kOk;
  std::string message;  // empty when ok
  bool ok() const { return code == Code::kOk; }
};

// A fresh unique id (nvshmemx_get_uniqueid), called on rank 0 only; the other ranks receive the
// bytes through the process group. Needs no GPU and no prior init.
Status unique_id_bytes(std::vector<uint8_t>* id);

// Initializes NVSHMEM for this process as PE `rank` of `world` on the current CUDA device
// (nvshmemx_set_attr_uniqueid_args + nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID)). Collective:
// every rank calls it with the same id. Idempotent: a second call with the same rank and world
// is a no-op; another rank or world is refused (kWorldMismatch), since NVSHMEM has one world per
// process. When another library of this process (torch's NVSHMEM backend of symmetric memory)
// initialized NVSHMEM first, init joins that instance if its rank and world agree.
Status init(int rank, int world, const std::vector<uint8_t>& id);

bool is_initialized();
int my_pe();  // -1 before init
int n_pes();  // -1 before init

// Collective symmetric allocation (nvshmem_align, kSymmetricAlignment): every PE calls it in the
// same order with the same size; the returned address names the buffer on every PE.
Status malloc_symmetric(size_t bytes, void** ptr);
// Collective: frees a buffer malloc_symmetric returned (others are refused, not passed on).
Status free_symmetric(void* ptr);

// Makes local device memory (not in the symmetric heap) usable as the source of puts over a
// remote transport (nvshmemx_buffer_register): the sending side writes straight from `x`. Not
// collective. Peers reached over NVLink/P2P need no registration.
Status register_local(void* ptr, size_t bytes);
Status unregister_local(void* ptr);

// Collective: nvshmem_finalize, once; refused while symmetric buffers are still allocated. A
// no-op when not initialized.
Status finalize();

// The NVSHMEM version whose headers this unit was compiled against ("3.8.0").
const char* header_version();

}  // namespace nvshmem
}  // namespace swiftep
