# The controller's NodeRegistry, and real nbd-datapathd processes heartbeating over mutual TLS to
# an in-test Registry server. Certificates: test/tls/make-certs.sh into a temp dir.
nbdcsi_add_gtest(registry_test ${CMAKE_CURRENT_LIST_DIR}/registry_test.cpp nbd_api)
# The registry and the controller's gRPC datapath client are compiled in directly rather than
# through nbdcsi_controller, so this test depends only on them, not on the rest of the controller.
target_sources(registry_test PRIVATE ${CMAKE_SOURCE_DIR}/controller/registry.cpp
               ${CMAKE_SOURCE_DIR}/controller/grpc_node_datapath.cpp)
# It starts the real daemon (NBDCSI_BIN/nbd-datapathd).
add_dependencies(registry_test nbd-datapathd)
