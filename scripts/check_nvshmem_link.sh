#!/usr/bin/env bash
# Proves the NVSHMEM build unit (csrc/nvshmem: the scale-out engine and transport) compiles and
# links without a GPU, the way NVSHMEM prescribes for relocatable device code:
#  1. nvcc -rdc=true for sm_90a: every csrc/nvshmem/*.cu, against NVSHMEM's headers;
#  2. nvcc -dlink of those objects against libnvshmem_device.a (NVSHMEM's device library);
#  3. a shared object (libswiftep_nvshmem.so, which torch_swiftep/nvshmem_engine.py loads): the
#     objects, the C interface for Python (c_api.cpp) and the device-link object,
#     linked against libnvshmem_host.so and libnvshmem_device.a (its host half: the init that
#     registers this module's device state) with -z defs, so an unresolved symbol fails here;
#  4. csrc/nvshmem/link_check.cpp linked against that shared object and run: without a GPU it
#     checks the host API's argument checks and that init refuses instead of exiting; with one
#     it runs a one-PE round trip through the transport;
#  5. csrc/nvshmem/pe_exchange.cpp linked the same way (not run here: it is one PE of several,
#     which tests/test_nvshmem_link.py starts on a GPU machine from the kept build directory).
# NVSHMEM comes from the pip package nvidia-nvshmem-cu13 (the `test` extra), found through
# Python (`nvidia` is a namespace package: the directory is nvidia.nvshmem.__path__[0]), or from
# NVSHMEM_HOME (a directory with include/ and lib/). Exits non-zero on any failure.
# Env: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), CXX (default g++), PYTHON
#      (default python3), CUDA_HOME (default /usr/local/cuda), NVSHMEM_HOME (default: the pip
#      package), SWIFTEP_NVSHMEM_BUILD_DIR (default: a temporary directory, removed at exit).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=lib/nvcc_each.sh
source "$root/scripts/lib/nvcc_each.sh"

python_bin="${PYTHON:-python3}"

if [ -n "${NVSHMEM_HOME:-}" ]; then
  nvshmem_home="$NVSHMEM_HOME"
  found_by="NVSHMEM_HOME"
elif nvshmem_home="$("$python_bin" -c 'import nvidia.nvshmem as m; print(list(m.__path__)[0])' \
                     2>/dev/null)"; then
  found_by="pip package nvidia-nvshmem-cu13 ($python_bin)"
else
  echo "FAIL  NVSHMEM not found: pip install nvidia-nvshmem-cu13 (or set NVSHMEM_HOME)"
  exit 1
fi
nvshmem_inc="$nvshmem_home/include"
nvshmem_lib="$nvshmem_home/lib"
# The wheel ships only the soname (libnvshmem_host.so.3); a system install also has the link.
host_lib="$(cd "$nvshmem_lib" 2>/dev/null && ls libnvshmem_host.so libnvshmem_host.so.* 2>/dev/null \
            | head -n 1 || true)"
for need in include/nvshmem.h lib/libnvshmem_device.a "lib/${host_lib:-libnvshmem_host.so}"; do
  if [ ! -f "$nvshmem_home/$need" ]; then
    echo "FAIL  incomplete NVSHMEM at $nvshmem_home: no $need"
    exit 1
  fi
done
# The version: the string macro of recent headers, else the numeric parts older ones have
# (wherever they sit under include/).
version="$(sed -n 's/^#define NVSHMEM_VENDOR_BASE_VERSION_STRING "\(.*\)"/\1/p' \
           "$nvshmem_inc/non_abi/nvshmem_version.h" 2>/dev/null || true)"
if [ -z "$version" ]; then
  version="$(grep -rhoE '^#define NVSHMEM_VENDOR_(MAJOR|MINOR|PATCH)_VERSION +[0-9]+' \
             "$nvshmem_inc" 2>/dev/null | awk '{print $3}' | paste -sd. || true)"
fi
echo "NVSHMEM ${version:-(version unknown)} at $nvshmem_home (found by $found_by)"
echo "        headers $nvshmem_inc, host library $host_lib, device library libnvshmem_device.a"

cuda_lib=""
for dir in "$cuda_home/lib64" "$cuda_home/lib" "$cuda_home/targets/x86_64-linux/lib"; do
  if [ -e "$dir/libcudart.so" ]; then cuda_lib="$dir"; break; fi
done
if [ -z "$cuda_lib" ]; then
  echo "FAIL  no libcudart.so under $cuda_home (set CUDA_HOME)"
  exit 1
fi

if [ -n "${SWIFTEP_NVSHMEM_BUILD_DIR:-}" ]; then
  build="$SWIFTEP_NVSHMEM_BUILD_DIR"
  mkdir -p "$build"
else
  build="$(mktemp -d)"
  trap 'rm -rf "$build"' EXIT
fi

arch=(-gencode=arch=compute_90a,code=sm_90a)
# NVSHMEM's headers as system headers: their warnings are not ours.
nvcc_flags=("${arch[@]}" -rdc=true -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC
            -Icsrc/include -Icsrc -isystem "$nvshmem_inc" -Xptxas -v -Werror all-warnings)

status=0
mapfile -t sources < <(find csrc/nvshmem -name '*.cu' | LC_ALL=C sort)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "FAIL  no .cu files under csrc/nvshmem/"
  exit 1
fi
cu_name() { basename "$1" .cu; }
nvcc_each cu_name "$build" "$build" " -rdc=true" "${sources[@]}" || status=1
objects=()
for src in "${sources[@]}"; do objects+=("$build/$(cu_name "$src").o"); done
[ "$status" -eq 0 ] || exit "$status"

# Our kernels only: NVSHMEM's own device functions appear in the report too.
echo "ptxas summary (registers of the swiftep kernels):"
for log in "$build"/*.log; do
  awk '/Compiling entry function/ { fn = $0; sub(/^[^\x27]*\x27/, "", fn); sub(/\x27.*$/, "", fn) }
       /Used [0-9]+ registers/ && fn ~ /swiftep/ { sub(/^ptxas info *: */, ""); printf "  %s: %s\n", fn, $0; fn = "" }' "$log"
done | (command -v c++filt > /dev/null && c++filt || cat)

step() {  # step NAME COMMAND...: runs the command, prints ok/FAIL, exits on failure
  local name="$1"
  shift
  if "$@" > "$build/step.log" 2>&1; then
    echo "ok    $name"
  else
    echo "FAIL  $name"
    cat "$build/step.log"
    exit 1
  fi
}

step "nvcc -dlink against libnvshmem_device.a" \
  "$nvcc_bin" "${arch[@]}" -dlink -Xcompiler -fPIC "${objects[@]}" -L"$nvshmem_lib" \
  -lnvshmem_device -o "$build/dlink.o"
step "host C interface csrc/nvshmem/c_api.cpp (what Python's ctypes calls)" \
  "$cxx_bin" -std=c++17 -O2 -fPIC -Wall -Wextra -Werror -Icsrc/include -Icsrc \
  -isystem "$cuda_home/include" -c csrc/nvshmem/c_api.cpp -o "$build/c_api.o"
step "shared object against $host_lib + libnvshmem_device.a (-z defs)" \
  "$cxx_bin" -shared -o "$build/libswiftep_nvshmem.so" "${objects[@]}" "$build/c_api.o" \
  "$build/dlink.o" \
  -L"$nvshmem_lib" "-l:$host_lib" -l:libnvshmem_device.a -L"$cuda_lib" -lcudart \
  "-Wl,-rpath,$nvshmem_lib" -Wl,-z,defs
step "host program csrc/nvshmem/link_check.cpp against the shared object" \
  "$cxx_bin" -std=c++17 -O1 -Wall -Wextra -Werror -Icsrc/include -Icsrc \
  -isystem "$cuda_home/include" csrc/nvshmem/link_check.cpp -o "$build/link_check" \
  -L"$build" -lswiftep_nvshmem -L"$cuda_lib" -lcudart "-Wl,-rpath,$build" "-Wl,-rpath,$cuda_lib"
step "host program csrc/nvshmem/pe_exchange.cpp (several PEs; tests/test_nvshmem_link.py)" \
  "$cxx_bin" -std=c++17 -O1 -Wall -Wextra -Werror -Icsrc/include -Icsrc \
  -isystem "$cuda_home/include" csrc/nvshmem/pe_exchange.cpp -o "$build/pe_exchange" \
  -L"$build" -lswiftep_nvshmem -L"$cuda_lib" -lcudart "-Wl,-rpath,$build" "-Wl,-rpath,$cuda_lib"

echo "run   link_check"
if "$build/link_check"; then
  echo "ok    link_check"
else
  echo "FAIL  link_check"
  # NVSHMEM's own failure messages are terse ("nvshmem initialization failed"): run it once more
  # with its debug log so the reason (transport, heap, context) is in this output.
  echo "      again with NVSHMEM_DEBUG=INFO (last 80 lines):"
  NVSHMEM_DEBUG=INFO "$build/link_check" 2>&1 | tail -n 80 | sed 's/^/      /'
  exit 1
fi
