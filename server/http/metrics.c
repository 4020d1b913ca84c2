/* metrics: the process-wide series registry and the Prometheus text
 * renderer. Structure changes under one mutex; values are atomics. */
#include "http/metrics.h"

#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

struct family {
  char *name;
  char *help;
  enum tc_metric_type type;
  bool declared;
};

struct tc_metric {
  struct family *fam;
  char *labels;
  _Atomic int64_t value;
  _Atomic bool is_double;
  _Atomic double dvalue;
};

#define MAX_HOOKS 16
#define MAX_BOUNDS 16

struct tc_histogram {
  struct family *fam;
  char *labels;
  size_t nb;
  double bounds[MAX_BOUNDS];
  _Atomic uint64_t counts[MAX_BOUNDS + 1]; /* per bucket, not cumulative; last = +Inf */
  _Atomic uint64_t count;
  _Atomic double sum;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct family **fams;
static size_t nfams, capfams;
static struct tc_metric **series;
static size_t nseries, capseries;
static struct {
  tc_metrics_hook fn;
  void *ctx;
} hooks[MAX_HOOKS];
static size_t nhooks;
static struct tc_histogram **hists;
static size_t nhists, caphists;
static int64_t start_time_ms;

static struct family *family_get(const char *name, enum tc_metric_type type) {
  for (size_t i = 0; i < nfams; i++)
    if (!strcmp(fams[i]->name, name)) return fams[i];
  if (nfams == capfams) {
    capfams = capfams ? capfams * 2 : 32;
    fams = tc_xrealloc(fams, capfams * sizeof *fams);
  }
  struct family *f = tc_xcalloc(1, sizeof *f);
  f->name = tc_xstrdup(name);
  f->type = type;
  fams[nfams++] = f;
  return f;
}

void tc_metrics_declare(const char *name, enum tc_metric_type type, const char *help) {
  pthread_mutex_lock(&mu);
  if (!start_time_ms) start_time_ms = tc_now_ms();
  struct family *f = family_get(name, type);
  if (!f->declared) {
    f->declared = true;
    f->type = type;
    f->help = tc_xstrdup(help ? help : "");
  }
  pthread_mutex_unlock(&mu);
}

struct tc_metric *tc_metrics_series(const char *name, const char *labels) {
  if (!labels) labels = "";
  pthread_mutex_lock(&mu);
  if (!start_time_ms) start_time_ms = tc_now_ms();
  struct tc_metric *m = NULL;
  for (size_t i = 0; i < nseries; i++)
    if (!strcmp(series[i]->fam->name, name) && !strcmp(series[i]->labels, labels)) {
      m = series[i];
      goto out;
    }
  /* A name ending in _total is a counter unless declared otherwise. */
  size_t nl = strlen(name);
  enum tc_metric_type t = nl > 6 && !strcmp(name + nl - 6, "_total") ? TC_METRIC_COUNTER : TC_METRIC_GAUGE;
  struct family *f = family_get(name, t);
  if (nseries == capseries) {
    capseries = capseries ? capseries * 2 : 64;
    series = tc_xrealloc(series, capseries * sizeof *series);
  }
  m = tc_xcalloc(1, sizeof *m);
  m->fam = f;
  m->labels = tc_xstrdup(labels);
  series[nseries++] = m;
out:
  pthread_mutex_unlock(&mu);
  return m;
}

void tc_metric_add(struct tc_metric *m, int64_t delta) { atomic_fetch_add(&m->value, delta); }
void tc_metric_set(struct tc_metric *m, int64_t value) { atomic_store(&m->value, value); }
int64_t tc_metric_get(const struct tc_metric *m) { return atomic_load(&((struct tc_metric *)m)->value); }
void tc_metric_set_double(struct tc_metric *m, double v) {
  atomic_store(&m->dvalue, v);
  atomic_store(&m->is_double, true);
}

void tc_metrics_inc(const char *name, const char *labels) { tc_metric_add(tc_metrics_series(name, labels), 1); }
void tc_metrics_add(const char *name, const char *labels, int64_t delta) {
  tc_metric_add(tc_metrics_series(name, labels), delta);
}
void tc_metrics_set(const char *name, const char *labels, int64_t value) {
  tc_metric_set(tc_metrics_series(name, labels), value);
}

struct tc_histogram *tc_metrics_histogram(const char *name, const char *labels, const double *bounds,
                                          size_t nbounds) {
  if (!labels) labels = "";
  pthread_mutex_lock(&mu);
  if (!start_time_ms) start_time_ms = tc_now_ms();
  struct tc_histogram *h = NULL;
  for (size_t i = 0; i < nhists; i++)
    if (!strcmp(hists[i]->fam->name, name) && !strcmp(hists[i]->labels, labels)) {
      h = hists[i];
      goto out;
    }
  if (nhists == caphists) {
    caphists = caphists ? caphists * 2 : 32;
    hists = tc_xrealloc(hists, caphists * sizeof *hists);
  }
  h = tc_xcalloc(1, sizeof *h);
  h->fam = family_get(name, TC_METRIC_GAUGE); /* type printed as histogram */
  h->labels = tc_xstrdup(labels);
  h->nb = TC_MIN(nbounds, (size_t)MAX_BOUNDS);
  memcpy(h->bounds, bounds, h->nb * sizeof *bounds);
  hists[nhists++] = h;
out:
  pthread_mutex_unlock(&mu);
  return h;
}

void tc_histogram_observe(struct tc_histogram *h, double v) {
  size_t i = 0;
  while (i < h->nb && v > h->bounds[i]) i++;
  atomic_fetch_add(&h->counts[i], 1);
  atomic_fetch_add(&h->count, 1);
  /* C11 has no atomic add for double: compare-and-swap loop */
  double old = atomic_load(&h->sum);
  while (!atomic_compare_exchange_weak(&h->sum, &old, old + v)) {
  }
}

static void render_histograms(struct tc_buf *out) {
  for (size_t i = 0; i < nfams; i++) {
    struct family *f = fams[i];
    bool any = false;
    for (size_t j = 0; j < nhists; j++) {
      struct tc_histogram *h = hists[j];
      if (h->fam != f) continue;
      if (!any) {
        if (f->help && *f->help) tc_buf_printf(out, "# HELP %s %s\n", f->name, f->help);
        tc_buf_printf(out, "# TYPE %s histogram\n", f->name);
        any = true;
      }
      const char *sep = *h->labels ? "," : "";
      uint64_t cum = 0;
      for (size_t b = 0; b <= h->nb; b++) {
        cum += atomic_load(&h->counts[b]);
        if (b < h->nb)
          tc_buf_printf(out, "%s_bucket{%s%sle=\"%g\"} %llu\n", f->name, h->labels, sep, h->bounds[b],
                        (unsigned long long)cum);
        else
          tc_buf_printf(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", f->name, h->labels, sep, (unsigned long long)cum);
      }
      if (*h->labels) {
        tc_buf_printf(out, "%s_sum{%s} %.9g\n", f->name, h->labels, atomic_load(&h->sum));
        tc_buf_printf(out, "%s_count{%s} %llu\n", f->name, h->labels, (unsigned long long)atomic_load(&h->count));
      } else {
        tc_buf_printf(out, "%s_sum %.9g\n", f->name, atomic_load(&h->sum));
        tc_buf_printf(out, "%s_count %llu\n", f->name, (unsigned long long)atomic_load(&h->count));
      }
    }
  }
}

int tc_metrics_add_hook(tc_metrics_hook fn, void *ctx) {
  int rc = TC_OK;
  pthread_mutex_lock(&mu);
  if (nhooks == MAX_HOOKS)
    rc = TC_ETOOBIG;
  else
    hooks[nhooks].fn = fn, hooks[nhooks].ctx = ctx, nhooks++;
  pthread_mutex_unlock(&mu);
  return rc;
}

void tc_metrics_remove_hook(tc_metrics_hook fn, void *ctx) {
  pthread_mutex_lock(&mu);
  for (size_t i = 0; i < nhooks; i++)
    if (hooks[i].fn == fn && hooks[i].ctx == ctx) {
      memmove(&hooks[i], &hooks[i + 1], (nhooks - i - 1) * sizeof hooks[0]);
      nhooks--;
      break;
    }
  pthread_mutex_unlock(&mu);
}

void tc_metrics_label_escape(struct tc_buf *out, const char *v) {
  for (; v && *v; v++) {
    if (*v == '\\') tc_buf_puts(out, "\\\\");
    else if (*v == '"') tc_buf_puts(out, "\\\"");
    else if (*v == '\n') tc_buf_puts(out, "\\n");
    else tc_buf_putc(out, *v);
  }
}

static void render_process(struct tc_buf *out) {
  struct rusage ru;
  if (!getrusage(RUSAGE_SELF, &ru)) {
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 (double)ru.ru_stime.tv_usec / 1e6;
    tc_buf_printf(out,
                  "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
                  "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %.6f\n",
                  cpu);
  }
  long pages = 0;
  FILE *f = fopen("/proc/self/statm", "r");
  if (f) {
    long size;
    if (fscanf(f, "%ld %ld", &size, &pages) != 2) pages = 0;
    fclose(f);
  }
  tc_buf_printf(out,
                "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
                "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %lld\n",
                (long long)pages * (long long)sysconf(_SC_PAGESIZE));
  tc_buf_printf(out,
                "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
                "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %.3f\n",
                (double)start_time_ms / 1000.0);
  int nfd = 0;
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    struct dirent *e;
    while ((e = readdir(d)))
      if (e->d_name[0] != '.') nfd++;
    closedir(d);
    nfd--; /* the directory stream's own fd */
  }
  tc_buf_printf(out,
                "# HELP process_open_fds Number of open file descriptors.\n"
                "# TYPE process_open_fds gauge\nprocess_open_fds %d\n",
                nfd);
}

void tc_metrics_render(struct tc_buf *out) {
  pthread_mutex_lock(&mu);
  if (!start_time_ms) start_time_ms = tc_now_ms();
  pthread_mutex_unlock(&mu);
  render_process(out);
  pthread_mutex_lock(&mu);
  for (size_t i = 0; i < nfams; i++) {
    struct family *f = fams[i];
    bool any = false;
    for (size_t j = 0; j < nseries; j++) {
      struct tc_metric *m = series[j];
      if (m->fam != f) continue;
      if (!any) {
        if (f->help && *f->help) tc_buf_printf(out, "# HELP %s %s\n", f->name, f->help);
        tc_buf_printf(out, "# TYPE %s %s\n", f->name, f->type == TC_METRIC_COUNTER ? "counter" : "gauge");
        any = true;
      }
      tc_buf_puts(out, f->name);
      if (*m->labels) tc_buf_printf(out, "{%s}", m->labels);
      if (atomic_load(&m->is_double))
        tc_buf_printf(out, " %.17g\n", atomic_load(&m->dvalue));
      else
        tc_buf_printf(out, " %lld\n", (long long)atomic_load(&m->value));
    }
  }
  render_histograms(out);
  size_t nh = nhooks;
  typeof(hooks[0]) hk[MAX_HOOKS];
  memcpy(hk, hooks, sizeof hk);
  pthread_mutex_unlock(&mu);
  for (size_t i = 0; i < nh; i++) hk[i].fn(hk[i].ctx, out);
}

void tc_metrics_reset(void) {
  pthread_mutex_lock(&mu);
  for (size_t i = 0; i < nseries; i++) {
    free(series[i]->labels);
    free(series[i]);
  }
  for (size_t i = 0; i < nfams; i++) {
    free(fams[i]->name);
    free(fams[i]->help);
    free(fams[i]);
  }
  for (size_t i = 0; i < nhists; i++) {
    free(hists[i]->labels);
    free(hists[i]);
  }
  free(hists);
  hists = NULL;
  nhists = caphists = 0;
  free(series);
  free(fams);
  series = NULL;
  fams = NULL;
  nseries = capseries = nfams = capfams = 0;
  nhooks = 0;
  pthread_mutex_unlock(&mu);
}
