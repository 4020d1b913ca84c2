/* bench-proto: N simulated tailscaled clients speaking the real protocol
 * (GET /key, /ts2021 Noise upgrade, HTTP/2, register with an auth key, a
 * streaming map with zstd frames) against a server, measuring:
 *   - registration only (--register-only R, default N with --self): T
 *     threads, each fetches /key once and then, for each of its share of R
 *     machines, opens that machine's own Noise connection (its own machine
 *     key), registers and closes; no map stream. This is the register
 *     endpoint's throughput. With --self it runs against a separate fresh
 *     server so that it leaves nothing behind for the next phase;
 *   - join: registrations per second (connect + register + first full map,
 *     stream held, T parallel threads),
 *   - time to deliver every client its first full map,
 *   - propagation latency: a new node joins -> every connected client has
 *     it in a PeersChanged (p50 / p99 / max over all (join, client) pairs),
 *   - bytes each client receives per such update (framed, compressed),
 *   - full map cost: one-shot (non-streaming) full maps for a node with every
 *     other node as a peer, sequentially; wall time and server CPU per map
 *     and per peer,
 *   - server CPU seconds and RSS (from /proc, when the pid is known), and
 *     per registration phase the server CPU per registration split by thread
 *     role (--self names the child's threads: handler workers, the transport
 *     loop, the mapper dispatcher), the model's storage transaction and
 *     snapshot-publish CPU, and the simulator's own CPU.
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
#include <dirent.h>
#include <sys/resource.h>
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
  int n, threads, joins, timeout_s, fullmaps, hold_s;
  int reg_only; /* registration-only machines; -1 = default (n with --self, else 0) */
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

static struct opts O = {.n = 100, .threads = 8, .joins = 5, .timeout_s = 60, .fullmaps = 50, .reg_only = -1, .port = 0};
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

/* A --self server: a forked child with its own database directory. The
 * parent writes one byte on cmd_fd to ask for the child's counters and reads
 * the answer line from rep_fd. */
struct server {
  pid_t pid;
  int cmd_fd, rep_fd;
  char dir[64];
};

/* Thread ids of this process, ascending (tids grow with creation). */
static size_t list_tids(pid_t *out, size_t cap) {
  DIR *d = opendir("/proc/self/task");
  size_t n = 0;
  if (!d) return 0;
  struct dirent *e;
  while ((e = readdir(d)) && n < cap)
    if (e->d_name[0] != '.') out[n++] = (pid_t)atoi(e->d_name);
  closedir(d);
  for (size_t i = 1; i < n; i++) /* few entries: insertion sort */
    for (size_t j = i; j > 0 && out[j - 1] > out[j]; j--) {
      pid_t t = out[j];
      out[j] = out[j - 1];
      out[j - 1] = t;
    }
  return n;
}

/* Names the threads that are not in before[0..nb): the first `first_n` of
 * them (by tid) `first`, the rest `rest`. The parent sums /proc CPU by these
 * names. Threads belong to other modules; renaming them (comm) is harmless. */
static void name_new_threads(const pid_t *before, size_t nb, const char *first, size_t first_n, const char *rest) {
  pid_t now[256];
  size_t n = list_tids(now, 256), k = 0;
  for (size_t i = 0; i < n; i++) {
    bool old = false;
    for (size_t j = 0; j < nb && !old; j++) old = before[j] == now[i];
    if (old) continue;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d/comm", (int)now[i]);
    FILE *f = fopen(path, "w");
    if (f) {
      fputs(k < first_n ? first : rest, f);
      fclose(f);
    }
    k++;
  }
}

static int run_server_child(int wfd, const char *dir, int cmd_fd, int rep_fd) {
  struct tc_err err = {0};
  char *db = tc_xasprintf("%s/db.sqlite", dir);
  struct tc_store_config sc = {.type = TC_DB_SQLITE, .sqlite_path = db, .sqlite_wal = true};
  struct tc_store *store;
  struct tc_model *model;
  pid_t tids[256];
  size_t nt;
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
  nt = list_tids(tids, 256);
  if (tc_mapper_new(&mo, &mp, &err)) goto fail;
  name_new_threads(tids, nt, "tc-mapper", 1, "tc-mapper");
  uint8_t priv[32], pub[32];
  tc_x25519_keygen(priv, pub);
  struct tc_ctl_server *srv;
  struct tc_ctl_server_opts so = {.workers = TC_CTL_WORKERS_DEFAULT}; /* as `tailcoat serve` */
  nt = list_tids(tids, 256);
  if (tc_ctl_server_new(tc_mapper_handle, mp, priv, &so, &srv, &err)) goto fail;
  /* the transport starts its handler workers, then its I/O loop */
  name_new_threads(tids, nt, "tc-worker", (size_t)so.workers, "tc-loop");
  struct tc_tlistener *lis;
  nt = list_tids(tids, 256);
  if (tc_tlistener_start(pub, tc_ctl_upgrade, srv, &lis)) goto fail;
  name_new_threads(tids, nt, "tc-listen", 1, "tc-listen");
  char line[512];
  int len = snprintf(line, sizeof line, "%d %s\n", tc_tlistener_port(lis), key);
  if (write(wfd, line, (size_t)len) != len) return 1;
  close(wfd);
  for (;;) { /* killed by the parent */
    char cmd;
    ssize_t r = read(cmd_fd, &cmd, 1);
    if (r == 0) pause();
    if (r != 1) continue;
    struct tc_mapper_stats ms;
    tc_mapper_get_stats(mp, &ms);
    struct tc_model_stats st;
    tc_model_stats(model, &st);
    char out[512];
    int ol = snprintf(out, sizeof out, "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu\n",
                      (unsigned long long)ms.events, (unsigned long long)ms.deltas,
                      (unsigned long long)ms.full_maps, (unsigned long long)ms.frag_hits,
                      (unsigned long long)ms.frag_encodes, (unsigned long long)st.tx_ok,
                      (unsigned long long)st.tx_wall_us, (unsigned long long)st.tx_cpu_us,
                      (unsigned long long)st.tx_durable, (unsigned long long)st.tx_durable_wall_us,
                      (unsigned long long)st.publishes, (unsigned long long)st.publish_cpu_us,
                      (unsigned long long)st.sync_wait_us, (unsigned long long)st.store_syncs);
    if (write(rep_fd, out, (size_t)ol) != ol) return 1;
  }
fail:
  fprintf(stderr, "bench server: %s\n", err.msg);
  return 1;
}

/* Forks a server child with a fresh database; sets O.port and O.authkey. */
static bool server_start(struct server *sv) {
  memset(sv, 0, sizeof *sv);
  sv->cmd_fd = sv->rep_fd = -1;
  snprintf(sv->dir, sizeof sv->dir, "/tmp/bench-proto-XXXXXX");
  if (!mkdtemp(sv->dir)) return false;
  int pfd[2], cfd[2], rfd[2];
  if (pipe(pfd) || pipe(cfd) || pipe(rfd)) return false;
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    close(pfd[0]);
    close(cfd[1]);
    close(rfd[0]);
    _exit(run_server_child(pfd[1], sv->dir, cfd[0], rfd[1]));
  }
  close(pfd[1]);
  close(cfd[0]);
  close(rfd[1]);
  sv->pid = pid;
  sv->cmd_fd = cfd[1];
  sv->rep_fd = rfd[0];
  char line[512] = {0};
  ssize_t r = read(pfd[0], line, sizeof line - 1);
  close(pfd[0]);
  if (r <= 0 || sscanf(line, "%d %255s", &O.port, O.authkey) != 2) {
    fprintf(stderr, "bench: server did not start\n");
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    sv->pid = 0;
    return false;
  }
  return true;
}

static void server_stop(struct server *sv) {
  if (sv->pid > 0) {
    kill(sv->pid, SIGKILL);
    waitpid(sv->pid, NULL, 0);
  }
  if (sv->cmd_fd >= 0) close(sv->cmd_fd);
  if (sv->rep_fd >= 0) close(sv->rep_fd);
  const char *sfx[] = {"", "-wal", "-shm"};
  for (int i = 0; i < 3 && sv->dir[0]; i++) {
    char *f = tc_xasprintf("%s/db.sqlite%s", sv->dir, sfx[i]);
    unlink(f);
    free(f);
  }
  if (sv->dir[0]) rmdir(sv->dir);
  memset(sv, 0, sizeof *sv);
  sv->cmd_fd = sv->rep_fd = -1;
}

/* The server child's counters (--self only): mapper, then model. */
struct sstats {
  unsigned long long events, deltas, full_maps, frag_hits, frag_encodes;
  unsigned long long tx, tx_wall_us, tx_cpu_us, tx_durable, tx_durable_wall_us, publishes, publish_cpu_us;
  unsigned long long sync_wait_us, flushes;
};

static bool server_stats(const struct server *sv, struct sstats *m) {
  memset(m, 0, sizeof *m);
  if (!sv || sv->cmd_fd < 0) return false;
  char line[512] = {0};
  if (write(sv->cmd_fd, "s", 1) != 1) return false;
  ssize_t r = read(sv->rep_fd, line, sizeof line - 1);
  return r > 0 && sscanf(line, "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &m->events,
                         &m->deltas, &m->full_maps, &m->frag_hits, &m->frag_encodes, &m->tx, &m->tx_wall_us,
                         &m->tx_cpu_us, &m->tx_durable, &m->tx_durable_wall_us, &m->publishes, &m->publish_cpu_us,
                         &m->sync_wait_us, &m->flushes) == 14;
}

static void sstats_sub(struct sstats *d, const struct sstats *a, const struct sstats *b) {
  unsigned long long *pd = (unsigned long long *)d;
  const unsigned long long *pa = (const unsigned long long *)a, *pb = (const unsigned long long *)b;
  for (size_t i = 0; i < sizeof *d / sizeof *pd; i++) pd[i] = pa[i] - pb[i];
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

/* Server CPU by thread role (names given by name_new_threads), from each
 * live thread's schedstat. "other" is the unnamed threads (the main thread,
 * short-lived ones the mapper starts for interactive logins); threads that
 * exited are only in `total`. */
enum { R_HANDLERS, R_LOOP, R_MAPPER, R_LISTENER, R_OTHER, R_N };
static const char *const role_name[R_N] = {"handlers", "loop", "mapper", "listener", "other"};
static const char *const role_comm[R_N] = {"tc-worker", "tc-loop", "tc-mapper", "tc-listen", NULL};

struct cpu {
  double total;     /* /proc/<pid>/stat: whole process, 10 ms ticks */
  double precise;   /* sum of live threads' schedstat (ns resolution) */
  double role[R_N];
};

static void role_cpu(pid_t pid, struct cpu *c) {
  memset(c, 0, sizeof *c);
  long rss;
  if (!proc_stats(pid, &c->total, &rss)) return;
  char path[96];
  snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
  DIR *d = opendir(path);
  if (!d) return;
  double named = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char comm[64] = "";
    snprintf(path, sizeof path, "/proc/%d/task/%d/comm", (int)pid, atoi(e->d_name));
    FILE *f = fopen(path, "r");
    if (!f) continue;
    if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
    fclose(f);
    comm[strcspn(comm, "\n")] = 0;
    int r = R_OTHER;
    for (int i = 0; i < R_OTHER; i++)
      if (!strcmp(comm, role_comm[i])) r = i;
    /* schedstat: nanoseconds on the CPU (stat's per-thread ticks are 10 ms) */
    snprintf(path, sizeof path, "/proc/%d/task/%d/schedstat", (int)pid, atoi(e->d_name));
    f = fopen(path, "r");
    if (!f) continue;
    unsigned long long ns = 0;
    int got = fscanf(f, "%llu", &ns);
    fclose(f);
    if (got != 1) continue;
    double s = (double)ns / 1e9;
    c->precise += s;
    if (r == R_OTHER) continue;
    c->role[r] += s;
    named += s;
  }
  closedir(d);
  c->role[R_OTHER] = c->precise - named;
}

static void cpu_sub(struct cpu *d, const struct cpu *a, const struct cpu *b) {
  d->total = a->total - b->total;
  d->precise = a->precise - b->precise;
  for (int i = 0; i < R_N; i++) d->role[i] = a->role[i] - b->role[i];
}

/* CPU seconds of this process (the client simulator: all its threads). */
static double self_cpu(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec / 1e6;
}

/* Per-registration breakdown of one phase (registrations = regs). */
/* The whole machine's CPU time from /proc/stat (jiffies): what a phase
 * left idle, spent waiting on the disk, or lost to other virtual machines
 * (steal). On a shared VM these explain why the same binary measures
 * differently from one run to the next. */
struct mstat {
  unsigned long long busy, idle, iowait, steal;
};

static bool machine_stat(struct mstat *m) {
  memset(m, 0, sizeof *m);
  FILE *f = fopen("/proc/stat", "r");
  if (!f) return false;
  unsigned long long v[10] = {0};
  int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                 &v[5], &v[6], &v[7], &v[8], &v[9]);
  fclose(f);
  if (n < 8) return false;
  m->idle = v[3];
  m->iowait = v[4];
  m->steal = v[7];
  m->busy = v[0] + v[1] + v[2] + v[5] + v[6]; /* guest time is counted in user already */
  return true;
}

struct phase_cost {
  int regs;
  bool have_machine;
  struct mstat m0, m1; /* machine at the start and the end of the phase */
  double wall_s, client_cpu_s;
  bool have_cpu, have_stats;
  struct cpu cpu;     /* server, delta */
  struct sstats st;   /* server counters, delta */
};

/* The threads' own clocks when available (the process tick count is 10 ms). */
static double phase_cpu(const struct phase_cost *pc) { return pc->cpu.precise > 0 ? pc->cpu.precise : pc->cpu.total; }

static void print_phase_cost(const char *label, const struct phase_cost *pc) {
  double k = pc->regs > 0 ? 1e3 / pc->regs : 0; /* seconds -> ms per registration */
  if (pc->have_cpu) {
    printf("%-20s server cpu %.3f ms per registration", label, phase_cpu(pc) * k);
    if (O.self) {
      printf(" (");
      for (int i = 0; i < R_N; i++) printf("%s%s %.3f", i ? ", " : "", role_name[i], pc->cpu.role[i] * k);
      printf(")");
    }
    printf("\n");
  }
  if (pc->have_stats)
    printf("%-20s model: %.1f storage tx per registration, tx cpu %.3f ms, tx wall %.3f ms (durable commits %.1f,"
           " %.3f ms wall each under the writer lock); snapshot publish + subscribers cpu %.3f ms; waiting for"
           " the flush %.3f ms wall, %.1f durable commits per flush\n",
           "", (double)pc->st.tx / (pc->regs ? pc->regs : 1), pc->st.tx_cpu_us / 1e3 * k / 1e3,
           pc->st.tx_wall_us / 1e3 * k / 1e3, (double)pc->st.tx_durable / (pc->regs ? pc->regs : 1),
           pc->st.tx_durable ? pc->st.tx_durable_wall_us / 1e3 / pc->st.tx_durable : 0,
           pc->st.publish_cpu_us / 1e3 * k / 1e3, pc->st.sync_wait_us / 1e3 * k / 1e3,
           pc->st.flushes ? (double)pc->st.tx_durable / pc->st.flushes : 0);
  printf("%-20s client simulator cpu %.3f ms per registration\n", "", pc->client_cpu_s * k);
  if (pc->have_machine) {
    double b = (double)(pc->m1.busy - pc->m0.busy), i = (double)(pc->m1.idle - pc->m0.idle),
           w = (double)(pc->m1.iowait - pc->m0.iowait), st = (double)(pc->m1.steal - pc->m0.steal);
    double t = b + i + w + st;
    if (t > 0)
      printf("%-20s machine during the phase: busy %.0f %%, idle %.0f %%, iowait %.0f %%, steal %.0f %%\n", "",
             100 * b / t, 100 * i / t, 100 * w / t, 100 * st / t);
  }
}

static void json_phase_cost(const struct phase_cost *pc) {
  double k = pc->regs > 0 ? 1e3 / pc->regs : 0;
  printf("\"server_cpu_ms_per_reg\":%.4f,\"server_cpu_ms_per_reg_by_role\":{", phase_cpu(pc) * k);
  for (int i = 0; i < R_N; i++) printf("%s\"%s\":%.4f", i ? "," : "", role_name[i], pc->cpu.role[i] * k);
  printf("},\"model\":{\"tx_per_reg\":%.2f,\"tx_cpu_ms_per_reg\":%.4f,\"tx_wall_ms_per_reg\":%.4f,"
         "\"durable_tx_per_reg\":%.2f,\"durable_tx_wall_ms\":%.4f,\"publish_cpu_ms_per_reg\":%.4f,"
         "\"flush_wait_ms_per_reg\":%.4f,\"flushes\":%llu},"
         "\"client_cpu_ms_per_reg\":%.4f",
         (double)pc->st.tx / (pc->regs ? pc->regs : 1), pc->st.tx_cpu_us / 1e3 * k / 1e3,
         pc->st.tx_wall_us / 1e3 * k / 1e3, (double)pc->st.tx_durable / (pc->regs ? pc->regs : 1),
         pc->st.tx_durable ? pc->st.tx_durable_wall_us / 1e3 / pc->st.tx_durable : 0,
         pc->st.publish_cpu_us / 1e3 * k / 1e3, pc->st.sync_wait_us / 1e3 * k / 1e3, pc->st.flushes,
         pc->client_cpu_s * k);
  if (pc->have_machine)
    printf(",\"machine_jiffies\":{\"busy\":%llu,\"idle\":%llu,\"iowait\":%llu,\"steal\":%llu}",
           pc->m1.busy - pc->m0.busy, pc->m1.idle - pc->m0.idle, pc->m1.iowait - pc->m0.iowait,
           pc->m1.steal - pc->m0.steal);
}

/* ---- clients --------------------------------------------------------------------------- */

/* Dials with the server key fetched once by the calling thread (tailscaled
 * fetches /key once per process, not per connection). */
static struct tc_tclient *dial(const uint8_t server_pub[32]) {
  struct tc_tclient_opts o = {.version = 138, .timeout_ms = 10000, .server_pub = server_pub};
  struct tc_tclient *c = NULL;
  struct tc_err err = {0};
  if (tc_tclient_connect(O.host, O.port, &o, &c, &err)) {
    fprintf(stderr, "connect: %s\n", err.msg);
    return NULL;
  }
  return c;
}

static bool fetch_key(uint8_t server_pub[32]) {
  struct tc_err err = {0};
  int status = 0;
  if (tc_tclient_fetch_key(O.host, O.port, 138, server_pub, &status, &err) == 0) return true;
  fprintf(stderr, "GET /key: %s\n", err.msg);
  return false;
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
};

static void drain_client(int idx);

/* Drains those of clients lo..hi-1 that have something to read: one poll
 * over their sockets instead of a read attempt on each. */
static void drain_ready(int lo, int hi, struct pollfd *pf) {
  int n = 0;
  for (int k = lo; k < hi; k++) {
    pf[n].fd = S[k].c && S[k].sid > 0 ? tc_tclient_fd(S[k].c) : -1;
    pf[n].events = POLLIN;
    pf[n].revents = 0;
    n++;
  }
  if (n == 0 || poll(pf, (nfds_t)n, 0) <= 0) return;
  for (int i = 0; i < n; i++)
    if (pf[i].revents & (POLLIN | POLLHUP | POLLERR)) drain_client(lo + i);
}

static void *reg_worker(void *arg) {
  struct range *r = arg;
  uint8_t spub[32];
  if (!fetch_key(spub)) {
    atomic_fetch_add(&g_errors, r->hi - r->lo);
    return NULL;
  }
  struct pollfd *pf = tc_xcalloc((size_t)(r->hi - r->lo) + 1, sizeof *pf);
  for (int i = r->lo; i < r->hi; i++) {
    S[i].c = dial(spub);
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
    drain_ready(r->lo, i + 1, pf);
  }
  free(pf);
  return NULL;
}

/* Registration only: each machine its own key and Noise connection, closed
 * after the answer. */
static atomic_int g_reg_only_ok;

static pthread_barrier_t g_ro_ready;

/* Each machine's keys and the server-independent half of its handshake are
 * made before the clock starts (a real client has its keys long before it
 * registers, and computes its half of Noise on its own CPU, not the
 * server's): the timed loop is dial, upgrade, the rest of Noise, HTTP/2 and
 * POST /machine/register. */
static void *reg_only_worker(void *arg) {
  struct range *r = arg;
  uint8_t spub[32];
  bool ok = fetch_key(spub);
  struct tc_tclient_prepared *prep = tc_xcalloc((size_t)(r->hi - r->lo), sizeof *prep);
  for (int i = r->lo; ok && i < r->hi; i++)
    if (tc_tclient_prepare(138, NULL, spub, &prep[i - r->lo])) ok = false;
  pthread_barrier_wait(&g_ro_ready);
  if (!ok) {
    atomic_fetch_add(&g_errors, r->hi - r->lo);
    free(prep);
    return NULL;
  }
  for (int i = r->lo; i < r->hi; i++) {
    struct tc_tclient_opts o = {.version = 138, .timeout_ms = 10000, .prepared = &prep[i - r->lo]};
    struct tc_tclient *c = NULL;
    struct tc_err err = {0};
    if (tc_tclient_connect(O.host, O.port, &o, &c, &err)) fprintf(stderr, "connect: %s\n", err.msg);
    char kt[TC_MAPPER_KEY_TEXT], host[32];
    snprintf(host, sizeof host, "reg-%d", i);
    if (c && do_register(c, kt, host))
      atomic_fetch_add(&g_reg_only_ok, 1);
    else
      atomic_fetch_add(&g_errors, 1);
    tc_tclient_free(c);
  }
  free(prep);
  return NULL;
}

/* Runs T reg_only_workers over n machines; fills pc (server counters from sv). */
static void run_reg_only(int n, const struct server *sv, struct phase_cost *pc) {
  memset(pc, 0, sizeof *pc);
  int threads = O.threads < n ? O.threads : n;
  pthread_t *th = tc_xcalloc((size_t)threads, sizeof *th);
  struct range *rg = tc_xcalloc((size_t)threads, sizeof *rg);
  struct cpu c0, c1;
  struct sstats s0, s1;
  pc->have_cpu = O.server_pid > 0;
  pthread_barrier_init(&g_ro_ready, NULL, (unsigned)threads + 1);
  for (int t = 0; t < threads; t++) {
    rg[t].lo = n * t / threads;
    rg[t].hi = n * (t + 1) / threads;
    pthread_create(&th[t], NULL, reg_only_worker, &rg[t]);
  }
  pthread_barrier_wait(&g_ro_ready); /* every handshake prepared */
  pc->have_machine = machine_stat(&pc->m0);
  if (pc->have_cpu) role_cpu(O.server_pid, &c0);
  pc->have_stats = server_stats(sv, &s0);
  double cl0 = self_cpu();
  int64_t t0 = tc_mono_ns();
  for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
  pc->wall_s = (double)(tc_mono_ns() - t0) / 1e9;
  pc->client_cpu_s = self_cpu() - cl0;
  if (pc->have_machine) pc->have_machine = machine_stat(&pc->m1);
  pthread_barrier_destroy(&g_ro_ready);
  if (pc->have_cpu) {
    role_cpu(O.server_pid, &c1);
    cpu_sub(&pc->cpu, &c1, &c0);
  }
  if (pc->have_stats && (pc->have_stats = server_stats(sv, &s1))) sstats_sub(&pc->st, &s1, &s0);
  pc->regs = atomic_load(&g_reg_only_ok);
  free(th);
  free(rg);
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
          "                   [--fullmaps M] [--register-only R] [--hold S]\n"
          "  --register-only R  first register R machines without map streams (default: n with --self, where\n"
          "                     it runs against its own fresh server; 0 without, as they would stay behind)\n"
          "  --hold S           after reading the server's RSS, keep every client connected S more seconds\n"
          "                     (to look at the server meanwhile: heaptrack, gdb, /metrics)\n");
  exit(2);
}

int main(int argc, char **argv) {
  static const struct option lo[] = {{"self", 0, NULL, 's'},       {"host", 1, NULL, 'H'},    {"port", 1, NULL, 'p'},
                                     {"authkey", 1, NULL, 'k'},    {"server-pid", 1, NULL, 'P'},
                                     {"threads", 1, NULL, 't'},    {"joins", 1, NULL, 'j'},   {"timeout", 1, NULL, 'T'},
                                     {"json", 0, NULL, 'J'},       {"policy", 1, NULL, 'Y'},
                                     {"fullmaps", 1, NULL, 'F'},   {"register-only", 1, NULL, 'R'},
                                     {"hold", 1, NULL, 'h'},       {NULL, 0, NULL, 0}};
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
    case 'R': O.reg_only = atoi(optarg); break;
    case 'h': O.hold_s = atoi(optarg); break;
    default: usage();
    }
  }
  if (O.n < 1 || O.threads < 1 || O.joins < 1 || O.fullmaps < 0 || (!O.self && (!O.port || !O.authkey[0]))) usage();
  if (O.threads > O.n) O.threads = O.n;
  signal(SIGPIPE, SIG_IGN);
  tc_log_set_level(TC_LOG_WARN);

  if (O.reg_only < 0) O.reg_only = O.self ? O.n : 0;

  /* phase 0: registration only. With --self against its own fresh server,
   * so that the join phase starts from an empty tailnet as before. */
  struct server sv = {.cmd_fd = -1, .rep_fd = -1};
  struct phase_cost ro = {0};
  if (O.reg_only > 0) {
    if (O.self) {
      if (!server_start(&sv)) return 1;
      O.server_pid = sv.pid;
    }
    run_reg_only(O.reg_only, O.self ? &sv : NULL, &ro);
    if (O.self) server_stop(&sv);
  }

  if (O.self) {
    if (!server_start(&sv)) return 1;
    O.server_pid = sv.pid;
  }

  S = calloc((size_t)O.n, sizeof *S);
  g_lat_ns = calloc((size_t)O.n * (size_t)O.joins, sizeof *g_lat_ns);
  double cpu0 = 0, cpu1 = 0, cpu2 = 0;
  long rss1 = 0, rss2 = 0;
  bool have_proc = O.server_pid > 0 && proc_stats(O.server_pid, &cpu0, &rss1);
  struct sstats ss0 = {0}, ss1 = {0}, ms = {0};
  bool have_ms = server_stats(&sv, &ss0);
  struct cpu rc0 = {0}, rc1 = {0};
  if (have_proc) role_cpu(O.server_pid, &rc0);
  double cl0 = self_cpu();
  struct mstat jm0;
  bool have_jm = machine_stat(&jm0);

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
  struct phase_cost jp = {.regs = connected, .wall_s = phase1_s, .client_cpu_s = self_cpu() - cl0,
                          .have_cpu = have_proc, .m0 = jm0};
  jp.have_machine = have_jm && machine_stat(&jp.m1);
  if (have_proc) {
    proc_stats(O.server_pid, &cpu1, &rss1);
    role_cpu(O.server_pid, &rc1);
    cpu_sub(&jp.cpu, &rc1, &rc0);
  }
  if (have_ms) have_ms = server_stats(&sv, &ss1);
  if (have_ms) sstats_sub(&ms, &ss1, &ss0);
  jp.st = ms;
  jp.have_stats = have_ms;

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
    uint8_t spub[32];
    struct tc_tclient *jc = fetch_key(spub) ? dial(spub) : NULL;
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
  /* RSS per idle streaming node: read it after a second of idleness, once
   * the server has handed freed pages back (it trims its malloc arenas an
   * idle quarter second after work). */
  struct timespec idle = {1, 0};
  nanosleep(&idle, NULL);
  if (have_proc) proc_stats(O.server_pid, &cpu2, &rss2);
  if (O.hold_s > 0) {
    fprintf(stderr, "holding %d clients for %d s\n", connected, O.hold_s);
    sleep((unsigned)O.hold_s);
  }

  /* phase 3: full map cost. Client 0 asks for one-shot full maps (every
   * other node is its peer: allow-all or a permit-all policy). The server
   * is otherwise idle, so its CPU delta is what these maps cost it: the
   * handler, the dispatcher assembling cached peer fragments, zstd, HTTP/2
   * and Noise. The simulated client's decoding is not in that figure. */
  double fm_wall_ms = 0, fm_cpu_ms = 0;
  size_t fm_bytes = 0;
  int fm_done = 0;
  int fm_peers = connected + O.joins - 1;
  if (O.fullmaps > 0 && S[0].c && S[0].sid > 0) {
    char *b = tc_xasprintf("{\"Version\":138,\"Compress\":\"zstd\",\"NodeKey\":\"%s\",\"Stream\":false}",
                           S[0].keytext);
    struct cpu fc0, fc1, fcd;
    if (have_proc) role_cpu(O.server_pid, &fc0);
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
    if (have_proc) {
      role_cpu(O.server_pid, &fc1);
      cpu_sub(&fcd, &fc1, &fc0);
      /* the threads' own clocks: /proc/<pid>/stat's 10 ms ticks are too coarse for a few maps */
      fm_cpu_ms = (fcd.precise > 0 ? fcd.precise : fcd.total) * 1e3 / (fm_done ? fm_done : 1);
    }
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
  bool ok = connected == O.n && complete_joins == O.joins && ro.regs == O.reg_only && atomic_load(&g_errors) == 0 &&
            (O.fullmaps == 0 || fm_done == O.fullmaps);

  if (O.json) {
    printf("{\"clients\":%d,\"connected\":%d,\"threads\":%d,\"registrations_per_s\":%.1f,\"phase1_s\":%.3f,"
           "\"converge_s\":%.2f,\"joins\":%d,\"complete_joins\":%d,\"latency_ms\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.2f},"
           "\"bytes_per_update_per_client\":%.0f,\"server_cpu_s\":{\"register\":%.2f,\"joins\":%.2f},"
           "\"server_rss_kib\":%ld,\"rss_kib_per_node\":%.1f,\"full_map\":{\"maps\":%d,\"peers\":%d,\"bytes\":%zu,"
           "\"wall_ms\":%.3f,\"server_cpu_ms\":%.3f,\"server_cpu_us_per_peer\":%.3f},"
           "\"register_phase_mapper\":{\"events\":%llu,\"deltas\":%llu,\"full_maps\":%llu,\"frag_encodes\":%llu,"
           "\"frag_hits\":%llu},",
           O.n, connected, O.threads, connected / phase1_s, phase1_s, converge_s, O.joins, complete_joins, p50, p99, mx,
           bytes_per_update, cpu1 - cpu0, cpu2 - cpu1, rss2, (double)rss2 / O.n, fm_done, fm_peers, fm_bytes,
           fm_wall_ms, fm_cpu_ms, fm_us_per_peer, ms.events, ms.deltas, ms.full_maps, ms.frag_encodes, ms.frag_hits);
    printf("\"register_phase\":{");
    json_phase_cost(&jp);
    printf("},\"register_only\":{\"registrations\":%d,\"wall_s\":%.3f,\"registrations_per_s\":%.1f,", ro.regs,
           ro.wall_s, ro.wall_s > 0 ? ro.regs / ro.wall_s : 0);
    json_phase_cost(&ro);
    printf("},\"errors\":%d,\"ok\":%s}\n", atomic_load(&g_errors), ok ? "true" : "false");
  } else {
    printf("clients              %d (connected %d, %d threads)\n", O.n, connected, O.threads);
    if (O.reg_only > 0) {
      printf("register only        %d machines (own key and connection each, no map): %.3f s -> %.1f"
             " registrations/s\n", ro.regs, ro.wall_s, ro.wall_s > 0 ? ro.regs / ro.wall_s : 0);
      print_phase_cost("", &ro);
    }
    printf("register+full map    %.3f s  -> %.1f registrations/s\n", phase1_s, connected / phase1_s);
    print_phase_cost("", &jp);
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
             ms.events, ms.deltas, (double)ms.deltas / (connected ? connected : 1), ms.full_maps, ms.frag_encodes,
             ms.frag_hits);
    if (fm_done)
      printf("full map             %d peers, %zu bytes framed: %.2f ms wall, server cpu %.2f ms = %.2f us per peer"
             " (%d maps)\n", fm_peers, fm_bytes, fm_wall_ms, fm_cpu_ms, fm_us_per_peer, fm_done);
    printf("errors               %d\n", atomic_load(&g_errors));
  }
  for (int i = 0; i < O.n; i++)
    if (S[i].c) tc_tclient_free(S[i].c);
  if (O.self) server_stop(&sv);
  free(S);
  free(g_lat_ns);
  free(lat);
  free(th);
  free(rg);
  return ok ? 0 : 1;
}
