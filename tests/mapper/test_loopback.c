/* Loopback integration: the real transport (Noise + HTTP/2, server/proto),
 * the model on SQLite and the mapper, driven by the tailscaled-like test
 * client. Registration in the v1.60 and v1.66+ forms, map streams with
 * deltas, a lite update and a Followup sharing one connection with a live
 * map stream, and hostile requests that must not break the connection. */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/crypto.h"
#include "mapper/mapper.h"
#include "model/model.h"
#include "proto/proto.h"
#include "storage/store.h"
#include "tc_test.h"
#include "tclient.h"

struct fx {
  char *dir;
  struct tc_store *store;
  struct tc_model *model;
  struct tc_mapper *mp;
  struct tc_ctl_server *srv;
  struct tc_tlistener *lis;
  uint8_t priv[32], pub[32];
  int port;
  int64_t user_id;
  char *authkey;
};

static bool fx_open(struct fx *x) {
  memset(x, 0, sizeof *x);
  struct tc_err err = {0};
  x->dir = tc_test_tmpdir();
  char *db = tc_xasprintf("%s/db.sqlite", x->dir);
  struct tc_store_config sc = {.type = TC_DB_SQLITE, .sqlite_path = db, .sqlite_wal = true};
  int rc = tc_store_open(&sc, &x->store, &err);
  free(db);
  if (rc) return false;
  struct tc_model_config mc = {.base_domain = "tail.example.com"};
  if (tc_model_open(&mc, x->store, &x->model, &err)) return false;
  if (tc_model_user_create(x->model, "cli", "alice", NULL, NULL, &x->user_id, &err)) return false;
  struct tc_preauth_opts po = {.user_id = x->user_id, .reusable = true};
  if (tc_model_preauth_create(x->model, "cli", &po, NULL, &x->authkey, &err)) return false;
  struct tc_mapper_env env = {.base_domain = "tail.example.com", .domain = "example.com",
                              .derp_json = "{\"Regions\":{\"999\":{\"RegionID\":999,\"Nodes\":[]}}}"};
  struct tc_mapper_opts mo = {.model = x->model, .env = &env, .server_url = "http://127.0.0.1", .offline_grace_ms = -1};
  if (tc_mapper_new(&mo, &x->mp, &err)) return false;
  tc_x25519_keygen(x->priv, x->pub);
  struct tc_ctl_server_opts so = {.workers = 4};
  if (tc_ctl_server_new(tc_mapper_handle, x->mp, x->priv, &so, &x->srv, &err)) return false;
  if (tc_tlistener_start(x->pub, tc_ctl_upgrade, x->srv, &x->lis)) return false;
  x->port = tc_tlistener_port(x->lis);
  return true;
}

static void fx_close(struct fx *x) {
  tc_tlistener_stop(x->lis);
  tc_ctl_server_stop(x->srv); /* transport first: its cancel callbacks reach the mapper */
  tc_mapper_free(x->mp);
  tc_model_close(x->model);
  tc_store_close(x->store);
  tc_free_secret(x->authkey, strlen(x->authkey));
  free(x->dir);
}

static struct tc_tclient *client(struct fx *x, uint16_t version) {
  struct tc_tclient_opts o = {.version = version, .server_pub = x->pub};
  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  if (tc_tclient_connect("127.0.0.1", x->port, &o, &c, &err)) fprintf(stderr, "  connect: %s\n", err.msg);
  return c;
}

static char *nodekey(int seed) {
  uint8_t k[32];
  for (int i = 0; i < 32; i++) k[i] = (uint8_t)(seed * 13 + i);
  char t[TC_MAPPER_KEY_TEXT];
  tc_mapper_key_format(TC_MKEY_NODE, k, t);
  return strdup(t);
}

#define ZERO_NK "nodekey:0000000000000000000000000000000000000000000000000000000000000000"

/* v1.60 sends the Auth object always; v1.66+ only with a key. */
static char *reg_json(int version, int seed, const char *authkey, const char *followup) {
  char *nk = nodekey(seed);
  char *auth;
  if (version < 95)
    auth = tc_xasprintf(",\"Auth\":{\"Provider\":\"\",\"LoginName\":\"\",\"Oauth2Token\":null,\"AuthKey\":\"%s\"}",
                        authkey ? authkey : "");
  else
    auth = authkey ? tc_xasprintf(",\"Auth\":{\"AuthKey\":\"%s\"}", authkey) : strdup("");
  char *b = tc_xasprintf("{\"Version\":%d,\"NodeKey\":\"%s\",\"OldNodeKey\":\"" ZERO_NK "\"%s,"
                         "\"Expiry\":\"0001-01-01T00:00:00Z\",\"Followup\":\"%s\",\"Hostinfo\":{\"Hostname\":\"n%d\","
                         "\"OS\":\"linux\",\"IPNVersion\":\"1.%d.0\"},\"Ephemeral\":false}",
                         version, nk, auth, followup ? followup : "", seed, version);
  free(nk);
  free(auth);
  return b;
}

static json_t *request(struct tc_tclient *c, const char *path, const char *body, int *status) {
  char *resp = NULL;
  size_t rl = 0;
  *status = 0;
  if (tc_tclient_request(c, "POST", path, body, strlen(body), 10000, status, &resp, &rl)) return NULL;
  json_t *j = json_loadb(resp ? resp : "", rl, 0, NULL);
  free(resp);
  return j;
}

static int32_t open_map(struct tc_tclient *c, int version, int seed) {
  char *nk = nodekey(seed);
  char *b = tc_xasprintf("{\"Version\":%d,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"%s\",\"Stream\":true,"
                         "\"Hostinfo\":{\"Hostname\":\"n%d\",\"OS\":\"linux\"}}",
                         version, nk, seed);
  int32_t sid = tc_tclient_submit(c, "POST", "/machine/map", "application/json", b, strlen(b));
  free(nk);
  free(b);
  return sid;
}

/* Next message with `key` (PeersChanged / PeersRemoved / Node) about id. */
static json_t *map_wait(struct tc_tclient *c, int32_t sid, const char *key, int64_t id) {
  int64_t deadline = tc_mono_ms() + 30000; /* generous: ASan on a loaded machine */
  while (tc_mono_ms() < deadline) {
    char *js = NULL;
    size_t jl = 0;
    int rc = tc_tclient_map_next(c, sid, (int)(deadline - tc_mono_ms()), &js, &jl);
    if (rc) return NULL;
    json_t *m = json_loadb(js, jl, 0, NULL);
    free(js);
    if (!m) return NULL;
    json_t *v = json_object_get(m, key);
    bool hit = false;
    size_t i;
    json_t *p;
    if (v && !strcmp(key, "Node")) hit = true;
    else if (v && !strcmp(key, "PeersRemoved")) json_array_foreach(v, i, p) hit |= json_integer_value(p) == id;
    else if (v) json_array_foreach(v, i, p) hit |= json_integer_value(json_object_get(p, "ID")) == id ||
                                                  json_integer_value(json_object_get(p, "NodeID")) == id;
    if (hit) return m;
    json_decref(m);
  }
  return NULL;
}


/* Waits for a message whose JSON text contains needle. */
static bool map_wait_text(struct tc_tclient *c, int32_t sid, const char *needle) {
  int64_t deadline = tc_mono_ms() + 30000; /* generous: ASan on a loaded machine */
  while (tc_mono_ms() < deadline) {
    char *js = NULL;
    size_t jl = 0;
    if (tc_tclient_map_next(c, sid, (int)(deadline - tc_mono_ms()), &js, &jl)) return false;
    bool hit = strstr(js, needle) != NULL;
    free(js);
    if (hit) return true;
  }
  return false;
}

static int64_t node_id_of(struct fx *x, int seed) {
  uint8_t k[32];
  for (int i = 0; i < 32; i++) k[i] = (uint8_t)(seed * 13 + i);
  struct tc_snapshot *s = tc_model_snapshot(x->model);
  const struct tc_node *n = tc_snapshot_node_by_node_key(s, k);
  int64_t id = n ? n->id : 0;
  tc_snapshot_release(s);
  return id;
}

TC_TEST(official_like_clients_register_and_map) {
  struct fx x;
  TC_REQUIRE(fx_open(&x));
  struct tc_tclient *c1 = client(&x, 87), *c2 = client(&x, 138);
  TC_REQUIRE(c1 && c2);
  int st;
  char *b = reg_json(87, 1, x.authkey, NULL);
  json_t *r = request(c1, "/machine/register", b, &st);
  free(b);
  TC_CHECK_INT(st, 200);
  TC_REQUIRE(r != NULL);
  TC_CHECK(json_is_true(json_object_get(r, "MachineAuthorized")));
  TC_CHECK_STR(json_string_value(json_object_get(r, "AuthURL")), "");
  TC_CHECK(json_integer_value(json_object_get(json_object_get(r, "User"), "ID")) > 0);
  json_decref(r);
  b = reg_json(138, 2, x.authkey, NULL);
  r = request(c2, "/machine/register", b, &st);
  free(b);
  TC_CHECK_INT(st, 200);
  TC_CHECK(r && json_is_true(json_object_get(r, "MachineAuthorized")));
  json_decref(r);
  int64_t n1 = node_id_of(&x, 1), n2 = node_id_of(&x, 2);
  TC_REQUIRE(n1 > 0 && n2 > 0);

  int32_t s1 = open_map(c1, 87, 1);
  TC_REQUIRE(s1 > 0);
  TC_CHECK_INT(tc_tclient_wait_headers(c1, s1, 5000), 200);
  json_t *m = map_wait(c1, s1, "Node", 0);
  TC_REQUIRE(m != NULL);
  json_t *self = json_object_get(m, "Node");
  TC_CHECK_INT(json_integer_value(json_object_get(self, "ID")), n1);
  TC_CHECK(json_is_true(json_object_get(self, "MachineAuthorized")));
  TC_CHECK(json_array_size(json_object_get(self, "AllowedIPs")) >= 1);
  json_t *peers = json_object_get(m, "Peers");
  TC_CHECK_INT(json_array_size(peers), 1);
  TC_CHECK_INT(json_integer_value(json_object_get(json_array_get(peers, 0), "ID")), n2);
  TC_CHECK(json_object_get(json_object_get(json_object_get(m, "DERPMap"), "Regions"), "999") != NULL);
  json_decref(m);

  int32_t s2 = open_map(c2, 138, 2);
  m = map_wait(c2, s2, "Node", 0);
  TC_REQUIRE(m != NULL);
  TC_CHECK_INT(json_integer_value(json_object_get(json_array_get(json_object_get(m, "Peers"), 0), "ID")), n1);
  json_decref(m);

  /* a lite update on c2's connection while its stream is open: 200, c1 hears it */
  char *nk2 = nodekey(2);
  b = tc_xasprintf("{\"Version\":138,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"%s\",\"OmitPeers\":true,"
                   "\"Endpoints\":[\"203.0.113.44:41641\"],\"Hostinfo\":{\"Hostname\":\"n2\",\"OS\":\"linux\","
                   "\"NetInfo\":{\"PreferredDERP\":999}}}",
                   nk2);
  free(nk2);
  char *resp = NULL;
  size_t rl;
  TC_CHECK(tc_tclient_request(c2, "POST", "/machine/map", b, strlen(b), 5000, &st, &resp, &rl) == 0);
  TC_CHECK_INT(st, 200);
  free(resp);
  free(b);
  TC_CHECK(map_wait_text(c1, s1, "203.0.113.44:41641"));
  /* a one-shot fetch over the real transport: 200 and exactly one framed map */
  nk2 = nodekey(2);
  b = tc_xasprintf("{\"Version\":138,\"Compress\":\"zstd\",\"NodeKey\":\"%s\"}", nk2);
  free(nk2);
  resp = NULL;
  TC_CHECK(tc_tclient_request(c2, "POST", "/machine/map", b, strlen(b), 5000, &st, &resp, &rl) == 0);
  free(b);
  TC_CHECK_INT(st, 200);
  size_t used = 0, jl = 0;
  char *js = NULL;
  TC_CHECK(resp && tc_map_unframe((const uint8_t *)resp, rl, 1 << 24, &used, &js, &jl) == 0);
  TC_CHECK_INT(used, rl);
  TC_CHECK(js && strstr(js, "\"Peers\":[") != NULL);
  free(js);
  free(resp);
  /* a third client joins: both streams get it as a delta */
  struct tc_tclient *c3 = client(&x, 95);
  TC_REQUIRE(c3 != NULL);
  b = reg_json(95, 3, x.authkey, NULL);
  r = request(c3, "/machine/register", b, &st);
  free(b);
  TC_CHECK(r && json_is_true(json_object_get(r, "MachineAuthorized")));
  json_decref(r);
  int64_t n3 = node_id_of(&x, 3);
  m = map_wait(c1, s1, "PeersChanged", n3);
  TC_CHECK(m != NULL);
  json_decref(m);
  m = map_wait(c2, s2, "PeersChanged", n3);
  TC_CHECK(m != NULL);
  json_decref(m);

  /* deleted through the model: PeersRemoved */
  struct tc_err err = {0};
  TC_CHECK(tc_model_node_delete(x.model, "cli", n3, &err) == 0);
  m = map_wait(c1, s1, "PeersRemoved", n3);
  TC_CHECK(m != NULL);
  json_decref(m);

  /* c2 resets its map stream (RST_STREAM): the transport's cancel reaches
   * the mapper, the node goes offline and c1 is told */
  TC_CHECK(tc_tclient_reset(c2, s2) == 0);
  TC_CHECK(map_wait_text(c1, s1, "\"Online\":false"));
  struct tc_snapshot *snap = tc_model_snapshot(x.model);
  TC_CHECK(!tc_snapshot_is_online(snap, n2));
  tc_snapshot_release(snap);
  /* and a dropped connection does the same for c1's own node, seen by a new c2 stream */
  int32_t s2b = open_map(c2, 138, 2);
  m = map_wait(c2, s2b, "Node", 0);
  TC_CHECK(m != NULL);
  json_decref(m);
  tc_tclient_free(c1);
  c1 = NULL;
  TC_CHECK(map_wait_text(c2, s2b, "\"Online\":false"));

  tc_tclient_free(c1);
  tc_tclient_free(c2);
  tc_tclient_free(c3);
  fx_close(&x);
}

struct approver {
  struct fx *x;
  char reg_id[64];
};
static void *approve_later(void *arg) {
  struct approver *ap = arg;
  struct timespec ts = {0, 500 * 1000000L};
  nanosleep(&ts, NULL);
  struct tc_err err = {0};
  tc_model_pending_approve(ap->x->model, "cli", ap->reg_id, ap->x->user_id, NULL, &err);
  return NULL;
}

TC_TEST(followup_on_the_same_connection_as_a_live_stream) {
  struct fx x;
  TC_REQUIRE(fx_open(&x));
  struct tc_tclient *c = client(&x, 138);
  TC_REQUIRE(c != NULL);
  int st;
  /* a node already on the connection, with a live stream */
  char *b = reg_json(138, 7, x.authkey, NULL);
  json_t *r = request(c, "/machine/register", b, &st);
  free(b);
  json_decref(r);
  int32_t s = open_map(c, 138, 7);
  json_t *m = map_wait(c, s, "Node", 0);
  TC_REQUIRE(m != NULL);
  json_decref(m);
  /* interactive registration of a new key on the same machine */
  b = reg_json(138, 8, NULL, NULL);
  r = request(c, "/machine/register", b, &st);
  free(b);
  TC_REQUIRE(r != NULL);
  const char *url = json_string_value(json_object_get(r, "AuthURL"));
  TC_REQUIRE(url && strstr(url, "/register/"));
  struct approver ap = {.x = &x};
  snprintf(ap.reg_id, sizeof ap.reg_id, "%s", strstr(url, "/register/") + 10);
  b = reg_json(138, 8, NULL, url);
  json_decref(r);
  int32_t fsid = tc_tclient_submit(c, "POST", "/machine/register", "application/json", b, strlen(b));
  free(b);
  TC_REQUIRE(fsid > 0);
  TC_CHECK_INT(tc_tclient_wait_closed(c, fsid, 200), TC_EAGAIN); /* blocked: no body yet */
  /* meanwhile the map stream still flows: a rename arrives */
  struct tc_err err = {0};
  int64_t n7 = node_id_of(&x, 7);
  TC_CHECK(tc_model_node_rename(x.model, "cli", n7, "renamed", &err) == 0);
  m = map_wait(c, s, "Node", 0);
  TC_CHECK(m != NULL);
  json_decref(m);
  pthread_t t;
  pthread_create(&t, NULL, approve_later, &ap);
  TC_CHECK_INT(tc_tclient_wait_headers(c, fsid, 8000), 200);
  TC_CHECK_INT(tc_tclient_wait_closed(c, fsid, 5000), 0);
  pthread_join(t, NULL);
  size_t bl;
  const char *body = tc_tclient_body(c, fsid, &bl);
  json_t *j = json_loadb(body ? body : "", bl, 0, NULL);
  TC_CHECK(j && json_is_true(json_object_get(j, "MachineAuthorized")));
  json_decref(j);
  tc_tclient_free(c);
  fx_close(&x);
}

TC_TEST(hostile_requests_over_noise_keep_the_connection) {
  struct fx x;
  TC_REQUIRE(fx_open(&x));
  struct tc_tclient *owner = client(&x, 138), *evil = client(&x, 138);
  TC_REQUIRE(owner && evil);
  int st;
  char *b = reg_json(138, 4, x.authkey, NULL);
  json_t *r = request(owner, "/machine/register", b, &st);
  json_decref(r);
  struct tc_snapshot *s0 = tc_model_snapshot(x.model);
  uint64_t seq0 = s0->seq;
  tc_snapshot_release(s0);
  /* the same node key from another machine key */
  r = request(evil, "/machine/register", b, &st);
  TC_CHECK_INT(st, 401);
  json_decref(r);
  int32_t sid = open_map(evil, 138, 4);
  TC_CHECK_INT(tc_tclient_wait_headers(evil, sid, 5000), 401);
  s0 = tc_model_snapshot(x.model);
  TC_CHECK_INT(s0->seq, seq0);
  tc_snapshot_release(s0);
  free(b);
  /* malformed and oversized bodies: 400 (413 from the transport over 1 MiB) */
  const char *bad[] = {"{", "[]", "{\"Version\":\"x\"}", "{\"Version\":138,\"NodeKey\":\"nodekey:zz\"}"};
  for (size_t i = 0; i < TC_ARRAY_LEN(bad); i++) {
    r = request(evil, "/machine/register", bad[i], &st);
    TC_CHECK_INT(st, 400);
    json_decref(r);
    r = request(evil, "/machine/map", bad[i], &st);
    TC_CHECK_INT(st, 400);
    json_decref(r);
  }
  size_t n = 1100 * 1000;
  char *big = malloc(n);
  memset(big, ' ', n);
  big[0] = '{';
  big[n - 1] = '}';
  char *resp = NULL;
  size_t rl;
  tc_tclient_request(evil, "POST", "/machine/register", big, n, 10000, &st, &resp, &rl);
  TC_CHECK(st == 400 || st == 413);
  free(resp);
  free(big);
  /* the connection still serves: a good registration of its own key works */
  b = reg_json(138, 5, x.authkey, NULL);
  r = request(evil, "/machine/register", b, &st);
  free(b);
  TC_CHECK_INT(st, 200);
  TC_CHECK(r && json_is_true(json_object_get(r, "MachineAuthorized")));
  json_decref(r);
  tc_tclient_free(owner);
  tc_tclient_free(evil);
  fx_close(&x);
}
