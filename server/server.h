/* cbw — server/server.h: cbwd's libuv server: listeners, connections, the
 * bridge between the event loop and the thread pool, and logging.
 *
 * Threads: everything in conn.c runs on the loop thread except the
 * uv_queue_work() work callback, which runs cbwd_request_execute() on a
 * pool thread and touches only the request it was given.
 */
#ifndef CBWD_SERVER_H
#define CBWD_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "export.h"

struct cbwd_limits {
  unsigned max_connections;        /* more are accepted and closed at once */
  unsigned max_inflight;           /* requests executing per connection */
  uint64_t max_inflight_bytes;     /* payload + reply bytes held per connection */
  unsigned handshake_timeout_ms;   /* 0 = none */
};

struct cbwd_server {
  uv_loop_t *loop;
  struct cbwd_exports exports;
  struct cbwd_limits limits;
  size_t nlisteners;
  uv_stream_t **listeners;
  char **unix_paths;               /* to unlink at exit, parallel to listeners */
  size_t nconns;
  struct cbwd_conn *conns;         /* list of live connections */
  bool stopping;
  uv_signal_t sigterm, sigint;
  int verbose;
};

/* Add a listener: "unix:PATH" or "tcp:HOST:PORT" ([v6]:PORT allowed).
 * Returns 0 or -1 after logging. */
int cbwd_listen (struct cbwd_server *srv, const char *spec);
/* Stop listening, close every connection (requests in flight finish first). */
void cbwd_server_stop (struct cbwd_server *srv);

void cbwd_log (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
void cbwd_debug (struct cbwd_server *srv, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

#endif
