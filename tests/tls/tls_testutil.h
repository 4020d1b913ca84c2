/* tls_testutil: test-only helpers shared by tests/tls and tests/derp —
 * certificate generation with mbedTLS (CA -> leaf chains, written as PEM
 * files at test time) and a small blocking mbedTLS client. */
#ifndef TC_TLS_TESTUTIL_H
#define TC_TLS_TESTUTIL_H

#include <stddef.h>
#include <stdbool.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

/* Writes <dir>/<name>-ca.pem (the CA certificate), <dir>/<name>-chain.pem
 * (leaf, then CA) and <dir>/<name>-key.pem (the leaf's EC P-256 key). The
 * leaf's CN is `cn`. Paths are owned by the caller. 0 or -1. */
int tt_make_chain(const char *dir, const char *name, const char *cn, char **ca_path, char **chain_path,
                  char **key_path);

struct tt_client {
  int fd;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_x509_crt ca;
  mbedtls_ssl_config conf;
  mbedtls_ssl_context ssl;
  bool inited;
  unsigned verify_flags; /* after the handshake */
};

/* Connects to 127.0.0.1:port and runs a TLS handshake verifying the server
 * against ca_path with hostname `host`. Returns 0, or the mbedTLS error. */
int tt_client_connect(struct tt_client *c, int port, const char *ca_path, const char *host);
/* Blocking write/read of exactly n bytes: 0 or -1. */
int tt_client_write(struct tt_client *c, const void *p, size_t n);
int tt_client_read(struct tt_client *c, void *p, size_t n);
/* One read of up to n bytes: bytes, 0 on EOF, <0 on error. */
int tt_client_read_some(struct tt_client *c, void *p, size_t n);
void tt_client_close(struct tt_client *c);

#endif
