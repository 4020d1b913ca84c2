/* test_derp_fuzz: seeded random input against the parsers and the live
 * relay — random DERP frames (types, lengths near the limits, truncation)
 * from many connections, random STUN datagrams, mutated DERP maps. The
 * properties: no crash or sanitizer report, the server keeps serving a
 * well-behaved pair, and its gauges return to zero when everyone leaves. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sodium.h>

#include "base/base.h"
#include "derp/derp.h"
#include "tc_test.h"

__attribute__((constructor)) static void ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (uint32_t)(g_rng >> 11);
}

static int put_frame(uint8_t *b, uint8_t type, uint32_t len) {
  b[0] = type, b[1] = (uint8_t)(len >> 24), b[2] = (uint8_t)(len >> 16), b[3] = (uint8_t)(len >> 8);
  b[4] = (uint8_t)len;
  return 5;
}

/* A connection with a real handshake done (ServerInfo read), or -1. */
static int login(struct tc_derp_server *srv, uint8_t pub_out[32]) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) return -1;
  struct timeval tv = {.tv_sec = 3};
  setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (tc_derp_server_accept(srv, sv[1], "fuzz", 0, true) != 0) return -1;
  uint8_t sk[45];
  if (recv(sv[0], sk, 45, MSG_WAITALL) != 45) return -1;
  uint8_t priv[32], pub[32];
  randombytes_buf(priv, 32);
  crypto_scalarmult_base(pub, priv);
  const char *js = "{}";
  uint8_t f[5 + 32 + 24 + 16 + 2];
  put_frame(f, TC_DERP_FRAME_CLIENT_INFO, sizeof f - 5);
  memcpy(f + 5, pub, 32);
  randombytes_buf(f + 37, 24);
  if (crypto_box_easy(f + 61, (const uint8_t *)js, 2, f + 37, sk + 13, priv)) return -1;
  if (send(sv[0], f, sizeof f, MSG_NOSIGNAL) != (ssize_t)sizeof f) return -1;
  uint8_t h[5], body[256];
  if (recv(sv[0], h, 5, MSG_WAITALL) != 5 || h[0] != TC_DERP_FRAME_SERVER_INFO) return -1;
  if (recv(sv[0], body, h[4], MSG_WAITALL) != h[4]) return -1;
  if (pub_out) memcpy(pub_out, pub, 32);
  return sv[0];
}

static bool ping_ok(int fd) {
  uint8_t f[13];
  put_frame(f, TC_DERP_FRAME_PING, 8);
  memcpy(f + 5, "fuzzping", 8);
  if (send(fd, f, 13, MSG_NOSIGNAL) != 13) return false;
  for (int i = 0; i < 1000; i++) {
    uint8_t h[5], b[70000];
    if (recv(fd, h, 5, MSG_WAITALL) != 5) return false;
    uint32_t l = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
    if (l > sizeof b || (l && recv(fd, b, l, MSG_WAITALL) != (ssize_t)l)) return false;
    if (h[0] == TC_DERP_FRAME_PONG) return l == 8 && !memcmp(b, "fuzzping", 8);
  }
  return false;
}

TC_TEST(random_frames_against_the_relay) {
  TC_REQUIRE(sodium_init() >= 0);
  uint8_t key[32];
  randombytes_buf(key, 32);
  struct tc_derp_server_params p = {.private_key = key, .handshake_timeout_ms = 500};
  struct tc_derp_server *srv = NULL;
  struct tc_err err;
  TC_REQUIRE(tc_derp_server_new(&p, &srv, &err) == 0);
  uint8_t good_pub[32];
  int good = login(srv, good_pub);
  TC_REQUIRE(good >= 0);
  static uint8_t buf[TC_DERP_MAX_FRAME + 64];
  static const uint8_t types[] = {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a,
                                  0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x7f, 0xff};
  static const uint32_t lens[] = {0, 1, 7, 8, 31, 32, 33, 55, 56, 57, 999, 1000, 1001, 65568, 65569,
                                  262144, 262145, 1048576, 1048577, 0xffffffffu};
  for (int round = 0; round < 60; round++) {
    bool logged = rnd() % 3 != 0;
    int fd;
    if (logged) {
      fd = login(srv, NULL);
    } else {
      int sv[2];
      socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
      tc_derp_server_accept(srv, sv[1], "fuzz", 0, rnd() % 2);
      fd = sv[0];
    }
    TC_REQUIRE(fd >= 0);
    int nframes = 1 + (int)(rnd() % 6);
    for (int i = 0; i < nframes; i++) {
      uint8_t t = types[rnd() % sizeof types];
      uint32_t l = lens[rnd() % TC_ARRAY_LEN(lens)];
      size_t body = l > sizeof buf - 5 ? (size_t)(rnd() % 100) : (rnd() % 4 ? l : (size_t)(rnd() % (l + 1)));
      int hl = put_frame(buf, t, l);
      if (t == TC_DERP_FRAME_SEND_PACKET && body >= 32 && rnd() % 2) memcpy(buf + 5, good_pub, 32);
      else for (size_t j = 0; j < TC_MIN(body, (size_t)64); j++) buf[hl + j] = (uint8_t)rnd();
      (void)send(fd, buf, hl + body, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    close(fd);
    if (round % 10 == 9) TC_CHECK(ping_ok(good));
  }
  TC_CHECK(ping_ok(good));
  close(good);
  /* everyone left: the gauges must come back to zero */
  struct tc_derp_metrics m;
  for (int i = 0; i < 3000; i++) { /* <= 30 s on a loaded machine */
    tc_derp_server_get_metrics(srv, &m);
    if (m.clients_connected == 0 && m.clients_handshaking == 0) break;
    usleep(10000);
  }
  TC_CHECK_INT(m.clients_connected, 0);
  TC_CHECK_INT(m.clients_handshaking, 0);
  TC_CHECK_INT(m.clients_home, 0);
  TC_CHECK_INT(m.clients_duplicate, 0);
  tc_derp_server_free(srv);
}

TC_TEST(random_stun_datagrams) {
  static const char *req = "000100142112a442101112131415161718191a1b802200087461696c6e6f646580280004ac276261";
  uint8_t base[40], b[128], txid[12];
  TC_REQUIRE(tc_hex_decode(req, 80, base, 40) == 0);
  int accepted = 0;
  for (int i = 0; i < 20000; i++) {
    size_t n = rnd() % 2 ? 40 : rnd() % 128;
    if (n <= 40) memcpy(b, base, n);
    else {
      memcpy(b, base, 40);
      for (size_t j = 40; j < n; j++) b[j] = (uint8_t)rnd();
    }
    int flips = (int)(rnd() % 4);
    for (int k = 0; k < flips && n; k++) b[rnd() % n] ^= (uint8_t)(1 + rnd() % 255);
    if (tc_stun_parse_binding_request(b, n, txid) == 0) {
      accepted++;
      /* whatever is accepted must be the exact well-formed request */
      TC_CHECK(n == 40 && !memcmp(b, base, 40));
    }
  }
  TC_CHECK(accepted > 0);
}

TC_TEST(mutated_derp_maps) {
  const char *seed =
      "{\"Regions\":{\"1\":{\"RegionID\":1,\"RegionCode\":\"a\",\"RegionName\":\"A\",\"Latitude\":1.5,"
      "\"Nodes\":[{\"Name\":\"1a\",\"RegionID\":1,\"HostName\":\"h\",\"STUNPort\":3478,\"CanPort80\":true}]},"
      "\"2\":null}}";
  const char *yseed = "regions:\n  1:\n    regionid: 1\n    nodes:\n      - name: x\n        stunport: 5\n  2: null\n";
  size_t n = strlen(seed), yn = strlen(yseed);
  char b[512];
  int ok = 0;
  for (int i = 0; i < 3000; i++) {
    bool yaml = i % 2;
    const char *s = yaml ? yseed : seed;
    size_t l = yaml ? yn : n;
    memcpy(b, s, l);
    int muts = 1 + (int)(rnd() % 3);
    for (int k = 0; k < muts && l > 0; k++) {
      size_t at = rnd() % l;
      switch (rnd() % 3) {
        case 0: b[at] = (char)(rnd() % 128); break;
        case 1: l = at; break;
        default: b[at] = "{}[]\":,0-9a\n "[rnd() % 13]; break;
      }
    }
    json_t *m = NULL;
    struct tc_err err;
    if (tc_derpmap_parse(b, l, yaml, &m, &err) == 0) {
      ok++;
      json_t *one[1] = {m};
      json_t *mm = tc_derpmap_merge(one, 1);
      char *d = tc_derpmap_dump(mm);
      /* whatever parses dumps to JSON that parses back to the same dump */
      json_t *back = NULL;
      TC_CHECK(tc_derpmap_parse(d, strlen(d), false, &back, &err) == 0);
      if (back) {
        json_t *two[1] = {back};
        json_t *mm2 = tc_derpmap_merge(two, 1);
        char *d2 = tc_derpmap_dump(mm2);
        TC_CHECK_STR(d2, d);
        free(d2);
        json_decref(mm2);
        json_decref(back);
      }
      free(d);
      json_decref(mm);
      json_decref(m);
    } else {
      TC_CHECK(m == NULL);
    }
  }
  TC_CHECK(ok > 0);
}
