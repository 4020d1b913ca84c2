/* cache: per-node peer fragments, encoded once per change and shared by every
 * map session that sends that node. One mutex guards the table; encoding
 * happens outside it (two threads racing on the same node may both encode,
 * the later result simply replaces the earlier, both are correct). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "mapper/mapper_int.h"

struct entry {
  int64_t node_id; /* 0 = empty slot */
  uint64_t version;
  bool online_known, online, expired;
  struct tc_mapper_frag *frag;
};

struct tc_mapper_cache {
  pthread_mutex_t mu;
  struct entry *slots;
  size_t cap, used; /* used counts live entries and tombstones alike */
  uint64_t hits, encodes;
};

#define TOMBSTONE INT64_MIN

struct tc_mapper_frag *tc_mapper_frag_ref(struct tc_mapper_frag *f) {
  __atomic_add_fetch(&f->refs, 1, __ATOMIC_RELAXED);
  return f;
}

void tc_mapper_frag_unref(struct tc_mapper_frag *f) {
  if (f && __atomic_sub_fetch(&f->refs, 1, __ATOMIC_ACQ_REL) == 0) free(f);
}

struct tc_mapper_cache *tc_mapper_cache_new(void) {
  struct tc_mapper_cache *c = tc_xcalloc(1, sizeof *c);
  pthread_mutex_init(&c->mu, NULL);
  c->cap = 64;
  c->slots = tc_xcalloc(c->cap, sizeof *c->slots);
  return c;
}

void tc_mapper_cache_free(struct tc_mapper_cache *c) {
  if (!c) return;
  for (size_t i = 0; i < c->cap; i++)
    if (c->slots[i].node_id > 0) tc_mapper_frag_unref(c->slots[i].frag);
  free(c->slots);
  pthread_mutex_destroy(&c->mu);
  free(c);
}

static size_t hash_id(int64_t id) {
  uint64_t x = (uint64_t)id * UINT64_C(0x9e3779b97f4a7c15);
  return (size_t)(x ^ (x >> 29));
}

/* Slot holding id, or NULL. Caller holds mu. */
static struct entry *find(struct tc_mapper_cache *c, int64_t id) {
  size_t mask = c->cap - 1;
  for (size_t i = hash_id(id) & mask, k = 0; k < c->cap; i = (i + 1) & mask, k++) {
    if (c->slots[i].node_id == id) return &c->slots[i];
    if (c->slots[i].node_id == 0) return NULL;
  }
  return NULL;
}

static void insert_raw(struct entry *slots, size_t cap, const struct entry *e) {
  size_t mask = cap - 1;
  size_t i = hash_id(e->node_id) & mask;
  while (slots[i].node_id > 0) i = (i + 1) & mask;
  slots[i] = *e;
}

static void grow(struct tc_mapper_cache *c) {
  size_t live = 0;
  for (size_t i = 0; i < c->cap; i++) live += c->slots[i].node_id > 0;
  size_t ncap = c->cap;
  while (live * 2 + 2 > ncap) ncap *= 2;
  struct entry *ns = tc_xcalloc(ncap, sizeof *ns);
  for (size_t i = 0; i < c->cap; i++)
    if (c->slots[i].node_id > 0) insert_raw(ns, ncap, &c->slots[i]);
  free(c->slots);
  c->slots = ns;
  c->cap = ncap;
  c->used = live;
}

struct tc_mapper_frag *tc_mapper_cache_peer(struct tc_mapper_cache *c, const struct tc_mapper_env *env,
                                            const struct tc_node *n, uint64_t version,
                                            const struct tc_mapper_node_extra *x, int64_t now) {
  static const struct tc_mapper_node_extra none;
  if (!x) x = &none;
  bool expired = n->expiry && n->expiry <= now;
  pthread_mutex_lock(&c->mu);
  struct entry *e = find(c, n->id);
  if (e && e->version == version && e->online_known == x->online_known && e->online == x->online &&
      e->expired == expired) {
    struct tc_mapper_frag *f = tc_mapper_frag_ref(e->frag);
    c->hits++;
    pthread_mutex_unlock(&c->mu);
    return f;
  }
  pthread_mutex_unlock(&c->mu);

  struct tc_buf b = TC_BUF_INIT;
  tc_mapper_encode_node(&b, env, n, x, TC_MAPPER_PEER, now);
  struct tc_mapper_frag *f = tc_xmalloc(sizeof *f + b.len + 1);
  f->node_id = n->id;
  f->len = b.len;
  f->refs = 2; /* one for the cache, one for the caller */
  memcpy(f->data, b.data, b.len);
  f->data[b.len] = 0;
  tc_buf_free(&b);

  pthread_mutex_lock(&c->mu);
  c->encodes++;
  e = find(c, n->id);
  if (!e) {
    if ((c->used + 1) * 4 > c->cap * 3) grow(c);
    struct entry ne = {.node_id = n->id};
    /* reuse a tombstone or empty slot along the probe path */
    size_t mask = c->cap - 1;
    size_t i = hash_id(n->id) & mask;
    while (c->slots[i].node_id > 0) i = (i + 1) & mask;
    if (c->slots[i].node_id == 0) c->used++;
    c->slots[i] = ne;
    e = &c->slots[i];
  } else {
    tc_mapper_frag_unref(e->frag);
  }
  e->version = version;
  e->online_known = x->online_known;
  e->online = x->online;
  e->expired = expired;
  e->frag = f;
  pthread_mutex_unlock(&c->mu);
  return f;
}

void tc_mapper_cache_forget(struct tc_mapper_cache *c, int64_t node_id) {
  pthread_mutex_lock(&c->mu);
  struct entry *e = find(c, node_id);
  if (e) {
    tc_mapper_frag_unref(e->frag);
    memset(e, 0, sizeof *e);
    e->node_id = TOMBSTONE;
  }
  pthread_mutex_unlock(&c->mu);
}

void tc_mapper_cache_stats(struct tc_mapper_cache *c, uint64_t *hits, uint64_t *encodes) {
  pthread_mutex_lock(&c->mu);
  if (hits) *hits = c->hits;
  if (encodes) *encodes = c->encodes;
  pthread_mutex_unlock(&c->mu);
}
