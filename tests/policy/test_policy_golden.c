/* Golden tests: each tests/policy/golden/NAME.hujson policy is compiled
 * against golden/topology.json and the result (per node: packet filter,
 * peers with AllowedIPs, SSH policy, capabilities) must equal
 * golden/NAME.expected.json exactly. The expected files were generated once
 * and checked by hand; TC_GOLDEN_UPDATE=1 rewrites them after a deliberate
 * change (review the diff). */
#include <dirent.h>
#include <string.h>

#include "base/base.h"
#include "policy/policy.h"
#include "tc_test.h"

#define GOLDEN TC_SOURCE_DIR "/tests/policy/golden"

static const char **strv(json_t *a, size_t *n)
{
  *n = json_array_size(a);
  const char **v = calloc(*n + 1, sizeof(char *));
  for (size_t i = 0; i < *n; i++)
    v[i] = json_string_value(json_array_get(a, i));
  return v;
}

TC_TEST(golden_policies_compile_to_expected_output)
{
  json_t *tj = json_load_file(GOLDEN "/topology.json", 0, NULL);
  TC_REQUIRE(tj != NULL);
  json_t *users = json_object_get(tj, "users"), *nodes = json_object_get(tj, "nodes");
  struct tc_policy_user us[8];
  struct tc_policy_node ns[16];
  memset(ns, 0, sizeof(ns));
  size_t nu = json_array_size(users), nn = json_array_size(nodes);
  TC_REQUIRE(nu <= 8 && nn <= 16);
  for (size_t i = 0; i < nu; i++) {
    json_t *u = json_array_get(users, i);
    us[i] = (struct tc_policy_user){json_integer_value(json_object_get(u, "id")),
                                    json_string_value(json_object_get(u, "name")),
                                    json_string_value(json_object_get(u, "email"))};
  }
  for (size_t i = 0; i < nn; i++) {
    json_t *n = json_array_get(nodes, i);
    ns[i].id = json_integer_value(json_object_get(n, "id"));
    ns[i].hostname = json_string_value(json_object_get(n, "hostname"));
    ns[i].user_id = json_integer_value(json_object_get(n, "user"));
    ns[i].tags = strv(json_object_get(n, "tags"), &ns[i].ntags);
    ns[i].ipv4 = json_string_value(json_object_get(n, "ipv4"));
    ns[i].ipv6 = json_string_value(json_object_get(n, "ipv6"));
    ns[i].announced = strv(json_object_get(n, "announced"), &ns[i].nannounced);
    ns[i].approved = strv(json_object_get(n, "approved"), &ns[i].napproved);
  }
  struct tc_policy_topo topo = {us, nu, ns, nn, "https://hs.example.com"};
  DIR *d = opendir(GOLDEN);
  TC_REQUIRE(d != NULL);
  struct dirent *e;
  int cases = 0;
  bool update = getenv("TC_GOLDEN_UPDATE") != NULL;
  while ((e = readdir(d))) {
    size_t l = strlen(e->d_name);
    if (l < 8 || strcmp(e->d_name + l - 7, ".hujson"))
      continue;
    cases++;
    char *name = tc_xstrndup(e->d_name, l - 7);
    char *ppath = tc_xasprintf("%s/%s", GOLDEN, e->d_name);
    char *epath = tc_xasprintf("%s/%s.expected.json", GOLDEN, name);
    char *text = NULL;
    size_t tl = 0;
    struct tc_err rerr;
    TC_REQUIRE(tc_read_file(ppath, 1 << 20, &text, &tl, &rerr) == 0);
    struct tc_policy *p;
    struct tc_policy_err err;
    int rc = tc_policy_parse(text, tl, &p, &err);
    if (rc)
      fprintf(stderr, "  %s: %d:%d %s\n", name, err.line, err.col, err.msg);
    TC_REQUIRE(rc == 0);
    struct tc_policy_result *res;
    TC_REQUIRE(tc_policy_compile(p, &topo, &res, &err) == 0);
    json_t *out = json_object();
    for (size_t i = 0; i < res->nnodes; i++) {
      const struct tc_policy_node_result *nr = &res->nodes[i];
      json_t *peers = json_object();
      for (size_t j = 0; j < nr->npeers; j++)
        for (size_t k = 0; k < nn; k++)
          if (ns[k].id == tc_policy_peer_id(nr, j))
            json_object_set(peers, ns[k].hostname, tc_policy_peer_allowed_ips(nr, j));
      json_object_set_new(out, ns[i].hostname,
                          json_pack("{s:O,s:o,s:O,s:O,s:O}", "packet_filter", nr->packet_filter, "peers", peers,
                                    "ssh_policy", nr->ssh_policy ? nr->ssh_policy : json_null(), "cap_map",
                                    nr->cap_map, "auto_approved", nr->auto_approved));
    }
    char *got = json_dumps(out, JSON_SORT_KEYS | JSON_INDENT(2));
    if (update) {
      struct tc_err werr;
      tc_write_file_atomic(epath, got, strlen(got), 0644, &werr);
    } else {
      json_t *want = json_load_file(epath, 0, NULL);
      TC_CHECK(want != NULL);
      if (want && !json_equal(want, out)) {
        fprintf(stderr, "  %s: output differs from %s:\n%s\n", name, epath, got);
        TC_CHECK(false);
      }
      json_decref(want);
    }
    free(got);
    json_decref(out);
    tc_policy_result_free(res);
    tc_policy_free(p);
    free(text);
    free(name);
    free(ppath);
    free(epath);
  }
  closedir(d);
  TC_CHECK(cases >= 4);
  for (size_t i = 0; i < nn; i++) {
    free((void *)ns[i].tags);
    free((void *)ns[i].announced);
    free((void *)ns[i].approved);
  }
  json_decref(tj);
}
