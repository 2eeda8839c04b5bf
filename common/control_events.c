/* cbw — common/control_events.c: pushed events on a control socket.  The
 * "subscribe"/"unsubscribe" handlers, cbw_ctl_server_broadcast() and the
 * server thread's distribution of the queue to the subscribers.
 *
 * cbw_ctl_server_broadcast() (any thread) appends a copy of the line to the
 * server's event queue and writes the eventfd `wake_fd`; the server thread
 * takes the whole queue and appends each line to the output of every
 * subscribed client, in queue order, skipping for a client the numbered
 * events its "subscribe" already replayed (seq <= skip_upto).  A client
 * whose unsent output would pass max_backlog bytes is closed with a logged
 * reason; if the queue itself overflows (server thread stuck in a slow
 * handler), every subscriber is closed at the next drain, so that no
 * subscriber ever misses an event silently.  A subscriber that shut down its
 * sending side stays connected (it may only want events) until it closes.
 *
 * Threads and locking: the queue, `nsubscribers` and `stopping` are guarded
 * by the leaf lock `qlock` (control_internal.h); the clients are the server
 * thread's alone, and the handlers run on it.  The event history callback
 * of "subscribe" takes its module's own locks.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cleanup.h"
#include "control_internal.h"

const struct cbw_ctl_arg cbw_ctl_subscribe_args[] = {
  { "since", CBW_ARG_UINT, false, "replay the kept events with a sequence "
    "number above this first (default: no replay)" },
  { NULL }
};
const struct cbw_ctl_arg cbw_ctl_no_args[] = { { NULL } };

static int
collect_replay (void *ctxv, uint64_t seq, const char *line)
{
  struct builtin_ctx *ctx = ctxv;
  char *copy;

  (void) seq;
  if (line == NULL || strchr (line, '\n') != NULL)
    return 0;                    /* never send a malformed line */
  if (ctx->nreplay == ctx->replay_alloc) {
    size_t n = ctx->replay_alloc ? ctx->replay_alloc * 2 : 64;
    char **p = realloc (ctx->replay, n * sizeof *p);
    if (p == NULL)
      return -1;
    ctx->replay = p;
    ctx->replay_alloc = n;
  }
  if ((copy = strdup (line)) == NULL)
    return -1;
  ctx->replay[ctx->nreplay++] = copy;
  return 0;
}

static void
drop_replay (struct builtin_ctx *ctx)
{
  for (size_t i = 0; i < ctx->nreplay; i++)
    free (ctx->replay[i]);
  free (ctx->replay);
  ctx->replay = NULL;
  ctx->nreplay = ctx->replay_alloc = 0;
}

int
cbw_ctl_subscribe_handler (void *ctxv, struct json_object *args,
                           struct cbw_ctl_reply *reply)
{
  struct builtin_ctx *ctx = ctxv;
  struct cbw_ctl_server *srv = ctx->srv;
  struct client *c = ctx->client;
  const struct cbw_ctl_event_source *ev;
  bool has_since = json_object_object_get_ex (args, "since", NULL);
  uint64_t since = (uint64_t) cbw_ctl_arg_int (args, "since", 0);
  uint64_t last = 0;
  bool lost = false, newly = false;

  if (srv == NULL || c == NULL)
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "subscribe needs a "
                         "control connection");
  ev = srv->events;
  if (has_since && (ev == NULL || ev->history == NULL))
    return cbw_ctl_fail (reply, CBW_CTL_INVALID_PARAMETER, "argument "
                         "'since': the '%s' module keeps no event history",
                         srv->table->module);
  /* Count the subscriber before reading the history: an event recorded
   * after that read is then queued for us, not dropped (see top). */
  if (!c->subscribed) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    srv->nsubscribers++;
    c->subscribed = newly = true;
  }
  if (ev && ev->history &&
      ev->history (srv->module_data, has_since ? since : CBW_CTL_NO_REPLAY,
                   collect_replay, ctx, &last, &lost) != 0) {
    drop_replay (ctx);
    if (newly)
      cbw_ctl__client_unsubscribe (srv, c);
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "reading the event "
                         "history failed");
  }
  c->skip_upto = last;
  reply->ret = json_object_new_object ();
  if (reply->ret == NULL) {
    drop_replay (ctx);
    if (newly)
      cbw_ctl__client_unsubscribe (srv, c);
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "out of memory");
  }
  json_object_object_add (reply->ret, "last",
                          json_object_new_int64 ((int64_t) last));
  json_object_object_add (reply->ret, "replayed",
                          json_object_new_int64 ((int64_t) ctx->nreplay));
  json_object_object_add (reply->ret, "lost",
                          json_object_new_boolean (lost));
  return 0;
}

int
cbw_ctl_unsubscribe_handler (void *ctxv, struct json_object *args,
                             struct cbw_ctl_reply *reply)
{
  struct builtin_ctx *ctx = ctxv;

  (void) args;
  if (ctx->srv == NULL || ctx->client == NULL)
    return cbw_ctl_fail (reply, CBW_CTL_GENERIC_ERROR, "unsubscribe needs a "
                         "control connection");
  cbw_ctl__client_unsubscribe (ctx->srv, ctx->client);
  return 0;
}

int
cbw_ctl_server_broadcast (struct cbw_ctl_server *srv, uint64_t seq,
                          const char *line)
{
  struct bcast *b;
  size_t len;
  uint64_t one = 1;

  if (srv == NULL)
    return 0;
  if (line == NULL || (len = strlen (line)) == 0 || len > CBW_CTL_MAX_LINE ||
      memchr (line, '\n', len) != NULL) {
    errno = EINVAL;
    return -1;
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    if (srv->nsubscribers == 0 || srv->stopping)
      return 0;                  /* nobody to tell */
  }
  /* Copy outside the lock; a subscriber that came meanwhile is checked
   * again below. */
  b = malloc (sizeof *b + len + 1);
  if (b == NULL) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    srv->qdropped++;             /* subscribers are dropped: none misses it */
    errno = ENOMEM;
    return -1;
  }
  b->next = NULL;
  b->seq = seq;
  b->len = len;
  memcpy (b->line, line, len + 1);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    if (srv->nsubscribers == 0 || srv->stopping) {
      free (b);
      return 0;
    }
    if (srv->qbytes + len > CBW_CTL_EVENT_QUEUE_MAX) {
      srv->qdropped++;
      free (b);
      errno = ENOBUFS;
      return -1;
    }
    if (srv->qtail)
      srv->qtail->next = b;
    else
      srv->qhead = b;
    srv->qtail = b;
    srv->qbytes += len;
  }
  while (write (srv->wake_fd, &one, sizeof one) < 0 && errno == EINTR)
    ;
  return 0;
}

/* Server thread: hand the queued events to the subscribers. */
bool
cbw_ctl__distribute_events (struct cbw_ctl_server *srv)
{
  struct bcast *list, *next;
  uint64_t dropped;
  uint64_t n;
  bool stopping;
  int i;

  while (read (srv->wake_fd, &n, sizeof n) < 0 && errno == EINTR)
    ;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    list = srv->qhead;
    srv->qhead = srv->qtail = NULL;
    srv->qbytes = 0;
    dropped = srv->qdropped;
    srv->qdropped = 0;
    stopping = srv->stopping;
  }
  if (dropped > 0 && !stopping)
    for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i) {
      struct client *c = &srv->clients[i];
      if (c->fd >= 0 && c->subscribed) {
        cbw_ctl__server_log (srv, "dropping event subscriber (fd %d): %"
                             PRIu64 " event(s) could not be queued (queue "
                             "full or out of memory); it must subscribe "
                             "again with 'since'", c->fd, dropped);
        cbw_ctl__client_close (srv, c);
      }
    }
  for (; list; list = next) {
    next = list->next;
    for (i = 0; !stopping && i < CBW_CTL_MAX_CLIENTS; ++i) {
      struct client *c = &srv->clients[i];
      size_t backlog;
      if (c->fd < 0 || !c->subscribed ||
          (list->seq != 0 && list->seq <= c->skip_upto))
        continue;
      backlog = c->out_len - c->out_off;
      if (backlog + list->len + 1 > srv->max_backlog) {
        cbw_ctl__server_log (srv, "dropping event subscriber (fd %d): it "
                             "does not read its events (%zu bytes waiting, "
                             "limit %zu; at event %" PRIu64 ")", c->fd,
                             backlog, srv->max_backlog,
                    list->seq);
        cbw_ctl__client_close (srv, c);
        continue;
      }
      if (cbw_ctl__client_queue (c, list->line, list->len) == -1 ||
          cbw_ctl__client_flush (c) == -1)
        cbw_ctl__client_close (srv, c);
    }
    free (list);
  }
  return stopping;
}
