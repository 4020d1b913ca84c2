/* Control-logic tests of server/mapper against the real model (SQLite in a
 * temp dir) with an in-memory fake transport stream: registration paths,
 * map streams with full maps and deltas, supersede, keep-alives, slow-stream
 * cut-off, and hostile requests. The loopback tests over real Noise/HTTP/2
 * live in test_loopback.c. */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#include "mapper/mapper.h"
#include "model/model.h"
#include "storage/store.h"
#include "tc_test.h"
#include "tests/mapper/fake_io.h"

/* ---- fake stream ------------------------------------------------------------ */

/* The client goes away. */
static void fake_cancel(struct fake *f) {
  pthread_mutex_lock(&f->mu);
  f->cancelled = true;
  void (*fn)(void *) = f->ended ? NULL : f->cancel_fn;
  void *arg = f->cancel_arg;
  pthread_mutex_unlock(&f->mu);
  if (fn) fn(arg);
}

static bool wait_done(struct fake *f, int ms) {
  int64_t deadline = tc_mono_ms() + ms;
  pthread_mutex_lock(&f->mu);
  while (!f->responded && !f->ended && tc_mono_ms() < deadline) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 20000000;
    if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    pthread_cond_timedwait(&f->cv, &f->mu, &ts);
  }
  bool ok = f->responded || f->ended;
  pthread_mutex_unlock(&f->mu);
  return ok;
}

/* Next framed map message (LE uint32 + zstd) as JSON; NULL on timeout. */
static json_t *next_msg(struct fake *f, int ms, bool skip_keepalive) {
  int64_t deadline = tc_mono_ms() + ms;
  pthread_mutex_lock(&f->mu);
  for (;;) {
    size_t avail = f->body.len - f->consumed;
    if (avail >= 4) {
      const uint8_t *p = (const uint8_t *)f->body.data + f->consumed;
      size_t n = p[0] | p[1] << 8 | p[2] << 16 | (size_t)p[3] << 24;
      if (avail >= 4 + n) {
        /* every frame of the message (full maps are several) */
        unsigned long long sz = 0;
        for (size_t off = 0; off < n;) {
          size_t fl = ZSTD_findFrameCompressedSize(p + 4 + off, n - off);
          if (ZSTD_isError(fl)) break;
          sz += ZSTD_getFrameContentSize(p + 4 + off, fl);
          off += fl;
        }
        char *out = malloc(sz + 1);
        size_t got = ZSTD_decompress(out, sz, p + 4, n);
        f->consumed += 4 + n;
        json_t *j = ZSTD_isError(got) ? NULL : json_loadb(out, got, 0, NULL);
        free(out);
        if (j && skip_keepalive && json_is_true(json_object_get(j, "KeepAlive"))) {
          json_decref(j);
          continue;
        }
        pthread_mutex_unlock(&f->mu);
        return j;
      }
    }
    if (tc_mono_ms() >= deadline) break;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 20000000;
    if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    pthread_cond_timedwait(&f->cv, &f->mu, &ts);
  }
  pthread_mutex_unlock(&f->mu);
  return NULL;
}

static json_t *body_json(struct fake *f) {
  pthread_mutex_lock(&f->mu);
  json_t *j = json_loadb(f->body.data ? f->body.data : "", f->body.len, 0, NULL);
  pthread_mutex_unlock(&f->mu);
  return j;
}

/* ---- fixture ------------------------------------------------------------------- */
struct fx {
  char *dir;
  struct tc_store *store;
  struct tc_model *model;
  struct tc_mapper *mp;
  int64_t user_id;
  char *authkey;      /* reusable */
  char *ephkey;       /* reusable, ephemeral */
};

static int64_t g_grace_ms = -1; /* offline at once unless a test says otherwise */
static int g_max_followups;     /* 0 = the mapper's default */
static int g_chunk;              /* full_map_chunk of the fixture's mapper (0 = default) */

static bool fx_open(struct fx *x, int64_t ka_ms) {
  memset(x, 0, sizeof *x);
  struct tc_err err = {0};
  x->dir = tc_test_tmpdir();
  char *db = tc_xasprintf("%s/db.sqlite", x->dir);
  struct tc_store_config sc = {.type = TC_DB_SQLITE, .sqlite_path = db, .sqlite_wal = true};
  int rc = tc_store_open(&sc, &x->store, &err);
  free(db);
  if (rc) {
    fprintf(stderr, "store: %s\n", err.msg);
    return false;
  }
  struct tc_model_config mc = {.base_domain = "tail.example.com"};
  if (tc_model_open(&mc, x->store, &x->model, &err)) {
    fprintf(stderr, "model: %s\n", err.msg);
    return false;
  }
  if (tc_model_user_create(x->model, "cli", "alice", "Alice", "alice@example.com", &x->user_id, &err)) return false;
  struct tc_preauth_opts po = {.user_id = x->user_id, .reusable = true};
  if (tc_model_preauth_create(x->model, "cli", &po, NULL, &x->authkey, &err)) return false;
  po.ephemeral = true;
  if (tc_model_preauth_create(x->model, "cli", &po, NULL, &x->ephkey, &err)) return false;
  struct tc_mapper_env env = {.base_domain = "tail.example.com", .domain = "example.com",
                              .derp_json = "{\"Regions\":{\"999\":{\"RegionID\":999,\"Nodes\":[]}}}",
                              .disable_logtail = true};
  struct tc_mapper_opts mo = {.model = x->model, .env = &env, .server_url = "https://ctl.example.com/",
                              .keepalive_ms = ka_ms, .keepalive_jitter_ms = -1, .offline_grace_ms = g_grace_ms,
                              .max_followups = g_max_followups,
                              .full_map_chunk = g_chunk};
  if (tc_mapper_new(&mo, &x->mp, &err)) return false;
  return true;
}

static void fx_close(struct fx *x) {
  tc_mapper_free(x->mp);
  tc_model_close(x->model);
  tc_store_close(x->store);
  if (x->authkey) tc_free_secret(x->authkey, strlen(x->authkey));
  if (x->ephkey) tc_free_secret(x->ephkey, strlen(x->ephkey));
  free(x->dir);
}

static void key_of(uint8_t out[32], int seed) {
  for (int i = 0; i < 32; i++) out[i] = (uint8_t)(seed * 31 + i + 1);
}

static char *key_text(enum tc_mapper_key_kind k, int seed) {
  uint8_t b[32];
  key_of(b, seed);
  char t[TC_MAPPER_KEY_TEXT];
  tc_mapper_key_format(k, b, t);
  return strdup(t);
}

/* Sends one request and waits for its (non-streamed) answer. */
static struct fake *call(struct fx *x, int mk_seed, const char *path, const char *body) {
  uint8_t mk[32];
  key_of(mk, mk_seed);
  struct fake *f = fake_new();
  tc_mapper_serve(x->mp, mk, "POST", path, body, strlen(body), &fio, f);
  return f;
}

static char *reg_body(int nk_seed, int old_seed, const char *authkey, const char *host, const char *extra) {
  char *nk = key_text(TC_MKEY_NODE, nk_seed);
  char *ok = old_seed ? key_text(TC_MKEY_NODE, old_seed) : strdup("nodekey:0000000000000000000000000000000000000000000000000000000000000000");
  char *auth = authkey ? tc_xasprintf("{\"AuthKey\":\"%s\"}", authkey)
                       : strdup("{\"Provider\":\"\",\"LoginName\":\"\",\"Oauth2Token\":null,\"AuthKey\":\"\"}");
  char *b = tc_xasprintf("{\"Version\":87,\"NodeKey\":\"%s\",\"OldNodeKey\":\"%s\",\"Auth\":%s,"
                         "\"Expiry\":\"0001-01-01T00:00:00Z\",\"Hostinfo\":{\"Hostname\":\"%s\",\"OS\":\"linux\"}%s}",
                         nk, ok, auth, host, extra ? extra : "");
  free(nk);
  free(ok);
  free(auth);
  return b;
}

/* Registers machine mk_seed with node key nk_seed via the auth key; returns the node id. */
static int64_t reg_node(struct fx *x, int mk_seed, int nk_seed, const char *key, const char *host) {
  char *b = reg_body(nk_seed, 0, key, host, NULL);
  struct fake *f = call(x, mk_seed, "/machine/register", b);
  free(b);
  int64_t id = 0;
  if (wait_done(f, 5000) && f->status == 200) {
    json_t *j = body_json(f);
    if (j && json_is_true(json_object_get(j, "MachineAuthorized")) && !json_object_get(j, "Error")) {
      uint8_t nk[32];
      key_of(nk, nk_seed);
      struct tc_snapshot *s = tc_model_snapshot(x->model);
      const struct tc_node *n = tc_snapshot_node_by_node_key(s, nk);
      if (n) id = n->id;
      tc_snapshot_release(s);
    }
    json_decref(j);
  }
  fake_free(f);
  return id;
}

static struct fake *open_stream(struct fx *x, int mk_seed, int nk_seed) {
  char *nk = key_text(TC_MKEY_NODE, nk_seed);
  char *b = tc_xasprintf("{\"Version\":138,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"%s\","
                         "\"DiscoKey\":\"discokey:0000000000000000000000000000000000000000000000000000000000000000\","
                         "\"Stream\":true,\"Hostinfo\":{\"Hostname\":\"h%d\",\"OS\":\"linux\"}}",
                         nk, nk_seed);
  struct fake *f = call(x, mk_seed, "/machine/map", b);
  free(nk);
  free(b);
  return f;
}

static json_t *find_peer(json_t *arr, int64_t id) {
  size_t i;
  json_t *p;
  json_array_foreach(arr, i, p) if (json_integer_value(json_object_get(p, "ID")) == id) return p;
  return NULL;
}

static bool id_in(json_t *arr, int64_t id) {
  size_t i;
  json_t *p;
  json_array_foreach(arr, i, p) if (json_integer_value(p) == id) return true;
  return false;
}


/* The first message carrying `key` about node id (PeersChangedPatch: NodeID;
 * PeersChanged: ID; PeersRemoved: the id; Node: any), skipping others. */
static json_t *wait_for(struct fake *f, const char *key, int64_t id) {
  int64_t deadline = tc_mono_ms() + 5000;
  while (tc_mono_ms() < deadline) {
    json_t *m = next_msg(f, (int)(deadline - tc_mono_ms()), true);
    if (!m) return NULL;
    json_t *v = json_object_get(m, key);
    bool hit = false;
    if (v && !strcmp(key, "Node")) hit = true;
    else if (v && !strcmp(key, "PeersRemoved")) hit = id_in(v, id);
    else if (v && !strcmp(key, "PeersChanged")) hit = find_peer(v, id) != NULL;
    else if (v && !strcmp(key, "PeersChangedPatch")) {
      size_t i;
      json_t *p;
      json_array_foreach(v, i, p) if (json_integer_value(json_object_get(p, "NodeID")) == id) hit = true;
    }
    if (hit) return m;
    json_decref(m);
  }
  return NULL;
}

static json_t *patch_for(json_t *m, int64_t id) {
  size_t i;
  json_t *p;
  json_array_foreach(json_object_get(m, "PeersChangedPatch"), i, p) if (json_integer_value(json_object_get(p, "NodeID")) == id) return p;
  return NULL;
}


/* Waits until f hears that node id is online (or offline): as a patch or as
 * a whole PeersChanged entry (merged bursts send whole nodes). Returns the
 * carrying object (patch or node) inside *msg, NULL on timeout. */
static json_t *wait_online(struct fake *f, int64_t id, bool online, json_t **msg) {
  int64_t deadline = tc_mono_ms() + 5000;
  *msg = NULL;
  while (tc_mono_ms() < deadline) {
    json_t *m = next_msg(f, (int)(deadline - tc_mono_ms()), true);
    if (!m) return NULL;
    json_t *o = patch_for(m, id);
    if (!o || !json_object_get(o, "Online")) o = find_peer(json_object_get(m, "PeersChanged"), id);
    if (o && json_is_boolean(json_object_get(o, "Online")) && json_is_true(json_object_get(o, "Online")) == online) {
      *msg = m;
      return o;
    }
    json_decref(m);
  }
  return NULL;
}

/* Discards everything queued so far. */
static void drain(struct fx *x, struct fake *f) {
  tc_mapper_sync(x->mp);
  json_t *m;
  while ((m = next_msg(f, 50, true))) json_decref(m);
}

/* ---- tests ----------------------------------------------------------------------- */

TC_TEST(two_nodes_see_each_other_and_a_third_joins) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && b > 0 && a != b);

  struct fake *sa = open_stream(&x, 1, 101);
  json_t *m = next_msg(sa, 5000, true);
  TC_REQUIRE(m != NULL);
  json_t *self = json_object_get(m, "Node");
  TC_CHECK_INT(json_integer_value(json_object_get(self, "ID")), a);
  TC_CHECK(json_is_true(json_object_get(self, "MachineAuthorized")));
  TC_CHECK_STR(json_string_value(json_object_get(self, "Name")), "alpha.tail.example.com.");
  TC_CHECK(json_object_get(m, "DERPMap") != NULL);
  TC_CHECK(json_is_array(json_object_get(m, "PacketFilter")));
  json_t *pb = find_peer(json_object_get(m, "Peers"), b);
  TC_CHECK(pb != NULL);
  TC_CHECK(json_is_false(json_object_get(pb, "Online")));
  TC_CHECK_STR(json_string_value(json_object_get(json_array_get(json_object_get(m, "UserProfiles"), 0), "LoginName")),
               "alice@example.com");
  json_decref(m);

  struct fake *sb = open_stream(&x, 2, 102);
  m = next_msg(sb, 5000, true);
  TC_REQUIRE(m != NULL);
  json_t *pa = find_peer(json_object_get(m, "Peers"), a);
  TC_CHECK(pa != NULL && json_is_true(json_object_get(pa, "Online")));
  json_decref(m);
  /* a learns that b came online */
  TC_CHECK(wait_online(sa, b, true, &m) != NULL);
  json_decref(m);

  /* a third node joins: both get it as a delta */
  int64_t c = reg_node(&x, 3, 103, x.authkey, "gamma");
  TC_REQUIRE(c > 0);
  struct fake *both[] = {sa, sb};
  for (int i = 0; i < 2; i++) {
    m = wait_for(both[i], "PeersChanged", c);
    TC_REQUIRE(m != NULL);
    json_t *pc = find_peer(json_object_get(m, "PeersChanged"), c);
    TC_CHECK(pc != NULL);
    TC_CHECK_STR(json_string_value(json_object_get(pc, "Name")), "gamma.tail.example.com.");
    TC_CHECK(json_object_get(m, "Peers") == NULL);
    json_decref(m);
  }
  struct tc_mapper_stats st;
  tc_mapper_get_stats(x.mp, &st);
  TC_CHECK_INT(st.streams_open, 2);
  TC_CHECK_INT(st.full_maps, 2);

  /* deleting a node: PeersRemoved for the others, its own stream ends */
  struct tc_err err = {0};
  TC_CHECK_INT(tc_model_node_delete(x.model, "cli", b, &err), 0);
  m = wait_for(sa, "PeersRemoved", b);
  TC_REQUIRE(m != NULL);
  TC_CHECK(id_in(json_object_get(m, "PeersRemoved"), b));
  json_decref(m);
  TC_CHECK(wait_done(sb, 5000));
  TC_CHECK(sb->ended);

  fx_close(&x);
  fake_free(sa);
  fake_free(sb);
}

TC_TEST(expiry_rename_and_offline_reach_streams) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101), *sb = open_stream(&x, 2, 102);
  json_decref(next_msg(sa, 5000, true));
  json_decref(next_msg(sb, 5000, true));
  drain(&x, sa);
  drain(&x, sb);
  struct tc_err err = {0};

  /* admin expires b: b gets its self node with a past expiry, a sees Expired */
  int64_t past = tc_now() - 60;
  TC_REQUIRE(tc_model_node_expire(x.model, "cli", b, past, &err) == 0);
  json_t *m = wait_for(sb, "Node", 0);
  TC_REQUIRE(m != NULL);
  json_t *self = json_object_get(m, "Node");
  TC_REQUIRE(self != NULL);
  int64_t t = 0;
  TC_CHECK(tc_time_parse(json_string_value(json_object_get(self, "KeyExpiry")), &t) == 0 && t <= tc_now());
  json_decref(m);
  m = wait_for(sa, "PeersChanged", b);
  TC_REQUIRE(m != NULL);
  json_t *pb = find_peer(json_object_get(m, "PeersChanged"), b);
  TC_CHECK(pb && json_is_true(json_object_get(pb, "Expired")));
  json_decref(m);

  /* rename a: a gets its new self name, b the new peer name */
  TC_REQUIRE(tc_model_node_rename(x.model, "cli", a, "renamed", &err) == 0);
  m = wait_for(sa, "Node", 0);
  TC_REQUIRE(m != NULL);
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(m, "Node"), "Name")), "renamed.tail.example.com.");
  json_decref(m);
  m = wait_for(sb, "PeersChanged", a);
  TC_REQUIRE(m != NULL);
  json_t *pa = find_peer(json_object_get(m, "PeersChanged"), a);
  TC_CHECK(pa && !strcmp(json_string_value(json_object_get(pa, "Name")), "renamed.tail.example.com."));
  json_decref(m);

  /* b's client goes away: a sees it offline; b's node is offline in the model */
  fake_cancel(sb);
  json_t *patch = wait_online(sa, b, false, &m);
  TC_REQUIRE(patch != NULL);
  TC_CHECK(json_object_get(patch, "LastSeen") != NULL);
  json_decref(m);
  TC_CHECK(sb->ended);
  struct tc_snapshot *s = tc_model_snapshot(x.model);
  TC_CHECK(!tc_snapshot_is_online(s, b));
  TC_CHECK(tc_snapshot_is_online(s, a));
  tc_snapshot_release(s);

  fx_close(&x);
  fake_free(sa);
  fake_free(sb);
}

TC_TEST(lite_update_patches_peers_and_keeps_stream) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101), *sb = open_stream(&x, 2, 102);
  json_decref(next_msg(sa, 5000, true));
  json_decref(next_msg(sb, 5000, true));
  drain(&x, sa);
  char *nk = key_text(TC_MKEY_NODE, 102), *dk = key_text(TC_MKEY_DISCO, 77);
  char *body = tc_xasprintf("{\"Version\":138,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"%s\","
                            "\"DiscoKey\":\"%s\",\"OmitPeers\":true,\"Endpoints\":[\"198.51.100.7:41641\","
                            "\"[fe80::1]:41641\"],\"EndpointTypes\":[2,1]}",
                            nk, dk);
  struct fake *lf = call(&x, 2, "/machine/map", body);
  TC_CHECK(wait_done(lf, 5000));
  TC_CHECK_INT(lf->status, 200);
  json_t *m = wait_for(sa, "PeersChangedPatch", b);
  TC_REQUIRE(m != NULL);
  json_t *p = patch_for(m, b);
  TC_CHECK_STR(json_string_value(json_array_get(json_object_get(p, "Endpoints"), 0)), "198.51.100.7:41641");
  TC_CHECK_INT(json_array_size(json_object_get(p, "Endpoints")), 1);
  TC_CHECK_STR(json_string_value(json_object_get(p, "DiscoKey")), dk);
  json_decref(m);
  TC_CHECK(!sb->ended); /* the lite update did not disturb b's stream */
  /* the same update again changes nothing and sends nothing */
  struct fake *lf2 = call(&x, 2, "/machine/map", body);
  TC_CHECK(wait_done(lf2, 5000));
  tc_mapper_sync(x.mp);
  m = next_msg(sa, 300, true);
  TC_CHECK(m == NULL);
  json_decref(m);
  /* a one-shot fetch (Stream false, OmitPeers false) gets exactly one full map */
  char *one = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"Compress\":\"zstd\"}", nk);
  struct fake *of = call(&x, 2, "/machine/map", one);
  TC_CHECK(wait_done(of, 5000));
  TC_CHECK_INT(of->status, 200);
  m = next_msg(of, 100, false);
  TC_REQUIRE(m != NULL);
  TC_CHECK_INT(json_integer_value(json_object_get(json_object_get(m, "Node"), "ID")), b);
  json_t *pa = find_peer(json_object_get(m, "Peers"), a);
  TC_CHECK(pa != NULL && json_is_true(json_object_get(pa, "Online")));
  json_decref(m);

  /* a second stream for b supersedes the first */
  struct fake *sb2 = open_stream(&x, 2, 102);
  m = next_msg(sb2, 5000, true);
  TC_CHECK(m != NULL);
  json_decref(m);
  TC_CHECK(wait_done(sb, 5000));
  TC_CHECK(sb->ended);
  struct tc_snapshot *s = tc_model_snapshot(x.model);
  TC_CHECK(tc_snapshot_is_online(s, b)); /* counted: still online */
  tc_snapshot_release(s);

  free(one);
  free(body);
  free(nk);
  free(dk);
  fx_close(&x);
  fake_free(lf);
  fake_free(lf2);
  fake_free(of);
  fake_free(sa);
  fake_free(sb);
  fake_free(sb2);
}

TC_TEST(logout_rotation_and_ephemeral) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t e = reg_node(&x, 5, 105, x.ephkey, "eph");
  TC_REQUIRE(a > 0 && e > 0);
  struct tc_snapshot *s = tc_model_snapshot(x.model);
  const struct tc_node *na = tc_snapshot_node(s, a);
  TC_REQUIRE(na != NULL);
  uint8_t ip4[4];
  memcpy(ip4, na->ipv4, 4);
  tc_snapshot_release(s);
  struct fake *sa = open_stream(&x, 1, 101);
  json_decref(next_msg(sa, 5000, true));

  /* re-register with the same key (a tailscaled restart): authorised, same node */
  char *b = reg_body(101, 0, NULL, "alpha", NULL);
  struct fake *f = call(&x, 1, "/machine/register", b);
  free(b);
  TC_REQUIRE(wait_done(f, 5000));
  json_t *j = body_json(f);
  TC_CHECK(j && json_is_true(json_object_get(j, "MachineAuthorized")));
  TC_CHECK_STR(json_string_value(json_object_get(j, "AuthURL")), "");
  TC_CHECK_INT(json_integer_value(json_object_get(json_object_get(j, "User"), "ID")), x.user_id);
  json_decref(j);
  fake_free(f);

  /* key rotation with the auth key: same ID and IPs, new key; peers told */
  b = reg_body(201, 101, x.authkey, "alpha", NULL);
  f = call(&x, 1, "/machine/register", b);
  free(b);
  TC_REQUIRE(wait_done(f, 5000));
  j = body_json(f);
  TC_CHECK(j && json_is_true(json_object_get(j, "MachineAuthorized")));
  json_decref(j);
  fake_free(f);
  uint8_t nk201[32];
  key_of(nk201, 201);
  s = tc_model_snapshot(x.model);
  const struct tc_node *nr = tc_snapshot_node_by_node_key(s, nk201);
  TC_CHECK(nr != NULL && nr->id == a && !memcmp(nr->ipv4, ip4, 4));
  tc_snapshot_release(s);

  /* logout of the ephemeral node deletes it; a's stream hears PeersRemoved */
  b = reg_body(105, 0, NULL, "eph", "");
  char *lb = tc_xasprintf("%.*s,\"Expiry\":\"1970-01-01T00:02:03Z\"}", (int)strlen(b) - 1, b);
  free(b);
  f = call(&x, 5, "/machine/register", lb);
  free(lb);
  TC_REQUIRE(wait_done(f, 5000));
  j = body_json(f);
  TC_CHECK(j && json_is_true(json_object_get(j, "NodeKeyExpired")));
  json_decref(j);
  fake_free(f);
  s = tc_model_snapshot(x.model);
  TC_CHECK(tc_snapshot_node(s, e) == NULL);
  tc_snapshot_release(s);
  bool removed = false;
  for (int i = 0; i < 5 && !removed; i++) {
    json_t *m = next_msg(sa, 3000, true);
    if (!m) break;
    removed = id_in(json_object_get(m, "PeersRemoved"), e);
    json_decref(m);
  }
  TC_CHECK(removed);

  /* logout of a normal node marks it expired; a later register says NodeKeyExpired */
  b = reg_body(201, 0, NULL, "alpha", "");
  lb = tc_xasprintf("%.*s,\"Expiry\":\"1970-01-01T00:02:03Z\"}", (int)strlen(b) - 1, b);
  f = call(&x, 1, "/machine/register", lb);
  free(lb);
  TC_REQUIRE(wait_done(f, 5000));
  fake_free(f);
  s = tc_model_snapshot(x.model);
  nr = tc_snapshot_node(s, a);
  TC_CHECK(nr != NULL && tc_node_is_expired(nr, tc_now() + 1));
  tc_snapshot_release(s);
  f = call(&x, 1, "/machine/register", b);
  free(b);
  TC_REQUIRE(wait_done(f, 5000));
  j = body_json(f);
  TC_CHECK(j && json_is_true(json_object_get(j, "NodeKeyExpired")));
  json_decref(j);
  fake_free(f);

  fx_close(&x);
  fake_free(sa);
}

struct approver {
  struct fx *x;
  char reg_id[64];
};

static void *approve_later(void *arg) {
  struct approver *ap = arg;
  struct timespec ts = {0, 300 * 1000000L};
  nanosleep(&ts, NULL);
  struct tc_err err = {0};
  tc_model_pending_approve(ap->x->model, "cli", ap->reg_id, ap->x->user_id, NULL, &err);
  return NULL;
}

TC_TEST(interactive_registration_followup) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  char *b = reg_body(301, 0, NULL, "laptop", NULL);
  struct fake *f = call(&x, 9, "/machine/register", b);
  free(b);
  TC_REQUIRE(wait_done(f, 5000));
  json_t *j = body_json(f);
  TC_REQUIRE(j != NULL);
  const char *url = json_string_value(json_object_get(j, "AuthURL"));
  TC_REQUIRE(url && !strncmp(url, "https://ctl.example.com/register/", 33));
  TC_CHECK(!json_is_true(json_object_get(j, "MachineAuthorized")));
  struct approver ap = {.x = &x};
  snprintf(ap.reg_id, sizeof ap.reg_id, "%s", url + 33);
  char *furl = strdup(url);
  json_decref(j);
  fake_free(f);

  /* another machine cannot ride on this registration id */
  b = reg_body(302, 0, NULL, "thief", "");
  char *fb = tc_xasprintf("%.*s,\"Followup\":\"%s\"}", (int)strlen(b) - 1, b, furl);
  free(b);
  f = call(&x, 10, "/machine/register", fb);
  free(fb);
  TC_REQUIRE(wait_done(f, 5000));
  j = body_json(f);
  TC_CHECK(j != NULL);
  const char *u2 = json_string_value(json_object_get(j, "AuthURL"));
  TC_CHECK(u2 && strcmp(u2, furl) != 0); /* a new, different URL */
  json_decref(j);
  fake_free(f);

  /* the real follow-up blocks until the admin approves */
  b = reg_body(301, 0, NULL, "laptop", "");
  fb = tc_xasprintf("%.*s,\"Followup\":\"%s\"}", (int)strlen(b) - 1, b, furl);
  free(b);
  f = call(&x, 9, "/machine/register", fb);
  free(fb);
  TC_CHECK(!wait_done(f, 100)); /* still pending */
  pthread_t t;
  pthread_create(&t, NULL, approve_later, &ap);
  TC_REQUIRE(wait_done(f, 8000));
  pthread_join(t, NULL);
  j = body_json(f);
  TC_REQUIRE(j != NULL);
  TC_CHECK(json_is_true(json_object_get(j, "MachineAuthorized")));
  TC_CHECK_STR(json_string_value(json_object_get(j, "AuthURL")), "");
  TC_CHECK_INT(json_integer_value(json_object_get(json_object_get(j, "User"), "ID")), x.user_id);
  json_decref(j);
  fake_free(f);
  uint8_t nk[32];
  key_of(nk, 301);
  struct tc_snapshot *s = tc_model_snapshot(x.model);
  TC_CHECK(tc_snapshot_node_by_node_key(s, nk) != NULL);
  tc_snapshot_release(s);
  free(furl);
  fx_close(&x);
}

/* Every Followup wait taken: the next one is told to come back later (429 +
 * Retry-After, which clients since capability version 137 honour) and the
 * first is unaffected. */
TC_TEST(followups_beyond_the_limit_get_429_retry_after) {
  struct fx x;
  g_max_followups = 1;
  bool ok = fx_open(&x, 0);
  g_max_followups = 0;
  TC_REQUIRE(ok);
  char *furl[2];
  for (int i = 0; i < 2; i++) {
    char *b = reg_body(401 + i, 0, NULL, i ? "two" : "one", NULL);
    struct fake *f = call(&x, 20 + i, "/machine/register", b);
    free(b);
    TC_REQUIRE(wait_done(f, 5000));
    json_t *j = body_json(f);
    TC_REQUIRE(j != NULL);
    furl[i] = strdup(json_string_value(json_object_get(j, "AuthURL")));
    json_decref(j);
    fake_free(f);
  }
  char *b = reg_body(401, 0, NULL, "one", "");
  char *fb = tc_xasprintf("%.*s,\"Followup\":\"%s\"}", (int)strlen(b) - 1, b, furl[0]);
  free(b);
  struct fake *first = call(&x, 20, "/machine/register", fb);
  free(fb);
  TC_CHECK(!wait_done(first, 200)); /* waiting for an admin */
  b = reg_body(402, 0, NULL, "two", "");
  fb = tc_xasprintf("%.*s,\"Followup\":\"%s\"}", (int)strlen(b) - 1, b, furl[1]);
  free(b);
  struct fake *second = call(&x, 21, "/machine/register", fb);
  free(fb);
  TC_REQUIRE(wait_done(second, 5000));
  TC_CHECK_INT(second->status, 429);
  TC_CHECK(second->retry_after > 0);
  TC_CHECK(!wait_done(first, 50)); /* the first still waits */
  fake_free(second);
  /* the client going away ends the wait (the mapper waits for the thread
   * on close, so the slot is free by then) */
  fake_cancel(first);
  TC_CHECK(wait_done(first, 5000));
  fx_close(&x);
  fake_free(first);
  free(furl[0]);
  free(furl[1]);
}

TC_TEST(hostile_requests_are_refused_without_changes) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  TC_REQUIRE(a > 0);
  struct tc_snapshot *s0 = tc_model_snapshot(x.model);
  uint64_t seq0 = s0->seq;
  tc_snapshot_release(s0);

  /* machine 66 claims node key 101 (owned by machine 1): register and map */
  char *b = reg_body(101, 0, x.authkey, "evil", NULL);
  struct fake *f = call(&x, 66, "/machine/register", b);
  free(b);
  TC_REQUIRE(wait_done(f, 5000));
  TC_CHECK_INT(f->status, 401);
  fake_free(f);
  f = open_stream(&x, 66, 101);
  TC_REQUIRE(wait_done(f, 5000));
  TC_CHECK_INT(f->status, 401);
  TC_CHECK(!f->begun);
  fake_free(f);
  /* rotation away from someone else's key */
  b = reg_body(401, 101, x.authkey, "evil", NULL);
  f = call(&x, 66, "/machine/register", b);
  free(b);
  TC_REQUIRE(wait_done(f, 5000));
  TC_CHECK_INT(f->status, 401);
  fake_free(f);
  s0 = tc_model_snapshot(x.model);
  TC_CHECK_INT(s0->seq, seq0); /* nothing was written */
  TC_CHECK_INT(s0->n_nodes, 1);
  tc_snapshot_release(s0);

  /* unknown node key on map: 404 */
  f = open_stream(&x, 1, 999);
  TC_REQUIRE(wait_done(f, 5000));
  TC_CHECK_INT(f->status, 404);
  fake_free(f);

  struct {
    const char *path, *body;
    int status;
  } cases[] = {
      {"/machine/register", "{not json", 400},
      {"/machine/register", "[]", 400},
      {"/machine/register", "{\"Version\":86,\"NodeKey\":\"nodekey:0101010101010101010101010101010101010101010101010101010101010101\"}", 400},
      {"/machine/register", "{\"Version\":87}", 400},
      {"/machine/map", "{\"Version\":138,\"NodeKey\":7}", 400},
      {"/machine/map", "{\"Version\":50,\"NodeKey\":\"nodekey:0101010101010101010101010101010101010101010101010101010101010101\"}", 400},
      {"/machine/set-dns", "{}", 501},
      {"/machine/update-health", "{}", 501},
      {"/nope", "{}", 404},
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(cases); i++) {
    f = call(&x, 1, cases[i].path, cases[i].body);
    TC_REQUIRE(wait_done(f, 5000));
    if (f->status != cases[i].status) fprintf(stderr, "  case %zu: status %d\n", i, f->status);
    TC_CHECK_INT(f->status, cases[i].status);
    fake_free(f);
  }
  uint8_t mk[32];
  key_of(mk, 1);
  f = fake_new();
  tc_mapper_serve(x.mp, mk, "GET", "/machine/map?x=1", "", 0, &fio, f);
  TC_CHECK(wait_done(f, 1000) && f->status == 405);
  fake_free(f);
  /* bad auth key: 200 with an Error for the user */
  b = reg_body(501, 0, "hskey-auth-nope-0000", "x", NULL);
  f = call(&x, 7, "/machine/register", b);
  free(b);
  TC_REQUIRE(wait_done(f, 5000));
  TC_CHECK_INT(f->status, 200);
  json_t *j = body_json(f);
  TC_CHECK(j && json_string_length(json_object_get(j, "Error")) > 0);
  json_decref(j);
  fake_free(f);
  s0 = tc_model_snapshot(x.model);
  TC_CHECK_INT(s0->n_nodes, 1);
  tc_snapshot_release(s0);
  fx_close(&x);
}

TC_TEST(keepalives_and_slow_stream_cutoff) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 300));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101);
  json_t *m = next_msg(sa, 5000, true);
  TC_REQUIRE(m != NULL);
  json_decref(m);
  m = next_msg(sa, 3000, false);
  TC_REQUIRE(m != NULL);
  TC_CHECK(json_is_true(json_object_get(m, "KeepAlive")));
  json_decref(m);

  /* b stops reading: the transport refuses its writes with TC_ETOOBIG */
  struct fake *sb = open_stream(&x, 2, 102);
  json_decref(next_msg(sb, 5000, true));
  pthread_mutex_lock(&sb->mu);
  sb->fail_writes = TC_ETOOBIG;
  pthread_mutex_unlock(&sb->mu);
  struct tc_err err = {0};
  TC_REQUIRE(tc_model_node_rename(x.model, "cli", a, "alpha2", &err) == 0);
  TC_CHECK(wait_done(sb, 5000));
  TC_CHECK(sb->ended);
  tc_mapper_sync(x.mp);
  struct tc_mapper_stats st;
  tc_mapper_get_stats(x.mp, &st);
  TC_CHECK_INT(st.streams_cut, 1);
  TC_CHECK_INT(st.streams_open, 1);
  TC_CHECK(st.keepalives >= 1);
  fx_close(&x);
  fake_free(sa);
  fake_free(sb);
}

/* A client-side view: peers by id, updated from full maps and deltas the way
 * tailscaled applies them (removed, then changed, then patches). */
struct view {
  int64_t ids[256];
  bool online[256];
  size_t n;
};

static long view_find(struct view *v, int64_t id) {
  for (size_t i = 0; i < v->n; i++)
    if (v->ids[i] == id) return (long)i;
  return -1;
}

static void view_apply(struct view *v, json_t *m) {
  size_t i;
  json_t *p;
  json_t *peers = json_object_get(m, "Peers");
  if (json_array_size(peers)) {
    v->n = 0;
    json_array_foreach(peers, i, p) {
      v->ids[v->n] = json_integer_value(json_object_get(p, "ID"));
      v->online[v->n++] = json_is_true(json_object_get(p, "Online"));
    }
  }
  json_array_foreach(json_object_get(m, "PeersRemoved"), i, p) {
    long k = view_find(v, json_integer_value(p));
    if (k >= 0) {
      v->ids[k] = v->ids[v->n - 1];
      v->online[k] = v->online[--v->n];
    }
  }
  json_array_foreach(json_object_get(m, "PeersChanged"), i, p) {
    int64_t id = json_integer_value(json_object_get(p, "ID"));
    long k = view_find(v, id);
    if (k < 0 && v->n < 256) k = (long)v->n++;
    v->ids[k] = id;
    v->online[k] = json_is_true(json_object_get(p, "Online"));
  }
  json_array_foreach(json_object_get(m, "PeersChangedPatch"), i, p) {
    long k = view_find(v, json_integer_value(json_object_get(p, "NodeID")));
    if (k >= 0 && json_is_boolean(json_object_get(p, "Online"))) v->online[k] = json_is_true(json_object_get(p, "Online"));
  }
}

/* Many nodes register and come online in a burst while two streams are open
 * (the dispatcher merges queued events); each stream converges on exactly
 * the other nodes, none of them itself, with correct online states. */
TC_TEST(burst_of_joins_converges) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101), *sb = open_stream(&x, 2, 102);
  enum { K = 30 };
  struct fake *streams[K];
  int64_t ids[K];
  for (int i = 0; i < K; i++) {
    char host[16];
    snprintf(host, sizeof host, "burst%d", i);
    ids[i] = reg_node(&x, 10 + i, 110 + i, x.authkey, host);
    TC_CHECK(ids[i] > 0);
    streams[i] = i % 2 ? open_stream(&x, 10 + i, 110 + i) : NULL; /* half of them come online */
  }
  struct tc_err err = {0};
  TC_CHECK(tc_model_node_delete(x.model, "cli", ids[4], &err) == 0);
  tc_mapper_sync(x.mp);
  struct view va = {0}, vb = {0};
  json_t *m;
  while ((m = next_msg(sa, 200, true))) view_apply(&va, m), json_decref(m);
  while ((m = next_msg(sb, 200, true))) view_apply(&vb, m), json_decref(m);
  struct view *vs[] = {&va, &vb};
  int64_t selves[] = {a, b};
  for (int w = 0; w < 2; w++) {
    struct view *v = vs[w];
    TC_CHECK_INT(v->n, 1 + K - 1); /* the other named node + the burst minus the deleted one */
    TC_CHECK(view_find(v, selves[w]) < 0);
    TC_CHECK(view_find(v, ids[4]) < 0);
    TC_CHECK(view_find(v, selves[1 - w]) >= 0);
    for (int i = 0; i < K; i++) {
      if (i == 4) continue;
      long k = view_find(v, ids[i]);
      TC_CHECK(k >= 0);
      if (k >= 0) TC_CHECK(v->online[k] == (i % 2 == 1));
    }
  }
  struct tc_mapper_stats st;
  tc_mapper_get_stats(x.mp, &st);
  TC_CHECK_INT(st.streams_open, 2 + K / 2);
#ifdef __GLIBC__
  /* an idle quarter second after the burst, the dispatcher trims the
   * malloc arenas once (and not again while nothing happens) */
  int64_t t0 = tc_mono_ms();
  while (st.trims == 0 && tc_mono_ms() - t0 < 5000) {
    usleep(50 * 1000);
    tc_mapper_get_stats(x.mp, &st);
  }
  TC_CHECK_INT(st.trims, 1);
  usleep(1600 * 1000);
  tc_mapper_get_stats(x.mp, &st);
  TC_CHECK_INT(st.trims, 1);
#endif
  fx_close(&x);
  fake_free(sa);
  fake_free(sb);
  for (int i = 0; i < K; i++) fake_free(streams[i]);
}

/* Ephemeral nodes whose stream went away are deleted by the model's tick
 * after the inactivity timeout: peers hear PeersRemoved. A key expiry that
 * passes is announced by the tick too: the node's own stream gets its self
 * node (past KeyExpiry), the others an Expired peer. */
TC_TEST(ephemeral_cleanup_and_expiry_by_tick) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t e = reg_node(&x, 5, 105, x.ephkey, "eph");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && e > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101), *se = open_stream(&x, 5, 105), *sb = open_stream(&x, 2, 102);
  json_t *m = wait_for(sa, "Node", 0);
  TC_REQUIRE(m != NULL);
  json_decref(m);
  drain(&x, sa);
  drain(&x, sb);
  struct tc_err err = {0};

  /* b's key expires in 1 s; a tick after that announces it */
  TC_REQUIRE(tc_model_node_expire(x.model, "cli", b, tc_now() + 1, &err) == 0);
  drain(&x, sa);
  drain(&x, sb);
  tc_clock_shift(5);
  TC_CHECK(tc_model_tick(x.model, tc_now_ms(), &err) >= 0);
  m = wait_for(sa, "PeersChanged", b);
  TC_CHECK(m != NULL);
  if (m) TC_CHECK(json_is_true(json_object_get(find_peer(json_object_get(m, "PeersChanged"), b), "Expired")));
  json_decref(m);
  m = wait_for(sb, "Node", 0);
  TC_CHECK(m != NULL);
  json_decref(m);
  tc_clock_shift(-5);

  fake_cancel(se); /* the ephemeral client goes away */
  tc_mapper_sync(x.mp);
  int64_t now_ms = tc_now_ms() + 10000;
  TC_CHECK(tc_model_tick(x.model, now_ms, &err) >= 0); /* too early: kept */
  struct tc_snapshot *s = tc_model_snapshot(x.model);
  TC_CHECK(tc_snapshot_node(s, e) != NULL);
  tc_snapshot_release(s);
  TC_CHECK_INT(tc_model_tick(x.model, now_ms + 2 * 3600 * 1000, &err), 1);
  m = wait_for(sa, "PeersRemoved", e);
  TC_CHECK(m != NULL);
  json_decref(m);
  fx_close(&x);
  fake_free(sa);
  fake_free(sb);
  fake_free(se);
}

/* With a grace period, a client that drops its map poll and reconnects at
 * once never appears offline to its peers; one that stays away does, after
 * the grace period. */
TC_TEST(offline_grace_hides_quick_reconnects) {
  struct fx x;
  /* 1.5 s: "back at once" must stay within the grace period even when a
   * loaded machine stalls this thread between the cancel and the reopen
   * (400 ms was within reach of such a stall) */
  g_grace_ms = 1500;
  bool ok = fx_open(&x, 0);
  g_grace_ms = -1;
  TC_REQUIRE(ok);
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101), *sb = open_stream(&x, 2, 102);
  json_t *m = wait_for(sb, "Node", 0);
  TC_REQUIRE(m != NULL);
  json_decref(m);
  drain(&x, sa);
  fake_cancel(sb);
  struct fake *sb2 = open_stream(&x, 2, 102); /* back at once */
  m = wait_for(sb2, "Node", 0);
  TC_CHECK(m != NULL);
  json_decref(m);
  struct timespec ts = {1, 800 * 1000000L}; /* past the grace period */
  nanosleep(&ts, NULL);
  tc_mapper_sync(x.mp);
  json_t *o = NULL;
  TC_CHECK(wait_online(sa, b, false, &m) == NULL); /* never offline */
  json_decref(m);
  struct tc_snapshot *s = tc_model_snapshot(x.model);
  TC_CHECK(tc_snapshot_is_online(s, b));
  tc_snapshot_release(s);
  /* now b goes away for good */
  /* t0 before the cancel: the grace clock starts when the mapper sees it */
  int64_t t0 = tc_mono_ms();
  fake_cancel(sb2);
  o = wait_online(sa, b, false, &m);
  TC_CHECK(o != NULL);
  TC_CHECK(tc_mono_ms() - t0 >= 1400);
  json_decref(m);
  fx_close(&x);
  fake_free(sa);
  fake_free(sb);
  fake_free(sb2);
}

static json_t *full_map(struct fake *f) { return wait_for(f, "Node", 0); }

static bool has_peer_in(json_t *m, const char *key, int64_t id) {
  json_t *v = json_object_get(m, key);
  return !strcmp(key, "PeersRemoved") ? id_in(v, id) : find_peer(v, id) != NULL;
}

/* Under a policy every stream sees only what the policy allows, gets its own
 * filter, and is resynced when the policy changes. */
TC_TEST(policy_visibility_filters_and_resync) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_err err = {0};
  int64_t bob = 0;
  TC_REQUIRE(tc_model_user_create(x.model, "cli", "bob", NULL, NULL, &bob, &err) == 0);
  char *bobkey = NULL;
  struct tc_preauth_opts po = {.user_id = bob, .reusable = true};
  TC_REQUIRE(tc_model_preauth_create(x.model, "cli", &po, NULL, &bobkey, &err) == 0);
  const char *only_alice = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"alice@\"],\"dst\":[\"alice@:*\"]}]}";
  const char *everyone = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"*\"],\"dst\":[\"*:*\"]}]}";
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", only_alice, strlen(only_alice), NULL, &err) == 0);
  int64_t a1 = reg_node(&x, 1, 101, x.authkey, "a1");
  int64_t a2 = reg_node(&x, 2, 102, x.authkey, "a2");
  int64_t b1 = reg_node(&x, 3, 103, bobkey, "b1");
  TC_REQUIRE(a1 > 0 && a2 > 0 && b1 > 0);
  struct fake *s1 = open_stream(&x, 1, 101), *s3 = open_stream(&x, 3, 103);
  json_t *m = full_map(s1);
  TC_REQUIRE(m != NULL);
  json_t *peers = json_object_get(m, "Peers");
  TC_CHECK_INT(json_array_size(peers), 1);
  TC_CHECK(find_peer(peers, a2) != NULL);
  json_t *pf = json_object_get(m, "PacketFilter");
  TC_CHECK(json_array_size(pf) >= 1);
  char *pfs = json_dumps(pf, JSON_COMPACT);
  TC_CHECK(pfs && strstr(pfs, "\"SrcIPs\":[\"*\"]") == NULL); /* alice's sources, not allow-all */
  free(pfs);
  json_decref(m);
  m = full_map(s3);
  TC_REQUIRE(m != NULL);
  TC_CHECK(json_object_get(m, "Peers") == NULL); /* bob sees nobody */
  TC_CHECK_INT(json_array_size(json_object_get(m, "PacketFilter")), 0); /* and accepts nothing */
  json_decref(m);
  drain(&x, s1);
  drain(&x, s3);

  /* a new alice node: a1 hears of it, bob does not */
  int64_t a3 = reg_node(&x, 4, 104, x.authkey, "a3");
  TC_REQUIRE(a3 > 0);
  m = wait_for(s1, "PeersChanged", a3);
  TC_CHECK(m != NULL);
  json_decref(m);
  tc_mapper_sync(x.mp);
  bool leaked = false;
  while ((m = next_msg(s3, 100, true))) {
    char *ms = json_dumps(m, JSON_COMPACT);
    leaked |= (ms && strstr(ms, "\"a3.") != NULL) || has_peer_in(m, "PeersChanged", a3);
    free(ms);
    json_decref(m);
  }
  TC_CHECK(!leaked);

  /* open the tailnet: bob's stream is resynced with everyone */
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", everyone, strlen(everyone), NULL, &err) == 0);
  m = wait_for(s3, "Node", 0);
  TC_REQUIRE(m != NULL);
  peers = json_object_get(m, "Peers");
  TC_CHECK_INT(json_array_size(peers), 3);
  TC_CHECK(find_peer(peers, a1) && find_peer(peers, a2) && find_peer(peers, a3));
  TC_CHECK(json_array_size(json_object_get(m, "PacketFilter")) >= 1);
  json_decref(m);
  m = wait_for(s1, "Node", 0);
  TC_REQUIRE(m != NULL);
  TC_CHECK(find_peer(json_object_get(m, "Peers"), b1) != NULL);
  json_decref(m);

  /* close it again: bob loses every peer through PeersRemoved */
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", only_alice, strlen(only_alice), NULL, &err) == 0);
  m = wait_for(s3, "Node", 0);
  TC_REQUIRE(m != NULL);
  TC_CHECK(json_object_get(m, "Peers") == NULL);
  json_t *rm = json_object_get(m, "PeersRemoved");
  TC_CHECK(id_in(rm, a1) && id_in(rm, a2) && id_in(rm, a3));
  TC_CHECK_INT(json_array_size(json_object_get(m, "PacketFilter")), 0);
  json_decref(m);
  m = wait_for(s1, "Node", 0);
  TC_REQUIRE(m != NULL);
  TC_CHECK(find_peer(json_object_get(m, "Peers"), b1) == NULL);
  TC_CHECK(find_peer(json_object_get(m, "Peers"), a2) != NULL);
  json_decref(m);

  /* a one-shot fetch follows the policy too */
  char *nk = key_text(TC_MKEY_NODE, 103);
  char *one = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"Compress\":\"zstd\"}", nk);
  struct fake *of = call(&x, 3, "/machine/map", one);
  TC_CHECK(wait_done(of, 5000));
  m = next_msg(of, 100, false);
  TC_REQUIRE(m != NULL);
  TC_CHECK(json_object_get(m, "Peers") == NULL);
  json_decref(m);
  free(nk);
  free(one);
  fake_free(of);

  tc_free_secret(bobkey, strlen(bobkey));
  fx_close(&x);
  fake_free(s1);
  fake_free(s3);
}

/* A burst under a policy: alice's nodes converge on each other only; bob's
 * node never hears of them, whatever batches the dispatcher forms. */
TC_TEST(burst_under_policy_keeps_isolation) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_err err = {0};
  int64_t bob = 0;
  TC_REQUIRE(tc_model_user_create(x.model, "cli", "bob", NULL, NULL, &bob, &err) == 0);
  char *bobkey = NULL;
  struct tc_preauth_opts po = {.user_id = bob, .reusable = true};
  TC_REQUIRE(tc_model_preauth_create(x.model, "cli", &po, NULL, &bobkey, &err) == 0);
  const char *only_alice = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"alice@\"],\"dst\":[\"alice@:*\"]}]}";
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", only_alice, strlen(only_alice), NULL, &err) == 0);
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, bobkey, "bravo");
  TC_REQUIRE(a > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101), *sb = open_stream(&x, 2, 102);
  enum { K = 24 };
  struct fake *streams[K];
  int64_t ids[K];
  for (int i = 0; i < K; i++) {
    char host[16];
    snprintf(host, sizeof host, "p%d", i);
    /* even: alice, odd: bob */
    ids[i] = reg_node(&x, 10 + i, 110 + i, i % 2 ? bobkey : x.authkey, host);
    TC_CHECK(ids[i] > 0);
    streams[i] = open_stream(&x, 10 + i, 110 + i);
  }
  tc_mapper_sync(x.mp);
  struct view va = {0}, vb = {0};
  json_t *m;
  while ((m = next_msg(sa, 200, true))) view_apply(&va, m), json_decref(m);
  while ((m = next_msg(sb, 200, true))) view_apply(&vb, m), json_decref(m);
  TC_CHECK_INT(va.n, K / 2); /* alice's other nodes only */
  TC_CHECK_INT(vb.n, 0);     /* bob sees nobody, not even his own (only alice@ may talk) */
  for (int i = 0; i < K; i++) {
    TC_CHECK((view_find(&va, ids[i]) >= 0) == (i % 2 == 0));
    if (i % 2 == 0) TC_CHECK(va.online[view_find(&va, ids[i])]);
  }
  tc_free_secret(bobkey, strlen(bobkey));
  fx_close(&x);
  fake_free(sa);
  fake_free(sb);
  for (int i = 0; i < K; i++) fake_free(streams[i]);
}

/* An admin tags one of alice's nodes: under an "alice@ only" policy it stops
 * being alice's, so her other node loses it (PeersRemoved) and it sees
 * nobody (resync with PeersRemoved). (Tags cannot be removed again: Headscale rule.) */
TC_TEST(tag_change_under_policy_moves_visibility) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_err err = {0};
  const char *pol = "{\"tagOwners\":{\"tag:srv\":[\"alice@\"]},"
                    "\"acls\":[{\"action\":\"accept\",\"src\":[\"alice@\"],\"dst\":[\"alice@:*\"]}]}";
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", pol, strlen(pol), NULL, &err) == 0);
  int64_t a1 = reg_node(&x, 1, 101, x.authkey, "a1");
  int64_t a2 = reg_node(&x, 2, 102, x.authkey, "a2");
  TC_REQUIRE(a1 > 0 && a2 > 0);
  struct fake *s1 = open_stream(&x, 1, 101), *s2 = open_stream(&x, 2, 102);
  json_t *m = full_map(s1);
  TC_REQUIRE(m != NULL);
  TC_CHECK(find_peer(json_object_get(m, "Peers"), a2) != NULL);
  json_decref(m);
  json_decref(full_map(s2));
  drain(&x, s1);
  drain(&x, s2);
  struct tc_strv tags = {0};
  tc_strv_push(&tags, "tag:srv");
  TC_REQUIRE(tc_model_node_set_tags(x.model, "cli", a2, &tags, &err) == 0);
  m = wait_for(s1, "PeersRemoved", a2);
  TC_CHECK(m != NULL);
  json_decref(m);
  /* a2's view: it had a1, now it must have nobody */
  struct view v2 = {0};
  v2.ids[0] = a1, v2.n = 1;
  m = wait_for(s2, "Node", 0);
  TC_REQUIRE(m != NULL);
  TC_CHECK_STR(json_string_value(json_array_get(json_object_get(json_object_get(m, "Node"), "Tags"), 0)), "tag:srv");
  view_apply(&v2, m);
  json_decref(m);
  tc_mapper_sync(x.mp);
  while ((m = next_msg(s2, 200, true))) view_apply(&v2, m), json_decref(m);
  TC_CHECK_INT(v2.n, 0);
  /* and a fresh one-shot map agrees */
  char *nk = key_text(TC_MKEY_NODE, 102);
  char *one = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"Compress\":\"zstd\"}", nk);
  struct fake *of = call(&x, 2, "/machine/map", one);
  TC_CHECK(wait_done(of, 5000));
  m = next_msg(of, 100, false);
  TC_REQUIRE(m != NULL);
  TC_CHECK(json_object_get(m, "Peers") == NULL);
  json_decref(m);
  fake_free(of);
  free(nk);
  free(one);
  tc_strv_free(&tags);
  fx_close(&x);
  fake_free(s1);
  fake_free(s2);
}

static bool allowed_has(json_t *peer, const char *prefix) {
  size_t i;
  json_t *v;
  json_array_foreach(json_object_get(peer, "AllowedIPs"), i, v) if (!strcmp(json_string_value(v), prefix)) return true;
  return false;
}

/* Under a policy a subnet router's AllowedIPs are per viewer: the route is
 * installed only by peers that may reach the subnet. */
TC_TEST(router_allowed_ips_follow_the_policy_per_viewer) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_err err = {0};
  int64_t bob = 0;
  TC_REQUIRE(tc_model_user_create(x.model, "cli", "bob", NULL, NULL, &bob, &err) == 0);
  char *bobkey = NULL;
  struct tc_preauth_opts po = {.user_id = bob, .reusable = true};
  TC_REQUIRE(tc_model_preauth_create(x.model, "cli", &po, NULL, &bobkey, &err) == 0);
  const char *pol = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"alice@\"],\"dst\":[\"alice@:*\",\"10.1.0.0/16:*\"]},"
                    "{\"action\":\"accept\",\"src\":[\"bob@\"],\"dst\":[\"alice@:*\"]}]}";
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", pol, strlen(pol), NULL, &err) == 0);
  int64_t r = reg_node(&x, 1, 101, x.authkey, "router");
  int64_t a2 = reg_node(&x, 2, 102, x.authkey, "a2");
  int64_t b1 = reg_node(&x, 3, 103, bobkey, "b1");
  TC_REQUIRE(r > 0 && a2 > 0 && b1 > 0);
  /* the router announces its subnet (lite update) and an admin approves it */
  char *nk = key_text(TC_MKEY_NODE, 101);
  char *lite = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"OmitPeers\":true,"
                            "\"Hostinfo\":{\"Hostname\":\"router\",\"RoutableIPs\":[\"10.1.0.0/16\"]}}", nk);
  struct fake *lf = call(&x, 1, "/machine/map", lite);
  TC_CHECK(wait_done(lf, 5000) && lf->status == 200);
  fake_free(lf);
  struct tc_strv routes = {0};
  tc_strv_push(&routes, "10.1.0.0/16");
  TC_REQUIRE(tc_model_node_approve_routes(x.model, "cli", r, &routes, &err) == 0);
  tc_strv_free(&routes);
  struct fake *sr = open_stream(&x, 1, 101); /* the router online: it becomes primary */
  json_decref(full_map(sr));
  struct fake *s2 = open_stream(&x, 2, 102), *s3 = open_stream(&x, 3, 103);
  json_t *m2 = full_map(s2), *m3 = full_map(s3);
  TC_REQUIRE(m2 && m3);
  json_t *r_for_alice = find_peer(json_object_get(m2, "Peers"), r);
  json_t *r_for_bob = find_peer(json_object_get(m3, "Peers"), r);
  TC_REQUIRE(r_for_alice && r_for_bob);
  TC_CHECK(allowed_has(r_for_alice, "10.1.0.0/16"));
  TC_CHECK(!allowed_has(r_for_bob, "10.1.0.0/16"));
  TC_CHECK(json_array_size(json_object_get(r_for_bob, "AllowedIPs")) >= 1);
  json_decref(m2);
  json_decref(m3);
  free(nk);
  free(lite);
  tc_free_secret(bobkey, strlen(bobkey));
  fx_close(&x);
  fake_free(sr);
  fake_free(s2);
  fake_free(s3);
}

/* A config reload / new DERP map reaches every open stream: DERPMap and
 * DNSConfig; a new base domain renames every node (self and peers). */
TC_TEST(env_change_reaches_streams) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101), *sb = open_stream(&x, 2, 102);
  json_decref(full_map(sa));
  json_decref(full_map(sb));
  drain(&x, sa);
  drain(&x, sb);
  /* only the DERP map changes: one shared message, no node traffic */
  struct tc_mapper_env env = {.base_domain = "tail.example.com", .domain = "example.com",
                              .derp_json = "{\"Regions\":{\"900\":{\"RegionID\":900,\"Nodes\":[]}}}",
                              .dns_json = "{\"Proxied\":true}", .disable_logtail = true};
  tc_mapper_set_env(x.mp, &env);
  tc_mapper_sync(x.mp);
  json_t *m = next_msg(sa, 2000, true);
  TC_REQUIRE(m != NULL);
  TC_CHECK(json_object_get(json_object_get(json_object_get(m, "DERPMap"), "Regions"), "900") != NULL);
  TC_CHECK(json_is_true(json_object_get(json_object_get(m, "DNSConfig"), "Proxied")));
  TC_CHECK(json_object_get(m, "Node") == NULL && json_object_get(m, "Peers") == NULL);
  json_decref(m);
  TC_CHECK(next_msg(sa, 200, true) == NULL);
  /* a new base domain: self and peers renamed */
  env.base_domain = "new.example.org";
  tc_mapper_set_env(x.mp, &env);
  m = wait_for(sa, "Node", 0);
  TC_REQUIRE(m != NULL);
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(m, "Node"), "Name")), "alpha.new.example.org.");
  json_t *pb = find_peer(json_object_get(m, "Peers"), b);
  TC_CHECK(pb && !strcmp(json_string_value(json_object_get(pb, "Name")), "beta.new.example.org."));
  json_decref(m);
  fx_close(&x);
  fake_free(sa);
  fake_free(sb);
}

/* SSH policy per node from the policy; removing the ssh section revokes it
 * with an explicit empty rule list (absent would mean "unchanged"). */
TC_TEST(ssh_policy_follows_the_policy) {
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_err err = {0};
  const char *with = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"*\"],\"dst\":[\"*:*\"]}],"
                     "\"ssh\":[{\"action\":\"accept\",\"src\":[\"autogroup:member\"],\"dst\":[\"autogroup:self\"],"
                     "\"users\":[\"root\"]}]}";
  const char *without = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"*\"],\"dst\":[\"*:*\"]}]}";
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", with, strlen(with), NULL, &err) == 0);
  int64_t a = reg_node(&x, 1, 101, x.authkey, "alpha");
  int64_t b = reg_node(&x, 2, 102, x.authkey, "beta");
  TC_REQUIRE(a > 0 && b > 0);
  struct fake *sa = open_stream(&x, 1, 101);
  json_t *m = full_map(sa);
  TC_REQUIRE(m != NULL);
  TC_CHECK(json_array_size(json_object_get(json_object_get(m, "SSHPolicy"), "rules")) >= 1);
  json_decref(m);
  drain(&x, sa);
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", without, strlen(without), NULL, &err) == 0);
  m = wait_for(sa, "Node", 0);
  TC_REQUIRE(m != NULL);
  json_t *ssh = json_object_get(m, "SSHPolicy");
  TC_CHECK(ssh != NULL && json_array_size(json_object_get(ssh, "rules")) == 0);
  json_decref(m);
  fx_close(&x);
  fake_free(sa);
}

/* ---- full maps from shared chunks ---------------------------------------------------- */

/* A second mapper on x's model whose full maps are single frames: the
 * reference encoding the chunked maps must equal. Same env as fx_open. */
static struct tc_mapper *ref_mapper(struct fx *x) {
  struct tc_mapper_env env = {.base_domain = "tail.example.com", .domain = "example.com",
                              .derp_json = "{\"Regions\":{\"999\":{\"RegionID\":999,\"Nodes\":[]}}}",
                              .disable_logtail = true};
  struct tc_mapper_opts mo = {.model = x->model, .env = &env, .server_url = "https://ctl.example.com/",
                              .keepalive_jitter_ms = -1, .offline_grace_ms = g_grace_ms, .full_map_chunk = -1};
  struct tc_mapper *mp = NULL;
  struct tc_err err = {0};
  return tc_mapper_new(&mo, &mp, &err) ? NULL : mp;
}

/* Decodes every zstd frame of a framed message: owned text, *nframes the
 * frame count; NULL when malformed. */
static char *decode_frames(const uint8_t *p, size_t len, int *nframes) {
  if (len < 4) return NULL;
  size_t n = p[0] | p[1] << 8 | p[2] << 16 | (size_t)p[3] << 24;
  if (len != 4 + n) return NULL;
  struct tc_buf out = TC_BUF_INIT;
  *nframes = 0;
  for (size_t off = 0; off < n;) {
    size_t fl = ZSTD_findFrameCompressedSize(p + 4 + off, n - off);
    unsigned long long sz = ZSTD_isError(fl) ? ZSTD_CONTENTSIZE_ERROR : ZSTD_getFrameContentSize(p + 4 + off, fl);
    if (sz == ZSTD_CONTENTSIZE_ERROR || sz == ZSTD_CONTENTSIZE_UNKNOWN) {
      tc_buf_free(&out);
      return NULL;
    }
    tc_buf_reserve(&out, sz);
    size_t got = ZSTD_decompress(out.data + out.len, sz, p + 4 + off, fl);
    if (ZSTD_isError(got) || got != sz) {
      tc_buf_free(&out);
      return NULL;
    }
    out.len += got;
    off += fl;
    (*nframes)++;
  }
  tc_buf_putc(&out, 0);
  return tc_buf_steal(&out, NULL);
}

/* One-shot full map of machine mk / node key nk from mp, decoded, with the
 * ControlTime value (the clock) cut out; *nframes its zstd frame count. */
static char *oneshot_text(struct tc_mapper *mp, int mk_seed, int nk_seed, int *nframes) {
  char *nk = key_text(TC_MKEY_NODE, nk_seed);
  char *body = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"Compress\":\"zstd\"}", nk);
  uint8_t mk[32];
  key_of(mk, mk_seed);
  struct fake *f = fake_new();
  tc_mapper_serve(mp, mk, "POST", "/machine/map", body, strlen(body), &fio, f);
  char *text = NULL;
  if (wait_done(f, 5000)) {
    pthread_mutex_lock(&f->mu);
    text = decode_frames((const uint8_t *)f->body.data, f->body.len, nframes);
    pthread_mutex_unlock(&f->mu);
  }
  char *ct = text ? strstr(text, "\"ControlTime\":\"") : NULL;
  char *end = ct ? strstr(ct + 15, "\",") : NULL;
  if (end) memmove(ct + 15, end, strlen(end) + 1);
  free(nk);
  free(body);
  fake_free(f);
  return text;
}

/* Chunked and reference full maps of one viewer: byte-identical JSON. */
static bool same_full_map(struct fx *x, struct tc_mapper *ref, int seed, int *nframes) {
  tc_mapper_sync(x->mp);
  tc_mapper_sync(ref);
  int rf = 0;
  char *a = oneshot_text(x->mp, seed, 100 + seed, nframes);
  tc_mapper_sync(ref);
  char *b = oneshot_text(ref, seed, 100 + seed, &rf);
  bool ok = a && b && !strcmp(a, b) && rf == 1;
  if (!ok) fprintf(stderr, "viewer %d differs (frames %d/%d):\n chunked %s\n single  %s\n", seed, *nframes, rf,
                   a ? a : "(none)", b ? b : "(none)");
  free(a);
  free(b);
  return ok;
}

/* Without a policy: every viewer position (first, middle of a chunk, last)
 * gets the same JSON from shared chunk frames as from one frame, and the
 * chunks are shared between viewers. */
TC_TEST(full_map_chunks_equal_single_frame_allow_all) {
  g_chunk = 3;
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_mapper *ref = ref_mapper(&x);
  TC_REQUIRE(ref != NULL);
  /* one viewer alone first: no peers at all */
  TC_REQUIRE(reg_node(&x, 1, 101, x.authkey, "n1") > 0);
  int nf = 0;
  TC_CHECK(same_full_map(&x, ref, 1, &nf));
  TC_CHECK_INT(nf, 1);
  /* one peer */
  TC_REQUIRE(reg_node(&x, 2, 102, x.authkey, "n2") > 0);
  TC_CHECK(same_full_map(&x, ref, 1, &nf));
  TC_CHECK(same_full_map(&x, ref, 2, &nf));
  for (int i = 3; i <= 20; i++) {
    char host[16];
    snprintf(host, sizeof host, "n%d", i);
    TC_REQUIRE(reg_node(&x, i, 100 + i, x.authkey, host) > 0);
  }
  /* a tagged node among them: the tagged-devices profile comes from a chunk */
  struct tc_snapshot *snap = tc_model_snapshot(x.model);
  int64_t n12 = snap->nodes[11]->id;
  tc_snapshot_release(snap);
  struct tc_err err = {0};
  struct tc_strv tags = {0};
  tc_strv_push(&tags, "tag:server");
  TC_CHECK(tc_model_node_set_tags(x.model, "cli", n12, &tags, &err) == 0);
  tc_strv_free(&tags);
  /* warm-up: each viewer's first map request also stores its capability
   * version (a change of that node); the second round rebuilds those chunks */
  for (int r = 0; r < 2; r++)
    for (int i = 1; i <= 20; i++) free(oneshot_text(x.mp, i, 100 + i, &nf));
  struct tc_mapper_stats st0, st1;
  tc_mapper_sync(x.mp);
  tc_mapper_get_stats(x.mp, &st0);
  int seeds[] = {1, 2, 7, 10, 11, 19, 20};
  for (size_t i = 0; i < TC_ARRAY_LEN(seeds); i++) {
    TC_CHECK(same_full_map(&x, ref, seeds[i], &nf));
    TC_CHECK(nf >= 3); /* head/own part, shared chunks, tail */
  }
  tc_mapper_get_stats(x.mp, &st1);
  TC_CHECK(st1.chunk_hits - st0.chunk_hits >= 3 * TC_ARRAY_LEN(seeds)); /* chunks were reused */
  TC_CHECK(st1.chunk_builds == st0.chunk_builds); /* nothing changed since the warm-up */
  TC_CHECK(st1.chunk_text_peers > st0.chunk_text_peers); /* each viewer's own segment */
  tc_mapper_free(ref);
  fx_close(&x);
  g_chunk = 0;
}

/* A change to one node re-compresses only the chunk that holds it: the next
 * full maps build one chunk and take every other from the cache, and carry
 * the node's new bytes. */
TC_TEST(full_map_chunk_invalidated_by_one_change) {
  g_chunk = 3;
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_mapper *ref = ref_mapper(&x);
  TC_REQUIRE(ref != NULL);
  int64_t ids[21] = {0};
  for (int i = 1; i <= 20; i++) {
    char host[16];
    snprintf(host, sizeof host, "n%d", i);
    ids[i] = reg_node(&x, i, 100 + i, x.authkey, host);
    TC_REQUIRE(ids[i] > 0);
  }
  int nf = 0;
  for (int i = 1; i <= 20; i++) free(oneshot_text(x.mp, i, 100 + i, &nf));
  tc_mapper_sync(x.mp);
  /* viewer 1 and viewer 20 warm every chunk (each misses only its own) */
  TC_CHECK(same_full_map(&x, ref, 1, &nf));
  TC_CHECK(same_full_map(&x, ref, 20, &nf));
  struct tc_mapper_stats st0, st1, st2;
  tc_mapper_sync(x.mp);
  tc_mapper_get_stats(x.mp, &st0);
  TC_CHECK(same_full_map(&x, ref, 1, &nf));
  tc_mapper_get_stats(x.mp, &st1);
  TC_CHECK_INT(st1.chunk_builds - st0.chunk_builds, 0);
  uint64_t per_map_hits = st1.chunk_hits - st0.chunk_hits;
  TC_CHECK(per_map_hits >= 3);

  /* rename node 10: one chunk goes stale */
  struct tc_err err = {0};
  TC_REQUIRE(tc_model_node_rename(x.model, "cli", ids[10], "renamed-ten", &err) == 0);
  tc_mapper_sync(x.mp);
  tc_mapper_get_stats(x.mp, &st1);
  TC_CHECK_INT(st1.chunk_drops - st0.chunk_drops, 1);
  TC_CHECK(same_full_map(&x, ref, 1, &nf));
  tc_mapper_get_stats(x.mp, &st2);
  TC_CHECK_INT(st2.chunk_builds - st1.chunk_builds, 1);
  TC_CHECK_INT(st2.chunk_hits - st1.chunk_hits, per_map_hits - 1);
  char *t = oneshot_text(x.mp, 1, 101, &nf);
  TC_CHECK(t && strstr(t, "\"renamed-ten.tail.example.com.\""));
  free(t);

  /* going online/offline is a change too */
  struct fake *s5 = open_stream(&x, 5, 105);
  json_decref(next_msg(s5, 5000, true));
  tc_mapper_sync(x.mp);
  TC_CHECK(same_full_map(&x, ref, 1, &nf));
  t = oneshot_text(x.mp, 20, 120, &nf);
  json_t *j = t ? json_loads(t, 0, NULL) : NULL;
  TC_CHECK(json_is_true(json_object_get(find_peer(json_object_get(j, "Peers"), ids[5]), "Online")));
  json_decref(j);
  free(t);
  fake_cancel(s5);
  tc_mapper_sync(x.mp);
  tc_mapper_sync(x.mp);
  TC_CHECK(same_full_map(&x, ref, 20, &nf));

  /* a node removed: the chunks after it stay as they are */
  TC_REQUIRE(tc_model_node_delete(x.model, "cli", ids[15], &err) == 0);
  TC_CHECK(same_full_map(&x, ref, 1, &nf));
  TC_CHECK(same_full_map(&x, ref, 20, &nf));
  tc_mapper_free(ref);
  fx_close(&x);
  fake_free(s5);
  g_chunk = 0;
}

/* Under a policy viewers see different peer sets (chunks keyed by the exact
 * run of peers), a subnet router's AllowedIPs differ per viewer (never
 * shared), and a viewer may see one peer or none. */
TC_TEST(full_map_chunks_equal_single_frame_under_policy) {
  g_chunk = 3;
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_mapper *ref = ref_mapper(&x);
  TC_REQUIRE(ref != NULL);
  struct tc_err err = {0};
  int64_t bob = 0, carol = 0;
  TC_REQUIRE(tc_model_user_create(x.model, "cli", "bob", NULL, NULL, &bob, &err) == 0);
  TC_REQUIRE(tc_model_user_create(x.model, "cli", "carol", NULL, NULL, &carol, &err) == 0);
  char *bobkey = NULL, *carolkey = NULL;
  struct tc_preauth_opts po = {.user_id = bob, .reusable = true};
  TC_REQUIRE(tc_model_preauth_create(x.model, "cli", &po, NULL, &bobkey, &err) == 0);
  po.user_id = carol;
  TC_REQUIRE(tc_model_preauth_create(x.model, "cli", &po, NULL, &carolkey, &err) == 0);
  /* alice sees alice and bob, bob sees alice and bob, carol sees only the
   * first alice node (one peer), and dave (no rule) nobody */
  const char *pol = "{\"hosts\":{\"a1\":\"100.64.0.1/32\"},"
                    "\"acls\":[{\"action\":\"accept\",\"src\":[\"alice@\",\"bob@\"],\"dst\":[\"alice@:*\",\"bob@:*\","
                    "\"10.1.0.0/16:*\"]},{\"action\":\"accept\",\"src\":[\"carol@\"],\"dst\":[\"a1:*\"]}]}";
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", pol, strlen(pol), NULL, &err) == 0);
  /* 1..8 alice (alternating with bob), 9..16 bob, 17 carol */
  for (int i = 1; i <= 17; i++) {
    char host[16];
    snprintf(host, sizeof host, "h%d", i);
    const char *key = i <= 8 ? (i % 2 ? x.authkey : bobkey) : i <= 16 ? bobkey : carolkey;
    TC_REQUIRE(reg_node(&x, i, 100 + i, key, host) > 0);
  }
  struct tc_snapshot *snap = tc_model_snapshot(x.model);
  const struct tc_node *first = snap->nodes[0];
  bool a1_first = first->has_ipv4 && first->ipv4[3] == 1;
  int64_t router = snap->nodes[4]->id;
  tc_snapshot_release(snap);
  /* node 5 (alice) routes 10.1.0.0/16: its AllowedIPs depend on the viewer */
  char *nk = key_text(TC_MKEY_NODE, 105);
  char *lite = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"OmitPeers\":true,"
                            "\"Hostinfo\":{\"Hostname\":\"h5\",\"RoutableIPs\":[\"10.1.0.0/16\"]}}", nk);
  struct fake *lf = call(&x, 5, "/machine/map", lite);
  TC_CHECK(wait_done(lf, 5000) && lf->status == 200);
  fake_free(lf);
  free(nk);
  free(lite);
  struct tc_strv routes = {0};
  tc_strv_push(&routes, "10.1.0.0/16");
  TC_REQUIRE(tc_model_node_approve_routes(x.model, "cli", router, &routes, &err) == 0);
  tc_strv_free(&routes);
  struct fake *sr = open_stream(&x, 5, 105); /* online: it becomes primary */
  json_decref(next_msg(sr, 5000, true));
  int nf = 0;
  for (int i = 1; i <= 17; i++) free(oneshot_text(x.mp, i, 100 + i, &nf));
  struct tc_mapper_stats st0, st1;
  tc_mapper_sync(x.mp);
  tc_mapper_get_stats(x.mp, &st0);
  for (int i = 1; i <= 17; i++) TC_CHECK(same_full_map(&x, ref, i, &nf));
  tc_mapper_get_stats(x.mp, &st1);
  TC_CHECK(st1.chunk_hits > st0.chunk_hits);
  /* the SrcIPs of alice's and bob's 16 nodes: one shared run in their filters */
  TC_CHECK(st1.span_hits > st0.span_hits);
  TC_CHECK(st1.span_builds - st0.span_builds <= 4);
  /* carol's single peer, when the address plan put a1 first */
  if (a1_first) {
    char *t = oneshot_text(x.mp, 17, 117, &nf);
    json_t *j = t ? json_loads(t, 0, NULL) : NULL;
    TC_CHECK_INT(json_array_size(json_object_get(j, "Peers")), 1);
    json_decref(j);
    free(t);
  }
  /* a node nobody may see or be seen by: no Peers at all */
  int64_t dave = 0;
  TC_REQUIRE(tc_model_user_create(x.model, "cli", "dave", NULL, NULL, &dave, &err) == 0);
  char *davekey = NULL;
  po.user_id = dave;
  TC_REQUIRE(tc_model_preauth_create(x.model, "cli", &po, NULL, &davekey, &err) == 0);
  TC_REQUIRE(reg_node(&x, 18, 118, davekey, "dave") > 0);
  TC_CHECK(same_full_map(&x, ref, 18, &nf));
  char *t = oneshot_text(x.mp, 18, 118, &nf);
  TC_CHECK(t && !strstr(t, "\"Peers\""));
  free(t);
  /* and everyone again after the join */
  for (int i = 1; i <= 17; i++) TC_CHECK(same_full_map(&x, ref, i, &nf));
  tc_free_secret(bobkey, strlen(bobkey));
  tc_free_secret(carolkey, strlen(carolkey));
  tc_free_secret(davekey, strlen(davekey));
  tc_mapper_free(ref);
  fx_close(&x);
  fake_free(sr);
  g_chunk = 0;
}

/* With the default shape (fine segments inside the viewer's own segment):
 * 16 peers per chunk, 4 per fine chunk, 40 nodes. */
TC_TEST(full_map_fine_chunks_equal_single_frame) {
  g_chunk = 16;
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_mapper *ref = ref_mapper(&x);
  TC_REQUIRE(ref != NULL);
  for (int i = 1; i <= 40; i++) {
    char host[16];
    snprintf(host, sizeof host, "n%d", i);
    TC_REQUIRE(reg_node(&x, i, 100 + i, x.authkey, host) > 0);
  }
  int nf = 0;
  for (int r = 0; r < 2; r++) /* the first round also stores capability versions (changes) */
    for (int i = 1; i <= 40; i++) free(oneshot_text(x.mp, i, 100 + i, &nf));
  struct tc_mapper_stats st0, st1;
  tc_mapper_sync(x.mp);
  tc_mapper_get_stats(x.mp, &st0);
  int seeds[] = {1, 2, 8, 16, 17, 24, 33, 39, 40};
  for (size_t i = 0; i < TC_ARRAY_LEN(seeds); i++) {
    TC_CHECK(same_full_map(&x, ref, seeds[i], &nf));
    TC_CHECK(nf >= 4);
  }
  tc_mapper_get_stats(x.mp, &st1);
  TC_CHECK_INT(st1.chunk_builds - st0.chunk_builds, 0);
  /* per map: the other coarse chunk(s) and 2-3 fine ones; only the
   * viewer's fine segment (<= 8 peers) as text */
  TC_CHECK(st1.chunk_hits - st0.chunk_hits >= 3 * TC_ARRAY_LEN(seeds));
  TC_CHECK(st1.chunk_text_peers - st0.chunk_text_peers <= 8 * TC_ARRAY_LEN(seeds));
  tc_mapper_free(ref);
  fx_close(&x);
  g_chunk = 0;
}

/* Next message on f whose JSON holds key, as decoded text with ControlTime
 * cut out (owned); NULL on timeout. */
static char *next_text_with(struct fake *f, const char *key, int ms) {
  int64_t deadline = tc_mono_ms() + ms;
  pthread_mutex_lock(&f->mu);
  for (;;) {
    size_t avail = f->body.len - f->consumed;
    const uint8_t *p = (const uint8_t *)f->body.data + f->consumed;
    size_t n = avail >= 4 ? (p[0] | p[1] << 8 | p[2] << 16 | (size_t)p[3] << 24) : 0;
    if (avail >= 4 && avail >= 4 + n) {
      int nf = 0;
      char *t = decode_frames(p, 4 + n, &nf);
      f->consumed += 4 + n;
      if (t && strstr(t, key)) {
        pthread_mutex_unlock(&f->mu);
        char *ct = strstr(t, "\"ControlTime\":\"");
        char *end = ct ? strstr(ct + 15, "\",") : NULL;
        if (end) memmove(ct + 15, end, strlen(end) + 1);
        return t;
      }
      free(t);
      continue;
    }
    if (tc_mono_ms() >= deadline) break;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 20000000;
    if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    pthread_cond_timedwait(&f->cv, &f->mu, &ts);
  }
  pthread_mutex_unlock(&f->mu);
  return NULL;
}

static struct fake *open_stream_on(struct tc_mapper *mp, int mk_seed, int nk_seed) {
  char *nk = key_text(TC_MKEY_NODE, nk_seed);
  char *b = tc_xasprintf("{\"Version\":138,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"%s\","
                         "\"Stream\":true,\"Hostinfo\":{\"Hostname\":\"h%d\",\"OS\":\"linux\"}}", nk, nk_seed);
  uint8_t mk[32];
  key_of(mk, mk_seed);
  struct fake *f = fake_new();
  tc_mapper_serve(mp, mk, "POST", "/machine/map", b, strlen(b), &fio, f);
  free(nk);
  free(b);
  return f;
}

/* A policy change resyncs every stream with its complete peer list: those
 * lists now come from the shared chunks, byte-identical to one frame. */
TC_TEST(resync_from_chunks_equals_single_frame) {
  g_chunk = 3;
  struct fx x;
  TC_REQUIRE(fx_open(&x, 0));
  struct tc_mapper *ref = ref_mapper(&x);
  TC_REQUIRE(ref != NULL);
  struct tc_err err = {0};
  int64_t bob = 0;
  TC_REQUIRE(tc_model_user_create(x.model, "cli", "bob", NULL, NULL, &bob, &err) == 0);
  char *bobkey = NULL;
  struct tc_preauth_opts po = {.user_id = bob, .reusable = true};
  TC_REQUIRE(tc_model_preauth_create(x.model, "cli", &po, NULL, &bobkey, &err) == 0);
  const char *only_alice = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"alice@\"],\"dst\":[\"alice@:*\"]}]}";
  const char *everyone = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"*\"],\"dst\":[\"*:*\"]}]}";
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", only_alice, strlen(only_alice), NULL, &err) == 0);
  for (int i = 1; i <= 16; i++) {
    char host[16];
    snprintf(host, sizeof host, "h%d", i);
    TC_REQUIRE(reg_node(&x, i, 100 + i, i % 3 ? x.authkey : bobkey, host) > 0);
  }
  enum { NS = 4 };
  int seeds[NS] = {1, 3, 8, 16};
  struct fake *a[NS], *b[NS];
  for (int i = 0; i < NS; i++) {
    a[i] = open_stream_on(x.mp, seeds[i], 100 + seeds[i]);
    b[i] = open_stream_on(ref, seeds[i], 100 + seeds[i]);
  }
  tc_mapper_sync(x.mp);
  tc_mapper_sync(ref);
  /* the first full maps are not compared: each mapper's dispatcher may
   * answer an open from a state with later events already in it */
  for (int i = 0; i < NS; i++) {
    free(next_text_with(a[i], "\"Peers\":[", 5000));
    free(next_text_with(b[i], "\"Peers\":[", 5000));
  }
  int dnf;
  TC_CHECK(same_full_map(&x, ref, 1, &dnf));
  struct tc_mapper_stats st0, st1;
  tc_mapper_get_stats(x.mp, &st0);
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", everyone, strlen(everyone), NULL, &err) == 0);
  for (int round = 0; round < 2; round++) {
    for (int i = 0; i < NS; i++) {
      char *ta = next_text_with(a[i], "\"Peers\":[", 5000), *tb = next_text_with(b[i], "\"Peers\":[", 5000);
      TC_CHECK(ta && tb && !strcmp(ta, tb));
      if (!(ta && tb && !strcmp(ta, tb)))
        fprintf(stderr, "stream %d:\n chunked %s\n single  %s\n", seeds[i], ta ? ta : "-", tb ? tb : "-");
      free(ta);
      free(tb);
    }
    tc_mapper_sync(x.mp);
    tc_mapper_get_stats(x.mp, &st1);
    TC_CHECK(st1.chunk_hits > st0.chunk_hits); /* streams shared chunks */
    st0 = st1;
    /* and back (bob's streams lose everyone: no Peers, so drop them) */
    if (round == 0) {
      /* one resync per change in both mappers: never merged into one batch */
      TC_REQUIRE(tc_model_policy_set(x.model, "cli", only_alice, strlen(only_alice), NULL, &err) == 0);
      tc_mapper_sync(x.mp);
      tc_mapper_sync(ref);
      for (int i = 0; i < NS; i++) {
        char *ta = next_text_with(a[i], "\"Node\":", 5000), *tb = next_text_with(b[i], "\"Node\":", 5000);
        TC_CHECK(ta && tb && !strcmp(ta, tb));
        free(ta);
        free(tb);
      }
      TC_REQUIRE(tc_model_policy_set(x.model, "cli", everyone, strlen(everyone), NULL, &err) == 0);
    }
  }
  tc_mapper_free(ref);
  tc_free_secret(bobkey, strlen(bobkey));
  fx_close(&x);
  for (int i = 0; i < NS; i++) fake_free(a[i]), fake_free(b[i]);
  g_chunk = 0;
}
