/* store_int: what the storage files share and nothing outside storage sees —
 * the backend vtable, the store/transaction layouts, parameter and result
 * shapes. Record mapping (store.c) speaks only this interface, so SQLite and
 * PostgreSQL run exactly the same SQL text; placeholders are written "?" and
 * the PostgreSQL backend renumbers them to $n. */
#ifndef TC_STORAGE_STORE_INT_H
#define TC_STORAGE_STORE_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include "storage/store.h"

enum db_ptype { DBP_NULL, DBP_INT, DBP_TEXT, DBP_BOOL };

struct db_param {
  int type;
  int64_t i;     /* DBP_INT, DBP_BOOL */
  const char *s; /* DBP_TEXT (borrowed) */
};

/* A fully materialised result: every cell as text (NULL = SQL NULL). Both
 * backends deliver text, so decoding lives in one place (store.c). */
struct db_result {
  int nrows, ncols;
  char **cells;    /* nrows * ncols, owned */
  int64_t changes; /* rows affected by INSERT/UPDATE/DELETE */
};
void db_result_free(struct db_result *r);
static inline const char *db_cell(const struct db_result *r, int row, int col) {
  return r->cells[(size_t)row * (size_t)r->ncols + (size_t)col];
}

/* Internal begin flags beyond the public ones. */
#define TX_SNAPSHOT TC_TX_READONLY /* read-only, one consistent snapshot */
#define TX_MIGRATE 0x200u  /* schema migration: exclusive */

struct tc_tx {
  struct tc_store *st;
  void *conn; /* backend connection held for the transaction */
  unsigned flags;
  bool failed;
  int fail_code;
};

struct backend_ops {
  int (*open)(struct tc_store *st, struct tc_err *err);
  void (*close)(struct tc_store *st);
  int (*begin)(struct tc_store *st, struct tc_tx *tx, struct tc_err *err);
  /* *ticket: for TC_TX_DURABLE_LATER, what tc_store_sync waits for (0 if
   * the commit is durable already); 0 otherwise. */
  int (*commit)(struct tc_tx *tx, uint64_t *ticket, struct tc_err *err);
  /* Makes every commit up to ticket durable (NULL: all are at commit). */
  int (*sync)(struct tc_store *st, uint64_t ticket, struct tc_err *err);
  void (*rollback)(struct tc_tx *tx);
  /* One parameterised statement. res may be NULL when no rows are wanted.
   * Maps constraint errors to TC_EEXIST (message names table.column) and
   * TC_ECONFLICT (foreign key), lost connections to TC_EAGAIN. */
  int (*exec)(struct tc_tx *tx, const char *sql, const struct db_param *p, int np,
              struct db_result *res, struct tc_err *err);
  /* Several parameterless statements (migrations only: constant SQL). */
  int (*script)(struct tc_tx *tx, const char *sql, struct tc_err *err);
  int (*ping)(struct tc_store *st, struct tc_err *err);
};

struct tc_store {
  struct tc_store_config cfg; /* strings owned copies */
  const struct backend_ops *ops;
  void *be; /* backend state */
  int schema_version;
  _Atomic uint64_t syncs; /* flushes done by sync */
};

extern const struct backend_ops tc_sqlite_ops;
extern const struct backend_ops tc_pg_ops;

/* Migrations: constant SQL per version and backend. */
struct migration {
  int version;
  const char *sqlite;
  const char *pg;
};
extern const struct migration tc_migrations[];
extern const int tc_n_migrations;

/* "uq_users__name" -> "users.name" into out; used for unique-violation text. */
void tc_store_constraint_field(const char *constraint, char *out, size_t outlen);

#endif
