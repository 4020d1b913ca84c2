/* derp_codec: the DERP server key file and the pure frame helpers used by
 * the server and by tests (ServerKey, ServerInfo, ClientInfo, disco check).
 * Thread-safe. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <sodium.h>

#include "derp/derp.h"

static void put_header(uint8_t *p, uint8_t type, uint32_t len) {
  p[0] = type;
  p[1] = (uint8_t)(len >> 24);
  p[2] = (uint8_t)(len >> 16);
  p[3] = (uint8_t)(len >> 8);
  p[4] = (uint8_t)len;
}

int tc_derp_load_or_create_key(const char *path, uint8_t priv[32], struct tc_err *err) {
  if (!path || !*path) return tc_err_set(err, TC_EINVAL, "derp: private_key_path is empty");
  char *text = NULL;
  size_t len = 0;
  struct tc_err rerr = {0};
  struct stat st;
  if (stat(path, &st) != 0 && errno == ENOENT) {
    uint8_t k[32];
    char hex[65], line[80];
    randombytes_buf(k, sizeof k);
    tc_hex_encode(k, 32, hex);
    int n = snprintf(line, sizeof line, "privkey:%s", hex);
    int rc = tc_write_file_atomic(path, line, (size_t)n, 0600, err);
    tc_wipe(line, sizeof line);
    tc_wipe(hex, sizeof hex);
    if (rc == 0) {
      memcpy(priv, k, 32);
      tc_info("derp: generated a new DERP server key in %s", path);
    }
    tc_wipe(k, sizeof k);
    return rc;
  }
  int rc = tc_read_file(path, 4096, &text, &len, &rerr);
  if (rc != 0) return tc_err_set(err, rc, "derp key: %s", rerr.msg);
  /* tolerate surrounding whitespace (a trailing newline from an editor) */
  char *s = text;
  while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n') s++;
  size_t l = strlen(s);
  while (l && (s[l - 1] == ' ' || s[l - 1] == '\t' || s[l - 1] == '\r' || s[l - 1] == '\n')) l--;
  if (l != 8 + 64 || strncmp(s, "privkey:", 8) != 0 || tc_hex_decode(s + 8, 64, priv, 32) != 0)
    rc = tc_err_set(err, TC_EINVAL, "derp key %s: expected privkey:<64 hex digits>", path);
  tc_free_secret(text, len);
  return rc;
}

void tc_derp_server_key_frame(const uint8_t server_pub[32], uint8_t out[45]) {
  put_header(out, TC_DERP_FRAME_SERVER_KEY, 40);
  memcpy(out + 5, TC_DERP_MAGIC, 8);
  memcpy(out + 13, server_pub, 32);
}

int tc_derp_server_info_frame(const uint8_t server_priv[32], const uint8_t client_pub[32],
                              const uint8_t nonce[24], const char *json, struct tc_buf *out) {
  size_t mlen = strlen(json);
  size_t blen = 24 + crypto_box_MACBYTES + mlen;
  tc_buf_reserve(out, 5 + blen);
  uint8_t *p = (uint8_t *)out->data + out->len;
  put_header(p, TC_DERP_FRAME_SERVER_INFO, (uint32_t)blen);
  memcpy(p + 5, nonce, 24);
  if (crypto_box_easy(p + 5 + 24, (const uint8_t *)json, mlen, nonce, client_pub, server_priv) != 0)
    return TC_EPROTO; /* low-order client key */
  out->len += 5 + blen;
  out->data[out->len] = 0;
  return 0;
}

int tc_derp_open_client_info(const uint8_t server_priv[32], const uint8_t *payload, size_t len,
                             uint8_t client_pub[32], char **json, size_t *json_len) {
  *json = NULL;
  if (len < TC_DERP_CLIENT_INFO_MIN || len > TC_DERP_CLIENT_INFO_MAX) return TC_EPROTO;
  size_t clen = len - 32 - 24;
  if (clen < crypto_box_MACBYTES) return TC_EPROTO;
  size_t mlen = clen - crypto_box_MACBYTES;
  char *m = tc_xmalloc(mlen + 1);
  if (crypto_box_open_easy((uint8_t *)m, payload + 56, clen, payload + 32, payload, server_priv) != 0) {
    free(m);
    return TC_EPROTO;
  }
  m[mlen] = 0;
  memcpy(client_pub, payload, 32);
  *json = m;
  if (json_len) *json_len = mlen;
  return 0;
}

bool tc_derp_looks_like_disco(const uint8_t *p, size_t n) {
  static const uint8_t magic[6] = {'T', 'S', 0xf0, 0x9f, 0x92, 0xac};
  return n >= 6 + 32 + 24 && memcmp(p, magic, 6) == 0;
}
