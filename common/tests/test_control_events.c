/* cbw — common/tests/test_control_events.c: unit tests of the control
 * socket's pushed events (cbw_ctl_server_broadcast, "subscribe").
 *
 * A test module numbers its events 1, 2, 3 ..., keeps the last RING of them
 * and broadcasts each one under its lock, as control.h asks; clients are
 * real connections (cbw_ctl_client_* and raw sockets).  Checked: events
 * arrive in order and complete, interleaved with replies; "subscribe" with
 * since replays exactly the missing ones while a producer thread keeps
 * broadcasting (no gap, no duplicate); a subscriber that stops reading is
 * dropped with a logged reason while the producer never blocks and other
 * subscribers get everything; a server thread stuck in a handler makes
 * broadcast fail fast (ENOBUFS) and drops the subscribers rather than
 * losing events silently; argument errors.
 *
 * Locking: the module's ring and counter are under mod.lock (the history
 * callback takes it on the control thread, producers on test threads); the
 * log callback's buffer is under log_lock.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <json-c/json.h>

#include "cbw_err.h"
#include "cleanup.h"
#include "control.h"

#define RING 64

struct evmod {
  pthread_mutex_t lock;
  uint64_t seq;                  /* last event number */
  char *ring[RING];              /* ring[s % RING] = line of event s */
  struct cbw_ctl_server *srv;
  /* "block": the handler waits here until released (queue overflow test) */
  pthread_mutex_t block_lock;
  pthread_cond_t block_cond;
  bool blocked, release;
};

static struct evmod mod = {
  .lock = PTHREAD_MUTEX_INITIALIZER,
  .block_lock = PTHREAD_MUTEX_INITIALIZER,
  .block_cond = PTHREAD_COND_INITIALIZER,
};
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char log_buf[4096];
static char sock[128], dir[64];

/* Record and broadcast one event whose data carries `pad` bytes. */
static int
produce (size_t pad)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&mod.lock);
  uint64_t s = ++mod.seq;
  char *line, *p = malloc (pad + 1);
  cr_assert_not_null (p);
  memset (p, 'x', pad);
  p[pad] = '\0';
  cr_assert_geq (asprintf (&line, "{\"event\":\"tick\",\"data\":{\"n\":%" PRIu64
                           ",\"pad\":\"%s\"},\"seq\":%" PRIu64 "}", s, p, s), 0);
  free (p);
  free (mod.ring[s % RING]);
  mod.ring[s % RING] = line;
  return cbw_ctl_server_broadcast (mod.srv, s, line);
}

static int
history (void *data, uint64_t since, cbw_ctl_emit_fn emit, void *ctx,
         uint64_t *last, bool *lost)
{
  struct evmod *m = data;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&m->lock);
  uint64_t first = m->seq > RING ? m->seq - RING + 1 : 1;
  *last = m->seq;
  *lost = false;
  if (since >= m->seq)
    return 0;
  if (since + 1 < first)
    *lost = true;
  for (uint64_t s = since + 1 > first ? since + 1 : first; s <= m->seq; s++)
    if (emit (ctx, s, m->ring[s % RING]) < 0)
      return -1;
  return 0;
}

static void
logger (void *data, const char *msg)
{
  (void) data;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&log_lock);
  snprintf (log_buf + strlen (log_buf), sizeof log_buf - strlen (log_buf), "%s\n", msg);
}

static int
h_ping (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  (void) data; (void) args;
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "pong", json_object_new_boolean (true));
  return 0;
}

static int
h_block (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct evmod *m = data;
  (void) args; (void) r;
  pthread_mutex_lock (&m->block_lock);
  m->blocked = true;
  pthread_cond_broadcast (&m->block_cond);
  while (!m->release)
    pthread_cond_wait (&m->block_cond, &m->block_lock);
  pthread_mutex_unlock (&m->block_lock);
  return 0;
}

static const struct cbw_ctl_arg no_args[] = { { NULL } };
static const struct cbw_ctl_command cmds[] = {
  { "ping", h_ping, no_args, "Answer.", NULL },
  { "block", h_block, no_args, "Hold the control thread until released.", NULL },
  CBW_CTL_EVENT_COMMANDS,
  { NULL }
};
static const struct cbw_ctl_table table = { "evtest", cmds };
static const struct cbw_ctl_table plain_table = { "plain", cmds };

static struct cbw_ctl_event_source source = {
  .history = history, .log = logger,
};

static void
start_with (const struct cbw_ctl_table *t, const struct cbw_ctl_event_source *ev,
            size_t backlog)
{
  struct cbw_err err = { 0 };
  strcpy (dir, "/tmp/cbw-ctlev.XXXXXX");
  cr_assert_not_null (mkdtemp (dir));
  snprintf (sock, sizeof sock, "%s/ctl.sock", dir);
  source.max_backlog = backlog;
  log_buf[0] = '\0';
  mod.blocked = mod.release = false;
  mod.srv = cbw_ctl_server_start_events (sock, t, &mod, ev, &err);
  cr_assert_not_null (mod.srv, "%s", err.msg);
}

static void start (void) { start_with (&table, &source, 0); }

static void
stop (void)
{
  struct cbw_ctl_server *s;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&mod.lock);
    s = mod.srv;
    mod.srv = NULL;
  }
  cbw_ctl_server_stop (s);
  rmdir (dir);
  for (int i = 0; i < RING; i++) {
    free (mod.ring[i]);
    mod.ring[i] = NULL;
  }
  mod.seq = 0;
}

static struct cbw_ctl_client *
connect_client (void)
{
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, &err);
  cr_assert_not_null (c, "%s", err.msg);
  cbw_ctl_client_set_timeout (c, 20000);
  return c;
}

/* subscribe (since < 0: without), returns the reply's "return" */
static struct json_object *
subscribe (struct cbw_ctl_client *c, long long since)
{
  struct cbw_err err = { 0 };
  struct json_object *args = json_object_new_object (), *ret = NULL;
  if (since >= 0)
    json_object_object_add (args, "since", json_object_new_int64 (since));
  cr_assert_eq (cbw_ctl_client_execute (c, "subscribe", args, &ret, NULL, &err), 0,
                "subscribe: %s", err.msg);
  return ret;
}

/* Next event's seq (and check its shape and data.n). */
static uint64_t
next_seq (struct cbw_ctl_client *c)
{
  struct cbw_err err = { 0 };
  char *line = cbw_ctl_client_read_event (c, 20000, &err);
  cr_assert_not_null (line, "no event: %s", err.msg);
  struct json_object *o = json_tokener_parse (line), *v, *d, *n;
  cr_assert_not_null (o, "not JSON: %s", line);
  cr_assert (json_object_object_get_ex (o, "event", &v));
  cr_assert (!json_object_object_get_ex (o, "return", NULL) &&
             !json_object_object_get_ex (o, "error", NULL));
  cr_assert (json_object_object_get_ex (o, "seq", &v));
  uint64_t s = (uint64_t) json_object_get_int64 (v);
  cr_assert (json_object_object_get_ex (o, "data", &d) &&
             json_object_object_get_ex (d, "n", &n));
  cr_assert_eq ((uint64_t) json_object_get_int64 (n), s);
  json_object_put (o);
  free (line);
  return s;
}

static int64_t
jint (struct json_object *o, const char *k)
{
  struct json_object *v;
  cr_assert (json_object_object_get_ex (o, k, &v), "no %s", k);
  return json_object_get_int64 (v);
}

TestSuite (events, .init = start, .fini = stop, .timeout = 120);

Test (events, subscribe_order_and_interleaved_replies)
{
  struct cbw_ctl_client *c = connect_client ();
  struct cbw_err err = { 0 };
  struct json_object *r;

  cr_assert_eq (produce (0), 0);           /* before: not delivered */
  r = subscribe (c, -1);
  cr_assert_eq (jint (r, "last"), 1);
  cr_assert_eq (jint (r, "replayed"), 0);
  json_object_put (r);
  /* Events and replies interleave: a call in the middle of a stream gets
   * its reply, the events around it are kept for read_event, in order. */
  for (int i = 0; i < 300; i++) {
    cr_assert_eq (produce (10), 0);
    if (i % 50 == 25) {
      struct json_object *ret = NULL;
      cr_assert_eq (cbw_ctl_client_execute (c, "ping", NULL, &ret, NULL, &err), 0, "%s",
                    err.msg);
      json_object_put (ret);
    }
  }
  for (uint64_t want = 2; want <= 301; want++)
    cr_assert_eq (next_seq (c), want);
  /* nothing more */
  char *extra = cbw_ctl_client_read_event (c, 200, &err);
  cr_assert_null (extra, "unexpected event %s", extra);
  cr_assert_eq (err.errnum, ETIMEDOUT);
  /* unsubscribe: no more events, replies still work */
  cr_assert_eq (cbw_ctl_client_execute (c, "unsubscribe", NULL, NULL, NULL, &err), 0);
  cr_assert_eq (produce (0), 0);
  cr_assert_null (cbw_ctl_client_read_event (c, 200, &err));
  cbw_ctl_client_close (c);
}

/* The raw wire: a reply line has "return" and the id, an event line
 * "event"; the subscribe reply comes before the replayed events. */
Test (events, wire_shape_and_replay_after_reply)
{
  for (int i = 0; i < 5; i++)
    produce (0);
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM, 0);
  strcpy (sun.sun_path, sock);
  cr_assert_eq (connect (fd, (struct sockaddr *) &sun, sizeof sun), 0);
  const char *req = "{\"execute\":\"subscribe\",\"arguments\":{\"since\":2},\"id\":7}\n";
  cr_assert_eq (write (fd, req, strlen (req)), (ssize_t) strlen (req));
  /* The subscriber may shut down its sending side: it stays subscribed. */
  shutdown (fd, SHUT_WR);
  FILE *f = fdopen (fd, "r");
  char *line = NULL;
  size_t n = 0;
  cr_assert_gt (getline (&line, &n, f), 0);            /* greeting */
  cr_assert_not_null (strstr (line, "\"cbw\""));
  cr_assert_gt (getline (&line, &n, f), 0);
  struct json_object *o = json_tokener_parse (line), *ret;
  cr_assert (json_object_object_get_ex (o, "return", &ret), "%s", line);
  cr_assert_eq (jint (o, "id"), 7);
  cr_assert_eq (jint (ret, "last"), 5);
  cr_assert_eq (jint (ret, "replayed"), 3);
  json_object_put (o);
  produce (0);
  for (int want = 3; want <= 6; want++) {
    cr_assert_gt (getline (&line, &n, f), 0);
    o = json_tokener_parse (line);
    cr_assert (json_object_object_get_ex (o, "event", NULL), "%s", line);
    cr_assert_eq (jint (o, "seq"), want);
    json_object_put (o);
  }
  free (line);
  fclose (f);
}

/* The race subscribe-with-since must close: a producer broadcasts without
 * pause while clients poll the history and subscribe with since = what
 * they saw; each must then see every later event exactly once. */
struct pace { volatile bool stop; unsigned long produced; };

static void *
producer (void *arg)
{
  struct pace *p = arg;
  while (!p->stop) {
    cr_assert_eq (produce (20), 0);
    p->produced++;
    if (p->produced % 64 == 0) {
      struct timespec ts = { 0, 200000 };
      nanosleep (&ts, NULL);
    }
  }
  return NULL;
}

Test (events, replay_with_since_races_a_producer)
{
  struct pace p = { 0 };
  pthread_t th;
  cr_assert_eq (pthread_create (&th, NULL, producer, &p), 0);
  for (int round = 0; round < 20; round++) {
    struct cbw_ctl_client *c = connect_client ();
    uint64_t since;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&mod.lock);
      since = mod.seq > 10 ? mod.seq - 10 : 0;   /* "polled up to here" */
    }
    struct json_object *r = subscribe (c, (long long) since);
    uint64_t last = (uint64_t) jint (r, "last");
    /* if the producer ran more than RING ahead meanwhile, the replay starts
     * at the oldest kept event and says so */
    bool lost = json_object_get_boolean (json_object_object_get (r, "lost"));
    uint64_t from = lost ? last - RING + 1 : since + 1;
    cr_assert_eq (lost, last - since > RING);
    cr_assert_eq ((uint64_t) jint (r, "replayed"), last - from + 1);
    json_object_put (r);
    /* every event after since, in order, also past `last` (live ones) */
    for (uint64_t want = from; want <= last + 200; want++)
      cr_assert_eq (next_seq (c), want, "round %d: gap or duplicate", round);
    cbw_ctl_client_close (c);
  }
  p.stop = true;
  pthread_join (th, NULL);
}

/* Deterministic version of that race: events queued for distribution
 * while the control thread was busy, then "subscribe since" handled before
 * they are distributed: the replay has them, the queue must not send them
 * again.  C pipelines "block" and "subscribe" so both run back to back. */
Test (events, replay_skips_events_already_queued)
{
  struct cbw_ctl_client *other = connect_client ();
  json_object_put (subscribe (other, -1));   /* keeps broadcasts queued */
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM, 0);
  strcpy (sun.sun_path, sock);
  cr_assert_eq (connect (fd, (struct sockaddr *) &sun, sizeof sun), 0);
  const char *req = "{\"execute\":\"block\",\"id\":1}\n"
    "{\"execute\":\"subscribe\",\"arguments\":{\"since\":0},\"id\":2}\n";
  cr_assert_eq (write (fd, req, strlen (req)), (ssize_t) strlen (req));
  pthread_mutex_lock (&mod.block_lock);
  while (!mod.blocked)
    pthread_cond_wait (&mod.block_cond, &mod.block_lock);
  pthread_mutex_unlock (&mod.block_lock);
  for (int i = 0; i < 5; i++)
    cr_assert_eq (produce (0), 0);
  pthread_mutex_lock (&mod.block_lock);
  mod.release = true;
  pthread_cond_broadcast (&mod.block_cond);
  pthread_mutex_unlock (&mod.block_lock);
  FILE *f = fdopen (fd, "r+");
  char *line = NULL;
  size_t n = 0;
  cr_assert_gt (getline (&line, &n, f), 0);            /* greeting */
  cr_assert_gt (getline (&line, &n, f), 0);            /* block's reply */
  cr_assert_not_null (strstr (line, "\"id\":1"), "%s", line);
  cr_assert_gt (getline (&line, &n, f), 0);
  struct json_object *o = json_tokener_parse (line), *ret;
  cr_assert (json_object_object_get_ex (o, "return", &ret), "%s", line);
  cr_assert_eq (jint (ret, "replayed"), 5);
  json_object_put (o);
  for (int want = 1; want <= 6; want++) {
    if (want == 6)
      produce (0);
    cr_assert_gt (getline (&line, &n, f), 0);
    o = json_tokener_parse (line);
    cr_assert_eq (jint (o, "seq"), want, "duplicate or gap: %s", line);
    json_object_put (o);
  }
  free (line);
  fclose (f);
  cbw_ctl_client_close (other);
}

Test (events, replay_reports_lost)
{
  for (int i = 0; i < RING + 10; i++)
    produce (0);
  struct cbw_ctl_client *c = connect_client ();
  struct json_object *r = subscribe (c, 1);
  cr_assert (json_object_get_boolean (json_object_object_get (r, "lost")));
  cr_assert_eq (jint (r, "replayed"), RING);
  json_object_put (r);
  cr_assert_eq (next_seq (c), 11);           /* the oldest kept */
  cbw_ctl_client_close (c);
}

/* B reads in a thread; A never reads.  The producer must never wait. */
struct reader {
  struct cbw_ctl_client *c;
  volatile uint64_t got;
  uint64_t want;
  bool ok;
  char why[1024];
};

static void *
reader (void *arg)
{
  struct reader *r = arg;

  for (uint64_t want = 1; want <= r->want; want++) {
    struct cbw_err err = { 0 };
    char *line = cbw_ctl_client_read_event (r->c, 20000, &err);
    struct json_object *o = line ? json_tokener_parse (line) : NULL, *v;
    if (o == NULL || !json_object_object_get_ex (o, "seq", &v) ||
        (uint64_t) json_object_get_int64 (v) != want) {
      snprintf (r->why, sizeof r->why, "want %" PRIu64 ": %.80s (%s)", want,
                line ? line : "-", err.msg);
      r->ok = false;
      json_object_put (o);
      free (line);
      return NULL;
    }
    json_object_put (o);
    free (line);
    r->got = want;
  }
  return NULL;
}

static int64_t
now_us (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void start_small (void) { start_with (&table, &source, 64 * 1024); }

Test (events, slow_reader_dropped_producer_never_blocks, .init = start_small, .fini = stop)
{
  const uint64_t N = 3000;                  /* x ~1 KiB: far more than A's socket holds */
  struct cbw_ctl_client *a = connect_client (), *b = connect_client ();
  json_object_put (subscribe (a, -1));
  json_object_put (subscribe (b, -1));
  struct reader rb = { .c = b, .want = N, .ok = true };
  pthread_t th;
  cr_assert_eq (pthread_create (&th, NULL, reader, &rb), 0);
  int64_t worst = 0;
  for (uint64_t i = 1; i <= N; i++) {
    int64_t t0 = now_us ();
    cr_assert_eq (produce (1000), 0, "broadcast failed: %m");
    int64_t dt = now_us () - t0;
    if (dt > worst) worst = dt;
    /* pace on B only (B must not be dropped), never on A */
    while (rb.ok && rb.got + 32 < i) {
      struct timespec ts = { 0, 100000 };
      nanosleep (&ts, NULL);
    }
  }
  pthread_join (th, NULL);
  cr_assert (rb.ok, "B lost or reordered events (got %" PRIu64 "): %s; log: %s", rb.got, rb.why, log_buf);
  cr_assert_eq (rb.got, N);
  /* a broadcast is a copy and a wake-up: far below a second even on a
   * loaded, sanitized build (it would hang forever if it blocked on A) */
  cr_assert_lt (worst, 5000000, "a broadcast took %" PRId64 " us", worst);
  /* A: what fit in its socket, then EOF, and the reason in the log */
  struct cbw_err err = { 0 };
  uint64_t seen = 0;
  char *line;
  while ((line = cbw_ctl_client_read_event (a, 20000, &err)) != NULL) {
    seen++;
    free (line);
  }
  cr_assert_eq (err.errnum, ECONNRESET, "A: %s", err.msg);
  cr_assert_lt (seen, N, "A was never dropped");
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&log_lock);
    cr_assert_not_null (strstr (log_buf, "does not read its events"), "log: %s", log_buf);
  }
  /* the server still serves */
  struct cbw_ctl_client *c = connect_client ();
  cr_assert_eq (cbw_ctl_client_execute (c, "ping", NULL, NULL, NULL, &err), 0);
  cbw_ctl_client_close (c);
  cbw_ctl_client_close (a);
  cbw_ctl_client_close (b);
}

/* The control thread is stuck in a handler: broadcasts queue up to the
 * limit, then fail at once with ENOBUFS; the subscriber is dropped when the
 * thread comes back (it would otherwise miss events without knowing). */
static void *
call_block (void *arg)
{
  struct cbw_ctl_client *c = arg;
  struct cbw_err err = { 0 };
  cbw_ctl_client_execute (c, "block", NULL, NULL, NULL, &err);
  return NULL;
}

Test (events, stuck_server_thread_overflow_drops_subscribers)
{
  struct cbw_ctl_client *s = connect_client (), *blk = connect_client ();
  json_object_put (subscribe (s, -1));
  pthread_t th;
  cr_assert_eq (pthread_create (&th, NULL, call_block, blk), 0);
  pthread_mutex_lock (&mod.block_lock);
  while (!mod.blocked)
    pthread_cond_wait (&mod.block_cond, &mod.block_lock);
  pthread_mutex_unlock (&mod.block_lock);
  int fails = 0, i;
  int64_t t0 = now_us ();
  for (i = 0; i < 400 && fails == 0; i++)   /* 400 x 64 KiB > 16 MiB */
    if (produce (64 * 1024) == -1) {
      cr_assert_eq (errno, ENOBUFS);
      fails++;
    }
  cr_assert_eq (fails, 1, "the queue never filled");
  cr_assert_lt (now_us () - t0, 30 * 1000000);
  pthread_mutex_lock (&mod.block_lock);
  mod.release = true;
  pthread_cond_broadcast (&mod.block_cond);
  pthread_mutex_unlock (&mod.block_lock);
  pthread_join (th, NULL);
  struct cbw_err err = { 0 };
  char *line;
  while ((line = cbw_ctl_client_read_event (s, 20000, &err)) != NULL)
    free (line);
  cr_assert_eq (err.errnum, ECONNRESET, "subscriber not dropped: %s", err.msg);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&log_lock);
    cr_assert_not_null (strstr (log_buf, "could not be queued"), "log: %s", log_buf);
  }
  cbw_ctl_client_close (s);
  cbw_ctl_client_close (blk);
}

Test (events, argument_errors)
{
  struct cbw_ctl_client *c = connect_client ();
  struct cbw_err err = { 0 };
  struct json_object *args = json_object_new_object ();
  int cls;
  json_object_object_add (args, "since", json_object_new_int64 (-1));
  cr_assert_eq (cbw_ctl_client_execute (c, "subscribe", args, NULL, &cls, &err), -1);
  cr_assert_eq (cls, CBW_CTL_INVALID_PARAMETER);
  args = json_object_new_object ();
  json_object_object_add (args, "bogus", json_object_new_int64 (1));
  cr_assert_eq (cbw_ctl_client_execute (c, "subscribe", args, NULL, &cls, &err), -1);
  cr_assert_eq (cls, CBW_CTL_INVALID_PARAMETER);
  cbw_ctl_client_close (c);
  /* no connection: dispatch_line / call_local cannot subscribe */
  const char *l = "{\"execute\":\"subscribe\"}";
  char *r = cbw_ctl_dispatch_line (&table, &mod, l, strlen (l));
  cr_assert_not_null (strstr (r, "GenericError"), "%s", r);
  free (r);
  struct cbw_ctl_reply rep;
  cr_assert_eq (cbw_ctl_call_local (&table, &mod, "subscribe", NULL, NULL, &rep), -1);
  /* broadcast refuses lines that would break the framing */
  cr_assert_eq (cbw_ctl_server_broadcast (mod.srv, 0, "{\"event\":\"a\"}\n{}"), -1);
  cr_assert_eq (errno, EINVAL);
  cr_assert_eq (cbw_ctl_server_broadcast (NULL, 1, "{}"), 0);
}

/* A server without an event source: subscribe works (live events only),
 * since is refused. */
static void start_plain (void) { start_with (&plain_table, NULL, 0); }

Test (events, no_history, .init = start_plain, .fini = stop)
{
  struct cbw_ctl_client *c = connect_client ();
  struct cbw_err err = { 0 };
  struct json_object *args = json_object_new_object (), *r;
  int cls;
  json_object_object_add (args, "since", json_object_new_int64 (0));
  cr_assert_eq (cbw_ctl_client_execute (c, "subscribe", args, NULL, &cls, &err), -1);
  cr_assert_eq (cls, CBW_CTL_INVALID_PARAMETER);
  cr_assert_not_null (strstr (err.msg, "no event history"), "%s", err.msg);
  r = subscribe (c, -1);
  cr_assert_eq (jint (r, "last"), 0);
  json_object_put (r);
  produce (0);
  produce (0);
  cr_assert_eq (next_seq (c), 1);
  cr_assert_eq (next_seq (c), 2);
  cbw_ctl_client_close (c);
}

/* call_local runs a command with validation, no socket. */
Test (local, call_local_validates)
{
  struct cbw_ctl_reply rep;
  struct json_object *ret = NULL, *args = json_object_new_object ();
  cr_assert_eq (cbw_ctl_call_local (&table, &mod, "ping", NULL, &ret, &rep), 0);
  cr_assert (json_object_get_boolean (json_object_object_get (ret, "pong")));
  json_object_put (ret);
  json_object_object_add (args, "x", json_object_new_int (1));
  cr_assert_eq (cbw_ctl_call_local (&table, &mod, "ping", args, &ret, &rep), -1);
  cr_assert_eq (rep.err_class, CBW_CTL_INVALID_PARAMETER);
  cr_assert_not_null (strstr (rep.err_desc, "unknown argument 'x'"), "%s", rep.err_desc);
  cr_assert_eq (cbw_ctl_validate_args (&table, "ping", args, &rep), -1);
  cr_assert_eq (cbw_ctl_call_local (&table, &mod, "nope", NULL, &ret, &rep), -1);
  cr_assert_eq (rep.err_class, CBW_CTL_COMMAND_NOT_FOUND);
  json_object_put (args);
}
