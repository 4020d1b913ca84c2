/* metrics_server: the separate /metrics listener (its own libmicrohttpd
 * daemon on its own socket, so scraping never competes with the API port
 * and can be firewalled apart). Start/stop from the controlling thread. */
#include <microhttpd.h>
#include <netinet/in.h>
#include <string.h>
#include <unistd.h>

#include "http/http.h"
#include "http/metrics.h"

struct tc_metrics_server {
  struct MHD_Daemon *d;
  int fd;
  int port;
};

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *ctype, char *body,
                             size_t len) {
  struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_COPY);
  if (!r) return MHD_NO;
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
  enum MHD_Result ret = MHD_queue_response(c, status, r);
  MHD_destroy_response(r);
  return ret;
}

static enum MHD_Result metrics_cb(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
  if (!*con_cls) {
    *con_cls = (void *)1; /* first call: headers only */
    return MHD_YES;
  }
  if (*upload_data_size) {
    *upload_data_size = 0; /* a body here means nothing; discard it */
    return MHD_YES;
  }
  if (strcmp(url, "/metrics")) return reply(c, 404, "text/plain", "404 page not found\n", 19);
  if (strcmp(method, "GET") && strcmp(method, "HEAD"))
    return reply(c, 405, "text/plain", "method not allowed\n", 19);
  struct tc_buf b = TC_BUF_INIT;
  tc_metrics_render(&b);
  enum MHD_Result ret = reply(c, 200, "text/plain; version=0.0.4; charset=utf-8", b.data ? b.data : "", b.len);
  tc_buf_free(&b);
  return ret;
}

int tc_metrics_server_start(const char *listen_addr, struct tc_metrics_server **out, struct tc_err *err) {
  *out = NULL;
  int fd = tc_http_listen_tcp(listen_addr, err);
  if (fd < 0) return fd;
  struct tc_metrics_server *ms = tc_xcalloc(1, sizeof *ms);
  ms->fd = fd;
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  ms->port = -1;
  if (!getsockname(fd, (struct sockaddr *)&ss, &sl))
    ms->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
  ms->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, 0, NULL, NULL, metrics_cb, NULL,
                           MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)30,
                           MHD_OPTION_CONNECTION_LIMIT, (unsigned)64, MHD_OPTION_END);
  if (!ms->d) {
    close(fd);
    free(ms);
    return tc_err_set(err, TC_EIO, "could not start the metrics listener on %s", listen_addr);
  }
  *out = ms;
  return TC_OK;
}

int tc_metrics_server_port(const struct tc_metrics_server *ms) { return ms ? ms->port : -1; }

void tc_metrics_server_stop(struct tc_metrics_server *ms) {
  if (!ms) return;
  MHD_stop_daemon(ms->d); /* closes the listen socket it was given */
  free(ms);
}
