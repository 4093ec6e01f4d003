# The dirty-region bitmap of an out-of-sync replica (datapath/replica/region_bitmap.h): its file
# format and header checks, MarkDurable's promise (in the file when it returns, no I/O when it
# already was), torn pages, the copy protocol, and concurrent markers sharing one fdatasync.
nbdcsi_add_gtest(region_bitmap_test ${CMAKE_CURRENT_LIST_DIR}/region_bitmap_test.cpp
                 nbd_replica_client)
