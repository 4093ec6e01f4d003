// A C library's object owned by std::unique_ptr and released with the library's own function:
//   CPtr<libmnt_table, mnt_unref_table> tb(mnt_new_table());
// One deleter for every C API the daemons use (libmount, libblkid, libnl, OpenSSL), so none of
// them grows its own set of deleter structs.
#pragma once

#include <memory>

namespace nbdcsi {

// Calls Free(p); what Free returns (BIO_free's int, say) is dropped.
template <auto Free>
struct FreeWith {
  template <typename T>
  void operator()(T* p) const {
    Free(p);
  }
};

template <typename T, auto Free>
using CPtr = std::unique_ptr<T, FreeWith<Free>>;

}  // namespace nbdcsi
