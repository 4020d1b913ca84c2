/* serve: the server's lifecycle — config to running listeners, the
 * housekeeping tick, signals (SIGTERM/SIGINT stop, SIGHUP reloads) and an
 * orderly shutdown. The WIRING section below is where protocol modules
 * (/ts2021, /derp, TLS) are plugged into the front door.
 *
 * Threads: runs on the main thread, which blocks SIGINT/SIGTERM/SIGHUP
 * before any other thread starts (so every thread inherits the mask) and
 * then waits for them with sigtimedwait between ticks. In policy file mode
 * a watcher thread also reloads the policy when the file changes. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/cli_int.h"
#include "config/config.h"
#include "crypto/crypto.h"
#include "derp/derp.h"
#include "http/api.h"
#include "http/http.h"
#include "http/metrics.h"
#include "mapper/mapper.h"
#include "model/model.h"
#include "policy/policy.h"
#include "proto/proto.h"
#include "tls/tls.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#define TICK_MS 5000
#define MAX_RELOADS 16

static pthread_mutex_t reload_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
  tc_reload_fn fn;
  void *ctx;
} reloads[MAX_RELOADS];
static int nreloads;

int tc_cli_on_reload(tc_reload_fn fn, void *ctx) {
  int rc = TC_OK;
  pthread_mutex_lock(&reload_mu);
  if (nreloads == MAX_RELOADS) rc = TC_ETOOBIG;
  else reloads[nreloads].fn = fn, reloads[nreloads].ctx = ctx, nreloads++;
  pthread_mutex_unlock(&reload_mu);
  return rc;
}

static void run_reloads(void) {
  pthread_mutex_lock(&reload_mu);
  int n = nreloads;
  typeof(reloads[0]) copy[MAX_RELOADS];
  memcpy(copy, reloads, sizeof copy);
  pthread_mutex_unlock(&reload_mu);
  for (int i = 0; i < n; i++) copy[i].fn(copy[i].ctx);
}

/* ---- policy file (policy.mode: file) ------------------------------------------------ */

/* The file is re-read on SIGHUP (main thread) and when the watcher thread
 * sees it change; mu serialises the two so a slow reload never interleaves
 * with another. A bad file is logged and the previous policy stays. */
struct policy_file {
  struct tc_model *model;
  const char *path;
  pthread_mutex_t mu;
  /* watcher: inotify on the file's directory (editors and
   * tc_write_file_atomic replace the file by rename, which a watch on the
   * file itself would lose) */
  int ifd, stop_fd[2];
  pthread_t thr;
  bool thr_started;
  /* The path is a symlink (e.g. a Kubernetes ConfigMap, which swaps a
   * "..data" link beside it): any rename or creation in the directory
   * may change what it points to, so each one triggers a re-read (a
   * re-read of unchanged text changes nothing). */
  bool any_name;
  char dir[4096], base[256];
  /* ... and the directory of the file it resolves to at start, for edits
   * made to the target itself */
  int wd, wd_target;
  char target_base[256];
};

/* Loads the policy file into the model when its text differs from the
 * model's current policy. On a reload its tests must pass too; at start
 * a failing test is only logged, since the tailnet the tests name may not
 * have joined yet (the server must still come up). 0 or TC_E* with err. */
static int policy_file_apply(struct policy_file *pf, bool reload, struct tc_err *err) {
  if (!pf->path || !*pf->path) return TC_OK;
  char *text = NULL;
  size_t len = 0;
  pthread_mutex_lock(&pf->mu);
  int rc = tc_read_file(pf->path, 4u << 20, &text, &len, err);
  if (rc) goto out;
  struct tc_snapshot *s = tc_model_snapshot(pf->model);
  bool same = s->policy && s->policy_len == len && !memcmp(s->policy, text, len);
  tc_snapshot_release(s);
  if (!same) {
    rc = tc_model_policy_test(pf->model, text, len, err);
    if (rc && !reload) {
      tc_warn("policy file %s: %s (loaded anyway at start; a reload with failing tests is refused)", pf->path,
              err->msg);
      rc = TC_OK;
    }
    if (!rc) rc = tc_model_policy_set(pf->model, "system", text, len, NULL, err);
    if (rc) tc_err_prefix(err, "policy file %s", pf->path);
    else tc_info("policy loaded from %s", pf->path);
  }
out:
  pthread_mutex_unlock(&pf->mu);
  free(text);
  return rc;
}

static void policy_file_reload(void *ctx) {
  struct tc_err err = {0};
  if (policy_file_apply(ctx, true, &err)) tc_error("reload: %s (keeping the previous policy)", err.msg);
}

#define POLICY_DEBOUNCE_MS 100

/* Watcher thread: an event naming the file arms a 100 ms timer that each
 * further event re-arms (an editor's write + rename, or a large in-place
 * write, settle before the file is read; at most 1 s after the first
 * event); when it fires the file is reloaded exactly as on SIGHUP. */
static void *policy_watch_main(void *arg) {
  struct policy_file *pf = arg;
  int64_t due = -1, first = 0;
  char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
  for (;;) {
    int timeout = -1;
    if (due >= 0) {
      int64_t left = due - tc_mono_ms();
      timeout = left < 0 ? 0 : (int)left;
    }
    struct pollfd fds[2] = {{.fd = pf->ifd, .events = POLLIN}, {.fd = pf->stop_fd[0], .events = POLLIN}};
    int n = poll(fds, 2, timeout);
    if (n < 0 && errno != EINTR) {
      tc_error("policy watch: poll: %s; the file is reloaded on SIGHUP only", strerror(errno));
      break;
    }
    if (n > 0 && fds[1].revents) break;
    if (n > 0 && (fds[0].revents & POLLIN)) {
      ssize_t r = read(pf->ifd, buf, sizeof buf);
      for (char *p = buf; r > 0 && p < buf + r;) {
        const struct inotify_event *ev = (const struct inotify_event *)p;
        bool hit = (ev->mask & IN_Q_OVERFLOW) || /* lost events: re-read anyway */
                   (ev->len && ev->wd == pf->wd &&
                    (!strcmp(ev->name, pf->base) || (pf->any_name && (ev->mask & (IN_MOVED_TO | IN_CREATE))))) ||
                   (ev->len && ev->wd == pf->wd_target && !strcmp(ev->name, pf->target_base));
        if (hit) {
          int64_t now = tc_mono_ms();
          if (due < 0) first = now;
          /* a file that never stops changing is still read once a second */
          due = now + POLICY_DEBOUNCE_MS < first + 10 * POLICY_DEBOUNCE_MS ? now + POLICY_DEBOUNCE_MS
                                                                             : first + 10 * POLICY_DEBOUNCE_MS;
        }
        if ((ev->mask & IN_IGNORED) && ev->wd == pf->wd)
          tc_warn("policy watch: directory %s went away; the file is reloaded on SIGHUP only", pf->dir);
        p += sizeof *ev + ev->len;
      }
    }
    if (due >= 0 && tc_mono_ms() >= due) {
      due = -1;
      policy_file_reload(pf);
    }
  }
  return NULL;
}

/* Starts the watcher; failure is logged (SIGHUP still works), not fatal. */
static void policy_watch_start(struct policy_file *pf) {
  pf->ifd = pf->stop_fd[0] = pf->stop_fd[1] = -1;
  const char *slash = strrchr(pf->path, '/');
  size_t dlen = slash ? (size_t)(slash - pf->path) : 0;
  const char *base = slash ? slash + 1 : pf->path;
  if (dlen >= sizeof pf->dir || strlen(base) >= sizeof pf->base || !*base) {
    tc_warn("policy watch: path too long; the file is reloaded on SIGHUP only");
    return;
  }
  if (slash) {
    memcpy(pf->dir, pf->path, dlen);
    pf->dir[dlen] = 0;
    if (!dlen) strcpy(pf->dir, "/");
  } else {
    strcpy(pf->dir, ".");
  }
  strcpy(pf->base, base);
  struct stat st;
  pf->any_name = lstat(pf->path, &st) == 0 && S_ISLNK(st.st_mode);
  const uint32_t mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_MODIFY | IN_DELETE_SELF | IN_MOVE_SELF;
  pf->wd = pf->wd_target = -1;
  pf->ifd = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  if (pf->ifd < 0 || pipe2(pf->stop_fd, O_CLOEXEC) || (pf->wd = inotify_add_watch(pf->ifd, pf->dir, mask)) < 0) {
    tc_warn("policy watch: cannot watch %s (%s); the file is reloaded on SIGHUP only", pf->dir, strerror(errno));
    return;
  }
  char *real = pf->any_name ? realpath(pf->path, NULL) : NULL;
  char *rslash = real ? strrchr(real, '/') : NULL;
  if (rslash && strlen(rslash + 1) < sizeof pf->target_base) {
    strcpy(pf->target_base, rslash + 1);
    *rslash = 0;
    pf->wd_target = inotify_add_watch(pf->ifd, *real ? real : "/", mask);
    if (pf->wd_target == pf->wd) pf->wd_target = -1; /* same directory: the first watch sees it */
  }
  free(real);
  if (pthread_create(&pf->thr, NULL, policy_watch_main, pf)) {
    tc_warn("policy watch: cannot start the watcher; the file is reloaded on SIGHUP only");
    return;
  }
  pf->thr_started = true;
  tc_info("watching %s for policy changes", pf->path);
}

static void policy_watch_stop(struct policy_file *pf) {
  if (pf->thr_started) {
    if (write(pf->stop_fd[1], "x", 1) < 0) { /* the thread then never wakes: cannot happen with a fresh pipe */ }
    pthread_join(pf->thr, NULL);
    pf->thr_started = false;
  }
  if (pf->ifd >= 0) close(pf->ifd);
  if (pf->stop_fd[0] >= 0) close(pf->stop_fd[0]);
  if (pf->stop_fd[1] >= 0) close(pf->stop_fd[1]);
  pf->ifd = pf->stop_fd[0] = pf->stop_fd[1] = -1;
}

/* ---- GET /key ----------------------------------------------------------------------------- */

struct key_ctx {
  uint8_t pub[32];
};

static void h_key(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  struct key_ctx *k = ctx;
  /* tc_ctl_key_response wants the raw query; rebuild it from the decoded
   * arguments (only "v" matters, a number). */
  const char *v = tc_http_query(req, "v");
  char query[64] = "";
  if (v && strlen(v) < 32) snprintf(query, sizeof query, "v=%s", v);
  int status = 500;
  char *body = NULL;
  tc_ctl_key_response(k->pub, query, &status, &body);
  const char *ct = status == 200 ? "application/json" : "text/plain; charset=utf-8";
  tc_http_resp_text(resp, status, ct, body ? body : "", body ? strlen(body) : 0);
  free(body);
}

/* ---- DERP, DERP map, TLS glue ----------------------------------------------------------- */

/* State the wiring callbacks share. The mapper pointer and env are guarded
 * by mu because the DERP map refresh thread replaces env.derp_json. */
struct wiring {
  pthread_mutex_t mu;
  struct tc_model *model;
  struct tc_mapper *mapper;
  struct tc_mapper_env *env;
  struct tc_derp_server *derp;
  struct tc_tls *tls;
  struct tc_frontdoor *fdr;
  int64_t sub_id;
};

static void derpmap_changed(void *ctx, const char *json, size_t len) {
  struct wiring *w = ctx;
  pthread_mutex_lock(&w->mu);
  free(w->env->derp_json);
  w->env->derp_json = tc_xstrndup(json, len);
  if (w->mapper) tc_mapper_set_env(w->mapper, w->env);
  pthread_mutex_unlock(&w->mu);
  tc_info("DERP map updated");
}

/* derp.server.verify_clients: only node keys the tailnet knows. */
static bool derp_verify(void *ctx, const uint8_t node_key[32]) {
  struct wiring *w = ctx;
  struct tc_snapshot *s = tc_model_snapshot(w->model);
  bool ok = tc_snapshot_node_by_node_key(s, node_key) != NULL;
  tc_snapshot_release(s);
  return ok;
}

/* A deleted node (or a rotated key) loses its DERP connections at once.
 * Runs under the model's writer lock: disconnect_key only queues work. */
static void derp_on_change(void *ctx, const struct tc_change *c) {
  struct wiring *w = ctx;
  if ((c->kind == TC_CHANGE_NODE_REMOVED || c->kind == TC_CHANGE_NODE_KEY_ROTATED) && c->old_node && w->derp)
    tc_derp_server_disconnect_key(w->derp, c->old_node->node_key);
}

static const char *req_header_get(void *ctx, const char *name) { return tc_http_header(ctx, name); }

/* /derp/probe, /derp/latency-check, /generate_204, /bootstrap-dns. */
static void h_derp_http(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  struct tc_buf q = TC_BUF_INIT;
  for (size_t i = 0; i < req->nquery; i++) {
    /* the handler wants the raw query: re-encode the decoded arguments */
    if (i) tc_buf_putc(&q, '&');
    const char *parts[2] = {req->query[i].name, req->query[i].value};
    for (int k = 0; k < 2; k++) {
      if (k) tc_buf_putc(&q, '=');
      for (const unsigned char *p = (const unsigned char *)parts[k]; *p; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || strchr("-._~", *p))
          tc_buf_putc(&q, (char)*p);
        else
          tc_buf_printf(&q, "%%%02X", *p);
      }
    }
  }
  struct tc_derp_http_resp dr;
  memset(&dr, 0, sizeof dr);
  if (!tc_derp_http_handle(req->method, req->path, q.data ? q.data : "", req_header_get, (void *)req, NULL, &dr)) {
    tc_http_resp_error(resp, 404, TC_GRPC_NOT_FOUND, "Not Found");
  } else {
    /* A Content-Type among the handler's headers overrides the default. */
    tc_http_resp_text(resp, dr.status, "text/plain; charset=utf-8", dr.body ? dr.body : "", dr.body_len);
    for (size_t i = 0; i < dr.nheaders; i++) tc_http_resp_header(resp, dr.headers[i].name, dr.headers[i].value);
    free(dr.body);
  }
  tc_buf_free(&q);
}

/* GET /derp without an Upgrade header. */
static void h_derp_plain(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  const char *msg = "DERP requires connection upgrade\n";
  tc_http_resp_text(resp, 426, "text/plain; charset=utf-8", msg, strlen(msg));
}

static void derp_metrics(void *ctx, struct tc_buf *out) {
  struct wiring *w = ctx;
  if (!w->derp) return;
  struct tc_derp_metrics m;
  tc_derp_server_get_metrics(w->derp, &m);
  tc_buf_printf(out,
                "# HELP tailcoat_derp_clients Connected DERP clients.\n# TYPE tailcoat_derp_clients gauge\n"
                "tailcoat_derp_clients %llu\n"
                "# HELP tailcoat_derp_packets_relayed_total Packets relayed.\n"
                "# TYPE tailcoat_derp_packets_relayed_total counter\ntailcoat_derp_packets_relayed_total %llu\n"
                "# HELP tailcoat_derp_bytes_relayed_total Bytes relayed.\n"
                "# TYPE tailcoat_derp_bytes_relayed_total counter\ntailcoat_derp_bytes_relayed_total %llu\n"
                "# HELP tailcoat_derp_drops_total Packets dropped.\n# TYPE tailcoat_derp_drops_total counter\n"
                "tailcoat_derp_drops_total{reason=\"unknown_dest\"} %llu\n"
                "tailcoat_derp_drops_total{reason=\"queue_full\"} %llu\n"
                "tailcoat_derp_drops_total{reason=\"gone\"} %llu\n",
                (unsigned long long)m.clients_connected, (unsigned long long)m.packets_relayed,
                (unsigned long long)m.bytes_relayed, (unsigned long long)m.drops_unknown_dest,
                (unsigned long long)m.drops_queue_full, (unsigned long long)m.drops_gone);
}

/* Control-protocol and TLS counters on /metrics. */
struct transport_metrics {
  struct tc_ctl_server *ctl;
  struct tc_tls *tls;
};

static void transport_metrics_hook(void *ctx, struct tc_buf *out) {
  struct transport_metrics *tm = ctx;
  if (tm->ctl) {
    struct tc_ctl_stats cs;
    memset(&cs, 0, sizeof cs);
    tc_ctl_server_stats(tm->ctl, &cs);
    tc_buf_printf(out,
                  "# HELP tailcoat_control_connections Open /ts2021 connections.\n"
                  "# TYPE tailcoat_control_connections gauge\ntailcoat_control_connections %llu\n"
                  "# HELP tailcoat_control_connections_total /ts2021 connections accepted.\n"
                  "# TYPE tailcoat_control_connections_total counter\ntailcoat_control_connections_total %llu\n"
                  "# HELP tailcoat_control_handshakes_failed_total Noise handshakes that failed.\n"
                  "# TYPE tailcoat_control_handshakes_failed_total counter\n"
                  "tailcoat_control_handshakes_failed_total %llu\n"
                  "# HELP tailcoat_control_streams Open HTTP/2 streams (map polls included).\n"
                  "# TYPE tailcoat_control_streams gauge\ntailcoat_control_streams %llu\n"
                  "# HELP tailcoat_control_requests_total Control requests handled.\n"
                  "# TYPE tailcoat_control_requests_total counter\ntailcoat_control_requests_total %llu\n",
                  (unsigned long long)cs.conns_open, (unsigned long long)cs.conns_total,
                  (unsigned long long)cs.handshakes_failed, (unsigned long long)cs.streams_open,
                  (unsigned long long)cs.requests_total);
  }
  if (tm->tls) {
    struct tc_tls_stats ts;
    memset(&ts, 0, sizeof ts);
    tc_tls_get_stats(tm->tls, &ts);
    tc_buf_printf(out,
                  "# HELP tailcoat_tls_connections Connections held by the TLS terminator.\n"
                  "# TYPE tailcoat_tls_connections gauge\ntailcoat_tls_connections %llu\n"
                  "# HELP tailcoat_tls_handshakes_total TLS handshakes by result.\n"
                  "# TYPE tailcoat_tls_handshakes_total counter\n"
                  "tailcoat_tls_handshakes_total{result=\"ok\"} %llu\n"
                  "tailcoat_tls_handshakes_total{result=\"failed\"} %llu\n"
                  "tailcoat_tls_handshakes_total{result=\"timeout\"} %llu\n",
                  (unsigned long long)ts.active, (unsigned long long)ts.handshakes_ok,
                  (unsigned long long)ts.handshakes_failed, (unsigned long long)ts.handshake_timeouts);
  }
}

/* TLS delivers "ip:port" / "[v6]:port"; the front door wants a sockaddr. */
static void tls_deliver(void *ctx, int plain_fd, const char *peer) {
  struct wiring *w = ctx;
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  socklen_t sl = 0;
  char host[64] = "";
  int port = 0;
  if (peer && peer[0] == '[') {
    const char *rb = strchr(peer, ']');
    if (rb && (size_t)(rb - peer - 1) < sizeof host) {
      memcpy(host, peer + 1, (size_t)(rb - peer - 1));
      host[rb - peer - 1] = 0;
      if (rb[1] == ':') port = atoi(rb + 2);
    }
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET6, host, &a->sin6_addr) == 1) {
      a->sin6_family = AF_INET6;
      a->sin6_port = htons((uint16_t)port);
      sl = sizeof *a;
    }
  } else if (peer) {
    const char *colon = strrchr(peer, ':');
    if (colon && (size_t)(colon - peer) < sizeof host) {
      memcpy(host, peer, (size_t)(colon - peer));
      host[colon - peer] = 0;
      port = atoi(colon + 1);
    }
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    if (inet_pton(AF_INET, host, &a->sin_addr) == 1) {
      a->sin_family = AF_INET;
      a->sin_port = htons((uint16_t)port);
      sl = sizeof *a;
    }
  }
  tc_frontdoor_add_connection(w->fdr, plain_fd, sl ? (struct sockaddr *)&ss : NULL, sl, true);
}

/* A connection on the plain listener that opened with a TLS record (the
 * self-signed DERP mode serves both on one port). w->tls is cleared under
 * w->mu before the TLS module is freed, so this never hands to a dead one. */
static void sniffed_tls(void *ctx, int fd, const char *peer) {
  struct wiring *w = ctx;
  pthread_mutex_lock(&w->mu);
  if (w->tls) tc_tls_handoff(w->tls, fd, peer); /* non-blocking: queues to the TLS thread */
  else close(fd);
  pthread_mutex_unlock(&w->mu);
}

/* With the embedded relay on, no configured certificate and an http://
 * server_url, clients still need TLS for DERP: tailcoat answers TLS on
 * listen_addr itself with a generated certificate kept next to the DERP
 * key. (An https:// server_url without a certificate means a TLS proxy in
 * front, whose certificate clients verify as usual.) */
static bool wants_self_signed(const struct tc_config *cfg) {
  return cfg->derp.server.enabled && !(cfg->tls_cert_path && *cfg->tls_cert_path) &&
         !strncasecmp(cfg->server_url, "http://", 7);
}

/* <dir of derp.server.private_key_path>/derp_selfsigned.<ext>; owned. */
static char *self_signed_path(const struct tc_config *cfg, const char *ext) {
  const char *k = cfg->derp.server.private_key_path;
  const char *slash = strrchr(k, '/');
  if (!slash) return tc_xasprintf("derp_selfsigned.%s", ext);
  return tc_xasprintf("%.*s/derp_selfsigned.%s", (int)(slash - k), k, ext);
}

static void derpmap_reload(void *ctx) {
  struct tc_err err = {0};
  if (tc_derpmap_refresh_now(ctx, &err)) tc_warn("reload: DERP map: %s (keeping the last good sources)", err.msg);
}

static void tls_reload(void *ctx) {
  struct wiring *w = ctx;
  struct tc_err err = {0};
  if (tc_tls_reload(w->tls, &err)) tc_error("reload: TLS certificate: %s (keeping the old one)", err.msg);
  else tc_info("TLS certificate reloaded");
}

/* ---- GET /register/{id} ------------------------------------------------------------------- */

/* The page a user's browser opens from the client's AuthURL: it tells an
 * administrator the command that approves the machine (as Headscale's
 * page does). Registered after the wiring section, so a web UI that
 * handles /register/... itself takes precedence. */
static void h_register_page(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  const char *id = tc_http_param(req, "id");
  size_t n = id ? strlen(id) : 0;
  /* ids are [a-z0-9]; anything else is refused rather than echoed */
  if (!n || n > 64 || strspn(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_") != n) {
    tc_http_resp_error(resp, 400, TC_GRPC_INVALID_ARGUMENT, "invalid registration id");
    return;
  }
  struct tc_buf b = TC_BUF_INIT;
  tc_buf_printf(&b,
                "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Machine registration</title></head>\n"
                "<body><h1>Machine registration</h1>\n"
                "<p>Ask an administrator of this tailnet to run:</p>\n"
                "<pre>tailcoat nodes register --user USERNAME --key %s</pre>\n"
                "<p>The machine joins as soon as the command has run.</p></body></html>\n",
                id);
  tc_http_resp_text(resp, 200, "text/html; charset=utf-8", b.data, b.len);
  tc_buf_free(&b);
}

/* ---- serve ---------------------------------------------------------------------------------- */

static void banner(const struct tc_config *cfg, int port) {
  const char *url = cfg->server_url;
  printf("tailcoat %s serving %s (listening on %s, port %d)\n", TC_VERSION, url, cfg->listen_addr, port);
  if (cfg->unix_socket && *cfg->unix_socket) printf("  local CLI socket: %s\n", cfg->unix_socket);
  if (cfg->metrics_listen_addr && *cfg->metrics_listen_addr)
    printf("  metrics: http://%s/metrics\n", cfg->metrics_listen_addr);
  printf("To add a first machine:\n"
         "  tailcoat users create alice\n"
         "  tailcoat preauthkeys create --user alice\n"
         "  tailscale up --login-server %s --authkey <KEY>\n",
         url);
  fflush(stdout);
}

int tc_cli_serve(const struct tc_config *cfg) {
  tc_log_set_level(cfg->log.level);
  tc_log_set_json(cfg->log.format == TC_LOG_FORMAT_JSON);
  for (size_t i = 0; i < cfg->warnings.n; i++) tc_warn("config: %s", cfg->warnings.v[i]);

  /* Block the lifecycle signals before any thread exists: every thread
   * inherits the mask and only this loop receives them. */
  signal(SIGPIPE, SIG_IGN);
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL);

  int status = 1;
  struct tc_err err = {0};
  struct tc_backend_settings settings;
  struct tc_backend *be = NULL;
  struct tc_frontdoor *fdr = NULL;
  struct tc_metrics_server *ms = NULL;
  struct tc_mapper *mapper = NULL;
  struct tc_ctl_server *ctl = NULL;
  struct tc_derpmap *dm = NULL;
  struct tc_derp_server *derp = NULL;
  struct tc_stun_server *stun = NULL;
  struct tc_tls *tls = NULL;
  struct tc_mapper_env env;
  memset(&env, 0, sizeof env);
  struct wiring w;
  memset(&w, 0, sizeof w);
  pthread_mutex_init(&w.mu, NULL);
  w.env = &env;
  bool derp_hook = false;
  struct transport_metrics tm = {NULL, NULL};
  bool tm_hook = false;
  struct key_ctx keyctx;
  uint8_t noise_priv[32];
  memset(noise_priv, 0, sizeof noise_priv);
  bool use_tls = cfg->tls_cert_path && *cfg->tls_cert_path;
  bool self_signed = wants_self_signed(cfg);
  char *ss_cert = NULL, *ss_key = NULL;
  int port = -1;
  struct policy_file pf;
  memset(&pf, 0, sizeof pf);
  pf.ifd = pf.stop_fd[0] = pf.stop_fd[1] = -1;
  pthread_mutex_init(&pf.mu, NULL);

  tc_backend_settings_from_config(cfg, &settings);
  settings.metrics_hook = true;
  if (!use_tls && cfg->tls_letsencrypt_hostname && *cfg->tls_letsencrypt_hostname) {
    fprintf(stderr, "Error: tls_letsencrypt_hostname: ACME is not supported; "
                    "set tls_cert_path/tls_key_path (or terminate TLS in a proxy)\n");
    goto out;
  }
  if (tc_backend_open(&settings, &be, &err)) {
    fprintf(stderr, "Error: %s\n", err.msg);
    goto out;
  }
  w.model = be->model;

  int kr = tc_keyfile_load_or_create(cfg->noise.private_key_path, noise_priv, &err);
  if (kr < 0) {
    fprintf(stderr, "Error: noise.private_key_path %s: %s\n", cfg->noise.private_key_path, err.msg);
    goto out;
  }
  if (kr == TC_KEYFILE_CREATED) tc_info("created Noise private key %s", cfg->noise.private_key_path);
  if (kr == TC_KEYFILE_INSECURE) tc_warn("%s", err.msg);
  tc_x25519_public(noise_priv, keyctx.pub);

  pf.model = be->model;
  pf.path = cfg->policy.path;
  if (cfg->policy.mode == TC_POLICY_MODE_FILE) {
    if (policy_file_apply(&pf, false, &err)) {
      fprintf(stderr, "Error: %s\n", err.msg);
      goto out;
    }
    tc_cli_on_reload(policy_file_reload, &pf);
    if (pf.path && *pf.path) policy_watch_start(&pf);
  }

  /* With TLS, listen_addr belongs to the TLS module, which feeds decrypted
   * connections to the front door. */
  const char *proxies[64];
  size_t nproxies = 0;
  for (size_t i = 0; i < cfg->trusted_proxies.n && nproxies < TC_ARRAY_LEN(proxies); i++)
    proxies[nproxies++] = cfg->trusted_proxies.v[i].text;
  struct tc_frontdoor_opts fo = {.listen_addr = use_tls ? NULL : cfg->listen_addr,
                                 .unix_socket = cfg->unix_socket,
                                 .unix_socket_mode = cfg->unix_socket_permission,
                                 .router = be->router,
                                 .trusted_proxies = proxies,
                                 .n_trusted_proxies = nproxies};
  if (tc_frontdoor_new(&fo, &fdr, &err)) {
    fprintf(stderr, "Error: %s\n", err.msg);
    goto out;
  }
  w.fdr = fdr;
  tc_http_route(be->router, "GET", "/key", h_key, &keyctx);

  /* ======================= WIRING ==========================================
   * Protocol modules plug in here, before the front door starts; every
   * route and upgrade handler is registered before the first request. Stop
   * them in the shutdown block below (transports first, then handlers,
   * then the model). Reload hooks: tc_cli_on_reload(fn, ctx). Plain routes
   * (web UI, OIDC callbacks) go on be->router with tc_http_route; the model
   * is be->model. */
  tc_mapper_env_from_config(&env, cfg);

  /* DERP map: embedded region + derp.urls + derp.paths; changes reach every
   * map stream through the mapper. */
  struct tc_derpmap_params dp = {
      .embedded = cfg->derp.server.enabled && cfg->derp.server.automatically_add_embedded_derp_region,
      .region_id = cfg->derp.server.region_id,
      .region_code = cfg->derp.server.region_code,
      .region_name = cfg->derp.server.region_name,
      .server_url = cfg->server_url,
      .ipv4 = cfg->derp.server.ipv4,
      .ipv6 = cfg->derp.server.ipv6,
      .stun_listen_addr = cfg->derp.server.stun_listen_addr,
      /* clients may skip verification of exactly the certificate we made */
      .insecure_tls = self_signed,
      .urls = (const char *const *)cfg->derp.urls.v,
      .nurls = cfg->derp.urls.n,
      .paths = (const char *const *)cfg->derp.paths.v,
      .npaths = cfg->derp.paths.n,
      .auto_update = cfg->derp.auto_update_enabled,
      .update_frequency_ms = cfg->derp.update_frequency_ms,
      .on_change = derpmap_changed,
      .change_ctx = &w};
  if (tc_derpmap_new(&dp, &dm, &err)) {
    fprintf(stderr, "Error: derp: %s\n", err.msg);
    goto out;
  }
  pthread_mutex_lock(&w.mu);
  free(env.derp_json);
  env.derp_json = tc_derpmap_json(dm);
  pthread_mutex_unlock(&w.mu);
  tc_cli_on_reload(derpmap_reload, dm); /* re-read derp.paths / derp.urls */

  /* Embedded DERP relay on /derp, plus its plain endpoints and STUN. */
  if (cfg->derp.server.enabled) {
    struct tc_derp_server_params sp = {.private_key_path = cfg->derp.server.private_key_path,
                                       .verify = cfg->derp.server.verify_clients ? derp_verify : NULL,
                                       .verify_ctx = &w};
    if (tc_derp_server_new(&sp, &derp, &err)) {
      fprintf(stderr, "Error: derp.server: %s\n", err.msg);
      goto out;
    }
    w.derp = derp;
    tc_frontdoor_register_upgrade(fdr, "/derp", tc_derp_upgrade, derp);
    tc_http_route(be->router, "GET", "/derp", h_derp_plain, NULL);
    static const char *const derp_paths[] = {"/derp/probe", "/derp/latency-check", "/generate_204",
                                             "/bootstrap-dns"};
    for (size_t i = 0; i < TC_ARRAY_LEN(derp_paths); i++) {
      tc_http_route(be->router, "GET", derp_paths[i], h_derp_http, NULL);
      tc_http_route(be->router, "HEAD", derp_paths[i], h_derp_http, NULL);
    }
    w.sub_id = tc_model_subscribe(be->model, derp_on_change, &w);
    tc_metrics_add_hook(derp_metrics, &w);
    derp_hook = true;
    /* STUN only speeds up NAT traversal: a busy port must not keep the
     * control server down (clients then relay through DERP). */
    if (cfg->derp.server.stun_listen_addr && *cfg->derp.server.stun_listen_addr &&
        tc_stun_server_new(cfg->derp.server.stun_listen_addr, &stun, &err)) {
      tc_warn("derp.server.stun_listen_addr %s: %s; continuing without STUN", cfg->derp.server.stun_listen_addr,
              err.msg);
      stun = NULL;
    }
    if (self_signed) {
      ss_cert = self_signed_path(cfg, "crt");
      ss_key = self_signed_path(cfg, "key");
      bool created = false;
      if (tc_tls_generate_self_signed(cfg->server_host, ss_cert, ss_key, &created, &err)) {
        fprintf(stderr, "Error: derp.server: %s\n", err.msg);
        goto out;
      }
      tc_warn("embedded DERP: %s self-signed certificate %s, served on %s next to plain HTTP; clients are "
              "told to accept it unverified (set tls_cert_path/tls_key_path and an https:// server_url "
              "beyond a first test)",
              created ? "created" : "using", ss_cert, cfg->listen_addr);
      struct tc_tls_params tp = {.cert_path = ss_cert, .key_path = ss_key, .deliver = tls_deliver,
                                 .deliver_ctx = &w};
      if (tc_tls_new(&tp, &tls, &err)) {
        fprintf(stderr, "Error: derp.server: self-signed certificate %s: %s\n", ss_cert, err.msg);
        goto out;
      }
      pthread_mutex_lock(&w.mu);
      w.tls = tls;
      pthread_mutex_unlock(&w.mu);
      tc_frontdoor_set_tls_handoff(fdr, sniffed_tls, &w);
    }
  }

  /* Control protocol: /ts2021 (Noise + HTTP/2) -> mapper -> model. */
  struct tc_mapper_opts mo = {.model = be->model, .env = &env, .server_url = cfg->server_url};
  pthread_mutex_lock(&w.mu);
  int mrc = tc_mapper_new(&mo, &mapper, &err);
  w.mapper = mapper;
  pthread_mutex_unlock(&w.mu);
  if (mrc) {
    fprintf(stderr, "Error: mapper: %s\n", err.msg);
    goto out;
  }
  if (tc_ctl_server_new(tc_mapper_handle, mapper, noise_priv, NULL, &ctl, &err)) {
    fprintf(stderr, "Error: control server: %s\n", err.msg);
    goto out;
  }
  if (tc_frontdoor_register_upgrade(fdr, "/ts2021", tc_ctl_upgrade, ctl)) {
    fprintf(stderr, "Error: could not register /ts2021\n");
    goto out;
  }
  /* ========================================================================= */
  /* Fallback pages (a module wired above may have claimed these paths). */
  tc_http_route(be->router, "GET", "/register/{id}", h_register_page, NULL);

  if (tc_frontdoor_start(fdr, &err)) {
    fprintf(stderr, "Error: %s\n", err.msg);
    goto out;
  }
  port = tc_frontdoor_port(fdr);
  if (use_tls) {
    struct tc_tls_params tp = {.cert_path = cfg->tls_cert_path, .key_path = cfg->tls_key_path,
                               .deliver = tls_deliver, .deliver_ctx = &w};
    if (tc_tls_new(&tp, &tls, &err)) {
      fprintf(stderr, "Error: tls_cert_path/tls_key_path: %s\n", err.msg);
      goto out;
    }
    w.tls = tls;
    int lfd = tc_tls_listen_tcp(cfg->listen_addr, &port, &err);
    if (lfd < 0 || tc_tls_add_listener(tls, lfd, &err)) {
      fprintf(stderr, "Error: listen_addr %s: %s\n", cfg->listen_addr, err.msg);
      goto out;
    }
    tc_cli_on_reload(tls_reload, &w);
  }
  tm.ctl = ctl;
  tm.tls = tls;
  tc_metrics_add_hook(transport_metrics_hook, &tm);
  tm_hook = true;
  if (cfg->metrics_listen_addr && *cfg->metrics_listen_addr &&
      tc_metrics_server_start(cfg->metrics_listen_addr, &ms, &err)) {
    fprintf(stderr, "Error: metrics_listen_addr: %s\n", err.msg);
    goto out;
  }
  banner(cfg, port);

  int64_t next_tick = tc_mono_ms() + TICK_MS;
  for (;;) {
    int64_t wait = next_tick - tc_mono_ms();
    if (wait < 0) wait = 0;
    struct timespec ts = {wait / 1000, (long)(wait % 1000) * 1000000L};
    siginfo_t si;
    int sig = sigtimedwait(&sigs, &si, &ts);
    if (sig == SIGINT || sig == SIGTERM) {
      tc_info("received %s, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
      break;
    }
    if (sig == SIGHUP) {
      tc_info("received SIGHUP, reloading");
      run_reloads();
    }
    if (tc_mono_ms() >= next_tick) {
      struct tc_err terr = {0};
      if (tc_model_tick(be->model, tc_now_ms(), &terr) < 0) tc_warn("tick: %s", terr.msg);
      next_tick = tc_mono_ms() + TICK_MS;
    }
  }
  status = 0;

out:
  /* Shutdown order: stop accepting (metrics, TLS, front door), then the
   * protocol modules, then their handlers, then the model and storage. */
  tc_frontdoor_stop_accepting(fdr);
  tc_tls_stop_accepting(tls);
  pthread_mutex_lock(&reload_mu);
  nreloads = 0;
  pthread_mutex_unlock(&reload_mu);
  policy_watch_stop(&pf);
  pthread_mutex_destroy(&pf.mu);
  tc_metrics_server_stop(ms);
  if (tm_hook) tc_metrics_remove_hook(transport_metrics_hook, &tm);
  pthread_mutex_lock(&w.mu); /* no more sniffed handoffs (sniffed_tls) */
  w.tls = NULL;
  pthread_mutex_unlock(&w.mu);
  tc_tls_free(tls);
  tc_frontdoor_free(fdr);
  free(ss_cert);
  free(ss_key);
  if (derp_hook) tc_metrics_remove_hook(derp_metrics, &w);
  if (w.sub_id > 0) tc_model_unsubscribe(be->model, w.sub_id);
  tc_derp_server_shutdown(derp, 0, 200); /* frees it */
  tc_stun_server_free(stun);
  tc_ctl_server_stop(ctl);
  pthread_mutex_lock(&w.mu);
  w.mapper = NULL;
  pthread_mutex_unlock(&w.mu);
  tc_mapper_free(mapper);
  tc_derpmap_free(dm);
  tc_mapper_env_free(&env);
  pthread_mutex_destroy(&w.mu);
  tc_backend_close(be);
  tc_backend_settings_free(&settings);
  tc_wipe(noise_priv, sizeof noise_priv);
  return status;
}
