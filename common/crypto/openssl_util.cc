#include "common/crypto/openssl_util.h"

#include <openssl/err.h>

#include <string>

namespace fedlora::common {

absl::Status OpenSslError(std::string_view context) {
  std::string msg(context);
  msg += ": ";
  bool any = false;
  unsigned long code;  // NOLINT(runtime/int): OpenSSL's type
  while ((code = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof(buf));
    if (any) msg += "; ";
    msg += buf;
    any = true;
  }
  if (!any) msg += "unknown OpenSSL error";
  return absl::InternalError(msg);
}

void ClearOpenSslErrors() { ERR_clear_error(); }

}  // namespace fedlora::common
