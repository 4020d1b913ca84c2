/* test_model_alloc: the model's pure parts without a database — IP pools
 * (sequential order, random uniqueness, exhaustion, reuse, reserved
 * addresses), prefix canonicalisation, hostname sanitising and unique
 * names, user name and tag rules, key tokens. */
#include <arpa/inet.h>

#include "base/base.h"
#include "model/model_int.h"
#include "tc_test.h"

/* A naive reference "in use" set: a list of addresses. */
struct used {
  uint8_t a[4096][16];
  size_t n;
  size_t len;
};

static bool used_has(void *ctx, const uint8_t *addr, size_t len) {
  struct used *u = ctx;
  for (size_t i = 0; i < u->n; i++)
    if (!memcmp(u->a[i], addr, len)) return true;
  return false;
}

static void used_add(struct used *u, const uint8_t *addr, size_t len) {
  memcpy(u->a[u->n++], addr, len);
}

static void used_del(struct used *u, const uint8_t *addr, size_t len) {
  for (size_t i = 0; i < u->n; i++)
    if (!memcmp(u->a[i], addr, len)) {
      memcpy(u->a[i], u->a[--u->n], 16);
      return;
    }
}

static const char *ip4s(const uint8_t *a, char buf[INET6_ADDRSTRLEN]) {
  return inet_ntop(AF_INET, a, buf, INET6_ADDRSTRLEN);
}
static const char *ip6s(const uint8_t *a, char buf[INET6_ADDRSTRLEN]) {
  return inet_ntop(AF_INET6, a, buf, INET6_ADDRSTRLEN);
}

TC_TEST(pool_defaults_and_sequential_order) {
  struct tc_ippool p4, p6;
  struct tc_err err = {0};
  TC_REQUIRE(tc_ippool_init(&p4, 4, NULL, &err) == 0);
  TC_REQUIRE(tc_ippool_init(&p6, 6, NULL, &err) == 0);
  TC_CHECK_STR(p4.text, "100.64.0.0/10");
  TC_CHECK_STR(p6.text, "fd7a:115c:a1e0::/48");
  static struct used u;
  u.n = 0;
  uint8_t a[16];
  char buf[INET6_ADDRSTRLEN];
  const char *want[] = {"100.64.0.1", "100.64.0.2", "100.64.0.3"};
  for (int i = 0; i < 3; i++) {
    TC_REQUIRE(tc_ippool_next(&p4, TC_MODEL_ALLOC_SEQUENTIAL, used_has, &u, a, &err) == 0);
    TC_CHECK_STR(ip4s(a, buf), want[i]);
    used_add(&u, a, 4);
  }
  u.n = 0;
  TC_REQUIRE(tc_ippool_next(&p6, TC_MODEL_ALLOC_SEQUENTIAL, used_has, &u, a, &err) == 0);
  TC_CHECK_STR(ip6s(a, buf), "fd7a:115c:a1e0::1");
}

TC_TEST(pool_exhaustion_reuse_and_subset) {
  struct tc_ippool p;
  struct tc_err err = {0};
  /* A /30 inside the CGNAT range: .0 is the network address, leaving 3. */
  TC_REQUIRE(tc_ippool_init(&p, 4, "100.64.7.0/30", &err) == 0);
  static struct used u;
  u.n = 0;
  uint8_t a[16], got[3][4];
  char buf[INET6_ADDRSTRLEN];
  for (int i = 0; i < 3; i++) {
    TC_REQUIRE(tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, used_has, &u, a, &err) == 0);
    memcpy(got[i], a, 4);
    used_add(&u, a, 4);
  }
  TC_CHECK_STR(ip4s(got[0], buf), "100.64.7.1");
  TC_CHECK_STR(ip4s(got[2], buf), "100.64.7.3");
  int rc = tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, used_has, &u, a, &err);
  TC_CHECK_INT(rc, TC_EINTERNAL);
  TC_CHECK(strstr(err.msg, "no free IPv4 address") != NULL);
  TC_CHECK(strstr(err.msg, "100.64.7.0/30") != NULL);
  /* Freeing the middle one makes exactly that one available again. */
  used_del(&u, got[1], 4);
  TC_REQUIRE(tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, used_has, &u, a, &err) == 0);
  TC_CHECK_STR(ip4s(a, buf), "100.64.7.2");
  used_add(&u, a, 4);
  TC_CHECK_INT(tc_ippool_next(&p, TC_MODEL_ALLOC_RANDOM, used_has, &u, a, &err), TC_EINTERNAL);
  /* Random also finds the single hole. */
  used_del(&u, got[0], 4);
  TC_REQUIRE(tc_ippool_next(&p, TC_MODEL_ALLOC_RANDOM, used_has, &u, a, &err) == 0);
  TC_CHECK_STR(ip4s(a, buf), "100.64.7.1");
}

TC_TEST(pool_random_never_duplicates) {
  struct tc_ippool p;
  struct tc_err err = {0};
  /* 256 addresses, 255 usable: random must fill every one, no duplicates. */
  TC_REQUIRE(tc_ippool_init(&p, 4, "100.64.9.0/24", &err) == 0);
  static struct used u;
  u.n = 0;
  uint8_t a[16];
  for (int i = 0; i < 255; i++) {
    TC_REQUIRE(tc_ippool_next(&p, TC_MODEL_ALLOC_RANDOM, used_has, &u, a, &err) == 0);
    TC_CHECK(!used_has(&u, a, 4));
    TC_CHECK(a[3] != 0);
    used_add(&u, a, 4);
  }
  TC_CHECK_INT(tc_ippool_next(&p, TC_MODEL_ALLOC_RANDOM, used_has, &u, a, &err), TC_EINTERNAL);
  /* v6 random: distinct and inside the prefix. */
  struct tc_ippool p6;
  TC_REQUIRE(tc_ippool_init(&p6, 6, NULL, &err) == 0);
  u.n = 0;
  for (int i = 0; i < 200; i++) {
    TC_REQUIRE(tc_ippool_next(&p6, TC_MODEL_ALLOC_RANDOM, used_has, &u, a, &err) == 0);
    TC_CHECK(!used_has(&u, a, 16));
    TC_CHECK(tc_ippool_contains(&p6, a));
    used_add(&u, a, 16);
  }
}

TC_TEST(pool_skips_reserved) {
  struct tc_ippool p;
  struct tc_err err = {0};
  char buf[INET6_ADDRSTRLEN];
  uint8_t a[16];
  /* 100.100.100.100 in the middle of a tiny pool is skipped. */
  TC_REQUIRE(tc_ippool_init(&p, 4, "100.100.100.100/31", &err) == 0);
  TC_REQUIRE(tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, NULL, NULL, a, &err) == 0);
  TC_CHECK_STR(ip4s(a, buf), "100.100.100.101");
  TC_REQUIRE(tc_ippool_init(&p, 4, "100.100.100.96/29", &err) == 0);
  static struct used u;
  u.n = 0;
  int n = 0;
  while (tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, used_has, &u, a, &err) == 0) {
    TC_CHECK(strcmp(ip4s(a, buf), "100.100.100.100") != 0);
    TC_CHECK(strcmp(ip4s(a, buf), "100.100.100.96") != 0);
    used_add(&u, a, 4);
    n++;
  }
  TC_CHECK_INT(n, 6); /* 8 minus network minus quad-100 */
  /* ChromeOS range 100.115.92.0/23: a pool inside it yields nothing. */
  TC_REQUIRE(tc_ippool_init(&p, 4, "100.115.92.0/24", &err) == 0);
  TC_CHECK_INT(tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, NULL, NULL, a, &err), TC_EINTERNAL);
  TC_REQUIRE(tc_ippool_init(&p, 4, "100.115.92.0/22", &err) == 0);
  TC_REQUIRE(tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, NULL, NULL, a, &err) == 0);
  TC_CHECK_STR(ip4s(a, buf), "100.115.94.0");
  /* fd7a:115c:a1e0::53 is the MagicDNS resolver. */
  TC_REQUIRE(tc_ippool_init(&p, 6, "fd7a:115c:a1e0::50/126", &err) == 0);
  u.n = 0;
  n = 0;
  while (tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, used_has, &u, a, &err) == 0) {
    TC_CHECK(strcmp(ip6s(a, buf), "fd7a:115c:a1e0::53") != 0);
    used_add(&u, a, 16);
    n++;
  }
  TC_CHECK_INT(n, 2);
  uint8_t q[4] = {100, 100, 100, 100};
  TC_CHECK(tc_ip_is_reserved(4, q));
}

TC_TEST(pool_note_used_continues_after_highest) {
  struct tc_ippool p;
  struct tc_err err = {0};
  TC_REQUIRE(tc_ippool_init(&p, 4, NULL, &err) == 0);
  uint8_t hi[4] = {100, 64, 3, 7};
  tc_ippool_note_used(&p, hi);
  uint8_t a[16];
  char buf[INET6_ADDRSTRLEN];
  TC_REQUIRE(tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, NULL, NULL, a, &err) == 0);
  TC_CHECK_STR(ip4s(a, buf), "100.64.3.8");
}

TC_TEST(pool_bad_config) {
  struct tc_ippool p;
  struct tc_err err = {0};
  TC_CHECK_INT(tc_ippool_init(&p, 4, "fd7a:115c:a1e0::/48", &err), TC_EINVAL);
  TC_CHECK_INT(tc_ippool_init(&p, 4, "100.64.0.0", &err), TC_EINVAL);
  TC_CHECK_INT(tc_ippool_init(&p, 4, "100.64.0.0/33", &err), TC_EINVAL);
  TC_CHECK_INT(tc_ippool_init(&p, 4, "100.64.0.0/32", &err), TC_EINVAL);
  TC_CHECK_INT(tc_ippool_init(&p, 6, "garbage/12", &err), TC_EINVAL);
  TC_CHECK_INT(tc_ippool_init(&p, 4, "", &err), 0);
  TC_CHECK(!p.enabled);
  uint8_t a[16];
  TC_CHECK_INT(tc_ippool_next(&p, TC_MODEL_ALLOC_SEQUENTIAL, NULL, NULL, a, &err), TC_EINVAL);
}

TC_TEST(prefix_canon) {
  char out[64];
  struct tc_err err = {0};
  TC_REQUIRE(tc_prefix_canon("10.0.0.0/8", out, &err) == 0);
  TC_CHECK_STR(out, "10.0.0.0/8");
  TC_REQUIRE(tc_prefix_canon("FD00:0:0::/64", out, &err) == 0);
  TC_CHECK_STR(out, "fd00::/64");
  TC_REQUIRE(tc_prefix_canon("0.0.0.0/0", out, &err) == 0);
  TC_CHECK_STR(out, "0.0.0.0/0");
  TC_CHECK_INT(tc_prefix_canon("10.0.0.1/8", out, &err), TC_EINVAL);
  TC_CHECK_INT(tc_prefix_canon("10.0.0.0/08", out, &err), TC_EINVAL);
  TC_CHECK_INT(tc_prefix_canon("10.0.0.0/", out, &err), TC_EINVAL);
  TC_CHECK_INT(tc_prefix_canon("/8", out, &err), TC_EINVAL);
  TC_CHECK_INT(tc_prefix_canon(NULL, out, &err), TC_EINVAL);
}

static bool taken_list(void *ctx, const char *name) {
  for (const char *const *p = ctx; *p; p++)
    if (!strcmp(*p, name)) return true;
  return false;
}

TC_TEST(hostname_sanitising) {
  struct {
    const char *in, *want;
  } cases[] = {
      {"laptop", "laptop"},
      {"My-Laptop", "my-laptop"},
      {"Bob's MacBook Pro", "bob-s-macbook-pro"},
      {"--weird__name..", "weird-name"},
      {"host.example.com", "host-example-com"},
      {"", "node"},
      {NULL, "node"},
      {"!!!", "node"},
      {"ünïcode", "n-code"},
      {"a-----b", "a-b"},
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(cases); i++) {
    char *s = tc_model_sanitize_hostname(cases[i].in);
    TC_CHECK_STR(s, cases[i].want);
    TC_CHECK_INT(tc_model_validate_given_name(s, NULL), 0);
    free(s);
  }
  char longname[200];
  memset(longname, 'x', sizeof longname - 1);
  longname[sizeof longname - 1] = 0;
  char *s = tc_model_sanitize_hostname(longname);
  TC_CHECK_INT(strlen(s), 63);
  free(s);
  /* A '-' at position 63 must not survive truncation. */
  char edge[100];
  memset(edge, 'a', 62);
  strcpy(edge + 62, " b");
  s = tc_model_sanitize_hostname(edge);
  TC_CHECK_INT(strlen(s), 62);
  TC_CHECK_INT(tc_model_validate_given_name(s, NULL), 0);
  free(s);
}

TC_TEST(unique_names) {
  const char *none[] = {NULL};
  char *s = tc_model_unique_name("laptop", taken_list, (void *)none);
  TC_CHECK_STR(s, "laptop");
  free(s);
  const char *t1[] = {"laptop", NULL};
  s = tc_model_unique_name("Laptop", taken_list, (void *)t1);
  TC_CHECK_STR(s, "laptop-1");
  free(s);
  const char *t2[] = {"laptop", "laptop-1", "laptop-2", NULL};
  s = tc_model_unique_name("laptop", taken_list, (void *)t2);
  TC_CHECK_STR(s, "laptop-3");
  free(s);
  char longname[80];
  memset(longname, 'y', 63);
  longname[63] = 0;
  const char *t3[] = {longname, NULL};
  s = tc_model_unique_name(longname, taken_list, (void *)t3);
  TC_CHECK_INT(strlen(s), 63);
  TC_CHECK(!strcmp(s + 61, "-1"));
  TC_CHECK_INT(tc_model_validate_given_name(s, NULL), 0);
  free(s);
}

TC_TEST(given_name_validation) {
  struct tc_err err = {0};
  TC_CHECK_INT(tc_model_validate_given_name("ok-name-1", &err), 0);
  TC_CHECK_INT(tc_model_validate_given_name("Upper", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "DNS-safe") != NULL);
  TC_CHECK_INT(tc_model_validate_given_name("-lead", &err), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_given_name("trail-", &err), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_given_name("", &err), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_given_name("a.b", &err), TC_EINVAL);
  char l[70];
  memset(l, 'a', 64);
  l[64] = 0;
  TC_CHECK_INT(tc_model_validate_given_name(l, &err), TC_EINVAL);
}

TC_TEST(username_rules) {
  struct tc_err err = {0};
  TC_CHECK_INT(tc_model_validate_username("alice", &err), 0);
  TC_CHECK_INT(tc_model_validate_username("alice@example.com", &err), 0);
  TC_CHECK_INT(tc_model_validate_username("Bob_Smith.2-x", &err), 0);
  TC_CHECK_INT(tc_model_validate_username("jöran", &err), 0);
  TC_CHECK_INT(tc_model_validate_username("a", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "at least 2") != NULL);
  TC_CHECK_INT(tc_model_validate_username("1abc", &err), TC_EINVAL);
  TC_CHECK(strstr(err.msg, "start with a letter") != NULL);
  TC_CHECK_INT(tc_model_validate_username("a@b@c", &err), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_username("bad name", &err), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_username("bad\nname", &err), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_username(NULL, &err), TC_EINVAL);
}

TC_TEST(tag_rules) {
  TC_CHECK_INT(tc_model_validate_tag("tag:server", NULL), 0);
  TC_CHECK_INT(tc_model_validate_tag("tag:web-1", NULL), 0);
  TC_CHECK_INT(tc_model_validate_tag("server", NULL), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_tag("tag:", NULL), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_tag("tag:1x", NULL), TC_EINVAL);
  TC_CHECK_INT(tc_model_validate_tag("tag:a b", NULL), TC_EINVAL);
}

TC_TEST(tokens) {
  char prefix[13], p2[13];
  uint8_t h[32], h2[32];
  char *tok = tc_token_new("hskey-auth-", prefix, h);
  TC_CHECK_INT(strlen(tok), strlen("hskey-auth-") + 12 + 1 + 64);
  TC_CHECK(tc_str_has_prefix(tok, "hskey-auth-"));
  TC_CHECK(!memcmp(tok + 11, prefix, 12));
  TC_REQUIRE(tc_token_parse(tok, strlen(tok), "hskey-auth-", p2, h2) == 0);
  TC_CHECK_STR(p2, prefix);
  TC_CHECK(!memcmp(h, h2, 32));
  /* Wrong kind, truncation, a flipped secret character. */
  TC_CHECK_INT(tc_token_parse(tok, strlen(tok), "hskey-api-", p2, h2), TC_EINVAL);
  TC_CHECK_INT(tc_token_parse(tok, strlen(tok) - 1, "hskey-auth-", p2, h2), TC_EINVAL);
  char *t2 = tc_xstrdup(tok);
  t2[strlen(t2) - 1] = t2[strlen(t2) - 1] == 'a' ? 'b' : 'a';
  TC_REQUIRE(tc_token_parse(t2, strlen(t2), "hskey-auth-", p2, h2) == 0);
  TC_CHECK(memcmp(h, h2, 32) != 0);
  t2[11] = '-';
  TC_CHECK_INT(tc_token_parse(t2, strlen(t2), "hskey-auth-", p2, h2), TC_EINVAL);
  free(t2);
  TC_CHECK_INT(tc_token_parse(NULL, 0, "hskey-auth-", p2, h2), TC_EINVAL);
  char *a = tc_token_new("hskey-api-", prefix, h);
  TC_CHECK_INT(strlen(a), strlen("hskey-api-") + 12 + 1 + 64);
  free(a);
  free(tok);
}

/* ---- node tables: chunked ownership under random edits -------------------- */
static struct tc_node *tnode(int64_t id, int gen) {
  struct tc_node z = {0};
  struct tc_node *n = tc_box_node(&z);
  n->id = id;
  for (int i = 0; i < TC_KEY_LEN; i++) {
    n->node_key[i] = (uint8_t)(id * 7 + i + gen * 13);
    n->machine_key[i] = (uint8_t)(id * 11 + i);
  }
  n->has_ipv4 = true;
  uint32_t a = 0x64400000u + (uint32_t)id;
  n->ipv4[0] = (uint8_t)(a >> 24), n->ipv4[1] = (uint8_t)(a >> 16), n->ipv4[2] = (uint8_t)(a >> 8),
  n->ipv4[3] = (uint8_t)a;
  n->given_name = tc_xasprintf("n%lld-%d", (long long)id, gen);
  return n;
}

/* t holds exactly the ids present[1..max] with generation gen[id], sorted;
 * its chunks own exactly those records, in order; the indexes find them. */
static void check_tab(const struct tc_ntab *t, const bool *present, const int *gen, int max) {
  size_t want = 0;
  for (int i = 1; i <= max; i++) want += present[i];
  TC_REQUIRE(t->n == want);
  size_t k = 0;
  for (size_t c = 0; c < t->nchunks; c++) {
    TC_CHECK(t->chunks[c]->n > 0);
    for (size_t j = 0; j < t->chunks[c]->n; j++, k++) {
      TC_REQUIRE(k < t->n);
      TC_CHECK(t->chunks[c]->r[j] == t->v[k]); /* same records, same order */
    }
  }
  TC_CHECK_INT(k, t->n);
  k = 0;
  for (int i = 1; i <= max; i++) {
    if (!present[i]) continue;
    const struct tc_node *n = t->v[k++];
    TC_CHECK_INT(n->id, i);
    char name[32];
    snprintf(name, sizeof name, "n%d-%d", i, gen[i]);
    TC_CHECK_STR(n->given_name, name);
  }
}

static bool key_name(const void *r, const void **k, size_t *len) {
  const struct tc_node *n = r;
  *k = n->given_name;
  *len = strlen(n->given_name);
  return true;
}

TC_TEST(node_table_chunks_random_edits) {
  enum { MAX = 600 };
  static bool present[MAX + 1];
  static int gen[MAX + 1];
  memset(present, 0, sizeof present);
  memset(gen, 0, sizeof gen);
  /* start from a built table of ids 1..150 */
  struct tc_node **v = tc_xmalloc(151 * sizeof *v);
  for (int i = 1; i <= 150; i++) {
    v[i - 1] = tnode(i, 0);
    present[i] = true;
  }
  struct tc_ntab *t = tc_ntab_new(v, 150);
  struct tc_ntab *keep = tc_box_ref(t); /* an old snapshot's table must stay intact */
  check_tab(t, present, gen, MAX);
  uint64_t x = 88172645463325252ull;
  int next_id = 151;
  for (int step = 0; step < 3000; step++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    int op = (int)(x % 10);
    int id = (int)((x >> 8) % (uint64_t)(next_id - 1)) + 1;
    struct tc_ntab *nt;
    if (op < 3 && next_id <= MAX) { /* append a new largest id */
      id = next_id++;
      nt = tc_ntab_edit(t, tnode(id, 0), 0);
      present[id] = true;
    } else if (op < 6) { /* replace or re-insert (middle insert when absent) */
      gen[id]++;
      nt = tc_ntab_edit(t, tnode(id, gen[id]), 0);
      present[id] = true;
    } else { /* remove (possibly absent) */
      nt = tc_ntab_edit(t, NULL, id);
      present[id] = false;
    }
    tc_box_unref(t);
    t = nt;
    if (step % 97 == 0) check_tab(t, present, gen, MAX);
  }
  check_tab(t, present, gen, MAX);
  /* lookups through the rebuilt and shared indexes */
  for (size_t i = 0; i < t->n; i++) {
    const struct tc_node *n = t->v[i];
    TC_CHECK(tc_hidx_find(&t->by_name, (const void *const *)t->v, key_name, n->given_name, strlen(n->given_name)) ==
             (long)i);
  }
  /* the table kept from the start still has its 150 records, unchanged */
  TC_REQUIRE(keep->n == 150);
  for (int i = 0; i < 150; i++) {
    char name[32];
    snprintf(name, sizeof name, "n%d-0", i + 1);
    TC_CHECK_STR(keep->v[i]->given_name, name);
  }
  tc_box_unref(keep);
  tc_box_unref(t);
}

/* Inserts below the smallest id all land in the first chunk, which splits
 * instead of growing without bound; removing whole chunks drops them. */
TC_TEST(node_table_chunks_split_and_drop) {
  enum { MAX = 400 };
  static bool present[MAX + 1];
  static int gen[MAX + 1];
  memset(present, 0, sizeof present);
  memset(gen, 0, sizeof gen);
  struct tc_node **v = tc_xmalloc(65 * sizeof *v);
  for (int i = 0; i < 64; i++) {
    v[i] = tnode(300 + i, 0);
    present[300 + i] = true;
  }
  struct tc_ntab *t = tc_ntab_new(v, 64);
  for (int id = 299; id >= 1; id--) {
    struct tc_ntab *nt = tc_ntab_edit(t, tnode(id, 0), 0);
    present[id] = true;
    tc_box_unref(t);
    t = nt;
  }
  check_tab(t, present, gen, MAX);
  size_t biggest = 0;
  for (size_t c = 0; c < t->nchunks; c++) biggest = TC_MAX(biggest, t->chunks[c]->n);
  TC_CHECK(biggest <= 2 * 64);
  TC_CHECK(t->nchunks >= 363 / 128);
  for (int id = 1; id <= 363; id += 1) {
    if (id % 5 == 0) continue;
    struct tc_ntab *nt = tc_ntab_edit(t, NULL, id);
    present[id] = false;
    tc_box_unref(t);
    t = nt;
  }
  check_tab(t, present, gen, MAX);
  for (int id = 5; id <= 363; id += 5) {
    struct tc_ntab *nt = tc_ntab_edit(t, NULL, id);
    present[id] = false;
    tc_box_unref(t);
    t = nt;
  }
  TC_CHECK_INT(t->n, 0);
  TC_CHECK_INT(t->nchunks, 0);
  struct tc_ntab *nt = tc_ntab_edit(t, tnode(7, 0), 0); /* and grows again from empty */
  tc_box_unref(t);
  t = nt;
  present[7] = true;
  check_tab(t, present, gen, MAX);
  tc_box_unref(t);
}

/* The router count follows edits (it lets publishing skip the primary-route
 * scan when no node can be a router). */
TC_TEST(node_table_router_count) {
  struct tc_node **v = tc_xmalloc(4 * sizeof *v);
  for (int i = 0; i < 3; i++) v[i] = tnode(i + 1, 0);
  tc_strv_push(&v[1]->announced_routes, "10.0.0.0/8");
  tc_strv_push(&v[1]->approved_routes, "10.0.0.0/8");
  tc_strv_push(&v[2]->announced_routes, "10.1.0.0/16"); /* announced only */
  struct tc_ntab *t = tc_ntab_new(v, 3);
  TC_CHECK_INT(t->n_routers, 1);
  struct tc_node *r3 = tnode(3, 1);
  tc_strv_push(&r3->announced_routes, "10.1.0.0/16");
  tc_strv_push(&r3->approved_routes, "10.1.0.0/16");
  struct tc_ntab *t2 = tc_ntab_edit(t, r3, 0);
  TC_CHECK_INT(t2->n_routers, 2);
  struct tc_ntab *t3 = tc_ntab_edit(t2, NULL, 2);
  TC_CHECK_INT(t3->n_routers, 1);
  struct tc_ntab *t4 = tc_ntab_edit(t3, tnode(3, 2), 0); /* no longer a router */
  TC_CHECK_INT(t4->n_routers, 0);
  struct tc_ntab *t5 = tc_ntab_edit(t4, NULL, 99); /* absent */
  TC_CHECK_INT(t5->n_routers, 0);
  TC_CHECK_INT(t->n_routers, 1); /* old tables unchanged */
  tc_box_unref(t);
  tc_box_unref(t2);
  tc_box_unref(t3);
  tc_box_unref(t4);
  tc_box_unref(t5);
}
