/* tlistener: a minimal loopback HTTP/1.1 front door for transport tests. It
 * peeks at each request head (leaving it unread, as server/http does), serves
 * GET /key itself, and hands /ts2021 to the upgrade function on its own
 * thread. One connection at a time; heads are bounded by TC_HTTP_HEAD_MAX. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "proto/proto.h"
#include "tclient.h"

struct tc_tlistener {
  int fd, port;
  int wake[2];               /* self-pipe for handed-over connections */
  pthread_mutex_t mu;
  int handed[64];
  size_t nhanded;
  uint8_t pub[32];
  tc_upgrade_fn upgrade;
  void *ctx;
  pthread_t th;
  atomic_bool stop;
};

static void reply(int fd, int status, const char *ctype, const char *body) {
  char *r = tc_xasprintf("HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
                         status, ctype, strlen(body), body);
  ssize_t w = send(fd, r, strlen(r), MSG_NOSIGNAL);
  (void)w;
  free(r);
  shutdown(fd, SHUT_WR);
  close(fd);
}

/* Parses head (NUL-terminated copy) into h; pointers point into head. */
static int parse_head(char *head, struct tc_http_head *h) {
  char *save = NULL, *line = strtok_r(head, "\r\n", &save);
  if (!line) return -1;
  char *sp1 = strchr(line, ' '), *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
  if (!sp1 || !sp2) return -1;
  *sp1 = *sp2 = 0;
  h->method = line;
  h->path = sp1 + 1;
  char *q = strchr(sp1 + 1, '?');
  h->query = "";
  if (q) {
    *q = 0;
    h->query = q + 1;
  }
  while ((line = strtok_r(NULL, "\r\n", &save))) {
    char *colon = strchr(line, ':');
    if (!colon || h->nheaders >= TC_HTTP_HEADERS_MAX) continue;
    *colon = 0;
    char *v = colon + 1;
    while (*v == ' ' || *v == '\t') v++;
    h->headers[h->nheaders].name = line;
    h->headers[h->nheaders].value = v;
    h->nheaders++;
  }
  return 0;
}

static void serve_one(struct tc_tlistener *l, int fd) {
  static char buf[TC_HTTP_HEAD_MAX + 1];
  size_t have = 0;
  char *end = NULL;
  int64_t deadline = tc_mono_ms() + 3000;
  while (!end) {
    int left = (int)(deadline - tc_mono_ms());
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (left <= 0 || poll(&pfd, 1, left) <= 0) break;
    ssize_t n = recv(fd, buf, TC_HTTP_HEAD_MAX, MSG_PEEK);
    if (n <= 0) break;
    if ((size_t)n == have) {
      usleep(1000); /* nothing new yet */
      continue;
    }
    have = (size_t)n;
    buf[have] = 0;
    end = strstr(buf, "\r\n\r\n");
    if (!end && have >= TC_HTTP_HEAD_MAX) break;
  }
  if (!end) {
    reply(fd, 431, "text/plain", "bad head\n");
    return;
  }
  struct tc_http_head h;
  memset(&h, 0, sizeof h);
  h.head_len = (size_t)(end - buf) + 4;
  snprintf(h.peer, sizeof h.peer, "127.0.0.1:0");
  char *copy = tc_xstrndup(buf, h.head_len);
  if (parse_head(copy, &h)) {
    free(copy);
    reply(fd, 400, "text/plain", "bad request\n");
    return;
  }
  if (!strcmp(h.path, "/ts2021")) {
    l->upgrade(l->ctx, fd, &h);
  } else if (!strcmp(h.path, "/key")) {
    char drop[TC_HTTP_HEAD_MAX];
    ssize_t r = recv(fd, drop, h.head_len, MSG_WAITALL);
    (void)r;
    int status;
    char *body;
    tc_ctl_key_response(l->pub, h.query, &status, &body);
    reply(fd, status, status == 200 ? "application/json" : "text/plain", body);
    free(body);
  } else {
    reply(fd, 404, "text/plain", "not found\n");
  }
  free(copy);
}

static void *listener_main(void *arg) {
  struct tc_tlistener *l = arg;
  while (!atomic_load(&l->stop)) {
    struct pollfd pfd[2] = {{.fd = l->fd, .events = POLLIN}, {.fd = l->wake[0], .events = POLLIN}};
    if (poll(pfd, 2, 100) <= 0) continue;
    if (pfd[1].revents) {
      char b[64];
      ssize_t r = read(l->wake[0], b, sizeof b);
      (void)r;
      pthread_mutex_lock(&l->mu);
      int fds[64];
      size_t n = l->nhanded;
      memcpy(fds, l->handed, n * sizeof *fds);
      l->nhanded = 0;
      pthread_mutex_unlock(&l->mu);
      for (size_t i = 0; i < n; i++) serve_one(l, fds[i]);
    }
    if (!pfd[0].revents) continue;
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) continue;
    serve_one(l, fd);
  }
  pthread_mutex_lock(&l->mu);
  for (size_t i = 0; i < l->nhanded; i++) close(l->handed[i]);
  l->nhanded = 0;
  pthread_mutex_unlock(&l->mu);
  return NULL;
}

void tc_tlistener_handoff(struct tc_tlistener *l, int fd) {
  pthread_mutex_lock(&l->mu);
  bool ok = l->nhanded < TC_ARRAY_LEN(l->handed);
  if (ok) l->handed[l->nhanded++] = fd;
  pthread_mutex_unlock(&l->mu);
  if (!ok) {
    close(fd);
    return;
  }
  ssize_t w = write(l->wake[1], "x", 1);
  (void)w;
}

int tc_tlistener_start(const uint8_t server_pub[32], tc_upgrade_fn upgrade, void *ctx, struct tc_tlistener **out) {
  struct tc_tlistener *l = tc_xcalloc(1, sizeof *l);
  memcpy(l->pub, server_pub, 32);
  l->upgrade = upgrade;
  l->ctx = ctx;
  pthread_mutex_init(&l->mu, NULL);
  if (pipe2(l->wake, O_CLOEXEC | O_NONBLOCK)) {
    free(l);
    return TC_EIO;
  }
  l->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof sa;
  if (l->fd < 0 || bind(l->fd, (struct sockaddr *)&sa, sizeof sa) || listen(l->fd, 64) ||
      getsockname(l->fd, (struct sockaddr *)&sa, &sl)) {
    if (l->fd >= 0) close(l->fd);
    close(l->wake[0]);
    close(l->wake[1]);
    free(l);
    return TC_EIO;
  }
  l->port = ntohs(sa.sin_port);
  if (pthread_create(&l->th, NULL, listener_main, l)) {
    close(l->fd);
    close(l->wake[0]);
    close(l->wake[1]);
    free(l);
    return TC_EINTERNAL;
  }
  *out = l;
  return 0;
}

int tc_tlistener_port(struct tc_tlistener *l) { return l->port; }

void tc_tlistener_stop(struct tc_tlistener *l) {
  if (!l) return;
  atomic_store(&l->stop, true);
  pthread_join(l->th, NULL);
  close(l->fd);
  close(l->wake[0]);
  close(l->wake[1]);
  pthread_mutex_destroy(&l->mu);
  free(l);
}
