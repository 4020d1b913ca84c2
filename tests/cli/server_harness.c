/* server_harness: see server_harness.h. */
#include "server_harness.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "base/base.h"
#include "tc_test.h"

static const char *binary(void) {
  static char path[512];
  const char *d = getenv("TC_BINARY_DIR");
#ifdef TC_BINARY_DIR
  if (!d) d = TC_BINARY_DIR;
#endif
  snprintf(path, sizeof path, "%s/tailcoat", d ? d : ".");
  return path;
}

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t l = sizeof a;
  if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &l)) {
    close(fd);
    return -1;
  }
  close(fd);
  return ntohs(a.sin_port);
}

/* "postgresql:///db?host=DIR&user=postgres" -> host DIR. */
static bool pg_host_from_url(const char *url, char *host, size_t n) {
  const char *h = strstr(url, "host=");
  if (!h) return false;
  h += 5;
  size_t l = strcspn(h, "&");
  if (l >= n) return false;
  memcpy(host, h, l);
  host[l] = 0;
  return true;
}

static PGconn *pg_admin(const struct tc_srv *s) {
  char ci[512];
  snprintf(ci, sizeof ci, "host=%s user=postgres dbname=tailcoat_test", s->pg_host);
  PGconn *c = PQconnectdb(ci);
  if (PQstatus(c) != CONNECTION_OK) {
    fprintf(stderr, "harness: pg connect: %s", PQerrorMessage(c));
    PQfinish(c);
    return NULL;
  }
  return c;
}

int tc_pg_exec(const struct tc_srv *s, const char *sql) {
  PGconn *c = pg_admin(s);
  if (!c) return -1;
  PGresult *r = PQexec(c, sql);
  int ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
  if (!ok) fprintf(stderr, "harness: %s: %s", sql, PQerrorMessage(c));
  PQclear(r);
  PQfinish(c);
  return ok ? 0 : -1;
}

bool tc_srv_init(struct tc_srv *s, const char *pg_url) { return tc_srv_init_ex(s, pg_url, NULL, NULL); }

bool tc_srv_init_ex(struct tc_srv *s, const char *pg_url, const char *derp_yaml, const char *extra_yaml) {
  memset(s, 0, sizeof *s);
  char *d = tc_test_tmpdir();
  snprintf(s->dir, sizeof s->dir, "%s", d);
  free(d);
  snprintf(s->config, sizeof s->config, "%s/config.yaml", s->dir);
  snprintf(s->sock, sizeof s->sock, "%s/tc.sock", s->dir);
  snprintf(s->db, sizeof s->db, "%s/db.sqlite", s->dir);
  snprintf(s->log, sizeof s->log, "%s/server.log", s->dir);
  s->port = free_port();
  s->metrics_port = free_port();
  if (s->port <= 0 || s->metrics_port <= 0 || s->port == s->metrics_port) return false;
  char dbsection[700];
  if (pg_url) {
    if (!pg_host_from_url(pg_url, s->pg_host, sizeof s->pg_host)) return false;
    static int seq;
    snprintf(s->pg_db, sizeof s->pg_db, "tc_srv_%d_%d", (int)getpid(), ++seq);
    char sql[160];
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", s->pg_db);
    if (tc_pg_exec(s, sql)) return false;
    snprintf(dbsection, sizeof dbsection,
             "database:\n  type: postgres\n  postgres:\n    host: \"%s\"\n    name: %s\n    user: postgres\n"
             "    pass: \"\"\n    ssl: \"disable\"\n",
             s->pg_host, s->pg_db);
  } else {
    snprintf(dbsection, sizeof dbsection,
             "database:\n  type: sqlite\n  sqlite:\n    path: \"%s\"\n    write_ahead_log: true\n", s->db);
  }
  s->tls = extra_yaml && strstr(extra_yaml, "tls_cert_path:");
  FILE *f = fopen(s->config, "w");
  if (!f) return false;
  fprintf(f,
          "server_url: %s://127.0.0.1:%d\n"
          "listen_addr: 127.0.0.1:%d\n"
          "metrics_listen_addr: 127.0.0.1:%d\n"
          "noise:\n  private_key_path: \"%s/noise.key\"\n"
          "prefixes:\n  v4: 100.64.0.0/10\n  v6: fd7a:115c:a1e0::/48\n  allocation: sequential\n"
          "%s"
          "%s"
          "dns:\n  magic_dns: true\n  base_domain: tailnet.test\n  nameservers:\n    global: [1.1.1.1]\n"
          "%s"
          "log:\n  level: info\n"
          "unix_socket: \"%s\"\n"
          "unix_socket_permission: \"0770\"\n%s",
          s->tls ? "https" : "http", s->port, s->port, s->metrics_port, s->dir, dbsection,
          derp_yaml ? derp_yaml : "derp:\n  server:\n    enabled: false\n  urls: []\n  paths: []\n",
          extra_yaml && strstr(extra_yaml, "policy:") ? "" : "policy:\n  mode: database\n", s->sock,
          extra_yaml ? extra_yaml : "");
  fclose(f);
  return true;
}

/* True if pid holds a listening TCP socket on 127.0.0.1:port. /health
 * answering on the port is not enough: free_port() closes its probe socket,
 * so under a parallel ctest another test's server can end up on the same
 * port, answer our /health, and be the one our test then talks to. */
static bool pid_listens_on(pid_t pid, int port) {
  FILE *f = fopen("/proc/net/tcp", "r");
  if (!f) return false;
  char want[32];
  snprintf(want, sizeof want, "0100007F:%04X", (unsigned)port);
  char line[512];
  unsigned long inodes[16];
  int ninodes = 0;
  while (fgets(line, sizeof line, f) && ninodes < 16) {
    char local[64], remote[64];
    unsigned st;
    unsigned long inode;
    /* sl local rem st tx:rx tr:when retrnsmt uid timeout inode */
    if (sscanf(line, " %*d: %63s %63s %x %*s %*s %*s %*u %*u %lu", local, remote, &st, &inode) != 4) continue;
    if (st == 0x0A && !strcmp(local, want)) inodes[ninodes++] = inode;
  }
  fclose(f);
  bool found = false;
  for (int i = 0; i < ninodes && !found; i++) {
    char want_link[64];
    snprintf(want_link, sizeof want_link, "socket:[%lu]", inodes[i]);
    for (int fd = 0; fd < 1024 && !found; fd++) {
      char path[64], link[64];
      snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)pid, fd);
      ssize_t n = readlink(path, link, sizeof link - 1);
      if (n <= 0) continue;
      link[n] = 0;
      found = !strcmp(link, want_link);
    }
  }
  return found;
}

/* Replaces "127.0.0.1:OLD" by "127.0.0.1:NEW" in the config file. */
static bool config_move_port(const struct tc_srv *s, int old_port, int new_port) {
  char *text = NULL;
  size_t n = 0;
  if (tc_read_file(s->config, 1 << 20, &text, &n, NULL)) return false;
  char from[32], to[32];
  snprintf(from, sizeof from, "127.0.0.1:%d", old_port);
  snprintf(to, sizeof to, "127.0.0.1:%d", new_port);
  struct tc_buf b = TC_BUF_INIT;
  const char *p = text;
  for (const char *q; (q = strstr(p, from));) {
    /* a prefix of a longer port number is not this port */
    if (q[strlen(from)] >= '0' && q[strlen(from)] <= '9') {
      tc_buf_append(&b, p, (size_t)(q - p) + strlen(from));
      p = q + strlen(from);
      continue;
    }
    tc_buf_append(&b, p, (size_t)(q - p));
    tc_buf_puts(&b, to);
    p = q + strlen(from);
  }
  tc_buf_puts(&b, p);
  FILE *f = fopen(s->config, "w");
  bool ok = f && fwrite(b.data, 1, b.len, f) == b.len;
  if (f && fclose(f)) ok = false;
  tc_buf_free(&b);
  free(text);
  return ok;
}

static bool log_says_addr_in_use(const struct tc_srv *s) {
  char *log = NULL;
  size_t n;
  if (tc_read_file(s->log, 1 << 20, &log, &n, NULL)) return false;
  bool yes = strstr(log, "Address already in use") != NULL;
  free(log);
  return yes;
}

static void print_log(const struct tc_srv *s) {
  char *log = NULL;
  size_t n;
  if (!tc_read_file(s->log, 1 << 20, &log, &n, NULL)) fprintf(stderr, "%s\n", log);
  free(log);
}

/* One start attempt: 1 ready, 0 failed, -1 lost a port race (retry with
 * fresh ports). */
static int srv_start_once(struct tc_srv *s) {
  pid_t pid = fork();
  if (pid < 0) return 0;
  if (pid == 0) {
    /* a test that dies (assertion, sanitizer abort) takes its server along */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int fd = open(s->log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    execl(binary(), "tailcoat", "-c", s->config, "serve", (char *)NULL);
    _exit(127);
  }
  s->pid = pid;
  /* generous: an ASan build on a loaded 2-core CI machine starts slowly */
  for (int i = 0; i < 600; i++) {
    int ws;
    if (waitpid(pid, &ws, WNOHANG) == pid) {
      s->pid = 0;
      if (log_says_addr_in_use(s)) return -1;
      fprintf(stderr, "harness: server exited early, log:\n");
      print_log(s);
      return 0;
    }
    /* ready = both ports are ours and /health answers */
    if (pid_listens_on(pid, s->port) && pid_listens_on(pid, s->metrics_port)) {
      char *body = NULL;
      int st = tc_http_do(s, false, "GET", "/health", NULL, NULL, &body);
      free(body);
      if (st == 200) return 1;
    }
    usleep(100 * 1000);
  }
  fprintf(stderr, "harness: server not ready after 60 s, log:\n");
  print_log(s);
  return 0;
}

bool tc_srv_start(struct tc_srv *s) {
  for (int attempt = 0; attempt < 5; attempt++) {
    int r = srv_start_once(s);
    if (r >= 0) return r == 1;
    /* another process took a port between free_port() and the server's
     * bind: move to fresh ones */
    int port = free_port(), mport = free_port();
    if (port <= 0 || mport <= 0 || port == mport) return false;
    fprintf(stderr, "harness: port %d/%d taken, retrying on %d/%d\n", s->port, s->metrics_port, port, mport);
    if (!config_move_port(s, s->port, port) || !config_move_port(s, s->metrics_port, mport)) return false;
    s->port = port;
    s->metrics_port = mport;
  }
  return false;
}

int tc_srv_stop(struct tc_srv *s, int sig) {
  if (s->pid <= 0) return -1;
  kill(s->pid, sig);
  int ws = 0;
  /* bounded: a hung shutdown must fail the test, not hang it */
  for (int i = 0; i < 300; i++) {
    if (waitpid(s->pid, &ws, WNOHANG) == s->pid) {
      s->pid = 0;
      return ws;
    }
    usleep(50 * 1000);
  }
  kill(s->pid, SIGKILL);
  waitpid(s->pid, &ws, 0);
  s->pid = 0;
  return -1;
}

void tc_srv_cleanup(struct tc_srv *s) {
  if (s->pid > 0) tc_srv_stop(s, SIGKILL);
  if (s->pg_db[0]) {
    char sql[160];
    snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s WITH (FORCE)", s->pg_db);
    tc_pg_exec(s, sql);
  }
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", s->dir);
  if (system(cmd)) { /* best effort */ }
}

static char *slurp_fd(int fd) {
  struct tc_buf b = TC_BUF_INIT;
  char tmp[4096];
  for (;;) {
    ssize_t n = read(fd, tmp, sizeof tmp);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    tc_buf_append(&b, tmp, (size_t)n);
  }
  tc_buf_putc(&b, 0);
  return tc_buf_steal(&b, NULL);
}

static int run_v(const struct tc_srv *s, char **out, char **err, bool json, const char *arg, va_list ap) {
  const char *argv[64];
  int n = 0;
  argv[n++] = "tailcoat";
  argv[n++] = "-c";
  argv[n++] = s->config;
  if (json) {
    argv[n++] = "-o";
    argv[n++] = "json";
  }
  for (const char *a = arg; a && n < 62; a = va_arg(ap, const char *)) argv[n++] = a;
  argv[n] = NULL;
  char errpath[400];
  snprintf(errpath, sizeof errpath, "%s/cli.stderr", s->dir);
  int po[2];
  if (pipe(po)) return -1;
  pid_t pid = fork();
  if (pid == 0) {
    dup2(po[1], 1);
    close(po[0]);
    close(po[1]);
    int fd = open(errpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd >= 0) {
      dup2(fd, 2);
      close(fd);
    }
    execv(binary(), (char *const *)argv);
    _exit(127);
  }
  close(po[1]);
  char *o = slurp_fd(po[0]);
  close(po[0]);
  int ws;
  waitpid(pid, &ws, 0);
  if (out) *out = o;
  else free(o);
  if (err) {
    char *e = NULL;
    size_t l;
    if (tc_read_file(errpath, 1 << 20, &e, &l, NULL)) e = strdup("");
    *err = e;
  }
  return WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
}

int tc_cli(const struct tc_srv *s, char **out, char **err, const char *arg, ...) {
  va_list ap;
  va_start(ap, arg);
  int rc = run_v(s, out, err, false, arg, ap);
  va_end(ap);
  return rc;
}

json_t *tc_cli_json(const struct tc_srv *s, int *rc, const char *arg, ...) {
  va_list ap;
  va_start(ap, arg);
  char *out = NULL, *err = NULL;
  int r = run_v(s, &out, &err, true, arg, ap);
  va_end(ap);
  if (rc) *rc = r;
  json_t *j = json_loads(out ? out : "", JSON_DECODE_ANY, NULL);
  if (r == 0 && !j) fprintf(stderr, "harness: CLI output is not JSON: %s\n", out);
  if (r != 0 && err && *err) fprintf(stderr, "harness: CLI stderr: %s", err);
  free(out);
  free(err);
  return j;
}

static size_t on_body(char *p, size_t sz, size_t n, void *ud) {
  tc_buf_append(ud, p, sz * n);
  return sz * n;
}

int tc_http_do(const struct tc_srv *s, bool unix_sock, const char *method, const char *path,
               const char *const *headers, const char *body, char **resp_body) {
  CURL *h = curl_easy_init();
  char url[512];
  struct curl_slist *hl = NULL;
  for (int i = 0; headers && headers[i]; i++) hl = curl_slist_append(hl, headers[i]);
  if (unix_sock) {
    snprintf(url, sizeof url, "http://localhost%s", path);
    curl_easy_setopt(h, CURLOPT_UNIX_SOCKET_PATH, s->sock);
  } else {
    snprintf(url, sizeof url, "%s://127.0.0.1:%d%s", s->tls ? "https" : "http", s->port, path);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  struct tc_buf b = TC_BUF_INIT;
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TIMEOUT, 20L);
  if (body) {
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
  }
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
  long code = 0;
  if (curl_easy_perform(h) == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
  curl_easy_cleanup(h);
  curl_slist_free_all(hl);
  tc_buf_putc(&b, 0);
  if (resp_body) *resp_body = tc_buf_steal(&b, NULL);
  else tc_buf_free(&b);
  return (int)code;
}

char *tc_srv_metrics(const struct tc_srv *s) {
  CURL *h = curl_easy_init();
  char url[128];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/metrics", s->metrics_port);
  struct tc_buf b = TC_BUF_INIT;
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TIMEOUT, 10L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
  CURLcode rc = curl_easy_perform(h);
  curl_easy_cleanup(h);
  tc_buf_putc(&b, 0);
  if (rc != CURLE_OK) {
    tc_buf_free(&b);
    return NULL;
  }
  return tc_buf_steal(&b, NULL);
}
