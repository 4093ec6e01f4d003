# Integration tests with real, independent NBD clients (nbdinfo, nbdcopy, qemu-io, qemu-img,
# fio, libnbd from Python) against nbd-datapathd. Each script sources lib.sh, which finds the
# binaries through NBDCSI_BIN (set by nbdcsi_add_test) and exits 77 only when an external tool
# is missing. Run one against a reference server with NBDCSI_SERVER=qemu-nbd|nbdkit.
set(_nbd_it ${CMAKE_CURRENT_LIST_DIR})

foreach(t nbdinfo nbdcopy qemu_io map multiconn)
  nbdcsi_add_test(NAME integration.interop_${t}
    COMMAND bash ${_nbd_it}/interop_${t}.sh TIMEOUT 120 LABELS integration)
endforeach()
# fio and the timing-sensitive tests get the machine to themselves: with 2 cores, a parallel
# neighbour would starve them and turn a throughput band into noise.
nbdcsi_add_test(NAME integration.interop_fio
  COMMAND bash ${_nbd_it}/interop_fio.sh TIMEOUT 180 LABELS integration SERIAL)
nbdcsi_add_test(NAME integration.proto_edge
  COMMAND bash ${_nbd_it}/proto_edge.sh TIMEOUT 180 LABELS integration)
nbdcsi_add_test(NAME integration.proto_fulldisk
  COMMAND bash ${_nbd_it}/proto_fulldisk.sh TIMEOUT 120 LABELS integration)
nbdcsi_add_test(NAME integration.qos_throttle
  COMMAND bash ${_nbd_it}/qos_throttle.sh TIMEOUT 120 LABELS integration qos SERIAL)
