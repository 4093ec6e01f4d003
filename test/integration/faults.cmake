# The fault matrix (issue 12 part 4): what happens when processes die, disks fill or lie, and
# clients misbehave. Each script or binary states in its header what it proves and prints its
# figures (faults injected, writes verified, errors seen). The long soak is bench/faults_soak.sh;
# kill -9 under live I/O on the kernel NBD driver is test/vm/faults_io_restart.sh.
set(_faults_it ${CMAKE_CURRENT_LIST_DIR})

# kill -9 of the controller, the datapaths and the node plugin at seeded random instants in CSI
# calls, every call retried to success (FAULTS_SEED replays a run). Links the controller suites'
# cluster harness (test/controller/cluster.h), defined in test/controller/controller.cmake,
# which CMake resolves at generate time.
if(TARGET nbd-csi-controller AND TARGET nbd-datapathd AND TARGET nbdctl AND TARGET nbd-csi-node)
  add_executable(faults_kill_test ${_faults_it}/faults_kill_test.cpp)
  target_link_libraries(faults_kill_test PRIVATE nbdcsi_controller_test_cluster nbd_api_proto
                        GTest::gtest_main)
  set_target_properties(faults_kill_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)
  add_dependencies(faults_kill_test nbd-csi-controller nbd-datapathd nbdctl nbd-csi-node)
  nbdcsi_add_test(NAME integration.faults_kill COMMAND faults_kill_test
    TIMEOUT 600 LABELS integration faults SERIAL)
endif()

# Clients that misbehave against one I/O worker, a neighbour volume's QD1 latency watched (SERIAL:
# a latency bound needs the machine's cores to itself).
nbdcsi_add_test(NAME integration.faults_clients
  COMMAND bash ${_faults_it}/faults_clients.sh TIMEOUT 300 LABELS integration faults SERIAL)

# Disk faults: a full pool file system under four NBD clients and a neighbour; damaged metadata;
# missing, short or removed-at-run-time data files.
nbdcsi_add_test(NAME integration.faults_disk
  COMMAND bash ${_faults_it}/faults_disk.sh TIMEOUT 300 LABELS integration faults)
