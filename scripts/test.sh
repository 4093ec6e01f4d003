#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, runs every test.
# The last line of its output is CTest's summary.
#   scripts/test.sh [ctest args...]      e.g. scripts/test.sh -L unit
#
# Sanitizer trees (test/sanitize.cmake says which test runs where):
#   TSan  (build-tsan, only the tests it runs): with CI=true, or NBDCSI_SANITIZERS=1.
#   ASan+UBSan (build-asan): with NBDCSI_SANITIZERS=1, every unit/controller/integration test
#         and one VM test (label asan-suite; they then run inside asan.suite instead of in
#         build/); with CI=true alone, CI's share (label asan-ci: the core unit tests, the
#         controller's decision tests and that VM test, only their targets built), as the whole
#         suite does not fit CI's 60-minute budget on 2 cores beside the plain run (README
#         "Sanitizers").
# A failing build of a sanitizer tree does not stop the run: its suite test then fails ("not
# built"), so the summary still says so.
# The e2e (a Kubernetes cluster, ~15 min) and image (a root file system, ~8 min; the Dockerfile
# build up to an hour) labels run only when asked: scripts/test.sh -L 'e2e|image'.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh all
preset=default
asan=0 tsan=0
asan_label=asan-suite asan_targets=()
[ "${NBDCSI_SANITIZERS:-0}" = 1 ] && asan=1 tsan=1
if [ "${CI:-}" = true ]; then
  preset=ci
  tsan=1
  if [ "$asan" = 0 ]; then
    asan=1 asan_label=asan-ci asan_targets=(sanitize_asan_ci)
  fi
fi
# Read by test/sanitizers/suite.sh: which sanitizer suites this run builds (the others skip), and
# which label of the ASan tree it runs.
export NBDCSI_ASAN=$asan NBDCSI_TSAN=$tsan NBDCSI_ASAN_LABEL=$asan_label

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
rm -f build-asan/.built build-tsan/.built build-asan/ctest-suite.log build-tsan/ctest-suite.log
if [ "$asan" = 1 ] && timed_build asan asan "${asan_targets[@]}"; then touch build-asan/.built; fi
if [ "$tsan" = 1 ] && timed_build tsan tsan sanitize_tsan_tests; then touch build-tsan/.built; fi
cat build-times.log

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  # Without ctest arguments: everything but e2e and image; what asan.suite runs under ASan does
  # not run again here (CI's share: only its VM test; its unit tests are cheap and run in both).
  if [ "$asan" = 1 ] && [ "$asan_label" = asan-suite ]; then
    args=(-LE '^(e2e|image|asan-suite)$')
  elif [ "$asan" = 1 ]; then
    args=(-LE '^(e2e|image|asan-vm)$')
  else
    args=(-LE '^(e2e|image)$' -E '^asan\.suite$')
  fi
fi
cd build
status=0
ctest --output-on-failure -j"$(nproc)" "${args[@]}" 2>&1 | tee ctest.log || status=$?
if [ "$asan" = 1 ] || [ "$tsan" = 1 ]; then
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
