/* tls: mbedTLS termination and the plaintext pump (see tls.h).
 *
 * Each connection belongs to one epoll worker thread for its whole life
 * (worker 0 also accepts and deals sockets out). A connection is a TCP socket (the
 * TLS side) plus our end of a socketpair (the plaintext side); both are
 * non-blocking and watched level-triggered, with the interest set
 * recomputed after each pump step. Each direction has one bounded buffer, so
 * a slow reader on one side stops us reading from the other (backpressure
 * instead of unbounded queues).
 *
 * Certificates live in a refcounted "cred" (ssl config + chain + key);
 * reload builds a new one and swaps the pointer, and each connection keeps
 * the cred it started with until it closes. */
#include "tls/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

#define PUMP_BUF 16384
#define MAX_LISTENERS 16

enum item_kind { K_WAKE, K_LISTEN, K_TCP, K_PLAIN };

struct item {
  enum item_kind kind;
  int fd;
  struct conn *c;
};

struct cred {
  int refs; /* guarded by tc_tls.mu */
  mbedtls_ssl_config conf;
  mbedtls_x509_crt chain;
  mbedtls_pk_context key;
};

enum conn_state { ST_HANDSHAKE, ST_OPEN, ST_DEAD };

struct conn {
  struct conn *prev, *next;
  struct worker *w;
  enum conn_state state;
  struct item tcp, plain;
  int plain_peer_fd;        /* the end handed out; -1 once delivered */
  uint32_t tcp_ev, plain_ev; /* current epoll interest */
  struct cred *cred;
  mbedtls_ssl_context ssl;
  bool ssl_init;
  char peer[64];
  int64_t deadline_ms;      /* handshake timeout or close-flush timeout; 0 none */
  /* TLS -> plain */
  uint8_t *in_buf;          /* PUMP_BUF bytes, allocated once the handshake is done */
  size_t in_off, in_len;
  bool tls_eof;             /* client closed (close_notify or TCP EOF) */
  bool plain_wr_shut;
  /* plain -> TLS */
  uint8_t *out_buf;         /* PUMP_BUF bytes, likewise */
  size_t out_off, out_len;
  bool plain_eof;           /* our plaintext user closed / shut its write side */
  bool tls_closed;          /* close_notify sent */
  bool tcp_want_write;      /* mbedTLS needs the socket writable */
  bool again;               /* the pump stopped with work left: run it again */
  /* read-ahead for mbedTLS: it asks for a 5-byte header and then the body,
   * so without this every record costs two recv() calls */
  uint8_t rx[PUMP_BUF + 1024];
  size_t rx_off, rx_len;
};

/* One epoll thread and the connections it owns. Listeners live on worker 0,
 * which deals accepted sockets out round-robin. */
struct worker {
  struct tc_tls *t;
  int ep, wake_fd;
  struct item wake_item;
  /* handed-off fds waiting for this thread; guarded by t->mu */
  struct pending { int fd; char peer[64]; } *pend;
  size_t npend, cappend;
  struct conn *conns;       /* thread-only */
  pthread_t thr;
  clockid_t thr_clock;
  bool started;
};

struct tc_tls {
  struct tc_tls_params p;
  char *cert_path, *key_path;
  pthread_mutex_t mu;
  struct cred *cur;         /* guarded by mu */
  struct tc_tls_stats st;   /* guarded by mu */
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg; /* thread-safe: MBEDTLS_THREADING_C */
  struct item listeners[MAX_LISTENERS];
  int nlisteners;           /* guarded by mu (written by add_listener) */
  struct worker *w;
  int nw;
  unsigned next_w;          /* round-robin; guarded by mu */
  bool stop;                /* guarded by mu */
};

/* Modern AEAD suites only; TLS 1.2 minimum. Go's client offers all of them. */
static const int k_suites[] = {
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    0,
};

static void mbed_errstr(int rc, char *buf, size_t n) { mbedtls_strerror(rc, buf, n); }

static void cred_unref(struct tc_tls *t, struct cred *cr) {
  if (!cr) return;
  pthread_mutex_lock(&t->mu);
  int left = --cr->refs;
  pthread_mutex_unlock(&t->mu);
  if (left > 0) return;
  mbedtls_ssl_config_free(&cr->conf);
  mbedtls_x509_crt_free(&cr->chain);
  mbedtls_pk_free(&cr->key);
  free(cr);
}

static int cred_load(struct tc_tls *t, struct cred **out, struct tc_err *err) {
  char ebuf[160];
  int rc = 0, mrc;
  struct cred *cr = tc_xcalloc(1, sizeof(*cr));
  cr->refs = 1;
  mbedtls_ssl_config_init(&cr->conf);
  mbedtls_x509_crt_init(&cr->chain);
  mbedtls_pk_init(&cr->key);
  if ((mrc = mbedtls_x509_crt_parse_file(&cr->chain, t->cert_path)) != 0) {
    mbed_errstr(mrc, ebuf, sizeof ebuf);
    rc = tc_err_set(err, TC_EINVAL, "tls certificate %s: %s", t->cert_path, ebuf);
    goto fail;
  }
  if ((mrc = mbedtls_pk_parse_keyfile(&cr->key, t->key_path, NULL)) != 0) {
    mbed_errstr(mrc, ebuf, sizeof ebuf);
    rc = tc_err_set(err, TC_EINVAL, "tls key %s: %s", t->key_path, ebuf);
    goto fail;
  }
  if ((mrc = mbedtls_pk_check_pair(&cr->chain.pk, &cr->key)) != 0) {
    rc = tc_err_set(err, TC_EINVAL, "tls key %s does not match the certificate %s", t->key_path,
                    t->cert_path);
    goto fail;
  }
  if ((mrc = mbedtls_ssl_config_defaults(&cr->conf, MBEDTLS_SSL_IS_SERVER, MBEDTLS_SSL_TRANSPORT_STREAM,
                                         MBEDTLS_SSL_PRESET_DEFAULT)) != 0) {
    rc = tc_err_set(err, TC_EINTERNAL, "tls config defaults failed (%d)", mrc);
    goto fail;
  }
  mbedtls_ssl_conf_rng(&cr->conf, mbedtls_ctr_drbg_random, &t->drbg);
  mbedtls_ssl_conf_min_version(&cr->conf, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_ciphersuites(&cr->conf, k_suites);
  mbedtls_ssl_conf_renegotiation(&cr->conf, MBEDTLS_SSL_RENEGOTIATION_DISABLED);
  if ((mrc = mbedtls_ssl_conf_own_cert(&cr->conf, &cr->chain, &cr->key)) != 0) {
    rc = tc_err_set(err, TC_EINVAL, "tls own cert rejected (%d)", mrc);
    goto fail;
  }
  *out = cr;
  return 0;
fail:
  mbedtls_ssl_config_free(&cr->conf);
  mbedtls_x509_crt_free(&cr->chain);
  mbedtls_pk_free(&cr->key);
  free(cr);
  return rc;
}

/* ---- BIO callbacks: non-blocking socket I/O mapped to mbedTLS codes ---- */

static int bio_send(void *ctx, const unsigned char *buf, size_t len) {
  struct conn *c = ctx;
  ssize_t n = send(c->tcp.fd, buf, len, MSG_NOSIGNAL);
  if (n >= 0) {
    c->tcp_want_write = false;
    return (int)n;
  }
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
    c->tcp_want_write = true;
    return MBEDTLS_ERR_SSL_WANT_WRITE;
  }
  return MBEDTLS_ERR_NET_SEND_FAILED;
}

static int bio_recv(void *ctx, unsigned char *buf, size_t len) {
  struct conn *c = ctx;
  if (c->rx_len == 0) {
    ssize_t n = recv(c->tcp.fd, c->rx, sizeof c->rx, 0);
    if (n == 0) return 0; /* EOF */
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return MBEDTLS_ERR_SSL_WANT_READ;
      return MBEDTLS_ERR_NET_RECV_FAILED;
    }
    c->rx_off = 0;
    c->rx_len = (size_t)n;
  }
  size_t k = TC_MIN(len, c->rx_len);
  memcpy(buf, c->rx + c->rx_off, k);
  c->rx_off += k;
  c->rx_len -= k;
  return (int)k;
}

/* ---- connection lifecycle (TLS thread only) ---- */

static void ep_set(struct worker *w, struct item *it, uint32_t *cur, uint32_t want) {
  if (it->fd < 0 || *cur == want) return;
  struct epoll_event ev = {.events = want, .data.ptr = it};
  epoll_ctl(w->ep, EPOLL_CTL_MOD, it->fd, &ev);
  *cur = want;
}

static void conn_free(struct worker *w, struct conn *c) {
  struct tc_tls *t = w->t;
  if (c->prev) c->prev->next = c->next;
  else w->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  if (c->tcp.fd >= 0) {
    epoll_ctl(w->ep, EPOLL_CTL_DEL, c->tcp.fd, NULL);
    close(c->tcp.fd);
  }
  if (c->plain.fd >= 0) {
    epoll_ctl(w->ep, EPOLL_CTL_DEL, c->plain.fd, NULL);
    close(c->plain.fd);
  }
  if (c->plain_peer_fd >= 0) close(c->plain_peer_fd);
  if (c->ssl_init) mbedtls_ssl_free(&c->ssl);
  cred_unref(t, c->cred);
  tc_free_secret(c->in_buf, c->in_buf ? PUMP_BUF : 0);
  tc_free_secret(c->out_buf, c->out_buf ? PUMP_BUF : 0);
  tc_wipe(c->rx, sizeof c->rx);
  free(c);
  pthread_mutex_lock(&t->mu);
  t->st.active--;
  pthread_mutex_unlock(&t->mu);
}

static void set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void peer_of(int fd, char out[64]) {
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  out[0] = 0;
  if (getpeername(fd, (struct sockaddr *)&ss, &sl) != 0) return;
  char ip[INET6_ADDRSTRLEN] = "";
  if (ss.ss_family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
    snprintf(out, 64, "%s:%u", ip, ntohs(a->sin_port));
  } else if (ss.ss_family == AF_INET6) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
    if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr))
      snprintf(out, 64, "%s:%u", ip + 7, ntohs(a->sin6_port));
    else
      snprintf(out, 64, "[%s]:%u", ip, ntohs(a->sin6_port));
  }
}

static void conn_start(struct worker *w, int fd, const char *peer) {
  struct tc_tls *t = w->t;
  pthread_mutex_lock(&t->mu);
  t->st.accepted++;
  bool full = t->st.active >= t->p.max_conns;
  if (full) t->st.refused_full++;
  struct cred *cr = t->cur;
  if (!full) {
    cr->refs++;
    t->st.active++;
  }
  pthread_mutex_unlock(&t->mu);
  if (full) {
    close(fd);
    return;
  }
  struct conn *c = tc_xcalloc(1, sizeof(*c));
  c->w = w;
  c->cred = cr;
  c->tcp = (struct item){K_TCP, fd, c};
  c->plain = (struct item){K_PLAIN, -1, c};
  c->plain_peer_fd = -1;
  if (peer && *peer) snprintf(c->peer, sizeof c->peer, "%s", peer);
  else peer_of(fd, c->peer);
  c->next = w->conns;
  if (w->conns) w->conns->prev = c;
  w->conns = c;
  set_nonblock(fd);
  /* The control transport sees these connections as AF_UNIX pairs, so the
   * TCP side's nodelay and keepalive are set here (normally inherited from
   * the listener: tc_tls_listen_tcp's or the front door's). */
  if (!tc_tcp_tuned(fd)) tc_tcp_tune(fd);
  mbedtls_ssl_init(&c->ssl);
  c->ssl_init = true;
  if (mbedtls_ssl_setup(&c->ssl, &cr->conf) != 0) {
    conn_free(w, c);
    return;
  }
  mbedtls_ssl_set_bio(&c->ssl, c, bio_send, bio_recv, NULL);
  c->deadline_ms = tc_mono_ms() + t->p.handshake_timeout_ms;
  c->tcp_ev = EPOLLIN;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &c->tcp};
  if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
    conn_free(w, c);
    return;
  }
}

static void note_hs_failed(struct tc_tls *t) {
  pthread_mutex_lock(&t->mu);
  t->st.handshakes_failed++;
  pthread_mutex_unlock(&t->mu);
}

/* Finishes the handshake: creates the socketpair and delivers the far end. */
static int conn_established(struct worker *w, struct conn *c) {
  struct tc_tls *t = w->t;
  /* the pump buffers exist only for established connections, so a flood of
   * handshakes that never finish costs less memory */
  c->in_buf = tc_xmalloc(PUMP_BUF);
  c->out_buf = tc_xmalloc(PUMP_BUF);
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return -1;
  set_nonblock(sv[0]);
  c->plain.fd = sv[0];
  c->plain_ev = EPOLLIN;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &c->plain};
  if (epoll_ctl(w->ep, EPOLL_CTL_ADD, sv[0], &ev) != 0) {
    close(sv[1]);
    return -1;
  }
  c->state = ST_OPEN;
  c->deadline_ms = 0;
  pthread_mutex_lock(&t->mu);
  t->st.handshakes_ok++;
  pthread_mutex_unlock(&t->mu);
  t->p.deliver(t->p.deliver_ctx, sv[1], c->peer);
  return 0;
}

/* Moves bytes until nothing more can move; returns -1 when the connection
 * is finished (either cleanly or by error) and must be freed. */
static int conn_pump(struct worker *w, struct conn *c) {
  struct tc_tls *t = w->t;
  if (c->state == ST_HANDSHAKE) {
    int r = mbedtls_ssl_handshake(&c->ssl);
    if (r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE) {
      ep_set(w, &c->tcp, &c->tcp_ev, r == MBEDTLS_ERR_SSL_WANT_WRITE ? EPOLLOUT : EPOLLIN);
      return 0;
    }
    if (r != 0) {
      if (tc_log_enabled(TC_LOG_DEBUG)) {
        char eb[128];
        mbed_errstr(r, eb, sizeof eb);
        tc_debug("tls: handshake with %s failed: %s", c->peer, eb);
      }
      note_hs_failed(t);
      return -1;
    }
    if (conn_established(w, c) != 0) return -1;
  }
  uint64_t in_bytes = 0, out_bytes = 0;
  int rc = 0;
  bool progress = false;
  c->again = false;
  for (int guard = 0; guard < 64; guard++) {
    progress = false;
    /* TLS -> plaintext: gather several records before one send() */
    if (c->in_len == 0) c->in_off = 0;
    while (!c->tls_eof && c->in_off + c->in_len < PUMP_BUF) {
      size_t end = c->in_off + c->in_len;
      int r = mbedtls_ssl_read(&c->ssl, c->in_buf + end, PUMP_BUF - end);
      if (r > 0) {
        c->in_len += (size_t)r;
        in_bytes += (size_t)r;
        progress = true;
      } else if (r == 0 || r == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY) {
        c->tls_eof = true;
        progress = true;
      } else if (r != MBEDTLS_ERR_SSL_WANT_READ && r != MBEDTLS_ERR_SSL_WANT_WRITE) {
        rc = -1;
        break;
      } else {
        break;
      }
    }
    if (rc < 0) break;
    if (c->in_len > 0) {
      ssize_t n = send(c->plain.fd, c->in_buf + c->in_off, c->in_len, MSG_NOSIGNAL);
      if (n > 0) {
        c->in_off += (size_t)n;
        c->in_len -= (size_t)n;
        progress = true;
      } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        /* plaintext user is gone: nothing more to deliver to it */
        c->in_len = 0;
        c->tls_eof = true;
        c->plain_eof = true;
      }
    }
    if (c->tls_eof && c->in_len == 0 && !c->plain_wr_shut) {
      shutdown(c->plain.fd, SHUT_WR);
      c->plain_wr_shut = true;
      progress = true;
    }
    /* plaintext -> TLS */
    if (c->out_len == 0 && !c->plain_eof) {
      ssize_t n = recv(c->plain.fd, c->out_buf, PUMP_BUF, 0);
      if (n > 0) {
        c->out_off = 0;
        c->out_len = (size_t)n;
        progress = true;
      } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        c->plain_eof = true;
        progress = true;
      }
    }
    if (c->out_len > 0) {
      int r = mbedtls_ssl_write(&c->ssl, c->out_buf + c->out_off, c->out_len);
      if (r > 0) {
        c->out_off += (size_t)r;
        c->out_len -= (size_t)r;
        out_bytes += (size_t)r;
        progress = true;
      } else if (r != MBEDTLS_ERR_SSL_WANT_WRITE && r != MBEDTLS_ERR_SSL_WANT_READ) {
        rc = -1;
        break;
      }
    }
    if (c->plain_eof && c->out_len == 0 && !c->tls_closed) {
      int r = mbedtls_ssl_close_notify(&c->ssl);
      if (r == 0) {
        c->tls_closed = true;
        shutdown(c->tcp.fd, SHUT_WR);
        progress = true;
      } else if (r != MBEDTLS_ERR_SSL_WANT_WRITE) {
        rc = -1;
        break;
      }
    }
    if (c->tls_closed && c->tls_eof) {
      rc = -1; /* both directions done */
      break;
    }
    if (!progress) break;
  }
  /* Out of budget with bytes still movable (possibly already read into rx
   * or mbedTLS's buffers, which epoll cannot see): come back soon. */
  if (progress && rc == 0) c->again = true;
  if (in_bytes || out_bytes) {
    pthread_mutex_lock(&t->mu);
    t->st.bytes_in += in_bytes;
    t->st.bytes_out += out_bytes;
    pthread_mutex_unlock(&t->mu);
  }
  if (rc < 0) return -1;
  /* Once either side has finished, the other gets a bounded time to flush. */
  if ((c->tls_eof || c->plain_eof) && (c->deadline_ms == 0 || in_bytes || out_bytes))
    c->deadline_ms = tc_mono_ms() + t->p.idle_close_timeout_ms;
  uint32_t tw = 0, pw = 0;
  if (c->in_off + c->in_len < PUMP_BUF && !c->tls_eof) tw |= EPOLLIN;
  if (c->tcp_want_write || c->ssl.out_left > 0) tw |= EPOLLOUT;
  if (c->in_len > 0) pw |= EPOLLOUT;
  if (c->out_len == 0 && !c->plain_eof) pw |= EPOLLIN;
  ep_set(w, &c->tcp, &c->tcp_ev, tw);
  ep_set(w, &c->plain, &c->plain_ev, pw);
  return 0;
}

static void wake_worker(struct worker *w) {
  uint64_t one = 1;
  ssize_t r = write(w->wake_fd, &one, sizeof one);
  (void)r;
}

/* Queues fd for worker k (any thread). */
static void push_pending(struct worker *w, int fd, const char *peer) {
  struct tc_tls *t = w->t;
  pthread_mutex_lock(&t->mu);
  if (w->npend == w->cappend) {
    w->cappend = w->cappend ? w->cappend * 2 : 16;
    w->pend = tc_xrealloc(w->pend, w->cappend * sizeof(*w->pend));
  }
  struct pending *pd = &w->pend[w->npend++];
  pd->fd = fd;
  if (peer) snprintf(pd->peer, sizeof pd->peer, "%s", peer);
  else peer_of(fd, pd->peer);
  pthread_mutex_unlock(&t->mu);
  wake_worker(w);
}

static struct worker *pick_worker(struct tc_tls *t) {
  pthread_mutex_lock(&t->mu);
  struct worker *w = &t->w[t->next_w++ % (unsigned)t->nw];
  pthread_mutex_unlock(&t->mu);
  return w;
}

static void do_accept(struct worker *self, int lfd) {
  for (int i = 0; i < 64; i++) {
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    struct worker *w = pick_worker(self->t);
    if (w == self) conn_start(self, fd, NULL);
    else push_pending(w, fd, NULL);
  }
}

static void *tls_thread(void *arg) {
  struct worker *w = arg;
  struct tc_tls *t = w->t;
  struct epoll_event evs[64];
  int64_t next_sweep = tc_mono_ms() + 100;
  for (;;) {
    pthread_mutex_lock(&t->mu);
    bool stop = t->stop;
    struct pending *pend = w->pend;
    size_t npend = w->npend;
    w->pend = NULL;
    w->npend = w->cappend = 0;
    pthread_mutex_unlock(&t->mu);
    if (stop) {
      for (size_t i = 0; i < npend; i++) close(pend[i].fd);
      free(pend);
      break;
    }
    for (size_t i = 0; i < npend; i++) conn_start(w, pend[i].fd, pend[i].peer);
    free(pend);
    bool any_again = false;
    for (struct conn *c = w->conns; c && !any_again; c = c->next) any_again = c->again && c->state == ST_OPEN;
    int n = epoll_wait(w->ep, evs, 64, any_again ? 0 : 100);
    if (any_again) {
      for (struct conn *c = w->conns; c; c = c->next)
        if (c->again && c->state == ST_OPEN && conn_pump(w, c) < 0) c->state = ST_DEAD;
    }
    for (int i = 0; i < n; i++) {
      struct item *it = evs[i].data.ptr;
      if (it->kind == K_WAKE) {
        uint64_t v;
        ssize_t r = read(w->wake_fd, &v, sizeof v);
        (void)r;
      } else if (it->kind == K_LISTEN) {
        do_accept(w, it->fd);
      } else {
        struct conn *c = it->c;
        if (c->state == ST_DEAD) continue;
        if (conn_pump(w, c) < 0) c->state = ST_DEAD;
      }
    }
    /* Free dead connections after the batch: later events in the same batch
     * may still point at them. */
    int64_t now = tc_mono_ms();
    bool sweep = now >= next_sweep;
    if (sweep) next_sweep = now + 100;
    for (struct conn *c = w->conns, *nx; c; c = nx) {
      nx = c->next;
      if (c->state != ST_DEAD && sweep && c->deadline_ms && now >= c->deadline_ms) {
        if (c->state == ST_HANDSHAKE) {
          pthread_mutex_lock(&t->mu);
          t->st.handshake_timeouts++;
          pthread_mutex_unlock(&t->mu);
        }
        c->state = ST_DEAD;
      }
      if (c->state == ST_DEAD) conn_free(w, c);
    }
  }
  while (w->conns) conn_free(w, w->conns);
  return NULL;
}

/* ---- public API ---- */

int tc_tls_new(const struct tc_tls_params *p, struct tc_tls **out, struct tc_err *err) {
  *out = NULL;
  if (!p || !p->cert_path || !*p->cert_path || !p->key_path || !*p->key_path || !p->deliver)
    return tc_err_set(err, TC_EINVAL, "tls: cert_path, key_path and deliver are required");
  struct tc_tls *t = tc_xcalloc(1, sizeof(*t));
  int rc = 0;
  t->p = *p;
  if (t->p.handshake_timeout_ms <= 0) t->p.handshake_timeout_ms = 10000;
  if (t->p.idle_close_timeout_ms <= 0) t->p.idle_close_timeout_ms = 10000;
  if (t->p.max_conns == 0) t->p.max_conns = 65536;
  t->nw = t->p.threads > 0 ? TC_MIN(t->p.threads, 64) : 1;
  t->w = tc_xcalloc((size_t)t->nw, sizeof *t->w);
  for (int i = 0; i < t->nw; i++) {
    t->w[i].t = t;
    t->w[i].ep = t->w[i].wake_fd = -1;
  }
  t->cert_path = tc_xstrdup(p->cert_path);
  t->key_path = tc_xstrdup(p->key_path);
  pthread_mutex_init(&t->mu, NULL);
  mbedtls_entropy_init(&t->entropy);
  mbedtls_ctr_drbg_init(&t->drbg);
  static const char pers[] = "tailcoat-tls";
  if (mbedtls_ctr_drbg_seed(&t->drbg, mbedtls_entropy_func, &t->entropy, (const unsigned char *)pers,
                            sizeof pers - 1) != 0) {
    rc = tc_err_set(err, TC_EINTERNAL, "tls: cannot seed the random generator");
    goto fail;
  }
  if ((rc = cred_load(t, &t->cur, err)) != 0) goto fail;
  for (int i = 0; i < t->nw; i++) {
    struct worker *w = &t->w[i];
    w->ep = epoll_create1(EPOLL_CLOEXEC);
    w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (w->ep < 0 || w->wake_fd < 0) {
      rc = tc_err_set(err, TC_EIO, "tls: epoll/eventfd: %s", strerror(errno));
      goto fail;
    }
    w->wake_item = (struct item){K_WAKE, w->wake_fd, NULL};
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->wake_item};
    epoll_ctl(w->ep, EPOLL_CTL_ADD, w->wake_fd, &ev);
    if (pthread_create(&w->thr, NULL, tls_thread, w) != 0) {
      rc = tc_err_set(err, TC_EINTERNAL, "tls: cannot start thread");
      goto fail;
    }
    pthread_getcpuclockid(w->thr, &w->thr_clock);
    w->started = true;
  }
  *out = t;
  return 0;
fail:
  tc_tls_free(t);
  return rc;
}

int tc_tls_reload(struct tc_tls *t, struct tc_err *err) {
  struct cred *cr = NULL;
  int rc = cred_load(t, &cr, err);
  if (rc != 0) {
    tc_warn("tls: reload failed, keeping the current certificate: %s", err ? err->msg : "");
    return rc;
  }
  pthread_mutex_lock(&t->mu);
  struct cred *old = t->cur;
  t->cur = cr;
  t->st.reloads++;
  pthread_mutex_unlock(&t->mu);
  cred_unref(t, old);
  tc_info("tls: certificate reloaded from %s", t->cert_path);
  return 0;
}

int tc_tls_add_listener(struct tc_tls *t, int listen_fd, struct tc_err *err) {
  pthread_mutex_lock(&t->mu);
  if (t->nlisteners >= MAX_LISTENERS) {
    pthread_mutex_unlock(&t->mu);
    close(listen_fd);
    return tc_err_set(err, TC_ETOOBIG, "tls: too many listeners");
  }
  struct item *it = &t->listeners[t->nlisteners++];
  *it = (struct item){K_LISTEN, listen_fd, NULL};
  pthread_mutex_unlock(&t->mu);
  set_nonblock(listen_fd);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = it};
  if (epoll_ctl(t->w[0].ep, EPOLL_CTL_ADD, listen_fd, &ev) != 0)
    return tc_err_set(err, TC_EIO, "tls: epoll add listener: %s", strerror(errno));
  return 0;
}

int tc_tls_handoff(struct tc_tls *t, int fd, const char *peer) {
  pthread_mutex_lock(&t->mu);
  bool stop = t->stop;
  pthread_mutex_unlock(&t->mu);
  if (stop) {
    close(fd);
    return TC_EINVAL;
  }
  push_pending(pick_worker(t), fd, peer);
  return 0;
}

void tc_tls_get_stats(struct tc_tls *t, struct tc_tls_stats *out) {
  pthread_mutex_lock(&t->mu);
  *out = t->st;
  pthread_mutex_unlock(&t->mu);
}

int64_t tc_tls_thread_cpu_ns(struct tc_tls *t) {
  int64_t sum = 0;
  for (int i = 0; i < t->nw; i++) {
    struct timespec ts;
    if (!t->w[i].started || clock_gettime(t->w[i].thr_clock, &ts) != 0) return -1;
    sum += (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
  }
  return sum;
}

void tc_tls_stop_accepting(struct tc_tls *t) {
  if (!t) return;
  pthread_mutex_lock(&t->mu);
  int n = t->nlisteners;
  pthread_mutex_unlock(&t->mu);
  for (int i = 0; i < n; i++) {
    /* Out of the epoll first: a shut-down listener is always readable, and
     * the worker would spin on accept failing until it stops. An event
     * already fetched only makes one accept4 fail with EINVAL. */
    epoll_ctl(t->w[0].ep, EPOLL_CTL_DEL, t->listeners[i].fd, NULL);
    shutdown(t->listeners[i].fd, SHUT_RDWR);
  }
}

void tc_tls_free(struct tc_tls *t) {
  if (!t) return;
  pthread_mutex_lock(&t->mu);
  t->stop = true;
  pthread_mutex_unlock(&t->mu);
  for (int i = 0; i < t->nw; i++) {
    if (!t->w[i].started) continue;
    wake_worker(&t->w[i]);
    pthread_join(t->w[i].thr, NULL);
  }
  for (int i = 0; i < t->nlisteners; i++) close(t->listeners[i].fd);
  for (int i = 0; i < t->nw; i++) {
    struct worker *w = &t->w[i];
    for (size_t k = 0; k < w->npend; k++) close(w->pend[k].fd);
    free(w->pend);
    if (w->ep >= 0) close(w->ep);
    if (w->wake_fd >= 0) close(w->wake_fd);
  }
  free(t->w);
  cred_unref(t, t->cur);
  mbedtls_ctr_drbg_free(&t->drbg);
  mbedtls_entropy_free(&t->entropy);
  pthread_mutex_destroy(&t->mu);
  free(t->cert_path);
  free(t->key_path);
  free(t);
}

int tc_tls_listen_tcp(const char *addr, int *port_out, struct tc_err *err) {
  char host[128];
  const char *colon = strrchr(addr, ':');
  if (!colon) return tc_err_set(err, TC_EINVAL, "listen address %s: missing port", addr);
  size_t hl = (size_t)(colon - addr);
  if (hl >= sizeof host) return tc_err_set(err, TC_EINVAL, "listen address %s: host too long", addr);
  memcpy(host, addr, hl);
  host[hl] = 0;
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end || port < 0 || port > 65535) return tc_err_set(err, TC_EINVAL, "listen address %s: bad port", addr);
  char *h = host;
  if (h[0] == '[') {
    h++;
    size_t l = strlen(h);
    if (l == 0 || h[l - 1] != ']') return tc_err_set(err, TC_EINVAL, "listen address %s: bad host", addr);
    h[l - 1] = 0;
  }
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  socklen_t sl;
  int fam;
  struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
  if (*h == 0) {
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
    return tc_err_set(err, TC_EINVAL, "listen address %s: host must be an IP literal", addr);
  }
  int fd = socket(fam, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return tc_err_set(err, TC_EIO, "socket: %s", strerror(errno));
  int one = 1, zero = 0;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (fam == AF_INET6 && *h == 0) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
  if (bind(fd, (struct sockaddr *)&ss, sl) != 0 || listen(fd, 512) != 0) {
    int e = errno;
    close(fd);
    return tc_err_set(err, TC_EIO, "listen %s: %s", addr, strerror(e));
  }
  tc_tcp_tune(fd); /* copied into every accepted socket */
  if (port_out) {
    struct sockaddr_storage b;
    socklen_t bl = sizeof b;
    getsockname(fd, (struct sockaddr *)&b, &bl);
    *port_out = b.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&b)->sin_port)
                                       : ntohs(((struct sockaddr_in6 *)&b)->sin6_port);
  }
  return fd;
}
