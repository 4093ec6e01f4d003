#!/usr/bin/env bash
# Schedules (issue 18) through a real nbd-datapathd and nbdctl, with no test-only hook and no
# waiting for a fire time: the schedules used fire once a year (Jan 1 00:00 UTC), and the runner's
# catch-up at start is driven by the state file the daemon itself keeps.
#   - `nbdctl volume schedule` sets, shows (table and JSON, with the next fire time) and clears a
#     schedule; `volume inspect -o json` carries it; bad input is refused with the field named.
#   - The schedule is persisted with the volume: a restarted daemon still has it.
#   - Catch-up: with the recorded baseline moved two years back (two missed fire times), the next
#     start runs the snapshot schedule exactly once, names the snapshot auto-<now>-VOL, prunes
#     beyond the retention, records the run (shown by nbdctl, kept across another restart).
#   - A backup schedule without --backup-secret-dir records a clear error at that catch-up.
. "$(dirname "$0")/lib.sh"
need jq curl
is_datapathd || skip "schedules are nbd-datapathd's feature"
lib_init

daemon_start
vol_create v1 16Mi
STATE=$DAEMON_POOL/schedule-state.json
YEARLY="0 0 1 1 *"

step "set a schedule, show it (table and JSON)"
nbdctl volume schedule v1 --snapshot "$YEARLY" --snapshot-retain 2 \
  --backup "$YEARLY" --target s3://bucket/prefix >"$W/set.out"
grep -qF 'keep 2' "$W/set.out" || die "set: $(cat "$W/set.out")"
nbdctl volume schedule v1 >"$W/show.out"
grep -qF "\"$YEARLY\" (UTC), keep 2" "$W/show.out" || die "show: $(cat "$W/show.out")"
grep -qF 'to s3://bucket/prefix' "$W/show.out" || die "show: $(cat "$W/show.out")"
next_year=$(( $(date -u +%Y) + 1 ))
nbdctl -o json volume schedule v1 | jqx "
  .schedule.snapshot_cron == \"$YEARLY\" and .schedule.snapshot_retain == 2 and
  .schedule.backup_retain == 7 and .schedule.backup_target == \"s3://bucket/prefix\" and
  (.schedule.runs | length) == 2 and
  (.schedule.runs[0].next_fire | startswith(\"$next_year-01-01\")) and
  .schedule.runs[0].result == \"\""
nbdctl -o json volume inspect v1 | jqx '.schedule.snapshot_cron == "0 0 1 1 *"'
nbdctl -o json volume list | jqx '.volumes[0].schedule.backup_cron == "0 0 1 1 *"'

step "bad schedules are refused, naming the problem"
expect_fail 1 "field 2 (hour): 24 is out of range" nbdctl volume schedule v1 --snapshot "0 24 * * *"
expect_fail 2 "--snapshot-retain" nbdctl volume schedule v1 --snapshot "@daily" --snapshot-retain 0
expect_fail 2 "--backup-retain" nbdctl volume schedule v1 --backup "@daily" --backup-retain 1001 \
  --target s3://b
expect_fail 1 "backup target: \"s3://b/\"" nbdctl volume schedule v1 --backup "@daily" --target s3://b/
expect_fail 2 "--backup needs --target" nbdctl volume schedule v1 --backup "@daily"
expect_fail 2 "--clear takes no other option" nbdctl volume schedule v1 --clear --snapshot "@daily"
expect_fail 1 "not found" nbdctl volume schedule nope --snapshot "@daily"
nbdctl -o json volume schedule v1 | jqx '.schedule.snapshot_retain == 2'  # unchanged

step "snapshots the schedule does not own, and the restart keeps the schedule"
nbdctl snapshot create manual --volume v1 >/dev/null
nbdctl snapshot create auto-20200101T0000-v1 --volume v1 >/dev/null  # its form: pruned with it
nbdctl snapshot create auto-20210101T0000-v1 --volume v1 >/dev/null
daemon_stop
# Two fire times missed: the baseline two years back, as if the daemon had been down since.
past=$(( $(date +%s) - 2 * 366 * 86400 ))
cat >"$STATE" <<EOF
{"version": 1, "volumes": {"v1": {
  "snapshot": {"cron": "$YEARLY", "baseline_unix_s": $past, "last_run_unix_s": 0, "result": "",
               "error": "", "made": "", "pruned": 0, "target": ""},
  "backup": {"cron": "$YEARLY", "baseline_unix_s": $past, "last_run_unix_s": 0, "result": "",
             "error": "", "made": "", "pruned": 0, "target": "s3://bucket/prefix"}}}}
EOF
MPORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
daemon_start -- --metrics-listen "127.0.0.1:$MPORT"
snap_ran() { nbdctl -o json volume schedule v1 | jq -e '.schedule.runs[0].result == "ok"' >/dev/null; }
wait_for 20 snap_ran || die "no catch-up run: $(nbdctl volume schedule v1)"

step "catch-up ran once: one new snapshot, the oldest schedule-made one pruned"
nbdctl -o json snapshot list --volume v1 | jq .snapshots >"$W/snaps.json"
made=$(nbdctl -o json volume schedule v1 | jq -r '.schedule.runs[0].made')
[[ $made =~ ^auto-[0-9]{8}T[0-9]{4}-v1$ ]] || die "made: '$made'"
[ "$(jq -r '[.[].name | select(startswith("auto-"))] | length' "$W/snaps.json")" = 2 ] ||
  die "want 2 schedule-made snapshots: $(jq -c '[.[].name]' "$W/snaps.json")"
jq -e --arg m "$made" '[.[].name] | (index($m) != null) and (index("auto-20210101T0000-v1") != null)
  and (index("auto-20200101T0000-v1") == null) and (index("manual") != null)' "$W/snaps.json" \
  >/dev/null || die "snapshots: $(jq -c '[.[].name]' "$W/snaps.json")"
nbdctl -o json volume schedule v1 | jqx "
  .schedule.runs[0].pruned == 1 and
  (.schedule.runs[0].next_fire | startswith(\"$next_year-01-01\"))"
grep -qF "schedules: volume v1: snapshot $made made, 1 older pruned" "$W/datapathd.log" ||
  die "the run is not logged"

step "the backup without --backup-secret-dir recorded a clear error"
# Due at the same pass as the snapshot, it waits for the snapshot's copy (no reflink here), then
# runs at a later pass (every 5 s while it waits).
backup_ran() { nbdctl -o json volume schedule v1 | jq -e '.schedule.runs[1].result != ""' >/dev/null; }
wait_for 30 backup_ran || die "the backup never ran: $(nbdctl volume schedule v1)"
nbdctl -o json volume schedule v1 | jqx '.schedule.runs[1].kind == "backup" and
  .schedule.runs[1].result == "error" and (.schedule.runs[1].error | contains("--backup-secret-dir"))'
nbdctl volume schedule v1 | grep -qF "backup error: " || die "the table does not show the error"

step "the runs in /metrics"
curl -fsS "http://127.0.0.1:$MPORT/metrics" >"$W/metrics.txt" || die "no /metrics"
grep -qE '^nbdcsi_schedule_last_run_success\{(kind="snapshot",volume="v1"|volume="v1",kind="snapshot")\} 1$' \
  "$W/metrics.txt" || die "snapshot success: $(grep nbdcsi_schedule "$W/metrics.txt")"
grep -qE '^nbdcsi_schedule_last_run_success\{(kind="backup",volume="v1"|volume="v1",kind="backup")\} 0$' \
  "$W/metrics.txt" || die "backup failure: $(grep nbdcsi_schedule "$W/metrics.txt")"
grep -qE '^nbdcsi_schedule_next_run_timestamp_seconds\{.*kind="snapshot".*\} ' "$W/metrics.txt" ||
  die "next run: $(grep nbdcsi_schedule "$W/metrics.txt")"

step "another restart: the record is kept, nothing runs again"
daemon_stop
daemon_start
sleep 1
nbdctl -o json volume schedule v1 | jqx ".schedule.runs[0].made == \"$made\" and
  .schedule.runs[0].result == \"ok\" and .schedule.runs[0].pruned == 1"
[ "$(nbdctl -o json snapshot list --volume v1 | jq '[.snapshots[].name | select(startswith("auto-"))] | length')" = 2 ] ||
  die "a second catch-up ran"

step "clear"
nbdctl volume schedule v1 --clear | grep -qF 'has no schedule' || die "clear"
nbdctl -o json volume inspect v1 | jqx '.schedule == null'
daemon_stop
daemon_start
nbdctl -o json volume inspect v1 | jqx '.schedule == null'
daemon_stop
step "PASS"
