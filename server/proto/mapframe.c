/* mapframe: the framing of /machine/map messages (little-endian uint32 size
 * + zstd frames) and the pure logic of GET /key. Thread-safe. */
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

/* The payload may be several zstd frames (and skippable frames) back to
 * back, as the client's decoder (klauspost/compress DecodeAll) accepts: the
 * output is their concatenation. Frames need not record their size; the
 * decoded total is bounded by max_json while decoding, so a small hostile
 * payload cannot make us allocate more than that. */
int tc_map_unframe(const uint8_t *buf, size_t len, size_t max_json, size_t *consumed, char **json, size_t *json_len) {
  if (len < 4) return TC_EAGAIN;
  size_t n = (size_t)buf[0] | (size_t)buf[1] << 8 | (size_t)buf[2] << 16 | (size_t)buf[3] << 24;
  if (n > max_json + 64) return TC_ETOOBIG;
  if (len < 4 + n) return TC_EAGAIN;
  if (n == 0) return TC_EPROTO;
  /* Pre-size from the recorded content sizes; frames without one grow it. */
  unsigned long long known = 0;
  for (size_t off = 0; off < n;) {
    size_t fl = ZSTD_findFrameCompressedSize(buf + 4 + off, n - off);
    if (ZSTD_isError(fl) || fl == 0) return TC_EPROTO;
    unsigned long long sz = ZSTD_getFrameContentSize(buf + 4 + off, fl);
    if (sz == ZSTD_CONTENTSIZE_ERROR) return TC_EPROTO;
    if (sz != ZSTD_CONTENTSIZE_UNKNOWN) known += sz;
    if (known > max_json) return TC_ETOOBIG;
    off += fl;
  }
  ZSTD_DCtx *d = ZSTD_createDCtx();
  if (!d) return TC_EINTERNAL;
  size_t cap = (size_t)known + 1, rc = 0;
  char *out = tc_xmalloc(cap + 1);
  ZSTD_inBuffer in = {buf + 4, n, 0};
  ZSTD_outBuffer ob = {out, cap, 0};
  int res = 0;
  for (;;) {
    if (ob.pos == ob.size) {
      /* cap is at most max_json + 1: one byte more than allowed means too big */
      if (cap > max_json) {
        res = TC_ETOOBIG;
        break;
      }
      cap = cap * 2 > max_json + 1 ? max_json + 1 : cap * 2;
      out = tc_xrealloc(out, cap + 1);
      ob.dst = out;
      ob.size = cap;
    }
    size_t in0 = in.pos, out0 = ob.pos;
    rc = ZSTD_decompressStream(d, &ob, &in);
    if (ZSTD_isError(rc)) {
      res = TC_EPROTO;
      break;
    }
    if (in.pos == in.size && rc == 0) break; /* every frame complete */
    if (ob.pos < ob.size && (in.pos == in.size || (in.pos == in0 && ob.pos == out0))) {
      res = TC_EPROTO; /* truncated frame: no more input to finish it */
      break;
    }
  }
  ZSTD_freeDCtx(d);
  if (!res && ob.pos > max_json) res = TC_ETOOBIG;
  if (!res && ob.pos == 0) res = TC_EPROTO; /* only skippable frames: no message */
  if (res) {
    free(out);
    return res;
  }
  out[ob.pos] = 0;
  *json = out;
  *json_len = ob.pos;
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
