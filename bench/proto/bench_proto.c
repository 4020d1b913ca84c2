/* bench-proto: N simulated tailscaled clients speaking the real protocol
 * (GET /key, /ts2021 Noise upgrade, HTTP/2, register with an auth key, a
 * streaming map with zstd frames) against a server, measuring:
 *   - registrations per second (connect + register, T parallel threads),
 *   - time to deliver every client its first full map,
 *   - propagation latency: a new node joins -> every connected client has
 *     it in a PeersChanged (p50 / p99 / max over all (join, client) pairs),
 *   - bytes each client receives per such update (framed, compressed),
 *   - full map cost: one-shot (non-streaming) full maps for a node with every
 *     other node as a peer, sequentially; wall time and server CPU per map
 *     and per peer,
 *   - server CPU seconds and RSS (from /proc, when the pid is known).
 *
 * Server: --self starts an in-process tailcoat control plane (SQLite model +
 * mapper + transport on a loopback listener) in a child process; otherwise
 * --host/--port/--authkey name any server (and --server-pid its process).
 * Exit status 0 only if every client saw every join (the smoke test relies
 * on this). Not a unit test: see docs/bench-proto.md. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/base.h"
#include "crypto/crypto.h"
#include "mapper/mapper.h"
#include "model/model.h"
#include "proto/proto.h"
#include "storage/store.h"
#include "tclient.h"

struct opts {
  const char *policy_path; /* --self: policy file loaded into the model */
  int n, threads, joins, timeout_s, fullmaps;
  bool self, json;
  char host[256];
  int port;
  char authkey[256];
  pid_t server_pid;
};

struct sim {
  struct tc_tclient *c;
  int32_t sid;
  _Atomic size_t bytes; /* stream body bytes received, updated by the owning thread */
  size_t buffered;      /* client's unconsumed body length after our last read */
  int last_join_seen; /* index of the last join this client has seen */
  char keytext[TC_MAPPER_KEY_TEXT];
};

static struct opts O = {.n = 100, .threads = 8, .joins = 5, .timeout_s = 60, .fullmaps = 50, .port = 0};
static struct sim *S;
static atomic_int g_current_join = -1; /* join being measured */
static char g_join_key[TC_MAPPER_KEY_TEXT];
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int64_t g_join_t0_ns;
static int64_t *g_lat_ns; /* joins * n */
static atomic_int g_seen;
static atomic_bool g_stop;
static atomic_int g_errors;

/* ---- server in a child process -------------------------------------------------------- */

static char g_dir[] = "/tmp/bench-proto-XXXXXX";

/* --self: the parent's line on the command pipe asks the server child for
 * its mapper counters; the answer goes back on the reply pipe. */
static int g_cmd_fd = -1, g_rep_fd = -1;

static int run_server_child(int wfd) {
  struct tc_err err = {0};
  const char *dir = g_dir;
  char *db = tc_xasprintf("%s/db.sqlite", dir);
  struct tc_store_config sc = {.type = TC_DB_SQLITE, .sqlite_path = db, .sqlite_wal = true};
  struct tc_store *store;
  struct tc_model *model;
  if (tc_store_open(&sc, &store, &err)) goto fail;
  struct tc_model_config mc = {.base_domain = "bench.example.com"};
  if (tc_model_open(&mc, store, &model, &err)) goto fail;
  int64_t uid;
  char *key;
  if (tc_model_user_create(model, "cli", "bench", NULL, NULL, &uid, &err)) goto fail;
  struct tc_preauth_opts po = {.user_id = uid, .reusable = true};
  if (tc_model_preauth_create(model, "cli", &po, NULL, &key, &err)) goto fail;
  if (O.policy_path) {
    char *text = NULL;
    size_t tl = 0;
    if (tc_read_file(O.policy_path, 1 << 20, &text, &tl, &err)) goto fail;
    int prc = tc_model_policy_set(model, "cli", text, tl, NULL, &err);
    free(text);
    if (prc) goto fail;
  }
  struct tc_mapper_env env = {.base_domain = "bench.example.com", .domain = "example.com", .disable_logtail = true,
                              .derp_json = "{\"Regions\":{\"999\":{\"RegionID\":999,\"RegionCode\":\"b\",\"Nodes\":[]}}}"};
  struct tc_mapper_opts mo = {.model = model, .env = &env, .server_url = "http://127.0.0.1"};
  struct tc_mapper *mp;
  if (tc_mapper_new(&mo, &mp, &err)) goto fail;
  uint8_t priv[32], pub[32];
  tc_x25519_keygen(priv, pub);
  struct tc_ctl_server *srv;
  struct tc_ctl_server_opts so = {.workers = 4};
  if (tc_ctl_server_new(tc_mapper_handle, mp, priv, &so, &srv, &err)) goto fail;
  struct tc_tlistener *lis;
  if (tc_tlistener_start(pub, tc_ctl_upgrade, srv, &lis)) goto fail;
  char line[512];
  int len = snprintf(line, sizeof line, "%d %s\n", tc_tlistener_port(lis), key);
  if (write(wfd, line, (size_t)len) != len) return 1;
  close(wfd);
  for (;;) { /* killed by the parent */
    char cmd;
    ssize_t r = read(g_cmd_fd, &cmd, 1);
    if (r == 0) pause();
    if (r != 1) continue;
    struct tc_mapper_stats ms;
    tc_mapper_get_stats(mp, &ms);
    char out[256];
    int ol = snprintf(out, sizeof out, "%llu %llu %llu %llu %llu\n", (unsigned long long)ms.events,
                      (unsigned long long)ms.deltas, (unsigned long long)ms.full_maps,
                      (unsigned long long)ms.frag_hits, (unsigned long long)ms.frag_encodes);
    if (write(g_rep_fd, out, (size_t)ol) != ol) return 1;
  }
fail:
  fprintf(stderr, "bench server: %s\n", err.msg);
  return 1;
}

struct mstats {
  unsigned long long events, deltas, full_maps, frag_hits, frag_encodes;
};

/* The server child's mapper counters (--self only). */
static bool mapper_stats(struct mstats *m) {
  memset(m, 0, sizeof *m);
  if (g_cmd_fd < 0) return false;
  char line[256] = {0};
  if (write(g_cmd_fd, "s", 1) != 1) return false;
  ssize_t r = read(g_rep_fd, line, sizeof line - 1);
  return r > 0 && sscanf(line, "%llu %llu %llu %llu %llu", &m->events, &m->deltas, &m->full_maps, &m->frag_hits,
                         &m->frag_encodes) == 5;
}

/* utime+stime seconds and VmRSS KiB of pid from /proc. */
static bool proc_stats(pid_t pid, double *cpu_s, long *rss_kib) {
  char path[64], buf[4096];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  FILE *f = fopen(path, "r");
  if (!f) return false;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  char *p = strrchr(buf, ')');
  if (!p) return false;
  unsigned long ut = 0, st = 0;
  /* fields after ')': state(3) ... utime is field 14, stime 15 */
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) return false;
  *cpu_s = (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  f = fopen(path, "r");
  if (!f) return false;
  *rss_kib = 0;
  while (fgets(buf, sizeof buf, f))
    if (!strncmp(buf, "VmRSS:", 6)) *rss_kib = strtol(buf + 6, NULL, 10);
  fclose(f);
  return true;
}

/* ---- clients --------------------------------------------------------------------------- */

static struct tc_tclient *dial(void) {
  struct tc_tclient_opts o = {.version = 138, .timeout_ms = 10000};
  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  if (tc_tclient_connect(O.host, O.port, &o, &c, &err)) {
    fprintf(stderr, "connect: %s\n", err.msg);
    return NULL;
  }
  return c;
}

/* Registers a fresh node key with the auth key; fills keytext. */
static bool do_register(struct tc_tclient *c, char keytext[TC_MAPPER_KEY_TEXT], const char *host) {
  uint8_t nk[32];
  tc_random(nk, sizeof nk);
  tc_mapper_key_format(TC_MKEY_NODE, nk, keytext);
  char *b = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"OldNodeKey\":\"nodekey:"
                         "0000000000000000000000000000000000000000000000000000000000000000\","
                         "\"Auth\":{\"AuthKey\":\"%s\"},\"Expiry\":\"0001-01-01T00:00:00Z\","
                         "\"Hostinfo\":{\"Hostname\":\"%s\",\"OS\":\"linux\",\"IPNVersion\":\"1.98.0\"}}",
                         keytext, O.authkey, host);
  int status = 0;
  char *resp = NULL;
  size_t rl = 0;
  int rc = tc_tclient_request(c, "POST", "/machine/register", b, strlen(b), 30000, &status, &resp, &rl);
  free(b);
  bool ok = rc == 0 && status == 200 && resp && strstr(resp, "\"MachineAuthorized\":true");
  if (!ok) fprintf(stderr, "register: rc %d status %d %.200s\n", rc, status, resp ? resp : "");
  free(resp);
  return ok;
}

static bool open_stream(struct sim *s, const char *keytext) {
  char *b = tc_xasprintf("{\"Version\":138,\"Compress\":\"zstd\",\"KeepAlive\":true,\"NodeKey\":\"%s\",\"Stream\":true}",
                         keytext);
  s->sid = tc_tclient_submit(s->c, "POST", "/machine/map", "application/json", b, strlen(b));
  free(b);
  if (s->sid <= 0) return false;
  char *js = NULL;
  size_t jl = 0;
  int rc = tc_tclient_map_next(s->c, s->sid, 60000, &js, &jl);
  bool ok = rc == 0 && strstr(js, "\"Node\":");
  free(js);
  return ok;
}

struct range {
  int lo, hi;
  double reg_s; /* time spent registering */
};

static void drain_client(int idx);

static void *reg_worker(void *arg) {
  struct range *r = arg;
  for (int i = r->lo; i < r->hi; i++) {
    S[i].c = dial();
    char kt[TC_MAPPER_KEY_TEXT], host[32];
    snprintf(host, sizeof host, "sim-%d", i);
    if (!S[i].c || !do_register(S[i].c, kt, host)) {
      atomic_fetch_add(&g_errors, 1);
      continue;
    }
    S[i].last_join_seen = -1;
    memcpy(S[i].keytext, kt, sizeof kt);
    if (!open_stream(&S[i], kt)) atomic_fetch_add(&g_errors, 1);
    size_t len = 0;
    tc_tclient_body(S[i].c, S[i].sid, &len);
    S[i].buffered = len;
    atomic_store(&S[i].bytes, 0);
    /* keep every stream read, like tailscaled does, while others register */
    for (int k = r->lo; k <= i; k++) drain_client(k);
  }
  return NULL;
}

static void on_message(int idx, const char *js) {
  int j = atomic_load(&g_current_join);
  if (j < 0 || S[idx].last_join_seen >= j) return;
  pthread_mutex_lock(&g_mu);
  bool hit = strstr(js, g_join_key) != NULL;
  int64_t t0 = g_join_t0_ns;
  pthread_mutex_unlock(&g_mu);
  if (!hit) return;
  S[idx].last_join_seen = j;
  g_lat_ns[(size_t)j * O.n + idx] = tc_mono_ns() - t0;
  atomic_fetch_add(&g_seen, 1);
}

/* Reads whatever client idx has received (owning thread only). */
static void drain_client(int idx) {
  struct sim *s = &S[idx];
  if (!s->c || s->sid <= 0) return;
  if (tc_tclient_pump(s->c, 0)) {
    atomic_fetch_add(&g_errors, 1);
    tc_tclient_free(s->c);
    s->c = NULL;
    return;
  }
  /* the client drops consumed body bytes, so count what each pump added */
  size_t blen = 0;
  tc_tclient_body(s->c, s->sid, &blen);
  atomic_fetch_add(&s->bytes, blen - s->buffered);
  char *js;
  size_t jl;
  while (tc_tclient_map_next(s->c, s->sid, 0, &js, &jl) == 0) {
    on_message(idx, js);
    free(js);
  }
  tc_tclient_body(s->c, s->sid, &s->buffered);
}

static void *poll_worker(void *arg) {
  struct range *r = arg;
  int n = r->hi - r->lo;
  struct pollfd *pf = calloc((size_t)n + 1, sizeof *pf);
  while (!atomic_load(&g_stop)) {
    for (int i = 0; i < n; i++) {
      pf[i].fd = S[r->lo + i].c ? tc_tclient_fd(S[r->lo + i].c) : -1;
      pf[i].events = POLLIN;
      pf[i].revents = 0;
    }
    if (poll(pf, (nfds_t)n, 50) <= 0) continue;
    for (int i = 0; i < n; i++) {
      if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      drain_client(r->lo + i);
    }
  }
  free(pf);
  return NULL;
}

static size_t total_bytes(void) {
  size_t t = 0;
  for (int i = 0; i < O.n; i++) t += atomic_load(&S[i].bytes);
  return t;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static void usage(void) {
  fprintf(stderr,
          "usage: bench-proto [--self | --host H --port P --authkey KEY [--server-pid PID]]\n"
          "                   [-n clients] [--threads T] [--joins J] [--timeout S] [--json] [--policy FILE]\n"
          "                   [--fullmaps M]\n");
  exit(2);
}

int main(int argc, char **argv) {
  static const struct option lo[] = {{"self", 0, NULL, 's'},       {"host", 1, NULL, 'H'},    {"port", 1, NULL, 'p'},
                                     {"authkey", 1, NULL, 'k'},    {"server-pid", 1, NULL, 'P'},
                                     {"threads", 1, NULL, 't'},    {"joins", 1, NULL, 'j'},   {"timeout", 1, NULL, 'T'},
                                     {"json", 0, NULL, 'J'},       {"policy", 1, NULL, 'Y'},
                                     {"fullmaps", 1, NULL, 'F'},
                                     {NULL, 0, NULL, 0}};
  snprintf(O.host, sizeof O.host, "127.0.0.1");
  int ch;
  while ((ch = getopt_long(argc, argv, "n:", lo, NULL)) != -1) {
    switch (ch) {
    case 'n': O.n = atoi(optarg); break;
    case 's': O.self = true; break;
    case 'H': snprintf(O.host, sizeof O.host, "%s", optarg); break;
    case 'p': O.port = atoi(optarg); break;
    case 'k': snprintf(O.authkey, sizeof O.authkey, "%s", optarg); break;
    case 'P': O.server_pid = (pid_t)atoi(optarg); break;
    case 't': O.threads = atoi(optarg); break;
    case 'j': O.joins = atoi(optarg); break;
    case 'T': O.timeout_s = atoi(optarg); break;
    case 'J': O.json = true; break;
    case 'Y': O.policy_path = optarg; break;
    case 'F': O.fullmaps = atoi(optarg); break;
    default: usage();
    }
  }
  if (O.n < 1 || O.threads < 1 || O.joins < 1 || O.fullmaps < 0 || (!O.self && (!O.port || !O.authkey[0]))) usage();
  if (O.threads > O.n) O.threads = O.n;
  signal(SIGPIPE, SIG_IGN);
  tc_log_set_level(TC_LOG_WARN);

  if (O.self) {
    if (!mkdtemp(g_dir)) return 1;
    int pfd[2], cfd[2], rfd[2];
    if (pipe(pfd) || pipe(cfd) || pipe(rfd)) return 1;
    pid_t pid = fork();
    if (pid == 0) {
      close(pfd[0]);
      close(cfd[1]);
      close(rfd[0]);
      g_cmd_fd = cfd[0];
      g_rep_fd = rfd[1];
      _exit(run_server_child(pfd[1]));
    }
    close(pfd[1]);
    close(cfd[0]);
    close(rfd[1]);
    /* parent: g_cmd_fd writes commands, g_rep_fd reads replies */
    g_cmd_fd = cfd[1];
    g_rep_fd = rfd[0];
    char line[512] = {0};
    ssize_t r = read(pfd[0], line, sizeof line - 1);
    close(pfd[0]);
    if (r <= 0 || sscanf(line, "%d %255s", &O.port, O.authkey) != 2) {
      fprintf(stderr, "bench: server did not start\n");
      kill(pid, SIGKILL);
      return 1;
    }
    O.server_pid = pid;
  }

  S = calloc((size_t)O.n, sizeof *S);
  g_lat_ns = calloc((size_t)O.n * (size_t)O.joins, sizeof *g_lat_ns);
  double cpu0 = 0, cpu1 = 0, cpu2 = 0;
  long rss1 = 0, rss2 = 0;
  bool have_proc = O.server_pid > 0 && proc_stats(O.server_pid, &cpu0, &rss1);
  struct mstats ms0 = {0}, ms1 = {0};
  bool have_ms = mapper_stats(&ms0);

  /* phase 1: register + first full map, T threads */
  pthread_t *th = calloc((size_t)O.threads, sizeof *th);
  struct range *rg = calloc((size_t)O.threads, sizeof *rg);
  int64_t t0 = tc_mono_ns();
  for (int t = 0; t < O.threads; t++) {
    rg[t].lo = O.n * t / O.threads;
    rg[t].hi = O.n * (t + 1) / O.threads;
    pthread_create(&th[t], NULL, reg_worker, &rg[t]);
  }
  for (int t = 0; t < O.threads; t++) pthread_join(th[t], NULL);
  double phase1_s = (double)(tc_mono_ns() - t0) / 1e9;
  int connected = 0;
  for (int i = 0; i < O.n; i++) connected += S[i].c != NULL && S[i].sid > 0;
  if (have_proc) proc_stats(O.server_pid, &cpu1, &rss1);
  if (have_ms) have_ms = mapper_stats(&ms1);

  /* phase 2: joins, observed by poller threads */
  for (int t = 0; t < O.threads; t++) pthread_create(&th[t], NULL, poll_worker, &rg[t]);
  struct timespec settle = {0, 300 * 1000000L};
  /* converge: the deltas of everyone else's registration still in flight
   * are drained before joins are timed (no bytes for 1 s) */
  int64_t c0 = tc_mono_ns();
  for (size_t prev = (size_t)-1;;) {
    size_t cur = total_bytes();
    if (cur == prev || tc_mono_ns() - c0 > (int64_t)O.timeout_s * 1000000000) break;
    prev = cur;
    struct timespec one = {1, 0};
    nanosleep(&one, NULL);
  }
  double converge_s = (double)(tc_mono_ns() - c0) / 1e9 - 1.0;
  if (converge_s < 0) converge_s = 0;
  size_t bytes_before = 0, bytes_updates = 0;
  int complete_joins = 0;
  for (int j = 0; j < O.joins; j++) {
    struct tc_tclient *jc = dial();
    if (!jc) {
      atomic_fetch_add(&g_errors, 1);
      continue;
    }
    char kt[TC_MAPPER_KEY_TEXT];
    uint8_t nk[32];
    tc_random(nk, sizeof nk);
    tc_mapper_key_format(TC_MKEY_NODE, nk, kt);
    /* quiet point: measure bytes from here */
    nanosleep(&settle, NULL);
    bytes_before = total_bytes();
    atomic_store(&g_seen, 0);
    pthread_mutex_lock(&g_mu);
    snprintf(g_join_key, sizeof g_join_key, "%s", kt);
    g_join_t0_ns = tc_mono_ns();
    pthread_mutex_unlock(&g_mu);
    atomic_store(&g_current_join, j);
    /* register with exactly this key: do_register makes its own, so inline */
    char *b = tc_xasprintf("{\"Version\":138,\"NodeKey\":\"%s\",\"Auth\":{\"AuthKey\":\"%s\"},"
                           "\"Hostinfo\":{\"Hostname\":\"joiner-%d\",\"OS\":\"linux\"}}",
                           kt, O.authkey, j);
    int status = 0;
    char *resp = NULL;
    size_t rl;
    tc_tclient_request(jc, "POST", "/machine/register", b, strlen(b), 30000, &status, &resp, &rl);
    free(b);
    free(resp);
    if (status != 200) atomic_fetch_add(&g_errors, 1);
    int64_t deadline = tc_mono_ms() + (int64_t)O.timeout_s * 1000;
    while (atomic_load(&g_seen) < connected && tc_mono_ms() < deadline) {
      struct timespec ts = {0, 2 * 1000000L};
      nanosleep(&ts, NULL);
    }
    if (atomic_load(&g_seen) >= connected) complete_joins++;
    nanosleep(&settle, NULL); /* let trailing bytes of this update arrive */
    bytes_updates += total_bytes() - bytes_before;
    atomic_store(&g_current_join, -1);
    tc_tclient_free(jc);
  }
  atomic_store(&g_stop, true);
  for (int t = 0; t < O.threads; t++) pthread_join(th[t], NULL);
  if (have_proc) proc_stats(O.server_pid, &cpu2, &rss2);

  /* phase 3: full map cost. Client 0 asks for one-shot full maps (every
   * other node is its peer: allow-all or a permit-all policy). The server
   * is otherwise idle, so its CPU delta is what these maps cost it: the
   * handler, the dispatcher assembling cached peer fragments, zstd, HTTP/2
   * and Noise. The simulated client's decoding is not in that figure. */
  double fm_wall_ms = 0, fm_cpu_ms = 0, cpuf0 = 0, cpuf1 = 0;
  size_t fm_bytes = 0;
  int fm_done = 0;
  int fm_peers = connected + O.joins - 1;
  if (O.fullmaps > 0 && S[0].c && S[0].sid > 0) {
    long rss3;
    char *b = tc_xasprintf("{\"Version\":138,\"Compress\":\"zstd\",\"NodeKey\":\"%s\",\"Stream\":false}",
                           S[0].keytext);
    if (have_proc) proc_stats(O.server_pid, &cpuf0, &rss3);
    int64_t f0 = tc_mono_ns();
    for (int i = 0; i < O.fullmaps; i++) {
      int status = 0;
      char *resp = NULL;
      size_t rl = 0;
      int rc = tc_tclient_request(S[0].c, "POST", "/machine/map", b, strlen(b), 30000, &status, &resp, &rl);
      /* one LE-uint32-framed message that fills the body */
      const uint8_t *u = (const uint8_t *)resp;
      bool good = rc == 0 && status == 200 && rl > 4 &&
                  (size_t)u[0] + ((size_t)u[1] << 8) + ((size_t)u[2] << 16) + ((size_t)u[3] << 24) == rl - 4;
      free(resp);
      if (!good) {
        fprintf(stderr, "full map %d: rc %d status %d len %zu\n", i, rc, status, rl);
        atomic_fetch_add(&g_errors, 1);
        break;
      }
      fm_bytes = rl;
      fm_done++;
    }
    fm_wall_ms = (double)(tc_mono_ns() - f0) / 1e6 / (fm_done ? fm_done : 1);
    if (have_proc) proc_stats(O.server_pid, &cpuf1, &rss3);
    fm_cpu_ms = (cpuf1 - cpuf0) * 1e3 / (fm_done ? fm_done : 1);
    free(b);
  }
  double fm_us_per_peer = fm_peers > 0 ? fm_cpu_ms * 1e3 / fm_peers : 0;

  /* latencies of every (join, client) pair that arrived */
  size_t nl = 0;
  int64_t *lat = calloc((size_t)O.n * O.joins + 1, sizeof *lat);
  for (size_t i = 0; i < (size_t)O.n * O.joins; i++)
    if (g_lat_ns[i] > 0) lat[nl++] = g_lat_ns[i];
  qsort(lat, nl, sizeof *lat, cmp_i64);
  double p50 = nl ? lat[nl / 2] / 1e6 : -1, p99 = nl ? lat[(nl * 99) / 100 < nl ? (nl * 99) / 100 : nl - 1] / 1e6 : -1,
         mx = nl ? lat[nl - 1] / 1e6 : -1;
  double bytes_per_update = connected && O.joins ? (double)bytes_updates / ((double)connected * O.joins) : 0;
  bool ok = connected == O.n && complete_joins == O.joins && atomic_load(&g_errors) == 0 &&
            (O.fullmaps == 0 || fm_done == O.fullmaps);

  if (O.json) {
    printf("{\"clients\":%d,\"connected\":%d,\"threads\":%d,\"registrations_per_s\":%.1f,\"phase1_s\":%.3f,"
           "\"converge_s\":%.2f,\"joins\":%d,\"complete_joins\":%d,\"latency_ms\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.2f},"
           "\"bytes_per_update_per_client\":%.0f,\"server_cpu_s\":{\"register\":%.2f,\"joins\":%.2f},"
           "\"server_rss_kib\":%ld,\"rss_kib_per_node\":%.1f,\"full_map\":{\"maps\":%d,\"peers\":%d,\"bytes\":%zu,"
           "\"wall_ms\":%.3f,\"server_cpu_ms\":%.3f,\"server_cpu_us_per_peer\":%.3f},"
           "\"register_phase_mapper\":{\"events\":%llu,\"deltas\":%llu,\"full_maps\":%llu,\"frag_encodes\":%llu,"
           "\"frag_hits\":%llu},\"errors\":%d,\"ok\":%s}\n",
           O.n, connected, O.threads, connected / phase1_s, phase1_s, converge_s, O.joins, complete_joins, p50, p99, mx,
           bytes_per_update, cpu1 - cpu0, cpu2 - cpu1, rss2, (double)rss2 / O.n, fm_done, fm_peers, fm_bytes,
           fm_wall_ms, fm_cpu_ms, fm_us_per_peer, have_ms ? ms1.events - ms0.events : 0,
           have_ms ? ms1.deltas - ms0.deltas : 0, have_ms ? ms1.full_maps - ms0.full_maps : 0,
           have_ms ? ms1.frag_encodes - ms0.frag_encodes : 0, have_ms ? ms1.frag_hits - ms0.frag_hits : 0,
           atomic_load(&g_errors), ok ? "true" : "false");
  } else {
    printf("clients              %d (connected %d, %d threads)\n", O.n, connected, O.threads);
    printf("register+full map    %.3f s  -> %.1f registrations/s\n", phase1_s, connected / phase1_s);
    printf("converged after      %.2f s more (backlog of others' joins drained)\n", converge_s);
    printf("joins                %d (every client saw %d)\n", O.joins, complete_joins);
    printf("propagation latency  p50 %.2f ms  p99 %.2f ms  max %.2f ms  (%zu samples)\n", p50, p99, mx, nl);
    printf("bytes per update     %.0f per client (framed, zstd)\n", bytes_per_update);
    if (have_proc)
      printf("server               cpu %.2f s register phase, %.2f s join phase; rss %ld KiB (%.1f KiB per node)\n",
             cpu1 - cpu0, cpu2 - cpu1, rss2, (double)rss2 / O.n);
    if (have_ms)
      printf("register phase       mapper: %llu events, %llu deltas written (%.0f per registration), %llu full maps,"
             " %llu peer fragment encodes / %llu cache hits\n",
             ms1.events - ms0.events, ms1.deltas - ms0.deltas, (double)(ms1.deltas - ms0.deltas) / (connected ? connected : 1),
             ms1.full_maps - ms0.full_maps, ms1.frag_encodes - ms0.frag_encodes, ms1.frag_hits - ms0.frag_hits);
    if (fm_done)
      printf("full map             %d peers, %zu bytes framed: %.2f ms wall, server cpu %.2f ms = %.2f us per peer"
             " (%d maps)\n", fm_peers, fm_bytes, fm_wall_ms, fm_cpu_ms, fm_us_per_peer, fm_done);
    printf("errors               %d\n", atomic_load(&g_errors));
  }
  for (int i = 0; i < O.n; i++)
    if (S[i].c) tc_tclient_free(S[i].c);
  if (O.self) {
    kill(O.server_pid, SIGKILL);
    waitpid(O.server_pid, NULL, 0);
    const char *sfx[] = {"", "-wal", "-shm"};
    for (int i = 0; i < 3; i++) {
      char *f = tc_xasprintf("%s/db.sqlite%s", g_dir, sfx[i]);
      unlink(f);
      free(f);
    }
    rmdir(g_dir);
  }
  free(S);
  free(g_lat_ns);
  free(lat);
  free(th);
  free(rg);
  return ok ? 0 : 1;
}
