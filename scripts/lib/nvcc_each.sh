# Sourced by scripts/check_cuda_compile.sh and scripts/check_nvshmem_link.sh: the tools they
# use (NVCC, CXX and CUDA_HOME override them) and the parallel compile loop they share.

nvcc_bin="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
cxx_bin="${CXX:-g++}"
if [ -n "${CUDA_HOME:-}" ]; then
  cuda_home="$CUDA_HOME"
elif [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  cuda_home=/usr/local/cuda
else
  cuda_home="$(cd "$(dirname "$(readlink -f "$nvcc_bin")")/.." && pwd)"
fi

#
# nvcc_each NAME_FN OBJ_DIR LOG_DIR LABEL SRC...
#   compiles every SRC at once with "$nvcc_bin" "${nvcc_flags[@]}" -c (the caller's variables)
#   into OBJ_DIR/<name>.o, its output in LOG_DIR/<name>.log, <name> = $(NAME_FN SRC); prints
#   "ok    nvcc<LABEL> SRC" or "FAIL ..." and the failure's log; returns 1 if any failed.
nvcc_each() {
  local name_fn=$1 obj_dir=$2 log_dir=$3 label=$4
  shift 4
  local srcs=("$@") pids=() rc=0 i name src
  for src in "${srcs[@]}"; do
    name="$("$name_fn" "$src")"
    ( "$nvcc_bin" "${nvcc_flags[@]}" -c "$src" -o "$obj_dir/$name.o" > "$log_dir/$name.log" 2>&1 ) &
    pids+=("$!")
  done
  for i in "${!srcs[@]}"; do
    name="$("$name_fn" "${srcs[$i]}")"
    if wait "${pids[$i]}"; then
      echo "ok    nvcc$label ${srcs[$i]}"
    else
      echo "FAIL  nvcc$label ${srcs[$i]}"
      cat "$log_dir/$name.log"
      rc=1
    fi
  done
  return $rc
}
