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
    if (a1->peer_ids[i] != 3)
      continue;
    saw = true;
    char *s = json_dumps(a1->peer_allowed_ips[i], JSON_COMPACT);
    TC_CHECK(strstr(s, "10.1.0.0/16") && strstr(s, "0.0.0.0/0") && strstr(s, "::/0"));
    free(s);
  }
  TC_CHECK(saw);
  /* bob may reach nobody, but alice may reach him: he sees only alice,
   * and srv (which neither reaches nor is reached by bob) stays hidden. */
  const struct tc_policy_node_result *b1 = tc_policy_result_node(res, 2);
  TC_CHECK_INT(b1->npeers, 1);
  TC_CHECK_INT(b1->peer_ids[0], 1);
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
