/* control: the request handler behind /ts2021 — registration (doc §6.3),
 * map requests (§7.2) — and the map-stream dispatcher that turns the model's
 * change events into deltas (§7.4, §7.5).
 *
 * Threads: tc_mapper_serve runs on the transport's workers. Everything about
 * open streams (the session table, per-node versions, keep-alive timers) is
 * owned by one dispatcher thread, fed through a queue by the model's change
 * subscriber (which must not block), by the workers (stream opens) and by
 * the transport's cancel callbacks (stream closes). The dispatcher takes the
 * whole queue at once, handles its events first (merged into batches) and
 * then the opens: an open is always answered from a state that contains
 * every event queued before it, and gets every event handled after it, so
 * its full map and the deltas that follow never miss a change.
 *
 * Without a policy (or with the empty allow-all one) a delta is encoded and
 * framed once and written to every stream. With a policy the dispatcher
 * compiles it (policy/) on each topology change and works per recipient:
 * visible peers, its own filter, SSH policy and CapMap, per-viewer AllowedIPs
 * of subnet routers, and a full resync when a stream's visible set changed.
 * Follow-up long polls each get a short-lived thread so they never hold a
 * transport worker. */
#include <arpa/inet.h>
#include <jansson.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "mapper/mapper_int.h"
#include "model/model.h"
#include "policy/policy.h"

#define GRAVE_MS 30000 /* closed sessions outlive any in-flight cancel callback */
#define FOLLOWUP_RETRY_S 10 /* Retry-After when every Followup wait is taken */
/* Storm batching: when more than STORM_EVENTS events were handled in the
 * last STORM_WINDOW_MS, the dispatcher lets a new burst accumulate for
 * LINGER_MS before taking it, so every stream gets one merged delta per
 * LINGER_MS instead of one per registration. A lone change (the quiet
 * case) is never delayed. */
#define STORM_WINDOW_MS 100
#define STORM_EVENTS 20
#define LINGER_MS 20

enum item_kind { IT_EVENT, IT_OPEN, IT_CLOSE, IT_ENV };

struct session {
  struct tc_mapper *mp;
  const struct tc_mapper_io *io;
  void *st;
  int64_t node_id;
  atomic_int closed;        /* set once closed; cancel callbacks check it */
  atomic_int pending_items; /* queue items naming this session */
  /* dispatcher-only: */
  int state; /* 0 queued, 1 open, 2 closed */
  bool oneshot; /* a non-streaming full map: answered by the dispatcher, never registered */
  bool online_counted;
  int64_t next_ka_ms;
  int64_t closed_at_ms;
  struct session *next_grave;
};

struct item {
  struct item *next;
  enum item_kind kind;
  enum tc_change_kind ck;
  int64_t node_id, user_id;
  unsigned fields;
  struct tc_snapshot *snap;
  struct session *s;
  struct tc_mapper_env *env;
};

struct prim {
  char *prefix;
  int64_t node_id;
};

/* What the policy gives each node, compiled for one snapshot (dispatcher-only).
 * pol == NULL means allow-all: everyone sees everyone, one shared filter. */
struct pnode {
  int64_t id;
  const struct tc_policy_node_result *r; /* in the result this view was compiled into */
  const char *filter; /* PacketFilter JSON: borrowed from r (filter_text) or a literal */
  const char *ssh;    /* SSHPolicy JSON or NULL: borrowed from r (ssh_text) */
  char *capmap; /* CapMap JSON (defaults + nodeAttrs): a ctext, shared */
  uint64_t capmap_gen; /* generation in which capmap last changed: part of the fragment version */
};
struct polview {
  bool parsed;
  int64_t policy_id;
  struct tc_policy *pol;
  struct tc_policy_result *res;
  struct pnode *pn; /* sorted by id */
  size_t npn;
  uint64_t gen; /* bumps with every recompile: part of fragment versions */
};

/* node id -> version (the seq of the last event about that node). */
struct vermap {
  int64_t *ids;
  uint64_t *vers;
  size_t cap, n;
};

struct tc_mapper {
  struct tc_model *model;
  char *server_url;
  int64_t ka_ms, ka_jitter_ms, followup_timeout_ms;
  int max_followups;
  atomic_int followups;

  pthread_rwlock_t env_lock;
  struct tc_mapper_env env;
  struct tc_mapper_cache *cache;
  struct tc_mapper_chunks *chunks; /* dispatcher-only; NULL = full maps in one frame */
  struct tc_mapper_spans *spans;   /* dispatcher-only: shared runs of the policy's filter/SSH texts */
  int64_t sub_id;

  pthread_mutex_t qmu;
  pthread_cond_t qcv, donecv;
  struct item *qhead, *qtail;
  uint64_t enq_count, done_count;
  bool stopping;
  pthread_t thread;

  /* dispatcher-only */
  struct session **sess;
  size_t n_sess, cap_sess;
  struct vermap vers;
  struct tc_snapshot *last_snap;
  struct prim *prims;
  size_t n_prims;
  struct session *grave;
  int64_t last_sweep_ms;
  struct tc_buf ka_frame;
  struct polview pv;
  int64_t offline_grace_ms; /* < 0: immediate */
  struct pending_off {
    int64_t node_id, due_ms;
  } *offs;
  size_t n_offs, cap_offs;

  _Atomic uint64_t st_full, st_deltas, st_ka, st_bytes, st_cut, st_events, st_open, st_trims;
  /* the chunk cache's counters, published by the dispatcher after each round */
  _Atomic uint64_t st_ch_hits, st_ch_builds, st_ch_text, st_ch_drops, st_sp_hits, st_sp_builds;
};

/* ---- small utilities ------------------------------------------------------------ */

bool tc_mapper_visible(const struct tc_snapshot *snap, const struct tc_node *viewer, const struct tc_node *peer) {
  (void)snap, (void)viewer, (void)peer;
  return true;
}

const char *tc_mapper_filter_for(const struct tc_mapper_env *env, const struct tc_snapshot *snap,
                                 const struct tc_node *node) {
  (void)snap, (void)node;
  return env->filter_json; /* NULL = allow all, encoded by the encoder */
}

static char *dupnz(const char *s) { return s ? tc_xstrdup(s) : NULL; }

void tc_mapper_env_copy(struct tc_mapper_env *dst, const struct tc_mapper_env *src) {
  dst->base_domain = tc_xstrdup(src->base_domain ? src->base_domain : "");
  dst->domain = tc_xstrdup(src->domain ? src->domain : "");
  dst->dns_json = dupnz(src->dns_json);
  dst->derp_json = dupnz(src->derp_json);
  dst->capmap_json = dupnz(src->capmap_json);
  dst->filter_json = dupnz(src->filter_json);
  dst->ssh_json = dupnz(src->ssh_json);
  dst->disable_logtail = src->disable_logtail;
}

static uint64_t ver_get(const struct vermap *m, int64_t id) {
  if (!m->cap) return 0;
  size_t mask = m->cap - 1;
  for (size_t i = ((uint64_t)id * UINT64_C(0x9e3779b97f4a7c15)) >> 7 & mask;; i = (i + 1) & mask) {
    if (m->ids[i] == id) return m->vers[i];
    if (m->ids[i] == 0) return 0;
  }
}

static void ver_set(struct vermap *m, int64_t id, uint64_t v) {
  if ((m->n + 1) * 2 > m->cap) {
    struct vermap nm = {.cap = m->cap ? m->cap * 2 : 256};
    nm.ids = tc_xcalloc(nm.cap, sizeof *nm.ids);
    nm.vers = tc_xcalloc(nm.cap, sizeof *nm.vers);
    for (size_t i = 0; i < m->cap; i++)
      if (m->ids[i]) ver_set(&nm, m->ids[i], m->vers[i]);
    free(m->ids);
    free(m->vers);
    *m = nm;
  }
  size_t mask = m->cap - 1;
  for (size_t i = ((uint64_t)id * UINT64_C(0x9e3779b97f4a7c15)) >> 7 & mask;; i = (i + 1) & mask) {
    if (m->ids[i] == id) {
      m->vers[i] = v;
      return;
    }
    if (m->ids[i] == 0) {
      m->ids[i] = id;
      m->vers[i] = v;
      m->n++;
      return;
    }
  }
}

/* node id's encoding may have changed (an event about it, its primary
 * routes): a new fragment version, and its full-map chunk is stale. */
static void bump(struct tc_mapper *mp, int64_t id, uint64_t seq) {
  ver_set(&mp->vers, id, seq);
  tc_mapper_chunks_touch(mp->chunks, id);
}

/* Keep-alive jitter only spreads timers; it needs no secrecy. A getrandom()
 * per written frame cost ~1% of the dispatcher during a registration storm
 * (one write per stream per delta), so a per-thread xorshift seeded once
 * from the system generator is used instead. */
static uint32_t jitter_rand(void) {
  static __thread uint64_t x;
  if (!x) {
    tc_random(&x, sizeof x);
    x |= 1;
  }
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return (uint32_t)(x >> 32);
}

static int64_t ka_interval(const struct tc_mapper *mp) {
  int64_t j = 0;
  if (mp->ka_jitter_ms > 0) j = (int64_t)(jitter_rand() % (uint32_t)(mp->ka_jitter_ms + 1));
  return mp->ka_ms + j;
}

/* ---- queue ------------------------------------------------------------------------ */

static void enqueue(struct tc_mapper *mp, struct item *it) {
  if (it->s) atomic_fetch_add(&it->s->pending_items, 1);
  pthread_mutex_lock(&mp->qmu);
  if (mp->qtail) mp->qtail->next = it;
  else mp->qhead = it;
  mp->qtail = it;
  mp->enq_count++;
  pthread_cond_signal(&mp->qcv);
  pthread_mutex_unlock(&mp->qmu);
}

/* Model subscriber: runs on the model's writer thread under its lock. Copy
 * what is needed and return. */
static void on_change(void *ctx, const struct tc_change *c) {
  struct tc_mapper *mp = ctx;
  switch (c->kind) {
  case TC_CHANGE_PREAUTH_KEY:
  case TC_CHANGE_API_KEY:
  case TC_CHANGE_REGISTRATION:
  case TC_CHANGE_USER_ADDED:
    return; /* nothing a client sees */
  default:
    break;
  }
  struct item *it = tc_xcalloc(1, sizeof *it);
  it->kind = IT_EVENT;
  it->ck = c->kind;
  it->node_id = c->node_id;
  it->user_id = c->user_id;
  it->fields = c->fields;
  it->snap = tc_snapshot_ref(c->snap);
  enqueue(mp, it);
}

static void on_cancel(void *arg) {
  struct session *s = arg;
  if (atomic_load(&s->closed)) return;
  struct item *it = tc_xcalloc(1, sizeof *it);
  it->kind = IT_CLOSE;
  it->s = s;
  enqueue(s->mp, it);
}

/* ---- sessions (dispatcher thread) ------------------------------------------------- */

static struct session *sess_find(struct tc_mapper *mp, int64_t node_id) {
  for (size_t i = 0; i < mp->n_sess; i++)
    if (mp->sess[i]->node_id == node_id) return mp->sess[i];
  return NULL;
}

static void sess_remove(struct tc_mapper *mp, struct session *s) {
  for (size_t i = 0; i < mp->n_sess; i++)
    if (mp->sess[i] == s) {
      mp->sess[i] = mp->sess[--mp->n_sess];
      return;
    }
}

static void set_offline(struct tc_mapper *mp, int64_t node_id) {
  struct tc_err err = {0};
  if (tc_model_node_set_online(mp->model, node_id, false, &err) && err.code != TC_ENOENT)
    tc_warn("mapper: node %lld offline: %s", (long long)node_id, err.msg);
}

/* Due (or, with all, every) delayed offline decrements. */
static void flush_offline(struct tc_mapper *mp, bool all) {
  int64_t now = tc_mono_ms();
  size_t k = 0;
  for (size_t i = 0; i < mp->n_offs; i++) {
    if (all || mp->offs[i].due_ms <= now) set_offline(mp, mp->offs[i].node_id);
    else mp->offs[k++] = mp->offs[i];
  }
  mp->n_offs = k;
}

static void close_session(struct tc_mapper *mp, struct session *s) {
  if (s->state == 2) return;
  if (s->state == 1) atomic_fetch_sub(&mp->st_open, 1);
  s->state = 2;
  atomic_store(&s->closed, 1);
  sess_remove(mp, s);
  s->io->end(s->st);
  if (s->online_counted) {
    /* Offline only after a grace period: a client that reconnects its map
     * poll at once (network change, supersede) never flaps for its peers. */
    s->online_counted = false;
    if (mp->offline_grace_ms < 0) {
      set_offline(mp, s->node_id);
    } else {
      if (mp->n_offs == mp->cap_offs) {
        mp->cap_offs = mp->cap_offs ? mp->cap_offs * 2 : 16;
        mp->offs = tc_xrealloc(mp->offs, mp->cap_offs * sizeof *mp->offs);
      }
      mp->offs[mp->n_offs++] = (struct pending_off){s->node_id, tc_mono_ms() + mp->offline_grace_ms};
    }
  }
  s->closed_at_ms = tc_mono_ms();
  s->next_grave = mp->grave;
  mp->grave = s;
}

static void sweep_grave(struct tc_mapper *mp, bool all) {
  int64_t now = tc_mono_ms();
  /* Every one-shot map leaves a session here for GRAVE_MS: walking the list
   * on every dispatcher round was O(maps in the last 30 s) per map (a fifth
   * of the dispatcher's own time in a burst of one-shot maps). */
  if (!all && now - mp->last_sweep_ms < 1000) return;
  mp->last_sweep_ms = now;
  struct session **pp = &mp->grave;
  while (*pp) {
    struct session *s = *pp;
    if (all || (now - s->closed_at_ms > GRAVE_MS && atomic_load(&s->pending_items) == 0)) {
      *pp = s->next_grave;
      free(s);
    } else {
      pp = &s->next_grave;
    }
  }
}

/* Writes framed bytes; a failed write (stream gone, or the transport's
 * buffer cap for a client that does not read) closes the session. */
static bool send_frame(struct tc_mapper *mp, struct session *s, const struct tc_buf *frame, bool keepalive) {
  if (s->state != 1) return false;
  int rc = s->io->write(s->st, frame->data, frame->len);
  if (rc) {
    if (rc == TC_ETOOBIG) {
      atomic_fetch_add(&mp->st_cut, 1);
      tc_warn("mapper: node %lld stream cut: not reading", (long long)s->node_id);
    }
    close_session(mp, s);
    return false;
  }
  atomic_fetch_add(&mp->st_bytes, frame->len);
  atomic_fetch_add(keepalive ? &mp->st_ka : &mp->st_deltas, 1);
  s->next_ka_ms = tc_mono_ms() + ka_interval(mp);
  return true;
}

/* ---- map building ------------------------------------------------------------------ */

static const struct pnode *pv_node(const struct polview *pv, int64_t id) {
  size_t lo = 0, hi = pv->npn;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (pv->pn[mid].id == id) return &pv->pn[mid];
    if (pv->pn[mid].id < id) lo = mid + 1;
    else hi = mid;
  }
  return NULL;
}

/* id's entry in the result pv was compiled into, or NULL. The policy
 * module's lookup is a linear scan; called per viewer (and formerly per
 * peer of a full map) it made full maps and every delta pass O(N^2). */
static const struct tc_policy_node_result *pv_result(const struct polview *pv, int64_t id) {
  const struct pnode *p = pv_node(pv, id);
  return p ? p->r : NULL;
}

/* Whether the viewer whose entry in res is r may see peer (NULL res:
 * allow-all; a viewer without an entry sees nobody). */
static bool res_visible(const struct tc_policy_result *res, const struct tc_policy_node_result *r, int64_t peer) {
  if (!res) return true;
  if (!r) return false;
  return tc_policy_peer_find(r, peer) >= 0;
}

/* viewer_r: pv_result(&mp->pv, viewer->id), looked up once per viewer. */
static bool visible(const struct tc_mapper *mp, const struct tc_snapshot *snap, const struct tc_node *viewer,
                    const struct tc_policy_node_result *viewer_r, const struct tc_node *peer) {
  if (!mp->pv.pol) return tc_mapper_visible(snap, viewer, peer);
  return res_visible(mp->pv.res, viewer_r, peer->id);
}

static void node_extra(const struct tc_mapper *mp, const struct tc_snapshot *snap, const struct tc_node *n,
                       struct tc_strv *prim, struct tc_mapper_node_extra *x) {
  memset(x, 0, sizeof *x);
  if (mp->pv.pol) {
    const struct pnode *p = pv_node(&mp->pv, n->id);
    if (p) x->capmap_json = p->capmap;
  }
  x->online_known = true;
  x->online = tc_snapshot_is_online(snap, n->id);
  tc_snapshot_primary_routes(snap, n->id, prim);
  x->primary_routes = prim;
}

/* A peer fragment: from the shared cache (dispatcher) or freshly encoded (one-shot). */
static struct tc_mapper_frag *peer_frag(struct tc_mapper *mp, const struct tc_snapshot *snap,
                                        const struct tc_node *n, bool cached, int64_t now) {
  struct tc_strv prim = {0};
  struct tc_mapper_node_extra x;
  node_extra(mp, snap, n, &prim, &x);
  struct tc_mapper_frag *f;
  if (cached) {
    /* the CapMap's generation is part of the version: the policy gives it */
    const struct pnode *p = mp->pv.pol ? pv_node(&mp->pv, n->id) : NULL;
    uint64_t g = p ? p->capmap_gen : mp->pv.gen;
    uint64_t v = ver_get(&mp->vers, n->id) + (g << 40);
    f = tc_mapper_cache_peer(mp->cache, &mp->env, n, v, &x, now);
  } else {
    struct tc_buf b = TC_BUF_INIT;
    tc_mapper_encode_node(&b, &mp->env, n, &x, TC_MAPPER_PEER, now);
    f = tc_xmalloc(sizeof *f + b.len + 1);
    f->node_id = n->id;
    f->len = b.len;
    f->refs = 1;
    memcpy(f->data, b.data, b.len + 1);
    tc_buf_free(&b);
  }
  tc_strv_free(&prim);
  return f;
}

static bool has_routes(const struct tc_node *n) {
  for (size_t i = 0; i < n->approved_routes.n; i++)
    if (tc_strv_contains(&n->announced_routes, n->approved_routes.v[i])) return true;
  return false;
}

/* n's fragment as viewer sees it. Under a policy a router's AllowedIPs depend
 * on what the viewer may reach, so routers get a per-viewer encoding (routers
 * are few); every other node shares its cached fragment. New reference. */
static struct tc_mapper_frag *viewer_frag(struct tc_mapper *mp, const struct tc_snapshot *snap, int64_t viewer,
                                          const struct tc_node *n, int64_t now, bool *per_viewer) {
  if (per_viewer) *per_viewer = false;
  if (!mp->pv.pol || !mp->pv.res || !has_routes(n)) return peer_frag(mp, snap, n, true, now);
  const struct tc_policy_node_result *r = pv_result(&mp->pv, viewer);
  long idx = tc_policy_peer_find(r, n->id);
  json_t *aips = idx < 0 ? NULL : tc_policy_peer_allowed_ips(r, (size_t)idx);
  if (!json_is_array(aips)) return peer_frag(mp, snap, n, true, now);
  struct tc_strv allowed = {0}, prim = {0};
  size_t i;
  json_t *v;
  json_array_foreach(aips, i, v) if (json_is_string(v)) tc_strv_push(&allowed, json_string_value(v));
  struct tc_mapper_node_extra x;
  node_extra(mp, snap, n, &prim, &x);
  x.allowed_ips = &allowed;
  struct tc_buf b = TC_BUF_INIT;
  tc_mapper_encode_node(&b, &mp->env, n, &x, TC_MAPPER_PEER, now);
  struct tc_mapper_frag *f = tc_xmalloc(sizeof *f + b.len + 1);
  f->node_id = n->id;
  f->len = b.len;
  f->refs = 1;
  memcpy(f->data, b.data, b.len + 1);
  tc_buf_free(&b);
  tc_strv_free(&allowed);
  tc_strv_free(&prim);
  if (per_viewer) *per_viewer = true;
  return f;
}

static void self_json(struct tc_mapper *mp, const struct tc_snapshot *snap, const struct tc_node *n, int64_t now,
                      struct tc_buf *out) {
  struct tc_strv prim = {0};
  struct tc_mapper_node_extra x;
  node_extra(mp, snap, n, &prim, &x);
  tc_mapper_encode_node(out, &mp->env, n, &x, TC_MAPPER_SELF, now);
  tc_strv_free(&prim);
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

/* Users for UserProfiles: owners of the given nodes (tagged ones map to the
 * placeholder). Returns an owned array of borrowed-then-copied records. */
static size_t collect_users(const struct tc_snapshot *snap, const struct tc_node *const *nodes, size_t n,
                            struct tc_user **out, bool *tagged) {
  int64_t *ids = tc_xcalloc(n + 1, sizeof *ids);
  size_t k = 0;
  *tagged = false;
  for (size_t i = 0; i < n; i++) {
    if (nodes[i]->tags.n) *tagged = true;
    else if (nodes[i]->user_id > 0) ids[k++] = nodes[i]->user_id;
  }
  qsort(ids, k, sizeof *ids, cmp_i64);
  struct tc_user *users = tc_xcalloc(k + 1, sizeof *users);
  size_t m = 0;
  for (size_t i = 0; i < k; i++) {
    if (i && ids[i] == ids[i - 1]) continue;
    const struct tc_user *u = tc_snapshot_user(snap, ids[i]);
    if (u) users[m++] = *u; /* shallow: strings stay owned by the snapshot */
  }
  free(ids);
  *out = users;
  return m;
}

/* Last occurrence of key in text[0, len), or len. */
static size_t last_key(const char *text, size_t len, const char *key) {
  size_t kl = strlen(key);
  for (size_t i = len >= kl ? len - kl + 1 : 0; i-- > 0;)
    if (text[i] == key[0] && !memcmp(text + i, key, kl)) return i + kl;
  return len;
}

static void spans_of(const char *t, struct tc_mapper_span **out, size_t *n) {
  const struct tc_policy_text_span *ps = NULL;
  *n = t ? tc_policy_text_spans(t, &ps) : 0;
  *out = tc_xcalloc(*n + 1, sizeof **out);
  for (size_t i = 0; i < *n; i++) (*out)[i] = (struct tc_mapper_span){ps[i].off, ps[i].len, ps[i].shared};
}

/* Appends text (the part of a message that carries the viewer's packet
 * filter and SSH policy) to m, with the runs of those texts that are shared
 * between nodes' results as cached frames: under a policy where one user
 * owns many devices, tens of KB of every filter are the same SrcIPs text,
 * which was compressed again for every recipient. pn NULL (no policy, or
 * texts that are not the result's own): plain text. */
static void put_policy_text(struct tc_mapper *mp, struct tc_mapper_msg *m, const char *text, size_t len,
                            const struct pnode *pn) {
  const char *ft = pn && pn->r && pn->filter == pn->r->filter_text ? pn->filter : NULL;
  const char *st = pn && pn->r && pn->ssh && pn->ssh == pn->r->ssh_text ? pn->ssh : NULL;
  if (!mp->spans || (!ft && !st)) {
    tc_buf_append(&m->text, text, len);
    return;
  }
  size_t fat = ft ? last_key(text, len, "\"PacketFilter\":") : len;
  size_t sat = st ? last_key(text, len, "\"SSHPolicy\":") : len;
  if (sat < fat) sat = len; /* SSHPolicy follows PacketFilter in every message */
  struct tc_mapper_span *fs, *ss;
  size_t nf, ns;
  spans_of(ft, &fs, &nf);
  spans_of(st, &ss, &ns);
  tc_mapper_spans_append(mp->spans, m, text, sat, fat, ft, fs, ft && fat < len ? nf : 0);
  tc_mapper_spans_append(mp->spans, m, text + sat, len - sat, 0, st, ss, st && sat < len ? ns : 0);
  free(fs);
  free(ss);
}

struct full_ctx {
  struct tc_mapper *mp;
  const struct tc_snapshot *snap;
  const struct tc_node *self;
  const struct tc_node **peers;
  int64_t now;
};

static struct tc_mapper_frag *full_frag(void *arg, size_t k) {
  struct full_ctx *fc = arg;
  return viewer_frag(fc->mp, fc->snap, fc->self->id, fc->peers[k], fc->now, NULL);
}

/* Appends the complete first map for self as the viewer sees it, framed:
 * per-recipient frames (head, the viewer's own part of the peer list, tail)
 * around the shared compressed chunks of the rest (tc_mapper_chunks). */
static void build_full(struct tc_mapper *mp, const struct tc_snapshot *snap, const struct tc_node *self,
                       struct tc_buf *out) {
  int64_t now = tc_now();
  struct tc_buf sj = TC_BUF_INIT;
  self_json(mp, snap, self, now, &sj);
  const struct tc_node **peers = tc_xcalloc(snap->n_nodes + 1, sizeof *peers);
  bool *priv = NULL;
  size_t np = 0;
  const struct tc_policy_node_result *self_r = mp->pv.res ? pv_result(&mp->pv, self->id) : NULL;
  if (mp->pv.pol && mp->pv.res) priv = tc_xcalloc(snap->n_nodes + 1, sizeof *priv);
  for (size_t i = 0; i < snap->n_nodes; i++) {
    const struct tc_node *p = snap->nodes[i];
    if (p->id == self->id || !visible(mp, snap, self, self_r, p)) continue;
    /* Under a policy a router's AllowedIPs are the viewer's own, and a node
     * the result does not know has no stable fragment version. */
    if (priv) priv[np] = has_routes(p) || !pv_node(&mp->pv, p->id);
    peers[np++] = p;
  }
  struct tc_mapper_env env = mp->env;
  env.filter_json = (char *)tc_mapper_filter_for(&mp->env, snap, self);
  if (mp->pv.pol) {
    const struct pnode *pn = pv_node(&mp->pv, self->id);
    env.filter_json = pn ? (char *)pn->filter : "[]"; /* unknown to the policy: deny */
    env.ssh_json = pn ? (char *)pn->ssh : NULL;
  }
  struct tc_mapper_full m = {.self_json = sj.data, .n_peers = np, .now = now};
  struct tc_mapper_msg msg;
  tc_mapper_msg_init(&msg);
  tc_mapper_encode_full_open(&msg.text, &env, &m);
  struct tc_mapper_idv uids = {0};
  bool tagged = false;
  if (self->tags.n) tagged = true;
  else if (self->user_id > 0) tc_mapper_idv_push(&uids, self->user_id);
  if (np) {
    tc_mapper_chunks_layout(mp->chunks, snap->nodes, snap->n_nodes, snap->seq);
    struct full_ctx fc = {.mp = mp, .snap = snap, .self = self, .peers = peers, .now = now};
    struct tc_mapper_chunk_peers cp = {.nodes = peers, .n = np, .priv = priv, .viewer_id = self->id,
                                       .frag = full_frag, .ctx = &fc, .now = now};
    tc_mapper_chunks_append(mp->chunks, &msg, &cp, &uids, &tagged);
  }
  tc_mapper_idv_sort_unique(&uids);
  struct tc_user *users = tc_xcalloc(uids.n + 1, sizeof *users);
  size_t nu = 0;
  for (size_t i = 0; i < uids.n; i++) {
    const struct tc_user *u = tc_snapshot_user(snap, uids.v[i]);
    if (u) users[nu++] = *u; /* shallow: strings stay owned by the snapshot */
  }
  m.users = users, m.n_users = nu, m.tagged_profile = tagged;
  struct tc_buf tail = TC_BUF_INIT;
  tc_mapper_encode_full_close(&tail, &env, &m);
  put_policy_text(mp, &msg, tail.data, tail.len, mp->pv.pol ? pv_node(&mp->pv, self->id) : NULL);
  tc_buf_free(&tail);
  tc_mapper_msg_finish(&msg, out);
  tc_mapper_idv_free(&uids);
  free(users);
  free(peers);
  free(priv);
  tc_buf_free(&sj);
}

/* ---- policy (dispatcher thread) ------------------------------------------------------ */

/* Reference-counted CapMap texts (dispatcher thread only): nodes mostly
 * have the same CapMap, and an unchanged one is kept across recompiles, so
 * a thousand nodes hold one text instead of a thousand copies. */
struct ctext {
  size_t refs;
  char s[];
};

static char *ctext_new(const char *s) {
  size_t n = strlen(s);
  struct ctext *c = tc_xmalloc(sizeof *c + n + 1);
  c->refs = 1;
  memcpy(c->s, s, n + 1);
  return c->s;
}

static char *ctext_ref(char *s) {
  ((struct ctext *)(void *)(s - offsetof(struct ctext, s)))->refs++;
  return s;
}

static void ctext_unref(char *s) {
  if (!s) return;
  struct ctext *c = (struct ctext *)(void *)(s - offsetof(struct ctext, s));
  if (--c->refs == 0) free(c);
}

static void pv_free_compiled(struct tc_policy_result *res, struct pnode *pn, size_t npn) {
  for (size_t i = 0; i < npn; i++) ctext_unref(pn[i].capmap);
  free(pn);
  tc_policy_result_free(res);
}

static void pv_free(struct polview *pv) {
  pv_free_compiled(pv->res, pv->pn, pv->npn);
  tc_policy_free(pv->pol);
  memset(pv, 0, sizeof *pv);
}

static char *dump(const json_t *j, const char *dflt) {
  char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
  if (!s) return dflt ? tc_xstrdup(dflt) : NULL;
  char *out = tc_xstrdup(s); /* keep every string on our allocator */
  free(s);
  return out;
}

static int cmp_pnode(const void *a, const void *b) {
  int64_t x = ((const struct pnode *)a)->id, y = ((const struct pnode *)b)->id;
  return x < y ? -1 : x > y;
}

/* Compiles pv->pol for snap into a fresh result. Returns false (keeping the
 * old result) when the compiler refuses the topology. */
/* prev: the view compiled before (its pnodes, for CapMaps that did not
 * change), or NULL. */
static bool pv_compile(struct tc_mapper *mp, const struct tc_snapshot *snap, const struct polview *prev) {
  struct tc_model_topo mt;
  tc_model_topo_build(snap, &mt);
  struct tc_policy_topo topo = mt.topo;
  topo.control_url = mp->server_url[0] ? mp->server_url : NULL;
  topo.no_node_extras = true; /* routes and approvals come from the model */
  struct tc_policy_result *res = NULL;
  struct tc_policy_err perr = {0};
  /* prev's result (same parsed policy) lends its unchanged filters */
  int rc = tc_policy_compile_incremental(mp->pv.pol, &topo, prev ? prev->res : NULL, &res, &perr);
  tc_model_topo_free(&mt);
  if (rc) {
    tc_warn("mapper: policy compile failed, keeping the previous result: %s", perr.msg);
    return false;
  }
  json_t *base = mp->env.capmap_json ? json_loads(mp->env.capmap_json, 0, NULL) : NULL;
  struct pnode *pn = tc_xcalloc(res->nnodes + 1, sizeof *pn);
  /* the compiler shares equal CapMap objects between nodes: render each once */
  const json_t *last_obj = NULL;
  char *last_text = NULL;
  for (size_t i = 0; i < res->nnodes; i++) {
    const struct tc_policy_node_result *r = &res->nodes[i];
    pn[i].id = r->node_id;
    pn[i].r = r;
    const struct pnode *op = prev ? pv_node(prev, pn[i].id) : NULL;
    /* The result carries each filter and SSH policy as text, rendered once
     * per distinct object and shared with prev when unchanged: borrow it
     * (pn lives exactly as long as res). */
    pn[i].filter = r->filter_text ? r->filter_text : "[]";
    pn[i].ssh = r->ssh_text;
    /* The compiler hands back prev's CapMap object when it is unchanged. */
    if (op && op->r && r->cap_map && op->r->cap_map == r->cap_map) {
      pn[i].capmap = ctext_ref(op->capmap);
    } else if (last_text && r->cap_map && r->cap_map == last_obj) {
      pn[i].capmap = ctext_ref(last_text);
    } else {
      json_t *cm = base ? json_deep_copy(base) : json_object();
      if (json_is_object(r->cap_map)) json_object_update(cm, r->cap_map);
      char *t = dump(cm, "{}");
      json_decref(cm);
      pn[i].capmap = last_text && !strcmp(last_text, t) ? ctext_ref(last_text) : ctext_new(t);
      free(t);
    }
    last_obj = r->cap_map;
    last_text = pn[i].capmap;
    /* A node's cached fragment embeds its CapMap, and nothing else of the
     * policy: it stays valid across recompiles that leave that CapMap as it
     * was (re-encoding every node after each join was O(N^2) per storm). */
    pn[i].capmap_gen = op && !strcmp(op->capmap, pn[i].capmap) ? op->capmap_gen : mp->pv.gen + 1;
    if (pn[i].capmap_gen == mp->pv.gen + 1) tc_mapper_chunks_touch(mp->chunks, pn[i].id);
  }
  json_decref(base);
  qsort(pn, res->nnodes, sizeof *pn, cmp_pnode);
  pv_free_compiled(mp->pv.res, mp->pv.pn, mp->pv.npn);
  tc_mapper_spans_clear(mp->spans); /* keys point into results: none may outlive its result */
  mp->pv.res = res;
  mp->pv.pn = pn;
  mp->pv.npn = res->nnodes;
  mp->pv.gen++;
  return true;
}

/* Brings the policy view up to date with snap. *text_changed when the policy
 * itself changed (every stream then needs a resync). When a recompile
 * happened, the previous result is handed to the caller (*old_*) for
 * visibility diffs; it must be freed with pv_free_compiled. */
static bool pv_refresh(struct tc_mapper *mp, const struct tc_snapshot *snap, bool topo, bool *text_changed,
                       struct tc_policy_result **old_res, struct pnode **old_pn, size_t *old_npn) {
  struct polview *pv = &mp->pv;
  *text_changed = false;
  *old_res = NULL, *old_pn = NULL, *old_npn = 0;
  if (!pv->parsed || snap->policy_id != pv->policy_id) {
    struct tc_policy *pol = NULL;
    if (snap->policy && snap->policy_len) {
      struct tc_policy_err perr = {0};
      if (tc_policy_parse(snap->policy, snap->policy_len, &pol, &perr)) {
        tc_warn("mapper: stored policy does not parse, serving allow-all: %s", perr.msg);
        pol = NULL;
      } else if (tc_policy_is_allow_all(pol)) {
        tc_policy_free(pol);
        pol = NULL;
      }
    }
    bool was = pv->pol != NULL;
    tc_policy_free(pv->pol);
    pv->pol = pol;
    pv->parsed = true;
    pv->policy_id = snap->policy_id;
    *text_changed = was || pol;
    topo = true;
  }
  if (!topo) return false;
  /* hand the old compiled view to the caller, then build the new one */
  struct tc_policy_result *ores = pv->res;
  struct pnode *opn = pv->pn;
  size_t onpn = pv->npn;
  pv->res = NULL, pv->pn = NULL, pv->npn = 0;
  struct polview prev = {.res = ores, .pn = opn, .npn = onpn};
  if (pv->pol && !pv_compile(mp, snap, &prev)) {
    pv->res = ores, pv->pn = opn, pv->npn = onpn; /* compile refused: keep the old view */
    return false;
  }
  /* Without a policy a fragment depends on its node and the env only: the
   * generation moves when per-node CapMaps go away, not on every topology
   * event. (Bumping it on each join made every following full map re-encode
   * all its peers: O(N^2) encodes in a registration storm.) */
  if (!pv->pol && (opn || *text_changed)) {
    pv->gen++;
    tc_mapper_chunks_reset(mp->chunks);
  }
  tc_mapper_spans_clear(mp->spans);
  *old_res = ores, *old_pn = opn, *old_npn = onpn;
  return true;
}

static bool pv_topology_event(const struct item *it) {
  switch (it->ck) {
  case TC_CHANGE_NODE_ADDED:
  case TC_CHANGE_NODE_REMOVED:
  case TC_CHANGE_NODE_ROUTES:
  case TC_CHANGE_NODE_TAGS:
  case TC_CHANGE_NODE_RENAMED:
  case TC_CHANGE_USER_CHANGED:
  case TC_CHANGE_USER_REMOVED:
  case TC_CHANGE_POLICY:
    return true;
  case TC_CHANGE_NODE_CHANGED:
  case TC_CHANGE_NODE_ENDPOINTS:
    return (it->fields & (TC_NODE_F_USER | TC_NODE_F_TAGS | TC_NODE_F_ROUTES | TC_NODE_F_NAME)) != 0;
  default:
    return false;
  }
}

static bool sorted_has(const int64_t *v, size_t n, int64_t id) {
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (v[mid] == id) return true;
    if (v[mid] < id) lo = mid + 1;
    else hi = mid;
  }
  return false;
}

/* (Equal pointers: texts borrowed from the policy result, shared when unchanged.) */
static bool str_differ(const char *a, const char *b) {
  return a != b && ((a == NULL) != (b == NULL) || (a && strcmp(a, b)));
}

/* Deltas under a policy: per recipient, since who sees whom and the filter
 * differ per node. ids (sorted) are the nodes this event/batch touched;
 * their fragments go to whoever may see them now, PeersRemoved to whoever
 * saw them before but no longer does. A stream whose visible set changed in
 * any other way, or any stream after the policy text changed, is resynced
 * with a complete "Peers" list, its filter and SSH policy. */
static void policy_deltas(struct tc_mapper *mp, const struct tc_snapshot *snap, const int64_t *ids, size_t nid,
                          bool text_changed, const struct tc_policy_result *old_res, const struct pnode *old_pn,
                          size_t old_npn, bool recompiled, int64_t now) {
  struct polview oldpv = {.res = (struct tc_policy_result *)old_res, .pn = (struct pnode *)old_pn, .npn = old_npn};
  const struct tc_policy_result *ores = recompiled ? old_res : mp->pv.res;
  struct tc_mapper_frag **fr = tc_xcalloc(nid + 1, sizeof *fr);
  for (size_t i = 0; i < nid; i++) {
    const struct tc_node *n = tc_snapshot_node(snap, ids[i]);
    if (n) fr[i] = peer_frag(mp, snap, n, true, now);
    else tc_mapper_cache_forget(mp->cache, ids[i]);
  }
  /* a resync's complete peer list: nodes, and whose fragment is the viewer's own */
  const struct tc_node **vis = tc_xcalloc(snap->n_nodes + 1, sizeof *vis);
  bool *vpriv = tc_xcalloc(snap->n_nodes + 1, sizeof *vpriv);
  struct tc_mapper_frag **inc = tc_xcalloc(nid + 1, sizeof *inc);
  struct tc_mapper_frag **own = tc_xcalloc(nid + 1, sizeof *own);
  int64_t *rem = tc_xcalloc(snap->n_nodes + nid + 1, sizeof *rem);
  const struct tc_node **owners = tc_xcalloc(snap->n_nodes + nid + 2, sizeof *owners);
  struct tc_buf shared[8];
  uint64_t shared_inc[8], shared_rem[8];
  size_t nshared = 0;
  /* peer sets compared once per distinct pair of stored lists, not per stream */
  struct tc_policy_peers_cmp *pcmp = tc_policy_peers_cmp_new(ids, nid);
  for (size_t si = mp->n_sess; si-- > 0;) {
    if (si >= mp->n_sess) continue;
    struct session *s = mp->sess[si];
    const struct tc_node *self = tc_snapshot_node(snap, s->node_id);
    if (!self) {
      close_session(mp, s);
      continue;
    }
    const struct pnode *npn = mp->pv.pol ? pv_node(&mp->pv, self->id) : NULL;
    const struct pnode *opn = recompiled ? pv_node(&oldpv, self->id) : npn;
    const char *nfilter = mp->pv.pol ? (npn ? npn->filter : "[]") : mp->env.filter_json;
    const char *ofilter = recompiled ? (opn ? opn->filter : old_res ? "[]" : mp->env.filter_json) : nfilter;
    const char *nssh = mp->pv.pol ? (npn ? npn->ssh : NULL) : mp->env.ssh_json;
    const char *ossh = recompiled ? (opn ? opn->ssh : old_res ? NULL : mp->env.ssh_json) : nssh;
    bool self_changed = sorted_has(ids, nid, self->id) || str_differ(opn ? opn->capmap : NULL, npn ? npn->capmap : NULL);
    const struct tc_policy_node_result *nr = mp->pv.res ? pv_result(&mp->pv, self->id) : NULL;
    const struct tc_policy_node_result *or_ = !ores ? NULL : recompiled ? pv_result(&oldpv, self->id) : nr;
    bool resync = text_changed || (mp->pv.res && !nr) || (ores && !or_) || ((ores == NULL) != (mp->pv.res == NULL)) ||
                  (nr && or_ && nr != or_ && tc_policy_peers_differ(pcmp, or_, nr));
    struct tc_mapper_env env = mp->env;
    env.filter_json = (char *)nfilter;
    env.ssh_json = (char *)nssh;
    struct tc_mapper_delta d = {.now = now};
    size_t no = 0;
    owners[no++] = self;
    struct tc_buf sj = TC_BUF_INIT, json = TC_BUF_INIT, frame = TC_BUF_INIT;
    size_t na = 0, ni = 0, nr2 = 0, nown = 0;
    bool per_viewer = false;
    if (resync) {
      for (size_t k = 0; k < snap->n_nodes; k++) {
        const struct tc_node *p = snap->nodes[k];
        if (p->id == self->id || !res_visible(mp->pv.res, nr, p->id)) continue;
        vpriv[na] = mp->pv.pol && mp->pv.res && (has_routes(p) || !pv_node(&mp->pv, p->id)); /* as build_full */
        vis[na++] = p;
        owners[no++] = p;
      }
      if (na) {
        d.n_peers = na; /* encoded below from shared chunks, like a full map */
      } else {
        /* nothing visible: "Peers":[] would mean "unchanged", so remove all */
        for (size_t k = 0; k < snap->n_nodes; k++)
          if (snap->nodes[k]->id != self->id) rem[nr2++] = snap->nodes[k]->id;
        for (size_t k = 0; k < nid; k++)
          if (!fr[k]) rem[nr2++] = ids[k];
      }
      d.with_filter = d.with_ssh = true;
      self_changed = true;
    } else {
      for (size_t k = 0; k < nid; k++) {
        if (ids[k] == self->id) continue;
        bool now_vis = fr[k] && res_visible(mp->pv.res, nr, ids[k]);
        bool was_vis = res_visible(ores, or_, ids[k]);
        if (now_vis) {
          const struct tc_node *pn = tc_snapshot_node(snap, ids[k]);
          bool pv_own = false;
          struct tc_mapper_frag *vf = viewer_frag(mp, snap, self->id, pn, now, &pv_own);
          if (pv_own) {
            inc[ni++] = vf;
            own[nown++] = vf;
            per_viewer = true;
          } else {
            tc_mapper_frag_unref(vf); /* the same cached fragment as fr[k] */
            inc[ni++] = fr[k];
          }
          owners[no++] = pn;
        } else if (was_vis || !fr[k]) {
          rem[nr2++] = ids[k];
        }
      }
      d.changed = inc, d.n_changed = ni;
      d.with_filter = str_differ(ofilter, nfilter);
      d.with_ssh = str_differ(ossh, nssh) && nssh;
    }
    d.removed = rem, d.n_removed = nr2;
    if (!nssh && ossh) {
      /* an SSH section went away: absent would mean "unchanged", so revoke */
      env.ssh_json = "{\"rules\":[]}";
      d.with_ssh = true;
    }
    if (self_changed) {
      self_json(mp, snap, self, now, &sj);
      d.self_json = sj.data;
    }
    /* Recipients that get the same subset of the touched nodes and nothing
     * of their own share one encoded, framed message (found before the
     * profiles are collected: most recipients need nothing else). */
    bool shareable = !resync && !self_changed && !d.with_filter && !d.with_ssh && !per_viewer && nid <= 64;
    uint64_t incm = 0, remm = 0;
    if (shareable) {
      for (size_t k = 0, a = 0, r = 0; k < nid; k++) {
        if (a < ni && inc[a]->node_id == ids[k]) incm |= UINT64_C(1) << k, a++;
        if (r < nr2 && rem[r] == ids[k]) remm |= UINT64_C(1) << k, r++;
      }
    }
    long hit = -1;
    for (size_t k = 0; shareable && k < nshared; k++)
      if (shared_inc[k] == incm && shared_rem[k] == remm) hit = (long)k;
    struct tc_user *users = NULL;
    bool tagged = false;
    if (hit < 0 && (na || ni || self_changed)) {
      d.n_users = collect_users(snap, owners, no, &users, &tagged);
      d.users = users;
      d.tagged_profile = tagged;
    }
    if (hit >= 0) {
      if (shared[hit].len) send_frame(mp, s, &shared[hit], false);
    } else if (d.n_peers) {
      /* A resync carries the whole peer list: compressed per recipient it
       * made every policy or env change O(N^2) zstd work; the shared chunks
       * of full maps serve it instead. */
      struct tc_mapper_msg msg;
      tc_mapper_msg_init(&msg);
      tc_mapper_encode_delta_open(&msg.text, &env, &d);
      tc_mapper_chunks_layout(mp->chunks, snap->nodes, snap->n_nodes, snap->seq);
      struct full_ctx fc = {.mp = mp, .snap = snap, .self = self, .peers = vis, .now = now};
      struct tc_mapper_chunk_peers cp = {.nodes = vis, .n = na, .priv = vpriv, .viewer_id = self->id,
                                         .frag = full_frag, .ctx = &fc, .now = now};
      struct tc_mapper_idv uids = {0};
      bool tg = false;
      tc_mapper_chunks_append(mp->chunks, &msg, &cp, &uids, &tg); /* profiles: collected above */
      tc_mapper_idv_free(&uids);
      struct tc_buf tail = TC_BUF_INIT;
      tc_mapper_encode_delta_close(&tail, &env, &d);
      put_policy_text(mp, &msg, tail.data, tail.len, mp->pv.pol ? npn : NULL);
      tc_buf_free(&tail);
      tc_mapper_msg_finish(&msg, &frame);
      send_frame(mp, s, &frame, false);
    } else if (mp->pv.pol && npn && (d.with_filter || d.with_ssh) && tc_mapper_encode_delta(&json, &env, &d)) {
      struct tc_mapper_msg msg;
      tc_mapper_msg_init(&msg);
      put_policy_text(mp, &msg, json.data, json.len, npn);
      tc_mapper_msg_finish(&msg, &frame);
      send_frame(mp, s, &frame, false);
    } else if (tc_mapper_encode_delta(&json, &env, &d)) {
      tc_mapper_frame(json.data, json.len, &frame);
      send_frame(mp, s, &frame, false);
    }
    if (hit < 0 && shareable && nshared < TC_ARRAY_LEN(shared)) {
      shared_inc[nshared] = incm;
      shared_rem[nshared] = remm;
      shared[nshared++] = frame; /* adopt (possibly empty: nothing to send) */
      frame = (struct tc_buf)TC_BUF_INIT;
    }
    for (size_t k = 0; k < nown; k++) tc_mapper_frag_unref(own[k]);
    free(users);
    tc_buf_free(&sj);
    tc_buf_free(&json);
    tc_buf_free(&frame);
  }
  tc_policy_peers_cmp_free(pcmp);
  for (size_t k = 0; k < nshared; k++) tc_buf_free(&shared[k]);
  for (size_t i = 0; i < nid; i++) tc_mapper_frag_unref(fr[i]);
  free(fr);
  free(vis);
  free(vpriv);
  free(inc);
  free(own);
  free(rem);
  free(owners);
}

/* The policy path for events (single or merged): returns false when neither
 * the old nor the new view has a policy, so the allow-all path applies. */
static bool policy_events(struct tc_mapper *mp, struct item **items, size_t n, const int64_t *prim_ids, size_t npi) {
  const struct tc_snapshot *snap = mp->last_snap;
  bool topo = false;
  for (size_t i = 0; i < n; i++) topo |= pv_topology_event(items[i]);
  bool had = mp->pv.pol != NULL;
  bool text_changed;
  struct tc_policy_result *ores;
  struct pnode *opn;
  size_t onpn;
  bool recompiled = pv_refresh(mp, snap, topo, &text_changed, &ores, &opn, &onpn);
  if (!had && !mp->pv.pol) {
    pv_free_compiled(ores, opn, onpn);
    return false;
  }
  int64_t *ids = tc_xcalloc(n + npi + 1, sizeof *ids);
  size_t nid = 0;
  for (size_t i = 0; i < n; i++)
    if (items[i]->node_id) ids[nid++] = items[i]->node_id;
  for (size_t i = 0; i < npi; i++) ids[nid++] = prim_ids[i];
  qsort(ids, nid, sizeof *ids, cmp_i64);
  size_t m = 0;
  for (size_t i = 0; i < nid; i++)
    if (!m || ids[m - 1] != ids[i]) ids[m++] = ids[i];
  nid = m;
  /* streams of removed nodes end */
  for (size_t i = 0; i < nid; i++)
    if (!tc_snapshot_node(snap, ids[i])) {
      struct session *s = sess_find(mp, ids[i]);
      if (s) close_session(mp, s);
    }
  policy_deltas(mp, snap, ids, nid, text_changed, ores, opn, onpn, recompiled, tc_now());
  pv_free_compiled(ores, opn, onpn);
  free(ids);
  return true;
}

/* ---- dispatcher: items ------------------------------------------------------------- */

static void do_open(struct tc_mapper *mp, struct session *s) {
  if (s->state == 2) return; /* cancelled before it opened */
  struct tc_snapshot *snap = mp->last_snap ? tc_snapshot_ref(mp->last_snap) : tc_model_snapshot(mp->model);
  const struct tc_node *self = tc_snapshot_node(snap, s->node_id);
  if (!self && s->oneshot) {
    s->io->end(s->st); /* deleted meanwhile: an empty body, the client retries */
    s->state = 2;
    atomic_store(&s->closed, 1);
    s->closed_at_ms = tc_mono_ms();
    s->next_grave = mp->grave;
    mp->grave = s;
    tc_snapshot_release(snap);
    return;
  }
  if (!self) {
    close_session(mp, s);
    tc_snapshot_release(snap);
    return;
  }
  struct tc_buf frame = TC_BUF_INIT;
  pthread_rwlock_rdlock(&mp->env_lock);
  build_full(mp, snap, self, &frame);
  pthread_rwlock_unlock(&mp->env_lock);
  if (s->oneshot) {
    /* one message, then the response ends; nothing is registered */
    s->io->write(s->st, frame.data, frame.len);
    s->io->end(s->st);
    s->state = 2;
    atomic_store(&s->closed, 1);
    s->closed_at_ms = tc_mono_ms();
    s->next_grave = mp->grave;
    mp->grave = s;
    atomic_fetch_add(&mp->st_full, 1);
    tc_buf_free(&frame);
    tc_snapshot_release(snap);
    return;
  }
  /* A newer stream for a node supersedes the older one (§7.8). */
  struct session *old = sess_find(mp, s->node_id);
  if (old) close_session(mp, old);
  s->state = 1;
  atomic_fetch_add(&mp->st_open, 1);
  if (mp->n_sess == mp->cap_sess) {
    mp->cap_sess = mp->cap_sess ? mp->cap_sess * 2 : 64;
    mp->sess = tc_xrealloc(mp->sess, mp->cap_sess * sizeof *mp->sess);
  }
  mp->sess[mp->n_sess++] = s;
  if (send_frame(mp, s, &frame, false)) {
    atomic_fetch_sub(&mp->st_deltas, 1);
    atomic_fetch_add(&mp->st_full, 1);
  }
  tc_buf_free(&frame);
  tc_snapshot_release(snap);
}

/* Node ids whose primary-route assignment differs between the remembered
 * table and snap; updates the remembered table. */
static size_t primary_changes(struct tc_mapper *mp, const struct tc_snapshot *snap, int64_t *out, size_t max) {
  size_t k = 0;
  bool same = snap->n_primaries == mp->n_prims;
  for (size_t i = 0; same && i < snap->n_primaries; i++)
    same = !strcmp(snap->primaries[i].prefix, mp->prims[i].prefix) && snap->primaries[i].node_id == mp->prims[i].node_id;
  if (same) return 0;
  /* Any node that held or holds a primary whose holder changed. */
  for (size_t i = 0; i < mp->n_prims; i++) {
    bool kept = false;
    for (size_t j = 0; j < snap->n_primaries && !kept; j++)
      kept = !strcmp(snap->primaries[j].prefix, mp->prims[i].prefix) && snap->primaries[j].node_id == mp->prims[i].node_id;
    if (!kept && k < max) out[k++] = mp->prims[i].node_id;
  }
  for (size_t j = 0; j < snap->n_primaries; j++) {
    bool had = false;
    for (size_t i = 0; i < mp->n_prims && !had; i++)
      had = !strcmp(snap->primaries[j].prefix, mp->prims[i].prefix) && snap->primaries[j].node_id == mp->prims[i].node_id;
    if (!had && k < max) out[k++] = snap->primaries[j].node_id;
  }
  for (size_t i = 0; i < mp->n_prims; i++) free(mp->prims[i].prefix);
  free(mp->prims);
  mp->n_prims = snap->n_primaries;
  mp->prims = tc_xcalloc(mp->n_prims + 1, sizeof *mp->prims);
  for (size_t i = 0; i < mp->n_prims; i++) {
    mp->prims[i].prefix = tc_xstrdup(snap->primaries[i].prefix);
    mp->prims[i].node_id = snap->primaries[i].node_id;
  }
  qsort(out, k, sizeof *out, cmp_i64);
  size_t m = 0;
  for (size_t i = 0; i < k; i++)
    if (!m || out[m - 1] != out[i]) out[m++] = out[i];
  return m;
}

/* Sends d to every open session except except_id that may see subject
 * (NULL subject: everyone). Encoded and framed once. */
static void broadcast(struct tc_mapper *mp, const struct tc_snapshot *snap, const struct tc_mapper_delta *d,
                      int64_t except_id, const struct tc_node *subject) {
  struct tc_buf json = TC_BUF_INIT, frame = TC_BUF_INIT;
  if (!tc_mapper_encode_delta(&json, &mp->env, d)) return;
  tc_mapper_frame(json.data, json.len, &frame);
  tc_buf_free(&json);
  /* backwards: close_session swaps the last entry into the hole */
  for (size_t i = mp->n_sess; i-- > 0;) {
    if (i >= mp->n_sess) continue;
    struct session *s = mp->sess[i];
    if (s->node_id == except_id) continue;
    if (subject) {
      const struct tc_node *viewer = tc_snapshot_node(snap, s->node_id);
      if (viewer && !tc_mapper_visible(snap, viewer, subject)) continue;
    }
    send_frame(mp, s, &frame, false);
  }
  tc_buf_free(&frame);
}

static void send_self(struct tc_mapper *mp, const struct tc_snapshot *snap, const struct tc_node *n, int64_t now) {
  struct session *s = sess_find(mp, n->id);
  if (!s) return;
  struct tc_buf sj = TC_BUF_INIT, json = TC_BUF_INIT, frame = TC_BUF_INIT;
  self_json(mp, snap, n, now, &sj);
  struct tc_user *users;
  bool tagged;
  size_t nu = collect_users(snap, &n, 1, &users, &tagged);
  struct tc_mapper_delta d = {.self_json = sj.data, .users = users, .n_users = nu, .tagged_profile = tagged, .now = now};
  tc_mapper_encode_delta(&json, &mp->env, &d);
  tc_mapper_frame(json.data, json.len, &frame);
  send_frame(mp, s, &frame, false);
  free(users);
  tc_buf_free(&sj);
  tc_buf_free(&json);
  tc_buf_free(&frame);
}

static void do_event(struct tc_mapper *mp, struct item *it) {
  atomic_fetch_add(&mp->st_events, 1);
  tc_snapshot_release(mp->last_snap);
  mp->last_snap = it->snap; /* adopt the item's reference */
  it->snap = NULL;
  const struct tc_snapshot *snap = mp->last_snap;
  int64_t now = tc_now();
  pthread_rwlock_rdlock(&mp->env_lock);
  const struct tc_node *n = it->node_id ? tc_snapshot_node(snap, it->node_id) : NULL;
  if (it->node_id) bump(mp, it->node_id, snap->seq);

  struct tc_mapper_frag *changed[65];
  size_t nc = 0;
  int64_t prim_ids[64];
  size_t npi = primary_changes(mp, snap, prim_ids, 64);
  for (size_t i = 0; i < npi; i++) bump(mp, prim_ids[i], snap->seq);
  if (policy_events(mp, &it, 1, prim_ids, npi)) {
    pthread_rwlock_unlock(&mp->env_lock);
    return;
  }

  struct tc_mapper_delta d = {.now = now};
  struct tc_mapper_patch patch = {0};
  struct tc_user *users = NULL;
  bool tagged = false;
  bool self_too = false;

  switch (it->ck) {
  case TC_CHANGE_NODE_REMOVED:
    tc_mapper_cache_forget(mp->cache, it->node_id);
    d.removed = &it->node_id;
    d.n_removed = 1;
    {
      struct session *s = sess_find(mp, it->node_id);
      if (s) close_session(mp, s);
    }
    break;
  case TC_CHANGE_NODE_ONLINE:
  case TC_CHANGE_NODE_OFFLINE:
    if (!n) break;
    patch.node_id = n->id;
    patch.set = TC_PATCH_ONLINE;
    patch.online = it->ck == TC_CHANGE_NODE_ONLINE;
    if (!patch.online && n->last_seen) {
      patch.set |= TC_PATCH_LASTSEEN;
      patch.last_seen = n->last_seen;
    }
    d.patches = &patch;
    d.n_patches = 1;
    break;
  case TC_CHANGE_NODE_ENDPOINTS:
    if (!n) break;
    if (it->fields & (TC_NODE_F_HOSTINFO | TC_NODE_F_HOSTNAME | TC_NODE_F_ROUTES)) {
      /* peers read services, OS and routes from the node itself */
      changed[nc++] = peer_frag(mp, snap, n, true, now);
    } else {
      patch.node_id = n->id;
      if (it->fields & TC_NODE_F_ENDPOINTS) patch.set |= TC_PATCH_ENDPOINTS, patch.endpoints = &n->endpoints;
      if (it->fields & TC_NODE_F_DISCO) patch.set |= TC_PATCH_DISCO, memcpy(patch.disco_key, n->disco_key, TC_KEY_LEN);
      if (it->fields & TC_NODE_F_DERP) patch.set |= TC_PATCH_DERP, patch.derp_region = n->home_derp;
      if (it->fields & TC_NODE_F_CAP) patch.set |= TC_PATCH_CAP, patch.cap = n->cap_version;
      if (patch.set) {
        d.patches = &patch;
        d.n_patches = 1;
      }
    }
    break;
  case TC_CHANGE_NODE_ADDED:
  case TC_CHANGE_NODE_CHANGED:
  case TC_CHANGE_NODE_KEY_ROTATED:
  case TC_CHANGE_NODE_EXPIRED:
  case TC_CHANGE_NODE_ROUTES:
  case TC_CHANGE_NODE_TAGS:
  case TC_CHANGE_NODE_RENAMED:
    if (!n) break;
    changed[nc++] = peer_frag(mp, snap, n, true, now);
    d.n_users = collect_users(snap, &n, 1, &users, &tagged);
    d.users = users;
    d.tagged_profile = tagged;
    self_too = it->ck != TC_CHANGE_NODE_ADDED;
    break;
  case TC_CHANGE_USER_CHANGED: {
    const struct tc_user *u = tc_snapshot_user(snap, it->user_id);
    if (u) {
      users = tc_xcalloc(1, sizeof *users);
      users[0] = *u;
      d.users = users;
      d.n_users = 1;
    }
    break;
  }
  case TC_CHANGE_POLICY:
    d.with_filter = true;
    d.with_ssh = true;
    break;
  default:
    break;
  }
  /* nodes whose primary routes moved: full entries for peers, self for them */
  bool subject_has_frag = nc > 0;
  for (size_t i = 0; i < npi && nc < TC_ARRAY_LEN(changed); i++) {
    if (subject_has_frag && prim_ids[i] == it->node_id) continue;
    const struct tc_node *pn = tc_snapshot_node(snap, prim_ids[i]);
    if (pn) changed[nc++] = peer_frag(mp, snap, pn, true, now);
  }
  d.changed = changed;
  d.n_changed = nc;
  broadcast(mp, snap, &d, it->node_id, npi ? NULL : n);
  if (self_too && n) send_self(mp, snap, n, now);
  for (size_t i = 0; i < npi; i++) {
    if (prim_ids[i] == it->node_id && self_too) continue;
    const struct tc_node *pn = tc_snapshot_node(snap, prim_ids[i]);
    if (pn) send_self(mp, snap, pn, now);
  }
  pthread_rwlock_unlock(&mp->env_lock);
  for (size_t i = 0; i < nc; i++) tc_mapper_frag_unref(changed[i]);
  free(users);
}

#define BATCH_MAX 64

static bool id_in_sorted(const int64_t *v, size_t n, int64_t id) {
  return bsearch(&id, v, n, sizeof *v, cmp_i64) != NULL;
}

/* Several events at once: every affected node is sent whole (PeersChanged,
 * from the newest snapshot) instead of as patches; removals as PeersRemoved.
 * Streams of affected nodes get their own variant without themselves as a
 * peer, plus their self node. */
static void do_batch(struct tc_mapper *mp, struct item **items, size_t n) {
  atomic_fetch_add(&mp->st_events, n);
  tc_snapshot_release(mp->last_snap);
  mp->last_snap = items[n - 1]->snap;
  items[n - 1]->snap = NULL;
  const struct tc_snapshot *snap = mp->last_snap;
  int64_t now = tc_now();
  pthread_rwlock_rdlock(&mp->env_lock);

  int64_t ids[BATCH_MAX + 64], removed[BATCH_MAX], uids[BATCH_MAX];
  size_t nid = 0, nrem = 0, nu = 0;
  bool policy = false;
  for (size_t i = 0; i < n; i++) {
    struct item *it = items[i];
    if (it->ck == TC_CHANGE_POLICY) policy = true;
    if (it->ck == TC_CHANGE_USER_CHANGED && it->user_id) uids[nu++] = it->user_id;
    if (it->node_id) ids[nid++] = it->node_id;
  }
  nid += primary_changes(mp, snap, ids + nid, 64);
  qsort(ids, nid, sizeof *ids, cmp_i64);
  size_t m = 0;
  for (size_t i = 0; i < nid; i++)
    if (!m || ids[m - 1] != ids[i]) ids[m++] = ids[i];
  nid = m;
  for (size_t i = 0; i < nid; i++) bump(mp, ids[i], snap->seq);
  if (policy_events(mp, items, n, ids, nid)) {
    pthread_rwlock_unlock(&mp->env_lock);
    return;
  }

  struct tc_mapper_frag *changed[BATCH_MAX + 64];
  const struct tc_node *cnodes[BATCH_MAX + 64];
  size_t nc = 0;
  for (size_t i = 0; i < nid; i++) {
    ver_set(&mp->vers, ids[i], snap->seq);
    const struct tc_node *nd = tc_snapshot_node(snap, ids[i]);
    if (!nd) {
      removed[nrem++] = ids[i];
      tc_mapper_cache_forget(mp->cache, ids[i]);
      struct session *s = sess_find(mp, ids[i]);
      if (s) close_session(mp, s);
      continue;
    }
    cnodes[nc] = nd;
    changed[nc++] = peer_frag(mp, snap, nd, true, now);
  }
  /* profiles: owners of changed nodes plus users that changed */
  struct tc_user *users;
  bool tagged;
  size_t nusers = collect_users(snap, cnodes, nc, &users, &tagged);
  for (size_t i = 0; i < nu; i++) {
    const struct tc_user *u = tc_snapshot_user(snap, uids[i]);
    bool have = false;
    for (size_t k = 0; k < nusers && !have; k++) have = users[k].id == uids[i];
    if (u && !have) {
      users = tc_xrealloc(users, (nusers + 1) * sizeof *users);
      users[nusers++] = *u;
    }
  }
  struct tc_mapper_delta d = {.changed = changed, .n_changed = nc, .removed = removed, .n_removed = nrem,
                              .users = users, .n_users = nusers, .tagged_profile = tagged,
                              .with_filter = policy, .with_ssh = policy, .now = now};
  struct tc_buf json = TC_BUF_INIT, frame = TC_BUF_INIT;
  bool any = tc_mapper_encode_delta(&json, &mp->env, &d);
  if (any) tc_mapper_frame(json.data, json.len, &frame);
  struct tc_mapper_frag **mine = tc_xcalloc(nc + 1, sizeof *mine);
  for (size_t i = mp->n_sess; i-- > 0;) {
    if (i >= mp->n_sess) continue;
    struct session *s = mp->sess[i];
    if (!id_in_sorted(ids, nid, s->node_id)) {
      if (any) send_frame(mp, s, &frame, false);
      continue;
    }
    /* an affected node: everything but itself, and its own node */
    const struct tc_node *self = tc_snapshot_node(snap, s->node_id);
    if (!self) continue;
    size_t k = 0;
    for (size_t j = 0; j < nc; j++)
      if (changed[j]->node_id != s->node_id) mine[k++] = changed[j];
    struct tc_buf sj = TC_BUF_INIT, pj = TC_BUF_INIT, pf = TC_BUF_INIT;
    self_json(mp, snap, self, now, &sj);
    struct tc_mapper_delta pd = d;
    pd.changed = mine;
    pd.n_changed = k;
    pd.self_json = sj.data;
    tc_mapper_encode_delta(&pj, &mp->env, &pd);
    tc_mapper_frame(pj.data, pj.len, &pf);
    send_frame(mp, s, &pf, false);
    tc_buf_free(&sj);
    tc_buf_free(&pj);
    tc_buf_free(&pf);
  }
  pthread_rwlock_unlock(&mp->env_lock);
  free(mine);
  for (size_t i = 0; i < nc; i++) tc_mapper_frag_unref(changed[i]);
  free(users);
  tc_buf_free(&json);
  tc_buf_free(&frame);
}

static void do_env(struct tc_mapper *mp, struct tc_mapper_env *env) {
  pthread_rwlock_wrlock(&mp->env_lock);
  /* what every Node or per-node message depends on: names, CapMap, and the
   * allow-all filter / SSH policy */
  bool nodes_change = str_differ(mp->env.base_domain, env->base_domain) ||
                      str_differ(mp->env.capmap_json, env->capmap_json) ||
                      str_differ(mp->env.filter_json, env->filter_json) || str_differ(mp->env.ssh_json, env->ssh_json);
  tc_mapper_env_free(&mp->env);
  mp->env = *env;
  free(env);
  if (nodes_change) {
    tc_mapper_cache_free(mp->cache);
    mp->cache = tc_mapper_cache_new();
    tc_mapper_chunks_reset(mp->chunks);
  }
  pthread_rwlock_unlock(&mp->env_lock);
  pthread_rwlock_rdlock(&mp->env_lock);
  struct tc_snapshot *snap = mp->last_snap ? tc_snapshot_ref(mp->last_snap) : tc_model_snapshot(mp->model);
  if (nodes_change && mp->pv.pol) pv_compile(mp, snap, NULL); /* CapMaps merge the env's defaults */
  struct tc_mapper_delta d = {.with_derp = true, .with_dns = true, .now = tc_now()};
  broadcast(mp, snap, &d, 0, NULL);
  /* every stream again gets its self node, complete peer list, filter and
   * SSH policy, since all of them embed what changed */
  if (nodes_change) policy_deltas(mp, snap, NULL, 0, true, NULL, NULL, 0, false, d.now);
  tc_snapshot_release(snap);
  pthread_rwlock_unlock(&mp->env_lock);
}

static void do_keepalives(struct tc_mapper *mp) {
  int64_t now = tc_mono_ms();
  for (size_t i = mp->n_sess; i-- > 0;) {
    if (i >= mp->n_sess) continue;
    struct session *s = mp->sess[i];
    if (now >= s->next_ka_ms) send_frame(mp, s, &mp->ka_frame, true);
  }
}

static void *dispatcher(void *arg) {
  struct tc_mapper *mp = arg;
  int64_t win_start = tc_mono_ms();
  uint64_t win_events = 0, prev_win_events = 0, since_trim = 0;
  int64_t last_trim = 0;
  pthread_mutex_lock(&mp->qmu);
  for (;;) {
    while (!mp->qhead && !mp->stopping) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 250 * 1000000L;
      if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
      if (pthread_cond_timedwait(&mp->qcv, &mp->qmu, &ts)) {
#ifdef __GLIBC__
        /* Work (full maps, deltas, a policy recompile per join) leaves
         * freed pages in the malloc arenas of several threads: a policy
         * recompile after a join alone left ~1.5 KiB per node at N = 1,000
         * that only a trim returns. An idle quarter second after any work
         * hands them back, at most once a second (a trim walks every
         * arena's free chunks: ~1 ms at that size). */
        int64_t now = tc_mono_ms();
        if (since_trim > 0 && !mp->qhead && now - last_trim >= 1000) {
          since_trim = 0;
          last_trim = now;
          pthread_mutex_unlock(&mp->qmu);
          int64_t t0 = tc_mono_ns();
          malloc_trim(0);
          atomic_fetch_add(&mp->st_trims, 1);
          tc_debug("mapper: malloc_trim took %lld us", (long long)((tc_mono_ns() - t0) / 1000));
          pthread_mutex_lock(&mp->qmu);
        }
#endif
        break;
      }
    }
    int64_t now_ms = tc_mono_ms();
    if (now_ms - win_start >= STORM_WINDOW_MS) {
      /* an idle gap longer than a window means the storm is over */
      prev_win_events = now_ms - win_start >= 2 * STORM_WINDOW_MS ? 0 : win_events;
      win_events = 0;
      win_start = now_ms;
    }
    if (mp->qhead && !mp->stopping && prev_win_events + win_events > STORM_EVENTS) {
      pthread_mutex_unlock(&mp->qmu);
      struct timespec lt = {0, LINGER_MS * 1000000L};
      nanosleep(&lt, NULL);
      pthread_mutex_lock(&mp->qmu);
    }
    /* Everything queued (up to 256 items) is taken at once. Its events are
     * merged into deltas of up to BATCH_MAX events: under a burst (many
     * nodes joining, each recompiling the policy) every stream gets one
     * message per batch instead of one per event. Opens, closes and env
     * changes run after those events, in their own order: an open then
     * builds its full map from the newest state, which already contains the
     * events it was queued before, so nothing is lost or repeated. */
    struct item *ev[256], *ot[256];
    size_t nev = 0, not_ = 0;
    while (mp->qhead && nev + not_ < 256) {
      struct item *it = mp->qhead;
      mp->qhead = it->next;
      if (!mp->qhead) mp->qtail = NULL;
      if (it->kind == IT_EVENT) ev[nev++] = it;
      else ot[not_++] = it;
    }
    size_t nb = nev + not_;
    win_events += nev;
    since_trim += nb;
    if (!nb && mp->stopping) break;
    pthread_mutex_unlock(&mp->qmu);
    for (size_t i = 0; i < nev; i += BATCH_MAX) {
      size_t k = TC_MIN((size_t)BATCH_MAX, nev - i);
      if (k > 1) do_batch(mp, ev + i, k);
      else do_event(mp, ev[i]);
    }
    for (size_t i = 0; i < not_; i++) {
      struct item *it = ot[i];
      switch (it->kind) {
      case IT_EVENT: break;
      case IT_OPEN: do_open(mp, it->s); break;
      case IT_CLOSE: close_session(mp, it->s); break;
      case IT_ENV: do_env(mp, it->env); break;
      }
    }
    for (size_t i = 0; i < nb; i++) {
      struct item *it = i < nev ? ev[i] : ot[i - nev];
      if (it->s) atomic_fetch_sub(&it->s->pending_items, 1);
      tc_snapshot_release(it->snap);
      free(it);
    }
    do_keepalives(mp);
    flush_offline(mp, false);
    sweep_grave(mp, false);
    struct tc_mapper_chunk_stats cs;
    tc_mapper_chunks_stats(mp->chunks, &cs);
    atomic_store(&mp->st_ch_hits, cs.hits);
    atomic_store(&mp->st_ch_builds, cs.builds);
    atomic_store(&mp->st_ch_text, cs.text_peers);
    atomic_store(&mp->st_ch_drops, cs.drops);
    uint64_t sph, spb;
    tc_mapper_spans_stats(mp->spans, &sph, &spb);
    atomic_store(&mp->st_sp_hits, sph);
    atomic_store(&mp->st_sp_builds, spb);
    pthread_mutex_lock(&mp->qmu);
    if (nb) {
      mp->done_count += nb;
      pthread_cond_broadcast(&mp->donecv);
    }
  }
  pthread_mutex_unlock(&mp->qmu);
  return NULL;
}

/* ---- lifecycle ------------------------------------------------------------------------ */

int tc_mapper_new(const struct tc_mapper_opts *o, struct tc_mapper **out, struct tc_err *err) {
  *out = NULL;
  if (!o || !o->model || !o->env) return tc_err_set(err, TC_EINVAL, "mapper: model and env are required");
  struct tc_mapper *mp = tc_xcalloc(1, sizeof *mp);
  mp->model = o->model;
  mp->server_url = tc_xstrdup(o->server_url ? o->server_url : "");
  size_t ul = strlen(mp->server_url);
  while (ul && mp->server_url[ul - 1] == '/') mp->server_url[--ul] = 0;
  mp->ka_ms = o->keepalive_ms > 0 ? o->keepalive_ms : 50000;
  mp->ka_jitter_ms = o->keepalive_jitter_ms == 0 ? 9000 : o->keepalive_jitter_ms;
  mp->followup_timeout_ms = o->followup_timeout_ms > 0 ? o->followup_timeout_ms : 15 * 60 * 1000;
  mp->max_followups = o->max_followups > 0 ? o->max_followups : 256;
  mp->offline_grace_ms = o->offline_grace_ms == 0 ? 10000 : o->offline_grace_ms;
  tc_mapper_env_copy(&mp->env, o->env);
  pthread_rwlock_init(&mp->env_lock, NULL);
  mp->cache = tc_mapper_cache_new();
  /* 128: a chunk's frame costs ~+0.3 % in size over one frame for the whole
   * list (each frame starts without history); 64 cost ~+3.5 %. */
  if (o->full_map_chunk >= 0) mp->chunks = tc_mapper_chunks_new(o->full_map_chunk ? (size_t)o->full_map_chunk : 128);
  if (o->full_map_chunk >= 0) mp->spans = tc_mapper_spans_new();
  pthread_mutex_init(&mp->qmu, NULL);
  pthread_cond_init(&mp->qcv, NULL);
  pthread_cond_init(&mp->donecv, NULL);
  struct tc_buf ka = TC_BUF_INIT;
  tc_mapper_encode_keepalive(&ka);
  tc_mapper_frame(ka.data, ka.len, &mp->ka_frame);
  tc_buf_free(&ka);
  /* remember the primaries as of now so the first event diffs against them */
  struct tc_snapshot *snap = tc_model_snapshot(mp->model);
  int64_t dummy[1];
  primary_changes(mp, snap, dummy, 0);
  bool tch;
  struct tc_policy_result *ores;
  struct pnode *opn;
  size_t onpn;
  if (pv_refresh(mp, snap, true, &tch, &ores, &opn, &onpn)) pv_free_compiled(ores, opn, onpn);
  tc_snapshot_release(snap);
  mp->sub_id = tc_model_subscribe(mp->model, on_change, mp);
  if (pthread_create(&mp->thread, NULL, dispatcher, mp)) {
    tc_model_unsubscribe(mp->model, mp->sub_id);
    tc_mapper_cache_free(mp->cache);
    tc_mapper_chunks_free(mp->chunks);
    tc_mapper_spans_free(mp->spans);
    tc_mapper_env_free(&mp->env);
    tc_buf_free(&mp->ka_frame);
    free(mp->server_url);
    free(mp);
    return tc_err_set(err, TC_EINTERNAL, "mapper: cannot start dispatcher thread");
  }
  *out = mp;
  return 0;
}

void tc_mapper_free(struct tc_mapper *mp) {
  if (!mp) return;
  tc_model_unsubscribe(mp->model, mp->sub_id);
  /* follow-up threads hold the mapper: wait for them */
  while (atomic_load(&mp->followups) > 0) {
    struct timespec ts = {0, 10 * 1000000L};
    nanosleep(&ts, NULL);
  }
  pthread_mutex_lock(&mp->qmu);
  mp->stopping = true;
  pthread_cond_signal(&mp->qcv);
  pthread_mutex_unlock(&mp->qmu);
  pthread_join(mp->thread, NULL);
  while (mp->n_sess) close_session(mp, mp->sess[mp->n_sess - 1]);
  flush_offline(mp, true);
  free(mp->offs);
  sweep_grave(mp, true);
  free(mp->sess);
  free(mp->vers.ids);
  free(mp->vers.vers);
  for (size_t i = 0; i < mp->n_prims; i++) free(mp->prims[i].prefix);
  free(mp->prims);
  tc_snapshot_release(mp->last_snap);
  pv_free(&mp->pv);
  tc_mapper_cache_free(mp->cache);
  tc_mapper_chunks_free(mp->chunks);
  tc_mapper_spans_free(mp->spans);
  tc_mapper_env_free(&mp->env);
  tc_buf_free(&mp->ka_frame);
  pthread_rwlock_destroy(&mp->env_lock);
  pthread_mutex_destroy(&mp->qmu);
  pthread_cond_destroy(&mp->qcv);
  pthread_cond_destroy(&mp->donecv);
  free(mp->server_url);
  free(mp);
}

void tc_mapper_set_env(struct tc_mapper *mp, const struct tc_mapper_env *env) {
  struct item *it = tc_xcalloc(1, sizeof *it);
  it->kind = IT_ENV;
  it->env = tc_xcalloc(1, sizeof *it->env);
  tc_mapper_env_copy(it->env, env);
  enqueue(mp, it);
}

void tc_mapper_sync(struct tc_mapper *mp) {
  pthread_mutex_lock(&mp->qmu);
  uint64_t target = mp->enq_count;
  while (mp->done_count < target) pthread_cond_wait(&mp->donecv, &mp->qmu);
  pthread_mutex_unlock(&mp->qmu);
}

void tc_mapper_get_stats(struct tc_mapper *mp, struct tc_mapper_stats *o) {
  memset(o, 0, sizeof *o);
  o->streams_open = atomic_load(&mp->st_open);
  o->full_maps = atomic_load(&mp->st_full);
  o->deltas = atomic_load(&mp->st_deltas);
  o->keepalives = atomic_load(&mp->st_ka);
  o->bytes_out = atomic_load(&mp->st_bytes);
  o->streams_cut = atomic_load(&mp->st_cut);
  o->events = atomic_load(&mp->st_events);
  pthread_rwlock_rdlock(&mp->env_lock);
  tc_mapper_cache_stats(mp->cache, &o->frag_hits, &o->frag_encodes);
  pthread_rwlock_unlock(&mp->env_lock);
  o->chunk_hits = atomic_load(&mp->st_ch_hits);
  o->chunk_builds = atomic_load(&mp->st_ch_builds);
  o->chunk_text_peers = atomic_load(&mp->st_ch_text);
  o->chunk_drops = atomic_load(&mp->st_ch_drops);
  o->span_hits = atomic_load(&mp->st_sp_hits);
  o->span_builds = atomic_load(&mp->st_sp_builds);
  o->trims = atomic_load(&mp->st_trims);
}

/* ---- request handling (worker threads) --------------------------------------------- */

static void respond_text(const struct tc_mapper_io *io, void *st, int status, const char *msg) {
  io->respond(st, status, "text/plain; charset=utf-8", msg, strlen(msg));
}

static void respond_json(const struct tc_mapper_io *io, void *st, char *json /* freed */) {
  io->respond(st, 200, "application/json", json, strlen(json));
  free(json);
}

static void respond_reg(const struct tc_mapper_io *io, void *st, const struct tc_mapper_register_response *r) {
  respond_json(io, st, tc_mapper_encode_register_response(r));
}

/* The authorised answer for node_id from a fresh snapshot. */
static void respond_node_ok(struct tc_mapper *mp, const struct tc_mapper_io *io, void *st, int64_t node_id) {
  struct tc_snapshot *snap = tc_model_snapshot(mp->model);
  const struct tc_node *n = tc_snapshot_node(snap, node_id);
  struct tc_mapper_register_response r = {.machine_authorized = true};
  if (n) {
    if (n->tags.n) r.tagged = true;
    else r.user = tc_snapshot_user(snap, n->user_id);
    r.node_key_expired = tc_node_is_expired(n, tc_now());
    if (!r.user && !r.tagged) r.tagged = true; /* ownerless: present the placeholder */
  }
  respond_reg(io, st, &r);
  tc_snapshot_release(snap);
}

static void fill_reg(struct tc_register_req *q, const uint8_t mk[TC_KEY_LEN], const struct tc_register_request *r,
                     int64_t now) {
  memset(q, 0, sizeof *q);
  memcpy(q->machine_key, mk, TC_KEY_LEN);
  memcpy(q->node_key, r->node_key, TC_KEY_LEN);
  if (r->has_old_node_key) memcpy(q->old_node_key, r->old_node_key, TC_KEY_LEN);
  q->hostinfo_json = r->hostinfo_json;
  q->hostname = r->hi.hostname;
  q->ephemeral = r->ephemeral;
  q->expiry = r->has_expiry && r->expiry > now ? r->expiry : 0;
  q->authkey = r->auth_key;
  q->announced_routes = r->hostinfo_json ? &r->hi.routable_ips : NULL;
}

static void new_pending(struct tc_mapper *mp, const uint8_t mk[TC_KEY_LEN], const struct tc_register_request *r,
                        const struct tc_mapper_io *io, void *st) {
  struct tc_register_req q;
  fill_reg(&q, mk, r, tc_now());
  q.authkey = NULL;
  char *reg_id = NULL;
  struct tc_err err = {0};
  if (tc_model_pending_create(mp->model, &q, &reg_id, &err)) {
    respond_text(io, st, 500, "cannot start registration");
    return;
  }
  char *url = tc_xasprintf("%s/register/%s", mp->server_url, reg_id);
  struct tc_mapper_register_response resp = {.auth_url = url};
  respond_reg(io, st, &resp);
  free(url);
  free(reg_id);
}

/* The registration id inside a Followup URL we issued: the path segment
 * after "/register/", [a-z0-9] only. NULL if it is not one of ours. */
static char *followup_id(const char *url) {
  const char *p = strstr(url, "/register/");
  if (!p) return NULL;
  p += strlen("/register/");
  size_t n = 0;
  while ((p[n] >= 'a' && p[n] <= 'z') || (p[n] >= '0' && p[n] <= '9')) n++;
  if (n == 0 || n > 64 || (p[n] && p[n] != '?' && p[n] != '#' && p[n] != '/')) return NULL;
  return tc_xstrndup(p, n);
}

struct followup {
  struct tc_mapper *mp;
  const struct tc_mapper_io *io;
  void *st;
  uint8_t mk[TC_KEY_LEN];
  struct tc_register_request req;
  char *reg_id;
};

/* A Follow-up's response is begun (200) when the wait starts, so the
 * transport does not answer for us; this io finishes it with the body. */
static int dfr_respond(void *p, int status, const char *ct, const void *body, size_t len) {
  struct followup *f = p;
  int rc = len ? f->io->write(f->st, body, len) : 0;
  f->io->end(f->st);
  return rc;
}
static const struct tc_mapper_io deferred_io = {.respond = dfr_respond};

static void *followup_thread(void *arg) {
  struct followup *f = arg;
  struct tc_mapper *mp = f->mp;
  int64_t deadline = tc_mono_ms() + mp->followup_timeout_ms;
  for (;;) {
    if (f->io->cancelled(f->st)) {
      f->io->end(f->st); /* nobody is listening; just release the stream */
      break;
    }
    int64_t node_id = 0;
    struct tc_err err = {0};
    int rc = tc_model_pending_wait(mp->model, f->reg_id, 1000, &node_id, &err);
    if (rc == 0) {
      respond_node_ok(mp, &deferred_io, f, node_id);
      break;
    }
    if (rc == TC_EPERM) {
      struct tc_mapper_register_response r = {.error = "registration was rejected"};
      respond_reg(&deferred_io, f, &r);
      break;
    }
    if (rc != TC_EAGAIN || tc_mono_ms() >= deadline) {
      /* unknown, expired or timed out: a fresh URL (never the same one) */
      new_pending(mp, f->mk, &f->req, &deferred_io, f);
      break;
    }
  }
  tc_register_request_free(&f->req);
  free(f->reg_id);
  free(f);
  atomic_fetch_sub(&mp->followups, 1);
  return NULL;
}

static void start_followup(struct tc_mapper *mp, const uint8_t mk[TC_KEY_LEN], struct tc_register_request *r,
                           const struct tc_mapper_io *io, void *st) {
  char *id = followup_id(r->followup);
  struct tc_pending_info pi;
  bool ours = false;
  if (id && tc_model_pending_get(mp->model, id, &pi) == 0) {
    /* a registration id is only good for the machine that started it */
    ours = tc_ct_equal(pi.machine_key, mk, TC_KEY_LEN);
    free(pi.hostname);
  }
  if (!ours) {
    free(id);
    new_pending(mp, mk, r, io, st);
    return;
  }
  if (atomic_fetch_add(&mp->followups, 1) >= mp->max_followups) {
    atomic_fetch_sub(&mp->followups, 1);
    free(id);
    /* 429 + Retry-After: clients since capability version 137 wait and
     * retry (older ones back off by themselves) */
    if (io->retry_after) io->retry_after(st, FOLLOWUP_RETRY_S);
    respond_text(io, st, 429, "too many pending logins, retry later");
    return;
  }
  struct followup *f = tc_xcalloc(1, sizeof *f);
  f->mp = mp;
  f->io = io;
  f->st = st;
  memcpy(f->mk, mk, TC_KEY_LEN);
  f->req = *r; /* adopt */
  memset(r, 0, sizeof *r);
  f->reg_id = id;
  if (io->begin(st, 200, "application/json")) {
    io->end(st);
    tc_register_request_free(&f->req);
    free(f->reg_id);
    free(f);
    atomic_fetch_sub(&mp->followups, 1);
    return;
  }
  pthread_t t;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  if (pthread_create(&t, &attr, followup_thread, f)) {
    struct tc_mapper_register_response er = {.error = "server busy, try again"};
    respond_reg(&deferred_io, f, &er);
    *r = f->req;
    free(f->reg_id);
    free(f);
    atomic_fetch_sub(&mp->followups, 1);
  }
  pthread_attr_destroy(&attr);
}

static void handle_register(struct tc_mapper *mp, const uint8_t mk[TC_KEY_LEN], const void *body, size_t len,
                            const struct tc_mapper_io *io, void *st) {
  struct tc_register_request r;
  struct tc_err err = {0};
  if (tc_mapper_parse_register(body, len, &r, &err)) {
    char *m = tc_xasprintf("bad register request: %s", err.msg);
    respond_text(io, st, 400, m);
    free(m);
    return;
  }
  struct tc_snapshot *snap = NULL;
  if (r.version < TC_MAPPER_MIN_CAPVER) {
    char *m = tc_xasprintf("unsupported client version: %d", r.version);
    respond_text(io, st, 400, m);
    free(m);
    goto out;
  }
  if (!r.has_node_key) {
    respond_text(io, st, 400, "bad register request: NodeKey missing");
    goto out;
  }
  int64_t now = tc_now();
  snap = tc_model_snapshot(mp->model);
  /* The binding rule: a node key may only be used by the machine it belongs to. */
  struct tc_err e1 = {0}, e2 = {0};
  const struct tc_node *node = tc_snapshot_node_for_machine(snap, r.node_key, mk, &e1);
  if (!node && e1.code == TC_EPERM) {
    respond_text(io, st, 401, "node key belongs to another machine");
    goto out;
  }
  const struct tc_node *old = NULL;
  if (r.has_old_node_key) {
    old = tc_snapshot_node_for_machine(snap, r.old_node_key, mk, &e2);
    if (!old && e2.code == TC_EPERM) {
      respond_text(io, st, 401, "old node key belongs to another machine");
      goto out;
    }
  }
  if (tc_mapper_is_logout(&r, now)) {
    const struct tc_node *t = node ? node : old;
    if (t && tc_model_node_logout(mp->model, "node", t->id, &err)) {
      respond_text(io, st, 500, "logout failed");
      goto out;
    }
    struct tc_mapper_register_response resp = {.node_key_expired = true};
    respond_reg(io, st, &resp);
    goto out;
  }
  if (r.followup) {
    start_followup(mp, mk, &r, io, st);
    goto out;
  }
  if (node && !tc_node_is_expired(node, now)) {
    /* every tailscaled restart lands here; a shorter requested expiry is
     * honoured, a longer one is not (Headscale: no extending) */
    if (r.has_expiry && r.expiry > now && (node->expiry == 0 || r.expiry < node->expiry))
      tc_model_node_expire(mp->model, "node", node->id, r.expiry, &err);
    respond_node_ok(mp, io, st, node->id);
    goto out;
  }
  if (r.auth_key) {
    struct tc_register_req q;
    fill_reg(&q, mk, &r, now);
    int64_t id = 0;
    int rc = tc_model_register_authkey(mp->model, &q, &id, &err);
    if (rc == 0) {
      respond_node_ok(mp, io, st, id);
    } else if (rc == TC_EPERM || rc == TC_EEXPIRED || rc == TC_EINVAL || rc == TC_EEXIST) {
      struct tc_mapper_register_response resp = {.error = err.msg[0] ? err.msg : "invalid pre auth key"};
      respond_reg(io, st, &resp);
    } else if (rc == TC_ETOOBIG) {
      respond_text(io, st, 400, "bad register request: Hostinfo too large");
    } else {
      tc_warn("mapper: register with auth key failed: %s", err.msg);
      respond_text(io, st, 500, "registration failed");
    }
    goto out;
  }
  if (node) {
    /* expired and no key offered: the client rotates its key and comes back
     * with OldNodeKey (§6.4) */
    struct tc_mapper_register_response resp = {.node_key_expired = true};
    respond_reg(io, st, &resp);
    goto out;
  }
  new_pending(mp, mk, &r, io, st);
out:
  tc_snapshot_release(snap);
  tc_register_request_free(&r);
}

static void handle_map(struct tc_mapper *mp, const uint8_t mk[TC_KEY_LEN], const void *body, size_t len,
                       const struct tc_mapper_io *io, void *st) {
  struct tc_map_request r;
  struct tc_err err = {0};
  if (tc_mapper_parse_map(body, len, &r, &err)) {
    char *m = tc_xasprintf("bad map request: %s", err.msg);
    respond_text(io, st, 400, m);
    free(m);
    return;
  }
  struct tc_snapshot *snap = NULL;
  if (r.version < TC_MAPPER_MIN_CAPVER) {
    char *m = tc_xasprintf("unsupported client version: %d", r.version);
    respond_text(io, st, 400, m);
    free(m);
    goto out;
  }
  if (!r.has_node_key) {
    respond_text(io, st, 400, "bad map request: NodeKey missing");
    goto out;
  }
  snap = tc_model_snapshot(mp->model);
  const struct tc_node *node = tc_snapshot_node_for_machine(snap, r.node_key, mk, &err);
  if (!node) {
    if (err.code == TC_EPERM) respond_text(io, st, 401, "node key belongs to another machine");
    else respond_text(io, st, 404, "node not found");
    goto out;
  }
  int64_t node_id = node->id;
  tc_snapshot_release(snap);
  snap = NULL;

  /* Store what the request reports. The streaming request of capver >= 68
   * may carry stale endpoints/disco: only a lite update may clear them. */
  bool lite = r.omit_peers && !r.stream;
  struct tc_map_update u = {.hostinfo_json = r.hostinfo_json,
                            .hostname = r.hi.hostname,
                            .home_derp = r.hi.has_netinfo ? r.hi.preferred_derp : 0,
                            .cap_version = r.version,
                            .announced_routes = r.hostinfo_json ? &r.hi.routable_ips : NULL};
  if (r.has_endpoints && (lite || r.endpoints.n)) u.endpoints = &r.endpoints;
  /* Likewise routes: a withdrawal arrives as a lite update; a streaming
   * request without RoutableIPs must not un-announce a router's subnets. */
  if (!lite && r.stream && u.announced_routes && u.announced_routes->n == 0) u.announced_routes = NULL;
  if (r.has_disco_key) u.disco_key = r.disco_key;
  int rc = tc_model_node_update_from_map(mp->model, node_id, &u, NULL, &err);
  if (rc == TC_ETOOBIG || rc == TC_EINVAL) {
    char *m = tc_xasprintf("bad map request: %s", err.msg);
    respond_text(io, st, 400, m);
    free(m);
    goto out;
  }
  if (rc && rc != TC_ENOENT) tc_warn("mapper: node %lld update: %s", (long long)node_id, err.msg);
  if (rc == TC_ENOENT) {
    respond_text(io, st, 404, "node not found");
    goto out;
  }

  if (lite) {
    io->respond(st, 200, "application/json", "", 0);
    goto out;
  }
  if (!r.stream) {
    /* one-shot: built by the dispatcher, which owns the policy view. The
     * response is begun here (the transport answers 500 for a handler that
     * returns without starting one) and finished by the dispatcher. */
    if (io->begin(st, 200, "application/json")) {
      io->end(st);
      goto out;
    }
    struct session *os = tc_xcalloc(1, sizeof *os);
    os->mp = mp;
    os->io = io;
    os->st = st;
    os->node_id = node_id;
    os->oneshot = true;
    struct item *oit = tc_xcalloc(1, sizeof *oit);
    oit->kind = IT_OPEN;
    oit->s = os;
    enqueue(mp, oit);
    goto out;
  }

  if (io->begin(st, 200, "application/json")) {
    io->end(st);
    goto out;
  }
  struct session *s = tc_xcalloc(1, sizeof *s);
  s->mp = mp;
  s->io = io;
  s->st = st;
  s->node_id = node_id;
  if (tc_model_node_set_online(mp->model, node_id, true, &err) == 0) s->online_counted = true;
  /* cancel first: a stream already gone enqueues its close right here, and
   * the open queued after it is then skipped */
  io->on_cancel(st, on_cancel, s);
  struct item *it = tc_xcalloc(1, sizeof *it);
  it->kind = IT_OPEN;
  it->s = s;
  enqueue(mp, it);
out:
  tc_snapshot_release(snap);
  tc_map_request_free(&r);
}

void tc_mapper_serve(struct tc_mapper *mp, const uint8_t machine_key[TC_KEY_LEN], const char *method,
                     const char *path, const void *body, size_t len, const struct tc_mapper_io *io, void *st) {
  size_t pl = strcspn(path ? path : "", "?#");
  bool post = method && !strcmp(method, "POST");
#define IS(p) (pl == strlen(p) && !strncmp(path, p, pl))
  if (IS("/machine/register")) {
    if (!post) return respond_text(io, st, 405, "method not allowed");
    return handle_register(mp, machine_key, body, len, io, st);
  }
  if (IS("/machine/map")) {
    if (!post) return respond_text(io, st, 405, "method not allowed");
    return handle_map(mp, machine_key, body, len, io, st);
  }
#undef IS
  if (path && !strncmp(path, "/machine/", 9)) return respond_text(io, st, 501, "not implemented");
  respond_text(io, st, 404, "not found");
}
