/* cbw — plugin/dirtybitmap/journal.h: the write-ahead region journal of the
 * dirtybitmap filter (byte-level spec: docs/formats/bitmaps.md, section
 * "Write-ahead region journal"; design: docs/design/dirty-bitmaps.md).
 *
 * The journal is a small file (default DESCRIPTOR.journal) holding one bit per
 * coarse region of the image (default 64 MiB).  A set bit means "a write may
 * have reached this region since the last fine checkpoint".  The file holds
 * two fixed-size slots; each update writes the whole region set into the slot
 * not holding the newest state, with a higher sequence number and an XXH64
 * checksum, then fdatasync()s.  A reader takes the valid slot with the highest
 * sequence number, so a torn or lost slot write leaves the previous state.
 *
 * Test hook: CBW_TEST_JOURNAL_SYNC_DELAY_US=N sleeps N µs between writing a
 * slot and its fdatasync, so that power-loss tests often cut inside that
 * window (the write is then in the file but not in the power-loss mirror).
 *
 * Locking: none inside.  A struct dbm_journal is used by one thread at a time
 * (the tracker's journal-writer protocol guarantees it).
 */
#ifndef CBW_DBM_JOURNAL_H
#define CBW_DBM_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cbw_err.h"

#define DBM_JOURNAL_MAGIC "CBWRJNL\0"
#define DBM_JOURNAL_VERSION 1
#define DBM_JOURNAL_HEADER_SIZE 64
#define DBM_JOURNAL_ALIGN 4096
#define DBM_JOURNAL_MAX_BITMAP_BYTES (1u << 20)   /* 8 Mi regions */
#define DBM_REGION_SIZE_MIN (1ULL << 20)          /* 1 MiB */
#define DBM_REGION_SIZE_MAX (1ULL << 40)          /* 1 TiB */
#define DBM_REGION_SIZE_DEFAULT (64ULL << 20)     /* 64 MiB */

/* A decoded journal state. */
struct dbm_journal_state {
  uint64_t seq;
  uint64_t region_size;
  uint64_t image_size;
  uint64_t nregions;
  uint8_t *bits;          /* malloc'd, ceil(nregions / 8) bytes, LSB first */
};

/* Bytes of one slot for nregions regions (multiple of DBM_JOURNAL_ALIGN). */
size_t dbm_journal_slot_size (uint64_t nregions);
/* Number of regions of an image, or 0 if the parameters are invalid
 * (region size not a power of two in range, too many regions). */
uint64_t dbm_journal_nregions (uint64_t image_size, uint64_t region_size);

/* Encode one slot into buf (slot_size bytes, zero padded). */
void dbm_journal_encode_slot (void *buf, size_t slot_size, uint64_t seq,
                              uint64_t region_size, uint64_t image_size,
                              uint64_t nregions, const uint8_t *bits);
/* Decode one slot; 0 and *out filled (out->bits malloc'd), or -1 with *err
 * saying what is wrong (EIO for corrupt data).  what names it in messages. */
int dbm_journal_decode_slot (const void *buf, size_t slot_size,
                             struct dbm_journal_state *out, const char *what,
                             struct cbw_err *err);

/* Read a journal file: the valid slot with the highest sequence number.
 * ENOENT if missing; EIO if truncated or no slot is valid. */
int dbm_journal_read (const char *path, struct dbm_journal_state *out,
                      struct cbw_err *err);
void dbm_journal_state_free (struct dbm_journal_state *s);

struct dbm_journal;

/* Create (crash-atomically replace) the journal at path with an empty region
 * set in both slots and open it for updates. */
struct dbm_journal *dbm_journal_create (const char *path, uint64_t image_size,
                                        uint64_t region_size,
                                        struct cbw_err *err);
/* Durably replace the region set: write the older slot, fdatasync.  bits is
 * ceil(nregions/8) bytes.  On failure the file holds the old or new set. */
int dbm_journal_write (struct dbm_journal *j, const uint8_t *bits,
                       struct cbw_err *err);
uint64_t dbm_journal_get_nregions (const struct dbm_journal *j);
uint64_t dbm_journal_get_seq (const struct dbm_journal *j);
const char *dbm_journal_path (const struct dbm_journal *j);
void dbm_journal_close (struct dbm_journal *j);

#endif
