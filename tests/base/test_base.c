/* Unit tests for server/base: buffers, time and duration text, hex. */
#include "tc_test.h"
#include "base/base.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

TC_TEST(buf_grows_and_consumes) {
  struct tc_buf b = TC_BUF_INIT;
  for (int i = 0; i < 1000; i++) tc_buf_printf(&b, "%d,", i);
  TC_CHECK(tc_str_has_prefix(b.data, "0,1,2,"));
  size_t n = b.len;
  tc_buf_consume(&b, 2);
  TC_CHECK_INT(b.len, n - 2);
  TC_CHECK(tc_str_has_prefix(b.data, "1,2,"));
  size_t len;
  char *s = tc_buf_steal(&b, &len);
  TC_CHECK_INT(len, n - 2);
  TC_CHECK(b.data == NULL);
  free(s);
}

TC_TEST(time_round_trip) {
  int64_t t;
  TC_CHECK_INT(tc_time_parse("2026-08-01T12:00:00Z", &t), 0);
  TC_CHECK_INT(t, 1785585600);
  char out[32];
  TC_CHECK_STR(tc_time_format(t, out), "2026-08-01T12:00:00Z");
  TC_CHECK_INT(tc_time_parse("0001-01-01T00:00:00Z", &t), 0);
  TC_CHECK_INT(t, 0);
  TC_CHECK_INT(tc_time_parse("1970-01-01T00:02:03Z", &t), 0);
  TC_CHECK_INT(t, 123);
  TC_CHECK_INT(tc_time_parse("2026-08-01T14:00:00.123456+02:00", &t), 0);
  TC_CHECK_INT(t, 1785585600);
  TC_CHECK(tc_time_parse("2026-13-01T00:00:00Z", &t) < 0);
  TC_CHECK(tc_time_parse("2026-08-01T12:00:00", &t) < 0);
  TC_CHECK(tc_time_parse("", &t) < 0);
}

TC_TEST(durations) {
  int64_t ms;
  TC_CHECK_INT(tc_duration_parse("1h30m", &ms), 0);
  TC_CHECK_INT(ms, 5400000);
  TC_CHECK_INT(tc_duration_parse("500ms", &ms), 0);
  TC_CHECK_INT(ms, 500);
  TC_CHECK_INT(tc_duration_parse("90d", &ms), 0);
  TC_CHECK_INT(ms, 90LL * 86400000);
  TC_CHECK_INT(tc_duration_parse("0", &ms), 0);
  TC_CHECK_INT(ms, 0);
  TC_CHECK(tc_duration_parse("10x", &ms) < 0);
  TC_CHECK(tc_duration_parse("h", &ms) < 0);
  char out[48];
  TC_CHECK_STR(tc_duration_format(5400000, out), "1h30m0s");
  TC_CHECK_STR(tc_duration_format(1500, out), "1.5s");
  TC_CHECK_STR(tc_duration_format(0, out), "0s");
  TC_CHECK_STR(tc_duration_format(1800000, out), "30m0s");
  TC_CHECK_STR(tc_duration_format(1, out), "0.001s");
  TC_CHECK_STR(tc_duration_format(61010, out), "1m1.01s");
}

TC_TEST(hex_and_random) {
  uint8_t in[4] = {0xde, 0xad, 0xbe, 0xef}, out[4];
  char hex[9];
  tc_hex_encode(in, 4, hex);
  TC_CHECK_STR(hex, "deadbeef");
  TC_CHECK_INT(tc_hex_decode("DEADbeef", 8, out, 4), 0);
  TC_CHECK(!memcmp(in, out, 4));
  TC_CHECK(tc_hex_decode("deadbee", 7, out, 4) < 0);
  TC_CHECK(tc_hex_decode("deadbeeg", 8, out, 4) < 0);
  char *a = tc_random_token(16), *b = tc_random_token(16);
  TC_CHECK_INT(strlen(a), 26);
  TC_CHECK(strcmp(a, b) != 0);
  free(a);
  free(b);
}

/* The front door sets the TCP options once on its listening socket and the
 * control transport skips its own setsockopt calls when a connection has
 * them: that relies on the kernel copying them into accepted sockets. */
TC_TEST(tcp_options_are_inherited_from_the_listener) {
  int l = socket(AF_INET, SOCK_STREAM, 0);
  TC_REQUIRE(l >= 0);
  TC_CHECK(!tc_tcp_tuned(l));
  tc_tcp_tune(l);
  TC_CHECK(tc_tcp_tuned(l));
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof a;
  TC_REQUIRE(bind(l, (struct sockaddr *)&a, sizeof a) == 0 && listen(l, 4) == 0);
  TC_REQUIRE(getsockname(l, (struct sockaddr *)&a, &sl) == 0);
  int c = socket(AF_INET, SOCK_STREAM, 0);
  TC_REQUIRE(c >= 0 && connect(c, (struct sockaddr *)&a, sizeof a) == 0);
  TC_CHECK(!tc_tcp_tuned(c)); /* a socket of its own has the defaults */
  int s = accept(l, NULL, NULL);
  TC_REQUIRE(s >= 0);
  TC_CHECK(tc_tcp_tuned(s));
  int v = 0;
  socklen_t vl = sizeof v;
  TC_CHECK(getsockopt(s, IPPROTO_TCP, TCP_NODELAY, &v, &vl) == 0 && v == 1);
  TC_CHECK(getsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &v, &vl) == 0 && v == 1);
  int u[2];
  TC_REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, u) == 0);
  tc_tcp_tune(u[0]); /* fails harmlessly */
  TC_CHECK(!tc_tcp_tuned(u[0]));
  close(u[0]);
  close(u[1]);
  close(s);
  close(c);
  close(l);
}

TC_TEST(strndup_copies_binary) {
  char *b = tc_xstrndup("ab\0cdef", 5);
  TC_CHECK(!memcmp(b, "ab\0cd", 5));
  TC_CHECK_INT(b[5], 0);
  free(b);
}
