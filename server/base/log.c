/* log: leveled logging to stderr, text or JSON lines. Thread-safe: each
 * line is formatted into a local buffer and written with one write(2). */
#include "base.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static _Atomic int g_level = TC_LOG_INFO;
static _Atomic bool g_json = false;

static const char *const names[] = {"trace", "debug", "info", "warn", "error", "fatal"};

int tc_log_level_parse(const char *s) {
  if (!s) return -1;
  for (size_t i = 0; i < TC_ARRAY_LEN(names); i++)
    if (!strcasecmp(s, names[i])) return (int)i;
  if (!strcasecmp(s, "warning")) return TC_LOG_WARN;
  if (!strcasecmp(s, "panic")) return TC_LOG_FATAL;
  return -1;
}

void tc_log_set_level(enum tc_log_level lvl) { g_level = lvl; }
void tc_log_set_json(bool json) { g_json = json; }
bool tc_log_enabled(enum tc_log_level lvl) { return (int)lvl >= g_level; }

static void json_escape(struct tc_buf *b, const char *s) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      tc_buf_putc(b, '\\');
      tc_buf_putc(b, (char)c);
    } else if (c < 0x20) {
      tc_buf_printf(b, "\\u%04x", c);
    } else {
      tc_buf_putc(b, (char)c);
    }
  }
}

void tc_log(enum tc_log_level lvl, const char *fmt, ...) {
  if (!tc_log_enabled(lvl)) return;
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  char ts[32];
  tc_time_format(tc_now(), ts);
  struct tc_buf b = TC_BUF_INIT;
  if (g_json) {
    tc_buf_printf(&b, "{\"time\":\"%s\",\"level\":\"%s\",\"message\":\"", ts, names[lvl]);
    json_escape(&b, msg);
    tc_buf_puts(&b, "\"}\n");
  } else {
    tc_buf_printf(&b, "%s %-5s %s\n", ts, names[lvl], msg);
  }
  ssize_t w = write(STDERR_FILENO, b.data, b.len);
  (void)w;
  tc_buf_free(&b);
}
