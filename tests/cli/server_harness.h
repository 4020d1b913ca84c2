/* server_harness: starts the real `tailcoat serve` binary on loopback with a
 * generated config (SQLite in a temp dir, or a fresh PostgreSQL database),
 * runs CLI commands against it, and speaks HTTP to it. For integration
 * tests in tests/cli and tests/http. Single-threaded use. */
#ifndef TC_TEST_SERVER_HARNESS_H
#define TC_TEST_SERVER_HARNESS_H

#include <jansson.h>
#include <stdbool.h>
#include <sys/types.h>

struct tc_srv {
  char dir[256];
  char config[300];
  char sock[300];
  char db[300];
  char pg_host[256]; /* "" for SQLite */
  char pg_db[64];
  int port, metrics_port;
  pid_t pid;
  char log[300];
  bool tls; /* speak https (certificate not verified) */
};

/* Prepares a temp dir and config. pg_url NULL = SQLite, else the
 * TC_TEST_PG_URL of the fixture (a fresh database is created). */
bool tc_srv_init(struct tc_srv *s, const char *pg_url);
/* Same, with the derp: section replaced by derp_yaml (NULL = DERP off) and
 * extra top-level YAML appended (NULL = none). A policy: section in extra
 * replaces the default (database mode). */
bool tc_srv_init_ex(struct tc_srv *s, const char *pg_url, const char *derp_yaml, const char *extra_yaml);
/* Starts the server and waits (<= 60 s) until it listens on both of its
 * ports itself and GET /health answers 200; if a port was taken meanwhile
 * (the server says "Address already in use"), retries on fresh ports and
 * updates s->port / s->metrics_port. */
bool tc_srv_start(struct tc_srv *s);
/* Sends sig and reaps the process; returns its wait status. */
int tc_srv_stop(struct tc_srv *s, int sig);
/* Drops the PostgreSQL database (if any) and the temp dir. */
void tc_srv_cleanup(struct tc_srv *s);

/* Runs `tailcoat -c CONFIG args...` (NULL-terminated), capturing stdout and
 * stderr (owned, may be NULL args). Returns the exit status (-1 on a crash). */
int tc_cli(const struct tc_srv *s, char **out, char **err, const char *arg, ...) __attribute__((sentinel));
/* Same with -o json; parses stdout. Returns owned JSON or NULL; *rc gets the
 * exit status. */
json_t *tc_cli_json(const struct tc_srv *s, int *rc, const char *arg, ...) __attribute__((sentinel));

/* One HTTP request to the TCP port (unix_sock false) or the unix socket.
 * headers: NULL-terminated "Name: value" array or NULL. Returns the status
 * (0 on transport failure); *body owned. */
int tc_http_do(const struct tc_srv *s, bool unix_sock, const char *method, const char *path,
               const char *const *headers, const char *body, char **resp_body);
/* Fetches http://127.0.0.1:metrics_port/metrics; owned text or NULL. */
char *tc_srv_metrics(const struct tc_srv *s);

/* Runs SQL on the server's PostgreSQL database's maintenance connection
 * (connected to the fixture's database). 0 on success. */
int tc_pg_exec(const struct tc_srv *s, const char *sql);

#endif
