# NBD codec and option negotiation (datapath/nbd): pure functions, so plain gtests.
nbdcsi_add_gtest(nbd_codec_test ${CMAKE_CURRENT_LIST_DIR}/nbd_codec_test.cpp nbd_codec)
nbdcsi_add_gtest(nbd_negotiate_test ${CMAKE_CURRENT_LIST_DIR}/nbd_negotiate_test.cpp nbd_codec)

# The codec parses untrusted bytes, so its tests also run under ASan/UBSan in every build
# (a few small files, seconds to build). Skipped when the whole tree is already sanitized.
if(NOT NBDCSI_SANITIZE)
  get_target_property(_nbd_dir nbd_codec SOURCE_DIR)
  get_target_property(_nbd_srcs nbd_codec SOURCES)
  get_target_property(_nbd_inc nbd_codec INTERFACE_INCLUDE_DIRECTORIES)
  list(TRANSFORM _nbd_srcs PREPEND ${_nbd_dir}/)
  add_library(nbd_codec_san STATIC ${_nbd_srcs})
  target_include_directories(nbd_codec_san PUBLIC ${_nbd_inc})
  target_compile_options(nbd_codec_san PUBLIC
    -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  target_link_options(nbd_codec_san PUBLIC -fsanitize=address,undefined)
  foreach(t nbd_codec_test nbd_negotiate_test)
    nbdcsi_add_gtest(${t}_san ${CMAKE_CURRENT_LIST_DIR}/${t}.cpp nbd_codec_san)
  endforeach()
endif()

# The NBD TLS plumbing (datapath/engine/nbd_tls): the server context's load and reload rules and
# the terminator, between an OpenSSL client and a socketpair. Certificates from make-certs.sh.
nbdcsi_add_gtest(nbd_tls_test ${CMAKE_CURRENT_LIST_DIR}/nbd_tls_test.cpp nbd_engine)
