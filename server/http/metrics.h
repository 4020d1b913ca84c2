/* metrics: a tiny process-wide registry of Prometheus counters and gauges
 * with labels, rendered as Prometheus text (version 0.0.4) for /metrics on
 * the separate metrics listener.
 *
 * Any module may declare families and bump series from any thread: series
 * values are atomics; the registry's structure is guarded by one mutex taken
 * only when a series is looked up or created, so hot paths should keep the
 * struct tc_metric pointer they get once. Series are never freed while the
 * process runs (tc_metrics_reset is for tests).
 *
 * Label text is given pre-formatted as Prometheus writes it, e.g.
 * `route="/api/v1/user",code="200"`; use tc_metrics_label_escape for values
 * that come from outside. */
#ifndef TC_HTTP_METRICS_H
#define TC_HTTP_METRICS_H

#include <stdint.h>

#include "base/base.h"

enum tc_metric_type { TC_METRIC_COUNTER, TC_METRIC_GAUGE };

struct tc_metric; /* one series: family + label set */

/* Declares a family's type and help text (idempotent; first declaration
 * wins). Undeclared families render as untyped gauges/counters by first use. */
void tc_metrics_declare(const char *name, enum tc_metric_type type, const char *help);

/* Finds or creates the series name{labels} (labels may be "" or NULL).
 * Borrowed pointer, valid for the process lifetime. */
struct tc_metric *tc_metrics_series(const char *name, const char *labels);

void tc_metric_add(struct tc_metric *m, int64_t delta);
void tc_metric_set(struct tc_metric *m, int64_t value);
int64_t tc_metric_get(const struct tc_metric *m);
/* Gauges holding fractional values (seconds) set and render as doubles. */
void tc_metric_set_double(struct tc_metric *m, double v);

/* Shorthands doing lookup + update in one call. */
void tc_metrics_inc(const char *name, const char *labels);
void tc_metrics_add(const char *name, const char *labels, int64_t delta);
void tc_metrics_set(const char *name, const char *labels, int64_t value);

/* Histograms: fixed upper bounds (ascending, +Inf implied), one series per
 * label set. Observations are lock-free (atomics). Borrowed pointer, valid
 * for the process lifetime; bounds are copied on first creation. */
struct tc_histogram;
struct tc_histogram *tc_metrics_histogram(const char *name, const char *labels, const double *bounds,
                                          size_t nbounds);
void tc_histogram_observe(struct tc_histogram *h, double v);

/* A hook appends Prometheus text of its own (e.g. DERP counters, model
 * gauges) at render time. Called on the metrics thread without the registry
 * lock held. Returns 0 or TC_E* (hook table full). */
typedef void (*tc_metrics_hook)(void *ctx, struct tc_buf *out);
int tc_metrics_add_hook(tc_metrics_hook fn, void *ctx);
void tc_metrics_remove_hook(tc_metrics_hook fn, void *ctx);

/* Renders process metrics (process_cpu_seconds_total,
 * process_resident_memory_bytes, process_start_time_seconds,
 * process_open_fds), every registered series, then the hooks. */
void tc_metrics_render(struct tc_buf *out);

/* Appends `value` escaped for use inside a Prometheus label ("\\", "\"", "\n"). */
void tc_metrics_label_escape(struct tc_buf *out, const char *value);

/* Drops every series and hook (tests only; no other thread may be using them). */
void tc_metrics_reset(void);

#endif
