/* cbw — plugin/dirtybitmap/livemap.h: the live-bitmap map of the dirtybitmap
 * filter (byte-level spec: docs/formats/bitmaps.md, section "Live-bitmap
 * map"; design: docs/design/dirty-bitmaps.md, "Exact after a process crash").
 *
 * The filter's in-memory (live) bitmaps are kept in a MAP_SHARED mapping of
 * one file beside the descriptor (default DESCRIPTOR.livemap).  A write's bits
 * are set there before the write is passed down; a process crash (kill -9,
 * OOM kill, abort) keeps the page cache, so the file then holds every bit the
 * dead process had set, in-flight writes included.  The header records the
 * boot id, so after a reboot or power loss (where the page cache is gone and
 * the file may hold anything from an old boot) the map is ignored and the
 * region journal is used instead.  It also records which descriptor
 * generation the map belongs to: a map left by an older life of the store
 * (another process saved since) is ignored too.
 *
 * The map is never fsynced: it only has to survive a process crash, and after
 * a reboot it is never trusted.  Creation is crash-atomic all the same (temp
 * file, rename), so a reader sees the old map or the complete new one.
 *
 * Locking: none inside.  The tracker serialises create/close/saving/saved
 * (ckpt_lock, plus bm_lock for moving the live bitmaps) and reads the words
 * under its own rules; dbm_livemap_load() is used before any writer exists.
 */
#ifndef CBW_DBM_LIVEMAP_H
#define CBW_DBM_LIVEMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cbw_err.h"

#define DBM_LIVEMAP_MAGIC "CBWLMAP\0"
#define DBM_LIVEMAP_VERSION 1
#define DBM_LIVEMAP_ALIGN 4096
#define DBM_LIVEMAP_HDR_FIXED 128         /* bytes before the slot table */
#define DBM_LIVEMAP_SLOT_SIZE 160
#define DBM_LIVEMAP_NAME_FIELD 136
#define DBM_LIVEMAP_BOOT_ID_FIELD 40
/* Test hook: when set, replaces /proc/sys/kernel/random/boot_id (a test
 * simulates a reboot by changing it between two opens). */
#define DBM_LIVEMAP_BOOT_ID_ENV "CBW_TEST_BOOT_ID"

/* One bitmap of the map. */
struct dbm_livemap_slot {
  const char *name;
  uint64_t granularity, nbits;
  uint64_t *words;                  /* create: out; load: points into the file */
};

struct dbm_livemap;

/* Read the boot id (NUL-terminated, at most DBM_LIVEMAP_BOOT_ID_FIELD - 1
 * chars) into buf.  0, or -1 + err. */
int dbm_livemap_boot_id (char buf[DBM_LIVEMAP_BOOT_ID_FIELD], struct cbw_err *err);

/* Create the map for n bitmaps (all clear) of an image of image_size
 * bytes, belonging to descriptor generation `generation`, as path.tmp, and
 * map it shared: slots[i].words is set to bitmap i's words in the mapping.
 * The caller fills the words, invalidates the map it replaces, then calls
 * dbm_livemap_publish().  NULL + err on failure (path is then untouched). */
struct dbm_livemap *dbm_livemap_create (const char *path, uint64_t image_size,
                                        uint64_t generation, size_t n,
                                        struct dbm_livemap_slot *slots,
                                        struct cbw_err *err);
/* Publish a created map: rename path.tmp over path. */
int dbm_livemap_publish (struct dbm_livemap *m, struct cbw_err *err);
/* A descriptor save of generation gen is starting / has completed. */
void dbm_livemap_saving (struct dbm_livemap *m, uint64_t gen);
void dbm_livemap_saved (struct dbm_livemap *m, uint64_t gen);
/* Make the map untrustworthy for good (clears the magic in the mapping; a
 * process crash keeps that).  The words stay mapped and usable. */
void dbm_livemap_invalidate (struct dbm_livemap *m);
/* Unmap; with remove, also unlink the file (clean shutdown). NULL: no-op. */
void dbm_livemap_close (struct dbm_livemap *m, bool remove);

/* A loaded map, for recovery. */
struct dbm_livemap_loaded {
  void *base;
  size_t size;
  size_t n;
  struct dbm_livemap_slot *slots;   /* names and words point into base (read-only) */
};
/* Load the map at path and decide whether it may be trusted for a store of
 * descriptor generation store_gen over an image of image_size bytes: every
 * field is validated (magic, version, checksum, sizes against the image and
 * each slot's granularity, boot id, generation).  0 and *out (free with
 * dbm_livemap_unload) if trusted; -1 + err saying why not otherwise (ENOENT:
 * no map; EXDEV: another boot; ESTALE: another generation; EINVAL/EIO:
 * malformed). */
int dbm_livemap_load (const char *path, uint64_t image_size, uint64_t store_gen,
                      struct dbm_livemap_loaded **out, struct cbw_err *err);
void dbm_livemap_unload (struct dbm_livemap_loaded *l);

#endif
