/* Live policy reload through the real `tailcoat serve` (policy.mode: file):
 * two tailscaled-like clients hold map streams while the policy file is
 * rewritten, by rename (as editors and tc_write_file_atomic do) and in
 * place; each change must reach the streams within a second — the peer
 * disappears or comes back and the packet filter changes — without a
 * restart or SIGHUP. A broken file changes nothing for the clients. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/base.h"
#include "server_harness.h"
#include "tc_test.h"
#include "tclient.h"

#define ZERO_NK "nodekey:0000000000000000000000000000000000000000000000000000000000000000"

/* Everyone reaches everyone. */
static const char *POL_OPEN = "// open\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}\n";
/* Each user only reaches their own machines: alice and bob lose each other. */
static const char *POL_SPLIT =
    "// split\n{\"acls\": [\n"
    "  {\"action\": \"accept\", \"src\": [\"alice@\"], \"dst\": [\"alice@:*\"]},\n"
    "  {\"action\": \"accept\", \"src\": [\"bob@\"], \"dst\": [\"bob@:*\"]},\n"
    "]}\n";
/* Valid, but its own test fails against the tailnet (alice does reach bob). */
static const char *POL_OPEN_FAILING_TEST =
    "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}],\n"
    " \"tests\": [{\"src\": \"alice@\", \"deny\": [\"bob@:22\"]}]}\n";
/* Parses, then fails validation at a known position. */
static const char *POL_BROKEN = "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"nosuchhost:*\"]}]}\n";

/* What a client knows from its stream: the visible peers and the last
 * packet filter (canonical JSON text). */
struct view {
  struct tc_tclient *c;
  int32_t sid;
  int64_t self_id;
  int64_t peers[16];
  size_t npeers;
  char *filter;
  int filter_updates;
};

static bool view_has(const struct view *v, int64_t id) {
  for (size_t i = 0; i < v->npeers; i++)
    if (v->peers[i] == id) return true;
  return false;
}

static void view_del(struct view *v, int64_t id) {
  for (size_t i = 0; i < v->npeers; i++)
    if (v->peers[i] == id) v->peers[i--] = v->peers[--v->npeers];
}

static void view_add(struct view *v, int64_t id) {
  if (!view_has(v, id) && v->npeers < TC_ARRAY_LEN(v->peers)) v->peers[v->npeers++] = id;
}

/* Applies one map message to the view. */
static void view_apply(struct view *v, const json_t *m) {
  const json_t *node = json_object_get(m, "Node");
  if (node && json_integer_value(json_object_get(node, "ID")) > 0)
    v->self_id = json_integer_value(json_object_get(node, "ID"));
  size_t i;
  json_t *p;
  const json_t *peers = json_object_get(m, "Peers");
  if (peers) {
    v->npeers = 0;
    json_array_foreach(peers, i, p) view_add(v, json_integer_value(json_object_get(p, "ID")));
  }
  json_array_foreach(json_object_get(m, "PeersChanged"), i, p) view_add(v, json_integer_value(json_object_get(p, "ID")));
  json_array_foreach(json_object_get(m, "PeersRemoved"), i, p) view_del(v, json_integer_value(p));
  const json_t *f = json_object_get(m, "PacketFilter");
  if (f) {
    free(v->filter);
    v->filter = json_dumps(f, JSON_SORT_KEYS | JSON_COMPACT);
    v->filter_updates++;
  }
}

/* Reads the stream until budget_ms have passed; returns false when the
 * stream broke. */
static bool view_pump(struct view *v, int budget_ms) {
  int64_t deadline = tc_mono_ms() + budget_ms;
  for (;;) {
    int64_t left = deadline - tc_mono_ms();
    if (left <= 0) return true;
    char *js = NULL;
    size_t jl = 0;
    int rc = tc_tclient_map_next(v->c, v->sid, (int)left, &js, &jl);
    if (rc == TC_EAGAIN) return true;
    if (rc) return false;
    json_t *m = json_loadb(js, jl, 0, NULL);
    free(js);
    if (!m) return false;
    view_apply(v, m);
    json_decref(m);
  }
}

/* Pumps both views (alternating short slices) until both satisfy want or
 * ms pass. Returns the elapsed milliseconds, or -1 on timeout / broken
 * stream. */
static int64_t wait_both(struct view *a, struct view *b, int ms, bool (*want)(const struct view *, const void *),
                         const void *arg_a, const void *arg_b) {
  int64_t t0 = tc_mono_ms();
  while (tc_mono_ms() - t0 < ms) {
    if (want(a, arg_a) && want(b, arg_b)) return tc_mono_ms() - t0;
    if (!view_pump(a, 20) || !view_pump(b, 20)) return -1;
  }
  return want(a, arg_a) && want(b, arg_b) ? tc_mono_ms() - t0 : -1;
}

struct expect {
  int64_t peer;
  bool visible;
  const char *old_filter; /* the filter must differ from this one */
};

static bool want_state(const struct view *v, const void *arg) {
  const struct expect *e = arg;
  return view_has(v, e->peer) == e->visible && v->filter && strcmp(v->filter, e->old_filter) != 0;
}

static bool join(struct tc_srv *s, const char *user, int seed, struct view *v) {
  int rc;
  json_t *k = tc_cli_json(s, &rc, "preauthkeys", "create", "--user", user, NULL);
  if (rc || !json_is_object(k)) return false;
  char authkey[200];
  snprintf(authkey, sizeof authkey, "%s", json_string_value(json_object_get(k, "key")));
  json_decref(k);
  struct tc_err err = {0};
  struct tc_tclient_opts o = {.timeout_ms = 10000};
  if (tc_tclient_connect("127.0.0.1", s->port, &o, &v->c, &err)) {
    fprintf(stderr, "  connect: %s\n", err.msg);
    return false;
  }
  uint8_t nk[32];
  for (int i = 0; i < 32; i++) nk[i] = (uint8_t)(seed * 29 + i);
  char nkhex[65];
  tc_hex_encode(nk, 32, nkhex);
  char *body = tc_xasprintf("{\"Version\":106,\"NodeKey\":\"nodekey:%s\",\"OldNodeKey\":\"" ZERO_NK "\","
                            "\"Auth\":{\"AuthKey\":\"%s\"},\"Expiry\":\"0001-01-01T00:00:00Z\","
                            "\"Hostinfo\":{\"Hostname\":\"%s-box\",\"OS\":\"linux\"}}",
                            nkhex, authkey, user);
  int status = 0;
  char *resp = NULL;
  size_t rlen = 0;
  rc = tc_tclient_request(v->c, "POST", "/machine/register", body, strlen(body), 10000, &status, &resp, &rlen);
  free(body);
  free(resp);
  if (rc || status != 200) return false;
  body = tc_xasprintf("{\"Version\":106,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"nodekey:%s\","
                      "\"Stream\":true,\"Hostinfo\":{\"Hostname\":\"%s-box\",\"OS\":\"linux\"}}",
                      nkhex, user);
  v->sid = tc_tclient_submit(v->c, "POST", "/machine/map", "application/json", body, strlen(body));
  free(body);
  return v->sid > 0;
}

static bool write_in_place(const char *path, const char *text) {
  FILE *f = fopen(path, "w"); /* truncates: same inode, no rename */
  if (!f) return false;
  bool ok = fwrite(text, 1, strlen(text), f) == strlen(text);
  return fclose(f) == 0 && ok;
}

static bool write_renamed(const char *path, const char *text) {
  return tc_write_file_atomic(path, text, strlen(text), 0600, NULL) == 0;
}

static bool log_contains(const struct tc_srv *s, const char *needle) {
  char *log = NULL;
  size_t n = 0;
  if (tc_read_file(s->log, 8 << 20, &log, &n, NULL)) return false;
  bool hit = strstr(log, needle) != NULL;
  free(log);
  return hit;
}

TC_TEST(policy_file_edits_reach_streaming_clients_within_a_second) {
  struct tc_srv s;
  char *dir = tc_test_tmpdir();
  char pfile[400], extra[600];
  snprintf(pfile, sizeof pfile, "%s/policy.hujson", dir);
  TC_REQUIRE(write_renamed(pfile, POL_OPEN));
  snprintf(extra, sizeof extra, "policy:\n  mode: file\n  path: \"%s\"\n", pfile);
  TC_REQUIRE(tc_srv_init_ex(&s, NULL, NULL, extra));
  TC_REQUIRE(tc_srv_start(&s));
  int rc;
  json_t *u = tc_cli_json(&s, &rc, "users", "create", "alice", NULL);
  json_decref(u);
  TC_REQUIRE(rc == 0);
  u = tc_cli_json(&s, &rc, "users", "create", "bob", NULL);
  json_decref(u);
  TC_REQUIRE(rc == 0);

  struct view a = {0}, b = {0};
  TC_REQUIRE(join(&s, "alice", 1, &a));
  TC_REQUIRE(join(&s, "bob", 2, &b));
  /* the first full maps: each knows itself, and sees the other */
  int64_t t0 = tc_mono_ms();
  while (tc_mono_ms() - t0 < 10000 && !(a.self_id && b.self_id && view_has(&a, b.self_id) && view_has(&b, a.self_id)))
    TC_REQUIRE(view_pump(&a, 50) && view_pump(&b, 50));
  TC_REQUIRE(a.self_id > 0 && b.self_id > 0 && a.filter && b.filter);
  TC_REQUIRE(view_has(&a, b.self_id) && view_has(&b, a.self_id));
  char *open_a = strdup(a.filter), *open_b = strdup(b.filter);

  /* 1. replaced by rename: both lose the other and get a new filter */
  TC_REQUIRE(write_renamed(pfile, POL_SPLIT));
  struct expect ea = {b.self_id, false, open_a}, eb = {a.self_id, false, open_b};
  int64_t took = wait_both(&a, &b, 10000, want_state, &ea, &eb);
  fprintf(stderr, "  rename to split: %lld ms\n", (long long)took);
  TC_CHECK(took >= 0);
  TC_REQUIRE(a.filter && b.filter);
  /* alice's filter now names only alice's address as a source */
  TC_CHECK(strstr(a.filter, "\"*\"") == NULL);
  char *split_a = strdup(a.filter), *split_b = strdup(b.filter);

  /* 2. restored by rename: the peer comes back */
  TC_REQUIRE(write_renamed(pfile, POL_OPEN));
  ea = (struct expect){b.self_id, true, split_a};
  eb = (struct expect){a.self_id, true, split_b};
  took = wait_both(&a, &b, 10000, want_state, &ea, &eb);
  fprintf(stderr, "  rename to open: %lld ms\n", (long long)took);
  TC_CHECK(took >= 0);
  TC_CHECK_STR(a.filter, open_a);

  /* 3. rewritten in place (same inode) */
  TC_REQUIRE(write_in_place(pfile, POL_SPLIT));
  ea = (struct expect){b.self_id, false, open_a};
  eb = (struct expect){a.self_id, false, open_b};
  took = wait_both(&a, &b, 10000, want_state, &ea, &eb);
  fprintf(stderr, "  in-place to split: %lld ms\n", (long long)took);
  TC_CHECK(took >= 0);
  TC_CHECK_STR(a.filter, split_a);

  /* 4. a broken policy (in place, then by rename) changes nothing for the
   * clients; the server logs where the file is wrong and keeps serving */
  int before_a = a.filter_updates, before_b = b.filter_updates;
  TC_REQUIRE(write_in_place(pfile, POL_BROKEN));
  TC_CHECK(view_pump(&a, 600) && view_pump(&b, 600));
  TC_REQUIRE(write_renamed(pfile, POL_BROKEN));
  TC_CHECK(view_pump(&a, 600) && view_pump(&b, 600));
  /* a valid policy whose own tests fail is refused too */
  TC_REQUIRE(write_renamed(pfile, POL_OPEN_FAILING_TEST));
  TC_CHECK(view_pump(&a, 600) && view_pump(&b, 600));
  TC_CHECK(log_contains(&s, "test(s) failed"));
  TC_CHECK_INT(a.filter_updates, before_a);
  TC_CHECK_INT(b.filter_updates, before_b);
  TC_CHECK(!view_has(&a, b.self_id) && !view_has(&b, a.self_id));
  TC_CHECK_STR(a.filter, split_a);
  TC_CHECK(log_contains(&s, "keeping the previous policy"));
  TC_CHECK(log_contains(&s, "line 1 column"));
  TC_CHECK(kill(s.pid, 0) == 0);

  /* 5. fixed in place: the open policy is back */
  TC_REQUIRE(write_in_place(pfile, POL_OPEN));
  ea = (struct expect){b.self_id, true, split_a};
  eb = (struct expect){a.self_id, true, split_b};
  took = wait_both(&a, &b, 10000, want_state, &ea, &eb);
  fprintf(stderr, "  in-place to open: %lld ms\n", (long long)took);
  TC_CHECK(took >= 0);
  TC_CHECK_STR(a.filter, open_a);
  TC_CHECK_STR(b.filter, open_b);

  free(open_a);
  free(open_b);
  free(split_a);
  free(split_b);
  free(a.filter);
  free(b.filter);
  tc_tclient_free(a.c);
  tc_tclient_free(b.c);
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  tc_srv_cleanup(&s);
  char cmd[500];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd)) { /* best effort */ }
  free(dir);
}

static char *policy_of(const struct tc_srv *s) {
  char *body = NULL;
  const char *hdr[] = {NULL};
  if (tc_http_do(s, true, "GET", "/api/v1/policy", hdr, NULL, &body) != 200) {
    free(body);
    return NULL;
  }
  json_t *j = json_loads(body ? body : "", 0, NULL);
  free(body);
  const char *p = json_string_value(json_object_get(j, "policy"));
  char *out = p ? strdup(p) : NULL;
  json_decref(j);
  return out;
}

/* Polls the policy in force until it equals want; elapsed ms or -1 after ms. */
static int64_t wait_policy(const struct tc_srv *s, const char *want, int ms) {
  int64_t t0 = tc_mono_ms();
  for (;;) {
    char *p = policy_of(s);
    bool same = p && !strcmp(p, want);
    free(p);
    if (same) return tc_mono_ms() - t0;
    if (tc_mono_ms() - t0 > ms) return -1;
    usleep(20 * 1000);
  }
}

/* The path is a symlink, as Kubernetes mounts a ConfigMap: policy.hujson ->
 * ..data/policy.hujson, ..data -> a versioned directory; an update swaps the
 * ..data link by rename. Also a link to a file in another directory that is
 * edited there. */
TC_TEST(policy_file_behind_symlinks_is_followed) {
  char *dir = tc_test_tmpdir();
  char cfgdir[400], v1[450], v2[450], pfile[450], tmp[900], other[450], target[500];
  snprintf(cfgdir, sizeof cfgdir, "%s/cfg", dir);
  snprintf(v1, sizeof v1, "%s/..v1", cfgdir);
  snprintf(v2, sizeof v2, "%s/..v2", cfgdir);
  TC_REQUIRE(mkdir(cfgdir, 0700) == 0 && mkdir(v1, 0700) == 0 && mkdir(v2, 0700) == 0);
  snprintf(tmp, sizeof tmp, "%s/policy.hujson", v1);
  TC_REQUIRE(write_renamed(tmp, POL_OPEN));
  snprintf(tmp, sizeof tmp, "%s/policy.hujson", v2);
  TC_REQUIRE(write_renamed(tmp, POL_SPLIT));
  snprintf(tmp, sizeof tmp, "%s/..data", cfgdir);
  TC_REQUIRE(symlink("..v1", tmp) == 0);
  snprintf(pfile, sizeof pfile, "%s/policy.hujson", cfgdir);
  TC_REQUIRE(symlink("..data/policy.hujson", pfile) == 0);
  /* a second server config: a link into another directory */
  snprintf(other, sizeof other, "%s/other", dir);
  TC_REQUIRE(mkdir(other, 0700) == 0);
  snprintf(target, sizeof target, "%s/real.hujson", other);
  TC_REQUIRE(write_renamed(target, POL_OPEN));
  char link2[450];
  snprintf(link2, sizeof link2, "%s/linked.hujson", dir);
  TC_REQUIRE(symlink(target, link2) == 0);

  struct tc_srv s;
  char extra[600];
  snprintf(extra, sizeof extra, "policy:\n  mode: file\n  path: \"%s\"\n", pfile);
  TC_REQUIRE(tc_srv_init_ex(&s, NULL, NULL, extra));
  TC_REQUIRE(tc_srv_start(&s));
  TC_CHECK(wait_policy(&s, POL_OPEN, 0) >= 0);
  /* the ConfigMap update: ..data_tmp -> ..v2, renamed over ..data */
  char data_tmp[450], data[450];
  snprintf(data_tmp, sizeof data_tmp, "%s/..data_tmp", cfgdir);
  snprintf(data, sizeof data, "%s/..data", cfgdir);
  TC_REQUIRE(symlink("..v2", data_tmp) == 0 && rename(data_tmp, data) == 0);
  int64_t took = wait_policy(&s, POL_SPLIT, 10000);
  fprintf(stderr, "  ..data swap: %lld ms\n", (long long)took);
  TC_CHECK(took >= 0);
  TC_CHECK(tc_srv_stop(&s, SIGTERM) >= 0);
  tc_srv_cleanup(&s);

  snprintf(extra, sizeof extra, "policy:\n  mode: file\n  path: \"%s\"\n", link2);
  TC_REQUIRE(tc_srv_init_ex(&s, NULL, NULL, extra));
  TC_REQUIRE(tc_srv_start(&s));
  TC_CHECK(wait_policy(&s, POL_OPEN, 0) >= 0);
  TC_REQUIRE(write_renamed(target, POL_SPLIT)); /* edited where it lives */
  took = wait_policy(&s, POL_SPLIT, 10000);
  fprintf(stderr, "  target edit: %lld ms\n", (long long)took);
  TC_CHECK(took >= 0);
  TC_CHECK(tc_srv_stop(&s, SIGTERM) >= 0);
  tc_srv_cleanup(&s);
  snprintf(tmp, sizeof tmp, "rm -rf '%s'", dir);
  if (system(tmp)) { /* best effort */ }
  free(dir);
}

/* At start the tailnet a policy's tests name may not exist yet: a failing
 * test is logged and the server still comes up with the policy. */
TC_TEST(policy_file_with_failing_tests_still_starts_the_server) {
  char *dir = tc_test_tmpdir();
  char pfile[400], extra[600];
  snprintf(pfile, sizeof pfile, "%s/policy.hujson", dir);
  TC_REQUIRE(write_renamed(pfile, POL_OPEN_FAILING_TEST));
  snprintf(extra, sizeof extra, "policy:\n  mode: file\n  path: \"%s\"\n", pfile);
  struct tc_srv s;
  TC_REQUIRE(tc_srv_init_ex(&s, NULL, NULL, extra));
  TC_REQUIRE(tc_srv_start(&s));
  TC_CHECK(wait_policy(&s, POL_OPEN_FAILING_TEST, 0) >= 0);
  TC_CHECK(log_contains(&s, "loaded anyway at start"));
  TC_CHECK(tc_srv_stop(&s, SIGTERM) >= 0);
  tc_srv_cleanup(&s);
  char cmd[500];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd)) { /* best effort */ }
  free(dir);
}
