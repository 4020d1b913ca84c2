/* sqlite: the embedded backend. One connection, guarded by a mutex that a
 * transaction holds from begin to commit/rollback, so in-process
 * transactions are serialised and never see SQLITE_BUSY from each other.
 * Other processes (the CLI, a second server by mistake) are handled by
 * BEGIN IMMEDIATE (take the write lock up front: no deadlocking upgrades)
 * and busy_timeout. Prepared statements are cached per SQL text pointer;
 * the transaction-control statements (BEGIN, COMMIT, the synchronous
 * switch of durable transactions) are prepared once at open: parsing them
 * for every write was ~10 % of a registration's storage CPU.
 *
 * Group commit (TC_TX_DURABLE_LATER, WAL mode): such a transaction commits
 * with synchronous=NORMAL (the WAL frames are written, not flushed) and gets
 * a ticket, the number of its commit. sq_sync flushes the WAL file once
 * (fdatasync on our own descriptor of it) for every commit up to the newest,
 * so N concurrent durable writers pay one flush instead of N flushes in a
 * row under the connection mutex. The WAL file is what synchronous=FULL
 * would flush at each commit; checkpoints flush the database file before the
 * WAL is reused, as in NORMAL mode.
 *
 * Such transactions also share their SQLite commit (a batch): the first
 * opens an outer write transaction, each runs inside it as a savepoint and
 * "commits" by releasing that savepoint, and the flushing thread commits
 * the batch just before its fdatasync, so everything that arrived while the
 * previous flush ran is written in one commit. A commit writes every page
 * it changed to the WAL (a registration changed ~9 pages: the node row,
 * five index entries, the audit row, the sequence table), and consecutive
 * registrations share most of those pages; each savepoint still rolls back
 * alone. Until the batch commits, its data is visible to this connection
 * only and would not survive a crash of the process, which is fine for
 * what tc_store_sync has not confirmed yet. Any other transaction first
 * commits an open batch. If a batch commit fails (disk full, I/O error),
 * writes the caller was told were committed are gone while the model keeps
 * them in memory: the store then refuses every later transaction (and
 * ping), so the server reports unhealthy and a restart reloads the model
 * from what the database has. */
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "storage/store_int.h"

#define STMT_CACHE 128

enum {
  TXS_BEGIN_IMM, TXS_BEGIN_DEF, TXS_COMMIT, TXS_ROLLBACK, TXS_SYNC_FULL, TXS_SYNC_NORMAL,
  TXS_SAVEPOINT, TXS_RELEASE, TXS_ROLLBACK_TO, TXS_N
};
static const char *const txs_sql[TXS_N] = {"BEGIN IMMEDIATE", "BEGIN DEFERRED", "COMMIT", "ROLLBACK",
                                           "PRAGMA synchronous=FULL", "PRAGMA synchronous=NORMAL",
                                           "SAVEPOINT tc_batched", "RELEASE tc_batched",
                                           "ROLLBACK TO tc_batched"};

/* A transaction that runs as a savepoint of the open batch. */
#define TX_BATCHED 0x400u

struct sq;
static int batch_commit(struct sq *s, struct tc_err *err);

struct sq {
  sqlite3 *db;
  pthread_mutex_t mu;
  bool wal;
  sqlite3_stmt *txs[TXS_N]; /* prepared transaction control */
  /* group commit */
  char *wal_path;             /* "<db>-wal"; NULL for :memory: */
  _Atomic uint64_t committed; /* write commits so far (under mu) */
  _Atomic uint64_t synced;    /* commits known to be on stable storage */
  pthread_mutex_t gmu;        /* guards syncing, wal_fd */
  pthread_cond_t gcv;
  bool syncing;
  int wal_fd;
  /* batched commits (under mu) */
  bool batch_open;        /* the outer transaction of a batch is open; nothing
                           * else commits meanwhile, so its commit will be
                           * number committed + 1 */
  uint64_t batch_members; /* savepoints released into it */
  bool broken;           /* a batch commit failed: refuse everything */
  char broken_msg[640];
  struct {
    const char *sql; /* static SQL text from store.c: the pointer is the key */
    sqlite3_stmt *stmt;
  } cache[STMT_CACHE];
};

static int sq_err(sqlite3 *db, int rc, struct tc_err *err, const char *what) {
  int xrc = sqlite3_extended_errcode(db);
  const char *msg = sqlite3_errmsg(db);
  if (xrc == SQLITE_CONSTRAINT_UNIQUE || xrc == SQLITE_CONSTRAINT_PRIMARYKEY) {
    /* "UNIQUE constraint failed: users.name" */
    const char *f = strstr(msg, "failed: ");
    return tc_err_set(err, TC_EEXIST, "%s already exists (unique)", f ? f + 8 : msg);
  }
  if (xrc == SQLITE_CONSTRAINT_FOREIGNKEY)
    return tc_err_set(err, TC_ECONFLICT, "foreign key constraint failed");
  if (xrc == SQLITE_CONSTRAINT_NOTNULL) return tc_err_set(err, TC_EINVAL, "%s", msg);
  if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED)
    return tc_err_set(err, TC_EAGAIN, "sqlite: %s: database is locked (%s)", what, msg);
  return tc_err_set(err, TC_EDB, "sqlite: %s: %s", what, msg);
}

static int sq_simple(sqlite3 *db, const char *sql, struct tc_err *err) {
  char *em = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &em);
  if (rc != SQLITE_OK) {
    int code = sq_err(db, rc, err, sql);
    sqlite3_free(em);
    return code;
  }
  return 0;
}

/* Runs one of the prepared transaction-control statements. */
static int sq_txs(struct sq *s, int which, struct tc_err *err) {
  sqlite3_stmt *stmt = s->txs[which];
  int rc = sqlite3_step(stmt);
  sqlite3_reset(stmt);
  if (rc == SQLITE_DONE || rc == SQLITE_ROW) return 0;
  return sq_err(s->db, rc, err, txs_sql[which]);
}

static int sq_open(struct tc_store *st, struct tc_err *err) {
  const struct tc_store_config *cfg = &st->cfg;
  if (!cfg->sqlite_path || !*cfg->sqlite_path)
    return tc_err_set(err, TC_EINVAL, "sqlite: no database path configured");
  /* The database holds key hashes and the audit trail: create it private
   * (SQLite gives its -wal/-shm files the database file's mode). */
  if (strcmp(cfg->sqlite_path, ":memory:") != 0) {
    int fd = open(cfg->sqlite_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
      return tc_err_set(err, TC_EDB, "sqlite: open %s: %s", cfg->sqlite_path, strerror(errno));
    close(fd);
  }
  struct sq *s = tc_xcalloc(1, sizeof *s);
  pthread_mutex_init(&s->mu, NULL);
  pthread_mutex_init(&s->gmu, NULL);
  pthread_cond_init(&s->gcv, NULL);
  s->wal_fd = -1;
  if (cfg->sqlite_wal && strcmp(cfg->sqlite_path, ":memory:") != 0)
    s->wal_path = tc_xasprintf("%s-wal", cfg->sqlite_path);
  s->wal = cfg->sqlite_wal;
  int rc = sqlite3_open_v2(cfg->sqlite_path, &s->db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, NULL);
  int code = 0;
  if (rc != SQLITE_OK) {
    code = tc_err_set(err, TC_EDB, "sqlite: open %s: %s", cfg->sqlite_path,
                      s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
    goto out;
  }
  sqlite3_extended_result_codes(s->db, 1);
  sqlite3_busy_timeout(s->db, cfg->busy_timeout_ms > 0 ? cfg->busy_timeout_ms : 5000);
  if ((code = sq_simple(s->db, "PRAGMA foreign_keys=ON", err))) goto out;
  /* The model holds everything in memory; the database is written, and read
   * at start. SQLite's default 2 MiB page cache filled up with the node
   * tables (~0.8 KiB per node), where 512 KiB made no difference to the
   * registration benchmark's CPU (missing pages come from the OS cache). */
  if ((code = sq_simple(s->db, "PRAGMA cache_size=-512", err))) goto out;
  if (s->wal) {
    if ((code = sq_simple(s->db, "PRAGMA journal_mode=WAL", err))) goto out;
    /* NORMAL under WAL: a commit survives a process crash; durable
     * transactions switch to FULL for themselves. */
    if ((code = sq_simple(s->db, "PRAGMA synchronous=NORMAL", err))) goto out;
  } else {
    if ((code = sq_simple(s->db, "PRAGMA synchronous=FULL", err))) goto out;
  }
  for (int i = 0; i < TXS_N; i++) {
    rc = sqlite3_prepare_v3(s->db, txs_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->txs[i], NULL);
    if (rc != SQLITE_OK) {
      code = sq_err(s->db, rc, err, "prepare");
      goto out;
    }
  }
  st->be = s;
  return 0;
out:
  for (int i = 0; i < TXS_N; i++) sqlite3_finalize(s->txs[i]);
  sqlite3_close(s->db);
  pthread_mutex_destroy(&s->mu);
  pthread_mutex_destroy(&s->gmu);
  pthread_cond_destroy(&s->gcv);
  free(s->wal_path);
  free(s);
  return code;
}

static void sq_close(struct tc_store *st) {
  struct sq *s = st->be;
  if (!s) return;
  pthread_mutex_lock(&s->mu);
  batch_commit(s, NULL); /* nobody synced it, so nobody was told it is stored: best effort */
  pthread_mutex_unlock(&s->mu);
  for (int i = 0; i < STMT_CACHE; i++) sqlite3_finalize(s->cache[i].stmt);
  for (int i = 0; i < TXS_N; i++) sqlite3_finalize(s->txs[i]);
  sqlite3_close(s->db);
  if (s->wal_fd >= 0) close(s->wal_fd);
  pthread_mutex_destroy(&s->mu);
  pthread_mutex_destroy(&s->gmu);
  pthread_cond_destroy(&s->gcv);
  free(s->wal_path);
  free(s);
  st->be = NULL;
}

/* Whether this transaction's commit must flush by itself (synchronous=FULL
 * for its duration): durable ones, unless the flush is left to sq_sync. */
static bool sync_at_commit(const struct sq *s, const struct tc_tx *tx) {
  if (!s->wal) return false; /* rollback journal: synchronous=FULL always */
  if (tx->flags & TC_TX_DURABLE) return true;
  return (tx->flags & TC_TX_DURABLE_LATER) && !s->wal_path;
}

static int broken_err(const struct sq *s, struct tc_err *err) {
  return tc_err_set(err, TC_EDB, "sqlite: %s; restart tailcoat to reload the state from the database",
                    s->broken_msg);
}

/* With mu held: from now on every transaction is refused. */
static void batch_break(struct sq *s, const char *why) {
  if (s->broken) return;
  s->broken = true;
  snprintf(s->broken_msg, sizeof s->broken_msg, "a batched commit failed (%s), committed writes are lost",
           why && *why ? why : "unknown error");
  tc_error("storage: %s", s->broken_msg);
}

/* With mu held: commits the open batch, if any. */
static int batch_commit(struct sq *s, struct tc_err *err) {
  if (!s->batch_open) return 0;
  s->batch_open = false;
  struct tc_err e = {0};
  if (sq_txs(s, TXS_COMMIT, &e)) {
    if (!sqlite3_get_autocommit(s->db)) sq_txs(s, TXS_ROLLBACK, NULL);
    batch_break(s, e.msg);
    return broken_err(s, err);
  }
  atomic_fetch_add(&s->committed, 1);
  return 0;
}

static bool batchable(const struct sq *s, const struct tc_tx *tx) {
  return s->wal && s->wal_path && (tx->flags & TC_TX_DURABLE_LATER) &&
         !(tx->flags & (TC_TX_DURABLE | TX_SNAPSHOT | TX_MIGRATE));
}

static int sq_begin(struct tc_store *st, struct tc_tx *tx, struct tc_err *err) {
  struct sq *s = st->be;
  pthread_mutex_lock(&s->mu);
  int code;
  if (s->broken) {
    code = broken_err(s, err);
    pthread_mutex_unlock(&s->mu);
    return code;
  }
  if (batchable(s, tx)) {
    if (!s->batch_open) {
      if ((code = sq_txs(s, TXS_BEGIN_IMM, err))) goto unlock;
      s->batch_open = true;
      s->batch_members = 0;
    }
    if ((code = sq_txs(s, TXS_SAVEPOINT, err))) goto unlock;
    tx->flags |= TX_BATCHED;
    tx->conn = s;
    return 0;
  }
  if ((code = batch_commit(s, err))) goto unlock;
  if (sync_at_commit(s, tx) && (code = sq_txs(s, TXS_SYNC_FULL, err))) goto fail;
  /* Reads may start deferred (a snapshot); everything else takes the write
   * lock now so two processes never deadlock upgrading read locks. */
  code = sq_txs(s, (tx->flags & TX_SNAPSHOT) ? TXS_BEGIN_DEF : TXS_BEGIN_IMM, err);
  if (code) goto fail;
  tx->conn = s;
  return 0;
fail:
  if (sync_at_commit(s, tx)) sq_txs(s, TXS_SYNC_NORMAL, NULL);
unlock:
  pthread_mutex_unlock(&s->mu);
  return code;
}

/* With mu held: undoes a batched transaction alone. If SQLite rolled back
 * the whole batch itself (it does on I/O errors and a full disk), what
 * earlier members released is gone too. */
static void batched_undo(struct sq *s) {
  if (sqlite3_get_autocommit(s->db)) {
    s->batch_open = false;
    if (s->batch_members) batch_break(s, "SQLite rolled the batch back");
    return;
  }
  sq_txs(s, TXS_ROLLBACK_TO, NULL);
  sq_txs(s, TXS_RELEASE, NULL);
}

static void sq_end(struct tc_tx *tx) {
  struct sq *s = tx->conn;
  if (sync_at_commit(s, tx)) sq_txs(s, TXS_SYNC_NORMAL, NULL);
  pthread_mutex_unlock(&s->mu);
}

static int sq_commit(struct tc_tx *tx, uint64_t *ticket, struct tc_err *err) {
  struct sq *s = tx->conn;
  *ticket = 0;
  int code;
  if (tx->flags & TX_BATCHED) {
    if ((code = sq_txs(s, TXS_RELEASE, err))) {
      batched_undo(s);
    } else {
      s->batch_members++;
      *ticket = atomic_load(&s->committed) + 1; /* the open batch's commit */
    }
    sq_end(tx);
    return code;
  }
  code = sq_txs(s, TXS_COMMIT, err);
  if (code && !sqlite3_get_autocommit(s->db)) sq_txs(s, TXS_ROLLBACK, NULL);
  if (!code && !(tx->flags & TX_SNAPSHOT)) {
    /* numbered after the WAL frames are written: a flush that starts later covers it */
    uint64_t n = atomic_fetch_add(&s->committed, 1) + 1;
    if (s->wal && s->wal_path && (tx->flags & TC_TX_DURABLE_LATER) && !sync_at_commit(s, tx)) *ticket = n;
  }
  sq_end(tx);
  return code;
}

/* fdatasync of the WAL file through our own descriptor, reopened when the
 * file was replaced (another process's last connection deletes it). Called
 * by one flushing thread at a time. */
static int wal_flush(struct sq *s, struct tc_err *err) {
  struct stat a, b;
  if (s->wal_fd >= 0 && (stat(s->wal_path, &a) || fstat(s->wal_fd, &b) || a.st_ino != b.st_ino || a.st_dev != b.st_dev)) {
    close(s->wal_fd);
    s->wal_fd = -1;
  }
  if (s->wal_fd < 0) s->wal_fd = open(s->wal_path, O_RDONLY | O_CLOEXEC);
  if (s->wal_fd < 0)
    /* No WAL file: its content was checkpointed into the database, which
     * the checkpoint flushed. */
    return errno == ENOENT ? 0 : tc_err_set(err, TC_EDB, "sqlite: open %s: %s", s->wal_path, strerror(errno));
  if (fdatasync(s->wal_fd) != 0) return tc_err_set(err, TC_EDB, "sqlite: fdatasync %s: %s", s->wal_path, strerror(errno));
  return 0;
}

static int sq_sync(struct tc_store *st, uint64_t ticket, struct tc_err *err) {
  struct sq *s = st->be;
  if (!s->wal_path || ticket <= atomic_load(&s->synced)) return 0;
  int code = 0;
  pthread_mutex_lock(&s->gmu);
  while (code == 0 && atomic_load(&s->synced) < ticket) {
    if (s->syncing) { /* a flush is running; it may not cover us: look again after it */
      pthread_cond_wait(&s->gcv, &s->gmu);
      continue;
    }
    s->syncing = true;
    pthread_mutex_unlock(&s->gmu);
    /* The batch holds whatever was released while the last flush ran. */
    pthread_mutex_lock(&s->mu);
    code = batch_commit(s, err);
    pthread_mutex_unlock(&s->mu);
    uint64_t target = atomic_load(&s->committed);
    if (!code) code = wal_flush(s, err);
    pthread_mutex_lock(&s->gmu);
    s->syncing = false;
    if (code == 0) {
      atomic_fetch_add(&st->syncs, 1);
      if (target > atomic_load(&s->synced)) atomic_store(&s->synced, target);
    }
    pthread_cond_broadcast(&s->gcv);
  }
  pthread_mutex_unlock(&s->gmu);
  return code;
}

static void sq_rollback(struct tc_tx *tx) {
  struct sq *s = tx->conn;
  if (tx->flags & TX_BATCHED)
    batched_undo(s);
  else if (!sqlite3_get_autocommit(s->db))
    sq_txs(s, TXS_ROLLBACK, NULL);
  sq_end(tx);
}

static sqlite3_stmt *sq_prepare(struct sq *s, const char *sql, struct tc_err *err, int *code) {
  size_t h = ((uintptr_t)sql >> 3) % STMT_CACHE;
  for (int i = 0; i < STMT_CACHE; i++) {
    size_t j = (h + (size_t)i) % STMT_CACHE;
    if (s->cache[j].sql == sql) return s->cache[j].stmt;
    if (!s->cache[j].sql) {
      sqlite3_stmt *stmt = NULL;
      int rc = sqlite3_prepare_v3(s->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, NULL);
      if (rc != SQLITE_OK) {
        *code = sq_err(s->db, rc, err, "prepare");
        return NULL;
      }
      s->cache[j].sql = sql;
      s->cache[j].stmt = stmt;
      return stmt;
    }
  }
  /* Cache full (cannot happen with store.c's fixed statement set): a
   * one-off statement would leak here, so refuse loudly instead. */
  *code = tc_err_set(err, TC_EINTERNAL, "sqlite: statement cache full");
  return NULL;
}

static int sq_exec(struct tc_tx *tx, const char *sql, const struct db_param *p, int np,
                   struct db_result *res, struct tc_err *err) {
  struct sq *s = tx->conn;
  int code = 0;
  sqlite3_stmt *stmt = sq_prepare(s, sql, err, &code);
  if (!stmt) return code;
  for (int i = 0; i < np; i++) {
    int rc;
    switch (p[i].type) {
    case DBP_INT: rc = sqlite3_bind_int64(stmt, i + 1, p[i].i); break;
    case DBP_BOOL: rc = sqlite3_bind_int(stmt, i + 1, p[i].i ? 1 : 0); break;
    case DBP_TEXT:
      rc = p[i].s ? sqlite3_bind_text(stmt, i + 1, p[i].s, -1, SQLITE_STATIC) : sqlite3_bind_null(stmt, i + 1);
      break;
    default: rc = sqlite3_bind_null(stmt, i + 1); break;
    }
    if (rc != SQLITE_OK) {
      code = sq_err(s->db, rc, err, "bind");
      goto out;
    }
  }
  int ncols = sqlite3_column_count(stmt);
  size_t cap = 0;
  if (res) {
    memset(res, 0, sizeof *res);
    res->ncols = ncols;
  }
  for (;;) {
    int rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE) break;
    if (rc != SQLITE_ROW) {
      code = sq_err(s->db, rc, err, "step");
      goto out;
    }
    if (!res) continue;
    if ((size_t)(res->nrows + 1) * (size_t)ncols > cap) {
      cap = cap ? cap * 2 : (size_t)ncols * 16;
      res->cells = tc_xrealloc(res->cells, cap * sizeof *res->cells);
    }
    for (int c = 0; c < ncols; c++) {
      const unsigned char *t = sqlite3_column_text(stmt, c);
      res->cells[(size_t)res->nrows * (size_t)ncols + (size_t)c] =
          t ? tc_xstrndup((const char *)t, (size_t)sqlite3_column_bytes(stmt, c)) : NULL;
    }
    res->nrows++;
  }
  if (res) res->changes = sqlite3_changes64(s->db);
out:
  if (code && res) db_result_free(res);
  sqlite3_reset(stmt);
  sqlite3_clear_bindings(stmt);
  return code;
}

static int sq_script(struct tc_tx *tx, const char *sql, struct tc_err *err) {
  struct sq *s = tx->conn;
  return sq_simple(s->db, sql, err);
}

static int sq_ping(struct tc_store *st, struct tc_err *err) {
  struct sq *s = st->be;
  pthread_mutex_lock(&s->mu);
  int code = s->broken ? broken_err(s, err) : sq_simple(s->db, "SELECT 1", err);
  pthread_mutex_unlock(&s->mu);
  return code;
}

const struct backend_ops tc_sqlite_ops = {
    .open = sq_open,
    .close = sq_close,
    .begin = sq_begin,
    .commit = sq_commit,
    .sync = sq_sync,
    .rollback = sq_rollback,
    .exec = sq_exec,
    .script = sq_script,
    .ping = sq_ping,
};
