# The controller's NodeRegistry, and real nbd-datapathd processes heartbeating over mutual TLS to
# an in-test Registry server. Certificates: test/tls/make-certs.sh into a temp dir.
nbdcsi_add_gtest(registry_test ${CMAKE_CURRENT_LIST_DIR}/registry_test.cpp nbd_api)
# The registry is compiled in directly rather than through nbdcsi_controller, so this test
# depends only on the registry, not on the rest of the controller.
target_sources(registry_test PRIVATE ${CMAKE_SOURCE_DIR}/controller/registry.cpp)
# It starts the real daemon (NBDCSI_BIN/nbd-datapathd).
add_dependencies(registry_test nbd-datapathd)
