/* cbw — server/conn.c: cbwd's connections on libuv.
 *
 * One struct cbwd_conn per client.  The loop thread reads bytes into the
 * connection's protocol session (nbd_session.c); every complete request read
 * in one read callback goes to a pending queue, and conn_pump() submits the
 * whole batch to cbwd's worker pool (pool.c) with one lock round trip, so
 * blocking file and upstream I/O never runs on the loop.  Exception without
 * blocking: page-cache hits of file exports are served on the loop with
 * preadv2/pwritev2(RWF_NOWAIT).
 *
 * Design note (store write path): the worker that executed a
 * request also sends its reply, so a request costs ONE thread hand-off
 * (loop -> worker) instead of two (loop -> pool -> loop), like nbdkit's
 * thread-per-request model but with libuv reading.  libuv's rule that a
 * handle is only touched on its loop is kept: workers never call libuv on
 * the stream; they do a raw sendmsg(MSG_DONTWAIT) on the socket fd.  Wire
 * order: a finished reply is appended to the connection's ready list; the
 * first thread that finds nobody sending takes the send token and sends the
 * whole list (its own reply and those others append meanwhile, several per
 * sendmsg) without holding any lock, until the list is empty; the others
 * return at once instead of waiting for a lock.  Direct sends happen only
 * while the loop has no bytes of this connection queued (tx_loop == 0);
 * when the socket is full, the unsent tail of a reply and everything after
 * it go to the loop queue (txq, written with uv_write) until it drains, so
 * replies never interleave.  A worker wakes the loop (uv_async_send) only
 * when the loop waits for something: its queue, capacity to submit pending
 * requests or to resume reading, or the close.  In steady state (limits not
 * reached, socket writable) the loop is never woken for a completion.
 * bench/cbwd/ab-store.sh measures it against loop -> pool -> loop (fewer
 * context switches, less CPU; figures in bench/cbwd/results.md).
 * Several event loops were considered too; they would parallelise reading
 * between connections, but the store's writer (the cbw filter) and
 * fio/qemu-img use one connection, where only removing hand-offs helps.
 *
 * Zero-copy sends were measured and are not used: sendfile() of store
 * data (worker holding the token, file segments never handed to the loop)
 * cost several times the server CPU per byte of the copy path, on Unix
 * sockets and on TCP loopback alike (bench/cbwd/results.md), and could never
 * serve PIT exports (export_pit.c says why).  What helped the read path is
 * a larger send buffer on Unix sockets (see conn accept): replies leave
 * with the direct sendmsg instead of the loop's queue.
 *
 * Replies go out in completion order (out of order on the wire, as NBD
 * allows; cookies match them up).  Limits per connection: at most
 * max_inflight requests executing and at most max_inflight_bytes of
 * payloads and replies held; past either, requests wait in the pending queue
 * and reading from the socket stops, so a client that floods requests or
 * never reads its replies only slows itself.  A client still in the
 * handshake after handshake_timeout_ms is dropped.
 *
 * Bounds across connections: srv->mem_used sums the held bytes of all
 * connections; a request is admitted only while it is below max_memory
 * (so the sum overshoots by at most one request, <= 32 MiB + 256 bytes),
 * and past max_memory (counting WRITE payloads read but not admitted,
 * srv->pend_used) every connection stops reading.  Requests already
 * admitted always execute and their replies drain, which is what brings
 * the sum down: a stopped connection sets mem_blocked, and the release
 * that follows wakes the loop (srv->mem_async, only while something waits:
 * srv->mem_wait), which pumps the stopped connections again.  After the
 * handshake the connection's timer checks idleness (idle_check): nothing
 * in flight, waiting or held and nothing received for idle_timeout_ms
 * closes it, and so does a reply backlog the client took nothing of.  Each listener has its own connection budget (so TCP peers cannot
 * lock local Unix readers out) and TCP peers a budget per address.
 *
 * TLS (tls.c, after NBD_OPT_STARTTLS): the stream slot stays the same;
 * only bytes change form.  Reading: the loop puts the ciphertext it reads
 * into the connection's TLS session and feeds the plaintext that comes out
 * (handshake first, without blocking: the handshake advances per read and
 * its output is sent like any reply) to the protocol session.  Sending:
 * tx_submit() encrypts a reply (or handshake reply) into ciphertext in the
 * same critical section that appends it to the ready list, so wire order
 * is record order, and everything after that (direct sendmsg, the loop
 * queue, partial sends) handles ciphertext as it handled plaintext.  The
 * plaintext buffers are freed as soon as they are encrypted.
 *
 * Threads and fields: fields marked "loop" are touched only by the loop
 * thread; `lock` guards inflight, held_bytes, loop_wait and failed;
 * `tx_lock` guards the ready list, the send token (sending), tx_loop,
 * tx_bytes, tx_dead and the txq list.  Both are held for list and counter
 * updates only, never across a system call, and never nested.  `tls_lock`
 * guards the TLS session (tls): held for in-memory encryption/decryption
 * only (no I/O: tls.c never touches the socket); the one nesting is
 * tls_lock -> tx_lock in tx_submit().  `tls` is set by the loop during the
 * handshake, before any request exists, and is read-only afterwards.  Lifetime: a
 * request counts in inflight until its worker has finished sending (or
 * handing over) and waking the loop (the last thing it does with the
 * connection, under `lock`); the token holder is always such a worker or
 * the loop; the connection's handles are closed and it is freed only after
 * the loop saw inflight == 0, so no worker can hold a pointer to a freed
 * connection, and the ready list is empty whenever nobody holds the token.
 */
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "nbd_proto.h"
#include "nbd_session.h"
#include "server.h"
#include "tls.h"

/* Bytes (a reply or its unsent tail, or handshake bytes) handed to the loop
 * to be written with uv_write. */
struct txq {
  struct txq *next;
  uv_write_t w;
  struct cbwd_conn *c;
  struct cbwd_request *r;          /* may be NULL (handshake bytes) */
  struct cbwd_reply rep;
  uint8_t *raw;                    /* handshake bytes */
  uint64_t bytes;                  /* held bytes released when written */
  uint64_t wire;                   /* bytes to send (counted in tx_bytes) */
  unsigned nbufs;
  uv_buf_t bufs[];
};

struct cbwd_conn {
  union { uv_tcp_t tcp; uv_pipe_t pipe; uv_stream_t stream; uv_handle_t handle; } h;
  uv_timer_t timer;                /* handshake timeout */
  uv_async_t async;                /* workers -> loop */
  struct cbwd_server *srv;
  struct cbwd_conn *prev, *next;   /* loop: srv->conns list */
  struct cbwd_session sess;        /* loop */
  uint8_t rbuf[65536];             /* loop */
  int fd;                          /* set at accept, read by workers */
  bool direct;                     /* loop: last alloc_cb handed out a payload buffer */
  bool reading;                    /* loop */
  bool closing;                    /* loop: no more reads; close when idle */
  bool drop;                       /* loop: peer gone: drop pending requests */
  bool close_started;              /* loop */
  bool shutdown_started;           /* loop: uv_shutdown pending, then close */
  bool timer_active;               /* loop */
  unsigned id;
  struct cbwd_request *pend_head, *pend_tail;   /* loop */
  size_t npending;                 /* loop */
  uint64_t pend_bytes;             /* loop: WRITE payloads in the pending queue */
  pthread_mutex_t lock;
  unsigned inflight;               /* lock: requests handed to workers */
  uint64_t held_bytes;             /* lock: payloads + replies held */
  bool loop_wait;                  /* lock: wake the loop on completions */
  bool failed;                     /* lock: a worker broke the stream: drop */
  pthread_mutex_t tx_lock;
  unsigned tx_loop;                /* tx_lock: txq entries queued or in uv_write */
  uint64_t tx_bytes;               /* tx_lock: their bytes (the reply backlog) */
  bool tx_dead;                    /* tx_lock: discard replies */
  struct txq *txq_head, *txq_tail; /* tx_lock: not yet given to uv_write */
  struct txq *ready_head, *ready_tail;  /* tx_lock: replies for the token holder */
  bool sending;                    /* tx_lock: a thread holds the send token */
  pthread_mutex_t tls_lock;
  struct cbwd_tls *tls;            /* tls_lock (pointer: see above) */
  bool tls_ready;                  /* loop: handshake done */
  bool tls_bye;                    /* loop: close_notify queued */
  uint8_t *tls_pbuf;               /* loop: plaintext out of TLS */
  char *identity;                  /* loop: authenticated peer, NULL if none */
  struct cbwd_listener *listener;  /* loop: where it came from */
  struct sockaddr_storage peer;    /* loop: TCP peer (its address is compared) */
  bool has_peer;                   /* loop */
  bool idle_armed;                 /* loop: timer checks idleness */
  bool mem_blocked;                /* loop: stopped by the global memory bound */
  bool tx_progress;                /* loop: a uv_write completed since the last check */
  size_t wq_seen;                  /* loop: libuv's write queue at the last check */
  uint64_t last_rx;                /* loop: uv_now() of the last activity */
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
static void conn_fail (struct cbwd_conn *c, bool drop);
static void tx_drain (struct cbwd_conn *c);
static void flush_session_out (struct cbwd_conn *c);
static void idle_check (uv_timer_t *t);

/* Global memory bound (see the top).  Any thread. */
static void
mem_take (struct cbwd_server *srv, uint64_t n)
{
  atomic_fetch_add (&srv->mem_used, n);
}

static void
mem_release (struct cbwd_server *srv, uint64_t n)
{
  if (n == 0) return;
  atomic_fetch_sub (&srv->mem_used, n);
  if (atomic_load (&srv->mem_wait)) {
    /* mem_lock keeps the async handle alive while we signal it. */
    pthread_mutex_lock (&srv->mem_lock);
    if (srv->mem_async_init) uv_async_send (&srv->mem_async);
    pthread_mutex_unlock (&srv->mem_lock);
  }
}

static bool
mem_below (const struct cbwd_server *srv)
{
  return srv->limits.max_memory == 0 ||
         atomic_load (&srv->mem_used) < srv->limits.max_memory;
}

static void
free_pending (struct cbwd_conn *c)
{
  while (c->pend_head) {
    struct cbwd_request *r = c->pend_head;
    c->pend_head = r->qnext;
    cbwd_request_free (r);
  }
  c->pend_tail = NULL;
  c->npending = 0;
  c->srv->pend_used -= c->pend_bytes;
  if (c->pend_bytes && c->srv->mem_async_init && atomic_load (&c->srv->mem_wait))
    uv_async_send (&c->srv->mem_async);   /* others may read again */
  c->pend_bytes = 0;
}

static void
txq_free (struct txq *q)
{
  if (q->r) cbwd_request_free (q->r);
  cbwd_reply_free (&q->rep);
  free (q->raw);
  free (q);
}

static void
conn_freed (uv_handle_t *h)
{
  struct cbwd_conn *c = h->data;
  struct cbwd_server *srv = c->srv;
  if (c->prev) c->prev->next = c->next; else srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  srv->nconns--;
  if (c->listener) c->listener->nconns--;
  free_pending (c);
  while (c->txq_head) {          /* only if close raced a drain: defensive */
    struct txq *q = c->txq_head;
    c->txq_head = q->next;
    txq_free (q);
  }
  while (c->ready_head) {        /* empty whenever nobody holds the token */
    struct txq *q = c->ready_head;
    c->ready_head = q->next;
    txq_free (q);
  }
  cbwd_session_free (&c->sess);
  cbwd_tls_free (c->tls);
  free (c->tls_pbuf);
  free (c->identity);
  pthread_mutex_destroy (&c->lock);
  pthread_mutex_destroy (&c->tx_lock);
  pthread_mutex_destroy (&c->tls_lock);
  cbwd_debug (srv, "conn %u: closed", c->id);
  free (c);
}

static void
async_closed (uv_handle_t *h)
{
  struct cbwd_conn *c = h->data;
  uv_close (&c->h.handle, conn_freed);
}

static void
timer_closed (uv_handle_t *h)
{
  struct cbwd_conn *c = h->data;
  uv_close ((uv_handle_t *) &c->async, async_closed);
}

static void
conn_close_now (struct cbwd_conn *c)
{
  if (c->close_started) return;
  c->close_started = true;
  if (c->reading) uv_read_stop (&c->h.stream);
  c->reading = false;
  pthread_mutex_lock (&c->tx_lock);
  c->tx_dead = true;
  pthread_mutex_unlock (&c->tx_lock);
  tx_drain (c);                    /* frees what never reached uv_write */
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
  if (!c->closing || c->close_started || c->npending > 0)
    return;
  pthread_mutex_lock (&c->lock);
  unsigned inflight = c->inflight;
  if (inflight) c->loop_wait = true;
  pthread_mutex_unlock (&c->lock);
  if (inflight > 0)
    return;
  if (c->reading) { uv_read_stop (&c->h.stream); c->reading = false; }
  if (c->shutdown_started)
    return;
  if (!c->drop) {
    if (c->tls_ready && !c->tls_bye) {
      /* Nothing executes: close_notify goes after the last reply. */
      c->tls_bye = true;
      pthread_mutex_lock (&c->tls_lock);
      cbwd_tls_bye (c->tls);
      pthread_mutex_unlock (&c->tls_lock);
      flush_session_out (c);
    }
    tx_drain (c);                  /* replies queued by workers go first */
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
    free_pending (c);
    pthread_mutex_lock (&c->tx_lock);
    c->tx_dead = true;
    pthread_mutex_unlock (&c->tx_lock);
  }
  if (c->reading) { uv_read_stop (&c->h.stream); c->reading = false; }
  conn_maybe_close (c);
}

/* Any thread: the stream is broken (a reply could not be built or sent):
 * replies are discarded and the loop drops the connection.  The caller
 * holds a request in flight (so c is alive). */
static void
conn_mark_failed (struct cbwd_conn *c)
{
  pthread_mutex_lock (&c->tx_lock);
  c->tx_dead = true;
  pthread_mutex_unlock (&c->tx_lock);
  pthread_mutex_lock (&c->lock);
  c->failed = true;
  uv_async_send (&c->async);
  pthread_mutex_unlock (&c->lock);
}

/* Loop: a reply handed to the loop is done with (written or dropped):
 * release its wire and held bytes, free it. */
static void
txq_retire_loop (struct cbwd_conn *c, struct txq *q)
{
  pthread_mutex_lock (&c->tx_lock);
  c->tx_loop--;
  c->tx_bytes -= q->wire;
  pthread_mutex_unlock (&c->tx_lock);
  pthread_mutex_lock (&c->lock);
  c->held_bytes -= q->bytes;
  pthread_mutex_unlock (&c->lock);
  mem_release (c->srv, q->bytes);
  txq_free (q);
}

static void
write_done (uv_write_t *w, int status)
{
  struct txq *q = (struct txq *) ((char *) w - offsetof (struct txq, w));
  struct cbwd_conn *c = q->c;
  c->tx_progress = true;
  txq_retire_loop (c, q);
  if (status < 0 && !c->close_started) {
    cbwd_debug (c->srv, "conn %u: write failed: %s", c->id, uv_strerror (status));
    conn_fail (c, true);
    return;
  }
  conn_pump (c);
  conn_maybe_close (c);
}

/* Loop: give queued bytes to libuv, in order. */
static void
tx_drain (struct cbwd_conn *c)
{
  pthread_mutex_lock (&c->tx_lock);
  struct txq *q = c->txq_head;
  c->txq_head = c->txq_tail = NULL;
  bool dead = c->tx_dead;
  pthread_mutex_unlock (&c->tx_lock);
  while (q) {
    struct txq *next = q->next;
    if (dead || c->close_started ||
        uv_write (&q->w, &c->h.stream, q->bufs, q->nbufs, write_done) != 0) {
      if (!dead) {
        pthread_mutex_lock (&c->tx_lock);
        c->tx_dead = dead = true;      /* the rest must not be sent either */
        pthread_mutex_unlock (&c->tx_lock);
      }
      txq_retire_loop (c, q);
      if (!c->close_started && !c->drop) {
        c->closing = true;             /* conn_fail after the loop */
        c->drop = true;
        free_pending (c);
      }
    }
    q = next;
  }
}

/* Queue q behind everything else (tx_lock held by the caller). */
static void
txq_append_locked (struct cbwd_conn *c, struct txq *q)
{
  q->next = NULL;
  if (c->txq_tail) c->txq_tail->next = q; else c->txq_head = q;
  c->txq_tail = q;
  c->tx_loop++;
  c->tx_bytes += q->wire;
}

/* Send one batch of the list (up to 64 replies / 1024 segments) with one
 * non-blocking sendmsg loop; retire what went out completely (its held
 * bytes are added to *released), trim a reply sent in part.  Returns 0 when
 * the whole batch went out, 1 when the socket is full (or a reply has too
 * many segments to send here: the loop takes it), -1 when the stream broke. */
static int
send_batch (struct cbwd_conn *c, struct txq **listp, uint64_t *released)
{
  struct iovec iov[1024];
  size_t niov = 0, nq = 0, total = 0;
  for (struct txq *q = *listp; q && nq < 64 && niov + q->nbufs <= 1024; q = q->next, nq++)
    for (unsigned i = 0; i < q->nbufs; i++) {
      iov[niov].iov_base = q->bufs[i].base;
      iov[niov].iov_len = q->bufs[i].len;
      total += q->bufs[i].len;
      niov++;
    }
  if (nq == 0) return 1;
  size_t sent = 0, first = 0;
  int rc = 0;
  while (sent < total) {
    struct msghdr mh = { .msg_iov = iov + first, .msg_iovlen = niov - first };
    ssize_t n = sendmsg (c->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      rc = (errno == EAGAIN || errno == EWOULDBLOCK) ? 1 : -1;
      break;
    }
    sent += (size_t) n;
    size_t left = (size_t) n;
    while (first < niov && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (left) {
      iov[first].iov_base = (uint8_t *) iov[first].iov_base + left;
      iov[first].iov_len -= left;
    }
  }
  while (*listp && sent >= (*listp)->wire && sent > 0) {
    struct txq *q = *listp;
    sent -= q->wire;
    *listp = q->next;
    *released += q->bytes;
    txq_free (q);
  }
  if (sent > 0) {                      /* the first remaining one went in part */
    struct txq *q = *listp;
    unsigned i = 0;
    while (sent >= q->bufs[i].len) {
      sent -= q->bufs[i].len;
      q->wire -= q->bufs[i].len;
      i++;
    }
    q->bufs[i].base += sent;
    q->bufs[i].len -= sent;
    q->wire -= sent;
    memmove (q->bufs, q->bufs + i, (q->nbufs - i) * sizeof *q->bufs);
    q->nbufs -= i;
  }
  return rc;
}

/* The holder of the send token (c->sending) empties the ready list: takes
 * it under tx_lock, sends it WITHOUT the lock, hands what the socket did not
 * take (and everything while the loop has bytes queued) to the loop queue,
 * repeats until the list is empty and gives the token back.  Replies that
 * other threads append meanwhile are sent by the holder in the same
 * sendmsg batches (they do not wait for the lock).  Returns true if the
 * loop must be told about its queue. */
static bool
tx_flush_ready (struct cbwd_conn *c)
{
  bool to_loop = false, broken = false;
  uint64_t released = 0;
  pthread_mutex_lock (&c->tx_lock);
  for (;;) {
    struct txq *list = c->ready_head;
    c->ready_head = c->ready_tail = NULL;
    if (!list) {
      c->sending = false;
      break;
    }
    bool direct = !c->tx_dead && c->tx_loop == 0;
    pthread_mutex_unlock (&c->tx_lock);
    int rc = 0;
    while (direct && list && rc == 0)
      rc = send_batch (c, &list, &released);
    if (rc == -1) broken = true;
    pthread_mutex_lock (&c->tx_lock);
    if (broken) c->tx_dead = true;
    if (c->tx_dead) {
      pthread_mutex_unlock (&c->tx_lock);
      while (list) {
        struct txq *n = list->next;
        released += list->bytes;
        txq_free (list);
        list = n;
      }
      pthread_mutex_lock (&c->tx_lock);
    }
    while (list) {                     /* to the loop, in order */
      struct txq *n = list->next;
      txq_append_locked (c, list);
      list = n;
      to_loop = true;
    }
  }
  pthread_mutex_unlock (&c->tx_lock);
  if (released) {
    pthread_mutex_lock (&c->lock);
    c->held_bytes -= released;
    pthread_mutex_unlock (&c->lock);
    mem_release (c->srv, released);
  }
  if (broken) {
    cbwd_debug (c->srv, "conn %u: send failed", c->id);
    conn_mark_failed (c);
  }
  return to_loop;
}

/* Any thread: queue q for the wire; the first thread to find nobody
 * sending sends it (and what others append meanwhile).  The caller holds a
 * request in flight or is the loop, so c stays alive.  Returns true when q
 * was discarded (peer gone) and its held bytes are the caller's to
 * release; else whoever retires q releases them. */
/* TLS: replace q's plaintext by its ciphertext, with whatever the session
 * produced before (handshake records, alerts) in front (tls_lock held).
 * q has room for one buffer.  Returns 0 or -1. */
static int
tls_seal (struct cbwd_conn *c, struct txq *q)
{
  struct cbw_err err = { 0 };
  for (unsigned i = 0; i < q->nbufs; i++)
    if (cbwd_tls_send (c->tls, q->bufs[i].base, q->bufs[i].len, &err) == -1) {
      cbwd_debug (c->srv, "conn %u: %s", c->id, err.msg);
      return -1;
    }
  size_t n;
  uint8_t *ct = cbwd_tls_take_output (c->tls, &n);
  if (q->r) { cbwd_request_free (q->r); q->r = NULL; }
  cbwd_reply_free (&q->rep);
  memset (&q->rep, 0, sizeof q->rep);
  free (q->raw);
  q->raw = ct;
  q->nbufs = n ? 1 : 0;
  q->bufs[0] = uv_buf_init ((char *) ct, n);
  q->wire = n;
  return 0;
}

static bool
tx_submit (struct cbwd_conn *c, struct txq *q, bool on_loop)
{
  q->next = NULL;
  bool tls = c->tls != NULL;
  if (tls) {
    pthread_mutex_lock (&c->tls_lock);
    if (tls_seal (c, q) == -1) {
      pthread_mutex_unlock (&c->tls_lock);
      q->bytes = 0;
      txq_free (q);
      conn_mark_failed (c);
      return true;
    }
  }
  pthread_mutex_lock (&c->tx_lock);
  if (c->tx_dead || q->wire == 0) {
    pthread_mutex_unlock (&c->tx_lock);
    if (tls) pthread_mutex_unlock (&c->tls_lock);
    q->bytes = 0;
    txq_free (q);
    return true;
  }
  if (c->ready_tail) c->ready_tail->next = q; else c->ready_head = q;
  c->ready_tail = q;
  if (c->sending) {                    /* the token holder sends it */
    pthread_mutex_unlock (&c->tx_lock);
    if (tls) pthread_mutex_unlock (&c->tls_lock);
    return false;
  }
  c->sending = true;
  pthread_mutex_unlock (&c->tx_lock);
  if (tls) pthread_mutex_unlock (&c->tls_lock);
  if (tx_flush_ready (c)) {
    if (on_loop) tx_drain (c);
    else uv_async_send (&c->async);
  }
  return false;
}

/* Send what the handshake produced (loop); with TLS also what the TLS
 * session produced on its own (handshake records, alerts). */
static void
flush_session_out (struct cbwd_conn *c)
{
  if ((c->sess.out.len == 0 && !c->tls) || c->close_started) return;
  struct txq *q = calloc (1, sizeof *q + sizeof (uv_buf_t));
  if (!q) { conn_fail (c, true); return; }
  q->c = c;
  q->raw = c->sess.out.data;
  q->nbufs = 1;
  q->bufs[0] = uv_buf_init ((char *) q->raw, c->sess.out.len);
  q->wire = c->sess.out.len;
  memset (&c->sess.out, 0, sizeof c->sess.out);
  tx_submit (c, q, true);
}

/* Send r's reply (worker or loop thread; owns r).  Returns true when the
 * request's held bytes are the caller's to release now (discarded), false
 * when whoever retires the reply releases them. */
static bool
reply_send (struct cbwd_conn *c, struct cbwd_request *r, bool on_loop)
{
  struct cbwd_reply rep;
  if (r->err.errnum && c->srv->verbose)
    cbwd_debug (c->srv, "conn %u: request type %u failed: %s", c->id, r->type, r->err.msg);
  struct txq *q = NULL;
  if (cbwd_reply_build (r, &rep) == -1 ||
      !(q = malloc (sizeof *q + (rep.nseg ? rep.nseg : 1) * sizeof (uv_buf_t)))) {
    cbwd_reply_free (&rep);
    cbwd_request_free (r);
    conn_mark_failed (c);
    return true;
  }
  memset (q, 0, sizeof *q);
  q->c = c;
  q->r = r;
  q->rep = rep;
  q->bytes = r->held;
  q->nbufs = rep.nseg;
  for (size_t i = 0; i < rep.nseg; i++) {
    uint8_t *base = rep.seg[i].in_hdr ? q->rep.hdr.data : r->data;
    q->bufs[i] = uv_buf_init ((char *) base + rep.seg[i].off, rep.seg[i].len);
    q->wire += rep.seg[i].len;
  }
  return tx_submit (c, q, on_loop);
}

/* Worker thread: run one request and reply. */
static void
job_run (struct cbwd_job *j)
{
  struct cbwd_request *r =
    (struct cbwd_request *) ((char *) j - offsetof (struct cbwd_request, job));
  struct cbwd_conn *c = r->owner;
  uint64_t bytes = r->held;
  cbwd_request_execute (r);
  bool release = reply_send (c, r, false);
  if (release) mem_release (c->srv, bytes);
  pthread_mutex_lock (&c->lock);
  c->inflight--;
  if (release) c->held_bytes -= bytes;
  if (c->loop_wait || c->failed)
    uv_async_send (&c->async);
  pthread_mutex_unlock (&c->lock);
  /* c may be freed from here on. */
}

static void
async_cb (uv_async_t *a)
{
  struct cbwd_conn *c = a->data;
  if (c->close_started) return;
  tx_drain (c);
  pthread_mutex_lock (&c->lock);
  bool failed = c->failed;
  pthread_mutex_unlock (&c->lock);
  if (failed && !c->drop)
    conn_fail (c, true);
  else if (c->drop)
    conn_fail (c, true);           /* a drain failure asked for it */
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

/* Most reply bytes queued for the socket before conn_pump stops
 * submitting: an eighth of the per-connection limit (1 MiB by default),
 * enough to keep the socket busy, so that a slow reader costs memory only
 * for the replies it is about to take. */
#define MAX_PENDING 256

static uint64_t
tx_backlog_max (const struct cbwd_server *srv)
{
  uint64_t m = srv->limits.max_inflight_bytes / 8;
  return m < 256 * 1024 ? 256 * 1024 : m;
}

static int
pool_ensure (struct cbwd_server *srv)
{
  if (srv->pool_started) return 0;
  if (cbwd_pool_start (&srv->pool, srv->threads ? srv->threads : 8, 1024 * 1024) == -1) {
    cbwd_log ("cannot start worker threads: %s", strerror (errno));
    return -1;
  }
  srv->pool_started = true;
  return 0;
}

/* Submit pending requests within the limits (one batch to the pool);
 * resume or stop reading; tell workers whether to wake us. */
static void
conn_pump (struct cbwd_conn *c)
{
  struct cbwd_server *srv = c->srv;
  struct cbwd_job *first = NULL, *last = NULL;
  size_t nbatch = 0;
  if (c->drop) free_pending (c);
  /* Reply backlog: replies the socket could not take yet.  Executing more
   * requests while it is high only buffers their data in our memory (the
   * client is the bottleneck); write_done pumps again as it drains. */
  pthread_mutex_lock (&c->tx_lock);
  bool backlog = c->tx_bytes >= tx_backlog_max (srv);
  pthread_mutex_unlock (&c->tx_lock);
  bool mem_stop = false;
  while (c->pend_head && !c->drop && !backlog) {
    struct cbwd_request *r = c->pend_head;
    uint64_t bytes = request_bytes (r);
    if (!mem_below (srv)) { mem_stop = true; break; }
    pthread_mutex_lock (&c->lock);
    /* Over the per-connection limit only when nothing else is held (a
     * request bigger than the limit must still run): replies waiting for
     * the socket count, or a client that reads slowly would get one more
     * big request executed each time its last one left the workers. */
    bool ok = c->inflight < srv->limits.max_inflight &&
              (c->held_bytes < srv->limits.max_inflight_bytes || c->held_bytes == 0);
    if (ok) { c->inflight++; c->held_bytes += bytes; }
    pthread_mutex_unlock (&c->lock);
    if (!ok) break;
    mem_take (srv, bytes);
    c->pend_head = r->qnext;
    if (!c->pend_head) c->pend_tail = NULL;
    c->npending--;
    if (r->payload) { c->pend_bytes -= r->length; srv->pend_used -= r->length; }
    r->owner = c;
    r->held = bytes;
    if (r->preset_errno || cbwd_request_try_nowait (r)) {
      /* Nothing to execute, or done without blocking: reply at once. */
      bool release = reply_send (c, r, true);
      pthread_mutex_lock (&c->lock);
      c->inflight--;
      if (release) c->held_bytes -= bytes;
      pthread_mutex_unlock (&c->lock);
      if (release) mem_release (srv, bytes);
      continue;
    }
    r->job.run = job_run;
    if (last) last->next = &r->job; else first = &r->job;
    last = &r->job;
    nbatch++;
  }
  if (nbatch) {
    if (pool_ensure (srv) == 0)
      cbwd_pool_submit (&srv->pool, first, last, nbatch);
    else {
      for (struct cbwd_job *j = first, *n; nbatch--; j = n) {
        n = j->next;
        struct cbwd_request *r =
          (struct cbwd_request *) ((char *) j - offsetof (struct cbwd_request, job));
        pthread_mutex_lock (&c->lock);
        c->inflight--;
        c->held_bytes -= r->held;
        pthread_mutex_unlock (&c->lock);
        mem_release (srv, r->held);
        cbwd_request_free (r);
      }
      conn_fail (c, true);
      return;
    }
  }
  /* Waiting requests cost their payload (counted) and ~300 bytes each:
   * a client may pipeline a few hundred small requests before it reads
   * replies without being stopped. */
  pthread_mutex_lock (&c->lock);
  bool over = c->held_bytes + c->pend_bytes >= srv->limits.max_inflight_bytes;
  /* Wake-ups are needed only while something waits for a completion. */
  c->loop_wait = c->pend_head != NULL || over || c->closing || c->failed;
  pthread_mutex_unlock (&c->lock);
  /* The global bound: past it no connection reads requests (the
   * handshake's few bytes still go on); a release wakes us. */
  bool mem_over = c->sess.exp != NULL && srv->limits.max_memory &&
                  atomic_load (&srv->mem_used) + srv->pend_used >= srv->limits.max_memory;
  if ((mem_stop || mem_over) && !c->closing && !c->close_started) {
    c->mem_blocked = true;
    atomic_store (&srv->mem_wait, true);
    /* A release between our check and mem_wait did not wake the loop:
     * look again at what stopped us. */
    bool over_now = atomic_load (&srv->mem_used) + srv->pend_used >= srv->limits.max_memory;
    if ((mem_stop && mem_below (srv)) || (mem_over && !over_now))
      uv_async_send (&srv->mem_async);
  }
  bool want_read = !c->closing && !c->close_started &&
                   c->npending < MAX_PENDING && !over && !mem_over;
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
  r->qnext = NULL;
  if (c->pend_tail) c->pend_tail->qnext = r; else c->pend_head = r;
  c->pend_tail = r;
  c->npending++;
  if (r->payload) { c->pend_bytes += r->length; c->srv->pend_used += r->length; }
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
  uint8_t *d = c->tls ? NULL : cbwd_session_direct_buf (&c->sess, &n);
  if (d) {
    c->direct = true;
    *buf = uv_buf_init ((char *) d, n);
  }
  else {
    c->direct = false;
    *buf = uv_buf_init ((char *) c->rbuf, sizeof c->rbuf);
  }
}

static void tls_start (struct cbwd_conn *c, const uint8_t *rest, size_t len);
static void tls_read (struct cbwd_conn *c, const uint8_t *ct, size_t len);

/* Loop: plaintext for the protocol session (from the socket or out of
 * TLS); hands bytes after an acknowledged STARTTLS to the TLS layer. */
static void
conn_feed (struct cbwd_conn *c, const uint8_t *buf, size_t len)
{
  size_t used = cbwd_session_feed (&c->sess, buf, len);
  flush_session_out (c);
  if (c->sess.state == SS_STARTTLS && !c->tls)
    tls_start (c, buf + used, len - used);
}

static void
read_cb (uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
  (void) buf;
  struct cbwd_conn *c = s->data;
  if (nread == 0)
    return;
  c->last_rx = uv_now (c->srv->loop);
  if (nread < 0) {
    if (nread != UV_EOF)
      cbwd_debug (c->srv, "conn %u: read: %s", c->id, uv_strerror ((int) nread));
    else
      cbwd_debug (c->srv, "conn %u: client closed the connection", c->id);
    conn_fail (c, true);
    return;
  }
  bool was_handshake = c->sess.exp == NULL;
  if (c->tls)
    tls_read (c, c->rbuf, (size_t) nread);
  else if (c->direct) {
    cbwd_session_direct_done (&c->sess, (size_t) nread);
    flush_session_out (c);
  }
  else
    conn_feed (c, c->rbuf, (size_t) nread);
  if (c->close_started || c->drop) {
    conn_maybe_close (c);
    return;
  }
  if (was_handshake && c->sess.exp && c->timer_active) {
    uv_timer_stop (&c->timer);
    c->timer_active = false;
    cbwd_debug (c->srv, "conn %u: serving export '%s'", c->id, c->sess.exp->name);
  }
  if (was_handshake && c->sess.exp && !c->idle_armed && c->srv->limits.idle_timeout_ms) {
    c->idle_armed = true;
    uv_timer_start (&c->timer, idle_check, c->srv->limits.idle_timeout_ms, 0);
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

/* Loop: STARTTLS was acknowledged (the ACK is queued in plain text);
 * bytes the client sent after it are the start of its TLS handshake. */
static void
tls_start (struct cbwd_conn *c, const uint8_t *rest, size_t len)
{
  struct cbw_err err = { 0 };
  struct cbwd_tls *t = c->srv->tls_creds ? cbwd_tls_new (c->srv->tls_creds, &err) : NULL;
  if (!t) {
    cbwd_log ("conn %u: cannot start TLS: %s", c->id,
              c->srv->tls_creds ? err.msg : "no credentials");
    conn_fail (c, true);
    return;
  }
  c->tls_pbuf = malloc (16384);
  if (!c->tls_pbuf) {
    cbwd_tls_free (t);
    conn_fail (c, true);
    return;
  }
  pthread_mutex_lock (&c->tls_lock);
  c->tls = t;
  pthread_mutex_unlock (&c->tls_lock);
  cbwd_debug (c->srv, "conn %u: STARTTLS: TLS handshake", c->id);
  tls_read (c, rest, len);
}

/* Loop: ciphertext from the socket: advance the handshake, then decrypt
 * and feed the protocol session until the input is used up. */
static void
tls_read (struct cbwd_conn *c, const uint8_t *ct, size_t len)
{
  struct cbw_err err = { 0 };
  pthread_mutex_lock (&c->tls_lock);
  int rc = len ? cbwd_tls_input (c->tls, ct, len) : 0;
  if (rc == 0 && !c->tls_ready)
    rc = cbwd_tls_handshake (c->tls, &err);
  const char *id = cbwd_tls_identity (c->tls);
  pthread_mutex_unlock (&c->tls_lock);
  flush_session_out (c);            /* handshake records or an alert */
  if (rc == -1) {
    cbwd_log ("conn %u: %s", c->id, err.msg[0] ? err.msg : "TLS: out of memory");
    conn_fail (c, false);           /* the alert goes out, then close */
    return;
  }
  if (!c->tls_ready) {
    if (rc == 0) return;            /* more handshake input needed */
    c->tls_ready = true;
    if (id) c->identity = strdup (id);
    c->sess.identity = c->identity;
    char desc[256];
    pthread_mutex_lock (&c->tls_lock);
    cbwd_tls_description (c->tls, desc, sizeof desc);
    pthread_mutex_unlock (&c->tls_lock);
    cbwd_log ("conn %u: TLS established (%s), client identity %s", c->id, desc,
              c->identity ? c->identity : "(none: certificate not requested)");
    cbwd_session_tls_done (&c->sess);
  }
  while (!c->close_started && !c->drop && !cbwd_session_closed (&c->sess)) {
    size_t dn = 0;
    uint8_t *d = cbwd_session_direct_buf (&c->sess, &dn);
    if (!d) { d = c->tls_pbuf; dn = 16384; }
    pthread_mutex_lock (&c->tls_lock);
    ssize_t n = cbwd_tls_recv (c->tls, d, dn, &err);
    pthread_mutex_unlock (&c->tls_lock);
    if (n == 0) break;
    if (n < 0) {
      if (err.errnum)
        cbwd_log ("conn %u: %s", c->id, err.msg);
      else
        cbwd_debug (c->srv, "conn %u: %s", c->id, err.msg);
      flush_session_out (c);
      conn_fail (c, true);
      return;
    }
    if (d != c->tls_pbuf) {
      cbwd_session_direct_done (&c->sess, (size_t) n);
      flush_session_out (c);
    }
    else
      conn_feed (c, d, (size_t) n);
  }
  flush_session_out (c);            /* records the session sent on its own */
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

/* Loop, after the handshake: close the connection once it has been idle
 * for idle_timeout_ms: nothing received, and either nothing in flight,
 * waiting or held, or replies waiting for a client that took none of them
 * (a client that never reads would pin its replies' memory, and with it
 * the global bound, for ever).  Else look again when that could be so;
 * reply progress (any byte the client took) is sampled at each look, so
 * a stalled reader goes after between one and two timeouts. */
static void
idle_check (uv_timer_t *t)
{
  struct cbwd_conn *c = t->data;
  if (c->closing || c->close_started) return;
  uint64_t now = uv_now (c->srv->loop), limit = c->srv->limits.idle_timeout_ms;
  pthread_mutex_lock (&c->tx_lock);
  bool backlog = c->tx_loop > 0;
  pthread_mutex_unlock (&c->tx_lock);
  pthread_mutex_lock (&c->lock);
  bool busy = c->inflight > 0 || c->held_bytes > 0;
  pthread_mutex_unlock (&c->lock);
  /* Progress: a write completed, or libuv's queue moved (the client
   * took part of a big reply). */
  size_t wq = uv_stream_get_write_queue_size (&c->h.stream);
  bool stalled = backlog && !c->tx_progress && wq == c->wq_seen;
  c->wq_seen = wq;
  /* Not idle: work of ours in flight or waiting, or requests we do not
   * read now (a limit, the global bound among them, stopped reading). */
  if (!stalled && (busy || backlog || c->npending > 0 || !c->reading ||
                   c->sess.state == SS_REQ_PAYLOAD))
    c->last_rx = now;                /* the idle time starts when it is done */
  c->tx_progress = false;
  uint64_t idle = now - c->last_rx;
  if (idle < limit) {
    uv_timer_start (t, idle_check, limit - idle, 0);
    return;
  }
  if (stalled) {
    cbwd_log ("conn %u: client read no reply for %" PRIu64 " s (--idle-timeout): "
              "dropping it", c->id, idle / 1000);
    conn_fail (c, true);
  }
  else {
    cbwd_log ("conn %u: idle for %" PRIu64 " s after the handshake (--idle-timeout): "
              "closing", c->id, idle / 1000);
    conn_fail (c, false);
  }
}

/* Loop: pump the connections the global memory bound stopped. */
static void
mem_async_cb (uv_async_t *a)
{
  struct cbwd_server *srv = a->data;
  atomic_store (&srv->mem_wait, false);
  for (struct cbwd_conn *c = srv->conns, *next; c; c = next) {
    next = c->next;                  /* conn_pump never frees c */
    if (!c->mem_blocked || c->close_started) continue;
    c->mem_blocked = false;
    conn_pump (c);
    conn_maybe_close (c);
  }
}

static void
reject_closed (uv_handle_t *h)
{
  free (h);
}

static bool
same_peer (const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
  if (a->ss_family != b->ss_family) return false;
  if (a->ss_family == AF_INET)
    return ((const struct sockaddr_in *) a)->sin_addr.s_addr ==
           ((const struct sockaddr_in *) b)->sin_addr.s_addr;
  if (a->ss_family == AF_INET6)
    return memcmp (&((const struct sockaddr_in6 *) a)->sin6_addr,
                   &((const struct sockaddr_in6 *) b)->sin6_addr,
                   sizeof (struct in6_addr)) == 0;
  return false;
}

static void
peer_name (const struct sockaddr_storage *ss, char *buf, size_t n)
{
  if (ss->ss_family == AF_INET6)
    uv_ip6_name ((const struct sockaddr_in6 *) ss, buf, n);
  else
    uv_ip4_name ((const struct sockaddr_in *) ss, buf, n);
}

static void
on_connection (uv_stream_t *server, int status)
{
  struct cbwd_listener *li = server->data;
  struct cbwd_server *srv = li->srv;
  if (status < 0) {
    cbwd_log ("accept: %s", uv_strerror (status));
    return;
  }
  bool tcp = server->type == UV_TCP;
  unsigned lmax = li->max_conns ? li->max_conns : srv->limits.max_connections;
  if (srv->stopping || li->nconns >= lmax) {
    /* Accept and drop, so the backlog does not fill up. */
    uv_stream_t *tmp = malloc (tcp ? sizeof (uv_tcp_t) : sizeof (uv_pipe_t));
    if (!tmp) return;
    if (tcp) uv_tcp_init (srv->loop, (uv_tcp_t *) tmp);
    else uv_pipe_init (srv->loop, (uv_pipe_t *) tmp, 0);
    if (uv_accept (server, tmp) == 0 && !srv->stopping)
      cbwd_log ("too many connections on %s (%u), dropping one", li->spec, li->nconns);
    uv_close ((uv_handle_t *) tmp, reject_closed);
    return;
  }
  if (!srv->mem_async_init) {
    uv_async_init (srv->loop, &srv->mem_async, mem_async_cb);
    srv->mem_async.data = srv;
    pthread_mutex_lock (&srv->mem_lock);
    srv->mem_async_init = true;
    pthread_mutex_unlock (&srv->mem_lock);
  }
  struct cbwd_conn *c = calloc (1, sizeof *c);
  if (!c) return;
  c->srv = srv;
  c->id = ++next_conn_id;
  c->fd = -1;
  pthread_mutex_init (&c->lock, NULL);
  pthread_mutex_init (&c->tx_lock, NULL);
  pthread_mutex_init (&c->tls_lock, NULL);
  if (tcp) uv_tcp_init (srv->loop, &c->h.tcp);
  else uv_pipe_init (srv->loop, &c->h.pipe, 0);
  c->h.handle.data = c;
  uv_timer_init (srv->loop, &c->timer);
  c->timer.data = c;
  uv_async_init (srv->loop, &c->async, async_cb);
  c->async.data = c;
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  srv->nconns++;
  c->listener = li;
  li->nconns++;
  cbwd_session_init (&c->sess, &srv->exports, &sess_ops, c);
  /* TCP listeners use the configured mode; Unix sockets (protected by
   * their file mode) offer TLS when it is configured but never require it. */
  c->sess.tls_mode = !srv->tls_creds ? CBWD_TLS_OFF
                   : tcp ? (enum cbwd_tls_mode) srv->tls.mode : CBWD_TLS_ON;
  c->sess.tcp = tcp;
  uv_os_fd_t fd;
  if (uv_accept (server, &c->h.stream) != 0 ||
      uv_fileno (&c->h.handle, &fd) != 0) {
    c->drop = c->closing = true;
    conn_close_now (c);
    return;
  }
  c->fd = fd;
  if (tcp) {
    int len = sizeof c->peer;
    if (uv_tcp_getpeername (&c->h.tcp, (struct sockaddr *) &c->peer, &len) == 0)
      c->has_peer = true;
  }
  if (c->has_peer && srv->limits.max_conns_per_peer) {
    unsigned same = 0;
    for (struct cbwd_conn *o = srv->conns; o; o = o->next)
      if (o != c && o->has_peer && !o->close_started && same_peer (&o->peer, &c->peer))
        same++;
    if (same >= srv->limits.max_conns_per_peer) {
      char name[INET6_ADDRSTRLEN] = "?";
      peer_name (&c->peer, name, sizeof name);
      cbwd_log ("too many connections from %s (%u, --max-connections-per-peer), "
                "dropping one", name, same);
      li->nconns--;                  /* never served: frees its slot now */
      c->listener = NULL;
      c->drop = c->closing = true;
      conn_close_now (c);
      return;
    }
  }
  if (tcp) uv_tcp_nodelay (&c->h.tcp, 1);
  else {
    /* Room for a few large replies in the socket (the default is ~200 KiB,
     * less than one 256 KiB read reply): most replies then leave with the
     * one direct sendmsg of the thread that has them, instead of going
     * through the loop's queue (partial write, EAGAIN, wait for POLLOUT,
     * write the rest): about half the system calls and a third of the
     * context switches per MiB read.  SO_SNDBUF is clamped to
     * net.core.wmem_max (stock: 208 KiB, which would make it a no-op), so
     * a cbwd with CAP_NET_ADMIN (root, as packaged) forces the size;
     * otherwise it asks, and gets at most wmem_max.  TCP keeps the
     * kernel's send buffer autotuning (setting it turns that off). */
    int v = CBWD_UNIX_SNDBUF;
    if (setsockopt (fd, SOL_SOCKET, SO_SNDBUFFORCE, &v, sizeof v) == -1)
      (void) setsockopt (fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
  }
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
cbwd_listen (struct cbwd_server *srv, const char *spec_opts)
{
  uv_stream_t *s = NULL;
  char *upath = NULL;
  /* ",max-connections=N" at the end: this listener's own budget. */
  static const char key[] = ",max-connections=";
  unsigned max_conns = 0;
  char spec[4096];
  if (strlen (spec_opts) >= sizeof spec) {
    cbwd_log ("--listen %s: too long", spec_opts);
    return -1;
  }
  strcpy (spec, spec_opts);
  char *opt = strstr (spec, key);
  if (opt) {
    char *end;
    errno = 0;
    unsigned long n = strtoul (opt + sizeof key - 1, &end, 10);
    if (errno || *end || end == opt + sizeof key - 1 || n == 0 || n > 1000000) {
      cbwd_log ("--listen %s: max-connections= expects a number 1..1000000", spec_opts);
      return -1;
    }
    max_conns = (unsigned) n;
    *opt = 0;
  }
  if (strncmp (spec, "unix:", 5) == 0) {
    if (listen_unix (srv, spec + 5, &s) == -1) return -1;
    upath = strdup (spec + 5);
  }
  else if (strncmp (spec, "tcp:", 4) == 0) {
    if (listen_tcp (srv, spec + 4, &s) == -1) return -1;
    srv->any_tcp = true;
  }
  else {
    cbwd_log ("--listen %s: expected unix:PATH or tcp:HOST:PORT", spec);
    return -1;
  }
  struct cbwd_listener *li = calloc (1, sizeof *li);
  if (li) li->spec = strdup (spec);
  if (!li || !li->spec) {
    if (li) free (li);
    free (upath);
    uv_close ((uv_handle_t *) s, reject_closed);
    return -1;
  }
  li->srv = srv;
  li->max_conns = max_conns;
  s->data = li;
  uv_stream_t **nl = realloc (srv->listeners, (srv->nlisteners + 1) * sizeof *nl);
  char **np = realloc (srv->unix_paths, (srv->nlisteners + 1) * sizeof *np);
  struct cbwd_listener **ni = realloc (srv->linfo, (srv->nlinfo + 1) * sizeof *ni);
  if (nl) srv->listeners = nl;
  if (np) srv->unix_paths = np;
  if (ni) srv->linfo = ni;
  if (!nl || !np || !ni) { free (upath); free (li->spec); free (li); return -1; }
  srv->linfo[srv->nlinfo++] = li;
  if (!srv->first_listen) srv->first_listen = strdup (spec);
  srv->listeners[srv->nlisteners] = s;
  srv->unix_paths[srv->nlisteners] = upath;
  srv->nlisteners++;
  return 0;
}

static char tls_warning[] =
  "plain NBD on TCP (--tls=off): anyone who can reach the port reads (and "
  "writes) the exports; use --tls=require with --tls-psk or --tls-certificates";

int
cbwd_tls_setup (struct cbwd_server *srv)
{
  struct cbwd_tls_config *t = &srv->tls;
  bool creds = t->psk || t->certificates;
  if (t->mode == -1 && creds)
    t->mode = CBWD_TLS_REQUIRE;     /* credentials given: TLS is wanted */
  if (t->mode == -1) {
    if (srv->any_tcp) {
      cbwd_log ("refusing to serve NBD on a TCP listener without TLS: give "
                "--tls=require with --tls-psk FILE or --tls-certificates DIR, or "
                "--tls=off to serve plain NBD over TCP anyway");
      return -1;
    }
    t->mode = CBWD_TLS_OFF;
  }
  if (t->mode == CBWD_TLS_OFF) {
    if (creds || t->verify_peer) {
      cbwd_log ("--tls=off contradicts --tls-psk/--tls-certificates/--tls-verify-peer");
      return -1;
    }
    if (srv->any_tcp)
      cbwd_log ("WARNING: %s", tls_warning);
    return 0;
  }
  struct cbw_err err = { 0 };
  srv->tls_creds = cbwd_tls_creds_load (t, &err);
  if (!srv->tls_creds) {
    cbwd_log ("--tls=%s: %s", cbwd_tls_mode_name (t->mode), err.msg);
    return -1;
  }
  cbwd_log ("TLS %s on TCP listeners (%s%s)", cbwd_tls_mode_name (t->mode),
            cbwd_tls_creds_kind (srv->tls_creds),
            t->verify_peer ? ", client certificates verified" : "");
  return 0;
}

const char *
cbwd_server_tls_warning (const struct cbwd_server *srv)
{
  return srv->any_tcp && srv->tls.mode == CBWD_TLS_OFF ? tls_warning : NULL;
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
  pthread_mutex_init (&srv->mem_lock, NULL);
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
  else if (asprintf (&u, "%s://%s/%s", srv->tls.mode == CBWD_TLS_REQUIRE ? "nbds" : "nbd",
                     l + 4, name) == -1)
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
  pthread_mutex_lock (&srv->mem_lock);
  if (srv->mem_async_init) {
    srv->mem_async_init = false;
    uv_close ((uv_handle_t *) &srv->mem_async, NULL);
  }
  pthread_mutex_unlock (&srv->mem_lock);
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

void
cbwd_server_cleanup (struct cbwd_server *srv)
{
  if (srv->pool_started) {
    cbwd_pool_stop (&srv->pool);
    srv->pool_started = false;
  }
  for (size_t i = 0; i < srv->nlinfo; i++) {
    free (srv->linfo[i]->spec);
    free (srv->linfo[i]);
  }
  free (srv->linfo);
  srv->linfo = NULL;
  srv->nlinfo = 0;
}
