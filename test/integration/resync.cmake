# Resync between real replicas (datapath/replica/resync.h): two nbd-datapathd processes with their
# own pools, the destination over mutual TLS on 127.0.0.1. Dirty-region resync copies only the
# regions a RegionBitmap marked; full rebuilds skip holes by BLOCK_STATUS from nbd-datapathd and
# from qemu-nbd; every result compared byte for byte through nbdcopy and cmp.
if(TARGET nbd-datapathd AND TARGET nbdctl)
  add_executable(resync_it ${CMAKE_CURRENT_LIST_DIR}/resync_it.cpp)
  target_link_libraries(resync_it PRIVATE nbd_replica_client GTest::gtest_main)
  set_target_properties(resync_it PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)
  add_dependencies(resync_it nbd-datapathd nbdctl)
  nbdcsi_add_test(NAME integration.resync COMMAND resync_it TIMEOUT 300 LABELS integration tls)
endif()

# bench/resync_bench.sh's driver (not a test): one Resync job between two NBD servers.
add_executable(resync_cli ${CMAKE_CURRENT_LIST_DIR}/resync_cli.cpp)
target_link_libraries(resync_cli PRIVATE nbd_replica_client)
set_target_properties(resync_cli PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
