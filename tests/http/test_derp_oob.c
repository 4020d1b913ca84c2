/* test_derp_oob: the out-of-the-box path a newcomer takes. `tailcoat config
 * init` writes the default config (only its ports are replaced by free
 * ones), the real binary serves it, and a client that behaves like
 * tailscaled with a DERP map entry marked InsecureForTests reaches the
 * embedded relay: TLS on the same port as plain HTTP, with the generated
 * self-signed certificate, and a full DERP handshake with a node key the
 * server knows. The certificate survives a restart; a busy STUN port only
 * warns. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/oid.h>
#include <mbedtls/pem.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>
#include <sodium.h>

#include "base/base.h"
#include "server_harness.h"
#include "tc_test.h"
#include "tclient.h"

__attribute__((constructor)) static void ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

#define FRAME_SERVER_KEY 0x01
#define FRAME_CLIENT_INFO 0x02
#define FRAME_SERVER_INFO 0x03
#define FRAME_KEEP_ALIVE 0x06
static const char k_magic[8] = {'D', 'E', 'R', 'P', (char)0xf0, (char)0x9f, (char)0x94, (char)0x91};

static int free_port(int type) {
  int fd = socket(AF_INET, type, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t l = sizeof a;
  int port = -1;
  if (fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof a) && !getsockname(fd, (struct sockaddr *)&a, &l))
    port = ntohs(a.sin_port);
  if (fd >= 0) close(fd);
  return port;
}

static const char *bin_dir(void) {
  const char *d = getenv("TC_BINARY_DIR");
  return d ? d : ".";
}

/* Replaces every occurrence of from in *text (owned, reallocated). */
static int replace_all(char **text, const char *from, const char *to) {
  struct tc_buf b = TC_BUF_INIT;
  int n = 0;
  const char *p = *text, *hit;
  while ((hit = strstr(p, from))) {
    tc_buf_append(&b, p, (size_t)(hit - p));
    tc_buf_puts(&b, to);
    p = hit + strlen(from);
    n++;
  }
  tc_buf_puts(&b, p);
  free(*text);
  *text = tc_buf_steal(&b, NULL);
  return n;
}

/* `tailcoat config init -o <dir>/data/config.yaml` with free ports put in;
 * fills s as tc_srv_init would. stun_port < 0 keeps the default 0.0.0.0:3478
 * line unless replaced. */
static bool init_from_config_init(struct tc_srv *s, int stun_port) {
  memset(s, 0, sizeof *s);
  char *d = tc_test_tmpdir();
  snprintf(s->dir, sizeof s->dir, "%s", d);
  free(d);
  /* data/ does not exist yet: config init must create it */
  snprintf(s->config, sizeof s->config, "%s/data/config.yaml", s->dir);
  snprintf(s->sock, sizeof s->sock, "%s/data/tailcoat.sock", s->dir);
  snprintf(s->db, sizeof s->db, "%s/data/db.sqlite", s->dir);
  snprintf(s->log, sizeof s->log, "%s/server.log", s->dir);
  char cmd[1200];
  snprintf(cmd, sizeof cmd, "'%s/tailcoat' config init -o '%s' 2>/dev/null", bin_dir(), s->config);
  if (system(cmd) != 0) return false;
  char *text = NULL;
  size_t n;
  if (tc_read_file(s->config, 1 << 20, &text, &n, NULL)) return false;
  /* the data dir defaulted to the config's own directory, absolute */
  char want[600];
  snprintf(want, sizeof want, "private_key_path: \"%s/data/noise_private.key\"", s->dir);
  bool ok = strstr(text, want) != NULL && strstr(text, "    enabled: true\n") != NULL &&
            strstr(text, "automatically_add_embedded_derp_region: true") != NULL;
  s->port = free_port(SOCK_STREAM);
  s->metrics_port = free_port(SOCK_STREAM);
  char rep[64];
  snprintf(rep, sizeof rep, "127.0.0.1:%d", s->port);
  ok = ok && replace_all(&text, "127.0.0.1:8080", rep) == 2; /* server_url and listen_addr */
  snprintf(rep, sizeof rep, "127.0.0.1:%d", s->metrics_port);
  ok = ok && replace_all(&text, "127.0.0.1:9090", rep) == 1;
  snprintf(rep, sizeof rep, "127.0.0.1:%d", stun_port);
  ok = ok && replace_all(&text, "0.0.0.0:3478", rep) == 1;
  ok = ok && !tc_write_file_atomic(s->config, text, strlen(text), 0600, NULL);
  free(text);
  return ok;
}

/* ---- a TLS client that verifies nothing (Go's InsecureSkipVerify) ---------- */

struct tconn {
  mbedtls_net_context net;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_ssl_config conf;
  mbedtls_ssl_context ssl;
};

static int tconn_open(struct tconn *t, int port) {
  mbedtls_net_init(&t->net);
  mbedtls_entropy_init(&t->entropy);
  mbedtls_ctr_drbg_init(&t->drbg);
  mbedtls_ssl_config_init(&t->conf);
  mbedtls_ssl_init(&t->ssl);
  char ps[16];
  snprintf(ps, sizeof ps, "%d", port);
  int rc;
  if ((rc = mbedtls_ctr_drbg_seed(&t->drbg, mbedtls_entropy_func, &t->entropy, NULL, 0))) return rc;
  if ((rc = mbedtls_net_connect(&t->net, "127.0.0.1", ps, MBEDTLS_NET_PROTO_TCP))) return rc;
  if ((rc = mbedtls_ssl_config_defaults(&t->conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                        MBEDTLS_SSL_PRESET_DEFAULT)))
    return rc;
  mbedtls_ssl_conf_authmode(&t->conf, MBEDTLS_SSL_VERIFY_NONE);
  mbedtls_ssl_conf_rng(&t->conf, mbedtls_ctr_drbg_random, &t->drbg);
  mbedtls_ssl_conf_read_timeout(&t->conf, 5000);
  if ((rc = mbedtls_ssl_setup(&t->ssl, &t->conf))) return rc;
  mbedtls_ssl_set_bio(&t->ssl, &t->net, mbedtls_net_send, NULL, mbedtls_net_recv_timeout);
  while ((rc = mbedtls_ssl_handshake(&t->ssl)) != 0)
    if (rc != MBEDTLS_ERR_SSL_WANT_READ && rc != MBEDTLS_ERR_SSL_WANT_WRITE) return rc;
  return 0;
}

static void tconn_close(struct tconn *t) {
  mbedtls_ssl_close_notify(&t->ssl);
  mbedtls_net_free(&t->net);
  mbedtls_ssl_free(&t->ssl);
  mbedtls_ssl_config_free(&t->conf);
  mbedtls_ctr_drbg_free(&t->drbg);
  mbedtls_entropy_free(&t->entropy);
}

static int tconn_write(struct tconn *t, const void *p, size_t n) {
  const unsigned char *b = p;
  while (n) {
    int w = mbedtls_ssl_write(&t->ssl, b, n);
    if (w == MBEDTLS_ERR_SSL_WANT_WRITE || w == MBEDTLS_ERR_SSL_WANT_READ) continue;
    if (w <= 0) return -1;
    b += w;
    n -= (size_t)w;
  }
  return 0;
}

static int tconn_read(struct tconn *t, void *p, size_t n) {
  unsigned char *b = p;
  while (n) {
    int r = mbedtls_ssl_read(&t->ssl, b, n);
    if (r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE) continue;
    if (r <= 0) return -1;
    b += r;
    n -= (size_t)r;
  }
  return 0;
}

/* Reads an HTTP response head byte by byte (nothing after it is eaten). */
static int tconn_read_head(struct tconn *t, char *out, size_t cap) {
  size_t n = 0;
  while (n + 1 < cap) {
    if (tconn_read(t, out + n, 1)) return -1;
    out[++n] = 0;
    if (n >= 4 && !memcmp(out + n - 4, "\r\n\r\n", 4)) return 0;
  }
  return -1;
}

/* The server's certificate as DER (owned copy), or NULL. */
static unsigned char *peer_der(struct tconn *t, size_t *len) {
  const mbedtls_x509_crt *c = mbedtls_ssl_get_peer_cert(&t->ssl);
  if (!c) return NULL;
  unsigned char *d = tc_xmalloc(c->raw.len);
  memcpy(d, c->raw.p, c->raw.len);
  *len = c->raw.len;
  return d;
}

/* ---- DERP over that TLS connection ------------------------------------------ */

static int derp_recv_frame(struct tconn *t, uint8_t *buf, size_t cap, size_t *len) {
  for (;;) {
    uint8_t h[5];
    if (tconn_read(t, h, 5)) return -1;
    uint32_t l = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
    if (l > cap) return -1;
    if (l && tconn_read(t, buf, l)) return -1;
    *len = l;
    if (h[0] != FRAME_KEEP_ALIVE) return h[0];
  }
}

/* GET /derp upgrade, ServerKey, ClientInfo sealed with priv, ServerInfo
 * opened. 0 on a complete handshake; -2 if the server hung up after
 * ClientInfo (refused the key); -1 on anything else. */
static int derp_handshake(struct tconn *t, const uint8_t priv[32]) {
  static const char req[] = "GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n";
  char head[1024];
  if (tconn_write(t, req, sizeof req - 1) || tconn_read_head(t, head, sizeof head)) return -1;
  if (strncmp(head, "HTTP/1.1 101 ", 13)) return -1;
  uint8_t buf[1024];
  size_t len;
  if (derp_recv_frame(t, buf, sizeof buf, &len) != FRAME_SERVER_KEY || len != 40 || memcmp(buf, k_magic, 8))
    return -1;
  uint8_t srv_pub[32], pub[32];
  memcpy(srv_pub, buf + 8, 32);
  crypto_scalarmult_base(pub, priv);
  const char *json = "{\"version\":2,\"CanAckPings\":true}";
  size_t ml = strlen(json);
  size_t n = 32 + 24 + crypto_box_MACBYTES + ml;
  uint8_t frame[5 + 32 + 24 + crypto_box_MACBYTES + 64];
  frame[0] = FRAME_CLIENT_INFO;
  frame[1] = 0, frame[2] = 0, frame[3] = (uint8_t)(n >> 8), frame[4] = (uint8_t)n;
  memcpy(frame + 5, pub, 32);
  randombytes_buf(frame + 5 + 32, 24);
  if (crypto_box_easy(frame + 5 + 56, (const uint8_t *)json, ml, frame + 5 + 32, srv_pub, priv)) return -1;
  if (tconn_write(t, frame, 5 + n)) return -1;
  int type = derp_recv_frame(t, buf, sizeof buf, &len);
  if (type < 0) return -2;
  if (type != FRAME_SERVER_INFO || len < 24 + crypto_box_MACBYTES) return -1;
  uint8_t m[1024];
  if (crypto_box_open_easy(m, buf + 24, len - 24, buf, srv_pub, priv)) return -1;
  m[len - 24 - crypto_box_MACBYTES] = 0;
  return strstr((char *)m, "\"version\"") ? 0 : -1;
}

/* HTTP/1.1 GET over TLS; returns the status or -1. */
/* Reads (and drops) frames until the server ends the connection or
 * wait_ms pass: true when it was closed, false when still open. */
static bool derp_wait_closed(struct tconn *t, int64_t wait_ms) {
  uint8_t b[512];
  int64_t end = tc_mono_ms() + wait_ms;
  if (wait_ms < 5000) mbedtls_ssl_conf_read_timeout(&t->conf, (uint32_t)wait_ms);
  bool closed = false;
  while (tc_mono_ms() < end) {
    int r = mbedtls_ssl_read(&t->ssl, b, sizeof b);
    if (r > 0 || r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE || r == MBEDTLS_ERR_SSL_TIMEOUT)
      continue;
    closed = true; /* EOF, close_notify or reset */
    break;
  }
  mbedtls_ssl_conf_read_timeout(&t->conf, 5000);
  return closed;
}

static int tls_get_status(int port, const char *path) {
  struct tconn t;
  int st = -1;
  if (tconn_open(&t, port) == 0) {
    char req[256], head[2048];
    snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", path);
    if (!tconn_write(&t, req, strlen(req)) && !tconn_read_head(&t, head, sizeof head) &&
        !strncmp(head, "HTTP/1.1 ", 9))
      st = atoi(head + 9);
  }
  tconn_close(&t);
  return st;
}

/* DER of the first certificate in a PEM file (owned), or NULL. */
static unsigned char *file_der(const char *path, size_t *len) {
  mbedtls_x509_crt c;
  mbedtls_x509_crt_init(&c);
  unsigned char *d = NULL;
  if (mbedtls_x509_crt_parse_file(&c, path) == 0) {
    d = tc_xmalloc(c.raw.len);
    memcpy(d, c.raw.p, c.raw.len);
    *len = c.raw.len;
  }
  mbedtls_x509_crt_free(&c);
  return d;
}

/* Registers a node with a fresh pre-auth key and returns the first map
 * message it receives (owned JSON). priv receives the node key's private
 * half. */
static json_t *register_and_map(struct tc_srv *s, uint8_t priv[32]) {
  int rc;
  json_decref(tc_cli_json(s, &rc, "users", "create", "newcomer", NULL));
  if (rc) return NULL;
  json_t *k = tc_cli_json(s, &rc, "preauthkeys", "create", "--user", "newcomer", NULL);
  if (rc || !json_is_object(k)) return NULL;
  char authkey[200];
  snprintf(authkey, sizeof authkey, "%s", json_string_value(json_object_get(k, "key")));
  json_decref(k);
  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  struct tc_tclient_opts o = {.timeout_ms = 10000};
  if (tc_tclient_connect("127.0.0.1", s->port, &o, &c, &err)) {
    fprintf(stderr, "  connect: %s\n", err.msg);
    return NULL;
  }
  uint8_t pub[32];
  randombytes_buf(priv, 32);
  crypto_scalarmult_base(pub, priv);
  char nkhex[65];
  tc_hex_encode(pub, 32, nkhex);
  char *body = tc_xasprintf("{\"Version\":106,\"NodeKey\":\"nodekey:%s\",\"OldNodeKey\":\"nodekey:"
                            "0000000000000000000000000000000000000000000000000000000000000000\","
                            "\"Auth\":{\"AuthKey\":\"%s\"},\"Expiry\":\"0001-01-01T00:00:00Z\","
                            "\"Hostinfo\":{\"Hostname\":\"first-node\",\"OS\":\"linux\"}}",
                            nkhex, authkey);
  int status = 0;
  char *resp = NULL;
  size_t rlen = 0;
  rc = tc_tclient_request(c, "POST", "/machine/register", body, strlen(body), 10000, &status, &resp, &rlen);
  free(body);
  free(resp);
  json_t *map = NULL;
  if (rc == 0 && status == 200) {
    body = tc_xasprintf("{\"Version\":106,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"nodekey:%s\","
                        "\"Stream\":true,\"Hostinfo\":{\"Hostname\":\"first-node\",\"OS\":\"linux\"}}",
                        nkhex);
    int32_t sid = tc_tclient_submit(c, "POST", "/machine/map", "application/json", body, strlen(body));
    free(body);
    char *js = NULL;
    size_t jl = 0;
    if (sid > 0 && tc_tclient_map_next(c, sid, 10000, &js, &jl) == 0) map = json_loadb(js, jl, 0, NULL);
    free(js);
  }
  tc_tclient_free(c);
  return map;
}

TC_TEST(oob_default_config_serves_derp_over_tls_on_the_http_port) {
  struct tc_srv s;
  int stun_port = free_port(SOCK_DGRAM);
  TC_REQUIRE(init_from_config_init(&s, stun_port));
  TC_REQUIRE(tc_srv_start(&s));

  /* the DERP map a first node receives describes a relay it can reach */
  uint8_t priv[32];
  json_t *map = register_and_map(&s, priv);
  TC_REQUIRE(map);
  long long node_id = (long long)json_integer_value(json_object_get(json_object_get(map, "Node"), "ID"));
  TC_CHECK(node_id > 0);
  json_t *region = json_object_get(json_object_get(json_object_get(map, "DERPMap"), "Regions"), "999");
  TC_REQUIRE(json_is_object(region));
  json_t *node = json_array_get(json_object_get(region, "Nodes"), 0);
  TC_REQUIRE(json_is_object(node));
  TC_CHECK_STR(json_string_value(json_object_get(node, "HostName")), "127.0.0.1");
  TC_CHECK_STR(json_string_value(json_object_get(node, "IPv4")), "127.0.0.1");
  TC_CHECK_STR(json_string_value(json_object_get(node, "IPv6")), "none"); /* no doomed v6 dial */
  TC_CHECK_INT(json_integer_value(json_object_get(node, "DERPPort")), s.port);
  TC_CHECK_INT(json_integer_value(json_object_get(node, "STUNPort")), stun_port);
  TC_CHECK(json_is_true(json_object_get(node, "InsecureForTests")));
  TC_CHECK(json_object_get(node, "CertName") == NULL); /* v1.60 would check it as a DNS name */
  json_decref(map);

  /* the certificate was generated next to the DERP key, key private */
  char crt[400], key[400];
  snprintf(crt, sizeof crt, "%s/data/derp_selfsigned.crt", s.dir);
  snprintf(key, sizeof key, "%s/data/derp_selfsigned.key", s.dir);
  struct stat st;
  TC_REQUIRE(stat(key, &st) == 0);
  TC_CHECK_INT(st.st_mode & 0777, 0600);
  size_t flen = 0;
  unsigned char *fder = file_der(crt, &flen);
  TC_REQUIRE(fder);

  /* TLS on the HTTP port: the relay, with the generated certificate */
  struct tconn t;
  int rc = tconn_open(&t, s.port);
  TC_REQUIRE(rc == 0);
  size_t dlen = 0;
  unsigned char *der = peer_der(&t, &dlen);
  TC_CHECK(der && dlen == flen && !memcmp(der, fder, flen));
  free(der);
  mbedtls_x509_crt parsed;
  mbedtls_x509_crt_init(&parsed);
  TC_REQUIRE(mbedtls_x509_crt_parse_der(&parsed, fder, flen) == 0);
  /* SAN = the server_url host, as an IP address */
  TC_CHECK(parsed.ext_types & MBEDTLS_X509_EXT_SUBJECT_ALT_NAME);
  static const unsigned char k_san_ip[] = {0x87, 0x04, 127, 0, 0, 1};
  TC_CHECK(memmem(parsed.raw.p, parsed.raw.len, k_san_ip, sizeof k_san_ip) != NULL);
  TC_CHECK(parsed.valid_to.year - parsed.valid_from.year >= 9);
  mbedtls_x509_crt_free(&parsed);
  TC_CHECK_INT(derp_handshake(&t, priv), 0);
  tconn_close(&t);

  /* verify_clients (default on): a key the tailnet does not know is refused */
  uint8_t stranger[32];
  randombytes_buf(stranger, 32);
  TC_REQUIRE(tconn_open(&t, s.port) == 0);
  TC_CHECK_INT(derp_handshake(&t, stranger), -2);
  tconn_close(&t);

  /* netcheck's HTTPS latency fallback, through the same TLS front */
  TC_CHECK_INT(tls_get_status(s.port, "/derp/latency-check"), 200);
  /* plain HTTP keeps working on that port: /health and the control protocol */
  char *body = NULL;
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/health", NULL, NULL, &body), 200);
  free(body);
  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  struct tc_tclient_opts o = {.timeout_ms = 10000};
  TC_CHECK_INT(tc_tclient_connect("127.0.0.1", s.port, &o, &c, &err), 0);
  tc_tclient_free(c);

  /* a restart presents the same certificate */
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  TC_REQUIRE(tc_srv_start(&s));
  TC_REQUIRE(tconn_open(&t, s.port) == 0);
  der = peer_der(&t, &dlen);
  TC_CHECK(der && dlen == flen && !memcmp(der, fder, flen));
  free(der);
  TC_CHECK_INT(derp_handshake(&t, priv), 0);
  /* deleting the node cuts its live relay connection at once, and its key
   * is refused from then on (derp.server.verify_clients) */
  TC_CHECK(!derp_wait_closed(&t, 1000));
  char idtxt[32];
  snprintf(idtxt, sizeof idtxt, "%lld", node_id);
  json_decref(tc_cli_json(&s, &rc, "nodes", "delete", "-i", idtxt, "--force", NULL));
  TC_CHECK_INT(rc, 0);
  TC_CHECK(derp_wait_closed(&t, 10000));
  tconn_close(&t);
  TC_REQUIRE(tconn_open(&t, s.port) == 0);
  TC_CHECK_INT(derp_handshake(&t, priv), -2);
  tconn_close(&t);
  free(fder);

  char *log = NULL;
  size_t ln;
  TC_REQUIRE(tc_read_file(s.log, 1 << 20, &log, &ln, NULL) == 0);
  TC_CHECK(strstr(log, "created self-signed certificate") != NULL);
  TC_CHECK(strstr(log, "using self-signed certificate") != NULL);
  free(log);
  ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  tc_srv_cleanup(&s);
}

TC_TEST(oob_busy_stun_port_only_warns) {
  int u = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t l = sizeof a;
  TC_REQUIRE(u >= 0 && !bind(u, (struct sockaddr *)&a, sizeof a) && !getsockname(u, (struct sockaddr *)&a, &l));
  struct tc_srv s;
  TC_REQUIRE(init_from_config_init(&s, ntohs(a.sin_port)));
  TC_REQUIRE(tc_srv_start(&s));
  char *body = NULL;
  TC_CHECK_INT(tc_http_do(&s, false, "GET", "/health", NULL, NULL, &body), 200);
  free(body);
  /* the relay itself is still there */
  TC_CHECK_INT(tls_get_status(s.port, "/derp/probe"), 200);
  char *log = NULL;
  size_t ln;
  TC_REQUIRE(tc_read_file(s.log, 1 << 20, &log, &ln, NULL) == 0);
  TC_CHECK(strstr(log, "continuing without STUN") != NULL);
  free(log);
  int ws = tc_srv_stop(&s, SIGTERM);
  TC_CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
  tc_srv_cleanup(&s);
  close(u);
}

/* config init refuses to clobber, and an explicit --data-dir still wins */
TC_TEST(oob_config_init_output_dir_and_data_dir) {
  char *d = tc_test_tmpdir();
  char cmd[1200], path[600];
  snprintf(path, sizeof path, "%s/a/b/config.yaml", d);
  snprintf(cmd, sizeof cmd, "'%s/tailcoat' config init -o '%s' --data-dir /srv/tc 2>/dev/null", bin_dir(), path);
  TC_CHECK_INT(system(cmd), 0);
  char *text = NULL;
  size_t n;
  TC_REQUIRE(tc_read_file(path, 1 << 20, &text, &n, NULL) == 0);
  TC_CHECK(strstr(text, "\"/srv/tc/db.sqlite\"") != NULL);
  free(text);
  TC_CHECK(system(cmd) != 0); /* exists */
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
  TC_CHECK_INT(system(cmd), 0);
  free(d);
}
