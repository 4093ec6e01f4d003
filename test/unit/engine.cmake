# The io_uring NBD engine in-process (datapath/engine): a real pool in a temp dir, the frontend on
# a Unix socket, and a raw NBD client that can force deep pipelines, split requests, vanishing
# clients and shutdown with live connections. Labelled "engine" so it can be run alone.
nbdcsi_add_gtest(engine_test ${CMAKE_CURRENT_LIST_DIR}/engine_test.cpp nbd_engine nbd_pool
                 nbdcsi_common)
set_property(TEST unit.engine_test APPEND PROPERTY LABELS engine)
set_property(TEST unit.engine_test PROPERTY TIMEOUT 60)
if(NBDCSI_SANITIZE)
  set_property(TEST unit.engine_test APPEND PROPERTY LABELS asan)
endif()

# The request and connection life cycles of the workers as tables, and the SQE identity (Tag).
nbdcsi_add_gtest(request_state_test ${CMAKE_CURRENT_LIST_DIR}/request_state_test.cpp nbd_engine)
set_property(TEST unit.request_state_test APPEND PROPERTY LABELS engine)
