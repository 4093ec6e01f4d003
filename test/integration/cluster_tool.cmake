# nbdcsi-cluster-tool (test/support/cluster_tool.cpp): writes and reads a replicated volume's
# state in etcd the way the controller will, for the tests and benches that run real daemons
# before the controller does (vm.target_attach, bench/replicated_target_bench.sh). A tool, not a
# test.
add_executable(nbdcsi-cluster-tool ${CMAKE_SOURCE_DIR}/test/support/cluster_tool.cpp)
target_link_libraries(nbdcsi-cluster-tool PRIVATE nbdcsi_cluster nbdcsi_common CLI11::CLI11)
set_target_properties(nbdcsi-cluster-tool PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
