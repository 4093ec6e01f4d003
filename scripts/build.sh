#!/usr/bin/env bash
# Configures (once) and builds nbd-csi; binaries land in <dir>/bin, test binaries in <dir>/test-bin.
#   scripts/build.sh [preset [target...]]
#     default, ci  -> build/       (ci: warnings are errors)
#     asan         -> build-asan/  (AddressSanitizer + UBSan, -O1)
#     tsan         -> build-tsan/  (ThreadSanitizer)
# With targets, only those are built (CI builds only the TSan tests it runs, see test/sanitize.cmake).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-default}
[ $# -gt 0 ] && shift
case $preset in
  asan) dir=build-asan ;;
  tsan) dir=build-tsan ;;
  *) dir=build ;;
esac
if [ ! -f "$dir/build.ninja" ] || [ "$(cat "$dir/.preset" 2>/dev/null)" != "$preset" ]; then
  cmake --preset "$preset" >/dev/null
  echo "$preset" > "$dir/.preset"
fi
targets=()
[ $# -gt 0 ] && targets=(--target "$@")
cmake --build "$dir" -j"$(nproc)" "${targets[@]}"
