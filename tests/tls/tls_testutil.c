/* tls_testutil: certificate generation and a blocking TLS client for tests. */
#include "tls_testutil.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <mbedtls/bignum.h>
#include <mbedtls/ecp.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/pk.h>

#include "base/base.h"

static int gen_key(mbedtls_pk_context *pk, mbedtls_ctr_drbg_context *drbg) {
  mbedtls_pk_init(pk);
  if (mbedtls_pk_setup(pk, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY)) != 0) return -1;
  return mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(*pk), mbedtls_ctr_drbg_random, drbg) ? -1
                                                                                                        : 0;
}

static int write_cert(mbedtls_pk_context *subj, mbedtls_pk_context *issuer, const char *subj_name,
                      const char *issuer_name, bool is_ca, int serial, mbedtls_ctr_drbg_context *drbg,
                      unsigned char *out, size_t outlen) {
  mbedtls_x509write_cert w;
  mbedtls_mpi sn;
  int rc = -1;
  mbedtls_x509write_crt_init(&w);
  mbedtls_mpi_init(&sn);
  mbedtls_mpi_lset(&sn, serial);
  mbedtls_x509write_crt_set_version(&w, MBEDTLS_X509_CRT_VERSION_3);
  mbedtls_x509write_crt_set_md_alg(&w, MBEDTLS_MD_SHA256);
  mbedtls_x509write_crt_set_subject_key(&w, subj);
  mbedtls_x509write_crt_set_issuer_key(&w, issuer);
  if (mbedtls_x509write_crt_set_serial(&w, &sn)) goto out;
  if (mbedtls_x509write_crt_set_subject_name(&w, subj_name)) goto out;
  if (mbedtls_x509write_crt_set_issuer_name(&w, issuer_name)) goto out;
  if (mbedtls_x509write_crt_set_validity(&w, "20200101000000", "20991231235959")) goto out;
  if (mbedtls_x509write_crt_set_basic_constraints(&w, is_ca, is_ca ? 1 : -1)) goto out;
  if (is_ca && mbedtls_x509write_crt_set_key_usage(&w, MBEDTLS_X509_KU_KEY_CERT_SIGN | MBEDTLS_X509_KU_CRL_SIGN))
    goto out;
  if (mbedtls_x509write_crt_pem(&w, out, outlen, mbedtls_ctr_drbg_random, drbg)) goto out;
  rc = 0;
out:
  mbedtls_x509write_crt_free(&w);
  mbedtls_mpi_free(&sn);
  return rc;
}

static int put(const char *path, const void *a, size_t alen, const void *b, size_t blen) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  fwrite(a, 1, alen, f);
  if (b) fwrite(b, 1, blen, f);
  return fclose(f) == 0 ? 0 : -1;
}

int tt_make_chain(const char *dir, const char *name, const char *cn, char **ca_path, char **chain_path,
                  char **key_path) {
  static int serial = 1;
  mbedtls_entropy_context ent;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_pk_context cak, leafk;
  unsigned char capem[4096], leafpem[4096], keypem[4096];
  int rc = -1;
  mbedtls_entropy_init(&ent);
  mbedtls_ctr_drbg_init(&drbg);
  mbedtls_pk_init(&cak);
  mbedtls_pk_init(&leafk);
  if (mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &ent, NULL, 0)) goto out;
  if (gen_key(&cak, &drbg) || gen_key(&leafk, &drbg)) goto out;
  char caname[128], leafname[160];
  snprintf(caname, sizeof caname, "CN=tailcoat test CA %s,O=tailcoat", name);
  snprintf(leafname, sizeof leafname, "CN=%s,O=tailcoat", cn);
  if (write_cert(&cak, &cak, caname, caname, true, serial++, &drbg, capem, sizeof capem)) goto out;
  if (write_cert(&leafk, &cak, leafname, caname, false, serial++, &drbg, leafpem, sizeof leafpem)) goto out;
  if (mbedtls_pk_write_key_pem(&leafk, keypem, sizeof keypem)) goto out;
  *ca_path = tc_xasprintf("%s/%s-ca.pem", dir, name);
  *chain_path = tc_xasprintf("%s/%s-chain.pem", dir, name);
  *key_path = tc_xasprintf("%s/%s-key.pem", dir, name);
  if (put(*ca_path, capem, strlen((char *)capem), NULL, 0)) goto out;
  if (put(*chain_path, leafpem, strlen((char *)leafpem), capem, strlen((char *)capem))) goto out;
  if (put(*key_path, keypem, strlen((char *)keypem), NULL, 0)) goto out;
  rc = 0;
out:
  mbedtls_pk_free(&cak);
  mbedtls_pk_free(&leafk);
  mbedtls_ctr_drbg_free(&drbg);
  mbedtls_entropy_free(&ent);
  return rc;
}

int tt_client_connect(struct tt_client *c, int port, const char *ca_path, const char *host) {
  memset(c, 0, sizeof *c);
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) return -1;
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct timeval tv = {.tv_sec = 10};
  setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  mbedtls_entropy_init(&c->entropy);
  mbedtls_ctr_drbg_init(&c->drbg);
  mbedtls_x509_crt_init(&c->ca);
  mbedtls_ssl_config_init(&c->conf);
  mbedtls_ssl_init(&c->ssl);
  c->inited = true;
  int rc;
  if ((rc = mbedtls_ctr_drbg_seed(&c->drbg, mbedtls_entropy_func, &c->entropy, NULL, 0))) return rc;
  if ((rc = mbedtls_x509_crt_parse_file(&c->ca, ca_path))) return rc;
  if ((rc = mbedtls_ssl_config_defaults(&c->conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                        MBEDTLS_SSL_PRESET_DEFAULT)))
    return rc;
  mbedtls_ssl_conf_authmode(&c->conf, MBEDTLS_SSL_VERIFY_REQUIRED);
  mbedtls_ssl_conf_ca_chain(&c->conf, &c->ca, NULL);
  mbedtls_ssl_conf_rng(&c->conf, mbedtls_ctr_drbg_random, &c->drbg);
  if ((rc = mbedtls_ssl_setup(&c->ssl, &c->conf))) return rc;
  if ((rc = mbedtls_ssl_set_hostname(&c->ssl, host))) return rc;
  /* mbedtls_net_context is just {int fd}: reuse its blocking callbacks. */
  mbedtls_ssl_set_bio(&c->ssl, &c->fd, mbedtls_net_send, mbedtls_net_recv, NULL);
  rc = mbedtls_ssl_handshake(&c->ssl);
  c->verify_flags = mbedtls_ssl_get_verify_result(&c->ssl);
  return rc;
}

int tt_client_write(struct tt_client *c, const void *p, size_t n) {
  const unsigned char *b = p;
  while (n) {
    int r = mbedtls_ssl_write(&c->ssl, b, n);
    if (r <= 0) return -1;
    b += r;
    n -= (size_t)r;
  }
  return 0;
}

int tt_client_read_some(struct tt_client *c, void *p, size_t n) {
  int r = mbedtls_ssl_read(&c->ssl, p, n);
  if (r == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY) return 0;
  return r;
}

int tt_client_read(struct tt_client *c, void *p, size_t n) {
  unsigned char *b = p;
  while (n) {
    int r = tt_client_read_some(c, b, n);
    if (r <= 0) return -1;
    b += r;
    n -= (size_t)r;
  }
  return 0;
}

void tt_client_close(struct tt_client *c) {
  if (!c->inited) {
    if (c->fd > 0) close(c->fd);
    return;
  }
  mbedtls_ssl_close_notify(&c->ssl);
  close(c->fd);
  mbedtls_ssl_free(&c->ssl);
  mbedtls_ssl_config_free(&c->conf);
  mbedtls_x509_crt_free(&c->ca);
  mbedtls_ctr_drbg_free(&c->drbg);
  mbedtls_entropy_free(&c->entropy);
  c->inited = false;
  c->fd = -1;
}
