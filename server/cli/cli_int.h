/* cli internals shared by the files of server/cli. Not for other modules.
 *
 * settings.c turns a loaded struct tc_config into the neutral struct
 * tc_backend_settings and backend.c opens storage + model + API from it, so
 * the code that opens the stack does not depend on the config's layout
 * (tests and tools can fill the settings directly). */
#ifndef TC_CLI_INT_H
#define TC_CLI_INT_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/base.h"

struct tc_config;
struct tc_router;
struct tc_model;
struct tc_store;
struct tc_api;

/* What the store + model + API need, independent of config.h. */
struct tc_backend_settings {
  bool postgres;
  const char *sqlite_path;
  bool sqlite_wal;
  char *pg_conninfo; /* owned */
  int pg_max_conns;
  const char *prefix_v4; /* "" disables, NULL default */
  const char *prefix_v6;
  bool alloc_random;
  const char *base_domain;
  int64_t node_expiry_ms;
  int64_t ephemeral_timeout_ms;
  bool policy_file_mode;
  const char *policy_path;
  bool metrics_hook; /* register model gauges on /metrics */
};

/* The in-process stack: store, model, a router with the API on it. */
struct tc_backend {
  struct tc_store *store;
  struct tc_model *model;
  struct tc_router *router;
  struct tc_api *api;
};

/* Fills s from cfg (borrowing cfg's strings; pg_conninfo is owned). */
void tc_backend_settings_from_config(const struct tc_config *cfg, struct tc_backend_settings *s);
void tc_backend_settings_free(struct tc_backend_settings *s);
/* Opens storage (migrating), the model and the API router. Owned result. */
int tc_backend_open(const struct tc_backend_settings *s, struct tc_backend **out, struct tc_err *err);
void tc_backend_close(struct tc_backend *b); /* NULL ok */

/* ---- output ------------------------------------------------------------------ */
enum tc_out_fmt { TC_OUT_TABLE, TC_OUT_JSON, TC_OUT_YAML };

/* One table column: header, and how to get the cell from a row object. */
struct tc_col {
  const char *header;
  const char *field; /* member name; "a.b" for nested objects */
  int kind;          /* TC_COL_* */
};
enum { TC_COL_STR, TC_COL_BOOL, TC_COL_TIME, TC_COL_LIST };

/* Prints val (an object or array of objects) as a table with cols, or as
 * JSON / YAML. */
void tc_out_print(enum tc_out_fmt fmt, json_t *val, const struct tc_col *cols);
/* YAML text of a JSON value (block style), appended to out. */
void tc_out_yaml(json_t *val, struct tc_buf *out);

/* ---- serve --------------------------------------------------------------------- */
/* Runs the server until SIGTERM/SIGINT. Returns the exit status. */
int tc_cli_serve(const struct tc_config *cfg);

#endif
