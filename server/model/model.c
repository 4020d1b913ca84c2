/* model: the single writer. Every public write takes the writer lock, checks
 * its input against the current snapshot, runs one storage transaction (the
 * "plan": a list of store operations plus one audit entry, retried as a whole
 * on TC_EAGAIN), then publishes a snapshot built from the tables it replaced
 * and calls the subscribers in order. See model.h for the contract. */
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <arpa/inet.h>

#include "model/model_int.h"
#include "policy/policy.h"
#include "storage/store.h"

#define HOSTINFO_MAX (64 * 1024)
#define POLICY_MAX (4 * 1024 * 1024)
#define MAX_ENDPOINTS 64
#define MAX_ROUTES 1024
#define APIKEY_TOUCH_S 60
#define MAX_TAGS 64
#define PENDING_PER_MACHINE 4
#define PENDING_MAX 10000
#define MAX_PROFILE_FIELD 1024

struct sub {
  int64_t id;
  tc_change_fn fn;
  void *ctx;
};

struct online_count {
  int64_t id;
  int count;
};

enum { PEND_WAITING = 0, PEND_APPROVED = 1, PEND_REJECTED = 2, PEND_BUSY = 3 };

struct pending {
  char id[32];
  uint8_t machine_key[TC_KEY_LEN], node_key[TC_KEY_LEN], old_node_key[TC_KEY_LEN];
  char *hostinfo_json, *hostname;
  bool ephemeral;
  int64_t expiry;
  struct tc_strv routes;
  int64_t created_at;   /* Unix s */
  int64_t expires_mono; /* tc_mono_ms */
  int state;
  int64_t node_id;
  struct pending *next;
};

struct tc_model {
  struct tc_store *store;
  char *base_domain;
  enum tc_model_alloc allocation;
  int64_t node_expiry_ms, ephemeral_timeout_ms, pending_ttl_ms;
  tc_model_policy_validate_fn policy_validate;
  void *policy_ctx;
  struct tc_ippool pool4, pool6;
  struct tc_policy *pol; /* parsed current policy for autoApprovers; NULL = none (writer lock) */
  bool names_follow;

  pthread_mutex_t wmu; /* the writer lock: everything below up to smu */
  uint64_t seq;
  struct sub *subs;
  size_t n_subs;
  int64_t next_sub;
  struct online_count *oc;
  size_t n_oc;
  int64_t last_expiry_check;
  int64_t opened_at; /* Unix s */

  pthread_mutex_t smu; /* guards cur only; held for a pointer copy */
  struct tc_snapshot *cur;

  pthread_mutex_t pmu; /* pending registrations */
  pthread_cond_t pcv;
  struct pending *pend;
  bool closing;
  int waiters; /* threads inside tc_model_pending_wait; close waits for them */
};

static const struct tc_user zero_user;
static const struct tc_node zero_node;
static const struct tc_preauth_key zero_pre;
static const struct tc_api_key zero_api;

static const char *actor_or_system(const char *a) { return a && *a ? a : "system"; }

/* Copies at most max bytes of a NUL-terminated string (tc_xstrndup copies
 * exactly n bytes, so it must not be given a bound longer than the string). */
static char *dup_bounded(const char *s, size_t max) { return tc_xstrndup(s, strnlen(s, max)); }

/* ---- write context ------------------------------------------------------------ */
struct ev {
  enum tc_change_kind kind;
  int64_t user_id, node_id, key_id;
  unsigned fields;
  struct tc_node *old; /* boxed reference or NULL */
  char reg_id[32];
};

struct wr {
  struct tc_model *m;
  struct tc_snapshot *base; /* m->cur, stable while the writer lock is held */
  struct tc_utab *u;
  struct tc_ntab *n;
  struct tc_ktab *k;
  struct tc_policy_rec *p;
  bool p_set;
  struct tc_otab *o;
  struct ev *ev; /* grows; most writes emit one or two */
  size_t nev, cap_ev;
};

static void wr_init(struct wr *w, struct tc_model *m) {
  memset(w, 0, sizeof *w);
  w->m = m;
  w->base = m->cur;
}

static const struct tc_ntab *wr_nodes(struct wr *w) { return w->n ? w->n : w->base->priv->nodes; }
static const struct tc_ktab *wr_keys(struct wr *w) { return w->k ? w->k : w->base->priv->keys; }
static const struct tc_otab *wr_online(struct wr *w) { return w->o ? w->o : w->base->priv->online; }

static void wr_set_nodes(struct wr *w, struct tc_ntab *t) {
  tc_box_unref(w->n);
  w->n = t;
}
static void wr_set_keys(struct wr *w, struct tc_ktab *t) {
  tc_box_unref(w->k);
  w->k = t;
}
static void wr_set_online(struct wr *w, struct tc_otab *t) {
  tc_box_unref(w->o);
  w->o = t;
}

static struct ev *wr_event(struct wr *w, enum tc_change_kind kind) {
  if (w->nev == w->cap_ev) {
    w->cap_ev = w->cap_ev ? w->cap_ev * 2 : 4;
    w->ev = tc_xrealloc(w->ev, w->cap_ev * sizeof *w->ev);
  }
  struct ev *e = &w->ev[w->nev++];
  memset(e, 0, sizeof *e);
  e->kind = kind;
  return e;
}

static void wr_done(struct wr *w) {
  tc_box_unref(w->u);
  tc_box_unref(w->n);
  tc_box_unref(w->k);
  tc_box_unref(w->p);
  tc_box_unref(w->o);
  for (size_t i = 0; i < w->nev; i++) tc_box_unref(w->ev[i].old);
  free(w->ev);
  memset(w, 0, sizeof *w);
}

/* Publishes the new tables as the next snapshot and emits the events. */
static void wr_publish(struct wr *w) {
  struct tc_model *m = w->m;
  struct tc_snapshot_priv *b = w->base->priv;
  const struct tc_ntab *nodes = wr_nodes(w);
  const struct tc_otab *online = wr_online(w);
  struct tc_rtab *r;
  if (w->n || w->o) {
    r = tc_rtab_compute(nodes, online, b->primaries);
    if (!tc_rtab_equal(r, b->primaries)) {
      struct ev *e = wr_event(w, TC_CHANGE_NODE_ROUTES);
      e->fields = TC_NODE_F_PRIMARY;
    }
  } else {
    r = tc_box_ref(b->primaries);
  }
  struct tc_snapshot *s = tc_snapshot_new(
      ++m->seq, w->u ? w->u : b->users, (struct tc_ntab *)nodes, (struct tc_ktab *)wr_keys(w),
      w->p_set ? w->p : b->policy, (struct tc_otab *)online, r);
  tc_box_unref(r);
  pthread_mutex_lock(&m->smu);
  struct tc_snapshot *old = m->cur;
  m->cur = s;
  pthread_mutex_unlock(&m->smu);
  tc_snapshot_release(old);
  w->base = s;
  for (size_t i = 0; i < w->nev; i++) {
    struct ev *e = &w->ev[i];
    struct tc_change c = {
        .kind = e->kind, .seq = s->seq, .snap = s, .user_id = e->user_id,
        .node_id = e->node_id, .key_id = e->key_id, .fields = e->fields, .old_node = e->old,
        .reg_id = e->reg_id[0] ? e->reg_id : NULL,
    };
    for (size_t j = 0; j < m->n_subs; j++) m->subs[j].fn(m->subs[j].ctx, &c);
  }
  /* The snapshot holds its own references now; drop the builder's. */
  struct tc_snapshot *keep = w->base;
  wr_done(w);
  w->m = m;
  w->base = keep;
}

/* ---- storage plans ---------------------------------------------------------------- */
enum {
  OP_USER_INSERT = 1, OP_USER_UPDATE, OP_USER_DELETE,
  OP_NODE_INSERT, OP_NODE_UPDATE, OP_NODE_DELETE, OP_NODE_TOUCH,
  OP_PRE_INSERT, OP_PRE_EXPIRE, OP_PRE_CONSUME, OP_PRE_DELETE,
  OP_API_INSERT, OP_API_EXPIRE, OP_API_TOUCH, OP_API_DELETE,
  OP_POLICY_INSERT,
};

struct op {
  int kind;
  void *rec;
  int64_t id, at;
};

struct plan {
  struct op *ops;
  size_t n;
  unsigned flags;
  bool no_audit; /* telemetry (endpoints, online) is not audited */
  const char *actor, *action, *target_kind;
  int target_op; /* index of the op whose record id names the target, or -1 */
  int64_t target_id;
  char *detail; /* owned */
};

static void plan_init(struct plan *p, const char *actor, const char *action,
                      const char *target_kind, int64_t target_id) {
  memset(p, 0, sizeof *p);
  p->actor = actor_or_system(actor);
  p->action = action;
  p->target_kind = target_kind;
  p->target_id = target_id;
  p->target_op = -1;
}

static void plan_add(struct plan *p, int kind, void *rec, int64_t id, int64_t at) {
  p->ops = tc_xrealloc(p->ops, (p->n + 1) * sizeof *p->ops);
  p->ops[p->n++] = (struct op){kind, rec, id, at};
}

static void plan_free(struct plan *p) {
  free(p->ops);
  free(p->detail);
  p->ops = NULL;
  p->detail = NULL;
}

static int op_exec(struct tc_tx *tx, struct op *o, struct tc_err *err) {
  switch (o->kind) {
  case OP_USER_INSERT:
    ((struct tc_user *)o->rec)->id = 0;
    return tc_store_user_insert(tx, o->rec, err);
  case OP_USER_UPDATE: return tc_store_user_update(tx, o->rec, err);
  case OP_USER_DELETE: return tc_store_user_delete(tx, o->id, err);
  case OP_NODE_INSERT:
    ((struct tc_node *)o->rec)->id = 0;
    return tc_store_node_insert(tx, o->rec, err);
  case OP_NODE_UPDATE: return tc_store_node_update(tx, o->rec, err);
  case OP_NODE_DELETE: return tc_store_node_delete(tx, o->id, err);
  case OP_NODE_TOUCH: return tc_store_node_touch(tx, o->id, o->at, err);
  case OP_PRE_INSERT:
    ((struct tc_preauth_key *)o->rec)->id = 0;
    return tc_store_preauth_insert(tx, o->rec, err);
  case OP_PRE_EXPIRE: return tc_store_preauth_expire(tx, o->id, o->at, err);
  case OP_PRE_CONSUME: return tc_store_preauth_consume(tx, o->id, err);
  case OP_PRE_DELETE: return tc_store_preauth_delete(tx, o->id, err);
  case OP_API_INSERT:
    ((struct tc_api_key *)o->rec)->id = 0;
    return tc_store_apikey_insert(tx, o->rec, err);
  case OP_API_EXPIRE: return tc_store_apikey_expire(tx, o->id, o->at, err);
  case OP_API_TOUCH: return tc_store_apikey_touch(tx, o->id, o->at, err);
  case OP_API_DELETE: return tc_store_apikey_delete(tx, o->id, err);
  case OP_POLICY_INSERT:
    ((struct tc_policy_rec *)o->rec)->id = 0;
    return tc_store_policy_insert(tx, o->rec, err);
  }
  return tc_err_set(err, TC_EINTERNAL, "bad plan op %d", o->kind);
}

static int64_t op_rec_id(const struct op *o) { return *(const int64_t *)o->rec; }

static int plan_run(struct tc_model *m, struct plan *p, struct tc_err *err) {
  int rc = 0;
  for (int attempt = 0;; attempt++) {
    struct tc_tx *tx = NULL;
    rc = tc_store_begin(m->store, p->flags, &tx, err);
    if (rc == 0) {
      for (size_t i = 0; i < p->n && rc == 0; i++) rc = op_exec(tx, &p->ops[i], err);
      if (rc == 0 && !p->no_audit) {
        int64_t tid = p->target_op >= 0 ? op_rec_id(&p->ops[p->target_op]) : p->target_id;
        char target[64];
        snprintf(target, sizeof target, "%s:%lld", p->target_kind ? p->target_kind : "",
                 (long long)tid);
        struct tc_audit a = {.actor = (char *)p->actor, .action = (char *)p->action,
                             .target = target, .detail = p->detail};
        rc = tc_store_audit_insert(tx, &a, err);
      }
      if (rc == 0) rc = tc_tx_commit(tx, err);
      else tc_tx_rollback(tx);
    }
    if (rc != TC_EAGAIN || attempt >= 2) return rc;
  }
}

/* ---- autoApprovers -------------------------------------------------------------------------- */
/* Parses policy text for route auto-approval. A text the validation hook
 * accepted but this parser refuses only disables auto-approval. */
static struct tc_policy *parse_policy(const char *text, size_t len) {
  struct tc_policy *pol = NULL;
  struct tc_policy_err pe = {0};
  if (tc_policy_parse(text, len, &pol, &pe)) {
    tc_warn("model: policy not usable for autoApprovers (line %d: %s)", pe.line, pe.msg);
    return NULL;
  }
  return pol;
}

static int cmp_str(const void *a, const void *b);

/* Adds to n->approved_routes the announced routes that the policy's
 * autoApprovers approve for n (Headscale: approval is persisted and not
 * withdrawn by later policy changes). Returns true when something was added. */
static bool auto_approve(const struct tc_policy *pol, const struct tc_snapshot *s, struct tc_node *n) {
  if (!pol || !n->announced_routes.n) return false;
  struct tc_policy_user *users = tc_xcalloc(s->n_users + 1, sizeof *users);
  for (size_t i = 0; i < s->n_users; i++)
    users[i] = (struct tc_policy_user){s->users[i]->id, s->users[i]->name, s->users[i]->email};
  char ip4[INET6_ADDRSTRLEN] = "", ip6[INET6_ADDRSTRLEN] = "";
  if (n->has_ipv4) inet_ntop(AF_INET, n->ipv4, ip4, sizeof ip4);
  if (n->has_ipv6) inet_ntop(AF_INET6, n->ipv6, ip6, sizeof ip6);
  struct tc_policy_node pn = {
      .id = n->id ? n->id : INT64_MAX / 2, /* not inserted yet: any unused id will do */
      .hostname = n->given_name ? n->given_name : "",
      .user_id = n->user_id,
      .tags = (const char *const *)n->tags.v,
      .ntags = n->tags.n,
      .ipv4 = n->has_ipv4 ? ip4 : NULL,
      .ipv6 = n->has_ipv6 ? ip6 : NULL,
      .announced = (const char *const *)n->announced_routes.v,
      .nannounced = n->announced_routes.n,
      .approved = (const char *const *)n->approved_routes.v,
      .napproved = n->approved_routes.n,
  };
  struct tc_policy_topo topo = {.users = users, .nusers = s->n_users, .nodes = &pn, .nnodes = 1};
  json_t *ok = tc_policy_auto_approve(pol, &topo, &pn);
  bool changed = false;
  size_t i;
  json_t *v;
  json_array_foreach(ok, i, v) {
    char c[64];
    if (!json_is_string(v) || tc_prefix_canon(json_string_value(v), c, NULL)) continue;
    if (!tc_strv_contains(&n->announced_routes, c) || tc_strv_contains(&n->approved_routes, c)) continue;
    tc_strv_push(&n->approved_routes, c);
    changed = true;
  }
  json_decref(ok);
  free(users);
  if (changed) qsort(n->approved_routes.v, n->approved_routes.n, sizeof *n->approved_routes.v, cmp_str);
  return changed;
}

/* ---- open / close / snapshot ------------------------------------------------------------ */
static int cmp_id(const void *a, const void *b) {
  int64_t x = **(const int64_t *const *)a, y = **(const int64_t *const *)b;
  return x < y ? -1 : x > y;
}

int tc_model_open(const struct tc_model_config *cfg, struct tc_store *store,
                  struct tc_model **out, struct tc_err *err) {
  *out = NULL;
  if (sodium_init() < 0) return tc_err_set(err, TC_EINTERNAL, "libsodium failed to initialise");
  struct tc_model *m = tc_xcalloc(1, sizeof *m);
  struct tc_store_data d;
  memset(&d, 0, sizeof d);
  int rc;
  m->store = store;
  m->base_domain = tc_xstrdup(cfg->base_domain ? cfg->base_domain : "");
  m->allocation = cfg->allocation;
  m->node_expiry_ms = cfg->node_expiry_ms;
  m->ephemeral_timeout_ms = cfg->ephemeral_timeout_ms > 0 ? cfg->ephemeral_timeout_ms : 30 * 60 * 1000;
  m->pending_ttl_ms = cfg->pending_ttl_ms > 0 ? cfg->pending_ttl_ms : 15 * 60 * 1000;
  m->policy_validate = cfg->policy_validate;
  m->policy_ctx = cfg->policy_ctx;
  m->names_follow = cfg->given_name_follows_hostname;
  pthread_mutex_init(&m->wmu, NULL);
  pthread_mutex_init(&m->smu, NULL);
  pthread_mutex_init(&m->pmu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&m->pcv, &ca);
  pthread_condattr_destroy(&ca);

  if ((rc = tc_ippool_init(&m->pool4, 4, cfg->prefix_v4, err))) goto fail;
  if ((rc = tc_ippool_init(&m->pool6, 6, cfg->prefix_v6, err))) goto fail;
  if (!m->pool4.enabled && !m->pool6.enabled) {
    rc = tc_err_set(err, TC_EINVAL, "at least one of the IPv4 and IPv6 prefixes must be set");
    goto fail;
  }
  if ((rc = tc_store_load_all(store, &d, err))) goto fail;

  struct tc_user **uv = tc_xmalloc((d.n_users + 1) * sizeof *uv);
  for (size_t i = 0; i < d.n_users; i++) {
    uv[i] = tc_box_user(&zero_user);
    *uv[i] = d.users[i]; /* adopt the insides */
    memset(&d.users[i], 0, sizeof d.users[i]);
  }
  qsort(uv, d.n_users, sizeof *uv, cmp_id);
  struct tc_node **nv = tc_xmalloc((d.n_nodes + 1) * sizeof *nv);
  for (size_t i = 0; i < d.n_nodes; i++) {
    nv[i] = tc_box_node(&zero_node);
    *nv[i] = d.nodes[i];
    memset(&d.nodes[i], 0, sizeof d.nodes[i]);
    if (nv[i]->has_ipv4) tc_ippool_note_used(&m->pool4, nv[i]->ipv4);
    if (nv[i]->has_ipv6) tc_ippool_note_used(&m->pool6, nv[i]->ipv6);
  }
  qsort(nv, d.n_nodes, sizeof *nv, cmp_id);
  struct tc_preauth_key **pv = tc_xmalloc((d.n_preauth_keys + 1) * sizeof *pv);
  for (size_t i = 0; i < d.n_preauth_keys; i++) {
    pv[i] = tc_box_preauth(&zero_pre);
    *pv[i] = d.preauth_keys[i];
    memset(&d.preauth_keys[i], 0, sizeof d.preauth_keys[i]);
  }
  qsort(pv, d.n_preauth_keys, sizeof *pv, cmp_id);
  struct tc_api_key **av = tc_xmalloc((d.n_api_keys + 1) * sizeof *av);
  for (size_t i = 0; i < d.n_api_keys; i++) {
    av[i] = tc_box_apikey(&zero_api);
    *av[i] = d.api_keys[i];
    memset(&d.api_keys[i], 0, sizeof d.api_keys[i]);
  }
  qsort(av, d.n_api_keys, sizeof *av, cmp_id);
  struct tc_utab *ut = tc_utab_new(uv, d.n_users);
  struct tc_ntab *nt = tc_ntab_new(nv, d.n_nodes);
  struct tc_ktab *kt = tc_ktab_new(pv, d.n_preauth_keys, av, d.n_api_keys);
  struct tc_otab *ot = tc_otab_new(tc_xmalloc(sizeof(int64_t)), 0);
  struct tc_policy_rec *pol = d.has_policy ? tc_box_policy(&d.policy) : NULL;
  if (pol && pol->data) m->pol = parse_policy(pol->data, strlen(pol->data));
  struct tc_rtab *rt = tc_rtab_compute(nt, ot, NULL);
  m->seq = 1;
  m->cur = tc_snapshot_new(m->seq, ut, nt, kt, pol, ot, rt);
  tc_box_unref(ut);
  tc_box_unref(nt);
  tc_box_unref(kt);
  tc_box_unref(ot);
  tc_box_unref(pol);
  tc_box_unref(rt);
  tc_store_data_free(&d);
  m->last_expiry_check = tc_now();
  m->opened_at = m->last_expiry_check;
  *out = m;
  return 0;
fail:
  tc_store_data_free(&d);
  tc_model_close(m);
  return rc;
}

static void pending_free_one(struct pending *p) {
  free(p->hostinfo_json);
  free(p->hostname);
  tc_strv_free(&p->routes);
  free(p);
}

void tc_model_close(struct tc_model *m) {
  if (!m) return;
  pthread_mutex_lock(&m->pmu);
  m->closing = true;
  pthread_cond_broadcast(&m->pcv);
  while (m->waiters > 0) pthread_cond_wait(&m->pcv, &m->pmu);
  struct pending *p = m->pend;
  m->pend = NULL;
  pthread_mutex_unlock(&m->pmu);
  while (p) {
    struct pending *nx = p->next;
    pending_free_one(p);
    p = nx;
  }
  tc_snapshot_release(m->cur);
  tc_policy_free(m->pol);
  free(m->subs);
  free(m->oc);
  free(m->base_domain);
  pthread_mutex_destroy(&m->wmu);
  pthread_mutex_destroy(&m->smu);
  pthread_mutex_destroy(&m->pmu);
  pthread_cond_destroy(&m->pcv);
  free(m);
}

const char *tc_model_base_domain(const struct tc_model *m) { return m->base_domain; }

struct tc_snapshot *tc_model_snapshot(struct tc_model *m) {
  pthread_mutex_lock(&m->smu);
  struct tc_snapshot *s = tc_snapshot_ref(m->cur);
  pthread_mutex_unlock(&m->smu);
  return s;
}

/* ---- subscriptions ------------------------------------------------------------------------ */
const char *tc_change_kind_name(enum tc_change_kind k) {
  switch (k) {
  case TC_CHANGE_USER_ADDED: return "user.added";
  case TC_CHANGE_USER_CHANGED: return "user.changed";
  case TC_CHANGE_USER_REMOVED: return "user.removed";
  case TC_CHANGE_NODE_ADDED: return "node.added";
  case TC_CHANGE_NODE_CHANGED: return "node.changed";
  case TC_CHANGE_NODE_REMOVED: return "node.removed";
  case TC_CHANGE_NODE_ONLINE: return "node.online";
  case TC_CHANGE_NODE_OFFLINE: return "node.offline";
  case TC_CHANGE_NODE_ENDPOINTS: return "node.endpoints";
  case TC_CHANGE_NODE_KEY_ROTATED: return "node.key_rotated";
  case TC_CHANGE_NODE_EXPIRED: return "node.expired";
  case TC_CHANGE_NODE_ROUTES: return "node.routes";
  case TC_CHANGE_NODE_TAGS: return "node.tags";
  case TC_CHANGE_NODE_RENAMED: return "node.renamed";
  case TC_CHANGE_POLICY: return "policy.changed";
  case TC_CHANGE_PREAUTH_KEY: return "preauthkey.changed";
  case TC_CHANGE_API_KEY: return "apikey.changed";
  case TC_CHANGE_REGISTRATION: return "registration.done";
  }
  return "unknown";
}

int64_t tc_model_subscribe(struct tc_model *m, tc_change_fn fn, void *ctx) {
  pthread_mutex_lock(&m->wmu);
  m->subs = tc_xrealloc(m->subs, (m->n_subs + 1) * sizeof *m->subs);
  int64_t id = ++m->next_sub;
  m->subs[m->n_subs++] = (struct sub){id, fn, ctx};
  pthread_mutex_unlock(&m->wmu);
  return id;
}

void tc_model_unsubscribe(struct tc_model *m, int64_t sub_id) {
  pthread_mutex_lock(&m->wmu);
  for (size_t i = 0; i < m->n_subs; i++) {
    if (m->subs[i].id != sub_id) continue;
    memmove(&m->subs[i], &m->subs[i + 1], (m->n_subs - i - 1) * sizeof *m->subs);
    m->n_subs--;
    break;
  }
  pthread_mutex_unlock(&m->wmu);
}

/* ---- users ----------------------------------------------------------------------------------- */
static char *dup_opt(const char *s) { return s && *s ? tc_xstrdup(s) : NULL; }

static int check_profile(const char *display_name, const char *email, const char *pic,
                         struct tc_err *err) {
  const char *v[] = {display_name, email, pic};
  const char *what[] = {"display name", "email", "profile picture URL"};
  for (size_t i = 0; i < 3; i++) {
    if (!v[i]) continue;
    if (strnlen(v[i], MAX_PROFILE_FIELD + 1) > MAX_PROFILE_FIELD)
      return tc_err_set(err, TC_ETOOBIG, "%s longer than %d bytes", what[i], MAX_PROFILE_FIELD);
    for (const unsigned char *c = (const unsigned char *)v[i]; *c; c++)
      if (*c < 0x20 || *c == 0x7f) return tc_err_set(err, TC_EINVAL, "%s contains a control character", what[i]);
  }
  return 0;
}

int tc_model_user_create(struct tc_model *m, const char *actor, const char *name,
                         const char *display_name, const char *email, int64_t *id_out,
                         struct tc_err *err) {
  int rc = tc_model_validate_username(name, err);
  if (rc) return rc;
  if ((rc = check_profile(display_name, email, NULL, err))) return rc;
  struct wr w;
  struct plan p;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, actor, "user.create", "user", 0);
  if (tc_snapshot_user_by_name(w.base, name)) {
    rc = tc_err_set(err, TC_EEXIST, "user \"%s\" already exists", name);
    goto out;
  }
  struct tc_user *u = tc_box_user(&zero_user);
  u->name = tc_xstrdup(name);
  u->display_name = dup_opt(display_name);
  u->email = dup_opt(email);
  plan_add(&p, OP_USER_INSERT, u, 0, 0);
  p.target_op = 0;
  p.detail = tc_xasprintf("name=%s", name);
  if ((rc = plan_run(m, &p, err))) {
    tc_box_unref(u);
    goto out;
  }
  if (id_out) *id_out = u->id;
  w.u = tc_utab_edit(w.base->priv->users, u, 0);
  wr_event(&w, TC_CHANGE_USER_ADDED)->user_id = u->id;
  wr_publish(&w);
out:
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

/* Common tail of user updates: u is a boxed modified copy (stolen). */
static int user_commit(struct wr *w, struct plan *p, struct tc_user *u, struct tc_err *err) {
  plan_add(p, OP_USER_UPDATE, u, 0, 0);
  int rc = plan_run(w->m, p, err);
  if (rc) {
    tc_box_unref(u);
    return rc;
  }
  w->u = tc_utab_edit(w->base->priv->users, u, 0);
  wr_event(w, TC_CHANGE_USER_CHANGED)->user_id = u->id;
  wr_publish(w);
  return 0;
}

int tc_model_user_rename(struct tc_model *m, const char *actor, int64_t id, const char *new_name,
                         struct tc_err *err) {
  int rc = tc_model_validate_username(new_name, err);
  if (rc) return rc;
  struct wr w;
  struct plan p;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, actor, "user.rename", "user", id);
  const struct tc_user *old = tc_snapshot_user(w.base, id);
  const struct tc_user *other = tc_snapshot_user_by_name(w.base, new_name);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)id);
  } else if (other && other->id != id) {
    rc = tc_err_set(err, TC_EEXIST, "user \"%s\" already exists", new_name);
  } else {
    struct tc_user *u = tc_box_user(old);
    p.detail = tc_xasprintf("from=%s to=%s", old->name, new_name);
    free(u->name);
    u->name = tc_xstrdup(new_name);
    rc = user_commit(&w, &p, u, err);
  }
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

int tc_model_user_update(struct tc_model *m, const char *actor, int64_t id,
                         const char *display_name, const char *email,
                         const char *profile_pic_url, struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc = check_profile(display_name, email, profile_pic_url, err);
  if (rc) return rc;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, actor, "user.update", "user", id);
  const struct tc_user *old = tc_snapshot_user(w.base, id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)id);
  } else {
    struct tc_user *u = tc_box_user(old);
    if (display_name) {
      free(u->display_name);
      u->display_name = dup_opt(display_name);
    }
    if (email) {
      free(u->email);
      u->email = dup_opt(email);
    }
    if (profile_pic_url) {
      free(u->profile_pic_url);
      u->profile_pic_url = dup_opt(profile_pic_url);
    }
    rc = user_commit(&w, &p, u, err);
  }
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

int tc_model_user_destroy(struct tc_model *m, const char *actor, int64_t id, struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, actor, "user.destroy", "user", id);
  const struct tc_user *old = tc_snapshot_user(w.base, id);
  size_t owned = old ? tc_snapshot_user_node_count(w.base, id) : 0;
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)id);
    goto out;
  }
  if (owned) {
    rc = tc_err_set(err, TC_ECONFLICT,
                    "user \"%s\" still owns %zu node%s; delete or move them first", old->name,
                    owned, owned == 1 ? "" : "s");
    goto out;
  }
  p.detail = tc_xasprintf("name=%s", old->name);
  const struct tc_ktab *kt = wr_keys(&w);
  for (size_t i = 0; i < kt->n_pre; i++)
    if (kt->pre[i]->user_id == id) plan_add(&p, OP_PRE_DELETE, NULL, kt->pre[i]->id, 0);
  size_t n_keys = p.n;
  plan_add(&p, OP_USER_DELETE, NULL, id, 0);
  if ((rc = plan_run(m, &p, err))) goto out;
  for (size_t i = 0; i < n_keys; i++) {
    wr_set_keys(&w, tc_ktab_edit_pre(wr_keys(&w), NULL, p.ops[i].id));
    /* Nodes that registered with a deleted key forget it (storage did too). */
  }
  if (n_keys) {
    const struct tc_ntab *nt = wr_nodes(&w);
    struct tc_node **nv = tc_xmalloc((nt->n + 1) * sizeof *nv);
    bool any = false;
    for (size_t i = 0; i < nt->n; i++) {
      bool hit = false;
      for (size_t j = 0; j < n_keys && nt->v[i]->auth_key_id; j++)
        if (nt->v[i]->auth_key_id == p.ops[j].id) hit = true;
      if (hit) {
        nv[i] = tc_box_node(nt->v[i]);
        nv[i]->auth_key_id = 0;
        any = true;
      } else {
        nv[i] = tc_box_ref(nt->v[i]);
      }
    }
    if (any) wr_set_nodes(&w, tc_ntab_new(nv, nt->n));
    else {
      for (size_t i = 0; i < nt->n; i++) tc_box_unref(nv[i]);
      free(nv);
    }
    wr_event(&w, TC_CHANGE_PREAUTH_KEY)->user_id = id;
  }
  w.u = tc_utab_edit(w.base->priv->users, NULL, id);
  wr_event(&w, TC_CHANGE_USER_REMOVED)->user_id = id;
  wr_publish(&w);
out:
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

/* ---- pre-auth keys ------------------------------------------------------------------------- */
static int check_tags(const struct tc_strv *tags, struct tc_err *err) {
  if (tags && tags->n > MAX_TAGS) return tc_err_set(err, TC_ETOOBIG, "too many tags (max %d)", MAX_TAGS);
  for (size_t i = 0; tags && i < tags->n; i++) {
    int rc = tc_model_validate_tag(tags->v[i], err);
    if (rc) return rc;
  }
  return 0;
}

static void strv_dedup_copy(struct tc_strv *dst, const struct tc_strv *src) {
  dst->v = NULL;
  dst->n = 0;
  for (size_t i = 0; src && i < src->n; i++)
    if (!tc_strv_contains(dst, src->v[i])) tc_strv_push(dst, src->v[i]);
}

int tc_model_preauth_create(struct tc_model *m, const char *actor,
                            const struct tc_preauth_opts *opts, int64_t *id_out,
                            char **secret_out, struct tc_err *err) {
  *secret_out = NULL;
  int rc = check_tags(opts->tags, err);
  if (rc) return rc;
  int64_t now = tc_now();
  if (opts->expiration != 0 && opts->expiration <= now)
    return tc_err_set(err, TC_EINVAL, "expiration must be in the future");
  if (opts->user_id == 0 && (!opts->tags || !opts->tags->n))
    return tc_err_set(err, TC_EINVAL, "a pre-auth key needs a user or at least one tag");
  struct wr w;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  const struct tc_user *u = opts->user_id ? tc_snapshot_user(w.base, opts->user_id) : NULL;
  if (opts->user_id && !u) {
    rc = tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)opts->user_id);
    goto out;
  }
  for (int attempt = 0;; attempt++) {
    struct tc_preauth_key *k = tc_box_preauth(&zero_pre);
    char prefix[13];
    char *tok = tc_token_new("hskey-auth-", prefix, k->hash);
    k->prefix = tc_xstrdup(prefix);
    k->user_id = opts->user_id;
    k->reusable = opts->reusable;
    k->ephemeral = opts->ephemeral;
    k->expiration = opts->expiration;
    strv_dedup_copy(&k->tags, opts->tags);
    struct plan p;
    plan_init(&p, actor, "preauthkey.create", "preauthkey", 0);
    plan_add(&p, OP_PRE_INSERT, k, 0, 0);
    p.target_op = 0;
    p.detail = tc_xasprintf("prefix=%s user=%lld reusable=%d ephemeral=%d", prefix,
                            (long long)opts->user_id, opts->reusable, opts->ephemeral);
    rc = plan_run(m, &p, err);
    plan_free(&p);
    if (rc) {
      tc_box_unref(k);
      tc_free_secret(tok, strlen(tok));
      if (rc == TC_EEXIST && attempt < 3) continue; /* prefix collision: draw again */
      goto out;
    }
    if (id_out) *id_out = k->id;
    *secret_out = tok;
    wr_set_keys(&w, tc_ktab_edit_pre(wr_keys(&w), k, 0));
    struct ev *e = wr_event(&w, TC_CHANGE_PREAUTH_KEY);
    e->key_id = k->id;
    e->user_id = k->user_id;
    wr_publish(&w);
    break;
  }
out:
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

static int preauth_simple(struct tc_model *m, const char *actor, int64_t id, bool del,
                          struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, actor, del ? "preauthkey.delete" : "preauthkey.expire", "preauthkey", id);
  const struct tc_preauth_key *old = tc_snapshot_preauth_key(w.base, id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "pre-auth key %lld not found", (long long)id);
    goto out;
  }
  int64_t now = tc_now();
  plan_add(&p, del ? OP_PRE_DELETE : OP_PRE_EXPIRE, NULL, id, now);
  p.flags = TC_TX_DURABLE; /* revokes access */
  if ((rc = plan_run(m, &p, err))) goto out;
  if (del) {
    wr_set_keys(&w, tc_ktab_edit_pre(wr_keys(&w), NULL, id));
    const struct tc_ntab *nt = wr_nodes(&w);
    for (size_t i = 0; i < nt->n; i++) {
      if (nt->v[i]->auth_key_id != id) continue;
      struct tc_node *n = tc_box_node(nt->v[i]);
      n->auth_key_id = 0;
      wr_set_nodes(&w, tc_ntab_edit(nt, n, 0));
      nt = wr_nodes(&w);
    }
  } else {
    struct tc_preauth_key *k = tc_box_preauth(old);
    k->expiration = now;
    wr_set_keys(&w, tc_ktab_edit_pre(wr_keys(&w), k, 0));
  }
  struct ev *e = wr_event(&w, TC_CHANGE_PREAUTH_KEY);
  e->key_id = id;
  e->user_id = old->user_id;
  wr_publish(&w);
out:
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

int tc_model_preauth_expire(struct tc_model *m, const char *actor, int64_t id,
                            struct tc_err *err) {
  return preauth_simple(m, actor, id, false, err);
}

int tc_model_preauth_delete(struct tc_model *m, const char *actor, int64_t id,
                            struct tc_err *err) {
  return preauth_simple(m, actor, id, true, err);
}

/* Finds and checks the key a token names in snapshot s. */
static int preauth_lookup(const struct tc_snapshot *s, const char *token,
                          const struct tc_preauth_key **out, struct tc_err *err) {
  char prefix[13];
  uint8_t hash[32];
  *out = NULL;
  size_t len = token ? strnlen(token, 256) : 0;
  int rc = tc_token_parse(token, len, "hskey-auth-", prefix, hash);
  const struct tc_preauth_key *k = NULL;
  if (rc == 0)
    for (size_t i = 0; i < s->n_preauth_keys && !k; i++)
      if (!strcmp(s->preauth_keys[i]->prefix, prefix)) k = s->preauth_keys[i];
  bool ok = k && tc_ct_equal(k->hash, hash, sizeof hash);
  tc_wipe(hash, sizeof hash);
  if (!ok) return tc_err_set(err, TC_EPERM, "invalid pre auth key");
  if (k->expiration && k->expiration <= tc_now())
    return tc_err_set(err, TC_EEXPIRED, "pre auth key expired");
  if (!k->reusable && k->used) return tc_err_set(err, TC_EPERM, "invalid pre auth key");
  *out = k;
  return 0;
}

int tc_model_preauth_check(struct tc_model *m, const char *token, int64_t *id_out,
                           struct tc_err *err) {
  struct tc_snapshot *s = tc_model_snapshot(m);
  const struct tc_preauth_key *k;
  int rc = preauth_lookup(s, token, &k, err);
  if (rc == 0 && id_out) *id_out = k->id;
  tc_snapshot_release(s);
  return rc;
}

/* ---- API keys --------------------------------------------------------------------------- */
int tc_model_apikey_create(struct tc_model *m, const char *actor, int64_t expiration,
                           int64_t *id_out, char **token_out, struct tc_err *err) {
  *token_out = NULL;
  if (expiration != 0 && expiration <= tc_now())
    return tc_err_set(err, TC_EINVAL, "expiration must be in the future");
  struct wr w;
  int rc;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  for (int attempt = 0;; attempt++) {
    struct tc_api_key *k = tc_box_apikey(&zero_api);
    char prefix[13];
    char *tok = tc_token_new("hskey-api-", prefix, k->hash);
    k->prefix = tc_xstrdup(prefix);
    k->expiration = expiration;
    struct plan p;
    plan_init(&p, actor, "apikey.create", "apikey", 0);
    plan_add(&p, OP_API_INSERT, k, 0, 0);
    p.target_op = 0;
    p.detail = tc_xasprintf("prefix=%s", prefix);
    rc = plan_run(m, &p, err);
    plan_free(&p);
    if (rc) {
      tc_box_unref(k);
      tc_free_secret(tok, strlen(tok));
      if (rc == TC_EEXIST && attempt < 3) continue;
      break;
    }
    if (id_out) *id_out = k->id;
    *token_out = tok;
    wr_set_keys(&w, tc_ktab_edit_api(wr_keys(&w), k, 0));
    wr_event(&w, TC_CHANGE_API_KEY)->key_id = k->id;
    wr_publish(&w);
    break;
  }
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

static int apikey_simple(struct tc_model *m, const char *actor, int64_t id, bool del,
                         struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, actor, del ? "apikey.delete" : "apikey.expire", "apikey", id);
  const struct tc_api_key *old = tc_snapshot_api_key(w.base, id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "API key %lld not found", (long long)id);
    goto out;
  }
  int64_t now = tc_now();
  plan_add(&p, del ? OP_API_DELETE : OP_API_EXPIRE, NULL, id, now);
  p.flags = TC_TX_DURABLE;
  if ((rc = plan_run(m, &p, err))) goto out;
  if (del) {
    wr_set_keys(&w, tc_ktab_edit_api(wr_keys(&w), NULL, id));
  } else {
    struct tc_api_key *k = tc_box_apikey(old);
    k->expiration = now;
    wr_set_keys(&w, tc_ktab_edit_api(wr_keys(&w), k, 0));
  }
  wr_event(&w, TC_CHANGE_API_KEY)->key_id = id;
  wr_publish(&w);
out:
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

int tc_model_apikey_expire(struct tc_model *m, const char *actor, int64_t id,
                           struct tc_err *err) {
  return apikey_simple(m, actor, id, false, err);
}

int tc_model_apikey_delete(struct tc_model *m, const char *actor, int64_t id,
                           struct tc_err *err) {
  return apikey_simple(m, actor, id, true, err);
}

int tc_model_apikey_verify(struct tc_model *m, const char *token, size_t len, int64_t *id_out,
                           char **prefix_out, struct tc_err *err) {
  char prefix[13];
  uint8_t hash[32];
  if (prefix_out) *prefix_out = NULL;
  if (tc_token_parse(token, len, "hskey-api-", prefix, hash))
    return tc_err_set(err, TC_EPERM, "invalid API key");
  struct tc_snapshot *s = tc_model_snapshot(m);
  const struct tc_api_key *k = NULL;
  for (size_t i = 0; i < s->n_api_keys && !k; i++)
    if (!strcmp(s->api_keys[i]->prefix, prefix)) k = s->api_keys[i];
  bool ok = k && tc_ct_equal(k->hash, hash, sizeof hash);
  tc_wipe(hash, sizeof hash);
  int rc = 0;
  int64_t now = tc_now();
  if (!ok) rc = tc_err_set(err, TC_EPERM, "invalid API key");
  else if (k->expiration && k->expiration <= now) rc = tc_err_set(err, TC_EEXPIRED, "API key expired");
  int64_t id = ok ? k->id : 0;
  bool touch = rc == 0 && now - k->last_seen >= APIKEY_TOUCH_S;
  tc_snapshot_release(s);
  if (rc) return rc;
  if (id_out) *id_out = id;
  if (prefix_out) *prefix_out = tc_xstrdup(prefix);
  if (!touch) return 0;
  /* Persist last_seen at most once a minute per key; a failure here must not
   * fail the request that presented a valid key. */
  struct wr w;
  struct plan p;
  struct tc_err e2;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, "system", "apikey.touch", "apikey", id);
  p.no_audit = true;
  const struct tc_api_key *cur = tc_snapshot_api_key(w.base, id);
  if (cur && now - cur->last_seen >= APIKEY_TOUCH_S) {
    plan_add(&p, OP_API_TOUCH, NULL, id, now);
    if (plan_run(m, &p, &e2) == 0) {
      struct tc_api_key *nk = tc_box_apikey(cur);
      nk->last_seen = now;
      wr_set_keys(&w, tc_ktab_edit_api(wr_keys(&w), nk, 0));
      wr_publish(&w);
    } else {
      tc_warn("model: could not record API key use: %s", e2.msg);
    }
  }
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return 0;
}

/* ---- node helpers ---------------------------------------------------------------------------- */
static bool key_is_zero(const uint8_t *k) {
  uint8_t acc = 0;
  for (size_t i = 0; i < TC_KEY_LEN; i++) acc |= k[i];
  return acc == 0;
}

static bool ip_in_use(void *ctx, const uint8_t *addr, size_t len) {
  return tc_snapshot_node_by_ip(ctx, addr, len) != NULL;
}

static bool name_taken(void *ctx, const char *name) {
  return tc_snapshot_node_by_given_name(ctx, name) != NULL;
}

struct name_ctx {
  const struct tc_snapshot *s;
  int64_t self;
};
static bool name_taken_by_other(void *ctx, const char *name) {
  const struct name_ctx *c = ctx;
  const struct tc_node *o = tc_snapshot_node_by_given_name(c->s, name);
  return o && o->id != c->self;
}

/* True when given is what naming would derive from hostname: the sanitised
 * hostname, possibly with a "-<n>" collision suffix. */
static bool is_auto_derived_name(const char *given, const char *hostname) {
  if (!given) return true;
  char *base = tc_model_sanitize_hostname(hostname);
  size_t bl = strlen(base);
  bool derived = !strcmp(given, base);
  if (!derived && !strncmp(given, base, bl) && given[bl] == '-' && given[bl + 1]) {
    derived = true;
    for (const char *c = given + bl + 1; *c; c++)
      if (*c < '0' || *c > '9') derived = false;
  }
  free(base);
  return derived;
}

static bool strv_equal(const struct tc_strv *a, const struct tc_strv *b) {
  if (a->n != b->n) return false;
  for (size_t i = 0; i < a->n; i++)
    if (strcmp(a->v[i], b->v[i])) return false;
  return true;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Canonical, de-duplicated, sorted routes. Invalid ones fail (admin input)
 * or are dropped (client input, strict=false). */
static int canon_routes(const struct tc_strv *in, bool strict, struct tc_strv *out,
                        struct tc_err *err) {
  out->v = NULL;
  out->n = 0;
  for (size_t i = 0; in && i < in->n; i++) {
    char c[64];
    if (tc_prefix_canon(in->v[i], c, err)) {
      if (strict) {
        tc_strv_free(out);
        return TC_EINVAL;
      }
      continue;
    }
    if (out->n >= MAX_ROUTES) {
      if (strict) {
        tc_strv_free(out);
        return tc_err_set(err, TC_ETOOBIG, "too many routes (max %d)", MAX_ROUTES);
      }
      break;
    }
    if (!tc_strv_contains(out, c)) tc_strv_push(out, c);
  }
  if (out->n) qsort(out->v, out->n, sizeof *out->v, cmp_str);
  return 0;
}

/* Endpoints from a client: bounded, without zoned or link-local IPv6 ones
 * (peers cannot use them). */
static void filter_endpoints(const struct tc_strv *in, struct tc_strv *out) {
  out->v = NULL;
  out->n = 0;
  for (size_t i = 0; i < in->n && out->n < MAX_ENDPOINTS; i++) {
    const char *e = in->v[i];
    if (!e || !*e || strlen(e) > 64 || strchr(e, '%')) continue;
    if (!strncasecmp(e, "[fe80:", 6)) continue;
    tc_strv_push(out, e);
  }
}

static int64_t default_expiry(const struct tc_model *m, int64_t requested, bool tagged) {
  int64_t now = tc_now();
  if (requested > now) return requested;
  if (tagged || m->node_expiry_ms <= 0) return 0;
  return now + m->node_expiry_ms / 1000;
}

/* Owner and key facts applied by a registration. */
struct reg_auth {
  int64_t user_id;
  const struct tc_strv *tags;
  bool ephemeral;
  int64_t auth_key_id;
  const struct tc_preauth_key *key; /* consumed in the transaction when set */
  enum tc_register_method method;
  const char *reg_id;
};

/* Registers under the writer lock; publishes on success. */
static int do_register(struct tc_model *m, const char *actor, const struct tc_register_req *req,
                       const struct reg_auth *ra, int64_t *node_id_out, struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc = 0;
  wr_init(&w, m);
  plan_init(&p, actor, "node.register", "node", 0);
  struct tc_node *n = NULL;
  if (key_is_zero(req->machine_key) || key_is_zero(req->node_key)) {
    rc = tc_err_set(err, TC_EINVAL, "machine key and node key are required");
    goto out;
  }
  if (req->hostinfo_json && strnlen(req->hostinfo_json, HOSTINFO_MAX + 1) > HOSTINFO_MAX) {
    rc = tc_err_set(err, TC_ETOOBIG, "hostinfo larger than %d bytes", HOSTINFO_MAX);
    goto out;
  }
  const struct tc_node *old = NULL;
  if (!key_is_zero(req->old_node_key)) {
    old = tc_snapshot_node_by_node_key(w.base, req->old_node_key);
    if (old && !tc_ct_equal(old->machine_key, req->machine_key, TC_KEY_LEN)) {
      rc = tc_err_set(err, TC_EPERM, "old node key belongs to a different machine key");
      goto out;
    }
  }
  const struct tc_node *nk_owner = tc_snapshot_node_by_node_key(w.base, req->node_key);
  if (nk_owner && !tc_ct_equal(nk_owner->machine_key, req->machine_key, TC_KEY_LEN)) {
    rc = tc_err_set(err, TC_EPERM, "node key is registered to a different machine key");
    goto out;
  }
  const struct tc_node *existing =
      old ? old : nk_owner ? nk_owner : tc_snapshot_node_by_machine_key(w.base, req->machine_key);
  if (ra->user_id && !tc_snapshot_user(w.base, ra->user_id)) {
    rc = tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)ra->user_id);
    goto out;
  }
  unsigned fields = 0;
  bool tagged = ra->tags && ra->tags->n;
  if (existing) {
    n = tc_box_node(existing);
    if (memcmp(n->node_key, req->node_key, TC_KEY_LEN)) fields |= TC_NODE_F_KEY;
  } else {
    n = tc_box_node(&zero_node);
    memcpy(n->machine_key, req->machine_key, TC_KEY_LEN);
    uint8_t a[16];
    if (m->pool4.enabled) {
      if ((rc = tc_ippool_next(&m->pool4, m->allocation, ip_in_use, w.base, a, err))) goto out;
      memcpy(n->ipv4, a, 4);
      n->has_ipv4 = true;
    }
    if (m->pool6.enabled) {
      if ((rc = tc_ippool_next(&m->pool6, m->allocation, ip_in_use, w.base, a, err))) goto out;
      memcpy(n->ipv6, a, 16);
      n->has_ipv6 = true;
    }
    n->given_name = tc_model_unique_name(req->hostname, name_taken, w.base);
  }
  memcpy(n->node_key, req->node_key, TC_KEY_LEN);
  if (req->hostinfo_json) {
    free(n->hostinfo_json);
    n->hostinfo_json = tc_xstrdup(req->hostinfo_json);
  }
  if (req->hostname && *req->hostname) {
    bool follow = m->names_follow && existing && n->hostname && strncmp(n->hostname, req->hostname, 255) &&
                  is_auto_derived_name(n->given_name, n->hostname);
    free(n->hostname);
    n->hostname = dup_bounded(req->hostname, 255);
    if (follow) { /* as for map updates: derived names follow the hostname */
      struct name_ctx nc = {w.base, n->id};
      free(n->given_name);
      n->given_name = tc_model_unique_name(n->hostname, name_taken_by_other, &nc);
      fields |= TC_NODE_F_NAME;
    }
  }
  if (!n->hostname) n->hostname = tc_xstrdup(n->given_name ? n->given_name : "node");
  if (req->announced_routes) {
    tc_strv_free(&n->announced_routes);
    canon_routes(req->announced_routes, false, &n->announced_routes, NULL);
  }
  if (n->user_id != ra->user_id) fields |= TC_NODE_F_USER;
  n->user_id = ra->user_id;
  struct tc_strv tags;
  strv_dedup_copy(&tags, ra->tags);
  if (!strv_equal(&tags, &n->tags)) fields |= TC_NODE_F_TAGS;
  tc_strv_free(&n->tags);
  n->tags = tags;
  n->ephemeral = ra->ephemeral || req->ephemeral;
  n->auth_key_id = ra->auth_key_id;
  if (auto_approve(m->pol, w.base, n)) fields |= TC_NODE_F_ROUTES;
  n->register_method = ra->method;
  int64_t exp = default_expiry(m, req->expiry, tagged);
  if (exp != n->expiry) fields |= TC_NODE_F_EXPIRY;
  n->expiry = exp;
  fields |= TC_NODE_F_HOSTINFO;

  p.flags = TC_TX_DURABLE;
  if (ra->key) plan_add(&p, OP_PRE_CONSUME, NULL, ra->key->id, 0);
  plan_add(&p, existing ? OP_NODE_UPDATE : OP_NODE_INSERT, n, 0, 0);
  p.target_op = (int)p.n - 1;
  p.detail = tc_xasprintf("given_name=%s method=%s%s", n->given_name,
                          tc_register_method_name(ra->method), existing ? " reregister" : "");
  rc = plan_run(m, &p, err);
  if (rc == TC_ECONFLICT && ra->key) rc = tc_err_set(err, TC_EPERM, "invalid pre auth key");
  if (rc) goto out;

  int64_t id = n->id;
  if (node_id_out) *node_id_out = id;
  struct ev *e;
  if (!existing) {
    e = wr_event(&w, TC_CHANGE_NODE_ADDED);
  } else {
    e = wr_event(&w, (fields & TC_NODE_F_KEY) ? TC_CHANGE_NODE_KEY_ROTATED : TC_CHANGE_NODE_CHANGED);
    e->old = tc_box_ref(existing);
  }
  e->node_id = id;
  e->user_id = n->user_id;
  e->fields = fields;
  wr_set_nodes(&w, tc_ntab_edit(wr_nodes(&w), n, 0));
  n = NULL;
  if (ra->key) {
    struct tc_preauth_key *k = tc_box_preauth(ra->key);
    k->used = true;
    wr_set_keys(&w, tc_ktab_edit_pre(wr_keys(&w), k, 0));
    struct ev *ke = wr_event(&w, TC_CHANGE_PREAUTH_KEY);
    ke->key_id = k->id;
    ke->user_id = k->user_id;
  }
  if (ra->reg_id) {
    struct ev *re = wr_event(&w, TC_CHANGE_REGISTRATION);
    re->node_id = id;
    re->user_id = ra->user_id;
    snprintf(re->reg_id, sizeof re->reg_id, "%s", ra->reg_id);
  }
  wr_publish(&w);
out:
  tc_box_unref(n);
  plan_free(&p);
  wr_done(&w);
  return rc;
}

int tc_model_register_authkey(struct tc_model *m, const struct tc_register_req *req,
                              int64_t *node_id_out, struct tc_err *err) {
  pthread_mutex_lock(&m->wmu);
  const struct tc_preauth_key *k;
  int rc = preauth_lookup(m->cur, req->authkey, &k, err);
  if (rc == 0) {
    struct reg_auth ra = {
        .user_id = k->user_id, .tags = &k->tags, .ephemeral = k->ephemeral,
        .auth_key_id = k->id, .key = k, .method = TC_REG_AUTHKEY,
    };
    char actor[40];
    snprintf(actor, sizeof actor, "preauthkey:%s", k->prefix);
    /* k lives in m->cur, which do_register replaces only after it is done with k. */
    struct tc_preauth_key *kref = tc_box_ref(k);
    rc = do_register(m, actor, req, &ra, node_id_out, err);
    tc_box_unref(kref);
  }
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

/* Single-node edit: looks up node_id, lets `apply` modify a boxed copy, runs
 * the plan and publishes one event. */
typedef int (*node_apply_fn)(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                             struct tc_err *err);

static int node_edit(struct tc_model *m, const char *actor, const char *action, int64_t node_id,
                     enum tc_change_kind kind, unsigned flags, bool audit, node_apply_fn apply,
                     void *arg, unsigned *fields_out, struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  unsigned fields = 0;
  struct tc_node *n = NULL;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, actor, action, "node", node_id);
  p.flags = flags;
  p.no_audit = !audit;
  const struct tc_node *old = tc_snapshot_node(w.base, node_id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "node %lld not found", (long long)node_id);
    goto out;
  }
  n = tc_box_node(old);
  if ((rc = apply(&w, n, arg, &fields, err))) goto out;
  if (fields_out) *fields_out = fields;
  if (!fields) goto out; /* nothing changed: no write, no event */
  plan_add(&p, OP_NODE_UPDATE, n, 0, 0);
  if ((rc = plan_run(m, &p, err))) goto out;
  if (kind == TC_CHANGE_NODE_ENDPOINTS && (fields & TC_NODE_F_ROUTES)) kind = TC_CHANGE_NODE_ROUTES;
  struct ev *e = wr_event(&w, kind);
  e->node_id = node_id;
  e->user_id = n->user_id;
  e->fields = fields;
  e->old = tc_box_ref(old);
  wr_set_nodes(&w, tc_ntab_edit(wr_nodes(&w), n, 0));
  n = NULL;
  wr_publish(&w);
out:
  tc_box_unref(n);
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

struct rotate_arg {
  const uint8_t *key;
  int64_t expiry;
  struct tc_model *m;
};
static int apply_rotate(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                        struct tc_err *err) {
  struct rotate_arg *a = arg;
  if (key_is_zero(a->key)) return tc_err_set(err, TC_EINVAL, "new node key is required");
  const struct tc_node *o = tc_snapshot_node_by_node_key(w->base, a->key);
  if (o && o->id != n->id)
    return tc_err_set(err, TC_EEXIST, "node key already belongs to node %lld", (long long)o->id);
  if (memcmp(n->node_key, a->key, TC_KEY_LEN)) *fields |= TC_NODE_F_KEY;
  memcpy(n->node_key, a->key, TC_KEY_LEN);
  int64_t exp = default_expiry(a->m, a->expiry, n->tags.n > 0);
  if (exp != n->expiry) *fields |= TC_NODE_F_EXPIRY;
  n->expiry = exp;
  return 0;
}

int tc_model_node_rotate_key(struct tc_model *m, const char *actor, int64_t node_id,
                             const uint8_t new_node_key[TC_KEY_LEN], int64_t expiry,
                             struct tc_err *err) {
  struct rotate_arg a = {new_node_key, expiry, m};
  return node_edit(m, actor, "node.rotate_key", node_id, TC_CHANGE_NODE_KEY_ROTATED,
                   TC_TX_DURABLE, true, apply_rotate, &a, NULL, err);
}

static int apply_expire(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                        struct tc_err *err) {
  int64_t at = *(int64_t *)arg;
  /* Always a change: expiring an expired node again re-announces it. */
  n->expiry = at;
  *fields |= TC_NODE_F_EXPIRY;
  return 0;
}

int tc_model_node_expire(struct tc_model *m, const char *actor, int64_t node_id, int64_t at,
                         struct tc_err *err) {
  if (at <= 0) at = tc_now();
  return node_edit(m, actor, "node.expire", node_id, TC_CHANGE_NODE_EXPIRED, TC_TX_DURABLE, true,
                   apply_expire, &at, NULL, err);
}

static int apply_rename(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                        struct tc_err *err) {
  const char *name = arg;
  int rc = tc_model_validate_given_name(name, err);
  if (rc) return rc;
  const struct tc_node *o = tc_snapshot_node_by_given_name(w->base, name);
  if (o && o->id != n->id)
    return tc_err_set(err, TC_EEXIST, "node name \"%s\" is already used by node %lld", name,
                      (long long)o->id);
  if (n->given_name && !strcmp(n->given_name, name)) return 0;
  free(n->given_name);
  n->given_name = tc_xstrdup(name);
  *fields |= TC_NODE_F_NAME;
  return 0;
}

int tc_model_node_rename(struct tc_model *m, const char *actor, int64_t node_id,
                         const char *new_name, struct tc_err *err) {
  return node_edit(m, actor, "node.rename", node_id, TC_CHANGE_NODE_RENAMED, 0, true, apply_rename,
                   (void *)new_name, NULL, err);
}

static int apply_tags(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                      struct tc_err *err) {
  const struct tc_strv *tags = arg;
  int rc = check_tags(tags, err);
  if (rc) return rc;
  struct tc_strv t;
  strv_dedup_copy(&t, tags);
  if (!t.n && !n->user_id) {
    tc_strv_free(&t);
    return tc_err_set(err, TC_EINVAL, "node %lld has no user; it must keep at least one tag",
                      (long long)n->id);
  }
  if (strv_equal(&t, &n->tags)) {
    tc_strv_free(&t);
    return 0;
  }
  tc_strv_free(&n->tags);
  n->tags = t;
  *fields |= TC_NODE_F_TAGS;
  if (auto_approve(w->m->pol, w->base, n)) *fields |= TC_NODE_F_ROUTES;
  return 0;
}

int tc_model_node_set_tags(struct tc_model *m, const char *actor, int64_t node_id,
                           const struct tc_strv *tags, struct tc_err *err) {
  struct tc_strv empty = {NULL, 0};
  return node_edit(m, actor, "node.set_tags", node_id, TC_CHANGE_NODE_TAGS, 0, true, apply_tags,
                   (void *)(tags ? tags : &empty), NULL, err);
}

static int apply_routes(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                        struct tc_err *err) {
  struct tc_strv r;
  int rc = canon_routes(arg, true, &r, err);
  if (rc) return rc;
  if (strv_equal(&r, &n->approved_routes)) {
    tc_strv_free(&r);
    return 0;
  }
  tc_strv_free(&n->approved_routes);
  n->approved_routes = r;
  *fields |= TC_NODE_F_ROUTES;
  return 0;
}

int tc_model_node_approve_routes(struct tc_model *m, const char *actor, int64_t node_id,
                                 const struct tc_strv *routes, struct tc_err *err) {
  struct tc_strv empty = {NULL, 0};
  return node_edit(m, actor, "node.approve_routes", node_id, TC_CHANGE_NODE_ROUTES, 0, true,
                   apply_routes, (void *)(routes ? routes : &empty), NULL, err);
}

static int apply_user(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                      struct tc_err *err) {
  int64_t uid = *(int64_t *)arg;
  if (!tc_snapshot_user(w->base, uid))
    return tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)uid);
  if (n->user_id == uid) return 0;
  n->user_id = uid;
  *fields |= TC_NODE_F_USER;
  if (auto_approve(w->m->pol, w->base, n)) *fields |= TC_NODE_F_ROUTES;
  return 0;
}

int tc_model_node_set_user(struct tc_model *m, const char *actor, int64_t node_id,
                           int64_t user_id, struct tc_err *err) {
  return node_edit(m, actor, "node.set_user", node_id, TC_CHANGE_NODE_CHANGED, 0, true, apply_user,
                   &user_id, NULL, err);
}

static int apply_map(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                     struct tc_err *err) {
  const struct tc_map_update *u = arg;
  if (u->hostinfo_json) {
    if (strnlen(u->hostinfo_json, HOSTINFO_MAX + 1) > HOSTINFO_MAX)
      return tc_err_set(err, TC_ETOOBIG, "hostinfo larger than %d bytes", HOSTINFO_MAX);
    if (!n->hostinfo_json || strcmp(n->hostinfo_json, u->hostinfo_json)) {
      free(n->hostinfo_json);
      n->hostinfo_json = tc_xstrdup(u->hostinfo_json);
      *fields |= TC_NODE_F_HOSTINFO;
    }
  }
  if (u->hostname && *u->hostname && (!n->hostname || strncmp(n->hostname, u->hostname, 255))) {
    /* Like Headscale: a given name derived from the old hostname follows the
     * new one; a name an admin chose stays. */
    bool derived = w->m->names_follow && is_auto_derived_name(n->given_name, n->hostname);
    free(n->hostname);
    n->hostname = dup_bounded(u->hostname, 255);
    *fields |= TC_NODE_F_HOSTNAME;
    if (derived) {
      struct name_ctx nc = {w->base, n->id};
      char *g = tc_model_unique_name(n->hostname, name_taken_by_other, &nc);
      if (!n->given_name || strcmp(g, n->given_name)) {
        free(n->given_name);
        n->given_name = g;
        *fields |= TC_NODE_F_NAME;
      } else {
        free(g);
      }
    }
  }
  if (u->endpoints) {
    struct tc_strv e;
    filter_endpoints(u->endpoints, &e);
    if (!strv_equal(&e, &n->endpoints)) {
      tc_strv_free(&n->endpoints);
      n->endpoints = e;
      *fields |= TC_NODE_F_ENDPOINTS;
    } else {
      tc_strv_free(&e);
    }
  }
  if (u->disco_key && !key_is_zero(u->disco_key) && memcmp(n->disco_key, u->disco_key, TC_KEY_LEN)) {
    memcpy(n->disco_key, u->disco_key, TC_KEY_LEN);
    *fields |= TC_NODE_F_DISCO;
  }
  if (u->home_derp && u->home_derp != n->home_derp) {
    n->home_derp = u->home_derp;
    *fields |= TC_NODE_F_DERP;
  }
  if (u->cap_version && u->cap_version != n->cap_version) {
    n->cap_version = u->cap_version;
    *fields |= TC_NODE_F_CAP;
  }
  if (u->announced_routes) {
    struct tc_strv r;
    canon_routes(u->announced_routes, false, &r, NULL);
    if (!strv_equal(&r, &n->announced_routes)) {
      tc_strv_free(&n->announced_routes);
      n->announced_routes = r;
      *fields |= TC_NODE_F_ROUTES;
      auto_approve(w->m->pol, w->base, n);
    } else {
      tc_strv_free(&r);
    }
  }
  return 0;
}

int tc_model_node_update_from_map(struct tc_model *m, int64_t node_id,
                                  const struct tc_map_update *u, unsigned *changed_out,
                                  struct tc_err *err) {
  if (changed_out) *changed_out = 0;
  char actor[32];
  snprintf(actor, sizeof actor, "node:%lld", (long long)node_id);
  return node_edit(m, actor, "node.update", node_id, TC_CHANGE_NODE_ENDPOINTS, 0, false,
                   apply_map, (void *)u, changed_out, err);
}

/* Deletes under the writer lock (used by delete, logout and tick). */
static int delete_locked(struct tc_model *m, const char *actor, int64_t node_id, const char *why,
                         struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  wr_init(&w, m);
  plan_init(&p, actor, "node.delete", "node", node_id);
  const struct tc_node *old = tc_snapshot_node(w.base, node_id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "node %lld not found", (long long)node_id);
    goto out;
  }
  p.detail = tc_xasprintf("given_name=%s reason=%s", old->given_name ? old->given_name : "", why);
  plan_add(&p, OP_NODE_DELETE, NULL, node_id, 0);
  p.flags = TC_TX_DURABLE;
  if ((rc = plan_run(m, &p, err))) goto out;
  struct ev *e = wr_event(&w, TC_CHANGE_NODE_REMOVED);
  e->node_id = node_id;
  e->user_id = old->user_id;
  e->old = tc_box_ref(old);
  wr_set_nodes(&w, tc_ntab_edit(wr_nodes(&w), NULL, node_id));
  if (tc_snapshot_is_online(w.base, node_id))
    wr_set_online(&w, tc_otab_edit(wr_online(&w), node_id, false));
  for (size_t i = 0; i < m->n_oc; i++) {
    if (m->oc[i].id != node_id) continue;
    m->oc[i] = m->oc[--m->n_oc];
    break;
  }
  wr_publish(&w);
out:
  plan_free(&p);
  wr_done(&w);
  return rc;
}

int tc_model_node_delete(struct tc_model *m, const char *actor, int64_t node_id,
                         struct tc_err *err) {
  pthread_mutex_lock(&m->wmu);
  int rc = delete_locked(m, actor, node_id, "admin", err);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

int tc_model_node_logout(struct tc_model *m, const char *actor, int64_t node_id,
                         struct tc_err *err) {
  struct tc_snapshot *s = tc_model_snapshot(m);
  const struct tc_node *n = tc_snapshot_node(s, node_id);
  bool eph = n && n->ephemeral;
  tc_snapshot_release(s);
  if (!n) return tc_err_set(err, TC_ENOENT, "node %lld not found", (long long)node_id);
  if (eph) {
    pthread_mutex_lock(&m->wmu);
    int rc = delete_locked(m, actor, node_id, "logout", err);
    pthread_mutex_unlock(&m->wmu);
    return rc;
  }
  int64_t at = tc_now();
  return node_edit(m, actor, "node.logout", node_id, TC_CHANGE_NODE_EXPIRED, TC_TX_DURABLE, true,
                   apply_expire, &at, NULL, err);
}

int tc_model_node_set_online(struct tc_model *m, int64_t node_id, bool online,
                             struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc = 0;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, NULL, "node.seen", "node", node_id);
  p.no_audit = true;
  const struct tc_node *n = tc_snapshot_node(w.base, node_id);
  struct online_count *c = NULL;
  for (size_t i = 0; i < m->n_oc && !c; i++)
    if (m->oc[i].id == node_id) c = &m->oc[i];
  if (online) {
    if (!n) {
      rc = tc_err_set(err, TC_ENOENT, "node %lld not found", (long long)node_id);
      goto out;
    }
    if (!c) {
      m->oc = tc_xrealloc(m->oc, (m->n_oc + 1) * sizeof *m->oc);
      c = &m->oc[m->n_oc++];
      *c = (struct online_count){node_id, 0};
    }
    if (c->count++ > 0) goto out;
    wr_set_online(&w, tc_otab_edit(wr_online(&w), node_id, true));
    struct ev *e = wr_event(&w, TC_CHANGE_NODE_ONLINE);
    e->node_id = node_id;
    e->user_id = n->user_id;
    e->fields = TC_NODE_F_ONLINE;
    wr_publish(&w);
    goto out;
  }
  if (!c || c->count <= 0) goto out; /* unpaired or the node was deleted meanwhile */
  if (--c->count > 0) goto out;
  *c = m->oc[--m->n_oc];
  if (!n) goto out;
  int64_t now = tc_now();
  plan_add(&p, OP_NODE_TOUCH, NULL, node_id, now);
  struct tc_err e2;
  if (plan_run(m, &p, &e2)) /* going offline happens anyway; last_seen is best effort */
    tc_warn("model: could not record last_seen of node %lld: %s", (long long)node_id, e2.msg);
  struct tc_node *nn = tc_box_node(n);
  nn->last_seen = now;
  wr_set_nodes(&w, tc_ntab_edit(wr_nodes(&w), nn, 0));
  wr_set_online(&w, tc_otab_edit(wr_online(&w), node_id, false));
  struct ev *e = wr_event(&w, TC_CHANGE_NODE_OFFLINE);
  e->node_id = node_id;
  e->user_id = n->user_id;
  e->fields = TC_NODE_F_ONLINE | TC_NODE_F_LAST_SEEN;
  e->old = tc_box_ref(n);
  wr_publish(&w);
out:
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

/* ---- interactive registration ------------------------------------------------------------ */
static struct pending *pending_find(struct tc_model *m, const char *id) {
  int64_t now = tc_mono_ms();
  for (struct pending *p = m->pend; p; p = p->next)
    if (!strcmp(p->id, id)) return p->expires_mono > now ? p : NULL;
  return NULL;
}

int tc_model_pending_create(struct tc_model *m, const struct tc_register_req *req,
                            char **reg_id_out, struct tc_err *err) {
  *reg_id_out = NULL;
  if (key_is_zero(req->machine_key) || key_is_zero(req->node_key))
    return tc_err_set(err, TC_EINVAL, "machine key and node key are required");
  if (req->hostinfo_json && strnlen(req->hostinfo_json, HOSTINFO_MAX + 1) > HOSTINFO_MAX)
    return tc_err_set(err, TC_ETOOBIG, "hostinfo larger than %d bytes", HOSTINFO_MAX);
  struct pending *p = tc_xcalloc(1, sizeof *p);
  char *tok = tc_random_token(15); /* 120 bits -> 24 chars */
  snprintf(p->id, sizeof p->id, "%s", tok);
  free(tok);
  memcpy(p->machine_key, req->machine_key, TC_KEY_LEN);
  memcpy(p->node_key, req->node_key, TC_KEY_LEN);
  memcpy(p->old_node_key, req->old_node_key, TC_KEY_LEN);
  p->hostinfo_json = req->hostinfo_json ? tc_xstrdup(req->hostinfo_json) : NULL;
  p->hostname = req->hostname ? dup_bounded(req->hostname, 255) : NULL;
  p->ephemeral = req->ephemeral;
  p->expiry = req->expiry;
  if (req->announced_routes) canon_routes(req->announced_routes, false, &p->routes, NULL);
  p->created_at = tc_now();
  p->expires_mono = tc_mono_ms() + m->pending_ttl_ms;
  p->state = PEND_WAITING;
  /* Registration requests come from unauthenticated machines: bound what
   * they can park here. Expired entries go first; then a machine keeps at
   * most PENDING_PER_MACHINE open requests (its oldest is dropped); then the
   * whole table is capped. */
  pthread_mutex_lock(&m->pmu);
  int64_t mono = tc_mono_ms();
  size_t total = 0, mine = 0;
  struct pending **oldest_mine = NULL;
  for (struct pending **pp = &m->pend; *pp;) {
    struct pending *q = *pp;
    if (q->expires_mono <= mono && q->state != PEND_BUSY) {
      *pp = q->next;
      pending_free_one(q);
      continue;
    }
    total++;
    if (q->state == PEND_WAITING && !memcmp(q->machine_key, p->machine_key, TC_KEY_LEN)) {
      mine++;
      oldest_mine = pp; /* the list is newest first */
    }
    pp = &q->next;
  }
  if (mine >= PENDING_PER_MACHINE && oldest_mine) {
    struct pending *q = *oldest_mine;
    *oldest_mine = q->next;
    pending_free_one(q);
    total--;
  }
  if (total >= PENDING_MAX) {
    pthread_mutex_unlock(&m->pmu);
    pending_free_one(p);
    return tc_err_set(err, TC_EAGAIN, "too many pending registrations; try again later");
  }
  p->next = m->pend;
  m->pend = p;
  pthread_mutex_unlock(&m->pmu);
  *reg_id_out = tc_xstrdup(p->id);
  return 0;
}

int tc_model_pending_approve(struct tc_model *m, const char *actor, const char *reg_id,
                             int64_t user_id, int64_t *node_id_out, struct tc_err *err) {
  if (!reg_id) return tc_err_set(err, TC_EINVAL, "registration id is required");
  pthread_mutex_lock(&m->pmu);
  struct pending *p = pending_find(m, reg_id);
  if (!p) {
    pthread_mutex_unlock(&m->pmu);
    return tc_err_set(err, TC_ENOENT, "registration not found or expired");
  }
  if (p->state != PEND_WAITING) {
    int st = p->state;
    pthread_mutex_unlock(&m->pmu);
    return tc_err_set(err, TC_ECONFLICT, "registration already %s",
                      st == PEND_APPROVED ? "approved" : st == PEND_REJECTED ? "rejected" : "in progress");
  }
  /* BUSY keeps a second approval out while we register without pmu held;
   * the entry cannot be freed meanwhile (tick skips BUSY entries). */
  p->state = PEND_BUSY;
  pthread_mutex_unlock(&m->pmu);

  struct tc_register_req req = {0};
  memcpy(req.machine_key, p->machine_key, TC_KEY_LEN);
  memcpy(req.node_key, p->node_key, TC_KEY_LEN);
  memcpy(req.old_node_key, p->old_node_key, TC_KEY_LEN);
  req.hostinfo_json = p->hostinfo_json;
  req.hostname = p->hostname;
  req.ephemeral = p->ephemeral;
  req.expiry = p->expiry;
  req.announced_routes = &p->routes;
  struct reg_auth ra = {.user_id = user_id, .method = TC_REG_CLI, .reg_id = p->id};
  int64_t nid = 0;
  int rc;
  if (user_id <= 0) {
    rc = tc_err_set(err, TC_EINVAL, "a user is required to approve a registration");
  } else {
    pthread_mutex_lock(&m->wmu);
    rc = do_register(m, actor, &req, &ra, &nid, err);
    pthread_mutex_unlock(&m->wmu);
  }
  pthread_mutex_lock(&m->pmu);
  if (rc == 0) {
    p->state = PEND_APPROVED;
    p->node_id = nid;
    pthread_cond_broadcast(&m->pcv);
  } else {
    p->state = PEND_WAITING;
  }
  pthread_mutex_unlock(&m->pmu);
  if (rc == 0 && node_id_out) *node_id_out = nid;
  return rc;
}

int tc_model_pending_reject(struct tc_model *m, const char *actor, const char *reg_id,
                            struct tc_err *err) {
  if (!reg_id) return tc_err_set(err, TC_EINVAL, "registration id is required");
  pthread_mutex_lock(&m->pmu);
  struct pending *p = pending_find(m, reg_id);
  int rc = 0;
  if (!p) rc = tc_err_set(err, TC_ENOENT, "registration not found or expired");
  else if (p->state != PEND_WAITING) rc = tc_err_set(err, TC_ECONFLICT, "registration already decided");
  else {
    p->state = PEND_REJECTED;
    pthread_cond_broadcast(&m->pcv);
  }
  pthread_mutex_unlock(&m->pmu);
  return rc;
}

int tc_model_pending_wait(struct tc_model *m, const char *reg_id, int64_t timeout_ms,
                          int64_t *node_id_out, struct tc_err *err) {
  if (!reg_id) return tc_err_set(err, TC_EINVAL, "registration id is required");
  int64_t deadline = tc_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
  int rc;
  pthread_mutex_lock(&m->pmu);
  m->waiters++;
  for (;;) {
    struct pending *p = m->closing ? NULL : pending_find(m, reg_id);
    if (!p) {
      rc = tc_err_set(err, TC_ENOENT, "registration not found or expired");
      break;
    }
    if (p->state == PEND_APPROVED) {
      if (node_id_out) *node_id_out = p->node_id;
      rc = 0;
      break;
    }
    if (p->state == PEND_REJECTED) {
      rc = tc_err_set(err, TC_EPERM, "registration was rejected");
      break;
    }
    int64_t now = tc_mono_ms();
    if (now >= deadline) {
      rc = tc_err_set(err, TC_EAGAIN, "registration still pending");
      break;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* Nobody signals a TTL running out, so wake up for it ourselves. */
    int64_t wake = TC_MIN(deadline, p->expires_mono);
    int64_t wait = wake > now ? wake - now : 1;
    ts.tv_sec += wait / 1000;
    ts.tv_nsec += (long)(wait % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&m->pcv, &m->pmu, &ts);
  }
  if (--m->waiters == 0 && m->closing) pthread_cond_broadcast(&m->pcv);
  pthread_mutex_unlock(&m->pmu);
  return rc;
}

static void pending_info(const struct pending *p, struct tc_pending_info *o) {
  memset(o, 0, sizeof *o);
  snprintf(o->reg_id, sizeof o->reg_id, "%s", p->id);
  memcpy(o->machine_key, p->machine_key, TC_KEY_LEN);
  memcpy(o->node_key, p->node_key, TC_KEY_LEN);
  o->hostname = tc_xstrdup(p->hostname ? p->hostname : "");
  o->created_at = p->created_at;
  o->expires_at = tc_now() + (p->expires_mono - tc_mono_ms()) / 1000;
  o->state = p->state == PEND_BUSY ? PEND_WAITING : p->state;
  o->node_id = p->node_id;
}

int tc_model_pending_get(struct tc_model *m, const char *reg_id, struct tc_pending_info *out) {
  pthread_mutex_lock(&m->pmu);
  struct pending *p = reg_id ? pending_find(m, reg_id) : NULL;
  if (p) pending_info(p, out);
  pthread_mutex_unlock(&m->pmu);
  return p ? 0 : TC_ENOENT;
}

int tc_model_pending_list(struct tc_model *m, struct tc_pending_info **out, size_t *n) {
  pthread_mutex_lock(&m->pmu);
  size_t c = 0;
  int64_t now = tc_mono_ms();
  for (struct pending *p = m->pend; p; p = p->next)
    if (p->expires_mono > now) c++;
  *out = tc_xcalloc(c + 1, sizeof **out);
  *n = 0;
  for (struct pending *p = m->pend; p; p = p->next)
    if (p->expires_mono > now) pending_info(p, &(*out)[(*n)++]);
  pthread_mutex_unlock(&m->pmu);
  return 0;
}

void tc_model_pending_free(struct tc_pending_info *v, size_t n) {
  if (!v) return;
  for (size_t i = 0; i < n; i++) free(v[i].hostname);
  free(v);
}

/* ---- policy --------------------------------------------------------------------------------- */
int tc_model_policy_set(struct tc_model *m, const char *actor, const char *text, size_t len,
                        int64_t *id_out, struct tc_err *err) {
  if (!text) return tc_err_set(err, TC_EINVAL, "policy text is required");
  if (len > POLICY_MAX) return tc_err_set(err, TC_ETOOBIG, "policy larger than %d bytes", POLICY_MAX);
  if (memchr(text, 0, len)) return tc_err_set(err, TC_EINVAL, "policy contains a NUL byte");
  int rc;
  if (m->policy_validate && (rc = m->policy_validate(m->policy_ctx, text, len, err))) {
    if (!err || !err->msg[0]) tc_err_set(err, rc, "policy rejected");
    return rc;
  }
  struct tc_policy *pol = parse_policy(text, len);
  struct wr w;
  struct plan p;
  struct tc_node **changed = NULL;
  size_t n_changed = 0;
  pthread_mutex_lock(&m->wmu);
  wr_init(&w, m);
  plan_init(&p, actor, "policy.set", "policy", 0);
  struct tc_policy_rec rec = {.data = tc_xstrndup(text, len),
                              .actor = tc_xstrdup(actor_or_system(actor))};
  struct tc_policy_rec *boxed = tc_box_policy(&rec);
  tc_policy_rec_free(&rec);
  plan_add(&p, OP_POLICY_INSERT, boxed, 0, 0);
  p.target_op = 0;
  p.flags = TC_TX_DURABLE;
  /* New autoApprovers apply to routes already announced, in the same
   * transaction as the policy itself. */
  if (pol) {
    for (size_t i = 0; i < w.base->n_nodes; i++) {
      const struct tc_node *o = w.base->nodes[i];
      if (!o->announced_routes.n) continue;
      struct tc_node *c = tc_box_node(o);
      if (!auto_approve(pol, w.base, c)) {
        tc_box_unref(c);
        continue;
      }
      changed = tc_xrealloc(changed, (n_changed + 1) * sizeof *changed);
      changed[n_changed++] = c;
      plan_add(&p, OP_NODE_UPDATE, c, 0, 0);
    }
  }
  if ((rc = plan_run(m, &p, err))) {
    tc_box_unref(boxed);
    goto out;
  }
  if (id_out) *id_out = boxed->id;
  w.p = boxed;
  w.p_set = true;
  wr_event(&w, TC_CHANGE_POLICY)->key_id = boxed->id;
  for (size_t i = 0; i < n_changed; i++) {
    struct tc_node *c = changed[i];
    struct ev *e = wr_event(&w, TC_CHANGE_NODE_ROUTES);
    e->node_id = c->id;
    e->user_id = c->user_id;
    e->fields = TC_NODE_F_ROUTES;
    e->old = tc_box_ref(tc_snapshot_node(w.base, c->id));
    wr_set_nodes(&w, tc_ntab_edit(wr_nodes(&w), c, 0));
    changed[i] = NULL; /* stolen by the table */
  }
  tc_policy_free(m->pol);
  m->pol = pol;
  pol = NULL;
  wr_publish(&w);
out:
  for (size_t i = 0; i < n_changed; i++) tc_box_unref(changed[i]);
  free(changed);
  tc_policy_free(pol);
  plan_free(&p);
  wr_done(&w);
  pthread_mutex_unlock(&m->wmu);
  return rc;
}

int tc_model_policy_history(struct tc_model *m, int limit, struct tc_policy_rec **out,
                            size_t *n, struct tc_err *err) {
  struct tc_tx *tx;
  *out = NULL;
  *n = 0;
  int rc = tc_store_begin(m->store, TC_TX_READONLY, &tx, err);
  if (rc) return rc;
  rc = tc_store_policy_list(tx, limit, out, n, err);
  tc_tx_rollback(tx);
  return rc;
}

int tc_model_audit_list(struct tc_model *m, int limit, struct tc_audit **out, size_t *n,
                        struct tc_err *err) {
  struct tc_tx *tx;
  *out = NULL;
  *n = 0;
  int rc = tc_store_begin(m->store, TC_TX_READONLY, &tx, err);
  if (rc) return rc;
  rc = tc_store_audit_list(tx, limit, out, n, err);
  tc_tx_rollback(tx);
  return rc;
}

/* ---- lifecycle -------------------------------------------------------------------------------- */
int tc_model_tick(struct tc_model *m, int64_t now_ms, struct tc_err *err) {
  int deleted = 0, rc = 0;
  int64_t now_s = now_ms / 1000;
  pthread_mutex_lock(&m->wmu);
  /* Ephemeral nodes without a stream for longer than the timeout. */
  struct tc_snapshot *s = tc_snapshot_ref(m->cur);
  for (size_t i = 0; i < s->n_nodes; i++) {
    const struct tc_node *n = s->nodes[i];
    if (!n->ephemeral || tc_snapshot_is_online(s, n->id)) continue;
    /* Offline since its last stream ended, but never before this process
     * started: after a crash last_seen is stale, and the node deserves the
     * full timeout to reconnect (Headscale reschedules at startup too). */
    int64_t since = TC_MAX(n->last_seen ? n->last_seen : n->created_at, m->opened_at);
    if (now_ms - since * 1000 < m->ephemeral_timeout_ms) continue;
    struct tc_err e2;
    int r = delete_locked(m, "system", n->id, "ephemeral inactivity", &e2);
    if (r == 0) deleted++;
    else if (r != TC_ENOENT) {
      tc_warn("model: could not delete ephemeral node %lld: %s", (long long)n->id, e2.msg);
      if (!rc) rc = tc_err_set(err, r, "%s", e2.msg);
    }
  }
  tc_snapshot_release(s);
  /* Nodes whose key expiry passed since the last tick: peers must learn it. */
  struct wr w;
  wr_init(&w, m);
  s = tc_snapshot_ref(m->cur); /* publishing below replaces m->cur */
  for (size_t i = 0; i < s->n_nodes; i++) {
    const struct tc_node *n = s->nodes[i];
    if (!n->expiry || n->expiry <= m->last_expiry_check || n->expiry > now_s) continue;
    struct ev *e = wr_event(&w, TC_CHANGE_NODE_EXPIRED);
    e->node_id = n->id;
    e->user_id = n->user_id;
    e->fields = TC_NODE_F_EXPIRY;
  }
  if (w.nev) wr_publish(&w);
  wr_done(&w);
  tc_snapshot_release(s);
  if (now_s > m->last_expiry_check) m->last_expiry_check = now_s;
  pthread_mutex_unlock(&m->wmu);

  /* Pending registrations past their TTL (unless an approval is running). */
  pthread_mutex_lock(&m->pmu);
  int64_t mono = tc_mono_ms();
  for (struct pending **pp = &m->pend; *pp;) {
    struct pending *p = *pp;
    if (p->expires_mono <= mono && p->state != PEND_BUSY) {
      *pp = p->next;
      pending_free_one(p);
    } else {
      pp = &p->next;
    }
  }
  pthread_mutex_unlock(&m->pmu);
  return rc ? rc : deleted;
}
