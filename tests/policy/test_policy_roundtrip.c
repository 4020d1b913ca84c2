/* Golden round trip: every policy in the Tailscale captures that parses is
 * printed in canonical form, parsed again and printed again; the two prints
 * must be identical and both parses must compile to the same filters and
 * SSH policies for the capture's tailnet. */
#include <dirent.h>
#include <string.h>

#include "base/base.h"
#include "policy/policy.h"
#include "tc_test.h"

static const char **strv(json_t *a, size_t *n)
{
  *n = json_array_size(a);
  const char **v = calloc(*n + 1, sizeof(char *));
  for (size_t i = 0; i < *n; i++)
    v[i] = json_string_value(json_array_get(a, i));
  return v;
}

static char *compile_dump(const struct tc_policy *p, const struct tc_policy_topo *t)
{
  struct tc_policy_result *r;
  struct tc_policy_err err;
  if (tc_policy_compile(p, t, &r, &err))
    return tc_xstrdup("compile failed");
  json_t *all = json_array();
  for (size_t i = 0; i < r->nnodes; i++) {
    json_array_append(all, r->nodes[i].packet_filter);
    json_array_append(all, r->nodes[i].ssh_policy ? r->nodes[i].ssh_policy : json_null());
    json_array_append(all, r->nodes[i].cap_map);
  }
  char *s = json_dumps(all, JSON_COMPACT | JSON_SORT_KEYS);
  json_decref(all);
  tc_policy_result_free(r);
  return s;
}

TC_TEST(print_parse_round_trip_over_captures)
{
  char *root = tc_test_shared_path("testdata/tailscale-policy-captures");
  DIR *d = opendir(root);
  TC_REQUIRE(d != NULL);
  struct dirent *cat;
  int parsed = 0, total = 0;
  while ((cat = readdir(d))) {
    if (cat->d_name[0] == '.')
      continue;
    char *cdir = tc_xasprintf("%s/%s", root, cat->d_name);
    DIR *cd = opendir(cdir);
    struct dirent *f;
    while (cd && (f = readdir(cd))) {
      size_t l = strlen(f->d_name);
      if (l < 6 || strcmp(f->d_name + l - 5, ".json"))
        continue;
      char *path = tc_xasprintf("%s/%s", cdir, f->d_name);
      json_t *c = json_load_file(path, 0, NULL);
      free(path);
      if (!c)
        continue;
      total++;
      json_t *pj = json_object_get(c, "policy");
      char *text = json_is_string(pj) ? tc_xstrdup(json_string_value(pj)) : json_dumps(pj, JSON_COMPACT);
      struct tc_policy *p1 = NULL, *p2 = NULL;
      struct tc_policy_err err;
      if (tc_policy_parse(text, strlen(text), &p1, &err) == 0) {
        parsed++;
        struct tc_buf b1 = TC_BUF_INIT, b2 = TC_BUF_INIT;
        tc_policy_print(p1, &b1);
        int rc = tc_policy_parse(b1.data, b1.len, &p2, &err);
        TC_CHECK_INT(rc, 0);
        if (!rc) {
          tc_policy_print(p2, &b2);
          TC_CHECK_STR(b1.data, b2.data);
          /* Same meaning, not just same text. */
          json_t *topo = json_object_get(c, "topology");
          json_t *users = json_object_get(topo, "users"), *nodes = json_object_get(topo, "nodes");
          struct tc_policy_user *us = calloc(json_array_size(users) + 1, sizeof(*us));
          struct tc_policy_node *ns = calloc(json_object_size(nodes) + 1, sizeof(*ns));
          size_t i;
          json_t *u;
          json_array_foreach(users, i, u) {
            us[i].id = json_integer_value(json_object_get(u, "id"));
            us[i].name = json_string_value(json_object_get(u, "name"));
            us[i].email = json_string_value(json_object_get(u, "email"));
          }
          const char *name;
          json_t *n;
          size_t k = 0;
          json_object_foreach(nodes, name, n) {
            ns[k].id = (int64_t)k + 1;
            ns[k].hostname = name;
            ns[k].tags = strv(json_object_get(n, "tags"), &ns[k].ntags);
            ns[k].ipv4 = json_string_value(json_object_get(n, "ipv4"));
            ns[k].ipv6 = json_string_value(json_object_get(n, "ipv6"));
            ns[k].announced = strv(json_object_get(n, "routable_ips"), &ns[k].nannounced);
            ns[k].approved = strv(json_object_get(n, "approved_routes"), &ns[k].napproved);
            ns[k].user_id = ns[k].ntags ? 0 : 1;
            k++;
          }
          struct tc_policy_topo t = {us, json_array_size(users), ns, k, NULL};
          char *d1 = compile_dump(p1, &t), *d2 = compile_dump(p2, &t);
          TC_CHECK(!strcmp(d1, d2));
          free(d1);
          free(d2);
          for (size_t j = 0; j < k; j++) {
            free((void *)ns[j].tags);
            free((void *)ns[j].announced);
            free((void *)ns[j].approved);
          }
          free(ns);
          free(us);
        }
        tc_buf_free(&b1);
        tc_buf_free(&b2);
      }
      tc_policy_free(p1);
      tc_policy_free(p2);
      free(text);
      json_decref(c);
    }
    if (cd)
      closedir(cd);
    free(cdir);
  }
  closedir(d);
  free(root);
  fprintf(stderr, "  round-tripped %d of %d capture policies (the rest are invalid on purpose)\n", parsed, total);
  TC_CHECK(parsed > 500);
}
