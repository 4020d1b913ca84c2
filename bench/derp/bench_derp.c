/* bench_derp: M client pairs relaying packets through the embedded DERP
 * server on loopback, over plain TCP or TLS (tc_tls in front).
 *
 * Phase 1 (throughput): every sender writes packets to its receiver as fast
 * as TCP lets it for --seconds; receivers count what arrives.
 * Phase 2 (latency): every pair ping-pongs one packet at a time; the
 * receiver records one-way latency (send stamp to arrival, same clock), i.e.
 * the time the relay adds on loopback, at that concurrency.
 * Server CPU is the DERP thread's (plus the TLS thread's) CPU clock.
 *
 * Usage: bench_derp [--pairs M] [--tls] [--seconds S] [--size BYTES]
 *                   [--latency-rounds N] [--window PKTS]
 * --window bounds the packets in flight per pair (0 = unbounded blast);
 * --tls-threads sets tc_tls's epoll threads (default 1). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sodium.h>

#include "base/base.h"
#include "derp/derp.h"
#include "tls/tls.h"
#include "tls_testutil.h"

static struct tc_derp_server *g_srv;
static int g_port;
static bool g_tls;
static char *g_ca;
static int g_size = 1200;
static int g_tls_threads = 1;

/* ---- server side wiring: head reader -> tc_derp_server_accept ---- */

static void *head_thread(void *arg) {
  int fd = (int)(intptr_t)arg;
  char buf[4096];
  for (int i = 0; i < 500; i++) {
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    poll(&pf, 1, 10);
    ssize_t n = recv(fd, buf, sizeof buf - 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) break;
    if (n < 0) continue;
    buf[n] = 0;
    char *e = strstr(buf, "\r\n\r\n");
    if (e) {
      tc_derp_server_accept(g_srv, fd, "bench", (size_t)(e - buf) + 4, false);
      return NULL;
    }
  }
  close(fd);
  return NULL;
}

static void spawn_head(int fd) {
  pthread_t th;
  pthread_attr_t a;
  pthread_attr_init(&a);
  pthread_attr_setstacksize(&a, 64 * 1024);
  pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
  pthread_create(&th, &a, head_thread, (void *)(intptr_t)fd);
  pthread_attr_destroy(&a);
}

static void deliver(void *ctx, int fd, const char *peer) { spawn_head(fd); }

static void *plain_acceptor(void *arg) {
  int lfd = (int)(intptr_t)arg;
  for (;;) {
    struct pollfd pf = {.fd = lfd, .events = POLLIN};
    if (poll(&pf, 1, 200) <= 0) continue;
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    spawn_head(fd);
  }
  return NULL;
}

/* ---- a blocking DERP client ---- */

struct cl {
  int fd;
  struct tt_client tls;
  uint8_t priv[32], pub[32], srv[32];
  struct cl *peer;
  uint8_t *rbuf;
  _Atomic uint64_t recv_pkts;
  sem_t credits; /* sender side: packets it may still put in flight */
  uint64_t recv_bytes;
  int64_t *lat;
  size_t nlat, caplat;
};

static int cl_write(struct cl *c, const void *p, size_t n) {
  if (g_tls) return tt_client_write(&c->tls, p, n);
  const uint8_t *b = p;
  while (n) {
    ssize_t w = send(c->fd, b, n, MSG_NOSIGNAL);
    if (w <= 0) return -1;
    b += w;
    n -= (size_t)w;
  }
  return 0;
}

static int cl_read(struct cl *c, void *p, size_t n) {
  if (g_tls) return tt_client_read(&c->tls, p, n);
  uint8_t *b = p;
  while (n) {
    ssize_t r = recv(c->fd, b, n, 0);
    if (r <= 0) return -1;
    b += r;
    n -= (size_t)r;
  }
  return 0;
}

static int cl_frame(struct cl *c, uint8_t t, const void *a, size_t an, const void *b, size_t bn) {
  uint8_t *f = malloc(5 + an + bn);
  size_t n = an + bn;
  f[0] = t, f[1] = (uint8_t)(n >> 24), f[2] = (uint8_t)(n >> 16), f[3] = (uint8_t)(n >> 8), f[4] = (uint8_t)n;
  memcpy(f + 5, a, an);
  if (bn) memcpy(f + 5 + an, b, bn);
  int rc = cl_write(c, f, 5 + n);
  free(f);
  return rc;
}

/* Reads the next RecvPacket body into c->rbuf; returns its length or -1. */
static int cl_recv_packet(struct cl *c) {
  for (;;) {
    uint8_t h[5];
    if (cl_read(c, h, 5)) return -1;
    uint32_t l = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
    if (l > 70000) return -1;
    if (l && cl_read(c, c->rbuf, l)) return -1;
    if (h[0] == TC_DERP_FRAME_RECV_PACKET && l >= 32) return (int)l - 32;
  }
}

static int cl_connect(struct cl *c) {
  randombytes_buf(c->priv, 32);
  crypto_scalarmult_base(c->pub, c->priv);
  c->rbuf = malloc(70000);
  if (g_tls) {
    if (tt_client_connect(&c->tls, g_port, g_ca, "localhost")) return -1;
    int one = 1;
    setsockopt(c->tls.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = 30};
    setsockopt(c->tls.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  } else {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a)) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = 30};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  static const char req[] = "GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n";
  if (cl_write(c, req, sizeof req - 1)) return -1;
  char head[1024];
  size_t n = 0;
  while (n < 4 || memcmp(head + n - 4, "\r\n\r\n", 4)) {
    if (n + 1 >= sizeof head || cl_read(c, head + n, 1)) return -1;
    n++;
  }
  uint8_t sk[45];
  if (cl_read(c, sk, 45)) return -1;
  memcpy(c->srv, sk + 13, 32);
  const char *js = "{\"version\":2}";
  uint8_t ci[32 + 24 + 16 + 16];
  memcpy(ci, c->pub, 32);
  randombytes_buf(ci + 32, 24);
  if (crypto_box_easy(ci + 56, (const uint8_t *)js, strlen(js), ci + 32, c->srv, c->priv)) return -1;
  if (cl_frame(c, TC_DERP_FRAME_CLIENT_INFO, ci, 56 + 16 + strlen(js), NULL, 0)) return -1;
  uint8_t h[5];
  if (cl_read(c, h, 5) || h[0] != TC_DERP_FRAME_SERVER_INFO) return -1;
  uint32_t l = (uint32_t)h[3] << 8 | h[4];
  return cl_read(c, c->rbuf, l);
}

/* ---- phases ---- */

static atomic_bool g_run;
static int g_rounds = 200;

static int g_window = 128;

static void *sender(void *arg) {
  struct cl *c = arg;
  uint8_t *pkt = calloc(1, (size_t)g_size);
  while (atomic_load(&g_run)) {
    /* flow control: at most g_window packets in flight per pair (credits
     * come back as the receiver reads), so the bench measures what the
     * relay delivers instead of packets dropped from a full queue */
    if (g_window > 0) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 100 * 1000000;
      if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
      if (sem_timedwait(&c->credits, &ts) != 0) continue;
    }
    int64_t now = tc_mono_ns();
    memcpy(pkt, &now, 8);
    if (cl_frame(c, TC_DERP_FRAME_SEND_PACKET, c->peer->pub, 32, pkt, (size_t)g_size)) break;
  }
  free(pkt);
  return NULL;
}

static void *receiver(void *arg) {
  struct cl *c = arg;
  for (;;) {
    int n = cl_recv_packet(c);
    if (n < 0) break;
    atomic_fetch_add_explicit(&c->recv_pkts, 1, memory_order_relaxed);
    if (g_window > 0) sem_post(&c->peer->credits);
    c->recv_bytes += (uint64_t)n;
  }
  return NULL;
}

/* latency: A stamps and sends; B records arrival - stamp and echoes; A waits */
static void *ping_side(void *arg) {
  struct cl *c = arg;
  uint8_t *pkt = calloc(1, (size_t)g_size);
  for (int i = 0; i < g_rounds; i++) {
    int64_t now = tc_mono_ns();
    memcpy(pkt, &now, 8);
    if (cl_frame(c, TC_DERP_FRAME_SEND_PACKET, c->peer->pub, 32, pkt, (size_t)g_size)) break;
    if (cl_recv_packet(c) < 0) break;
  }
  free(pkt);
  return NULL;
}

static void *pong_side(void *arg) {
  struct cl *c = arg;
  for (int i = 0; i < g_rounds; i++) {
    int n = cl_recv_packet(c);
    if (n < 8) break;
    int64_t sent;
    memcpy(&sent, c->rbuf + 32, 8);
    if (c->nlat < c->caplat) c->lat[c->nlat++] = tc_mono_ns() - sent;
    if (cl_frame(c, TC_DERP_FRAME_SEND_PACKET, c->peer->pub, 32, c->rbuf + 32, (size_t)n)) break;
  }
  return NULL;
}

/* Baseline for "added" latency: the same ping-pong between the same kind of
 * threads over a direct socketpair, no relay. */
struct direct {
  int fd;
  int64_t *lat;
  size_t nlat;
};

static int full_io(int fd, void *p, size_t n, bool wr) {
  uint8_t *b = p;
  while (n) {
    ssize_t r = wr ? send(fd, b, n, MSG_NOSIGNAL) : recv(fd, b, n, 0);
    if (r <= 0) return -1;
    b += r;
    n -= (size_t)r;
  }
  return 0;
}

static void *direct_ping(void *arg) {
  struct direct *d = arg;
  uint8_t *pkt = calloc(1, (size_t)g_size);
  for (int i = 0; i < g_rounds; i++) {
    int64_t now = tc_mono_ns();
    memcpy(pkt, &now, 8);
    if (full_io(d->fd, pkt, (size_t)g_size, true) || full_io(d->fd, pkt, (size_t)g_size, false)) break;
  }
  free(pkt);
  return NULL;
}

static void *direct_pong(void *arg) {
  struct direct *d = arg;
  uint8_t *pkt = calloc(1, (size_t)g_size);
  for (int i = 0; i < g_rounds; i++) {
    if (full_io(d->fd, pkt, (size_t)g_size, false)) break;
    int64_t sent;
    memcpy(&sent, pkt, 8);
    d->lat[d->nlat++] = tc_mono_ns() - sent;
    if (full_io(d->fd, pkt, (size_t)g_size, true)) break;
  }
  free(pkt);
  return NULL;
}

static int cmp64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static pthread_t spawn(void *(*fn)(void *), void *arg) {
  pthread_t th;
  pthread_attr_t a;
  pthread_attr_init(&a);
  pthread_attr_setstacksize(&a, 256 * 1024);
  pthread_create(&th, &a, fn, arg);
  pthread_attr_destroy(&a);
  return th;
}

static void close_cl(struct cl *c) {
  if (g_tls) tt_client_close(&c->tls);
  else close(c->fd);
}

int main(int argc, char **argv) {
  int pairs = 10;
  double seconds = 3;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--pairs") && i + 1 < argc) pairs = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--tls")) g_tls = true;
    else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
    else if (!strcmp(argv[i], "--size") && i + 1 < argc) g_size = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--latency-rounds") && i + 1 < argc) g_rounds = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--window") && i + 1 < argc) g_window = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--tls-threads") && i + 1 < argc) g_tls_threads = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: %s [--pairs M] [--tls] [--seconds S] [--size BYTES] [--latency-rounds N] [--window PKTS] [--tls-threads N]\n", argv[0]);
      return 2;
    }
  }
  if (pairs < 1 || pairs > 5000 || g_size < 8 || g_size > TC_DERP_MAX_PACKET || seconds <= 0 || seconds > 120) {
    fprintf(stderr, "bad arguments\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  tc_log_set_level(TC_LOG_WARN);
  if (sodium_init() < 0) return 1;
  struct tc_err err = {0};
  uint8_t key[32];
  randombytes_buf(key, 32);
  /* queue depth high enough that a fast sender is paced by TCP, not drops */
  struct tc_derp_server_params sp = {.private_key = key, .queue_depth = 256, .max_clients = 20000};
  if (tc_derp_server_new(&sp, &g_srv, &err)) {
    fprintf(stderr, "%s\n", err.msg);
    return 1;
  }
  int lfd = tc_tls_listen_tcp("127.0.0.1:0", &g_port, &err);
  if (lfd < 0) {
    fprintf(stderr, "%s\n", err.msg);
    return 1;
  }
  struct tc_tls *tls = NULL;
  char *dir = NULL, *chain = NULL, *kp = NULL;
  if (g_tls) {
    char tmpl[] = "/tmp/bench-derp-XXXXXX";
    dir = tc_xstrdup(mkdtemp(tmpl));
    if (tt_make_chain(dir, "bench", "localhost", &g_ca, &chain, &kp)) return 1;
    struct tc_tls_params tp = {.cert_path = chain, .key_path = kp, .deliver = deliver, .max_conns = 20000,
                               .threads = g_tls_threads};
    if (tc_tls_new(&tp, &tls, &err) || tc_tls_add_listener(tls, lfd, &err)) {
      fprintf(stderr, "%s\n", err.msg);
      return 1;
    }
  } else {
    spawn(plain_acceptor, (void *)(intptr_t)lfd);
  }
  int n = 2 * pairs;
  struct cl *cls = calloc((size_t)n, sizeof *cls);
  int64_t t_conn = tc_mono_ms();
  int64_t hs_cpu0 = tls ? tc_tls_thread_cpu_ns(tls) : 0;
  for (int i = 0; i < n; i++) {
    if (cl_connect(&cls[i])) {
      fprintf(stderr, "client %d failed to connect\n", i);
      return 1;
    }
  }
  int64_t conn_ms = tc_mono_ms() - t_conn;
  double hs_cpu_ms = tls ? (double)(tc_tls_thread_cpu_ns(tls) - hs_cpu0) / 1e6 / n : 0;
  for (int i = 0; i < pairs; i++) {
    cls[2 * i].peer = &cls[2 * i + 1];
    cls[2 * i + 1].peer = &cls[2 * i];
    sem_init(&cls[2 * i].credits, 0, (unsigned)(g_window > 0 ? g_window : 0));
  }
  /* phase 1: throughput */
  pthread_t *th = calloc((size_t)n, sizeof *th);
  struct tc_derp_metrics m0, m1;
  tc_derp_server_get_metrics(g_srv, &m0);
  int64_t cpu0 = tc_derp_server_thread_cpu_ns(g_srv) + (tls ? tc_tls_thread_cpu_ns(tls) : 0);
  struct rusage ru0, ru1;
  getrusage(RUSAGE_SELF, &ru0);
  atomic_store(&g_run, true);
  int64_t t0 = tc_mono_ns();
  for (int i = 0; i < pairs; i++) {
    th[2 * i + 1] = spawn(receiver, &cls[2 * i + 1]);
    th[2 * i] = spawn(sender, &cls[2 * i]);
  }
  usleep((useconds_t)(seconds * 1e6));
  uint64_t pk = 0, by = 0;
  for (int i = 0; i < pairs; i++) pk += cls[2 * i + 1].recv_pkts, by += cls[2 * i + 1].recv_bytes;
  int64_t t1 = tc_mono_ns();
  int64_t cpu1 = tc_derp_server_thread_cpu_ns(g_srv) + (tls ? tc_tls_thread_cpu_ns(tls) : 0);
  tc_derp_server_get_metrics(g_srv, &m1);
  getrusage(RUSAGE_SELF, &ru1);
  atomic_store(&g_run, false);
  /* unblock the threads by closing the client sockets */
  for (int i = 0; i < n; i++) shutdown(g_tls ? cls[i].tls.fd : cls[i].fd, SHUT_RDWR);
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  for (int i = 0; i < n; i++) close_cl(&cls[i]);
  double el = (double)(t1 - t0) / 1e9;
  uint64_t relayed = m1.bytes_relayed - m0.bytes_relayed;
  double cpu_s = (double)(cpu1 - cpu0) / 1e9;

  /* phase 2: latency, fresh connections */
  struct cl *lc = calloc((size_t)n, sizeof *lc);
  for (int i = 0; i < n; i++) {
    if (cl_connect(&lc[i])) {
      fprintf(stderr, "latency client %d failed to connect\n", i);
      return 1;
    }
  }
  for (int i = 0; i < pairs; i++) {
    lc[2 * i].peer = &lc[2 * i + 1];
    lc[2 * i + 1].peer = &lc[2 * i];
    lc[2 * i + 1].caplat = (size_t)g_rounds;
    lc[2 * i + 1].lat = calloc((size_t)g_rounds, sizeof(int64_t));
  }
  for (int i = 0; i < pairs; i++) {
    th[2 * i + 1] = spawn(pong_side, &lc[2 * i + 1]);
    th[2 * i] = spawn(ping_side, &lc[2 * i]);
  }
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  size_t nl = 0;
  for (int i = 0; i < pairs; i++) nl += lc[2 * i + 1].nlat;
  int64_t *all = calloc(nl ? nl : 1, sizeof *all);
  size_t k = 0;
  for (int i = 0; i < pairs; i++)
    for (size_t j = 0; j < lc[2 * i + 1].nlat; j++) all[k++] = lc[2 * i + 1].lat[j];
  qsort(all, nl, sizeof *all, cmp64);
  double p50 = nl ? (double)all[nl / 2] / 1000.0 : 0, p99 = nl ? (double)all[(nl * 99) / 100] / 1000.0 : 0;
  for (int i = 0; i < n; i++) close_cl(&lc[i]);

  /* phase 3: the same ping-pong without the relay */
  struct direct *dd = calloc((size_t)n, sizeof *dd);
  for (int i = 0; i < pairs; i++) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) return 1;
    dd[2 * i].fd = sv[0];
    dd[2 * i + 1].fd = sv[1];
    dd[2 * i + 1].lat = calloc((size_t)g_rounds, sizeof(int64_t));
  }
  for (int i = 0; i < pairs; i++) {
    th[2 * i + 1] = spawn(direct_pong, &dd[2 * i + 1]);
    th[2 * i] = spawn(direct_ping, &dd[2 * i]);
  }
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  size_t nd = 0;
  for (int i = 0; i < pairs; i++) nd += dd[2 * i + 1].nlat;
  int64_t *dall = calloc(nd ? nd : 1, sizeof *dall);
  k = 0;
  for (int i = 0; i < pairs; i++)
    for (size_t j = 0; j < dd[2 * i + 1].nlat; j++) dall[k++] = dd[2 * i + 1].lat[j];
  qsort(dall, nd, sizeof *dall, cmp64);
  double d50 = nd ? (double)dall[nd / 2] / 1000.0 : 0, d99 = nd ? (double)dall[(nd * 99) / 100] / 1000.0 : 0;
  for (int i = 0; i < n; i++) {
    close(dd[i].fd);
    free(dd[i].lat);
  }
  free(dd);
  free(dall);

  printf("mode=%s pairs=%d size=%d window=%d seconds=%.1f connect_ms=%lld", g_tls ? "tls" : "plain", pairs, g_size,
         g_window, el, (long long)conn_ms);
  if (tls) printf(" tls_threads=%d server_tls_handshake_cpu=%.1f ms/conn", g_tls_threads, hs_cpu_ms);
  printf("\n");
  printf("throughput: %.0f packets/s, %.1f MB/s delivered (server relayed %.1f MB, dropped %llu)\n",
         (double)pk / el, (double)by / el / 1e6, (double)relayed / 1e6,
         (unsigned long long)(m1.drops_queue_full - m0.drops_queue_full));
  printf("server cpu: %.2f s over %.1f s (%.0f%% of one core), %.2f cpu-s per GB relayed\n", cpu_s, el,
         100.0 * cpu_s / el, relayed ? cpu_s / ((double)relayed / 1e9) : 0);
  double proc_s = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                  (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec + ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
  printf("whole process cpu (server + bench clients): %.2f s\n", proc_s);
  printf("latency (one-way through relay, %zu samples, %d concurrent pairs): p50 %.0f us, p99 %.0f us\n", nl,
         pairs, p50, p99);
  printf("latency without relay (same threads, socketpair): p50 %.0f us, p99 %.0f us -> added by the relay: "
         "p50 %.0f us, p99 %.0f us\n",
         d50, d99, p50 - d50, p99 - d99);
  fflush(stdout);
  tc_derp_server_free(g_srv);
  tc_tls_free(tls);
  for (int i = 0; i < n; i++) {
    free(cls[i].rbuf);
    free(lc[i].rbuf);
    free(lc[i].lat);
  }
  free(cls), free(lc), free(all), free(th);
  free(dir), free(g_ca), free(chain), free(kp);
  return 0;
}
