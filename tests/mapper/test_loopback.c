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

/* ---- the test client's decoder: multi-frame map messages ----------------------------- */
#include <zstd.h>

static void put_len(struct tc_buf *b, size_t at) {
  size_t n = b->len - at - 4;
  uint8_t *p = (uint8_t *)b->data + at;
  p[0] = (uint8_t)n, p[1] = (uint8_t)(n >> 8), p[2] = (uint8_t)(n >> 16), p[3] = (uint8_t)(n >> 24);
}

/* One frame whose header does not record the content size (streaming). */
static void zstd_unknown_size(const char *s, struct tc_buf *out) {
  ZSTD_CCtx *c = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 0);
  size_t bound = ZSTD_compressBound(strlen(s)) + 32;
  tc_buf_reserve(out, bound);
  ZSTD_inBuffer in = {s, strlen(s), 0};
  ZSTD_outBuffer ob = {out->data + out->len, bound, 0};
  while (ZSTD_compressStream2(c, &ob, &in, ZSTD_e_end) != 0) {
  }
  out->len += ob.pos;
  ZSTD_freeCCtx(c);
}

/* tc_map_unframe takes messages of several frames as the Go decoder does:
 * concatenated output, skippable frames ignored, frames without a recorded
 * size accepted, the total bounded by max_json, truncation refused. */
TC_TEST(unframe_decodes_multi_frame_messages) {
  const char *parts[] = {"{\"Peers\":[", "{\"ID\":1},{\"ID\":2}", ",{\"ID\":3}", "]}"};
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_append(&b, "\0\0\0\0", 4);
  for (size_t i = 0; i < TC_ARRAY_LEN(parts); i++) {
    if (i == 2) zstd_unknown_size(parts[i], &b);
    else tc_mapper_zstd(parts[i], strlen(parts[i]), &b);
    if (i == 1) tc_buf_append(&b, "\x50\x2a\x4d\x18\x03\x00\x00\x00xyz", 11); /* skippable frame */
  }
  put_len(&b, 0);
  size_t used = 0, jl = 0;
  char *js = NULL;
  TC_REQUIRE(tc_map_unframe((const uint8_t *)b.data, b.len, 1 << 20, &used, &js, &jl) == 0);
  TC_CHECK_INT(used, b.len);
  TC_CHECK_STR(js, "{\"Peers\":[{\"ID\":1},{\"ID\":2},{\"ID\":3}]}");
  TC_CHECK_INT(jl, strlen(js));
  free(js);
  /* the bound applies to the sum of the frames, known sizes or not */
  TC_CHECK_INT(tc_map_unframe((const uint8_t *)b.data, b.len, 20, &used, &js, &jl), TC_ETOOBIG);
  TC_CHECK_INT(tc_map_unframe((const uint8_t *)b.data, b.len, 37, &used, &js, &jl), TC_ETOOBIG); /* 38 bytes */
  TC_REQUIRE(tc_map_unframe((const uint8_t *)b.data, b.len, 38, &used, &js, &jl) == 0);
  free(js);
  /* a message that ends inside a frame, or with garbage after the frames */
  struct tc_buf t = TC_BUF_INIT;
  tc_buf_append(&t, b.data, b.len - 3);
  put_len(&t, 0);
  TC_CHECK_INT(tc_map_unframe((const uint8_t *)t.data, t.len, 1 << 20, &used, &js, &jl), TC_EPROTO);
  t.len = 0;
  tc_buf_append(&t, b.data, b.len);
  tc_buf_append(&t, "\x28\xb5", 2);
  put_len(&t, 0);
  TC_CHECK_INT(tc_map_unframe((const uint8_t *)t.data, t.len, 1 << 20, &used, &js, &jl), TC_EPROTO);
  /* nothing but a skippable frame: no message */
  t.len = 0;
  tc_buf_append(&t, "\0\0\0\0\x50\x2a\x4d\x18\x00\x00\x00\x00", 12);
  put_len(&t, 0);
  TC_CHECK_INT(tc_map_unframe((const uint8_t *)t.data, t.len, 1 << 20, &used, &js, &jl), TC_EPROTO);
  /* a highly compressible frame claiming little but expanding a lot */
  char *big = malloc(1 << 20);
  memset(big, '7', 1 << 20);
  big[(1 << 20) - 1] = 0;
  t.len = 0;
  tc_buf_append(&t, "\0\0\0\0", 4);
  zstd_unknown_size(big, &t);
  put_len(&t, 0);
  TC_CHECK(t.len < 4096);
  TC_CHECK_INT(tc_map_unframe((const uint8_t *)t.data, t.len, 64 * 1024, &used, &js, &jl), TC_ETOOBIG);
  TC_REQUIRE(tc_map_unframe((const uint8_t *)t.data, t.len, 2 << 20, &used, &js, &jl) == 0);
  TC_CHECK_INT(jl, (1 << 20) - 1);
  free(js);
  free(big);
  /* the mapper's own multi-frame messages */
  struct tc_mapper_msg m;
  tc_mapper_msg_init(&m);
  tc_buf_puts(&m.text, "{\"a\":[");
  struct tc_buf z = TC_BUF_INIT;
  tc_mapper_zstd("1,2", 3, &z);
  tc_mapper_msg_zframes(&m, z.data, z.len);
  tc_mapper_msg_zframes(&m, z.data, z.len); /* no text in between: no empty frame */
  tc_buf_puts(&m.text, "]}");
  struct tc_buf out = TC_BUF_INIT;
  tc_mapper_msg_finish(&m, &out);
  TC_REQUIRE(tc_map_unframe((const uint8_t *)out.data, out.len, 1 << 20, &used, &js, &jl) == 0);
  TC_CHECK_STR(js, "{\"a\":[1,21,2]}");
  free(js);
  /* hostile bytes: flipped bits, truncations, overwritten length */
  uint64_t x = 0x9e3779b97f4a7c15ull;
  int decoded = 0;
  for (int i = 0; i < 3000 && !tc_test_failures; i++) {
    t.len = 0;
    tc_buf_append(&t, b.data, b.len);
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    size_t len = t.len;
    int op = (int)(x % 3);
    if (op == 0) t.data[4 + (x >> 8) % (t.len - 4)] ^= (char)(1u << ((x >> 20) % 8));
    else if (op == 1) len = (size_t)((x >> 8) % t.len);
    else t.data[(x >> 8) % t.len] = (char)(x >> 32);
    char *o = NULL;
    size_t u = 0, ol = 0;
    int rc = tc_map_unframe((const uint8_t *)t.data, len, 4096, &u, &o, &ol);
    TC_CHECK(rc == 0 || rc == TC_EAGAIN || rc == TC_EPROTO || rc == TC_ETOOBIG);
    if (rc == 0) {
      decoded++;
      TC_CHECK(u <= len && ol <= 4096 && o[ol] == 0);
      free(o);
    }
  }
  TC_CHECK(decoded < 3000);
  tc_buf_free(&z);
  tc_buf_free(&out);
  tc_buf_free(&t);
  tc_buf_free(&b);
}
