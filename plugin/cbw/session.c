/* cbw — plugin/cbw/session.c: one backup session.  The heart of the cbw
 * filter: per-block states, the copy-before-write protocol of guest writes
 * and the point-in-time (PIT) read path.  docs/design/copy-before-write.md
 * explains the design; this is the summary.
 *
 * State.  One byte per block of `granularity` bytes (enum cbw_block_state),
 * changed only with atomic compare-and-swap.  Transitions:
 *   NOT_NEEDED <- NEEDED -> COPYING -> COPIED -> NOT_NEEDED (skip)
 *                   ^         |  |  \--> FAILED (break-snapshot)
 *                   |         |  \-> BUFFERED -> COPIED | FAILED
 *                   \---------/ (break-guest-write: copy failed, guest write
 *                                failed, live data untouched)
 * BUFFERED (break-snapshot only): the old data was read from below into the
 * write-back buffer (bounded by cbw-buffer) and a worker writes it to the
 * target later, so the guest write does not wait for the target.
 * THE RULE: the live disk's data of a block changes only after its state left
 * NEEDED/COPYING for COPIED, FAILED or NOT_NEEDED.  Every guest write,
 * write-zeroes and trim calls cbw_session_before_write() first; it claims the
 * NEEDED blocks it covers (NEEDED -> COPYING), copies them in merged runs
 * (read old data from below, write it to the target, or write-zeroes when it
 * is all zero), publishes COPIED, and waits for blocks another write is
 * copying.  Writes to other blocks never wait; reads of the live disk never
 * wait.  Each block is copied at most once: only the CAS winner copies.
 *
 * PIT reads (the classic race).  A PIT read of a NEEDED block reads the live
 * disk, then re-checks the block's state.  If it is still NEEDED, no guest
 * write can have changed the block (THE RULE: the state changes before the
 * data), so the data read is the old data.  If the state changed meanwhile,
 * the read is retried from the new state (COPIED: from the target; COPYING:
 * wait for the copy; FAILED/NOT_NEEDED: EIO).  No lock is held across I/O
 * and guest writes never wait for readers.  Target reads are re-checked the
 * same way (a skip may release the block while we read it).
 *
 * Locking.  Block states are atomics.  Waiting for a COPYING block uses one
 * of NSHARD mutex+condvar pairs (shard = block / 64 mod NSHARD) with a waiter
 * count, so copiers broadcast only when someone waits (Dekker-style pairing
 * of the state store and the waiter count, both seq_cst).  plock guards the
 * write-back queue (never held across I/O; a BUFFERED state and its queue
 * entry are published in one plock section).  err_lock guards last_error.
 * Counters are relaxed atomics.  The session is reference counted: the
 * filter's "active" pointer and every PIT connection hold one.  Copy buffers
 * (write-back entries, synchronous copies) come from the process's buffer
 * cache (common/bufcache.c: reused mappings, so a copy does not fault in
 * fresh pages; its own lock, never held across I/O).
 *
 * Shared state map (begin "state-file": PATH).  The state bytes then live in
 * a MAP_SHARED mapping of a new file (docs/formats/cbw-state-map.md), so
 * another process (cbwd's PIT export) follows them lock-free and reads the
 * live disk and the target's file itself, with the same re-check.  The
 * session holds an OFD write lock on byte 0 of the file while it is active:
 * readers treat "not locked" (session ended, or nbdkit died) or status
 * ENDED as "no data can be proven".  publish_end sets status ENDED,
 * releases the lock and unlinks the file BEFORE the write gate reopens, so
 * a write that is no longer copied can never be mistaken for old data.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "bufcache.h"
#include "cleanup.h"
#include "session.h"

#define NSHARD 64
#define COPY_CHUNK (4 * 1024 * 1024)    /* max bytes per target request */
#define ZERO_SCAN (64 * 1024)           /* zero detection unit inside a run */
#define WORKER_BATCH 16                 /* copies a worker pipelines at once */
/* Target commands for one copy of len bytes (add_pieces), and per worker. */
#define MAX_PIECES(len) (((len) + ZERO_SCAN - 1) / ZERO_SCAN)
#define WORKER_PIECES (WORKER_BATCH * MAX_PIECES (COPY_CHUNK))
_Static_assert (COPY_CHUNK <= CBW_BUF_MAX,
                "copy buffers must fit the buffer cache's classes");

struct shard {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  _Atomic int waiters;
  char pad[64];
};

struct cbw_session {
  _Atomic int refs;
  struct cbw_session_params p;
  unsigned shift;
  uint64_t nblocks;
  _Atomic uint8_t *st;
  /* Shared state map (NULL/-1 without state_file): st points into it. */
  void *map;
  size_t map_len;
  int map_fd;
  char *map_path;               /* unlinked (and freed) by publish_end */
  _Atomic bool end_published;
  struct cbw_target *target;
  _Atomic bool broken;
  _Atomic bool ended;
  struct shard shards[NSHARD];
  _Atomic uint64_t needed, copied_blocks, copied_bytes, zero_bytes, skipped,
    failed, in_flight, errors, waits, rechecks,
    wb_batches, wb_copies,      /* write-back: target batches, copies in them */
    kcopy_fallbacks;            /* in-kernel copies redone in user space */
  pthread_mutex_t err_lock;
  char last_error[256];         /* guarded by err_lock */

  /* Write-back buffer (break-snapshot only): old data read from below,
   * waiting for a worker to write it to the target.  Guarded by plock:
   * queue, inprog[], pbytes, stopping, space_waiters.  qcond: work queued
   * (one worker woken per entry) or stopping; pcond: buffer space freed
   * (signalled only when a guest write waits for space).  Two condition
   * variables, so that a completion does not wake every idle worker and an
   * enqueue does not wake every waiting writer: with one shared condvar
   * and 16 workers, the 4k first-write benchmark spent a quarter of its
   * time in futex contention on plock. */
  pthread_mutex_t plock;
  pthread_cond_t qcond;
  pthread_cond_t pcond;
  unsigned space_waiters;
  struct pending *qhead, *qtail;
  struct pending **inprog;      /* WORKER_BATCH slots per worker */
  struct cbw_target_wr *pieces; /* WORKER_PIECES per worker, its own */
  uint64_t pbytes;
  bool stopping;
  unsigned nworkers;
  pthread_t *workers;
  bool workers_joined;
  _Atomic uint64_t buffered_blocks;
};

/* One buffered copy: blocks [b0,b1) whose old data is buf[0..len) at off. */
struct pending {
  struct pending *next;
  uint64_t b0, b1, off, len;
  char *buf;                    /* cbw_buf_alloc (len) */
};

#define RLX memory_order_relaxed

struct worker_arg { struct cbw_session *s; unsigned slot; };
static void *worker (void *arg);
static void stop_workers (struct cbw_session *s);

/* Free a write-back entry and its buffer. */
static void
pending_free (struct pending *e)
{
  cbw_buf_free (e->buf, e->len);
  free (e);
}

static void
note_error (struct cbw_session *s, const char *fmt, ...)
{
  va_list ap;
  char msg[256];

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  atomic_fetch_add_explicit (&s->errors, 1, RLX);
  nbdkit_error ("cbw: %s", msg);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&s->err_lock);
  memcpy (s->last_error, msg, sizeof msg);
}

/* Create the shared state map at path (O_EXCL: never someone else's file),
 * space reserved up front (a full tmpfs must fail here, not SIGBUS later),
 * header written, liveness lock taken.  On failure nothing is left behind. */
static int
map_create (struct cbw_session *s, const char *path, struct cbw_err *err)
{
  uint64_t len = cbw_sm_file_size (s->nblocks);
  struct cbw_sm_header *h;
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0,
                      .l_len = 1 };
  int fd, e;
  const char *what;

  if (path[0] == '\0')
    return cbw_err_set (err, EINVAL, "state-file: empty path");
  fd = open (path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd == -1)
    return cbw_err_set (err, errno, "state-file %s: %s%s", path,
                        strerror (errno), errno == EEXIST ? " (refusing to "
                        "reuse an existing file)" : "");
  what = "ftruncate";
  if (ftruncate (fd, len) == -1)
    goto fail;
  what = "reserving space";
  if ((e = posix_fallocate (fd, 0, len)) != 0) {
    errno = e;
    goto fail;
  }
  what = "mmap";
  s->map = mmap (NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (s->map == MAP_FAILED) {
    s->map = NULL;
    goto fail;
  }
  what = "locking";
  if (fcntl (fd, F_OFD_SETLK, &fl) == -1)
    goto fail;
  what = "getrandom";
  h = s->map;
  if (getrandom (&h->session_id, sizeof h->session_id, 0)
      != (ssize_t) sizeof h->session_id)
    goto fail;
  memcpy (h->magic, CBW_SM_MAGIC, 8);
  h->version = CBW_SM_VERSION;
  h->header_size = CBW_SM_HEADER_SIZE;
  h->gran_shift = s->shift;
  h->creator_pid = getpid ();
  h->nblocks = s->nblocks;
  h->disk_size = s->p.size;
  h->status = CBW_SM_STATUS_ACTIVE;
  h->checksum = cbw_sm_checksum (h);
  s->map_path = strdup (path);
  what = "strdup";
  if (s->map_path == NULL)
    goto fail;
  s->map_len = len;
  s->map_fd = fd;
  s->st = (_Atomic uint8_t *) ((char *) s->map + CBW_SM_HEADER_SIZE);
  return 0;

 fail:
  e = errno;
  if (s->map)
    munmap (s->map, len);
  s->map = NULL;
  unlink (path);
  close (fd);
  return cbw_err_set (err, e, "state-file %s: %s: %s", path, what,
                      strerror (e));
}

void
cbw_session_publish_end (struct cbw_session *s)
{
  struct flock fl = { .l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = 0,
                      .l_len = 1 };

  atomic_store (&s->ended, true);
  if (atomic_exchange (&s->end_published, true) || s->map == NULL)
    return;
  __atomic_store_n (&((struct cbw_sm_header *) s->map)->status,
                    CBW_SM_STATUS_ENDED, __ATOMIC_SEQ_CST);
  if (fcntl (s->map_fd, F_OFD_SETLK, &fl) == -1)
    nbdkit_error ("cbw: state-file %s: unlock: %m", s->map_path);
  if (unlink (s->map_path) == -1 && errno != ENOENT)
    nbdkit_error ("cbw: state-file %s: unlink: %m", s->map_path);
}

struct cbw_session *
cbw_session_new (const struct cbw_session_params *p, struct cbw_target *target,
                 struct cbw_err *err)
{
  struct cbw_session *s;
  pthread_condattr_t ca;
  size_t i;

  if (p->granularity < 512 || (p->granularity & (p->granularity - 1))) {
    if (p->has_source)
      close (p->source_fd);
    return cbw_err_set (err, EINVAL, "granularity %" PRIu32 " is not a power "
                        "of 2 >= 512", p->granularity), NULL;
  }
  s = calloc (1, sizeof *s);
  if (s == NULL) {
    if (p->has_source)
      close (p->source_fd);
    return cbw_err_set (err, ENOMEM, "out of memory"), NULL;
  }
  s->p = *p;
  s->p.state_file = NULL;       /* not kept: the caller's string */
  s->shift = __builtin_ctz (p->granularity);
  s->nblocks = (p->size + p->granularity - 1) >> s->shift;
  s->map_fd = -1;
  if (p->state_file) {
    if (map_create (s, p->state_file, err) == -1) {
      if (p->has_source)
        close (p->source_fd);
      free (s);
      return NULL;
    }
  }
  else
    s->st = calloc (s->nblocks ? s->nblocks : 1, 1);
  if (s->st == NULL) {
    uint64_t nb = s->nblocks;
    if (p->has_source)
      close (p->source_fd);
    free (s);
    return cbw_err_set (err, ENOMEM, "out of memory for %" PRIu64
                        " block states", nb), NULL;
  }
  pthread_condattr_init (&ca);
  pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
  for (i = 0; i < NSHARD; ++i) {
    pthread_mutex_init (&s->shards[i].lock, NULL);
    pthread_cond_init (&s->shards[i].cond, &ca);
  }
  pthread_mutex_init (&s->err_lock, NULL);
  s->target = target;
  atomic_init (&s->refs, 1);

  pthread_mutex_init (&s->plock, NULL);
  pthread_cond_init (&s->pcond, &ca);
  pthread_cond_init (&s->qcond, NULL);
  /* A local-file target is written in the guest write's own thread: a
   * pread and a pwrite cost less than handing the copy to a worker. */
  if (p->policy == CBW_BREAK_SNAPSHOT && p->buffer_bytes > 0 &&
      p->workers > 0 && !cbw_target_is_local (target)) {
    s->inprog = calloc ((size_t) p->workers * WORKER_BATCH, sizeof *s->inprog);
    s->workers = calloc (p->workers, sizeof *s->workers);
    s->pieces = calloc ((size_t) p->workers * WORKER_PIECES,
                        sizeof *s->pieces);
    if (s->inprog == NULL || s->workers == NULL || s->pieces == NULL) {
      pthread_condattr_destroy (&ca);
      s->workers_joined = true;
      s->target = NULL;         /* the caller still owns it */
      cbw_session_put (s);
      return cbw_err_set (err, ENOMEM, "out of memory"), NULL;
    }
    for (i = 0; i < p->workers; ++i) {
      struct worker_arg *wa = malloc (sizeof *wa);
      int e = ENOMEM;
      if (wa) {
        wa->s = s;
        wa->slot = i;
        e = pthread_create (&s->workers[i], NULL, worker, wa);
      }
      if (e) {
        free (wa);
        pthread_condattr_destroy (&ca);
        stop_workers (s);
        s->target = NULL;       /* the caller still owns it */
        cbw_session_put (s);
        return cbw_err_set (err, e, "cannot start copy workers"), NULL;
      }
      s->nworkers++;
    }
  }
  pthread_condattr_destroy (&ca);
  return s;
}

void
cbw_session_mark_needed (struct cbw_session *s, uint64_t off, uint64_t len)
{
  uint64_t b, b0, b1;

  if (len == 0 || off >= s->p.size)
    return;
  if (len > s->p.size - off)
    len = s->p.size - off;
  b0 = off >> s->shift;
  b1 = ((off + len - 1) >> s->shift) + 1;
  for (b = b0; b < b1; ++b)
    if (atomic_exchange (&s->st[b], CBW_B_NEEDED) == CBW_B_NOT_NEEDED)
      atomic_fetch_add_explicit (&s->needed, 1, RLX);
}

void
cbw_session_mark_all_needed (struct cbw_session *s)
{
  cbw_session_mark_needed (s, 0, s->p.size);
}

void
cbw_session_get (struct cbw_session *s)
{
  atomic_fetch_add (&s->refs, 1);
}

void
cbw_session_put (struct cbw_session *s)
{
  size_t i;

  if (s == NULL || atomic_fetch_sub (&s->refs, 1) != 1)
    return;
  stop_workers (s);
  cbw_target_close (s->target);
  pthread_mutex_destroy (&s->plock);
  pthread_cond_destroy (&s->pcond);
  pthread_cond_destroy (&s->qcond);
  free (s->inprog);
  free (s->pieces);
  free (s->workers);
  for (i = 0; i < NSHARD; ++i) {
    pthread_mutex_destroy (&s->shards[i].lock);
    pthread_cond_destroy (&s->shards[i].cond);
  }
  pthread_mutex_destroy (&s->err_lock);
  if (s->map) {
    cbw_session_publish_end (s);
    munmap (s->map, s->map_len);
    close (s->map_fd);
    free (s->map_path);
  }
  else
    free ((void *) s->st);
  if (s->p.has_source)
    close (s->p.source_fd);
  free (s);
}

void
cbw_session_end (struct cbw_session *s)
{
  cbw_session_publish_end (s);
  stop_workers (s);
}

uint64_t
cbw_session_size (const struct cbw_session *s)
{
  return s->p.size;
}

static struct shard *
shard_of (struct cbw_session *s, uint64_t b)
{
  return &s->shards[(b >> 6) % NSHARD];
}

/* Wake waiters of blocks [b0, b1) (after their states changed). */
static void
wake_range (struct cbw_session *s, uint64_t b0, uint64_t b1)
{
  uint64_t g, g0 = b0 >> 6, g1 = ((b1 - 1) >> 6) + 1;

  if (g1 - g0 > NSHARD)
    g1 = g0 + NSHARD;
  for (g = g0; g < g1; ++g) {
    struct shard *sh = &s->shards[g % NSHARD];
    if (atomic_load (&sh->waiters) > 0) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&sh->lock);
      pthread_cond_broadcast (&sh->cond);
    }
  }
}

/* Wait until block b is not COPYING or the deadline passed; return its state. */
static uint8_t
wait_block (struct cbw_session *s, uint64_t b, int64_t deadline_ns)
{
  struct shard *sh = shard_of (s, b);
  struct timespec ts = { .tv_sec = deadline_ns / 1000000000,
                         .tv_nsec = deadline_ns % 1000000000 };
  uint8_t v;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&sh->lock);
  atomic_fetch_add (&sh->waiters, 1);
  while ((v = atomic_load (&s->st[b])) == CBW_B_COPYING) {
    if (pthread_cond_timedwait (&sh->cond, &sh->lock, &ts) == ETIMEDOUT) {
      v = atomic_load (&s->st[b]);
      break;
    }
  }
  atomic_fetch_sub (&sh->waiters, 1);
  return v;
}

/* CAS every block of [b0,b1) that is in state `from` to `to`; returns how
 * many changed. */
static uint64_t
cas_range (struct cbw_session *s, uint64_t b0, uint64_t b1, uint8_t from,
           uint8_t to)
{
  uint64_t b, n = 0;
  for (b = b0; b < b1; ++b) {
    uint8_t e = from;
    if (atomic_compare_exchange_strong (&s->st[b], &e, to))
      n++;
  }
  return n;
}

static bool
is_zero (const char *p, size_t n)
{
  size_t i, k = n < 16 ? n : 16;
  for (i = 0; i < k; ++i)
    if (p[i])
      return false;
  return n <= 16 || memcmp (p, p + 16, n - 16) == 0;
}

/* Append the target commands for old data buf[0..len) of disk offset off
 * to wr[nw..]: runs of all-zero ZERO_SCAN pieces as write-zeroes, the rest
 * as writes, each at most COPY_CHUNK.  At most MAX_PIECES (len) commands. */
static size_t
add_pieces (struct cbw_target_wr *wr, size_t nw, const char *buf,
            uint64_t len, uint64_t off)
{
  uint64_t q, r, k;

  for (q = 0; q < len; q = r) {
    bool z = is_zero (buf + q, len - q < ZERO_SCAN ? len - q : ZERO_SCAN);
    for (r = q + ZERO_SCAN; r < len; r += ZERO_SCAN)
      if (is_zero (buf + r, len - r < ZERO_SCAN ? len - r : ZERO_SCAN) != z)
        break;
    if (r > len)
      r = len;
    for (k = q; k < r; k += COPY_CHUNK)
      wr[nw++] = (struct cbw_target_wr) {
        .buf = buf + k, .len = r - k < COPY_CHUNK ? r - k : COPY_CHUNK,
        .off = off + k, .zero = z,
      };
  }
  return nw;
}

/* Count the bytes of a target command that succeeded, by kind. */
static void
count_written (struct cbw_session *s, const struct cbw_target_wr *w)
{
  if (w->result == 0)
    atomic_fetch_add_explicit (w->zero ? &s->zero_bytes : &s->copied_bytes,
                               w->len, RLX);
}

/* Write old data buf[0..n) (n <= COPY_CHUNK, from disk offset pos) to the
 * target now: its data and zero pieces pipelined as one batch.  0 or -1
 * (*err set). */
static int
write_out (struct cbw_session *s, const char *buf, uint64_t n, uint64_t pos,
           int64_t deadline_ns, int *err)
{
  struct cbw_target_wr wr[MAX_PIECES (COPY_CHUNK)];
  struct cbw_err e = { 0 };
  size_t nw = add_pieces (wr, 0, buf, n, pos), i;
  int r = 0;

  if (cbw_target_write_batch (s->target, wr, nw, deadline_ns, &e) > 0) {
    *err = e.errnum ? e.errnum : EIO;
    note_error (s, "%s", e.msg);
    r = -1;
  }
  for (i = 0; i < nw; ++i)
    count_written (s, &wr[i]);
  return r;
}

/* Copy worker: takes buffered copies off the queue and writes them to the
 * target, all of a batch pipelined on one connection (big copies too, split
 * into data and zero pieces).  The state moves BUFFERED -> COPIED/FAILED
 * before the entry is removed, so a PIT reader that saw BUFFERED either
 * finds the entry (under plock) or finds the new state when it looks
 * again. */
static void *
worker (void *arg)
{
  struct worker_arg *wa = arg;
  struct cbw_session *s = wa->s;
  unsigned slot = wa->slot;
  struct pending *batch[WORKER_BATCH];
  struct cbw_target_wr *wr = s->pieces + (size_t) slot * WORKER_PIECES;
  size_t first[WORKER_BATCH + 1];   /* entry i: pieces [first[i], first[i+1]) */
  size_t nb, nw, i, j;
  uint64_t n, bytes;

  free (wa);
  for (;;) {
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&s->plock);
      while (!s->stopping && s->qhead == NULL)
        pthread_cond_wait (&s->qcond, &s->plock);
      if (s->stopping)
        return NULL;
      /* Take up to WORKER_BATCH queued copies: they are pipelined on one
       * target connection below. */
      for (nb = 0; nb < WORKER_BATCH && s->qhead; ++nb) {
        batch[nb] = s->qhead;
        s->qhead = batch[nb]->next;
        s->inprog[slot * WORKER_BATCH + nb] = batch[nb];
      }
      if (s->qhead == NULL)
        s->qtail = NULL;
      else
        pthread_cond_signal (&s->qcond);   /* more for another worker */
    }
    atomic_fetch_add_explicit (&s->in_flight, nb, RLX);
    atomic_fetch_add_explicit (&s->wb_batches, 1, RLX);
    atomic_fetch_add_explicit (&s->wb_copies, nb, RLX);

    int res[WORKER_BATCH];
    bool broken = atomic_load (&s->broken);
    for (i = nw = 0; i < nb; ++i) {
      first[i] = nw;
      res[i] = broken ? EIO : 0;
      if (!broken)
        nw = add_pieces (wr, nw, batch[i]->buf, batch[i]->len, batch[i]->off);
    }
    first[nb] = nw;
    if (nw > 0) {
      struct cbw_err e = { 0 };
      if (cbw_target_write_batch (s->target, wr, nw,
                                  cbw_now_ns () + s->p.timeout_ns, &e) > 0)
        note_error (s, "%s", e.msg);
    }
    for (i = 0; i < nb; ++i)
      for (j = first[i]; j < first[i + 1]; ++j) {
        count_written (s, &wr[j]);
        if (wr[j].result != 0 && res[i] == 0)
          res[i] = wr[j].result > 0 ? wr[j].result : EIO;
      }
    atomic_fetch_sub_explicit (&s->in_flight, nb, RLX);

    bytes = 0;
    for (i = 0; i < nb; ++i) {
      struct pending *e = batch[i];
      if (res[i] == 0) {
        n = cas_range (s, e->b0, e->b1, CBW_B_BUFFERED, CBW_B_COPIED);
        atomic_fetch_add_explicit (&s->copied_blocks, n, RLX);
      }
      else {
        atomic_store (&s->broken, true);
        n = cas_range (s, e->b0, e->b1, CBW_B_BUFFERED, CBW_B_FAILED);
        atomic_fetch_add_explicit (&s->failed, n, RLX);
      }
      atomic_fetch_sub_explicit (&s->buffered_blocks, e->b1 - e->b0, RLX);
      wake_range (s, e->b0, e->b1);
      bytes += e->len;
    }
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&s->plock);
      for (i = 0; i < nb; ++i)
        s->inprog[slot * WORKER_BATCH + i] = NULL;
      s->pbytes -= bytes;
      if (s->space_waiters)
        pthread_cond_broadcast (&s->pcond);
    }
    for (i = 0; i < nb; ++i)
      pending_free (batch[i]);
  }
}

/* Stop and join the workers; buffered copies not written yet are dropped
 * (only at end or teardown, when nobody reads the PIT view any more). */
static void
stop_workers (struct cbw_session *s)
{
  struct pending *e;
  unsigned i;

  if (s->workers_joined)
    return;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&s->plock);
    s->stopping = true;
    pthread_cond_broadcast (&s->qcond);
    pthread_cond_broadcast (&s->pcond);
  }
  for (i = 0; i < s->nworkers; ++i)
    pthread_join (s->workers[i], NULL);
  s->workers_joined = true;
  while ((e = s->qhead) != NULL) {
    s->qhead = e->next;
    pending_free (e);
  }
  s->qtail = NULL;
}

/* break-snapshot fast path: read the old data of the claimed (COPYING)
 * blocks [b0,b1) from below into a queued buffer and mark them BUFFERED;
 * the guest write need not wait for the target.  Returns 0, 1 if the run
 * does not fit the buffer (caller copies synchronously), -1 on failure. */
static int
buffer_blocks (struct cbw_session *s, nbdkit_next *next, uint64_t b0,
               uint64_t b1, int64_t deadline_ns, int *err)
{
  uint64_t off = b0 << s->shift, end = b1 << s->shift, len;
  struct timespec ts = { .tv_sec = deadline_ns / 1000000000,
                         .tv_nsec = deadline_ns % 1000000000 };
  struct pending *e;

  if (end > s->p.size)
    end = s->p.size;
  len = end - off;
  if (len > COPY_CHUNK || len > s->p.buffer_bytes / 4)
    return 1;
  e = malloc (sizeof *e);
  if (e == NULL)
    return 1;
  e->next = NULL;
  e->b0 = b0; e->b1 = b1; e->off = off; e->len = len;
  e->buf = cbw_buf_alloc (len);
  if (e->buf == NULL) {
    free (e);
    return 1;
  }
  if (next->pread (next, e->buf, len, off, 0, err) == -1) {
    note_error (s, "reading old data at %" PRIu64 "+%" PRIu64
                " from the live disk: %s", off, len, strerror (*err));
    pending_free (e);
    return -1;
  }
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&s->plock);
    while (s->pbytes + len > s->p.buffer_bytes && !s->stopping) {
      int w;
      s->space_waiters++;
      w = pthread_cond_timedwait (&s->pcond, &s->plock, &ts);
      s->space_waiters--;
      if (w == ETIMEDOUT) {
        note_error (s, "copy buffer full past cbw-timeout (target too "
                    "slow)");
        *err = ETIMEDOUT;
        pending_free (e);
        return -1;
      }
    }
    /* Publish state and entry in one critical section (see worker()). */
    cas_range (s, b0, b1, CBW_B_COPYING, CBW_B_BUFFERED);
    atomic_fetch_add_explicit (&s->buffered_blocks, b1 - b0, RLX);
    s->pbytes += len;
    if (s->qtail)
      s->qtail->next = e;
    else
      s->qhead = e;
    s->qtail = e;
    pthread_cond_signal (&s->qcond);
  }
  wake_range (s, b0, b1);
  return 0;
}

/* PIT read of a BUFFERED block at pos: copy up to `max` bytes from its
 * queued buffer.  Returns the bytes copied, 0 if the entry is gone (the
 * state changed meanwhile: look again). */
static uint64_t
read_buffered (struct cbw_session *s, char *dst, uint64_t pos, uint64_t max)
{
  uint64_t b = pos >> s->shift, n;
  struct pending *e = NULL;
  unsigned i;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&s->plock);
  for (i = 0; i < s->nworkers * WORKER_BATCH && e == NULL; ++i)
    if (s->inprog[i] && s->inprog[i]->b0 <= b && b < s->inprog[i]->b1)
      e = s->inprog[i];
  if (e == NULL)
    for (e = s->qhead; e; e = e->next)
      if (e->b0 <= b && b < e->b1)
        break;
  if (e == NULL)
    return 0;
  n = e->off + e->len - pos;
  if (n > max)
    n = max;
  memcpy (dst, e->buf + (pos - e->off), n);
  return n;
}

/* Copy the old data of blocks [b0,b1) to the target.  0 or -1 (*err set). */
static int
copy_blocks (struct cbw_session *s, nbdkit_next *next, uint64_t b0,
             uint64_t b1, int64_t deadline_ns, int *err)
{
  uint64_t off = b0 << s->shift;
  uint64_t end = b1 << s->shift;
  uint64_t pos, n, bufsize;
  char *buf;
  int r = 0;

  if (end > s->p.size)
    end = s->p.size;
  /* In the kernel, from the image straight to the target, when the
   * operator named the image and the target is a local file.  The blocks
   * are COPYING: no guest write changes them until we publish COPIED.  A
   * failed in-kernel copy is redone below through user space, whole. */
  if (s->p.has_source && s->p.source_min <= end - off &&
      cbw_target_can_copy_from (s->target)) {
    struct cbw_err e = { 0 };
    uint64_t holes;
    if (cbw_target_copy_from (s->target, s->p.source_fd, end - off, off,
                              &holes, &e) == 0) {
      /* holes of the image count like old data found all zero */
      atomic_fetch_add_explicit (&s->copied_bytes, end - off - holes, RLX);
      atomic_fetch_add_explicit (&s->zero_bytes, holes, RLX);
      return 0;
    }
    atomic_fetch_add_explicit (&s->kcopy_fallbacks, 1, RLX);
    nbdkit_debug ("cbw: in-kernel copy failed, copying through user space: "
                  "%s", e.msg);
  }
  bufsize = n = end - off < COPY_CHUNK ? end - off : COPY_CHUNK;
  buf = cbw_buf_alloc (bufsize);
  if (buf == NULL) {
    *err = ENOMEM;
    note_error (s, "out of memory for a %" PRIu64 " byte copy", n);
    return -1;
  }
  for (pos = off; pos < end; pos += n) {
    n = end - pos < COPY_CHUNK ? end - pos : COPY_CHUNK;
    if (next->pread (next, buf, n, pos, 0, err) == -1) {
      note_error (s, "reading old data at %" PRIu64 "+%" PRIu64
                  " from the live disk: %s", pos, n, strerror (*err));
      r = -1;
      break;
    }
    if (write_out (s, buf, n, pos, deadline_ns, err) == -1) {
      r = -1;
      break;
    }
  }
  cbw_buf_free (buf, bufsize);
  return r;
}

/* break-snapshot after a failure: every block of the range that still needs
 * a copy is lost; the guest write may go on. */
static void
fail_blocks (struct cbw_session *s, uint64_t b0, uint64_t b1)
{
  uint64_t n = cas_range (s, b0, b1, CBW_B_NEEDED, CBW_B_FAILED);
  n += cas_range (s, b0, b1, CBW_B_COPYING, CBW_B_FAILED);
  if (n) {
    atomic_fetch_add_explicit (&s->failed, n, RLX);
    wake_range (s, b0, b1);
  }
}

int
cbw_session_before_write (struct cbw_session *s, nbdkit_next *next,
                          uint64_t off, uint64_t len, int *err)
{
  uint64_t b, b0, b1, run;
  int64_t deadline = cbw_now_ns () + s->p.timeout_ns;
  bool bs = s->p.policy == CBW_BREAK_SNAPSHOT;
  bool pending, again;
  uint8_t v;

  if (len == 0 || off >= s->p.size)
    return 0;
  if (len > s->p.size - off)
    len = s->p.size - off;
  b0 = off >> s->shift;
  b1 = ((off + len - 1) >> s->shift) + 1;

  do {
    if (bs && atomic_load (&s->broken)) {
      fail_blocks (s, b0, b1);
      return 0;
    }

    /* Claim runs of NEEDED blocks and copy them. */
    pending = false;
    for (b = b0; b < b1;) {
      uint8_t e = CBW_B_NEEDED;
      v = atomic_load (&s->st[b]);
      if (v == CBW_B_COPYING)
        pending = true;
      if (v != CBW_B_NEEDED ||
          !atomic_compare_exchange_strong (&s->st[b], &e, CBW_B_COPYING)) {
        b++;
        continue;
      }
      run = b++;
      for (; b < b1; ++b) {
        e = CBW_B_NEEDED;
        if (!atomic_compare_exchange_strong (&s->st[b], &e, CBW_B_COPYING))
          break;
      }
      /* THE RULE across processes: the claims are visible before any of
       * this write's data can reach the live disk (a reader of the shared
       * state map pairs this with a fence after its live read). */
      atomic_thread_fence (memory_order_seq_cst);
      int r = 1;
      if (s->nworkers)
        r = buffer_blocks (s, next, run, b, deadline, err);
      if (r == 0)
        continue;               /* BUFFERED: the old data is safe */
      if (r == 1) {
        atomic_fetch_add_explicit (&s->in_flight, 1, RLX);
        r = copy_blocks (s, next, run, b, deadline, err);
        atomic_fetch_sub_explicit (&s->in_flight, 1, RLX);
      }
      if (r == 0) {
        atomic_fetch_add_explicit (&s->copied_blocks,
                                   cas_range (s, run, b, CBW_B_COPYING,
                                              CBW_B_COPIED), RLX);
        wake_range (s, run, b);
      }
      else if (bs) {
        atomic_store (&s->broken, true);
        fail_blocks (s, run, b);
      }
      else {
        cas_range (s, run, b, CBW_B_COPYING, CBW_B_NEEDED);
        wake_range (s, run, b);
        nbdkit_error ("cbw: copy-before-write failed, failing the guest "
                      "write (on-cbw-error=break-guest-write)");
        *err = EIO;
        return -1;
      }
    }
    if (!pending)
      return 0;

    /* Wait for the blocks other writes are copying. */
    again = false;
    for (b = b0; b < b1; ++b) {
      if (atomic_load (&s->st[b]) != CBW_B_COPYING)
        continue;
      atomic_fetch_add_explicit (&s->waits, 1, RLX);
      v = wait_block (s, b, deadline);
      if (v == CBW_B_NEEDED)
        again = true;           /* its write failed (break-guest-write) */
      else if (v == CBW_B_COPYING) {
        if (bs) {
          note_error (s, "timed out waiting for the copy of block %" PRIu64
                      " (cbw-timeout); snapshot broken", b);
          atomic_store (&s->broken, true);
          fail_blocks (s, b, b + 1);
        }
        else {
          nbdkit_error ("cbw: timed out waiting for the copy of block %"
                        PRIu64 " (cbw-timeout), failing the guest write", b);
          *err = EIO;
          return -1;
        }
      }
    }
    if (again && cbw_now_ns () >= deadline) {
      if (bs) {
        atomic_store (&s->broken, true);
        fail_blocks (s, b0, b1);
        return 0;
      }
      *err = EIO;
      return -1;
    }
  } while (again);
  return 0;
}

int
cbw_session_pit_read (struct cbw_session *s, nbdkit_next *next, void *buf,
                      uint32_t count, uint64_t off, int *err)
{
  uint64_t end = off + count, pos = off, b, rb, rend, n, chg, q, k;
  struct cbw_err e = { 0 };
  uint8_t v;

  if (atomic_load (&s->ended)) {
    nbdkit_error ("cbw: point-in-time view: the backup session has ended");
    *err = EIO;
    return -1;
  }
  while (pos < end) {
    b = pos >> s->shift;
    v = cbw_sm_run (s->st, s->nblocks, s->shift, pos, end, &rb, &rend);
    n = rend - pos;
    char *dst = (char *) buf + (pos - off);

    switch (v) {
    case CBW_B_NOT_NEEDED:
      nbdkit_error ("cbw: point-in-time read at %" PRIu64 ": not protected "
                    "by this session: outside the extents it was begun with "
                    "(an incremental backup with readable=changed protects "
                    "only the changed blocks), or released by skip/trim", pos);
      *err = EIO;
      return -1;
    case CBW_B_FAILED:
      nbdkit_error ("cbw: point-in-time read at %" PRIu64 ": the old data "
                    "was lost (snapshot broken by a failed copy)", pos);
      *err = EIO;
      return -1;
    case CBW_B_COPYING:
      if (wait_block (s, b, cbw_now_ns () + s->p.timeout_ns)
          == CBW_B_COPYING) {
        nbdkit_error ("cbw: point-in-time read at %" PRIu64 ": timed out "
                      "waiting for a copy", pos);
        *err = EIO;
        return -1;
      }
      continue;                 /* re-evaluate */
    case CBW_B_COPIED:
      for (q = 0; q < n; q += k) {
        k = n - q < COPY_CHUNK ? n - q : COPY_CHUNK;
        if (cbw_target_pread (s->target, dst + q, k, pos + q,
                              cbw_now_ns () + s->p.timeout_ns, &e) == -1) {
          nbdkit_error ("cbw: point-in-time read at %" PRIu64 ": %s",
                        pos + q, e.msg);
          *err = EIO;
          return -1;
        }
      }
      break;
    case CBW_B_BUFFERED:
      /* Old data waiting in the write-back buffer: immutable, no re-check.
       * Not found: a worker finished it (state changed: look again), or
       * the session ended and the buffer was dropped. */
      k = read_buffered (s, dst, pos, n);
      if (k == 0 && atomic_load (&s->ended)) {
        nbdkit_error ("cbw: point-in-time view: the backup session has "
                      "ended");
        *err = EIO;
        return -1;
      }
      pos += k;
      continue;
    case CBW_B_NEEDED:
      /* Testing knob: widen the window between deciding "read the live
       * disk" and reading it, where a guest write may copy and overwrite. */
      if (s->p.debug_pit_delay_us)
        usleep (s->p.debug_pit_delay_us);
      if (next->pread (next, dst, n, pos, 0, err) == -1)
        return -1;
      if (s->p.debug_no_recheck) {
        pos = rend;
        continue;
      }
      /* After end, writes are no longer copied: an unchanged NEEDED state
       * proves nothing any more. */
      if (atomic_load (&s->ended)) {
        nbdkit_error ("cbw: point-in-time view: the backup session has "
                      "ended");
        *err = EIO;
        return -1;
      }
      break;
    default:
      abort ();
    }
    /* The re-check: data is valid only for the prefix whose state did not
     * change while we read it. */
    chg = cbw_sm_first_changed (s->st, b, rb, v);
    if (chg == rb)
      pos = rend;
    else {
      atomic_fetch_add_explicit (&s->rechecks, 1, RLX);
      if ((chg << s->shift) > pos)
        pos = chg << s->shift;
    }
  }
  return 0;
}

int
cbw_session_pit_extents (struct cbw_session *s, nbdkit_next *next,
                         uint32_t count, uint64_t off, uint32_t flags,
                         struct nbdkit_extents *extents, int *err)
{
  uint64_t end = off + count, pos = off, b, rb, rend;
  uint8_t v;

  while (pos < end) {
    b = pos >> s->shift;
    v = cbw_sm_run (s->st, s->nblocks, s->shift, pos, end, &rb, &rend);
    if (v == CBW_B_NEEDED && next->can_extents (next) == 1) {
      /* What the live disk says, if it still holds the old data after. */
      struct nbdkit_extents *tmp = nbdkit_extents_new (pos, rend);
      uint64_t covered = pos;
      size_t i;
      if (tmp && next->extents (next, rend - pos, pos, 0, tmp, err) == 0 &&
          cbw_sm_first_changed (s->st, b, rb, v) == rb) {
        for (i = 0; i < nbdkit_extents_count (tmp); ++i) {
          struct nbdkit_extent x = nbdkit_get_extent (tmp, i);
          if (x.offset + x.length > rend)
            x.length = rend - x.offset;
          if (nbdkit_add_extent (extents, x.offset, x.length, x.type) == -1) {
            nbdkit_extents_free (tmp);
            *err = errno;
            return -1;
          }
          covered = x.offset + x.length;
        }
      }
      nbdkit_extents_free (tmp);
      if (covered > pos) {
        pos = covered;
        if (flags & NBDKIT_FLAG_REQ_ONE)
          return 0;
        continue;
      }
    }
    /* Everything else: data (the conservative answer). */
    if (nbdkit_add_extent (extents, pos, rend - pos, 0) == -1) {
      *err = errno;
      return -1;
    }
    if (flags & NBDKIT_FLAG_REQ_ONE)
      return 0;
    pos = rend;
  }
  return 0;
}

int
cbw_session_skip (struct cbw_session *s, uint64_t off, uint64_t len,
                  uint64_t *released, struct cbw_err *err)
{
  uint64_t b0, b1, n = 0, pos, k, end;
  static const uint8_t from[] = { CBW_B_NEEDED, CBW_B_COPYING, CBW_B_COPIED,
                                  CBW_B_FAILED, CBW_B_BUFFERED };
  size_t i;

  if (off > s->p.size || len > s->p.size - off)
    return cbw_err_set (err, EINVAL, "range %" PRIu64 "+%" PRIu64 " is past "
                        "the end of the disk (%" PRIu64 " bytes)", off, len,
                        s->p.size);
  *released = 0;
  b0 = (off + s->p.granularity - 1) >> s->shift;
  b1 = off + len == s->p.size ? s->nblocks : (off + len) >> s->shift;
  if (b1 <= b0)
    return 0;
  for (i = 0; i < sizeof from; ++i)
    n += cas_range (s, b0, b1, from[i], CBW_B_NOT_NEEDED);
  atomic_fetch_add_explicit (&s->skipped, n, RLX);
  wake_range (s, b0, b1);
  *released = n;

  /* Let the target drop what we will never read again. */
  end = b1 << s->shift;
  if (end > s->p.size)
    end = s->p.size;
  for (pos = b0 << s->shift; pos < end; pos += k) {
    k = end - pos < (1u << 30) ? end - pos : (1u << 30);
    if (cbw_target_trim (s->target, k, pos, cbw_now_ns () + s->p.timeout_ns,
                         err) == -1)
      return cbw_err_prefix (err, "released, but trimming the target failed");
  }
  return 0;
}

void
cbw_session_stats (struct cbw_session *s, struct cbw_session_stats *st)
{
  memset (st, 0, sizeof *st);
  st->size = s->p.size;
  st->granularity = s->p.granularity;
  st->blocks = s->nblocks;
  st->needed_blocks = atomic_load_explicit (&s->needed, RLX);
  st->copied_blocks = atomic_load_explicit (&s->copied_blocks, RLX);
  st->copied_bytes = atomic_load_explicit (&s->copied_bytes, RLX);
  st->zero_bytes = atomic_load_explicit (&s->zero_bytes, RLX);
  st->skipped_blocks = atomic_load_explicit (&s->skipped, RLX);
  st->failed_blocks = atomic_load_explicit (&s->failed, RLX);
  st->in_flight = atomic_load_explicit (&s->in_flight, RLX);
  st->errors = atomic_load_explicit (&s->errors, RLX);
  st->guest_write_waits = atomic_load_explicit (&s->waits, RLX);
  st->pit_rechecks = atomic_load_explicit (&s->rechecks, RLX);
  st->buffered_blocks = atomic_load_explicit (&s->buffered_blocks, RLX);
  st->copy_workers = s->nworkers;
  st->timeout_ms = (s->p.timeout_ns + 999999) / 1000000;  /* rounded up */
  st->direct_bytes = s->target ? cbw_target_direct_bytes (s->target) : 0;
  if (s->target)
    cbw_target_copy_stats (s->target, &st->clone_bytes,
                           &st->kernel_copy_bytes);
  st->kernel_copy_fallbacks = atomic_load_explicit (&s->kcopy_fallbacks, RLX);
  st->writeback_batches = atomic_load_explicit (&s->wb_batches, RLX);
  st->writeback_copies = atomic_load_explicit (&s->wb_copies, RLX);
  st->broken = atomic_load (&s->broken);
  st->ended = atomic_load (&s->ended);
  if (s->map)
    snprintf (st->state_file, sizeof st->state_file, "%s", s->map_path);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&s->err_lock);
  memcpy (st->last_error, s->last_error, sizeof st->last_error);
}
