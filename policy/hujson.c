/* HuJSON: JSON with comments and trailing commas, as Tailscale policy files
 * are written. We rewrite it into standard JSON of the same length (so
 * jansson's line:col errors point into the original text) and parse that.
 * Pure functions; any thread. */
#include <string.h>

#include "policy/policy_int.h"

static void set_err(struct tc_policy_err *err, int line, int col, const char *msg)
{
  if (!err)
    return;
  err->code = TC_EINVAL;
  err->line = line;
  err->col = col;
  snprintf(err->msg, sizeof(err->msg), "%s", msg);
}

static void pos_of(const char *t, size_t off, int *line, int *col)
{
  int l = 1, c = 1;
  for (size_t i = 0; i < off; i++) {
    if (t[i] == '\n') {
      l++;
      c = 1;
    } else {
      c++;
    }
  }
  *line = l;
  *col = c;
}

char *tc_hujson_standardize(const char *text, size_t len, struct tc_policy_err *err)
{
  char *o = tc_xmalloc(len + 1);
  memcpy(o, text, len);
  o[len] = 0;
  /* A UTF-8 byte order mark is whitespace here (editors add it). */
  if (len >= 3 && (unsigned char)o[0] == 0xef && (unsigned char)o[1] == 0xbb && (unsigned char)o[2] == 0xbf)
    o[0] = o[1] = o[2] = ' ';
  /* Position of the last significant character written, for trailing commas. */
  ssize_t last = -1;
  size_t i = 0;
  while (i < len) {
    char ch = o[i];
    if (ch == '"') {
      size_t start = i;
      i++;
      while (i < len && o[i] != '"') {
        if (o[i] == '\\')
          i++;
        else if (o[i] == '\n')
          break;
        i++;
      }
      if (i >= len || o[i] != '"') {
        int l, c;
        pos_of(o, start, &l, &c);
        set_err(err, l, c, "unterminated string");
        free(o);
        return NULL;
      }
      last = (ssize_t)i;
      i++;
      continue;
    }
    if (ch == '/' && i + 1 < len && o[i + 1] == '/') {
      while (i < len && o[i] != '\n')
        o[i++] = ' ';
      continue;
    }
    if (ch == '/' && i + 1 < len && o[i + 1] == '*') {
      size_t start = i;
      o[i++] = ' ';
      o[i++] = ' ';
      while (i < len && !(o[i] == '*' && i + 1 < len && o[i + 1] == '/')) {
        if (o[i] != '\n')
          o[i] = ' ';
        i++;
      }
      if (i >= len) {
        int l, c;
        pos_of(text, start, &l, &c);
        set_err(err, l, c, "unterminated /* comment");
        free(o);
        return NULL;
      }
      o[i++] = ' ';
      o[i++] = ' ';
      continue;
    }
    if (ch == ']' || ch == '}') {
      if (last >= 0 && o[last] == ',')
        o[last] = ' ';
    }
    if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r')
      last = (ssize_t)i;
    i++;
  }
  return o;
}

json_t *tc_hujson_parse(const char *text, size_t len, struct tc_policy_err *err)
{
  char *std = tc_hujson_standardize(text, len, err);
  if (!std)
    return NULL;
  if (memchr(text, 0, len)) {
    set_err(err, 0, 0, "NUL byte in text");
    free(std);
    return NULL;
  }
  json_error_t je;
  json_t *v = json_loadb(std, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
  free(std);
  if (!v) {
    set_err(err, je.line, je.column, je.text);
    return NULL;
  }
  return v;
}
