# The container image (test/image/image_test.sh): image.build makes it (scripts/build-image.sh,
# skipped when it is newer than the binaries) for the checks that follow and for the e2e test.
nbdcsi_add_test(NAME image.build
  COMMAND ${CMAKE_SOURCE_DIR}/test/image/image_test.sh build
  TIMEOUT 900 LABELS image SERIAL)
set_tests_properties(image.build PROPERTIES FIXTURES_SETUP nbdcsi_image)
foreach(case ldd tools user size labels)
  nbdcsi_add_test(NAME image.${case}
    COMMAND ${CMAKE_SOURCE_DIR}/test/image/image_test.sh ${case}
    TIMEOUT 300 LABELS image)
  set_tests_properties(image.${case} PROPERTIES FIXTURES_REQUIRED nbdcsi_image)
endforeach()
# build-image.sh clean, in a private mount namespace: needs no image.
nbdcsi_add_test(NAME image.cleanup
  COMMAND ${CMAKE_SOURCE_DIR}/test/image/image_test.sh cleanup
  TIMEOUT 60 LABELS image)
# podman builds the Dockerfile (compiling the tree; the machine's ccache is lent to it) and the
# result is compared with image.build's: long, and both cores busy.
nbdcsi_add_test(NAME image.dockerfile
  COMMAND ${CMAKE_SOURCE_DIR}/test/image/image_test.sh dockerfile
  TIMEOUT 3600 LABELS image SERIAL)
set_tests_properties(image.dockerfile PROPERTIES FIXTURES_REQUIRED nbdcsi_image)
