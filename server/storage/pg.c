/* pg: the PostgreSQL backend over libpq. A small pool of connections
 * (cfg.pg_max_conns), opened lazily; a transaction holds one connection from
 * begin to commit/rollback. A connection found broken is PQreset; begin
 * retries once when the failure happened before any statement of the
 * transaction was sent, later failures surface as TC_EAGAIN (the caller
 * retries the whole transaction). Multi-host conninfo strings are handled
 * by libpq itself (it tries the hosts in order).
 *
 * Statements go through PQexecParams with text parameters: values are never
 * spliced into SQL. */
#include <errno.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "storage/store_int.h"

struct pgc {
  PGconn *c;
  bool busy;
};

struct pgpool {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  struct pgc *conns;
  int max;
  int acquire_timeout_ms;
  const char *conninfo; /* borrowed from st->cfg */
};

/* PostgreSQL notices (e.g. "relation exists, skipping") are not errors. */
static void quiet_notices(void *arg, const char *msg) {}

static void trim_nl(char *s) {
  size_t n = strlen(s);
  while (n && (s[n - 1] == '\n' || s[n - 1] == ' ')) s[--n] = 0;
}

static int set_conn_err(PGconn *c, struct tc_err *err, int code, const char *what) {
  char msg[400];
  snprintf(msg, sizeof msg, "%s", c ? PQerrorMessage(c) : "out of memory");
  trim_nl(msg);
  return tc_err_set(err, code, "postgres: %s: %s", what, msg);
}

static int pg_connect(struct pgpool *p, PGconn **out, struct tc_err *err) {
  /* Defaults first; the operator's conninfo (expanded from "dbname")
   * overrides them. Without a connect_timeout a dead TCP host in a
   * multi-host list would stall for the kernel's SYN timeout. */
  static const char *const keys[] = {"connect_timeout", "application_name", "keepalives_idle",
                                     "keepalives_interval", "keepalives_count", "dbname", NULL};
  /* Keepalives (TCP only) notice a vanished server in ~a minute instead of
   * the kernel's two hours, so a hung statement becomes TC_EAGAIN. */
  const char *vals[] = {"10", "tailcoat", "30", "10", "3", p->conninfo, NULL};
  PGconn *c = PQconnectdbParams(keys, vals, 1);
  if (!c || PQstatus(c) != CONNECTION_OK) {
    int code = set_conn_err(c, err, TC_EAGAIN, "connect");
    PQfinish(c);
    return code;
  }
  PQsetNoticeProcessor(c, quiet_notices, NULL);
  *out = c;
  return 0;
}

/* Makes sure slot's connection is usable: connects or resets. */
static int ensure_conn(struct pgpool *p, struct pgc *slot, struct tc_err *err) {
  if (!slot->c) return pg_connect(p, &slot->c, err);
  if (PQstatus(slot->c) == CONNECTION_OK) return 0;
  PQreset(slot->c);
  if (PQstatus(slot->c) == CONNECTION_OK) {
    PQsetNoticeProcessor(slot->c, quiet_notices, NULL);
    return 0;
  }
  int code = set_conn_err(slot->c, err, TC_EAGAIN, "reconnect");
  PQfinish(slot->c);
  slot->c = NULL;
  return code;
}

static void release(struct pgpool *p, struct pgc *slot) {
  if (slot->c && PQstatus(slot->c) == CONNECTION_OK && PQtransactionStatus(slot->c) != PQTRANS_IDLE) {
    PGresult *r = PQexec(slot->c, "ROLLBACK");
    PQclear(r);
  }
  pthread_mutex_lock(&p->mu);
  slot->busy = false;
  pthread_cond_signal(&p->cv);
  pthread_mutex_unlock(&p->mu);
}

static int acquire(struct pgpool *p, struct pgc **out, struct tc_err *err) {
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += p->acquire_timeout_ms / 1000;
  deadline.tv_nsec += (long)(p->acquire_timeout_ms % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  struct pgc *slot = NULL;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    /* Prefer an open connection over opening a new one. */
    for (int i = 0; i < p->max && !slot; i++)
      if (!p->conns[i].busy && p->conns[i].c) slot = &p->conns[i];
    for (int i = 0; i < p->max && !slot; i++)
      if (!p->conns[i].busy) slot = &p->conns[i];
    if (slot) break;
    if (pthread_cond_timedwait(&p->cv, &p->mu, &deadline) == ETIMEDOUT) {
      pthread_mutex_unlock(&p->mu);
      return tc_err_set(err, TC_EAGAIN, "postgres: all %d connections busy for %d ms", p->max,
                        p->acquire_timeout_ms);
    }
  }
  slot->busy = true;
  pthread_mutex_unlock(&p->mu);
  int code = ensure_conn(p, slot, err);
  if (code) {
    release(p, slot);
    return code;
  }
  *out = slot;
  return 0;
}

static bool conn_lost(PGconn *c, const PGresult *r) {
  if (PQstatus(c) != CONNECTION_OK) return true;
  const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
  /* 08xxx connection exceptions, 57P01..03 administrator shutdown/crash. */
  return state && (!strncmp(state, "08", 2) || !strncmp(state, "57P0", 4));
}

static int result_err(PGconn *c, PGresult *r, struct tc_err *err, const char *what) {
  char msg[400];
  snprintf(msg, sizeof msg, "%s", r ? PQresultErrorMessage(r) : PQerrorMessage(c));
  if (!*msg) snprintf(msg, sizeof msg, "%s", PQerrorMessage(c));
  trim_nl(msg);
  if (conn_lost(c, r)) return tc_err_set(err, TC_EAGAIN, "postgres: %s: connection lost: %s", what, msg);
  const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
  if (!state) state = "";
  if (!strcmp(state, "23505")) {
    char field[128];
    const char *cons = PQresultErrorField(r, PG_DIAG_CONSTRAINT_NAME);
    tc_store_constraint_field(cons ? cons : "", field, sizeof field);
    return tc_err_set(err, TC_EEXIST, "%s already exists (unique)", field);
  }
  if (!strcmp(state, "23503")) return tc_err_set(err, TC_ECONFLICT, "foreign key constraint failed");
  if (!strcmp(state, "23502")) return tc_err_set(err, TC_EINVAL, "postgres: %s", msg);
  if (!strcmp(state, "40001") || !strcmp(state, "40P01") || !strcmp(state, "55P03"))
    return tc_err_set(err, TC_EAGAIN, "postgres: %s: %s", what, msg);
  return tc_err_set(err, TC_EDB, "postgres: %s: %s", what, msg);
}

static int pg_open(struct tc_store *st, struct tc_err *err) {
  const struct tc_store_config *cfg = &st->cfg;
  if (!cfg->pg_conninfo || !*cfg->pg_conninfo)
    return tc_err_set(err, TC_EINVAL, "postgres: no connection string configured");
  struct pgpool *p = tc_xcalloc(1, sizeof *p);
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  p->max = cfg->pg_max_conns > 0 ? cfg->pg_max_conns : 4;
  p->acquire_timeout_ms = cfg->pg_acquire_timeout_ms > 0 ? cfg->pg_acquire_timeout_ms : 30000;
  p->conninfo = cfg->pg_conninfo;
  p->conns = tc_xcalloc((size_t)p->max, sizeof *p->conns);
  st->be = p;
  /* Connect once now so a bad conninfo fails at open, not at first use. */
  struct pgc *slot;
  int code = acquire(p, &slot, err);
  if (code) {
    if (code == TC_EAGAIN) {
      code = TC_EDB;
      if (err) err->code = code;
    }
    st->be = NULL;
    free(p->conns);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p);
    return code;
  }
  release(p, slot);
  return 0;
}

static void pg_close(struct tc_store *st) {
  struct pgpool *p = st->be;
  if (!p) return;
  for (int i = 0; i < p->max; i++) PQfinish(p->conns[i].c);
  free(p->conns);
  pthread_cond_destroy(&p->cv);
  pthread_mutex_destroy(&p->mu);
  free(p);
  st->be = NULL;
}

static int pg_begin(struct tc_store *st, struct tc_tx *tx, struct tc_err *err) {
  struct pgpool *p = st->be;
  struct pgc *slot;
  int code = acquire(p, &slot, err);
  if (code) return code;
  const char *sql;
  if (tx->flags & TX_SNAPSHOT)
    sql = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
  else if (tx->flags & (TC_TX_DURABLE | TC_TX_DURABLE_LATER | TX_MIGRATE)) /* PostgreSQL groups commits itself */
    sql = "BEGIN; SET LOCAL synchronous_commit TO on";
  else
    /* The server's own setting (on unless the operator chose otherwise):
     * an acknowledged user or key must survive a database crash too. */
    sql = "BEGIN";
  for (int attempt = 0;; attempt++) {
    PGresult *r = PQexec(slot->c, sql);
    if (r && PQresultStatus(r) == PGRES_COMMAND_OK) {
      PQclear(r);
      break;
    }
    bool lost = conn_lost(slot->c, r);
    code = result_err(slot->c, r, err, "BEGIN");
    PQclear(r);
    /* Nothing of this transaction was sent yet: reconnect and try again. */
    if (lost && attempt == 0) {
      PQreset(slot->c);
      if (PQstatus(slot->c) == CONNECTION_OK) {
        PQsetNoticeProcessor(slot->c, quiet_notices, NULL);
        continue;
      }
      code = set_conn_err(slot->c, err, TC_EAGAIN, "reconnect");
    }
    release(p, slot);
    return code;
  }
  tx->conn = slot;
  return 0;
}

static int pg_commit(struct tc_tx *tx, uint64_t *ticket, struct tc_err *err) {
  struct pgc *slot = tx->conn;
  *ticket = 0; /* durable transactions commit with synchronous_commit on */
  int code = 0;
  PGresult *r = PQexec(slot->c, "COMMIT");
  if (!r || PQresultStatus(r) != PGRES_COMMAND_OK) {
    if (conn_lost(slot->c, r))
      code = tc_err_set(err, TC_EDB, "postgres: connection lost during COMMIT; outcome unknown");
    else
      code = result_err(slot->c, r, err, "COMMIT");
  } else if (strcmp(PQcmdStatus(r), "COMMIT") != 0) {
    /* The server turns COMMIT of a failed transaction into ROLLBACK. */
    code = tc_err_set(err, TC_EDB, "postgres: transaction was rolled back by the server");
  }
  PQclear(r);
  release(tx->st->be, slot);
  return code;
}

static void pg_rollback(struct tc_tx *tx) {
  struct pgc *slot = tx->conn;
  release(tx->st->be, slot); /* release rolls back an open transaction */
}

/* "... = ? AND x = ?" -> "... = $1 AND x = $2". store.c's SQL never has a
 * '?' inside a literal. Owned. */
static char *renumber(const char *sql) {
  struct tc_buf b = TC_BUF_INIT;
  int n = 0;
  for (const char *s = sql; *s; s++) {
    if (*s == '?')
      tc_buf_printf(&b, "$%d", ++n);
    else
      tc_buf_putc(&b, *s);
  }
  return tc_buf_steal(&b, NULL);
}

static int pg_exec(struct tc_tx *tx, const char *sql, const struct db_param *p, int np,
                   struct db_result *res, struct tc_err *err) {
  struct pgc *slot = tx->conn;
  char *q = renumber(sql);
  const char **vals = tc_xcalloc((size_t)(np > 0 ? np : 1), sizeof *vals);
  char (*nums)[24] = tc_xcalloc((size_t)(np > 0 ? np : 1), sizeof *nums);
  for (int i = 0; i < np; i++) {
    switch (p[i].type) {
    case DBP_INT:
      snprintf(nums[i], sizeof nums[i], "%lld", (long long)p[i].i);
      vals[i] = nums[i];
      break;
    case DBP_BOOL: vals[i] = p[i].i ? "true" : "false"; break;
    case DBP_TEXT: vals[i] = p[i].s; break;
    default: vals[i] = NULL; break;
    }
  }
  int code = 0;
  PGresult *r = PQexecParams(slot->c, q, np, NULL, vals, NULL, NULL, 0);
  ExecStatusType status = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    code = result_err(slot->c, r, err, "statement");
    goto out;
  }
  if (res) {
    memset(res, 0, sizeof *res);
    res->nrows = status == PGRES_TUPLES_OK ? PQntuples(r) : 0;
    res->ncols = PQnfields(r);
    if (res->nrows > 0 && res->ncols > 0) {
      res->cells = tc_xcalloc((size_t)res->nrows * (size_t)res->ncols, sizeof *res->cells);
      for (int i = 0; i < res->nrows; i++)
        for (int c = 0; c < res->ncols; c++)
          res->cells[(size_t)i * (size_t)res->ncols + (size_t)c] =
              PQgetisnull(r, i, c) ? NULL : tc_xstrndup(PQgetvalue(r, i, c), (size_t)PQgetlength(r, i, c));
    }
    const char *t = PQcmdTuples(r);
    res->changes = t && *t ? strtoll(t, NULL, 10) : 0;
  }
out:
  PQclear(r);
  free(nums);
  free(vals);
  free(q);
  return code;
}

static int pg_script(struct tc_tx *tx, const char *sql, struct tc_err *err) {
  struct pgc *slot = tx->conn;
  PGresult *r = PQexec(slot->c, sql);
  int code = 0;
  if (!r || (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK))
    code = result_err(slot->c, r, err, "migration");
  PQclear(r);
  return code;
}

static int pg_ping(struct tc_store *st, struct tc_err *err) {
  struct pgpool *p = st->be;
  struct pgc *slot;
  int code = acquire(p, &slot, err);
  if (code) return code;
  for (int attempt = 0;; attempt++) {
    PGresult *r = PQexec(slot->c, "SELECT 1");
    if (r && PQresultStatus(r) == PGRES_TUPLES_OK) {
      PQclear(r);
      code = 0;
      break;
    }
    bool lost = conn_lost(slot->c, r);
    code = result_err(slot->c, r, err, "ping");
    PQclear(r);
    if (!(lost && attempt == 0)) break;
    PQreset(slot->c);
  }
  release(p, slot);
  return code;
}

const struct backend_ops tc_pg_ops = {
    .open = pg_open,
    .close = pg_close,
    .begin = pg_begin,
    .commit = pg_commit,
    .rollback = pg_rollback,
    .exec = pg_exec,
    .script = pg_script,
    .ping = pg_ping,
};
