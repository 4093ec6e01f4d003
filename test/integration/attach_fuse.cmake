# The nbdfuse + loop attach path on this machine's own kernel (no nbd.ko needed): attach, mkfs,
# mount, write, fsck, online grow (device and file system), detach leaving nothing behind,
# idempotence, and a datapath restart with a fuse attachment. Needs root, /dev/fuse, loop devices
# and nbdfuse; exits 77 without them unless CI=true. SERIAL: it creates loop devices and mounts,
# which a neighbour's udev-free `losetup -f` could race for.
add_executable(attach-api-client ${CMAKE_CURRENT_LIST_DIR}/attach_api_client.cpp)
target_link_libraries(attach-api-client PRIVATE nbd_api_proto gRPC::grpc++)
target_include_directories(attach-api-client PRIVATE ${CMAKE_SOURCE_DIR})
set_target_properties(attach-api-client PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)
nbdcsi_add_test(NAME integration.attach_fuse
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/attach_fuse.sh
  TIMEOUT 180 LABELS integration attach SERIAL
  ENV ATTACH_API_CLIENT=$<TARGET_FILE:attach-api-client>)
# The growable export (NAME@grow) nbdfuse connects to, through libnbd: no root needed.
nbdcsi_add_test(NAME integration.attach_growable
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/attach_growable.sh
  TIMEOUT 60 LABELS integration attach)
