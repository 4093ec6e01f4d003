# NBD over TCP with TLS (STARTTLS, mutual TLS) against real clients: nbdinfo, nbdcopy, qemu-img,
# qemu-io (GnuTLS) and raw sockets through Python's ssl (OpenSSL); the daemon's TLS flags; and
# certificate rotation under a live connection. Certificates: test/tls/make-certs.sh in the
# test's work dir.
set(_nbd_tls_it ${CMAKE_CURRENT_LIST_DIR})
foreach(t clients proto flags rotate)
  nbdcsi_add_test(NAME integration.nbd_tls_${t}
    COMMAND bash ${_nbd_tls_it}/nbd_tls_${t}.sh TIMEOUT 180 LABELS integration tls)
endforeach()
