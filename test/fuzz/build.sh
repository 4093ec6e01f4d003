#!/usr/bin/env bash
# Builds every libFuzzer target (test/fuzz/fuzz.cmake) with clang++-14 into $FUZZ_BUILD_DIR
# (default ./fuzz): a second configure of this project with NBDCSI_FUZZ_TARGETS=ON, where every
# object carries coverage instrumentation, ASan and UBSan. The first run configures (about half a
# minute); later runs are incremental. ccache is used when it is installed.
# Exit 77 (CTest: skipped) when clang++-14 or its libFuzzer runtime is missing.
#   test/fuzz/build.sh                   # then: $FUZZ_BUILD_DIR/fuzz-bin/fuzz_<target>
set -euo pipefail

src="${NBDCSI_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
out="${FUZZ_BUILD_DIR:-$PWD/fuzz}"
cxx="${FUZZ_CXX:-clang++-14}"
cc="${FUZZ_CC:-clang-14}"

if ! command -v "$cxx" >/dev/null 2>&1 || ! command -v "$cc" >/dev/null 2>&1; then
  echo "SKIP: $cxx / $cc not found (scripts/deps.sh installs clang-14)"
  exit 77
fi
mkdir -p "$out"
probe="$out/probe.cpp"
printf '#include <cstdint>\n#include <cstddef>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n' >"$probe"
if ! "$cxx" -fsanitize=fuzzer "$probe" -o "$out/probe" 2>/dev/null; then
  echo "SKIP: $cxx cannot link libFuzzer (scripts/deps.sh installs libclang-rt-14-dev)"
  exit 77
fi

# Unrecoverable sanitizers: the first report ends the run and leaves a reproducer.
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all"
flags+=" -fno-omit-frame-pointer -O1 -gline-tables-only"
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi
if [ ! -f "$out/build.ninja" ]; then
  cmake -S "$src" -B "$out" -G Ninja "${launcher[@]}" \
    -DCMAKE_BUILD_TYPE= -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx" \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DNBDCSI_FUZZ_TARGETS=ON -DNBDCSI_WERROR=OFF >"$out/configure.log" ||
    { cat "$out/configure.log"; exit 1; }
fi
cmake --build "$out" --target fuzz_targets -j"${FUZZ_JOBS:-$(nproc)}"
