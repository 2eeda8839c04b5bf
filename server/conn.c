/* cbw — server/conn.c: cbwd's connections on libuv.
 *
 * One struct cbwd_conn per client.  The loop thread reads bytes into the
 * connection's protocol session (nbd_session.c); each complete request goes
 * to a pending queue and from there to libuv's thread pool
 * (uv_queue_work), so blocking file and upstream I/O never runs on the loop.
 * Exception without blocking: page-cache hits of file exports are served on
 * the loop with preadv2/pwritev2(RWF_NOWAIT), which fail with EAGAIN instead
 * of waiting (then the request goes to the pool).
 * When a request completes, its reply is built and written on the loop
 * thread; replies go out in completion order (out of order on the wire, as
 * NBD allows; cookies match them up).
 *
 * Limits per connection: at most max_inflight requests executing and at most
 * max_inflight_bytes of payloads and replies held; past either, requests
 * wait in the pending queue and reading from the socket stops, so a client
 * that floods requests or never reads its replies only slows itself.  A
 * client still in the handshake after handshake_timeout_ms is dropped.
 *
 * Threads and fields: every field of struct cbwd_conn is touched only by the
 * loop thread.  A pool thread touches only the struct cbwd_request inside
 * its struct work (see nbd_session.h for request ownership).  Lifetime: a
 * connection is freed in the close callback of its handle, which is started
 * only when no request is executing (inflight == 0), so no pool thread can
 * hold a pointer to it.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "nbd_proto.h"
#include "nbd_session.h"
#include "server.h"

struct pending {
  struct pending *next;
  struct cbwd_request *r;
};

struct cbwd_conn {
  union { uv_tcp_t tcp; uv_pipe_t pipe; uv_stream_t stream; uv_handle_t handle; } h;
  uv_timer_t timer;                /* handshake timeout */
  struct cbwd_server *srv;
  struct cbwd_conn *prev, *next;   /* srv->conns list */
  struct cbwd_session sess;
  uint8_t rbuf[65536];
  bool direct;                     /* last alloc_cb handed out a payload buffer */
  bool reading;
  bool closing;                    /* no more reads; close when idle */
  bool drop;                       /* peer gone: drop pending requests */
  bool close_started;
  bool shutdown_started;           /* uv_shutdown pending, then close */
  bool timer_active;
  unsigned id;
  unsigned inflight;               /* requests on the thread pool */
  uint64_t held_bytes;             /* payloads + replies held */
  struct pending *pend_head, *pend_tail;
  size_t npending;
};

struct work {
  uv_work_t w;
  struct cbwd_conn *c;
  struct cbwd_request *r;
  uint64_t bytes;                  /* what it adds to held_bytes */
};

struct wreq {
  uv_write_t w;
  struct cbwd_conn *c;
  struct cbwd_request *r;          /* may be NULL (handshake bytes) */
  struct cbwd_reply rep;
  uint8_t *raw;                    /* handshake bytes */
  uint64_t bytes;
  uv_buf_t bufs[];
};

static unsigned next_conn_id;

void
cbwd_log (const char *fmt, ...)
{
  char buf[1024];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (buf, sizeof buf, fmt, ap);
  va_end (ap);
  struct timespec ts;
  clock_gettime (CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r (&ts.tv_sec, &tm);
  fprintf (stderr, "cbwd: %02d:%02d:%02d.%03ld %s\n", tm.tm_hour, tm.tm_min,
           tm.tm_sec, ts.tv_nsec / 1000000, buf);
}

void
cbwd_debug (struct cbwd_server *srv, const char *fmt, ...)
{
  if (!srv->verbose) return;
  char buf[1024];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (buf, sizeof buf, fmt, ap);
  va_end (ap);
  cbwd_log ("%s", buf);
}

static void conn_pump (struct cbwd_conn *c);
static void conn_maybe_close (struct cbwd_conn *c);

static void
conn_freed (uv_handle_t *h)
{
  struct cbwd_conn *c = h->data;
  struct cbwd_server *srv = c->srv;
  if (c->prev) c->prev->next = c->next; else srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  srv->nconns--;
  while (c->pend_head) {
    struct pending *p = c->pend_head;
    c->pend_head = p->next;
    cbwd_request_free (p->r);
    free (p);
  }
  cbwd_session_free (&c->sess);
  cbwd_debug (srv, "conn %u: closed", c->id);
  free (c);
}

static void
timer_closed (uv_handle_t *h)
{
  struct cbwd_conn *c = h->data;
  uv_close (&c->h.handle, conn_freed);
}

static void
conn_close_now (struct cbwd_conn *c)
{
  if (c->close_started) return;
  c->close_started = true;
  if (c->reading) uv_read_stop (&c->h.stream);
  c->reading = false;
  uv_timer_stop (&c->timer);
  uv_close ((uv_handle_t *) &c->timer, timer_closed);
}

static void
shutdown_done (uv_shutdown_t *req, int status)
{
  (void) status;
  struct cbwd_conn *c = req->data;
  free (req);
  conn_close_now (c);
}

/* Close once nothing is executing or waiting; pending replies are flushed
 * first (uv_shutdown waits for queued writes) unless the peer is gone. */
static void
conn_maybe_close (struct cbwd_conn *c)
{
  if (!c->closing || c->close_started || c->inflight > 0 || c->npending > 0)
    return;
  if (c->reading) { uv_read_stop (&c->h.stream); c->reading = false; }
  if (c->shutdown_started)
    return;
  if (!c->drop) {
    uv_shutdown_t *req = malloc (sizeof *req);
    if (req) {
      req->data = c;
      if (uv_shutdown (req, &c->h.stream, shutdown_done) == 0) {
        c->shutdown_started = true;    /* shutdown_done closes */
        return;
      }
      free (req);
    }
  }
  conn_close_now (c);
}

static void
conn_fail (struct cbwd_conn *c, bool drop)
{
  c->closing = true;
  if (drop) {
    c->drop = true;
    while (c->pend_head) {
      struct pending *p = c->pend_head;
      c->pend_head = p->next;
      cbwd_request_free (p->r);
      free (p);
    }
    c->pend_tail = NULL;
    c->npending = 0;
  }
  if (c->reading) { uv_read_stop (&c->h.stream); c->reading = false; }
  conn_maybe_close (c);
}

static void
write_done (uv_write_t *w, int status)
{
  struct wreq *wr = (struct wreq *) w;
  struct cbwd_conn *c = wr->c;
  c->held_bytes -= wr->bytes;
  if (wr->r) cbwd_request_free (wr->r);
  cbwd_reply_free (&wr->rep);
  free (wr->raw);
  free (wr);
  if (status < 0 && !c->close_started) {
    cbwd_debug (c->srv, "conn %u: write failed: %s", c->id, uv_strerror (status));
    conn_fail (c, true);
    return;
  }
  conn_pump (c);
}

/* Send what the handshake produced. */
static void
flush_session_out (struct cbwd_conn *c)
{
  if (c->sess.out.len == 0 || c->close_started) return;
  struct wreq *wr = calloc (1, sizeof *wr + sizeof (uv_buf_t));
  if (!wr) { conn_fail (c, true); return; }
  wr->c = c;
  wr->raw = c->sess.out.data;
  wr->bufs[0] = uv_buf_init ((char *) wr->raw, c->sess.out.len);
  memset (&c->sess.out, 0, sizeof c->sess.out);
  if (uv_write (&wr->w, &c->h.stream, wr->bufs, 1, write_done) != 0) {
    free (wr->raw); free (wr);
    conn_fail (c, true);
  }
}

static void
work_run (uv_work_t *w)
{
  struct work *wk = (struct work *) w;
  cbwd_request_execute (wk->r);
}

static void
send_reply (struct cbwd_conn *c, struct cbwd_request *r, uint64_t bytes)
{
  struct cbwd_reply rep;
  if (cbwd_reply_build (r, &rep) == -1) {
    cbwd_reply_free (&rep);
    cbwd_request_free (r);
    c->held_bytes -= bytes;
    conn_fail (c, true);
    return;
  }
  struct wreq *wr = calloc (1, sizeof *wr + rep.nseg * sizeof (uv_buf_t));
  if (!wr) {
    cbwd_reply_free (&rep);
    cbwd_request_free (r);
    c->held_bytes -= bytes;
    conn_fail (c, true);
    return;
  }
  wr->c = c;
  wr->r = r;
  wr->rep = rep;
  wr->bytes = bytes;
  for (size_t i = 0; i < rep.nseg; i++) {
    uint8_t *base = rep.seg[i].in_hdr ? wr->rep.hdr.data : r->data;
    wr->bufs[i] = uv_buf_init ((char *) base + rep.seg[i].off, rep.seg[i].len);
  }
  if (r->err.errnum && c->srv->verbose)
    cbwd_debug (c->srv, "conn %u: request type %u failed: %s", c->id, r->type, r->err.msg);
  if (uv_write (&wr->w, &c->h.stream, wr->bufs, rep.nseg, write_done) != 0) {
    c->held_bytes -= bytes;
    cbwd_reply_free (&wr->rep);
    cbwd_request_free (r);
    free (wr);
    conn_fail (c, true);
  }
}

static void
work_done (uv_work_t *w, int status)
{
  (void) status;
  struct work *wk = (struct work *) w;
  struct cbwd_conn *c = wk->c;
  struct cbwd_request *r = wk->r;
  uint64_t bytes = wk->bytes;
  free (wk);
  c->inflight--;
  if (c->drop || c->close_started) {
    c->held_bytes -= bytes;
    cbwd_request_free (r);
  }
  else
    send_reply (c, r, bytes);
  conn_pump (c);
  conn_maybe_close (c);
}

static uint64_t
request_bytes (const struct cbwd_request *r)
{
  uint64_t b = 256;
  if (r->type == NBD_CMD_READ && !r->preset_errno) b += r->length;
  if (r->payload) b += r->length;
  if (r->type == NBD_CMD_BLOCK_STATUS) b += 8 * (uint64_t) CBWD_MAX_EXTENTS * r->nctx / 16;
  return b;
}

/* Submit pending requests within the limits; resume or stop reading. */
static void
conn_pump (struct cbwd_conn *c)
{
  struct cbwd_server *srv = c->srv;
  while (c->pend_head && !c->drop &&
         c->inflight < srv->limits.max_inflight &&
         (c->held_bytes < srv->limits.max_inflight_bytes || c->inflight == 0)) {
    struct pending *p = c->pend_head;
    c->pend_head = p->next;
    if (!c->pend_head) c->pend_tail = NULL;
    c->npending--;
    struct cbwd_request *r = p->r;
    free (p);
    struct work *wk = calloc (1, sizeof *wk);
    uint64_t bytes = request_bytes (r);
    if (!wk) { cbwd_request_free (r); conn_fail (c, true); return; }
    wk->c = c; wk->r = r; wk->bytes = bytes;
    c->held_bytes += bytes;
    c->inflight++;
    if (r->preset_errno || cbwd_request_try_nowait (r)) {
      /* Nothing to execute, or done without blocking: reply at once. */
      free (wk);
      c->inflight--;
      send_reply (c, r, bytes);
      continue;
    }
    if (uv_queue_work (srv->loop, &wk->w, work_run, work_done) != 0) {
      c->inflight--;
      c->held_bytes -= bytes;
      cbwd_request_free (r);
      free (wk);
      conn_fail (c, true);
      return;
    }
  }
  bool want_read = !c->closing && !c->close_started &&
                   c->npending < 64 &&
                   c->held_bytes < srv->limits.max_inflight_bytes;
  if (want_read && !c->reading) {
    extern void cbwd_conn_start_read (struct cbwd_conn *c);
    cbwd_conn_start_read (c);
  }
  else if (!want_read && c->reading) {
    uv_read_stop (&c->h.stream);
    c->reading = false;
  }
}

static void
sess_request (void *opaque, struct cbwd_request *r)
{
  struct cbwd_conn *c = opaque;
  struct pending *p = malloc (sizeof *p);
  if (!p) { cbwd_request_free (r); conn_fail (c, true); return; }
  p->r = r;
  p->next = NULL;
  if (c->pend_tail) c->pend_tail->next = p; else c->pend_head = p;
  c->pend_tail = p;
  c->npending++;
  /* Account the payload already held while it waits. */
}

static void
sess_log (void *opaque, const char *msg)
{
  struct cbwd_conn *c = opaque;
  cbwd_debug (c->srv, "conn %u: %s", c->id, msg);
}

static const struct cbwd_session_ops sess_ops = {
  .request = sess_request,
  .log = sess_log,
};

static void
alloc_cb (uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
  (void) suggested;
  struct cbwd_conn *c = h->data;
  size_t n;
  uint8_t *d = cbwd_session_direct_buf (&c->sess, &n);
  if (d) {
    c->direct = true;
    *buf = uv_buf_init ((char *) d, n);
  }
  else {
    c->direct = false;
    *buf = uv_buf_init ((char *) c->rbuf, sizeof c->rbuf);
  }
}

static void
read_cb (uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
  (void) buf;
  struct cbwd_conn *c = s->data;
  if (nread == 0)
    return;
  if (nread < 0) {
    if (nread != UV_EOF)
      cbwd_debug (c->srv, "conn %u: read: %s", c->id, uv_strerror ((int) nread));
    else
      cbwd_debug (c->srv, "conn %u: client closed the connection", c->id);
    conn_fail (c, true);
    return;
  }
  bool was_handshake = c->sess.exp == NULL;
  if (c->direct)
    cbwd_session_direct_done (&c->sess, (size_t) nread);
  else
    cbwd_session_feed (&c->sess, c->rbuf, (size_t) nread);
  flush_session_out (c);
  if (was_handshake && c->sess.exp && c->timer_active) {
    uv_timer_stop (&c->timer);
    c->timer_active = false;
    cbwd_debug (c->srv, "conn %u: serving export '%s'", c->id, c->sess.exp->name);
  }
  if (cbwd_session_closed (&c->sess)) {
    cbwd_debug (c->srv, "conn %u: %s", c->id,
                c->sess.close_reason ? c->sess.close_reason : "closing");
    c->closing = true;
    if (c->reading) { uv_read_stop (&c->h.stream); c->reading = false; }
  }
  conn_pump (c);
  conn_maybe_close (c);
}

void
cbwd_conn_start_read (struct cbwd_conn *c)
{
  if (uv_read_start (&c->h.stream, alloc_cb, read_cb) == 0)
    c->reading = true;
  else
    conn_fail (c, true);
}

static void
handshake_timeout (uv_timer_t *t)
{
  struct cbwd_conn *c = t->data;
  cbwd_debug (c->srv, "conn %u: handshake timeout", c->id);
  c->timer_active = false;
  conn_fail (c, true);
}

static void
reject_closed (uv_handle_t *h)
{
  free (h);
}

static void
on_connection (uv_stream_t *server, int status)
{
  struct cbwd_server *srv = server->data;
  if (status < 0) {
    cbwd_log ("accept: %s", uv_strerror (status));
    return;
  }
  bool tcp = server->type == UV_TCP;
  if (srv->stopping || srv->nconns >= srv->limits.max_connections) {
    /* Accept and drop, so the backlog does not fill up. */
    uv_stream_t *tmp = malloc (tcp ? sizeof (uv_tcp_t) : sizeof (uv_pipe_t));
    if (!tmp) return;
    if (tcp) uv_tcp_init (srv->loop, (uv_tcp_t *) tmp);
    else uv_pipe_init (srv->loop, (uv_pipe_t *) tmp, 0);
    if (uv_accept (server, tmp) == 0 && !srv->stopping)
      cbwd_log ("too many connections (%zu), dropping one", srv->nconns);
    uv_close ((uv_handle_t *) tmp, reject_closed);
    return;
  }
  struct cbwd_conn *c = calloc (1, sizeof *c);
  if (!c) return;
  c->srv = srv;
  c->id = ++next_conn_id;
  if (tcp) uv_tcp_init (srv->loop, &c->h.tcp);
  else uv_pipe_init (srv->loop, &c->h.pipe, 0);
  c->h.handle.data = c;
  uv_timer_init (srv->loop, &c->timer);
  c->timer.data = c;
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  srv->nconns++;
  cbwd_session_init (&c->sess, &srv->exports, &sess_ops, c);
  if (uv_accept (server, &c->h.stream) != 0) {
    c->drop = c->closing = true;
    conn_close_now (c);
    return;
  }
  if (tcp) uv_tcp_nodelay (&c->h.tcp, 1);
  cbwd_debug (srv, "conn %u: accepted", c->id);
  if (srv->limits.handshake_timeout_ms) {
    uv_timer_start (&c->timer, handshake_timeout, srv->limits.handshake_timeout_ms, 0);
    c->timer_active = true;
  }
  flush_session_out (c);
  cbwd_conn_start_read (c);
}

static int
listen_unix (struct cbwd_server *srv, const char *path, uv_stream_t **out)
{
  struct stat st;
  if (strlen (path) >= sizeof ((struct sockaddr_un *) 0)->sun_path) {
    cbwd_log ("listen unix:%s: path too long", path);
    return -1;
  }
  if (lstat (path, &st) == 0) {
    if (!S_ISSOCK (st.st_mode)) {
      cbwd_log ("listen unix:%s: exists and is not a socket", path);
      return -1;
    }
    /* A live server there is an error; a stale socket file is replaced. */
    int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    strcpy (sa.sun_path, path);
    if (fd >= 0 && connect (fd, (struct sockaddr *) &sa, sizeof sa) == 0) {
      close (fd);
      cbwd_log ("listen unix:%s: another server is listening there", path);
      return -1;
    }
    if (fd >= 0) close (fd);
    unlink (path);
  }
  uv_pipe_t *p = malloc (sizeof *p);
  if (!p) return -1;
  uv_pipe_init (srv->loop, p, 0);
  int r = uv_pipe_bind (p, path);
  if (r == 0) r = uv_listen ((uv_stream_t *) p, 1024, on_connection);
  if (r != 0) {
    cbwd_log ("listen unix:%s: %s", path, uv_strerror (r));
    uv_close ((uv_handle_t *) p, reject_closed);
    return -1;
  }
  *out = (uv_stream_t *) p;
  return 0;
}

static int
listen_tcp (struct cbwd_server *srv, const char *hostport, uv_stream_t **out)
{
  char host[256];
  const char *colon = strrchr (hostport, ':');
  if (!colon || colon == hostport || (size_t) (colon - hostport) >= sizeof host) {
    cbwd_log ("listen tcp:%s: expected HOST:PORT", hostport);
    return -1;
  }
  memcpy (host, hostport, colon - hostport);
  host[colon - hostport] = 0;
  char *end;
  long port = strtol (colon + 1, &end, 10);
  if (*end || port < 0 || port > 65535 || end == colon + 1) {
    cbwd_log ("listen tcp:%s: bad port", hostport);
    return -1;
  }
  struct sockaddr_storage ss;
  int r;
  if (host[0] == '[') {
    size_t l = strlen (host);
    if (l < 3 || host[l - 1] != ']') { cbwd_log ("listen tcp:%s: bad address", hostport); return -1; }
    host[l - 1] = 0;
    r = uv_ip6_addr (host + 1, (int) port, (struct sockaddr_in6 *) &ss);
  }
  else
    r = uv_ip4_addr (host, (int) port, (struct sockaddr_in *) &ss);
  if (r != 0) {
    cbwd_log ("listen tcp:%s: bad address: %s", hostport, uv_strerror (r));
    return -1;
  }
  uv_tcp_t *t = malloc (sizeof *t);
  if (!t) return -1;
  uv_tcp_init (srv->loop, t);
  r = uv_tcp_bind (t, (struct sockaddr *) &ss, 0);
  if (r == 0) r = uv_listen ((uv_stream_t *) t, 1024, on_connection);
  if (r != 0) {
    cbwd_log ("listen tcp:%s: %s", hostport, uv_strerror (r));
    uv_close ((uv_handle_t *) t, reject_closed);
    return -1;
  }
  *out = (uv_stream_t *) t;
  return 0;
}

int
cbwd_listen (struct cbwd_server *srv, const char *spec)
{
  uv_stream_t *s = NULL;
  char *upath = NULL;
  if (strncmp (spec, "unix:", 5) == 0) {
    if (listen_unix (srv, spec + 5, &s) == -1) return -1;
    upath = strdup (spec + 5);
  }
  else if (strncmp (spec, "tcp:", 4) == 0) {
    if (listen_tcp (srv, spec + 4, &s) == -1) return -1;
  }
  else {
    cbwd_log ("--listen %s: expected unix:PATH or tcp:HOST:PORT", spec);
    return -1;
  }
  s->data = srv;
  uv_stream_t **nl = realloc (srv->listeners, (srv->nlisteners + 1) * sizeof *nl);
  char **np = realloc (srv->unix_paths, (srv->nlisteners + 1) * sizeof *np);
  if (nl) srv->listeners = nl;
  if (np) srv->unix_paths = np;
  if (!nl || !np) { free (upath); return -1; }
  if (!srv->first_listen) srv->first_listen = strdup (spec);
  srv->listeners[srv->nlisteners] = s;
  srv->unix_paths[srv->nlisteners] = upath;
  srv->nlisteners++;
  return 0;
}

/* ---- admin API ---- */
struct cbwd_admin_op {
  struct cbwd_admin_op *next;
  bool add;
  struct cbwd_export *e;          /* add */
  const char *name;               /* remove */
  struct cbw_err *err;
  int ret;
  bool done;
};

static void
admin_run (struct cbwd_server *srv, struct cbwd_admin_op *op)
{
  if (op->add) {
    op->ret = cbwd_add_export_loop (srv, op->e, op->err);
    if (op->ret == 0)
      cbwd_log ("export '%s' (%s) added", op->e->name, op->e->ops->type);
    return;
  }
  size_t i;
  for (i = 0; i < srv->exports.n; i++)
    if (strcmp (srv->exports.v[i]->name, op->name) == 0) break;
  if (i == srv->exports.n) {
    op->ret = cbw_err_set (op->err, ENOENT, "no export named '%s'", op->name);
    return;
  }
  struct cbwd_export *e = srv->exports.v[i];
  memmove (&srv->exports.v[i], &srv->exports.v[i + 1],
           (srv->exports.n - i - 1) * sizeof *srv->exports.v);
  srv->exports.n--;
  for (struct cbwd_conn *c = srv->conns; c; c = c->next)
    if (c->sess.exp == e || c->sess.meta_export == e) {
      c->closing = true;
      if (c->reading) { uv_read_stop (&c->h.stream); c->reading = false; }
      conn_maybe_close (c);
    }
  cbwd_log ("export '%s' removed", e->name);
  cbwd_export_unref (e);
  op->ret = 0;
}

static void
admin_cb (uv_async_t *a)
{
  struct cbwd_server *srv = a->data;
  pthread_mutex_lock (&srv->admin_lock);
  struct cbwd_admin_op *q = srv->admin_q;
  srv->admin_q = NULL;
  pthread_mutex_unlock (&srv->admin_lock);
  /* Run outside the lock: callers only wait on their own op's done flag. */
  for (struct cbwd_admin_op *op = q, *next; op; op = next) {
    next = op->next;
    admin_run (srv, op);
    pthread_mutex_lock (&srv->admin_lock);
    op->done = true;
    pthread_cond_broadcast (&srv->admin_cond);
    pthread_mutex_unlock (&srv->admin_lock);
  }
}

int
cbwd_admin_init (struct cbwd_server *srv)
{
  pthread_mutex_init (&srv->admin_lock, NULL);
  pthread_cond_init (&srv->admin_cond, NULL);
  srv->admin.data = srv;
  return uv_async_init (srv->loop, &srv->admin, admin_cb) == 0 ? 0 : -1;
}

static int
admin_call (struct cbwd_server *srv, struct cbwd_admin_op *op)
{
  pthread_mutex_lock (&srv->admin_lock);
  if (srv->admin_closed) {
    pthread_mutex_unlock (&srv->admin_lock);
    return cbw_err_set (op->err, ESHUTDOWN, "cbwd is shutting down");
  }
  op->next = srv->admin_q;
  srv->admin_q = op;
  uv_async_send (&srv->admin);
  while (!op->done)
    pthread_cond_wait (&srv->admin_cond, &srv->admin_lock);
  pthread_mutex_unlock (&srv->admin_lock);
  return op->ret;
}

int
cbwd_server_add_export (struct cbwd_server *srv, struct cbwd_export *e,
                        struct cbw_err *err)
{
  struct cbwd_admin_op op = { .add = true, .e = e, .err = err };
  return admin_call (srv, &op);
}

int
cbwd_server_remove_export (struct cbwd_server *srv, const char *name,
                           struct cbw_err *err)
{
  struct cbwd_admin_op op = { .add = false, .name = name, .err = err };
  return admin_call (srv, &op);
}

char *
cbwd_server_uri (struct cbwd_server *srv, const char *name)
{
  char *u = NULL;
  const char *l = srv->first_listen;
  if (!l) return NULL;
  if (strncmp (l, "unix:", 5) == 0) {
    if (asprintf (&u, "nbd+unix:///%s?socket=%s", name, l + 5) == -1) u = NULL;
  }
  else if (asprintf (&u, "nbd://%s/%s", l + 4, name) == -1)
    u = NULL;
  return u;
}

void
cbwd_server_stop (struct cbwd_server *srv)
{
  if (srv->stopping) return;
  srv->stopping = true;
  /* Fail queued and future admin calls; close the async handle. */
  pthread_mutex_lock (&srv->admin_lock);
  srv->admin_closed = true;
  for (struct cbwd_admin_op *op = srv->admin_q; op; op = op->next) {
    op->ret = cbw_err_set (op->err, ESHUTDOWN, "cbwd is shutting down");
    op->done = true;
  }
  srv->admin_q = NULL;
  pthread_cond_broadcast (&srv->admin_cond);
  pthread_mutex_unlock (&srv->admin_lock);
  uv_close ((uv_handle_t *) &srv->admin, NULL);
  for (size_t i = 0; i < srv->nlisteners; i++) {
    uv_close ((uv_handle_t *) srv->listeners[i], reject_closed);
    if (srv->unix_paths[i]) unlink (srv->unix_paths[i]);
    free (srv->unix_paths[i]);
  }
  free (srv->listeners);
  free (srv->unix_paths);
  srv->listeners = NULL;
  srv->unix_paths = NULL;
  srv->nlisteners = 0;
  for (struct cbwd_conn *c = srv->conns; c; c = c->next)
    conn_fail (c, true);
}
