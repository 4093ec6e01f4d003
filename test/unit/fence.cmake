# Fencing below the engine (docs/design.md "Fencing"): export-name parsing, the pool's durable
# fence epoch. The engine's side is in engine_test, crash safety in pool_crash_test.
nbdcsi_add_gtest(fence_test ${CMAKE_CURRENT_LIST_DIR}/fence_test.cpp nbd_engine nbd_pool
                 nbdcsi_common)
set_property(TEST unit.fence_test APPEND PROPERTY LABELS engine)
