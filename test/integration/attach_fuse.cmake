# The nbdfuse + loop attach path on this machine's own kernel (no nbd.ko needed): attach, mkfs,
# mount, write, fsck, online grow (device and file system), detach leaving nothing behind,
# idempotence, and a datapath restart with a fuse attachment. Needs root, /dev/fuse, loop devices
# and nbdfuse; exits 77 without them unless CI=true. SERIAL: it creates loop devices and mounts,
# which a neighbour's udev-free `losetup -f` could race for.
nbdcsi_add_test(NAME integration.attach_fuse
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/attach_fuse.sh
  TIMEOUT 180 LABELS integration attach SERIAL)
# The growable export (NAME@grow) nbdfuse connects to, through libnbd: no root needed.
nbdcsi_add_test(NAME integration.attach_growable
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/attach_growable.sh
  TIMEOUT 60 LABELS integration attach)
