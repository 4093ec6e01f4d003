# The replica client (datapath/replica) against real NBD servers: qemu-nbd and nbdkit (memory
# plugin), plaintext on a Unix socket and mutual TLS on loopback TCP, and nbd-datapathd on its
# TLS TCP listener. Random writes with FUA and flushes, trims and zeroes, read back through the
# client and through nbdcopy; the server killed mid-I/O; a wrong CA and a wrong node refused.
if(TARGET nbd-datapathd AND TARGET nbdctl)
  add_executable(replica_client_it ${CMAKE_CURRENT_LIST_DIR}/replica_client_it.cpp)
  target_link_libraries(replica_client_it PRIVATE nbd_replica_client GTest::gtest_main)
  set_target_properties(replica_client_it PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                        ${CMAKE_BINARY_DIR}/test-bin)
  add_dependencies(replica_client_it nbd-datapathd nbdctl)
  nbdcsi_add_test(NAME integration.replica_client COMMAND replica_client_it
    TIMEOUT 300 LABELS integration tls)
endif()

# bench/replica_client_bench.sh's load generator (not a test).
add_executable(replica_client_bench ${CMAKE_SOURCE_DIR}/bench/replica_client_bench.cpp)
target_link_libraries(replica_client_bench PRIVATE nbd_replica_client)
set_target_properties(replica_client_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
