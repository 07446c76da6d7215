#!/usr/bin/env bash
# Build DeepEP's intranode-only extension (the release before its V2, version 1.2.1) for the
# multi-process benchmark's peer (torch_swiftep/bench/deepep_peer.py), on a GPU machine without
# network access. Measured to build in ~40 s there (intranode kernels only, sm_90).
#
# DeepEP is never vendored or committed: fetch its source beforehand, where there is network,
# into the ignored folder third_party/:
#
#   git clone https://github.com/deepseek-ai/DeepEP third_party/DeepEP
#   git -C third_party/DeepEP checkout 567632dd59810d77b3cc05553df953cc0f779799   # or: v1.2.1
#
# (567632d is the last commit before DeepEP V2; its setup.py still says 1.2.1.) Then:
#
#   bash scripts/build_deepep.sh [DEST]       # default DEST: third_party/deepep_intranode
#   export PYTHONPATH=$PWD/third_party/deepep_intranode:$PYTHONPATH
#   STEPS=multi_process DEEPEP_DIR=third_party/deepep_intranode bash scripts/gpu_round.sh OUT
#
# The build edits a COPY of the source (DEST, rebuilt from scratch each time; the source is left
# as fetched):
# - setup.py leaves NVSHMEM out (even where the nvidia-nvshmem wheel torch brings is installed:
#   DeepEP would find it and build its internode and low-latency kernels) and drops -rdc=true
#   (nothing is device-linked without NVSHMEM);
# - the three mask-buffer calls of csrc/deep_ep.cpp (internode_ll::update/query/clean_mask_buffer,
#   the shrink mode, which exists only with NVSHMEM) are guarded by DISABLE_NVSHMEM; the v1.2.1
#   tag has none of them.
# Every edit fails loudly when its pattern is not found.
#
# Environment: DEEPEP_SRC (default third_party/DeepEP); TORCH_CUDA_ARCH_LIST (DeepEP's default:
# 9.0); DEEPEP_EDIT_ONLY=1 edits the copy and stops before building (the CPU tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${DEEPEP_SRC:-third_party/DeepEP}
DEST=${1:-third_party/deepep_intranode}
MARK=.swiftep_deepep_copy  # marks a folder this script made (the only kind it deletes)

[ -f "$SRC/setup.py" ] || { echo "build_deepep: no DeepEP source at $SRC (set DEEPEP_SRC; see the header of $0)" >&2; exit 1; }
[ -f "$SRC/csrc/deep_ep.cpp" ] || { echo "build_deepep: $SRC has no csrc/deep_ep.cpp: this is DeepEP V2 or later; check out the release before it (commit 567632d or tag v1.2.1)" >&2; exit 1; }
SRC=$(cd "$SRC" && pwd)
if [ -e "$DEST" ]; then
  [ -f "$DEST/$MARK" ] || { echo "build_deepep: $DEST exists and was not made by this script: refusing to replace it" >&2; exit 1; }
  rm -rf "$DEST"
fi
mkdir -p "$DEST"
cp -a "$SRC/." "$DEST/"
DEST=$(cd "$DEST" && pwd)
{ echo "copy of $SRC"; git -C "$SRC" rev-parse HEAD 2>/dev/null || echo "(not a git checkout)"; } > "$DEST/$MARK"

python3 - "$DEST" <<'EOF'
import pathlib
import re
import sys

dest = pathlib.Path(sys.argv[1])


def fail(msg):
    sys.exit(f"build_deepep: {msg}: the source is not the DeepEP release this script knows "
             "(567632d or v1.2.1); edit it by hand or check that release out")


setup = dest / "setup.py"
text = setup.read_text()
force = re.compile(r"^(?P<indent>[ \t]*)if not disable_nvshmem:[ \t]*\n", re.M)
found = force.search(text)
if found is None:
    fail("setup.py has no `if not disable_nvshmem:` (where NVSHMEM is chosen)")
text = (text[:found.start()]
        + f"{found['indent']}disable_nvshmem = True  # intranode-only build: NVSHMEM left out\n"
        + text[found.start():])
rdc = re.compile(r"""['"]-rdc=true['"],[ \t]*""")
if len(rdc.findall(text)) != 1:
    fail(f"setup.py names '-rdc=true' {len(rdc.findall(text))} times (expected once)")
text = rdc.sub("", text)
compile(text, str(setup), "exec")  # still Python
setup.write_text(text)

cpp = dest / "csrc" / "deep_ep.cpp"
text = cpp.read_text()
names = ("update_mask_buffer", "query_mask_buffer", "clean_mask_buffer")
calls = {n: list(re.finditer(rf"^[ \t]*internode_ll::{n}\([^;]*\);[ \t]*\n", text, re.M))
         for n in names}
if not any(calls.values()) and "mask_buffer" not in text:
    print("build_deepep: csrc/deep_ep.cpp has no mask-buffer calls (v1.2.1 tag): nothing to guard")
else:
    for n, found in calls.items():
        if len(found) != 1:
            fail(f"csrc/deep_ep.cpp calls internode_ll::{n} {len(found)} times (expected once)")
    for n in names:  # one at a time: each edit moves the others
        m = re.search(rf"^[ \t]*internode_ll::{n}\([^;]*\);[ \t]*\n", text, re.M)
        text = (text[:m.start()] + "#ifndef DISABLE_NVSHMEM\n" + m.group(0) + "#endif\n"
                + text[m.end():])
    cpp.write_text(text)
    print(f"build_deepep: guarded {', '.join(names)} with DISABLE_NVSHMEM")
print("build_deepep: setup.py: NVSHMEM left out, -rdc=true dropped")
EOF

if [ "${DEEPEP_EDIT_ONLY:-0}" = 1 ]; then
  echo "build_deepep: edited copy at $DEST (DEEPEP_EDIT_ONLY=1: not built)"
  exit 0
fi
# DeepEP links with -lcuda. Where only the driver's libcuda.so.1 is installed (no unversioned
# libcuda.so and no CUDA stubs on the linker path), point the linker at it.
if ! ldconfig -p 2> /dev/null | grep -q 'libcuda\.so ' \
    && [ ! -e "${CUDA_HOME:-/usr/local/cuda}/lib64/stubs/libcuda.so" ]; then
  driver_lib=$(ldconfig -p 2> /dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
  if [ -n "$driver_lib" ]; then
    link_dir="$DEST/.libcuda_link"
    mkdir -p "$link_dir" && ln -sf "$driver_lib" "$link_dir/libcuda.so"
    export LIBRARY_PATH="$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
    echo "build_deepep: linking -lcuda against $driver_lib"
  fi
fi
t0=$SECONDS
( cd "$DEST" && env -u NVSHMEM_DIR python3 setup.py build_ext --inplace )
echo "build_deepep: built in $((SECONDS - t0)) s"
PYTHONPATH="$DEST${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
  'import deep_ep; print("build_deepep: import deep_ep OK:", deep_ep.__file__)'
echo "build_deepep: put it on the path with: export PYTHONPATH=$DEST\${PYTHONPATH:+:\$PYTHONPATH}"
