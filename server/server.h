/* cbw — server/server.h: cbwd's libuv server: listeners, connections, the
 * bridge between the event loop and the thread pool, and logging.
 *
 * Threads: conn.c runs on the loop thread, except a request's execution and
 * reply, which run on a worker of srv->pool (pool.c) and touch only the
 * request and the connection fields conn.c documents as lock-guarded.
 */
#ifndef CBWD_SERVER_H
#define CBWD_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <uv.h>

#include "export.h"
#include "pool.h"
#include "tls.h"

struct cbwd_limits {
  unsigned max_connections;        /* per listener (unless it sets its own):
                                    * more are accepted and closed at once */
  unsigned max_inflight;           /* requests executing per connection */
  uint64_t max_inflight_bytes;     /* payload + reply bytes held per connection */
  unsigned handshake_timeout_ms;   /* 0 = none */
  uint64_t max_memory;             /* payload + reply bytes held, all connections;
                                    * 0 = no bound (the options refuse it) */
  unsigned idle_timeout_ms;        /* after the handshake; 0 = none */
  unsigned max_conns_per_peer;     /* TCP connections per peer address; 0 = any */
};

struct cbwd_server {
  uv_loop_t *loop;
  struct cbwd_exports exports;
  struct cbwd_limits limits;
  size_t nlisteners;
  uv_stream_t **listeners;
  char **unix_paths;               /* to unlink at exit, parallel to listeners */
  struct cbwd_listener **linfo;    /* loop: budgets; freed by cbwd_server_cleanup */
  size_t nlinfo;
  size_t nconns;
  struct cbwd_conn *conns;         /* list of live connections */
  bool stopping;
  uv_signal_t sigterm, sigint;
  int verbose;
  char *first_listen;              /* for URIs handed out by the admin API */
  /* Admin API (exports added/removed at run time from other threads):
   * admin_lock guards admin_q and admin_closed; the loop thread runs the
   * queued operations from the admin async callback. */
  uv_async_t admin;
  pthread_mutex_t admin_lock;
  pthread_cond_t admin_cond;
  struct cbwd_admin_op *admin_q;
  bool admin_closed;
  /* Worker pool for export I/O (pool.c), started by the first connection
   * (loop thread); threads = 0 means 8.  Stopped by cbwd_server_cleanup(). */
  unsigned threads;
  bool pool_started;
  struct cbwd_pool pool;
  /* TLS (tls.c), set at start-up: tls.mode is an enum cbwd_tls_mode for
   * TCP listeners (-1: not given); tls_creds NULL when TLS is off. */
  struct cbwd_tls_config tls;
  struct cbwd_tls_creds *tls_creds;
  bool any_tcp;                    /* a TCP listener exists */
  /* Set at start-up, read-only afterwards (config.c):
   * pit_allow: the allow list given to the orchestrator's run-time PIT
   *   exports (--pit-allow, "pit-allow"); none = every client of a listener;
   * freeze_hooks: the orchestrator's named freeze hooks, "NAME=/PATH"
   *   (--freeze-hook, "freeze-hooks"), run without a shell. */
  char **pit_allow;
  size_t npit_allow;
  char **freeze_hooks;
  size_t nfreeze_hooks;
  /* Global memory bound (conn.c): mem_used is the payload and reply bytes
   * held by all connections (atomic: workers release, the loop admits);
   * pend_used the WRITE payloads read but not yet admitted (loop).  A
   * connection stopped by the bound sets mem_wait; a release then wakes
   * the loop through mem_async, which pumps the stopped connections. */
  _Atomic uint64_t mem_used;
  uint64_t pend_used;
  _Atomic bool mem_wait;
  uv_async_t mem_async;            /* set up with the first connection */
  pthread_mutex_t mem_lock;        /* guards mem_async_init against the close */
  bool mem_async_init;
};

/* One listener's connection budget (loop). */
struct cbwd_listener {
  struct cbwd_server *srv;
  unsigned max_conns;              /* 0: srv->limits.max_connections */
  unsigned nconns;
  char *spec;                      /* as given, for log lines */
};

/* Add a listener: "unix:PATH" or "tcp:HOST:PORT" ([v6]:PORT allowed),
 * optionally followed by ",max-connections=N" (this listener's own budget).
 * Returns 0 or -1 after logging. */
int cbwd_listen (struct cbwd_server *srv, const char *spec);
/* After all listeners and srv->tls are known (start-up): load the TLS
 * credentials, refuse a TCP listener without an explicit TLS choice, warn
 * about plain TCP.  Returns 0 or -1 after logging. */
int cbwd_tls_setup (struct cbwd_server *srv);
/* NULL, or a warning about plain NBD on TCP (for status output). */
const char *cbwd_server_tls_warning (const struct cbwd_server *srv);
/* Stop listening, close every connection (requests in flight finish first). */
void cbwd_server_stop (struct cbwd_server *srv);
/* After uv_run() returned: join the worker pool. */
void cbwd_server_cleanup (struct cbwd_server *srv);

/* Admin API: add or remove an export while the server runs.  Callable from
 * any thread EXCEPT the loop thread (the call waits for the loop).  Add takes
 * ownership of e on success.  Remove makes the name unknown to new clients
 * and closes the connections using it (their requests in flight finish
 * first); the export is freed when its last user is gone.  Both fail with
 * ESHUTDOWN once the server stops. */
int cbwd_admin_init (struct cbwd_server *srv);
int cbwd_server_add_export (struct cbwd_server *srv, struct cbwd_export *e,
                            struct cbw_err *err);
int cbwd_server_remove_export (struct cbwd_server *srv, const char *name,
                               struct cbw_err *err);
/* "nbd+unix:///NAME?socket=PATH" or "nbd://HOST:PORT/NAME" for the first
 * listener (malloc'd, NULL if there is none). */
char *cbwd_server_uri (struct cbwd_server *srv, const char *export_name);

void cbwd_log (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
void cbwd_debug (struct cbwd_server *srv, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

#endif
