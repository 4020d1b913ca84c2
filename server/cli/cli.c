/* cli: the `tailcoat` command line — Headscale's verbs over tailcoat's REST
 * API. While a server runs, commands go to its local unix socket (trusted,
 * like Headscale's local gRPC socket) so every change reaches the live
 * model; with no server, the same API handlers run in-process on a freshly
 * opened store + model (one code path either way). A remote server can be
 * used with cli.address + cli.api_key in the config.
 *
 * Single-threaded (the main thread), except `serve`. */
#include "cli/cli.h"

#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "cli/cli_int.h"
#include "config/config.h"
#include "http/api.h"
#include "http/http.h"

#ifndef TC_VERSION
#define TC_VERSION "0.0.0"
#endif

#define MAX_ARGS 64
#define RESP_MAX (64u << 20)

enum conn_mode { CONN_NONE, CONN_SOCKET, CONN_LOCAL, CONN_REMOTE };

struct cli {
  const char *config_arg;
  enum tc_out_fmt fmt;
  const char *cmd, *sub;
  int npos;
  const char *pos[MAX_ARGS];
  int nflags;
  struct {
    char name[32];
    const char *value;
  } flags[MAX_ARGS];
  struct tc_config cfg;
  bool cfg_loaded;
  enum conn_mode mode;
  struct tc_backend *local;
  struct tc_backend_settings settings;
};

/* ---- arguments ----------------------------------------------------------------------- */

static const char *const bool_flags[] = {"reusable", "ephemeral", "force", "help", "h", "all", NULL};

/* Every flag any command reads; anything else is a typo worth refusing
 * (an unknown flag would otherwise swallow the next argument). */
static const char *const known_flags[] = {
    "output", "o", "config", "c", "user", "u", "name", "n", "email", "e", "display-name", "d", "picture-url", "p",
    "identifier", "i", "id", "new-name", "r", "expiry", "tags", "t", "routes", "key", "k", "expiration", "prefix",
    "file", "f", "data-dir", "force", "reusable", "ephemeral", "help", "h", "all", "auth-id", "a", NULL};

static bool is_known_flag(const char *name) {
  for (int i = 0; known_flags[i]; i++)
    if (!strcmp(known_flags[i], name)) return true;
  return false;
}

static bool is_bool_flag(const char *name) {
  for (int i = 0; bool_flags[i]; i++)
    if (!strcmp(bool_flags[i], name)) return true;
  return false;
}

/* Last value of --long or -s (either may be NULL). */
static const char *flag(const struct cli *c, const char *lng, const char *shrt) {
  const char *v = NULL;
  for (int i = 0; i < c->nflags; i++)
    if ((lng && !strcmp(c->flags[i].name, lng)) || (shrt && !strcmp(c->flags[i].name, shrt))) v = c->flags[i].value;
  return v;
}

static bool flag_set(const struct cli *c, const char *lng, const char *shrt) {
  const char *v = flag(c, lng, shrt);
  return v && strcmp(v, "false") && strcmp(v, "0");
}

static int die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("Error: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return 1;
}

static int parse_args(struct cli *c, int argc, char **argv) {
  bool only_pos = false;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (only_pos || a[0] != '-' || !a[1]) {
      if (!c->cmd) c->cmd = a;
      else if (!c->sub && c->npos == 0 && strcmp(c->cmd, "serve") && strcmp(c->cmd, "version") &&
               strcmp(c->cmd, "health") && strcmp(c->cmd, "configtest"))
        c->sub = a;
      else if (c->npos < MAX_ARGS) c->pos[c->npos++] = a;
      else return die("too many arguments");
      continue;
    }
    if (!strcmp(a, "--")) {
      only_pos = true;
      continue;
    }
    const char *name = a + (a[1] == '-' ? 2 : 1);
    const char *eq = strchr(name, '=');
    size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    if (nlen >= sizeof c->flags[0].name) return die("unknown flag %s", a);
    char nm[32];
    memcpy(nm, name, nlen);
    nm[nlen] = 0;
    if (!is_known_flag(nm)) return die("unknown flag %s (see tailcoat help)", a);
    const char *value;
    if (eq) {
      value = eq + 1;
    } else if (is_bool_flag(nm)) {
      value = "true";
    } else if (i + 1 < argc && strncmp(argv[i + 1], "--", 2)) {
      value = argv[++i];
    } else {
      return die("flag %s needs a value", a);
    }
    if (!strcmp(nm, "c") || !strcmp(nm, "config")) {
      c->config_arg = value;
    } else if (c->nflags < MAX_ARGS) {
      memcpy(c->flags[c->nflags].name, nm, nlen + 1);
      c->flags[c->nflags].value = value;
      c->nflags++;
    } else {
      return die("too many flags");
    }
  }
  return 0;
}

static int parse_output_format(struct cli *c) {
  const char *o = flag(c, "output", "o");
  if (!o || !*o || !strcmp(o, "table")) c->fmt = TC_OUT_TABLE;
  else if (!strcmp(o, "json") || !strcmp(o, "json-line")) c->fmt = TC_OUT_JSON;
  else if (!strcmp(o, "yaml")) c->fmt = TC_OUT_YAML;
  else return die("unknown output format \"%s\" (want json, yaml or table)", o);
  return 0;
}

/* ---- configuration ------------------------------------------------------------------- */

static const char *config_path(const struct cli *c) {
  if (c->config_arg) return c->config_arg;
  const char *e = getenv("TAILCOAT_CONFIG");
  if (e && *e) return e;
  e = getenv("HEADSCALE_CONFIG");
  if (e && *e) return e;
  static const char *const cands[] = {"./config.yaml", "/etc/tailcoat/config.yaml", "/etc/headscale/config.yaml"};
  for (size_t i = 0; i < TC_ARRAY_LEN(cands); i++)
    if (!access(cands[i], R_OK)) return cands[i];
  return NULL;
}

static int load_config(struct cli *c) {
  if (c->cfg_loaded) return 0;
  const char *path = config_path(c);
  if (!path)
    return die("no config file: pass -c FILE, set TAILCOAT_CONFIG, or create ./config.yaml "
               "(`tailcoat config init -o config.yaml`)");
  struct tc_err err = {0};
  if (tc_config_load(path, &c->cfg, &err)) return die("config %s: %s", path, err.msg);
  c->cfg_loaded = true;
  return 0;
}

/* ---- transport -------------------------------------------------------------------------- */

static size_t on_body(char *p, size_t sz, size_t n, void *ud) {
  struct tc_buf *b = ud;
  if (b->len + sz * n > RESP_MAX) return 0;
  tc_buf_append(b, p, sz * n);
  return sz * n;
}

enum sock_state { SOCK_ABSENT, SOCK_ALIVE, SOCK_DENIED };

/* Probes the server's unix socket. Only a missing socket or a refused
 * connection (stale file) mean "no server": falling back to the database
 * while a server runs would change state behind the live model's back. */
static enum sock_state socket_probe(const char *path, int *err_out) {
  struct stat st;
  *err_out = 0;
  if (!path || !*path || stat(path, &st)) return SOCK_ABSENT;
  if (!S_ISSOCK(st.st_mode)) return SOCK_ABSENT;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return SOCK_ABSENT;
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  size_t pl = strlen(path);
  if (pl >= sizeof a.sun_path) {
    close(fd);
    return SOCK_ABSENT;
  }
  memcpy(a.sun_path, path, pl + 1);
  enum sock_state r = SOCK_ALIVE;
  if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
    *err_out = errno;
    r = errno == ECONNREFUSED || errno == ENOENT ? SOCK_ABSENT : SOCK_DENIED;
  }
  close(fd);
  return r;
}

static int choose_mode(struct cli *c) {
  if (c->mode != CONN_NONE) return 0;
  if (load_config(c)) return 1;
  if (c->cfg.cli.address && *c->cfg.cli.address) {
    c->mode = CONN_REMOTE;
    return 0;
  }
  int serr = 0;
  switch (socket_probe(c->cfg.unix_socket, &serr)) {
  case SOCK_ALIVE:
    c->mode = CONN_SOCKET;
    return 0;
  case SOCK_DENIED:
    return die("cannot reach the running server at %s: %s (check unix_socket_permission, or run as its user)",
               c->cfg.unix_socket, strerror(serr));
  case SOCK_ABSENT:
    break;
  }
  tc_backend_settings_from_config(&c->cfg, &c->settings);
  struct tc_err err = {0};
  if (tc_backend_open(&c->settings, &c->local, &err)) return die("%s", err.msg);
  c->mode = CONN_LOCAL;
  return 0;
}

/* Performs one HTTP exchange with curl; *status and body out. */
static int curl_call(struct cli *c, const char *method, const char *target, const char *body, int *status,
                     struct tc_buf *out) {
  CURL *h = curl_easy_init();
  if (!h) return die("could not initialise libcurl");
  char *url;
  struct curl_slist *hdrs = NULL;
  char *auth = NULL;
  if (c->mode == CONN_SOCKET) {
    url = tc_xasprintf("http://localhost%s", target);
    curl_easy_setopt(h, CURLOPT_UNIX_SOCKET_PATH, c->cfg.unix_socket);
  } else {
    const char *a = c->cfg.cli.address;
    bool has_scheme = tc_str_has_prefix(a, "http://") || tc_str_has_prefix(a, "https://");
    url = tc_xasprintf("%s%s%s", has_scheme ? "" : "https://", a, target);
    if (c->cfg.cli.insecure) {
      curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 0L);
      curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    const char *key = c->cfg.cli.api_key;
    const char *ek = getenv("TAILCOAT_CLI_API_KEY");
    if (ek && *ek) key = ek;
    if (key && *key) {
      auth = tc_xasprintf("Authorization: Bearer %s", key);
      hdrs = curl_slist_append(hdrs, auth);
    }
  }
  hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  long tmo = c->cfg.cli.timeout_ms > 0 ? (long)c->cfg.cli.timeout_ms : 30000L;
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, tmo);
  if (body) {
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
  }
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, out);
  CURLcode rc = curl_easy_perform(h);
  long code = 0;
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
  *status = (int)code;
  curl_easy_cleanup(h);
  curl_slist_free_all(hdrs);
  if (auth) tc_free_secret(auth, strlen(auth));
  int ret = 0;
  if (rc != CURLE_OK) ret = rc == CURLE_COULDNT_CONNECT ? -2 : die("%s %s: %s", method, url, curl_easy_strerror(rc));
  free(url);
  return ret;
}

/* Calls the API. body (borrowed) may be NULL. Returns the parsed response
 * object (owned) or NULL after printing an error. */
static json_t *call(struct cli *c, const char *method, const char *target, json_t *body) {
  if (choose_mode(c)) return NULL;
  char *btext = body ? json_dumps(body, JSON_COMPACT) : NULL;
  int status = 0;
  struct tc_buf out = TC_BUF_INIT;
  if (c->mode == CONN_LOCAL) {
    struct tc_http_resp resp = {0};
    tc_router_dispatch_raw(c->local->router, method, target, btext, btext ? strlen(btext) : 0, true, &resp);
    status = resp.status;
    tc_buf_append(&out, resp.body.data ? resp.body.data : "", resp.body.len);
    tc_http_resp_free(&resp);
  } else {
    int rc = curl_call(c, method, target, btext, &status, &out);
    if (rc == -2 && c->mode == CONN_SOCKET) {
      /* the server went away between the probe and the call */
      c->mode = CONN_NONE;
      c->cfg_loaded = true;
      tc_backend_settings_from_config(&c->cfg, &c->settings);
      struct tc_err err = {0};
      if (tc_backend_open(&c->settings, &c->local, &err)) {
        die("%s", err.msg);
        goto fail;
      }
      c->mode = CONN_LOCAL;
      free(btext);
      tc_buf_free(&out);
      return call(c, method, target, body);
    }
    if (rc) {
      if (rc == -2) die("could not connect to %s", c->cfg.cli.address);
      goto fail;
    }
  }
  json_error_t je;
  json_t *j = json_loadb(out.data ? out.data : "", out.len, JSON_DECODE_ANY, &je);
  if (status < 200 || status >= 300) {
    const char *msg = json_string_value(json_object_get(j, "message"));
    if (!msg) msg = json_string_value(json_object_get(j, "output"));
    die("%s", msg ? msg : out.len ? out.data : "request failed");
    if (!msg) fprintf(stderr, "(HTTP status %d)\n", status);
    json_decref(j);
    goto fail;
  }
  if (!j) {
    die("the server sent an unreadable response: %s", je.text);
    goto fail;
  }
  free(btext);
  tc_buf_free(&out);
  return j;
fail:
  free(btext);
  tc_buf_free(&out);
  return NULL;
}

/* Percent-encodes one path segment or query value. Owned. */
static char *enc(const char *s) {
  struct tc_buf b = TC_BUF_INIT;
  for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
    if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || strchr("-._~:@", *p))
      tc_buf_putc(&b, (char)*p);
    else
      tc_buf_printf(&b, "%%%02X", *p);
  }
  return tc_buf_steal(&b, NULL);
}

/* Prints member `key` of resp (or resp itself when key is NULL), then frees
 * resp. Returns the exit status. */
static int show(struct cli *c, json_t *resp, const char *key, const struct tc_col *cols) {
  if (!resp) return 1;
  json_t *v = key ? json_object_get(resp, key) : resp;
  tc_out_print(c->fmt, v ? v : json_null(), cols);
  json_decref(resp);
  return 0;
}

/* Like show, for commands whose table output is one confirmation line. */
static int done(struct cli *c, json_t *resp, const char *msg) {
  if (!resp) return 1;
  if (c->fmt == TC_OUT_TABLE) printf("%s\n", msg);
  else tc_out_print(c->fmt, resp, NULL);
  json_decref(resp);
  return 0;
}

/* ---- columns ------------------------------------------------------------------------------- */

static const struct tc_col user_cols[] = {{"ID", "id", TC_COL_STR},
                                          {"Name", "name", TC_COL_STR},
                                          {"Display name", "displayName", TC_COL_STR},
                                          {"Email", "email", TC_COL_STR},
                                          {"Created", "createdAt", TC_COL_TIME},
                                          {NULL, NULL, 0}};
static const struct tc_col node_cols[] = {{"ID", "id", TC_COL_STR},
                                          {"Hostname", "name", TC_COL_STR},
                                          {"Name", "givenName", TC_COL_STR},
                                          {"User", "user.name", TC_COL_STR},
                                          {"IP addresses", "ipAddresses", TC_COL_LIST},
                                          {"Tags", "tags", TC_COL_LIST},
                                          {"Last seen", "lastSeen", TC_COL_TIME},
                                          {"Expiry", "expiry", TC_COL_TIME},
                                          {"Connected", "online", TC_COL_BOOL},
                                          {"Expired", "expired", TC_COL_BOOL},
                                          {NULL, NULL, 0}};
static const struct tc_col route_cols[] = {{"ID", "id", TC_COL_STR},
                                           {"Hostname", "givenName", TC_COL_STR},
                                           {"Approved", "approvedRoutes", TC_COL_LIST},
                                           {"Available", "availableRoutes", TC_COL_LIST},
                                           {"Serving (Primary)", "subnetRoutes", TC_COL_LIST},
                                           {NULL, NULL, 0}};
static const struct tc_col preauth_cols[] = {{"ID", "id", TC_COL_STR},
                                             {"Key", "key", TC_COL_STR},
                                             {"User", "user.name", TC_COL_STR},
                                             {"Reusable", "reusable", TC_COL_BOOL},
                                             {"Ephemeral", "ephemeral", TC_COL_BOOL},
                                             {"Used", "used", TC_COL_BOOL},
                                             {"Expiration", "expiration", TC_COL_TIME},
                                             {"Created", "createdAt", TC_COL_TIME},
                                             {"Tags", "aclTags", TC_COL_LIST},
                                             {NULL, NULL, 0}};
static const struct tc_col apikey_cols[] = {{"ID", "id", TC_COL_STR},
                                            {"Prefix", "prefix", TC_COL_STR},
                                            {"Expiration", "expiration", TC_COL_TIME},
                                            {"Created", "createdAt", TC_COL_TIME},
                                            {"Last seen", "lastSeen", TC_COL_TIME},
                                            {NULL, NULL, 0}};

/* ---- helpers for commands ---------------------------------------------------------------------- */

static bool is(const char *a, const char *b1, const char *b2) {
  return a && ((b1 && !strcmp(a, b1)) || (b2 && !strcmp(a, b2)));
}

/* Collects every value of --long/-s, splitting on commas, into a JSON array. */
static json_t *list_flag(const struct cli *c, const char *lng, const char *shrt) {
  json_t *a = json_array();
  for (int i = 0; i < c->nflags; i++) {
    if (strcmp(c->flags[i].name, lng) && (!shrt || strcmp(c->flags[i].name, shrt))) continue;
    char *copy = tc_xstrdup(c->flags[i].value);
    for (char *save = NULL, *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
      while (*t == ' ') t++;
      if (*t) json_array_append_new(a, json_string(t));
    }
    free(copy);
  }
  return a;
}

/* --expiration DURATION -> RFC 3339 time from now; NULL + message when bad. */
static char *expiry_from(const char *dur, char out[32]) {
  int64_t ms;
  if (tc_duration_parse(dur, &ms) || ms <= 0) {
    die("invalid --expiration \"%s\" (want a duration like 1h, 30m, 90d)", dur);
    return NULL;
  }
  return tc_time_format(tc_now() + ms / 1000, out);
}

static const char *node_id_arg(const struct cli *c) {
  const char *id = flag(c, "identifier", "i");
  if (!id) id = flag(c, "id", NULL);
  return id;
}

/* ---- commands ------------------------------------------------------------------------------------ */

static int cmd_users(struct cli *c) {
  const char *sub = c->sub;
  if (is(sub, "create", "add")) {
    const char *name = c->npos ? c->pos[0] : flag(c, "name", "n");
    if (!name) return die("usage: tailcoat users create NAME [--display-name X] [--email X] [--picture-url X]");
    json_t *b = json_pack("{s:s}", "name", name);
    const char *dn = flag(c, "display-name", "d"), *em = flag(c, "email", "e"), *pic = flag(c, "picture-url", "p");
    if (dn) json_object_set_new(b, "displayName", json_string(dn));
    if (em) json_object_set_new(b, "email", json_string(em));
    if (pic) json_object_set_new(b, "pictureUrl", json_string(pic));
    json_t *r = call(c, "POST", "/api/v1/user", b);
    json_decref(b);
    return show(c, r, "user", user_cols);
  }
  if (is(sub, "list", "ls")) {
    struct tc_buf t = TC_BUF_INIT;
    tc_buf_puts(&t, "/api/v1/user");
    char sep = '?';
    const char *keys[][3] = {{"name", "n", "name"}, {"email", "e", "email"}, {"identifier", "i", "id"}};
    for (size_t k = 0; k < 3; k++) {
      const char *v = flag(c, keys[k][0], keys[k][1]);
      if (!v) continue;
      char *e = enc(v);
      tc_buf_printf(&t, "%c%s=%s", sep, keys[k][2], e);
      free(e);
      sep = '&';
    }
    json_t *r = call(c, "GET", t.data, NULL);
    tc_buf_free(&t);
    return show(c, r, "users", user_cols);
  }
  if (is(sub, "rename", NULL)) {
    const char *old = flag(c, "identifier", "i");
    if (!old) old = flag(c, "name", "n");
    const char *nw = flag(c, "new-name", "r");
    if (!old && c->npos >= 1) old = c->pos[0];
    if (!nw && c->npos >= 2) nw = c->pos[1];
    else if (!nw && c->npos == 1 && (flag(c, "identifier", "i") || flag(c, "name", "n"))) nw = c->pos[0];
    if (!old || !nw) return die("usage: tailcoat users rename OLD NEW  (or -i ID -r NEW)");
    char *eo = enc(old), *en = enc(nw);
    char *t = tc_xasprintf("/api/v1/user/%s/rename/%s", eo, en);
    json_t *r = call(c, "PUT", t, NULL);
    free(t);
    free(eo);
    free(en);
    return show(c, r, "user", user_cols);
  }
  if (is(sub, "destroy", "delete")) {
    const char *ref = flag(c, "identifier", "i");
    if (!ref) ref = flag(c, "name", "n");
    if (!ref && c->npos) ref = c->pos[0];
    if (!ref) return die("usage: tailcoat users destroy NAME  (or -i ID)");
    char *e = enc(ref);
    char *t = tc_xasprintf("/api/v1/user/%s", e);
    json_t *r = call(c, "DELETE", t, NULL);
    free(t);
    free(e);
    return done(c, r, "User destroyed");
  }
  return die("usage: tailcoat users create|list|rename|destroy");
}

static int node_post(struct cli *c, const char *suffix, json_t *body, const char *method) {
  const char *id = node_id_arg(c);
  if (!id && c->npos) id = c->pos[0];
  if (!id) return die("this command needs the node id: -i ID");
  char *e = enc(id);
  char *t = tc_xasprintf("/api/v1/node/%s%s", e, suffix);
  json_t *r = call(c, method, t, body);
  free(t);
  free(e);
  if (!strcmp(method, "DELETE")) return done(c, r, "Node deleted");
  return show(c, r, "node", node_cols);
}

static int cmd_nodes(struct cli *c) {
  const char *sub = c->sub;
  if (is(sub, "list", "ls") || is(sub, "list-routes", "routes")) {
    const char *user = flag(c, "user", "u");
    char *t;
    if (user) {
      char *e = enc(user);
      t = tc_xasprintf("/api/v1/node?user=%s", e);
      free(e);
    } else {
      t = tc_xstrdup("/api/v1/node");
    }
    json_t *r = call(c, "GET", t, NULL);
    free(t);
    if (r && is(sub, "list-routes", "routes")) {
      const char *id = node_id_arg(c);
      json_t *nodes = json_object_get(r, "nodes"), *keep = json_array();
      size_t i;
      json_t *n;
      json_array_foreach(nodes, i, n) {
        json_t *ar = json_object_get(n, "availableRoutes"), *ap = json_object_get(n, "approvedRoutes");
        if (id ? !strcmp(json_string_value(json_object_get(n, "id")), id)
               : json_array_size(ar) + json_array_size(ap) > 0)
          json_array_append(keep, n);
      }
      json_object_set_new(r, "nodes", keep);
      return show(c, r, "nodes", route_cols);
    }
    return show(c, r, "nodes", node_cols);
  }
  if (is(sub, "expire", "logout")) {
    const char *exp = flag(c, "expiry", NULL);
    char *suffix = NULL;
    if (exp) {
      char *e = enc(exp);
      suffix = tc_xasprintf("/expire?expiry=%s", e);
      free(e);
    }
    int rc = node_post(c, suffix ? suffix : "/expire", NULL, "POST");
    free(suffix);
    return rc;
  }
  if (is(sub, "rename", NULL)) {
    const char *id = node_id_arg(c);
    const char *nw = id ? (c->npos ? c->pos[0] : NULL) : (c->npos > 1 ? c->pos[1] : NULL);
    if (!nw) nw = flag(c, "new-name", "r");
    if (!nw) return die("usage: tailcoat nodes rename -i ID NEW_NAME");
    char *e = enc(nw);
    char *suffix = tc_xasprintf("/rename/%s", e);
    free(e);
    int rc = node_post(c, suffix, NULL, "POST");
    free(suffix);
    return rc;
  }
  if (is(sub, "delete", "destroy")) return node_post(c, "", NULL, "DELETE");
  if (is(sub, "tag", "tags")) {
    json_t *b = json_object();
    json_object_set_new(b, "tags", list_flag(c, "tags", "t"));
    int rc = node_post(c, "/tags", b, "POST");
    json_decref(b);
    return rc;
  }
  if (is(sub, "approve-routes", NULL)) {
    json_t *b = json_object();
    json_object_set_new(b, "routes", list_flag(c, "routes", "r"));
    int rc = node_post(c, "/approve_routes", b, "POST");
    json_decref(b);
    return rc;
  }
  if (is(sub, "move", NULL)) {
    const char *user = flag(c, "user", "u");
    if (!user) return die("usage: tailcoat nodes move -i ID --user USER");
    json_t *b = json_pack("{s:s}", "user", user);
    int rc = node_post(c, "/user", b, "POST");
    json_decref(b);
    return rc;
  }
  if (is(sub, "register", NULL)) {
    const char *user = flag(c, "user", "u"), *key = flag(c, "key", "k");
    if (!user || !key) return die("usage: tailcoat nodes register --user USER --key REGISTRATION_ID");
    char *eu = enc(user), *ek = enc(key);
    char *t = tc_xasprintf("/api/v1/node/register?user=%s&key=%s", eu, ek);
    json_t *r = call(c, "POST", t, NULL);
    free(t);
    free(eu);
    free(ek);
    if (r && c->fmt == TC_OUT_TABLE) {
      printf("Node %s registered\n", json_string_value(json_object_get(json_object_get(r, "node"), "givenName")));
      json_decref(r);
      return 0;
    }
    return show(c, r, "node", node_cols);
  }
  if (is(sub, "pending", NULL)) {
    static const struct tc_col cols[] = {{"Auth ID", "authId", TC_COL_STR},
                                         {"Hostname", "hostname", TC_COL_STR},
                                         {"Machine key", "machineKey", TC_COL_STR},
                                         {"Expires", "expiresAt", TC_COL_TIME},
                                         {NULL, NULL, 0}};
    return show(c, call(c, "GET", "/api/v1/auth/pending", NULL), "registrations", cols);
  }
  return die("usage: tailcoat nodes list|expire|rename|delete|tag|list-routes|approve-routes|register|move|pending");
}

static int cmd_preauthkeys(struct cli *c) {
  const char *sub = c->sub;
  const char *user = flag(c, "user", "u");
  if (is(sub, "create", NULL)) {
    json_t *tags = list_flag(c, "tags", NULL);
    if (!user && !json_array_size(tags)) {
      json_decref(tags);
      return die("usage: tailcoat preauthkeys create --user USER [--reusable] [--ephemeral] [--expiration 1h] "
                 "[--tags tag:a,tag:b]");
    }
    const char *dur = flag(c, "expiration", "e");
    char when[32];
    if (!expiry_from(dur ? dur : "1h", when)) {
      json_decref(tags);
      return 1;
    }
    json_t *b = json_object();
    if (user) json_object_set_new(b, "user", json_string(user));
    json_object_set_new(b, "reusable", json_boolean(flag_set(c, "reusable", NULL)));
    json_object_set_new(b, "ephemeral", json_boolean(flag_set(c, "ephemeral", NULL)));
    json_object_set_new(b, "expiration", json_string(when));
    json_object_set_new(b, "aclTags", tags);
    json_t *r = call(c, "POST", "/api/v1/preauthkey", b);
    json_decref(b);
    if (r && c->fmt == TC_OUT_TABLE) {
      printf("%s\n", json_string_value(json_object_get(json_object_get(r, "preAuthKey"), "key")));
      json_decref(r);
      return 0;
    }
    return show(c, r, "preAuthKey", preauth_cols);
  }
  if (is(sub, "list", "ls")) {
    char *t;
    if (user) {
      char *e = enc(user);
      t = tc_xasprintf("/api/v1/preauthkey?user=%s", e);
      free(e);
    } else {
      t = tc_xstrdup("/api/v1/preauthkey");
    }
    json_t *r = call(c, "GET", t, NULL);
    free(t);
    return show(c, r, "preAuthKeys", preauth_cols);
  }
  if (is(sub, "expire", "revoke") || is(sub, "delete", NULL)) {
    const char *id = flag(c, "id", "i");
    const char *key = c->npos ? c->pos[0] : flag(c, "key", "k");
    if (!id && !key) return die("usage: tailcoat preauthkeys %s KEY|PREFIX  (or --id ID)", sub);
    if (is(sub, "delete", NULL)) {
      if (!id) return die("usage: tailcoat preauthkeys delete --id ID");
      char *e = enc(id);
      char *t = tc_xasprintf("/api/v1/preauthkey?id=%s", e);
      json_t *r = call(c, "DELETE", t, NULL);
      free(t);
      free(e);
      return done(c, r, "Key deleted");
    }
    json_t *b = id ? json_pack("{s:s}", "id", id) : json_pack("{s:s}", "key", key);
    json_t *r = call(c, "POST", "/api/v1/preauthkey/expire", b);
    json_decref(b);
    return done(c, r, "Key expired");
  }
  return die("usage: tailcoat preauthkeys create|list|expire|delete");
}

static int cmd_apikeys(struct cli *c) {
  const char *sub = c->sub;
  if (is(sub, "create", "generate")) {
    const char *dur = flag(c, "expiration", "e");
    char when[32];
    if (!expiry_from(dur ? dur : "90d", when)) return 1;
    json_t *b = json_pack("{s:s}", "expiration", when);
    json_t *r = call(c, "POST", "/api/v1/apikey", b);
    json_decref(b);
    return show(c, r, "apiKey", NULL);
  }
  if (is(sub, "list", "ls")) return show(c, call(c, "GET", "/api/v1/apikey", NULL), "apiKeys", apikey_cols);
  if (is(sub, "expire", "revoke") || is(sub, "delete", "remove")) {
    const char *id = flag(c, "id", "i");
    const char *prefix = flag(c, "prefix", "p");
    if (!prefix && c->npos) prefix = c->pos[0];
    if (!id && !prefix) return die("usage: tailcoat apikeys %s --prefix PREFIX  (or --id ID)", sub);
    if (is(sub, "expire", "revoke")) {
      json_t *b = id ? json_pack("{s:s}", "id", id) : json_pack("{s:s}", "prefix", prefix);
      json_t *r = call(c, "POST", "/api/v1/apikey/expire", b);
      json_decref(b);
      return done(c, r, "Key expired");
    }
    char *ep = enc(prefix ? prefix : "-");
    char *t = id ? tc_xasprintf("/api/v1/apikey/%s?id=%s", ep, id) : tc_xasprintf("/api/v1/apikey/%s", ep);
    free(ep);
    if (id && strspn(id, "0123456789") != strlen(id)) {
      free(t);
      return die("--id must be a number");
    }
    json_t *r = call(c, "DELETE", t, NULL);
    free(t);
    return done(c, r, "Key deleted");
  }
  return die("usage: tailcoat apikeys create|list|expire|delete");
}

static int cmd_auth(struct cli *c) {
  const char *id = flag(c, "auth-id", "a");
  if (!id && c->npos) id = c->pos[0];
  if (!id) return die("usage: tailcoat auth register|approve|reject --auth-id ID [--user USER]");
  json_t *b = json_pack("{s:s}", "authId", id);
  json_t *r = NULL;
  int rc;
  if (is(c->sub, "register", NULL)) {
    const char *user = flag(c, "user", "u");
    if (!user) {
      json_decref(b);
      return die("usage: tailcoat auth register --auth-id ID --user USER");
    }
    json_object_set_new(b, "user", json_string(user));
    r = call(c, "POST", "/api/v1/auth/register", b);
    rc = show(c, r, "node", node_cols);
  } else if (is(c->sub, "approve", NULL)) {
    rc = done(c, call(c, "POST", "/api/v1/auth/approve", b), "Registration approved");
  } else if (is(c->sub, "reject", NULL)) {
    rc = done(c, call(c, "POST", "/api/v1/auth/reject", b), "Registration rejected");
  } else {
    rc = die("usage: tailcoat auth register|approve|reject --auth-id ID [--user USER]");
  }
  json_decref(b);
  return rc;
}

static int read_policy_file(const struct cli *c, char **text, size_t *len) {
  const char *f = flag(c, "file", "f");
  if (!f && c->npos) f = c->pos[0];
  if (!f) return die("usage: tailcoat policy %s -f FILE", c->sub);
  struct tc_err err = {0};
  if (tc_read_file(f, 4u << 20, text, len, &err)) return die("%s", err.msg);
  return 0;
}

static int cmd_policy(struct cli *c) {
  const char *sub = c->sub;
  if (is(sub, "get", "show")) {
    json_t *r = call(c, "GET", "/api/v1/policy", NULL);
    if (r && c->fmt == TC_OUT_TABLE) {
      const char *p = json_string_value(json_object_get(r, "policy"));
      fputs(p ? p : "", stdout);
      if (p && *p && p[strlen(p) - 1] != '\n') putchar('\n');
      json_decref(r);
      return 0;
    }
    return show(c, r, NULL, NULL);
  }
  if (is(sub, "set", NULL) || is(sub, "check", NULL)) {
    char *text = NULL;
    size_t len = 0;
    if (read_policy_file(c, &text, &len)) return 1;
    if (is(sub, "check", NULL)) {
      /* Syntax and semantics are checked locally (no server or database
       * needed); with a config, the policy's own tests/sshTests then run
       * against the tailnet, through the server when one runs. */
      struct tc_err err = {0};
      int rc = tc_api_policy_validate(NULL, text, len, &err);
      if (rc) {
        free(text);
        return die("%s", err.msg);
      }
      if (config_path(c)) {
        json_t *b = json_object();
        json_object_set_new(b, "policy", json_stringn(text, len));
        json_t *r = call(c, "POST", "/api/v1/policy/check", b);
        json_decref(b);
        if (!r) {
          free(text);
          return 1;
        }
        json_decref(r);
      }
      free(text);
      if (c->fmt == TC_OUT_TABLE) {
        printf("Policy is valid\n");
      } else {
        json_t *v = json_object();
        tc_out_print(c->fmt, v, NULL);
        json_decref(v);
      }
      return 0;
    }
    json_t *s = json_stringn(text, len);
    free(text);
    if (!s) return die("the policy file is not valid UTF-8");
    json_t *b = json_object();
    json_object_set_new(b, "policy", s);
    json_t *r = call(c, "PUT", "/api/v1/policy", b);
    json_decref(b);
    return done(c, r, "Policy updated.");
  }
  return die("usage: tailcoat policy get|set|check [-f FILE]");
}

/* mkdir -p path; created levels get 0750 (keys and the database inside
 * carry their own 0600 modes). -1 with errno on failure. */
static int mkdir_parents(const char *path) {
  char *p = tc_xstrdup(path);
  int rc = 0;
  for (char *s = p + 1;; s++) {
    if (*s && *s != '/') continue;
    char saved = *s;
    *s = 0;
    if (mkdir(p, 0750) && errno != EEXIST) {
      rc = -1;
      break;
    }
    *s = saved;
    if (!saved) break;
  }
  int e = errno;
  free(p);
  errno = e;
  return rc;
}

static int cmd_config(struct cli *c) {
  if (is(c->sub, "print", "show")) {
    if (load_config(c)) return 1;
    struct tc_buf b = TC_BUF_INIT;
    int rc = tc_config_print(&c->cfg, &b);
    if (!rc) fputs(b.data ? b.data : "", stdout);
    tc_buf_free(&b);
    return rc ? die("could not print the config") : 0;
  }
  if (is(c->sub, "init", NULL)) {
    const char *dir = flag(c, "data-dir", NULL);
    const char *out = flag(c, "output", "o");
    bool to_file = out && strcmp(out, "-");
    char *outdir = NULL;
    if (to_file) {
      /* The file's directory is created and, without --data-dir, holds the
       * data too (absolute, so the config works from any directory). */
      const char *slash = strrchr(out, '/');
      char *parent = slash ? tc_xstrndup(out, slash == out ? 1 : (size_t)(slash - out)) : tc_xstrdup(".");
      if (mkdir_parents(parent)) {
        int e = errno;
        free(parent);
        return die("cannot create %s's directory: %s", out, strerror(e));
      }
      outdir = realpath(parent, NULL);
      free(parent);
      if (!outdir) return die("cannot resolve %s's directory: %s", out, strerror(errno));
    }
    char *text = tc_config_default_text(dir ? dir : outdir ? outdir : "/var/lib/tailcoat");
    free(outdir);
    int rc = 0;
    if (!to_file) {
      fputs(text, stdout);
    } else if (!access(out, F_OK) && !flag_set(c, "force", NULL)) {
      rc = die("%s exists (use --force to overwrite)", out);
    } else {
      struct tc_err err = {0};
      if (tc_write_file_atomic(out, text, strlen(text), 0600, &err)) rc = die("%s", err.msg);
      else fprintf(stderr, "Wrote %s\n", out);
    }
    free(text);
    return rc;
  }
  return die("usage: tailcoat config print | config init [-o FILE] [--data-dir DIR]");
}

static int cmd_configtest(struct cli *c) {
  if (load_config(c)) return 1;
  for (size_t i = 0; i < c->cfg.warnings.n; i++) fprintf(stderr, "warning: %s\n", c->cfg.warnings.v[i]);
  if (c->fmt == TC_OUT_TABLE) printf("Configuration %s is valid\n", c->cfg.source_path);
  else {
    json_t *v = json_pack("{s:b,s:s}", "valid", 1, "path", c->cfg.source_path);
    tc_out_print(c->fmt, v, NULL);
    json_decref(v);
  }
  return 0;
}

static int cmd_generate(struct cli *c) {
  if (!is(c->sub, "private-key", "privkey")) return die("usage: tailcoat generate private-key");
  uint8_t k[32];
  tc_random(k, sizeof k);
  char text[73];
  tc_keyfile_format(k, text);
  tc_wipe(k, sizeof k);
  if (c->fmt == TC_OUT_TABLE) {
    printf("%s\n", text);
  } else {
    json_t *o = json_pack("{s:s}", "private_key", text);
    tc_out_print(c->fmt, o, NULL);
    json_decref(o);
  }
  tc_wipe(text, sizeof text);
  return 0;
}

static int cmd_health(struct cli *c) {
  json_t *r = call(c, "GET", "/health", NULL);
  if (!r) return 1;
  if (c->fmt == TC_OUT_TABLE) printf("%s\n", json_string_value(json_object_get(r, "status")));
  else tc_out_print(c->fmt, r, NULL);
  json_decref(r);
  return 0;
}

static void usage(FILE *f) {
  fprintf(f,
          "tailcoat %s: a control server for Tailscale clients\n\n"
          "Usage: tailcoat [-c CONFIG] [-o json|yaml|table] COMMAND ...\n\n"
          "  serve                        run the server\n"
          "  version | health | configtest\n"
          "  config print | config init [-o FILE] [--data-dir DIR]\n"
          "  generate private-key\n"
          "  users create|list|rename|destroy\n"
          "  nodes list|expire|rename|delete|tag|list-routes|approve-routes|register|move|pending\n"
          "  auth register|approve|reject --auth-id ID [--user USER]\n"
          "  preauthkeys create|list|expire|delete  (--user, --reusable, --ephemeral, --expiration, --tags)\n"
          "  apikeys create|list|expire|delete\n"
          "  policy get|set|check [-f FILE]\n\n"
          "The config is -c FILE, else $TAILCOAT_CONFIG, else ./config.yaml, /etc/tailcoat/config.yaml,\n"
          "/etc/headscale/config.yaml. Commands talk to a running server over its unix socket, or open\n"
          "the database directly when no server is running.\n",
          TC_VERSION);
}

int tc_cli_main(int argc, char **argv) {
  struct cli c;
  memset(&c, 0, sizeof c);
  int rc = parse_args(&c, argc, argv);
  if (rc) return 2;
  if (!c.cmd || flag_set(&c, "help", "h") || is(c.cmd, "help", NULL)) {
    usage(c.cmd ? stdout : stderr);
    return c.cmd ? 0 : 2;
  }
  bool config_init = is(c.cmd, "config", NULL) && is(c.sub, "init", NULL);
  if (!config_init && parse_output_format(&c)) return 2;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  /* Commands print results, not progress: only warnings and errors are
   * logged (serve sets the configured level). */
  tc_log_set_level(TC_LOG_WARN);
  const char *cmd = c.cmd;
  if (is(cmd, "version", NULL)) {
    if (c.fmt == TC_OUT_TABLE) {
      printf("tailcoat %s\n", TC_VERSION);
    } else {
      json_t *v = json_pack("{s:s}", "version", TC_VERSION);
      tc_out_print(c.fmt, v, NULL);
      json_decref(v);
    }
    rc = 0;
  } else if (is(cmd, "serve", NULL)) {
    rc = load_config(&c) ? 1 : tc_cli_serve(&c.cfg);
  } else if (is(cmd, "users", "user")) {
    rc = cmd_users(&c);
  } else if (is(cmd, "nodes", "node")) {
    rc = cmd_nodes(&c);
  } else if (is(cmd, "preauthkeys", "preauthkey")) {
    rc = cmd_preauthkeys(&c);
  } else if (is(cmd, "apikeys", "apikey")) {
    rc = cmd_apikeys(&c);
  } else if (is(cmd, "policy", NULL)) {
    rc = cmd_policy(&c);
  } else if (is(cmd, "auth", NULL)) {
    rc = cmd_auth(&c);
  } else if (is(cmd, "config", NULL)) {
    rc = cmd_config(&c);
  } else if (is(cmd, "configtest", NULL)) {
    rc = cmd_configtest(&c);
  } else if (is(cmd, "generate", "gen")) {
    rc = cmd_generate(&c);
  } else if (is(cmd, "health", NULL)) {
    rc = cmd_health(&c);
  } else {
    fprintf(stderr, "Error: unknown command \"%s\"\n\n", cmd);
    usage(stderr);
    rc = 2;
  }
  fflush(stdout);
  tc_backend_close(c.local);
  tc_backend_settings_free(&c.settings);
  tc_config_free(&c.cfg);
  curl_global_cleanup();
  return rc;
}
