/* output: renders API objects as a readable table (default), JSON or YAML
 * for the CLI. Main thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_int.h"

/* ---- YAML ---------------------------------------------------------------------- */

static void indent(struct tc_buf *out, int n) {
  for (int i = 0; i < n; i++) tc_buf_putc(out, ' ');
}

/* Scalars are written in YAML flow style; strings always double-quoted
 * (JSON escapes are valid YAML), so no value can change type on reading. */
static void yaml_scalar(json_t *v, struct tc_buf *out) {
  char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
  tc_buf_puts(out, s ? s : "null");
  free(s);
}

static bool is_empty_container(json_t *v) {
  return (json_is_object(v) && !json_object_size(v)) || (json_is_array(v) && !json_array_size(v));
}

static void yaml_value(json_t *v, int ind, struct tc_buf *out);

static void yaml_object_body(json_t *v, int ind, struct tc_buf *out, bool first_inline) {
  const char *k;
  json_t *m;
  bool first = true;
  json_object_foreach(v, k, m) {
    if (!(first && first_inline)) indent(out, ind);
    first = false;
    /* plain keys read better; anything unusual is quoted */
    bool plain = (*k >= 'a' && *k <= 'z') || (*k >= 'A' && *k <= 'Z');
    for (const char *p = k; plain && *p; p++)
      plain = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_';
    if (plain && strcmp(k, "true") && strcmp(k, "false") && strcmp(k, "null") && strcmp(k, "yes") &&
        strcmp(k, "no") && strcmp(k, "on") && strcmp(k, "off")) {
      tc_buf_puts(out, k);
    } else {
      json_t *kj = json_string(k);
      yaml_scalar(kj, out);
      json_decref(kj);
    }
    tc_buf_putc(out, ':');
    if ((json_is_object(m) || json_is_array(m)) && !is_empty_container(m)) {
      tc_buf_putc(out, '\n');
      yaml_value(m, ind + 2, out);
    } else {
      tc_buf_putc(out, ' ');
      yaml_value(m, ind, out);
    }
  }
}

static void yaml_value(json_t *v, int ind, struct tc_buf *out) {
  if (json_is_object(v) && json_object_size(v)) {
    yaml_object_body(v, ind, out, false);
  } else if (json_is_array(v) && json_array_size(v)) {
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
      indent(out, ind);
      tc_buf_puts(out, "- ");
      if (json_is_object(e) && json_object_size(e)) {
        yaml_object_body(e, ind + 2, out, true);
      } else if (json_is_array(e) && json_array_size(e)) {
        tc_buf_putc(out, '\n');
        yaml_value(e, ind + 2, out);
      } else {
        yaml_value(e, ind, out);
      }
    }
  } else {
    if (json_is_object(v)) tc_buf_puts(out, "{}");
    else if (json_is_array(v)) tc_buf_puts(out, "[]");
    else yaml_scalar(v, out);
    tc_buf_putc(out, '\n');
  }
}

void tc_out_yaml(json_t *val, struct tc_buf *out) { yaml_value(val, 0, out); }

/* ---- table ------------------------------------------------------------------------ */

static json_t *field(json_t *row, const char *path) {
  char buf[128];
  snprintf(buf, sizeof buf, "%s", path);
  json_t *cur = row;
  for (char *save = NULL, *tok = strtok_r(buf, ".", &save); tok && cur; tok = strtok_r(NULL, ".", &save))
    cur = json_object_get(cur, tok);
  return cur;
}

/* Owned cell text. */
static char *cell(json_t *row, const struct tc_col *c) {
  json_t *v = field(row, c->field);
  if (!v || json_is_null(v)) return tc_xstrdup("");
  switch (c->kind) {
  case TC_COL_BOOL:
    return tc_xstrdup(json_is_true(v) ? "true" : "false");
  case TC_COL_TIME: {
    /* "2026-01-02T03:04:05Z" -> "2026-01-02 03:04:05" */
    const char *s = json_string_value(v);
    if (!s) return tc_xstrdup("");
    char *t = tc_xstrdup(s);
    char *T = strchr(t, 'T');
    if (T) *T = ' ';
    size_t n = strlen(t);
    if (n && t[n - 1] == 'Z') t[n - 1] = 0;
    return t;
  }
  case TC_COL_LIST: {
    struct tc_buf b = TC_BUF_INIT;
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
      if (i) tc_buf_puts(&b, ", ");
      tc_buf_puts(&b, json_is_string(e) ? json_string_value(e) : "?");
    }
    return tc_buf_steal(&b, NULL);
  }
  default:
    if (json_is_string(v)) return tc_xstrdup(json_string_value(v));
    if (json_is_boolean(v)) return tc_xstrdup(json_is_true(v) ? "true" : "false");
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    return s ? s : tc_xstrdup("");
  }
}

/* Display width, counting UTF-8 code points (close enough for names). */
static size_t width(const char *s) {
  size_t w = 0;
  for (; *s; s++)
    if (((unsigned char)*s & 0xC0) != 0x80) w++;
  return w;
}

static void print_table(json_t *rows, const struct tc_col *cols) {
  size_t ncols = 0;
  while (cols[ncols].header) ncols++;
  size_t nrows = json_array_size(rows);
  char **cells = tc_xcalloc((nrows + 1) * ncols + 1, sizeof *cells);
  size_t *w = tc_xcalloc(ncols + 1, sizeof *w);
  for (size_t c = 0; c < ncols; c++) {
    cells[c] = tc_xstrdup(cols[c].header);
    w[c] = width(cells[c]);
  }
  for (size_t r = 0; r < nrows; r++)
    for (size_t c = 0; c < ncols; c++) {
      char *t = cell(json_array_get(rows, r), &cols[c]);
      /* a cell is one line; control characters from names are neutralised */
      for (char *p = t; *p; p++)
        if ((unsigned char)*p < 0x20) *p = ' ';
      cells[(r + 1) * ncols + c] = t;
      if (width(t) > w[c]) w[c] = width(t);
    }
  for (size_t r = 0; r <= nrows; r++) {
    for (size_t c = 0; c < ncols; c++) {
      const char *t = cells[r * ncols + c];
      fputs(t, stdout);
      if (c + 1 < ncols)
        for (size_t k = width(t); k < w[c] + 2; k++) putchar(' ');
    }
    putchar('\n');
  }
  for (size_t i = 0; i < (nrows + 1) * ncols; i++) free(cells[i]);
  free(cells);
  free(w);
}

void tc_out_print(enum tc_out_fmt fmt, json_t *val, const struct tc_col *cols) {
  if (fmt == TC_OUT_JSON) {
    char *s = json_dumps(val, JSON_ENCODE_ANY | JSON_INDENT(2));
    printf("%s\n", s ? s : "null");
    free(s);
    return;
  }
  if (fmt == TC_OUT_YAML) {
    struct tc_buf b = TC_BUF_INIT;
    tc_out_yaml(val, &b);
    fputs(b.data ? b.data : "", stdout);
    tc_buf_free(&b);
    return;
  }
  if (json_is_string(val)) {
    printf("%s\n", json_string_value(val));
    return;
  }
  if (!cols) {
    struct tc_buf b = TC_BUF_INIT;
    tc_out_yaml(val, &b);
    fputs(b.data ? b.data : "", stdout);
    tc_buf_free(&b);
    return;
  }
  if (json_is_array(val)) {
    print_table(val, cols);
  } else {
    json_t *a = json_array();
    json_array_append(a, val);
    print_table(a, cols);
    json_decref(a);
  }
}
