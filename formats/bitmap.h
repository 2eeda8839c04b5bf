/* cbw — formats/bitmap.h: in-memory bitmaps (one bit per granule).
 *
 * Used for dirty bitmaps (dirtybitmap filter), "needs copy"/"copied" maps
 * (cbw filter), overlay allocation maps (chain plugin) and cbwd's
 * qemu:dirty-bitmap contexts.  Bits are indexed from 0; the library knows
 * nothing about bytes or granularity (callers convert).
 *
 * Layout: a flat array of 64-bit words plus a summary level with one bit per
 * word ("this word may be non-zero"), so scans over sparse maps skip 4096
 * bits per summary word, and dense scans use ctz on whole words.  The
 * summary is conservative for the lock-free setters: a summary bit may be set
 * while its word is zero, never the other way round.
 *
 * Locking: none inside.  All functions may be called concurrently only if the
 * caller serialises them, EXCEPT cbw_bitmap_set_range_atomic() and
 * cbw_bitmap_test() which may run concurrently with each other (atomic OR on
 * words; used on the write hot path).  Serialisation is little-endian, bit i
 * of the map is bit (i % 8) of byte (i / 8).
 */
#ifndef CBW_BITMAP_H
#define CBW_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cbw_bitmap {
  uint64_t nbits;
  uint64_t nwords;        /* ceil(nbits / 64) */
  uint64_t *words;
  uint64_t *summary;      /* ceil(nwords / 64) words */
  bool external_words;    /* words belong to the caller (e.g. a file
                           * mapping): free/resize leave them alone */
};

/* Initialise an all-clear map of nbits bits.  0, or -1 with errno (ENOMEM,
 * EOVERFLOW if nbits is absurd). */
int cbw_bitmap_init (struct cbw_bitmap *bm, uint64_t nbits);
void cbw_bitmap_free (struct cbw_bitmap *bm);
/* Resize keeping existing bits (new bits clear). 0 or -1/errno. */
int cbw_bitmap_resize (struct cbw_bitmap *bm, uint64_t nbits);
/* dst is treated as uninitialised: it is initialised to a copy of src
 * (free it first if it held a map). 0 or -1/errno. */
int cbw_bitmap_copy (struct cbw_bitmap *dst, const struct cbw_bitmap *src);

/* Move the bits into caller-owned memory of nwords words (e.g. a MAP_SHARED
 * file mapping): copies the current words there, releases the map's own
 * words (if it owned them) and uses words from now on; cbw_bitmap_free() then
 * frees only the summary.  May be called again to move to other memory.  The
 * caller serialises it with every other use of bm, and keeps words valid
 * until the map is freed or moved again. */
void cbw_bitmap_use_external_words (struct cbw_bitmap *bm, uint64_t *words);

/* Ranges are [start, start+count); ranges past nbits are clipped. */
void cbw_bitmap_set_range (struct cbw_bitmap *bm, uint64_t start, uint64_t count);
void cbw_bitmap_set_range_atomic (struct cbw_bitmap *bm, uint64_t start, uint64_t count);
void cbw_bitmap_clear_range (struct cbw_bitmap *bm, uint64_t start, uint64_t count);
void cbw_bitmap_clear_all (struct cbw_bitmap *bm);
bool cbw_bitmap_test (const struct cbw_bitmap *bm, uint64_t bit);
bool cbw_bitmap_any_in_range (const struct cbw_bitmap *bm, uint64_t start, uint64_t count);
bool cbw_bitmap_all_in_range (const struct cbw_bitmap *bm, uint64_t start, uint64_t count);

uint64_t cbw_bitmap_count (const struct cbw_bitmap *bm);
uint64_t cbw_bitmap_count_range (const struct cbw_bitmap *bm, uint64_t start, uint64_t count);

/* First set / clear bit >= from, or UINT64_MAX if none. */
uint64_t cbw_bitmap_next_set (const struct cbw_bitmap *bm, uint64_t from);
uint64_t cbw_bitmap_next_clear (const struct cbw_bitmap *bm, uint64_t from);

/* Next run of set bits starting at or after from: returns true and fills
 * *start, *count, or false if there is none. */
bool cbw_bitmap_next_extent (const struct cbw_bitmap *bm, uint64_t from,
                             uint64_t *start, uint64_t *count);

/* dst |= src; dst &= ~src.  -1/EINVAL if sizes differ. */
int cbw_bitmap_or (struct cbw_bitmap *dst, const struct cbw_bitmap *src);
int cbw_bitmap_andnot (struct cbw_bitmap *dst, const struct cbw_bitmap *src);

/* Serialised size in bytes: ceil(nbits / 8). */
uint64_t cbw_bitmap_serialized_size (const struct cbw_bitmap *bm);
void cbw_bitmap_serialize (const struct cbw_bitmap *bm, void *buf);
/* buf must hold exactly cbw_bitmap_serialized_size() bytes of a map of
 * bm->nbits bits; padding bits past nbits in the last byte must be zero
 * (else -1/EINVAL).  Recomputes the summary. */
int cbw_bitmap_deserialize (struct cbw_bitmap *bm, const void *buf, uint64_t len);
/* The same without a second buffer: the caller has placed the serialised
 * bytes (cbw_bitmap_serialized_size() of them) at the start of bm->words,
 * e.g. with read(), the rest of the last word being zero as left by init.
 * Converts byte order if needed, checks padding bits (-1/EINVAL; the map's
 * contents are then unspecified) and recomputes the summary. */
int cbw_bitmap_deserialize_in_place (struct cbw_bitmap *bm);

#endif
