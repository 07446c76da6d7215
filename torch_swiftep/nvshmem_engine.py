"""The scale-out engine from Python: one NVSHMEM instance per process, bootstrapped over a torch
process group, its symmetric buffers as torch tensors, and the transport's two launchers.

    engine = NvshmemEngine.start(group)            # collective; NVSHMEM once per process
    rows = engine.alloc(nbytes)                    # collective; uint8 CUDA tensor, symmetric
    engine.put_rows(...); engine.wait_signals(...) # csrc/nvshmem/transport.h, on a stream
    engine.free(rows); engine.finalize()           # collective

It drives libswiftep_nvshmem.so (csrc/nvshmem: engine, transport and their C interface
c_api.cpp) through ctypes. The library is built torch-free, from a source checkout:
`python3 -m torch_swiftep.nvshmem_engine --build` (nvcc and nvidia-nvshmem-cu13 needed; it runs
scripts/check_nvshmem_link.sh and keeps the library in torch_swiftep/_nvshmem/). It is found
through the `library` argument, else SWIFTEP_NVSHMEM_LIB, else that folder. The unique id
travels from the group's rank 0 to the others with one broadcast over the group (gloo is
enough); no MPI launcher. Not yet used
by Communicator: the hierarchical dispatch and combine kernels that will put over it are the
next step (docs/design.md, "Scale-out").

Every failure raises NvshmemError with the engine's message (it names the argument and value,
or the NVSHMEM call), on the rank where it happens.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import subprocess
import sys
from typing import Optional

import torch

from .status import SwiftepError

LIB_ENV = "SWIFTEP_NVSHMEM_LIB"
LIB_NAME = "libswiftep_nvshmem.so"
DEFAULT_DIR = pathlib.Path(__file__).resolve().parent / "_nvshmem"
_ERR_BYTES = 1024
BUILD_HINT = ("build it with `python3 -m torch_swiftep.nvshmem_engine --build` (needs nvcc and "
              f"nvidia-nvshmem-cu13), or point {LIB_ENV} at one")


class NvshmemError(SwiftepError):
    """The NVSHMEM engine refused a call or NVSHMEM failed (see the message)."""


class RowPutParams(ctypes.Structure):  # csrc/nvshmem/transport.h, field for field
    _fields_ = [("src", ctypes.c_void_p), ("src_rows_total", ctypes.c_int64),
                ("dst", ctypes.c_void_p), ("dst_rows_total", ctypes.c_int64),
                ("row_bytes", ctypes.c_int64), ("src_rows", ctypes.c_void_p),
                ("dst_rows", ctypes.c_void_p), ("dest_offsets", ctypes.c_void_p),
                ("dest_pes", ctypes.c_void_p), ("num_dests", ctypes.c_int32),
                ("channels", ctypes.c_int32), ("signals", ctypes.c_void_p),
                ("epoch", ctypes.c_uint64), ("my_pe", ctypes.c_int32),
                ("status", ctypes.c_void_p), ("epoch_ptr", ctypes.c_void_p)]


class SignalWaitParams(ctypes.Structure):  # csrc/nvshmem/transport.h, field for field
    _fields_ = [("signals", ctypes.c_void_p), ("src_pes", ctypes.c_void_p),
                ("num_srcs", ctypes.c_int32), ("channels", ctypes.c_int32),
                ("epoch", ctypes.c_uint64), ("my_pe", ctypes.c_int32),
                ("ranks_per_node", ctypes.c_int32), ("timeout_ms", ctypes.c_int64),
                ("status", ctypes.c_void_p), ("epoch_ptr", ctypes.c_void_p)]


def expected_layout() -> list[int]:
    """What swiftep_nvshmem_layout must return for the mirrors above: every field's offset,
    then both sizes."""
    offsets = [getattr(s, name).offset for s in (RowPutParams, SignalWaitParams)
               for name, _ in s._fields_]
    return offsets + [ctypes.sizeof(RowPutParams), ctypes.sizeof(SignalWaitParams)]


_SIGNATURES = {  # name: (restype, argtypes)
    "swiftep_nvshmem_layout": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]),
    "swiftep_nvshmem_header_version": (ctypes.c_char_p, []),
    "swiftep_nvshmem_unique_id_bytes": (ctypes.c_size_t, []),
    "swiftep_nvshmem_unique_id": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_size_t,
                                                 ctypes.c_char_p, ctypes.c_size_t]),
    "swiftep_nvshmem_init": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                            ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]),
    "swiftep_nvshmem_my_pe": (ctypes.c_int, []),
    "swiftep_nvshmem_n_pes": (ctypes.c_int, []),
    "swiftep_nvshmem_malloc": (ctypes.c_int, [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
                                              ctypes.c_char_p, ctypes.c_size_t]),
    "swiftep_nvshmem_free": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
    "swiftep_nvshmem_register": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t,
                                                ctypes.c_char_p, ctypes.c_size_t]),
    "swiftep_nvshmem_unregister": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p,
                                                  ctypes.c_size_t]),
    "swiftep_nvshmem_finalize": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_size_t]),
    "swiftep_nvshmem_put_rows": (ctypes.c_int, [ctypes.POINTER(RowPutParams), ctypes.c_void_p]),
    "swiftep_nvshmem_wait_signals": (ctypes.c_int, [ctypes.POINTER(SignalWaitParams),
                                                    ctypes.c_void_p]),
    "swiftep_nvshmem_cuda_error_string": (ctypes.c_char_p, [ctypes.c_int]),
}


def load_library(path: Optional[str] = None) -> ctypes.CDLL:
    """libswiftep_nvshmem.so from `path` or SWIFTEP_NVSHMEM_LIB, its functions typed and its
    parameter layout checked against this module's mirrors."""
    path = path or os.environ.get(LIB_ENV)
    if not path:
        path = str(DEFAULT_DIR / LIB_NAME)
        if not os.path.isfile(path):
            raise NvshmemError(f"no NVSHMEM engine library: {LIB_ENV} is not set and {path} "
                               f"does not exist; {BUILD_HINT}")
    if not os.path.isfile(path):
        raise NvshmemError(f"NVSHMEM engine library {path!r} does not exist; {BUILD_HINT}")
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise NvshmemError(f"NVSHMEM engine library {path!r} does not load: {exc}") from exc
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise NvshmemError(f"{path!r} has no {name}: built from another version of "
                               "csrc/nvshmem; rebuild it")
        fn.restype, fn.argtypes = restype, argtypes
    want = expected_layout()
    got = (ctypes.c_int64 * len(want))()
    n = lib.swiftep_nvshmem_layout(got, len(want))
    if n != len(want) or list(got) != want:
        raise NvshmemError(f"{path!r}: the transport's parameter layout {list(got)[:n]} is not "
                           f"the one torch_swiftep.nvshmem_engine mirrors {want}; rebuild it")
    return lib


def _call(fn, *args) -> None:
    err = ctypes.create_string_buffer(_ERR_BYTES)
    code = fn(*args, err, _ERR_BYTES)
    if code != 0:
        raise NvshmemError(err.value.decode(errors="replace") or f"{fn.__name__}: code {code}")


class _DeviceMemory:
    """A raw CUDA pointer as __cuda_array_interface__, so torch.as_tensor wraps it without a
    copy (the engine owns the memory; free() gives it back)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None}


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _stream(stream) -> int:
    return (stream or torch.cuda.current_stream()).cuda_stream


class NvshmemEngine:
    """This process's NVSHMEM PE (one per process: start() returns the running one)."""

    _running: Optional["NvshmemEngine"] = None

    def __init__(self, lib: ctypes.CDLL, rank: int, world: int):
        self.lib, self.rank, self.world = lib, rank, world
        self._buffers: dict[int, int] = {}  # data_ptr -> bytes of what alloc() handed out
        self._allocations: dict[int, int] = {}  # registered CUDA allocations: base -> bytes

    @classmethod
    def start(cls, group=None, *, library: Optional[str] = None) -> "NvshmemEngine":
        """Collective over `group` (default: the world): PE = the group rank, on this process's
        current CUDA device. Rank 0 draws the unique id; one broadcast carries it."""
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if cls._running is not None:
            if (cls._running.rank, cls._running.world) != (rank, world):
                raise NvshmemError(f"NVSHMEM already runs in this process as PE "
                                   f"{cls._running.rank} of {cls._running.world}; refusing PE "
                                   f"{rank} of {world}: one process holds one NVSHMEM world")
            return cls._running
        lib = load_library(library)
        payload = [None]
        if rank == 0:
            uid = ctypes.create_string_buffer(lib.swiftep_nvshmem_unique_id_bytes())
            _call(lib.swiftep_nvshmem_unique_id, uid, len(uid))
            payload = [bytes(uid.raw)]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0)
                                   if group is not None else 0, group=group)
        _call(lib.swiftep_nvshmem_init, rank, world, payload[0], len(payload[0]))
        cls._running = cls(lib, rank, world)
        return cls._running

    @property
    def header_version(self) -> str:
        return self.lib.swiftep_nvshmem_header_version().decode()

    def alloc(self, nbytes: int) -> torch.Tensor:
        """Collective: `nbytes` of the symmetric heap as a uint8 CUDA tensor (same size on
        every PE, same order of calls)."""
        if nbytes <= 0:
            raise NvshmemError(f"alloc: nbytes must be > 0, got {nbytes}")
        ptr = ctypes.c_void_p()
        _call(self.lib.swiftep_nvshmem_malloc, nbytes, ctypes.byref(ptr))
        tensor = torch.as_tensor(_DeviceMemory(ptr.value, nbytes), device="cuda")
        self._buffers[ptr.value] = nbytes
        return tensor

    def free(self, tensor: torch.Tensor) -> None:
        """Collective: gives back a tensor alloc() returned (not a view of it)."""
        ptr = tensor.data_ptr()
        if ptr not in self._buffers:
            raise NvshmemError(f"free: tensor at {ptr:#x} is not a buffer alloc() returned")
        torch.cuda.synchronize()  # no kernel of this PE still uses it
        _call(self.lib.swiftep_nvshmem_free, ptr)
        del self._buffers[ptr]

    def register(self, tensor: torch.Tensor) -> None:
        """Makes a local CUDA tensor a source of puts over remote transports."""
        _call(self.lib.swiftep_nvshmem_register, tensor.data_ptr(),
              tensor.numel() * tensor.element_size())

    def register_allocation_of(self, tensor: torch.Tensor) -> None:
        """register() for the whole CUDA allocation holding `tensor`, once per process (the
        caching allocator hands the same allocations out again, and NVSHMEM refuses to
        register a range twice). An allocation freed back to the driver (empty_cache) stays
        registered here: register a tensor again after that only through a fresh engine."""
        if tensor.numel() == 0:
            return
        ptr = tensor.data_ptr()
        if any(base <= ptr < base + n for base, n in self._allocations.items()):
            return
        base, nbytes = _allocation_of(ptr)
        _call(self.lib.swiftep_nvshmem_register, base, nbytes)
        self._allocations[base] = nbytes

    def unregister(self, tensor: torch.Tensor) -> None:
        _call(self.lib.swiftep_nvshmem_unregister, tensor.data_ptr())

    def _launched(self, code: int, what: str) -> None:
        if code != 0:
            text = self.lib.swiftep_nvshmem_cuda_error_string(code).decode()
            raise NvshmemError(f"{what}: {text} (code {code}; parameters are checked before "
                               "the launch, see csrc/nvshmem/transport.h)")

    def put_rows(self, src, dst, src_rows, dst_rows, dest_offsets, dest_pes, *, channels: int,
                 signals, epoch: int, status, stream=None, epoch_ptr=None) -> None:
        """transport.h's put_rows: row src_rows[i] of the local `src` ([rows, row_bytes] uint8
        view of any CUDA tensor) to row dst_rows[i] of the symmetric `dst` on PE dest_pes[d],
        for items [dest_offsets[d], dest_offsets[d + 1]); then one signal per (destination,
        channel) set to `epoch` (+ epoch_ptr's value, read on the device, when given: a uint64 [1]
        tensor a CUDA graph advances). Index tensors int32 on the device; status int64[4]."""
        for name, t in (("src", src), ("dst", dst)):
            if t.dtype != torch.uint8 or t.dim() != 2 or not t.is_contiguous():
                raise NvshmemError(f"put_rows: {name} must be a contiguous uint8 [rows, "
                                   f"row_bytes] tensor (a .view(torch.uint8) of the rows), got "
                                   f"{t.dtype} {list(t.shape)}")
        if src.size(1) != dst.size(1):
            raise NvshmemError(f"put_rows: src rows have {src.size(1)} bytes, dst rows "
                               f"{dst.size(1)}")
        p = RowPutParams(_ptr(src), src.size(0), _ptr(dst), dst.size(0), src.size(1),
                         _ptr(src_rows), _ptr(dst_rows), _ptr(dest_offsets), _ptr(dest_pes),
                         dest_pes.numel(), channels, _ptr(signals), epoch, self.rank,
                         _ptr(status), _ptr(epoch_ptr))
        self._launched(self.lib.swiftep_nvshmem_put_rows(ctypes.byref(p), _stream(stream)),
                       "put_rows")

    def wait_signals(self, signals, src_pes, *, channels: int, epoch: int, ranks_per_node: int,
                     timeout_ms: int, status, stream=None, epoch_ptr=None) -> None:
        """transport.h's wait_signals: waits, bounded by timeout_ms, until every (source PE,
        channel) signal has reached `epoch`; a timeout is recorded in `status`
        {TIMEOUT, source PE, channel, epoch} and printed naming the PE and its node."""
        p = SignalWaitParams(_ptr(signals), _ptr(src_pes), src_pes.numel(), channels, epoch,
                             self.rank, ranks_per_node, timeout_ms, _ptr(status),
                             _ptr(epoch_ptr))
        self._launched(self.lib.swiftep_nvshmem_wait_signals(ctypes.byref(p), _stream(stream)),
                       "wait_signals")

    def finalize(self) -> None:
        """Collective: ends NVSHMEM in this process (refused while buffers are allocated)."""
        if self._buffers:
            raise NvshmemError(f"finalize: {len(self._buffers)} symmetric buffer(s) still "
                               "allocated: free() them first")
        _call(self.lib.swiftep_nvshmem_finalize)
        NvshmemEngine._running = None


def _allocation_of(ptr: int) -> tuple[int, int]:
    """(base, bytes) of the CUDA allocation holding device pointer ptr (cuMemGetAddressRange)."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    fn = libcuda.cuMemGetAddressRange_v2
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                   ctypes.c_uint64]
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    code = fn(ctypes.byref(base), ctypes.byref(size), ptr)
    if code != 0:
        raise NvshmemError(f"cuMemGetAddressRange({ptr:#x}) failed with CUresult {code}: not "
                           "device memory of this process")
    return base.value, size.value


# --------------------------------------------------------------------------- command line
def build(out_dir: pathlib.Path) -> int:
    """Builds (and link-checks) the library into out_dir with scripts/check_nvshmem_link.sh of
    the source checkout this module sits in."""
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "check_nvshmem_link.sh"
    if not script.is_file():
        print(f"nvshmem_engine: {script} not found: --build needs a source checkout of "
              "torch_swiftep", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SWIFTEP_NVSHMEM_BUILD_DIR": str(out_dir)}
    rc = subprocess.run(["bash", str(script)], env=env).returncode
    if rc == 0:
        load_library(str(out_dir / LIB_NAME))
        print(f"nvshmem_engine: built {out_dir / LIB_NAME} (its layout matches this module)")
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m torch_swiftep.nvshmem_engine",
        description="Build or check libswiftep_nvshmem.so, the NVSHMEM engine and transport "
                    "that torch_swiftep.nvshmem_engine drives.")
    p.add_argument("--build", action="store_true",
                   help="compile, device-link and link the library (and its checks) from "
                        "csrc/nvshmem")
    p.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR,
                   help=f"where --build puts the library (default: {DEFAULT_DIR})")
    args = p.parse_args(argv)
    if args.build:
        return build(args.dir)
    try:
        lib = load_library(str(args.dir / LIB_NAME) if args.dir != DEFAULT_DIR else None)
    except NvshmemError as exc:
        print(f"nvshmem_engine: {exc}", file=sys.stderr)
        return 1
    print(f"nvshmem_engine: {lib._name} loads; NVSHMEM headers "
          f"{lib.swiftep_nvshmem_header_version().decode()}; parameter layout matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
