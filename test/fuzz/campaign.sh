#!/usr/bin/env bash
# The long fuzzing campaign: every target (or the ones named) runs FUZZ_RUNS executions (default
# 10^7), one target after another under `nice`, each from its repository seeds in a fresh
# corpus directory, and the figures go to a Markdown table ($FUZZ_BUILD_DIR/campaign/campaign.md,
# also printed): executions, executions per second, edge coverage and features at the end, corpus
# size, new inputs found, peak memory, wall time, and crashes (a crash stops that target: its
# reproducer is listed and the script exits 1 after the others ran).
#   test/fuzz/campaign.sh                        # all targets, 10^7 runs each
#   FUZZ_RUNS=1000000 test/fuzz/campaign.sh csi_ids qos_params
#   FUZZ_MAX_SECONDS=1800 test/fuzz/campaign.sh  # also stop a target after 30 min (the table
#                                                # then shows how many runs it got)
set -euo pipefail

src="${NBDCSI_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
out="${FUZZ_BUILD_DIR:-$src/build/fuzz}"
runs="${FUZZ_RUNS:-10000000}"
max_secs="${FUZZ_MAX_SECONDS:-0}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(nbd_codec nbd_negotiate api_request qos_params csi_ids pool_metadata pool_load
    backup_manifest)
fi

FUZZ_BUILD_DIR="$out" "$src/test/fuzz/build.sh"
dir="$out/campaign"
mkdir -p "$dir"
table="$dir/campaign.md"
commit=$(git -C "$src" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
{
  echo "Campaign of $(date -u +%Y-%m-%d), commit $commit, $(nproc) cores ($(uname -m)), clang-14"
  echo "libFuzzer + ASan + UBSan, one target at a time under nice:"
  echo "\`FUZZ_RUNS=$runs FUZZ_MAX_SECONDS=$max_secs test/fuzz/campaign.sh${*:+ $*}\`"
  echo
  echo "| target | executions | exec/s | coverage (edges) | features | corpus (seeds) | new inputs | peak RSS MB | wall s | crashes |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
} >"$table"

failed=0
for t in "${targets[@]}"; do
  seeds="$src/test/fuzz/corpus/$t"
  work="$dir/$t"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  log="$work/fuzz.log"
  echo "campaign: $t ($runs runs)" >&2
  start=$(date +%s)
  rc=0
  nice -n 10 "$out/fuzz-bin/fuzz_$t" -runs="$runs" -max_total_time="$max_secs" \
    -max_len="${FUZZ_MAX_LEN:-8192}" -timeout=10 -error_exitcode=1 -timeout_exitcode=1 \
    -rss_limit_mb=2048 \
    -artifact_prefix="$work/artifacts/" -print_final_stats=1 "$work/corpus" "$seeds" \
    >"$log" 2>&1 || rc=$?
  wall=$(($(date +%s) - start))
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  nseeds=$(find "$seeds" -type f | wc -l)
  crashes=0
  what="0"
  if [ "$rc" -ne 0 ]; then
    failed=1
    crashes=$(find "$work/artifacts" -type f | wc -l)
    what="$crashes: $(find "$work/artifacts" -type f -printf '%f ' ) (exit $rc, $log)"
  fi
  echo "| $t | $(stat number_of_executed_units) | $(stat average_exec_per_sec) | ${cov:-?} | ${ft:-?} | ${corp:-?} ($nseeds) | $(stat new_units_added) | $(stat peak_rss_mb) | $wall | $what |" >>"$table"
done
cat "$table"
exit "$failed"
