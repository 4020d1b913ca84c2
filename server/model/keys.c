/* keys: pre-auth keys and API keys — creation (secret shown once, only a
 * prefix and SHA-256 hash kept), expiry, deletion, token checks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/writer_int.h"

/* ---- pre-auth keys ------------------------------------------------------------------------- */
int tcm_check_tags(const struct tc_strv *tags, struct tc_err *err) {
  if (tags && tags->n > MAX_TAGS) return tc_err_set(err, TC_ETOOBIG, "too many tags (max %d)", MAX_TAGS);
  for (size_t i = 0; tags && i < tags->n; i++) {
    int rc = tc_model_validate_tag(tags->v[i], err);
    if (rc) return rc;
  }
  return 0;
}

void tcm_strv_dedup(struct tc_strv *dst, const struct tc_strv *src) {
  dst->v = NULL;
  dst->n = 0;
  for (size_t i = 0; src && i < src->n; i++)
    if (!tc_strv_contains(dst, src->v[i])) tc_strv_push(dst, src->v[i]);
  if (dst->n > 1) qsort(dst->v, dst->n, sizeof *dst->v, tcm_cmp_str); /* canonical order */
}

int tc_model_preauth_create(struct tc_model *m, const char *actor,
                            const struct tc_preauth_opts *opts, int64_t *id_out,
                            char **secret_out, struct tc_err *err) {
  *secret_out = NULL;
  int rc = tcm_check_tags(opts->tags, err);
  if (rc) return rc;
  int64_t now = tc_now();
  if (opts->expiration != 0 && opts->expiration <= now)
    return tc_err_set(err, TC_EINVAL, "expiration must be in the future");
  if (opts->expiration > TIME_MAX_S) return tc_err_set(err, TC_EINVAL, "expiration is too far in the future");
  if (opts->user_id == 0 && (!opts->tags || !opts->tags->n))
    return tc_err_set(err, TC_EINVAL, "a pre-auth key needs a user or at least one tag");
  struct wr w;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
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
    tcm_strv_dedup(&k->tags, opts->tags);
    struct plan p;
    tcm_plan_init(&p, actor, "preauthkey.create", "preauthkey", 0);
    tcm_plan_add(&p, OP_PRE_INSERT, k, 0, 0);
    p.target_op = 0;
    p.detail = tc_xasprintf("prefix=%s user=%lld reusable=%d ephemeral=%d", prefix,
                            (long long)opts->user_id, opts->reusable, opts->ephemeral);
    rc = tcm_plan_run(m, &p, err);
    tcm_plan_free(&p);
    if (rc) {
      tc_box_unref(k);
      tc_free_secret(tok, strlen(tok));
      if (rc == TC_EEXIST && attempt < 3) continue; /* prefix collision: draw again */
      goto out;
    }
    if (id_out) *id_out = k->id;
    *secret_out = tok;
    tcm_wr_set_keys(&w, tc_ktab_edit_pre(tcm_wr_keys(&w), k, 0));
    struct ev *e = tcm_wr_event(&w, TC_CHANGE_PREAUTH_KEY);
    e->key_id = k->id;
    e->user_id = k->user_id;
    tcm_wr_publish(&w);
    break;
  }
out:
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
}

static int preauth_simple(struct tc_model *m, const char *actor, int64_t id, bool del,
                          struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, del ? "preauthkey.delete" : "preauthkey.expire", "preauthkey", id);
  const struct tc_preauth_key *old = tc_snapshot_preauth_key(w.base, id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "pre-auth key %lld not found", (long long)id);
    goto out;
  }
  int64_t now = tc_now();
  tcm_plan_add(&p, del ? OP_PRE_DELETE : OP_PRE_EXPIRE, NULL, id, now);
  p.flags = TC_TX_DURABLE; /* revokes access */
  if ((rc = tcm_plan_run(m, &p, err))) goto out;
  if (del) {
    tcm_wr_set_keys(&w, tc_ktab_edit_pre(tcm_wr_keys(&w), NULL, id));
    const struct tc_ntab *nt = tcm_wr_nodes(&w);
    for (size_t i = 0; i < nt->n; i++) {
      if (nt->v[i]->auth_key_id != id) continue;
      struct tc_node *n = tc_box_node(nt->v[i]);
      n->auth_key_id = 0;
      tcm_wr_set_nodes(&w, tc_ntab_edit(nt, n, 0));
      nt = tcm_wr_nodes(&w);
    }
  } else {
    struct tc_preauth_key *k = tc_box_preauth(old);
    k->expiration = now;
    tcm_wr_set_keys(&w, tc_ktab_edit_pre(tcm_wr_keys(&w), k, 0));
  }
  struct ev *e = tcm_wr_event(&w, TC_CHANGE_PREAUTH_KEY);
  e->key_id = id;
  e->user_id = old->user_id;
  tcm_wr_publish(&w);
out:
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
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
int tcm_preauth_lookup(const struct tc_snapshot *s, const char *token,
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
  int rc = tcm_preauth_lookup(s, token, &k, err);
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
  if (expiration > TIME_MAX_S) return tc_err_set(err, TC_EINVAL, "expiration is too far in the future");
  struct wr w;
  int rc;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
  for (int attempt = 0;; attempt++) {
    struct tc_api_key *k = tc_box_apikey(&zero_api);
    char prefix[13];
    char *tok = tc_token_new("hskey-api-", prefix, k->hash);
    k->prefix = tc_xstrdup(prefix);
    k->expiration = expiration;
    struct plan p;
    tcm_plan_init(&p, actor, "apikey.create", "apikey", 0);
    tcm_plan_add(&p, OP_API_INSERT, k, 0, 0);
    p.target_op = 0;
    p.detail = tc_xasprintf("prefix=%s", prefix);
    rc = tcm_plan_run(m, &p, err);
    tcm_plan_free(&p);
    if (rc) {
      tc_box_unref(k);
      tc_free_secret(tok, strlen(tok));
      if (rc == TC_EEXIST && attempt < 3) continue;
      break;
    }
    if (id_out) *id_out = k->id;
    *token_out = tok;
    tcm_wr_set_keys(&w, tc_ktab_edit_api(tcm_wr_keys(&w), k, 0));
    tcm_wr_event(&w, TC_CHANGE_API_KEY)->key_id = k->id;
    tcm_wr_publish(&w);
    break;
  }
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
}

static int apikey_simple(struct tc_model *m, const char *actor, int64_t id, bool del,
                         struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, del ? "apikey.delete" : "apikey.expire", "apikey", id);
  const struct tc_api_key *old = tc_snapshot_api_key(w.base, id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "API key %lld not found", (long long)id);
    goto out;
  }
  int64_t now = tc_now();
  tcm_plan_add(&p, del ? OP_API_DELETE : OP_API_EXPIRE, NULL, id, now);
  p.flags = TC_TX_DURABLE;
  if ((rc = tcm_plan_run(m, &p, err))) goto out;
  if (del) {
    tcm_wr_set_keys(&w, tc_ktab_edit_api(tcm_wr_keys(&w), NULL, id));
  } else {
    struct tc_api_key *k = tc_box_apikey(old);
    k->expiration = now;
    tcm_wr_set_keys(&w, tc_ktab_edit_api(tcm_wr_keys(&w), k, 0));
  }
  tcm_wr_event(&w, TC_CHANGE_API_KEY)->key_id = id;
  tcm_wr_publish(&w);
out:
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
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
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, "system", "apikey.touch", "apikey", id);
  p.no_audit = true;
  const struct tc_api_key *cur = tc_snapshot_api_key(w.base, id);
  if (cur && now - cur->last_seen >= APIKEY_TOUCH_S) {
    tcm_plan_add(&p, OP_API_TOUCH, NULL, id, now);
    if (tcm_plan_run(m, &p, &e2) == 0) {
      struct tc_api_key *nk = tc_box_apikey(cur);
      nk->last_seen = now;
      tcm_wr_set_keys(&w, tc_ktab_edit_api(tcm_wr_keys(&w), nk, 0));
      tcm_wr_publish(&w);
    } else {
      tc_warn("model: could not record API key use: %s", e2.msg);
    }
  }
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, 0, err);
}
