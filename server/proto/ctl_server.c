/* ctl_server: the /ts2021 event loop. One epoll thread owns every Noise
 * connection (non-blocking sockets), decrypts records, feeds nghttp2, and
 * seals what nghttp2 emits into records of at most 4096 bytes. A new
 * connection's Noise handshake and complete requests go to a worker pool;
 * workers answer through tc_ctl_stream, whose queue the loop drains with a
 * deferred data provider.
 *
 * Locks: st->mu (stream shared state) may be held while taking srv->mu (the
 * hand-off lists); never the other way round. srv->wmu guards the job queues
 * and is never held with either. Fields marked "loop" are touched only by
 * the loop thread. */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <mbedtls/sha1.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "crypto/crypto.h"
#include "proto/proto.h"

#define OUT_HIGH (256u * 1024)    /* stop pulling from nghttp2 above this */
#define READ_CHUNK 16384
#define READ_BUDGET (256u * 1024) /* bytes per readiness event, for fairness */
#define CLOSING_GRACE_MS 5000     /* a refused connection gets this long to drain */
#define STREAM_OBJECTS_MAX (4 * TC_CTL_MAX_STREAMS)
#define WS_FRAME_MAX 65536u       /* browsers send one Noise record per message */
#define H2_BIG_MIN 8192u          /* nghttp2 allocations this large get their own pages */
#define H2_BIG_SLOTS 4            /* such blocks per connection; more fall back to malloc */
#define IDLE_RELEASE_MS 200       /* default quiet time before those pages are given back */
#define H2_BIG_POOL 32            /* unmapped blocks kept for the next connections */

struct conn;

struct tc_ctl_stream {
  atomic_int refs;
  struct conn *conn; /* counted reference, stable for the stream's life */
  struct tc_ctl_server *srv;
  int32_t id;
  /* loop: request assembly */
  char *method, *path, *authority;
  struct tc_ctl_header *headers;
  size_t nheaders, header_bytes;
  struct tc_buf body;
  char *packed;           /* after dispatch: headers, strings and body in one block */
  size_t packed_body_len; /* body bytes in it, still counted in conn->inbound */
  bool too_big, dispatched, direct, h2_closed, submitted;
  bool is_head; /* set before dispatch, read-only afterwards */
  struct tc_ctl_stream *cprev, *cnext; /* conn's stream list (loop) */
  struct tc_ctl_request req;
  /* shared, under mu */
  pthread_mutex_t mu;
  int status;
  char *ctype;
  bool begun, ended, cancelled, notified, reset_req;
  bool no_body; /* HEAD, 204, 304: body bytes are dropped, never sent */
  int retry_after; /* > 0: a Retry-After header, in seconds */
  struct tc_buf q;
  size_t qoff;
  void (*cancel_fn)(void *);
  void *cancel_arg;
  struct tc_ctl_stream *notify_next, *job_next;
};

/* A page-aligned anonymous mapping handed to nghttp2 (see h2_malloc). */
struct h2_big {
  void *p;
  size_t len; /* mapped bytes, a multiple of the page size */
};

struct conn {
  atomic_int refs;
  atomic_size_t queued;  /* response bytes waiting in stream queues */
  atomic_size_t inbound; /* request body bytes held by live streams */
  atomic_int objects;    /* stream objects alive (incl. handler-held) */
  struct tc_ctl_server *srv;
  int fd;
  uint64_t id;
  char peer[64];
  struct tc_ts_session sess;
  nghttp2_session *h2;
  struct tc_buf in, out, stage;
  struct tc_buf wsin, wsout; /* WebSocket variant: framed bytes on the socket */
  bool ws;
  bool established, closing, dead, want_out, got_request;
  int64_t deadline_ms;
  int64_t last_input_ms; /* for the idle timeout */
  /* loop: nghttp2's memory. Its large blocks (the 16 KiB outbound frame
   * buffer) are mappings whose pages are given back once the connection has
   * been quiet for opts.idle_release_ms. */
  struct h2_big big[H2_BIG_SLOTS];
  size_t h2_heap;        /* bytes nghttp2 holds from malloc (usable size) */
  bool big_dirty;        /* nghttp2 produced output since the last release */
  int64_t last_out_ms;   /* when it last did */
  struct tc_ctl_stream *streams;
  struct conn *prev, *next;
};

struct incoming {
  int fd;
  bool ws;
  char ws_accept[32];      /* Sec-WebSocket-Accept value */
  const char *ws_refusal;  /* static: close with 1008 and this reason */
  size_t init_len;
  uint8_t init[TC_TS_INIT_LEN];
  char peer[64];
  /* the Noise handshake, done by a worker before the loop sees the connection */
  int hs_rc;
  const char *hs_emsg; /* static */
  uint8_t hs_resp[TC_TS_RESP_LEN];
  struct tc_ts_session hs_sess;
  struct incoming *next;
};

struct tc_ctl_server {
  tc_ctl_handler_fn handler;
  void *ctx;
  uint8_t priv[TC_KEY_LEN];
  struct tc_ctl_server_opts opts;
  int epfd, evfd;
  pthread_t loop;
  bool loop_started;
  pthread_mutex_t mu;
  struct incoming *incoming;
  struct tc_ctl_stream *notify;
  bool stopping;
  pthread_mutex_t wmu;
  pthread_cond_t wcond;
  struct tc_ctl_stream *jobs, *jobs_tail;
  struct incoming *hs_jobs, *hs_tail; /* upgrades waiting for their handshake */
  bool wstop;
  int nworkers;
  pthread_t *workers;
  struct conn *conns; /* loop */
  struct conn *dead;  /* loop: freed at the end of an iteration */
  uint64_t next_id;
  nghttp2_session_callbacks *cbs;
  nghttp2_option *h2opt;
  atomic_uint_fast64_t st_conns_open, st_conns_total, st_hs_failed, st_streams_open, st_requests;
  atomic_uint_fast64_t st_h2_heap, st_h2_mapped, st_h2_pooled, st_released, st_releases;
  size_t page;
  /* loop: freed nghttp2 blocks kept mapped for the next connection (each
   * connection allocates one; a fresh mapping per connection cost an mmap,
   * page faults and a munmap whose TLB shootdown interrupts the other CPUs) */
  struct h2_big pool[H2_BIG_POOL];
  size_t npool;
  atomic_int slots; /* connections queued or open, against opts.max_conns */
};

/* An idle streaming connection must cost little: a full map (hundreds of
 * KiB at a thousand peers) passes once through the stream queue and the
 * connection buffers, and tc_buf keeps its capacity, so every connection
 * would hold its largest message forever. Emptied buffers are given back
 * instead, small ones too: keeping even 1 KiB in each of the four
 * (in, out, stage, stream queue) was ~3 KiB per idle node, and a malloc per
 * flush is cheap next to the send() it comes with. */
static void buf_release_idle(struct tc_buf *b) {
  if (b->len == 0 && b->cap) tc_buf_free(b);
}

/* ---- nghttp2 memory (loop) -----------------------------------------------------
 * Every nghttp2 session allocates through these, with its conn as user data;
 * nghttp2 runs only on the loop thread, so the conn fields need no lock.
 *
 * Measured on libnghttp2 1.52 with a counting allocator, a server session
 * holds ~25.5 KiB from nghttp2_session_server_new on, before any stream: the
 * session struct (2.9 KiB), the stream map (4 KiB), two HPACK rings (1 KiB
 * each) and the outbound frame buffer (aob.framebufs: one 16,394-byte chunk,
 * NGHTTP2_FRAMEBUF_CHUNKLEN). That buffer is 16 of the 25.5 KiB and holds no
 * state between frames: active_outbound_item_reset() resets it once a frame
 * is out, and the next frame is packed from scratch (headers, HPACK output,
 * DATA payload via the read callback, padding by memset), never reading what
 * a previous frame left there. So large blocks get their own pages, and when
 * the connection has been quiet for a while (nothing queued in nghttp2, which
 * then has no frame in progress, and nothing in our output buffers)
 * MADV_DONTNEED returns the pages; the next frame faults in zeroed ones. An
 * idle map stream then costs no frame buffer at all, and a keep-alive costs
 * one page fault and one madvise. */
static size_t page_round(struct conn *c, size_t n) { return (n + c->srv->page - 1) & ~(c->srv->page - 1); }

static struct h2_big *h2_big_find(struct conn *c, const void *p) {
  for (int i = 0; i < H2_BIG_SLOTS; i++)
    if (c->big[i].p == p) return &c->big[i];
  return NULL;
}

/* A fresh zeroed mapping of at least n bytes, or NULL (no free slot or mmap
 * failed, e.g. vm.max_map_count): the caller then uses malloc. */
static void *h2_big_alloc(struct conn *c, size_t n, bool zero) {
  struct h2_big *b = h2_big_find(c, NULL);
  if (!b) return NULL;
  size_t len = page_round(c, n);
  struct tc_ctl_server *srv = c->srv;
  for (size_t i = srv->npool; i-- > 0;) {
    if (srv->pool[i].len != len) continue;
    void *p = srv->pool[i].p;
    srv->pool[i] = srv->pool[--srv->npool];
    if (zero) memset(p, 0, len);
    b->p = p;
    b->len = len;
    atomic_fetch_sub(&srv->st_h2_pooled, len);
    atomic_fetch_add(&srv->st_h2_mapped, len);
    return p;
  }
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  b->p = p;
  b->len = len;
  atomic_fetch_add(&c->srv->st_h2_mapped, len);
  return p;
}

static void h2_big_free(struct conn *c, struct h2_big *b) {
  struct tc_ctl_server *srv = c->srv;
  if (srv->npool < H2_BIG_POOL) {
    srv->pool[srv->npool++] = *b;
    atomic_fetch_add(&srv->st_h2_pooled, b->len);
  } else {
    munmap(b->p, b->len);
  }
  atomic_fetch_sub(&srv->st_h2_mapped, b->len);
  b->p = NULL;
  b->len = 0;
}

static void h2_heap_account(struct conn *c, size_t add, size_t sub) {
  c->h2_heap += add - sub;
  atomic_fetch_add(&c->srv->st_h2_heap, add);
  atomic_fetch_sub(&c->srv->st_h2_heap, sub);
}

static void *h2_malloc(size_t n, void *user) {
  struct conn *c = user;
  void *p = n >= H2_BIG_MIN ? h2_big_alloc(c, n, false) : NULL;
  if (!p && (p = malloc(n))) h2_heap_account(c, malloc_usable_size(p), 0);
  return p;
}

static void *h2_calloc(size_t n, size_t size, void *user) {
  struct conn *c = user;
  if (size && n > SIZE_MAX / size) return NULL;
  void *p = n * size >= H2_BIG_MIN ? h2_big_alloc(c, n * size, true) : NULL;
  if (!p && (p = calloc(n, size))) h2_heap_account(c, malloc_usable_size(p), 0);
  return p;
}

static void h2_free(void *p, void *user) {
  struct conn *c = user;
  if (!p) return;
  struct h2_big *b = h2_big_find(c, p);
  if (b) {
    h2_big_free(c, b);
    return;
  }
  h2_heap_account(c, 0, malloc_usable_size(p));
  free(p);
}

static void *h2_realloc(void *p, size_t n, void *user) {
  struct conn *c = user;
  if (!p) return h2_malloc(n, user);
  struct h2_big *b = h2_big_find(c, p);
  size_t old = b ? b->len : malloc_usable_size(p);
  if (b && n <= b->len) return p;
  if (!b && n < H2_BIG_MIN) {
    void *q = realloc(p, n);
    if (q) h2_heap_account(c, malloc_usable_size(q), old);
    return q;
  }
  void *q = h2_malloc(n, user);
  if (!q) return NULL;
  memcpy(q, p, TC_MIN(old, n));
  h2_free(p, user);
  return q;
}

/* Gives back the pages of c's large nghttp2 blocks if nothing can be in
 * them: no frame in progress (want_write is 0 only without an active
 * outbound item, unless the session is terminated, which want_read rules
 * out) and our own buffers empty, so the bytes nghttp2 last returned from
 * mem_send have been copied out long ago. Counts the pages that were
 * resident. */
static void conn_release_idle(struct conn *c) {
  if (!c->h2 || c->dead || c->out.len || c->wsout.len || c->stage.len) return;
  if (!nghttp2_session_want_read(c->h2) || nghttp2_session_want_write(c->h2)) return;
  size_t resident = 0;
  for (int i = 0; i < H2_BIG_SLOTS; i++) {
    struct h2_big *b = &c->big[i];
    if (!b->p) continue;
    unsigned char vec[64];
    size_t pages = b->len / c->srv->page;
    if (pages <= sizeof vec && mincore(b->p, b->len, vec) == 0) {
      for (size_t k = 0; k < pages; k++) resident += (vec[k] & 1) * c->srv->page;
    }
    madvise(b->p, b->len, MADV_DONTNEED);
  }
  c->big_dirty = false;
  atomic_fetch_add(&c->srv->st_released, resident);
  atomic_fetch_add(&c->srv->st_releases, 1);
}

/* ---- reference counting ---------------------------------------------------- */
static void conn_unref(struct conn *c) {
  if (!c || atomic_fetch_sub(&c->refs, 1) != 1) return;
  tc_wipe(&c->sess, sizeof c->sess);
  tc_buf_free(&c->in);
  tc_buf_free(&c->out);
  tc_buf_free(&c->stage);
  tc_buf_free(&c->wsin);
  tc_buf_free(&c->wsout);
  free(c);
}

void tc_ctl_stream_ref(struct tc_ctl_stream *st) {
  if (st) atomic_fetch_add(&st->refs, 1);
}

void tc_ctl_stream_unref(struct tc_ctl_stream *st) {
  if (!st || atomic_fetch_sub(&st->refs, 1) != 1) return;
  struct conn *c = st->conn;
  atomic_fetch_sub(&c->queued, st->q.len - st->qoff);
  atomic_fetch_sub(&c->inbound, st->body.len + st->packed_body_len);
  atomic_fetch_sub(&c->objects, 1);
  free(st->packed);
  free(st->method);
  free(st->path);
  free(st->authority);
  for (size_t i = 0; i < st->nheaders; i++) {
    free(st->headers[i].name);
    free(st->headers[i].value);
  }
  free(st->headers);
  tc_buf_free(&st->body);
  tc_buf_free(&st->q);
  free(st->ctype);
  pthread_mutex_destroy(&st->mu);
  free(st);
  conn_unref(c);
}

static void wake_loop(struct tc_ctl_server *srv) {
  uint64_t one = 1;
  ssize_t r = write(srv->evfd, &one, sizeof one);
  (void)r; /* EAGAIN means a wake-up is pending already */
}

/* With st->mu held: queues st for the loop unless already queued. */
static void notify_locked(struct tc_ctl_stream *st) {
  if (st->notified || st->cancelled) return;
  st->notified = true;
  atomic_fetch_add(&st->refs, 1);
  struct tc_ctl_server *srv = st->srv;
  pthread_mutex_lock(&srv->mu);
  /* The loop takes the whole list after each wake-up, so only the push that
   * makes it non-empty needs to wake it: one syscall per batch of writes
   * (a map delta fanned out to many streams), not per write. */
  bool was_empty = srv->notify == NULL;
  st->notify_next = srv->notify;
  srv->notify = st;
  if (was_empty) wake_loop(srv);
  pthread_mutex_unlock(&srv->mu);
}

/* ---- stream API (any thread) -------------------------------------------------- */
const struct tc_ctl_request *tc_ctl_stream_request(struct tc_ctl_stream *st) { return &st->req; }

const char *tc_ctl_request_header(const struct tc_ctl_request *req, const char *name) {
  for (size_t i = 0; i < req->nheaders; i++)
    if (tc_strieq(req->headers[i].name, name)) return req->headers[i].value;
  return NULL;
}

static bool valid_ctype(const char *ct) {
  if (!ct) return true;
  if (strlen(ct) > 200) return false;
  for (const char *p = ct; *p; p++)
    if ((unsigned char)*p < 0x20 || *p == 0x7f) return false;
  return true;
}

static int begin_locked(struct tc_ctl_stream *st, int status, const char *content_type) {
  if (st->begun || st->ended) return TC_EINVAL;
  if (status < 200 || status > 599 || !valid_ctype(content_type)) return TC_EINVAL;
  st->begun = true;
  st->status = status;
  st->no_body = st->is_head || status == 204 || status == 304;
  st->ctype = content_type ? tc_xstrdup(content_type) : NULL;
  return 0;
}

/* With st->mu held: accounts and queues len bytes. */
static int queue_locked(struct tc_ctl_stream *st, const void *data, size_t len) {
  if (!len || st->no_body) return 0;
  size_t prev = atomic_fetch_add(&st->conn->queued, len);
  if (prev + len > TC_CTL_CONN_BUFFER_MAX) {
    atomic_fetch_sub(&st->conn->queued, len);
    st->reset_req = true; /* a peer that does not read is cut off */
    return TC_ETOOBIG;
  }
  if (st->qoff && st->qoff == st->q.len) {
    tc_buf_reset(&st->q);
    st->qoff = 0;
  }
  tc_buf_append(&st->q, data, len);
  return 0;
}

int tc_ctl_stream_respond(struct tc_ctl_stream *st, int status, const char *content_type, const void *body,
                          size_t len) {
  pthread_mutex_lock(&st->mu);
  if (st->begun || st->ended) {
    pthread_mutex_unlock(&st->mu);
    return TC_EINVAL;
  }
  int rc;
  if (st->cancelled) {
    rc = TC_EIO;
  } else if ((rc = begin_locked(st, status, content_type)) == 0) {
    rc = queue_locked(st, body, len);
  }
  st->begun = true;
  st->ended = true;
  if (rc == TC_EINVAL) st->status = 500;
  notify_locked(st);
  pthread_mutex_unlock(&st->mu);
  tc_ctl_stream_unref(st);
  return rc;
}

int tc_ctl_stream_begin(struct tc_ctl_stream *st, int status, const char *content_type) {
  pthread_mutex_lock(&st->mu);
  int rc = st->cancelled ? TC_EIO : begin_locked(st, status, content_type);
  if (rc == 0) notify_locked(st);
  pthread_mutex_unlock(&st->mu);
  return rc;
}

int tc_ctl_stream_write(struct tc_ctl_stream *st, const void *data, size_t len) {
  pthread_mutex_lock(&st->mu);
  int rc;
  if (st->cancelled || st->reset_req)
    rc = TC_EIO;
  else if (!st->begun || st->ended)
    rc = TC_EINVAL;
  else
    rc = queue_locked(st, data, len);
  if (rc == 0 || rc == TC_ETOOBIG) notify_locked(st);
  pthread_mutex_unlock(&st->mu);
  return rc;
}

void tc_ctl_stream_end(struct tc_ctl_stream *st) {
  pthread_mutex_lock(&st->mu);
  if (!st->ended) {
    if (!st->begun) {
      st->begun = true;
      st->status = 500;
    }
    st->ended = true;
    notify_locked(st);
  }
  pthread_mutex_unlock(&st->mu);
  tc_ctl_stream_unref(st);
}

void tc_ctl_stream_retry_after(struct tc_ctl_stream *st, int seconds) {
  pthread_mutex_lock(&st->mu);
  if (!st->begun) st->retry_after = seconds > 0 ? TC_MIN(seconds, 86400) : 0;
  pthread_mutex_unlock(&st->mu);
}

void tc_ctl_stream_on_cancel(struct tc_ctl_stream *st, void (*fn)(void *arg), void *arg) {
  pthread_mutex_lock(&st->mu);
  bool now = st->cancelled;
  if (!now) {
    st->cancel_fn = fn;
    st->cancel_arg = arg;
  }
  pthread_mutex_unlock(&st->mu);
  if (now && fn) fn(arg);
}

bool tc_ctl_stream_cancelled(struct tc_ctl_stream *st) {
  pthread_mutex_lock(&st->mu);
  bool c = st->cancelled;
  pthread_mutex_unlock(&st->mu);
  return c;
}

/* Marks the stream dead for writers and runs the cancel callback if the
 * response was still open. Any thread; idempotent. */
static void stream_cancel(struct tc_ctl_stream *st) {
  pthread_mutex_lock(&st->mu);
  if (st->cancelled) {
    pthread_mutex_unlock(&st->mu);
    return;
  }
  st->cancelled = true;
  void (*fn)(void *) = st->ended ? NULL : st->cancel_fn;
  void *arg = st->cancel_arg;
  st->cancel_fn = NULL;
  atomic_fetch_sub(&st->conn->queued, st->q.len - st->qoff);
  tc_buf_reset(&st->q);
  st->qoff = 0;
  pthread_mutex_unlock(&st->mu);
  if (fn) fn(arg);
}

/* ---- workers --------------------------------------------------------------- */
static void push_job(struct tc_ctl_server *srv, struct tc_ctl_stream *st) {
  pthread_mutex_lock(&srv->wmu);
  st->job_next = NULL;
  if (srv->jobs_tail)
    srv->jobs_tail->job_next = st;
  else
    srv->jobs = st;
  srv->jobs_tail = st;
  pthread_cond_signal(&srv->wcond);
  pthread_mutex_unlock(&srv->wmu);
}

static void run_handshake(struct tc_ctl_server *srv, struct incoming *in);

static void *worker_main(void *arg) {
  struct tc_ctl_server *srv = arg;
  /* Handshakes and requests alternate when both wait, so neither a burst of
   * new connections nor a burst of requests starves the other. */
  bool prefer_hs = true;
  for (;;) {
    pthread_mutex_lock(&srv->wmu);
    while (!srv->jobs && !srv->hs_jobs && !srv->wstop) pthread_cond_wait(&srv->wcond, &srv->wmu);
    struct tc_ctl_stream *st = NULL;
    struct incoming *in = NULL;
    if (srv->hs_jobs && (prefer_hs || !srv->jobs)) {
      in = srv->hs_jobs;
      srv->hs_jobs = in->next;
      if (!srv->hs_jobs) srv->hs_tail = NULL;
    } else if (srv->jobs) {
      st = srv->jobs;
      srv->jobs = st->job_next;
      if (!srv->jobs) srv->jobs_tail = NULL;
    }
    bool stopping = srv->wstop;
    pthread_mutex_unlock(&srv->wmu);
    prefer_hs = !in;
    if (in) {
      run_handshake(srv, in);
      continue;
    }
    if (!st) break;
    /* The job holds the handler's reference. A request whose stream is gone
     * already (client reset, connection lost, shutdown) is not run. */
    if (stopping || tc_ctl_stream_cancelled(st)) {
      tc_ctl_stream_end(st);
      continue;
    }
    tc_ctl_stream_ref(st);
    srv->handler(srv->ctx, &st->req, st);
    pthread_mutex_lock(&st->mu);
    bool begun = st->begun;
    pthread_mutex_unlock(&st->mu);
    if (!begun) tc_ctl_stream_respond(st, 500, "text/plain; charset=utf-8", "internal error\n", 15);
    tc_ctl_stream_unref(st);
  }
  return NULL;
}

/* ---- connection output (loop) --------------------------------------------------- */
static void conn_kill(struct conn *c);

static void seal_stage(struct conn *c, size_t n) {
  uint8_t rec[TC_TS_MAX_MSG];
  int len = tc_ts_seal_record(&c->sess.tx, c->stage.data, n, rec);
  if (len < 0) {
    conn_kill(c);
    return;
  }
  tc_buf_append(&c->out, rec, (size_t)len);
  tc_buf_consume(&c->stage, n);
}

/* Seals arbitrary plaintext into as many records as needed. */
static void conn_send_plain(struct conn *c, const void *p, size_t n) {
  tc_buf_append(&c->stage, p, n);
  while (!c->dead && c->stage.len > 0) seal_stage(c, TC_MIN(c->stage.len, (size_t)TC_TS_MAX_PLAINTEXT));
}

static void set_epollout(struct conn *c, bool on) {
  if (c->want_out == on) return;
  struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
  epoll_ctl(c->srv->epfd, EPOLL_CTL_MOD, c->fd, &ev);
  c->want_out = on;
}

/* WebSocket framing (RFC 6455), server side: frames we send are unmasked. */
static void ws_frame(struct tc_buf *b, uint8_t opcode, const void *p, size_t n) {
  uint8_t h[10];
  size_t hl = 2;
  h[0] = (uint8_t)(0x80 | opcode);
  if (n < 126) {
    h[1] = (uint8_t)n;
  } else if (n <= 0xffff) {
    h[1] = 126;
    h[2] = (uint8_t)(n >> 8);
    h[3] = (uint8_t)n;
    hl = 4;
  } else {
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
    hl = 10;
  }
  tc_buf_append(b, h, hl);
  if (n) tc_buf_append(b, p, n);
}

/* The bytes that go on the socket as they are. */
static struct tc_buf *wire_of(struct conn *c) { return c->ws ? &c->wsout : &c->out; }

static void conn_flush(struct conn *c) {
  if (c->dead) return;
  struct tc_buf *wire = wire_of(c);
  for (;;) {
    bool drained_h2 = true;
    if (c->h2) {
      bool produced = false;
      while (c->out.len + c->wsout.len < OUT_HIGH) {
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(c->h2, &data);
        if (n < 0) {
          conn_kill(c);
          return;
        }
        if (n == 0) break;
        produced = true;
        tc_buf_append(&c->stage, data, (size_t)n);
        while (!c->dead && c->stage.len >= TC_TS_MAX_PLAINTEXT) seal_stage(c, TC_TS_MAX_PLAINTEXT);
        if (c->dead) return;
      }
      if (produced) {
        c->big_dirty = true;
        c->last_out_ms = tc_mono_ms();
      }
      drained_h2 = c->out.len + c->wsout.len < OUT_HIGH;
      if (c->stage.len) seal_stage(c, c->stage.len);
      if (c->dead) return;
    }
    if (c->ws && c->out.len) {
      ws_frame(&c->wsout, 0x2, c->out.data, c->out.len);
      tc_buf_reset(&c->out);
    }
    while (wire->len) {
      ssize_t w = send(c->fd, wire->data, wire->len, MSG_NOSIGNAL);
      if (w > 0) {
        tc_buf_consume(wire, (size_t)w);
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      conn_kill(c);
      return;
    }
    /* Stopped pulling at OUT_HIGH and the socket took it all: pull more. */
    if (wire->len == 0 && !drained_h2) continue;
    break;
  }
  set_epollout(c, wire->len > 0);
  buf_release_idle(&c->out);
  buf_release_idle(&c->wsout);
  buf_release_idle(&c->stage);
  if (wire->len == 0) {
    if (c->closing) {
      conn_kill(c);
    } else if (c->h2 && !nghttp2_session_want_read(c->h2) && !nghttp2_session_want_write(c->h2)) {
      conn_kill(c); /* GOAWAY exchanged or fatal protocol error sent */
    }
  }
}

/* ---- nghttp2 callbacks (loop) ------------------------------------------------------ */
static void stream_detach(struct conn *c, struct tc_ctl_stream *st) {
  if (st->h2_closed) return;
  st->h2_closed = true;
  if (st->cprev)
    st->cprev->cnext = st->cnext;
  else
    c->streams = st->cnext;
  if (st->cnext) st->cnext->cprev = st->cprev;
  st->cprev = st->cnext = NULL;
  atomic_fetch_sub(&c->srv->st_streams_open, 1);
  stream_cancel(st);
  tc_ctl_stream_unref(st); /* the loop's reference */
}

static ssize_t data_read_cb(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length, uint32_t *flags,
                            nghttp2_data_source *src, void *user) {
  struct tc_ctl_stream *st = src->ptr;
  pthread_mutex_lock(&st->mu);
  size_t avail = st->q.len - st->qoff, n = TC_MIN(avail, length);
  if (n) memcpy(buf, st->q.data + st->qoff, n);
  st->qoff += n;
  atomic_fetch_sub(&st->conn->queued, n);
  if (st->qoff == st->q.len) {
    tc_buf_reset(&st->q);
    buf_release_idle(&st->q);
    st->qoff = 0;
  } else if (st->qoff >= 65536 && st->qoff >= st->q.len / 2) {
    /* A writer that keeps pace with the reader never lets the queue run
     * empty: reclaim the consumed prefix. */
    tc_buf_consume(&st->q, st->qoff);
    st->qoff = 0;
  }
  bool eof = st->ended && st->q.len == 0;
  pthread_mutex_unlock(&st->mu);
  if (eof) *flags |= NGHTTP2_DATA_FLAG_EOF;
  if (n == 0 && !eof) return NGHTTP2_ERR_DEFERRED;
  return (ssize_t)n;
}

static void submit_response(struct conn *c, struct tc_ctl_stream *st) {
  char status[4];
  pthread_mutex_lock(&st->mu);
  snprintf(status, sizeof status, "%03d", st->status);
  char *ctype = st->ctype ? tc_xstrdup(st->ctype) : NULL;
  bool no_body = st->no_body;
  char retry[12] = "";
  if (st->retry_after > 0) snprintf(retry, sizeof retry, "%d", st->retry_after);
  pthread_mutex_unlock(&st->mu);
  nghttp2_nv nva[3] = {{(uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP2_NV_FLAG_NONE}};
  size_t nnv = 1;
  if (ctype)
    nva[nnv++] = (nghttp2_nv){(uint8_t *)"content-type", (uint8_t *)ctype, 12, strlen(ctype), NGHTTP2_NV_FLAG_NONE};
  if (retry[0])
    nva[nnv++] = (nghttp2_nv){(uint8_t *)"retry-after", (uint8_t *)retry, 11, strlen(retry), NGHTTP2_NV_FLAG_NONE};
  nghttp2_data_provider prd = {.source.ptr = st, .read_callback = data_read_cb};
  /* Without a body the HEADERS frame carries END_STREAM: a DATA frame on a
   * HEAD or 204 response is a protocol error to Go's client. */
  if (nghttp2_submit_response(c->h2, st->id, nva, nnv, no_body ? NULL : &prd) == 0) st->submitted = true;
  free(ctype);
}

/* Answers from the loop itself (413 and friends); no handler involved. */
static void respond_direct(struct conn *c, struct tc_ctl_stream *st, int status, const char *text) {
  pthread_mutex_lock(&st->mu);
  bool ok = begin_locked(st, status, "text/plain; charset=utf-8") == 0;
  if (ok) queue_locked(st, text, strlen(text));
  st->ended = true;
  pthread_mutex_unlock(&st->mu);
  st->direct = true;
  if (ok) submit_response(c, st);
}

static struct tc_ctl_stream *stream_of(nghttp2_session *s, int32_t id) {
  return nghttp2_session_get_stream_user_data(s, id);
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *user) {
  struct conn *c = user;
  if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  /* Streams reset by the client may still be held by handlers; bound them
   * so a reset flood cannot pile up work. */
  if (atomic_load(&c->objects) >= STREAM_OBJECTS_MAX) return NGHTTP2_ERR_CALLBACK_FAILURE;
  struct tc_ctl_stream *st = tc_xcalloc(1, sizeof *st);
  atomic_init(&st->refs, 1);
  pthread_mutex_init(&st->mu, NULL);
  st->conn = c;
  atomic_fetch_add(&c->refs, 1);
  atomic_fetch_add(&c->objects, 1);
  st->srv = c->srv;
  st->id = f->hd.stream_id;
  st->cnext = c->streams;
  if (c->streams) c->streams->cprev = st;
  c->streams = st;
  atomic_fetch_add(&c->srv->st_streams_open, 1);
  c->got_request = true;
  nghttp2_session_set_stream_user_data(s, st->id, st);
  return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user) {
  if (f->hd.type != NGHTTP2_HEADERS) return 0;
  struct tc_ctl_stream *st = stream_of(s, f->hd.stream_id);
  if (!st || st->dispatched) return 0;
  /* Go's client sends a handful of short headers; anything huge is hostile
   * and costs us memory, so the whole connection goes. */
  st->header_bytes += namelen + valuelen + 32;
  if (st->header_bytes > TC_CTL_HEADER_BYTES_MAX) return NGHTTP2_ERR_CALLBACK_FAILURE;
  char **slot = NULL;
  if (namelen == 7 && !memcmp(name, ":method", 7))
    slot = &st->method;
  else if (namelen == 5 && !memcmp(name, ":path", 5))
    slot = &st->path;
  else if (namelen == 10 && !memcmp(name, ":authority", 10))
    slot = &st->authority;
  if (slot) {
    free(*slot);
    *slot = tc_xstrndup((const char *)value, valuelen);
    return 0;
  }
  if (namelen && name[0] == ':') return 0; /* :scheme */
  if (st->nheaders >= TC_CTL_HEADERS_MAX) return NGHTTP2_ERR_CALLBACK_FAILURE;
  if (namelen == 14 && !memcmp(name, "content-length", 14)) {
    /* nghttp2 has validated the digits; refuse early instead of buffering. */
    char tmp[16];
    size_t n = TC_MIN(valuelen, sizeof tmp - 1);
    memcpy(tmp, value, n);
    tmp[n] = 0;
    if (valuelen > 9 || strtoul(tmp, NULL, 10) > TC_CTL_BODY_MAX) st->too_big = true;
  }
  st->headers = tc_xrealloc(st->headers, (st->nheaders + 1) * sizeof *st->headers);
  st->headers[st->nheaders].name = tc_xstrndup((const char *)name, namelen);
  st->headers[st->nheaders].value = tc_xstrndup((const char *)value, valuelen);
  st->nheaders++;
  return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data, size_t len,
                         void *user) {
  struct conn *c = user;
  struct tc_ctl_stream *st = stream_of(s, id);
  if (!st || st->too_big || st->dispatched) return 0; /* discarded; nghttp2 still credits the window */
  if (st->body.len + len > TC_CTL_BODY_MAX) {
    st->too_big = true;
    atomic_fetch_sub(&c->inbound, st->body.len);
    tc_buf_free(&st->body);
    return 0;
  }
  if (atomic_fetch_add(&c->inbound, len) + len > TC_CTL_CONN_BUFFER_MAX) {
    atomic_fetch_sub(&c->inbound, len);
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  }
  tc_buf_append(&st->body, data, len);
  return 0;
}

static char *put_str(char **p, const char *s) {
  size_t n = strlen(s) + 1;
  char *r = memcpy(*p, s, n);
  *p += n;
  return r;
}

/* Moves the request (header array, strings, body) into one exact-size
 * block. A map poll keeps its request for the stream's life, i.e. hours:
 * a dozen small allocations and the body buffer's doubling slack, per idle
 * node, become one allocation. */
static void pack_request(struct tc_ctl_stream *st) {
  struct tc_ctl_request *r = &st->req;
  const char *m = st->method ? st->method : "", *pa = st->path ? st->path : "";
  const char *au = st->authority ? st->authority : "";
  size_t hbytes = st->nheaders * sizeof *st->headers;
  size_t total = hbytes + strlen(m) + strlen(pa) + strlen(au) + 3 + st->body.len + 1;
  for (size_t i = 0; i < st->nheaders; i++) total += strlen(st->headers[i].name) + strlen(st->headers[i].value) + 2;
  char *blk = tc_xmalloc(total);
  struct tc_ctl_header *h = (struct tc_ctl_header *)(void *)blk; /* malloc alignment suits pointers */
  char *p = blk + hbytes;
  uint8_t *body = (uint8_t *)p; /* first, so the body needs no search */
  if (st->body.len) memcpy(p, st->body.data, st->body.len);
  p[st->body.len] = 0;
  p += st->body.len + 1;
  r->method = put_str(&p, m);
  r->path = put_str(&p, pa);
  r->authority = put_str(&p, au);
  for (size_t i = 0; i < st->nheaders; i++) {
    h[i].name = put_str(&p, st->headers[i].name);
    h[i].value = put_str(&p, st->headers[i].value);
    free(st->headers[i].name);
    free(st->headers[i].value);
  }
  r->headers = h;
  r->nheaders = st->nheaders;
  r->body = body;
  r->body_len = st->body.len;
  free(st->method);
  free(st->path);
  free(st->authority);
  free(st->headers);
  st->method = st->path = st->authority = NULL;
  st->headers = NULL;
  st->nheaders = 0;
  st->packed = blk;
  st->packed_body_len = st->body.len;
  tc_buf_free(&st->body);
}

static void dispatch(struct conn *c, struct tc_ctl_stream *st) {
  st->dispatched = true;
  st->is_head = st->method && !strcmp(st->method, "HEAD");
  struct tc_ctl_request *r = &st->req;
  pack_request(st);
  memcpy(r->machine_key, c->sess.peer, 32);
  r->version = c->sess.version;
  r->conn_id = c->id;
  r->stream_id = st->id;
  snprintf(r->peer, sizeof r->peer, "%s", c->peer);
  atomic_fetch_add(&c->srv->st_requests, 1);
  tc_ctl_stream_ref(st); /* the handler's reference, carried by the job */
  push_job(c->srv, st);
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *user) {
  struct conn *c = user;
  if (f->hd.type != NGHTTP2_HEADERS && f->hd.type != NGHTTP2_DATA) return 0;
  struct tc_ctl_stream *st = stream_of(s, f->hd.stream_id);
  if (!st || st->dispatched || st->direct) return 0;
  if (st->too_big) {
    /* Answer now; the rest of the body is read and dropped. */
    respond_direct(c, st, 413, "request body too large\n");
    return 0;
  }
  if (f->hd.flags & NGHTTP2_FLAG_END_STREAM) dispatch(c, st);
  return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t code, void *user) {
  struct conn *c = user;
  struct tc_ctl_stream *st = stream_of(s, id);
  if (st) stream_detach(c, st);
  return 0;
}

/* ---- connection lifecycle (loop) ------------------------------------------------------ */
static void conn_kill(struct conn *c) {
  if (c->dead) return;
  c->dead = true;
  struct tc_ctl_server *srv = c->srv;
  /* nghttp2_session_del does not report stream closure: cancel here. */
  while (c->streams) stream_detach(c, c->streams);
  if (c->h2) nghttp2_session_del(c->h2);
  c->h2 = NULL;
  for (int i = 0; i < H2_BIG_SLOTS; i++) /* none: nghttp2 frees what it allocates */
    if (c->big[i].p) h2_big_free(c, &c->big[i]);
  close(c->fd);
  c->fd = -1;
  if (c->prev)
    c->prev->next = c->next;
  else
    srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = NULL;
  c->next = srv->dead;
  srv->dead = c;
  atomic_fetch_sub(&srv->st_conns_open, 1);
  atomic_fetch_sub(&srv->slots, 1);
}

static void conn_process_records(struct conn *c) {
  size_t off = 0;
  uint8_t pt[TC_TS_MAX_MSG];
  while (!c->dead) {
    const uint8_t *p = (const uint8_t *)c->in.data + off;
    size_t avail = c->in.len - off;
    int rl = tc_ts_record_len(p, avail);
    if (rl < 0) {
      conn_kill(c);
      return;
    }
    if (rl == 0 || avail < (size_t)rl) break;
    size_t ptlen;
    if (tc_ts_open_record(&c->sess.rx, p, (size_t)rl, pt, &ptlen)) {
      conn_kill(c);
      return;
    }
    off += (size_t)rl;
    if (ptlen == 0) continue; /* empty records are legal */
    ssize_t r = nghttp2_session_mem_recv(c->h2, pt, ptlen);
    if (r < 0 || (size_t)r != ptlen) {
      conn_kill(c);
      return;
    }
  }
  if (!c->dead) {
    tc_buf_consume(&c->in, off);
    buf_release_idle(&c->in);
  }
}

/* Unwraps client WebSocket frames from wsin into the Noise byte stream in
 * c->in. Message boundaries mean nothing here. Returns false if the
 * connection must go. */
static bool ws_decode(struct conn *c) {
  for (;;) {
    const uint8_t *p = (const uint8_t *)c->wsin.data;
    size_t avail = c->wsin.len;
    if (avail < 2) return true;
    uint8_t op = p[0] & 0x0f;
    bool fin = p[0] & 0x80;
    if ((p[0] & 0x70) || !(p[1] & 0x80)) return false; /* no extensions; clients must mask */
    size_t len = p[1] & 0x7f, hl = 2;
    if (len == 126) {
      if (avail < 4) return true;
      len = (size_t)p[2] << 8 | p[3];
      hl = 4;
    } else if (len == 127) {
      if (avail < 10) return true;
      uint64_t l = 0;
      for (int i = 0; i < 8; i++) l = l << 8 | p[2 + i];
      if (l > WS_FRAME_MAX) return false;
      len = (size_t)l;
      hl = 10;
    }
    if (len > WS_FRAME_MAX || (op >= 8 && (len > 125 || !fin))) return false;
    if (avail < hl + 4 + len) return true;
    const uint8_t *mask = p + hl;
    uint8_t *payload = (uint8_t *)c->wsin.data + hl + 4;
    for (size_t i = 0; i < len; i++) payload[i] ^= mask[i & 3];
    switch (op) {
    case 0x0: /* continuation */
    case 0x2: /* binary */
      tc_buf_append(&c->in, payload, len);
      break;
    case 0x8: /* close: answer and go */
      ws_frame(&c->wsout, 0x8, payload, len >= 2 ? 2 : 0);
      c->closing = true;
      c->deadline_ms = tc_mono_ms() + CLOSING_GRACE_MS;
      tc_buf_reset(&c->wsin);
      return true;
    case 0x9: /* ping; a peer that pings without reading gets no more pongs (RFC 6455 §5.5.3) */
      if (c->wsout.len < OUT_HIGH) ws_frame(&c->wsout, 0xA, payload, len);
      break;
    case 0xA: /* pong */
      break;
    default: /* text frames and reserved opcodes */
      return false;
    }
    tc_buf_consume(&c->wsin, hl + 4 + len);
  }
}

static void conn_read(struct conn *c) {
  size_t budget = READ_BUDGET;
  char buf[READ_CHUNK];
  while (!c->dead && budget && !c->closing) {
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n > 0) {
      budget = (size_t)n >= budget ? 0 : budget - (size_t)n;
      if (!c->established) continue; /* refused: drain and ignore */
      c->last_input_ms = tc_mono_ms();
      if (c->ws) {
        tc_buf_append(&c->wsin, buf, (size_t)n);
        if (!ws_decode(c)) {
          conn_kill(c);
          return;
        }
        buf_release_idle(&c->wsin); /* up to a 64 KiB frame's worth otherwise */
      } else {
        tc_buf_append(&c->in, buf, (size_t)n);
      }
      conn_process_records(c);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    conn_kill(c); /* EOF or error */
    return;
  }
  /* A closing connection ignores input but must notice the peer leaving. */
  while (!c->dead && c->closing) {
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n > 0) continue;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    conn_kill(c);
    return;
  }
}

static const char ws_no_subprotocol[] = "client must speak the control subprotocol";

static const char resp101[] =
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n";

static void conn_start(struct tc_ctl_server *srv, struct incoming *in) {
  struct conn *c = tc_xcalloc(1, sizeof *c);
  atomic_init(&c->refs, 1);
  c->srv = srv;
  c->fd = in->fd;
  c->id = ++srv->next_id;
  memcpy(c->peer, in->peer, sizeof c->peer);
  /* F_SETFL ignores the access mode; no other status flag is ever set on
   * these sockets, so no F_GETFL first. */
  fcntl(c->fd, F_SETFL, O_NONBLOCK);
  /* Sockets from the front door's listener come with TCP_NODELAY and
   * keepalive; others (tests' listeners) get them here. Nothing to do for
   * the AF_UNIX pairs that carry TLS connections. */
  if (!tc_tcp_tuned(c->fd)) tc_tcp_tune(c->fd);
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  atomic_fetch_add(&srv->st_conns_open, 1);
  atomic_fetch_add(&srv->st_conns_total, 1);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
    conn_kill(c);
    return;
  }
  c->ws = in->ws;
  if (c->ws) {
    tc_buf_printf(&c->wsout,
                  "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Accept: %s\r\n%s\r\n",
                  in->ws_accept,
                  in->ws_refusal && !strcmp(in->ws_refusal, ws_no_subprotocol)
                      ? ""
                      : "Sec-WebSocket-Protocol: tailscale-control-protocol\r\n");
    if (in->ws_refusal) {
      /* Close with 1008 (policy violation), as the reference server does. */
      size_t rl = strlen(in->ws_refusal);
      uint8_t cl[128] = {0x03, 0xf0};
      memcpy(cl + 2, in->ws_refusal, TC_MIN(rl, sizeof cl - 2));
      ws_frame(&c->wsout, 0x8, cl, 2 + TC_MIN(rl, sizeof cl - 2));
      atomic_fetch_add(&srv->st_hs_failed, 1);
      c->closing = true;
      c->deadline_ms = tc_mono_ms() + CLOSING_GRACE_MS;
      conn_flush(c);
      return;
    }
  } else {
    tc_buf_append(&c->out, resp101, sizeof resp101 - 1);
  }
  if (in->hs_rc) {
    atomic_fetch_add(&srv->st_hs_failed, 1);
    if (in->hs_emsg) {
      uint8_t ef[256];
      tc_buf_append(&c->out, ef, tc_ts_error_frame(in->hs_emsg, ef));
    }
    c->closing = true;
    c->deadline_ms = tc_mono_ms() + CLOSING_GRACE_MS;
    conn_flush(c);
    return;
  }
  c->sess = in->hs_sess;
  c->established = true;
  c->last_input_ms = tc_mono_ms();
  c->deadline_ms = c->last_input_ms + srv->opts.first_request_timeout_ms;
  tc_buf_append(&c->out, in->hs_resp, sizeof in->hs_resp);
  /* Go's server sends no early payload on the WebSocket path. */
  if (srv->opts.early_payload && !c->ws) {
    char *json = srv->opts.early_payload(srv->opts.early_ctx, c->sess.peer, c->sess.version);
    if (json) {
      size_t n = strlen(json);
      uint8_t hdr[9] = {0xff, 0xff, 0xff, 'T', 'S', (uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8),
                        (uint8_t)n};
      tc_buf_append(&c->stage, hdr, sizeof hdr);
      conn_send_plain(c, json, n);
      free(json);
      if (c->dead) return;
    }
  }
  nghttp2_mem mem = {c, h2_malloc, h2_free, h2_calloc, h2_realloc};
  if (nghttp2_session_server_new3(&c->h2, srv->cbs, c, srv->h2opt, &mem) != 0) {
    c->h2 = NULL;
    conn_kill(c);
    return;
  }
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, TC_CTL_MAX_STREAMS},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, TC_CTL_WINDOW},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, TC_CTL_HEADER_BYTES_MAX},
      {NGHTTP2_SETTINGS_HEADER_TABLE_SIZE, 0},
  };
  nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, TC_ARRAY_LEN(iv));
  /* Room for several concurrent request bodies before WINDOW_UPDATEs. */
  nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, 4 * TC_CTL_WINDOW);
  conn_flush(c);
}

static void handle_wakeup(struct tc_ctl_server *srv) {
  uint64_t v;
  ssize_t r = read(srv->evfd, &v, sizeof v);
  (void)r;
  pthread_mutex_lock(&srv->mu);
  struct incoming *inc = srv->incoming;
  srv->incoming = NULL;
  struct tc_ctl_stream *list = srv->notify;
  srv->notify = NULL;
  pthread_mutex_unlock(&srv->mu);
  while (inc) {
    struct incoming *next = inc->next;
    conn_start(srv, inc);
    tc_wipe(inc, sizeof *inc);
    free(inc);
    inc = next;
  }
  /* Reverse to restore submission order (the list is LIFO). */
  struct tc_ctl_stream *rev = NULL;
  while (list) {
    struct tc_ctl_stream *next = list->notify_next;
    list->notify_next = rev;
    rev = list;
    list = next;
  }
  struct conn *touched[64];
  size_t ntouched = 0;
  for (struct tc_ctl_stream *st = rev, *next; st; st = next) {
    next = st->notify_next;
    pthread_mutex_lock(&st->mu);
    st->notified = false;
    bool begun = st->begun, reset = st->reset_req;
    pthread_mutex_unlock(&st->mu);
    struct conn *c = st->conn;
    if (!c->dead && !st->h2_closed && c->h2) {
      if (reset)
        nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_ENHANCE_YOUR_CALM);
      else if (begun && !st->submitted)
        submit_response(c, st);
      else if (st->submitted)
        nghttp2_session_resume_data(c->h2, st->id);
      bool seen = false;
      for (size_t i = 0; i < ntouched; i++) seen |= touched[i] == c;
      if (!seen && ntouched < TC_ARRAY_LEN(touched)) {
        touched[ntouched++] = c;
        atomic_fetch_add(&c->refs, 1);
      } else if (!seen) {
        conn_flush(c);
      }
    }
    tc_ctl_stream_unref(st);
  }
  for (size_t i = 0; i < ntouched; i++) {
    conn_flush(touched[i]);
    conn_unref(touched[i]);
  }
}

static void check_deadlines(struct tc_ctl_server *srv) {
  int64_t now = tc_mono_ms();
  for (struct conn *c = srv->conns, *next; c; c = next) {
    next = c->next;
    if (c->deadline_ms && now > c->deadline_ms && (c->closing || !c->got_request)) {
      conn_kill(c);
    } else if (c->big_dirty && srv->opts.idle_release_ms >= 0 && now - c->last_out_ms >= srv->opts.idle_release_ms) {
      conn_release_idle(c);
    } else if (c->h2 && c->got_request && !c->streams && now - c->last_input_ms > srv->opts.idle_timeout_ms) {
      /* Idle: real clients keep a map poll open and redial on demand, so
       * this only trims abandoned connections. GOAWAY first, then close
       * once it is out (conn_flush sees a finished session). */
      nghttp2_session_terminate_session(c->h2, NGHTTP2_NO_ERROR);
      c->last_input_ms = now; /* once */
      conn_flush(c);
    }
  }
}

static void *loop_main(void *arg) {
  struct tc_ctl_server *srv = arg;
  struct epoll_event evs[64];
  int64_t last_check = tc_mono_ms();
  for (;;) {
    int n = epoll_wait(srv->epfd, evs, TC_ARRAY_LEN(evs), srv->conns ? 100 : 1000);
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (!c) {
        handle_wakeup(srv);
        continue;
      }
      if (c->dead) continue;
      if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) conn_read(c);
      if (!c->dead) conn_flush(c);
    }
    int64_t now = tc_mono_ms();
    if (now - last_check >= 100) {
      check_deadlines(srv);
      last_check = now;
    }
    while (srv->dead) {
      struct conn *c = srv->dead;
      srv->dead = c->next;
      conn_unref(c);
    }
    pthread_mutex_lock(&srv->mu);
    bool stop = srv->stopping;
    pthread_mutex_unlock(&srv->mu);
    if (stop) break;
  }
  /* Say goodbye properly (GOAWAY, best effort, never blocking) so clients
   * reconnect at once instead of diagnosing a broken connection. */
  for (struct conn *c = srv->conns, *next; c; c = next) {
    next = c->next;
    if (c->h2 && !c->dead) {
      nghttp2_session_terminate_session(c->h2, NGHTTP2_NO_ERROR);
      conn_flush(c);
    }
  }
  while (srv->conns) conn_kill(srv->conns);
  while (srv->dead) {
    struct conn *c = srv->dead;
    srv->dead = c->next;
    conn_unref(c);
  }
  return NULL;
}

/* ---- upgrade (listener thread; handshakes on the workers) ------------------------------------------------------- */
static const char *head_get(const struct tc_http_head *h, const char *name) {
  for (size_t i = 0; i < h->nheaders && i < TC_HTTP_HEADERS_MAX; i++)
    if (h->headers[i].name && tc_strieq(h->headers[i].name, name)) return h->headers[i].value;
  return NULL;
}

static void refuse(int fd, int status, const char *reason, const char *body) {
  char buf[512];
  int n = snprintf(buf, sizeof buf,
                   "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
                   "Content-Length: %zu\r\n\r\n%s\n",
                   status, reason, strlen(body) + 1, body);
  ssize_t w = send(fd, buf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
  (void)w;
  shutdown(fd, SHUT_WR);
  close(fd);
}

static bool refused(int fd, int status, const char *reason, const char *body) {
  refuse(fd, status, reason, body);
  return false;
}

/* Discards the request head, which the front door left unread. */
static int discard_head(int fd, size_t n) {
  char buf[4096];
  /* The front door has peeked the whole head, so it is normally in the
   * socket buffer already: no timeout to set and reset for that. */
  while (n) {
    ssize_t r = recv(fd, buf, TC_MIN(n, sizeof buf), MSG_DONTWAIT);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    n -= (size_t)r;
  }
  if (!n) return 0;
  struct timeval tv = {.tv_sec = 2};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  while (n) {
    ssize_t r = recv(fd, buf, TC_MIN(n, sizeof buf), 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return TC_EIO;
    n -= (size_t)r;
  }
  tv.tv_sec = 0;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return 0;
}

/* An upgraded connection that will not be served (shutdown): closed, and
 * its handshake state wiped. */
static void drop_incoming(struct incoming *in) {
  close(in->fd);
  tc_wipe(in, sizeof *in);
  free(in);
}

/* Hands in to the loop; false (fd closed) when the server is stopping. */
static bool enqueue(struct tc_ctl_server *srv, struct incoming *in) {
  pthread_mutex_lock(&srv->mu);
  bool stopping = srv->stopping;
  if (!stopping) {
    in->next = srv->incoming;
    srv->incoming = in;
    wake_loop(srv);
  }
  pthread_mutex_unlock(&srv->mu);
  if (stopping) drop_incoming(in);
  return !stopping;
}

/* The handshake's X25519 work (five multiplications) runs on the worker
 * pool, in parallel, rather than on the single loop thread that every
 * established connection depends on. */
static void run_handshake(struct tc_ctl_server *srv, struct incoming *in) {
  if (!in->ws_refusal)
    in->hs_rc = tc_ts_server_accept(srv->priv, in->init, in->init_len, NULL, in->hs_resp, &in->hs_sess,
                                    &in->hs_emsg);
  if (!enqueue(srv, in)) atomic_fetch_sub(&srv->slots, 1);
}

/* Queues an upgraded connection for its handshake. false (fd closed) once
 * the workers are stopping. */
static bool submit_handshake(struct tc_ctl_server *srv, struct incoming *in) {
  pthread_mutex_lock(&srv->wmu);
  bool stopping = srv->wstop;
  if (!stopping) {
    in->next = NULL;
    if (srv->hs_tail)
      srv->hs_tail->next = in;
    else
      srv->hs_jobs = in;
    srv->hs_tail = in;
    pthread_cond_signal(&srv->wcond);
  }
  pthread_mutex_unlock(&srv->wmu);
  if (stopping) drop_incoming(in);
  return !stopping;
}

/* Standard base64 of the whole string into out (cap bytes). 0 or TC_EINVAL. */
static int b64_decode(const char *s, size_t slen, uint8_t *out, size_t cap, size_t *outlen) {
  const char *end = NULL;
  if (sodium_base642bin(out, cap, s, slen, NULL, outlen, &end, sodium_base64_VARIANT_ORIGINAL) != 0 ||
      end != s + slen)
    return TC_EINVAL;
  return 0;
}

/* Finds key in a raw query and percent-decodes its value into out, with
 * Go's url.ParseQuery rules ('+' is a space). Length or -1. */
static int query_param(const char *q, const char *key, char *out, size_t cap) {
  size_t klen = strlen(key);
  for (const char *p = q; p && *p;) {
    const char *amp = strchr(p, '&');
    size_t n = amp ? (size_t)(amp - p) : strlen(p);
    if (n > klen && p[klen] == '=' && !strncmp(p, key, klen)) {
      size_t o = 0;
      for (size_t i = klen + 1; i < n; i++) {
        int ch = (unsigned char)p[i];
        if (ch == '%') {
          uint8_t b;
          if (i + 2 >= n || tc_hex_decode(p + i + 1, 2, &b, 1)) return -1;
          ch = b;
          i += 2;
        } else if (ch == '+') {
          ch = ' ';
        }
        if (o + 1 >= cap) return -1;
        out[o++] = (char)ch;
      }
      out[o] = 0;
      return (int)o;
    }
    p = amp ? amp + 1 : NULL;
  }
  return -1;
}

static bool has_token(const char *list, const char *tok) {
  size_t tl = strlen(tok);
  for (const char *p = list; p && *p;) {
    while (*p == ' ' || *p == '\t' || *p == ',') p++;
    const char *e = p;
    while (*e && *e != ',' && *e != ' ' && *e != '\t') e++;
    if ((size_t)(e - p) == tl && !strncasecmp(p, tok, tl)) return true;
    p = e;
  }
  return false;
}

/* The WebSocket variant (browser clients): GET with the initiation in the
 * query; afterwards the Noise stream travels in binary messages. */
static bool upgrade_ws(struct tc_ctl_server *srv, int fd, const struct tc_http_head *head) {
  static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  const char *key = head_get(head, "Sec-WebSocket-Key");
  const char *ver = head_get(head, "Sec-WebSocket-Version");
  const char *conn = head_get(head, "Connection");
  uint8_t kbin[32];
  size_t klen = 0;
  if (!head->method || strcmp(head->method, "GET") || !conn || !has_token(conn, "upgrade") || !ver || strcmp(ver, "13") || !key ||
      strlen(key) > 40 || b64_decode(key, strlen(key), kbin, sizeof kbin, &klen) || klen != 16)
    return refused(fd, 400, "Bad Request", "bad websocket handshake");
  struct incoming *in = tc_xcalloc(1, sizeof *in);
  in->fd = fd;
  in->ws = true;
  snprintf(in->peer, sizeof in->peer, "%s", head->peer);
  char cat[80];
  snprintf(cat, sizeof cat, "%s%s", key, guid);
  uint8_t sha[20];
  mbedtls_sha1_ret((const unsigned char *)cat, strlen(cat), sha);
  sodium_bin2base64(in->ws_accept, sizeof in->ws_accept, sha, sizeof sha, sodium_base64_VARIANT_ORIGINAL);
  const char *proto = head_get(head, "Sec-WebSocket-Protocol");
  char hs[512];
  int hl;
  if (!proto || !has_token(proto, "tailscale-control-protocol")) {
    in->ws_refusal = ws_no_subprotocol;
  } else if ((hl = query_param(head->query ? head->query : "", "X-Tailscale-Handshake", hs, sizeof hs)) <= 0) {
    in->ws_refusal = "missing Tailscale handshake parameter";
  } else {
    uint8_t dec[400];
    if (b64_decode(hs, (size_t)hl, dec, sizeof dec, &in->init_len)) {
      in->ws_refusal = "invalid tailscale handshake parameter";
    } else {
      memcpy(in->init, dec, TC_MIN(in->init_len, sizeof in->init));
    }
  }
  return submit_handshake(srv, in);
}

static bool upgrade_checked(struct tc_ctl_server *srv, int fd, const struct tc_http_head *head);

void tc_ctl_upgrade(void *ctx, int fd, const struct tc_http_head *head) {
  struct tc_ctl_server *srv = ctx;
  if (discard_head(fd, head->head_len)) {
    close(fd);
    return;
  }
  /* A slot is taken here and given back when the connection dies (or is
   * refused below), so a burst of upgrades cannot run the process out of fds. */
  if (atomic_fetch_add(&srv->slots, 1) >= srv->opts.max_conns) {
    atomic_fetch_sub(&srv->slots, 1);
    return refuse(fd, 503, "Service Unavailable", "too many connections");
  }
  if (!upgrade_checked(srv, fd, head)) atomic_fetch_sub(&srv->slots, 1);
}

static bool upgrade_checked(struct tc_ctl_server *srv, int fd, const struct tc_http_head *head) {
  const char *up = head_get(head, "Upgrade");
  if (!up || !*up) return refused(fd, 400, "Bad Request", "missing next protocol");
  if (tc_strieq(up, "websocket")) return upgrade_ws(srv, fd, head);
  if (!tc_strieq(up, "tailscale-control-protocol"))
    return refused(fd, 400, "Bad Request", "unknown next protocol");
  const char *hs = head_get(head, "X-Tailscale-Handshake");
  if (!hs || !*hs) return refused(fd, 400, "Bad Request", "missing Tailscale handshake header");
  /* The head is bounded (TC_HTTP_HEAD_MAX), so the decoded size is too. */
  size_t hslen = strlen(hs);
  uint8_t *dec = tc_xmalloc(hslen / 4 * 3 + 3);
  size_t declen = 0;
  if (b64_decode(hs, hslen, dec, hslen / 4 * 3 + 3, &declen)) {
    free(dec);
    return refused(fd, 400, "Bad Request", "invalid tailscale handshake header");
  }
  struct incoming *in = tc_xcalloc(1, sizeof *in);
  in->fd = fd;
  in->init_len = declen;
  memcpy(in->init, dec, TC_MIN(declen, sizeof in->init));
  snprintf(in->peer, sizeof in->peer, "%s", head->peer);
  free(dec);
  return submit_handshake(srv, in);
}

/* ---- server lifecycle ------------------------------------------------------------------ */
int tc_ctl_server_new(tc_ctl_handler_fn handler, void *ctx, const uint8_t server_priv[32],
                      const struct tc_ctl_server_opts *opts, struct tc_ctl_server **out, struct tc_err *err) {
  *out = NULL;
  if (tc_crypto_init()) return tc_err_set(err, TC_EINTERNAL, "libsodium init failed");
  struct tc_ctl_server *srv = tc_xcalloc(1, sizeof *srv);
  srv->epfd = srv->evfd = -1;
  srv->handler = handler;
  srv->ctx = ctx;
  memcpy(srv->priv, server_priv, 32);
  if (opts) srv->opts = *opts;
  if (srv->opts.workers <= 0) srv->opts.workers = TC_CTL_WORKERS_DEFAULT;
  if (srv->opts.first_request_timeout_ms <= 0) srv->opts.first_request_timeout_ms = 30000;
  if (srv->opts.max_conns <= 0) srv->opts.max_conns = 65536;
  if (srv->opts.idle_timeout_ms <= 0) srv->opts.idle_timeout_ms = 300000;
  if (srv->opts.idle_release_ms == 0) srv->opts.idle_release_ms = IDLE_RELEASE_MS;
  srv->page = (size_t)sysconf(_SC_PAGESIZE);
  pthread_mutex_init(&srv->mu, NULL);
  pthread_mutex_init(&srv->wmu, NULL);
  pthread_cond_init(&srv->wcond, NULL);
  srv->epfd = epoll_create1(EPOLL_CLOEXEC);
  srv->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (srv->epfd < 0 || srv->evfd < 0) {
    tc_ctl_server_stop(srv);
    return tc_err_set(err, TC_EIO, "epoll/eventfd: %s", strerror(errno));
  }
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(srv->epfd, EPOLL_CTL_ADD, srv->evfd, &ev);

  nghttp2_session_callbacks_new(&srv->cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(srv->cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(srv->cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(srv->cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_frame_recv_callback(srv->cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(srv->cbs, on_stream_close);
  nghttp2_option_new(&srv->h2opt);
  /* A SETTINGS frame carries a handful of entries; more is a flood. */
  nghttp2_option_set_max_settings(srv->h2opt, 32);
  /* Memory per connection: closed streams are kept only to serve RFC 7540
   * priority, which Go's client does not use (~230 bytes each, up to
   * MAX_CONCURRENT_STREAMS of them), and our responses carry two short
   * headers, not worth a dynamic table entry on every connection. */
  nghttp2_option_set_no_closed_streams(srv->h2opt, 1);
  nghttp2_option_set_max_deflate_dynamic_table_size(srv->h2opt, 0);

  srv->workers = tc_xcalloc((size_t)srv->opts.workers, sizeof *srv->workers);
  for (int i = 0; i < srv->opts.workers; i++) {
    if (pthread_create(&srv->workers[i], NULL, worker_main, srv)) break;
    srv->nworkers++;
  }
  if (srv->nworkers == 0 || pthread_create(&srv->loop, NULL, loop_main, srv)) {
    tc_ctl_server_stop(srv);
    return tc_err_set(err, TC_EINTERNAL, "cannot start threads");
  }
  srv->loop_started = true;
  *out = srv;
  return 0;
}

void tc_ctl_server_stop(struct tc_ctl_server *srv) {
  if (!srv) return;
  pthread_mutex_lock(&srv->mu);
  srv->stopping = true;
  if (srv->evfd >= 0) wake_loop(srv);
  pthread_mutex_unlock(&srv->mu);
  if (srv->loop_started) pthread_join(srv->loop, NULL);
  /* Every connection is gone and every stream cancelled: handlers see
   * failing writes and return; queued jobs are dropped unrun. */
  pthread_mutex_lock(&srv->wmu);
  srv->wstop = true;
  pthread_cond_broadcast(&srv->wcond);
  pthread_mutex_unlock(&srv->wmu);
  for (int i = 0; i < srv->nworkers; i++) pthread_join(srv->workers[i], NULL);
  free(srv->workers);
  /* Leftovers the loop never picked up. */
  while (srv->incoming) {
    struct incoming *in = srv->incoming;
    srv->incoming = in->next;
    drop_incoming(in);
  }
  while (srv->notify) {
    struct tc_ctl_stream *st = srv->notify;
    srv->notify = st->notify_next;
    tc_ctl_stream_unref(st);
  }
  for (size_t i = 0; i < srv->npool; i++) munmap(srv->pool[i].p, srv->pool[i].len);
  if (srv->cbs) nghttp2_session_callbacks_del(srv->cbs);
  if (srv->h2opt) nghttp2_option_del(srv->h2opt);
  if (srv->epfd >= 0) close(srv->epfd);
  if (srv->evfd >= 0) close(srv->evfd);
  pthread_mutex_destroy(&srv->mu);
  pthread_mutex_destroy(&srv->wmu);
  pthread_cond_destroy(&srv->wcond);
  tc_wipe(srv->priv, sizeof srv->priv);
  free(srv);
}

void tc_ctl_server_stats(struct tc_ctl_server *srv, struct tc_ctl_stats *out) {
  out->conns_open = atomic_load(&srv->st_conns_open);
  out->conns_total = atomic_load(&srv->st_conns_total);
  out->handshakes_failed = atomic_load(&srv->st_hs_failed);
  out->streams_open = atomic_load(&srv->st_streams_open);
  out->requests_total = atomic_load(&srv->st_requests);
  out->h2_heap_bytes = atomic_load(&srv->st_h2_heap);
  out->h2_mapped_bytes = atomic_load(&srv->st_h2_mapped);
  out->h2_pooled_bytes = atomic_load(&srv->st_h2_pooled);
  out->idle_released_bytes = atomic_load(&srv->st_released);
  out->idle_releases = atomic_load(&srv->st_releases);
}
