#!/usr/bin/env bash
# Builds the NBD codec fuzzer (datapath/nbd + nbd_fuzz.cpp) with clang and libFuzzer under
# ASan/UBSan, then fuzzes for FUZZ_SECONDS (default 30) starting from generated seeds.
# Exit 77 (CTest: skipped) when clang or its libFuzzer runtime is not installed.
#   FUZZ_SECONDS=300 test/fuzz/run_fuzz.sh        # longer local run
#   FUZZ_BUILD_DIR=/tmp/f test/fuzz/run_fuzz.sh    # where the binary, corpus, crashes go
set -euo pipefail

src="${NBDCSI_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
out="${FUZZ_BUILD_DIR:-$PWD/fuzz-nbd}"
secs="${FUZZ_SECONDS:-30}"
cxx="${FUZZ_CXX:-clang++-14}"

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "SKIP: $cxx not found (apt-get install clang-14)"
  exit 77
fi
mkdir -p "$out/corpus" "$out/artifacts"

probe="$out/probe.cpp"
printf '#include <cstdint>\n#include <cstddef>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n' >"$probe"
if ! "$cxx" -fsanitize=fuzzer "$probe" -o "$out/probe" 2>/dev/null; then
  echo "SKIP: $cxx cannot link libFuzzer (install libclang-rt-14-dev / clang-14 runtime)"
  exit 77
fi

flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
"$cxx" "${flags[@]}" -I"$src" "$src"/datapath/nbd/*.cpp "$src/test/fuzz/nbd_fuzz.cpp" \
  -o "$out/nbd_fuzz"

seeds="$out/seeds"
rm -rf "$seeds"
if command -v python3 >/dev/null 2>&1; then
  python3 "$src/test/fuzz/make_nbd_seeds.py" "$seeds"
else
  echo "note: python3 missing, fuzzing without seeds"
  mkdir -p "$seeds"
fi

# New interesting inputs go to $out/corpus (kept across runs); seeds are read-only input.
# A crash leaves its reproducer in $out/artifacts and fails the test.
exec "$out/nbd_fuzz" -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$out/artifacts/" -print_final_stats=1 "$out/corpus" "$seeds"
