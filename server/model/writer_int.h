/* writer internals of the model, shared by its files (model.c core and
 * lifecycle, users.c, keys.c, nodes.c, pending.c): the model struct, the
 * write context that builds and publishes a snapshot, and the storage plan
 * that runs one transaction. Everything here runs under the writer lock
 * unless a comment says otherwise. Not for use outside server/model. */
#ifndef TC_MODEL_WRITER_INT_H
#define TC_MODEL_WRITER_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

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
/* Latest time we accept (9999-12-31T23:59:59Z): RFC 3339 output stays 4-digit. */
#define TIME_MAX_S 253402300799LL

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
  uint64_t durable_ticket; /* newest durable commit's group-commit ticket (tc_store_sync) */

  pthread_mutex_t smu; /* guards cur only; held for a pointer copy */
  struct tc_snapshot *cur;

  pthread_mutex_t pmu; /* pending registrations */
  pthread_cond_t pcv;
  struct pending *pend;
  bool closing;
  int waiters; /* threads inside tc_model_pending_wait; close waits for them */

  /* counters for tc_model_stats, read without locks */
  _Atomic uint64_t st_tx_ok, st_tx_failed, st_tx_retries;
  _Atomic int64_t st_last_tx_us, st_max_tx_us;
  _Atomic uint64_t st_tx_wall_us, st_tx_cpu_us, st_tx_durable, st_tx_durable_wall_us;
  _Atomic uint64_t st_publishes, st_publish_cpu_us, st_sync_waits, st_sync_wait_us;
  _Atomic long st_subs;
};

static const struct tc_user zero_user;
static const struct tc_node zero_node;
static const struct tc_preauth_key zero_pre;
static const struct tc_api_key zero_api;

/* ---- write context --------------------------------------------------------- */
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

void tcm_wr_init(struct wr *w, struct tc_model *m);
const struct tc_ntab *tcm_wr_nodes(struct wr *w);
const struct tc_ktab *tcm_wr_keys(struct wr *w);
const struct tc_otab *tcm_wr_online(struct wr *w);
/* Replace the draft table (the previous draft is released; t is stolen). */
void tcm_wr_set_nodes(struct wr *w, struct tc_ntab *t);
void tcm_wr_set_keys(struct wr *w, struct tc_ktab *t);
void tcm_wr_set_online(struct wr *w, struct tc_otab *t);
/* Appends an event emitted at publish; returned pointer valid until the next call. */
struct ev *tcm_wr_event(struct wr *w, enum tc_change_kind kind);
/* Publishes the drafts as the next snapshot and calls the subscribers. */
void tcm_wr_publish(struct wr *w);
/* Releases drafts and events (after publishing or instead of it). */
void tcm_wr_done(struct wr *w);

/* ---- storage plans ------------------------------------------------------------- */
enum {
  OP_USER_INSERT = 1, OP_USER_UPDATE, OP_USER_DELETE,
  OP_NODE_INSERT, OP_NODE_UPDATE, OP_NODE_UPDATE_CLIENT, OP_NODE_DELETE, OP_NODE_TOUCH,
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

void tcm_plan_init(struct plan *p, const char *actor, const char *action, const char *target_kind,
                   int64_t target_id);
void tcm_plan_add(struct plan *p, int kind, void *rec, int64_t id, int64_t at);
void tcm_plan_free(struct plan *p);
/* One transaction with all ops and the audit entry, retried on TC_EAGAIN.
 * TC_TX_DURABLE plans commit as TC_TX_DURABLE_LATER: tcm_unlock flushes. */
int tcm_plan_run(struct tc_model *m, struct plan *p, struct tc_err *err);
/* Releases the writer lock, then waits until every durable commit so far is
 * on stable storage (group commit: concurrent writers share the flush), so
 * that no outcome is reported before the state it rests on is durable.
 * Returns rc, or TC_EDB when rc was 0 and the flush failed. */
int tcm_unlock(struct tc_model *m, int rc, struct tc_err *err);

/* ---- shared helpers ----------------------------------------------------------------- */
const char *tcm_actor(const char *a);
/* Copies at most max bytes of a NUL-terminated string. Owned. */
char *tcm_dup_bounded(const char *s, size_t max);
bool tcm_key_is_zero(const uint8_t *k);
/* 0 when json is a JSON object of at most HOSTINFO_MAX bytes. */
int tcm_check_hostinfo(const char *json, struct tc_err *err);
int tcm_cmp_str(const void *a, const void *b);
int tcm_canon_routes(const struct tc_strv *in, bool strict, struct tc_strv *out, struct tc_err *err);
void tcm_strv_dedup(struct tc_strv *dst, const struct tc_strv *src);
int tcm_check_tags(const struct tc_strv *tags, struct tc_err *err);
/* Owned parsed policy for autoApprovers, or NULL (logged) when unusable. */
struct tc_policy *tcm_parse_policy(const char *text, size_t len);
bool tcm_auto_approve(const struct tc_policy *pol, const struct tc_snapshot *s, struct tc_node *n);
/* Finds and checks the pre-auth key a token names in s (borrowed result). */
int tcm_preauth_lookup(const struct tc_snapshot *s, const char *token,
                       const struct tc_preauth_key **out, struct tc_err *err);

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
int tcm_register(struct tc_model *m, const char *actor, const struct tc_register_req *req,
                 const struct reg_auth *ra, int64_t *node_id_out, struct tc_err *err);
/* Deletes a node under the writer lock; publishes on success. */
int tcm_delete_locked(struct tc_model *m, const char *actor, int64_t node_id, const char *why,
                      struct tc_err *err);
/* Frees one pending registration (pending lock held or list detached). */
void tcm_pending_free_one(struct pending *p);

#endif
