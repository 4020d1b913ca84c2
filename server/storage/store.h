/* storage: persistence of the records in model/types.h, behind one interface
 * with two backends — SQLite (embedded default) and PostgreSQL (libpq).
 * Storage knows SQL and nothing else: it enforces only what the schema
 * enforces (unique columns, foreign keys, the atomic "consume a single-use
 * key" update) and no business rules. The model is its only caller.
 *
 * Threads: a struct tc_store may be used from any number of threads. Each
 * struct tc_tx belongs to the thread that began it until commit/rollback.
 *   - SQLite: one connection; a transaction holds the store's mutex from
 *     begin to commit/rollback, so transactions are serialised in-process;
 *     other processes are handled by BEGIN IMMEDIATE and busy_timeout.
 *   - PostgreSQL: a pool of up to pg_max_conns connections; a transaction
 *     holds one connection. begin blocks while all connections are busy.
 *     A broken connection is reset; if nothing of the transaction had been
 *     sent yet, begin retries once, otherwise the operation fails TC_EAGAIN.
 *
 * Errors (negative TC_E* codes, with a readable message in err):
 *   TC_EEXIST    a unique column already holds the value (message names it)
 *   TC_ENOENT    no such row
 *   TC_ECONFLICT a foreign key forbids the change (e.g. deleting a user who
 *                still owns nodes or keys), or a single-use key was already
 *                consumed
 *   TC_EAGAIN    transient (lost connection, SQLite busy_timeout elapsed,
 *                no free pool connection); retry the whole transaction
 *   TC_EINVAL    a required field missing, or text that is not UTF-8
 *   TC_ESCHEMA   the database schema is newer than this binary
 *   TC_EDB       anything else from the database
 * After an error the database itself raised (TC_EEXIST, a foreign-key
 * TC_ECONFLICT, TC_EAGAIN, TC_EDB) the transaction is failed: further calls
 * return TC_EDB and commit fails; roll it back. This is PostgreSQL's rule,
 * applied to SQLite too so both behave the same. TC_ENOENT from a get/update/
 * delete and TC_ECONFLICT from tc_store_preauth_consume leave it usable.
 *
 * Ownership: get/list functions fill caller-provided records whose insides
 * become owned by the caller (free with tc_*_free from model/types.h, or the
 * tc_store_free_* array helpers below). Input records are borrowed. */
#ifndef TC_STORAGE_STORE_H
#define TC_STORAGE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"
#include "model/types.h"

enum tc_db_type {
  TC_DB_SQLITE = 1,
  TC_DB_POSTGRES = 2,
};

struct tc_store_config {
  int type; /* TC_DB_SQLITE or TC_DB_POSTGRES */
  /* SQLite */
  const char *sqlite_path; /* file path; created 0600 if missing; ":memory:" ok */
  bool sqlite_wal;         /* journal_mode=WAL (synchronous=NORMAL unless durable tx) */
  int busy_timeout_ms;     /* 0 = 5000 */
  /* PostgreSQL */
  const char *pg_conninfo; /* libpq URL or key=value string; multi-host allowed
                              ("host=/a,/b port=5432,5432") */
  int pg_max_conns;        /* pool size; 0 = 4 */
  int pg_acquire_timeout_ms; /* how long begin waits for a free connection; 0 = 30000 */
  /* Test hook: stop migrating at this schema version (0 = latest). */
  int migrate_to;
};

struct tc_store;
struct tc_tx;

/* Opens the database, applies pending migrations inside a transaction and
 * returns an owned store. A schema newer than tc_store_latest_version()
 * is refused with TC_ESCHEMA. cfg strings are copied. */
int tc_store_open(const struct tc_store_config *cfg, struct tc_store **out, struct tc_err *err);
/* Closes all connections. NULL ok. No transaction may be open. */
void tc_store_close(struct tc_store *st);
/* Round trip to the database (SELECT 1). */
int tc_store_ping(struct tc_store *st, struct tc_err *err);
/* Schema version of the open database (as migrated at open). */
int tc_store_schema_version(struct tc_store *st);
/* Highest schema version this binary knows. */
int tc_store_latest_version(void);
/* TC_DB_SQLITE or TC_DB_POSTGRES. */
int tc_store_type(const struct tc_store *st);

/* ---- transactions --------------------------------------------------------- */
/* TC_TX_DURABLE: the commit is on stable storage before tc_tx_commit returns
 * (SQLite synchronous=FULL for this transaction; PostgreSQL
 * synchronous_commit=on). Use for writes that consume keys or revoke access.
 * Without it, SQLite in WAL mode commits with synchronous=NORMAL and
 * PostgreSQL with synchronous_commit=off (a crash of the machine may lose the
 * last commits, never half of one). */
#define TC_TX_DURABLE 0x1u
/* TC_TX_READONLY: only gets and lists (anything else fails TC_EINVAL and
 * leaves the transaction usable); all reads see one consistent snapshot and
 * do not take the write lock (SQLite BEGIN DEFERRED, PostgreSQL REPEATABLE
 * READ READ ONLY), so readers in other processes do not hold up writers. */
#define TC_TX_READONLY 0x2u

/* TC_TX_DURABLE_LATER: durable, but made so by tc_store_sync() instead of
 * inside the commit, so that concurrent durable transactions share one flush
 * (group commit). tc_tx_commit_ticket() returns the ticket to wait for. Right
 * after the commit the data is visible to later transactions of this store;
 * it is stored once tc_store_sync(ticket) has returned 0, and the caller
 * must not acknowledge it as stored before that. (SQLite in WAL mode also
 * shares the SQLite commit itself among such transactions: until the sync,
 * or another kind of transaction, commits it, other processes do not see it
 * and a crash of the process loses it. PostgreSQL and SQLite without WAL
 * make every such commit durable at once: the ticket is 0.) */
#define TC_TX_DURABLE_LATER 0x4u

/* Begins a transaction; *out is owned until commit/rollback. A thread must
 * not begin a second transaction while it holds one (SQLite: it would wait
 * for itself; PostgreSQL: it would hold two pool connections). Text values
 * must be valid UTF-8 (else TC_EINVAL, and the transaction stays usable). */
int tc_store_begin(struct tc_store *st, unsigned flags, struct tc_tx **out, struct tc_err *err);
/* Commits and frees tx, also on failure (then nothing was committed). */
int tc_tx_commit(struct tc_tx *tx, struct tc_err *err);
/* Commits like tc_tx_commit; for TC_TX_DURABLE_LATER transactions *ticket
 * gets what to pass to tc_store_sync (0: nothing to wait for; also for every
 * other kind of transaction). With ticket NULL a TC_TX_DURABLE_LATER commit
 * is synced before returning. */
int tc_tx_commit_ticket(struct tc_tx *tx, uint64_t *ticket, struct tc_err *err);
/* Returns once every commit up to ticket is on stable storage. Concurrent
 * callers share flushes: one caller flushes everything committed so far
 * while the others wait for it. 0 at once for ticket 0 or an already synced
 * ticket; TC_EDB when the flush fails (then nothing is known to be durable).
 * Any thread; must not be called while holding a transaction. */
int tc_store_sync(struct tc_store *st, uint64_t ticket, struct tc_err *err);
/* Flushes done by tc_store_sync since open (for statistics). */
uint64_t tc_store_syncs(const struct tc_store *st);
/* Rolls back and frees tx. NULL ok. */
void tc_tx_rollback(struct tc_tx *tx);

/* ---- users ------------------------------------------------------------------ */
/* Ids: the id of a committed row is never handed out again, even after the
 * row is deleted. (An id seen only inside a rolled-back transaction may be.) */

/* Inserts u; fills u->id, and u->created_at/updated_at when 0 (tc_now()). */
int tc_store_user_insert(struct tc_tx *tx, struct tc_user *u, struct tc_err *err);
/* Rewrites every column of row u->id; sets u->updated_at = tc_now(). */
int tc_store_user_update(struct tc_tx *tx, struct tc_user *u, struct tc_err *err);
/* TC_ENOENT if missing, TC_ECONFLICT if nodes or keys still reference it. */
int tc_store_user_delete(struct tc_tx *tx, int64_t id, struct tc_err *err);
/* Fills *out (owned insides). */
int tc_store_user_get(struct tc_tx *tx, int64_t id, struct tc_user *out, struct tc_err *err);
int tc_store_user_get_by_name(struct tc_tx *tx, const char *name, struct tc_user *out,
                              struct tc_err *err);
/* The user whose provider_id (OIDC subject) equals provider_id. */
int tc_store_user_get_by_provider_id(struct tc_tx *tx, const char *provider_id,
                                     struct tc_user *out, struct tc_err *err);
/* All users ordered by id; *out owned array (tc_store_free_users). */
int tc_store_user_list(struct tc_tx *tx, struct tc_user **out, size_t *n, struct tc_err *err);

/* ---- nodes ------------------------------------------------------------------ */
/* Inserts n; fills n->id and created_at/updated_at when 0. user_id 0 and
 * auth_key_id 0 are stored as NULL; has_ipv4/has_ipv6 false as NULL. */
int tc_store_node_insert(struct tc_tx *tx, struct tc_node *n, struct tc_err *err);
/* Rewrites every column of row n->id; sets n->updated_at = tc_now(). */
int tc_store_node_update(struct tc_tx *tx, struct tc_node *n, struct tc_err *err);
/* Rewrites only what a client's map requests change -- hostname, hostinfo,
 * endpoints, disco key, home DERP, capability version, announced and
 * approved routes, last seen (a new disco key moves it) -- and sets
 * n->updated_at = tc_now(). No index covers
 * these columns, so SQLite rewrites the row's page and nothing else (a full
 * tc_store_node_update rewrites every index entry: 8 WAL pages instead of
 * 1). The other fields of n are not written: use tc_store_node_update when
 * any of them changed. */
int tc_store_node_update_client(struct tc_tx *tx, struct tc_node *n, struct tc_err *err);
/* Sets only last_seen (hot path: map streams opening/closing). */
int tc_store_node_touch(struct tc_tx *tx, int64_t id, int64_t last_seen, struct tc_err *err);
int tc_store_node_delete(struct tc_tx *tx, int64_t id, struct tc_err *err);
int tc_store_node_get(struct tc_tx *tx, int64_t id, struct tc_node *out, struct tc_err *err);
int tc_store_node_get_by_node_key(struct tc_tx *tx, const uint8_t key[TC_KEY_LEN],
                                  struct tc_node *out, struct tc_err *err);
int tc_store_node_get_by_machine_key(struct tc_tx *tx, const uint8_t key[TC_KEY_LEN],
                                     struct tc_node *out, struct tc_err *err);
/* All nodes ordered by id; owned array (tc_store_free_nodes). */
int tc_store_node_list(struct tc_tx *tx, struct tc_node **out, size_t *n, struct tc_err *err);

/* ---- pre-auth keys ---------------------------------------------------------- */
/* Inserts k (prefix unique); fills k->id and created_at when 0. */
int tc_store_preauth_insert(struct tc_tx *tx, struct tc_preauth_key *k, struct tc_err *err);
int tc_store_preauth_get(struct tc_tx *tx, int64_t id, struct tc_preauth_key *out,
                         struct tc_err *err);
int tc_store_preauth_get_by_prefix(struct tc_tx *tx, const char *prefix,
                                   struct tc_preauth_key *out, struct tc_err *err);
/* Keys ordered by id; user_id < 0 lists all, 0 lists keys without a user,
 * > 0 one user's keys. Owned array (tc_store_free_preauth_keys). */
int tc_store_preauth_list(struct tc_tx *tx, int64_t user_id, struct tc_preauth_key **out,
                          size_t *n, struct tc_err *err);
/* Sets expiration = at. */
int tc_store_preauth_expire(struct tc_tx *tx, int64_t id, int64_t at, struct tc_err *err);
/* Marks key id used. For a single-use key this is one conditional UPDATE
 * (... WHERE used = false), atomic across connections and processes:
 * TC_ECONFLICT if it had been used already, TC_ENOENT if there is no such
 * key. A reusable key is simply marked used. Does not check expiry. */
int tc_store_preauth_consume(struct tc_tx *tx, int64_t id, struct tc_err *err);
/* Nodes registered with the key keep their row; their auth_key_id becomes 0. */
int tc_store_preauth_delete(struct tc_tx *tx, int64_t id, struct tc_err *err);

/* ---- API keys --------------------------------------------------------------- */
int tc_store_apikey_insert(struct tc_tx *tx, struct tc_api_key *k, struct tc_err *err);
int tc_store_apikey_get_by_prefix(struct tc_tx *tx, const char *prefix, struct tc_api_key *out,
                                  struct tc_err *err);
/* Ordered by id; owned array (tc_store_free_api_keys). */
int tc_store_apikey_list(struct tc_tx *tx, struct tc_api_key **out, size_t *n,
                         struct tc_err *err);
int tc_store_apikey_expire(struct tc_tx *tx, int64_t id, int64_t at, struct tc_err *err);
int tc_store_apikey_touch(struct tc_tx *tx, int64_t id, int64_t last_seen, struct tc_err *err);
int tc_store_apikey_delete(struct tc_tx *tx, int64_t id, struct tc_err *err);

/* ---- policies (append-only history) ------------------------------------------ */
/* Inserts a new version; fills p->id and created_at when 0. */
int tc_store_policy_insert(struct tc_tx *tx, struct tc_policy_rec *p, struct tc_err *err);
/* The newest version; TC_ENOENT when none was ever stored. */
int tc_store_policy_latest(struct tc_tx *tx, struct tc_policy_rec *out, struct tc_err *err);
/* Newest first, at most limit (<= 0: all). Owned array (tc_store_free_policies). */
int tc_store_policy_list(struct tc_tx *tx, int limit, struct tc_policy_rec **out, size_t *n,
                         struct tc_err *err);

/* ---- audit log ---------------------------------------------------------------- */
/* Fills a->id, and a->at when 0. */
int tc_store_audit_insert(struct tc_tx *tx, struct tc_audit *a, struct tc_err *err);
/* Newest first, at most limit (<= 0: all). Owned array (tc_store_free_audits). */
int tc_store_audit_list(struct tc_tx *tx, int limit, struct tc_audit **out, size_t *n,
                        struct tc_err *err);

/* ---- bulk load -------------------------------------------------------------------- */
/* Everything the model needs at startup, read in one consistent transaction. */
struct tc_store_data {
  struct tc_user *users;
  size_t n_users;
  struct tc_node *nodes;
  size_t n_nodes;
  struct tc_preauth_key *preauth_keys;
  size_t n_preauth_keys;
  struct tc_api_key *api_keys;
  size_t n_api_keys;
  bool has_policy;
  struct tc_policy_rec policy; /* latest, valid when has_policy */
};
/* Fills *out (owned; release with tc_store_data_free). */
int tc_store_load_all(struct tc_store *st, struct tc_store_data *out, struct tc_err *err);
/* Frees the insides of d; NULL ok. */
void tc_store_data_free(struct tc_store_data *d);

/* Array helpers: free each element's insides, then the array. NULL ok. */
void tc_store_free_users(struct tc_user *v, size_t n);
void tc_store_free_nodes(struct tc_node *v, size_t n);
void tc_store_free_preauth_keys(struct tc_preauth_key *v, size_t n);
void tc_store_free_api_keys(struct tc_api_key *v, size_t n);
void tc_store_free_policies(struct tc_policy_rec *v, size_t n);
void tc_store_free_audits(struct tc_audit *v, size_t n);

#endif
