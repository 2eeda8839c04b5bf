/* cbw — common/control_internal.h: what the parts of the control-socket
 * server share and nobody else sees: the per-call context of the built-in
 * commands, the server and client state, and the functions the dispatcher,
 * the docs renderer, the event queue and the socket server call in each
 * other.  The public API and the protocol are in control.h.
 *
 * Files (one idea each):
 *   control.c          error classes, cbw_ctl_fail, argument getters
 *   control_dispatch.c request parsing, validation, dispatch, local calls
 *   control_docs.c     "query-commands" and the markdown reference
 *   control_events.c   "subscribe"/"unsubscribe", the broadcast queue
 *   control_server.c   the Unix socket, its thread, clients and peer check
 *
 * Threads and locking: every field of struct cbw_ctl_server and of its
 * clients is touched only by the server's thread, except the event queue,
 * `nsubscribers` and `stopping`, which `qlock` guards (broadcasters on any
 * thread and cbw_ctl_server_stop() take it), and `wake_fd`, an eventfd
 * written without a lock.  qlock is a leaf: nothing else is locked or
 * called while it is held, so a broadcaster may hold its own module locks.
 */
#ifndef CBW_CONTROL_INTERNAL_H
#define CBW_CONTROL_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "control.h"

/* Hidden: several nbdkit modules, each linking this library statically,
 * may be loaded into one process. */
#pragma GCC visibility push(hidden)

/* Error text without locale or gettext: strerror() takes glibc's locale
 * lock, which is unusable in nbdkit under a preloaded ASan runtime, and is
 * not guaranteed thread-safe. */
static inline const char *
errstr (int e)
{
  const char *s = strerrordesc_np (e);
  return s ? s : "Unknown error";
}

struct client;
struct cbw_ctl_server;

/* The table being served, handed to query_commands (and the connection, to
 * subscribe) through a per-call context (the handler signature only carries
 * module_data). */
struct builtin_ctx {
  const struct cbw_ctl_table *table;
  void *module_data;
  struct cbw_ctl_server *srv;          /* NULL: no connection */
  struct client *client;
  /* subscribe: events to replay after the reply */
  char **replay;
  size_t nreplay, replay_alloc;
};

/* The built-in commands, present in every table and looked up before the
 * module's own so that a module cannot shadow them. */
extern const struct cbw_ctl_command cbw_ctl__builtin_commands[];

/* Iterate over builtins then the module's table. */
#define FOR_EACH_COMMAND(table, cmd, i)                                        \
  for (int i = 0; i < 2; ++i)                                                  \
    for (const struct cbw_ctl_command *cmd =                                   \
           i == 0 ? cbw_ctl__builtin_commands : (table)->commands;             \
         cmd && cmd->name; ++cmd)

/* control_docs.c */
const char *cbw_ctl__arg_type_name (enum cbw_ctl_arg_type t);
int cbw_ctl__query_commands (void *ctxv, struct json_object *args,
                             struct cbw_ctl_reply *reply);

/* control_dispatch.c: one request line in, one reply line out (malloc'd,
 * no newline; NULL only when out of memory). */
char *cbw_ctl__dispatch (struct builtin_ctx *bctx, const char *line,
                         size_t len);
bool cbw_ctl__all_space (const char *p, size_t len);

struct client {
  int fd;                        /* -1 = free slot */
  char *in;                      /* received bytes not yet dispatched */
  size_t in_len, in_alloc;
  size_t scanned;                /* in[0..scanned) has no '\n' */
  char *out;                     /* reply bytes not yet sent */
  size_t out_len, out_off;
  bool closing;                  /* close once out is flushed */
  bool eof;                      /* peer shut down its side: finish the
                                    complete lines, then close (unless
                                    subscribed: then when it closes) */
  bool subscribed;               /* receives broadcast events */
  uint64_t skip_upto;            /* numbered events <= this were replayed */
};

/* One queued broadcast line. */
struct bcast {
  struct bcast *next;
  uint64_t seq;
  size_t len;
  char line[];
};

struct cbw_ctl_server {
  const struct cbw_ctl_table *table;
  void *module_data;
  char *path;
  dev_t sock_dev;                /* identity of the socket file we bound, */
  ino_t sock_ino;                /* so stop only unlinks our own socket */
  int listen_fd;
  int wake_fd;                   /* eventfd: broadcast and server_stop */
  pthread_t thread;
  struct client clients[CBW_CTL_MAX_CLIENTS];
  const struct cbw_ctl_event_source *events;  /* NULL: none */
  struct cbw_ctl_access access;  /* who besides root and our euid */
  size_t max_backlog;
  /* guarded by qlock (see the top of this file) */
  pthread_mutex_t qlock;
  struct bcast *qhead, *qtail;   /* broadcast, not yet distributed */
  size_t qbytes;
  uint64_t qdropped;             /* lines refused: queue full */
  unsigned nsubscribers;         /* no subscriber: broadcast drops at once */
  bool stopping;
};

/* control_server.c */
void cbw_ctl__server_log (struct cbw_ctl_server *srv, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
int cbw_ctl__client_queue (struct client *c, const char *s, size_t len);
int cbw_ctl__client_flush (struct client *c);
void cbw_ctl__client_close (struct cbw_ctl_server *srv, struct client *c);
void cbw_ctl__client_unsubscribe (struct cbw_ctl_server *srv,
                                  struct client *c);

/* control_events.c: on the server thread, hand the queued events to the
 * subscribers.  Returns true if the server is stopping. */
bool cbw_ctl__distribute_events (struct cbw_ctl_server *srv);

#pragma GCC visibility pop

#endif /* CBW_CONTROL_INTERNAL_H */
