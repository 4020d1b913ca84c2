/* test_derp_oob: the pieces behind the out-of-the-box embedded relay, without
 * a server: the DERP map node for an http:// server_url served with a
 * self-signed certificate (IP literal hints, DERPPort, InsecureForTests
 * only when asked), and tc_tls_generate_self_signed
 * (creates, reuses byte for byte, replaces a broken pair, SAN per host kind,
 * key mode 0600). */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>

#include "base/base.h"
#include "derp/derp.h"
#include "tc_test.h"
#include "tls/tls.h"

static json_t *node_of(const struct tc_derpmap_params *p) {
  struct tc_err err = {0};
  json_t *r = tc_derpmap_embedded_region(p, &err);
  if (!r) {
    fprintf(stderr, "  %s\n", err.msg);
    return NULL;
  }
  json_t *n = json_incref(json_array_get(json_object_get(r, "Nodes"), 0));
  json_decref(r);
  return n;
}

static const char *str(json_t *n, const char *k) { return json_string_value(json_object_get(n, k)); }

TC_TEST(embedded_node_for_ip_literal_and_self_signed) {
  struct tc_derpmap_params p = {.embedded = true, .region_id = 999, .region_code = "tailcoat",
                                .region_name = "x", .server_url = "http://127.0.0.1:8080",
                                .stun_listen_addr = "0.0.0.0:3478", .insecure_tls = true};
  json_t *n = node_of(&p);
  TC_REQUIRE(n);
  TC_CHECK_STR(str(n, "HostName"), "127.0.0.1");
  TC_CHECK_STR(str(n, "IPv4"), "127.0.0.1");
  TC_CHECK_STR(str(n, "IPv6"), "none");
  TC_CHECK_INT(json_integer_value(json_object_get(n, "DERPPort")), 8080);
  TC_CHECK_INT(json_integer_value(json_object_get(n, "STUNPort")), 3478);
  TC_CHECK(json_is_true(json_object_get(n, "InsecureForTests")));
  json_decref(n);

  /* the serialized map carries the flag under Go's field name */
  struct tc_derpmap *dm = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_derpmap_new(&p, &dm, &err) == 0);
  char *js = tc_derpmap_json(dm);
  TC_CHECK(strstr(js, "\"InsecureForTests\":true") != NULL);
  free(js);
  tc_derpmap_free(dm);

  /* IPv6 literal: the other family is switched off */
  p.server_url = "http://[::1]:9000";
  n = node_of(&p);
  TC_REQUIRE(n);
  TC_CHECK_STR(str(n, "HostName"), "::1");
  TC_CHECK_STR(str(n, "IPv6"), "::1");
  TC_CHECK_STR(str(n, "IPv4"), "none");
  json_decref(n);

  /* explicit hints win over the literal */
  p.ipv4 = "192.0.2.7";
  p.server_url = "http://127.0.0.1:8080";
  n = node_of(&p);
  TC_CHECK_STR(str(n, "IPv4"), "192.0.2.7");
  TC_CHECK(json_object_get(n, "IPv6") == NULL);
  json_decref(n);
  p.ipv4 = NULL;

  /* a DNS name gets no address hints */
  p.server_url = "http://derp.example:8080";
  n = node_of(&p);
  TC_CHECK_STR(str(n, "HostName"), "derp.example");
  TC_CHECK(json_object_get(n, "IPv4") == NULL && json_object_get(n, "IPv6") == NULL);
  TC_CHECK_INT(json_integer_value(json_object_get(n, "DERPPort")), 8080);
  json_decref(n);

  /* no port in the URL: the scheme's; without insecure_tls no flag */
  p.insecure_tls = false;
  p.server_url = "https://derp.example";
  n = node_of(&p);
  TC_CHECK_INT(json_integer_value(json_object_get(n, "DERPPort")), 443);
  TC_CHECK(json_object_get(n, "InsecureForTests") == NULL);
  json_decref(n);
  p.server_url = "http://derp.example";
  n = node_of(&p);
  TC_CHECK_INT(json_integer_value(json_object_get(n, "DERPPort")), 80);
  json_decref(n);
}

static unsigned char *read_all(const char *path, size_t *len) {
  char *d = NULL;
  if (tc_read_file(path, 1 << 20, &d, len, NULL)) return NULL;
  return (unsigned char *)d;
}

/* The SAN extension holds exactly this general name (tag + value). */
static bool san_has(const char *crt_path, unsigned char tag, const void *val, size_t vlen) {
  mbedtls_x509_crt c;
  mbedtls_x509_crt_init(&c);
  bool ok = false;
  if (mbedtls_x509_crt_parse_file(&c, crt_path) == 0 && (c.ext_types & MBEDTLS_X509_EXT_SUBJECT_ALT_NAME)) {
    unsigned char want[300];
    want[0] = tag;
    want[1] = (unsigned char)vlen;
    memcpy(want + 2, val, vlen);
    ok = memmem(c.raw.p, c.raw.len, want, vlen + 2) != NULL;
  }
  mbedtls_x509_crt_free(&c);
  return ok;
}

TC_TEST(self_signed_create_reuse_replace) {
  char *dir = tc_test_tmpdir();
  char crt[512], key[512];
  /* the directory does not exist yet */
  snprintf(crt, sizeof crt, "%s/sub/derp_selfsigned.crt", dir);
  snprintf(key, sizeof key, "%s/sub/derp_selfsigned.key", dir);
  struct tc_err err = {0};
  bool created = false;
  TC_REQUIRE(tc_tls_generate_self_signed("127.0.0.1", crt, key, &created, &err) == 0);
  TC_CHECK(created);
  struct stat st;
  TC_REQUIRE(stat(key, &st) == 0);
  TC_CHECK_INT(st.st_mode & 0777, 0600);
  static const unsigned char lo[4] = {127, 0, 0, 1};
  TC_CHECK(san_has(crt, 0x87, lo, 4));

  /* the pair belongs together and the certificate is a P-256 v3 leaf */
  mbedtls_x509_crt c;
  mbedtls_pk_context k;
  mbedtls_x509_crt_init(&c);
  mbedtls_pk_init(&k);
  TC_REQUIRE(mbedtls_x509_crt_parse_file(&c, crt) == 0);
  TC_REQUIRE(mbedtls_pk_parse_keyfile(&k, key, NULL) == 0);
  TC_CHECK(mbedtls_pk_check_pair(&c.pk, &k) == 0);
  TC_CHECK(mbedtls_pk_get_type(&c.pk) == MBEDTLS_PK_ECKEY);
  TC_CHECK_INT(mbedtls_pk_get_bitlen(&c.pk), 256);
  TC_CHECK_INT(c.version, 3);
  TC_CHECK(c.valid_to.year - c.valid_from.year >= 9);
  TC_CHECK(!mbedtls_x509_time_is_future(&c.valid_from)); /* usable now */
  mbedtls_x509_crt_free(&c);
  mbedtls_pk_free(&k);

  /* reuse: same bytes, nothing created */
  size_t l1, l2;
  unsigned char *b1 = read_all(crt, &l1);
  TC_REQUIRE(tc_tls_generate_self_signed("127.0.0.1", crt, key, &created, &err) == 0);
  TC_CHECK(!created);
  unsigned char *b2 = read_all(crt, &l2);
  TC_CHECK(b1 && b2 && l1 == l2 && !memcmp(b1, b2, l1));
  free(b2);

  /* a broken certificate is replaced by a fresh pair */
  TC_REQUIRE(tc_write_file_atomic(crt, "garbage", 7, 0644, NULL) == 0);
  TC_REQUIRE(tc_tls_generate_self_signed("127.0.0.1", crt, key, &created, &err) == 0);
  TC_CHECK(created);
  b2 = read_all(crt, &l2);
  TC_CHECK(b2 && (l1 != l2 || memcmp(b1, b2, l1)));
  free(b2);
  free(b1);

  /* a key that does not belong to the certificate is replaced as well */
  char crt2[512], key2[512];
  snprintf(crt2, sizeof crt2, "%s/other.crt", dir);
  snprintf(key2, sizeof key2, "%s/other.key", dir);
  TC_REQUIRE(tc_tls_generate_self_signed("127.0.0.1", crt2, key2, NULL, &err) == 0);
  char *k2 = NULL;
  size_t k2l;
  TC_REQUIRE(tc_read_file(key2, 1 << 16, &k2, &k2l, NULL) == 0);
  TC_REQUIRE(tc_write_file_atomic(key, k2, k2l, 0600, NULL) == 0);
  free(k2);
  TC_REQUIRE(tc_tls_generate_self_signed("127.0.0.1", crt, key, &created, &err) == 0);
  TC_CHECK(created);

  /* DNS names and IPv6 literals land in the SAN with their own tags */
  snprintf(crt2, sizeof crt2, "%s/dns.crt", dir);
  snprintf(key2, sizeof key2, "%s/dns.key", dir);
  TC_REQUIRE(tc_tls_generate_self_signed("vpn.example.org", crt2, key2, NULL, &err) == 0);
  TC_CHECK(san_has(crt2, 0x82, "vpn.example.org", 15));
  snprintf(crt2, sizeof crt2, "%s/v6.crt", dir);
  snprintf(key2, sizeof key2, "%s/v6.key", dir);
  TC_REQUIRE(tc_tls_generate_self_signed("::1", crt2, key2, NULL, &err) == 0);
  unsigned char v6[16];
  inet_pton(AF_INET6, "::1", v6);
  TC_CHECK(san_has(crt2, 0x87, v6, 16));

  /* bad arguments */
  TC_CHECK_INT(tc_tls_generate_self_signed("", crt, key, NULL, &err), TC_EINVAL);
  TC_CHECK_INT(tc_tls_generate_self_signed("x", NULL, key, NULL, &err), TC_EINVAL);
  char longhost[300];
  memset(longhost, 'a', sizeof longhost - 1);
  longhost[sizeof longhost - 1] = 0;
  TC_CHECK_INT(tc_tls_generate_self_signed(longhost, crt2, key2, NULL, &err), TC_EINVAL);
  /* an unwritable place is an I/O error, not a crash */
  TC_CHECK(tc_tls_generate_self_signed("x", "/proc/nope/a.crt", "/proc/nope/a.key", NULL, &err) < 0);

  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  TC_CHECK_INT(system(cmd), 0);
  free(dir);
}
