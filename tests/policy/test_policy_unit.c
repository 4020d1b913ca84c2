/* Unit tests for policy/: the HuJSON reader (comments, trailing commas,
 * line:col errors), parse/validate errors with their positions, empty
 * policy = allow all, autoApprovers, policy tests and the live-editor check. */
#include <string.h>
#include <arpa/inet.h>

#include "base/base.h"
#include "policy/policy.h"
#include "policy/policy_int.h"
#include "tc_test.h"

static json_t *hj(const char *s, struct tc_policy_err *err) { return tc_hujson_parse(s, strlen(s), err); }

TC_TEST(hujson_comments_and_trailing_commas)
{
  struct tc_policy_err err;
  json_t *v = hj("// leading comment\n{\n  \"a\": [1, 2, /* inline */ 3,],\n  \"b\": {\"c\": \"//not a comment\",},\n}\n",
                 &err);
  TC_REQUIRE(v != NULL);
  TC_CHECK_INT(json_array_size(json_object_get(v, "a")), 3);
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(v, "b"), "c")), "//not a comment");
  json_decref(v);
  /* A string containing comment markers and an escaped quote survives. */
  v = hj("{\"x\": \"a /* b */ \\\" c\"}", &err);
  TC_REQUIRE(v != NULL);
  TC_CHECK_STR(json_string_value(json_object_get(v, "x")), "a /* b */ \" c");
  json_decref(v);
}

TC_TEST(hujson_errors_have_line_and_column)
{
  struct tc_policy_err err;
  json_t *v = hj("{\n  \"a\": 1,\n  \"b\": ]\n}", &err);
  TC_CHECK(v == NULL);
  TC_CHECK_INT(err.line, 3);
  TC_CHECK_INT(err.col, 8);
  v = hj("{\n\n  /* never closed\n}", &err);
  TC_CHECK(v == NULL);
  TC_CHECK_INT(err.line, 3);
  TC_CHECK_INT(err.col, 3);
  TC_CHECK(strstr(err.msg, "comment") != NULL);
  v = hj("{\"a\": \"open\n}", &err);
  TC_CHECK(v == NULL);
  TC_CHECK_INT(err.line, 1);
  TC_CHECK_INT(err.col, 7);
  /* Duplicate keys are refused rather than one silently winning. */
  v = hj("{\"a\": 1, \"a\": 2}", &err);
  TC_CHECK(v == NULL);
}

TC_TEST(hujson_byte_order_mark_is_whitespace)
{
  struct tc_policy_err err;
  json_t *v = hj("\xef\xbb\xbf{\"a\": 1,}", &err);
  TC_REQUIRE(v != NULL);
  TC_CHECK_INT(json_integer_value(json_object_get(v, "a")), 1);
  json_decref(v);
}

TC_TEST(hujson_standardize_keeps_offsets)
{
  const char *in = "{ // c\n \"a\": [1,], }";
  char *out = tc_hujson_standardize(in, strlen(in), NULL);
  TC_REQUIRE(out != NULL);
  TC_CHECK_INT(strlen(out), strlen(in));
  TC_CHECK_STR(out, "{     \n \"a\": [1 ]  }");
  free(out);
}

static int parse_err(const char *text, struct tc_policy_err *err)
{
  struct tc_policy *p = NULL;
  int rc = tc_policy_parse(text, strlen(text), &p, err);
  tc_policy_free(p);
  return rc;
}

TC_TEST(parse_errors_say_where_and_why)
{
  struct tc_policy_err err;
  const char *pol = "{\n"
                    "  \"tagOwners\": {\"tag:web\": [\"alice@\"]},\n"
                    "  \"acls\": [\n"
                    "    {\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"tag:db:5432\"]},\n"
                    "  ],\n"
                    "}\n";
  TC_CHECK_INT(parse_err(pol, &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "tag:db") != NULL);
  TC_CHECK(strstr(err.msg, "acls[0]") != NULL);
  TC_CHECK_INT(err.line, 4);
  TC_CHECK(err.col > 40);

  TC_CHECK_INT(parse_err("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:ssh\"]}]}", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "invalid first integer") != NULL);
  TC_CHECK_INT(parse_err("{\"acls\": [{\"action\": \"deny\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "deny") != NULL);
  TC_CHECK_INT(parse_err("{\"frobnicate\": true}", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "unknown field") != NULL);
  TC_CHECK_INT(parse_err("{\"postures\": {}}", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "not supported") != NULL);
  TC_CHECK_INT(parse_err("{\"acls\": [{\"action\": \"accept\", \"src\": [\"autogroup:self\"], \"dst\": [\"*:*\"]}]}", &err),
               TC_EINVAL);
  TC_CHECK(strstr(err.msg, "src side") != NULL);
  TC_CHECK_INT(parse_err("{\"tagOwners\": {\"tag:a\": []}, \"acls\": [{\"action\": \"accept\", \"src\": [\"tag:a\"], "
                         "\"dst\": [\"autogroup:self:*\"]}]}",
                         &err),
               TC_EINVAL);
  TC_CHECK(strstr(err.msg, "autogroup:self can only be used") != NULL);
  TC_CHECK_INT(parse_err("{\"groups\": {\"group:a\": [\"group:b\"], \"group:b\": [\"x@\"]}}", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "recursive") != NULL);
  TC_CHECK_INT(parse_err("{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"]}]}", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "ip and app can not both be empty") != NULL);
  TC_CHECK_INT(parse_err("{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"app\": {\"tailscale.com/cap/x\": [{}]}}]}",
                         &err),
               TC_EINVAL);
  TC_CHECK(strstr(err.msg, "tailscale.com domain") != NULL);
  TC_CHECK_INT(parse_err("{\"ssh\": [{\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": "
                         "[\"autogroup:self\"], \"users\": []}]}",
                         &err),
               TC_EINVAL);
  TC_CHECK(strstr(err.msg, "users must be specified") != NULL);
  TC_CHECK_INT(parse_err("{\"ssh\": [{\"action\": \"check\", \"src\": [\"autogroup:member\"], \"dst\": "
                         "[\"autogroup:self\"], \"users\": [\"root\"], \"checkPeriod\": \"200h\"}]}",
                         &err),
               TC_EINVAL);
  TC_CHECK(strstr(err.msg, "above the max") != NULL);
  TC_CHECK_INT(parse_err("[1,2]", &err), TC_EINVAL);
  TC_CHECK_INT(parse_err("{\"acls\": [{\"action\": \"accept\", \"proto\": \"bogus\", \"src\": [\"*\"], \"dst\": "
                         "[\"*:*\"]}]}",
                         &err),
               TC_EINVAL);
  TC_CHECK(strstr(err.msg, "proto") != NULL);
  /* IPv6 destinations, bracketed or not. */
  TC_CHECK_INT(parse_err("{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": "
                         "[\"[fd7a:115c:a1e0::1]:22\", \"fd7a:115c:a1e0::/48:80\"]}]}",
                         &err),
               0);
  /* Valid policy: no error. */
  TC_CHECK_INT(parse_err("{\"acls\": [{\"action\": \"accept\", \"proto\": \"17\", \"src\": [\"*\"], \"dst\": "
                         "[\"*:53\"]}]}",
                         &err),
               0);
}

/* A three-node tailnet used by the behavioural tests. */
static const char *const tags_srv[] = {"tag:srv"};
static const char *const routes_r[] = {"10.1.0.0/16", "0.0.0.0/0", "::/0"};
static const struct tc_policy_user users3[] = {{1, "alice", "alice@example.com"}, {2, "bob", "bob@example.com"}};
static const struct tc_policy_node nodes3[] = {
    {1, "a1", 1, NULL, 0, "100.64.0.1", "fd7a:115c:a1e0::1", NULL, 0, NULL, 0},
    {2, "b1", 2, NULL, 0, "100.64.0.2", "fd7a:115c:a1e0::2", NULL, 0, NULL, 0},
    {3, "srv", 0, tags_srv, 1, "100.64.0.3", "fd7a:115c:a1e0::3", routes_r, 3, NULL, 0},
};
static const struct tc_policy_topo topo3 = {users3, 2, nodes3, 3, NULL};

TC_TEST(empty_policy_allows_all)
{
  struct tc_policy *p;
  struct tc_policy_err err;
  TC_REQUIRE(tc_policy_parse("  // nothing\n", 13, &p, &err) == 0);
  TC_CHECK(tc_policy_is_allow_all(p));
  struct tc_policy_result *res;
  TC_REQUIRE(tc_policy_compile(p, &topo3, &res, &err) == 0);
  const struct tc_policy_node_result *a1 = tc_policy_result_node(res, 1);
  TC_REQUIRE(a1 != NULL);
  TC_CHECK_INT(a1->npeers, 2);
  json_t *r0 = json_array_get(a1->packet_filter, 0);
  TC_CHECK_STR(json_string_value(json_array_get(json_object_get(r0, "SrcIPs"), 0)), "*");
  tc_policy_result_free(res);
  tc_policy_free(p);
}

TC_TEST(empty_and_odd_topologies_compile)
{
  const char *pol = "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}],"
                    " \"ssh\": [{\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self\"],"
                    " \"users\": [\"root\"]}]}";
  struct tc_policy *p;
  struct tc_policy_err err;
  TC_REQUIRE(tc_policy_parse(pol, strlen(pol), &p, &err) == 0);
  struct tc_policy_topo empty = {NULL, 0, NULL, 0, NULL};
  struct tc_policy_result *res;
  TC_CHECK_INT(tc_policy_compile(p, &empty, &res, &err), 0);
  TC_CHECK_INT(res->nnodes, 0);
  tc_policy_result_free(res);
  /* A node whose owner is unknown and one without addresses. */
  static const struct tc_policy_node odd[] = {
      {7, "orphan", 99, NULL, 0, "100.64.0.7", NULL, NULL, 0, NULL, 0},
      {8, "bare", 1, NULL, 0, NULL, NULL, NULL, 0, NULL, 0},
  };
  struct tc_policy_topo t = {users3, 2, odd, 2, NULL};
  TC_CHECK_INT(tc_policy_compile(p, &t, &res, &err), 0);
  TC_CHECK_INT(res->nnodes, 2);
  tc_policy_result_free(res);
  /* Bad address text is refused with the node named. */
  static const struct tc_policy_node bad[] = {{9, "bad", 1, NULL, 0, "300.1.1.1", NULL, NULL, 0, NULL, 0}};
  struct tc_policy_topo tb = {users3, 2, bad, 1, NULL};
  TC_CHECK_INT(tc_policy_compile(p, &tb, &res, &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "node 9") != NULL);
  tc_policy_free(p);
}

TC_TEST(auto_approvers_and_exit_nodes)
{
  const char *pol = "{\"tagOwners\": {\"tag:srv\": [\"alice@\"]},"
                    " \"autoApprovers\": {\"routes\": {\"10.0.0.0/8\": [\"tag:srv\"]}, \"exitNode\": [\"tag:srv\"]},"
                    " \"acls\": [{\"action\": \"accept\", \"src\": [\"alice@\"], \"dst\": [\"*:*\"]}]}";
  struct tc_policy *p;
  struct tc_policy_err err;
  TC_REQUIRE(tc_policy_parse(pol, strlen(pol), &p, &err) == 0);
  json_t *ok = tc_policy_auto_approve(p, &topo3, &nodes3[2]);
  TC_CHECK_INT(json_array_size(ok), 3);
  json_decref(ok);
  ok = tc_policy_auto_approve(p, &topo3, &nodes3[0]);
  TC_CHECK_INT(json_array_size(ok), 0);
  json_decref(ok);
  struct tc_policy_result *res;
  TC_REQUIRE(tc_policy_compile(p, &topo3, &res, &err) == 0);
  /* alice may reach everything: she sees srv with its route and exit routes. */
  const struct tc_policy_node_result *a1 = tc_policy_result_node(res, 1);
  bool saw = false;
  for (size_t i = 0; i < a1->npeers; i++) {
    if (tc_policy_peer_id(a1, i) != 3)
      continue;
    saw = true;
    char *s = json_dumps(tc_policy_peer_allowed_ips(a1, i), JSON_COMPACT);
    TC_CHECK(strstr(s, "10.1.0.0/16") && strstr(s, "0.0.0.0/0") && strstr(s, "::/0"));
    free(s);
  }
  TC_CHECK(saw);
  /* bob may reach nobody, but alice may reach him: he sees only alice,
   * and srv (which neither reaches nor is reached by bob) stays hidden. */
  const struct tc_policy_node_result *b1 = tc_policy_result_node(res, 2);
  TC_CHECK_INT(b1->npeers, 1);
  TC_CHECK_INT(tc_policy_peer_id(b1, 0), 1);
  /* srv, as an exit node, accepts alice's traffic to the internet. */
  char *f = json_dumps(tc_policy_result_node(res, 3)->packet_filter, JSON_COMPACT);
  TC_CHECK(strstr(f, "\"*\"") != NULL);
  free(f);
  tc_policy_result_free(res);
  tc_policy_free(p);
}

TC_TEST(policy_tests_gate_acceptance)
{
  const char *pass = "{\"acls\": [{\"action\": \"accept\", \"src\": [\"alice@\"], \"dst\": [\"bob@:22\"]}],"
                     " \"tests\": [{\"src\": \"alice@\", \"accept\": [\"bob@:22\"], \"deny\": [\"bob@:80\"]}]}";
  struct tc_policy_err err;
  TC_CHECK_INT(tc_policy_check(pass, strlen(pass), &topo3, &err), 0);
  const char *fail = "{\"acls\": [{\"action\": \"accept\", \"src\": [\"alice@\"], \"dst\": [\"bob@:22\"]}],"
                     " \"tests\": [{\"src\": \"bob@\", \"accept\": [\"alice@:22\"]}]}";
  TC_CHECK_INT(tc_policy_check(fail, strlen(fail), &topo3, &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "test(s) failed") != NULL);
  TC_CHECK(strstr(err.msg, "expected ALLOWED") != NULL);
  const char *ssh = "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}],"
                    " \"ssh\": [{\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self\"],"
                    " \"users\": [\"root\"]}],"
                    " \"sshTests\": [{\"src\": \"alice@\", \"dst\": [\"autogroup:self\"], \"accept\": [\"root\"],"
                    " \"deny\": [\"ubuntu\"]}]}";
  TC_CHECK_INT(tc_policy_check(ssh, strlen(ssh), &topo3, &err), 0);
}

TC_TEST(check_is_fast_for_a_500_line_policy)
{
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_puts(&b, "{\n \"groups\": {\n");
  for (int i = 0; i < 50; i++)
    tc_buf_printf(&b, "  \"group:g%d\": [\"alice@\", \"bob@\"], // team %d\n", i, i);
  tc_buf_puts(&b, " },\n \"tagOwners\": {\"tag:srv\": [\"group:g1\"]},\n \"acls\": [\n");
  for (int i = 0; i < 400; i++)
    tc_buf_printf(&b, "  {\"action\": \"accept\", \"src\": [\"group:g%d\"], \"dst\": [\"tag:srv:%d\"]},\n", i % 50,
                  1000 + i);
  tc_buf_puts(&b, " ],\n \"tests\": [\n");
  for (int i = 0; i < 40; i++)
    tc_buf_printf(&b, "  {\"src\": \"alice@\", \"accept\": [\"tag:srv:%d\"], \"deny\": [\"tag:srv:9\"]},\n", 1000 + i);
  tc_buf_puts(&b, " ],\n}\n");
  struct tc_policy_err err;
  int64_t t0 = tc_mono_ms();
  int rc = tc_policy_check(b.data, b.len, &topo3, &err);
  int64_t dt = tc_mono_ms() - t0;
  TC_CHECK_INT(rc, 0);
  if (rc)
    fprintf(stderr, "  check error: %d:%d %s\n", err.line, err.col, err.msg);
  fprintf(stderr, "  500-line policy check: %lld ms\n", (long long)dt);
  /* Generous bound: sanitizer builds are several times slower than release. */
  TC_CHECK(dt < 1000);
  tc_buf_free(&b);
}

TC_TEST(hostile_inputs_do_not_crash)
{
  static const char *bad[] = {
      "", "{", "}", "[", "{\"acls\": null}", "{\"acls\": [null]}", "{\"acls\": [{\"dst\": 5}]}",
      "{\"groups\": {\"group:\": []}}", "{\"hosts\": {\"h\": \"1.2.3.4/99\"}}", "{\"hosts\": {\"h\": \"01.2.3.4\"}}",
      "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:70000\"]}]}",
      "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:5-1\"]}]}",
      "{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"ip\": [\"tcp:1:2\"]}]}",
      "{\"ssh\": [{}]}", "{\"nodeAttrs\": [{\"target\": [\"*\"], \"attr\": [1]}]}", "/*", "\"str\"",
      "{\"tests\": [{\"src\": \"*\", \"accept\": [\"[::1\"]}]}",
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(bad); i++) {
    struct tc_policy_err err;
    struct tc_policy *p = NULL;
    int rc = tc_policy_parse(bad[i], strlen(bad[i]), &p, &err);
    if (rc == 0) {
      /* Whatever parses must compile and test without trouble. */
      struct tc_policy_result *res = NULL;
      TC_CHECK_INT(tc_policy_compile(p, &topo3, &res, &err), 0);
      tc_policy_result_free(res);
      tc_policy_run_tests(p, &topo3, &err);
    } else {
      TC_CHECK(err.msg[0] != 0);
    }
    tc_policy_free(p);
  }
}

/* Random byte-level damage to a rich policy: every variant must either be
 * refused with a message or parse, compile and test cleanly (ASan/UBSan
 * builds catch memory errors). */
TC_TEST(mutated_policies_never_crash)
{
  static const char base[] =
      "// policy\n{\n \"groups\": {\"group:eng\": [\"alice@\", \"bob@example.com\"]},\n"
      " \"hosts\": {\"lan\": \"10.1.0.0/16\", \"db\": \"100.64.0.3\"},\n"
      " \"tagOwners\": {\"tag:srv\": [\"group:eng\"], \"tag:x\": [\"tag:srv\"]},\n"
      " \"autoApprovers\": {\"routes\": {\"10.0.0.0/8\": [\"tag:srv\"]}, \"exitNode\": [\"tag:srv\"]},\n"
      " \"acls\": [\n  {\"action\": \"accept\", \"proto\": \"tcp\", \"src\": [\"group:eng\", \"lan\"], \"dst\": "
      "[\"tag:srv:22,80-90\", \"autogroup:internet:*\"]},\n"
      "  {\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self:*\", \"db:5432\"]},\n ],\n"
      " \"grants\": [{\"src\": [\"*\"], \"dst\": [\"tag:srv\"], \"ip\": [\"udp:53\"], \"app\": {\"example.com/cap/a\": "
      "[{}]}},\n  {\"src\": [\"alice@\"], \"dst\": [\"10.1.0.0/16\"], \"ip\": [\"*\"], \"via\": [\"tag:srv\"]}],\n"
      " \"ssh\": [{\"action\": \"check\", \"src\": [\"group:eng\"], \"dst\": [\"tag:srv\"], \"users\": "
      "[\"root\", \"autogroup:nonroot\"], \"checkPeriod\": \"2h\"}],\n"
      " \"nodeAttrs\": [{\"target\": [\"tag:srv\"], \"attr\": [\"funnel\"]}],\n"
      " \"tests\": [{\"src\": \"alice@\", \"accept\": [\"tag:srv:22\"]}],\n"
      " \"sshTests\": [{\"src\": \"alice@\", \"dst\": [\"tag:srv\"], \"check\": [\"root\"]}],\n}\n";
  static const char alphabet[] = "{}[]\":,/*@-0123456789abcdefg :\n\\";
  uint64_t st = 12345;
  int parsed = 0;
  for (int iter = 0; iter < 3000; iter++) {
    char buf[sizeof(base) + 16];
    size_t len = sizeof(base) - 1;
    memcpy(buf, base, len);
    int edits = 1 + iter % 4;
    for (int e = 0; e < edits; e++) {
      st = st * 6364136223846793005ULL + 1442695040888963407ULL;
      size_t pos = (size_t)(st >> 33) % len;
      char c = alphabet[(st >> 20) % (sizeof(alphabet) - 1)];
      switch ((st >> 8) % 3) {
      case 0: buf[pos] = c; break;
      case 1:
        if (len + 1 < sizeof(buf)) {
          memmove(buf + pos + 1, buf + pos, len - pos);
          buf[pos] = c;
          len++;
        }
        break;
      default:
        memmove(buf + pos, buf + pos + 1, len - pos - 1);
        len--;
        break;
      }
    }
    struct tc_policy *p = NULL;
    struct tc_policy_err err;
    if (tc_policy_parse(buf, len, &p, &err) == 0) {
      parsed++;
      struct tc_policy_result *res = NULL;
      TC_CHECK_INT(tc_policy_compile(p, &topo3, &res, &err), 0);
      tc_policy_result_free(res);
      tc_policy_run_tests(p, &topo3, &err);
      struct tc_buf b = TC_BUF_INIT;
      tc_policy_print(p, &b);
      tc_buf_free(&b);
    } else {
      TC_CHECK(err.msg[0] != 0);
      TC_CHECK(err.line >= 0 && err.col >= 0);
    }
    tc_policy_free(p);
  }
  fprintf(stderr, "  %d of 3000 mutants still parsed\n", parsed);
  /* The unmutated policy itself is valid and its tests pass. */
  struct tc_policy_err err;
  TC_CHECK_INT(tc_policy_check(base, sizeof(base) - 1, &topo3, &err), 0);
  if (err.msg[0])
    fprintf(stderr, "  base: %d:%d %s\n", err.line, err.col, err.msg);
}

/* The address formatter skips inet_ntop for speed; its text must be the
 * same for every address, including zero runs at either end, ties between
 * runs, single zero groups and the embedded-IPv4 forms. */
TC_TEST(address_text_matches_inet_ntop) {
  uint64_t x = 0x9e3779b97f4a7c15ull;
  int bad = 0;
  for (int i = 0; i < 200000 && bad < 5; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    unsigned char b[16];
    tc_u128 a = 0;
    for (int k = 0; k < 16; k++) {
      /* many zero bytes so that zero groups and runs of every shape occur */
      unsigned v = (unsigned)(x >> ((k * 5 + i) % 60)) & 0xff;
      b[k] = (x >> (k * 3 % 64)) & 1 ? 0 : (unsigned char)v;
      if (i % 7 == 0 && k < 10) b[k] = 0;
      if (i % 11 == 0 && k >= 10 && k < 12) b[k] = 0xff;
      a = a << 8 | b[k];
    }
    char want[64], got[64];
    inet_ntop(AF_INET6, b, want, sizeof want);
    pol_ip_format_addr(1, a, got, sizeof got);
    if (strcmp(want, got)) {
      fprintf(stderr, "  v6 %s != %s\n", got, want);
      bad++;
    }
    inet_ntop(AF_INET, b + 12, want, sizeof want);
    pol_ip_format_addr(0, (tc_u128)((uint32_t)b[12] << 24 | (uint32_t)b[13] << 16 | (uint32_t)b[14] << 8 | b[15]), got,
                       sizeof got);
    if (strcmp(want, got)) {
      fprintf(stderr, "  v4 %s != %s\n", got, want);
      bad++;
    }
  }
  TC_CHECK_INT(bad, 0);
  char t[64];
  pol_ip_format_addr(1, (tc_u128)0xfd7a115ca1e00000ull << 64 | 0xab12ull, t, sizeof t);
  TC_CHECK_STR(t, "fd7a:115c:a1e0::ab12");
  pol_ip_format_addr(0, 0x64400001u, t, sizeof t);
  TC_CHECK_STR(t, "100.64.0.1");
  /* tie between two runs: the first is compressed; a lone zero group is not */
  pol_ip_format_addr(1, (tc_u128)0x0001000000000002ull << 64 | 0x0000000000030004ull, t, sizeof t);
  TC_CHECK_STR(t, "1::2:0:0:3:4");
  pol_ip_format_addr(1, (tc_u128)0x0001000200000003ull << 64 | 0x0004000500060000ull, t, sizeof t);
  TC_CHECK_STR(t, "1:2:0:3:4:5:6:0");
}

/* ---- incremental compile ------------------------------------------------------ */

static char *filter_text(const json_t *f) {
  return json_dumps(f, JSON_COMPACT);
}

/* Spans: ascending, inside the text, and the bytes they name. */
static bool spans_ok(const char *text, size_t len) {
  const struct tc_policy_text_span *sp;
  size_t n = tc_policy_text_spans(text, &sp), end = 0;
  for (size_t i = 0; i < n; i++) {
    if (sp[i].off < end || sp[i].len < 256 || sp[i].off + sp[i].len > len || strlen(sp[i].shared) != sp[i].len ||
        memcmp(text + sp[i].off, sp[i].shared, sp[i].len)) {
      fprintf(stderr, "  bad span %zu of %zu (off %zu len %zu of %zu)\n", i, n, sp[i].off, sp[i].len, len);
      return false;
    }
    end = sp[i].off + sp[i].len;
  }
  return true;
}

/* A node's filter_text / ssh_text must be jansson's compact dump of its
 * objects, byte for byte (the mapper sends them as they are). */
static bool texts_match(const struct tc_policy_node_result *x) {
  char *f = filter_text(x->packet_filter);
  char *s = x->ssh_policy ? json_dumps(x->ssh_policy, JSON_COMPACT) : NULL;
  bool ok = f && x->filter_text && !strcmp(f, x->filter_text) && x->filter_len == strlen(f) &&
            (s ? x->ssh_text && !strcmp(s, x->ssh_text) && x->ssh_len == strlen(s) : !x->ssh_text && !x->ssh_len) &&
            spans_ok(x->filter_text, x->filter_len) && spans_ok(x->ssh_text, x->ssh_len);
  if (!ok) fprintf(stderr, "  node %lld text differs:\n   dump %s\n   text %s\n", (long long)x->node_id, f, x->filter_text);
  free(f);
  free(s);
  return ok;
}

/* Every node's whole result must be the same as a full compile's. */
static bool same_results(const struct tc_policy_result *a, const struct tc_policy_result *b) {
  if (a->nnodes != b->nnodes) return false;
  for (size_t i = 0; i < a->nnodes; i++) {
    if (!texts_match(&a->nodes[i]) || !texts_match(&b->nodes[i])) return false;
    /* the same object always comes with the same text */
    for (size_t k = 0; k < i; k++)
      if ((a->nodes[k].packet_filter == a->nodes[i].packet_filter) !=
              (a->nodes[k].filter_text == a->nodes[i].filter_text) ||
          (a->nodes[k].ssh_policy == a->nodes[i].ssh_policy) != (a->nodes[k].ssh_text == a->nodes[i].ssh_text))
        return false;
  }
  for (size_t i = 0; i < a->nnodes; i++) {
    const struct tc_policy_node_result *x = &a->nodes[i], *y = &b->nodes[i];
    char *fx = filter_text(x->packet_filter), *fy = filter_text(y->packet_filter);
    bool ok = x->node_id == y->node_id && fx && fy && !strcmp(fx, fy) && x->npeers == y->npeers &&
              json_equal(x->cap_map, y->cap_map) && (x->ssh_policy ? json_equal(x->ssh_policy, y->ssh_policy)
                                                                    : !y->ssh_policy);
    for (size_t k = 0; ok && k < x->npeers; k++)
      ok = tc_policy_peer_id(x, k) == tc_policy_peer_id(y, k) && json_equal(tc_policy_peer_allowed_ips(x, k), tc_policy_peer_allowed_ips(y, k));
    if (!ok) fprintf(stderr, "  node %lld differs:\n   inc  %s\n   full %s\n", (long long)x->node_id, fx, fy);
    free(fx);
    free(fy);
    if (!ok) return false;
  }
  return true;
}

/* The plain answer tc_policy_peers_differ must give: walk both peer lists. */
static bool naive_peers_differ(const struct tc_policy_node_result *a, const struct tc_policy_node_result *b,
                               const int64_t *skip, size_t nskip) {
  const struct tc_policy_node_result *side[2] = {a, b};
  for (int s = 0; s < 2; s++) {
    const struct tc_policy_node_result *x = side[s], *y = side[1 - s];
    for (size_t k = 0; x && k < x->npeers; k++) {
      int64_t id = tc_policy_peer_id(x, k);
      bool skipped = false;
      for (size_t q = 0; q < nskip; q++) skipped |= skip[q] == id;
      if (!skipped && (!y || tc_policy_peer_find(y, id) < 0)) return true;
    }
  }
  return false;
}

/* Every node present in both results: the comparer agrees with the naive
 * walk, for a random skip set; returns the comparer's walk count. */
static size_t check_peers_differ(const struct tc_policy_result *prev, const struct tc_policy_result *next,
                                 unsigned seed, int64_t max_id, bool *ok) {
  int64_t skip[3];
  size_t nskip = seed % 4;
  for (size_t q = 0; q < nskip; q++) skip[q] = 1 + (int64_t)((seed >> (4 + 5 * q)) % (unsigned)max_id);
  for (size_t q = 1; q < nskip; q++) /* ascending, no duplicates */
    for (size_t p = q; p > 0 && skip[p - 1] > skip[p]; p--) {
      int64_t t = skip[p];
      skip[p] = skip[p - 1];
      skip[p - 1] = t;
    }
  size_t m = 0;
  for (size_t q = 0; q < nskip; q++)
    if (!m || skip[m - 1] != skip[q]) skip[m++] = skip[q];
  nskip = m;
  struct tc_policy_peers_cmp *c = tc_policy_peers_cmp_new(skip, nskip);
  for (size_t i = 0; i < next->nnodes; i++) {
    const struct tc_policy_node_result *b = &next->nodes[i], *a = tc_policy_result_node(prev, b->node_id);
    if (!a) continue;
    bool want = naive_peers_differ(a, b, skip, nskip), got = tc_policy_peers_differ(c, a, b);
    if (want != got) {
      fprintf(stderr, "  node %lld: peers_differ %d, naive %d\n", (long long)b->node_id, got, want);
      *ok = false;
    }
  }
  size_t walks = tc_policy_peers_cmp_walks(c);
  tc_policy_peers_cmp_free(c);
  return walks;
}

TC_TEST(incremental_compile_equals_full_compile_over_random_changes) {
  static const char *policies[] = {
      /* users, groups, tags, autogroup:self/member, hosts, CIDRs, protocols, routes */
      "{\"groups\": {\"group:dev\": [\"u1@\", \"u2@\"], \"group:ops\": [\"u3@\"]},\n"
      " \"tagOwners\": {\"tag:web\": [\"u1@\"], \"tag:db\": [\"u1@\"], \"tag:router\": [\"u1@\"]},\n"
      " \"hosts\": {\"lan\": \"10.9.0.0/16\", \"one\": \"100.64.0.7\"},\n"
      " \"autoApprovers\": {\"routes\": {\"10.9.0.0/16\": [\"tag:router\"]}},\n"
      " \"acls\": [\n"
      "  {\"action\": \"accept\", \"src\": [\"group:dev\"], \"dst\": [\"tag:web:80,443\", \"autogroup:self:*\"]},\n"
      "  {\"action\": \"accept\", \"src\": [\"group:ops\", \"tag:web\"], \"dst\": [\"tag:db:5432\"]},\n"
      "  {\"action\": \"accept\", \"proto\": \"udp\", \"src\": [\"autogroup:member\"], \"dst\": [\"lan:53\"]},\n"
      "  {\"action\": \"accept\", \"src\": [\"u4@\"], \"dst\": [\"one:22\", \"u4@:*\"]},\n"
      "  {\"action\": \"accept\", \"src\": [\"tag:db\"], \"dst\": [\"autogroup:member:9000\"]}\n"
      " ],\n"
      " \"ssh\": [{\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self\"],\n"
      "          \"users\": [\"root\", \"autogroup:nonroot\"]},\n"
      "         {\"action\": \"check\", \"src\": [\"group:dev\"], \"dst\": [\"tag:web\"], \"users\": [\"deploy\"]}]}\n",
      /* grants with an app capability (CapGrant rules) and the default rule */
      "{\"tagOwners\": {\"tag:web\": [\"u1@\"], \"tag:db\": [\"u1@\"], \"tag:router\": [\"u1@\"]},\n"
      " \"grants\": [\n"
      "  {\"src\": [\"autogroup:member\"], \"dst\": [\"tag:web\"], \"ip\": [\"tcp:443\"],\n"
      "   \"app\": {\"example.com/cap/web\": [{\"role\": \"reader\", \"t\": \"r\u00e9 \\\"q\\\" \\\\ \\n \\u0001 /\",\n"
      "                                        \"q\": \"say \\\"hi\\\" \\\\ back\", \"u\": \"r\u00e9/\", \"x\": 1.5, \"e\": 1e300, \"b\": true, \"f\": false, \"z\": null, \"i\": -3,\n"
      "                                        \"o\": {}, \"a\": []}]}},\n"
      "  {\"src\": [\"u2@\", \"u3@\"], \"dst\": [\"autogroup:self\"], \"ip\": [\"*\"]},\n"
      "  {\"src\": [\"tag:db\"], \"dst\": [\"tag:db\", \"u1@\"], \"ip\": [\"tcp:1-1024\"]},\n"
      "  {\"src\": [\"*\"], \"dst\": [\"10.9.0.0/16\"], \"ip\": [\"icmp:*\", \"tcp:22\"]}\n"
      " ]}\n",
      "", /* no policy: allow all */
  };
  static const char *tagsets[][2] = {{NULL, NULL}, {"tag:web", NULL}, {"tag:db", NULL}, {"tag:router", NULL},
                                     {"tag:web", "tag:db"}};
  static const char *lan[] = {"10.9.0.0/16"};
  struct tc_policy_user users[5];
  char uname[5][8];
  for (int u = 0; u < 5; u++) {
    snprintf(uname[u], sizeof uname[u], "u%d", u + 1);
    users[u] = (struct tc_policy_user){u + 1, uname[u], NULL};
  }
  enum { MAXN = 40 };
  struct tc_policy_node nodes[MAXN];
  char ip4[MAXN][20], ip6[MAXN][48], host[MAXN][24];
  unsigned seed = 12345;
  int reused_total = 0, skipped_total = 0;
  size_t cmp_walks = 0, cmp_viewers = 0;
  for (size_t pi = 0; pi < TC_ARRAY_LEN(policies); pi++) {
    struct tc_policy *pol = NULL;
    struct tc_policy_err err;
    int prc = tc_policy_parse(policies[pi], strlen(policies[pi]), &pol, &err);
    if (prc) fprintf(stderr, "  policy %zu: %d:%d %s\n", pi, err.line, err.col, err.msg);
    TC_REQUIRE(prc == 0);
    size_t nn = 0;
    int64_t next_id = 1;
    struct tc_policy_result *prev = NULL;
    for (int step = 0; step < 60; step++) {
      seed = seed * 1103515245u + 12345u;
      unsigned r = (seed >> 8) % 100;
      if (nn < 3 || (r < 45 && nn < MAXN)) { /* join */
        struct tc_policy_node *n = &nodes[nn];
        memset(n, 0, sizeof *n);
        n->id = next_id++;
        snprintf(host[nn], sizeof host[nn], "h%lld", (long long)n->id);
        n->hostname = host[nn];
        snprintf(ip4[nn], sizeof ip4[nn], "100.64.%u.%u", (unsigned)(n->id / 200), (unsigned)(1 + n->id % 200));
        snprintf(ip6[nn], sizeof ip6[nn], "fd7a:115c:a1e0::%llx", (unsigned long long)n->id);
        n->ipv4 = ip4[nn];
        n->ipv6 = ip6[nn];
        size_t ts = (seed >> 16) % TC_ARRAY_LEN(tagsets);
        n->tags = tagsets[ts];
        n->ntags = ts == 0 ? 0 : ts == 4 ? 2 : 1;
        n->user_id = 1 + (seed >> 20) % 5;
        if (ts == 3) {
          n->announced = lan;
          n->nannounced = 1;
          if ((seed >> 24) & 1) n->approved = lan, n->napproved = 1;
        }
        nn++;
      } else if (r < 70) { /* leave */
        size_t k = (seed >> 12) % nn;
        memmove(&nodes[k], &nodes[k + 1], (nn - k - 1) * sizeof nodes[0]);
        memmove(ip4[k], ip4[k + 1], (nn - k - 1) * sizeof ip4[0]);
        memmove(ip6[k], ip6[k + 1], (nn - k - 1) * sizeof ip6[0]);
        memmove(host[k], host[k + 1], (nn - k - 1) * sizeof host[0]);
        nn--;
        for (size_t q = 0; q < nn; q++) /* arrays moved: repoint */
          nodes[q].ipv4 = ip4[q], nodes[q].ipv6 = ip6[q], nodes[q].hostname = host[q];
      } else if (r < 85) { /* retag or move to another user */
        size_t k = (seed >> 12) % nn;
        size_t ts = (seed >> 16) % TC_ARRAY_LEN(tagsets);
        nodes[k].tags = tagsets[ts];
        nodes[k].ntags = ts == 0 ? 0 : ts == 4 ? 2 : 1;
        nodes[k].user_id = 1 + (seed >> 20) % 5;
      } else if (r < 92) { /* renumbered (same id, new addresses) */
        size_t k = (seed >> 12) % nn;
        /* one family or both */
        if ((seed >> 26) % 3 != 1)
          snprintf(ip4[k], sizeof ip4[k], "100.65.%u.%u", (seed >> 4) % 200, 1 + (seed >> 14) % 200);
        if ((seed >> 26) % 3 != 0)
          snprintf(ip6[k], sizeof ip6[k], "fd7a:115c:a1e0::1:%x", (seed >> 6) & 0xffff);
      } else { /* route approval changes */
        size_t k = (seed >> 12) % nn;
        nodes[k].announced = lan;
        nodes[k].nannounced = 1;
        nodes[k].napproved = nodes[k].napproved ? 0 : 1;
        nodes[k].approved = nodes[k].napproved ? lan : NULL;
      }
      struct tc_policy_topo topo = {users, 5, nodes, nn, NULL};
      struct tc_policy_result *full = NULL, *inc = NULL;
      TC_REQUIRE(tc_policy_compile(pol, &topo, &full, &err) == 0);
      TC_REQUIRE(tc_policy_compile_incremental(pol, &topo, prev, &inc, &err) == 0);
      bool same = same_results(inc, full);
      TC_CHECK(same);
      if (prev) {
        bool ok = true;
        size_t walks = check_peers_differ(prev, inc, seed, next_id, &ok);
        TC_CHECK(ok);
        cmp_walks += walks;
        cmp_viewers += inc->nnodes;
        if (pi == 2) TC_CHECK(walks <= 1); /* allow-all: every viewer holds the same pair of lists */
      }
      reused_total += (int)inc->nreused;
      skipped_total += (int)inc->nskipped;
      tc_policy_result_free(full);
      tc_policy_result_free(prev);
      prev = inc;
      if (!same) break;
    }
    /* a result of another parse of the same text reuses nothing */
    struct tc_policy *again = NULL;
    TC_REQUIRE(tc_policy_parse(policies[pi], strlen(policies[pi]), &again, &err) == 0);
    struct tc_policy_topo topo = {users, 5, nodes, nn, NULL};
    struct tc_policy_result *other = NULL;
    TC_REQUIRE(tc_policy_compile_incremental(again, &topo, prev, &other, &err) == 0);
    TC_CHECK_INT((int)other->nreused, 0);
    tc_policy_result_free(other);
    tc_policy_free(again);
    tc_policy_result_free(prev);
    tc_policy_free(pol);
  }
  fprintf(stderr,
          "  %d filters reused over 180 steps (%d nodes not evaluated at all); peer-set comparison walked %zu list "
          "pairs for %zu viewers\n",
          reused_total, skipped_total, cmp_walks, cmp_viewers);
  TC_CHECK(skipped_total > 100);
  TC_CHECK(cmp_walks < cmp_viewers);
  TC_CHECK(reused_total > 500);
}

/* Nodes that see the same nodes share one stored peer list; each still reads
 * exactly its own peers (itself left out), and a subnet router's AllowedIPs,
 * which depend on the viewer, stay per viewer. 130 nodes cross two bitset
 * words. Under `split`, alice's devices and the (even-numbered) router see
 * each other, bob's devices only each other. */
TC_TEST(peer_lists_are_shared_between_nodes_that_see_alike)
{
  enum { N = 130, ROUTER = 70 };
  static const struct tc_policy_user us[] = {{1, "alice", NULL}, {2, "bob", NULL}};
  static char ip[N][32];
  static const char *route[] = {"10.9.0.0/24"};
  static const char *rtag[] = {"tag:r"};
  struct tc_policy_node ns[N];
  memset(ns, 0, sizeof ns);
  for (int i = 0; i < N; i++) {
    snprintf(ip[i], sizeof ip[i], "100.64.%d.%d", i / 200, i % 200 + 1);
    ns[i] = (struct tc_policy_node){i + 1, "n", i % 2 ? 2 : 1, NULL, 0, ip[i], NULL, NULL, 0, NULL, 0};
  }
  ns[ROUTER].tags = rtag, ns[ROUTER].ntags = 1;
  ns[ROUTER].announced = route, ns[ROUTER].nannounced = 1;
  ns[ROUTER].approved = route, ns[ROUTER].napproved = 1;
  struct tc_policy_topo t = {us, 2, ns, N, NULL};
  const char *star = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"*\"],\"dst\":[\"*:*\"]}]}";
  const char *split = "{\"tagOwners\":{\"tag:r\":[\"alice@\"]},\"acls\":["
                      "{\"action\":\"accept\",\"src\":[\"alice@\"],\"dst\":[\"alice@:*\",\"tag:r:*\",\"10.9.0.0/24:*\"]},"
                      "{\"action\":\"accept\",\"src\":[\"bob@\"],\"dst\":[\"bob@:*\"]}]}";
  for (int pass = 0; pass < 2; pass++) {
    struct tc_policy *p;
    struct tc_policy_err err;
    const char *text = pass ? split : star;
    TC_REQUIRE(tc_policy_parse(text, strlen(text), &p, &err) == 0);
    struct tc_policy_result *res;
    TC_REQUIRE(tc_policy_compile(p, &t, &res, &err) == 0);
    /* star: one list; split: alice's side + router, bob's side */
    TC_CHECK_INT(res->npeer_lists, pass ? 2 : 1);
    for (int i = 0; i < N; i++) {
      const struct tc_policy_node_result *nr = &res->nodes[i];
      bool alice_side = i % 2 == 0; /* the router (even) is on it */
      size_t want = pass == 0 ? N - 1 : N / 2 - 1;
      TC_CHECK_INT(nr->npeers, want);
      TC_CHECK(tc_policy_peer_find(nr, nr->node_id) == -1);
      /* equal filter inputs: one shared filter (except the router, whose
       * filter also admits traffic to its subnet) */
      if (pass == 0 && i != ROUTER && i)
        TC_CHECK(nr->packet_filter == res->nodes[0].packet_filter);
      int64_t last = 0;
      for (size_t k = 0; k < nr->npeers; k++) {
        int64_t id = tc_policy_peer_id(nr, k);
        TC_CHECK(id != nr->node_id && id > last);
        last = id;
        if (pass)
          TC_CHECK(((id - 1) % 2 == 0) == alice_side);
        TC_CHECK_INT(tc_policy_peer_find(nr, id), (long)k);
        json_t *a = tc_policy_peer_allowed_ips(nr, k), *pr = tc_policy_peer_primary_routes(nr, k);
        TC_REQUIRE(json_is_array(a) && json_is_array(pr));
        bool has_route = false;
        for (size_t q = 0; q < json_array_size(a); q++)
          has_route |= !strcmp(json_string_value(json_array_get(a, q)), route[0]);
        TC_CHECK(has_route == (id - 1 == ROUTER));
        TC_CHECK_INT(json_array_size(pr), id - 1 == ROUTER ? 1 : 0);
      }
    }
    tc_policy_result_free(res);
    tc_policy_free(p);
  }
}

/* disable-ipv4 changes what others install for a node and what it installs
 * for everyone: such a viewer gets its own list, and its entry in the shared
 * list of the others is per viewer. Everyone else still shares one list. */
TC_TEST(peer_lists_with_a_viewer_without_ipv4)
{
  static const struct tc_policy_user us[] = {{1, "alice", NULL}};
  static const struct tc_policy_node ns[] = {
      {1, "a", 1, NULL, 0, "100.64.0.1", "fd7a:115c:a1e0::1", NULL, 0, NULL, 0},
      {2, "b", 1, NULL, 0, "100.64.0.2", "fd7a:115c:a1e0::2", NULL, 0, NULL, 0},
      {3, "c", 1, NULL, 0, "100.64.0.3", "fd7a:115c:a1e0::3", NULL, 0, NULL, 0},
      {4, "d", 1, NULL, 0, "100.64.0.4", "fd7a:115c:a1e0::4", NULL, 0, NULL, 0},
  };
  struct tc_policy_topo t = {us, 1, ns, 4, NULL};
  const char *text = "{\"acls\":[{\"action\":\"accept\",\"src\":[\"*\"],\"dst\":[\"*:*\"]}],"
                     "\"nodeAttrs\":[{\"target\":[\"100.64.0.2\"],\"attr\":[\"disable-ipv4\"]}]}";
  struct tc_policy *p;
  struct tc_policy_err err;
  TC_REQUIRE(tc_policy_parse(text, strlen(text), &p, &err) == 0);
  struct tc_policy_result *res;
  TC_REQUIRE(tc_policy_compile(p, &t, &res, &err) == 0);
  TC_CHECK_INT(res->npeer_lists, 2);
  for (size_t i = 0; i < 4; i++) {
    const struct tc_policy_node_result *nr = &res->nodes[i];
    TC_CHECK_INT(nr->npeers, 3);
    for (size_t k = 0; k < nr->npeers; k++) {
      char *s = json_dumps(tc_policy_peer_allowed_ips(nr, k), JSON_COMPACT);
      bool v4 = strstr(s, "100.64.") != NULL;
      /* IPv4 only between two nodes that both have it */
      TC_CHECK(v4 == (nr->node_id != 2 && tc_policy_peer_id(nr, k) != 2));
      TC_CHECK(strstr(s, "fd7a:115c:a1e0::") != NULL);
      free(s);
    }
  }
  TC_CHECK(res->nodes[0].peers == res->nodes[2].peers && res->nodes[0].peers != res->nodes[1].peers);
  tc_policy_result_free(res);
  tc_policy_free(p);
}

/* One user owning every device: each filter is mostly the one SrcIPs list of
 * all devices; that run is a span with the same key in every node's text. */
TC_TEST(filter_texts_mark_the_runs_all_nodes_share)
{
  enum { N = 300 };
  static const char *pol_text =
      "{\"groups\": {\"group:admins\": [\"bench@\"]},\n"
      " \"acls\": [{\"action\": \"accept\", \"src\": [\"group:admins\"], \"dst\": [\"*:22\"]},\n"
      "          {\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self:*\"]},\n"
      "          {\"action\": \"accept\", \"src\": [\"100.64.0.0/24\"], \"dst\": [\"100.64.1.0/24:443\"]}]}";
  static const struct tc_policy_user u = {1, "bench", NULL};
  static char ip4[N][24], ip6[N][40];
  struct tc_policy_node ns[N];
  memset(ns, 0, sizeof ns);
  for (int i = 0; i < N; i++) {
    snprintf(ip4[i], sizeof ip4[i], "100.64.%d.%d", (i + 1) / 256, (i + 1) % 256);
    snprintf(ip6[i], sizeof ip6[i], "fd7a:115c:a1e0::%x", i + 1);
    ns[i] = (struct tc_policy_node){.id = i + 1, .hostname = "h", .user_id = 1, .ipv4 = ip4[i], .ipv6 = ip6[i]};
  }
  struct tc_policy *pol;
  struct tc_policy_err err;
  TC_REQUIRE(tc_policy_parse(pol_text, strlen(pol_text), &pol, &err) == 0);
  struct tc_policy_topo topo = {&u, 1, ns, N, NULL};
  struct tc_policy_result *res;
  TC_REQUIRE(tc_policy_compile(pol, &topo, &res, &err) == 0);
  const char *key = NULL;
  bool same_key = true, covered = true, ok = true;
  for (size_t i = 0; i < res->nnodes; i++) {
    const struct tc_policy_node_result *nr = &res->nodes[i];
    ok &= texts_match(nr);
    const struct tc_policy_text_span *sp;
    size_t n = tc_policy_text_spans(nr->filter_text, &sp), big = 0, in_spans = 0;
    for (size_t k = 0; k < n; k++) {
      in_spans += sp[k].len;
      if (sp[k].len > sp[big].len) big = k;
    }
    if (!n) {
      covered = false;
      continue;
    }
    if (!key) key = sp[big].shared;
    same_key &= sp[big].shared == key;
    covered &= in_spans * 10 > nr->filter_len * 9;
  }
  TC_CHECK(ok);
  TC_CHECK(key != NULL);
  TC_CHECK(same_key);
  TC_CHECK(covered);
  /* the key outlives the compile: it is still the right text now */
  const struct tc_policy_text_span *sp0;
  TC_CHECK(tc_policy_text_spans(res->nodes[7].filter_text, &sp0) > 0 && strstr(sp0[0].shared, "\"100.64.0.1\""));
  TC_CHECK(tc_policy_text_spans(NULL, &sp0) == 0 && sp0 == NULL);
  tc_policy_result_free(res);
  tc_policy_free(pol);
}

/* SrcIPs arrays are taken over from the previous result when their address
 * ranges did not change (and rebuilt when they did): a join of a device the
 * group does not hold keeps the group's array, one of its devices replaces it. */
TC_TEST(unchanged_source_lists_are_taken_over_from_the_previous_result)
{
  static const char *text = "{\"groups\": {\"group:a\": [\"alice@\"]},\n"
                            " \"acls\": [{\"action\": \"accept\", \"src\": [\"group:a\"], \"dst\": [\"*:22\"]}]}";
  static const struct tc_policy_user us[] = {{1, "alice", NULL}, {2, "bob", NULL}};
  struct tc_policy_node ns[4] = {
      {.id = 1, .hostname = "a1", .user_id = 1, .ipv4 = "100.64.0.1"},
      {.id = 2, .hostname = "b1", .user_id = 2, .ipv4 = "100.64.0.2"},
      {.id = 3, .hostname = "b2", .user_id = 2, .ipv4 = "100.64.0.3"},
      {.id = 4, .hostname = "a2", .user_id = 1, .ipv4 = "100.64.0.4"},
  };
  struct tc_policy *pol;
  struct tc_policy_err err;
  TC_REQUIRE(tc_policy_parse(text, strlen(text), &pol, &err) == 0);
  struct tc_policy_topo topo = {us, 2, ns, 2, NULL};
  struct tc_policy_result *r1, *r2, *r3;
  TC_REQUIRE(tc_policy_compile(pol, &topo, &r1, &err) == 0);
  topo.nnodes = 3; /* bob's second device */
  TC_REQUIRE(tc_policy_compile_incremental(pol, &topo, r1, &r2, &err) == 0);
  topo.nnodes = 4; /* alice's second device */
  TC_REQUIRE(tc_policy_compile_incremental(pol, &topo, r2, &r3, &err) == 0);
  json_t *s1 = json_object_get(json_array_get(r1->nodes[1].packet_filter, 0), "SrcIPs");
  json_t *s2 = json_object_get(json_array_get(r2->nodes[2].packet_filter, 0), "SrcIPs");
  json_t *s3 = json_object_get(json_array_get(r3->nodes[2].packet_filter, 0), "SrcIPs");
  TC_REQUIRE(s1 && s2 && s3);
  TC_CHECK(s1 == s2);
  TC_CHECK(s3 != s2);
  TC_CHECK_INT((int)json_array_size(s3), 2);
  TC_CHECK_STR(json_string_value(json_array_get(s3, 1)), "100.64.0.4");
  tc_policy_result_free(r1); /* r2 still holds the shared array */
  TC_CHECK_STR(json_string_value(json_array_get(s2, 0)), "100.64.0.1");
  tc_policy_result_free(r2);
  tc_policy_result_free(r3);
  tc_policy_free(pol);
}

/* The comparer with a topology that is not in id order (stored lists are
 * then unsorted and get a sorted copy): same answers as the naive walk. */
TC_TEST(peer_set_comparer_with_unsorted_topology)
{
  enum { N = 30 };
  static const char *text =
      "{\"groups\": {\"group:a\": [\"alice@\"]},\n"
      " \"acls\": [{\"action\": \"accept\", \"src\": [\"group:a\"], \"dst\": [\"bob@:22\"]},\n"
      "          {\"action\": \"accept\", \"src\": [\"bob@\"], \"dst\": [\"autogroup:self:*\"]}]}";
  static const struct tc_policy_user us[] = {{1, "alice", NULL}, {2, "bob", NULL}, {3, "carol", NULL}};
  static char ip[N][24];
  struct tc_policy_node ns[N];
  memset(ns, 0, sizeof ns);
  for (int i = 0; i < N; i++) { /* ids descending */
    snprintf(ip[i], sizeof ip[i], "100.64.0.%d", N - i);
    ns[i] = (struct tc_policy_node){.id = N - i, .hostname = "h", .user_id = 1 + (N - i) % 3, .ipv4 = ip[i]};
  }
  struct tc_policy *pol;
  struct tc_policy_err err;
  TC_REQUIRE(tc_policy_parse(text, strlen(text), &pol, &err) == 0);
  struct tc_policy_topo topo = {us, 3, ns, N - 1, NULL};
  struct tc_policy_result *a, *b;
  TC_REQUIRE(tc_policy_compile(pol, &topo, &a, &err) == 0);
  ns[3].user_id = ns[3].user_id % 3 + 1; /* one node changes hands, another joins */
  topo.nnodes = N;
  TC_REQUIRE(tc_policy_compile_incremental(pol, &topo, a, &b, &err) == 0);
  TC_CHECK(!b->nodes[0].peers || !b->nodes[0].peers->sorted);
  bool ok = true;
  for (unsigned seed = 1; seed < 40; seed++) check_peers_differ(a, b, seed * 2654435761u, N, &ok);
  /* skipping exactly the two touched nodes: most viewers saw nothing else change */
  int64_t skip[2] = {1, N - 3}; /* the joining node is the last in topology order: id 1 */
  struct tc_policy_peers_cmp *c = tc_policy_peers_cmp_new(skip, 2);
  int unchanged = 0;
  for (size_t i = 0; i < b->nnodes; i++) {
    const struct tc_policy_node_result *y = &b->nodes[i], *x = tc_policy_result_node(a, y->node_id);
    if (!x) continue;
    bool want = naive_peers_differ(x, y, skip, 2);
    ok &= want == tc_policy_peers_differ(c, x, y);
    unchanged += !want;
  }
  tc_policy_peers_cmp_free(c);
  TC_CHECK(unchanged > N / 2);
  TC_CHECK(ok);
  tc_policy_result_free(a);
  tc_policy_result_free(b);
  tc_policy_free(pol);
}
