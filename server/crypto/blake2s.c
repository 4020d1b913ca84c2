/* blake2s: BLAKE2s-256 through libb2, and the HMAC/HKDF constructions Noise
 * builds on it. libsodium has only BLAKE2b, hence libb2. Thread-safe. */
#include "crypto/crypto.h"

#include <blake2.h>
#include <string.h>

#include "base/base.h"

void tc_blake2s(const void *in, size_t inlen, uint8_t out[TC_HASH_LEN]) {
  /* libb2's one-shot order is (out, in, key, outlen, inlen, keylen), unlike
   * the RFC reference code; the incremental API avoids the trap. */
  blake2s_state st;
  blake2s_init(&st, TC_HASH_LEN);
  blake2s_update(&st, in, inlen);
  blake2s_final(&st, out, TC_HASH_LEN);
  tc_wipe(&st, sizeof st);
}

int tc_blake2s_keyed(const void *in, size_t inlen, const void *key, size_t keylen, uint8_t out[TC_HASH_LEN]) {
  if (keylen == 0 || keylen > BLAKE2S_KEYBYTES) return TC_EINVAL;
  blake2s_state st;
  if (blake2s_init_key(&st, TC_HASH_LEN, key, keylen) < 0) return TC_EINVAL;
  blake2s_update(&st, in, inlen);
  blake2s_final(&st, out, TC_HASH_LEN);
  tc_wipe(&st, sizeof st);
  return 0;
}

#define HMAC_BLOCK 64

void tc_hmac_blake2s(const void *key, size_t keylen, const void *msg, size_t msglen, uint8_t out[TC_HASH_LEN]) {
  uint8_t k[HMAC_BLOCK] = {0}, pad[HMAC_BLOCK], inner[TC_HASH_LEN];
  if (keylen > HMAC_BLOCK)
    tc_blake2s(key, keylen, k);
  else if (keylen)
    memcpy(k, key, keylen);
  blake2s_state st;
  for (int i = 0; i < HMAC_BLOCK; i++) pad[i] = k[i] ^ 0x36;
  blake2s_init(&st, TC_HASH_LEN);
  blake2s_update(&st, pad, HMAC_BLOCK);
  blake2s_update(&st, msg, msglen);
  blake2s_final(&st, inner, TC_HASH_LEN);
  for (int i = 0; i < HMAC_BLOCK; i++) pad[i] = k[i] ^ 0x5c;
  blake2s_init(&st, TC_HASH_LEN);
  blake2s_update(&st, pad, HMAC_BLOCK);
  blake2s_update(&st, inner, TC_HASH_LEN);
  blake2s_final(&st, out, TC_HASH_LEN);
  tc_wipe(k, sizeof k);
  tc_wipe(pad, sizeof pad);
  tc_wipe(inner, sizeof inner);
  tc_wipe(&st, sizeof st);
}

void tc_noise_hkdf2(const uint8_t ck[TC_HASH_LEN], const void *ikm, size_t ikmlen, uint8_t o1[TC_HASH_LEN],
                    uint8_t o2[TC_HASH_LEN]) {
  uint8_t t[TC_HASH_LEN], a[TC_HASH_LEN], buf[TC_HASH_LEN + 1];
  tc_hmac_blake2s(ck, TC_HASH_LEN, ikm, ikmlen, t);
  buf[0] = 1;
  tc_hmac_blake2s(t, TC_HASH_LEN, buf, 1, a);
  memcpy(buf, a, TC_HASH_LEN);
  buf[TC_HASH_LEN] = 2;
  tc_hmac_blake2s(t, TC_HASH_LEN, buf, sizeof buf, o2);
  memcpy(o1, a, TC_HASH_LEN);
  tc_wipe(t, sizeof t);
  tc_wipe(a, sizeof a);
  tc_wipe(buf, sizeof buf);
}
