# shellcheck shell=bash
# Helpers for the snapshot tests (snap_*.sh) and bench/snapshot_bench.sh, on top of lib.sh.
# Snapshots take different code paths depending on the pool's file system (FICLONE on XFS
# reflink=1, background copy with copy-before-write on ext4), so every test brings its own
# loop-mounted file system instead of trusting whatever /tmp happens to be.
#
#   . "$(dirname "$0")/lib.sh"; . "$(dirname "$0")/snap_lib.sh"
#   lib_init
#   snap_pool_mount xfs|ext4 [IMAGE_SIZE]   # sets MNT, POOL; exit 77 if not root / no loop
#   daemon_start "$POOL"
#   snap_assert_pool xfs|ext4               # pool info: fs_type and reflink as expected
#   snap_create SNAP VOL                    # waits until the snapshot is ready
#   vol_from_snapshot NAME SNAP [--size S]  # waits until the restore is ready
#   vol_from_volume NAME SRC                # clone, waits until ready
#   jget FILE EXPR                          # python expression on the parsed JSON "j"

# shellcheck disable=SC2034  # used by the scripts that source this file
SNAP_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MNT=
POOL=
SNAP_IMG=

# Mounts a fresh sparse image with the given file system under $W/mnt; unmounted and detached
# on exit (after lib.sh has stopped the daemon, so nothing holds it open).
snap_pool_mount() {
  local fs=$1 size=${2:-4G}
  [ "$(id -u)" = 0 ] || skip "needs root to loop-mount an $fs pool"
  SNAP_IMG=${SNAP_IMG_PATH:-$W/pool-$fs.img}
  MNT=$W/mnt-$fs
  mkdir -p "$MNT"
  truncate -s "$size" "$SNAP_IMG"
  case $fs in
    xfs) need mkfs.xfs
         mkfs.xfs -q -f -m reflink=1 "$SNAP_IMG" >"$W/mkfs.log" 2>&1 ||
           skip "mkfs.xfs -m reflink=1 failed: $(tail -1 "$W/mkfs.log")" ;;
    ext4) need mkfs.ext4
          mkfs.ext4 -q -F "$SNAP_IMG" >"$W/mkfs.log" 2>&1 ||
            skip "mkfs.ext4 failed: $(tail -1 "$W/mkfs.log")" ;;
    *) die "snap_pool_mount: unknown file system $fs" ;;
  esac
  mount -o loop "$SNAP_IMG" "$MNT" 2>"$W/mount.log" || skip "mount -o loop failed: $(cat "$W/mount.log")"
  # mount(8) sets autoclear on the loop device, so umount detaches it; losetup -d covers a
  # lazy unmount that left the device behind.
  on_exit "umount '$MNT' || umount -l '$MNT'; for d in \$(losetup -j '$SNAP_IMG' -O NAME -n 2>/dev/null); do losetup -d \$d; done; rm -f '$SNAP_IMG'"
  POOL=$MNT/pool
  mkdir -p "$POOL"
  step "$fs pool mounted at $MNT ($size sparse image)"
}

# jget FILE EXPR: evaluates EXPR with j = the file's JSON (and L = a listing helper).
jget() {
  "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
j = json.load(open(sys.argv[1]))
def L(key):  # a listing may be {"key": [...]} or a bare list
    return j.get(key, []) if isinstance(j, dict) else j
v = eval(sys.argv[2])
print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)
PYEOF
}

snap_assert_pool() {
  local fs=$1 want
  case $fs in xfs) want=true ;; *) want=false ;; esac
  [ "${SNAP_NO_REFLINK:-0}" = 1 ] && want=false  # daemon started with --no-reflink
  nbdctl -o json pool info >"$W/pinfo.json" || die "nbdctl pool info failed"
  local got_fs got_reflink
  got_fs=$(jget "$W/pinfo.json" 'j["fs_type"]')
  got_reflink=$(jget "$W/pinfo.json" 'j.get("reflink")')
  [ "$got_fs" = "$fs" ] || die "pool info fs_type '$got_fs', want $fs"
  [ "$got_reflink" = "$want" ] || die "pool info reflink '$got_reflink' on $fs, want $want"
  step "pool info: fs_type $got_fs, reflink $got_reflink"
}

# wait_json_ready KIND NAME [SECONDS]: polls `nbdctl KIND inspect NAME` until ready is true;
# dies on an error field or on timeout.
wait_json_ready() {
  local kind=$1 name=$2 secs=${3:-60} deadline out=$W/inspect.$1.$2.json
  deadline=$(( $(date +%s) + secs ))
  while :; do
    nbdctl -o json "$kind" inspect "$name" >"$out" 2>"$out.err" || die "$kind inspect $name: $(cat "$out.err")"
    [ "$(jget "$out" 'j.get("ready")')" = true ] && return 0
    local err; err=$(jget "$out" 'j.get("error") or ""')
    [ -z "$err" ] || die "$kind $name failed: $err"
    [ "$(date +%s)" -lt "$deadline" ] || die "$kind $name not ready after ${secs}s: $(cat "$out")"
    sleep 0.05
  done
}

snap_create() {
  local snap=$1 vol=$2
  nbdctl snapshot create "$snap" --volume "$vol" --wait >"$W/snap.$snap.out" 2>&1 ||
    { cat "$W/snap.$snap.out" >&2; die "snapshot create $snap of $vol failed"; }
  wait_json_ready snapshot "$snap"
}

vol_from_snapshot() {
  local name=$1 snap=$2; shift 2
  nbdctl volume create "$name" --from-snapshot "$snap" --wait "$@" >"$W/create.$name.out" 2>&1 ||
    { cat "$W/create.$name.out" >&2; die "volume create $name --from-snapshot $snap failed"; }
  wait_json_ready volume "$name"
}

vol_from_volume() {
  local name=$1 src=$2; shift 2
  nbdctl volume create "$name" --from-volume "$src" --wait "$@" >"$W/create.$name.out" 2>&1 ||
    { cat "$W/create.$name.out" >&2; die "volume create $name --from-volume $src failed"; }
  wait_json_ready volume "$name"
}

# Bytes used on the pool's file system (statvfs), for space accounting.
fs_used_bytes() {
  stat -f -c '%S %b %f' "$1" | awk '{ printf "%d\n", $1 * ($2 - $3) }'
}
