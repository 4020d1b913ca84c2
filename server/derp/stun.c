/* stun: the binding-request parser, the response writer (doc §12) and a UDP
 * server thread. The parser is as strict as Tailscale's own server (SOFTWARE
 * "tailnode", verifying FINGERPRINT last) so that tailcoat is not an open
 * STUN reflector for other software. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "derp/derp.h"

static const uint8_t k_cookie[4] = {0x21, 0x12, 0xa4, 0x42};

static uint32_t crc32_ieee(const uint8_t *p, size_t n) {
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
  }
  return ~c;
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

int tc_stun_parse_binding_request(const uint8_t *b, size_t n, uint8_t txid[12]) {
  if (n < 20 || (b[0] & 0xc0) != 0 || memcmp(b + 4, k_cookie, 4) != 0) return TC_EPROTO;
  if (b[0] != 0x00 || b[1] != 0x01) return TC_EPROTO;
  /* the header's length must match the datagram exactly */
  if ((size_t)be16(b + 2) != n - 20) return TC_EPROTO;
  bool software_ok = false;
  uint16_t last = 0;
  uint32_t got_fp = 0;
  size_t last_off = 0;
  const uint8_t *a = b + 20;
  size_t left = n - 20;
  while (left) {
    if (left < 4) return TC_EPROTO;
    uint16_t type = be16(a), alen = be16(a + 2);
    size_t padded = ((size_t)alen + 3) & ~(size_t)3;
    if (padded > left - 4) return TC_EPROTO;
    if (type == 0x8022 && alen == 8 && !memcmp(a + 4, "tailnode", 8)) software_ok = true;
    if (type == 0x8028 && alen == 4)
      got_fp = (uint32_t)a[4] << 24 | (uint32_t)a[5] << 16 | (uint32_t)a[6] << 8 | a[7];
    last = type;
    last_off = (size_t)(a - b);
    a += 4 + padded;
    left -= 4 + padded;
  }
  if (!software_ok || last != 0x8028) return TC_EPROTO;
  if (last_off != n - 8) return TC_EPROTO;
  if (got_fp != (crc32_ieee(b, n - 8) ^ 0x5354554eu)) return TC_EPROTO;
  memcpy(txid, b + 8, 12);
  return 0;
}

size_t tc_stun_response(const uint8_t txid[12], const struct sockaddr *addr, uint8_t out[44]) {
  uint8_t ip[16];
  size_t iplen;
  uint16_t port;
  if (addr->sa_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
    memcpy(ip, &a->sin_addr, 4);
    iplen = 4;
    port = ntohs(a->sin_port);
  } else if (addr->sa_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)addr;
    port = ntohs(a->sin6_port);
    if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr)) {
      memcpy(ip, (const uint8_t *)&a->sin6_addr + 12, 4);
      iplen = 4;
    } else {
      memcpy(ip, &a->sin6_addr, 16);
      iplen = 16;
    }
  } else {
    return 0;
  }
  size_t alen = 8 + iplen; /* attribute header 4 + reserved/family/port 4 + address */
  out[0] = 0x01;
  out[1] = 0x01;
  out[2] = 0;
  out[3] = (uint8_t)alen;
  memcpy(out + 4, k_cookie, 4);
  memcpy(out + 8, txid, 12);
  uint8_t *p = out + 20;
  p[0] = 0x00;
  p[1] = 0x20;
  p[2] = 0;
  p[3] = (uint8_t)(4 + iplen);
  p[4] = 0;
  p[5] = iplen == 4 ? 1 : 2;
  uint16_t xp = port ^ 0x2112;
  p[6] = (uint8_t)(xp >> 8);
  p[7] = (uint8_t)xp;
  for (size_t i = 0; i < iplen; i++) p[8 + i] = ip[i] ^ (i < 4 ? k_cookie[i] : txid[i - 4]);
  return 20 + alen;
}

struct tc_stun_server {
  int fd, wake_fd, port;
  pthread_t thr;
  bool started;
  pthread_mutex_t mu;
  bool stop;
  struct tc_stun_stats st;
};

static void *stun_thread(void *arg) {
  struct tc_stun_server *s = arg;
  uint8_t buf[2048], resp[44], txid[12];
  for (;;) {
    struct pollfd pf[2] = {{.fd = s->fd, .events = POLLIN}, {.fd = s->wake_fd, .events = POLLIN}};
    if (poll(pf, 2, -1) < 0 && errno != EINTR) break;
    if (pf[1].revents) break;
    if (!(pf[0].revents & POLLIN)) continue;
    for (int i = 0; i < 64; i++) {
      struct sockaddr_storage from;
      socklen_t fl = sizeof from;
      ssize_t n = recvfrom(s->fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
      if (n < 0) break;
      int ok = tc_stun_parse_binding_request(buf, (size_t)n, txid);
      size_t rl = ok == 0 ? tc_stun_response(txid, (struct sockaddr *)&from, resp) : 0;
      pthread_mutex_lock(&s->mu);
      if (ok == 0) s->st.requests++;
      else s->st.bad_packets++;
      pthread_mutex_unlock(&s->mu);
      if (!rl) continue;
      if (sendto(s->fd, resp, rl, MSG_DONTWAIT, (struct sockaddr *)&from, fl) == (ssize_t)rl) {
        pthread_mutex_lock(&s->mu);
        s->st.replies++;
        pthread_mutex_unlock(&s->mu);
      }
    }
  }
  return NULL;
}

int tc_stun_server_new(const char *listen_addr, struct tc_stun_server **out, struct tc_err *err) {
  *out = NULL;
  if (!listen_addr || !*listen_addr) return tc_err_set(err, TC_EINVAL, "stun: listen address is empty");
  const char *colon = strrchr(listen_addr, ':');
  if (!colon) return tc_err_set(err, TC_EINVAL, "stun: %s: missing port", listen_addr);
  char host[80];
  size_t hl = (size_t)(colon - listen_addr);
  if (hl >= sizeof host) return tc_err_set(err, TC_EINVAL, "stun: %s: host too long", listen_addr);
  memcpy(host, listen_addr, hl);
  host[hl] = 0;
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (!colon[1] || *end || port < 0 || port > 65535)
    return tc_err_set(err, TC_EINVAL, "stun: %s: bad port", listen_addr);
  char *h = host;
  if (*h == '[') {
    size_t l = strlen(h);
    if (l < 2 || h[l - 1] != ']') return tc_err_set(err, TC_EINVAL, "stun: %s: bad host", listen_addr);
    h[l - 1] = 0;
    h++;
  }
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
  /* Like Go's "udp" network, a wildcard host means both families. */
  bool dual = !*h || !strcmp(h, "0.0.0.0") || !strcmp(h, "::");
  int fam;
  socklen_t sl;
  if (dual) {
    fam = AF_INET6;
    a6->sin6_family = AF_INET6;
    a6->sin6_addr = in6addr_any;
    a6->sin6_port = htons((uint16_t)port);
    sl = sizeof *a6;
  } else if (inet_pton(AF_INET, h, &a4->sin_addr) == 1) {
    fam = AF_INET;
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    sl = sizeof *a4;
  } else if (inet_pton(AF_INET6, h, &a6->sin6_addr) == 1) {
    fam = AF_INET6;
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((uint16_t)port);
    sl = sizeof *a6;
  } else {
    return tc_err_set(err, TC_EINVAL, "stun: %s: host must be an IP literal", listen_addr);
  }
  int fd = socket(fam, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0 && dual) {
    /* no IPv6 on this host: fall back to IPv4 only */
    fam = AF_INET;
    memset(&ss, 0, sizeof ss);
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    sl = sizeof *a4;
    dual = false;
    fd = socket(fam, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  }
  if (fd < 0) return tc_err_set(err, TC_EIO, "stun: socket: %s", strerror(errno));
  if (dual) {
    int zero = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
  }
  if (bind(fd, (struct sockaddr *)&ss, sl) != 0) {
    int e = errno;
    close(fd);
    return tc_err_set(err, TC_EIO, "stun: bind %s: %s", listen_addr, strerror(e));
  }
  struct tc_stun_server *s = tc_xcalloc(1, sizeof(*s));
  s->fd = fd;
  pthread_mutex_init(&s->mu, NULL);
  struct sockaddr_storage b;
  socklen_t bl = sizeof b;
  getsockname(fd, (struct sockaddr *)&b, &bl);
  s->port = b.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&b)->sin_port)
                                   : ntohs(((struct sockaddr_in6 *)&b)->sin6_port);
  s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (s->wake_fd < 0 || pthread_create(&s->thr, NULL, stun_thread, s) != 0) {
    tc_stun_server_free(s);
    return tc_err_set(err, TC_EINTERNAL, "stun: cannot start thread");
  }
  s->started = true;
  tc_info("stun: listening on %s (port %d)", listen_addr, s->port);
  *out = s;
  return 0;
}

int tc_stun_server_port(const struct tc_stun_server *s) { return s->port; }

void tc_stun_server_get_stats(struct tc_stun_server *s, struct tc_stun_stats *out) {
  pthread_mutex_lock(&s->mu);
  *out = s->st;
  pthread_mutex_unlock(&s->mu);
}

void tc_stun_server_free(struct tc_stun_server *s) {
  if (!s) return;
  if (s->started) {
    uint64_t one = 1;
    ssize_t r = write(s->wake_fd, &one, sizeof one);
    (void)r;
    pthread_join(s->thr, NULL);
  }
  if (s->wake_fd >= 0) close(s->wake_fd);
  close(s->fd);
  pthread_mutex_destroy(&s->mu);
  free(s);
}
