/* serve: the server's lifecycle — config to running listeners, the
 * housekeeping tick, signals (SIGTERM/SIGINT stop, SIGHUP reloads) and an
 * orderly shutdown. The WIRING section below is where protocol modules
 * (/ts2021, /derp, TLS) are plugged into the front door.
 *
 * Threads: runs on the main thread, which blocks SIGINT/SIGTERM/SIGHUP
 * before any other thread starts (so every thread inherits the mask) and
 * then waits for them with sigtimedwait between ticks. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "cli/cli_int.h"
#include "config/config.h"
#include "crypto/crypto.h"
#include "http/api.h"
#include "http/http.h"
#include "http/metrics.h"
#include "mapper/mapper.h"
#include "model/model.h"
#include "proto/proto.h"

#define TICK_MS 5000
#define MAX_RELOADS 16

static pthread_mutex_t reload_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
  tc_reload_fn fn;
  void *ctx;
} reloads[MAX_RELOADS];
static int nreloads;

int tc_cli_on_reload(tc_reload_fn fn, void *ctx) {
  int rc = TC_OK;
  pthread_mutex_lock(&reload_mu);
  if (nreloads == MAX_RELOADS) rc = TC_ETOOBIG;
  else reloads[nreloads].fn = fn, reloads[nreloads].ctx = ctx, nreloads++;
  pthread_mutex_unlock(&reload_mu);
  return rc;
}

static void run_reloads(void) {
  pthread_mutex_lock(&reload_mu);
  int n = nreloads;
  typeof(reloads[0]) copy[MAX_RELOADS];
  memcpy(copy, reloads, sizeof copy);
  pthread_mutex_unlock(&reload_mu);
  for (int i = 0; i < n; i++) copy[i].fn(copy[i].ctx);
}

/* ---- policy file (policy.mode: file) ------------------------------------------------ */

struct policy_file {
  struct tc_model *model;
  const char *path;
};

/* Loads the policy file into the model when its text differs from the
 * model's current policy. 0 or TC_E* with err. */
static int policy_file_apply(struct policy_file *pf, struct tc_err *err) {
  if (!pf->path || !*pf->path) return TC_OK;
  char *text = NULL;
  size_t len = 0;
  int rc = tc_read_file(pf->path, 4u << 20, &text, &len, err);
  if (rc) return rc;
  struct tc_snapshot *s = tc_model_snapshot(pf->model);
  bool same = s->policy && s->policy_len == len && !memcmp(s->policy, text, len);
  tc_snapshot_release(s);
  if (!same) {
    rc = tc_model_policy_set(pf->model, "system", text, len, NULL, err);
    if (rc) tc_err_prefix(err, "policy file %s", pf->path);
    else tc_info("policy loaded from %s", pf->path);
  }
  free(text);
  return rc;
}

static void policy_file_reload(void *ctx) {
  struct tc_err err = {0};
  if (policy_file_apply(ctx, &err)) tc_error("reload: %s (keeping the previous policy)", err.msg);
}

/* ---- GET /key ----------------------------------------------------------------------------- */

struct key_ctx {
  uint8_t pub[32];
};

static void h_key(void *ctx, const struct tc_http_req *req, struct tc_http_resp *resp) {
  struct key_ctx *k = ctx;
  /* tc_ctl_key_response wants the raw query; rebuild it from the decoded
   * arguments (only "v" matters, a number). */
  const char *v = tc_http_query(req, "v");
  char query[64] = "";
  if (v && strlen(v) < 32) snprintf(query, sizeof query, "v=%s", v);
  int status = 500;
  char *body = NULL;
  tc_ctl_key_response(k->pub, query, &status, &body);
  const char *ct = status == 200 ? "application/json" : "text/plain; charset=utf-8";
  tc_http_resp_text(resp, status, ct, body ? body : "", body ? strlen(body) : 0);
  free(body);
}

/* ---- serve ---------------------------------------------------------------------------------- */

static void banner(const struct tc_config *cfg, int port) {
  const char *url = cfg->server_url;
  printf("tailcoat %s serving %s (listening on %s, port %d)\n", TC_VERSION, url, cfg->listen_addr, port);
  if (cfg->unix_socket && *cfg->unix_socket) printf("  local CLI socket: %s\n", cfg->unix_socket);
  if (cfg->metrics_listen_addr && *cfg->metrics_listen_addr)
    printf("  metrics: http://%s/metrics\n", cfg->metrics_listen_addr);
  printf("To add a first machine:\n"
         "  tailcoat users create alice\n"
         "  tailcoat preauthkeys create --user alice\n"
         "  tailscale up --login-server %s --authkey <KEY>\n",
         url);
  fflush(stdout);
}

int tc_cli_serve(const struct tc_config *cfg) {
  tc_log_set_level(cfg->log.level);
  tc_log_set_json(cfg->log.format == TC_LOG_FORMAT_JSON);
  for (size_t i = 0; i < cfg->warnings.n; i++) tc_warn("config: %s", cfg->warnings.v[i]);

  /* Block the lifecycle signals before any thread exists: every thread
   * inherits the mask and only this loop receives them. */
  signal(SIGPIPE, SIG_IGN);
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL);

  int status = 1;
  struct tc_err err = {0};
  struct tc_backend_settings settings;
  struct tc_backend *be = NULL;
  struct tc_frontdoor *fdr = NULL;
  struct tc_metrics_server *ms = NULL;
  struct tc_mapper *mapper = NULL;
  struct tc_ctl_server *ctl = NULL;
  struct tc_mapper_env env;
  memset(&env, 0, sizeof env);
  struct key_ctx keyctx;
  uint8_t noise_priv[32];
  memset(noise_priv, 0, sizeof noise_priv);

  tc_backend_settings_from_config(cfg, &settings);
  settings.metrics_hook = true;
  if (tc_backend_open(&settings, &be, &err)) {
    fprintf(stderr, "Error: %s\n", err.msg);
    goto out;
  }

  int kr = tc_keyfile_load_or_create(cfg->noise.private_key_path, noise_priv, &err);
  if (kr < 0) {
    fprintf(stderr, "Error: noise.private_key_path %s: %s\n", cfg->noise.private_key_path, err.msg);
    goto out;
  }
  if (kr == TC_KEYFILE_CREATED) tc_info("created Noise private key %s", cfg->noise.private_key_path);
  if (kr == TC_KEYFILE_INSECURE) tc_warn("%s", err.msg);
  tc_x25519_public(noise_priv, keyctx.pub);

  struct policy_file pf = {.model = be->model, .path = cfg->policy.path};
  if (cfg->policy.mode == TC_POLICY_MODE_FILE) {
    if (policy_file_apply(&pf, &err)) {
      fprintf(stderr, "Error: %s\n", err.msg);
      goto out;
    }
    tc_cli_on_reload(policy_file_reload, &pf);
  }

  struct tc_frontdoor_opts fo = {.listen_addr = cfg->listen_addr,
                                 .unix_socket = cfg->unix_socket,
                                 .unix_socket_mode = cfg->unix_socket_permission,
                                 .router = be->router};
  if (tc_frontdoor_new(&fo, &fdr, &err)) {
    fprintf(stderr, "Error: %s\n", err.msg);
    goto out;
  }
  tc_http_route(be->router, "GET", "/key", h_key, &keyctx);

  /* ======================= WIRING ==========================================
   * Protocol modules plug in here, before the front door starts. Stop them
   * in the shutdown block below (transport first, then its handlers), before
   * the model closes.
   *   - DERP: tc_derp_server_new(...), register "/derp" with tc_derp_upgrade,
   *     plain routes /derp/probe, /derp/latency-check via tc_http_route, and
   *     fill env.derp_json before tc_mapper_new;
   *   - TLS: tc_tls_new + tc_tls_add_listener delivering plaintext fds to
   *     tc_frontdoor_add_connection(fdr, fd, peer, len, true);
   *   - reload hooks: tc_cli_on_reload(fn, ctx) (e.g. TLS certificate). */

  /* Control protocol: /ts2021 (Noise + HTTP/2) -> mapper -> model. */
  tc_mapper_env_from_config(&env, cfg);
  struct tc_mapper_opts mo = {.model = be->model, .env = &env, .server_url = cfg->server_url};
  if (tc_mapper_new(&mo, &mapper, &err)) {
    fprintf(stderr, "Error: mapper: %s\n", err.msg);
    goto out;
  }
  if (tc_ctl_server_new(tc_mapper_handle, mapper, noise_priv, NULL, &ctl, &err)) {
    fprintf(stderr, "Error: control server: %s\n", err.msg);
    goto out;
  }
  if (tc_frontdoor_register_upgrade(fdr, "/ts2021", tc_ctl_upgrade, ctl)) {
    fprintf(stderr, "Error: could not register /ts2021\n");
    goto out;
  }
  /* ========================================================================= */
  if (cfg->tls_cert_path && *cfg->tls_cert_path)
    tc_warn("tls_cert_path is set but TLS is not wired into serve yet; serving plain HTTP");

  if (tc_frontdoor_start(fdr, &err)) {
    fprintf(stderr, "Error: %s\n", err.msg);
    goto out;
  }
  if (cfg->metrics_listen_addr && *cfg->metrics_listen_addr &&
      tc_metrics_server_start(cfg->metrics_listen_addr, &ms, &err)) {
    fprintf(stderr, "Error: metrics_listen_addr: %s\n", err.msg);
    goto out;
  }
  banner(cfg, tc_frontdoor_port(fdr));

  int64_t next_tick = tc_mono_ms() + TICK_MS;
  for (;;) {
    int64_t wait = next_tick - tc_mono_ms();
    if (wait < 0) wait = 0;
    struct timespec ts = {wait / 1000, (long)(wait % 1000) * 1000000L};
    siginfo_t si;
    int sig = sigtimedwait(&sigs, &si, &ts);
    if (sig == SIGINT || sig == SIGTERM) {
      tc_info("received %s, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
      break;
    }
    if (sig == SIGHUP) {
      tc_info("received SIGHUP, reloading");
      run_reloads();
    }
    if (tc_mono_ms() >= next_tick) {
      struct tc_err terr = {0};
      if (tc_model_tick(be->model, tc_now_ms(), &terr) < 0) tc_warn("tick: %s", terr.msg);
      next_tick = tc_mono_ms() + TICK_MS;
    }
  }
  status = 0;

out:
  /* Shutdown order: stop accepting, then protocol modules, then the model. */
  tc_metrics_server_stop(ms);
  tc_frontdoor_free(fdr);
  tc_ctl_server_stop(ctl);
  tc_mapper_free(mapper);
  tc_mapper_env_free(&env);
  pthread_mutex_lock(&reload_mu);
  nreloads = 0;
  pthread_mutex_unlock(&reload_mu);
  tc_backend_close(be);
  tc_backend_settings_free(&settings);
  tc_wipe(noise_priv, sizeof noise_priv);
  return status;
}
