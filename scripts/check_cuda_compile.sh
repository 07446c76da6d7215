#!/usr/bin/env bash
# Compiles the CUDA side without a GPU (what CI runs):
#  1. every .cu under csrc/ (one launcher translation unit per op folder, csrc/ops/<op>/*.cu:
#     kernels + launchers, no torch) with plain nvcc for sm_90a, keeping the `-Xptxas -v`
#     report (registers, shared memory, spills, stack frames) as <op>.log;
#  2. a g++ syntax check of every csrc/binding/*.cpp against torch's headers (skipped, with a
#     message, when torch is not importable).
# Exits non-zero on any failure, or when ptxas reports spills. Usage: scripts/check_cuda_compile.sh
# Env: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), CXX (default g++),
#      CUDA_HOME (default /usr/local/cuda: its include/ serves the binding check),
#      SWIFTEP_PTXAS_LOG_DIR (default build/ptxas): where the ptxas reports are written.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log_dir="${SWIFTEP_PTXAS_LOG_DIR:-build/ptxas}"
obj_dir="$(mktemp -d)"
trap 'rm -rf "$obj_dir"' EXIT
mkdir -p "$log_dir"

nvcc_flags=(-gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr
            -Icsrc/include -Icsrc -Xptxas -v -Werror all-warnings)

# The log (and object) name of a translation unit: its path under csrc/ops without .cu, with
# a trailing /launcher dropped and the other slashes as underscores (ops/dispatch/launcher.cu:
# dispatch).
log_name() {
  local name="${1#csrc/}"
  name="${name#ops/}"
  name="${name%.cu}"
  name="${name%/launcher}"
  echo "${name//\//_}"
}

# shellcheck source=lib/nvcc_each.sh
source "$root/scripts/lib/nvcc_each.sh"
status=0
# csrc/nvshmem is a build unit of its own (-rdc=true against NVSHMEM): check_nvshmem_link.sh.
mapfile -t sources < <(find csrc -name '*.cu' -not -path 'csrc/nvshmem/*' | LC_ALL=C sort)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "FAIL  no .cu files under csrc/"
  exit 1
fi
nvcc_each log_name "$obj_dir" "$log_dir" "" "${sources[@]}" || status=1

# A build-time variant that the default build does not instantiate, kept for A/B runs: the
# staged TMA combine for the throughput window (against the default register-load combine of
# csrc/ops/combine/kernel_ldg.cuh). It must keep compiling, without spills.
check_variant() {  # check_variant FLAG SOURCE NAME
  if "$nvcc_bin" "${nvcc_flags[@]}" "$1" -c "$2" -o "$obj_dir/$3.o" > "$log_dir/$3.log" 2>&1; then
    echo "ok    nvcc $1 $2"
  else
    echo "FAIL  nvcc $1 $2"
    cat "$log_dir/$3.log"
    status=1
  fi
}
check_variant -DSWIFTEP_COMBINE_LDG=0 csrc/ops/combine/launcher.cu combine_tma

# Spills are a regression worth failing on; the only stack expected is printf's argument
# buffer in the bounded wait's slow path.
if grep -H "bytes spill stores" "$log_dir"/*.log | grep -v " 0 bytes spill stores" ; then
  echo "FAIL  ptxas reports register spills (see $log_dir)"
  status=1
fi

echo "ptxas summary (registers / static smem per kernel):"
for log in "$log_dir"/*.log; do
  awk -v file="$(basename "$log" .log)" '
    /Compiling entry function/ { fn = $0; sub(/^[^\x27]*\x27/, "", fn); sub(/\x27.*$/, "", fn) }
    /Used [0-9]+ registers/ && fn != "" { sub(/^ptxas info *: */, ""); printf "  %-20s %s: %s\n", file, fn, $0; fn = "" }
  ' "$log"
done | (command -v c++filt > /dev/null && c++filt || cat)

python_bin="${PYTHON:-python}"
if torch_includes="$("$python_bin" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
  python_include="$("$python_bin" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  # Third-party headers as system headers: their warnings are not ours.
  # The binding sees the host interface only (csrc/include), never csrc/device or csrc/ops.
  inc=(-Icsrc/include -isystem "$cuda_home/include" -isystem "$python_include")
  for dir in $torch_includes; do inc+=(-isystem "$dir"); done
  # A CPU build of torch ships c10/cuda headers without the build-generated
  # c10/cuda/impl/cuda_cmake_macros.h: stand in an empty one (syntax check only).
  torch_root="${torch_includes%% *}"
  if [ ! -f "$torch_root/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$obj_dir/stub/c10/cuda/impl"
    echo "#pragma once" > "$obj_dir/stub/c10/cuda/impl/cuda_cmake_macros.h"
    inc+=(-isystem "$obj_dir/stub")
  fi
  mapfile -t bindings < <(find csrc/binding -name '*.cpp' | LC_ALL=C sort)
  if [ "${#bindings[@]}" -eq 0 ]; then
    echo "FAIL  no binding .cpp files under csrc/binding/"
    status=1
  fi
  for src in "${bindings[@]}"; do
    if "$cxx_bin" -std=c++17 -fsyntax-only -Wall -Wextra -Wno-unused-parameter "${inc[@]}" "$src"; then
      echo "ok    $cxx_bin -fsyntax-only $src"
    else
      echo "FAIL  $cxx_bin -fsyntax-only $src"
      status=1
    fi
  done
else
  echo "skip  binding syntax check: torch is not importable with $python_bin"
fi

exit "$status"
