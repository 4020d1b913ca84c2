/* backend: opens the in-process stack — storage, the model and a router
 * carrying the REST API — for `serve` and for CLI commands run without a
 * server. Called from the main thread only. */
#include <stdlib.h>
#include <string.h>

#include "cli/cli_int.h"
#include "http/api.h"
#include "http/http.h"
#include "model/model.h"
#include "storage/store.h"

int tc_backend_open(const struct tc_backend_settings *s, struct tc_backend **out, struct tc_err *err) {
  *out = NULL;
  struct tc_backend *b = tc_xcalloc(1, sizeof *b);
  int rc;
  struct tc_store_config sc = {0};
  sc.type = s->postgres ? TC_DB_POSTGRES : TC_DB_SQLITE;
  sc.sqlite_path = s->sqlite_path;
  sc.sqlite_wal = s->sqlite_wal;
  sc.pg_conninfo = s->pg_conninfo;
  sc.pg_max_conns = s->pg_max_conns;
  if ((rc = tc_store_open(&sc, &b->store, err))) {
    tc_err_prefix(err, "database");
    goto fail;
  }
  struct tc_model_config mc = {0};
  mc.prefix_v4 = s->prefix_v4;
  mc.prefix_v6 = s->prefix_v6;
  mc.allocation = s->alloc_random ? TC_MODEL_ALLOC_RANDOM : TC_MODEL_ALLOC_SEQUENTIAL;
  mc.base_domain = s->base_domain;
  mc.node_expiry_ms = s->node_expiry_ms;
  mc.ephemeral_timeout_ms = s->ephemeral_timeout_ms;
  mc.policy_validate = tc_api_policy_validate;
  if ((rc = tc_model_open(&mc, b->store, &b->model, err))) goto fail;
  b->router = tc_router_new();
  struct tc_api_opts ao = {.model = b->model, .store = b->store, .policy_file_mode = s->policy_file_mode,
                           .policy_path = s->policy_path, .metrics_hook = s->metrics_hook};
  if ((rc = tc_api_register(b->router, &ao, &b->api))) {
    tc_err_set(err, rc, "registering API routes: %s", tc_strerror(rc));
    goto fail;
  }
  *out = b;
  return TC_OK;
fail:
  tc_backend_close(b);
  return rc;
}

void tc_backend_close(struct tc_backend *b) {
  if (!b) return;
  tc_router_free(b->router);
  tc_api_free(b->api);
  tc_model_close(b->model);
  tc_store_close(b->store);
  free(b);
}
