/* crypto: the primitives of Tailscale's control transport. BLAKE2s-256 (via
 * libb2), HMAC-BLAKE2s and the Noise HKDF, X25519 and ChaCha20-Poly1305
 * (via libsodium), the Noise_IK_25519_ChaChaPoly_BLAKE2s handshake (both
 * roles, generic payloads, injectable ephemerals for test vectors), Tailscale's
 * fixed 101/51-byte handshake framing and 4096-byte transport records, and
 * the text forms of keys ("mkey:<hex>", "nodekey:<hex>", ...).
 *
 * Threads: every function is reentrant. A handshake state or cipher state
 * belongs to one thread at a time (callers serialise). Nothing here does I/O.
 * Call tc_crypto_init() once before use (idempotent, thread-safe). */
#ifndef TC_CRYPTO_H
#define TC_CRYPTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TC_KEY_LEN 32
#define TC_HASH_LEN 32
#define TC_AEAD_TAG_LEN 16

/* Initialises libsodium. 0 or TC_EINTERNAL. */
int tc_crypto_init(void);

/* ---- BLAKE2s, HMAC, HKDF ------------------------------------------------ */
/* Unkeyed BLAKE2s-256 of in. */
void tc_blake2s(const void *in, size_t inlen, uint8_t out[TC_HASH_LEN]);
/* Keyed BLAKE2s-256 (keylen 1..32); only used to check the KATs. 0 or TC_EINVAL. */
int tc_blake2s_keyed(const void *in, size_t inlen, const void *key, size_t keylen, uint8_t out[TC_HASH_LEN]);
/* RFC 2104 HMAC over BLAKE2s-256 with a 64-byte block. keylen may exceed 64. */
void tc_hmac_blake2s(const void *key, size_t keylen, const void *msg, size_t msglen, uint8_t out[TC_HASH_LEN]);
/* Noise HKDF with two outputs: t = HMAC(ck, ikm), o1 = HMAC(t, 01),
 * o2 = HMAC(t, o1 || 02). Outputs may alias ck. */
void tc_noise_hkdf2(const uint8_t ck[TC_HASH_LEN], const void *ikm, size_t ikmlen, uint8_t o1[TC_HASH_LEN],
                    uint8_t o2[TC_HASH_LEN]);

/* ---- X25519 ------------------------------------------------------------ */
/* Public key of a raw 32-byte private key (clamped internally). */
void tc_x25519_public(const uint8_t priv[TC_KEY_LEN], uint8_t pub[TC_KEY_LEN]);
/* Fresh random key pair. */
void tc_x25519_keygen(uint8_t priv[TC_KEY_LEN], uint8_t pub[TC_KEY_LEN]);
/* Shared secret. TC_EPROTO when the result is all zero (low-order point), as
 * Go's curve25519.X25519 refuses it. */
int tc_x25519(const uint8_t priv[TC_KEY_LEN], const uint8_t pub[TC_KEY_LEN], uint8_t out[TC_KEY_LEN]);

/* ---- transport cipher state ---------------------------------------------- */
enum tc_nonce_mode {
  TC_NONCE_BIG_ENDIAN = 0,   /* Tailscale: 4 zero bytes || uint64 BE counter */
  TC_NONCE_LITTLE_ENDIAN = 1 /* the Noise spec; only for the cacophony vector */
};

/* One direction of a transport channel. Plain value; wipe with
 * tc_cipher_wipe. After a failed open or an exhausted counter it is dead and
 * every later call fails (no resynchronisation is possible). */
struct tc_cipher {
  uint8_t key[TC_KEY_LEN];
  uint64_t n;
  enum tc_nonce_mode mode;
  bool dead;
};

void tc_cipher_init(struct tc_cipher *c, const uint8_t key[TC_KEY_LEN], enum tc_nonce_mode mode);
void tc_cipher_wipe(struct tc_cipher *c);
/* Seals pt (ptlen) with ad into out (ptlen + 16 bytes; may alias pt).
 * 0, or TC_EPROTO when the cipher is dead/exhausted. */
int tc_cipher_seal(struct tc_cipher *c, const void *ad, size_t adlen, const void *pt, size_t ptlen, uint8_t *out);
/* Opens ct (ctlen >= 16) into out (ctlen - 16 bytes; may alias ct). A
 * failure kills the cipher. 0 or TC_EPROTO. */
int tc_cipher_open(struct tc_cipher *c, const void *ad, size_t adlen, const uint8_t *ct, size_t ctlen, uint8_t *out);

/* ---- Noise IK handshake (generic) ---------------------------------------- */
/* The state of one IK handshake, either role. Plain value, no heap; wipe
 * with tc_noise_hs_wipe. Message 1 is "-> e, es, s, ss", message 2
 * "<- e, ee, se", each followed by an encrypted payload. */
struct tc_noise_hs {
  uint8_t h[TC_HASH_LEN], ck[TC_HASH_LEN], k[TC_KEY_LEN];
  bool initiator, have_e;
  int step; /* messages processed so far: 0, 1, 2 */
  uint8_t s_priv[TC_KEY_LEN], s_pub[TC_KEY_LEN];
  uint8_t e_priv[TC_KEY_LEN], e_pub[TC_KEY_LEN];
  uint8_t rs[TC_KEY_LEN], re[TC_KEY_LEN];
};

/* Starts a handshake: MixHash(prologue), MixHash(responder static).
 * The initiator passes the responder's public key in rs; the responder passes
 * rs = NULL (its own public key is derived from s_priv). */
void tc_noise_hs_init(struct tc_noise_hs *hs, bool initiator, const void *prologue, size_t prologue_len,
                      const uint8_t s_priv[TC_KEY_LEN], const uint8_t *rs);
/* Uses e_priv as this side's ephemeral instead of a random one (test vectors). */
void tc_noise_hs_set_ephemeral(struct tc_noise_hs *hs, const uint8_t e_priv[TC_KEY_LEN]);
/* Message sizes for a payload of n bytes. */
#define TC_NOISE_IK_MSG1_LEN(n) (32 + 48 + (n) + 16)
#define TC_NOISE_IK_MSG2_LEN(n) (32 + (n) + 16)
/* Initiator writes message 1 into out (TC_NOISE_IK_MSG1_LEN(plen)). 0 or TC_E*. */
int tc_noise_hs_write1(struct tc_noise_hs *hs, const void *payload, size_t plen, uint8_t *out);
/* Responder reads message 1; the payload (mlen - 96 bytes) goes to payload_out
 * (may be NULL when it is empty). Afterwards hs->rs is the initiator's static
 * key. 0, TC_EINVAL (size) or TC_EPROTO (authentication/DH failure). */
int tc_noise_hs_read1(struct tc_noise_hs *hs, const uint8_t *msg, size_t mlen, uint8_t *payload_out);
/* Responder writes message 2 (TC_NOISE_IK_MSG2_LEN(plen)). */
int tc_noise_hs_write2(struct tc_noise_hs *hs, const void *payload, size_t plen, uint8_t *out);
/* Initiator reads message 2 (payload mlen - 48 bytes). */
int tc_noise_hs_read2(struct tc_noise_hs *hs, const uint8_t *msg, size_t mlen, uint8_t *payload_out);
/* After both messages: derives the transport ciphers for this side (tx
 * encrypts what this side sends) and copies the handshake hash to hash (may
 * be NULL). Wipes the handshake secrets. 0 or TC_EINVAL (not finished). */
int tc_noise_hs_split(struct tc_noise_hs *hs, enum tc_nonce_mode mode, struct tc_cipher *tx, struct tc_cipher *rx,
                      uint8_t hash[TC_HASH_LEN]);
void tc_noise_hs_wipe(struct tc_noise_hs *hs);

/* ---- Tailscale control framing ------------------------------------------- */
#define TC_TS_INIT_LEN 101
#define TC_TS_RESP_LEN 51
#define TC_TS_HDR_LEN 3
#define TC_TS_MAX_MSG 4096                         /* whole record on the wire */
#define TC_TS_MAX_CIPHERTEXT (TC_TS_MAX_MSG - 3)     /* 4093 */
#define TC_TS_MAX_PLAINTEXT (TC_TS_MAX_CIPHERTEXT - 16) /* 4077 */
#define TC_TS_MSG_INITIATION 1
#define TC_TS_MSG_RESPONSE 2
#define TC_TS_MSG_ERROR 3
#define TC_TS_MSG_RECORD 4

/* An established control channel, either side. Plain value. */
struct tc_ts_session {
  uint16_t version;             /* from the initiation header */
  uint8_t peer[TC_KEY_LEN];     /* server: the client's machine key; client: the server key */
  uint8_t hash[TC_HASH_LEN];    /* Noise handshake hash */
  struct tc_cipher tx, rx;
};

/* Writes the prologue "Tailscale Control Protocol v<version>" into out
 * (>= 40 bytes); returns its length. */
size_t tc_ts_prologue(uint16_t version, char out[40]);

/* Client: builds the 101-byte initiation. hs keeps the state for
 * tc_ts_client_finish. eph_priv NULL = random. */
int tc_ts_client_initiate(struct tc_noise_hs *hs, uint16_t version, const uint8_t machine_priv[TC_KEY_LEN],
                          const uint8_t server_pub[TC_KEY_LEN], const uint8_t *eph_priv,
                          uint8_t out[TC_TS_INIT_LEN]);
/* Client: consumes the 51-byte response and fills sess (tx = client->server).
 * Wipes hs. 0, TC_EINVAL (framing) or TC_EPROTO (authentication). */
int tc_ts_client_finish(struct tc_noise_hs *hs, const uint8_t resp[TC_TS_RESP_LEN], struct tc_ts_session *sess);

/* Server: processes an initiation of init_len bytes and produces the
 * response. On TC_EINVAL (wrong size, type or length field) *errmsg is a
 * static, non-echoing text for an error frame; on TC_EPROTO (bad DH or AEAD)
 * the caller should just close. eph_priv NULL = random. */
int tc_ts_server_accept(const uint8_t server_priv[TC_KEY_LEN], const uint8_t *init, size_t init_len,
                        const uint8_t *eph_priv, uint8_t resp[TC_TS_RESP_LEN], struct tc_ts_session *sess,
                        const char **errmsg);

/* Writes an error frame 03|len|text into out (3 + strlen(text) bytes, text
 * <= 1024); returns its length. */
size_t tc_ts_error_frame(const char *text, uint8_t *out);
/* Seals one transport record (04|len|ciphertext) of ptlen <= 4077 bytes into
 * out (ptlen + 19 bytes). Returns the record length or a negative TC_E*. */
int tc_ts_seal_record(struct tc_cipher *tx, const void *pt, size_t ptlen, uint8_t *out);
/* Given the first bytes of a record, returns its total length (3 + the
 * length field) once avail >= 3, 0 when more bytes are needed, or TC_EPROTO
 * when the type is not 4 or the length is outside 16..4093. */
int tc_ts_record_len(const uint8_t *p, size_t avail);
/* Opens one whole record (rec_len bytes, as reported by tc_ts_record_len)
 * into out (rec_len - 19 bytes); *ptlen gets the plaintext length (0 for an
 * empty record, which callers must skip). 0 or TC_EPROTO. */
int tc_ts_open_record(struct tc_cipher *rx, const uint8_t *rec, size_t rec_len, uint8_t *out, size_t *ptlen);

/* ---- key text ------------------------------------------------------------ */
enum tc_key_kind {
  TC_KEY_MACHINE,   /* mkey: */
  TC_KEY_NODE,      /* nodekey: */
  TC_KEY_DISCO,     /* discokey: */
  TC_KEY_PRIVATE,   /* privkey: */
  TC_KEY_NLPUB,     /* nlpub: */
  TC_KEY_CHALLENGE, /* chalpub: */
};
#define TC_KEY_TEXT_MAX 74 /* "discokey:" + 64 hex + NUL */

/* The prefix of a kind, e.g. "nodekey:". Static. */
const char *tc_key_prefix(enum tc_key_kind kind);
/* Formats prefix + 64 lowercase hex into out; returns out. */
char *tc_key_format(enum tc_key_kind kind, const uint8_t key[TC_KEY_LEN], char out[TC_KEY_TEXT_MAX]);
/* Parses exactly prefix + 64 hex digits (s need not be NUL-terminated).
 * Go's decoder also accepts upper-case digits, so this does too. 0 or TC_EINVAL. */
int tc_key_parse(enum tc_key_kind kind, const char *s, size_t len, uint8_t key[TC_KEY_LEN]);
/* The all-zero key means "absent" on the wire. */
bool tc_key_is_zero(const uint8_t key[TC_KEY_LEN]);

#endif
