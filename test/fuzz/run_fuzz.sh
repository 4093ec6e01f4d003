#!/usr/bin/env bash
# Runs one libFuzzer target (test/fuzz/fuzz.cmake) for FUZZ_SECONDS (default 20), starting from
# its seed corpus in the repository (test/fuzz/corpus/TARGET/, read only) plus what earlier runs
# found ($FUZZ_BUILD_DIR/corpus/TARGET/, where new inputs go). Builds the targets first when they
# are missing (test/fuzz/build.sh). A crash, a sanitizer report, a broken invariant, a timeout or
# running out of memory fails the run and leaves the reproducer in $FUZZ_BUILD_DIR/artifacts/;
# to replay one: $FUZZ_BUILD_DIR/fuzz-bin/fuzz_TARGET FILE.
# Exit 77 (CTest: skipped) when clang++-14 or libFuzzer is missing.
#   test/fuzz/run_fuzz.sh pool_metadata
#   FUZZ_SECONDS=300 test/fuzz/run_fuzz.sh nbd_codec
set -euo pipefail

target="${1:?usage: run_fuzz.sh TARGET [libFuzzer flags...]}"
shift
src="${NBDCSI_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
out="${FUZZ_BUILD_DIR:-$PWD/fuzz}"
secs="${FUZZ_SECONDS:-20}"
bin="$out/fuzz-bin/fuzz_$target"
seeds="$src/test/fuzz/corpus/$target"

if [ ! -x "$bin" ]; then
  rc=0
  FUZZ_BUILD_DIR="$out" "$src/test/fuzz/build.sh" || rc=$?
  [ "$rc" -eq 0 ] || exit "$rc"
fi
[ -d "$seeds" ] || { echo "no seed corpus at $seeds" >&2; exit 1; }
mkdir -p "$out/corpus/$target" "$out/artifacts"

# -max_len: every seed fits, and the metadata / request formats need no more.
# libFuzzer's own default exit code for a crash is 77, which CTest would show as "skipped": every
# finding must be a failure.
exec "$bin" -max_total_time="$secs" -max_len="${FUZZ_MAX_LEN:-8192}" -timeout=10 \
  -error_exitcode=1 -timeout_exitcode=1 -rss_limit_mb=2048 \
  -artifact_prefix="$out/artifacts/${target}-" -print_final_stats=1 \
  "$@" "$out/corpus/$target" "$seeds"
