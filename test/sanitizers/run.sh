#!/usr/bin/env bash
# Runs one test of a sanitizer tree (build-asan, build-tsan) so that any sanitizer report fails it.
# nbdcsi_add_test (cmake/NbdCsi.cmake) puts this in front of every test command of such a tree.
#   run.sh <kind: asan|tsan> <report-dir> <command...>
#
# Each process the test starts (gtest binaries, nbd-datapathd, nbd-csi-controller, nbd-csi-node,
# nbdctl...) writes its reports to <report-dir>/<tool>.<pid> (log_path). Files rather than stderr,
# because the integration scripts keep a daemon's stderr in a temp dir they delete, and a daemon's
# exit status is not always checked (kill -9 tests). The test fails when that directory is not
# empty, whatever the command's exit status; a clean run keeps the command's status, 77 included.
# halt_on_error: the first report ends the process, so the failure is near its cause.
set -uo pipefail
kind=$1 dir=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$dir"
mkdir -p "$dir"
common="halt_on_error=1:print_summary=1:log_exe_name=1"
case $kind in
  asan)
    # detect_leaks: daemons exit through main on SIGTERM, so leak checks run there too.
    # detect_stack_use_after_return is off by default in GCC 12's runtime; it catches a returned
    # reference to a local (a class of bug the engine's callbacks could have).
    export ASAN_OPTIONS="log_path=$dir/report:$common:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:suppressions=$here/asan.supp${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
    export LSAN_OPTIONS="suppressions=$here/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
    export UBSAN_OPTIONS="log_path=$dir/report:$common:print_stacktrace=1:suppressions=$here/ubsan.supp${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
    ;;
  tsan)
    # second_deadlock_stack: lock-order reports name both acquisitions.
    export TSAN_OPTIONS="log_path=$dir/tsan:$common:second_deadlock_stack=1:suppressions=$here/tsan.supp${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
    ;;
  *) echo "run.sh: unknown sanitizer kind '$kind'" >&2; exit 2 ;;
esac
"$@"
rc=$?
shopt -s nullglob
reports=("$dir"/*)
if [ ${#reports[@]} -gt 0 ]; then
  echo "=== ${#reports[@]} sanitizer report(s) in $dir (test exit status $rc):" >&2
  for r in "${reports[@]}"; do
    echo "--- $r" >&2
    head -n 120 "$r" >&2
  done
  exit 1
fi
exit $rc
