/* Interop, full stack: the mapper with the real model (SQLite in a temp
 * dir) and policy, driven by request bodies shaped like v1.60 and v1.98
 * clients send them, through registration, streams, lite updates, route
 * approval, tag and policy changes, rename, expiry and deletion. Every
 * response and every streamed message (keep-alives included) is checked
 * against the tailcfg structs of both client versions, and the first
 * message of each stream against the client's MUST rules. */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "interop_check.h"
#include "mapper/mapper.h"
#include "model/model.h"
#include "proto/proto.h"
#include "storage/store.h"
#include "tc_test.h"
#include "tests/mapper/fake_io.h"

/* ---- fake stream ------------------------------------------------------------ */

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

/* Next framed map message (LE uint32 + zstd) as its raw JSON text (owned),
 * keep-alives included; NULL on timeout. A frame that does not decompress
 * is returned as "" so the caller fails on it. */
static char *next_raw(struct fake *f, int ms) {
  int64_t deadline = tc_mono_ms() + ms;
  pthread_mutex_lock(&f->mu);
  for (;;) {
    size_t avail = f->body.len - f->consumed;
    if (avail >= 4) {
      const uint8_t *p = (const uint8_t *)f->body.data + f->consumed;
      size_t used = 0, jl = 0;
      char *out = NULL;
      /* the decoder the test client uses: every zstd frame of the message
       * (full maps are several frames: shared peer chunks), as Go's DecodeAll */
      int rc = tc_map_unframe(p, avail, 64u << 20, &used, &out, &jl);
      if (rc != TC_EAGAIN) {
        if (rc) {
          size_t n = p[0] | p[1] << 8 | p[2] << 16 | (size_t)p[3] << 24;
          used = avail < 4 + n ? avail : 4 + n;
          out = strdup("");
        }
        f->consumed += used;
        pthread_mutex_unlock(&f->mu);
        return out;
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


/* ---- fixture ------------------------------------------------------------------- */

#define BASE "tail.example.com"

static const char *POLICY =
    "{\"groups\":{\"group:admins\":[\"alice@\"]},"
    "\"tagOwners\":{\"tag:srv\":[\"group:admins\"]},"
    "\"autoApprovers\":{\"routes\":{\"10.9.0.0/16\":[\"tag:srv\"]},\"exitNode\":[\"tag:srv\"]},"
    "\"acls\":[{\"action\":\"accept\",\"src\":[\"group:admins\"],\"dst\":[\"*:*\"]},"
    "{\"action\":\"accept\",\"src\":[\"tag:srv\"],\"proto\":\"tcp\",\"dst\":[\"alice@:22,443\"]}],"
    "\"ssh\":[{\"action\":\"accept\",\"src\":[\"alice@\"],\"dst\":[\"tag:srv\"],\"users\":[\"root\"]},"
    "{\"action\":\"check\",\"src\":[\"alice@\"],\"dst\":[\"alice@\"],\"users\":[\"autogroup:nonroot\"]}],"
    "\"nodeAttrs\":[{\"target\":[\"*\"],\"attr\":[\"funnel\"]}]}";

struct fx {
  char *dir;
  struct tc_store *store;
  struct tc_model *model;
  struct tc_mapper *mp;
  struct tc_mapper_env env;
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
  struct tc_model_config mc = {.base_domain = BASE};
  if (tc_model_open(&mc, x->store, &x->model, &err)) return false;
  if (tc_model_user_create(x->model, "cli", "alice", "Alice", "alice@example.com", &x->user_id, &err)) return false;
  struct tc_preauth_opts po = {.user_id = x->user_id, .reusable = true};
  if (tc_model_preauth_create(x->model, "cli", &po, NULL, &x->authkey, &err)) return false;
  /* the environment `serve` builds from a config with DNS, split DNS,
   * extra records, taildrop and an embedded DERP region */
  struct tc_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.dns.magic_dns = true;
  cfg.dns.base_domain = BASE;
  cfg.dns.override_local_dns = true;
  static char *global[] = {"1.1.1.1", "https://dns.nextdns.io/abc"};
  cfg.dns.nameservers.global.v = global;
  cfg.dns.nameservers.global.n = 2;
  static char *splitns[] = {"10.0.0.53"};
  static struct tc_split_dns split = {.domain = "corp.example.com", .nameservers = {splitns, 1}};
  cfg.dns.nameservers.split = &split;
  cfg.dns.nameservers.n_split = 1;
  static struct tc_dns_record rec[] = {{"grafana." BASE, "A", "100.64.0.5"}};
  cfg.dns.extra_records = rec;
  cfg.dns.n_extra_records = 1;
  cfg.taildrop.enabled = true;
  tc_mapper_env_from_config(&x->env, &cfg);
  x->env.derp_json = tc_xstrdup(
      "{\"Regions\":{\"999\":{\"RegionID\":999,\"RegionCode\":\"headscale\",\"RegionName\":\"Embedded\","
      "\"Nodes\":[{\"Name\":\"999\",\"RegionID\":999,\"HostName\":\"ctl.example.com\",\"STUNPort\":3478,"
      "\"DERPPort\":443}]}}}");
  struct tc_mapper_opts mo = {.model = x->model, .env = &x->env, .server_url = "https://ctl.example.com/",
                              .keepalive_ms = 300, .keepalive_jitter_ms = -1, .offline_grace_ms = -1};
  if (tc_mapper_new(&mo, &x->mp, &err)) return false;
  return true;
}

static void fx_close(struct fx *x) {
  tc_mapper_free(x->mp);
  tc_model_close(x->model);
  tc_store_close(x->store);
  if (x->authkey) tc_free_secret(x->authkey, strlen(x->authkey));
  tc_mapper_env_free(&x->env);
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

static struct fake *call(struct fx *x, int mk_seed, const char *path, const char *body) {
  uint8_t mk[32];
  key_of(mk, mk_seed);
  struct fake *f = fake_new();
  tc_mapper_serve(x->mp, mk, "POST", path, body, strlen(body), &fio, f);
  return f;
}

/* A Hostinfo as tailscaled writes it (abridged but with the nested parts). */
static char *hostinfo(const char *host, const char *ver, const char *extra) {
  return tc_xasprintf("{\"IPNVersion\":\"%s\",\"BackendLogID\":\"b\",\"OS\":\"linux\",\"OSVersion\":\"6.1\","
                      "\"Hostname\":\"%s\",\"GoArch\":\"amd64\",\"Userspace\":false,\"Desktop\":null,"
                      "\"Services\":[{\"Proto\":\"peerapi4\",\"Port\":41234}],"
                      "\"NetInfo\":{\"MappingVariesByDestIP\":false,\"WorkingIPv6\":true,\"WorkingUDP\":true,"
                      "\"PreferredDERP\":999,\"LinkType\":\"wired\",\"DERPLatency\":{\"999-v4\":0.0123}}%s}",
                      ver, host, extra ? extra : "");
}

/* v1.60 always sends the Auth object and the zero OldNodeKey; v1.98 omits
 * Auth unless it carries a key. */
static char *reg_body(bool v160, int nk_seed, const char *authkey, const char *host, const char *hi_extra) {
  char *nk = key_text(TC_MKEY_NODE, nk_seed);
  char *hi = hostinfo(host, v160 ? "1.60.0" : "1.98.0", hi_extra);
  char *b;
  if (v160)
    b = tc_xasprintf("{\"Version\":87,\"NodeKey\":\"%s\",\"OldNodeKey\":\"nodekey:0000000000000000000000000000000000000000"
                     "000000000000000000000000\",\"NLKey\":\"nlpub:0000000000000000000000000000000000000000000000000000"
                     "000000000000\",\"Auth\":{\"Provider\":\"\",\"LoginName\":\"\",\"Oauth2Token\":null,\"AuthKey\":\"%s\"},"
                     "\"Expiry\":\"0001-01-01T00:00:00Z\",\"Followup\":\"\",\"Hostinfo\":%s,\"Ephemeral\":false,"
                     "\"NodeKeySignature\":null,\"SignatureType\":0,\"Timestamp\":null,\"DeviceCert\":null,"
                     "\"Signature\":null,\"Tailnet\":\"\"}",
                     nk, authkey ? authkey : "", hi);
  else
    b = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"OldNodeKey\":\"nodekey:0000000000000000000000000000000000000000"
                     "000000000000000000000000\",\"NLKey\":\"nlpub:0000000000000000000000000000000000000000000000000000"
                     "000000000000\",%s%s%s\"Expiry\":\"0001-01-01T00:00:00Z\",\"Followup\":\"\",\"Hostinfo\":%s,"
                     "\"Ephemeral\":false,\"NodeKeySignature\":null,\"SignatureType\":0,\"Timestamp\":null,"
                     "\"DeviceCert\":null,\"Signature\":null,\"Tailnet\":\"\"}",
                     nk, authkey ? "\"Auth\":{\"AuthKey\":\"" : "", authkey ? authkey : "", authkey ? "\"}," : "", hi);
  free(nk);
  free(hi);
  return b;
}

static char *map_body(bool v160, int nk_seed, bool stream, const char *host, const char *endpoints, const char *hi_extra) {
  char *nk = key_text(TC_MKEY_NODE, nk_seed);
  char *dk = key_text(TC_MKEY_DISCO, nk_seed + 50);
  char *hi = hostinfo(host, v160 ? "1.60.0" : "1.98.0", hi_extra);
  char *b = tc_xasprintf("{\"Version\":%d,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"%s\","
                         "\"DiscoKey\":\"%s\",\"Endpoints\":%s,\"EndpointTypes\":[1,2],\"Stream\":%s,"
                         "\"Hostinfo\":%s,\"MapSessionHandle\":\"\",\"MapSessionSeq\":0,\"OmitPeers\":%s,"
                         "\"DebugFlags\":null,\"ReadOnly\":false,\"TKAHead\":\"\"}",
                         v160 ? 87 : 138, nk, dk, endpoints, stream ? "true" : "false", hi,
                         stream ? "false" : "true");
  free(nk);
  free(dk);
  free(hi);
  return b;
}

static int64_t node_id_of(struct fx *x, int nk_seed) {
  uint8_t nk[32];
  key_of(nk, nk_seed);
  struct tc_snapshot *s = tc_model_snapshot(x->model);
  const struct tc_node *n = tc_snapshot_node_by_node_key(s, nk);
  int64_t id = n ? n->id : 0;
  tc_snapshot_release(s);
  return id;
}

/* Checks every message queued on f; the first of a stream gets the MUST
 * checks. Returns how many messages were seen. */
static int check_stream(struct fx *x, struct fake *f, bool *first_seen, int64_t self_id) {
  tc_mapper_sync(x->mp);
  int n = 0;
  char *raw;
  while ((raw = next_raw(f, 150))) {
    n++;
    if (getenv("TC_INTEROP_DUMP")) fprintf(stderr, "node %lld <- %s\n", (long long)self_id, raw);
    check_both(raw, "MapResponse");
    json_t *j = json_loads(raw, 0, NULL);
    TC_CHECK(j != NULL);
    if (j && !*first_seen && !json_is_true(json_object_get(j, "KeepAlive"))) {
      *first_seen = true;
      json_t *node = json_object_get(j, "Node");
      TC_CHECK(json_is_object(node));
      TC_CHECK_INT(json_integer_value(json_object_get(node, "ID")), self_id);
      TC_CHECK(json_is_true(json_object_get(node, "MachineAuthorized")));
      const char *name = json_string_value(json_object_get(node, "Name"));
      size_t bl = strlen("." BASE ".");
      TC_CHECK(name && strlen(name) > bl && !strcmp(name + strlen(name) - bl, "." BASE "."));
      TC_CHECK(json_array_size(json_object_get(node, "Addresses")) > 0);
      TC_CHECK(json_is_array(json_object_get(node, "AllowedIPs")));
      TC_CHECK(json_is_object(json_object_get(j, "DERPMap")));
      TC_CHECK(json_is_array(json_object_get(j, "PacketFilter")));
      TC_CHECK(json_is_object(json_object_get(j, "DNSConfig")));
      TC_CHECK(json_is_string(json_object_get(j, "Domain")));
    }
    if (j && !json_is_true(json_object_get(j, "KeepAlive"))) {
      /* every User id in this message has a profile the client knows */
      json_t *ups = json_object_get(j, "UserProfiles");
      json_t *nodes = json_array();
      if (json_object_get(j, "Node")) json_array_append(nodes, json_object_get(j, "Node"));
      if (json_object_get(j, "Peers")) json_array_extend(nodes, json_object_get(j, "Peers"));
      if (json_object_get(j, "PeersChanged")) json_array_extend(nodes, json_object_get(j, "PeersChanged"));
      size_t i;
      json_t *nd;
      json_array_foreach(nodes, i, nd) {
        json_int_t uid = json_integer_value(json_object_get(nd, "User"));
        bool found = false;
        size_t k;
        json_t *up;
        json_array_foreach(ups, k, up) if (json_integer_value(json_object_get(up, "ID")) == uid) found = true;
        if (!found) fprintf(stderr, "  user %lld has no profile in: %.300s\n", (long long)uid, raw);
        TC_CHECK(found);
      }
      json_decref(nodes);
    }
    json_decref(j);
    free(raw);
  }
  return n;
}

/* The non-streamed answer of a request: 200 and, when it has a body, one
 * that decodes as `type` in both versions. */
static void check_answer(struct fake *f, const char *type, bool want_body) {
  TC_REQUIRE(wait_done(f, 5000));
  TC_CHECK_INT(f->status, 200);
  pthread_mutex_lock(&f->mu);
  char *text = tc_xasprintf("%.*s", (int)f->body.len, f->body.data ? f->body.data : "");
  pthread_mutex_unlock(&f->mu);
  if (want_body) check_both(text, type);
  else TC_CHECK_INT(strlen(text), 0);
  free(text);
}

TC_TEST(full_stack_messages_decode_in_v160_and_v198) {
  need_schemas();
  struct fx x;
  TC_REQUIRE(fx_open(&x));
  struct tc_err err = {0};
  TC_REQUIRE(tc_model_policy_set(x.model, "cli", POLICY, strlen(POLICY), NULL, &err) == 0);

  /* register: a v1.60 laptop, a v1.98 tagged subnet+exit router, a v1.98 node */
  struct fake *r;
  char *b = reg_body(true, 11, x.authkey, "laptop", NULL);
  r = call(&x, 1, "/machine/register", b);
  check_answer(r, "RegisterResponse", true);
  fake_free(r);
  free(b);
  b = reg_body(false, 12, x.authkey, "router",
               ",\"RequestTags\":[\"tag:srv\"],\"RoutableIPs\":[\"10.9.0.0/16\",\"0.0.0.0/0\",\"::/0\"]");
  r = call(&x, 2, "/machine/register", b);
  check_answer(r, "RegisterResponse", true);
  fake_free(r);
  free(b);
  b = reg_body(false, 13, x.authkey, "desk", NULL);
  r = call(&x, 3, "/machine/register", b);
  check_answer(r, "RegisterResponse", true);
  fake_free(r);
  free(b);
  int64_t id1 = node_id_of(&x, 11), id2 = node_id_of(&x, 12), id3 = node_id_of(&x, 13);
  TC_REQUIRE(id1 > 0 && id2 > 0 && id3 > 0);
  /* an unknown auth key: an Error, still a decodable RegisterResponse */
  b = reg_body(false, 14, "tskey-auth-bogus", "intruder", NULL);
  r = call(&x, 4, "/machine/register", b);
  check_answer(r, "RegisterResponse", true);
  fake_free(r);
  free(b);
  /* interactive: an AuthURL */
  b = reg_body(true, 15, NULL, "interactive", NULL);
  r = call(&x, 5, "/machine/register", b);
  check_answer(r, "RegisterResponse", true);
  fake_free(r);
  free(b);

  /* streams */
  struct fake *s[3];
  bool first[3] = {false, false, false};
  int64_t ids[3] = {id1, id2, id3};
  const char *eps = "[\"198.51.100.7:41641\",\"[2001:db8::7]:41641\",\"[fe80::1%eth0]:41641\"]";
  b = map_body(true, 11, true, "laptop", eps, NULL);
  s[0] = call(&x, 1, "/machine/map", b);
  free(b);
  b = map_body(false, 12, true, "router", eps,
               ",\"RequestTags\":[\"tag:srv\"],\"RoutableIPs\":[\"10.9.0.0/16\",\"0.0.0.0/0\",\"::/0\"]");
  s[1] = call(&x, 2, "/machine/map", b);
  free(b);
  b = map_body(false, 13, true, "desk", "null", NULL);
  s[2] = call(&x, 3, "/machine/map", b);
  free(b);
  int seen[3] = {0};
  for (int i = 0; i < 3; i++) seen[i] += check_stream(&x, s[i], &first[i], ids[i]);

  /* lite update with new endpoints (a v1.98 client) */
  b = map_body(false, 13, false, "desk", "[\"203.0.113.9:41641\"]", NULL);
  r = call(&x, 3, "/machine/map", b);
  free(b);
  check_answer(r, "MapResponse", false); /* the client discards this body */
  fake_free(r);
  /* admin changes */
  struct tc_strv routes = {0};
  tc_strv_push(&routes, "10.9.0.0/16");
  tc_strv_push(&routes, "0.0.0.0/0");
  tc_strv_push(&routes, "::/0");
  TC_CHECK(tc_model_node_approve_routes(x.model, "cli", id2, &routes, &err) == 0);
  tc_strv_free(&routes);
  TC_CHECK(tc_model_node_rename(x.model, "cli", id3, "workstation", &err) == 0);
  struct tc_strv tags = {0};
  tc_strv_push(&tags, "tag:srv");
  TC_CHECK(tc_model_node_set_tags(x.model, "cli", id3, &tags, &err) == 0);
  tc_strv_free(&tags);
  const char *open_pol = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"*\"],\"dst\":[\"*:*\"]}]}";
  TC_CHECK(tc_model_policy_set(x.model, "cli", open_pol, strlen(open_pol), NULL, &err) == 0);
  TC_CHECK(tc_model_node_expire(x.model, "cli", id1, 0, &err) == 0);
  for (int i = 0; i < 3; i++) seen[i] += check_stream(&x, s[i], &first[i], ids[i]);
  TC_CHECK(tc_model_node_delete(x.model, "cli", id3, &err) == 0);
  /* let a keep-alive through too */
  struct timespec ts = {0, 400 * 1000 * 1000};
  nanosleep(&ts, NULL);
  for (int i = 0; i < 2; i++) seen[i] += check_stream(&x, s[i], &first[i], ids[i]);
  for (int i = 0; i < 3; i++) {
    TC_CHECK(first[i]);
    TC_CHECK(seen[i] >= 2);
  }
  /* logout from v1.60: past Expiry in a local zone */
  char *nk = key_text(TC_MKEY_NODE, 12);
  b = tc_xasprintf("{\"Version\":87,\"NodeKey\":\"%s\",\"OldNodeKey\":\"nodekey:000000000000000000000000000000000000"
                   "0000000000000000000000000000\",\"Auth\":{\"Provider\":\"\",\"LoginName\":\"\",\"Oauth2Token\":null,"
                   "\"AuthKey\":\"\"},\"Expiry\":\"1970-01-01T01:02:03+01:00\",\"Followup\":\"\",\"Hostinfo\":null}",
                   nk);
  free(nk);
  r = call(&x, 2, "/machine/register", b);
  check_answer(r, "RegisterResponse", true);
  fake_free(r);
  free(b);
  struct tc_snapshot *snap = tc_model_snapshot(x.model);
  const struct tc_node *n2 = tc_snapshot_node(snap, id2);
  TC_CHECK(n2 && tc_node_is_expired(n2, tc_now())); /* the logout took effect */
  tc_snapshot_release(snap);

  tc_mapper_free(x.mp); /* ends the streams */
  x.mp = NULL;
  for (int i = 0; i < 3; i++) fake_free(s[i]);
  fx_close(&x);
}
