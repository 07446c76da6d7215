// The NVSHMEM engine (engine.h): the one NVSHMEM instance of this process. Compiled with
// -rdc=true like the kernels, because nvshmemx_init_attr reaches NVSHMEM through
// nvshmemi_init_thread in libnvshmem_device.a, which registers this module's device state.
#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <mutex>
#include <set>
#include <sstream>
#include <string>

#include "nvshmem/engine.h"

namespace swiftep {
namespace nvshmem {

static_assert(sizeof(nvshmemx_uniqueid_t) == kUniqueIdBytes,
              "kUniqueIdBytes must equal sizeof(nvshmemx_uniqueid_t)");

namespace {

// The version field every unique id starts with (NVSHMEMX_UNIQUEID_INITIALIZER): an id whose
// first bytes differ did not come from nvshmemx_get_uniqueid of this NVSHMEM major version.
constexpr int kUniqueIdVersion = (1 << 16) + static_cast<int>(sizeof(nvshmemx_uniqueid_t));

struct Engine {
  std::mutex mutex;
  bool initialized = false;
  int rank = -1;
  int world = -1;
  std::set<void*> symmetric;  // live malloc_symmetric buffers
};

Engine& engine() {
  static Engine e;
  return e;
}

Status ok() { return Status{}; }

Status fail(Code code, const std::string& message) { return Status{code, message}; }

std::string pointer_text(const void* ptr) {
  std::ostringstream out;
  out << ptr;
  return out.str();
}

// Arguments init() can check without touching NVSHMEM (each message names the value).
Status check_init_args(int rank, int world, const std::vector<uint8_t>& id) {
  if (world < 1) {
    return fail(Code::kInvalidArgument, "init: world must be >= 1, got " + std::to_string(world));
  }
  if (rank < 0 || rank >= world) {
    return fail(Code::kInvalidArgument, "init: rank must be in [0, " + std::to_string(world) +
                                            "), got " + std::to_string(rank));
  }
  if (id.size() != kUniqueIdBytes) {
    return fail(Code::kInvalidArgument, "init: id must have " + std::to_string(kUniqueIdBytes) +
                                            " bytes (rank 0's unique_id_bytes), got " +
                                            std::to_string(id.size()));
  }
  int version = 0;
  std::memcpy(&version, id.data(), sizeof(version));
  if (version != kUniqueIdVersion) {
    return fail(Code::kInvalidArgument,
                "init: id is not an NVSHMEM unique id (version field " + std::to_string(version) +
                    ", expected " + std::to_string(kUniqueIdVersion) +
                    "): pass the bytes rank 0's unique_id_bytes produced");
  }
  return ok();
}

std::string world_text(int rank, int world) {
  return "rank " + std::to_string(rank) + " of " + std::to_string(world);
}

// NVSHMEM already runs in this process (another library initialized it): joining it is fine
// when it is the same world.
Status check_running_world(int rank, int world) {
  const int running_rank = nvshmem_my_pe();
  const int running_world = nvshmem_n_pes();
  if (running_rank == rank && running_world == world) return ok();
  return fail(Code::kWorldMismatch,
              "init: NVSHMEM already runs in this process as " +
                  world_text(running_rank, running_world) + ", not " + world_text(rank, world) +
                  ": one process holds one NVSHMEM world");
}

}  // namespace

Status unique_id_bytes(std::vector<uint8_t>* id) {
  if (id == nullptr) return fail(Code::kInvalidArgument, "unique_id_bytes: id is null");
  nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
  const int rc = nvshmemx_get_uniqueid(&uid);
  if (rc != 0) {
    return fail(Code::kNvshmemFailed, "unique_id_bytes: nvshmemx_get_uniqueid returned " +
                                          std::to_string(rc) +
                                          " (bootstrap plugin nvshmem_bootstrap_uid.so not "
                                          "loadable, or no network interface; see "
                                          "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME)");
  }
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&uid);
  id->assign(bytes, bytes + sizeof(uid));
  return ok();
}

Status init(int rank, int world, const std::vector<uint8_t>& id) {
  Status status = check_init_args(rank, world, id);
  if (!status.ok()) return status;
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (e.initialized) {
    if (e.rank == rank && e.world == world) return ok();
    return fail(Code::kWorldMismatch, "init: this process already runs NVSHMEM as " +
                                          world_text(e.rank, e.world) + "; refusing " +
                                          world_text(rank, world) +
                                          ": one process holds one NVSHMEM world");
  }
  int device = -1;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    return fail(Code::kNoDevice, std::string("init: no current CUDA device (cudaGetDevice: ") +
                                     cudaGetErrorString(err) +
                                     "); set this process's GPU before init");
  }
  // cudaGetDevice creates no context; NVSHMEM's initialization works in the current context, so
  // make the device's primary context current first (what a torch process has already done).
  const cudaError_t set_err = cudaSetDevice(device);
  if (set_err != cudaSuccess) {
    return fail(Code::kNoDevice, std::string("init: cudaSetDevice(") + std::to_string(device) +
                                     ") failed: " + cudaGetErrorString(set_err));
  }
  // Another library of this process may have initialized NVSHMEM (torch's NVSHMEM backend):
  // join it only if it is the same world. NVSHMEM counts init calls; a later call registers
  // this module's device state and bootstraps nothing again.
  if (nvshmemx_init_status() != NVSHMEM_STATUS_NOT_INITIALIZED) {
    status = check_running_world(rank, world);
    if (!status.ok()) return status;
  }
  nvshmemx_uniqueid_t uid;
  std::memcpy(&uid, id.data(), sizeof(uid));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int rc = nvshmemx_set_attr_uniqueid_args(rank, world, &uid, &attr);
  if (rc != 0) {
    return fail(Code::kNvshmemFailed,
                "init: nvshmemx_set_attr_uniqueid_args returned " + std::to_string(rc));
  }
  rc = nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);  // exits the process on failure
  if (rc != 0) {
    return fail(Code::kNvshmemFailed, "init: nvshmemx_init_attr returned " + std::to_string(rc));
  }
  status = check_running_world(rank, world);
  if (!status.ok()) return status;
  e.initialized = true;
  e.rank = rank;
  e.world = world;
  return ok();
}

bool is_initialized() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  return e.initialized;
}

int my_pe() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  return e.initialized ? e.rank : -1;
}

int n_pes() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  return e.initialized ? e.world : -1;
}

Status malloc_symmetric(size_t bytes, void** ptr) {
  if (ptr == nullptr) return fail(Code::kInvalidArgument, "malloc_symmetric: ptr is null");
  *ptr = nullptr;
  if (bytes == 0) {
    return fail(Code::kInvalidArgument, "malloc_symmetric: bytes must be > 0, got 0");
  }
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (!e.initialized) {
    return fail(Code::kNotInitialized, "malloc_symmetric: call init first");
  }
  void* p = nvshmem_align(kSymmetricAlignment, bytes);
  if (p == nullptr) {
    return fail(Code::kOutOfMemory,
                "malloc_symmetric: nvshmem_align(" + std::to_string(kSymmetricAlignment) + ", " +
                    std::to_string(bytes) +
                    ") returned null: the symmetric heap has no room (raise "
                    "NVSHMEM_SYMMETRIC_SIZE), or the PEs asked for different sizes");
  }
  e.symmetric.insert(p);
  *ptr = p;
  return ok();
}

Status free_symmetric(void* ptr) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (!e.initialized) return fail(Code::kNotInitialized, "free_symmetric: call init first");
  if (e.symmetric.erase(ptr) == 0) {
    return fail(Code::kInvalidArgument, "free_symmetric: ptr " + pointer_text(ptr) +
                                            " was not returned by malloc_symmetric");
  }
  nvshmem_free(ptr);
  return ok();
}

Status register_local(void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0) {
    return fail(Code::kInvalidArgument, "register_local: needs a non-null ptr and bytes > 0, got " +
                                            pointer_text(ptr) + " and " + std::to_string(bytes));
  }
  if (!is_initialized()) return fail(Code::kNotInitialized, "register_local: call init first");
  const int rc = nvshmemx_buffer_register(ptr, bytes);
  if (rc != 0) {
    return fail(Code::kNvshmemFailed, "register_local: nvshmemx_buffer_register(" +
                                          pointer_text(ptr) + ", " + std::to_string(bytes) +
                                          ") returned " + std::to_string(rc));
  }
  return ok();
}

Status unregister_local(void* ptr) {
  if (!is_initialized()) return fail(Code::kNotInitialized, "unregister_local: call init first");
  const int rc = nvshmemx_buffer_unregister(ptr);
  if (rc != 0) {
    return fail(Code::kNvshmemFailed, "unregister_local: nvshmemx_buffer_unregister(" +
                                          pointer_text(ptr) + ") returned " + std::to_string(rc));
  }
  return ok();
}

Status finalize() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (!e.initialized) return ok();
  if (!e.symmetric.empty()) {
    return fail(Code::kInvalidArgument, "finalize: " + std::to_string(e.symmetric.size()) +
                                            " symmetric buffer(s) still allocated; "
                                            "free_symmetric them first (collective)");
  }
  nvshmem_finalize();
  e.initialized = false;
  e.rank = -1;
  e.world = -1;
  return ok();
}

// The version string macro is recent (3.x); older headers have only the numeric parts, and the
// packages in use differ between machines, so build the string from whichever is there.
#define SWIFTEP_STRINGIFY_(x) #x
#define SWIFTEP_STRINGIFY(x) SWIFTEP_STRINGIFY_(x)
const char* header_version() {
#if defined(NVSHMEM_VENDOR_BASE_VERSION_STRING)
  return NVSHMEM_VENDOR_BASE_VERSION_STRING;
#elif defined(NVSHMEM_VENDOR_MAJOR_VERSION) && defined(NVSHMEM_VENDOR_MINOR_VERSION) && \
    defined(NVSHMEM_VENDOR_PATCH_VERSION)
  return SWIFTEP_STRINGIFY(NVSHMEM_VENDOR_MAJOR_VERSION) "." SWIFTEP_STRINGIFY(
      NVSHMEM_VENDOR_MINOR_VERSION) "." SWIFTEP_STRINGIFY(NVSHMEM_VENDOR_PATCH_VERSION);
#elif defined(NVSHMEM_MAJOR_VERSION) && defined(NVSHMEM_MINOR_VERSION)
  return SWIFTEP_STRINGIFY(NVSHMEM_MAJOR_VERSION) "." SWIFTEP_STRINGIFY(NVSHMEM_MINOR_VERSION);
#else
  return "unknown";
#endif
}

}  // namespace nvshmem
}  // namespace swiftep
