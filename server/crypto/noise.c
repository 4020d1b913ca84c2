/* noise: X25519, the ChaCha20-Poly1305 cipher states, the generic
 * Noise_IK_25519_ChaChaPoly_BLAKE2s handshake and Tailscale's framing of it
 * (a 5-byte header on the initiation, 3-byte headers on everything else).
 * Reentrant; each state object belongs to one thread at a time. */
#include "crypto/crypto.h"

#include <blake2.h>
#include <gmp.h>
#include <stdbool.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>

#include "base/base.h"

static const char protocol_name[] = "Noise_IK_25519_ChaChaPoly_BLAKE2s";

int tc_crypto_init(void) { return sodium_init() < 0 ? TC_EINTERNAL : 0; }

/* ---- X25519 -------------------------------------------------------------- */
/* Every Noise handshake makes an ephemeral key pair, and libsodium's
 * X25519 base-point multiplication costs as much as a variable-base one (a
 * full ladder, ~45-50 us here). Its Ed25519 base-point multiplication uses
 * precomputed tables (~20 us) and clamps the scalar the way X25519 does, so
 * the same secret gives the same point in Edwards form, and the X25519
 * public key is the birational map u = (1 + y) / (1 - y) mod 2^255 - 19 of
 * its y. Only that map runs in GMP, whose arithmetic is not constant-time:
 * y is as public as u (either gives the other), the secret scalar never
 * leaves libsodium. Whenever the shortcut cannot answer, the ladder does. */
static bool x25519_public_via_ed25519(const uint8_t priv[TC_KEY_LEN], uint8_t pub[TC_KEY_LEN]) {
  uint8_t ed[32];
  if (crypto_scalarmult_ed25519_base(ed, priv) != 0) return false;
  ed[31] &= 0x7f; /* the sign of x */
  mpz_t p, y, num, den;
  mpz_inits(p, y, num, den, NULL);
  mpz_ui_pow_ui(p, 2, 255);
  mpz_sub_ui(p, p, 19);
  mpz_import(y, sizeof ed, -1, 1, 0, 0, ed);
  mpz_add_ui(num, y, 1);
  mpz_sub(den, p, y);
  mpz_add_ui(den, den, 1); /* 1 - y, kept non-negative */
  bool ok = mpz_cmp(y, p) < 0 && mpz_invert(den, den, p) != 0;
  if (ok) {
    mpz_mul(num, num, den);
    mpz_mod(num, num, p);
    size_t n = 0;
    memset(pub, 0, TC_KEY_LEN);
    mpz_export(pub, &n, -1, 1, 0, 0, num); /* little-endian, at most 32 bytes as num < p */
  }
  mpz_clears(p, y, num, den, NULL);
  return ok;
}

void tc_x25519_public(const uint8_t priv[TC_KEY_LEN], uint8_t pub[TC_KEY_LEN]) {
  if (!x25519_public_via_ed25519(priv, pub)) crypto_scalarmult_base(pub, priv);
}

void tc_x25519_keygen(uint8_t priv[TC_KEY_LEN], uint8_t pub[TC_KEY_LEN]) {
  randombytes_buf(priv, TC_KEY_LEN);
  tc_x25519_public(priv, pub);
}

int tc_x25519(const uint8_t priv[TC_KEY_LEN], const uint8_t pub[TC_KEY_LEN], uint8_t out[TC_KEY_LEN]) {
  /* libsodium itself fails on an all-zero result; check explicitly anyway so
   * the rule does not depend on the library's build options. */
  if (crypto_scalarmult(out, priv, pub) != 0 || sodium_is_zero(out, TC_KEY_LEN)) {
    tc_wipe(out, TC_KEY_LEN);
    return TC_EPROTO;
  }
  return 0;
}

/* ---- cipher states ------------------------------------------------------- */
static void make_nonce(uint64_t n, enum tc_nonce_mode mode, uint8_t nonce[12]) {
  memset(nonce, 0, 4);
  for (int i = 0; i < 8; i++) {
    uint8_t b = (uint8_t)(n >> (8 * i));
    if (mode == TC_NONCE_BIG_ENDIAN)
      nonce[11 - i] = b;
    else
      nonce[4 + i] = b;
  }
}

void tc_cipher_init(struct tc_cipher *c, const uint8_t key[TC_KEY_LEN], enum tc_nonce_mode mode) {
  memcpy(c->key, key, TC_KEY_LEN);
  c->n = 0;
  c->mode = mode;
  c->dead = false;
}

void tc_cipher_wipe(struct tc_cipher *c) {
  tc_wipe(c, sizeof *c);
  c->dead = true;
}

int tc_cipher_seal(struct tc_cipher *c, const void *ad, size_t adlen, const void *pt, size_t ptlen, uint8_t *out) {
  /* 2^64-1 is reserved by the spec; Tailscale's Conn refuses it too. */
  if (c->dead || c->n == UINT64_MAX) return TC_EPROTO;
  uint8_t nonce[12];
  make_nonce(c->n, c->mode, nonce);
  unsigned long long clen;
  crypto_aead_chacha20poly1305_ietf_encrypt(out, &clen, pt, ptlen, ad, adlen, NULL, nonce, c->key);
  c->n++;
  return 0;
}

int tc_cipher_open(struct tc_cipher *c, const void *ad, size_t adlen, const uint8_t *ct, size_t ctlen, uint8_t *out) {
  if (c->dead || c->n == UINT64_MAX || ctlen < TC_AEAD_TAG_LEN) return TC_EPROTO;
  uint8_t nonce[12];
  make_nonce(c->n, c->mode, nonce);
  unsigned long long plen;
  if (crypto_aead_chacha20poly1305_ietf_decrypt(out, &plen, NULL, ct, ctlen, ad, adlen, nonce, c->key) != 0) {
    /* Once one record fails the peers are out of step for good. */
    tc_cipher_wipe(c);
    return TC_EPROTO;
  }
  c->n++;
  return 0;
}

/* ---- symmetric state ------------------------------------------------------ */
static void mix_hash(struct tc_noise_hs *hs, const void *d, size_t n) {
  blake2s_state st;
  blake2s_init(&st, TC_HASH_LEN);
  blake2s_update(&st, hs->h, TC_HASH_LEN);
  blake2s_update(&st, d, n);
  blake2s_final(&st, hs->h, TC_HASH_LEN);
}

static int mix_dh(struct tc_noise_hs *hs, const uint8_t priv[TC_KEY_LEN], const uint8_t pub[TC_KEY_LEN]) {
  uint8_t dh[TC_KEY_LEN];
  int rc = tc_x25519(priv, pub, dh);
  if (rc == 0) tc_noise_hkdf2(hs->ck, dh, sizeof dh, hs->ck, hs->k);
  tc_wipe(dh, sizeof dh);
  return rc;
}

/* Every handshake key in IK is used exactly once, so the nonce is always 0. */
static void encrypt_and_hash(struct tc_noise_hs *hs, const void *pt, size_t n, uint8_t *out) {
  struct tc_cipher c;
  tc_cipher_init(&c, hs->k, TC_NONCE_BIG_ENDIAN);
  tc_cipher_seal(&c, hs->h, TC_HASH_LEN, pt, n, out);
  tc_cipher_wipe(&c);
  mix_hash(hs, out, n + TC_AEAD_TAG_LEN);
}

static int decrypt_and_hash(struct tc_noise_hs *hs, const uint8_t *ct, size_t n, uint8_t *out) {
  struct tc_cipher c;
  uint8_t h[TC_HASH_LEN];
  memcpy(h, hs->h, TC_HASH_LEN);
  mix_hash(hs, ct, n); /* before opening: out may alias ct */
  tc_cipher_init(&c, hs->k, TC_NONCE_BIG_ENDIAN);
  int rc = tc_cipher_open(&c, h, TC_HASH_LEN, ct, n, out);
  tc_cipher_wipe(&c);
  return rc;
}

/* The server derives its own static public key at every handshake; a
 * per-thread memo of the last key pair saves one of the responder's five
 * scalar multiplications (not separately measured). The comparison is
 * constant-time so the memo reveals nothing about which key was used. */
static void static_public(const uint8_t priv[TC_KEY_LEN], uint8_t pub[TC_KEY_LEN]) {
  static __thread uint8_t memo_priv[TC_KEY_LEN], memo_pub[TC_KEY_LEN];
  static __thread bool memo_set;
  if (memo_set && tc_ct_equal(memo_priv, priv, TC_KEY_LEN)) {
    memcpy(pub, memo_pub, TC_KEY_LEN);
    return;
  }
  tc_x25519_public(priv, pub);
  memcpy(memo_priv, priv, TC_KEY_LEN);
  memcpy(memo_pub, pub, TC_KEY_LEN);
  memo_set = true;
}

void tc_noise_hs_init(struct tc_noise_hs *hs, bool initiator, const void *prologue, size_t prologue_len,
                      const uint8_t s_priv[TC_KEY_LEN], const uint8_t *rs) {
  memset(hs, 0, sizeof *hs);
  hs->initiator = initiator;
  memcpy(hs->s_priv, s_priv, TC_KEY_LEN);
  static_public(s_priv, hs->s_pub);
  /* The name is longer than HASHLEN, so h = HASH(name). */
  tc_blake2s(protocol_name, strlen(protocol_name), hs->h);
  memcpy(hs->ck, hs->h, TC_HASH_LEN);
  mix_hash(hs, prologue, prologue_len);
  if (initiator) {
    memcpy(hs->rs, rs, TC_KEY_LEN);
    mix_hash(hs, hs->rs, TC_KEY_LEN);
  } else {
    mix_hash(hs, hs->s_pub, TC_KEY_LEN);
  }
}

void tc_noise_hs_set_ephemeral(struct tc_noise_hs *hs, const uint8_t e_priv[TC_KEY_LEN]) {
  memcpy(hs->e_priv, e_priv, TC_KEY_LEN);
  tc_x25519_public(e_priv, hs->e_pub);
  hs->have_e = true;
}

static void ensure_ephemeral(struct tc_noise_hs *hs) {
  if (!hs->have_e) tc_x25519_keygen(hs->e_priv, hs->e_pub);
  hs->have_e = true;
}

int tc_noise_hs_write1(struct tc_noise_hs *hs, const void *payload, size_t plen, uint8_t *out) {
  if (!hs->initiator || hs->step != 0) return TC_EINVAL;
  ensure_ephemeral(hs);
  memcpy(out, hs->e_pub, 32);
  mix_hash(hs, hs->e_pub, 32);
  if (mix_dh(hs, hs->e_priv, hs->rs)) return TC_EPROTO; /* es */
  encrypt_and_hash(hs, hs->s_pub, 32, out + 32);       /* s */
  if (mix_dh(hs, hs->s_priv, hs->rs)) return TC_EPROTO; /* ss */
  encrypt_and_hash(hs, payload, plen, out + 80);
  hs->step = 1;
  return 0;
}

int tc_noise_hs_read1(struct tc_noise_hs *hs, const uint8_t *msg, size_t mlen, uint8_t *payload_out) {
  uint8_t scratch[1];
  if (hs->initiator || hs->step != 0) return TC_EINVAL;
  if (mlen < TC_NOISE_IK_MSG1_LEN(0)) return TC_EINVAL;
  memcpy(hs->re, msg, 32);
  mix_hash(hs, hs->re, 32);
  if (mix_dh(hs, hs->s_priv, hs->re)) return TC_EPROTO; /* es */
  if (decrypt_and_hash(hs, msg + 32, 48, hs->rs)) return TC_EPROTO;
  if (mix_dh(hs, hs->s_priv, hs->rs)) return TC_EPROTO; /* ss */
  size_t clen = mlen - 80;
  if (clen == TC_AEAD_TAG_LEN && !payload_out) payload_out = scratch;
  if (!payload_out) return TC_EINVAL;
  if (decrypt_and_hash(hs, msg + 80, clen, payload_out)) return TC_EPROTO;
  hs->step = 1;
  return 0;
}

int tc_noise_hs_write2(struct tc_noise_hs *hs, const void *payload, size_t plen, uint8_t *out) {
  if (hs->initiator || hs->step != 1) return TC_EINVAL;
  ensure_ephemeral(hs);
  memcpy(out, hs->e_pub, 32);
  mix_hash(hs, hs->e_pub, 32);
  if (mix_dh(hs, hs->e_priv, hs->re)) return TC_EPROTO; /* ee */
  if (mix_dh(hs, hs->e_priv, hs->rs)) return TC_EPROTO; /* se */
  encrypt_and_hash(hs, payload, plen, out + 32);
  hs->step = 2;
  return 0;
}

int tc_noise_hs_read2(struct tc_noise_hs *hs, const uint8_t *msg, size_t mlen, uint8_t *payload_out) {
  uint8_t scratch[1];
  if (!hs->initiator || hs->step != 1) return TC_EINVAL;
  if (mlen < TC_NOISE_IK_MSG2_LEN(0)) return TC_EINVAL;
  memcpy(hs->re, msg, 32);
  mix_hash(hs, hs->re, 32);
  if (mix_dh(hs, hs->e_priv, hs->re)) return TC_EPROTO; /* ee */
  if (mix_dh(hs, hs->s_priv, hs->re)) return TC_EPROTO; /* se */
  size_t clen = mlen - 32;
  if (clen == TC_AEAD_TAG_LEN && !payload_out) payload_out = scratch;
  if (!payload_out) return TC_EINVAL;
  if (decrypt_and_hash(hs, msg + 32, clen, payload_out)) return TC_EPROTO;
  hs->step = 2;
  return 0;
}

int tc_noise_hs_split(struct tc_noise_hs *hs, enum tc_nonce_mode mode, struct tc_cipher *tx, struct tc_cipher *rx,
                      uint8_t hash[TC_HASH_LEN]) {
  if (hs->step != 2) return TC_EINVAL;
  uint8_t k1[TC_KEY_LEN], k2[TC_KEY_LEN];
  tc_noise_hkdf2(hs->ck, NULL, 0, k1, k2);
  /* k1 protects initiator -> responder. */
  tc_cipher_init(tx, hs->initiator ? k1 : k2, mode);
  tc_cipher_init(rx, hs->initiator ? k2 : k1, mode);
  if (hash) memcpy(hash, hs->h, TC_HASH_LEN);
  tc_wipe(k1, sizeof k1);
  tc_wipe(k2, sizeof k2);
  tc_noise_hs_wipe(hs);
  return 0;
}

void tc_noise_hs_wipe(struct tc_noise_hs *hs) {
  if (hs) tc_wipe(hs, sizeof *hs);
}

/* ---- Tailscale framing ---------------------------------------------------- */
size_t tc_ts_prologue(uint16_t version, char out[40]) {
  return (size_t)snprintf(out, 40, "Tailscale Control Protocol v%u", (unsigned)version);
}

int tc_ts_client_initiate(struct tc_noise_hs *hs, uint16_t version, const uint8_t machine_priv[TC_KEY_LEN],
                          const uint8_t server_pub[TC_KEY_LEN], const uint8_t *eph_priv,
                          uint8_t out[TC_TS_INIT_LEN]) {
  char prologue[40];
  size_t plen = tc_ts_prologue(version, prologue);
  tc_noise_hs_init(hs, true, prologue, plen, machine_priv, server_pub);
  if (eph_priv) tc_noise_hs_set_ephemeral(hs, eph_priv);
  out[0] = (uint8_t)(version >> 8);
  out[1] = (uint8_t)version;
  out[2] = TC_TS_MSG_INITIATION;
  out[3] = 0;
  out[4] = 96;
  int rc = tc_noise_hs_write1(hs, NULL, 0, out + 5);
  if (rc) tc_noise_hs_wipe(hs);
  return rc;
}

int tc_ts_client_finish(struct tc_noise_hs *hs, const uint8_t resp[TC_TS_RESP_LEN], struct tc_ts_session *sess) {
  int rc = TC_EINVAL;
  memset(sess, 0, sizeof *sess);
  if (resp[0] != TC_TS_MSG_RESPONSE || resp[1] != 0 || resp[2] != 48) goto out;
  memcpy(sess->peer, hs->rs, TC_KEY_LEN);
  rc = tc_noise_hs_read2(hs, resp + 3, 48, NULL);
  if (rc) goto out;
  rc = tc_noise_hs_split(hs, TC_NONCE_BIG_ENDIAN, &sess->tx, &sess->rx, sess->hash);
out:
  tc_noise_hs_wipe(hs);
  if (rc) tc_wipe(sess, sizeof *sess);
  return rc;
}

int tc_ts_server_accept(const uint8_t server_priv[TC_KEY_LEN], const uint8_t *init, size_t init_len,
                        const uint8_t *eph_priv, uint8_t resp[TC_TS_RESP_LEN], struct tc_ts_session *sess,
                        const char **errmsg) {
  struct tc_noise_hs hs;
  char prologue[40];
  int rc;
  *errmsg = NULL;
  memset(sess, 0, sizeof *sess);
  memset(&hs, 0, sizeof hs);
  if (init_len != TC_TS_INIT_LEN) {
    *errmsg = "wrong handshake initiation size";
    return TC_EINVAL;
  }
  if (init[2] != TC_TS_MSG_INITIATION) {
    *errmsg = "unexpected handshake message type";
    return TC_EINVAL;
  }
  if (init[3] != 0 || init[4] != 96) {
    *errmsg = "wrong handshake initiation length";
    return TC_EINVAL;
  }
  uint16_t version = (uint16_t)(init[0] << 8 | init[1]);
  size_t plen = tc_ts_prologue(version, prologue);
  tc_noise_hs_init(&hs, false, prologue, plen, server_priv, NULL);
  if (eph_priv) tc_noise_hs_set_ephemeral(&hs, eph_priv);
  rc = tc_noise_hs_read1(&hs, init + 5, 96, NULL);
  if (rc) goto out;
  memcpy(sess->peer, hs.rs, TC_KEY_LEN);
  resp[0] = TC_TS_MSG_RESPONSE;
  resp[1] = 0;
  resp[2] = 48;
  rc = tc_noise_hs_write2(&hs, NULL, 0, resp + 3);
  if (rc) goto out;
  sess->version = version;
  rc = tc_noise_hs_split(&hs, TC_NONCE_BIG_ENDIAN, &sess->tx, &sess->rx, sess->hash);
out:
  tc_noise_hs_wipe(&hs);
  if (rc) {
    tc_wipe(sess, sizeof *sess);
    rc = TC_EPROTO;
  }
  return rc;
}

size_t tc_ts_error_frame(const char *text, uint8_t *out) {
  size_t n = strnlen(text, 1024);
  out[0] = TC_TS_MSG_ERROR;
  out[1] = (uint8_t)(n >> 8);
  out[2] = (uint8_t)n;
  memcpy(out + 3, text, n);
  return n + 3;
}

int tc_ts_seal_record(struct tc_cipher *tx, const void *pt, size_t ptlen, uint8_t *out) {
  if (ptlen > TC_TS_MAX_PLAINTEXT) return TC_ETOOBIG;
  size_t clen = ptlen + TC_AEAD_TAG_LEN;
  out[0] = TC_TS_MSG_RECORD;
  out[1] = (uint8_t)(clen >> 8);
  out[2] = (uint8_t)clen;
  int rc = tc_cipher_seal(tx, NULL, 0, pt, ptlen, out + 3);
  if (rc) return rc;
  return (int)(clen + 3);
}

int tc_ts_record_len(const uint8_t *p, size_t avail) {
  if (avail < 1) return 0;
  if (p[0] != TC_TS_MSG_RECORD) return TC_EPROTO;
  if (avail < 3) return 0;
  size_t clen = (size_t)p[1] << 8 | p[2];
  if (clen < TC_AEAD_TAG_LEN || clen > TC_TS_MAX_CIPHERTEXT) return TC_EPROTO;
  return (int)(clen + 3);
}

int tc_ts_open_record(struct tc_cipher *rx, const uint8_t *rec, size_t rec_len, uint8_t *out, size_t *ptlen) {
  int n = tc_ts_record_len(rec, rec_len);
  if (n <= 0 || (size_t)n != rec_len) return TC_EPROTO;
  int rc = tc_cipher_open(rx, NULL, 0, rec + 3, rec_len - 3, out);
  if (rc) return rc;
  *ptlen = rec_len - 3 - TC_AEAD_TAG_LEN;
  return 0;
}
