/* cbw — plugin/dirtybitmap/tracker.c: crash-safe recording of writes into
 * named dirty bitmaps (see tracker.h; design: docs/design/dirty-bitmaps.md).
 *
 * Write-ahead rule.  A request may go down only after every region (default
 * 64 MiB) it touches is set in the journal on disk ("guaranteed"), and its
 * bits are set in every enabled in-memory bitmap.  The first write to a
 * region pays one journal update + fdatasync (concurrent ones are coalesced
 * into one update by the journal-writer protocol below); later writes to a
 * marked region cost a read lock and an atomic OR per bitmap.
 *
 * Sequential writers.  A streaming writer enters a new region every few tens
 * of milliseconds, and on ext4 each journal fdatasync is a jbd2 commit that
 * may wait for the image's own data writeback.  So when the first write
 * into region r finds region r-1 already guaranteed, the same journal update
 * also guarantees the next `ahead` regions, `ahead` doubling on each such
 * sequential step up to DBM_MARK_AHEAD_MAX (and falling to 0 on a random
 * one): a 2 GiB pass over 64 MiB regions waits ~5 times instead of 32.
 * When the stream then enters a region guaranteed ahead, the next ones are
 * queued and written by the timer thread (prefetch_write; t->prefetch under
 * t_lock), so the writer normally never waits again.  A
 * region guaranteed ahead but never written is only an over-report after a
 * crash (its marks stay 0, so the next checkpoint drops it from the
 * journal); nothing else changes.
 *
 * Checkpoint (timer, flush kick, control commands, clean exit):
 *   1. reset every region mark to 0 (writes to it now take the slow path,
 *      which re-marks it without I/O while it is still guaranteed);
 *   2. take bm_lock for writing (drains every write that tested a mark before
 *      step 1) and copy the bitmaps;
 *   3. save the copy (crash-atomic, durable) with state in-use;
 *   4. rewrite the journal with only the regions marked again since step 1.
 * A region leaves the journal only if no write recorded itself in it after
 * the copy, so every write is in the durable bitmaps or its region is in the
 * durable journal, at every instant.
 *
 * Exact after a process crash.  The words of the live bitmaps are not in
 * ordinary memory but in a MAP_SHARED mapping of DESCRIPTOR.livemap
 * (livemap.h), so the atomic OR that records a write before it goes down is
 * in the page cache at once and survives kill -9: recovery ORs the map into
 * the saved bitmaps and the journal's coarse regions are not needed.  The
 * map's header holds the boot id and the descriptor generation it belongs
 * to (updated around every save), so after a reboot, or when another
 * process saved the store since, it is ignored and the journal is used: the
 * journal is still written exactly as before, for power loss.  The hot path
 * costs the same either way (the words just live elsewhere).  A change of
 * the bitmap list (add/remove) moves every live bitmap into a new map file
 * (livemap_rebuild); if that fails the old map is invalidated, never left
 * half-true, and recovery falls back to the journal.
 *
 * One copy of every bitmap: live[] (in the map, written by the data path).
 * The store's bitmaps (formats/bitmap_store) own no words: a checkpoint
 * points each at what the save must write and detaches it again after the
 * save.  A bitmap that records (enabled, or disabling until that is durable)
 * changes under the save, so it is copied under bm_lock into a snapshot
 * that lives only for that save; one that does not record changes only
 * under ckpt_lock (control operations), which the checkpoint holds, so the
 * save reads its live words in place.  The store is only touched under
 * ckpt_lock, so it is saved without blocking the data path.
 *
 * Locks, in order (never held across I/O unless said):
 *   ckpt_lock  serialises checkpoints and control mutations (control plane
 *              only; held across the bitmap save, no I/O thread waits on it);
 *   bm_lock    rwlock: read by writers while they test marks and set bits,
 *              write by control ops and the checkpoint copy.  Guards the
 *              live bitmaps (live[], nlive, n_enabled) and where their words
 *              are (map: changed under ckpt_lock + bm_lock write, so either
 *              lock is enough to read it);
 *   j_lock     guards marks (written under it; read lock-free with atomics),
 *              guaranteed, jset, pending, writer_active and counters;
 *              j_cond signals the end of a journal write.
 *   t_lock     the timer thread's stop/kick flags.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>

#include "bitmap.h"
#include "bitmap_store.h"
#include "cleanup.h"
#include "journal.h"
#include "livemap.h"
#include "powerloss.h"
#include "tracker.h"

struct live_bitmap {
  char name[CBW_BITMAP_NAME_MAX + 1];
  uint64_t granularity;
  bool enabled;
  bool disabling;                     /* saved as disabled by the save under
                                       * way, still recording until it is
                                       * durable; ckpt_lock + bm_lock */
  enum cbw_bitmap_state state;        /* as last saved */
  uint64_t generation;                /* as last saved */
  struct cbw_bitmap bits;
};

struct dbm_tracker {
  struct cbw_bitmap_store *st;        /* ckpt_lock */
  char *journal_path;
  char *livemap_path;
  struct dbm_livemap *map;            /* ckpt_lock + bm_lock (see above) */
  bool map_valid;                     /* map is published and trusted; atomics */
  uint64_t image_size, region_size, nregions;
  size_t jbytes;                      /* ceil(nregions / 8) */
  dbm_log_fn log;
  enum dbm_recovery recovery;

  pthread_mutex_t ckpt_lock;
  pthread_rwlock_t bm_lock;
  struct live_bitmap *live;           /* CBW_BITMAP_MAX_COUNT slots; bm_lock */
  size_t nlive;                       /* bm_lock; same order as st->bitmaps */
  unsigned n_enabled;                 /* enabled bitmaps; bm_lock */
  bool unsaved_remove;                /* a bitmap left memory but the saved
                                       * descriptor still has it: journal
                                       * every write until a save succeeds;
                                       * bm_lock */

  pthread_mutex_t j_lock;
  pthread_cond_t j_cond;
  struct dbm_journal *journal;        /* used only by the active writer */
  uint8_t *marks;                     /* one byte per region, atomics */
  uint8_t *guaranteed;                /* bitsets of nregions bits, j_lock */
  uint8_t *jset;
  uint8_t *pending;
  bool writer_active;
  uint64_t ahead;                     /* regions guaranteed ahead; j_lock */
  bool changed;                       /* something to checkpoint; j_lock */
  uint64_t write_errors;              /* bumped on each failed journal write */
  uint64_t journal_writes, checkpoints;
  uint64_t journal_waits;             /* writers that waited for the journal */

  pthread_mutex_t t_lock;
  pthread_cond_t t_cond;
  pthread_t timer;
  bool timer_running, timer_stop, kicked;
  bool prefetch;                      /* write pending regions ahead; t_lock */
  unsigned interval_s;
};

const char *
dbm_recovery_name (enum dbm_recovery r)
{
  switch (r) {
  case DBM_RECOVERED_CLEAN: return "clean";
  case DBM_RECOVERED_JOURNAL: return "journal";
  case DBM_RECOVERED_ALL_DIRTY: return "all-dirty";
  case DBM_RECOVERED_MAP: return "map";
  }
  return "?";
}

static inline bool bit_get (const uint8_t *b, uint64_t i) { return b[i / 8] >> (i % 8) & 1; }
static inline void bit_set (uint8_t *b, uint64_t i) { b[i / 8] |= (uint8_t) (1u << (i % 8)); }

static void
tlog (struct dbm_tracker *t, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
static void
tlog (struct dbm_tracker *t, const char *fmt, ...)
{
  char msg[1024];
  va_list ap;

  if (t->log == NULL)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  t->log (msg);
}

/* Set the granules of [off, off+len) bytes in bm (not atomic). */
static void
set_bytes (struct cbw_bitmap *bm, uint64_t gran, uint64_t off, uint64_t len)
{
  if (len == 0)
    return;
  uint64_t first = off / gran, last = (off + len - 1) / gran;
  cbw_bitmap_set_range (bm, first, last - first + 1);
}

/* ---- journal writer protocol ------------------------------------------ */

/* Called with j_lock held and !writer_active.  Writes base | pending as the
 * new journal content, releasing j_lock during the I/O.  Returns with j_lock
 * held; 0 or -1 + err. */
static int
journal_write_locked (struct dbm_tracker *t, const uint8_t *base, struct cbw_err *err)
{
  CLEANUP_FREE uint8_t *s = malloc (t->jbytes);
  size_t i;
  int r;

  if (s == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", t->journal_path);
  for (i = 0; i < t->jbytes; ++i) {
    s[i] = base[i] | t->pending[i];
    t->pending[i] = 0;
    t->guaranteed[i] &= s[i];   /* while writing, disk has old or new */
    t->jset[i] = s[i];
  }
  t->writer_active = true;
  pthread_mutex_unlock (&t->j_lock);

  r = dbm_journal_write (t->journal, s, err);

  pthread_mutex_lock (&t->j_lock);
  t->writer_active = false;
  if (r == 0) {
    memcpy (t->guaranteed, s, t->jbytes);
    t->journal_writes++;
  }
  else
    t->write_errors++;
  pthread_cond_broadcast (&t->j_cond);
  return r;
}

static void kick_prefetch (struct dbm_tracker *t);

/* Add regions (r1, r1 + t->ahead] that are not guaranteed (nor being
 * written) to pending.  With j_lock held.  Returns true if any was added. */
static bool
want_ahead (struct dbm_tracker *t, uint64_t r1)
{
  bool added = false;
  for (uint64_t r = r1 + 1; r <= r1 + t->ahead && r < t->nregions; ++r)
    if (!bit_get (t->guaranteed, r) &&
        !(t->writer_active && bit_get (t->jset, r)) && !bit_get (t->pending, r)) {
      bit_set (t->pending, r);
      added = true;
    }
  return added;
}

static int ensure_marked_locked (struct dbm_tracker *t, uint64_t r0,
                                 uint64_t r1, bool *prefetch,
                                 struct cbw_err *err);

/* Slow path: make regions [r0, r1] guaranteed and mark them. */
static int
ensure_marked (struct dbm_tracker *t, uint64_t r0, uint64_t r1, struct cbw_err *err)
{
  bool prefetch = false;
  int r;

  pthread_mutex_lock (&t->j_lock);
  r = ensure_marked_locked (t, r0, r1, &prefetch, err);
  pthread_mutex_unlock (&t->j_lock);
  if (prefetch)
    kick_prefetch (t);
  return r;
}

static int
ensure_marked_locked (struct dbm_tracker *t, uint64_t r0, uint64_t r1,
                      bool *prefetch, struct cbw_err *err)
{
  uint64_t r, errors0 = t->write_errors;
  bool counted = false;

  t->changed = true;
  /* Sequential step (see the top of this file): ask for the next regions
   * in the same journal update, without waiting for them. */
  if (!bit_get (t->guaranteed, r0)) {
    if (r0 > 0 && bit_get (t->guaranteed, r0 - 1)) {
      t->ahead = t->ahead ? t->ahead * 2 : 1;
      if (t->ahead > DBM_MARK_AHEAD_MAX)
        t->ahead = DBM_MARK_AHEAD_MAX;
      want_ahead (t, r1);
    }
    else
      t->ahead = 0;
  }
  else if (t->ahead > 0 && r0 > 0 && bit_get (t->guaranteed, r0 - 1)) {
    /* The stream entered a region guaranteed ahead of it: push the frontier
     * further in the background, so that it never waits again. */
    t->ahead = t->ahead * 2 > DBM_MARK_AHEAD_MAX ? DBM_MARK_AHEAD_MAX
      : t->ahead * 2;
    *prefetch = want_ahead (t, r1);
  }
  for (;;) {
    bool missing = false;
    for (r = r0; r <= r1; ++r)
      if (!bit_get (t->guaranteed, r)) {
        missing = true;
        if (!(t->writer_active && bit_get (t->jset, r)))
          bit_set (t->pending, r);
      }
    if (!missing) {
      for (r = r0; r <= r1; ++r)
        __atomic_store_n (&t->marks[r], 1, __ATOMIC_RELEASE);
      return 0;
    }
    if (t->write_errors != errors0)
      return cbw_err_set (err, EIO, "%s: journal update failed earlier, "
                          "refusing the write (see previous error)", t->journal_path);
    if (!counted) {
      t->journal_waits++;
      counted = true;
    }
    if (!t->writer_active) {
      if (journal_write_locked (t, t->jset, err) < 0)
        return -1;
      continue;
    }
    pthread_cond_wait (&t->j_cond, &t->j_lock);
  }
}

int
dbm_tracker_record (struct dbm_tracker *t, uint64_t offset, uint64_t count,
                    struct cbw_err *err)
{
  uint64_t r0, r1, r;
  size_t i;

  if (count == 0)
    return 0;
  if (offset >= t->image_size)
    return 0;                      /* nbdkit never sends this; nothing to mark */
  if (count > t->image_size - offset)
    count = t->image_size - offset;
  r0 = offset / t->region_size;
  r1 = (offset + count - 1) / t->region_size;

  for (;;) {
    bool unmarked = false;

    pthread_rwlock_rdlock (&t->bm_lock);
    if (t->n_enabled == 0 && !t->unsaved_remove) {
      pthread_rwlock_unlock (&t->bm_lock);
      return 0;
    }
    for (r = r0; r <= r1; ++r)
      if (!__atomic_load_n (&t->marks[r], __ATOMIC_ACQUIRE)) {
        unmarked = true;
        break;
      }
    if (!unmarked) {
      for (i = 0; i < t->nlive; ++i) {
        struct live_bitmap *b = &t->live[i];
        if (!b->enabled)
          continue;
        uint64_t first = offset / b->granularity;
        uint64_t last = (offset + count - 1) / b->granularity;
        cbw_bitmap_set_range_atomic (&b->bits, first, last - first + 1);
      }
      pthread_rwlock_unlock (&t->bm_lock);
      return 0;
    }
    pthread_rwlock_unlock (&t->bm_lock);
    if (ensure_marked (t, r0, r1, err) < 0)
      return -1;
    /* re-test under the read lock: a checkpoint may have reset the marks */
  }
}

/* ---- checkpoints ------------------------------------------------------- */

/* The store's bitmaps own no words between saves (see the top of the file):
 * a store bitmap is a size (nbits, nwords) whose words are set for one save
 * only.  The save reads only words and nbits, never the summary. */
static void
store_bits_detach (struct cbw_bitmap *sb)
{
  sb->words = NULL;
  sb->summary = NULL;
  sb->external_words = true;
}

/* Take the words (and summary) the store allocated or loaded for b: the live
 * bitmap owns them from now on, the store keeps only the size. */
static void
store_bits_move_to (struct cbw_stored_bitmap *b, struct cbw_bitmap *live)
{
  *live = b->bits;
  store_bits_detach (&b->bits);
}

/* A snapshot buffer of n words for one save: its own mapping, so that it
 * is given back to the kernel when the save is over (a heap block of this
 * size could stay resident), and populated here so that the copy under
 * bm_lock takes no page fault. */
static uint64_t *
snapshot_alloc (uint64_t nwords)
{
  void *p = mmap (NULL, nwords * sizeof (uint64_t), PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

static void
snapshot_free (uint64_t *words, uint64_t nwords)
{
  if (words)
    munmap (words, nwords * sizeof (uint64_t));
}

/* A bitmap the data path may change under a save (ckpt_lock or bm_lock). */
static bool
records (const struct live_bitmap *l)
{
  return l->enabled || l->disabling;
}

/* Called with ckpt_lock held. */
static int
checkpoint_locked (struct dbm_tracker *t, enum cbw_bitmap_state state,
                   struct cbw_err *err)
{
  CLEANUP_FREE uint8_t *target = NULL;
  CLEANUP_FREE uint64_t **snap = NULL;
  uint64_t r;
  size_t i;
  int ret;

  target = calloc (1, t->jbytes);
  snap = calloc (t->nlive ? t->nlive : 1, sizeof *snap);
  if (target == NULL || snap == NULL)
    return cbw_err_set (err, ENOMEM, "checkpoint: out of memory");
  /* Snapshots of the recording bitmaps, allocated before the lock (the
   * list and the enabled flags change only under ckpt_lock, held here). */
  for (i = 0; i < t->nlive; ++i) {
    if (!records (&t->live[i]) || t->live[i].bits.nwords == 0)
      continue;
    snap[i] = snapshot_alloc (t->live[i].bits.nwords);
    if (snap[i] == NULL) {
      int e = errno;
      cbw_err_set (err, e, "checkpoint: bitmap '%s': no memory for its save "
                   "snapshot: %s", t->live[i].name, strerror (e));
      while (i-- > 0)
        snapshot_free (snap[i], t->live[i].bits.nwords);
      pthread_mutex_lock (&t->j_lock);
      t->changed = true;             /* try again next time */
      pthread_mutex_unlock (&t->j_lock);
      return -1;
    }
  }

  /* 1. reset marks */
  pthread_mutex_lock (&t->j_lock);
  t->changed = false;
  for (r = 0; r < t->nregions; ++r)
    __atomic_store_n (&t->marks[r], 0, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock (&t->j_lock);

  /* 2. snapshot the recording bitmaps while no write is between its mark
   *    test and its bit setting (memcpy only, no I/O); the others are saved
   *    from their live words, which only ckpt_lock holders change */
  pthread_rwlock_wrlock (&t->bm_lock);
  for (i = 0; i < t->nlive; ++i) {
    struct cbw_stored_bitmap *d = &t->st->bitmaps[i];
    const struct cbw_bitmap *lb = &t->live[i].bits;
    if (snap[i]) {
      memcpy (snap[i], lb->words, lb->nwords * sizeof (uint64_t));
      d->bits.words = snap[i];
    }
    else
      d->bits.words = lb->words;
    d->enabled = t->live[i].enabled && !t->live[i].disabling;
    d->state = state;
  }
  pthread_rwlock_unlock (&t->bm_lock);

  /* 3. durable save (I/O; only ckpt_lock held); the map follows the
   *    descriptor's generation so that recovery can tell it is current */
  dbm_livemap_saving (t->map, t->st->generation + 1);
  ret = cbw_bitmap_store_save (t->st, err);
  for (i = 0; i < t->nlive; ++i) {
    store_bits_detach (&t->st->bitmaps[i].bits);
    snapshot_free (snap[i], t->live[i].bits.nwords);
  }
  if (ret == 0) {
    dbm_livemap_saved (t->map, t->st->generation);
    pthread_rwlock_wrlock (&t->bm_lock);
    t->unsaved_remove = false;
    for (i = 0; i < t->nlive; ++i) {
      t->live[i].state = state;
      t->live[i].generation = t->st->bitmaps[i].generation;
    }
    pthread_rwlock_unlock (&t->bm_lock);
    ret = dbm_powerloss_store_saved (t->st->dir, t->journal_path, err);
  }
  if (ret < 0) {
    pthread_mutex_lock (&t->j_lock);
    t->changed = true;             /* try again next time */
    pthread_mutex_unlock (&t->j_lock);
    return -1;
  }

  /* 4. keep only regions marked since step 1 */
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->j_lock);
  while (t->writer_active)
    pthread_cond_wait (&t->j_cond, &t->j_lock);
  for (r = 0; r < t->nregions; ++r)
    if (__atomic_load_n (&t->marks[r], __ATOMIC_SEQ_CST))
      bit_set (target, r);
  if (memcmp (target, t->jset, t->jbytes) != 0 ||
      memcmp (target, t->guaranteed, t->jbytes) != 0) {
    if (journal_write_locked (t, target, err) < 0) {
      t->changed = true;
      return -1;
    }
  }
  t->checkpoints++;
  return 0;
}

int
dbm_tracker_checkpoint (struct dbm_tracker *t, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
  return checkpoint_locked (t, CBW_BITMAP_IN_USE, err);
}

static bool
needs_checkpoint (struct dbm_tracker *t)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->j_lock);
  size_t i;

  if (t->changed)
    return true;
  for (i = 0; i < t->jbytes; ++i)
    if (t->jset[i])
      return true;
  return false;
}

/* Background journal update for regions guaranteed ahead of a sequential
 * writer (nobody waits for it; if it is not done in time, the writer that
 * reaches the region writes it, as without prefetch). */
static void
prefetch_write (struct dbm_tracker *t)
{
  struct cbw_err err = { 0 };
  size_t i;
  bool any = false;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->j_lock);
  if (t->writer_active)
    return;                      /* pending goes with the next write */
  for (i = 0; i < t->jbytes && !any; ++i)
    any = t->pending[i] != 0;
  if (any && journal_write_locked (t, t->jset, &err) < 0)
    tlog (t, "journal update ahead of a sequential writer failed: %s", err.msg);
}

static void
kick_prefetch (struct dbm_tracker *t)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->t_lock);
  if (t->timer_running && !t->prefetch) {
    t->prefetch = true;
    pthread_cond_signal (&t->t_cond);
  }
}

static void *
timer_thread (void *arg)
{
  struct dbm_tracker *t = arg;
  struct timespec last, now, until;

  clock_gettime (CLOCK_MONOTONIC, &last);
  pthread_mutex_lock (&t->t_lock);
  while (!t->timer_stop) {
    if (t->prefetch) {
      t->prefetch = false;
      pthread_mutex_unlock (&t->t_lock);
      prefetch_write (t);
      pthread_mutex_lock (&t->t_lock);
      continue;
    }
    clock_gettime (CLOCK_MONOTONIC, &now);
    until = last;
    /* a flush brings the checkpoint forward, but at most one per
     * min(5 s, interval): flush-heavy guests must not turn it into a save
     * storm */
    until.tv_sec += t->kicked ? (time_t) (t->interval_s < 5 ? t->interval_s : 5)
                              : (time_t) t->interval_s;
    if (now.tv_sec < until.tv_sec ||
        (now.tv_sec == until.tv_sec && now.tv_nsec < until.tv_nsec)) {
      pthread_cond_timedwait (&t->t_cond, &t->t_lock, &until);
      continue;
    }
    t->kicked = false;
    pthread_mutex_unlock (&t->t_lock);
    if (needs_checkpoint (t)) {
      struct cbw_err err = { 0 };
      if (dbm_tracker_checkpoint (t, &err) < 0)
        tlog (t, "background checkpoint failed (will retry): %s", err.msg);
    }
    clock_gettime (CLOCK_MONOTONIC, &last);
    pthread_mutex_lock (&t->t_lock);
  }
  pthread_mutex_unlock (&t->t_lock);
  return NULL;
}

int
dbm_tracker_start_timer (struct dbm_tracker *t, unsigned interval_s, struct cbw_err *err)
{
  int e;

  if (t->timer_running)
    return 0;
  t->interval_s = interval_s ? interval_s : 1;
  t->timer_stop = false;
  e = pthread_create (&t->timer, NULL, timer_thread, t);
  if (e != 0)
    return cbw_err_set (err, e, "checkpoint thread: pthread_create: %s", strerror (e));
  t->timer_running = true;
  return 0;
}

void
dbm_tracker_kick (struct dbm_tracker *t)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->t_lock);
  if (!t->kicked) {
    t->kicked = true;
    pthread_cond_signal (&t->t_cond);
  }
}

static void
stop_timer (struct dbm_tracker *t)
{
  if (!t->timer_running)
    return;
  pthread_mutex_lock (&t->t_lock);
  t->timer_stop = true;
  pthread_cond_signal (&t->t_cond);
  pthread_mutex_unlock (&t->t_lock);
  pthread_join (t->timer, NULL);
  t->timer_running = false;
}

/* ---- open / close ------------------------------------------------------- */

static void
tracker_free (struct dbm_tracker *t)
{
  if (t == NULL)
    return;
  dbm_journal_close (t->journal);
  cbw_bitmap_store_close (t->st);
  pthread_mutex_destroy (&t->ckpt_lock);
  pthread_rwlock_destroy (&t->bm_lock);
  pthread_mutex_destroy (&t->j_lock);
  pthread_cond_destroy (&t->j_cond);
  pthread_mutex_destroy (&t->t_lock);
  pthread_cond_destroy (&t->t_cond);
  if (t->live) {
    for (size_t i = 0; i < t->nlive; ++i)
      cbw_bitmap_free (&t->live[i].bits);
    free (t->live);
  }
  dbm_livemap_close (t->map, false);     /* after the bitmaps using it */
  free (t->livemap_path);
  free (t->marks);
  free (t->guaranteed);
  free (t->jset);
  free (t->pending);
  free (t->journal_path);
  free (t);
}

/* OR a trusted map's bitmap into b.  false (b untouched) if the slot's bits
 * are not a valid map of b's size. */
static bool
merge_slot (struct cbw_stored_bitmap *b, const struct dbm_livemap_slot *sl)
{
  struct cbw_bitmap tmp;
  bool ok;

  if (cbw_bitmap_init (&tmp, sl->nbits) < 0)
    return false;
  ok = cbw_bitmap_deserialize (&tmp, sl->words, (sl->nbits + 7) / 8) == 0 &&
       cbw_bitmap_or (&b->bits, &tmp) == 0;
  cbw_bitmap_free (&tmp);
  return ok;
}

/* After a process crash the map of the dead process holds every bit it set:
 * OR it into each enabled in-use bitmap it has a slot for (covered[i]).
 * Returns how many it covered; 0 if the map is missing or not trusted. */
static size_t
recover_from_map (struct dbm_tracker *t, bool *covered)
{
  struct dbm_livemap_loaded *l;
  struct cbw_err merr = { 0 };
  size_t i, k, n = 0;

  if (t->livemap_path == NULL)
    return 0;
  if (dbm_livemap_load (t->livemap_path, t->image_size, t->st->generation, &l, &merr) < 0) {
    /* after a reboot or another process's save that is expected; anything
     * else means a damaged map (a warning, but still never a failure) */
    if (merr.errnum == EXDEV || merr.errnum == ESTALE || merr.errnum == ENOENT)
      tlog (t, "%s: live-bitmap map not used, recovering from the journal: %s",
            t->st->descriptor_path, merr.msg);
    else
      tlog (t, "WARNING: %s: live-bitmap map ignored, recovering from the journal: %s",
            t->st->descriptor_path, merr.msg);
    return 0;
  }
  for (i = 0; i < t->st->count; ++i) {
    struct cbw_stored_bitmap *b = &t->st->bitmaps[i];
    if (b->state != CBW_BITMAP_IN_USE || !b->enabled)
      continue;
    for (k = 0; k < l->n; ++k)
      if (strcmp (l->slots[k].name, b->name) == 0)
        break;
    if (k == l->n || l->slots[k].granularity != b->granularity ||
        l->slots[k].nbits != b->bits.nbits) {
      tlog (t, "%s: bitmap '%s' is not in the live-bitmap map: recovering it from "
            "the journal", t->st->descriptor_path, b->name);
      continue;
    }
    if (!merge_slot (b, &l->slots[k])) {
      tlog (t, "%s: bitmap '%s': malformed bits in the live-bitmap map: recovering it "
            "from the journal", t->st->descriptor_path, b->name);
      continue;
    }
    covered[i] = true;
    n++;
  }
  dbm_livemap_unload (l);
  return n;
}

/* Move every live bitmap into a new map file, after open and after each
 * change of the bitmap list (ckpt_lock held, which keeps the list stable;
 * bm_lock is taken only for the switch).  If that fails, the old map is
 * invalidated (it no longer describes the list) and the bitmaps not in a map
 * stay in ordinary memory: recovery then uses the journal, as it does for
 * anything the map cannot vouch for. */
static void
livemap_rebuild (struct dbm_tracker *t)
{
  CLEANUP_FREE struct dbm_livemap_slot *slots = NULL;
  struct dbm_livemap *m, *old;
  struct cbw_err err = { 0 };
  size_t i;

  slots = calloc (t->nlive ? t->nlive : 1, sizeof *slots);
  if (slots == NULL) {
    cbw_err_set (&err, ENOMEM, "out of memory");
    m = NULL;
  }
  else {
    for (i = 0; i < t->nlive; ++i) {
      slots[i].name = t->live[i].name;
      slots[i].granularity = t->live[i].granularity;
      slots[i].nbits = t->live[i].bits.nbits;
    }
    m = dbm_livemap_create (t->livemap_path, t->image_size, t->st->generation,
                            t->nlive, slots, &err);
  }
  if (m == NULL) {
    tlog (t, "WARNING: %s: cannot create the live-bitmap map (%s): after a crash the "
          "bitmaps will be recovered from the journal (whole regions)",
          t->livemap_path, err.msg);
    pthread_rwlock_wrlock (&t->bm_lock);
    dbm_livemap_invalidate (t->map);
    pthread_rwlock_unlock (&t->bm_lock);
    __atomic_store_n (&t->map_valid, false, __ATOMIC_RELAXED);
    return;
  }
  /* copy the bits and switch with no write between test and set */
  pthread_rwlock_wrlock (&t->bm_lock);
  for (i = 0; i < t->nlive; ++i)
    cbw_bitmap_use_external_words (&t->live[i].bits, slots[i].words);
  dbm_livemap_invalidate (t->map);
  old = t->map;
  t->map = m;
  pthread_rwlock_unlock (&t->bm_lock);
  if (dbm_livemap_publish (m, &err) < 0) {
    tlog (t, "WARNING: %s (after a crash the bitmaps will be recovered from the "
          "journal)", err.msg);
    dbm_livemap_invalidate (m);
    __atomic_store_n (&t->map_valid, false, __ATOMIC_RELAXED);
  }
  else
    __atomic_store_n (&t->map_valid, true, __ATOMIC_RELAXED);
  dbm_livemap_close (old, false);
}

/* After an unclean shutdown: OR the live-bitmap map (process crash: exact)
 * or else the journal's regions into every enabled in-use bitmap; if neither
 * is usable, set those bitmaps full. */
static void
recover (struct dbm_tracker *t)
{
  struct dbm_journal_state js;
  struct cbw_err jerr = { 0 };
  size_t i, need = 0, from_map;
  uint64_t r;
  CLEANUP_FREE bool *covered = NULL;

  for (i = 0; i < t->st->count; ++i)
    if (t->st->bitmaps[i].state == CBW_BITMAP_IN_USE && t->st->bitmaps[i].enabled)
      need++;
  if (need == 0) {
    t->recovery = DBM_RECOVERED_CLEAN;
    return;
  }
  covered = calloc (t->st->count, sizeof *covered);
  from_map = covered ? recover_from_map (t, covered) : 0;
  if (need > 0 && from_map == need) {
    t->recovery = DBM_RECOVERED_MAP;
    tlog (t, "%s: unclean shutdown (process crash): merged the live-bitmap map %s "
          "into %zu bitmap(s), exact", t->st->descriptor_path, t->livemap_path, need);
    return;
  }
  need -= from_map;                      /* the rest come from the journal */
  if (dbm_journal_read (t->journal_path, &js, &jerr) < 0) {
    t->recovery = DBM_RECOVERED_ALL_DIRTY;
    tlog (t, "WARNING: %s: unclean shutdown and the journal is unusable (%s): "
          "marking %zu enabled bitmap(s) entirely dirty", t->st->descriptor_path,
          jerr.msg, need);
    for (i = 0; i < t->st->count; ++i) {
      struct cbw_stored_bitmap *b = &t->st->bitmaps[i];
      if (b->state == CBW_BITMAP_IN_USE && b->enabled && !(covered && covered[i]))
        cbw_bitmap_set_range (&b->bits, 0, b->bits.nbits);
    }
    return;
  }
  t->recovery = DBM_RECOVERED_JOURNAL;
  uint64_t nset = 0;
  for (r = 0; r < js.nregions; ++r) {
    if (!bit_get (js.bits, r))
      continue;
    nset++;
    uint64_t off = r * js.region_size, len = js.region_size;
    /* the journal may describe another size: clip to this image; a region
     * past the end that could not have been written is ignored */
    if (off >= t->image_size)
      continue;
    if (len > t->image_size - off)
      len = t->image_size - off;
    for (i = 0; i < t->st->count; ++i) {
      struct cbw_stored_bitmap *b = &t->st->bitmaps[i];
      if (b->state == CBW_BITMAP_IN_USE && b->enabled && !(covered && covered[i]))
        set_bytes (&b->bits, b->granularity, off, len);
    }
  }
  /* A journal for a smaller image cannot cover writes past its end. */
  if (js.image_size < t->image_size) {
    for (i = 0; i < t->st->count; ++i) {
      struct cbw_stored_bitmap *b = &t->st->bitmaps[i];
      if (b->state == CBW_BITMAP_IN_USE && b->enabled && !(covered && covered[i]))
        set_bytes (&b->bits, b->granularity, js.image_size, t->image_size - js.image_size);
    }
  }
  tlog (t, "%s: unclean shutdown: merged %" PRIu64 " journal region(s) of %" PRIu64
        " bytes into %zu bitmap(s)", t->st->descriptor_path, nset, js.region_size, need);
  dbm_journal_state_free (&js);
}

struct dbm_tracker *
dbm_tracker_open (const char *descriptor, const char *journal_path,
                  uint64_t image_size, uint64_t region_size, dbm_log_fn log,
                  struct cbw_err *err)
{
  return dbm_tracker_open_flags (descriptor, journal_path, image_size, region_size,
                                 CBW_BITMAP_STORE_EMPTY_IF_MISSING, log, err);
}

struct dbm_tracker *
dbm_tracker_open_flags (const char *descriptor, const char *journal_path,
                        uint64_t image_size, uint64_t region_size, unsigned store_flags,
                        dbm_log_fn log, struct cbw_err *err)
{
  struct dbm_tracker *t;
  pthread_rwlockattr_t ra;
  size_t i;

  t = calloc (1, sizeof *t);
  if (t == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  pthread_mutex_init (&t->ckpt_lock, NULL);
  pthread_rwlockattr_init (&ra);
  /* writer preference: a checkpoint/control op must not starve under I/O */
  pthread_rwlockattr_setkind_np (&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&t->bm_lock, &ra);
  pthread_rwlockattr_destroy (&ra);
  pthread_mutex_init (&t->j_lock, NULL);
  pthread_cond_init (&t->j_cond, NULL);
  pthread_mutex_init (&t->t_lock, NULL);
  {
    pthread_condattr_t ca;
    pthread_condattr_init (&ca);
    pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
    pthread_cond_init (&t->t_cond, &ca);
    pthread_condattr_destroy (&ca);
  }
  t->log = log;
  t->image_size = image_size;
  t->region_size = region_size;
  t->nregions = dbm_journal_nregions (image_size, region_size);
  if (t->nregions == 0) {
    cbw_err_set (err, EINVAL, "region size %" PRIu64 " is invalid for image size %" PRIu64
                 " (power of two, 1M..1T, at most %u regions)", region_size, image_size,
                 8 * DBM_JOURNAL_MAX_BITMAP_BYTES);
    goto fail;
  }
  t->jbytes = (size_t) ((t->nregions + 7) / 8);
  t->journal_path = strdup (journal_path);
  if (asprintf (&t->livemap_path, "%s.livemap", descriptor) < 0)
    t->livemap_path = NULL;
  t->marks = calloc (t->nregions, 1);
  t->guaranteed = calloc (t->jbytes, 1);
  t->jset = calloc (t->jbytes, 1);
  t->pending = calloc (t->jbytes, 1);
  t->live = calloc (CBW_BITMAP_MAX_COUNT, sizeof *t->live);
  if (!t->journal_path || !t->livemap_path || !t->marks || !t->guaranteed || !t->jset || !t->pending || !t->live) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }

  t->st = cbw_bitmap_store_open_ex (descriptor, image_size, store_flags, err);
  if (t->st == NULL)
    goto fail;

  recover (t);

  /* Durably in-use (with recovered bits) before the journal is emptied and
   * before any write can be recorded. */
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
    if (t->st->count > 0) {
      for (i = 0; i < t->st->count; ++i)
        t->st->bitmaps[i].state = CBW_BITMAP_IN_USE;
      if (cbw_bitmap_store_save (t->st, err) < 0) {
        cbw_err_prefix (err, "saving recovered bitmaps");
        goto fail;
      }
      if (dbm_powerloss_store_saved (t->st->dir, journal_path, err) < 0)
        goto fail;
    }
  }
  for (i = 0; i < t->st->count; ++i) {
    struct cbw_stored_bitmap *b = &t->st->bitmaps[i];
    struct live_bitmap *l = &t->live[i];
    store_bits_move_to (b, &l->bits);
    t->nlive++;
    memcpy (l->name, b->name, sizeof l->name);
    l->granularity = b->granularity;
    l->enabled = b->enabled;
    l->state = b->state;
    l->generation = b->generation;
    if (l->enabled)
      t->n_enabled++;
  }
  t->journal = dbm_journal_create (journal_path, image_size, region_size, err);
  if (t->journal == NULL)
    goto fail;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
    livemap_rebuild (t);
    if (!t->map_valid)
      unlink (t->livemap_path);   /* a map of an older life is never wanted */
  }
  return t;

 fail:
  tracker_free (t);
  return NULL;
}

int
dbm_tracker_close (struct dbm_tracker *t, bool clean, struct cbw_err *err)
{
  int ret = 0;

  if (t == NULL)
    return 0;
  stop_timer (t);
  if (clean) {
    pthread_mutex_lock (&t->ckpt_lock);
    if (t->st->count > 0 || t->st->generation > 0)
      ret = checkpoint_locked (t, CBW_BITMAP_CLEAN, err);
    if (ret == 0) {
      /* every bitmap is clean on disk: the journal is not needed any more */
      CLEANUP_FREE uint8_t *empty = calloc (1, t->jbytes);
      pthread_mutex_lock (&t->j_lock);
      if (empty == NULL)
        ret = cbw_err_set (err, ENOMEM, "out of memory");
      else if (memcmp (empty, t->jset, t->jbytes) != 0)
        ret = journal_write_locked (t, empty, err);
      pthread_mutex_unlock (&t->j_lock);
    }
    if (ret == 0) {
      /* clean on disk: the map is not needed (nor trusted) any more */
      if (t->map_valid)
        dbm_livemap_close (t->map, true);
      else
        dbm_livemap_close (t->map, false);
      t->map = NULL;
    }
    pthread_mutex_unlock (&t->ckpt_lock);
  }
  tracker_free (t);
  return ret;
}

uint64_t dbm_tracker_image_size (const struct dbm_tracker *t) { return t->image_size; }

/* ---- control operations -------------------------------------------------- */

/* Index of a live bitmap (bm_lock held), or -1 + ENOENT. */
static ssize_t
find_or_err (struct dbm_tracker *t, const char *name, struct cbw_err *err)
{
  for (size_t i = 0; i < t->nlive; ++i)
    if (strcmp (t->live[i].name, name) == 0)
      return (ssize_t) i;
  return cbw_err_set (err, ENOENT, "bitmap '%s' not found", name);
}

/* Checkpoint after a control mutation (ckpt_lock held). */
static int
persist (struct dbm_tracker *t, const char *what, struct cbw_err *err)
{
  if (checkpoint_locked (t, CBW_BITMAP_IN_USE, err) < 0) {
    cbw_err_prefix (err, "%s applied in memory but not saved (retried by the next "
                    "checkpoint)", what);
    err->errnum = EIO;
    return -1;
  }
  return 0;
}

int
dbm_tracker_add (struct dbm_tracker *t, const char *name, uint64_t granularity,
                 bool enabled, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
  struct cbw_stored_bitmap *b;
  struct live_bitmap l;

  if (cbw_bitmap_name_valid (name, err) < 0 ||
      cbw_bitmap_granularity_valid (granularity, err) < 0) {
    err->errnum = EINVAL;
    return -1;
  }
  /* the store is touched only under ckpt_lock: no bm_lock needed for it */
  b = cbw_bitmap_store_add (t->st, name, granularity, enabled, err);
  if (b == NULL)
    return -1;
  b->state = CBW_BITMAP_IN_USE;
  memset (&l, 0, sizeof l);
  store_bits_move_to (b, &l.bits);      /* all clear, as the store made it */
  memcpy (l.name, b->name, sizeof l.name);
  l.granularity = granularity;
  l.enabled = enabled;
  l.state = CBW_BITMAP_IN_USE;

  pthread_rwlock_wrlock (&t->bm_lock);
  t->live[t->nlive++] = l;
  if (enabled)
    t->n_enabled++;
  pthread_rwlock_unlock (&t->bm_lock);
  livemap_rebuild (t);
  return persist (t, "add", err);
}

int
dbm_tracker_remove (struct dbm_tracker *t, const char *name, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
  struct cbw_bitmap gone;
  ssize_t i;

  pthread_rwlock_wrlock (&t->bm_lock);
  i = find_or_err (t, name, err);
  if (i < 0) {
    pthread_rwlock_unlock (&t->bm_lock);
    return -1;
  }
  gone = t->live[i].bits;
  if (t->live[i].enabled) {
    /* A crash before the save brings the bitmap back from the descriptor
     * without a slot in the new map, so from the journal: keep journaling
     * even if no enabled bitmap is left, until a save succeeds. */
    t->n_enabled--;
    t->unsaved_remove = true;
  }
  memmove (&t->live[i], &t->live[i + 1], (t->nlive - (size_t) i - 1) * sizeof t->live[0]);
  t->nlive--;
  pthread_rwlock_unlock (&t->bm_lock);
  cbw_bitmap_free (&gone);
  livemap_rebuild (t);
  if (cbw_bitmap_store_remove (t->st, name, err) < 0)
    return -1;
  return persist (t, "remove", err);
}

int
dbm_tracker_clear (struct dbm_tracker *t, const char *name, struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
  ssize_t i;

  pthread_rwlock_wrlock (&t->bm_lock);
  i = find_or_err (t, name, err);
  if (i >= 0)
    cbw_bitmap_clear_all (&t->live[i].bits);
  pthread_rwlock_unlock (&t->bm_lock);
  if (i < 0)
    return -1;
  return persist (t, "clear", err);
}

int
dbm_tracker_set_enabled (struct dbm_tracker *t, const char *name, bool enabled,
                         struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
  ssize_t i;
  int ret;

  /* Enabling takes effect at once: a crash before the save leaves it
   * disabled, which promises nothing about later writes.  Disabling takes
   * effect only once the descriptor saying so is durable: until then the
   * bitmap keeps recording (in the map too), so neither a crash during the
   * save nor a failed save can leave an enabled bitmap that missed writes. */
  pthread_rwlock_wrlock (&t->bm_lock);
  i = find_or_err (t, name, err);
  if (i >= 0 && enabled && !t->live[i].enabled) {
    t->live[i].enabled = true;
    t->n_enabled++;
  }
  if (i >= 0 && !enabled && t->live[i].enabled)
    t->live[i].disabling = true;
  pthread_rwlock_unlock (&t->bm_lock);
  if (i < 0)
    return -1;
  if (enabled)
    return persist (t, "enable", err);
  ret = checkpoint_locked (t, CBW_BITMAP_IN_USE, err);
  if (ret < 0) {
    cbw_err_prefix (err, "disable not applied (the bitmap still records) because "
                    "the descriptor could not be saved");
    err->errnum = EIO;
  }
  pthread_rwlock_wrlock (&t->bm_lock);
  if (t->live[i].disabling && ret == 0) {
    t->live[i].enabled = false;
    t->n_enabled--;
  }
  t->live[i].disabling = false;
  pthread_rwlock_unlock (&t->bm_lock);
  return ret;
}

int
dbm_tracker_merge (struct dbm_tracker *t, const char *src, const char *dst,
                   struct cbw_err *err)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
  ssize_t si, di = -1;
  int r = 0;

  pthread_rwlock_wrlock (&t->bm_lock);
  si = find_or_err (t, src, err);
  if (si >= 0)
    di = find_or_err (t, dst, err);
  if (si >= 0 && di >= 0 && si != di) {
    struct live_bitmap *s = &t->live[si], *d = &t->live[di];
    if (s->granularity == d->granularity)
      r = cbw_bitmap_or (&d->bits, &s->bits);
    else {
      /* different granularities: every dst granule overlapping a dirty src
       * granule becomes dirty (never under-reports) */
      uint64_t from = 0, st0, cnt;
      while (cbw_bitmap_next_extent (&s->bits, from, &st0, &cnt)) {
        uint64_t off = st0 * s->granularity, len = cnt * s->granularity;
        if (off < t->image_size) {
          if (len > t->image_size - off)
            len = t->image_size - off;
          set_bytes (&d->bits, d->granularity, off, len);
        }
        from = st0 + cnt;
      }
    }
  }
  pthread_rwlock_unlock (&t->bm_lock);
  if (si < 0 || di < 0)
    return -1;
  if (r < 0)
    return cbw_err_set (err, EINVAL, "merge '%s' into '%s': bitmap sizes differ", src, dst);
  return persist (t, "merge", err);
}

int
dbm_tracker_mark (struct dbm_tracker *t, const char *name,
                  const struct dbm_extent *x, size_t n, struct cbw_err *err)
{
  for (size_t i = 0; i < n; i++)
    if (x[i].length == 0 || x[i].offset >= t->image_size ||
        x[i].length > t->image_size - x[i].offset)
      return cbw_err_set (err, EINVAL, "mark '%s': extent %zu (%" PRIu64 "+%" PRIu64
                          ") is empty or past the end of the image (%" PRIu64 " bytes)",
                          name, i, x[i].offset, x[i].length, t->image_size);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->ckpt_lock);
  pthread_rwlock_wrlock (&t->bm_lock);
  ssize_t bi = find_or_err (t, name, err);
  if (bi >= 0)
    for (size_t i = 0; i < n; i++)
      set_bytes (&t->live[bi].bits, t->live[bi].granularity, x[i].offset, x[i].length);
  pthread_rwlock_unlock (&t->bm_lock);
  if (bi < 0)
    return -1;
  return persist (t, "mark", err);
}

static uint64_t
dirty_bytes (const struct live_bitmap *b, uint64_t image_size)
{
  uint64_t n = cbw_bitmap_count (&b->bits) * b->granularity;
  /* the last granule may be partial */
  if (b->bits.nbits > 0 && cbw_bitmap_test (&b->bits, b->bits.nbits - 1) &&
      image_size % b->granularity)
    n -= b->granularity - image_size % b->granularity;
  return n;
}

int
dbm_tracker_list (struct dbm_tracker *t, struct dbm_bitmap_info **out, size_t *n,
                  struct cbw_err *err)
{
  size_t i;

  pthread_rwlock_rdlock (&t->bm_lock);
  *n = t->nlive;
  *out = calloc (*n ? *n : 1, sizeof **out);
  if (*out == NULL) {
    pthread_rwlock_unlock (&t->bm_lock);
    return cbw_err_set (err, ENOMEM, "out of memory");
  }
  for (i = 0; i < *n; ++i) {
    const struct live_bitmap *b = &t->live[i];
    memcpy ((*out)[i].name, b->name, sizeof b->name);
    (*out)[i].granularity = b->granularity;
    (*out)[i].enabled = b->enabled;
    (*out)[i].state = b->state;
    (*out)[i].generation = b->generation;
    (*out)[i].dirty_bytes = dirty_bytes (b, t->image_size);
  }
  pthread_rwlock_unlock (&t->bm_lock);
  return 0;
}

int
dbm_tracker_extents (struct dbm_tracker *t, const char *name, uint64_t offset,
                     uint64_t length, size_t max, struct dbm_extent *out,
                     size_t *n, uint64_t *next, struct cbw_err *err)
{
  struct live_bitmap *b;
  uint64_t end, from, st0, cnt;
  ssize_t i;

  *n = 0;
  if (offset > t->image_size || length > t->image_size - offset)
    return cbw_err_set (err, EINVAL, "range [%" PRIu64 ", +%" PRIu64 ") is outside the "
                        "image (%" PRIu64 " bytes)", offset, length, t->image_size);
  end = offset + length;
  *next = end;
  pthread_rwlock_rdlock (&t->bm_lock);
  i = find_or_err (t, name, err);
  if (i < 0) {
    pthread_rwlock_unlock (&t->bm_lock);
    return -1;
  }
  b = &t->live[i];
  from = offset / b->granularity;
  while (from * b->granularity < end &&
         cbw_bitmap_next_extent (&b->bits, from, &st0, &cnt)) {
    uint64_t eo = st0 * b->granularity, el = cnt * b->granularity;
    if (eo >= end)
      break;
    if (*n == max) {
      *next = eo > offset ? eo : offset;
      break;
    }
    if (eo < offset) { el -= offset - eo; eo = offset; }
    if (el > end - eo) el = end - eo;
    out[(*n)++] = (struct dbm_extent) { eo, el };
    from = st0 + cnt;
  }
  pthread_rwlock_unlock (&t->bm_lock);
  return 0;
}

void
dbm_tracker_stats (struct dbm_tracker *t, struct dbm_tracker_stats *s)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&t->j_lock);
  uint64_t r;

  memset (s, 0, sizeof *s);
  s->image_size = t->image_size;
  s->region_size = t->region_size;
  s->nregions = t->nregions;
  for (r = 0; r < t->nregions; ++r)
    if (bit_get (t->jset, r))
      s->journal_regions++;
  s->journal_writes = t->journal_writes;
  s->journal_waits = t->journal_waits;
  s->checkpoints = t->checkpoints;
  s->recovery = t->recovery;
  s->livemap = __atomic_load_n (&t->map_valid, __ATOMIC_RELAXED);
  s->descriptor = t->st->descriptor_path;
  s->journal = t->journal_path;
}
