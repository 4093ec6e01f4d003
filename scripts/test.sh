#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, runs every test.
# The last line of its output is CTest's summary.
#   scripts/test.sh [ctest args...]      e.g. scripts/test.sh -L unit
#
# With CI=true (or NBDCSI_SANITIZERS=1) it also builds the ASan+UBSan tree (build-asan) and the
# TSan tree (build-tsan, only the tests it runs), and the run is split as test/sanitize.cmake
# says: the tests labelled asan-suite run inside asan.suite (ASan) instead of in build/, and
# tsan.suite runs the TSan selection. A failing build of a sanitizer tree does not stop the run:
# its suite test then fails ("not built"), so the summary still says so.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh all
preset=default
san=${NBDCSI_SANITIZERS:-0}
if [ "${CI:-}" = true ]; then
  preset=ci
  san=1
fi
export NBDCSI_SANITIZERS=$san   # read by test/sanitizers/suite.sh

# Wall and CPU time of each build, for the README's CI budget.
TIMEFORMAT='%R s wall, %U s user, %S s sys'
timed_build() {
  local label=$1
  shift
  local t rc=0
  # time's report goes to the captured stderr; the build's own output to the real stdout/stderr.
  { t=$( { time ./scripts/build.sh "$@" >&3 2>&4; } 2>&1 ); } 3>&1 4>&2 || rc=$?
  if [ $rc = 0 ]; then
    echo "build $label: $t" >>build-times.log
  else
    echo "build $label: FAILED (exit $rc) after $t" >>build-times.log
  fi
  return $rc
}
: >build-times.log
timed_build "$preset" "$preset"
if [ "$san" = 1 ]; then
  rm -f build-asan/.built build-tsan/.built build-asan/ctest-suite.log build-tsan/ctest-suite.log
  if timed_build asan asan; then touch build-asan/.built; fi
  if timed_build tsan tsan sanitize_tsan_tests; then touch build-tsan/.built; fi
fi
cat build-times.log

args=("$@")
# Without ctest arguments, what asan.suite runs under ASan does not run again here.
[ "$san" = 1 ] && [ ${#args[@]} -eq 0 ] && args=(-LE '^asan-suite$')
cd build
status=0
ctest --output-on-failure -j"$(nproc)" "${args[@]}" 2>&1 | tee ctest.log || status=$?
if [ "$san" = 1 ]; then
  for tree in ../build-asan ../build-tsan; do
    [ -f "$tree/ctest-suite.log" ] || continue
    s=$(grep -E '^[0-9]+% tests passed' "$tree/ctest-suite.log" | tail -1 || true)
    echo "${tree#../}: ${s:-no summary}"
  done
fi
# CTest prints its summary ("N% tests passed, M tests failed out of T") near the end;
# repeat it so it is the last line whatever else ran.
grep -E '^[0-9]+% tests passed' ctest.log | tail -1 || true
exit $status
