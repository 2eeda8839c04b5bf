/* cbw — plugin/cbw/target.c: the backup target, a pool of libnbd connections.
 * (A `file:` URI instead gives a local-file target, target_file.c: every
 * function below then forwards to it and the pool is not used.)
 *
 * Copies run on nbdkit's I/O threads.  Each copy checks one connection out
 * of the pool, issues one asynchronous libnbd command on it and drives it
 * with nbd_poll() until it completes or the caller's deadline passes; so
 * several copies are in flight at once (one per connection) and a dead, hung
 * (SIGSTOP) or slow target can never hold a guest write past its deadline.
 * On a timeout or a lost connection the handle is closed and its slot is
 * reconnected (with the same kind of deadline) on its next use.  A command
 * the server failed (EIO, ENOSPC, ...) leaves the connection usable.
 *
 * Locking: t->lock guards only the slots' busy flags (checkout/checkin), and
 * t->cond signals a freed slot.  The lock is never held across libnbd I/O: a
 * checked-out slot belongs to one thread until it is checked back in.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>

#include "cleanup.h"
#include "target.h"
#include "target_file.h"

struct slot {
  struct nbd_handle *h;     /* NULL: not connected (yet, or dropped) */
  bool busy;                /* checked out; guarded by t->lock */
};

struct cbw_target {
  char *uri;
  int64_t size;
  bool can_zero, can_trim;
  pthread_mutex_t lock;
  pthread_cond_t cond;      /* a slot was checked in */
  size_t n;
  struct slot *slots;
  struct cbw_file_target *file;   /* non-NULL: a local-file target */
};

int64_t
cbw_now_ns (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int
ms_left (int64_t deadline_ns)
{
  int64_t left = deadline_ns - cbw_now_ns ();
  if (left <= 0)
    return 0;
  left = (left + 999999) / 1000000;
  return left > 1000000 ? 1000000 : (int) left;
}

static int
nbd_errno_or (int dflt)
{
  int e = nbd_get_errno ();
  return e > 0 ? e : dflt;
}

/* Connect one handle to uri before the deadline. */
static struct nbd_handle *
connect_one (const char *uri, int64_t deadline_ns, struct cbw_err *err)
{
  struct nbd_handle *h = nbd_create ();
  int ms;

  if (h == NULL) {
    cbw_err_set (err, nbd_errno_or (ENOMEM), "target: nbd_create: %s",
                 nbd_get_error ());
    return NULL;
  }
  if (nbd_aio_connect_uri (h, uri) == -1) {
    cbw_err_set (err, nbd_errno_or (EINVAL), "target %s: %s", uri,
                 nbd_get_error ());
    goto fail;
  }
  while (!nbd_aio_is_ready (h)) {
    if (nbd_aio_is_dead (h) || nbd_aio_is_closed (h)) {
      cbw_err_set (err, nbd_errno_or (ECONNREFUSED), "target %s: %s", uri,
                   nbd_get_error () ? nbd_get_error () : "connection failed");
      goto fail;
    }
    ms = ms_left (deadline_ns);
    if (ms == 0) {
      cbw_err_set (err, ETIMEDOUT, "target %s: connect timed out", uri);
      goto fail;
    }
    if (nbd_poll (h, ms) == -1) {
      cbw_err_set (err, nbd_errno_or (ECONNREFUSED), "target %s: %s", uri,
                   nbd_get_error ());
      goto fail;
    }
  }
  return h;

 fail:
  nbd_close (h);
  return NULL;
}

struct cbw_target *
cbw_target_open (const char *uri, size_t nconns, int64_t deadline_ns,
                 struct cbw_err *err)
{
  struct cbw_target *t;
  pthread_condattr_t ca;

  if (nconns == 0)
    nconns = 1;
  t = calloc (1, sizeof *t);
  if (t == NULL || (t->slots = calloc (nconns, sizeof *t->slots)) == NULL ||
      (t->uri = strdup (uri)) == NULL) {
    cbw_err_set (err, ENOMEM, "target: out of memory");
    goto fail;
  }
  t->n = nconns;
  pthread_mutex_init (&t->lock, NULL);
  pthread_condattr_init (&ca);
  pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
  pthread_cond_init (&t->cond, &ca);
  pthread_condattr_destroy (&ca);
  if (cbw_file_target_uri (uri)) {
    t->file = cbw_file_target_open (uri, err);
    if (t->file == NULL)
      goto fail;
    t->size = cbw_file_target_size (t->file);
    t->can_zero = t->can_trim = true;
    return t;
  }

  t->slots[0].h = connect_one (uri, deadline_ns, err);
  if (t->slots[0].h == NULL)
    goto fail;
  t->size = nbd_get_size (t->slots[0].h);
  if (t->size < 0) {
    cbw_err_set (err, nbd_errno_or (EIO), "target %s: %s", uri,
                 nbd_get_error ());
    goto fail;
  }
  if (nbd_is_read_only (t->slots[0].h) == 1) {
    cbw_err_set (err, EROFS, "target %s is read-only", uri);
    goto fail;
  }
  t->can_zero = nbd_can_zero (t->slots[0].h) == 1;
  t->can_trim = nbd_can_trim (t->slots[0].h) == 1;
  return t;

 fail:
  cbw_target_close (t);
  return NULL;
}

void
cbw_target_close (struct cbw_target *t)
{
  size_t i;

  if (t == NULL)
    return;
  if (t->slots) {
    for (i = 0; i < t->n; ++i)
      if (t->slots[i].h)
        nbd_close (t->slots[i].h);
    pthread_mutex_destroy (&t->lock);
    pthread_cond_destroy (&t->cond);
  }
  cbw_file_target_close (t->file);
  free (t->slots);
  free (t->uri);
  free (t);
}

int64_t cbw_target_size (const struct cbw_target *t) { return t->size; }
bool cbw_target_can_trim (const struct cbw_target *t) { return t->can_trim; }
bool cbw_target_is_local (const struct cbw_target *t) { return t->file != NULL; }

int
cbw_target_set_limit (struct cbw_target *t, uint64_t bytes,
                      struct cbw_err *err)
{
  if (t->file == NULL)
    return cbw_err_set (err, EINVAL, "target %s: a limit applies only to a "
                        "local file target (file:///PATH); an NBD server "
                        "enforces its own", t->uri);
  cbw_file_target_set_limit (t->file, bytes);
  return 0;
}

int
cbw_target_set_direct (struct cbw_target *t, struct cbw_err *err)
{
  if (t->file == NULL)
    return cbw_err_set (err, EINVAL, "target %s: target-direct applies only "
                        "to a local file target (file:///PATH)", t->uri);
  return cbw_file_target_set_direct (t->file, err);
}

uint64_t
cbw_target_direct_bytes (const struct cbw_target *t)
{
  return t->file ? cbw_file_target_direct_bytes (t->file) : 0;
}

bool
cbw_target_can_copy_from (const struct cbw_target *t)
{
  return t->file && cbw_file_target_can_copy_from (t->file);
}

int
cbw_target_copy_from (struct cbw_target *t, int src, size_t len, uint64_t off,
                      uint64_t *holes, struct cbw_err *err)
{
  *holes = 0;
  if (t->file == NULL)
    return cbw_err_set (err, EOPNOTSUPP, "target %s: an in-kernel copy needs "
                        "a local file target", t->uri);
  return cbw_file_target_copy_from (t->file, src, len, off, holes, err);
}

void
cbw_target_copy_stats (const struct cbw_target *t, uint64_t *cloned,
                       uint64_t *kcopied)
{
  *cloned = *kcopied = 0;
  if (t->file)
    cbw_file_target_copy_stats (t->file, cloned, kcopied);
}

/* Take a free slot, waiting until the deadline; connect it if needed. */
static struct slot *
checkout (struct cbw_target *t, int64_t deadline_ns, struct cbw_err *err)
{
  struct slot *s = NULL;
  struct timespec ts;
  size_t i;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->lock);
    for (;;) {
      /* Prefer a connected slot. */
      for (i = 0; i < t->n && s == NULL; ++i)
        if (!t->slots[i].busy && t->slots[i].h)
          s = &t->slots[i];
      for (i = 0; i < t->n && s == NULL; ++i)
        if (!t->slots[i].busy)
          s = &t->slots[i];
      if (s) {
        s->busy = true;
        break;
      }
      ts.tv_sec = deadline_ns / 1000000000;
      ts.tv_nsec = deadline_ns % 1000000000;
      if (pthread_cond_timedwait (&t->cond, &t->lock, &ts) == ETIMEDOUT) {
        cbw_err_set (err, ETIMEDOUT,
                     "target %s: no free connection before the deadline",
                     t->uri);
        return NULL;
      }
    }
  }

  if (s->h == NULL) {
    s->h = connect_one (t->uri, deadline_ns, err);
    if (s->h == NULL) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->lock);
      s->busy = false;
      pthread_cond_signal (&t->cond);
      return NULL;
    }
  }
  return s;
}

static void
checkin (struct cbw_target *t, struct slot *s, bool drop)
{
  if (drop && s->h) {
    nbd_close (s->h);           /* abandons any command still in flight */
    s->h = NULL;
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->lock);
  s->busy = false;
  pthread_cond_signal (&t->cond);
}

enum op { OP_PWRITE, OP_PREAD, OP_ZERO, OP_TRIM };
static const char *op_name[] = { "write", "read", "write-zeroes", "trim" };

static int
run_op (struct cbw_target *t, enum op op, void *buf, size_t len, uint64_t off,
        int64_t deadline_ns, struct cbw_err *err)
{
  struct slot *s;
  struct nbd_handle *h;
  int64_t cookie = -1;
  int r, ms;
  bool drop = false;

  if (off > (uint64_t) t->size || len > (uint64_t) t->size - off)
    return cbw_err_set (err, ENOSPC,
                        "target %s: %s of %zu bytes at %llu is past its end "
                        "(%lld bytes)", t->uri, op_name[op], len,
                        (unsigned long long) off, (long long) t->size);

  s = checkout (t, deadline_ns, err);
  if (s == NULL)
    return -1;
  h = s->h;

  switch (op) {
  case OP_PWRITE:
    cookie = nbd_aio_pwrite (h, buf, len, off, NBD_NULL_COMPLETION, 0);
    break;
  case OP_PREAD:
    cookie = nbd_aio_pread (h, buf, len, off, NBD_NULL_COMPLETION, 0);
    break;
  case OP_ZERO:
    cookie = nbd_aio_zero (h, len, off, NBD_NULL_COMPLETION, 0);
    break;
  case OP_TRIM:
    cookie = nbd_aio_trim (h, len, off, NBD_NULL_COMPLETION, 0);
    break;
  }
  if (cookie == -1) {
    cbw_err_set (err, nbd_errno_or (EIO), "target %s: %s: %s", t->uri,
                 op_name[op], nbd_get_error ());
    drop = !nbd_aio_is_ready (h) && !nbd_aio_is_processing (h);
    checkin (t, s, drop);
    return -1;
  }

  for (;;) {
    r = nbd_aio_command_completed (h, cookie);
    if (r == 1)
      break;
    if (r == -1) {
      cbw_err_set (err, nbd_errno_or (EIO), "target %s: %s at %llu: %s",
                   t->uri, op_name[op], (unsigned long long) off,
                   nbd_get_error ());
      drop = nbd_aio_is_dead (h) || nbd_aio_is_closed (h);
      checkin (t, s, drop);
      return -1;
    }
    ms = ms_left (deadline_ns);
    if (ms == 0) {
      cbw_err_set (err, ETIMEDOUT, "target %s: %s at %llu timed out; "
                   "connection dropped", t->uri, op_name[op],
                   (unsigned long long) off);
      checkin (t, s, true);
      return -1;
    }
    if (nbd_poll (h, ms) == -1) {
      cbw_err_set (err, nbd_errno_or (EIO), "target %s: %s at %llu: %s",
                   t->uri, op_name[op], (unsigned long long) off,
                   nbd_get_error ());
      checkin (t, s, true);
      return -1;
    }
  }
  checkin (t, s, false);
  return 0;
}

int
cbw_target_pwrite (struct cbw_target *t, const void *buf, size_t len,
                   uint64_t off, int64_t deadline_ns, struct cbw_err *err)
{
  if (t->file)
    return cbw_file_target_pwrite (t->file, buf, len, off, err);
  return run_op (t, OP_PWRITE, (void *) buf, len, off, deadline_ns, err);
}

int
cbw_target_zero (struct cbw_target *t, size_t len, uint64_t off,
                 int64_t deadline_ns, struct cbw_err *err)
{
  if (t->file)
    return cbw_file_target_zero (t->file, len, off, err);
  if (!t->can_zero) {
    CLEANUP_FREE void *z = calloc (1, len);
    if (z == NULL)
      return cbw_err_set (err, ENOMEM, "target: out of memory");
    return run_op (t, OP_PWRITE, z, len, off, deadline_ns, err);
  }
  return run_op (t, OP_ZERO, NULL, len, off, deadline_ns, err);
}

int
cbw_target_pread (struct cbw_target *t, void *buf, size_t len, uint64_t off,
                  int64_t deadline_ns, struct cbw_err *err)
{
  if (t->file)
    return cbw_file_target_pread (t->file, buf, len, off, err);
  return run_op (t, OP_PREAD, buf, len, off, deadline_ns, err);
}

int
cbw_target_trim (struct cbw_target *t, size_t len, uint64_t off,
                 int64_t deadline_ns, struct cbw_err *err)
{
  if (t->file)
    return cbw_file_target_trim (t->file, len, off, err);
  if (!t->can_trim)
    return 0;
  return run_op (t, OP_TRIM, NULL, len, off, deadline_ns, err);
}

/* Fail every op of w[0..n) that has no result yet with errnum. */
static size_t
fail_rest (struct cbw_target_wr *w, size_t n, int errnum)
{
  size_t i, failed = 0;
  for (i = 0; i < n; ++i)
    if (w[i].cookie != 0 && w[i].result == -1) {
      w[i].result = errnum;
      w[i].cookie = 0;
      failed++;
    }
  return failed;
}

/* Counters of one cbw_target_write_batch call (each op's `batch`). */
struct batch { size_t left, failed; };

/* Completion callback of a batched command (runs inside nbd_poll or
 * nbd_close in the batch's own thread). */
static int
batch_done (void *user_data, int *error)
{
  struct cbw_target_wr *w = user_data;
  struct batch *b = w->batch;

  if (w->cookie != 0) {         /* not already failed by fail_rest */
    w->cookie = 0;
    w->result = *error ? *error : 0;
    if (*error)
      b->failed++;
    b->left--;
  }
  return 1;                     /* retire the command */
}

size_t
cbw_target_write_batch (struct cbw_target *t, struct cbw_target_wr *w,
                        size_t n, int64_t deadline_ns, struct cbw_err *err)
{
  struct slot *s;
  struct nbd_handle *h;
  size_t i, failed = 0;
  struct batch b = { 0, 0 };
  bool drop = false, have_err = false;
  int ms;

#define FIRST_ERR(...) \
  do { if (!have_err) { cbw_err_set (err, __VA_ARGS__); have_err = true; } } \
  while (0)

  for (i = 0; i < n; ++i) {
    w[i].result = -1;           /* pending */
    w[i].cookie = 1;            /* "not finished" marker until issued */
    if (w[i].off > (uint64_t) t->size ||
        w[i].len > (uint64_t) t->size - w[i].off) {
      FIRST_ERR (ENOSPC, "target %s: write of %zu bytes at %llu is past its "
                 "end (%lld bytes)", t->uri, w[i].len,
                 (unsigned long long) w[i].off, (long long) t->size);
      w[i].result = ENOSPC;
      w[i].cookie = 0;
      failed++;
    }
  }
  if (failed == n)
    return failed;

  if (t->file) {
    for (i = 0; i < n; ++i) {
      struct cbw_err e1 = { 0 };
      if (w[i].cookie == 0)
        continue;
      w[i].cookie = 0;
      if ((w[i].zero ? cbw_file_target_zero (t->file, w[i].len, w[i].off, &e1)
           : cbw_file_target_pwrite (t->file, w[i].buf, w[i].len, w[i].off,
                                     &e1)) == -1) {
        FIRST_ERR (e1.errnum, "%s", e1.msg);
        w[i].result = e1.errnum;
        failed++;
      }
      else
        w[i].result = 0;
    }
    return failed;
  }

  s = checkout (t, deadline_ns, err);
  if (s == NULL) {
    have_err = true;
    return failed + fail_rest (w, n, err->errnum ? err->errnum : EIO);
  }
  h = s->h;

  /* Issue everything, then let nbd_poll run the completion callbacks
   * (batch_done, called in this thread): O(1) per reply however big the
   * batch. */
  for (i = 0; i < n; ++i) {
    if (w[i].cookie == 0)
      continue;
    w[i].batch = &b;
    b.left++;                   /* before: the callback may run inside */
    nbd_completion_callback cb = { .callback = batch_done, .user_data = &w[i] };
    int64_t c = w[i].zero && t->can_zero
      ? nbd_aio_zero (h, w[i].len, w[i].off, cb, 0)
      : nbd_aio_pwrite (h, w[i].buf, w[i].len, w[i].off, cb, 0);
    if (c == -1) {
      FIRST_ERR (nbd_errno_or (EIO), "target %s: write at %llu: %s", t->uri,
                 (unsigned long long) w[i].off, nbd_get_error ());
      w[i].result = err->errnum;
      w[i].cookie = 0;
      b.left--;                 /* not issued: no callback */
      failed++;
      if (!nbd_aio_is_ready (h) && !nbd_aio_is_processing (h)) {
        drop = true;
        break;
      }
      continue;
    }
  }
  if (drop) {
    failed += b.failed + fail_rest (w, n, EIO);
    checkin (t, s, true);       /* nbd_close: late callbacks find cookie 0 */
    return failed;
  }

  while (b.left > 0) {
    ms = ms_left (deadline_ns);
    if (ms == 0) {
      FIRST_ERR (ETIMEDOUT, "target %s: %zu writes timed out; connection "
                 "dropped", t->uri, b.left);
      failed += b.failed + fail_rest (w, n, ETIMEDOUT);
      checkin (t, s, true);
      return failed;
    }
    if (nbd_poll (h, ms) == -1 || nbd_aio_is_dead (h) ||
        nbd_aio_is_closed (h)) {
      FIRST_ERR (nbd_errno_or (EIO), "target %s: %s", t->uri,
                 nbd_get_error () ? nbd_get_error () : "connection lost");
      failed += b.failed + fail_rest (w, n, err->errnum);
      checkin (t, s, true);
      return failed;
    }
  }
  if (b.failed > 0)
    for (i = 0; i < n; ++i)
      if (w[i].result > 0 && w[i].batch == &b) {
        FIRST_ERR (w[i].result, "target %s: write at %llu: %s", t->uri,
                   (unsigned long long) w[i].off, strerror (w[i].result));
        break;
      }
  /* A connection that died with the last replies is reopened next time. */
  checkin (t, s, nbd_aio_is_dead (h) || nbd_aio_is_closed (h));
  return failed + b.failed;
#undef FIRST_ERR
}
