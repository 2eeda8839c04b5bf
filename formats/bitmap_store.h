/* cbw — formats/bitmap_store.h: named, persistent dirty bitmaps kept beside
 * any image (raw included).  Byte-level spec: docs/formats/bitmaps.md.
 *
 * On disk: a JSON descriptor (default IMAGE.cbw-bitmaps.json) listing the
 * bitmaps, and one plain little-endian data file per bitmap and generation.
 * Every save is crash-atomic: new data files are written under new names
 * and fsynced, then the descriptor is replaced with cbw_write_file_atomic()
 * (temp, fsync, rename, fsync dir), then data files no longer referenced are
 * removed.  A crash at any point leaves the old or the new state, complete.
 *
 * Each bitmap has a state: "clean" (data file is exact as of the last save)
 * or "in-use" (a writer had it open; data file is a lower bound and the
 * writer's own write-ahead journal — see plugin/dirtybitmap — must be merged
 * on load).  The store just records the state; the dirtybitmap filter owns
 * the recovery policy.
 *
 * Locking: a struct cbw_bitmap_store is not thread-safe; the owner serialises
 * calls.  Cross-process exclusion: cbw_bitmap_store_open() takes an exclusive
 * flock() on DESCRIPTOR.lock (kept until close); a second opener gets EBUSY
 * with a message naming the lock file.
 */
#ifndef CBW_BITMAP_STORE_H
#define CBW_BITMAP_STORE_H

#include <stdbool.h>
#include <stdint.h>

#include "bitmap.h"
#include "cbw_err.h"

#define CBW_BITMAP_FORMAT_VERSION 1
#define CBW_BITMAP_NAME_MAX 128          /* [A-Za-z0-9_.:-]{1,128}, not "." or ".." */
#define CBW_BITMAP_GRAN_MIN 512ULL
#define CBW_BITMAP_GRAN_MAX (2ULL << 30) /* 2 GiB */
#define CBW_BITMAP_GRAN_DEFAULT 65536ULL
#define CBW_BITMAP_MAX_COUNT 1024        /* bitmaps per store */
#define CBW_BITMAP_DESCRIPTOR_MAX (1 << 20) /* bytes; larger descriptors: EFBIG */
/* Test hook: if this environment variable names a save step (see
 * docs/formats/bitmaps.md, "Crash testing"), cbw_bitmap_store_save() calls
 * _exit(CBW_BITMAP_STORE_CRASH_EXIT) right after that step. */
#define CBW_BITMAP_STORE_CRASH_ENV "CBW_BITMAP_STORE_CRASH_AFTER"
#define CBW_BITMAP_STORE_CRASH_EXIT 86

enum cbw_bitmap_state {
  CBW_BITMAP_CLEAN = 0,
  CBW_BITMAP_IN_USE,
};

struct cbw_stored_bitmap {
  char name[CBW_BITMAP_NAME_MAX + 1];
  uint64_t granularity;           /* bytes, power of two */
  bool enabled;                   /* records writes */
  enum cbw_bitmap_state state;
  uint64_t generation;            /* bumped on every save of this bitmap */
  struct cbw_bitmap bits;         /* ceil(image_size / granularity) bits */
};

struct cbw_bitmap_store {
  char *descriptor_path;
  char *dir;                      /* directory of the descriptor, data files live here */
  uint64_t image_size;
  uint64_t generation;            /* descriptor generation */
  int lock_fd;
  size_t count;
  struct cbw_stored_bitmap *bitmaps;  /* array of count, order = creation order */
};

/* Default descriptor path for an image: "IMAGE.cbw-bitmaps.json" (malloc'd). */
char *cbw_bitmap_store_default_path (const char *image_path);

/* What cbw_bitmap_store_open_ex() does when the descriptor does not exist:
 *   0 (none)   ENOENT naming the descriptor: a store that had bitmaps is
 *              never silently replaced by an empty one (lost metadata);
 *   CREATE     a new, empty store whose descriptor is written (crash-
 *              atomically) before open returns, so every later open finds it;
 *   EMPTY_IF_MISSING  an empty store in memory, written at the first save
 *              (tools and tests that make throw-away stores). */
#define CBW_BITMAP_STORE_CREATE 1u
#define CBW_BITMAP_STORE_EMPTY_IF_MISSING 2u

/* Open (and lock) the store.  image_size must match every bitmap's recorded
 * size, else EINVAL naming the bitmap and both sizes.  Validates version,
 * names, granularity, checksums and data-file sizes; any problem is an error
 * naming the file and the problem, and nothing on disk is modified (except a
 * new descriptor with CBW_BITMAP_STORE_CREATE). */
struct cbw_bitmap_store *cbw_bitmap_store_open_ex (const char *descriptor_path,
                                                   uint64_t image_size, unsigned flags,
                                                   struct cbw_err *err);
/* cbw_bitmap_store_open_ex (..., CBW_BITMAP_STORE_EMPTY_IF_MISSING, ...). */
struct cbw_bitmap_store *cbw_bitmap_store_open (const char *descriptor_path,
                                                uint64_t image_size,
                                                struct cbw_err *err);
/* Release the lock and memory (does not save). NULL is a no-op. */
void cbw_bitmap_store_close (struct cbw_bitmap_store *st);

/* Crash-atomic save of every bitmap as it is in memory now, with the states
 * as they are in memory now.  It reads only bits.nbits and bits.words of
 * each bitmap (never the summary), so an owner that keeps the bits elsewhere
 * may point words at them for the duration of a save (the dirtybitmap
 * filter does: plugin/dirtybitmap/tracker.c). */
int cbw_bitmap_store_save (struct cbw_bitmap_store *st, struct cbw_err *err);

/* In-memory edits (call save to persist).  Returned pointers stay valid
 * across add (fixed-capacity array of CBW_BITMAP_MAX_COUNT); remove shifts
 * the later entries down (creation order is kept), so re-find after it.
 * add: EINVAL bad name/granularity, EEXIST name taken, ENOSPC store full;
 * the new bitmap is all clear, state clean, generation 0 (never saved).
 * remove: ENOENT if there is no such bitmap. */
struct cbw_stored_bitmap *cbw_bitmap_store_find (struct cbw_bitmap_store *st,
                                                 const char *name);
struct cbw_stored_bitmap *cbw_bitmap_store_add (struct cbw_bitmap_store *st,
                                                const char *name,
                                                uint64_t granularity,
                                                bool enabled,
                                                struct cbw_err *err);
int cbw_bitmap_store_remove (struct cbw_bitmap_store *st, const char *name,
                             struct cbw_err *err);

/* Validation helpers (also used by the control socket): 0 or -1 + err. */
int cbw_bitmap_name_valid (const char *name, struct cbw_err *err);
int cbw_bitmap_granularity_valid (uint64_t granularity, struct cbw_err *err);

#endif
