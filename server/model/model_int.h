/* model internals shared by the model's own files and its tests: refcounted
 * record boxes, hash indexes, the snapshot tables, the IP pool allocator and
 * naming helpers. Nothing outside server/model and tests/model includes this. */
#ifndef TC_MODEL_INT_H
#define TC_MODEL_INT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "model/model.h"
#include "model/types.h"

typedef unsigned __int128 tc_u128;

/* ---- boxes: immutable values shared between snapshots by refcount -------- */
/* Returns zeroed storage of `size` bytes with one reference; dtor (may be
 * NULL) releases the insides when the last reference goes. */
void *tc_box_new(size_t size, void (*dtor)(void *));
/* Adds a reference; returns p. NULL ok. */
void *tc_box_ref(const void *p);
/* Drops a reference. NULL ok. */
void tc_box_unref(const void *p);

/* ---- hash index over an array of record pointers -------------------------- */
/* Extracts the key of rec; false when rec has none (e.g. no IPv4). */
typedef bool (*tc_hkey_fn)(const void *rec, const void **key, size_t *len);
struct tc_hidx {
  uint32_t mask;
  uint32_t *slots; /* index + 1; 0 = empty */
};
void tc_hidx_build(struct tc_hidx *h, const void *const *recs, size_t n, tc_hkey_fn f);
/* Index of the record with this key, or -1. */
long tc_hidx_find(const struct tc_hidx *h, const void *const *recs, tc_hkey_fn f,
                  const void *key, size_t len);
void tc_hidx_free(struct tc_hidx *h);

/* ---- snapshot tables (each a box, immutable once built) -------------------- */
struct tc_utab {
  size_t n;
  struct tc_user **v; /* boxed records, sorted by id */
  struct tc_hidx by_name;
};
/* The node table is copied on every node write, so it does not hold one
 * reference per record: v is a plain array of borrowed pointers, and the
 * references live in chunks (boxes of up to ~64 records each, contiguous id
 * ranges) that tables share. An edit copies v (a memcpy), re-references the
 * untouched chunks and rebuilds the one chunk it touches: O(N) bytes copied
 * but O(N / 64) atomic reference counts, instead of one count per record on
 * a cache line of its own (at N = 2,000 that was ~13 % of a registration's
 * model CPU). */
struct tc_nchunk {
  size_t n;
  struct tc_node **r; /* references, sorted by id */
};
struct tc_ntab {
  size_t n;
  struct tc_node **v; /* boxed records sorted by id, borrowed from the chunks */
  struct tc_nchunk **chunks; /* boxes, in id order */
  size_t nchunks;
  size_t n_routers; /* nodes with both announced and approved routes */
  struct tc_hidx by_nk, by_mk, by_name, by_ip4, by_ip6;
};
struct tc_ktab {
  size_t n_pre, n_api;
  struct tc_preauth_key **pre; /* boxed, sorted by id */
  struct tc_api_key **api;
};
struct tc_otab {
  size_t n;
  int64_t *ids; /* sorted */
};
struct tc_rtab {
  size_t n;
  struct tc_route_primary *v; /* prefix strings owned by the table */
};

/* Builders: take an array of boxed records (references are stolen, the
 * array itself is adopted) sorted by id and return a new table box. */
struct tc_utab *tc_utab_new(struct tc_user **v, size_t n);
struct tc_ntab *tc_ntab_new(struct tc_node **v, size_t n);
struct tc_ktab *tc_ktab_new(struct tc_preauth_key **pre, size_t n_pre, struct tc_api_key **api,
                            size_t n_api);
struct tc_otab *tc_otab_new(int64_t *ids, size_t n);
/* Upsert/remove one record into a copy of a table (other records shared).
 * rec (boxed, stolen) replaces the record with the same id or is inserted;
 * remove_id > 0 drops that record. */
struct tc_utab *tc_utab_edit(const struct tc_utab *t, struct tc_user *rec, int64_t remove_id);
struct tc_ntab *tc_ntab_edit(const struct tc_ntab *t, struct tc_node *rec, int64_t remove_id);
struct tc_ktab *tc_ktab_edit_pre(const struct tc_ktab *t, struct tc_preauth_key *rec,
                                 int64_t remove_id);
struct tc_ktab *tc_ktab_edit_api(const struct tc_ktab *t, struct tc_api_key *rec,
                                 int64_t remove_id);
struct tc_otab *tc_otab_edit(const struct tc_otab *t, int64_t id, bool present);
/* Chooses primaries for subnet routes among online nodes; keeps the previous
 * primary (from prev, may be NULL) while it stays eligible, else the lowest id. */
struct tc_rtab *tc_rtab_compute(const struct tc_ntab *nodes, const struct tc_otab *online,
                                const struct tc_rtab *prev);
/* True when n announces and has approved routes (a candidate router). */
bool tc_node_is_router(const struct tc_node *n);
bool tc_rtab_equal(const struct tc_rtab *a, const struct tc_rtab *b);

/* Boxed copies of records (deep). */
struct tc_user *tc_box_user(const struct tc_user *src);
struct tc_node *tc_box_node(const struct tc_node *src);
struct tc_preauth_key *tc_box_preauth(const struct tc_preauth_key *src);
struct tc_api_key *tc_box_apikey(const struct tc_api_key *src);
struct tc_policy_rec *tc_box_policy(const struct tc_policy_rec *src);

struct tc_snapshot_priv {
  _Atomic long refs;
  struct tc_utab *users;
  struct tc_ntab *nodes;
  struct tc_ktab *keys;
  struct tc_policy_rec *policy; /* boxed; may be NULL */
  struct tc_otab *online;
  struct tc_rtab *primaries;
};
/* Makes a snapshot holding new references to each table (policy may be NULL). */
struct tc_snapshot *tc_snapshot_new(uint64_t seq, struct tc_utab *u, struct tc_ntab *n,
                                    struct tc_ktab *k, struct tc_policy_rec *p,
                                    struct tc_otab *o, struct tc_rtab *r);

/* ---- IP pools --------------------------------------------------------------- */
struct tc_ippool {
  bool enabled;
  int family;      /* 4 or 6 */
  int plen;
  uint8_t net[16]; /* network address (first 4 bytes for v4) */
  tc_u128 size;    /* addresses in the prefix */
  tc_u128 cursor;  /* offset of the last sequential allocation */
  char text[64];   /* canonical prefix text */
};
/* text NULL = default pool of that family, "" = disabled. TC_EINVAL on bad
 * text or wrong family. */
int tc_ippool_init(struct tc_ippool *p, int family, const char *text, struct tc_err *err);
typedef bool (*tc_ip_in_use_fn)(void *ctx, const uint8_t *addr, size_t len);
/* Picks a free address (4 or 16 bytes into out). TC_EINTERNAL "no free IPv4
 * address left in <prefix>" on exhaustion. */
int tc_ippool_next(struct tc_ippool *p, enum tc_model_alloc strategy, tc_ip_in_use_fn in_use,
                   void *ctx, uint8_t out[16], struct tc_err *err);
/* Moves the sequential cursor past addr (at load) so allocation continues
 * after the highest address in use. */
void tc_ippool_note_used(struct tc_ippool *p, const uint8_t *addr);
bool tc_ippool_contains(const struct tc_ippool *p, const uint8_t *addr);
/* Addresses Tailscale reserves: 100.100.100.100, 100.115.92.0/23,
 * fd7a:115c:a1e0::53. */
bool tc_ip_is_reserved(int family, const uint8_t *addr);
/* Canonical prefix text (host bits must be zero, like Headscale). 0 or TC_EINVAL. */
int tc_prefix_canon(const char *in, char out[64], struct tc_err *err);

/* ---- naming ------------------------------------------------------------------ */
typedef bool (*tc_name_taken_fn)(void *ctx, const char *name);
/* Owned unique given name from hostname: sanitised, then "-1", "-2", ... */
char *tc_model_unique_name(const char *hostname, tc_name_taken_fn taken, void *ctx);
/* 0 when tag is "tag:<name>" with a sane name. */
int tc_model_validate_tag(const char *tag, struct tc_err *err);

/* ---- key tokens ----------------------------------------------------------- */
#define TC_KEY_PREFIX_LEN 12
#define TC_KEY_SECRET_LEN 64
/* Parses "<kind_prefix><12>-<64>" (kind_prefix "hskey-auth-" / "hskey-api-").
 * Copies prefix (13 bytes) and hashes the secret. 0 or TC_EINVAL. */
int tc_token_parse(const char *tok, size_t len, const char *kind_prefix, char prefix[13],
                   uint8_t hash[32]);
/* New owned token and its prefix/hash. */
char *tc_token_new(const char *kind_prefix, char prefix[13], uint8_t hash[32]);

#endif
