# Backend exports (NAME@target, issue 16) through the real engine: an in-memory ExportBackend
# behind the seam, NbdFrontend on a Unix socket, ReplicaClient and raw NBD clients. Labelled
# "engine" with engine_test; under TSan in CI (test/sanitize.cmake).
nbdcsi_add_gtest(backend_export_test ${CMAKE_CURRENT_LIST_DIR}/backend_export_test.cpp nbd_engine
                 nbd_pool nbd_replica_client nbdcsi_common)
set_property(TEST unit.backend_export_test APPEND PROPERTY LABELS engine)
set_property(TEST unit.backend_export_test PROPERTY TIMEOUT 90)
