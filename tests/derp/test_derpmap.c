/* test_derpmap: DERPMap parsing (Headscale's example YAML files, JSON in any
 * key case), canonical output, Headscale's merge order, the embedded
 * region, URL sources served by a tiny local HTTP server (refresh, change
 * callback, last good map kept on failure), and the plain DERP endpoints. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/base.h"
#include "derp/derp.h"
#include "tc_test.h"

__attribute__((constructor)) static void ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

static const char *k_example_900 =
    "{\"Regions\":{\"900\":{\"RegionID\":900,\"RegionCode\":\"custom\",\"RegionName\":\"My Region\",\"Nodes\":"
    "[{\"Name\":\"900a\",\"RegionID\":900,\"HostName\":\"myderp.example.com\",\"IPv4\":\"198.51.100.1\","
    "\"IPv6\":\"2001:db8::1\"}]}}}";

static char *dump_of(json_t *m) {
  json_t *one[1] = {m};
  json_t *mm = tc_derpmap_merge(one, 1);
  char *s = tc_derpmap_dump(mm);
  json_decref(mm);
  return s;
}

TC_TEST(headscale_example_files) {
  const char *files[] = {"derp-example-v0.26.1.yaml", "derp-example-v0.27.1.yaml", "derp-example-v0.28.0.yaml",
                         "derp-example-v0.29.2.yaml"};
  for (size_t i = 0; i < TC_ARRAY_LEN(files); i++) {
    char rel[128];
    snprintf(rel, sizeof rel, "testdata/headscale-config/%s", files[i]);
    char *path = tc_test_shared_path(rel);
    char *text;
    size_t len;
    struct tc_err err = {0};
    TC_REQUIRE(tc_read_file(path, 1 << 20, &text, &len, &err) == 0);
    json_t *m = NULL;
    TC_CHECK_INT(tc_derpmap_parse(text, len, true, &m, &err), 0);
    TC_REQUIRE(m);
    json_t *regs = json_object_get(m, "Regions");
    json_t *r900 = json_object_get(regs, "900");
    TC_REQUIRE(json_is_object(r900));
    TC_CHECK_INT(json_integer_value(json_object_get(r900, "RegionID")), 900);
    TC_CHECK_STR(json_string_value(json_object_get(r900, "RegionCode")), "custom");
    json_t *n0 = json_array_get(json_object_get(r900, "Nodes"), 0);
    TC_CHECK_STR(json_string_value(json_object_get(n0, "Name")), "900a");
    TC_CHECK_INT(json_integer_value(json_object_get(n0, "STUNPort")), 0);
    TC_CHECK(json_is_false(json_object_get(n0, "STUNOnly")));
    if (i == 3) {
      /* the newest example disables region 1 with null */
      TC_CHECK(json_is_null(json_object_get(regs, "1")));
      char *s = dump_of(m);
      TC_CHECK_STR(s, k_example_900);
      free(s);
    } else if (i == 0) {
      TC_CHECK_STR(json_string_value(json_object_get(n0, "IPv6")), "2604:a880:400:d1::828:b001");
    }
    json_decref(m);
    free(text);
    free(path);
  }
}

TC_TEST(json_any_case_and_canonical_dump) {
  const char *js =
      "{\"regions\":{\"2\":{\"regionid\":2,\"regioncode\":\"b\",\"REGIONNAME\":\"B <&>\",\"Latitude\":40.7,"
      "\"Longitude\":-74,\"Avoid\":true,\"NoMeasureNoHome\":false,\"nodes\":[{\"name\":\"2a\",\"hostname\":"
      "\"b.example\",\"stunport\":-1,\"derpport\":8443,\"canport80\":true,\"insecurefortests\":true,"
      "\"CertName\":\"sha256-raw:00\",\"unknown\":{\"x\":1}},null]},"
      "\"1\":{\"RegionID\":1,\"RegionCode\":\"a\",\"RegionName\":\"A\",\"Nodes\":null}},"
      "\"OmitDefaultRegions\":true,\"HomeParams\":{\"RegionScore\":{\"1\":0.5}}}";
  json_t *m = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_derpmap_parse(js, strlen(js), false, &m, &err) == 0);
  char *s = dump_of(m);
  TC_CHECK_STR(s,
               "{\"Regions\":{\"1\":{\"RegionID\":1,\"RegionCode\":\"a\",\"RegionName\":\"A\",\"Nodes\":[]},"
               "\"2\":{\"RegionID\":2,\"RegionCode\":\"b\",\"RegionName\":\"B \\u003c\\u0026\\u003e\","
               "\"Latitude\":40.7,\"Longitude\":-74,\"Avoid\":true,\"Nodes\":[{\"Name\":\"2a\",\"RegionID\":2,"
               "\"HostName\":\"b.example\",\"CertName\":\"sha256-raw:00\",\"STUNPort\":-1,\"DERPPort\":8443,"
               "\"InsecureForTests\":true,\"CanPort80\":true}]}}}");
  /* the dump is valid JSON and never contains null */
  json_t *back = json_loads(s, 0, NULL);
  TC_CHECK(back != NULL);
  TC_CHECK(strstr(s, "null") == NULL);
  json_decref(back);
  free(s);
  json_decref(m);
}

TC_TEST(bad_maps_are_refused) {
  const char *bad_json[] = {
      "",
      "[]",
      "{\"Regions\":[]}",
      "{\"Regions\":{\"abc\":{}}}",
      "{\"Regions\":{\"0\":{}}}",
      "{\"Regions\":{\"-3\":{}}}",
      "{\"Regions\":{\"9007199254740992\":{}}}",
      "{\"Regions\":{\"1\":{\"RegionID\":\"1\"}}}",
      "{\"Regions\":{\"1\":{\"RegionID\":2}}}",
      "{\"Regions\":{\"1\":{\"Nodes\":{}}}}",
      "{\"Regions\":{\"1\":{\"Nodes\":[{\"STUNPort\":\"x\"}]}}}",
      "{\"Regions\":{\"1\":{\"Nodes\":[{\"CanPort80\":1}]}}}",
      "{\"Regions\":{\"1\":{\"Nodes\":[7]}}}",
      "{\"Regions\":{\"1\":5}}",
      "{\"Regions\":{\"1\":{}}",
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(bad_json); i++) {
    json_t *m = NULL;
    struct tc_err err = {0};
    int rc = tc_derpmap_parse(bad_json[i], strlen(bad_json[i]), false, &m, &err);
    if (rc == 0) fprintf(stderr, "  accepted: %s\n", bad_json[i]);
    TC_CHECK(rc != 0 && m == NULL && err.msg[0]);
  }
  const char *bad_yaml[] = {
      "regions: [1, 2]",
      "regions:\n  1:\n    nodes:\n      - stunport: abc\n",
      "regions:\n  1:\n    avoid: maybe\n",
      "regions:\n  x: {}\n",
      "regions: {a: [",
      "- 1\n- 2\n",
  };
  for (size_t i = 0; i < TC_ARRAY_LEN(bad_yaml); i++) {
    json_t *m = NULL;
    struct tc_err err = {0};
    int rc = tc_derpmap_parse(bad_yaml[i], strlen(bad_yaml[i]), true, &m, &err);
    if (rc == 0) fprintf(stderr, "  accepted yaml: %s\n", bad_yaml[i]);
    TC_CHECK(rc != 0 && m == NULL);
  }
  /* an empty YAML document or one without regions is an empty map */
  json_t *m = NULL;
  struct tc_err err = {0};
  TC_CHECK_INT(tc_derpmap_parse("", 0, true, &m, &err), 0);
  char *s = dump_of(m);
  TC_CHECK_STR(s, "{\"Regions\":{}}");
  free(s);
  json_decref(m);
}

TC_TEST(embedded_region) {
  struct tc_derpmap_params p = {.embedded = true, .region_id = 999, .region_code = "headscale",
                                .region_name = "Headscale Embedded DERP", .server_url = "https://hs.example.com",
                                .ipv4 = "198.51.100.1", .ipv6 = "2001:db8::1", .stun_listen_addr = "0.0.0.0:3478"};
  struct tc_err err = {0};
  json_t *r = tc_derpmap_embedded_region(&p, &err);
  TC_REQUIRE(r);
  json_t *m = json_object(), *regs = json_object();
  json_object_set_new(regs, "999", r);
  json_object_set_new(m, "Regions", regs);
  char *s = dump_of(m);
  TC_CHECK_STR(s, "{\"Regions\":{\"999\":{\"RegionID\":999,\"RegionCode\":\"headscale\",\"RegionName\":"
                  "\"Headscale Embedded DERP\",\"Nodes\":[{\"Name\":\"999\",\"RegionID\":999,\"HostName\":"
                  "\"hs.example.com\",\"IPv4\":\"198.51.100.1\",\"IPv6\":\"2001:db8::1\",\"STUNPort\":3478,"
                  "\"DERPPort\":443}]}}}");
  free(s);
  json_decref(m);
  p.server_url = "http://user@[2001:db8::5]:8080/path";
  p.stun_listen_addr = "[::]:3479";
  p.ipv4 = p.ipv6 = NULL;
  r = tc_derpmap_embedded_region(&p, &err);
  TC_REQUIRE(r);
  json_t *n = json_array_get(json_object_get(r, "Nodes"), 0);
  TC_CHECK_STR(json_string_value(json_object_get(n, "HostName")), "2001:db8::5");
  TC_CHECK_INT(json_integer_value(json_object_get(n, "DERPPort")), 8080);
  TC_CHECK_INT(json_integer_value(json_object_get(n, "STUNPort")), 3479);
  json_decref(r);
  p.server_url = "ftp://x";
  TC_CHECK(tc_derpmap_embedded_region(&p, &err) == NULL);
  p.server_url = "https://x:99999";
  TC_CHECK(tc_derpmap_embedded_region(&p, &err) == NULL);
  p.server_url = "https://x";
  p.stun_listen_addr = "nope";
  TC_CHECK(tc_derpmap_embedded_region(&p, &err) == NULL);
  p.stun_listen_addr = NULL;
  p.region_id = 0;
  TC_CHECK(tc_derpmap_embedded_region(&p, &err) == NULL);
}

/* ---- a tiny HTTP server for URL sources ---- */

struct web {
  int lfd, port;
  pthread_t thr;
  pthread_mutex_t mu;
  char *body;
  int status;
  bool stop;
  atomic_int hits;
};

static void *web_thread(void *arg) {
  struct web *w = arg;
  for (;;) {
    pthread_mutex_lock(&w->mu);
    bool stop = w->stop;
    pthread_mutex_unlock(&w->mu);
    if (stop) break;
    struct pollfd pf = {.fd = w->lfd, .events = POLLIN};
    if (poll(&pf, 1, 50) != 1) continue;
    int fd = accept(w->lfd, NULL, NULL);
    if (fd < 0) continue;
    char req[4096];
    size_t n = 0;
    while (n < sizeof req - 1) {
      ssize_t r = read(fd, req + n, sizeof req - 1 - n);
      if (r <= 0) break;
      n += (size_t)r;
      req[n] = 0;
      if (strstr(req, "\r\n\r\n")) break;
    }
    atomic_fetch_add(&w->hits, 1);
    pthread_mutex_lock(&w->mu);
    char *resp = tc_xasprintf("HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                              "Connection: close\r\n\r\n%s",
                              w->status, strlen(w->body), w->body);
    pthread_mutex_unlock(&w->mu);
    size_t off = 0, len = strlen(resp);
    while (off < len) {
      ssize_t r = send(fd, resp + off, len - off, MSG_NOSIGNAL);
      if (r <= 0) break;
      off += (size_t)r;
    }
    free(resp);
    close(fd);
  }
  return NULL;
}

static void web_start(struct web *w) {
  memset(w, 0, sizeof *w);
  pthread_mutex_init(&w->mu, NULL);
  w->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(w->lfd, (struct sockaddr *)&a, sizeof a);
  listen(w->lfd, 16);
  socklen_t al = sizeof a;
  getsockname(w->lfd, (struct sockaddr *)&a, &al);
  w->port = ntohs(a.sin_port);
  w->status = 200;
  w->body = tc_xstrdup("{}");
  pthread_create(&w->thr, NULL, web_thread, w);
}

static void web_set(struct web *w, int status, const char *body) {
  pthread_mutex_lock(&w->mu);
  w->status = status;
  free(w->body);
  w->body = tc_xstrdup(body);
  pthread_mutex_unlock(&w->mu);
}

static void web_stop(struct web *w) {
  pthread_mutex_lock(&w->mu);
  w->stop = true;
  pthread_mutex_unlock(&w->mu);
  pthread_join(w->thr, NULL);
  close(w->lfd);
  free(w->body);
}

static atomic_int g_changes;
static char g_last_json[4096];
static pthread_mutex_t g_last_mu = PTHREAD_MUTEX_INITIALIZER;

static void on_change(void *ctx, const char *json, size_t len) {
  (void)ctx;
  pthread_mutex_lock(&g_last_mu);
  snprintf(g_last_json, sizeof g_last_json, "%.*s", (int)len, json);
  pthread_mutex_unlock(&g_last_mu);
  atomic_fetch_add(&g_changes, 1);
}

static const char *k_url_map_v1 =
    "{\"Regions\":{\"1\":{\"RegionID\":1,\"RegionCode\":\"nyc\",\"RegionName\":\"New York\",\"Nodes\":[{\"Name\":"
    "\"1a\",\"RegionID\":1,\"HostName\":\"derp1.example\"}]},\"2\":{\"RegionID\":2,\"RegionCode\":\"sfo\","
    "\"RegionName\":\"SF\",\"Nodes\":[{\"Name\":\"2a\",\"RegionID\":2,\"HostName\":\"derp2.example\"}]},"
    "\"999\":{\"RegionID\":999,\"RegionCode\":\"shadowed\",\"RegionName\":\"x\",\"Nodes\":[]}}}";
static const char *k_url_map_v2 =
    "{\"Regions\":{\"1\":{\"RegionID\":1,\"RegionCode\":\"nyc\",\"RegionName\":\"New York\",\"Nodes\":[]},"
    "\"3\":{\"RegionID\":3,\"RegionCode\":\"fra\",\"RegionName\":\"Frankfurt\",\"Nodes\":[]}}}";

TC_TEST(url_and_path_sources_merge_refresh_and_keep_last_good) {
  struct web w;
  web_start(&w);
  web_set(&w, 200, k_url_map_v1);
  char *url = tc_xasprintf("http://127.0.0.1:%d/derpmap/default", w.port);
  char *path = tc_test_shared_path("testdata/headscale-config/derp-example-v0.29.2.yaml");
  const char *urls[] = {url};
  const char *paths[] = {path};
  struct tc_derpmap_params p = {.embedded = true, .region_id = 999, .region_code = "headscale",
                                .region_name = "Embedded", .server_url = "https://hs.example.com:8443",
                                .stun_listen_addr = ":3478", .urls = urls, .nurls = 1, .paths = paths,
                                .npaths = 1, .on_change = on_change, .http_timeout_ms = 3000};
  struct tc_derpmap *dm = NULL;
  struct tc_err err = {0};
  atomic_store(&g_changes, 0);
  TC_REQUIRE(tc_derpmap_new(&p, &dm, &err) == 0);
  TC_CHECK_INT(atomic_load(&w.hits), 1);
  char *s = tc_derpmap_json(dm);
  /* region 1 from the URL is removed by the path's "1: null", 900 comes
   * from the path, and the embedded 999 replaces the URL's 999 */
  json_t *j = json_loads(s, 0, NULL);
  json_t *regs = json_object_get(j, "Regions");
  TC_CHECK(json_object_get(regs, "1") == NULL);
  TC_CHECK(json_object_get(regs, "2") != NULL);
  TC_CHECK(json_object_get(regs, "900") != NULL);
  TC_CHECK_STR(json_string_value(json_object_get(json_object_get(regs, "999"), "RegionCode")), "headscale");
  json_t *n999 = json_array_get(json_object_get(json_object_get(regs, "999"), "Nodes"), 0);
  TC_CHECK_INT(json_integer_value(json_object_get(n999, "DERPPort")), 8443);
  TC_CHECK_INT(json_object_size(regs), 3);
  json_decref(j);
  TC_CHECK_INT(atomic_load(&g_changes), 0); /* the first build is not a change */
  TC_CHECK_INT(tc_derpmap_generation(dm), 1);
  json_t *obj = tc_derpmap_get(dm);
  char *again = tc_derpmap_dump(obj);
  TC_CHECK_STR(again, s);
  free(again);
  json_decref(obj);

  /* same content: no change callback */
  TC_CHECK_INT(tc_derpmap_refresh_now(dm, &err), 0);
  TC_CHECK_INT(atomic_load(&g_changes), 0);
  TC_CHECK_INT(atomic_load(&w.hits), 2);

  /* new content: exactly one callback with the new JSON */
  web_set(&w, 200, k_url_map_v2);
  TC_CHECK_INT(tc_derpmap_refresh_now(dm, &err), 0);
  TC_CHECK_INT(atomic_load(&g_changes), 1);
  char *s2 = tc_derpmap_json(dm);
  TC_CHECK(strstr(s2, "\"3\":{\"RegionID\":3") != NULL);
  TC_CHECK(strstr(s2, "\"2\":{") == NULL);
  pthread_mutex_lock(&g_last_mu);
  TC_CHECK_STR(g_last_json, s2);
  pthread_mutex_unlock(&g_last_mu);

  /* the URL fails (500, then garbage): the last good map stays */
  web_set(&w, 500, "oops");
  TC_CHECK(tc_derpmap_refresh_now(dm, &err) != 0);
  TC_CHECK(strstr(err.msg, "500") != NULL);
  web_set(&w, 200, "{not json");
  TC_CHECK(tc_derpmap_refresh_now(dm, &err) != 0);
  char *s3 = tc_derpmap_json(dm);
  TC_CHECK_STR(s3, s2);
  TC_CHECK_INT(atomic_load(&g_changes), 1);
  tc_derpmap_free(dm);

  /* background refresh picks up a change by itself */
  web_set(&w, 200, k_url_map_v1);
  p.auto_update = true;
  p.update_frequency_ms = 100;
  atomic_store(&g_changes, 0);
  TC_REQUIRE(tc_derpmap_new(&p, &dm, &err) == 0);
  web_set(&w, 200, k_url_map_v2);
  for (int i = 0; i < 3000 && atomic_load(&g_changes) == 0; i++) usleep(10000); /* <= 30 s: slow CI */
  TC_CHECK_INT(atomic_load(&g_changes), 1);
  char *s4 = tc_derpmap_json(dm);
  TC_CHECK_STR(s4, s2);
  /* and the server going away entirely keeps the map too */
  web_stop(&w);
  usleep(300000);
  char *s5 = tc_derpmap_json(dm);
  TC_CHECK_STR(s5, s2);
  TC_CHECK_INT(atomic_load(&g_changes), 1);
  tc_derpmap_free(dm);

  /* Headscale refuses to start when a source fails at startup */
  p.auto_update = false;
  p.fail_on_initial_error = true;
  TC_CHECK(tc_derpmap_new(&p, &dm, &err) != 0);
  TC_CHECK(dm == NULL);
  /* ... unless told to be lenient: then the other sources still count */
  p.fail_on_initial_error = false;
  TC_REQUIRE(tc_derpmap_new(&p, &dm, &err) == 0);
  char *s6 = tc_derpmap_json(dm);
  TC_CHECK(strstr(s6, "\"900\"") && strstr(s6, "\"999\""));
  tc_derpmap_free(dm);
  free(s), free(s2), free(s3), free(s4), free(s5), free(s6), free(url), free(path);
}

TC_TEST(path_json_file_and_missing_file) {
  char *dir = tc_test_tmpdir();
  char *jp = tc_xasprintf("%s/map.json", dir);
  struct tc_err err = {0};
  const char *js = "{\"Regions\":{\"901\":{\"RegionCode\":\"w\",\"RegionName\":\"West\",\"Nodes\":[{\"Name\":"
                   "\"901a\",\"HostName\":\"w.example\",\"STUNPort\":3478}]}}}";
  TC_REQUIRE(tc_write_file_atomic(jp, js, strlen(js), 0644, &err) == 0);
  const char *paths[] = {jp};
  struct tc_derpmap_params p = {.paths = paths, .npaths = 1};
  struct tc_derpmap *dm = NULL;
  TC_REQUIRE(tc_derpmap_new(&p, &dm, &err) == 0);
  char *s = tc_derpmap_json(dm);
  TC_CHECK_STR(s, "{\"Regions\":{\"901\":{\"RegionID\":901,\"RegionCode\":\"w\",\"RegionName\":\"West\",\"Nodes\":"
                  "[{\"Name\":\"901a\",\"RegionID\":901,\"HostName\":\"w.example\",\"STUNPort\":3478}]}}}");
  /* the file turning bad keeps the last good copy */
  TC_REQUIRE(tc_write_file_atomic(jp, "{\"Regions\":5}", 13, 0644, &err) == 0);
  TC_CHECK(tc_derpmap_refresh_now(dm, &err) != 0);
  char *s2 = tc_derpmap_json(dm);
  TC_CHECK_STR(s2, s);
  tc_derpmap_free(dm);
  const char *missing[] = {"/nonexistent/derp.yaml"};
  p.paths = missing;
  p.fail_on_initial_error = true;
  TC_CHECK(tc_derpmap_new(&p, &dm, &err) != 0);
  free(s), free(s2), free(jp), free(dir);
}

/* ---- plain endpoints ---- */

static const char *hdr(void *ctx, const char *name) {
  const char **kv = ctx;
  for (; kv && kv[0]; kv += 2)
    if (tc_strieq(kv[0], name)) return kv[1];
  return NULL;
}

static const char *resp_hdr(struct tc_derp_http_resp *r, const char *name) {
  for (size_t i = 0; i < r->nheaders; i++)
    if (!strcmp(r->headers[i].name, name)) return r->headers[i].value;
  return NULL;
}

TC_TEST(http_endpoints) {
  struct tc_derp_http_resp r;
  TC_CHECK(tc_derp_http_handle("GET", "/derp/probe", "", hdr, NULL, NULL, &r));
  TC_CHECK_INT(r.status, 200);
  TC_CHECK_STR(resp_hdr(&r, "Access-Control-Allow-Origin"), "*");
  TC_CHECK(r.body == NULL);
  TC_CHECK(tc_derp_http_handle("HEAD", "/derp/latency-check", "", hdr, NULL, NULL, &r));
  TC_CHECK_INT(r.status, 200);
  TC_CHECK(tc_derp_http_handle("POST", "/derp/probe", "", hdr, NULL, NULL, &r));
  TC_CHECK_INT(r.status, 405);
  free(r.body);
  TC_CHECK(!tc_derp_http_handle("GET", "/derp", "", hdr, NULL, NULL, &r));
  TC_CHECK(!tc_derp_http_handle("GET", "/derp/probe/x", "", hdr, NULL, NULL, &r));

  const char *good[] = {"X-Tailscale-Challenge", "abc.DEF-123_x:y", NULL};
  TC_CHECK(tc_derp_http_handle("GET", "/generate_204", "", hdr, good, NULL, &r));
  TC_CHECK_INT(r.status, 204);
  TC_CHECK_STR(resp_hdr(&r, "X-Tailscale-Response"), "response abc.DEF-123_x:y");
  TC_CHECK_STR(resp_hdr(&r, "Cache-Control"), "no-cache, no-store, must-revalidate, no-transform, max-age=0");
  const char *bad[] = {"X-Tailscale-Challenge", "abc\r\nSet-Cookie: x", NULL};
  TC_CHECK(tc_derp_http_handle("GET", "/generate_204", "", hdr, bad, NULL, &r));
  TC_CHECK_INT(r.status, 204);
  TC_CHECK(resp_hdr(&r, "X-Tailscale-Response") == NULL);
  char longc[80];
  memset(longc, 'a', 65);
  longc[65] = 0;
  const char *too_long[] = {"X-Tailscale-Challenge", longc, NULL};
  TC_CHECK(tc_derp_http_handle("GET", "/generate_204", "", hdr, too_long, NULL, &r));
  TC_CHECK(resp_hdr(&r, "X-Tailscale-Response") == NULL);
  TC_CHECK(tc_derp_http_handle("GET", "/generate_204", "", hdr, NULL, NULL, &r));
  TC_CHECK(resp_hdr(&r, "X-Tailscale-Response") == NULL);

  const char *cache = "{\"derp1.example\":[\"192.0.2.1\",\"2001:db8::1\"],\"derp2.example\":[\"192.0.2.2\"]}";
  TC_CHECK(tc_derp_http_handle("GET", "/bootstrap-dns", "q=derp2.example", hdr, NULL, cache, &r));
  TC_CHECK_INT(r.status, 200);
  TC_CHECK_STR(resp_hdr(&r, "Content-Type"), "application/json");
  TC_CHECK_STR(r.body, "{\"derp2.example\":[\"192.0.2.2\"]}");
  free(r.body);
  TC_CHECK(tc_derp_http_handle("GET", "/bootstrap-dns", "x=1&q=derp1%2Eexample", hdr, NULL, cache, &r));
  TC_CHECK_STR(r.body, "{\"derp1.example\":[\"192.0.2.1\",\"2001:db8::1\"]}");
  free(r.body);
  TC_CHECK(tc_derp_http_handle("GET", "/bootstrap-dns", "q=unknown.example", hdr, NULL, cache, &r));
  json_t *all = json_loads(r.body, 0, NULL);
  TC_CHECK_INT(json_object_size(all), 2);
  json_decref(all);
  free(r.body);
  TC_CHECK(tc_derp_http_handle("GET", "/bootstrap-dns", "", hdr, NULL, NULL, &r));
  TC_CHECK_STR(r.body, "{}");
  free(r.body);
  TC_CHECK(tc_derp_http_handle("GET", "/bootstrap-dns", "q=%zz", hdr, NULL, "not json", &r));
  TC_CHECK_STR(r.body, "{}");
  free(r.body);
}

TC_TEST(bootstrap_dns_cache_from_the_map) {
  /* only names that resolve without the network: an IP literal and the
   * hosts-file name localhost */
  char *dir = tc_test_tmpdir();
  char *yp = tc_xasprintf("%s/local.yaml", dir);
  const char *y = "regions:\n  901:\n    regionid: 901\n    regioncode: a\n    regionname: A\n    nodes:\n"
                  "      - name: 901a\n        hostname: 127.0.0.1\n      - name: 901b\n        hostname: localhost\n";
  struct tc_err err = {0};
  TC_REQUIRE(tc_write_file_atomic(yp, y, strlen(y), 0644, &err) == 0);
  const char *paths[] = {yp};
  struct tc_derpmap_params p = {.paths = paths, .npaths = 1, .bootstrap_dns = true};
  struct tc_derpmap *dm = NULL;
  TC_REQUIRE(tc_derpmap_new(&p, &dm, &err) == 0);
  char *dns = tc_derpmap_bootstrap_dns_json(dm);
  json_t *j = json_loads(dns, 0, NULL);
  TC_REQUIRE(json_is_object(j));
  TC_CHECK_STR(json_string_value(json_array_get(json_object_get(j, "127.0.0.1"), 0)), "127.0.0.1");
  TC_CHECK(json_array_size(json_object_get(j, "localhost")) >= 1);
  /* and the endpoint answers from it */
  struct tc_derp_http_resp r;
  TC_CHECK(tc_derp_http_handle("GET", "/bootstrap-dns", "q=127.0.0.1", NULL, NULL, dns, &r));
  TC_CHECK_STR(r.body, "{\"127.0.0.1\":[\"127.0.0.1\"]}");
  free(r.body);
  json_decref(j);
  free(dns);
  tc_derpmap_free(dm);
  p.bootstrap_dns = false;
  TC_REQUIRE(tc_derpmap_new(&p, &dm, &err) == 0);
  dns = tc_derpmap_bootstrap_dns_json(dm);
  TC_CHECK_STR(dns, "{}");
  free(dns);
  tc_derpmap_free(dm);
  free(yp);
  free(dir);
}
