/* handle: binds the mapper to the /ts2021 transport (server/proto). Built
 * only when server/proto is part of the tree. Thread-safe like
 * tc_mapper_serve. */
#include "mapper/mapper.h"
#include "proto/proto.h"

static int io_respond(void *st, int status, const char *ct, const void *body, size_t len) {
  return tc_ctl_stream_respond(st, status, ct, body, len);
}
static int io_begin(void *st, int status, const char *ct) { return tc_ctl_stream_begin(st, status, ct); }
static int io_write(void *st, const void *data, size_t len) { return tc_ctl_stream_write(st, data, len); }
static void io_end(void *st) { tc_ctl_stream_end(st); }
static void io_ref(void *st) { tc_ctl_stream_ref(st); }
static void io_unref(void *st) { tc_ctl_stream_unref(st); }
static void io_on_cancel(void *st, void (*fn)(void *), void *arg) { tc_ctl_stream_on_cancel(st, fn, arg); }
static bool io_cancelled(void *st) { return tc_ctl_stream_cancelled(st); }
static void io_retry_after(void *st, int seconds) { tc_ctl_stream_retry_after(st, seconds); }

static const struct tc_mapper_io proto_io = {
    .respond = io_respond,
    .begin = io_begin,
    .write = io_write,
    .end = io_end,
    .ref = io_ref,
    .unref = io_unref,
    .on_cancel = io_on_cancel,
    .cancelled = io_cancelled,
    .retry_after = io_retry_after,
};

void tc_mapper_handle(void *ctx, const struct tc_ctl_request *req, struct tc_ctl_stream *st) {
  tc_mapper_serve(ctx, req->machine_key, req->method, req->path, req->body, req->body_len, &proto_io, st);
}
