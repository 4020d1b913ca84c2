/* snapshot: immutable views of the model. A snapshot is a handful of
 * refcounted tables (users, nodes, keys, policy, online set, primary routes);
 * each table holds refcounted records. A write replaces only the tables and
 * records it touches, so untouched records are shared, never copied. Tables
 * are built by the writer (under the model's writer lock); everything here
 * that reads a finished snapshot is safe from any thread without locks. */
#include <pthread.h>
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>

#include "model/model_int.h"

/* ---- boxes -------------------------------------------------------------------- */
struct box {
  _Atomic long refs;
  void (*dtor)(void *);
  alignas(max_align_t) unsigned char data[];
};

static struct box *box_of(const void *p) {
  return (struct box *)(void *)((unsigned char *)(uintptr_t)p - offsetof(struct box, data));
}

void *tc_box_new(size_t size, void (*dtor)(void *)) {
  struct box *b = tc_xcalloc(1, sizeof *b + size);
  atomic_init(&b->refs, 1);
  b->dtor = dtor;
  return b->data;
}

void *tc_box_ref(const void *p) {
  if (!p) return NULL;
  atomic_fetch_add_explicit(&box_of(p)->refs, 1, memory_order_relaxed);
  return (void *)(uintptr_t)p;
}

void tc_box_unref(const void *p) {
  if (!p) return;
  struct box *b = box_of(p);
  if (atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1) return;
  if (b->dtor) b->dtor(b->data);
  free(b);
}

static void user_dtor(void *p) { tc_user_free(p); }
static void node_dtor(void *p) { tc_node_free(p); }
static void pre_dtor(void *p) { tc_preauth_key_free(p); }
static void api_dtor(void *p) { tc_api_key_free(p); }
static void policy_dtor(void *p) { tc_policy_rec_free(p); }

struct tc_user *tc_box_user(const struct tc_user *src) {
  struct tc_user *u = tc_box_new(sizeof *u, user_dtor);
  tc_user_copy(u, src);
  return u;
}
struct tc_node *tc_box_node(const struct tc_node *src) {
  struct tc_node *n = tc_box_new(sizeof *n, node_dtor);
  tc_node_copy(n, src);
  return n;
}
struct tc_preauth_key *tc_box_preauth(const struct tc_preauth_key *src) {
  struct tc_preauth_key *k = tc_box_new(sizeof *k, pre_dtor);
  tc_preauth_key_copy(k, src);
  return k;
}
struct tc_api_key *tc_box_apikey(const struct tc_api_key *src) {
  struct tc_api_key *k = tc_box_new(sizeof *k, api_dtor);
  tc_api_key_copy(k, src);
  return k;
}
struct tc_policy_rec *tc_box_policy(const struct tc_policy_rec *src) {
  struct tc_policy_rec *p = tc_box_new(sizeof *p, policy_dtor);
  p->id = src->id;
  p->data = src->data ? tc_xstrdup(src->data) : NULL;
  p->actor = src->actor ? tc_xstrdup(src->actor) : NULL;
  p->created_at = src->created_at;
  return p;
}

/* ---- hash index ------------------------------------------------------------------ */
static uint64_t hash_seed;
static pthread_once_t seed_once = PTHREAD_ONCE_INIT;
static void seed_init(void) { tc_random(&hash_seed, sizeof hash_seed); }

static uint64_t hash_bytes(const void *p, size_t n) {
  /* FNV-1a with a per-process seed and a final mix; keys are mostly random
   * public keys, and names are short. */
  const uint8_t *b = p;
  uint64_t h = 1469598103934665603ull ^ hash_seed;
  for (size_t i = 0; i < n; i++) {
    h ^= b[i];
    h *= 1099511628211ull;
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

static void hidx_put(struct tc_hidx *h, const void *rec, size_t i, tc_hkey_fn f) {
  const void *k;
  size_t len;
  if (!f(rec, &k, &len)) return;
  uint32_t s = (uint32_t)hash_bytes(k, len) & h->mask;
  while (h->slots[s]) s = (s + 1) & h->mask;
  h->slots[s] = (uint32_t)i + 1;
}

/* Slot arrays are boxes so that tables which keep every key at the same
 * position (the common "replace one record" edit) share them. */
void tc_hidx_build(struct tc_hidx *h, const void *const *recs, size_t n, tc_hkey_fn f) {
  pthread_once(&seed_once, seed_init);
  uint32_t cap = 8;
  while (cap < n * 2 + 1) cap <<= 1;
  h->mask = cap - 1;
  h->slots = tc_box_new((size_t)cap * sizeof *h->slots, NULL);
  for (size_t i = 0; i < n; i++) hidx_put(h, recs[i], i, f);
}

static void hidx_share(struct tc_hidx *dst, const struct tc_hidx *src) {
  dst->mask = src->mask;
  dst->slots = tc_box_ref(src->slots);
}

/* dst = src plus rec at index i, when the load factor allows; else false. */
static bool hidx_append(struct tc_hidx *dst, const struct tc_hidx *src, size_t n_after,
                        const void *rec, size_t i, tc_hkey_fn f) {
  size_t cap = (size_t)src->mask + 1;
  if (cap < n_after * 2 + 1) return false;
  dst->mask = src->mask;
  dst->slots = tc_box_new(cap * sizeof *dst->slots, NULL);
  memcpy(dst->slots, src->slots, cap * sizeof *dst->slots);
  hidx_put(dst, rec, i, f);
  return true;
}

static bool same_key(const void *a, const void *b, tc_hkey_fn f) {
  const void *ka, *kb;
  size_t la, lb;
  bool ha = f(a, &ka, &la), hb = f(b, &kb, &lb);
  if (ha != hb) return false;
  return !ha || (la == lb && memcmp(ka, kb, la) == 0);
}

long tc_hidx_find(const struct tc_hidx *h, const void *const *recs, tc_hkey_fn f,
                  const void *key, size_t len) {
  if (!h->slots) return -1;
  uint32_t s = (uint32_t)hash_bytes(key, len) & h->mask;
  while (h->slots[s]) {
    long i = (long)h->slots[s] - 1;
    const void *k;
    size_t kl;
    if (f(recs[i], &k, &kl) && kl == len && memcmp(k, key, len) == 0) return i;
    s = (s + 1) & h->mask;
  }
  return -1;
}

void tc_hidx_free(struct tc_hidx *h) {
  tc_box_unref(h->slots);
  h->slots = NULL;
}

static bool key_user_name(const void *r, const void **k, size_t *len) {
  const struct tc_user *u = r;
  if (!u->name) return false;
  *k = u->name;
  *len = strlen(u->name);
  return true;
}
static bool key_nk(const void *r, const void **k, size_t *len) {
  *k = ((const struct tc_node *)r)->node_key;
  *len = TC_KEY_LEN;
  return true;
}
static bool key_mk(const void *r, const void **k, size_t *len) {
  *k = ((const struct tc_node *)r)->machine_key;
  *len = TC_KEY_LEN;
  return true;
}
static bool key_gname(const void *r, const void **k, size_t *len) {
  const struct tc_node *n = r;
  if (!n->given_name) return false;
  *k = n->given_name;
  *len = strlen(n->given_name);
  return true;
}
static bool key_ip4(const void *r, const void **k, size_t *len) {
  const struct tc_node *n = r;
  if (!n->has_ipv4) return false;
  *k = n->ipv4;
  *len = 4;
  return true;
}
static bool key_ip6(const void *r, const void **k, size_t *len) {
  const struct tc_node *n = r;
  if (!n->has_ipv6) return false;
  *k = n->ipv6;
  *len = 16;
  return true;
}

/* ---- tables --------------------------------------------------------------------------- */
static void utab_dtor(void *p) {
  struct tc_utab *t = p;
  for (size_t i = 0; i < t->n; i++) tc_box_unref(t->v[i]);
  free(t->v);
  tc_hidx_free(&t->by_name);
}
static void ntab_dtor(void *p) {
  struct tc_ntab *t = p;
  for (size_t i = 0; i < t->nchunks; i++) tc_box_unref(t->chunks[i]);
  free(t->chunks);
  free(t->v);
  tc_hidx_free(&t->by_nk);
  tc_hidx_free(&t->by_mk);
  tc_hidx_free(&t->by_name);
  tc_hidx_free(&t->by_ip4);
  tc_hidx_free(&t->by_ip6);
}
static void ktab_dtor(void *p) {
  struct tc_ktab *t = p;
  for (size_t i = 0; i < t->n_pre; i++) tc_box_unref(t->pre[i]);
  for (size_t i = 0; i < t->n_api; i++) tc_box_unref(t->api[i]);
  free(t->pre);
  free(t->api);
}
static void otab_dtor(void *p) { free(((struct tc_otab *)p)->ids); }
static void rtab_dtor(void *p) {
  struct tc_rtab *t = p;
  for (size_t i = 0; i < t->n; i++) free((char *)t->v[i].prefix);
  free(t->v);
}

struct tc_utab *tc_utab_new(struct tc_user **v, size_t n) {
  struct tc_utab *t = tc_box_new(sizeof *t, utab_dtor);
  t->v = v;
  t->n = n;
  tc_hidx_build(&t->by_name, (const void *const *)v, n, key_user_name);
  return t;
}

#define NCHUNK 64

static void nchunk_dtor(void *p) {
  struct tc_nchunk *c = p;
  for (size_t i = 0; i < c->n; i++) tc_box_unref(c->r[i]);
  free(c->r);
}

/* A chunk box adopting n references from recs (the array is copied). */
static struct tc_nchunk *nchunk_new(struct tc_node *const *recs, size_t n) {
  struct tc_nchunk *c = tc_box_new(sizeof *c, nchunk_dtor);
  c->r = tc_xmalloc((n + 1) * sizeof *c->r);
  memcpy(c->r, recs, n * sizeof *c->r);
  c->n = n;
  return c;
}

bool tc_node_is_router(const struct tc_node *n) { return n->approved_routes.n && n->announced_routes.n; }

struct tc_ntab *tc_ntab_new(struct tc_node **v, size_t n) {
  struct tc_ntab *t = tc_box_new(sizeof *t, ntab_dtor);
  t->v = v;
  t->n = n;
  for (size_t i = 0; i < n; i++) t->n_routers += tc_node_is_router(v[i]);
  t->nchunks = (n + NCHUNK - 1) / NCHUNK;
  t->chunks = tc_xmalloc((t->nchunks + 1) * sizeof *t->chunks);
  for (size_t i = 0; i < t->nchunks; i++)
    t->chunks[i] = nchunk_new(v + i * NCHUNK, TC_MIN((size_t)NCHUNK, n - i * NCHUNK));
  const void *const *r = (const void *const *)v;
  tc_hidx_build(&t->by_nk, r, n, key_nk);
  tc_hidx_build(&t->by_mk, r, n, key_mk);
  tc_hidx_build(&t->by_name, r, n, key_gname);
  tc_hidx_build(&t->by_ip4, r, n, key_ip4);
  tc_hidx_build(&t->by_ip6, r, n, key_ip6);
  return t;
}

struct tc_ktab *tc_ktab_new(struct tc_preauth_key **pre, size_t n_pre, struct tc_api_key **api,
                            size_t n_api) {
  struct tc_ktab *t = tc_box_new(sizeof *t, ktab_dtor);
  t->pre = pre;
  t->n_pre = n_pre;
  t->api = api;
  t->n_api = n_api;
  return t;
}

struct tc_otab *tc_otab_new(int64_t *ids, size_t n) {
  struct tc_otab *t = tc_box_new(sizeof *t, otab_dtor);
  t->ids = ids;
  t->n = n;
  return t;
}

/* Generic copy-with-edit of a sorted array of boxed records whose first
 * member is `int64_t id` (true of every record type in types.h). */
static void **edit_array(void *const *v, size_t n, void *rec, int64_t remove_id, size_t *n_out) {
  void **out = tc_xmalloc((n + 1) * sizeof *out);
  size_t o = 0;
  int64_t rec_id = rec ? *(const int64_t *)rec : 0;
  bool placed = rec == NULL;
  for (size_t i = 0; i < n; i++) {
    int64_t id = *(const int64_t *)v[i];
    if (!placed && rec_id < id) {
      out[o++] = rec;
      placed = true;
    }
    if (id == remove_id) continue;
    if (!placed && rec_id == id) {
      out[o++] = rec;
      placed = true;
      continue;
    }
    out[o++] = tc_box_ref(v[i]);
  }
  if (!placed) out[o++] = rec;
  *n_out = o;
  return out;
}

struct tc_utab *tc_utab_edit(const struct tc_utab *t, struct tc_user *rec, int64_t remove_id) {
  size_t n;
  void **v = edit_array((void *const *)t->v, t->n, rec, remove_id, &n);
  return tc_utab_new((struct tc_user **)v, n);
}

static long find_id(const void *const *v, size_t n, int64_t id);

/* The sorted pointer array of t with rec upserted and remove_id dropped;
 * no references taken (the chunks own them). */
static struct tc_node **edit_flat(const struct tc_ntab *t, struct tc_node *rec, int64_t remove_id, size_t *n_out) {
  struct tc_node **out = tc_xmalloc((t->n + 1) * sizeof *out);
  size_t o = 0;
  int64_t rec_id = rec ? rec->id : 0;
  bool placed = rec == NULL;
  for (size_t i = 0; i < t->n; i++) {
    int64_t id = t->v[i]->id;
    if (!placed && rec_id <= id) {
      out[o++] = rec;
      placed = true;
      if (rec_id == id) continue;
    }
    if (id == remove_id || (rec && id == rec_id)) continue;
    out[o++] = t->v[i];
  }
  if (!placed) out[o++] = rec;
  *n_out = o;
  return out;
}

/* Index of the chunk whose id range holds id (the last chunk starting at or
 * before it; 0 when id precedes them all). nchunks > 0. */
static size_t chunk_for(struct tc_nchunk *const *ch, size_t nch, int64_t id) {
  size_t lo = 0, hi = nch;
  while (hi - lo > 1) {
    size_t mid = (lo + hi) / 2;
    if (ch[mid]->r[0]->id <= id) lo = mid;
    else hi = mid;
  }
  return lo;
}

/* New chunk list: ch with rec (a stolen reference; may be NULL) upserted
 * and remove_id dropped in the one chunk concerned; every other chunk
 * shared with a new reference. Only one of rec / remove_id is set. */
static struct tc_nchunk **edit_chunks(struct tc_nchunk *const *ch, size_t nch, struct tc_node *rec,
                                      int64_t remove_id, size_t *nch_out) {
  struct tc_nchunk **out = tc_xmalloc((nch + 2) * sizeof *out);
  if (nch == 0) {
    size_t k = 0;
    if (rec) out[k++] = nchunk_new(&rec, 1);
    *nch_out = k;
    return out;
  }
  int64_t id = rec ? rec->id : remove_id;
  size_t ci = chunk_for(ch, nch, id);
  const struct tc_nchunk *c = ch[ci];
  /* appends open a new chunk once the last one is full */
  bool fresh = rec && ci == nch - 1 && c->n >= NCHUNK && c->r[c->n - 1]->id < id;
  size_t o = 0;
  for (size_t i = 0; i < nch; i++)
    if (i != ci || fresh) out[o++] = tc_box_ref(ch[i]);
  if (fresh) {
    out[o++] = nchunk_new(&rec, 1);
    *nch_out = o;
    return out;
  }
  struct tc_node **r = tc_xmalloc((c->n + 1) * sizeof *r);
  size_t k = 0;
  bool placed = rec == NULL;
  for (size_t i = 0; i < c->n; i++) {
    int64_t x = c->r[i]->id;
    if (!placed && id <= x) {
      r[k++] = rec;
      placed = true;
      if (id == x) continue;
    }
    if (x == remove_id || (rec && x == id)) continue;
    r[k++] = tc_box_ref(c->r[i]);
  }
  if (!placed) r[k++] = rec;
  /* keep the chunk list in id order: the edited chunk goes back at ci */
  memmove(out + ci + 1, out + ci, (o - ci) * sizeof *out);
  o++;
  if (k == 0) { /* emptied: drop it */
    memmove(out + ci, out + ci + 1, (o - ci - 1) * sizeof *out);
    o--;
  } else if (k > 2 * NCHUNK) { /* grown by inserts in the middle: split */
    memmove(out + ci + 2, out + ci + 1, (o - ci - 1) * sizeof *out);
    o++;
    out[ci] = nchunk_new(r, k / 2);
    out[ci + 1] = nchunk_new(r + k / 2, k - k / 2);
  } else {
    out[ci] = nchunk_new(r, k);
  }
  free(r);
  *nch_out = o;
  return out;
}

/* Node tables are rebuilt on every node write, so the indexes are reused
 * where possible: a replaced record whose key did not change keeps its
 * index; an appended record (new ids are the largest) copies the slots and
 * adds one entry. Only removals and key changes rehash. */
struct tc_ntab *tc_ntab_edit(const struct tc_ntab *t, struct tc_node *rec, int64_t remove_id) {
  size_t n;
  if (rec && remove_id) { /* never both in practice: two edits */
    struct tc_ntab *mid = tc_ntab_edit(t, NULL, remove_id);
    struct tc_ntab *res = tc_ntab_edit(mid, rec, 0);
    tc_box_unref(mid);
    return res;
  }
  long pos = rec ? find_id((const void *const *)t->v, t->n, rec->id) : -1;
  bool append = rec && pos < 0 && (t->n == 0 || t->v[t->n - 1]->id < rec->id);
  struct tc_node **v = edit_flat(t, rec, remove_id, &n);
  struct tc_ntab *nt = tc_box_new(sizeof *nt, ntab_dtor);
  nt->v = v;
  nt->n = n;
  const struct tc_node *gone = pos >= 0 ? t->v[pos] : NULL;
  if (remove_id) {
    long rp = find_id((const void *const *)t->v, t->n, remove_id);
    gone = rp >= 0 ? t->v[rp] : NULL;
  }
  nt->n_routers = t->n_routers - (gone && tc_node_is_router(gone)) + (rec && tc_node_is_router(rec));
  nt->chunks = edit_chunks(t->chunks, t->nchunks, rec, remove_id, &nt->nchunks);
  if (pos < 0 && !append) {
    const void *const *r = (const void *const *)v;
    tc_hidx_build(&nt->by_nk, r, n, key_nk);
    tc_hidx_build(&nt->by_mk, r, n, key_mk);
    tc_hidx_build(&nt->by_name, r, n, key_gname);
    tc_hidx_build(&nt->by_ip4, r, n, key_ip4);
    tc_hidx_build(&nt->by_ip6, r, n, key_ip6);
    return nt;
  }
  const void *const *r = (const void *const *)v;
  struct {
    struct tc_hidx *dst;
    const struct tc_hidx *src;
    tc_hkey_fn f;
  } ix[] = {
      {&nt->by_nk, &t->by_nk, key_nk},       {&nt->by_mk, &t->by_mk, key_mk},
      {&nt->by_name, &t->by_name, key_gname}, {&nt->by_ip4, &t->by_ip4, key_ip4},
      {&nt->by_ip6, &t->by_ip6, key_ip6},
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(ix); i++) {
    if (pos >= 0 && same_key(t->v[pos], rec, ix[i].f)) hidx_share(ix[i].dst, ix[i].src);
    else if (!append || !hidx_append(ix[i].dst, ix[i].src, n, rec, n - 1, ix[i].f))
      tc_hidx_build(ix[i].dst, r, n, ix[i].f);
  }
  return nt;
}

struct tc_ktab *tc_ktab_edit_pre(const struct tc_ktab *t, struct tc_preauth_key *rec,
                                 int64_t remove_id) {
  size_t n;
  void **v = edit_array((void *const *)t->pre, t->n_pre, rec, remove_id, &n);
  struct tc_api_key **api = tc_xmalloc((t->n_api + 1) * sizeof *api);
  for (size_t i = 0; i < t->n_api; i++) api[i] = tc_box_ref(t->api[i]);
  return tc_ktab_new((struct tc_preauth_key **)v, n, api, t->n_api);
}

struct tc_ktab *tc_ktab_edit_api(const struct tc_ktab *t, struct tc_api_key *rec,
                                 int64_t remove_id) {
  size_t n;
  void **v = edit_array((void *const *)t->api, t->n_api, rec, remove_id, &n);
  struct tc_preauth_key **pre = tc_xmalloc((t->n_pre + 1) * sizeof *pre);
  for (size_t i = 0; i < t->n_pre; i++) pre[i] = tc_box_ref(t->pre[i]);
  return tc_ktab_new(pre, t->n_pre, (struct tc_api_key **)v, n);
}

struct tc_otab *tc_otab_edit(const struct tc_otab *t, int64_t id, bool present) {
  int64_t *ids = tc_xmalloc((t->n + 1) * sizeof *ids);
  size_t o = 0;
  bool placed = !present;
  for (size_t i = 0; i < t->n; i++) {
    if (!placed && id < t->ids[i]) {
      ids[o++] = id;
      placed = true;
    }
    if (t->ids[i] == id) {
      if (present && !placed) {
        ids[o++] = id;
        placed = true;
      }
      continue;
    }
    ids[o++] = t->ids[i];
  }
  if (!placed) ids[o++] = id;
  return tc_otab_new(ids, o);
}

/* ---- primary routes ----------------------------------------------------------------- */
struct cand {
  const char *prefix;
  int64_t node_id;
};
static int cand_cmp(const void *a, const void *b) {
  const struct cand *x = a, *y = b;
  int c = strcmp(x->prefix, y->prefix);
  if (c) return c;
  return x->node_id < y->node_id ? -1 : x->node_id > y->node_id;
}
static bool is_exit_route(const char *p) { return !strcmp(p, "0.0.0.0/0") || !strcmp(p, "::/0"); }

static bool otab_has(const struct tc_otab *o, int64_t id) {
  size_t lo = 0, hi = o->n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (o->ids[mid] == id) return true;
    if (o->ids[mid] < id) lo = mid + 1;
    else hi = mid;
  }
  return false;
}

static int64_t rtab_primary(const struct tc_rtab *r, const char *prefix) {
  if (!r) return 0;
  size_t lo = 0, hi = r->n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    int c = strcmp(r->v[mid].prefix, prefix);
    if (!c) return r->v[mid].node_id;
    if (c < 0) lo = mid + 1;
    else hi = mid;
  }
  return 0;
}

struct tc_rtab *tc_rtab_compute(const struct tc_ntab *nodes, const struct tc_otab *online,
                                const struct tc_rtab *prev) {
  struct cand *c = NULL;
  size_t nc = 0, cap = 0;
  for (size_t i = 0; nodes->n_routers && i < nodes->n; i++) {
    const struct tc_node *n = nodes->v[i];
    if (!tc_node_is_router(n) || !otab_has(online, n->id)) continue;
    for (size_t j = 0; j < n->approved_routes.n; j++) {
      const char *p = n->approved_routes.v[j];
      if (is_exit_route(p) || !tc_strv_contains(&n->announced_routes, p)) continue;
      if (nc == cap) {
        cap = cap ? cap * 2 : 16;
        c = tc_xrealloc(c, cap * sizeof *c);
      }
      c[nc++] = (struct cand){p, n->id};
    }
  }
  if (nc) qsort(c, nc, sizeof *c, cand_cmp);
  struct tc_rtab *t = tc_box_new(sizeof *t, rtab_dtor);
  t->v = tc_xmalloc((nc + 1) * sizeof *t->v);
  for (size_t i = 0; i < nc;) {
    size_t j = i;
    int64_t keep = rtab_primary(prev, c[i].prefix), chosen = c[i].node_id;
    for (; j < nc && !strcmp(c[j].prefix, c[i].prefix); j++)
      if (keep && c[j].node_id == keep) chosen = keep;
    t->v[t->n].prefix = tc_xstrdup(c[i].prefix);
    t->v[t->n].node_id = chosen;
    t->n++;
    i = j;
  }
  free(c);
  return t;
}

bool tc_rtab_equal(const struct tc_rtab *a, const struct tc_rtab *b) {
  if (!a || !b) return a == b;
  if (a->n != b->n) return false;
  for (size_t i = 0; i < a->n; i++)
    if (a->v[i].node_id != b->v[i].node_id || strcmp(a->v[i].prefix, b->v[i].prefix)) return false;
  return true;
}

/* ---- snapshots ----------------------------------------------------------------------- */
struct snap_block {
  struct tc_snapshot pub;
  struct tc_snapshot_priv priv;
};

struct tc_snapshot *tc_snapshot_new(uint64_t seq, struct tc_utab *u, struct tc_ntab *n,
                                    struct tc_ktab *k, struct tc_policy_rec *p,
                                    struct tc_otab *o, struct tc_rtab *r) {
  struct snap_block *b = tc_xcalloc(1, sizeof *b);
  struct tc_snapshot *s = &b->pub;
  struct tc_snapshot_priv *v = &b->priv;
  atomic_init(&v->refs, 1);
  v->users = tc_box_ref(u);
  v->nodes = tc_box_ref(n);
  v->keys = tc_box_ref(k);
  v->policy = tc_box_ref(p);
  v->online = tc_box_ref(o);
  v->primaries = tc_box_ref(r);
  s->priv = v;
  s->seq = seq;
  s->published_at_ms = tc_now_ms();
  s->users = (const struct tc_user *const *)u->v;
  s->n_users = u->n;
  s->nodes = (const struct tc_node *const *)n->v;
  s->n_nodes = n->n;
  s->preauth_keys = (const struct tc_preauth_key *const *)k->pre;
  s->n_preauth_keys = k->n_pre;
  s->api_keys = (const struct tc_api_key *const *)k->api;
  s->n_api_keys = k->n_api;
  if (p && p->data) {
    s->policy = p->data;
    s->policy_len = strlen(p->data);
    s->policy_id = p->id;
  }
  s->online = o->ids;
  s->n_online = o->n;
  s->primaries = r->v;
  s->n_primaries = r->n;
  return s;
}

struct tc_snapshot *tc_snapshot_ref(struct tc_snapshot *s) {
  if (s) atomic_fetch_add_explicit(&s->priv->refs, 1, memory_order_relaxed);
  return s;
}

void tc_snapshot_release(struct tc_snapshot *s) {
  if (!s) return;
  struct tc_snapshot_priv *v = s->priv;
  if (atomic_fetch_sub_explicit(&v->refs, 1, memory_order_acq_rel) != 1) return;
  tc_box_unref(v->users);
  tc_box_unref(v->nodes);
  tc_box_unref(v->keys);
  tc_box_unref(v->policy);
  tc_box_unref(v->online);
  tc_box_unref(v->primaries);
  free(s); /* pub is the first member of the block */
}

/* Binary search over records whose first member is the int64 id. */
static long find_id(const void *const *v, size_t n, int64_t id) {
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    int64_t x = *(const int64_t *)v[mid];
    if (x == id) return (long)mid;
    if (x < id) lo = mid + 1;
    else hi = mid;
  }
  return -1;
}

const struct tc_user *tc_snapshot_user(const struct tc_snapshot *s, int64_t id) {
  long i = find_id((const void *const *)s->users, s->n_users, id);
  return i < 0 ? NULL : s->users[i];
}

const struct tc_user *tc_snapshot_user_by_name(const struct tc_snapshot *s, const char *name) {
  if (!name) return NULL;
  const struct tc_utab *t = s->priv->users;
  long i = tc_hidx_find(&t->by_name, (const void *const *)t->v, key_user_name, name, strlen(name));
  return i < 0 ? NULL : t->v[i];
}

const struct tc_node *tc_snapshot_node(const struct tc_snapshot *s, int64_t id) {
  long i = find_id((const void *const *)s->nodes, s->n_nodes, id);
  return i < 0 ? NULL : s->nodes[i];
}

static const struct tc_node *nfind(const struct tc_snapshot *s, const struct tc_hidx *h,
                                   tc_hkey_fn f, const void *key, size_t len) {
  const struct tc_ntab *t = s->priv->nodes;
  long i = tc_hidx_find(h, (const void *const *)t->v, f, key, len);
  return i < 0 ? NULL : t->v[i];
}

const struct tc_node *tc_snapshot_node_by_node_key(const struct tc_snapshot *s,
                                                   const uint8_t key[TC_KEY_LEN]) {
  return nfind(s, &s->priv->nodes->by_nk, key_nk, key, TC_KEY_LEN);
}

const struct tc_node *tc_snapshot_node_by_machine_key(const struct tc_snapshot *s,
                                                      const uint8_t key[TC_KEY_LEN]) {
  return nfind(s, &s->priv->nodes->by_mk, key_mk, key, TC_KEY_LEN);
}

const struct tc_node *tc_snapshot_node_by_given_name(const struct tc_snapshot *s,
                                                     const char *given_name) {
  if (!given_name) return NULL;
  return nfind(s, &s->priv->nodes->by_name, key_gname, given_name, strlen(given_name));
}

const struct tc_node *tc_snapshot_node_by_ip(const struct tc_snapshot *s, const uint8_t *addr,
                                             size_t addr_len) {
  if (addr_len == 4) return nfind(s, &s->priv->nodes->by_ip4, key_ip4, addr, 4);
  if (addr_len == 16) return nfind(s, &s->priv->nodes->by_ip6, key_ip6, addr, 16);
  return NULL;
}

const struct tc_node *tc_snapshot_node_for_machine(const struct tc_snapshot *s,
                                                   const uint8_t nk[TC_KEY_LEN],
                                                   const uint8_t mk[TC_KEY_LEN],
                                                   struct tc_err *err) {
  const struct tc_node *n = tc_snapshot_node_by_node_key(s, nk);
  if (!n) {
    tc_err_set(err, TC_ENOENT, "node key not registered");
    return NULL;
  }
  if (!tc_ct_equal(n->machine_key, mk, TC_KEY_LEN)) {
    tc_err_set(err, TC_EPERM, "node exists with a different machine key");
    return NULL;
  }
  return n;
}

const struct tc_preauth_key *tc_snapshot_preauth_key(const struct tc_snapshot *s, int64_t id) {
  long i = find_id((const void *const *)s->preauth_keys, s->n_preauth_keys, id);
  return i < 0 ? NULL : s->preauth_keys[i];
}

const struct tc_api_key *tc_snapshot_api_key(const struct tc_snapshot *s, int64_t id) {
  long i = find_id((const void *const *)s->api_keys, s->n_api_keys, id);
  return i < 0 ? NULL : s->api_keys[i];
}

bool tc_snapshot_is_online(const struct tc_snapshot *s, int64_t node_id) {
  return otab_has(s->priv->online, node_id);
}

bool tc_node_is_expired(const struct tc_node *n, int64_t now) {
  return n->expiry != 0 && n->expiry <= now;
}

size_t tc_snapshot_user_node_count(const struct tc_snapshot *s, int64_t user_id) {
  size_t c = 0;
  for (size_t i = 0; i < s->n_nodes; i++)
    if (s->nodes[i]->user_id == user_id) c++;
  return c;
}

void tc_snapshot_primary_routes(const struct tc_snapshot *s, int64_t node_id,
                                struct tc_strv *out) {
  for (size_t i = 0; i < s->n_primaries; i++)
    if (s->primaries[i].node_id == node_id) tc_strv_push(out, s->primaries[i].prefix);
}
