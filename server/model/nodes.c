/* nodes: registration (pre-auth key, re-registration, rotation), map
 * updates, online bookkeeping, and node administration. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "model/writer_int.h"

/* ---- node helpers ---------------------------------------------------------------------------- */
bool tcm_key_is_zero(const uint8_t *k) {
  uint8_t acc = 0;
  for (size_t i = 0; i < TC_KEY_LEN; i++) acc |= k[i];
  return acc == 0;
}

/* Hostinfo is stored verbatim and re-sent to every peer, so one malformed
 * value must not reach storage: bounded, and a JSON object. */
int tcm_check_hostinfo(const char *json, struct tc_err *err) {
  size_t len = strnlen(json, HOSTINFO_MAX + 1);
  if (len > HOSTINFO_MAX) return tc_err_set(err, TC_ETOOBIG, "hostinfo larger than %d bytes", HOSTINFO_MAX);
  json_error_t je;
  json_t *v = json_loadb(json, len, 0, &je);
  bool ok = v && json_is_object(v);
  json_decref(v);
  if (!ok) return tc_err_set(err, TC_EINVAL, "hostinfo is not a JSON object");
  return 0;
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

int tcm_cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Canonical, de-duplicated, sorted routes. Invalid ones fail (admin input)
 * or are dropped (client input, strict=false). */
int tcm_canon_routes(const struct tc_strv *in, bool strict, struct tc_strv *out,
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
  if (out->n) qsort(out->v, out->n, sizeof *out->v, tcm_cmp_str);
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
  if (requested > now) return TC_MIN(requested, TIME_MAX_S);
  if (tagged || m->node_expiry_ms <= 0) return 0;
  return now + m->node_expiry_ms / 1000;
}

/* Owner and key facts applied by a registration. */

/* Registers under the writer lock; publishes on success. */
int tcm_register(struct tc_model *m, const char *actor, const struct tc_register_req *req,
                       const struct reg_auth *ra, int64_t *node_id_out, struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc = 0;
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, "node.register", "node", 0);
  struct tc_node *n = NULL;
  if (tcm_key_is_zero(req->machine_key) || tcm_key_is_zero(req->node_key)) {
    rc = tc_err_set(err, TC_EINVAL, "machine key and node key are required");
    goto out;
  }
  if (req->hostinfo_json && (rc = tcm_check_hostinfo(req->hostinfo_json, err))) goto out;
  const struct tc_node *old = NULL;
  if (!tcm_key_is_zero(req->old_node_key)) {
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
    n->hostname = tcm_dup_bounded(req->hostname, 255);
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
    tcm_canon_routes(req->announced_routes, false, &n->announced_routes, NULL);
  }
  /* Ownership: a tagged key makes the node owned by its tags (no key expiry
   * by default); otherwise the node belongs to the user. As in Headscale 0.29
   * a node that is tagged already stays so when it registers again with an
   * untagged key or through interactive login. */
  struct tc_strv tags = {NULL, 0};
  int64_t owner = ra->user_id; /* for tagged nodes: the user who registered it (types.h) */
  if (tagged) {
    tcm_strv_dedup(&tags, ra->tags);
  } else if (existing && existing->tags.n) {
    tc_strv_copy(&tags, &existing->tags);
    tagged = true;
  }
  if (n->user_id != owner) fields |= TC_NODE_F_USER;
  n->user_id = owner;
  if (!strv_equal(&tags, &n->tags)) fields |= TC_NODE_F_TAGS;
  tc_strv_free(&n->tags);
  n->tags = tags;
  n->ephemeral = ra->ephemeral || req->ephemeral;
  n->auth_key_id = ra->auth_key_id;
  if (tcm_auto_approve(m->pol, w.base, n)) fields |= TC_NODE_F_ROUTES;
  n->register_method = ra->method;
  int64_t exp = default_expiry(m, req->expiry, tagged);
  if (exp != n->expiry) fields |= TC_NODE_F_EXPIRY;
  n->expiry = exp;
  fields |= TC_NODE_F_HOSTINFO;

  p.flags = TC_TX_DURABLE;
  /* A reusable key that is marked used already has nothing to record. */
  const struct tc_preauth_key *consume = ra->key && !(ra->key->reusable && ra->key->used) ? ra->key : NULL;
  if (consume) tcm_plan_add(&p, OP_PRE_CONSUME, NULL, consume->id, 0);
  tcm_plan_add(&p, existing ? OP_NODE_UPDATE : OP_NODE_INSERT, n, 0, 0);
  p.target_op = (int)p.n - 1;
  p.detail = tc_xasprintf("given_name=%s method=%s%s", n->given_name,
                          tc_register_method_name(ra->method), existing ? " reregister" : "");
  rc = tcm_plan_run(m, &p, err);
  if (rc == TC_ECONFLICT && consume) rc = tc_err_set(err, TC_EPERM, "invalid pre auth key");
  if (rc) goto out;

  int64_t id = n->id;
  if (node_id_out) *node_id_out = id;
  struct ev *e;
  if (!existing) {
    e = tcm_wr_event(&w, TC_CHANGE_NODE_ADDED);
  } else {
    e = tcm_wr_event(&w, (fields & TC_NODE_F_KEY) ? TC_CHANGE_NODE_KEY_ROTATED : TC_CHANGE_NODE_CHANGED);
    e->old = tc_box_ref(existing);
  }
  e->node_id = id;
  e->user_id = n->user_id;
  e->fields = fields;
  tcm_wr_set_nodes(&w, tc_ntab_edit(tcm_wr_nodes(&w), n, 0));
  n = NULL;
  if (consume) {
    struct tc_preauth_key *k = tc_box_preauth(consume);
    k->used = true;
    tcm_wr_set_keys(&w, tc_ktab_edit_pre(tcm_wr_keys(&w), k, 0));
    struct ev *ke = tcm_wr_event(&w, TC_CHANGE_PREAUTH_KEY);
    ke->key_id = k->id;
    ke->user_id = k->user_id;
  }
  if (ra->reg_id) {
    struct ev *re = tcm_wr_event(&w, TC_CHANGE_REGISTRATION);
    re->node_id = id;
    re->user_id = ra->user_id;
    snprintf(re->reg_id, sizeof re->reg_id, "%s", ra->reg_id);
  }
  tcm_wr_publish(&w);
out:
  tc_box_unref(n);
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return rc;
}

int tc_model_register_authkey(struct tc_model *m, const struct tc_register_req *req,
                              int64_t *node_id_out, struct tc_err *err) {
  pthread_mutex_lock(&m->wmu);
  const struct tc_preauth_key *k;
  int rc = tcm_preauth_lookup(m->cur, req->authkey, &k, err);
  if (rc == 0) {
    struct reg_auth ra = {
        .user_id = k->user_id, .tags = &k->tags, .ephemeral = k->ephemeral,
        .auth_key_id = k->id, .key = k, .method = TC_REG_AUTHKEY,
    };
    char actor[40];
    snprintf(actor, sizeof actor, "preauthkey:%s", k->prefix);
    /* k lives in m->cur, which tcm_register replaces only after it is done with k. */
    struct tc_preauth_key *kref = tc_box_ref(k);
    rc = tcm_register(m, actor, req, &ra, node_id_out, err);
    tc_box_unref(kref);
  }
  return tcm_unlock(m, rc, err);
}

/* The node fields tc_store_node_update_client writes. */
#define CLIENT_FIELDS                                                                                    \
  (TC_NODE_F_ENDPOINTS | TC_NODE_F_DISCO | TC_NODE_F_DERP | TC_NODE_F_HOSTINFO | TC_NODE_F_CAP |         \
   TC_NODE_F_HOSTNAME | TC_NODE_F_ROUTES)

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
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, action, "node", node_id);
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
  /* Map updates that change only client-reported columns rewrite just those
   * (no index entries: one SQLite page instead of eight). */
  tcm_plan_add(&p, kind == TC_CHANGE_NODE_ENDPOINTS && !(fields & ~CLIENT_FIELDS) ? OP_NODE_UPDATE_CLIENT : OP_NODE_UPDATE,
               n, 0, 0);
  if ((rc = tcm_plan_run(m, &p, err))) goto out;
  if (kind == TC_CHANGE_NODE_ENDPOINTS && (fields & TC_NODE_F_ROUTES)) kind = TC_CHANGE_NODE_ROUTES;
  struct ev *e = tcm_wr_event(&w, kind);
  e->node_id = node_id;
  e->user_id = n->user_id;
  e->fields = fields;
  e->old = tc_box_ref(old);
  tcm_wr_set_nodes(&w, tc_ntab_edit(tcm_wr_nodes(&w), n, 0));
  n = NULL;
  tcm_wr_publish(&w);
out:
  tc_box_unref(n);
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
}

struct rotate_arg {
  const uint8_t *key;
  int64_t expiry;
  struct tc_model *m;
};
static int apply_rotate(struct wr *w, struct tc_node *n, void *arg, unsigned *fields,
                        struct tc_err *err) {
  struct rotate_arg *a = arg;
  if (tcm_key_is_zero(a->key)) return tc_err_set(err, TC_EINVAL, "new node key is required");
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
  if (at > TIME_MAX_S) return tc_err_set(err, TC_EINVAL, "expiry is too far in the future");
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
  int rc = tcm_check_tags(tags, err);
  if (rc) return rc;
  struct tc_strv t;
  tcm_strv_dedup(&t, tags);
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
  if (tcm_auto_approve(w->m->pol, w->base, n)) *fields |= TC_NODE_F_ROUTES;
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
  int rc = tcm_canon_routes(arg, true, &r, err);
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
  if (tcm_auto_approve(w->m->pol, w->base, n)) *fields |= TC_NODE_F_ROUTES;
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
      int rc = tcm_check_hostinfo(u->hostinfo_json, err); /* parse only when it changed */
      if (rc) return rc;
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
    n->hostname = tcm_dup_bounded(u->hostname, 255);
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
  if (u->disco_key && !tcm_key_is_zero(u->disco_key) && memcmp(n->disco_key, u->disco_key, TC_KEY_LEN)) {
    memcpy(n->disco_key, u->disco_key, TC_KEY_LEN);
    /* The node was just seen, and saying so matters: a client (1.98+) that
     * gets a peer's new disco key in a full peer list keeps the old key
     * unless that peer is online or its LastSeen moved past the one it
     * holds (controlclient removeUnwantedDiscoUpdatesFromFullNetmapUpdate). */
    n->last_seen = TC_MAX(tc_now(), n->last_seen + 1);
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
    tcm_canon_routes(u->announced_routes, false, &r, NULL);
    if (!strv_equal(&r, &n->announced_routes)) {
      tc_strv_free(&n->announced_routes);
      n->announced_routes = r;
      *fields |= TC_NODE_F_ROUTES;
      tcm_auto_approve(w->m->pol, w->base, n);
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
int tcm_delete_locked(struct tc_model *m, const char *actor, int64_t node_id, const char *why,
                         struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, "node.delete", "node", node_id);
  const struct tc_node *old = tc_snapshot_node(w.base, node_id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "node %lld not found", (long long)node_id);
    goto out;
  }
  p.detail = tc_xasprintf("given_name=%s reason=%s", old->given_name ? old->given_name : "", why);
  tcm_plan_add(&p, OP_NODE_DELETE, NULL, node_id, 0);
  p.flags = TC_TX_DURABLE;
  if ((rc = tcm_plan_run(m, &p, err))) goto out;
  struct ev *e = tcm_wr_event(&w, TC_CHANGE_NODE_REMOVED);
  e->node_id = node_id;
  e->user_id = old->user_id;
  e->old = tc_box_ref(old);
  tcm_wr_set_nodes(&w, tc_ntab_edit(tcm_wr_nodes(&w), NULL, node_id));
  if (tc_snapshot_is_online(w.base, node_id))
    tcm_wr_set_online(&w, tc_otab_edit(tcm_wr_online(&w), node_id, false));
  for (size_t i = 0; i < m->n_oc; i++) {
    if (m->oc[i].id != node_id) continue;
    m->oc[i] = m->oc[--m->n_oc];
    break;
  }
  tcm_wr_publish(&w);
out:
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return rc;
}

int tc_model_node_delete(struct tc_model *m, const char *actor, int64_t node_id,
                         struct tc_err *err) {
  pthread_mutex_lock(&m->wmu);
  int rc = tcm_delete_locked(m, actor, node_id, "admin", err);
  return tcm_unlock(m, rc, err);
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
    int rc = tcm_delete_locked(m, actor, node_id, "logout", err);
    return tcm_unlock(m, rc, err);
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
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, NULL, "node.seen", "node", node_id);
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
    tcm_wr_set_online(&w, tc_otab_edit(tcm_wr_online(&w), node_id, true));
    struct ev *e = tcm_wr_event(&w, TC_CHANGE_NODE_ONLINE);
    e->node_id = node_id;
    e->user_id = n->user_id;
    e->fields = TC_NODE_F_ONLINE;
    tcm_wr_publish(&w);
    goto out;
  }
  if (!c || c->count <= 0) goto out; /* unpaired or the node was deleted meanwhile */
  if (--c->count > 0) goto out;
  *c = m->oc[--m->n_oc];
  if (!n) goto out;
  int64_t now = tc_now();
  tcm_plan_add(&p, OP_NODE_TOUCH, NULL, node_id, now);
  struct tc_err e2;
  if (tcm_plan_run(m, &p, &e2)) /* going offline happens anyway; last_seen is best effort */
    tc_warn("model: could not record last_seen of node %lld: %s", (long long)node_id, e2.msg);
  struct tc_node *nn = tc_box_node(n);
  nn->last_seen = now;
  tcm_wr_set_nodes(&w, tc_ntab_edit(tcm_wr_nodes(&w), nn, 0));
  tcm_wr_set_online(&w, tc_otab_edit(tcm_wr_online(&w), node_id, false));
  struct ev *e = tcm_wr_event(&w, TC_CHANGE_NODE_OFFLINE);
  e->node_id = node_id;
  e->user_id = n->user_id;
  e->fields = TC_NODE_F_ONLINE | TC_NODE_F_LAST_SEEN;
  e->old = tc_box_ref(n);
  tcm_wr_publish(&w);
out:
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
}
