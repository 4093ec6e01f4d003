# bench/replicated_target_bench.sh's helper that writes a replicated volume's cluster state in
# etcd (until the controller does): a tool, not a test.
add_executable(nbdcsi-cluster-tool ${CMAKE_SOURCE_DIR}/bench/cluster_tool.cpp)
target_link_libraries(nbdcsi-cluster-tool PRIVATE nbdcsi_cluster)
set_target_properties(nbdcsi-cluster-tool PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
