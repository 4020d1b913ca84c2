/* pending: interactive registrations kept in memory until an admin approves
 * or rejects them, with a waiter for blocked Followup requests. Guarded by
 * the model's pending lock (pmu); approval takes the writer lock. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/writer_int.h"

void tcm_pending_free_one(struct pending *p) {
  free(p->hostinfo_json);
  free(p->hostname);
  tc_strv_free(&p->routes);
  free(p);
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
  if (tcm_key_is_zero(req->machine_key) || tcm_key_is_zero(req->node_key))
    return tc_err_set(err, TC_EINVAL, "machine key and node key are required");
  int rc;
  if (req->hostinfo_json && (rc = tcm_check_hostinfo(req->hostinfo_json, err))) return rc;
  struct pending *p = tc_xcalloc(1, sizeof *p);
  char *tok = tc_random_token(15); /* 120 bits -> 24 chars */
  snprintf(p->id, sizeof p->id, "%s", tok);
  free(tok);
  memcpy(p->machine_key, req->machine_key, TC_KEY_LEN);
  memcpy(p->node_key, req->node_key, TC_KEY_LEN);
  memcpy(p->old_node_key, req->old_node_key, TC_KEY_LEN);
  p->hostinfo_json = req->hostinfo_json ? tc_xstrdup(req->hostinfo_json) : NULL;
  p->hostname = req->hostname ? tcm_dup_bounded(req->hostname, 255) : NULL;
  p->ephemeral = req->ephemeral;
  p->expiry = req->expiry;
  if (req->announced_routes) tcm_canon_routes(req->announced_routes, false, &p->routes, NULL);
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
      tcm_pending_free_one(q);
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
    tcm_pending_free_one(q);
    total--;
  }
  if (total >= PENDING_MAX) {
    pthread_mutex_unlock(&m->pmu);
    tcm_pending_free_one(p);
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
    rc = tcm_register(m, actor, &req, &ra, &nid, err);
    rc = tcm_unlock(m, rc, err);
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
