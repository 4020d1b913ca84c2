/* selfsigned: the certificate the embedded DERP relay falls back to when no
 * tls_cert_path/tls_key_path is configured (see tls.h). Clients learn to
 * skip verification for it from the DERP map (InsecureForTests), so the
 * certificate only has to be a well-formed X.509 v3 leaf: ECDSA P-256,
 * SAN = the host clients dial, valid for about ten years. It is kept on
 * disk so a restart presents the same certificate. */
#include "tls/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <mbedtls/bignum.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>

#define PEM_MAX 4096
#define VALID_DAYS 3650

static int mbed_fail(struct tc_err *err, int code, const char *what, int mrc) {
  char buf[160];
  mbedtls_strerror(mrc, buf, sizeof buf);
  return tc_err_set(err, code, "self-signed certificate: %s: %s (-0x%04x)", what, buf, (unsigned)-mrc);
}

/* DER length octets (short or long form) appended at *pos. */
static void der_len(unsigned char *out, size_t *pos, size_t len) {
  if (len < 0x80) {
    out[(*pos)++] = (unsigned char)len;
  } else if (len < 0x100) {
    out[(*pos)++] = 0x81;
    out[(*pos)++] = (unsigned char)len;
  } else {
    out[(*pos)++] = 0x82;
    out[(*pos)++] = (unsigned char)(len >> 8);
    out[(*pos)++] = (unsigned char)len;
  }
}

/* subjectAltName value: SEQUENCE { dNSName [2] | iPAddress [7] }. mbedTLS
 * 2.28 has no SAN writer, so the DER is built here. Returns the length. */
static size_t san_der(const char *host, unsigned char *out) {
  unsigned char ip[16];
  unsigned char tag;
  const unsigned char *val;
  size_t vlen;
  if (inet_pton(AF_INET, host, ip) == 1) {
    tag = 0x87, val = ip, vlen = 4;
  } else if (inet_pton(AF_INET6, host, ip) == 1) {
    tag = 0x87, val = ip, vlen = 16;
  } else {
    tag = 0x82, val = (const unsigned char *)host, vlen = strlen(host);
  }
  unsigned char inner[300];
  size_t n = 0;
  inner[n++] = tag;
  der_len(inner, &n, vlen);
  memcpy(inner + n, val, vlen);
  n += vlen;
  size_t pos = 0;
  out[pos++] = 0x30;
  der_len(out, &pos, n);
  memcpy(out + pos, inner, n);
  return pos + n;
}

static void gen_time(time_t t, char out[16]) {
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(out, 16, "%Y%m%d%H%M%S", &tm);
}

/* Both files parse and belong together: reuse them. */
static bool usable(const char *cert_path, const char *key_path) {
  mbedtls_x509_crt crt;
  mbedtls_pk_context key;
  mbedtls_x509_crt_init(&crt);
  mbedtls_pk_init(&key);
  bool ok = mbedtls_x509_crt_parse_file(&crt, cert_path) == 0 && mbedtls_pk_parse_keyfile(&key, key_path, NULL) == 0 &&
            mbedtls_pk_check_pair(&crt.pk, &key) == 0 && mbedtls_x509_time_is_future(&crt.valid_to);
  mbedtls_x509_crt_free(&crt);
  mbedtls_pk_free(&key);
  return ok;
}

/* Creates the directory of path (one level, 0700) if it is missing. */
static int ensure_parent(const char *path, struct tc_err *err) {
  const char *slash = strrchr(path, '/');
  if (!slash || slash == path) return 0;
  char *dir = tc_xstrndup(path, (size_t)(slash - path));
  int rc = 0;
  if (mkdir(dir, 0700) && errno != EEXIST)
    rc = tc_err_set(err, TC_EIO, "self-signed certificate: mkdir %s: %s", dir, strerror(errno));
  free(dir);
  return rc;
}

int tc_tls_generate_self_signed(const char *host, const char *cert_path, const char *key_path, bool *created,
                                struct tc_err *err) {
  if (created) *created = false;
  if (!host || !*host || strlen(host) > 253 || !cert_path || !*cert_path || !key_path || !*key_path)
    return tc_err_set(err, TC_EINVAL, "self-signed certificate: host and both paths are required");
  if (!access(cert_path, F_OK) || !access(key_path, F_OK)) {
    if (usable(cert_path, key_path)) return TC_OK;
    tc_warn("self-signed certificate %s / %s is unusable (unparsable, mismatched or expired); replacing it",
            cert_path, key_path);
  }
  int rc = TC_OK, mrc;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_pk_context key;
  mbedtls_x509write_cert crt;
  mbedtls_mpi serial;
  mbedtls_entropy_init(&entropy);
  mbedtls_ctr_drbg_init(&drbg);
  mbedtls_pk_init(&key);
  mbedtls_x509write_crt_init(&crt);
  mbedtls_mpi_init(&serial);
  unsigned char *keypem = tc_xcalloc(1, PEM_MAX);
  unsigned char *crtpem = tc_xcalloc(1, PEM_MAX);
  static const char pers[] = "tailcoat-selfsigned";

  if ((mrc = mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, (const unsigned char *)pers,
                                   sizeof pers - 1))) {
    rc = mbed_fail(err, TC_EIO, "seeding the RNG", mrc);
    goto out;
  }
  if ((mrc = mbedtls_pk_setup(&key, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY))) ||
      (mrc = mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(key), mbedtls_ctr_drbg_random, &drbg))) {
    rc = mbed_fail(err, TC_EIO, "generating the P-256 key", mrc);
    goto out;
  }
  /* 128-bit positive serial: distinct certificates across regenerations. */
  unsigned char sbytes[16];
  tc_random(sbytes, sizeof sbytes);
  sbytes[0] &= 0x7f;
  sbytes[0] |= 0x01;
  char nb[16], na[16];
  time_t now = time(NULL);
  gen_time(now - 86400, nb); /* a day of slack for clients with a late clock */
  gen_time(now + (time_t)VALID_DAYS * 86400, na);
  unsigned char san[320];
  size_t sanlen = san_der(host, san);
  mbedtls_x509write_crt_set_version(&crt, MBEDTLS_X509_CRT_VERSION_3);
  mbedtls_x509write_crt_set_md_alg(&crt, MBEDTLS_MD_SHA256);
  mbedtls_x509write_crt_set_subject_key(&crt, &key);
  mbedtls_x509write_crt_set_issuer_key(&crt, &key);
  if ((mrc = mbedtls_mpi_read_binary(&serial, sbytes, sizeof sbytes)) ||
      (mrc = mbedtls_x509write_crt_set_serial(&crt, &serial)) ||
      (mrc = mbedtls_x509write_crt_set_validity(&crt, nb, na)) ||
      /* the host goes only into the SAN: a CN built from it could need escaping */
      (mrc = mbedtls_x509write_crt_set_subject_name(&crt, "CN=tailcoat embedded DERP,O=tailcoat self-signed")) ||
      (mrc = mbedtls_x509write_crt_set_issuer_name(&crt, "CN=tailcoat embedded DERP,O=tailcoat self-signed")) ||
      (mrc = mbedtls_x509write_crt_set_basic_constraints(&crt, 0, -1)) ||
      (mrc = mbedtls_x509write_crt_set_key_usage(&crt, MBEDTLS_X509_KU_DIGITAL_SIGNATURE)) ||
      (mrc = mbedtls_x509write_crt_set_subject_key_identifier(&crt)) ||
      (mrc = mbedtls_x509write_crt_set_extension(&crt, MBEDTLS_OID_SUBJECT_ALT_NAME,
                                                 MBEDTLS_OID_SIZE(MBEDTLS_OID_SUBJECT_ALT_NAME), 0, san, sanlen))) {
    rc = mbed_fail(err, TC_EIO, "building the certificate", mrc);
    goto out;
  }
  if ((mrc = mbedtls_x509write_crt_pem(&crt, crtpem, PEM_MAX, mbedtls_ctr_drbg_random, &drbg))) {
    rc = mbed_fail(err, TC_EIO, "signing the certificate", mrc);
    goto out;
  }
  if ((mrc = mbedtls_pk_write_key_pem(&key, keypem, PEM_MAX))) {
    rc = mbed_fail(err, TC_EIO, "encoding the key", mrc);
    goto out;
  }
  if ((rc = ensure_parent(key_path, err)) || (rc = ensure_parent(cert_path, err))) goto out;
  /* key first: a crash in between leaves a key without a certificate, which
   * the next start replaces as unusable */
  if ((rc = tc_write_file_atomic(key_path, keypem, strlen((char *)keypem), 0600, err))) goto out;
  if ((rc = tc_write_file_atomic(cert_path, crtpem, strlen((char *)crtpem), 0644, err))) goto out;
  if (created) *created = true;
out:
  tc_wipe(keypem, PEM_MAX);
  free(keypem);
  free(crtpem);
  mbedtls_mpi_free(&serial);
  mbedtls_x509write_crt_free(&crt);
  mbedtls_pk_free(&key);
  mbedtls_ctr_drbg_free(&drbg);
  mbedtls_entropy_free(&entropy);
  return rc;
}
