/* Conformance tests for server/crypto: BLAKE2s KATs, HMAC/HKDF vectors, the
 * cacophony Noise IK vector, the Tailscale handshake vector (doc §14.1) and
 * key text round trips. */
#include <jansson.h>
#include <sodium.h>
#include <string.h>
#include <strings.h>

#include "base/base.h"
#include "crypto/crypto.h"
#include "tc_test.h"

static size_t unhex(const char *s, uint8_t *out, size_t cap) {
  size_t n = strlen(s) / 2;
  if (n > cap || tc_hex_decode(s, strlen(s), out, n)) {
    fprintf(stderr, "bad hex in test: %s\n", s);
    abort();
  }
  return n;
}

static void hexof(const uint8_t *p, size_t n, char *out) { tc_hex_encode(p, n, out); }

#define CHECK_HEX(bytes, n, want)          \
  do {                                     \
    char h_[8192];                         \
    hexof((bytes), (n), h_);               \
    TC_CHECK_STR(h_, (want));              \
  } while (0)

TC_TEST(blake2s_unkeyed_rfc) {
  uint8_t out[32];
  tc_blake2s("", 0, out);
  CHECK_HEX(out, 32, "69217a3079908094e11121d042354a7c1f55b6482ca1a51e1b250dfd1ed0eef9");
  tc_blake2s("abc", 3, out);
  CHECK_HEX(out, 32, "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982");
  const char *name = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
  tc_blake2s(name, strlen(name), out);
  CHECK_HEX(out, 32, "bbea022b948cf3bc5857d70804229179e1116bc40cb8cc074835349c464bca36");
}

TC_TEST(blake2s_keyed_kat_file) {
  char *path = tc_test_shared_path("testdata/blake2s/blake2s-kat.txt");
  char *data = NULL;
  size_t len = 0;
  TC_REQUIRE(tc_read_file(path, 1 << 20, &data, &len, NULL) == 0);
  free(path);
  int count = 0, bad = 0;
  char *save = NULL;
  char in[2048] = "", key[128] = "";
  for (char *line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    char *tab = strchr(line, '\t');
    if (!tab) continue;
    *tab = 0;
    const char *val = tab + 1;
    if (!strcmp(line, "in:")) {
      snprintf(in, sizeof in, "%s", val);
    } else if (!strcmp(line, "key:")) {
      snprintf(key, sizeof key, "%s", val);
    } else if (!strcmp(line, "hash:")) {
      uint8_t inb[1024], keyb[64], out[32];
      size_t inl = unhex(in, inb, sizeof inb), kl = unhex(key, keyb, sizeof keyb);
      TC_CHECK_INT(tc_blake2s_keyed(inb, inl, keyb, kl, out), 0);
      char h[65];
      hexof(out, 32, h);
      if (strcmp(h, val)) {
        bad++;
        fprintf(stderr, "  KAT %d mismatch: %s != %s\n", count, h, val);
      }
      count++;
      in[0] = key[0] = 0;
    }
  }
  free(data);
  TC_CHECK_INT(count, 256);
  TC_CHECK_INT(bad, 0);
}

TC_TEST(hmac_blake2s_vectors) {
  uint8_t key[32] = {0}, out[32];
  tc_hmac_blake2s(key, 32, "", 0, out);
  CHECK_HEX(out, 32, "eaf4bb25938f4d20e72656bbbc7a9bf63c0c18537333c35bdb67db1402661acd");
  for (int i = 0; i < 32; i++) key[i] = (uint8_t)i;
  tc_hmac_blake2s(key, 32, "Tailscale", 9, out);
  CHECK_HEX(out, 32, "687b774e0ebdf26ae9bf9a774efdfb6b5e5299d0bcb6bc1a6d2117ca1e3d8e39");
  /* A key longer than the block is hashed first: HMAC(k) == HMAC(H(k)). */
  uint8_t longkey[100], hk[32], o2[32];
  memset(longkey, 0xaa, sizeof longkey);
  tc_hmac_blake2s(longkey, sizeof longkey, "x", 1, out);
  tc_blake2s(longkey, sizeof longkey, hk);
  tc_hmac_blake2s(hk, 32, "x", 1, o2);
  TC_CHECK(memcmp(out, o2, 32) == 0);
}

TC_TEST(hkdf_matches_definition) {
  uint8_t ck[32], o1[32], o2[32], t[32], e1[32], e2[32], buf[33];
  for (int i = 0; i < 32; i++) ck[i] = (uint8_t)(0x10 + i);
  tc_noise_hkdf2(ck, "ikm", 3, o1, o2);
  tc_hmac_blake2s(ck, 32, "ikm", 3, t);
  buf[0] = 1;
  tc_hmac_blake2s(t, 32, buf, 1, e1);
  memcpy(buf, e1, 32);
  buf[32] = 2;
  tc_hmac_blake2s(t, 32, buf, 33, e2);
  TC_CHECK(memcmp(o1, e1, 32) == 0);
  TC_CHECK(memcmp(o2, e2, 32) == 0);
  /* Outputs may alias the chaining key. */
  tc_noise_hkdf2(ck, "ikm", 3, ck, o2);
  TC_CHECK(memcmp(ck, e1, 32) == 0);
}

TC_TEST(x25519_rejects_zero_output) {
  uint8_t priv[32], pub[32] = {0}, out[32];
  for (int i = 0; i < 32; i++) priv[i] = (uint8_t)i;
  TC_CHECK_INT(tc_x25519(priv, pub, out), TC_EPROTO);
  uint8_t one[32] = {1}; /* the point of order 4 at u = 1 */
  TC_CHECK_INT(tc_x25519(priv, one, out), TC_EPROTO);
  tc_x25519_public(priv, pub);
  CHECK_HEX(pub, 32, "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f");
}

/* tc_x25519_public takes a shortcut through Ed25519's base-point tables and
 * a field inversion: it must give exactly the X25519 ladder's answer, for
 * RFC 7748's keys, for scalars at the edges of clamping, and for many
 * random ones. */
TC_TEST(x25519_public_matches_the_ladder) {
  static const char *const rfc7748[][2] = {
      {"77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
       "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"},
      {"5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
       "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"},
  };
  uint8_t priv[32], pub[32], want[32];
  for (size_t i = 0; i < TC_ARRAY_LEN(rfc7748); i++) {
    unhex(rfc7748[i][0], priv, sizeof priv);
    tc_x25519_public(priv, pub);
    CHECK_HEX(pub, 32, rfc7748[i][1]);
  }
  int mismatches = 0;
  for (int i = 0; i < 20000 + 6; i++) {
    switch (i) {
    case 0: memset(priv, 0, 32); break;            /* clamps to 2^254 */
    case 1: memset(priv, 0xff, 32); break;         /* clamps to the largest scalar */
    case 2: memset(priv, 0, 32); priv[0] = 8; break;
    case 3: memset(priv, 0, 32); priv[0] = 7; break; /* cleared low bits */
    case 4: memset(priv, 0, 32); priv[31] = 0x80; break;
    case 5: memset(priv, 0x55, 32); break;
    default: randombytes_buf(priv, sizeof priv);
    }
    tc_x25519_public(priv, pub);
    TC_REQUIRE(crypto_scalarmult_base(want, priv) == 0);
    if (memcmp(pub, want, 32)) mismatches++;
  }
  TC_CHECK_INT(mismatches, 0);
}

static const char *jstr(json_t *o, const char *k) {
  const char *s = json_string_value(json_object_get(o, k));
  return s ? s : "";
}

TC_TEST(cacophony_ik_vector) {
  char *path = tc_test_shared_path("testdata/noise/cacophony-25519_ChaChaPoly_BLAKE2s.json");
  json_error_t jerr;
  json_t *root = json_load_file(path, 0, &jerr);
  free(path);
  TC_REQUIRE(root != NULL);
  json_t *v = NULL, *it;
  size_t idx;
  json_array_foreach(json_object_get(root, "vectors"), idx, it) {
    if (!strcmp(jstr(it, "protocol_name"), "Noise_IK_25519_ChaChaPoly_BLAKE2s")) v = it;
  }
  TC_REQUIRE(v != NULL);
  uint8_t iprol[64], rprol[64], is[32], ie[32], irs[32], rs[32], re[32];
  size_t ipl = unhex(jstr(v, "init_prologue"), iprol, sizeof iprol);
  size_t rpl = unhex(jstr(v, "resp_prologue"), rprol, sizeof rprol);
  unhex(jstr(v, "init_static"), is, 32);
  unhex(jstr(v, "init_ephemeral"), ie, 32);
  unhex(jstr(v, "init_remote_static"), irs, 32);
  unhex(jstr(v, "resp_static"), rs, 32);
  unhex(jstr(v, "resp_ephemeral"), re, 32);
  struct tc_noise_hs ini, res;
  tc_noise_hs_init(&ini, true, iprol, ipl, is, irs);
  tc_noise_hs_set_ephemeral(&ini, ie);
  tc_noise_hs_init(&res, false, rprol, rpl, rs, NULL);
  tc_noise_hs_set_ephemeral(&res, re);
  json_t *msgs = json_object_get(v, "messages");
  TC_REQUIRE(json_array_size(msgs) >= 4);
  struct tc_cipher itx, irx, rtx, rrx;
  uint8_t ih[32], rh[32];
  for (size_t i = 0; i < json_array_size(msgs); i++) {
    json_t *m = json_array_get(msgs, i);
    uint8_t pt[512], ct[512], out[512], got[512];
    size_t pl = unhex(jstr(m, "payload"), pt, sizeof pt);
    size_t cl = unhex(jstr(m, "ciphertext"), ct, sizeof ct);
    if (i == 0) {
      TC_REQUIRE(cl == TC_NOISE_IK_MSG1_LEN(pl));
      TC_CHECK_INT(tc_noise_hs_write1(&ini, pt, pl, out), 0);
      TC_CHECK(memcmp(out, ct, cl) == 0);
      TC_CHECK_INT(tc_noise_hs_read1(&res, ct, cl, got), 0);
      TC_CHECK(memcmp(got, pt, pl) == 0);
      uint8_t ipub[32];
      tc_x25519_public(is, ipub);
      TC_CHECK(memcmp(res.rs, ipub, 32) == 0);
    } else if (i == 1) {
      TC_REQUIRE(cl == TC_NOISE_IK_MSG2_LEN(pl));
      TC_CHECK_INT(tc_noise_hs_write2(&res, pt, pl, out), 0);
      TC_CHECK(memcmp(out, ct, cl) == 0);
      TC_CHECK_INT(tc_noise_hs_read2(&ini, ct, cl, got), 0);
      TC_CHECK(memcmp(got, pt, pl) == 0);
      TC_CHECK_INT(tc_noise_hs_split(&ini, TC_NONCE_LITTLE_ENDIAN, &itx, &irx, ih), 0);
      TC_CHECK_INT(tc_noise_hs_split(&res, TC_NONCE_LITTLE_ENDIAN, &rtx, &rrx, rh), 0);
      CHECK_HEX(ih, 32, jstr(v, "handshake_hash"));
      CHECK_HEX(rh, 32, jstr(v, "handshake_hash"));
    } else {
      /* Transport: even indexes go initiator -> responder. */
      struct tc_cipher *tx = i % 2 == 0 ? &itx : &rtx, *rx = i % 2 == 0 ? &rrx : &irx;
      TC_REQUIRE(cl == pl + 16);
      TC_CHECK_INT(tc_cipher_seal(tx, NULL, 0, pt, pl, out), 0);
      TC_CHECK(memcmp(out, ct, cl) == 0);
      TC_CHECK_INT(tc_cipher_open(rx, NULL, 0, ct, cl, got), 0);
      TC_CHECK(memcmp(got, pt, pl) == 0);
    }
  }
  /* The same transport messages under Tailscale's big-endian nonce: the
   * first per direction (n = 0) agrees, the second does not. */
  json_t *m4 = json_array_get(msgs, 4);
  if (m4) {
    uint8_t pt[512], ct[512], out[512];
    size_t pl = unhex(jstr(m4, "payload"), pt, sizeof pt);
    size_t cl = unhex(jstr(m4, "ciphertext"), ct, sizeof ct);
    struct tc_cipher be = itx;
    be.mode = TC_NONCE_BIG_ENDIAN;
    be.n = 1;
    TC_CHECK_INT(tc_cipher_seal(&be, NULL, 0, pt, pl, out), 0);
    TC_CHECK(memcmp(out, ct, cl) != 0);
  }
  json_decref(root);
}

/* §14.1 Tailscale handshake vector, byte for byte. */
static const char *const ts_init_hex =
    "005701006079a631eede1bf9c98f12032cdeadd0e7a079398fc786b88cc846ec89af85a51a5a5d3e"
    "c50c63b0e0156101cf138f46d05427ed87f592c2009bab26f178d726e3c1dba4d2d7cc5952f987ca"
    "56b6fc393950e331f1b640f2b48cc2b9e135f96ff3";
static const char *const ts_resp_hex =
    "020030675dd574ed7789310b3d2e7681f3790b466c773b1521fecf36577958371ea52f4ee5d447cc"
    "1b773ea46a61d03322d6c7";

static void seq_key(uint8_t k[32], int start) {
  for (int i = 0; i < 32; i++) k[i] = (uint8_t)(start + i);
}

TC_TEST(tailscale_handshake_vector) {
  uint8_t spriv[32], spub[32], cpriv[32], cpub[32], ceph[32], seph[32];
  seq_key(spriv, 0x00);
  seq_key(cpriv, 0x20);
  seq_key(ceph, 0x40);
  seq_key(seph, 0x60);
  tc_x25519_public(spriv, spub);
  tc_x25519_public(cpriv, cpub);
  CHECK_HEX(cpub, 32, "358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254");
  char prol[40];
  TC_CHECK_INT(tc_ts_prologue(87, prol), 30);
  TC_CHECK_STR(prol, "Tailscale Control Protocol v87");

  struct tc_noise_hs hs;
  uint8_t init[TC_TS_INIT_LEN], resp[TC_TS_RESP_LEN];
  TC_REQUIRE(tc_ts_client_initiate(&hs, 87, cpriv, spub, ceph, init) == 0);
  CHECK_HEX(init, sizeof init, ts_init_hex);

  struct tc_ts_session ss, cs;
  const char *emsg = NULL;
  TC_REQUIRE(tc_ts_server_accept(spriv, init, sizeof init, seph, resp, &ss, &emsg) == 0);
  CHECK_HEX(resp, sizeof resp, ts_resp_hex);
  TC_CHECK_INT(ss.version, 87);
  TC_CHECK(memcmp(ss.peer, cpub, 32) == 0);
  CHECK_HEX(ss.hash, 32, "e5211f690e4ab9d85dc197fd71bb99fcea7ca4f21a13bbba5321a23bf891ad82");
  CHECK_HEX(ss.rx.key, 32, "8b2f6bbba15ce6d607c316355f2d3c93f62dcbe39b04eb873b5b2e2812dc71b6");
  CHECK_HEX(ss.tx.key, 32, "e8f7da7193cd2dd7834427bc5de410cc7fa42ea2bddb06906a91b23daf60a99b");

  TC_REQUIRE(tc_ts_client_finish(&hs, resp, &cs) == 0);
  CHECK_HEX(cs.hash, 32, "e5211f690e4ab9d85dc197fd71bb99fcea7ca4f21a13bbba5321a23bf891ad82");
  CHECK_HEX(cs.tx.key, 32, "8b2f6bbba15ce6d607c316355f2d3c93f62dcbe39b04eb873b5b2e2812dc71b6");
  TC_CHECK(memcmp(cs.peer, spub, 32) == 0);

  uint8_t rec[64], pt[64];
  size_t ptlen = 99;
  int n = tc_ts_seal_record(&ss.tx, "hello", 5, rec);
  TC_CHECK_INT(n, 24);
  CHECK_HEX(rec, 24, "0400154c9a443517233988ec8832549456cd83ba42fcf8de");
  TC_CHECK_INT(tc_ts_record_len(rec, 24), 24);
  TC_CHECK_INT(tc_ts_open_record(&cs.rx, rec, 24, pt, &ptlen), 0);
  TC_CHECK_INT(ptlen, 5);
  TC_CHECK(memcmp(pt, "hello", 5) == 0);
  n = tc_ts_seal_record(&ss.tx, "hello", 5, rec);
  CHECK_HEX(rec, 24, "040015d9f138fa4f8814bf915e632b58cf04bf6ae4ab5f53");
  TC_CHECK_INT(tc_ts_open_record(&cs.rx, rec, 24, pt, &ptlen), 0);
  n = tc_ts_seal_record(&cs.tx, "PRI", 3, rec);
  TC_CHECK_INT(n, 22);
  CHECK_HEX(rec, 22, "0400134dc6d7b71796195c24bdb02115a5f06e30b921");
  TC_CHECK_INT(tc_ts_open_record(&ss.rx, rec, 22, pt, &ptlen), 0);
  TC_CHECK_INT(ptlen, 3);
  /* A replayed record fails and kills the receiving cipher for good. */
  TC_CHECK_INT(tc_ts_open_record(&ss.rx, rec, 22, pt, &ptlen), TC_EPROTO);
  TC_CHECK(ss.rx.dead);
  n = tc_ts_seal_record(&cs.tx, "PRI", 3, rec);
  TC_CHECK_INT(tc_ts_open_record(&ss.rx, rec, 22, pt, &ptlen), TC_EPROTO);
}

TC_TEST(tailscale_handshake_rejections) {
  uint8_t spriv[32], spub[32], cpriv[32], init[TC_TS_INIT_LEN], resp[TC_TS_RESP_LEN];
  seq_key(spriv, 0);
  seq_key(cpriv, 0x20);
  tc_x25519_public(spriv, spub);
  struct tc_noise_hs hs;
  struct tc_ts_session ss;
  const char *emsg;
  TC_REQUIRE(tc_ts_client_initiate(&hs, 138, cpriv, spub, NULL, init) == 0);
  TC_CHECK_INT(tc_ts_server_accept(spriv, init, 100, NULL, resp, &ss, &emsg), TC_EINVAL);
  TC_CHECK_STR(emsg, "wrong handshake initiation size");
  uint8_t bad[TC_TS_INIT_LEN];
  memcpy(bad, init, sizeof bad);
  bad[2] = 2;
  TC_CHECK_INT(tc_ts_server_accept(spriv, bad, sizeof bad, NULL, resp, &ss, &emsg), TC_EINVAL);
  TC_CHECK_STR(emsg, "unexpected handshake message type");
  memcpy(bad, init, sizeof bad);
  bad[4] = 95;
  TC_CHECK_INT(tc_ts_server_accept(spriv, bad, sizeof bad, NULL, resp, &ss, &emsg), TC_EINVAL);
  memcpy(bad, init, sizeof bad);
  bad[100] ^= 1; /* final tag */
  TC_CHECK_INT(tc_ts_server_accept(spriv, bad, sizeof bad, NULL, resp, &ss, &emsg), TC_EPROTO);
  TC_CHECK(emsg == NULL);
  memcpy(bad, init, sizeof bad);
  bad[0] ^= 1; /* the version is in the prologue: a changed header fails authentication */
  TC_CHECK_INT(tc_ts_server_accept(spriv, bad, sizeof bad, NULL, resp, &ss, &emsg), TC_EPROTO);
  memcpy(bad, init, sizeof bad);
  memset(bad + 5, 0, 32); /* zero ephemeral: all-zero DH */
  TC_CHECK_INT(tc_ts_server_accept(spriv, bad, sizeof bad, NULL, resp, &ss, &emsg), TC_EPROTO);
  /* Wrong server key: the client's AEAD cannot open at the server. */
  uint8_t other[32];
  seq_key(other, 0x33);
  TC_CHECK_INT(tc_ts_server_accept(other, init, sizeof init, NULL, resp, &ss, &emsg), TC_EPROTO);
  /* A good accept followed by a tampered response fails at the client. */
  TC_REQUIRE(tc_ts_server_accept(spriv, init, sizeof init, NULL, resp, &ss, &emsg) == 0);
  TC_CHECK_INT(ss.version, 138);
  resp[50] ^= 0x80;
  struct tc_ts_session cs;
  struct tc_noise_hs hs2 = hs;
  TC_CHECK_INT(tc_ts_client_finish(&hs2, resp, &cs), TC_EPROTO);
  resp[50] ^= 0x80;
  TC_CHECK_INT(tc_ts_client_finish(&hs, resp, &cs), 0);

  uint8_t ef[64];
  TC_CHECK_INT(tc_ts_error_frame("nope", ef), 7);
  CHECK_HEX(ef, 7, "0300046e6f7065");
}

TC_TEST(record_framing_limits) {
  uint8_t k[32];
  seq_key(k, 5);
  struct tc_cipher tx, rx;
  tc_cipher_init(&tx, k, TC_NONCE_BIG_ENDIAN);
  tc_cipher_init(&rx, k, TC_NONCE_BIG_ENDIAN);
  static uint8_t big[TC_TS_MAX_MSG + 64], out[TC_TS_MAX_MSG];
  size_t ptlen;
  TC_CHECK_INT(tc_ts_seal_record(&tx, big, TC_TS_MAX_PLAINTEXT + 1, big), TC_ETOOBIG);
  int n = tc_ts_seal_record(&tx, big, TC_TS_MAX_PLAINTEXT, big);
  TC_CHECK_INT(n, TC_TS_MAX_MSG);
  TC_CHECK_INT(tc_ts_open_record(&rx, big, (size_t)n, out, &ptlen), 0);
  TC_CHECK_INT(ptlen, TC_TS_MAX_PLAINTEXT);
  n = tc_ts_seal_record(&tx, "", 0, big);
  TC_CHECK_INT(n, 19);
  TC_CHECK_INT(tc_ts_open_record(&rx, big, 19, out, &ptlen), 0);
  TC_CHECK_INT(ptlen, 0);
  uint8_t hdr[3] = {4, 0x0f, 0xfe}; /* 4094 > 4093 */
  TC_CHECK_INT(tc_ts_record_len(hdr, 3), TC_EPROTO);
  hdr[1] = 0;
  hdr[2] = 15; /* shorter than a tag */
  TC_CHECK_INT(tc_ts_record_len(hdr, 3), TC_EPROTO);
  hdr[0] = 2;
  TC_CHECK_INT(tc_ts_record_len(hdr, 1), TC_EPROTO);
  hdr[0] = 4;
  TC_CHECK_INT(tc_ts_record_len(hdr, 2), 0);
  /* Exhausted counter. */
  tx.n = UINT64_MAX;
  TC_CHECK(tc_ts_seal_record(&tx, "x", 1, big) < 0);
}

TC_TEST(key_text_round_trip_and_rejects) {
  uint8_t k[32], back[32];
  seq_key(k, 0xa0);
  char txt[TC_KEY_TEXT_MAX];
  const enum tc_key_kind kinds[] = {TC_KEY_MACHINE, TC_KEY_NODE, TC_KEY_DISCO,
                                    TC_KEY_PRIVATE, TC_KEY_NLPUB, TC_KEY_CHALLENGE};
  const char *prefixes[] = {"mkey:", "nodekey:", "discokey:", "privkey:", "nlpub:", "chalpub:"};
  for (size_t i = 0; i < TC_ARRAY_LEN(kinds); i++) {
    tc_key_format(kinds[i], k, txt);
    TC_CHECK(tc_str_has_prefix(txt, prefixes[i]));
    TC_CHECK_INT(strlen(txt), strlen(prefixes[i]) + 64);
    memset(back, 0, 32);
    TC_CHECK_INT(tc_key_parse(kinds[i], txt, strlen(txt), back), 0);
    TC_CHECK(memcmp(back, k, 32) == 0);
  }
  tc_key_format(TC_KEY_NODE, k, txt);
  TC_CHECK_STR(txt, "nodekey:a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf");
  TC_CHECK_INT(tc_key_parse(TC_KEY_MACHINE, txt, strlen(txt), back), TC_EINVAL); /* wrong prefix */
  TC_CHECK_INT(tc_key_parse(TC_KEY_NODE, txt, strlen(txt) - 1, back), TC_EINVAL); /* short */
  char longer[100];
  snprintf(longer, sizeof longer, "%s00", txt);
  TC_CHECK_INT(tc_key_parse(TC_KEY_NODE, longer, strlen(longer), back), TC_EINVAL);
  char badhex[TC_KEY_TEXT_MAX];
  memcpy(badhex, txt, sizeof badhex);
  badhex[20] = 'g';
  TC_CHECK_INT(tc_key_parse(TC_KEY_NODE, badhex, strlen(badhex), back), TC_EINVAL);
  badhex[20] = ' ';
  TC_CHECK_INT(tc_key_parse(TC_KEY_NODE, badhex, strlen(badhex), back), TC_EINVAL);
  TC_CHECK_INT(tc_key_parse(TC_KEY_NODE, "", 0, back), TC_EINVAL);
  TC_CHECK_INT(tc_key_parse(TC_KEY_NODE, "nodekey:", 8, back), TC_EINVAL);
  /* NUL inside the claimed length is not hex. */
  char withnul[TC_KEY_TEXT_MAX];
  memcpy(withnul, txt, sizeof withnul);
  withnul[30] = 0;
  TC_CHECK_INT(tc_key_parse(TC_KEY_NODE, withnul, 72, back), TC_EINVAL);
  /* Upper-case digits are accepted, as Go's hex decoder does. */
  char upper[TC_KEY_TEXT_MAX];
  memcpy(upper, txt, sizeof upper);
  for (char *p = upper + 8; *p; p++)
    if (*p >= 'a' && *p <= 'f') *p = (char)(*p - 32);
  TC_CHECK_INT(tc_key_parse(TC_KEY_NODE, upper, strlen(upper), back), 0);
  TC_CHECK(memcmp(back, k, 32) == 0);
  uint8_t zero[32] = {0};
  TC_CHECK(tc_key_is_zero(zero));
  TC_CHECK(!tc_key_is_zero(k));
  tc_key_format(TC_KEY_MACHINE, zero, txt);
  TC_CHECK_STR(txt, "mkey:0000000000000000000000000000000000000000000000000000000000000000");
}

/* Deterministic pseudo-random inputs (xorshift), so a failure replays. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (uint32_t)rng_state;
}

TC_TEST(key_parse_mutations) {
  uint8_t k[32], back[32];
  char txt[TC_KEY_TEXT_MAX], m[TC_KEY_TEXT_MAX + 8];
  const char alphabet[] = "0123456789abcdefABCDEFgxz:- \t";
  for (int i = 0; i < 20000; i++) {
    for (int j = 0; j < 32; j++) k[j] = (uint8_t)rnd();
    enum tc_key_kind kind = (enum tc_key_kind)(rnd() % 6);
    tc_key_format(kind, k, txt);
    size_t len = strlen(txt);
    memcpy(m, txt, len + 1);
    int op = rnd() % 4;
    if (op == 0) {
      m[rnd() % len] = alphabet[rnd() % (sizeof alphabet - 1)];
    } else if (op == 1) {
      len = rnd() % len; /* truncate */
    } else if (op == 2) {
      m[len] = alphabet[rnd() % 16];
      len++; /* one digit too many */
    } /* op 3: unchanged */
    int rc = tc_key_parse(kind, m, len, back);
    if (rc == 0) {
      /* Anything accepted must be exactly prefix + 64 hex digits of the same key. */
      char again[TC_KEY_TEXT_MAX];
      tc_key_format(kind, back, again);
      TC_CHECK(len == strlen(again) && !strncasecmp(again, m, len));
    } else {
      TC_CHECK_INT(rc, TC_EINVAL);
      TC_CHECK(op != 3);
    }
    if (tc_test_failures) return;
  }
}

TC_TEST(handshake_and_record_mutations) {
  uint8_t spriv[32], spub[32], cpriv[32], init[TC_TS_INIT_LEN], resp[TC_TS_RESP_LEN];
  seq_key(spriv, 1);
  seq_key(cpriv, 2);
  tc_x25519_public(spriv, spub);
  struct tc_noise_hs hs;
  TC_REQUIRE(tc_ts_client_initiate(&hs, 100, cpriv, spub, NULL, init) == 0);
  tc_noise_hs_wipe(&hs);
  struct tc_ts_session ss;
  const char *emsg;
  /* Any single-bit change to an initiation is refused. */
  for (int bit = 0; bit < TC_TS_INIT_LEN * 8; bit++) {
    uint8_t m[TC_TS_INIT_LEN];
    memcpy(m, init, sizeof m);
    m[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    int rc = tc_ts_server_accept(spriv, m, sizeof m, NULL, resp, &ss, &emsg);
    TC_CHECK(rc == TC_EINVAL || rc == TC_EPROTO);
    if (tc_test_failures) return;
  }
  /* Records: random headers never claim more than a record may hold. */
  uint8_t rec[TC_TS_MAX_MSG], out[TC_TS_MAX_MSG];
  uint8_t key[32];
  seq_key(key, 9);
  for (int i = 0; i < 20000; i++) {
    for (int j = 0; j < 3; j++) rec[j] = (uint8_t)rnd();
    if (i % 2) rec[0] = 4;
    int n = tc_ts_record_len(rec, 3);
    TC_CHECK(n == TC_EPROTO || (n >= 19 && n <= TC_TS_MAX_MSG));
    if (n > 0) {
      for (int j = 3; j < n; j++) rec[j] = (uint8_t)rnd();
      struct tc_cipher rx;
      tc_cipher_init(&rx, key, TC_NONCE_BIG_ENDIAN);
      size_t ptlen;
      TC_CHECK_INT(tc_ts_open_record(&rx, rec, (size_t)n, out, &ptlen), TC_EPROTO);
      TC_CHECK(rx.dead);
    }
    if (tc_test_failures) return;
  }
}

__attribute__((constructor)) static void init_crypto(void) {
  if (tc_crypto_init()) abort();
}
