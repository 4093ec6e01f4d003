#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, runs every test.
# The last line of its output is CTest's summary.
#   scripts/test.sh [ctest args...]      e.g. scripts/test.sh -L unit
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh all
preset=default
[ "${CI:-}" = true ] && preset=ci
./scripts/build.sh "$preset"
cd build
status=0
ctest --output-on-failure -j"$(nproc)" "$@" 2>&1 | tee ctest.log || status=$?
# CTest prints its summary ("N% tests passed, M tests failed out of T") near the end;
# repeat it so it is the last line whatever else ran.
grep -E '^[0-9]+% tests passed' ctest.log | tail -1 || true
exit $status
