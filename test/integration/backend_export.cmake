# Backend exports (NAME@target, issue 16) with real, independent NBD clients: nbdinfo, nbdcopy and
# fio's nbd engine (libnbd) against the real engine serving an in-memory ExportBackend
# (backend_export_server, a test-only tool). The engine's side of the replicated target, without
# the replica set.
add_executable(backend_export_server ${CMAKE_CURRENT_LIST_DIR}/backend_export_server.cpp)
target_link_libraries(backend_export_server PRIVATE nbd_engine nbd_pool nbdcsi_common)
set_target_properties(backend_export_server PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                      ${CMAKE_BINARY_DIR}/test-bin)
# SERIAL for fio, as interop_fio: a parallel neighbour on 2 cores would turn its run into noise.
nbdcsi_add_test(NAME integration.backend_export
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/backend_export.sh $<TARGET_FILE:backend_export_server>
  TIMEOUT 180 LABELS integration engine SERIAL)
