/* cbw — server/orch/job_copy.c: the copy engine of push backup jobs, run
 * on one thread per job, its disks one after another.
 *
 * Async libnbd with up to `requests` reads of `request-size` bytes in
 * flight.  The ranges come from base:allocation block status of the PIT
 * export (zero ranges are not read: nothing is written to a target we just
 * created sparse, write-zeroes otherwise) over what job.c planned (the
 * whole disk, or the dirty extents).  Every range is aligned to the cbw
 * session's block size, so that after a range is on the target the job
 * releases it with the cbw filter's `skip` (batched): the filter stops
 * protecting it and trims it from the store, which shrinks instead of
 * growing.  The speed limit is a token bucket on bytes read.
 *
 * Source connections: cbwd's own PIT export takes pipelined requests; the
 * cbw filter's `pit` export of nbdkit 1.32 must not see a client vanish with
 * several requests in flight (nbdkit aborts, taking the guest's disk down),
 * so against it the job opens one connection per request slot with one
 * request in flight each (a killed cbwd then costs nothing).  A job never
 * closes a source connection with requests in flight.
 *
 * Locking: the thread owns its struct copier (handles, buffers, plan,
 * releases) and needs no lock for it.  It takes j->lock only to read the
 * control flags (cancel, pause, speed) and to update the counters, never
 * across I/O; events are emitted without it.  Control commands wake the
 * thread through j->wakefd.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"
#include "job_internal.h"

/* ---------------------------------------------------------------- */
/* The copy engine (job thread) */

enum slot_state { SL_FREE, SL_READ, SL_READ_DONE, SL_WRITE, SL_WRITE_DONE };

struct slot {
  enum slot_state st;
  int err;
  bool zero;                    /* a write-zeroes request */
  uint64_t off, len;
  char *buf;
  struct nbd_handle *src;
};

struct seg {
  uint64_t off, len;
  bool zero;
};

struct copier {
  struct cbw_orch *o;
  struct orch_job *j;
  struct orch_job_disk *jd;
  uint64_t gran;                /* alignment of ranges = the session's block size */
  uint64_t rs;                  /* request size (multiple of gran when possible) */
  size_t nslots;
  struct slot *slots;
  size_t nsrc;
  struct nbd_handle **src;      /* data connections */
  struct nbd_handle *bs;        /* block-status connection, NULL = all data */
  /* ranges still to plan: jd->want[wi] from wpos */
  size_t wi;
  uint64_t wpos;
  /* block status in flight */
  bool bs_inflight, bs_done;
  int bs_err;
  uint64_t bs_off, bs_end, bs_covered;
  size_t bs_wi;                 /* want cursor of the extent callback */
  /* planned segments (FIFO) */
  struct seg *plan;
  size_t phead, pn, pcap;
  uint64_t pbytes;              /* bytes in plan[phead..pn) */
  /* releases not yet sent */
  uint64_t (*rel)[2];
  size_t nrel, relcap;
  uint64_t rel_bytes;
  int64_t rel_last;
  struct cbw_ctl_client *ctl;
  /* rate limiting */
  uint64_t rate_speed, rate_bytes;
  int64_t rate_t0;
  /* failure */
  bool failed;
  char msg[CBW_ERR_MSG_MAX];
};

static void
copier_fail (struct copier *c, const char *fmt, ...) __attribute__ ((format (printf, 2, 3)));
static void
copier_fail (struct copier *c, const char *fmt, ...)
{
  if (c->failed)
    return;
  va_list ap;
  va_start (ap, fmt);
  int n = snprintf (c->msg, sizeof c->msg, "disk %s: ", c->jd->name);
  if (n < 0 || (size_t) n >= sizeof c->msg)
    n = 0;
  vsnprintf (c->msg + n, sizeof c->msg - (size_t) n, fmt, ap);
  va_end (ap);
  c->failed = true;
}

static int
plan_push (struct copier *c, uint64_t off, uint64_t len, bool zero)
{
  if (len == 0)
    return 0;
  c->pbytes += len;
  if (c->pn > c->phead) {
    struct seg *last = &c->plan[c->pn - 1];
    if (last->zero == zero && last->off + last->len == off) {
      last->len += len;
      return 0;
    }
  }
  if (c->pn == c->pcap) {
    if (c->phead > 0) {
      memmove (c->plan, c->plan + c->phead, (c->pn - c->phead) * sizeof *c->plan);
      c->pn -= c->phead;
      c->phead = 0;
    }
    if (c->pn == c->pcap) {
      size_t ncap = c->pcap ? c->pcap * 2 : 256;
      struct seg *np = realloc (c->plan, ncap * sizeof *np);
      if (np == NULL)
        return -1;
      c->plan = np;
      c->pcap = ncap;
    }
  }
  c->plan[c->pn++] = (struct seg) { off, len, zero };
  return 0;
}

/* A zero extent shrinks to whole blocks (the partial blocks at its ends are
 * copied as data), so that every range the job releases is whole blocks. */
static int
plan_extent (struct copier *c, uint64_t off, uint64_t end, bool zero)
{
  if (!zero)
    return plan_push (c, off, end - off, false);
  uint64_t g = c->gran;
  uint64_t za = (off + g - 1) / g * g;
  uint64_t zb = end == c->jd->size ? end : end / g * g;
  if (za >= zb)
    return plan_push (c, off, end - off, false);
  if (plan_push (c, off, za - off, false) < 0 || plan_push (c, za, zb - za, true) < 0 ||
      plan_push (c, zb, end - zb, false) < 0)
    return -1;
  return 0;
}

/* Plan the part of extent [a, b) that is wanted (cursor bs_wi moves on). */
static int
plan_want (struct copier *c, uint64_t a, uint64_t b, bool zero)
{
  struct orch_job_disk *jd = c->jd;
  while (c->bs_wi < jd->nwant && jd->want[c->bs_wi][0] + jd->want[c->bs_wi][1] <= a)
    c->bs_wi++;
  for (size_t k = c->bs_wi; k < jd->nwant && jd->want[k][0] < b; k++) {
    uint64_t ws = jd->want[k][0], we = ws + jd->want[k][1];
    uint64_t s = ws > a ? ws : a, e = we < b ? we : b;
    if (s < e && plan_extent (c, s, e, zero) < 0)
      return -1;
  }
  return 0;
}

static int
bs_extent_cb (void *user_data, const char *metacontext, uint64_t offset,
              uint32_t *entries, size_t nr_entries, int *error)
{
  struct copier *c = user_data;
  (void) error;
  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  if (offset != c->bs_off || nr_entries % 2 != 0) {
    c->bs_err = EPROTO;
    return 0;
  }
  uint64_t pos = c->bs_covered > offset ? c->bs_covered : offset;
  uint64_t p = offset;
  for (size_t i = 0; i + 1 < nr_entries && p < c->bs_end; i += 2) {
    uint64_t len = entries[i];
    if (len == 0) {
      c->bs_err = EPROTO;
      return 0;
    }
    uint64_t end = p + len > c->bs_end ? c->bs_end : p + len;
    if (end > pos) {
      uint64_t from = p > pos ? p : pos;
      if (plan_want (c, from, end, (entries[i + 1] & LIBNBD_STATE_ZERO) != 0) < 0) {
        c->bs_err = ENOMEM;
        return 0;
      }
      pos = end;
    }
    p = end;
  }
  c->bs_covered = pos;
  return 0;
}

static int
bs_done_cb (void *user_data, int *error)
{
  struct copier *c = user_data;
  if (*error && c->bs_err == 0)
    c->bs_err = *error;
  c->bs_done = true;
  return 1;
}

static int
read_done_cb (void *user_data, int *error)
{
  struct slot *s = user_data;
  s->err = *error;
  s->st = SL_READ_DONE;
  return 1;
}

static int
write_done_cb (void *user_data, int *error)
{
  struct slot *s = user_data;
  s->err = *error;
  s->st = SL_WRITE_DONE;
  return 1;
}

/* Move the planning cursor to the first wanted byte at or after wpos. */
static void
want_normalize (struct copier *c)
{
  struct orch_job_disk *jd = c->jd;
  while (c->wi < jd->nwant) {
    uint64_t ws = jd->want[c->wi][0], we = ws + jd->want[c->wi][1];
    if (c->wpos < ws)
      c->wpos = ws;
    if (c->wpos < we)
      return;
    c->wi++;
  }
}

/* Plan the next piece of the wanted ranges: one block-status query over up
 * to 1 GiB (spanning as many wanted ranges as fall in it: an incremental
 * with thousands of small dirty extents needs few round trips), or, without
 * a block-status connection, the wanted ranges as data. */
static void
plan_more (struct copier *c)
{
  struct orch_job_disk *jd = c->jd;
  want_normalize (c);
  if (c->wi >= jd->nwant || c->bs_inflight)
    return;
  if (c->bs == NULL) {
    while (c->wi < jd->nwant && c->pbytes < 64 * c->rs) {
      uint64_t we = jd->want[c->wi][0] + jd->want[c->wi][1];
      uint64_t len = we - c->wpos > JOB_BS_MAX ? JOB_BS_MAX : we - c->wpos;
      if (plan_push (c, c->wpos, len, false) < 0) {
        copier_fail (c, "out of memory");
        return;
      }
      c->wpos += len;
      want_normalize (c);
    }
    return;
  }
  uint64_t last = jd->want[jd->nwant - 1][0] + jd->want[jd->nwant - 1][1];
  uint64_t len = last - c->wpos > JOB_BS_MAX ? JOB_BS_MAX : last - c->wpos;
  c->bs_off = c->wpos;
  c->bs_end = c->wpos + len;
  c->bs_covered = c->wpos;
  c->bs_wi = c->wi;
  c->bs_done = false;
  c->bs_err = 0;
  if (nbd_aio_block_status (c->bs, len, c->wpos,
                            (nbd_extent_callback) { .callback = bs_extent_cb, .user_data = c },
                            (nbd_completion_callback) { .callback = bs_done_cb, .user_data = c },
                            0) == -1) {
    copier_fail (c, "block status at offset %" PRIu64 ": %s", c->wpos, nbd_get_error ());
    return;
  }
  c->bs_inflight = true;
}

static void
bs_finish (struct copier *c)
{
  c->bs_inflight = false;
  if (c->bs_err) {
    copier_fail (c, "block status of %" PRIu64 "+%" PRIu64 " on the point-in-time export: %s",
                 c->bs_off, c->bs_end - c->bs_off, strerror (c->bs_err));
    return;
  }
  if (c->bs_covered <= c->bs_off) {
    copier_fail (c, "block status at offset %" PRIu64 " returned no extents", c->bs_off);
    return;
  }
  c->wpos = c->bs_covered;
}

static void
release_add (struct copier *c, uint64_t off, uint64_t len)
{
  if (c->nrel == c->relcap) {
    size_t ncap = c->relcap ? c->relcap * 2 : 64;
    void *n = realloc (c->rel, ncap * sizeof *c->rel);
    if (n == NULL)
      return;                   /* not released: the store just keeps it */
    c->rel = n;
    c->relcap = ncap;
  }
  c->rel[c->nrel][0] = off;
  c->rel[c->nrel][1] = len;
  c->nrel++;
  c->rel_bytes += len;
}

static int
cmp_range (const void *a, const void *b)
{
  const uint64_t *x = a, *y = b;
  return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* Send `skip` for the ranges on the target (merged).  Failures are counted
 * and reported in the job status, not fatal: the copy stays correct, the
 * store just keeps the blocks until backup-end. */
/* Does [a, b) contain a wanted byte? (want is sorted, disjoint) */
static bool
want_overlaps (const struct orch_job_disk *jd, uint64_t a, uint64_t b)
{
  size_t lo = 0, hi = jd->nwant;
  while (lo < hi) {             /* first range ending after a */
    size_t mid = lo + (hi - lo) / 2;
    if (jd->want[mid][0] + jd->want[mid][1] <= a)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < jd->nwant && jd->want[lo][0] < b;
}

static void
release_flush (struct copier *c)
{
  c->rel_last = orch_now_ns ();
  if (c->nrel == 0)
    return;
  qsort (c->rel, c->nrel, sizeof *c->rel, cmp_range);
  /* Merge neighbours, and ranges separated only by bytes the job does not
   * want (an incremental's clean blocks: the session does not protect
   * them, skipping them changes nothing): hundreds of scattered dirty
   * extents then cost a few `skip` calls, not one each. */
  size_t n = 0;
  uint64_t *pushed = calloc (c->nrel, sizeof *pushed);   /* job bytes per merged range */
  if (pushed == NULL)
    return;                     /* kept for the next flush */
  for (size_t i = 0; i < c->nrel; i++) {
    uint64_t pend = n > 0 ? c->rel[n - 1][0] + c->rel[n - 1][1] : 0;
    if (n > 0 && (pend == c->rel[i][0] || !want_overlaps (c->jd, pend, c->rel[i][0])))
      c->rel[n - 1][1] = c->rel[i][0] + c->rel[i][1] - c->rel[n - 1][0];
    else {
      c->rel[n][0] = c->rel[i][0];
      c->rel[n][1] = c->rel[i][1];
      n++;
    }
    pushed[n - 1] += c->rel[i][1];
  }
  uint64_t released = 0, errors = 0;
  struct cbw_err e = { 0 };
  for (size_t i = 0; i < n; i++) {
    if (c->ctl == NULL) {
      c->ctl = cbw_ctl_client_connect (c->jd->ctl_cbw, &e);
      if (c->ctl)
        cbw_ctl_client_set_timeout (c->ctl, 30000);
    }
    if (c->ctl == NULL) {
      errors++;
      continue;
    }
    struct json_object *a = json_object_new_object (), *ret = NULL;
    json_object_object_add (a, "offset", json_object_new_int64 ((int64_t) c->rel[i][0]));
    json_object_object_add (a, "length", json_object_new_int64 ((int64_t) c->rel[i][1]));
    int cls = -1;
    if (cbw_ctl_client_execute (c->ctl, "skip", a, &ret, &cls, &e) < 0) {
      errors++;
      if (cls < 0) {            /* transport failure: reconnect next time */
        cbw_ctl_client_close (c->ctl);
        c->ctl = NULL;
      }
    }
    else
      released += pushed[i];
    json_object_put (ret);
  }
  free (pushed);
  c->nrel = 0;
  c->rel_bytes = 0;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->j->lock);
  c->j->released += released;
  c->jd->released += released;
  if (errors) {
    c->j->release_errors += errors;
    snprintf (c->j->release_error, sizeof c->j->release_error, "%s", e.msg);
  }
}

static void
range_done (struct copier *c, uint64_t off, uint64_t len, bool zero)
{
  release_add (c, off, len);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->j->lock);
  c->j->done += len;
  c->jd->done += len;
  if (zero)
    c->j->zero_bytes += len;
  else
    c->j->data_bytes += len;
}

static bool
buf_is_zero (const char *b, size_t len)
{
  static const char z[4096];
  size_t i = 0;
  for (; i + sizeof z <= len; i += sizeof z)
    if (memcmp (b + i, z, sizeof z) != 0)
      return false;
  return memcmp (b + i, z, len - i) == 0;
}

/* Zero a range of the target that is not known to be zero already. */
static int
zero_file (struct copier *c, uint64_t off, uint64_t len)
{
  int fd = c->jd->fd;
  if (fallocate (fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t) off, (off_t) len) == 0)
    return 0;
  if (fallocate (fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t) off, (off_t) len) == 0)
    return 0;
  static const char z[65536];
  for (uint64_t p = 0; p < len; p += sizeof z) {
    size_t n = len - p < sizeof z ? (size_t) (len - p) : sizeof z;
    if (cbw_pwrite_full (fd, z, n, off + p) < 0)
      return -1;
  }
  return 0;
}

/* A read finished: write it (or zero, or nothing for a fresh target). */
static void
slot_read_done (struct copier *c, struct slot *s)
{
  if (s->err) {
    copier_fail (c, "reading %" PRIu64 " bytes at offset %" PRIu64 " from the point-in-time "
                 "export: %s", s->len, s->off, strerror (s->err));
    s->st = SL_FREE;
    return;
  }
  bool zero = buf_is_zero (s->buf, s->len);
  if (zero && c->jd->fresh) {
    range_done (c, s->off, s->len, true);
    s->st = SL_FREE;
    return;
  }
  if (c->jd->fd >= 0) {
    int r = zero ? zero_file (c, s->off, s->len) : cbw_pwrite_full (c->jd->fd, s->buf, s->len, s->off);
    if (r < 0)
      copier_fail (c, "writing %" PRIu64 " bytes at offset %" PRIu64 " of %s: %s", s->len,
                   s->off, c->jd->path, strerror (errno));
    else
      range_done (c, s->off, s->len, zero);
    s->st = SL_FREE;
    return;
  }
  int64_t r;
  s->zero = zero && c->jd->dst_can_zero;
  s->st = SL_WRITE;
  if (s->zero)
    r = nbd_aio_zero (c->jd->dst, s->len, s->off,
                      (nbd_completion_callback) { .callback = write_done_cb, .user_data = s }, 0);
  else
    r = nbd_aio_pwrite (c->jd->dst, s->buf, s->len, s->off,
                        (nbd_completion_callback) { .callback = write_done_cb, .user_data = s }, 0);
  if (r == -1) {
    copier_fail (c, "writing to the target: %s", nbd_get_error ());
    s->st = SL_FREE;
  }
}

static void
slot_write_done (struct copier *c, struct slot *s)
{
  if (s->err)
    copier_fail (c, "writing %" PRIu64 " bytes at offset %" PRIu64 " of the target: %s",
                 s->len, s->off, strerror (s->err));
  else
    range_done (c, s->off, s->len, s->zero);
  s->st = SL_FREE;
}

static struct slot *
free_slot (struct copier *c)
{
  for (size_t i = 0; i < c->nslots; i++)
    if (c->slots[i].st == SL_FREE)
      return &c->slots[i];
  return NULL;
}

static size_t
busy_slots (struct copier *c)
{
  size_t n = 0;
  for (size_t i = 0; i < c->nslots; i++)
    n += c->slots[i].st != SL_FREE;
  return n;
}

/* Issue requests for planned segments.  Returns the poll timeout wanted by
 * the rate limiter (ms), or -1. */
static int
issue (struct copier *c, uint64_t speed)
{
  int64_t now = orch_now_ns ();
  if (speed != c->rate_speed) {         /* (re)start the bucket at each change */
    c->rate_speed = speed;
    c->rate_bytes = 0;
    c->rate_t0 = now;
  }
  while (!c->failed && c->phead < c->pn) {
    struct seg *sg = &c->plan[c->phead];
    if (sg->zero && c->jd->fresh) {
      range_done (c, sg->off, sg->len, true);
      c->pbytes -= sg->len;
      c->phead++;
      continue;
    }
    if (sg->zero && c->jd->fd >= 0) {
      if (zero_file (c, sg->off, sg->len) < 0) {
        copier_fail (c, "zeroing %" PRIu64 "+%" PRIu64 " of %s: %s", sg->off, sg->len,
                     c->jd->path, strerror (errno));
        return -1;
      }
      range_done (c, sg->off, sg->len, true);
      c->pbytes -= sg->len;
      c->phead++;
      continue;
    }
    struct slot *s = free_slot (c);
    if (s == NULL)
      return -1;
    if (sg->zero && c->jd->dst_can_zero) {
      uint64_t len = sg->len > JOB_ZERO_MAX ? JOB_ZERO_MAX : sg->len;
      s->off = sg->off;
      s->len = len;
      s->zero = true;
      s->err = 0;
      s->st = SL_WRITE;
      if (nbd_aio_zero (c->jd->dst, len, sg->off,
                        (nbd_completion_callback) { .callback = write_done_cb, .user_data = s },
                        0) == -1) {
        s->st = SL_FREE;
        copier_fail (c, "write-zeroes on the target: %s", nbd_get_error ());
        return -1;
      }
    }
    else {
      /* data (or zeroes to write as data: the target cannot zero) */
      uint64_t limit = c->rs;
      if (speed) {
        uint64_t per = speed / 8 / c->gran * c->gran;   /* ~8 requests a second */
        if (per < c->gran)
          per = c->gran;
        if (per < limit)
          limit = per;
        double allowed = (double) speed * (double) (now - c->rate_t0) / 1e9;
        if ((double) c->rate_bytes > allowed) {
          double wait_s = ((double) c->rate_bytes - allowed) / (double) speed;
          int ms = (int) (wait_s * 1000) + 1;
          return ms > 200 ? 200 : ms;
        }
      }
      uint64_t next = (sg->off / limit + 1) * limit;    /* keep requests aligned */
      uint64_t end = sg->off + sg->len < next ? sg->off + sg->len : next;
      uint64_t len = end - sg->off;
      s->off = sg->off;
      s->len = len;
      s->zero = false;
      s->err = 0;
      s->st = SL_READ;
      c->rate_bytes += len;
      if (nbd_aio_pread (s->src, s->buf, len, sg->off,
                         (nbd_completion_callback) { .callback = read_done_cb, .user_data = s },
                         0) == -1) {
        s->st = SL_FREE;
        copier_fail (c, "reading from the point-in-time export: %s", nbd_get_error ());
        return -1;
      }
      sg->off += len;
      sg->len -= len;
      c->pbytes -= len;
      if (sg->len == 0)
        c->phead++;
      continue;
    }
    sg->off += s->len;
    sg->len -= s->len;
    c->pbytes -= s->len;
    if (sg->len == 0)
      c->phead++;
  }
  return -1;
}

/* One poll round over every connection and the wake eventfd. */
static void
poll_once (struct copier *c, int timeout_ms)
{
  struct pollfd pfd[80];
  struct nbd_handle *hs[80];
  size_t n = 0;
  for (size_t i = 0; i <= c->nsrc + 1 && n < 79; i++) {
    struct nbd_handle *h = i < c->nsrc ? c->src[i] : i == c->nsrc ? c->bs : c->jd->dst;
    if (!job_handle_live (h))
      continue;
    unsigned dir = nbd_aio_get_direction (h);
    int fd = nbd_aio_get_fd (h);
    if (fd < 0)
      continue;
    pfd[n].fd = fd;
    pfd[n].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
      ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
    pfd[n].revents = 0;
    hs[n++] = h;
  }
  pfd[n].fd = c->j->wakefd;
  pfd[n].events = POLLIN;
  pfd[n].revents = 0;
  if (poll (pfd, n + 1, timeout_ms) < 0) {
    if (errno != EINTR)
      copier_fail (c, "poll: %s", strerror (errno));
    return;
  }
  if (pfd[n].revents & POLLIN) {
    uint64_t v;
    if (read (c->j->wakefd, &v, sizeof v) < 0) {
      /* nothing to read: fine */
    }
  }
  for (size_t i = 0; i < n; i++) {
    int r = 0;
    if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
      r = nbd_aio_notify_read (hs[i]);
    if (r != -1 && (pfd[i].revents & POLLOUT) && job_handle_live (hs[i]) &&
        (nbd_aio_get_direction (hs[i]) & LIBNBD_AIO_DIRECTION_WRITE))
      r = nbd_aio_notify_write (hs[i]);
    if (r == -1)
      copier_fail (c, "%s connection: %s", hs[i] == c->jd->dst ? "target" : "source",
                   nbd_get_error ());
  }
}

static void
publish_progress (struct copier *c, int64_t *last_ev, uint64_t *last_done)
{
  int64_t now = orch_now_ns ();
  size_t inflight = busy_slots (c);
  uint64_t done, total;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->j->lock);
    c->j->in_flight = (int) inflight;
    if (c->j->state == ORCH_JOB_PAUSED && inflight == 0 && !c->j->paused_drained)
      c->j->paused_drained = true;
    done = c->j->done;
    total = c->j->total;
  }
  if (now - *last_ev >= JOB_PROGRESS_EVERY_NS && done != *last_done) {
    *last_ev = now;
    *last_done = done;
    struct json_object *d = json_object_new_object ();
    json_object_object_add (d, "job", json_object_new_string (c->j->id));
    json_object_object_add (d, "bytes-done", json_object_new_int64 ((int64_t) done));
    json_object_object_add (d, "bytes-total", json_object_new_int64 ((int64_t) total));
    orch_event (c->o, "job-progress", d);
  }
}

static struct nbd_handle *
open_src (struct copier *c, bool meta)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL) {
    copier_fail (c, "nbd_create: %s", nbd_get_error ());
    return NULL;
  }
  if (meta)
    nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  if (nbd_connect_uri (h, c->jd->src_uri) == -1) {
    copier_fail (c, "cannot connect to the point-in-time export %s: %s", c->jd->src_uri,
                 nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  int64_t sz = nbd_get_size (h);
  if (sz < 0 || (uint64_t) sz != c->jd->size) {
    copier_fail (c, "the point-in-time export %s has %" PRId64 " bytes, the disk %" PRIu64,
                 c->jd->src_uri, sz, c->jd->size);
    nbd_close (h);
    return NULL;
  }
  return h;
}

/* Buffers, source connections and the block-status connection of one
 * disk's copy; -1 (c->failed) on failure. */
static int
copier_setup (struct copier *c)
{
  struct orch_job *j = c->j;
  c->gran = c->jd->gran ? c->jd->gran : 65536;
  c->rs = j->request_size;
  if (c->rs % c->gran != 0 && c->gran <= (32u << 20))
    c->rs = (c->rs + c->gran - 1) / c->gran * c->gran;
  c->nslots = j->requests;
  c->nsrc = j->pipelined ? 1 : c->nslots;
  c->slots = calloc (c->nslots, sizeof *c->slots);
  c->src = calloc (c->nsrc, sizeof *c->src);
  if (!c->slots || !c->src) {
    copier_fail (c, "out of memory");
    return -1;
  }
  for (size_t i = 0; i < c->nslots; i++)
    if ((c->slots[i].buf = malloc (c->rs)) == NULL) {
      copier_fail (c, "out of memory");
      return -1;
    }
  for (size_t i = 0; i < c->nsrc; i++)
    if ((c->src[i] = open_src (c, false)) == NULL)
      return -1;
  for (size_t i = 0; i < c->nslots; i++)
    c->slots[i].src = c->src[i % c->nsrc];
  c->bs = open_src (c, true);
  if (c->bs == NULL)
    return -1;
  if (nbd_can_meta_context (c->bs, LIBNBD_CONTEXT_BASE_ALLOCATION) != 1) {
    nbd_shutdown (c->bs, 0);
    nbd_close (c->bs);
    c->bs = NULL;               /* every wanted byte is data */
  }
  c->wi = 0;
  c->wpos = 0;
  c->rel_last = orch_now_ns ();
  return 0;
}

/* Completions first, so that the slots they free are reused at once. */
static void
copier_complete (struct copier *c, bool cancelled)
{
  if (c->bs_inflight && c->bs_done)
    bs_finish (c);
  for (size_t i = 0; i < c->nslots; i++) {
    if (c->slots[i].st == SL_READ_DONE) {
      if (c->failed || cancelled)
        c->slots[i].st = SL_FREE;       /* stopping: not written */
      else
        slot_read_done (c, &c->slots[i]);
    }
    else if (c->slots[i].st == SL_WRITE_DONE)
      slot_write_done (c, &c->slots[i]);
  }
}

/* More work ready without waiting? */
static bool
copier_ready (struct copier *c)
{
  for (size_t i = 0; i < c->nslots; i++)
    if (c->slots[i].st == SL_READ_DONE || c->slots[i].st == SL_WRITE_DONE)
      return true;
  return c->bs_inflight && c->bs_done;
}

/* The copy loop of one disk: until everything planned is copied, or the
 * job fails or is cancelled and its requests drained.  true if cancelled. */
static bool
copier_run (struct copier *c)
{
  struct orch_job *j = c->j;
  bool cancelled = false;
  int64_t last_ev = orch_now_ns (), drain_start = 0;
  uint64_t last_done = UINT64_MAX;

  for (;;) {
    bool cancel, pause;
    uint64_t speed;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
      cancel = j->cancel_req;
      pause = j->state == ORCH_JOB_PAUSED;
      speed = j->speed;
    }
    if (cancel)
      cancelled = true;
    if (pause)
      c->rate_speed = UINT64_MAX;       /* restart the bucket after a pause */
    int timeout = 100;
    copier_complete (c, cancelled);
    bool stop = c->failed || cancelled;
    if (!stop && !pause) {
      if (c->pbytes < 64 * c->rs)
        plan_more (c);
      int t = issue (c, speed);
      if (t >= 0)
        timeout = t;
    }
    if (c->rel_bytes >= JOB_RELEASE_BATCH ||
        (c->nrel && orch_now_ns () - c->rel_last >= JOB_RELEASE_EVERY_NS))
      release_flush (c);
    publish_progress (c, &last_ev, &last_done);
    stop = c->failed || cancelled;
    size_t busy = busy_slots (c);
    bool all_planned = c->wi >= c->jd->nwant && !c->bs_inflight && c->phead >= c->pn;
    if (busy == 0 && !c->bs_inflight && (stop || all_planned))
      break;
    if (copier_ready (c))
      continue;
    if (stop && busy > 0) {
      if (drain_start == 0)
        drain_start = orch_now_ns ();
      if (orch_now_ns () - drain_start > JOB_DRAIN_NS)
        break;                  /* give up waiting: a dead server */
    }
    poll_once (c, timeout);
  }
  return cancelled;
}

/* The copy on stable storage before "completed": the target's data, and
 * a new file's directory entry (a "completed" file survives a power cut). */
static void
copier_make_durable (struct copier *c)
{
  struct orch_job_disk *jd = c->jd;
  if (jd->fd >= 0) {
    if (cbw_fsync (jd->fd) < 0)
      copier_fail (c, "fsync %s: %s", jd->path, strerror (errno));
  }
  else if (nbd_can_flush (jd->dst) == 1 && nbd_flush (jd->dst, 0) == -1)
    copier_fail (c, "flush of the target: %s", nbd_get_error ());
  struct cbw_err de = { 0 };
  if (!c->failed && jd->path && jd->regular && cbw_fsync_dir_of (jd->path, &de) < 0)
    copier_fail (c, "target %s: %s", jd->path, de.msg);
}

static void
close_src (struct nbd_handle *h)
{
  if (job_handle_live (h) && nbd_aio_in_flight (h) == 0)
    nbd_shutdown (h, 0);
  nbd_close (h);
}

/* Free what copier_setup made.  Source connections are closed only with
 * nothing in flight (see the top). */
static void
copier_teardown (struct copier *c)
{
  for (size_t i = 0; c->src && i < c->nsrc; i++)
    if (c->src[i])
      close_src (c->src[i]);
  if (c->bs)
    close_src (c->bs);
  if (c->ctl)
    cbw_ctl_client_close (c->ctl);
  /* A target that never answered still holds requests naming our slots:
   * close it before the slots go. */
  if (c->jd->dst && nbd_aio_in_flight (c->jd->dst) > 0) {
    nbd_close (c->jd->dst);
    c->jd->dst = NULL;
  }
  for (size_t i = 0; c->slots && i < c->nslots; i++)
    free (c->slots[i].buf);
  free (c->slots);
  free (c->src);
  free (c->plan);
  free (c->rel);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&c->j->lock);
  c->j->in_flight = 0;
}

/* Copy one disk.  Returns 0 = done, 1 = cancelled, -1 = failed (msg). */
static int
copy_disk (struct cbw_orch *o, struct orch_job *j, struct orch_job_disk *jd,
           char *msg, size_t msglen)
{
  struct copier cc = { .o = o, .j = j, .jd = jd }, *c = &cc;
  int ret = -1;
  if (copier_setup (c) == 0) {
    bool cancelled = copier_run (c);
    release_flush (c);
    if (!c->failed && !cancelled)
      copier_make_durable (c);
    ret = c->failed ? -1 : cancelled ? 1 : 0;
  }
  if (c->failed)
    ret = -1;
  memcpy (msg, c->msg, msglen < sizeof c->msg ? msglen : sizeof c->msg);
  msg[msglen - 1] = '\0';
  copier_teardown (c);
  return ret;
}

void *
job_thread (void *arg)
{
  struct orch_job *j = arg;
  struct cbw_orch *o = j->o;
  char msg[CBW_ERR_MSG_MAX] = "";
  int r = 0;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    j->t0_ns = orch_now_ns ();
  }
  for (size_t i = 0; i < j->ndisks && r == 0; i++) {
    struct orch_job_disk *jd = &j->disks[i];
    if (!jd->connect_later)
      continue;
    struct cbw_err e = { 0 };
    if (job_target_connect (o, j, jd, jd->target, &e) < 0) {
      r = e.errnum == ECANCELED ? 1 : -1;
      int n = snprintf (msg, sizeof msg, "disk %s: ", jd->name);
      if (n > 0 && (size_t) n < sizeof msg)
        memcpy (msg + n, e.msg, strnlen (e.msg, sizeof msg - (size_t) n - 1) + 1);
      msg[sizeof msg - 1] = '\0';
    }
  }
  for (size_t i = 0; i < j->ndisks && r == 0; i++)
    r = copy_disk (o, j, &j->disks[i], msg, sizeof msg);
  for (size_t i = 0; i < j->ndisks; i++)
    job_target_close (&j->disks[i]);
  const char *ev;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    j->finished = (int64_t) time (NULL);
    j->t1_ns = orch_now_ns ();
    if (r == 0) {
      j->state = ORCH_JOB_COMPLETED;
      ev = "job-completed";
    }
    else if (r == 1) {
      j->state = ORCH_JOB_CANCELLED;
      ev = "job-cancelled";
    }
    else {
      j->state = ORCH_JOB_FAILED;
      snprintf (j->error, sizeof j->error, "%s", msg[0] ? msg : "unknown error");
      ev = "job-failed";
    }
    pthread_cond_broadcast (&j->cond);
  }
  jobs_save_or_report (o);
  struct json_object *d;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&j->lock);
    d = json_object_new_object ();
    json_object_object_add (d, "job", json_object_new_string (j->id));
    json_object_object_add (d, "backup", json_object_new_string (j->backup));
    json_object_object_add (d, "bytes-done", json_object_new_int64 ((int64_t) j->done));
    json_object_object_add (d, "bytes-total", json_object_new_int64 ((int64_t) j->total));
    if (j->error[0])
      json_object_object_add (d, "error", json_object_new_string (j->error));
  }
  orch_event (o, ev, d);
  return NULL;
}

