/* err: error codes and person-readable messages. */
#include "base.h"

#include <stdio.h>
#include <string.h>

int tc_err_set(struct tc_err *err, int code, const char *fmt, ...) {
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    err->code = code;
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
  }
  return code;
}

void tc_err_prefix(struct tc_err *err, const char *fmt, ...) {
  if (!err) return;
  char pre[256], old[sizeof err->msg];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(pre, sizeof pre, fmt, ap);
  va_end(ap);
  memcpy(old, err->msg, sizeof old);
  size_t pl = strnlen(pre, sizeof pre - 1);
  memcpy(err->msg, pre, pl);
  size_t o = pl;
  if (o + 2 < sizeof err->msg) err->msg[o++] = ':', err->msg[o++] = ' ';
  size_t ol = strnlen(old, sizeof old);
  if (ol > sizeof err->msg - 1 - o) ol = sizeof err->msg - 1 - o;
  memcpy(err->msg + o, old, ol);
  err->msg[o + ol] = 0;
}

const char *tc_strerror(int code) {
  switch (code) {
  case TC_OK: return "ok";
  case TC_EINVAL: return "invalid argument";
  case TC_ENOMEM: return "out of memory";
  case TC_ENOENT: return "not found";
  case TC_EEXIST: return "already exists";
  case TC_EIO: return "i/o error";
  case TC_EPERM: return "permission denied";
  case TC_EAGAIN: return "try again";
  case TC_ECONFLICT: return "conflict";
  case TC_EEXPIRED: return "expired";
  case TC_ETOOBIG: return "too large";
  case TC_EPROTO: return "protocol error";
  case TC_EDB: return "database error";
  case TC_ESCHEMA: return "database schema mismatch";
  case TC_EINTERNAL: return "internal error";
  default: return "unknown error";
  }
}
