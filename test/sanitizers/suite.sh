#!/usr/bin/env bash
# The asan.suite / tsan.suite tests of the plain tree (test/sanitize.cmake): run the tests labelled
# <label> of a sanitizer tree with a nested CTest, so that one CTest summary covers all three
# builds and a failure there fails the outer run.
#   suite.sh <kind> <tree> <label>
# Runs when scripts/test.sh built that tree for this run (NBDCSI_ASAN=1 / NBDCSI_TSAN=1: both
# with CI=true or NBDCSI_SANITIZERS=1); otherwise skips (77), so a local `ctest` in build/ does
# not start a long run against a stale sanitizer tree. The ASan tree runs NBDCSI_ASAN_LABEL when
# set (CI=true alone: asan-ci, CI's share) instead of <label>. Under CI=true neither suite is ever
# skipped and a tree that was asked for but is missing is a failure.
set -uo pipefail
kind=$1 tree=$2 label=$3
want=0
[ "$kind" = asan ] && want=${NBDCSI_ASAN:-0} label=${NBDCSI_ASAN_LABEL:-$label}
[ "$kind" = tsan ] && want=${NBDCSI_TSAN:-0}
[ "${NBDCSI_SANITIZERS:-}" = 1 ] && want=1
if [ "$want" != 1 ]; then
  if [ "${CI:-}" = true ]; then
    echo "$kind.suite: CI=true but the $kind tree was not built for this run (use scripts/test.sh)" >&2
    exit 1
  fi
  echo "$kind.suite: skipped (scripts/test.sh builds and runs it with CI=true or NBDCSI_SANITIZERS=1)"
  exit 77
fi
if [ ! -f "$tree/CTestTestfile.cmake" ] || [ ! -f "$tree/.built" ]; then
  echo "$kind.suite: $tree is not built (scripts/test.sh builds it when CI=true or NBDCSI_SANITIZERS=1)" >&2
  [ "${CI:-}" = true ] && exit 1
  exit 77
fi
log=$tree/ctest-suite.log
echo "$kind.suite: ctest -L '^$label\$' in $tree (log: $log)"
rc=0
# The outer test is RUN_SERIAL, so the nested run has both cores.
ctest --test-dir "$tree" -L "^$label\$" -j"$(nproc)" --output-on-failure \
  >"$log" 2>&1 || rc=$?
# The summary and any failures, so that the outer --output-on-failure shows them.
sed -n '/tests passed\|tests failed/,$p' "$log"
total=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#' "$log" || true)
if [ "$total" = 0 ]; then
  echo "$kind.suite: no test ran in $tree with label $label" >&2
  exit 1
fi
if [ $rc != 0 ]; then
  echo "=== $kind.suite: failures in $tree; their output:" >&2
  # Everything CTest printed for the failing tests (--output-on-failure), bounded.
  grep -vE '^ *[0-9]+/[0-9]+ Test +#.* Passed' "$log" | tail -n 400 >&2
  exit 1
fi
exit 0
