/* store: the backend-neutral half of storage — open/migrate, transactions,
 * and the mapping between model/types.h records and rows. Every statement is
 * a constant SQL text with "?" placeholders shared by both backends (the
 * SQLite backend caches prepared statements by the text's address, so SQL
 * passed to run() must be a string literal). Values travel only as bound
 * parameters. Thread rules are in store.h. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "storage/store_int.h"

/* ---- small helpers ------------------------------------------------------------ */

void db_result_free(struct db_result *r) {
  if (!r) return;
  if (r->cells) {
    size_t n = (size_t)r->nrows * (size_t)r->ncols;
    for (size_t i = 0; i < n; i++) free(r->cells[i]);
    free(r->cells);
  }
  memset(r, 0, sizeof *r);
}

void tc_store_constraint_field(const char *constraint, char *out, size_t outlen) {
  const char *s = constraint;
  if (!strncmp(s, "uq_", 3)) s += 3;
  size_t j = 0;
  for (; *s && j + 1 < outlen; s++) {
    if (s[0] == '_' && s[1] == '_') {
      out[j++] = '.';
      s++;
    } else {
      out[j++] = *s;
    }
  }
  out[j] = 0;
  if (!j) snprintf(out, outlen, "a unique value");
}

#define MAXP 32
struct params {
  struct db_param v[MAXP];
  int n;
  char *own[MAXP];
  int nown;
};

static void p_push(struct params *p, struct db_param v) {
  if (p->n >= MAXP) abort(); /* a programming error in this file */
  p->v[p->n++] = v;
}
static void p_int(struct params *p, int64_t i) { p_push(p, (struct db_param){DBP_INT, i, NULL}); }
static void p_bool(struct params *p, bool b) { p_push(p, (struct db_param){DBP_BOOL, b, NULL}); }
static void p_text(struct params *p, const char *s) {
  p_push(p, (struct db_param){s ? DBP_TEXT : DBP_NULL, 0, s});
}
/* Takes ownership of s. */
static void p_own(struct params *p, char *s) {
  p->own[p->nown++] = s;
  p_text(p, s);
}
/* Ids: 0 means "none" and is stored as NULL (foreign keys). */
static void p_ref(struct params *p, int64_t id) {
  if (id > 0)
    p_int(p, id);
  else
    p_push(p, (struct db_param){DBP_NULL, 0, NULL});
}
static void p_hex(struct params *p, const uint8_t *k, size_t n) {
  char *h = tc_xmalloc(2 * n + 1);
  tc_hex_encode(k, n, h);
  p_own(p, h);
}
static void p_strv(struct params *p, const struct tc_strv *sv) { p_own(p, tc_strv_to_json(sv)); }
static void p_ip(struct params *p, bool has, int af, const uint8_t *addr) {
  if (!has) {
    p_push(p, (struct db_param){DBP_NULL, 0, NULL});
    return;
  }
  char buf[INET6_ADDRSTRLEN];
  inet_ntop(af, addr, buf, sizeof buf);
  p_own(p, tc_xstrdup(buf));
}
static void params_free(struct params *p) {
  if (!p) return;
  for (int i = 0; i < p->nown; i++) free(p->own[i]);
  p->nown = 0;
  p->n = 0;
}

/* Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
 * PostgreSQL rejects anything else mid-transaction while SQLite would store
 * it; checking before sending keeps both backends alike and the tx usable. */
static bool utf8_valid(const unsigned char *s) {
  while (*s) {
    unsigned c = *s;
    int n;
    unsigned min;
    if (c < 0x80) {
      s++;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      n = 1, min = 0x80, c &= 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2, min = 0x800, c &= 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3, min = 0x10000, c &= 0x07;
    } else {
      return false;
    }
    for (int i = 1; i <= n; i++) {
      if ((s[i] & 0xc0) != 0x80) return false;
      c = (c << 6) | (s[i] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return false;
    s += n + 1;
  }
  return true;
}

static int run(struct tc_tx *tx, const char *sql, struct params *p, struct db_result *res,
               struct tc_err *err) {
  if (res) memset(res, 0, sizeof *res);
  if (!tx) return tc_err_set(err, TC_EINVAL, "storage: no transaction");
  if ((tx->flags & TC_TX_READONLY) && strncmp(sql, "SELECT ", 7) != 0)
    return tc_err_set(err, TC_EINVAL, "storage: write in a read-only transaction");
  for (int i = 0; p && i < p->n; i++)
    if (p->v[i].type == DBP_TEXT && !utf8_valid((const unsigned char *)p->v[i].s))
      return tc_err_set(err, TC_EINVAL, "storage: text value %d is not valid UTF-8", i + 1);
  if (tx->failed)
    return tc_err_set(err, TC_EDB, "storage: transaction already failed (%s); roll it back",
                      tc_strerror(tx->fail_code));
  int code = tx->st->ops->exec(tx, sql, p ? p->v : NULL, p ? p->n : 0, res, err);
  if (code) {
    tx->failed = true;
    tx->fail_code = code;
  }
  return code;
}

static int64_t c_int(const char *s) { return s ? strtoll(s, NULL, 10) : 0; }
static bool c_bool(const char *s) { return s && (s[0] == '1' || s[0] == 't' || s[0] == 'T'); }
static char *c_str(const char *s) { return s ? tc_xstrdup(s) : NULL; }
static int c_hex(const char *s, uint8_t *out, size_t n) {
  if (!s || strlen(s) != 2 * n) return TC_EDB;
  return tc_hex_decode(s, 2 * n, out, n) ? TC_EDB : 0;
}
static int c_ip(const char *s, bool *has, int af, uint8_t *out) {
  *has = false;
  if (!s) return 0;
  if (inet_pton(af, s, out) != 1) return TC_EDB;
  *has = true;
  return 0;
}
static int c_strv(const char *s, struct tc_strv *out) { return tc_strv_from_json(s, out) ? TC_EDB : 0; }

/* ---- row decoders: each fills *out completely or frees what it filled ---------- */

#define USER_COLS "id, name, display_name, email, provider, provider_id, profile_pic_url, created_at, updated_at"
static int dec_user(const struct db_result *r, int i, void *vout) {
  struct tc_user *u = vout;
  memset(u, 0, sizeof *u);
  u->id = c_int(db_cell(r, i, 0));
  u->name = c_str(db_cell(r, i, 1));
  u->display_name = c_str(db_cell(r, i, 2));
  u->email = c_str(db_cell(r, i, 3));
  u->provider = c_str(db_cell(r, i, 4));
  u->provider_id = c_str(db_cell(r, i, 5));
  u->profile_pic_url = c_str(db_cell(r, i, 6));
  u->created_at = c_int(db_cell(r, i, 7));
  u->updated_at = c_int(db_cell(r, i, 8));
  return 0;
}
static void free_user(void *p) { tc_user_free(p); }

#define NODE_COLS                                                                               \
  "id, machine_key, node_key, disco_key, ipv4, ipv6, hostname, given_name, user_id, tags, "    \
  "hostinfo, endpoints, announced_routes, approved_routes, expiry, last_seen, register_method, " \
  "auth_key_id, ephemeral, home_derp, cap_version, created_at, updated_at"
static int dec_node(const struct db_result *r, int i, void *vout) {
  struct tc_node *n = vout;
  memset(n, 0, sizeof *n);
  int bad = 0;
  n->id = c_int(db_cell(r, i, 0));
  bad |= c_hex(db_cell(r, i, 1), n->machine_key, TC_KEY_LEN);
  bad |= c_hex(db_cell(r, i, 2), n->node_key, TC_KEY_LEN);
  bad |= c_hex(db_cell(r, i, 3), n->disco_key, TC_KEY_LEN);
  bad |= c_ip(db_cell(r, i, 4), &n->has_ipv4, AF_INET, n->ipv4);
  bad |= c_ip(db_cell(r, i, 5), &n->has_ipv6, AF_INET6, n->ipv6);
  n->hostname = c_str(db_cell(r, i, 6));
  n->given_name = c_str(db_cell(r, i, 7));
  n->user_id = c_int(db_cell(r, i, 8));
  bad |= c_strv(db_cell(r, i, 9), &n->tags);
  n->hostinfo_json = c_str(db_cell(r, i, 10));
  bad |= c_strv(db_cell(r, i, 11), &n->endpoints);
  bad |= c_strv(db_cell(r, i, 12), &n->announced_routes);
  bad |= c_strv(db_cell(r, i, 13), &n->approved_routes);
  n->expiry = c_int(db_cell(r, i, 14));
  n->last_seen = c_int(db_cell(r, i, 15));
  n->register_method = (enum tc_register_method)c_int(db_cell(r, i, 16));
  n->auth_key_id = c_int(db_cell(r, i, 17));
  n->ephemeral = c_bool(db_cell(r, i, 18));
  n->home_derp = (int32_t)c_int(db_cell(r, i, 19));
  n->cap_version = (int32_t)c_int(db_cell(r, i, 20));
  n->created_at = c_int(db_cell(r, i, 21));
  n->updated_at = c_int(db_cell(r, i, 22));
  if (bad) {
    tc_node_free(n);
    return TC_EDB;
  }
  return 0;
}
static void free_node(void *p) { tc_node_free(p); }

#define PAK_COLS "id, prefix, hash, user_id, reusable, ephemeral, used, tags, expiration, created_at"
static int dec_pak(const struct db_result *r, int i, void *vout) {
  struct tc_preauth_key *k = vout;
  memset(k, 0, sizeof *k);
  int bad = 0;
  k->id = c_int(db_cell(r, i, 0));
  k->prefix = c_str(db_cell(r, i, 1));
  bad |= c_hex(db_cell(r, i, 2), k->hash, sizeof k->hash);
  k->user_id = c_int(db_cell(r, i, 3));
  k->reusable = c_bool(db_cell(r, i, 4));
  k->ephemeral = c_bool(db_cell(r, i, 5));
  k->used = c_bool(db_cell(r, i, 6));
  bad |= c_strv(db_cell(r, i, 7), &k->tags);
  k->expiration = c_int(db_cell(r, i, 8));
  k->created_at = c_int(db_cell(r, i, 9));
  if (bad) {
    tc_preauth_key_free(k);
    return TC_EDB;
  }
  return 0;
}
static void free_pak(void *p) { tc_preauth_key_free(p); }

#define APIKEY_COLS "id, prefix, hash, expiration, last_seen, created_at"
static int dec_apikey(const struct db_result *r, int i, void *vout) {
  struct tc_api_key *k = vout;
  memset(k, 0, sizeof *k);
  k->id = c_int(db_cell(r, i, 0));
  k->prefix = c_str(db_cell(r, i, 1));
  int bad = c_hex(db_cell(r, i, 2), k->hash, sizeof k->hash);
  k->expiration = c_int(db_cell(r, i, 3));
  k->last_seen = c_int(db_cell(r, i, 4));
  k->created_at = c_int(db_cell(r, i, 5));
  if (bad) {
    tc_api_key_free(k);
    return TC_EDB;
  }
  return 0;
}
static void free_apikey(void *p) { tc_api_key_free(p); }

#define POLICY_COLS "id, data, actor, created_at"
static int dec_policy(const struct db_result *r, int i, void *vout) {
  struct tc_policy_rec *p = vout;
  memset(p, 0, sizeof *p);
  p->id = c_int(db_cell(r, i, 0));
  p->data = c_str(db_cell(r, i, 1));
  p->actor = c_str(db_cell(r, i, 2));
  p->created_at = c_int(db_cell(r, i, 3));
  return 0;
}
static void free_policy(void *p) { tc_policy_rec_free(p); }

#define AUDIT_COLS "id, at, actor, action, target, detail"
static int dec_audit(const struct db_result *r, int i, void *vout) {
  struct tc_audit *a = vout;
  memset(a, 0, sizeof *a);
  a->id = c_int(db_cell(r, i, 0));
  a->at = c_int(db_cell(r, i, 1));
  a->actor = c_str(db_cell(r, i, 2));
  a->action = c_str(db_cell(r, i, 3));
  a->target = c_str(db_cell(r, i, 4));
  a->detail = c_str(db_cell(r, i, 5));
  return 0;
}
static void free_audit(void *p) { tc_audit_free(p); }

typedef int (*dec_fn)(const struct db_result *, int, void *);
typedef void (*free_fn)(void *);

/* Runs a query expected to yield at most one row; TC_ENOENT names `what`. */
static int fetch_one(struct tc_tx *tx, const char *sql, struct params *p, dec_fn dec, void *out,
                     const char *what, struct tc_err *err) {
  struct db_result r;
  int code = run(tx, sql, p, &r, err);
  params_free(p);
  if (code) return code;
  if (r.nrows == 0)
    code = tc_err_set(err, TC_ENOENT, "%s not found", what);
  else if (dec(&r, 0, out))
    code = tc_err_set(err, TC_EDB, "storage: corrupt row for %s", what);
  db_result_free(&r);
  return code;
}

static int fetch_list(struct tc_tx *tx, const char *sql, struct params *p, dec_fn dec, free_fn fr,
                      size_t elsize, void **out, size_t *n, struct tc_err *err) {
  *out = NULL;
  *n = 0;
  struct db_result r;
  int code = run(tx, sql, p, &r, err);
  params_free(p);
  if (code) return code;
  char *arr = r.nrows ? tc_xcalloc((size_t)r.nrows, elsize) : NULL;
  for (int i = 0; i < r.nrows; i++) {
    if (dec(&r, i, arr + (size_t)i * elsize)) {
      for (int j = 0; j < i; j++) fr(arr + (size_t)j * elsize);
      free(arr);
      db_result_free(&r);
      return tc_err_set(err, TC_EDB, "storage: corrupt row %d in list", i);
    }
  }
  *out = arr;
  *n = (size_t)r.nrows;
  db_result_free(&r);
  return 0;
}

/* Runs an INSERT ... RETURNING id. */
static int insert_id(struct tc_tx *tx, const char *sql, struct params *p, int64_t *id,
                     struct tc_err *err) {
  struct db_result r;
  int code = run(tx, sql, p, &r, err);
  params_free(p);
  if (code) return code;
  if (r.nrows != 1 || r.ncols < 1 || !db_cell(&r, 0, 0))
    code = tc_err_set(err, TC_EDB, "storage: insert returned no id");
  else
    *id = c_int(db_cell(&r, 0, 0));
  db_result_free(&r);
  return code;
}

/* Runs an UPDATE/DELETE of one row by id; TC_ENOENT when nothing matched. */
static int change_one(struct tc_tx *tx, const char *sql, struct params *p, const char *what,
                      int64_t id, struct tc_err *err) {
  struct db_result r;
  int code = run(tx, sql, p, &r, err);
  params_free(p);
  if (code) return code;
  if (r.changes == 0) code = tc_err_set(err, TC_ENOENT, "%s %lld not found", what, (long long)id);
  db_result_free(&r);
  return code;
}

/* ---- open / close / migrations ----------------------------------------------- */

int tc_store_latest_version(void) { return tc_migrations[tc_n_migrations - 1].version; }

static int migrate(struct tc_store *st, struct tc_err *err) {
  int latest = tc_store_latest_version();
  int target = st->cfg.migrate_to > 0 ? TC_MIN(st->cfg.migrate_to, latest) : latest;
  struct tc_tx *tx = NULL;
  struct db_result r;
  struct params p = {0};
  int code = tc_store_begin(st, TX_MIGRATE | TC_TX_DURABLE, &tx, err);
  if (code) return code;
  /* Two servers starting at once must not both migrate. SQLite: BEGIN
   * IMMEDIATE already serialises; PostgreSQL: a transaction-scoped lock. */
  if (st->cfg.type == TC_DB_POSTGRES &&
      (code = run(tx, "SELECT pg_advisory_xact_lock(7589164033)", NULL, NULL, err)))
    goto out;
  code = st->ops->script(tx,
                         "CREATE TABLE IF NOT EXISTS schema_migrations ("
                         " version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
                         err);
  if (code) goto out;
  if ((code = run(tx, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations", NULL, &r, err)))
    goto out;
  int cur = r.nrows ? (int)c_int(db_cell(&r, 0, 0)) : 0;
  int from = cur;
  db_result_free(&r);
  if (cur > latest) {
    code = tc_err_set(err, TC_ESCHEMA,
                      "database schema version %d is newer than this tailcoat supports (%d); "
                      "upgrade tailcoat",
                      cur, latest);
    goto out;
  }
  for (int i = 0; i < tc_n_migrations; i++) {
    const struct migration *m = &tc_migrations[i];
    if (m->version <= cur || m->version > target) continue;
    code = st->ops->script(tx, st->cfg.type == TC_DB_POSTGRES ? m->pg : m->sqlite, err);
    if (code) {
      tc_err_prefix(err, "migration %d", m->version);
      goto out;
    }
    p_int(&p, m->version);
    p_int(&p, tc_now());
    code = run(tx, "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", &p, NULL, err);
    params_free(&p);
    if (code) goto out;
    cur = m->version;
  }
  code = tc_tx_commit(tx, err);
  tx = NULL;
  if (!code) {
    if (cur != from) tc_info("storage: database schema migrated from version %d to %d", from, cur);
    st->schema_version = cur;
  }
out:
  tc_tx_rollback(tx);
  return code;
}

int tc_store_open(const struct tc_store_config *cfg, struct tc_store **out, struct tc_err *err) {
  *out = NULL;
  struct tc_store *st = tc_xcalloc(1, sizeof *st);
  st->cfg = *cfg;
  st->cfg.sqlite_path = cfg->sqlite_path ? tc_xstrdup(cfg->sqlite_path) : NULL;
  st->cfg.pg_conninfo = cfg->pg_conninfo ? tc_xstrdup(cfg->pg_conninfo) : NULL;
  int code;
  if (cfg->type == TC_DB_SQLITE)
    st->ops = &tc_sqlite_ops;
  else if (cfg->type == TC_DB_POSTGRES)
    st->ops = &tc_pg_ops;
  else {
    code = tc_err_set(err, TC_EINVAL, "storage: unknown database type %d", cfg->type);
    goto fail;
  }
  if ((code = st->ops->open(st, err))) goto fail;
  if ((code = migrate(st, err))) goto fail;
  *out = st;
  return 0;
fail:
  tc_store_close(st);
  return code;
}

void tc_store_close(struct tc_store *st) {
  if (!st) return;
  if (st->ops && st->be) st->ops->close(st);
  free((char *)st->cfg.sqlite_path);
  free((char *)st->cfg.pg_conninfo);
  free(st);
}

int tc_store_ping(struct tc_store *st, struct tc_err *err) { return st->ops->ping(st, err); }
int tc_store_schema_version(struct tc_store *st) { return st->schema_version; }
int tc_store_type(const struct tc_store *st) { return st->cfg.type; }

/* ---- transactions --------------------------------------------------------------- */

int tc_store_begin(struct tc_store *st, unsigned flags, struct tc_tx **out, struct tc_err *err) {
  *out = NULL;
  struct tc_tx *tx = tc_xcalloc(1, sizeof *tx);
  tx->st = st;
  tx->flags = flags;
  int code = st->ops->begin(st, tx, err);
  if (code) {
    free(tx);
    return code;
  }
  *out = tx;
  return 0;
}

int tc_tx_commit_ticket(struct tc_tx *tx, uint64_t *ticket, struct tc_err *err) {
  if (ticket) *ticket = 0;
  if (!tx) return tc_err_set(err, TC_EINVAL, "storage: commit without a transaction");
  struct tc_store *st = tx->st;
  int code;
  uint64_t t = 0;
  if (tx->failed) {
    st->ops->rollback(tx);
    code = tc_err_set(err, TC_EDB, "storage: transaction failed earlier (%s); rolled back",
                      tc_strerror(tx->fail_code));
  } else {
    code = st->ops->commit(tx, &t, err);
  }
  free(tx);
  if (code) return code;
  if (!ticket) return tc_store_sync(st, t, err);
  *ticket = t;
  return 0;
}

int tc_tx_commit(struct tc_tx *tx, struct tc_err *err) { return tc_tx_commit_ticket(tx, NULL, err); }

int tc_store_sync(struct tc_store *st, uint64_t ticket, struct tc_err *err) {
  if (!ticket || !st->ops->sync) return 0;
  return st->ops->sync(st, ticket, err);
}

uint64_t tc_store_syncs(const struct tc_store *st) { return atomic_load(&st->syncs); }

void tc_tx_rollback(struct tc_tx *tx) {
  if (!tx) return;
  tx->st->ops->rollback(tx);
  free(tx);
}

/* ---- users ------------------------------------------------------------------------- */

static void user_params(struct params *p, const struct tc_user *u) {
  p_text(p, u->name);
  p_text(p, u->display_name);
  p_text(p, u->email);
  p_text(p, u->provider);
  p_text(p, u->provider_id);
  p_text(p, u->profile_pic_url);
  p_int(p, u->created_at);
  p_int(p, u->updated_at);
}

int tc_store_user_insert(struct tc_tx *tx, struct tc_user *u, struct tc_err *err) {
  if (!u->name) return tc_err_set(err, TC_EINVAL, "user name missing");
  if (!u->created_at) u->created_at = tc_now();
  if (!u->updated_at) u->updated_at = u->created_at;
  struct params p = {0};
  user_params(&p, u);
  return insert_id(tx,
                   "INSERT INTO users (name, display_name, email, provider, provider_id, "
                   "profile_pic_url, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                   &p, &u->id, err);
}

int tc_store_user_update(struct tc_tx *tx, struct tc_user *u, struct tc_err *err) {
  if (!u->name) return tc_err_set(err, TC_EINVAL, "user name missing");
  u->updated_at = tc_now();
  struct params p = {0};
  user_params(&p, u);
  p_int(&p, u->id);
  return change_one(tx,
                    "UPDATE users SET name = ?, display_name = ?, email = ?, provider = ?, "
                    "provider_id = ?, profile_pic_url = ?, created_at = ?, updated_at = ? WHERE id = ?",
                    &p, "user", u->id, err);
}

int tc_store_user_delete(struct tc_tx *tx, int64_t id, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, id);
  int code = change_one(tx, "DELETE FROM users WHERE id = ?", &p, "user", id, err);
  if (code == TC_ECONFLICT)
    tc_err_set(err, code, "user %lld still owns nodes or pre-auth keys; delete those first",
               (long long)id);
  return code;
}

int tc_store_user_get(struct tc_tx *tx, int64_t id, struct tc_user *out, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, id);
  return fetch_one(tx, "SELECT " USER_COLS " FROM users WHERE id = ?", &p, dec_user, out, "user", err);
}

int tc_store_user_get_by_name(struct tc_tx *tx, const char *name, struct tc_user *out,
                              struct tc_err *err) {
  struct params p = {0};
  p_text(&p, name ? name : "");
  return fetch_one(tx, "SELECT " USER_COLS " FROM users WHERE name = ?", &p, dec_user, out, "user",
                   err);
}

int tc_store_user_get_by_provider_id(struct tc_tx *tx, const char *provider_id,
                                     struct tc_user *out, struct tc_err *err) {
  if (!provider_id || !*provider_id) return tc_err_set(err, TC_ENOENT, "user not found");
  struct params p = {0};
  p_text(&p, provider_id);
  return fetch_one(tx, "SELECT " USER_COLS " FROM users WHERE provider_id = ?", &p, dec_user, out,
                   "user with this provider id", err);
}

int tc_store_user_list(struct tc_tx *tx, struct tc_user **out, size_t *n, struct tc_err *err) {
  return fetch_list(tx, "SELECT " USER_COLS " FROM users ORDER BY id", NULL, dec_user, free_user,
                    sizeof **out, (void **)out, n, err);
}

/* ---- nodes ---------------------------------------------------------------------------- */

static void node_params(struct params *p, const struct tc_node *n) {
  p_hex(p, n->machine_key, TC_KEY_LEN);
  p_hex(p, n->node_key, TC_KEY_LEN);
  p_hex(p, n->disco_key, TC_KEY_LEN);
  p_ip(p, n->has_ipv4, AF_INET, n->ipv4);
  p_ip(p, n->has_ipv6, AF_INET6, n->ipv6);
  p_text(p, n->hostname);
  p_text(p, n->given_name);
  p_ref(p, n->user_id);
  p_strv(p, &n->tags);
  p_text(p, n->hostinfo_json);
  p_strv(p, &n->endpoints);
  p_strv(p, &n->announced_routes);
  p_strv(p, &n->approved_routes);
  p_int(p, n->expiry);
  p_int(p, n->last_seen);
  p_int(p, n->register_method);
  p_ref(p, n->auth_key_id);
  p_bool(p, n->ephemeral);
  p_int(p, n->home_derp);
  p_int(p, n->cap_version);
  p_int(p, n->created_at);
  p_int(p, n->updated_at);
}

int tc_store_node_insert(struct tc_tx *tx, struct tc_node *n, struct tc_err *err) {
  if (!n->created_at) n->created_at = tc_now();
  if (!n->updated_at) n->updated_at = n->created_at;
  struct params p = {0};
  node_params(&p, n);
  int code = insert_id(tx,
                       "INSERT INTO nodes (machine_key, node_key, disco_key, ipv4, ipv6, hostname, "
                       "given_name, user_id, tags, hostinfo, endpoints, announced_routes, "
                       "approved_routes, expiry, last_seen, register_method, auth_key_id, ephemeral, "
                       "home_derp, cap_version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, "
                       "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                       &p, &n->id, err);
  if (code == TC_ECONFLICT)
    tc_err_set(err, code, "node references a user (%lld) or pre-auth key (%lld) that does not exist",
               (long long)n->user_id, (long long)n->auth_key_id);
  return code;
}

int tc_store_node_update(struct tc_tx *tx, struct tc_node *n, struct tc_err *err) {
  n->updated_at = tc_now();
  struct params p = {0};
  node_params(&p, n);
  p_int(&p, n->id);
  int code = change_one(tx,
                        "UPDATE nodes SET machine_key = ?, node_key = ?, disco_key = ?, ipv4 = ?, "
                        "ipv6 = ?, hostname = ?, given_name = ?, user_id = ?, tags = ?, hostinfo = ?, "
                        "endpoints = ?, announced_routes = ?, approved_routes = ?, expiry = ?, "
                        "last_seen = ?, register_method = ?, auth_key_id = ?, ephemeral = ?, "
                        "home_derp = ?, cap_version = ?, created_at = ?, updated_at = ? WHERE id = ?",
                        &p, "node", n->id, err);
  if (code == TC_ECONFLICT)
    tc_err_set(err, code, "node references a user (%lld) or pre-auth key (%lld) that does not exist",
               (long long)n->user_id, (long long)n->auth_key_id);
  return code;
}

int tc_store_node_update_client(struct tc_tx *tx, struct tc_node *n, struct tc_err *err) {
  n->updated_at = tc_now();
  struct params p = {0};
  p_text(&p, n->hostname);
  p_text(&p, n->hostinfo_json);
  p_strv(&p, &n->endpoints);
  p_hex(&p, n->disco_key, TC_KEY_LEN);
  p_int(&p, n->home_derp);
  p_int(&p, n->cap_version);
  p_strv(&p, &n->announced_routes);
  p_strv(&p, &n->approved_routes);
  p_int(&p, n->last_seen);
  p_int(&p, n->updated_at);
  p_int(&p, n->id);
  return change_one(tx,
                    "UPDATE nodes SET hostname = ?, hostinfo = ?, endpoints = ?, disco_key = ?, "
                    "home_derp = ?, cap_version = ?, announced_routes = ?, approved_routes = ?, "
                    "last_seen = ?, updated_at = ? WHERE id = ?",
                    &p, "node", n->id, err);
}

int tc_store_node_touch(struct tc_tx *tx, int64_t id, int64_t last_seen, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, last_seen);
  p_int(&p, id);
  return change_one(tx, "UPDATE nodes SET last_seen = ? WHERE id = ?", &p, "node", id, err);
}

int tc_store_node_delete(struct tc_tx *tx, int64_t id, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, id);
  return change_one(tx, "DELETE FROM nodes WHERE id = ?", &p, "node", id, err);
}

int tc_store_node_get(struct tc_tx *tx, int64_t id, struct tc_node *out, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, id);
  return fetch_one(tx, "SELECT " NODE_COLS " FROM nodes WHERE id = ?", &p, dec_node, out, "node", err);
}

int tc_store_node_get_by_node_key(struct tc_tx *tx, const uint8_t key[TC_KEY_LEN],
                                  struct tc_node *out, struct tc_err *err) {
  struct params p = {0};
  p_hex(&p, key, TC_KEY_LEN);
  return fetch_one(tx, "SELECT " NODE_COLS " FROM nodes WHERE node_key = ?", &p, dec_node, out,
                   "node with this node key", err);
}

int tc_store_node_get_by_machine_key(struct tc_tx *tx, const uint8_t key[TC_KEY_LEN],
                                     struct tc_node *out, struct tc_err *err) {
  struct params p = {0};
  p_hex(&p, key, TC_KEY_LEN);
  return fetch_one(tx, "SELECT " NODE_COLS " FROM nodes WHERE machine_key = ?", &p, dec_node, out,
                   "node with this machine key", err);
}

int tc_store_node_list(struct tc_tx *tx, struct tc_node **out, size_t *n, struct tc_err *err) {
  return fetch_list(tx, "SELECT " NODE_COLS " FROM nodes ORDER BY id", NULL, dec_node, free_node,
                    sizeof **out, (void **)out, n, err);
}

/* ---- pre-auth keys ----------------------------------------------------------------------- */

int tc_store_preauth_insert(struct tc_tx *tx, struct tc_preauth_key *k, struct tc_err *err) {
  if (!k->prefix || !*k->prefix) return tc_err_set(err, TC_EINVAL, "pre-auth key prefix missing");
  if (!k->created_at) k->created_at = tc_now();
  struct params p = {0};
  p_text(&p, k->prefix);
  p_hex(&p, k->hash, sizeof k->hash);
  p_ref(&p, k->user_id);
  p_bool(&p, k->reusable);
  p_bool(&p, k->ephemeral);
  p_bool(&p, k->used);
  p_strv(&p, &k->tags);
  p_int(&p, k->expiration);
  p_int(&p, k->created_at);
  int code = insert_id(tx,
                       "INSERT INTO preauth_keys (prefix, hash, user_id, reusable, ephemeral, used, "
                       "tags, expiration, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                       &p, &k->id, err);
  if (code == TC_ECONFLICT)
    tc_err_set(err, code, "pre-auth key owner user %lld does not exist", (long long)k->user_id);
  return code;
}

int tc_store_preauth_get(struct tc_tx *tx, int64_t id, struct tc_preauth_key *out,
                         struct tc_err *err) {
  struct params p = {0};
  p_int(&p, id);
  return fetch_one(tx, "SELECT " PAK_COLS " FROM preauth_keys WHERE id = ?", &p, dec_pak, out,
                   "pre-auth key", err);
}

int tc_store_preauth_get_by_prefix(struct tc_tx *tx, const char *prefix,
                                   struct tc_preauth_key *out, struct tc_err *err) {
  struct params p = {0};
  p_text(&p, prefix ? prefix : "");
  return fetch_one(tx, "SELECT " PAK_COLS " FROM preauth_keys WHERE prefix = ?", &p, dec_pak, out,
                   "pre-auth key", err);
}

int tc_store_preauth_list(struct tc_tx *tx, int64_t user_id, struct tc_preauth_key **out,
                          size_t *n, struct tc_err *err) {
  struct params p = {0};
  const char *sql;
  if (user_id < 0) {
    sql = "SELECT " PAK_COLS " FROM preauth_keys ORDER BY id";
  } else if (user_id == 0) {
    sql = "SELECT " PAK_COLS " FROM preauth_keys WHERE user_id IS NULL ORDER BY id";
  } else {
    sql = "SELECT " PAK_COLS " FROM preauth_keys WHERE user_id = ? ORDER BY id";
    p_int(&p, user_id);
  }
  return fetch_list(tx, sql, &p, dec_pak, free_pak, sizeof **out, (void **)out, n, err);
}

int tc_store_preauth_expire(struct tc_tx *tx, int64_t id, int64_t at, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, at);
  p_int(&p, id);
  return change_one(tx, "UPDATE preauth_keys SET expiration = ? WHERE id = ?", &p, "pre-auth key",
                    id, err);
}

int tc_store_preauth_consume(struct tc_tx *tx, int64_t id, struct tc_err *err) {
  struct params p = {0};
  struct db_result r;
  p_int(&p, id);
  /* The WHERE clause is the whole race: of N concurrent consumers of a
   * single-use key, the database lets exactly one UPDATE match a row (the
   * others block on the row lock, then re-check used and match nothing). */
  int code = run(tx, "UPDATE preauth_keys SET used = TRUE WHERE id = ? AND (reusable OR NOT used)",
                 &p, &r, err);
  params_free(&p);
  if (code) return code;
  int64_t changed = r.changes;
  db_result_free(&r);
  if (changed > 0) return 0;
  p_int(&p, id);
  code = run(tx, "SELECT used FROM preauth_keys WHERE id = ?", &p, &r, err);
  params_free(&p);
  if (code) return code;
  if (r.nrows == 0)
    code = tc_err_set(err, TC_ENOENT, "pre-auth key %lld not found", (long long)id);
  else
    code = tc_err_set(err, TC_ECONFLICT, "pre-auth key %lld has already been used", (long long)id);
  db_result_free(&r);
  return code;
}

int tc_store_preauth_delete(struct tc_tx *tx, int64_t id, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, id);
  return change_one(tx, "DELETE FROM preauth_keys WHERE id = ?", &p, "pre-auth key", id, err);
}

/* ---- API keys --------------------------------------------------------------------------------- */

int tc_store_apikey_insert(struct tc_tx *tx, struct tc_api_key *k, struct tc_err *err) {
  if (!k->prefix || !*k->prefix) return tc_err_set(err, TC_EINVAL, "API key prefix missing");
  if (!k->created_at) k->created_at = tc_now();
  struct params p = {0};
  p_text(&p, k->prefix);
  p_hex(&p, k->hash, sizeof k->hash);
  p_int(&p, k->expiration);
  p_int(&p, k->last_seen);
  p_int(&p, k->created_at);
  return insert_id(tx,
                   "INSERT INTO api_keys (prefix, hash, expiration, last_seen, created_at) "
                   "VALUES (?, ?, ?, ?, ?) RETURNING id",
                   &p, &k->id, err);
}

int tc_store_apikey_get_by_prefix(struct tc_tx *tx, const char *prefix, struct tc_api_key *out,
                                  struct tc_err *err) {
  struct params p = {0};
  p_text(&p, prefix ? prefix : "");
  return fetch_one(tx, "SELECT " APIKEY_COLS " FROM api_keys WHERE prefix = ?", &p, dec_apikey, out,
                   "API key", err);
}

int tc_store_apikey_list(struct tc_tx *tx, struct tc_api_key **out, size_t *n,
                         struct tc_err *err) {
  return fetch_list(tx, "SELECT " APIKEY_COLS " FROM api_keys ORDER BY id", NULL, dec_apikey,
                    free_apikey, sizeof **out, (void **)out, n, err);
}

int tc_store_apikey_expire(struct tc_tx *tx, int64_t id, int64_t at, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, at);
  p_int(&p, id);
  return change_one(tx, "UPDATE api_keys SET expiration = ? WHERE id = ?", &p, "API key", id, err);
}

int tc_store_apikey_touch(struct tc_tx *tx, int64_t id, int64_t last_seen, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, last_seen);
  p_int(&p, id);
  return change_one(tx, "UPDATE api_keys SET last_seen = ? WHERE id = ?", &p, "API key", id, err);
}

int tc_store_apikey_delete(struct tc_tx *tx, int64_t id, struct tc_err *err) {
  struct params p = {0};
  p_int(&p, id);
  return change_one(tx, "DELETE FROM api_keys WHERE id = ?", &p, "API key", id, err);
}

/* ---- policies ------------------------------------------------------------------------------------ */

int tc_store_policy_insert(struct tc_tx *tx, struct tc_policy_rec *pol, struct tc_err *err) {
  if (!pol->data) return tc_err_set(err, TC_EINVAL, "policy data missing");
  if (!pol->created_at) pol->created_at = tc_now();
  struct params p = {0};
  p_text(&p, pol->data);
  p_text(&p, pol->actor);
  p_int(&p, pol->created_at);
  return insert_id(tx, "INSERT INTO policies (data, actor, created_at) VALUES (?, ?, ?) RETURNING id",
                   &p, &pol->id, err);
}

int tc_store_policy_latest(struct tc_tx *tx, struct tc_policy_rec *out, struct tc_err *err) {
  return fetch_one(tx, "SELECT " POLICY_COLS " FROM policies ORDER BY id DESC LIMIT 1", NULL,
                   dec_policy, out, "policy", err);
}

int tc_store_policy_list(struct tc_tx *tx, int limit, struct tc_policy_rec **out, size_t *n,
                         struct tc_err *err) {
  struct params p = {0};
  p_int(&p, limit > 0 ? limit : INT64_MAX);
  return fetch_list(tx, "SELECT " POLICY_COLS " FROM policies ORDER BY id DESC LIMIT ?", &p,
                    dec_policy, free_policy, sizeof **out, (void **)out, n, err);
}

/* ---- audit log ----------------------------------------------------------------------------------- */

int tc_store_audit_insert(struct tc_tx *tx, struct tc_audit *a, struct tc_err *err) {
  if (!a->action) return tc_err_set(err, TC_EINVAL, "audit action missing");
  if (!a->at) a->at = tc_now();
  struct params p = {0};
  p_int(&p, a->at);
  p_text(&p, a->actor);
  p_text(&p, a->action);
  p_text(&p, a->target);
  p_text(&p, a->detail);
  return insert_id(tx,
                   "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?) "
                   "RETURNING id",
                   &p, &a->id, err);
}

int tc_store_audit_list(struct tc_tx *tx, int limit, struct tc_audit **out, size_t *n,
                        struct tc_err *err) {
  struct params p = {0};
  p_int(&p, limit > 0 ? limit : INT64_MAX);
  return fetch_list(tx, "SELECT " AUDIT_COLS " FROM audit_log ORDER BY id DESC LIMIT ?", &p,
                    dec_audit, free_audit, sizeof **out, (void **)out, n, err);
}

/* ---- bulk load and array helpers --------------------------------------------------------------------- */

int tc_store_load_all(struct tc_store *st, struct tc_store_data *out, struct tc_err *err) {
  memset(out, 0, sizeof *out);
  struct tc_tx *tx = NULL;
  int code = tc_store_begin(st, TX_SNAPSHOT, &tx, err);
  if (code) return code;
  if ((code = tc_store_user_list(tx, &out->users, &out->n_users, err))) goto fail;
  if ((code = tc_store_node_list(tx, &out->nodes, &out->n_nodes, err))) goto fail;
  if ((code = tc_store_preauth_list(tx, -1, &out->preauth_keys, &out->n_preauth_keys, err))) goto fail;
  if ((code = tc_store_apikey_list(tx, &out->api_keys, &out->n_api_keys, err))) goto fail;
  code = tc_store_policy_latest(tx, &out->policy, err);
  if (code == 0)
    out->has_policy = true;
  else if (code != TC_ENOENT)
    goto fail;
  code = tc_tx_commit(tx, err);
  tx = NULL;
  if (code) goto fail;
  if (err) {
    err->code = 0;
    err->msg[0] = 0;
  }
  return 0;
fail:
  tc_tx_rollback(tx);
  tc_store_data_free(out);
  return code;
}

void tc_store_data_free(struct tc_store_data *d) {
  if (!d) return;
  tc_store_free_users(d->users, d->n_users);
  tc_store_free_nodes(d->nodes, d->n_nodes);
  tc_store_free_preauth_keys(d->preauth_keys, d->n_preauth_keys);
  tc_store_free_api_keys(d->api_keys, d->n_api_keys);
  if (d->has_policy) tc_policy_rec_free(&d->policy);
  memset(d, 0, sizeof *d);
}

void tc_store_free_users(struct tc_user *v, size_t n) {
  for (size_t i = 0; v && i < n; i++) tc_user_free(&v[i]);
  free(v);
}
void tc_store_free_nodes(struct tc_node *v, size_t n) {
  for (size_t i = 0; v && i < n; i++) tc_node_free(&v[i]);
  free(v);
}
void tc_store_free_preauth_keys(struct tc_preauth_key *v, size_t n) {
  for (size_t i = 0; v && i < n; i++) tc_preauth_key_free(&v[i]);
  free(v);
}
void tc_store_free_api_keys(struct tc_api_key *v, size_t n) {
  for (size_t i = 0; v && i < n; i++) tc_api_key_free(&v[i]);
  free(v);
}
void tc_store_free_policies(struct tc_policy_rec *v, size_t n) {
  for (size_t i = 0; v && i < n; i++) tc_policy_rec_free(&v[i]);
  free(v);
}
void tc_store_free_audits(struct tc_audit *v, size_t n) {
  for (size_t i = 0; v && i < n; i++) tc_audit_free(&v[i]);
  free(v);
}
