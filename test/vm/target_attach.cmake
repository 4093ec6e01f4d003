# nbdcsi-cluster-tool (test/support/cluster_tool.cpp): writes a replicated volume's state into
# etcd the way the controller will, for tests that run real daemons before the controller does.
# Guarded: another fragment (bench/) may define the same tool.
if(NOT TARGET nbdcsi-cluster-tool)
  add_executable(nbdcsi-cluster-tool ${CMAKE_SOURCE_DIR}/test/support/cluster_tool.cpp)
  target_link_libraries(nbdcsi-cluster-tool PRIVATE nbdcsi_cluster nbdcsi_common CLI11::CLI11)
  set_target_properties(nbdcsi-cluster-tool PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                        ${CMAKE_BINARY_DIR}/bin)
endif()
# The kernel NBD device on a replicated volume's target (issue 16), in the VM: etcd, two replica
# datapaths with TLS node certificates and a target datapath, `nbdctl attach --target`, ext4 and
# fio with verify on /dev/nbdN while one replica is killed with -9 (target_attach_run.sh makes
# the certificates on the host and ships etcd into the VM). SERIAL: the VM uses both cores.
nbdcsi_add_test(NAME vm.target_attach
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/target_attach_run.sh
    $<TARGET_FILE:nbd-datapathd> $<TARGET_FILE:nbdctl> $<TARGET_FILE:nbdcsi-cluster-tool>
  TIMEOUT 300 LABELS vm attach SERIAL)
