/* extras: small config-adjacent lookups the CLI and the OIDC code need —
 * finding the config file, resolving the OIDC client secret. Reentrant. */
#include "config/config.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static const char *env_lookup(const char *const *env, const char *name, size_t n) {
  for (; env && *env; env++)
    if (!strncmp(*env, name, n) && (*env)[n] == '=') return *env + n + 1;
  return NULL;
}

char *tc_config_find(const char *const *env) {
  if (!env) env = (const char *const *)environ;
  static const char *const vars[] = {"TAILCOAT_CONFIG", "HEADSCALE_CONFIG"};
  for (size_t i = 0; i < TC_ARRAY_LEN(vars); i++) {
    const char *v = env_lookup(env, vars[i], strlen(vars[i]));
    if (v && *v && access(v, R_OK) == 0) return tc_xstrdup(v);
  }
  static const char *const fixed[] = {"/etc/tailcoat/config.yaml", "/etc/headscale/config.yaml"};
  for (size_t i = 0; i < TC_ARRAY_LEN(fixed); i++)
    if (access(fixed[i], R_OK) == 0) return tc_xstrdup(fixed[i]);
  const char *home = env_lookup(env, "HOME", 4);
  if (home && *home) {
    char *p = tc_xasprintf("%s/.headscale/config.yaml", home);
    if (access(p, R_OK) == 0) return p;
    free(p);
  }
  if (access("config.yaml", R_OK) == 0) return tc_xstrdup("config.yaml");
  return NULL;
}

/* os.ExpandEnv: $NAME and ${NAME}; unknown variables expand to "". */
static char *expand_env(const char *s, const char *const *env) {
  struct tc_buf b = TC_BUF_INIT;
  for (const char *p = s; *p;) {
    if (*p != '$') {
      tc_buf_putc(&b, *p++);
      continue;
    }
    const char *name = p + 1;
    size_t n = 0;
    bool braced = *name == '{';
    if (braced) {
      name++;
      const char *close = strchr(name, '}');
      if (!close) { /* not a variable reference: keep the text */
        tc_buf_putc(&b, *p++);
        continue;
      }
      n = (size_t)(close - name);
      p = close + 1;
    } else {
      while (isalnum((unsigned char)name[n]) || name[n] == '_') n++;
      if (!n) {
        tc_buf_putc(&b, *p++);
        continue;
      }
      p = name + n;
    }
    const char *v = n ? env_lookup(env, name, n) : NULL;
    if (v) tc_buf_puts(&b, v);
  }
  if (!b.data) tc_buf_puts(&b, "");
  return tc_buf_steal(&b, NULL);
}

int tc_config_oidc_client_secret(const struct tc_config *cfg, const char *const *env, char **out,
                                 struct tc_err *err) {
  *out = NULL;
  if (!cfg->oidc.client_secret_path || !cfg->oidc.client_secret_path[0]) {
    *out = tc_xstrdup(cfg->oidc.client_secret ? cfg->oidc.client_secret : "");
    return 0;
  }
  if (!env) env = (const char *const *)environ;
  char *path = expand_env(cfg->oidc.client_secret_path, env);
  char *data = NULL;
  size_t len = 0;
  int rc = tc_read_file(path, 64 * 1024, &data, &len, err);
  if (rc < 0) {
    tc_err_prefix(err, "oidc.client_secret_path");
    goto out;
  }
  size_t st = 0;
  while (st < len && isspace((unsigned char)data[st])) st++;
  while (len > st && isspace((unsigned char)data[len - 1])) len--;
  if (len == st || memchr(data + st, 0, len - st)) {
    rc = tc_err_set(err, TC_EINVAL, "oidc.client_secret_path: %s holds no usable secret", path);
    goto out;
  }
  *out = tc_xstrndup(data + st, len - st);
out:
  if (data) tc_free_secret(data, strlen(data));
  free(path);
  return rc;
}
