/* model: the core of the single writer — open/close, snapshots and
 * subscriptions, the write context that publishes a snapshot and emits its
 * events, storage plans (one transaction per write, retried as a whole on
 * TC_EAGAIN), policy versions with autoApprovers, and the periodic tick.
 * Users, keys, nodes and interactive registrations live in their own files.
 * See model.h for the contract. */
#include <arpa/inet.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/writer_int.h"

const char *tcm_actor(const char *a) { return a && *a ? a : "system"; }

/* Copies at most max bytes of a NUL-terminated string (tc_xstrndup copies
 * exactly n bytes, so it must not be given a bound longer than the string). */
char *tcm_dup_bounded(const char *s, size_t max) { return tc_xstrndup(s, strnlen(s, max)); }

/* ---- write context ------------------------------------------------------------ */
static int64_t thread_cpu_us(void);


void tcm_wr_init(struct wr *w, struct tc_model *m) {
  memset(w, 0, sizeof *w);
  w->m = m;
  w->base = m->cur;
}

const struct tc_ntab *tcm_wr_nodes(struct wr *w) { return w->n ? w->n : w->base->priv->nodes; }
const struct tc_ktab *tcm_wr_keys(struct wr *w) { return w->k ? w->k : w->base->priv->keys; }
const struct tc_otab *tcm_wr_online(struct wr *w) { return w->o ? w->o : w->base->priv->online; }

void tcm_wr_set_nodes(struct wr *w, struct tc_ntab *t) {
  tc_box_unref(w->n);
  w->n = t;
}
void tcm_wr_set_keys(struct wr *w, struct tc_ktab *t) {
  tc_box_unref(w->k);
  w->k = t;
}
void tcm_wr_set_online(struct wr *w, struct tc_otab *t) {
  tc_box_unref(w->o);
  w->o = t;
}

struct ev *tcm_wr_event(struct wr *w, enum tc_change_kind kind) {
  if (w->nev == w->cap_ev) {
    w->cap_ev = w->cap_ev ? w->cap_ev * 2 : 4;
    w->ev = tc_xrealloc(w->ev, w->cap_ev * sizeof *w->ev);
  }
  struct ev *e = &w->ev[w->nev++];
  memset(e, 0, sizeof *e);
  e->kind = kind;
  return e;
}

void tcm_wr_done(struct wr *w) {
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
void tcm_wr_publish(struct wr *w) {
  struct tc_model *m = w->m;
  int64_t c0 = thread_cpu_us();
  struct tc_snapshot_priv *b = w->base->priv;
  const struct tc_ntab *nodes = tcm_wr_nodes(w);
  const struct tc_otab *online = tcm_wr_online(w);
  struct tc_rtab *r;
  /* Without any router (the common case) there is nothing to recompute. */
  if ((w->n || w->o) && (nodes->n_routers || b->primaries->n)) {
    r = tc_rtab_compute(nodes, online, b->primaries);
    if (!tc_rtab_equal(r, b->primaries)) {
      struct ev *e = tcm_wr_event(w, TC_CHANGE_NODE_ROUTES);
      e->fields = TC_NODE_F_PRIMARY;
    }
  } else {
    r = tc_box_ref(b->primaries);
  }
  struct tc_snapshot *s = tc_snapshot_new(
      ++m->seq, w->u ? w->u : b->users, (struct tc_ntab *)nodes, (struct tc_ktab *)tcm_wr_keys(w),
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
  tcm_wr_done(w);
  w->m = m;
  w->base = keep;
  atomic_fetch_add_explicit(&m->st_publishes, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&m->st_publish_cpu_us, (uint64_t)(thread_cpu_us() - c0), memory_order_relaxed);
}

/* ---- storage plans ---------------------------------------------------------------- */



void tcm_plan_init(struct plan *p, const char *actor, const char *action,
                      const char *target_kind, int64_t target_id) {
  memset(p, 0, sizeof *p);
  p->actor = tcm_actor(actor);
  p->action = action;
  p->target_kind = target_kind;
  p->target_id = target_id;
  p->target_op = -1;
}

void tcm_plan_add(struct plan *p, int kind, void *rec, int64_t id, int64_t at) {
  p->ops = tc_xrealloc(p->ops, (p->n + 1) * sizeof *p->ops);
  p->ops[p->n++] = (struct op){kind, rec, id, at};
}

void tcm_plan_free(struct plan *p) {
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
  case OP_NODE_UPDATE_CLIENT: return tc_store_node_update_client(tx, o->rec, err);
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

static int plan_attempts(struct tc_model *m, struct plan *p, struct tc_err *err);

/* CPU time of the calling thread, microseconds. */
static int64_t thread_cpu_us(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)) return 0;
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int tcm_plan_run(struct tc_model *m, struct plan *p, struct tc_err *err) {
  int64_t t0 = tc_mono_ns(), c0 = thread_cpu_us();
  int rc = plan_attempts(m, p, err);
  int64_t us = (tc_mono_ns() - t0) / 1000;
  atomic_fetch_add_explicit(&m->st_tx_cpu_us, (uint64_t)(thread_cpu_us() - c0), memory_order_relaxed);
  atomic_fetch_add_explicit(&m->st_tx_wall_us, (uint64_t)us, memory_order_relaxed);
  if (!rc && (p->flags & TC_TX_DURABLE)) {
    atomic_fetch_add_explicit(&m->st_tx_durable, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&m->st_tx_durable_wall_us, (uint64_t)us, memory_order_relaxed);
  }
  atomic_fetch_add_explicit(rc ? &m->st_tx_failed : &m->st_tx_ok, 1, memory_order_relaxed);
  atomic_store_explicit(&m->st_last_tx_us, us, memory_order_relaxed);
  int64_t mx = atomic_load_explicit(&m->st_max_tx_us, memory_order_relaxed);
  while (us > mx && !atomic_compare_exchange_weak(&m->st_max_tx_us, &mx, us)) {
  }
  return rc;
}

int tcm_unlock(struct tc_model *m, int rc, struct tc_err *err) {
  uint64_t t = m->durable_ticket;
  pthread_mutex_unlock(&m->wmu);
  if (!t) return rc;
  int64_t t0 = tc_mono_ns();
  struct tc_err e2 = {0};
  int src = tc_store_sync(m->store, t, &e2);
  atomic_fetch_add_explicit(&m->st_sync_waits, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&m->st_sync_wait_us, (uint64_t)((tc_mono_ns() - t0) / 1000), memory_order_relaxed);
  if (src) {
    tc_error("model: committed writes could not be flushed to stable storage: %s", e2.msg);
    if (rc == 0) rc = tc_err_set(err, TC_EDB, "committed, but not known to be durable: %s", e2.msg);
  }
  return rc;
}

static int plan_attempts(struct tc_model *m, struct plan *p, struct tc_err *err) {
  int rc = 0;
  for (int attempt = 0;; attempt++) {
    struct tc_tx *tx = NULL;
    unsigned fl = p->flags;
    if (fl & TC_TX_DURABLE) fl = (fl & ~TC_TX_DURABLE) | TC_TX_DURABLE_LATER;
    rc = tc_store_begin(m->store, fl, &tx, err);
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
      uint64_t ticket = 0;
      if (rc == 0) rc = tc_tx_commit_ticket(tx, &ticket, err);
      else tc_tx_rollback(tx);
      if (rc == 0 && ticket > m->durable_ticket) m->durable_ticket = ticket;
    }
    if (rc != TC_EAGAIN || attempt >= 2) return rc;
    atomic_fetch_add_explicit(&m->st_tx_retries, 1, memory_order_relaxed);
  }
}

/* ---- autoApprovers -------------------------------------------------------------------------- */
/* Parses policy text for route auto-approval. A text the validation hook
 * accepted but this parser refuses only disables auto-approval. */
struct tc_policy *tcm_parse_policy(const char *text, size_t len) {
  struct tc_policy *pol = NULL;
  struct tc_policy_err pe = {0};
  if (tc_policy_parse(text, len, &pol, &pe)) {
    tc_warn("model: policy not usable for autoApprovers (line %d: %s)", pe.line, pe.msg);
    return NULL;
  }
  return pol;
}

/* Adds to n->approved_routes the announced routes that the policy's
 * autoApprovers approve for n (Headscale: approval is persisted and not
 * withdrawn by later policy changes). Returns true when something was added. */
bool tcm_auto_approve(const struct tc_policy *pol, const struct tc_snapshot *s, struct tc_node *n) {
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
  if (changed) qsort(n->approved_routes.v, n->approved_routes.n, sizeof *n->approved_routes.v, tcm_cmp_str);
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
  if (pol && pol->data) m->pol = tcm_parse_policy(pol->data, strlen(pol->data));
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
    tcm_pending_free_one(p);
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

void tc_model_stats(struct tc_model *m, struct tc_model_stats *out) {
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&m->smu);
  out->seq = m->cur->seq;
  out->nodes = m->cur->n_nodes;
  out->online = m->cur->n_online;
  out->users = m->cur->n_users;
  pthread_mutex_unlock(&m->smu);
  out->tx_ok = atomic_load(&m->st_tx_ok);
  out->tx_failed = atomic_load(&m->st_tx_failed);
  out->tx_retries = atomic_load(&m->st_tx_retries);
  out->last_tx_us = atomic_load(&m->st_last_tx_us);
  out->max_tx_us = atomic_load(&m->st_max_tx_us);
  out->tx_wall_us = atomic_load(&m->st_tx_wall_us);
  out->tx_cpu_us = atomic_load(&m->st_tx_cpu_us);
  out->tx_durable = atomic_load(&m->st_tx_durable);
  out->tx_durable_wall_us = atomic_load(&m->st_tx_durable_wall_us);
  out->publishes = atomic_load(&m->st_publishes);
  out->publish_cpu_us = atomic_load(&m->st_publish_cpu_us);
  out->sync_waits = atomic_load(&m->st_sync_waits);
  out->sync_wait_us = atomic_load(&m->st_sync_wait_us);
  out->store_syncs = tc_store_syncs(m->store);
  out->subscribers = (size_t)atomic_load(&m->st_subs);
  pthread_mutex_lock(&m->pmu);
  int64_t now = tc_mono_ms();
  for (struct pending *p = m->pend; p; p = p->next)
    if (p->expires_mono > now && p->state != PEND_APPROVED && p->state != PEND_REJECTED) out->pending++;
  pthread_mutex_unlock(&m->pmu);
}

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
  if (!fn) return 0;
  pthread_mutex_lock(&m->wmu);
  m->subs = tc_xrealloc(m->subs, (m->n_subs + 1) * sizeof *m->subs);
  int64_t id = ++m->next_sub;
  m->subs[m->n_subs++] = (struct sub){id, fn, ctx};
  atomic_store(&m->st_subs, (long)m->n_subs);
  pthread_mutex_unlock(&m->wmu);
  return id;
}

void tc_model_unsubscribe(struct tc_model *m, int64_t sub_id) {
  pthread_mutex_lock(&m->wmu);
  for (size_t i = 0; i < m->n_subs; i++) {
    if (m->subs[i].id != sub_id) continue;
    memmove(&m->subs[i], &m->subs[i + 1], (m->n_subs - i - 1) * sizeof *m->subs);
    m->n_subs--;
    atomic_store(&m->st_subs, (long)m->n_subs);
    break;
  }
  pthread_mutex_unlock(&m->wmu);
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
  struct tc_policy *pol = tcm_parse_policy(text, len);
  struct wr w;
  struct plan p;
  struct tc_node **changed = NULL;
  size_t n_changed = 0;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, "policy.set", "policy", 0);
  struct tc_policy_rec rec = {.data = tc_xstrndup(text, len),
                              .actor = tc_xstrdup(tcm_actor(actor))};
  struct tc_policy_rec *boxed = tc_box_policy(&rec);
  tc_policy_rec_free(&rec);
  tcm_plan_add(&p, OP_POLICY_INSERT, boxed, 0, 0);
  p.target_op = 0;
  p.flags = TC_TX_DURABLE;
  /* New autoApprovers apply to routes already announced, in the same
   * transaction as the policy itself. */
  if (pol) {
    for (size_t i = 0; i < w.base->n_nodes; i++) {
      const struct tc_node *o = w.base->nodes[i];
      if (!o->announced_routes.n) continue;
      struct tc_node *c = tc_box_node(o);
      if (!tcm_auto_approve(pol, w.base, c)) {
        tc_box_unref(c);
        continue;
      }
      changed = tc_xrealloc(changed, (n_changed + 1) * sizeof *changed);
      changed[n_changed++] = c;
      tcm_plan_add(&p, OP_NODE_UPDATE, c, 0, 0);
    }
  }
  if ((rc = tcm_plan_run(m, &p, err))) {
    tc_box_unref(boxed);
    goto out;
  }
  if (id_out) *id_out = boxed->id;
  w.p = boxed;
  w.p_set = true;
  tcm_wr_event(&w, TC_CHANGE_POLICY)->key_id = boxed->id;
  for (size_t i = 0; i < n_changed; i++) {
    struct tc_node *c = changed[i];
    struct ev *e = tcm_wr_event(&w, TC_CHANGE_NODE_ROUTES);
    e->node_id = c->id;
    e->user_id = c->user_id;
    e->fields = TC_NODE_F_ROUTES;
    e->old = tc_box_ref(tc_snapshot_node(w.base, c->id));
    tcm_wr_set_nodes(&w, tc_ntab_edit(tcm_wr_nodes(&w), c, 0));
    changed[i] = NULL; /* stolen by the table */
  }
  tc_policy_free(m->pol);
  m->pol = pol;
  pol = NULL;
  tcm_wr_publish(&w);
out:
  for (size_t i = 0; i < n_changed; i++) tc_box_unref(changed[i]);
  free(changed);
  tc_policy_free(pol);
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
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
    int r = tcm_delete_locked(m, "system", n->id, "ephemeral inactivity", &e2);
    if (r == 0) deleted++;
    else if (r != TC_ENOENT) {
      tc_warn("model: could not delete ephemeral node %lld: %s", (long long)n->id, e2.msg);
      if (!rc) rc = tc_err_set(err, r, "%s", e2.msg);
    }
  }
  tc_snapshot_release(s);
  /* Nodes whose key expiry passed since the last tick: peers must learn it. */
  struct wr w;
  tcm_wr_init(&w, m);
  s = tc_snapshot_ref(m->cur); /* publishing below replaces m->cur */
  for (size_t i = 0; i < s->n_nodes; i++) {
    const struct tc_node *n = s->nodes[i];
    if (!n->expiry || n->expiry <= m->last_expiry_check || n->expiry > now_s) continue;
    struct ev *e = tcm_wr_event(&w, TC_CHANGE_NODE_EXPIRED);
    e->node_id = n->id;
    e->user_id = n->user_id;
    e->fields = TC_NODE_F_EXPIRY;
  }
  if (w.nev) tcm_wr_publish(&w);
  tcm_wr_done(&w);
  tc_snapshot_release(s);
  if (now_s > m->last_expiry_check) m->last_expiry_check = now_s;
  rc = tcm_unlock(m, rc, err);

  /* Pending registrations past their TTL (unless an approval is running). */
  pthread_mutex_lock(&m->pmu);
  int64_t mono = tc_mono_ms();
  for (struct pending **pp = &m->pend; *pp;) {
    struct pending *p = *pp;
    if (p->expires_mono <= mono && p->state != PEND_BUSY) {
      *pp = p->next;
      tcm_pending_free_one(p);
    } else {
      pp = &p->next;
    }
  }
  pthread_mutex_unlock(&m->pmu);
  return rc ? rc : deleted;
}
