/* keys: the text forms of Curve25519 keys on the wire, "<prefix><64 hex>".
 * Thread-safe. */
#include "crypto/crypto.h"

#include <string.h>

#include "base/base.h"

const char *tc_key_prefix(enum tc_key_kind kind) {
  switch (kind) {
  case TC_KEY_MACHINE: return "mkey:";
  case TC_KEY_NODE: return "nodekey:";
  case TC_KEY_DISCO: return "discokey:";
  case TC_KEY_PRIVATE: return "privkey:";
  case TC_KEY_NLPUB: return "nlpub:";
  case TC_KEY_CHALLENGE: return "chalpub:";
  }
  return "";
}

char *tc_key_format(enum tc_key_kind kind, const uint8_t key[TC_KEY_LEN], char out[TC_KEY_TEXT_MAX]) {
  const char *p = tc_key_prefix(kind);
  size_t n = strlen(p);
  memcpy(out, p, n);
  tc_hex_encode(key, TC_KEY_LEN, out + n);
  return out;
}

int tc_key_parse(enum tc_key_kind kind, const char *s, size_t len, uint8_t key[TC_KEY_LEN]) {
  const char *p = tc_key_prefix(kind);
  size_t n = strlen(p);
  if (!s || !*p || len != n + 2 * TC_KEY_LEN || memcmp(s, p, n) != 0) return TC_EINVAL;
  uint8_t tmp[TC_KEY_LEN];
  if (tc_hex_decode(s + n, 2 * TC_KEY_LEN, tmp, TC_KEY_LEN)) return TC_EINVAL;
  memcpy(key, tmp, TC_KEY_LEN);
  tc_wipe(tmp, sizeof tmp);
  return 0;
}

bool tc_key_is_zero(const uint8_t key[TC_KEY_LEN]) {
  uint8_t d = 0;
  for (int i = 0; i < TC_KEY_LEN; i++) d |= key[i];
  return d == 0;
}
