/* test_storage: one suite for both storage backends. Built twice:
 * test_storage_sqlite (each case gets a fresh database file in a temp dir)
 * and test_storage_pg (SUITE_PG; each case gets a freshly created database
 * on the fixture server at TC_TEST_PG_URL, all dropped at exit). Cases that
 * only make sense for PostgreSQL (reconnect, multi-host) are under SUITE_PG. */
#include <errno.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/base.h"
#include "storage/store.h"
#include "tc_test.h"

/* ---- backend plumbing ------------------------------------------------------ */

static char *created[256];
static int ncreated;

#ifdef SUITE_PG
static char pg_host[512], pg_port[32], pg_user[128];

static void pg_parse_url(void) {
  const char *url = getenv("TC_TEST_PG_URL");
  if (!url) {
    fprintf(stderr, "TC_TEST_PG_URL not set\n");
    exit(2);
  }
  char *errmsg = NULL;
  PQconninfoOption *opts = PQconninfoParse(url, &errmsg);
  if (!opts) {
    fprintf(stderr, "bad TC_TEST_PG_URL: %s\n", errmsg ? errmsg : "?");
    exit(2);
  }
  for (PQconninfoOption *o = opts; o->keyword; o++) {
    if (!o->val) continue;
    if (!strcmp(o->keyword, "host")) snprintf(pg_host, sizeof pg_host, "%s", o->val);
    if (!strcmp(o->keyword, "port")) snprintf(pg_port, sizeof pg_port, "%s", o->val);
    if (!strcmp(o->keyword, "user")) snprintf(pg_user, sizeof pg_user, "%s", o->val);
  }
  PQconninfoFree(opts);
}

/* key=value conninfo for database db (owned). host may be a list. */
static char *pg_conninfo_for(const char *host, const char *db) {
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_printf(&b, "host='%s' dbname='%s' connect_timeout=5", host, db);
  if (*pg_port) tc_buf_printf(&b, " port='%s'", pg_port);
  if (*pg_user) tc_buf_printf(&b, " user='%s'", pg_user);
  return tc_buf_steal(&b, NULL);
}

/* Runs sql on the admin database; returns rows affected/returned or -1. */
static int pg_admin(const char *sql, const char *param) {
  PGconn *c = PQconnectdb(getenv("TC_TEST_PG_URL"));
  if (PQstatus(c) != CONNECTION_OK) {
    fprintf(stderr, "admin connect: %s", PQerrorMessage(c));
    PQfinish(c);
    return -1;
  }
  const char *vals[1] = {param};
  PGresult *r = PQexecParams(c, sql, param ? 1 : 0, NULL, vals, NULL, NULL, 0);
  int n = -1;
  if (PQresultStatus(r) == PGRES_TUPLES_OK)
    n = PQntuples(r);
  else if (PQresultStatus(r) == PGRES_COMMAND_OK)
    n = 0;
  else
    fprintf(stderr, "admin %s: %s", sql, PQresultErrorMessage(r));
  PQclear(r);
  PQfinish(c);
  return n;
}
#endif

/* Fills cfg with a brand-new empty database. Strings live until exit. */
static void fresh_db(struct tc_store_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
#ifdef SUITE_PG
  char name[64];
  uint8_t rnd[6];
  char hex[13];
  tc_random(rnd, sizeof rnd);
  tc_hex_encode(rnd, sizeof rnd, hex);
  /* Identifiers cannot be parameters; this name is made only of [a-z0-9_]. */
  snprintf(name, sizeof name, "tcst_%d_%s", (int)getpid(), hex);
  char *sql = tc_xasprintf("CREATE DATABASE %s", name);
  if (pg_admin(sql, NULL) < 0) {
    fprintf(stderr, "cannot create test database\n");
    exit(2);
  }
  free(sql);
  created[ncreated++] = tc_xstrdup(name);
  cfg->type = TC_DB_POSTGRES;
  cfg->pg_conninfo = pg_conninfo_for(pg_host, name);
  cfg->pg_max_conns = 8;
  created[ncreated++] = (char *)cfg->pg_conninfo; /* freed at exit */
#else
  char *dir = tc_test_tmpdir();
  cfg->type = TC_DB_SQLITE;
  cfg->sqlite_path = tc_xasprintf("%s/tailcoat.db", dir);
  /* test_storage_sqlite_nowal runs the suite in rollback-journal mode. */
  const char *wal = getenv("TC_TEST_SQLITE_WAL");
  cfg->sqlite_wal = !(wal && !strcmp(wal, "0"));
  created[ncreated++] = dir;
  created[ncreated++] = (char *)cfg->sqlite_path;
#endif
}

/* Executes constant SQL directly on the database behind cfg, bypassing the
 * store (to fake schema states). Returns 0 on success. */
static int raw_exec(const struct tc_store_config *cfg, const char *sql) {
#ifdef SUITE_PG
  PGconn *c = PQconnectdb(cfg->pg_conninfo);
  PGresult *r = PQexec(c, sql);
  int ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
  if (!ok) fprintf(stderr, "raw_exec: %s", PQresultErrorMessage(r));
  PQclear(r);
  PQfinish(c);
  return ok ? 0 : -1;
#else
  sqlite3 *db = NULL;
  int rc = sqlite3_open(cfg->sqlite_path, &db);
  if (rc == SQLITE_OK) rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
  if (rc != SQLITE_OK) fprintf(stderr, "raw_exec: %s\n", sqlite3_errmsg(db));
  sqlite3_close(db);
  return rc == SQLITE_OK ? 0 : -1;
#endif
}

static struct tc_store *open_fresh(struct tc_store_config *cfg) {
  fresh_db(cfg);
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  int rc = tc_store_open(cfg, &st, &err);
  if (rc) fprintf(stderr, "open: %s\n", err.msg);
  return st;
}

/* ---- record builders and comparisons --------------------------------------- */

static void fill_key(uint8_t *k, int seed, int salt) {
  for (int i = 0; i < TC_KEY_LEN; i++) k[i] = (uint8_t)(seed * 31 + salt * 7 + i);
}

static void make_user(struct tc_user *u, const char *name) {
  memset(u, 0, sizeof *u);
  u->name = tc_xstrdup(name);
}

static void make_node(struct tc_node *n, int seed, int64_t user_id) {
  memset(n, 0, sizeof *n);
  fill_key(n->machine_key, seed, 1);
  fill_key(n->node_key, seed, 2);
  fill_key(n->disco_key, seed, 3);
  n->user_id = user_id;
  n->hostname = tc_xasprintf("host-%d", seed);
}

static void check_user_eq(const struct tc_user *a, const struct tc_user *b) {
  TC_CHECK_INT(a->id, b->id);
#define SEQ(f) TC_CHECK((a->f == NULL && b->f == NULL) || (a->f && b->f && !strcmp(a->f, b->f)))
  SEQ(name);
  SEQ(display_name);
  SEQ(email);
  SEQ(provider);
  SEQ(provider_id);
  SEQ(profile_pic_url);
  TC_CHECK_INT(a->created_at, b->created_at);
  TC_CHECK_INT(a->updated_at, b->updated_at);
}

static bool strv_eq(const struct tc_strv *a, const struct tc_strv *b) {
  if (a->n != b->n) return false;
  for (size_t i = 0; i < a->n; i++)
    if (strcmp(a->v[i], b->v[i])) return false;
  return true;
}

static void check_node_eq(const struct tc_node *a, const struct tc_node *b) {
  TC_CHECK_INT(a->id, b->id);
  TC_CHECK(!memcmp(a->machine_key, b->machine_key, TC_KEY_LEN));
  TC_CHECK(!memcmp(a->node_key, b->node_key, TC_KEY_LEN));
  TC_CHECK(!memcmp(a->disco_key, b->disco_key, TC_KEY_LEN));
  TC_CHECK_INT(a->has_ipv4, b->has_ipv4);
  TC_CHECK_INT(a->has_ipv6, b->has_ipv6);
  if (a->has_ipv4 && b->has_ipv4) TC_CHECK(!memcmp(a->ipv4, b->ipv4, 4));
  if (a->has_ipv6 && b->has_ipv6) TC_CHECK(!memcmp(a->ipv6, b->ipv6, 16));
  SEQ(hostname);
  SEQ(given_name);
  TC_CHECK_INT(a->user_id, b->user_id);
  TC_CHECK(strv_eq(&a->tags, &b->tags));
  SEQ(hostinfo_json);
  TC_CHECK(strv_eq(&a->endpoints, &b->endpoints));
  TC_CHECK(strv_eq(&a->announced_routes, &b->announced_routes));
  TC_CHECK(strv_eq(&a->approved_routes, &b->approved_routes));
  TC_CHECK_INT(a->expiry, b->expiry);
  TC_CHECK_INT(a->last_seen, b->last_seen);
  TC_CHECK_INT(a->register_method, b->register_method);
  TC_CHECK_INT(a->auth_key_id, b->auth_key_id);
  TC_CHECK_INT(a->ephemeral, b->ephemeral);
  TC_CHECK_INT(a->home_derp, b->home_derp);
  TC_CHECK_INT(a->cap_version, b->cap_version);
  TC_CHECK_INT(a->created_at, b->created_at);
  TC_CHECK_INT(a->updated_at, b->updated_at);
}

static void check_pak_eq(const struct tc_preauth_key *a, const struct tc_preauth_key *b) {
  TC_CHECK_INT(a->id, b->id);
  SEQ(prefix);
  TC_CHECK(!memcmp(a->hash, b->hash, 32));
  TC_CHECK_INT(a->user_id, b->user_id);
  TC_CHECK_INT(a->reusable, b->reusable);
  TC_CHECK_INT(a->ephemeral, b->ephemeral);
  TC_CHECK_INT(a->used, b->used);
  TC_CHECK(strv_eq(&a->tags, &b->tags));
  TC_CHECK_INT(a->expiration, b->expiration);
  TC_CHECK_INT(a->created_at, b->created_at);
}

static void check_apikey_eq(const struct tc_api_key *a, const struct tc_api_key *b) {
  TC_CHECK_INT(a->id, b->id);
  SEQ(prefix);
  TC_CHECK(!memcmp(a->hash, b->hash, 32));
  TC_CHECK_INT(a->expiration, b->expiration);
  TC_CHECK_INT(a->last_seen, b->last_seen);
  TC_CHECK_INT(a->created_at, b->created_at);
}

/* Begin or fail the case. */
#define BEGIN(st, flags, tx)                                                  \
  do {                                                                        \
    struct tc_err e_ = {0};                                                   \
    int rc_ = tc_store_begin((st), (flags), &(tx), &e_);                      \
    if (rc_) fprintf(stderr, "  begin: %s\n", e_.msg);                        \
    TC_REQUIRE(rc_ == 0);                                                     \
  } while (0)
#define OK(call)                                                              \
  do {                                                                        \
    struct tc_err e_ = {0};                                                   \
    int rc_ = (call);                                                         \
    (void)e_;                                                                 \
    if (rc_) fprintf(stderr, "  %s:%d: %s -> %d\n", __FILE__, __LINE__, #call, rc_); \
    TC_REQUIRE(rc_ == 0);                                                     \
  } while (0)

/* ---- CRUD round trips ------------------------------------------------------- */

TC_TEST(open_and_version) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  TC_CHECK_INT(tc_store_ping(st, &err), 0);
  TC_CHECK_INT(tc_store_schema_version(st), tc_store_latest_version());
  TC_CHECK(tc_store_latest_version() >= 3);
  TC_CHECK_INT(tc_store_type(st), cfg.type);
  tc_store_close(st);
  /* Reopening an up-to-date database applies nothing and keeps the version. */
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  TC_CHECK_INT(tc_store_schema_version(st), tc_store_latest_version());
  tc_store_close(st);
}

TC_TEST(user_roundtrip) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u = {0};
  /* Quotes and SQL metacharacters must be stored verbatim: values are bound. */
  u.name = tc_xstrdup("ali'ce\"; DROP TABLE users;--");
  u.display_name = tc_xstrdup("Alice Ünïcode ✓");
  u.email = tc_xstrdup("alice@example.com");
  u.provider = tc_xstrdup("oidc");
  u.provider_id = tc_xstrdup("https://idp.example.com/alice");
  u.profile_pic_url = tc_xstrdup("https://example.com/a.png");
  u.created_at = 1700000000;
  u.updated_at = 1700000001;
  OK(tc_store_user_insert(tx, &u, &err));
  TC_CHECK(u.id > 0);
  struct tc_user bare;
  make_user(&bare, "bob");
  OK(tc_store_user_insert(tx, &bare, &err));
  TC_CHECK(bare.id > u.id);
  TC_CHECK(bare.created_at > 0); /* filled with now */
  TC_CHECK_INT(bare.updated_at, bare.created_at);
  OK(tc_tx_commit(tx, &err));

  BEGIN(st, 0, tx);
  struct tc_user g;
  OK(tc_store_user_get(tx, u.id, &g, &err));
  check_user_eq(&g, &u);
  tc_user_free(&g);
  OK(tc_store_user_get_by_name(tx, u.name, &g, &err));
  check_user_eq(&g, &u);
  tc_user_free(&g);
  OK(tc_store_user_get(tx, bare.id, &g, &err));
  check_user_eq(&g, &bare); /* NULL optional fields come back NULL */
  TC_CHECK(g.email == NULL && g.provider_id == NULL);
  tc_user_free(&g);
  OK(tc_store_user_get_by_provider_id(tx, "https://idp.example.com/alice", &g, &err));
  check_user_eq(&g, &u);
  tc_user_free(&g);
  TC_CHECK_INT(tc_store_user_get_by_provider_id(tx, "https://idp.example.com/x", &g, &err), TC_ENOENT);
  TC_CHECK_INT(tc_store_user_get_by_provider_id(tx, "", &g, &err), TC_ENOENT);
  TC_CHECK_INT(tc_store_user_get(tx, 999999, &g, &err), TC_ENOENT);
  TC_CHECK_INT(tc_store_user_get_by_name(tx, "nobody", &g, &err), TC_ENOENT);

  /* update every field */
  free(u.email);
  u.email = NULL;
  free(u.display_name);
  u.display_name = tc_xstrdup("Alice B");
  u.created_at = 1600000000;
  OK(tc_store_user_update(tx, &u, &err));
  OK(tc_store_user_get(tx, u.id, &g, &err));
  check_user_eq(&g, &u);
  tc_user_free(&g);
  struct tc_user ghost;
  make_user(&ghost, "ghost");
  ghost.id = 424242;
  TC_CHECK_INT(tc_store_user_update(tx, &ghost, &err), TC_ENOENT);
  tc_user_free(&ghost);

  struct tc_user *list;
  size_t n;
  OK(tc_store_user_list(tx, &list, &n, &err));
  TC_CHECK_INT(n, 2);
  if (n == 2) {
    check_user_eq(&list[0], &u);
    check_user_eq(&list[1], &bare);
  }
  tc_store_free_users(list, n);

  OK(tc_store_user_delete(tx, bare.id, &err));
  TC_CHECK_INT(tc_store_user_delete(tx, bare.id, &err), TC_ENOENT);
  TC_CHECK_INT(tc_store_user_get(tx, bare.id, &g, &err), TC_ENOENT);
  OK(tc_tx_commit(tx, &err));

  /* ids are never reused */
  BEGIN(st, 0, tx);
  struct tc_user again;
  make_user(&again, "bob");
  OK(tc_store_user_insert(tx, &again, &err));
  TC_CHECK(again.id > bare.id);
  OK(tc_tx_commit(tx, &err));
  tc_user_free(&again);
  tc_user_free(&u);
  tc_user_free(&bare);
  tc_store_close(st);
}

TC_TEST(node_roundtrip) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, TC_TX_DURABLE, tx);
  struct tc_user u;
  make_user(&u, "alice");
  OK(tc_store_user_insert(tx, &u, &err));
  struct tc_preauth_key k = {0};
  k.prefix = tc_xstrdup("kprefix1");
  k.user_id = u.id;
  OK(tc_store_preauth_insert(tx, &k, &err));

  struct tc_node n;
  make_node(&n, 1, u.id);
  n.has_ipv4 = true;
  memcpy(n.ipv4, (uint8_t[]){100, 64, 0, 1}, 4);
  n.has_ipv6 = true;
  memcpy(n.ipv6, (uint8_t[]){0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, 16);
  n.given_name = tc_xstrdup("laptop");
  tc_strv_push(&n.tags, "tag:server");
  tc_strv_push(&n.tags, "tag:prod");
  n.hostinfo_json = tc_xstrdup("{\"Hostname\":\"laptop\",\"OS\":\"linux\", \"x\": [1,2]}");
  tc_strv_push(&n.endpoints, "192.0.2.1:41641");
  tc_strv_push(&n.endpoints, "[2001:db8::1]:41641");
  tc_strv_push(&n.announced_routes, "10.0.0.0/8");
  tc_strv_push(&n.announced_routes, "0.0.0.0/0");
  tc_strv_push(&n.approved_routes, "10.0.0.0/8");
  n.expiry = 1800000000;
  n.last_seen = 1700000500;
  n.register_method = TC_REG_AUTHKEY;
  n.auth_key_id = k.id;
  n.ephemeral = true;
  n.home_derp = 999;
  n.cap_version = 106;
  n.created_at = 1700000000;
  n.updated_at = 1700000002;
  OK(tc_store_node_insert(tx, &n, &err));
  TC_CHECK(n.id > 0);

  struct tc_node bare;
  make_node(&bare, 2, 0); /* no user, no addresses, no lists */
  free(bare.hostname);
  bare.hostname = NULL;
  OK(tc_store_node_insert(tx, &bare, &err));
  OK(tc_tx_commit(tx, &err));

  BEGIN(st, 0, tx);
  struct tc_node g;
  OK(tc_store_node_get(tx, n.id, &g, &err));
  check_node_eq(&g, &n);
  tc_node_free(&g);
  OK(tc_store_node_get_by_node_key(tx, n.node_key, &g, &err));
  check_node_eq(&g, &n);
  tc_node_free(&g);
  OK(tc_store_node_get_by_machine_key(tx, n.machine_key, &g, &err));
  check_node_eq(&g, &n);
  tc_node_free(&g);
  OK(tc_store_node_get(tx, bare.id, &g, &err));
  check_node_eq(&g, &bare);
  TC_CHECK(!g.has_ipv4 && !g.has_ipv6 && g.user_id == 0 && g.tags.n == 0 && g.hostinfo_json == NULL);
  tc_node_free(&g);
  uint8_t nokey[TC_KEY_LEN] = {0};
  TC_CHECK_INT(tc_store_node_get_by_node_key(tx, nokey, &g, &err), TC_ENOENT);
  TC_CHECK_INT(tc_store_node_get_by_machine_key(tx, nokey, &g, &err), TC_ENOENT);

  /* update: change keys, addresses, lists, owner */
  fill_key(n.node_key, 77, 2);
  n.has_ipv4 = false;
  memcpy(n.ipv6, (uint8_t[]){0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9}, 16);
  tc_strv_free(&n.tags);
  tc_strv_free(&n.approved_routes);
  tc_strv_push(&n.approved_routes, "0.0.0.0/0");
  n.ephemeral = false;
  n.register_method = TC_REG_CLI;
  n.auth_key_id = 0;
  n.cap_version = 107;
  OK(tc_store_node_update(tx, &n, &err));
  OK(tc_store_node_get(tx, n.id, &g, &err));
  check_node_eq(&g, &n);
  tc_node_free(&g);
  OK(tc_store_node_touch(tx, n.id, 1700009999, &err));
  OK(tc_store_node_get(tx, n.id, &g, &err));
  TC_CHECK_INT(g.last_seen, 1700009999);
  tc_node_free(&g);
  TC_CHECK_INT(tc_store_node_touch(tx, 987654, 1, &err), TC_ENOENT);

  struct tc_node *list;
  size_t cnt;
  OK(tc_store_node_list(tx, &list, &cnt, &err));
  TC_CHECK_INT(cnt, 2);
  if (cnt == 2) TC_CHECK(list[0].id == n.id && list[1].id == bare.id);
  tc_store_free_nodes(list, cnt);

  OK(tc_store_node_delete(tx, bare.id, &err));
  TC_CHECK_INT(tc_store_node_delete(tx, bare.id, &err), TC_ENOENT);
  OK(tc_tx_commit(tx, &err));

  tc_node_free(&n);
  tc_node_free(&bare);
  tc_preauth_key_free(&k);
  tc_user_free(&u);
  tc_store_close(st);
}

/* The narrow map-update write: the client-reported columns change, every
 * other column keeps its stored value even when the record differs. */
TC_TEST(node_update_client) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, TC_TX_DURABLE, tx);
  struct tc_user u;
  make_user(&u, "carol");
  OK(tc_store_user_insert(tx, &u, &err));
  struct tc_node n;
  make_node(&n, 5, u.id);
  n.has_ipv4 = true;
  memcpy(n.ipv4, (uint8_t[]){100, 64, 0, 5}, 4);
  n.given_name = tc_xstrdup("box");
  n.expiry = 1800000000;
  n.cap_version = 100;
  OK(tc_store_node_insert(tx, &n, &err));
  OK(tc_tx_commit(tx, &err));

  /* what the client reports */
  struct tc_node want;
  tc_node_copy(&want, &n);
  free(want.hostname);
  want.hostname = tc_xstrdup("box-renamed");
  free(want.hostinfo_json);
  want.hostinfo_json = tc_xstrdup("{\"Hostname\":\"box-renamed\",\"OS\":\"linux\"}");
  tc_strv_push(&want.endpoints, "192.0.2.7:41641");
  fill_key(want.disco_key, 5, 9);
  want.home_derp = 7;
  want.cap_version = 138;
  tc_strv_push(&want.announced_routes, "10.1.0.0/16");
  tc_strv_push(&want.approved_routes, "10.1.0.0/16");
  want.last_seen = 6;
  /* and fields that this write must not touch */
  struct tc_node upd;
  tc_node_copy(&upd, &want);
  fill_key(upd.node_key, 99, 2);
  fill_key(upd.machine_key, 99, 1);
  free(upd.given_name);
  upd.given_name = tc_xstrdup("other-name");
  upd.has_ipv4 = false;
  upd.expiry = 5;
  upd.user_id = 0;
  tc_strv_push(&upd.tags, "tag:x");
  BEGIN(st, 0, tx);
  OK(tc_store_node_update_client(tx, &upd, &err));
  TC_CHECK(upd.updated_at >= tc_now() - 5);
  want.updated_at = upd.updated_at;
  struct tc_node g;
  OK(tc_store_node_get(tx, n.id, &g, &err));
  check_node_eq(&g, &want);
  tc_node_free(&g);
  struct tc_node ghost;
  make_node(&ghost, 6, 0);
  ghost.id = 424242;
  TC_CHECK_INT(tc_store_node_update_client(tx, &ghost, &err), TC_ENOENT);
  tc_node_free(&ghost);
  OK(tc_store_node_get(tx, n.id, &g, &err)); /* TC_ENOENT leaves the transaction usable */
  tc_node_free(&g);
  tc_tx_rollback(tx);

  /* the rolled-back write left nothing; a committed one persists */
  BEGIN(st, 0, tx);
  OK(tc_store_node_get(tx, n.id, &g, &err));
  check_node_eq(&g, &n);
  tc_node_free(&g);
  OK(tc_store_node_update_client(tx, &upd, &err));
  OK(tc_tx_commit(tx, &err));
  BEGIN(st, TC_TX_READONLY, tx);
  OK(tc_store_node_get(tx, n.id, &g, &err));
  want.updated_at = upd.updated_at;
  check_node_eq(&g, &want);
  tc_node_free(&g);
  TC_CHECK_INT(tc_store_node_update_client(tx, &upd, &err), TC_EINVAL); /* read-only */
  tc_tx_rollback(tx);

  tc_node_free(&upd);
  tc_node_free(&want);
  tc_node_free(&n);
  tc_user_free(&u);
  tc_store_close(st);
}

TC_TEST(preauth_roundtrip) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u;
  make_user(&u, "alice");
  OK(tc_store_user_insert(tx, &u, &err));
  struct tc_preauth_key a = {0}, b = {0};
  a.prefix = tc_xstrdup("aaaa1111");
  for (int i = 0; i < 32; i++) a.hash[i] = (uint8_t)(0xf0 ^ i);
  a.user_id = u.id;
  a.reusable = false;
  a.ephemeral = true;
  tc_strv_push(&a.tags, "tag:ci");
  a.expiration = 1900000000;
  a.created_at = 1700000000;
  OK(tc_store_preauth_insert(tx, &a, &err));
  b.prefix = tc_xstrdup("bbbb2222");
  b.reusable = true; /* owned only by tags */
  tc_strv_push(&b.tags, "tag:a");
  tc_strv_push(&b.tags, "tag:b");
  OK(tc_store_preauth_insert(tx, &b, &err));
  TC_CHECK(b.created_at > 0);

  struct tc_preauth_key g;
  OK(tc_store_preauth_get(tx, a.id, &g, &err));
  check_pak_eq(&g, &a);
  tc_preauth_key_free(&g);
  OK(tc_store_preauth_get_by_prefix(tx, "bbbb2222", &g, &err));
  check_pak_eq(&g, &b);
  tc_preauth_key_free(&g);
  TC_CHECK_INT(tc_store_preauth_get_by_prefix(tx, "nope", &g, &err), TC_ENOENT);

  struct tc_preauth_key *list;
  size_t n;
  OK(tc_store_preauth_list(tx, -1, &list, &n, &err));
  TC_CHECK_INT(n, 2);
  if (n == 2) {
    check_pak_eq(&list[0], &a);
    check_pak_eq(&list[1], &b);
  }
  tc_store_free_preauth_keys(list, n);
  OK(tc_store_preauth_list(tx, u.id, &list, &n, &err));
  TC_CHECK(n == 1 && list[0].id == a.id);
  tc_store_free_preauth_keys(list, n);
  OK(tc_store_preauth_list(tx, 0, &list, &n, &err));
  TC_CHECK(n == 1 && list[0].id == b.id);
  tc_store_free_preauth_keys(list, n);

  OK(tc_store_preauth_expire(tx, a.id, 1234, &err));
  OK(tc_store_preauth_get(tx, a.id, &g, &err));
  TC_CHECK_INT(g.expiration, 1234);
  tc_preauth_key_free(&g);
  TC_CHECK_INT(tc_store_preauth_expire(tx, 55555, 1, &err), TC_ENOENT);

  /* consume: single-use once, then conflict; reusable any number of times */
  OK(tc_store_preauth_consume(tx, a.id, &err));
  TC_CHECK_INT(tc_store_preauth_consume(tx, a.id, &err), TC_ECONFLICT);
  TC_CHECK(strstr(err.msg, "already been used") != NULL);
  OK(tc_store_preauth_consume(tx, b.id, &err));
  OK(tc_store_preauth_consume(tx, b.id, &err));
  TC_CHECK_INT(tc_store_preauth_consume(tx, 55555, &err), TC_ENOENT);
  OK(tc_store_preauth_get(tx, a.id, &g, &err)); /* the conflict left the tx usable */
  TC_CHECK(g.used);
  tc_preauth_key_free(&g);
  OK(tc_store_preauth_get(tx, b.id, &g, &err));
  TC_CHECK(g.used && g.reusable);
  tc_preauth_key_free(&g);
  OK(tc_tx_commit(tx, &err));

  BEGIN(st, 0, tx);
  OK(tc_store_preauth_delete(tx, b.id, &err));
  TC_CHECK_INT(tc_store_preauth_delete(tx, b.id, &err), TC_ENOENT);
  TC_CHECK_INT(tc_store_preauth_get(tx, b.id, &g, &err), TC_ENOENT);
  OK(tc_tx_commit(tx, &err));
  tc_preauth_key_free(&a);
  tc_preauth_key_free(&b);
  tc_user_free(&u);
  tc_store_close(st);
}

TC_TEST(apikey_roundtrip) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_api_key a = {0}, b = {0};
  a.prefix = tc_xstrdup("tskey-api-abc");
  for (int i = 0; i < 32; i++) a.hash[i] = (uint8_t)(i * 3);
  a.expiration = 1900000000;
  a.last_seen = 0;
  a.created_at = 1700000000;
  OK(tc_store_apikey_insert(tx, &a, &err));
  b.prefix = tc_xstrdup("tskey-api-def");
  OK(tc_store_apikey_insert(tx, &b, &err));
  TC_CHECK(b.id > a.id && b.created_at > 0);
  struct tc_api_key g;
  OK(tc_store_apikey_get_by_prefix(tx, a.prefix, &g, &err));
  check_apikey_eq(&g, &a);
  tc_api_key_free(&g);
  TC_CHECK_INT(tc_store_apikey_get_by_prefix(tx, "zzz", &g, &err), TC_ENOENT);
  OK(tc_store_apikey_touch(tx, a.id, 1700000444, &err));
  OK(tc_store_apikey_expire(tx, a.id, 1700000555, &err));
  a.last_seen = 1700000444;
  a.expiration = 1700000555;
  struct tc_api_key *list;
  size_t n;
  OK(tc_store_apikey_list(tx, &list, &n, &err));
  TC_CHECK_INT(n, 2);
  if (n == 2) {
    check_apikey_eq(&list[0], &a);
    check_apikey_eq(&list[1], &b);
  }
  tc_store_free_api_keys(list, n);
  OK(tc_store_apikey_delete(tx, a.id, &err));
  TC_CHECK_INT(tc_store_apikey_delete(tx, a.id, &err), TC_ENOENT);
  TC_CHECK_INT(tc_store_apikey_touch(tx, a.id, 1, &err), TC_ENOENT);
  TC_CHECK_INT(tc_store_apikey_expire(tx, a.id, 1, &err), TC_ENOENT);
  OK(tc_tx_commit(tx, &err));
  tc_api_key_free(&a);
  tc_api_key_free(&b);
  tc_store_close(st);
}

TC_TEST(policy_and_audit) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_policy_rec g;
  TC_CHECK_INT(tc_store_policy_latest(tx, &g, &err), TC_ENOENT);
  struct tc_policy_rec p[3] = {{0}};
  for (int i = 0; i < 3; i++) {
    p[i].data = tc_xasprintf("{\n  // v%d\n  \"acls\": [],\n}", i);
    p[i].actor = i == 1 ? NULL : tc_xstrdup("cli");
    p[i].created_at = 1700000000 + i;
    OK(tc_store_policy_insert(tx, &p[i], &err));
  }
  OK(tc_store_policy_latest(tx, &g, &err));
  TC_CHECK_INT(g.id, p[2].id);
  TC_CHECK_STR(g.data, p[2].data);
  TC_CHECK_STR(g.actor, "cli");
  TC_CHECK_INT(g.created_at, p[2].created_at);
  tc_policy_rec_free(&g);
  struct tc_policy_rec *pl;
  size_t n;
  OK(tc_store_policy_list(tx, 0, &pl, &n, &err));
  TC_CHECK_INT(n, 3);
  if (n == 3) {
    TC_CHECK(pl[0].id == p[2].id && pl[1].id == p[1].id && pl[2].id == p[0].id);
    TC_CHECK(pl[1].actor == NULL);
    TC_CHECK_STR(pl[2].data, p[0].data);
  }
  tc_store_free_policies(pl, n);
  OK(tc_store_policy_list(tx, 2, &pl, &n, &err));
  TC_CHECK(n == 2 && pl[0].id == p[2].id);
  tc_store_free_policies(pl, n);

  struct tc_audit a[5] = {{0}};
  for (int i = 0; i < 5; i++) {
    a[i].actor = tc_xstrdup("cli");
    a[i].action = tc_xasprintf("user.create%d", i);
    a[i].target = tc_xasprintf("user:%d", i);
    a[i].detail = i % 2 ? tc_xstrdup("{\"k\":\"v\"}") : NULL;
    a[i].at = i == 4 ? 0 : 1700000000 + i;
    OK(tc_store_audit_insert(tx, &a[i], &err));
  }
  TC_CHECK(a[4].at > 0);
  struct tc_audit *al;
  OK(tc_store_audit_list(tx, 3, &al, &n, &err));
  TC_CHECK_INT(n, 3);
  if (n == 3) {
    for (int i = 0; i < 3; i++) {
      TC_CHECK_INT(al[i].id, a[4 - i].id);
      TC_CHECK_INT(al[i].at, a[4 - i].at);
      TC_CHECK_STR(al[i].actor, a[4 - i].actor);
      TC_CHECK_STR(al[i].action, a[4 - i].action);
      TC_CHECK_STR(al[i].target, a[4 - i].target);
      TC_CHECK((al[i].detail == NULL) == (a[4 - i].detail == NULL));
    }
    TC_CHECK(al[0].detail == NULL);
    TC_CHECK_STR(al[1].detail, "{\"k\":\"v\"}");
  }
  tc_store_free_audits(al, n);
  OK(tc_store_audit_list(tx, 0, &al, &n, &err));
  TC_CHECK_INT(n, 5);
  tc_store_free_audits(al, n);
  OK(tc_tx_commit(tx, &err));
  for (int i = 0; i < 3; i++) tc_policy_rec_free(&p[i]);
  for (int i = 0; i < 5; i++) tc_audit_free(&a[i]);
  tc_store_close(st);
}

/* ---- constraints ---------------------------------------------------------------- */

/* Runs one insert that must violate a unique column in its own tx. */
static int expect_unique(struct tc_store *st, int (*fn)(struct tc_tx *, void *, struct tc_err *),
                         void *arg, const char *field) {
  struct tc_tx *tx;
  struct tc_err err = {0};
  if (tc_store_begin(st, 0, &tx, &err)) return -1;
  int rc = fn(tx, arg, &err);
  int bad = 0;
  if (rc != TC_EEXIST) {
    fprintf(stderr, "  expected TC_EEXIST for %s, got %d (%s)\n", field, rc, err.msg);
    bad = 1;
  } else if (!strstr(err.msg, field)) {
    fprintf(stderr, "  message for %s does not name it: %s\n", field, err.msg);
    bad = 1;
  }
  /* The failed transaction refuses further work and cannot commit. */
  struct tc_user x;
  make_user(&x, "after-failure");
  if (tc_store_user_insert(tx, &x, &err) == 0) bad = 1;
  tc_user_free(&x);
  if (tc_tx_commit(tx, &err) == 0) bad = 1;
  return bad;
}

static int ins_user(struct tc_tx *tx, void *arg, struct tc_err *err) { return tc_store_user_insert(tx, arg, err); }
static int ins_node(struct tc_tx *tx, void *arg, struct tc_err *err) { return tc_store_node_insert(tx, arg, err); }
static int ins_pak(struct tc_tx *tx, void *arg, struct tc_err *err) { return tc_store_preauth_insert(tx, arg, err); }
static int ins_apikey(struct tc_tx *tx, void *arg, struct tc_err *err) { return tc_store_apikey_insert(tx, arg, err); }

TC_TEST(unique_violations) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u1, u2, u3;
  make_user(&u1, "alice");
  u1.provider_id = tc_xstrdup("sub-1");
  OK(tc_store_user_insert(tx, &u1, &err));
  make_user(&u2, "bob"); /* NULL provider_id twice is fine */
  OK(tc_store_user_insert(tx, &u2, &err));
  make_user(&u3, "carol");
  u3.provider_id = tc_xstrdup(""); /* "" means unset, also allowed twice */
  OK(tc_store_user_insert(tx, &u3, &err));
  struct tc_user u4;
  make_user(&u4, "dave");
  u4.provider_id = tc_xstrdup("");
  OK(tc_store_user_insert(tx, &u4, &err));
  struct tc_node n;
  make_node(&n, 1, u1.id);
  n.has_ipv4 = n.has_ipv6 = true;
  memcpy(n.ipv4, (uint8_t[]){100, 64, 0, 1}, 4);
  n.ipv6[0] = 0xfd;
  n.ipv6[15] = 1;
  n.given_name = tc_xstrdup("laptop");
  OK(tc_store_node_insert(tx, &n, &err));
  struct tc_preauth_key k = {0};
  k.prefix = tc_xstrdup("pfx");
  OK(tc_store_preauth_insert(tx, &k, &err));
  struct tc_api_key ak = {0};
  ak.prefix = tc_xstrdup("apfx");
  OK(tc_store_apikey_insert(tx, &ak, &err));
  OK(tc_tx_commit(tx, &err));

  struct tc_user du;
  make_user(&du, "alice");
  TC_CHECK_INT(expect_unique(st, ins_user, &du, "users.name"), 0);
  tc_user_free(&du);
  make_user(&du, "erin");
  du.provider_id = tc_xstrdup("sub-1");
  TC_CHECK_INT(expect_unique(st, ins_user, &du, "users.provider_id"), 0);
  tc_user_free(&du);

  struct tc_node dn;
  make_node(&dn, 2, u1.id);
  memcpy(dn.machine_key, n.machine_key, TC_KEY_LEN);
  TC_CHECK_INT(expect_unique(st, ins_node, &dn, "nodes.machine_key"), 0);
  tc_node_free(&dn);
  make_node(&dn, 3, u1.id);
  memcpy(dn.node_key, n.node_key, TC_KEY_LEN);
  TC_CHECK_INT(expect_unique(st, ins_node, &dn, "nodes.node_key"), 0);
  tc_node_free(&dn);
  make_node(&dn, 4, u1.id);
  dn.has_ipv4 = true;
  memcpy(dn.ipv4, n.ipv4, 4);
  TC_CHECK_INT(expect_unique(st, ins_node, &dn, "nodes.ipv4"), 0);
  tc_node_free(&dn);
  make_node(&dn, 5, u1.id);
  dn.has_ipv6 = true;
  memcpy(dn.ipv6, n.ipv6, 16);
  TC_CHECK_INT(expect_unique(st, ins_node, &dn, "nodes.ipv6"), 0);
  tc_node_free(&dn);
  make_node(&dn, 6, u1.id);
  dn.given_name = tc_xstrdup("laptop");
  TC_CHECK_INT(expect_unique(st, ins_node, &dn, "nodes.given_name"), 0);
  tc_node_free(&dn);

  struct tc_preauth_key dk = {0};
  dk.prefix = tc_xstrdup("pfx");
  TC_CHECK_INT(expect_unique(st, ins_pak, &dk, "preauth_keys.prefix"), 0);
  tc_preauth_key_free(&dk);
  struct tc_api_key dak = {0};
  dak.prefix = tc_xstrdup("apfx");
  TC_CHECK_INT(expect_unique(st, ins_apikey, &dak, "api_keys.prefix"), 0);
  tc_api_key_free(&dak);

  /* An update that collides is refused the same way. */
  BEGIN(st, 0, tx);
  free(u2.name);
  u2.name = tc_xstrdup("alice");
  TC_CHECK_INT(tc_store_user_update(tx, &u2, &err), TC_EEXIST);
  TC_CHECK(strstr(err.msg, "users.name") != NULL);
  tc_tx_rollback(tx);

  /* Nothing of the failed transactions landed. */
  BEGIN(st, 0, tx);
  struct tc_user *ul;
  size_t cnt;
  OK(tc_store_user_list(tx, &ul, &cnt, &err));
  TC_CHECK_INT(cnt, 4);
  tc_store_free_users(ul, cnt);
  struct tc_node *nl;
  OK(tc_store_node_list(tx, &nl, &cnt, &err));
  TC_CHECK_INT(cnt, 1);
  tc_store_free_nodes(nl, cnt);
  tc_tx_rollback(tx);

  tc_user_free(&u1);
  tc_user_free(&u2);
  tc_user_free(&u3);
  tc_user_free(&u4);
  tc_node_free(&n);
  tc_preauth_key_free(&k);
  tc_api_key_free(&ak);
  tc_store_close(st);
}

TC_TEST(foreign_keys) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user owner, keyowner;
  make_user(&owner, "owner");
  make_user(&keyowner, "keyowner");
  OK(tc_store_user_insert(tx, &owner, &err));
  OK(tc_store_user_insert(tx, &keyowner, &err));
  struct tc_preauth_key k = {0};
  k.prefix = tc_xstrdup("k1");
  k.user_id = keyowner.id;
  OK(tc_store_preauth_insert(tx, &k, &err));
  struct tc_node n;
  make_node(&n, 1, owner.id);
  n.auth_key_id = k.id;
  OK(tc_store_node_insert(tx, &n, &err));
  OK(tc_tx_commit(tx, &err));

  BEGIN(st, 0, tx);
  TC_CHECK_INT(tc_store_user_delete(tx, owner.id, &err), TC_ECONFLICT);
  TC_CHECK(strstr(err.msg, "still owns") != NULL);
  tc_tx_rollback(tx);
  BEGIN(st, 0, tx);
  TC_CHECK_INT(tc_store_user_delete(tx, keyowner.id, &err), TC_ECONFLICT);
  tc_tx_rollback(tx);
  BEGIN(st, 0, tx);
  struct tc_node orphan;
  make_node(&orphan, 2, 999999);
  TC_CHECK_INT(tc_store_node_insert(tx, &orphan, &err), TC_ECONFLICT);
  tc_node_free(&orphan);
  tc_tx_rollback(tx);
  BEGIN(st, 0, tx);
  struct tc_preauth_key ok = {0};
  ok.prefix = tc_xstrdup("k2");
  ok.user_id = 999999;
  TC_CHECK_INT(tc_store_preauth_insert(tx, &ok, &err), TC_ECONFLICT);
  tc_preauth_key_free(&ok);
  tc_tx_rollback(tx);

  /* Deleting the key keeps the node and clears its reference; then the key
   * owner can go; deleting the node frees its owner. */
  BEGIN(st, 0, tx);
  OK(tc_store_preauth_delete(tx, k.id, &err));
  struct tc_node g;
  OK(tc_store_node_get(tx, n.id, &g, &err));
  TC_CHECK_INT(g.auth_key_id, 0);
  tc_node_free(&g);
  OK(tc_store_user_delete(tx, keyowner.id, &err));
  OK(tc_store_node_delete(tx, n.id, &err));
  OK(tc_store_user_delete(tx, owner.id, &err));
  OK(tc_tx_commit(tx, &err));
  tc_user_free(&owner);
  tc_user_free(&keyowner);
  tc_preauth_key_free(&k);
  tc_node_free(&n);
  tc_store_close(st);
}

TC_TEST(rollback_is_complete) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u;
  make_user(&u, "temp");
  OK(tc_store_user_insert(tx, &u, &err));
  struct tc_node n;
  make_node(&n, 1, u.id);
  OK(tc_store_node_insert(tx, &n, &err));
  struct tc_audit a = {0};
  a.action = tc_xstrdup("x");
  OK(tc_store_audit_insert(tx, &a, &err));
  tc_tx_rollback(tx);

  /* A commit after a failed statement rolls back the earlier ones too. */
  BEGIN(st, 0, tx);
  struct tc_user v, dup;
  make_user(&v, "kept-out");
  make_user(&dup, "kept-out");
  OK(tc_store_user_insert(tx, &v, &err));
  TC_CHECK_INT(tc_store_user_insert(tx, &dup, &err), TC_EEXIST);
  TC_CHECK(tc_tx_commit(tx, &err) != 0);

  struct tc_store_data d;
  OK(tc_store_load_all(st, &d, &err));
  TC_CHECK_INT(d.n_users, 0);
  TC_CHECK_INT(d.n_nodes, 0);
  tc_store_data_free(&d);
  BEGIN(st, 0, tx);
  struct tc_audit *al;
  size_t cnt;
  OK(tc_store_audit_list(tx, 0, &al, &cnt, &err));
  TC_CHECK_INT(cnt, 0);
  tc_store_free_audits(al, cnt);
  tc_tx_rollback(tx);
  tc_user_free(&u);
  tc_user_free(&v);
  tc_user_free(&dup);
  tc_node_free(&n);
  tc_audit_free(&a);
  tc_store_close(st);
}

TC_TEST(load_all) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_store_data d;
  OK(tc_store_load_all(st, &d, &err));
  TC_CHECK(d.n_users == 0 && d.n_nodes == 0 && !d.has_policy);
  tc_store_data_free(&d);
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u[3];
  for (int i = 0; i < 3; i++) {
    char name[16];
    snprintf(name, sizeof name, "u%d", i);
    make_user(&u[i], name);
    OK(tc_store_user_insert(tx, &u[i], &err));
  }
  struct tc_node n[4];
  for (int i = 0; i < 4; i++) {
    make_node(&n[i], i + 1, u[i % 3].id);
    tc_strv_push(&n[i].endpoints, "198.51.100.1:1");
    OK(tc_store_node_insert(tx, &n[i], &err));
  }
  struct tc_preauth_key k = {0};
  k.prefix = tc_xstrdup("p");
  OK(tc_store_preauth_insert(tx, &k, &err));
  struct tc_api_key ak = {0};
  ak.prefix = tc_xstrdup("a");
  OK(tc_store_apikey_insert(tx, &ak, &err));
  struct tc_policy_rec p1 = {0}, p2 = {0};
  p1.data = tc_xstrdup("{}");
  p2.data = tc_xstrdup("{\"acls\":[]}");
  OK(tc_store_policy_insert(tx, &p1, &err));
  OK(tc_store_policy_insert(tx, &p2, &err));
  OK(tc_tx_commit(tx, &err));

  OK(tc_store_load_all(st, &d, &err));
  TC_CHECK_INT(d.n_users, 3);
  TC_CHECK_INT(d.n_nodes, 4);
  TC_CHECK_INT(d.n_preauth_keys, 1);
  TC_CHECK_INT(d.n_api_keys, 1);
  TC_CHECK(d.has_policy);
  if (d.has_policy) TC_CHECK_STR(d.policy.data, p2.data);
  for (size_t i = 0; i < d.n_users && i < 3; i++) check_user_eq(&d.users[i], &u[i]);
  for (size_t i = 0; i < d.n_nodes && i < 4; i++) check_node_eq(&d.nodes[i], &n[i]);
  if (d.n_preauth_keys == 1) check_pak_eq(&d.preauth_keys[0], &k);
  if (d.n_api_keys == 1) check_apikey_eq(&d.api_keys[0], &ak);
  tc_store_data_free(&d);
  tc_store_data_free(NULL);
  for (int i = 0; i < 3; i++) tc_user_free(&u[i]);
  for (int i = 0; i < 4; i++) tc_node_free(&n[i]);
  tc_preauth_key_free(&k);
  tc_api_key_free(&ak);
  tc_policy_rec_free(&p1);
  tc_policy_rec_free(&p2);
  tc_store_close(st);
}

/* ---- the single-use key race ------------------------------------------------------ */

#define RACERS 64
struct race {
  struct tc_store *st;
  int64_t key_id, user_id;
  pthread_barrier_t go;
  int ok, conflict, other;
  pthread_mutex_t mu;
};
struct racer {
  struct race *r;
  struct tc_store *st;
  int idx;
};

static void *race_thread(void *arg) {
  struct racer *me = arg;
  struct race *r = me->r;
  struct tc_err err = {0};
  struct tc_tx *tx = NULL;
  pthread_barrier_wait(&r->go);
  int rc = tc_store_begin(me->st, TC_TX_DURABLE, &tx, &err);
  if (!rc) rc = tc_store_preauth_consume(tx, r->key_id, &err);
  if (!rc) {
    struct tc_node n;
    make_node(&n, 1000 + me->idx, r->user_id);
    n.auth_key_id = r->key_id;
    n.register_method = TC_REG_AUTHKEY;
    rc = tc_store_node_insert(tx, &n, &err);
    tc_node_free(&n);
  }
  if (!rc) {
    rc = tc_tx_commit(tx, &err);
    tx = NULL;
  }
  tc_tx_rollback(tx);
  pthread_mutex_lock(&r->mu);
  if (rc == 0)
    r->ok++;
  else if (rc == TC_ECONFLICT)
    r->conflict++;
  else {
    r->other++;
    fprintf(stderr, "  racer %d: %d %s\n", me->idx, rc, err.msg);
  }
  pthread_mutex_unlock(&r->mu);
  return NULL;
}

struct racer_store {
  struct tc_store *st;
};

static void run_race(bool reusable, int nstores, int *ok, int *conflict, int *other, size_t *nodes) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  /* Extra stores are separate connections (SQLite) or pools (PostgreSQL)
   * on the same database: the race must hold across them too. */
  struct tc_store *extra[4] = {0};
  for (int i = 1; st && i < nstores && i <= 4; i++) {
    struct tc_err e = {0};
    if (tc_store_open(&cfg, &extra[i - 1], &e)) fprintf(stderr, "race open: %s\n", e.msg);
  }
  *ok = *conflict = *other = -1;
  *nodes = 0;
  if (!st) return;
  struct tc_err err = {0};
  struct tc_tx *tx;
  struct tc_user u;
  make_user(&u, "racer");
  struct tc_preauth_key k = {0};
  k.prefix = tc_xstrdup("race");
  k.reusable = reusable;
  if (tc_store_begin(st, 0, &tx, &err) || tc_store_user_insert(tx, &u, &err) ||
      (k.user_id = u.id, tc_store_preauth_insert(tx, &k, &err)) || tc_tx_commit(tx, &err)) {
    fprintf(stderr, "race setup: %s\n", err.msg);
    return;
  }
  struct race r = {.st = st, .key_id = k.id, .user_id = u.id};
  pthread_barrier_init(&r.go, NULL, RACERS);
  pthread_mutex_init(&r.mu, NULL);
  pthread_t th[RACERS];
  struct racer me[RACERS];
  for (int i = 0; i < RACERS; i++) {
    me[i] = (struct racer){&r, st, i};
    if (nstores > 1 && i % nstores && extra[i % nstores - 1]) me[i].st = extra[i % nstores - 1];
    pthread_create(&th[i], NULL, race_thread, &me[i]);
  }
  for (int i = 0; i < RACERS; i++) pthread_join(th[i], NULL);
  *ok = r.ok;
  *conflict = r.conflict;
  *other = r.other;
  struct tc_store_data d;
  if (tc_store_load_all(st, &d, &err) == 0) {
    *nodes = d.n_nodes;
    tc_store_data_free(&d);
  }
  pthread_barrier_destroy(&r.go);
  pthread_mutex_destroy(&r.mu);
  tc_user_free(&u);
  tc_preauth_key_free(&k);
  for (int i = 0; i < 4; i++) tc_store_close(extra[i]);
  tc_store_close(st);
}

TC_TEST(single_use_key_race) {
  int ok, conflict, other;
  size_t nodes;
  run_race(false, 1, &ok, &conflict, &other, &nodes);
  TC_CHECK_INT(ok, 1);
  TC_CHECK_INT(conflict, RACERS - 1);
  TC_CHECK_INT(other, 0);
  TC_CHECK_INT(nodes, 1);
}

TC_TEST(single_use_key_race_across_stores) {
  int ok, conflict, other;
  size_t nodes;
  run_race(false, 4, &ok, &conflict, &other, &nodes);
  TC_CHECK_INT(ok, 1);
  TC_CHECK_INT(conflict, RACERS - 1);
  TC_CHECK_INT(other, 0);
  TC_CHECK_INT(nodes, 1);
}

TC_TEST(reusable_key_race) {
  int ok, conflict, other;
  size_t nodes;
  run_race(true, 4, &ok, &conflict, &other, &nodes);
  TC_CHECK_INT(ok, RACERS);
  TC_CHECK_INT(conflict, 0);
  TC_CHECK_INT(other, 0);
  TC_CHECK_INT(nodes, RACERS);
}

/* ---- crash safety -------------------------------------------------------------------- */

/* Child: writes user + key pairs forever, acknowledging each commit. */
static void crash_child(const struct tc_store_config *cfg, int wfd) {
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  if (tc_store_open(cfg, &st, &err)) _exit(3);
  for (int64_t i = 0;; i++) {
    struct tc_tx *tx;
    unsigned fl = i % 3 == 1 ? TC_TX_DURABLE : i % 3 == 2 ? TC_TX_DURABLE_LATER : 0;
    if (tc_store_begin(st, fl, &tx, &err)) _exit(4);
    struct tc_user u = {0};
    char name[32], prefix[32];
    snprintf(name, sizeof name, "crash-%lld", (long long)i);
    snprintf(prefix, sizeof prefix, "ck-%lld", (long long)i);
    u.name = name;
    if (tc_store_user_insert(tx, &u, &err)) _exit(5);
    struct tc_preauth_key k = {0};
    k.prefix = prefix;
    k.user_id = u.id;
    if (tc_store_preauth_insert(tx, &k, &err)) _exit(6);
    uint64_t ticket = 0;
    if (tc_tx_commit_ticket(tx, &ticket, &err)) _exit(7);
    if (tc_store_sync(st, ticket, &err)) _exit(9); /* acknowledged only once flushed */
    if (write(wfd, &i, sizeof i) != (ssize_t)sizeof i) _exit(8);
  }
}

/* Group commit: TC_TX_DURABLE_LATER commits are visible at once, made
 * durable by tc_store_sync, and concurrent syncs share flushes. */
static bool wal_mode(void) {
#ifdef SUITE_PG
  return false;
#else
  const char *wal = getenv("TC_TEST_SQLITE_WAL");
  return !(wal && !strcmp(wal, "0"));
#endif
}

struct gc_arg {
  struct tc_store *st;
  int base, n;
  atomic_int errors;
};

static void *gc_writer(void *vp) {
  struct gc_arg *a = vp;
  for (int i = 0; i < a->n; i++) {
    struct tc_err err = {0};
    struct tc_tx *tx;
    uint64_t ticket = 0;
    struct tc_user u = {0};
    char name[32];
    snprintf(name, sizeof name, "gc-%d", a->base + i);
    u.name = name;
    if (tc_store_begin(a->st, TC_TX_DURABLE_LATER, &tx, &err) || tc_store_user_insert(tx, &u, &err) ||
        tc_tx_commit_ticket(tx, &ticket, &err) || (wal_mode() && ticket == 0) || tc_store_sync(a->st, ticket, &err)) {
      fprintf(stderr, "gc writer: %s\n", err.msg);
      atomic_fetch_add(&a->errors, 1);
    }
  }
  return NULL;
}

TC_TEST(group_commit) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  uint64_t t1 = 0, t2 = 0;
  BEGIN(st, TC_TX_DURABLE_LATER, tx);
  struct tc_user u;
  make_user(&u, "later-1");
  OK(tc_store_user_insert(tx, &u, &err));
  tc_user_free(&u);
  OK(tc_tx_commit_ticket(tx, &t1, &err));
  TC_CHECK(wal_mode() ? t1 > 0 : t1 == 0);
  /* visible before the flush */
  BEGIN(st, TC_TX_READONLY, tx);
  struct tc_user g;
  OK(tc_store_user_get_by_name(tx, "later-1", &g, &err));
  tc_user_free(&g);
  tc_tx_rollback(tx);
  /* other kinds of transaction never hand out tickets */
  BEGIN(st, TC_TX_DURABLE, tx);
  make_user(&u, "now-1");
  OK(tc_store_user_insert(tx, &u, &err));
  tc_user_free(&u);
  OK(tc_tx_commit_ticket(tx, &t2, &err));
  TC_CHECK_INT(t2, 0);
  BEGIN(st, 0, tx);
  make_user(&u, "plain-1");
  OK(tc_store_user_insert(tx, &u, &err));
  tc_user_free(&u);
  OK(tc_tx_commit_ticket(tx, &t2, &err));
  TC_CHECK_INT(t2, 0);
  uint64_t s0 = tc_store_syncs(st);
  OK(tc_store_sync(st, t1, &err));
  TC_CHECK_INT(tc_store_syncs(st) - s0, wal_mode() ? 1 : 0);
  OK(tc_store_sync(st, t1, &err)); /* synced already: no second flush */
  OK(tc_store_sync(st, 0, &err));
  TC_CHECK_INT(tc_store_syncs(st) - s0, wal_mode() ? 1 : 0);
  /* a later ticket needs a new flush; commit without a ticket flushes itself */
  BEGIN(st, TC_TX_DURABLE_LATER, tx);
  make_user(&u, "later-2");
  OK(tc_store_user_insert(tx, &u, &err));
  tc_user_free(&u);
  OK(tc_tx_commit(tx, &err));
  TC_CHECK_INT(tc_store_syncs(st) - s0, wal_mode() ? 2 : 0);
  /* a failed transaction gets no ticket */
  BEGIN(st, TC_TX_DURABLE_LATER, tx);
  make_user(&u, "later-1");
  TC_CHECK_INT(tc_store_user_insert(tx, &u, &err), TC_EEXIST);
  tc_user_free(&u);
  t2 = 99;
  TC_CHECK(tc_tx_commit_ticket(tx, &t2, &err) != 0);
  TC_CHECK_INT(t2, 0);

  /* concurrent writers: every commit there, no more flushes than commits */
  enum { W = 8, PER = 25 };
  struct gc_arg args[W];
  pthread_t th[W];
  s0 = tc_store_syncs(st);
  for (int i = 0; i < W; i++) {
    args[i] = (struct gc_arg){.st = st, .base = i * PER, .n = PER};
    atomic_init(&args[i].errors, 0);
    TC_REQUIRE(pthread_create(&th[i], NULL, gc_writer, &args[i]) == 0);
  }
  int errors = 0;
  for (int i = 0; i < W; i++) {
    pthread_join(th[i], NULL);
    errors += atomic_load(&args[i].errors);
  }
  TC_CHECK_INT(errors, 0);
  uint64_t flushes = tc_store_syncs(st) - s0;
  if (wal_mode()) TC_CHECK(flushes >= 1 && flushes <= W * PER);
  fprintf(stderr, "group_commit: %d durable commits, %llu flushes\n", W * PER, (unsigned long long)flushes);
  BEGIN(st, TC_TX_READONLY, tx);
  struct tc_user *list;
  size_t n;
  OK(tc_store_user_list(tx, &list, &n, &err));
  TC_CHECK_INT(n, 4 + W * PER);
  tc_store_free_users(list, n);
  tc_tx_rollback(tx);
  tc_store_close(st);
}

TC_TEST(crash_safety) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  /* Create the schema first so the child's writes start at once. */
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  tc_store_close(st);
  int fds[2];
  TC_REQUIRE(pipe(fds) == 0);
  fflush(NULL);
  pid_t pid = fork();
  TC_REQUIRE(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    crash_child(&cfg, fds[1]);
    _exit(0);
  }
  close(fds[1]);
  int64_t acked = -1, v;
  /* Let it get well into its stride, then kill it mid-stream. */
  while (acked < 150 && read(fds[0], &v, sizeof v) == (ssize_t)sizeof v) acked = v;
  kill(pid, SIGKILL);
  while (read(fds[0], &v, sizeof v) == (ssize_t)sizeof v) acked = v;
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  TC_CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  TC_REQUIRE(acked >= 150);

  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  struct tc_store_data d;
  OK(tc_store_load_all(st, &d, &err));
  /* Every acknowledged commit is there, at most one unacknowledged one. */
  TC_CHECK(d.n_users >= (size_t)acked + 1 && d.n_users <= (size_t)acked + 2);
  /* No half-applied transaction: each user has exactly its key. */
  TC_CHECK_INT(d.n_preauth_keys, d.n_users);
  for (size_t i = 0; i < d.n_users; i++) {
    char name[32];
    snprintf(name, sizeof name, "crash-%zu", i);
    TC_CHECK_STR(d.users[i].name, name);
    int found = 0;
    for (size_t j = 0; j < d.n_preauth_keys; j++)
      if (d.preauth_keys[j].user_id == d.users[i].id) found++;
    TC_CHECK_INT(found, 1);
  }
  tc_store_data_free(&d);
  /* And the database is writable again. */
  struct tc_tx *tx;
  BEGIN(st, TC_TX_DURABLE, tx);
  struct tc_user u;
  make_user(&u, "after-crash");
  OK(tc_store_user_insert(tx, &u, &err));
  OK(tc_tx_commit(tx, &err));
  tc_user_free(&u);
  tc_store_close(st);
}

/* ---- migrations ----------------------------------------------------------------------- */

TC_TEST(migration_upgrade) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  struct tc_err err = {0};
  struct tc_store *st = NULL;
  cfg.migrate_to = 1;
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  TC_CHECK_INT(tc_store_schema_version(st), 1);
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u;
  make_user(&u, "from-v1");
  OK(tc_store_user_insert(tx, &u, &err));
  OK(tc_tx_commit(tx, &err));
  /* v1 has no policy table yet. */
  BEGIN(st, 0, tx);
  struct tc_policy_rec p = {0};
  p.data = tc_xstrdup("{}");
  TC_CHECK(tc_store_policy_insert(tx, &p, &err) != 0);
  tc_tx_rollback(tx);
  tc_store_close(st);

  cfg.migrate_to = 0;
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  TC_CHECK_INT(tc_store_schema_version(st), tc_store_latest_version());
  BEGIN(st, 0, tx);
  struct tc_user g;
  OK(tc_store_user_get_by_name(tx, "from-v1", &g, &err));
  TC_CHECK_INT(g.id, u.id);
  tc_user_free(&g);
  OK(tc_store_policy_insert(tx, &p, &err));
  OK(tc_tx_commit(tx, &err));
  tc_store_close(st);
  tc_user_free(&u);
  tc_policy_rec_free(&p);
}

TC_TEST(migration_newer_refused) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  struct tc_err err = {0};
  struct tc_store *st = NULL;
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  tc_store_close(st);
  TC_REQUIRE(raw_exec(&cfg, "INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)") == 0);
  st = NULL;
  TC_CHECK_INT(tc_store_open(&cfg, &st, &err), TC_ESCHEMA);
  TC_CHECK(st == NULL);
  TC_CHECK(strstr(err.msg, "99") != NULL);
  TC_CHECK(strstr(err.msg, "upgrade tailcoat") != NULL);
  tc_store_close(st);
}

TC_TEST(bad_config) {
  struct tc_store_config cfg = {0};
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  cfg.type = 42;
  TC_CHECK_INT(tc_store_open(&cfg, &st, &err), TC_EINVAL);
  cfg.type = TC_DB_SQLITE;
  TC_CHECK_INT(tc_store_open(&cfg, &st, &err), TC_EINVAL);
  cfg.sqlite_path = "/nonexistent-dir-tc/x/y.db";
  TC_CHECK_INT(tc_store_open(&cfg, &st, &err), TC_EDB);
  cfg.type = TC_DB_POSTGRES;
  TC_CHECK_INT(tc_store_open(&cfg, &st, &err), TC_EINVAL);
  cfg.pg_conninfo = "host=/nonexistent-dir-tc dbname=x connect_timeout=2";
  TC_CHECK_INT(tc_store_open(&cfg, &st, &err), TC_EDB);
  TC_CHECK(st == NULL);
}

/* Differential test: random user inserts/renames/deletes, some rolled back,
 * against a naive in-memory reference of what the schema promises (unique
 * names, ids increasing and never reused, rollback leaves no trace). */
struct ref_user {
  int64_t id;
  char name[8];
  bool live;
};

static uint32_t rng_state = 12345;
static uint32_t rng(void) {
  rng_state = rng_state * 1103515245u + 12345u;
  return rng_state >> 8;
}

TC_TEST(differential_users) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  enum { OPS = 400, MAXU = OPS };
  static struct ref_user ref[MAXU];
  int nref = 0;
  int64_t max_id = 0;
  struct tc_err err = {0};
  for (int op = 0; op < OPS; op++) {
    struct tc_tx *tx;
    BEGIN(st, (op % 7 == 0) ? TC_TX_DURABLE : 0, tx);
    bool commit = rng() % 5 != 0;
    int kind = (int)(rng() % 3);
    char name[8];
    snprintf(name, sizeof name, "n%u", rng() % 12);
    int live_with_name = -1;
    for (int i = 0; i < nref; i++)
      if (ref[i].live && !strcmp(ref[i].name, name)) live_with_name = i;
    int target = nref ? (int)(rng() % (uint32_t)nref) : -1;
    int rc, want;
    if (kind == 0 || target < 0) {
      struct tc_user u;
      make_user(&u, name);
      rc = tc_store_user_insert(tx, &u, &err);
      want = live_with_name >= 0 ? TC_EEXIST : 0;
      if (rc == 0) {
        /* Never reuses the id of a row that was committed (even if deleted
         * since). A rolled-back insert's id may come back on SQLite, whose
         * AUTOINCREMENT counter is transactional; PostgreSQL skips it. */
        TC_CHECK(u.id > max_id);
        if (commit) {
          max_id = u.id;
          ref[nref].id = u.id;
          snprintf(ref[nref].name, sizeof ref[nref].name, "%s", name);
          ref[nref].live = true;
          nref++;
        }
      }
      tc_user_free(&u);
    } else if (kind == 1) {
      struct tc_user u;
      make_user(&u, name);
      u.id = ref[target].id;
      rc = tc_store_user_update(tx, &u, &err);
      want = !ref[target].live ? TC_ENOENT
             : (live_with_name >= 0 && live_with_name != target) ? TC_EEXIST
                                                                  : 0;
      if (rc == 0 && commit) snprintf(ref[target].name, sizeof ref[target].name, "%s", name);
      tc_user_free(&u);
    } else {
      rc = tc_store_user_delete(tx, ref[target].id, &err);
      want = ref[target].live ? 0 : TC_ENOENT;
      if (rc == 0 && commit) ref[target].live = false;
    }
    if (rc != want) fprintf(stderr, "  op %d kind %d: got %d want %d (%s)\n", op, kind, rc, want, err.msg);
    TC_CHECK_INT(rc, want);
    if (commit && rc == 0)
      OK(tc_tx_commit(tx, &err));
    else
      tc_tx_rollback(tx);
  }
  struct tc_store_data d;
  OK(tc_store_load_all(st, &d, &err));
  size_t live = 0;
  for (int i = 0; i < nref; i++) {
    if (!ref[i].live) continue;
    TC_CHECK(live < d.n_users);
    if (live < d.n_users) {
      TC_CHECK_INT(d.users[live].id, ref[i].id);
      TC_CHECK_STR(d.users[live].name, ref[i].name);
    }
    live++;
  }
  TC_CHECK_INT(d.n_users, live);
  TC_CHECK(live > 3 && nref > 10); /* the walk did exercise something */
  tc_store_data_free(&d);
  tc_store_close(st);
}

/* Rows edited by hand into nonsense are reported (TC_EDB), not trusted. */
TC_TEST(corrupt_rows_are_errors) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_node a, b;
  make_node(&a, 1, 0);
  make_node(&b, 2, 0);
  OK(tc_store_node_insert(tx, &a, &err));
  OK(tc_store_node_insert(tx, &b, &err));
  OK(tc_tx_commit(tx, &err));
  static const char *const corruptions[] = {
      "UPDATE nodes SET node_key = 'zz' WHERE hostname = 'host-2'",
      "UPDATE nodes SET disco_key = '' WHERE hostname = 'host-2'",
      "UPDATE nodes SET ipv4 = '300.1.2.3' WHERE hostname = 'host-2'",
      "UPDATE nodes SET ipv6 = '100.64.0.1' WHERE hostname = 'host-2'",
      "UPDATE nodes SET tags = '{\"not\":\"a list\"}' WHERE hostname = 'host-2'",
      "UPDATE nodes SET endpoints = '[1,2]' WHERE hostname = 'host-2'",
      "UPDATE nodes SET approved_routes = '[' WHERE hostname = 'host-2'",
  };
  char good_key[2 * TC_KEY_LEN + 1];
  tc_hex_encode(b.node_key, TC_KEY_LEN, good_key);
  for (size_t i = 0; i < TC_ARRAY_LEN(corruptions); i++) {
    /* restore, then corrupt one column */
    char *restore = tc_xasprintf("UPDATE nodes SET node_key = '%s', disco_key = node_key, ipv4 = NULL, "
                                 "ipv6 = NULL, tags = '[]', endpoints = '[]', approved_routes = '[]' "
                                 "WHERE hostname = 'host-2'",
                                 good_key);
    TC_REQUIRE(raw_exec(&cfg, restore) == 0);
    free(restore);
    TC_REQUIRE(raw_exec(&cfg, corruptions[i]) == 0);
    BEGIN(st, TC_TX_READONLY, tx);
    struct tc_node g;
    TC_CHECK_INT(tc_store_node_get(tx, a.id, &g, &err), 0); /* the sound row still reads */
    tc_node_free(&g);
    int rc = tc_store_node_get(tx, b.id, &g, &err);
    if (rc != TC_EDB) fprintf(stderr, "  corruption %zu: got %d\n", i, rc);
    TC_CHECK_INT(rc, TC_EDB);
    tc_tx_rollback(tx);
    struct tc_store_data d;
    TC_CHECK_INT(tc_store_load_all(st, &d, &err), TC_EDB);
    TC_CHECK(d.nodes == NULL && d.n_nodes == 0);
  }
  tc_node_free(&a);
  tc_node_free(&b);
  tc_store_close(st);
}

TC_TEST(readonly_transactions) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u;
  make_user(&u, "reader");
  OK(tc_store_user_insert(tx, &u, &err));
  OK(tc_tx_commit(tx, &err));

  BEGIN(st, TC_TX_READONLY, tx);
  struct tc_user g;
  OK(tc_store_user_get(tx, u.id, &g, &err));
  tc_user_free(&g);
  struct tc_user w;
  make_user(&w, "writer");
  TC_CHECK_INT(tc_store_user_insert(tx, &w, &err), TC_EINVAL);
  TC_CHECK_INT(tc_store_user_delete(tx, u.id, &err), TC_EINVAL);
  TC_CHECK_INT(tc_store_preauth_consume(tx, 1, &err), TC_EINVAL);
  OK(tc_store_user_get_by_name(tx, "reader", &g, &err)); /* still usable */
  tc_user_free(&g);

  /* A second store (another process, in production) can write and commit
   * meanwhile; the reader keeps its snapshot. */
  const char *wal = getenv("TC_TEST_SQLITE_WAL");
  if (cfg.type == TC_DB_POSTGRES || !(wal && !strcmp(wal, "0"))) {
    struct tc_store_config c2 = cfg;
    c2.busy_timeout_ms = 200;
    struct tc_store *st2 = NULL;
    TC_REQUIRE(tc_store_open(&c2, &st2, &err) == 0);
    struct tc_tx *tw;
    BEGIN(st2, 0, tw);
    OK(tc_store_user_insert(tw, &w, &err));
    OK(tc_tx_commit(tw, &err));
    TC_CHECK_INT(tc_store_user_get_by_name(tx, "writer", &g, &err), TC_ENOENT);
    tc_store_close(st2);
  }
  OK(tc_tx_commit(tx, &err));
  tc_user_free(&u);
  tc_user_free(&w);
  tc_store_close(st);
}

/* Appends the UTF-8 encoding of code point c. */
static void put_utf8(struct tc_buf *b, uint32_t c) {
  if (c < 0x80) {
    tc_buf_putc(b, (char)c);
  } else if (c < 0x800) {
    tc_buf_putc(b, (char)(0xc0 | (c >> 6)));
    tc_buf_putc(b, (char)(0x80 | (c & 0x3f)));
  } else if (c < 0x10000) {
    tc_buf_putc(b, (char)(0xe0 | (c >> 12)));
    tc_buf_putc(b, (char)(0x80 | ((c >> 6) & 0x3f)));
    tc_buf_putc(b, (char)(0x80 | (c & 0x3f)));
  } else {
    tc_buf_putc(b, (char)(0xf0 | (c >> 18)));
    tc_buf_putc(b, (char)(0x80 | ((c >> 12) & 0x3f)));
    tc_buf_putc(b, (char)(0x80 | ((c >> 6) & 0x3f)));
    tc_buf_putc(b, (char)(0x80 | (c & 0x3f)));
  }
}

/* Arbitrary valid text (control characters, quotes, backslashes, '?', '$1',
 * astral code points, long values) comes back byte for byte. */
TC_TEST(text_roundtrip_random) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  enum { N = 150 };
  static const uint32_t specials[] = {'\'', '"', '\\', '?', '$', '%', '\n', '\r', '\t', 1, 0x7f,
                                      0xe9, 0x2028, 0xfeff, 0xfffd, 0x1f408, 0x10ffff};
  char *texts[N];
  int64_t ids[N];
  for (int i = 0; i < N; i++) {
    struct tc_buf b = TC_BUF_INIT;
    tc_buf_printf(&b, "%d:", i); /* unique */
    int len = (int)(rng() % (i % 10 == 0 ? 5000 : 40));
    for (int j = 0; j < len; j++) {
      uint32_t c;
      switch (rng() % 4) {
      case 0: c = specials[rng() % TC_ARRAY_LEN(specials)]; break;
      case 1: c = 0x20 + rng() % 0x5f; break;
      case 2: c = 0x80 + rng() % 0xd780; break; /* below the surrogates */
      default: c = 0xe000 + rng() % (0x110000 - 0xe000); break;
      }
      put_utf8(&b, c);
    }
    texts[i] = tc_buf_steal(&b, NULL);
    struct tc_audit a = {0};
    a.action = texts[i];
    a.detail = texts[i];
    OK(tc_store_audit_insert(tx, &a, &err));
    ids[i] = a.id;
  }
  OK(tc_tx_commit(tx, &err));
  BEGIN(st, 0, tx);
  struct tc_audit *al;
  size_t n;
  OK(tc_store_audit_list(tx, 0, &al, &n, &err));
  TC_CHECK_INT(n, N);
  for (size_t i = 0; i < n && i < N; i++) {
    size_t k = N - 1 - i; /* newest first */
    TC_CHECK_INT(al[i].id, ids[k]);
    TC_CHECK(al[i].action && !strcmp(al[i].action, texts[k]));
    TC_CHECK(al[i].detail && !strcmp(al[i].detail, texts[k]));
  }
  tc_store_free_audits(al, n);
  tc_tx_rollback(tx);
  for (int i = 0; i < N; i++) free(texts[i]);
  tc_store_close(st);
}

TC_TEST(invalid_utf8_refused) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  const char *bad[] = {"\xff", "a\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80"};
  for (size_t i = 0; i < TC_ARRAY_LEN(bad); i++) {
    struct tc_user u = {0};
    u.name = (char *)bad[i];
    TC_CHECK_INT(tc_store_user_insert(tx, &u, &err), TC_EINVAL);
  }
  /* Refused before reaching the database: the transaction goes on. */
  struct tc_user ok;
  make_user(&ok, "h\xc3\xa9llo \xf0\x9f\x90\x88");
  OK(tc_store_user_insert(tx, &ok, &err));
  OK(tc_tx_commit(tx, &err));
  BEGIN(st, 0, tx);
  struct tc_user g;
  OK(tc_store_user_get(tx, ok.id, &g, &err));
  TC_CHECK_STR(g.name, ok.name);
  tc_user_free(&g);
  tc_tx_rollback(tx);
  tc_user_free(&ok);
  tc_store_close(st);
}

/* A migration step that fails leaves the database at the previous version
 * and names the step; fixing the cause lets the next open finish. */
TC_TEST(migration_failure_is_atomic) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  struct tc_err err = {0};
  struct tc_store *st = NULL;
  cfg.migrate_to = 2;
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  tc_store_close(st);
  /* Occupy the index name migration 3 creates. */
  TC_REQUIRE(raw_exec(&cfg, "CREATE TABLE squatter (x INTEGER);"
                            "CREATE INDEX ix_preauth_keys__user_id ON squatter(x)") == 0);
  cfg.migrate_to = 0;
  st = NULL;
  int rc = tc_store_open(&cfg, &st, &err);
  TC_CHECK_INT(rc, TC_EDB);
  TC_CHECK(st == NULL);
  TC_CHECK(strstr(err.msg, "migration 3") != NULL);
  cfg.migrate_to = 2;
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  TC_CHECK_INT(tc_store_schema_version(st), 2);
  tc_store_close(st);
  TC_REQUIRE(raw_exec(&cfg, "DROP TABLE squatter") == 0);
  cfg.migrate_to = 0;
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  TC_CHECK_INT(tc_store_schema_version(st), tc_store_latest_version());
  tc_store_close(st);
}

/* Several servers opening an empty database at once: one migrates, the
 * others wait and find it done. */
struct opener {
  const struct tc_store_config *cfg;
  int rc;
  int version;
  pthread_barrier_t *go;
};
static void *open_thread(void *arg) {
  struct opener *o = arg;
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  pthread_barrier_wait(o->go);
  o->rc = tc_store_open(o->cfg, &st, &err);
  if (o->rc) fprintf(stderr, "  concurrent open: %s\n", err.msg);
  if (st) o->version = tc_store_schema_version(st);
  tc_store_close(st);
  return NULL;
}

TC_TEST(concurrent_open_migrates_once) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  enum { N = 6 };
  pthread_barrier_t go;
  pthread_barrier_init(&go, NULL, N);
  pthread_t th[N];
  struct opener o[N];
  for (int i = 0; i < N; i++) {
    o[i] = (struct opener){&cfg, -1, 0, &go};
    pthread_create(&th[i], NULL, open_thread, &o[i]);
  }
  for (int i = 0; i < N; i++) pthread_join(th[i], NULL);
  for (int i = 0; i < N; i++) {
    TC_CHECK_INT(o[i].rc, 0);
    TC_CHECK_INT(o[i].version, tc_store_latest_version());
  }
  pthread_barrier_destroy(&go);
}

#ifndef SUITE_PG
TC_TEST(sqlite_file_is_private) {
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct stat sb;
  TC_REQUIRE(stat(cfg.sqlite_path, &sb) == 0);
  TC_CHECK_INT(sb.st_mode & 077, 0);
  tc_store_close(st);
  /* An in-memory database works too (tests of other modules use it). */
  struct tc_store_config mem = {.type = TC_DB_SQLITE, .sqlite_path = ":memory:"};
  struct tc_err err = {0};
  TC_REQUIRE(tc_store_open(&mem, &st, &err) == 0);
  struct tc_tx *tx;
  BEGIN(st, TC_TX_DURABLE, tx);
  struct tc_user u;
  make_user(&u, "m");
  OK(tc_store_user_insert(tx, &u, &err));
  OK(tc_tx_commit(tx, &err));
  tc_user_free(&u);
  tc_store_close(st);
}

/* Another process (here: another connection) holding the write lock makes
 * begin wait busy_timeout, then report TC_EAGAIN; afterwards it works. */
TC_TEST(sqlite_busy_is_eagain) {
  struct tc_store_config cfg;
  struct tc_store *a = open_fresh(&cfg);
  TC_REQUIRE(a);
  cfg.busy_timeout_ms = 100;
  struct tc_store *b = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_store_open(&cfg, &b, &err) == 0);
  struct tc_tx *ta, *tb = NULL;
  BEGIN(a, 0, ta);
  int64_t t0 = tc_mono_ms();
  TC_CHECK_INT(tc_store_begin(b, 0, &tb, &err), TC_EAGAIN);
  TC_CHECK(tc_mono_ms() - t0 >= 90);
  TC_CHECK(tb == NULL);
  tc_tx_rollback(ta);
  BEGIN(b, 0, tb);
  OK(tc_tx_commit(tb, &err));
  tc_store_close(b);
  tc_store_close(a);
}

/* Users named name as another process sees them: a connection of its own. */
static int outside_count(const struct tc_store_config *cfg, const char *name) {
  sqlite3 *db = NULL;
  int n = -1;
  if (sqlite3_open_v2(cfg->sqlite_path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK) {
    sqlite3_busy_timeout(db, 2000);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM users WHERE name = ?", -1, &st, NULL) == SQLITE_OK) {
      sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
      if (sqlite3_step(st) == SQLITE_ROW) n = sqlite3_column_int(st, 0);
    }
    sqlite3_finalize(st);
  }
  sqlite3_close(db);
  return n;
}

static int later_insert(struct tc_store *st, const char *name, const char *display, uint64_t *ticket,
                        struct tc_err *err) {
  struct tc_tx *tx;
  struct tc_user u = {0};
  u.name = (char *)name;
  u.display_name = (char *)display;
  int rc = tc_store_begin(st, TC_TX_DURABLE_LATER, &tx, err);
  if (rc) return rc;
  if ((rc = tc_store_user_insert(tx, &u, err))) {
    tc_tx_rollback(tx);
    return rc;
  }
  return tc_tx_commit_ticket(tx, ticket, err);
}

/* WAL mode: TC_TX_DURABLE_LATER transactions share one SQLite commit, made
 * by the flush (or by the next transaction of another kind); each still
 * rolls back alone. */
TC_TEST(sqlite_batched_commits) {
  if (!wal_mode()) return;
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  uint64_t ta = 0, tb = 0, tc = 99, td = 0;
  OK(later_insert(st, "batch-a", NULL, &ta, &err));
  OK(later_insert(st, "batch-b", NULL, &tb, &err));
  TC_CHECK(ta > 0);
  TC_CHECK(ta == tb); /* one batch */
  TC_CHECK_INT(later_insert(st, "batch-a", NULL, &tc, &err), TC_EEXIST); /* undone alone */
  /* committed only for this store so far */
  struct tc_tx *tx;
  BEGIN(st, TC_TX_DURABLE_LATER, tx);
  struct tc_user g;
  OK(tc_store_user_get_by_name(tx, "batch-b", &g, &err));
  tc_user_free(&g);
  OK(tc_tx_commit_ticket(tx, &tc, &err));
  TC_CHECK(tc == tb);
  TC_CHECK_INT(outside_count(&cfg, "batch-a"), 0);
  TC_CHECK_INT(outside_count(&cfg, "batch-b"), 0);
  uint64_t s0 = tc_store_syncs(st);
  OK(tc_store_sync(st, tb, &err));
  TC_CHECK_INT(tc_store_syncs(st) - s0, 1);
  TC_CHECK_INT(outside_count(&cfg, "batch-a"), 1);
  TC_CHECK_INT(outside_count(&cfg, "batch-b"), 1);
  /* the next batch is a new ticket; another kind of transaction commits it first */
  OK(later_insert(st, "batch-d", NULL, &td, &err));
  TC_CHECK(td > tb);
  TC_CHECK_INT(outside_count(&cfg, "batch-d"), 0);
  BEGIN(st, 0, tx);
  struct tc_user u;
  make_user(&u, "plain-after-batch");
  OK(tc_store_user_insert(tx, &u, &err));
  tc_user_free(&u);
  OK(tc_tx_commit(tx, &err));
  TC_CHECK_INT(outside_count(&cfg, "batch-d"), 1);
  TC_CHECK_INT(outside_count(&cfg, "plain-after-batch"), 1);
  OK(tc_store_sync(st, td, &err)); /* committed already: only the flush is left */
  /* closing commits a batch nobody synced */
  OK(later_insert(st, "batch-e", NULL, &td, &err));
  tc_store_close(st);
  TC_CHECK_INT(outside_count(&cfg, "batch-e"), 1);
}

/* A batch whose commit fails (here: the file size limit stops the WAL from
 * growing) loses writes its callers were told were committed, though not
 * that they were durable: the sync fails, and the store refuses everything
 * after it (ping too), so the server reports unhealthy and a restart
 * reloads what the database really has. */
TC_TEST(sqlite_failed_batch_commit_breaks_the_store) {
  if (!wal_mode()) return;
  struct tc_store_config cfg;
  struct tc_store *st = open_fresh(&cfg);
  TC_REQUIRE(st);
  struct tc_err err = {0};
  uint64_t t = 0;
  OK(later_insert(st, "kept", NULL, &t, &err));
  OK(tc_store_sync(st, t, &err));
  tc_store_close(st);
  fflush(NULL);
  pid_t pid = fork();
  TC_REQUIRE(pid >= 0);
  if (pid == 0) {
    int bad = 0;
    struct tc_store *cs = NULL;
    struct tc_err e = {0};
    if (tc_store_open(&cfg, &cs, &e)) _exit(10);
    size_t big = 200 * 1024; /* fits the page cache: the failure comes at the commit */
    char *display = malloc(big + 1);
    memset(display, 'x', big);
    display[big] = 0;
    signal(SIGXFSZ, SIG_IGN);
    struct stat sb;
    char wal[600];
    snprintf(wal, sizeof wal, "%s-wal", cfg.sqlite_path);
    off_t lim = stat(wal, &sb) == 0 ? sb.st_size + 8192 : 8192;
    struct rlimit rl = {(rlim_t)lim, (rlim_t)lim};
    if (setrlimit(RLIMIT_FSIZE, &rl)) _exit(11);
    uint64_t t1 = 0, t2 = 0;
    if (later_insert(cs, "lost-1", NULL, &t1, &e) || later_insert(cs, "lost-2", display, &t2, &e)) bad |= 1;
    if (tc_store_sync(cs, t2, &e) != TC_EDB) bad |= 2;
    struct tc_tx *tx = NULL;
    if (tc_store_begin(cs, TC_TX_READONLY, &tx, &e) != TC_EDB || tx) bad |= 4;
    if (!strstr(e.msg, "restart")) bad |= 8;
    if (tc_store_ping(cs, &e) != TC_EDB) bad |= 16;
    if (later_insert(cs, "after", NULL, &t1, &e) != TC_EDB) bad |= 32;
    tc_store_close(cs);
    free(display);
    _exit(bad);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  TC_CHECK(WIFEXITED(status));
  TC_CHECK_INT(WEXITSTATUS(status), 0);
  /* what the database has: the earlier commit, nothing of the failed batch */
  TC_CHECK_INT(outside_count(&cfg, "kept"), 1);
  TC_CHECK_INT(outside_count(&cfg, "lost-1"), 0);
  TC_CHECK_INT(outside_count(&cfg, "lost-2"), 0);
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  OK(later_insert(st, "after-restart", NULL, &t, &err));
  OK(tc_store_sync(st, t, &err));
  tc_store_close(st);
  TC_CHECK_INT(outside_count(&cfg, "after-restart"), 1);
}
#endif

/* ---- PostgreSQL only ----------------------------------------------------------------------- */
#ifdef SUITE_PG
static const char *dbname_of(const struct tc_store_config *cfg) {
  static char name[64];
  const char *p = strstr(cfg->pg_conninfo, "dbname='");
  snprintf(name, sizeof name, "%s", p ? p + 8 : "");
  char *q = strchr(name, '\'');
  if (q) *q = 0;
  return name;
}

/* Terminates the database's other backends and waits (up to 30 s) until
 * they are gone: pg_terminate_backend only signals, and a fixed sleep after
 * it was not always enough on a loaded machine (the "connection lost
 * mid-transaction" check then saw a still-alive backend). */
static int terminate_backends(const struct tc_store_config *cfg) {
  int n = pg_admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = $1 AND pid <> pg_backend_pid()",
                   dbname_of(cfg));
  for (int i = 0; i < 3000; i++) {
    int left = pg_admin("SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                        dbname_of(cfg));
    if (left <= 0) break;
    usleep(10 * 1000);
  }
  return n;
}

TC_TEST(pg_reconnect) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  cfg.pg_max_conns = 3;
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  /* Fill the pool: three transactions at once hold three connections. */
  struct tc_tx *t[3];
  for (int i = 0; i < 3; i++) BEGIN(st, 0, t[i]);
  for (int i = 0; i < 3; i++) OK(tc_tx_commit(t[i], &err));
  TC_CHECK_INT(terminate_backends(&cfg), 3);
  usleep(100 * 1000);
  /* Every pooled connection is dead now; operations still succeed. */
  for (int i = 0; i < 6; i++) {
    struct tc_tx *tx;
    BEGIN(st, 0, tx);
    struct tc_user u;
    char name[16];
    snprintf(name, sizeof name, "re%d", i);
    make_user(&u, name);
    OK(tc_store_user_insert(tx, &u, &err));
    OK(tc_tx_commit(tx, &err));
    tc_user_free(&u);
  }
  terminate_backends(&cfg);
  usleep(100 * 1000);
  OK(tc_store_ping(st, &err));
  /* A connection lost mid-transaction is reported as retryable, and the
   * next transaction works. */
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u;
  make_user(&u, "mid1");
  OK(tc_store_user_insert(tx, &u, &err));
  tc_user_free(&u);
  TC_CHECK(terminate_backends(&cfg) >= 1);
  usleep(100 * 1000);
  make_user(&u, "mid2");
  TC_CHECK_INT(tc_store_user_insert(tx, &u, &err), TC_EAGAIN);
  tc_user_free(&u);
  TC_CHECK(tc_tx_commit(tx, &err) != 0);
  struct tc_store_data d;
  OK(tc_store_load_all(st, &d, &err));
  TC_CHECK_INT(d.n_users, 6); /* mid1 was never committed */
  tc_store_data_free(&d);
  tc_store_close(st);
}

TC_TEST(pg_pool_exhaustion_is_eagain) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  cfg.pg_max_conns = 1;
  cfg.pg_acquire_timeout_ms = 150;
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_store_open(&cfg, &st, &err) == 0);
  struct tc_tx *a, *b = NULL;
  BEGIN(st, 0, a);
  int64_t t0 = tc_mono_ms();
  TC_CHECK_INT(tc_store_begin(st, 0, &b, &err), TC_EAGAIN);
  TC_CHECK(tc_mono_ms() - t0 >= 140);
  TC_CHECK(strstr(err.msg, "busy") != NULL);
  OK(tc_tx_commit(a, &err));
  BEGIN(st, 0, b);
  tc_tx_rollback(b);
  tc_store_close(st);
}

/* The operator may also give a URL; libpq expands it. */
TC_TEST(pg_url_conninfo) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  char *url = tc_xasprintf("postgresql:///%s?host=%s%s%s%s%s", dbname_of(&cfg), pg_host,
                           *pg_user ? "&user=" : "", pg_user, *pg_port ? "&port=" : "", pg_port);
  cfg.pg_conninfo = url;
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  int rc = tc_store_open(&cfg, &st, &err);
  if (rc) fprintf(stderr, "  open %s: %s\n", url, err.msg);
  TC_CHECK_INT(rc, 0);
  if (st) TC_CHECK_INT(tc_store_schema_version(st), tc_store_latest_version());
  tc_store_close(st);
  free(url);
}

TC_TEST(pg_multi_host) {
  struct tc_store_config cfg;
  fresh_db(&cfg);
  char hosts[600];
  snprintf(hosts, sizeof hosts, "/nonexistent-tc-socket-dir,%s", pg_host);
  char *ci = pg_conninfo_for(hosts, dbname_of(&cfg));
  /* pg_conninfo_for repeats one port for both hosts when a port is set. */
  if (*pg_port) {
    free(ci);
    struct tc_buf b = TC_BUF_INIT;
    tc_buf_printf(&b, "host='%s' port='%s,%s' dbname='%s' connect_timeout=5", hosts, pg_port,
                  pg_port, dbname_of(&cfg));
    if (*pg_user) tc_buf_printf(&b, " user='%s'", pg_user);
    ci = tc_buf_steal(&b, NULL);
  }
  cfg.pg_conninfo = ci;
  struct tc_store *st = NULL;
  struct tc_err err = {0};
  int rc = tc_store_open(&cfg, &st, &err);
  if (rc) fprintf(stderr, "  open: %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  OK(tc_store_ping(st, &err));
  struct tc_tx *tx;
  BEGIN(st, 0, tx);
  struct tc_user u;
  make_user(&u, "multi");
  OK(tc_store_user_insert(tx, &u, &err));
  OK(tc_tx_commit(tx, &err));
  tc_user_free(&u);
  tc_store_close(st);
  free(ci);
}
#endif

int main(int argc, char **argv) {
#ifdef SUITE_PG
  pg_parse_url();
#endif
  int rc = tc_test_main(argc, argv);
  for (int i = 0; i < ncreated; i++) {
#ifdef SUITE_PG
    if (!strncmp(created[i], "tcst_", 5)) {
      char *sql = tc_xasprintf("DROP DATABASE IF EXISTS %s WITH (FORCE)", created[i]);
      pg_admin(sql, NULL);
      free(sql);
    }
#else
    if (strstr(created[i], "tctest-") && !strstr(created[i], ".db")) {
      char *cmd = tc_xasprintf("rm -rf '%s'", created[i]);
      if (system(cmd) != 0) fprintf(stderr, "cleanup of %s failed\n", created[i]);
      free(cmd);
    }
#endif
    free(created[i]);
  }
  return rc;
}
