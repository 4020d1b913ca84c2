/* /ts2021 over TLS, the way tailscaled dials https:// control URLs on 443:
 * server/tls terminates TLS and hands the plaintext end to the front door
 * (here the loopback stand-in), which hands /ts2021 to proto. The client
 * accepts any certificate, so a throw-away self-signed one is made here. */
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/entropy.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "crypto/crypto.h"
#include "proto/proto.h"
#include "tc_test.h"
#include "tclient.h"
#include "tls/tls.h"

/* Writes a self-signed EC P-256 certificate and key as PEM into dir. */
static int make_cert(const char *dir, char **cert_path, char **key_path) {
  mbedtls_entropy_context ent;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_pk_context key;
  mbedtls_x509write_cert w;
  mbedtls_mpi sn;
  int rc = -1;
  mbedtls_entropy_init(&ent);
  mbedtls_ctr_drbg_init(&drbg);
  mbedtls_pk_init(&key);
  mbedtls_x509write_crt_init(&w);
  mbedtls_mpi_init(&sn);
  unsigned char pem[4096];
  if (mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &ent, (const unsigned char *)"cert", 4) ||
      mbedtls_pk_setup(&key, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY)) ||
      mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(key), mbedtls_ctr_drbg_random, &drbg))
    goto out;
  mbedtls_x509write_crt_set_version(&w, MBEDTLS_X509_CRT_VERSION_3);
  mbedtls_x509write_crt_set_md_alg(&w, MBEDTLS_MD_SHA256);
  mbedtls_x509write_crt_set_subject_key(&w, &key);
  mbedtls_x509write_crt_set_issuer_key(&w, &key);
  mbedtls_mpi_lset(&sn, 7);
  if (mbedtls_x509write_crt_set_serial(&w, &sn) ||
      mbedtls_x509write_crt_set_subject_name(&w, "CN=tailcoat.test") ||
      mbedtls_x509write_crt_set_issuer_name(&w, "CN=tailcoat.test") ||
      mbedtls_x509write_crt_set_validity(&w, "20200101000000", "20991231235959") ||
      mbedtls_x509write_crt_pem(&w, pem, sizeof pem, mbedtls_ctr_drbg_random, &drbg))
    goto out;
  *cert_path = tc_xasprintf("%s/cert.pem", dir);
  *key_path = tc_xasprintf("%s/key.pem", dir);
  if (tc_write_file_atomic(*cert_path, pem, strlen((char *)pem), 0600, NULL)) goto out;
  if (mbedtls_pk_write_key_pem(&key, pem, sizeof pem)) goto out;
  if (tc_write_file_atomic(*key_path, pem, strlen((char *)pem), 0600, NULL)) goto out;
  rc = 0;
out:
  mbedtls_mpi_free(&sn);
  mbedtls_x509write_crt_free(&w);
  mbedtls_pk_free(&key);
  mbedtls_ctr_drbg_free(&drbg);
  mbedtls_entropy_free(&ent);
  return rc;
}

static void handler(void *ctx, const struct tc_ctl_request *req, struct tc_ctl_stream *st) {
  if (!strcmp(req->path, "/echo")) {
    tc_ctl_stream_respond(st, 200, "application/octet-stream", req->body, req->body_len);
  } else if (!strcmp(req->path, "/stream")) {
    tc_ctl_stream_begin(st, 200, "application/json");
    for (int i = 0; i < 3; i++) {
      struct tc_buf fr = TC_BUF_INIT;
      char js[32];
      int n = snprintf(js, sizeof js, "{\"Seq\":%d}", i);
      tc_map_frame(js, (size_t)n, &fr);
      tc_ctl_stream_write(st, fr.data, fr.len);
      tc_buf_free(&fr);
    }
    tc_ctl_stream_end(st);
  } else if (!strcmp(req->path, "/big")) {
    size_t n = 1500000;
    char *b = tc_xmalloc(n);
    for (size_t i = 0; i < n; i++) b[i] = (char)(i % 251);
    tc_ctl_stream_respond(st, 200, "application/octet-stream", b, n);
    free(b);
  } else {
    tc_ctl_stream_respond(st, 404, NULL, NULL, 0);
  }
}

static void deliver(void *ctx, int plain_fd, const char *peer) { tc_tlistener_handoff(ctx, plain_fd); }

TC_TEST(ts2021_over_tls) {
  char *dir = tc_test_tmpdir(), *cert = NULL, *key = NULL;
  TC_REQUIRE(make_cert(dir, &cert, &key) == 0);
  uint8_t priv[32], pub[32];
  tc_x25519_keygen(priv, pub);
  struct tc_ctl_server *srv = NULL;
  TC_REQUIRE(tc_ctl_server_new(handler, NULL, priv, NULL, &srv, NULL) == 0);
  struct tc_tlistener *lis = NULL;
  TC_REQUIRE(tc_tlistener_start(pub, tc_ctl_upgrade, srv, &lis) == 0);
  struct tc_tls_params tp = {.cert_path = cert, .key_path = key, .deliver = deliver, .deliver_ctx = lis};
  struct tc_tls *tls = NULL;
  struct tc_err err = {0};
  int rc = tc_tls_new(&tp, &tls, &err);
  if (rc) fprintf(stderr, "  tls: %s\n", err.msg);
  TC_REQUIRE(rc == 0);
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof sa;
  TC_REQUIRE(bind(lfd, (struct sockaddr *)&sa, sizeof sa) == 0 && listen(lfd, 16) == 0 &&
             getsockname(lfd, (struct sockaddr *)&sa, &sl) == 0);
  int port = ntohs(sa.sin_port);
  TC_REQUIRE(tc_tls_add_listener(tls, lfd, &err) == 0);

  for (int ws = 0; ws < 2; ws++) {
    struct tc_tclient_opts o = {.version = 131, .server_pub = pub, .tls = true, .websocket = ws == 1};
    struct tc_tclient *c = NULL;
    rc = tc_tclient_connect("127.0.0.1", port, &o, &c, &err);
    if (rc) fprintf(stderr, "  connect: %s\n", err.msg);
    TC_REQUIRE(rc == 0);
    int status;
    char *body = NULL;
    size_t len = 0;
    TC_CHECK_INT(tc_tclient_request(c, "POST", "/echo", "secure", 6, 10000, &status, &body, &len), 0);
    TC_CHECK_STR(body, "secure");
    free(body);
    int32_t sid = tc_tclient_submit(c, "POST", "/stream", NULL, "{}", 2);
    for (int i = 0; i < 3; i++) {
      char *js = NULL, want[32];
      snprintf(want, sizeof want, "{\"Seq\":%d}", i);
      TC_CHECK_INT(tc_tclient_map_next(c, sid, 10000, &js, &len), 0);
      TC_CHECK_STR(js, want);
      free(js);
    }
    TC_CHECK_INT(tc_tclient_request(c, "GET", "/big", NULL, 0, 20000, &status, &body, &len), 0);
    TC_CHECK_INT(len, 1500000);
    TC_CHECK(body && (uint8_t)body[1499999] == 1499999 % 251);
    free(body);
    TC_CHECK(tc_tclient_max_record(c) <= TC_TS_MAX_MSG);
    tc_tclient_free(c);
  }
  tc_tls_free(tls);
  tc_tlistener_stop(lis);
  tc_ctl_server_stop(srv);
  unlink(cert);
  unlink(key);
  rmdir(dir);
  free(cert);
  free(key);
  free(dir);
}

__attribute__((constructor)) static void init_crypto(void) {
  if (tc_crypto_init()) abort();
}
