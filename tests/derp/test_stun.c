/* test_stun: STUN packet functions against the doc §14.1 vectors, hostile
 * datagrams, and the UDP server answering from 127.0.0.1 and ::1. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/base.h"
#include "derp/derp.h"
#include "tc_test.h"

static size_t unhex(const char *s, uint8_t *out) {
  size_t n = strlen(s) / 2;
  return tc_hex_decode(s, n * 2, out, n) == 0 ? n : 0;
}

static const char *k_req = "000100142112a442101112131415161718191a1b802200087461696c6e6f646580280004ac276261";

TC_TEST(vectors) {
  uint8_t req[64], txid[12];
  size_t n = unhex(k_req, req);
  TC_REQUIRE(n == 40);
  TC_CHECK_INT(tc_stun_parse_binding_request(req, n, txid), 0);
  for (int i = 0; i < 12; i++) TC_CHECK_INT(txid[i], 0x10 + i);

  uint8_t out[44], want[64];
  char hex[100];
  struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(41641)};
  inet_pton(AF_INET, "203.0.113.7", &a4.sin_addr);
  size_t rl = tc_stun_response(txid, (struct sockaddr *)&a4, out);
  TC_CHECK_INT(rl, 32);
  tc_hex_encode(out, rl, hex);
  TC_CHECK_STR(hex, "0101000c2112a442101112131415161718191a1b00200008000183bbea12d545");

  struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(41641)};
  inet_pton(AF_INET6, "2001:db8::1", &a6.sin6_addr);
  rl = tc_stun_response(txid, (struct sockaddr *)&a6, out);
  TC_CHECK_INT(rl, 44);
  tc_hex_encode(out, rl, hex);
  TC_CHECK_STR(hex, "010100182112a442101112131415161718191a1b00200014000283bb0113a9fa101112131415161718191a1a");

  /* a v4-mapped v6 source is reported as plain IPv4 */
  inet_pton(AF_INET6, "::ffff:203.0.113.7", &a6.sin6_addr);
  rl = tc_stun_response(txid, (struct sockaddr *)&a6, out);
  TC_CHECK_INT(rl, 32);
  tc_hex_encode(out, rl, hex);
  TC_CHECK_STR(hex, "0101000c2112a442101112131415161718191a1b00200008000183bbea12d545");
  (void)want;
}

TC_TEST(hostile_requests_are_refused) {
  uint8_t req[64], b[128], txid[12];
  size_t n = unhex(k_req, req);
  /* every truncation */
  for (size_t i = 0; i < n; i++) TC_CHECK(tc_stun_parse_binding_request(req, i, txid) != 0);
  /* every single-bit flip (except inside the txid, which only the
   * fingerprint protects — and it must catch those too) */
  int accepted = 0;
  for (size_t i = 0; i < n; i++) {
    for (int bit = 0; bit < 8; bit++) {
      memcpy(b, req, n);
      b[i] ^= (uint8_t)(1 << bit);
      if (tc_stun_parse_binding_request(b, n, txid) == 0) accepted++;
    }
  }
  TC_CHECK_INT(accepted, 0);
  /* trailing garbage after the fingerprint */
  memcpy(b, req, n);
  b[n] = 0;
  TC_CHECK(tc_stun_parse_binding_request(b, n + 1, txid) != 0);
  /* header length claims more than the datagram */
  memcpy(b, req, n);
  b[3] = 0x40;
  TC_CHECK(tc_stun_parse_binding_request(b, n, txid) != 0);
  /* an attribute length running past the end */
  memcpy(b, req, n);
  b[23] = 0xff;
  TC_CHECK(tc_stun_parse_binding_request(b, n, txid) != 0);
  /* wrong software, recomputed fingerprint: still refused */
  static const char *other = "000100142112a442101112131415161718191a1b80220008";
  size_t m = unhex(other, b);
  memcpy(b + m, "othernod", 8);
  m += 8;
  TC_CHECK(tc_stun_parse_binding_request(b, m, txid) != 0);
  /* a binding response is not a request */
  uint8_t resp[44];
  struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(1)};
  size_t rl = tc_stun_response(req + 8, (struct sockaddr *)&a4, resp);
  TC_CHECK(tc_stun_parse_binding_request(resp, rl, txid) != 0);
  struct sockaddr_un_like {
    sa_family_t f;
  } bogus = {AF_UNIX};
  TC_CHECK_INT(tc_stun_response(txid, (struct sockaddr *)&bogus, resp), 0);
}

/* Sends the vector request from a socket bound to `local` and checks the
 * reply maps back to that socket's own address and port. */
static void roundtrip(int port, int fam, const char *local) {
  int fd = socket(fam, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  TC_REQUIRE(fd >= 0);
  struct sockaddr_storage ss = {0}, dst = {0};
  socklen_t sl;
  if (fam == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss, *d = (struct sockaddr_in *)&dst;
    a->sin_family = d->sin_family = AF_INET;
    inet_pton(AF_INET, local, &a->sin_addr);
    inet_pton(AF_INET, local, &d->sin_addr);
    d->sin_port = htons((uint16_t)port);
    sl = sizeof *a;
  } else {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss, *d = (struct sockaddr_in6 *)&dst;
    a->sin6_family = d->sin6_family = AF_INET6;
    inet_pton(AF_INET6, local, &a->sin6_addr);
    inet_pton(AF_INET6, local, &d->sin6_addr);
    d->sin6_port = htons((uint16_t)port);
    sl = sizeof *a;
  }
  TC_REQUIRE(bind(fd, (struct sockaddr *)&ss, sl) == 0);
  socklen_t bl = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &bl);
  uint16_t myport = fam == AF_INET ? ntohs(((struct sockaddr_in *)&ss)->sin_port)
                                   : ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  /* garbage first: no reply expected, and the server keeps going */
  TC_CHECK(sendto(fd, "hello", 5, 0, (struct sockaddr *)&dst, sl) == 5);
  uint8_t req[64], buf[128];
  size_t n = unhex(k_req, req);
  TC_CHECK(sendto(fd, req, n, 0, (struct sockaddr *)&dst, sl) == (ssize_t)n);
  struct pollfd pf = {.fd = fd, .events = POLLIN};
  TC_REQUIRE(poll(&pf, 1, 3000) == 1);
  ssize_t r = recv(fd, buf, sizeof buf, 0);
  TC_REQUIRE(r >= 32);
  TC_CHECK(buf[0] == 0x01 && buf[1] == 0x01);
  TC_CHECK(!memcmp(buf + 8, req + 8, 12));
  TC_CHECK(buf[20] == 0x00 && buf[21] == 0x20);
  uint16_t xport = (uint16_t)(buf[26] << 8 | buf[27]) ^ 0x2112;
  TC_CHECK_INT(xport, myport);
  if (fam == AF_INET) {
    TC_CHECK_INT(r, 32);
    TC_CHECK_INT(buf[25], 1);
    uint8_t ip[4], want[4];
    for (int i = 0; i < 4; i++) ip[i] = buf[28 + i] ^ req[4 + i];
    inet_pton(AF_INET, local, want);
    TC_CHECK(!memcmp(ip, want, 4));
  } else {
    TC_CHECK_INT(r, 44);
    TC_CHECK_INT(buf[25], 2);
    uint8_t ip[16], want[16];
    for (int i = 0; i < 16; i++) ip[i] = buf[28 + i] ^ (i < 4 ? req[4 + i] : req[8 + i - 4]);
    inet_pton(AF_INET6, local, want);
    TC_CHECK(!memcmp(ip, want, 16));
  }
  close(fd);
}

TC_TEST(server_dual_stack_loopback) {
  struct tc_stun_server *s = NULL;
  struct tc_err err = {0};
  TC_REQUIRE(tc_stun_server_new("[::]:0", &s, &err) == 0);
  int port = tc_stun_server_port(s);
  TC_CHECK(port > 0);
  roundtrip(port, AF_INET, "127.0.0.1");
  roundtrip(port, AF_INET6, "::1");
  struct tc_stun_stats st;
  /* the reply counter moves just after the datagram leaves */
  for (int i = 0; i < 3000; i++) { /* <= 30 s on a loaded machine */
    tc_stun_server_get_stats(s, &st);
    if (st.replies == 2) break;
    usleep(10000);
  }
  TC_CHECK_INT(st.requests, 2);
  TC_CHECK_INT(st.replies, 2);
  TC_CHECK_INT(st.bad_packets, 2);
  tc_stun_server_free(s);
  /* a specific v4 address binds v4 only */
  TC_REQUIRE(tc_stun_server_new("127.0.0.1:0", &s, &err) == 0);
  roundtrip(tc_stun_server_port(s), AF_INET, "127.0.0.1");
  tc_stun_server_free(s);
  TC_CHECK(tc_stun_server_new("bogus", &s, &err) != 0);
  TC_CHECK(tc_stun_server_new("host.example:3478", &s, &err) != 0);
  TC_CHECK(tc_stun_server_new("127.0.0.1:99999", &s, &err) != 0);
}
