/* api: the REST API /api/v1 (Headscale-compatible shapes: int64 ids as
 * strings, camelCase fields, RFC 3339 times, every field emitted, errors as
 * {"code","message","details"}), plus GET /health. Handlers read snapshots
 * and write through the model only, passing an actor: "cli" for trusted
 * requests (local unix socket, or in-process from the CLI), "api:<prefix>"
 * for requests authenticated by an API key (Authorization: Bearer).
 *
 * The one exception to "model only" is /health, which pings storage
 * (tc_store_ping) because the model has no database round trip of its own.
 *
 * Threads: tc_api_register/tc_api_free on the controlling thread; handlers
 * run on any thread (the model is thread-safe). */
#ifndef TC_HTTP_API_H
#define TC_HTTP_API_H

#include <stdbool.h>

#include "base/base.h"
#include "http/http.h"

struct tc_model;
struct tc_store;
struct tc_api;

struct tc_api_opts {
  struct tc_model *model; /* borrowed, required */
  struct tc_store *store; /* borrowed; for /health only; NULL = report pass */
  bool policy_file_mode;  /* policy.mode file: PUT is refused, GET reads the file */
  const char *policy_path; /* copied */
  bool metrics_hook;      /* add tailcoat_nodes/users/nodes_online to /metrics */
};

/* Registers every route on r. *out is owned (tc_api_free after the router
 * stops dispatching). 0 or TC_E* (route clash). */
int tc_api_register(struct tc_router *r, const struct tc_api_opts *opts, struct tc_api **out);
void tc_api_free(struct tc_api *api); /* NULL ok */

/* Policy validation with the policy module (parse + validate); suitable as
 * tc_model_config.policy_validate. ctx unused. */
int tc_api_policy_validate(void *ctx, const char *text, size_t len, struct tc_err *err);

/* Key text as the API prints it: "mkey:<hex>", "nodekey:<hex>",
 * "discokey:<hex>". out >= 80 bytes. */
void tc_api_key_text(const char *kind, const uint8_t key[32], char out[80]);

#endif
