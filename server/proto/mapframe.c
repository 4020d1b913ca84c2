/* mapframe: the framing of /machine/map messages (little-endian uint32 size
 * + one zstd frame) and the pure logic of GET /key. Thread-safe. */
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "crypto/crypto.h"
#include "proto/proto.h"

/* Level 1: map messages are small and latency matters more than ratio. */
#define MAP_ZSTD_LEVEL 1

int tc_map_frame(const char *json, size_t len, struct tc_buf *out) {
  size_t bound = ZSTD_compressBound(len);
  if (bound > UINT32_MAX) return TC_ETOOBIG;
  tc_buf_reserve(out, 4 + bound);
  uint8_t *p = (uint8_t *)out->data + out->len;
  size_t n = ZSTD_compress(p + 4, bound, json, len, MAP_ZSTD_LEVEL);
  if (ZSTD_isError(n)) return TC_EINTERNAL;
  p[0] = (uint8_t)n;
  p[1] = (uint8_t)(n >> 8);
  p[2] = (uint8_t)(n >> 16);
  p[3] = (uint8_t)(n >> 24);
  out->len += 4 + n;
  out->data[out->len] = 0;
  return 0;
}

int tc_map_unframe(const uint8_t *buf, size_t len, size_t max_json, size_t *consumed, char **json, size_t *json_len) {
  if (len < 4) return TC_EAGAIN;
  size_t n = (size_t)buf[0] | (size_t)buf[1] << 8 | (size_t)buf[2] << 16 | (size_t)buf[3] << 24;
  if (n > max_json + 64) return TC_ETOOBIG;
  if (len < 4 + n) return TC_EAGAIN;
  unsigned long long sz = ZSTD_getFrameContentSize(buf + 4, n);
  if (sz == ZSTD_CONTENTSIZE_ERROR) return TC_EPROTO;
  /* ZSTD_compress always records the size; a frame without it is refused
   * rather than streamed (this decoder serves tests, not the wild). */
  if (sz == ZSTD_CONTENTSIZE_UNKNOWN) return TC_EPROTO;
  if (sz > max_json) return TC_ETOOBIG;
  char *out = tc_xmalloc((size_t)sz + 1);
  size_t got = ZSTD_decompress(out, (size_t)sz, buf + 4, n);
  if (ZSTD_isError(got) || got != sz) {
    free(out);
    return TC_EPROTO;
  }
  out[got] = 0;
  *json = out;
  *json_len = got;
  *consumed = 4 + n;
  return 0;
}

/* Finds "v" in a raw query; decimal digits only (capability versions). */
static int query_version(const char *q, long *v) {
  const char *p = q;
  while (p && *p) {
    const char *amp = strchr(p, '&');
    size_t n = amp ? (size_t)(amp - p) : strlen(p);
    if (n >= 2 && p[0] == 'v' && p[1] == '=') {
      if (n == 2 || n > 8) return TC_EINVAL;
      long val = 0;
      for (size_t i = 2; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return TC_EINVAL;
        val = val * 10 + (p[i] - '0');
      }
      *v = val;
      return 0;
    }
    p = amp ? amp + 1 : NULL;
  }
  return TC_ENOENT;
}

void tc_ctl_key_response(const uint8_t server_pub[32], const char *query, int *status, char **body) {
  long v;
  int rc = query_version(query ? query : "", &v);
  if (rc == TC_ENOENT) {
    *status = 400;
    *body = tc_xstrdup("missing version");
    return;
  }
  if (rc) {
    *status = 400;
    *body = tc_xstrdup("invalid version");
    return;
  }
  static const uint8_t zero[32];
  char legacy[TC_KEY_TEXT_MAX], pub[TC_KEY_TEXT_MAX];
  tc_key_format(TC_KEY_MACHINE, zero, legacy);
  tc_key_format(TC_KEY_MACHINE, server_pub, pub);
  *status = 200;
  *body = tc_xasprintf("{\"legacyPublicKey\":\"%s\",\"publicKey\":\"%s\"}", legacy, pub);
}
