#!/usr/bin/env bash
# scripts/datapath-tour.sh (the README's datapath-alone walk) run as a user would, with
# --no-build, in a private state dir: it must finish OK with every step in its summary, and leave
# no daemon, socket or pool volume behind.
. "$(dirname "$0")/lib.sh"
lib_init
need nbdinfo nbdcopy fio jq
export NBDCSI_TOUR_DIR=$W/tour
rc=0
NBDCSI_BIN=$NBDCSI_BIN "$NBDCSI_SRC/scripts/datapath-tour.sh" --no-build >"$W/tour.log" 2>&1 || rc=$?
cat "$W/tour.log"
[ $rc = 0 ] || die "datapath-tour exited $rc"
tail -n1 "$W/tour.log" | grep -qx "datapath-tour: OK" || die "no OK line at the end"
steps=$(sed -n '/^Summary/,$p' "$W/tour.log" | grep -cE '^[0-9]+ ')
[ "$steps" = 9 ] || die "summary lists $steps steps, want 9"
grep -qE '^5 .*sha256 match' "$W/tour.log" || die "the data step did not report a checksum match"
grep -qE '^8 .*2Gi$' "$W/tour.log" || die "the resize step did not report 2Gi"
! pgrep -f -- "$NBDCSI_TOUR_DIR" >/dev/null || die "processes left behind: $(pgrep -af -- "$NBDCSI_TOUR_DIR")"
[ ! -e "$NBDCSI_TOUR_DIR/tour-run/nbd.sock" ] || die "NBD socket left behind"
[ -z "$(ls -A "$NBDCSI_TOUR_DIR/tour-pool/volumes" 2>/dev/null)" ] || die "volumes left in the pool"
echo "datapath tour: OK"
