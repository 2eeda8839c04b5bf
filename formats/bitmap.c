/* cbw — formats/bitmap.c: the in-memory bitmap of formats/bitmap.h.
 *
 * Two levels: words[] holds the bits (bit i is bit i%64 of words[i/64]) and
 * summary[] holds one bit per word, set when the word may be non-zero.  Scans
 * for set bits walk the summary with ctz, so an empty stretch of 4096 bits
 * costs one load; dense scans use ctz/popcount on whole words.
 *
 * Invariants kept by every function:
 *  - bits of the last word at positions >= nbits are zero (so scans and
 *    counts never need to clip inside a word, and serialisation is exact);
 *  - words[w] != 0 implies summary bit w is set.  Serialised (non-atomic)
 *    functions keep the summary exact; cbw_bitmap_set_range_atomic() sets the
 *    summary bit before the word bit, so a concurrent setter never leaves a
 *    non-zero word with a clear summary bit.
 *
 * Locking: none.  The caller serialises all calls, except that
 * cbw_bitmap_set_range_atomic() and cbw_bitmap_test() may run concurrently
 * with each other (they use __atomic builtins on words and summary).
 */
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "bitmap.h"

/* Refuse maps whose word array alone would exceed 2^55 bytes: such a
 * request is a unit confusion, not a real image. */
#define CBW_BITMAP_MAX_BITS (1ULL << 58)

static inline uint64_t
div_up64 (uint64_t n)
{
  return n / 64 + (n % 64 != 0);
}

static inline uint64_t
bit_mask_from (unsigned b)           /* bits b..63 */
{
  return ~0ULL << b;
}

static inline uint64_t
bit_mask_below (unsigned b)          /* bits 0..b-1, b in 1..64 */
{
  return b >= 64 ? ~0ULL : (1ULL << b) - 1;
}

/* Clip [start, start+count) to [0, limit); returns false if empty. */
static inline bool
clip (uint64_t limit, uint64_t start, uint64_t count, uint64_t *end)
{
  if (start >= limit || count == 0)
    return false;
  *end = count > limit - start ? limit : start + count;
  return true;
}

/* Set / clear bits [s, e) (s < e) in an array of words. */
static void
array_set (uint64_t *a, uint64_t s, uint64_t e)
{
  uint64_t ws = s / 64, we = (e - 1) / 64;
  uint64_t ms = bit_mask_from (s % 64), me = bit_mask_below ((unsigned) ((e - 1) % 64) + 1);

  if (ws == we) {
    a[ws] |= ms & me;
    return;
  }
  a[ws] |= ms;
  if (we > ws + 1)
    memset (&a[ws + 1], 0xff, (we - ws - 1) * sizeof (uint64_t));
  a[we] |= me;
}

static void
array_clear (uint64_t *a, uint64_t s, uint64_t e)
{
  uint64_t ws = s / 64, we = (e - 1) / 64;
  uint64_t ms = bit_mask_from (s % 64), me = bit_mask_below ((unsigned) ((e - 1) % 64) + 1);

  if (ws == we) {
    a[ws] &= ~(ms & me);
    return;
  }
  a[ws] &= ~ms;
  if (we > ws + 1)
    memset (&a[ws + 1], 0, (we - ws - 1) * sizeof (uint64_t));
  a[we] &= ~me;
}

static inline void
summary_fix (struct cbw_bitmap *bm, uint64_t w)
{
  if (bm->words[w])
    bm->summary[w / 64] |= 1ULL << (w % 64);
  else
    bm->summary[w / 64] &= ~(1ULL << (w % 64));
}

static void
summary_rebuild (struct cbw_bitmap *bm)
{
  uint64_t nsum = div_up64 (bm->nwords);

  memset (bm->summary, 0, (nsum ? nsum : 1) * sizeof (uint64_t));
  for (uint64_t w = 0; w < bm->nwords; w++)
    if (bm->words[w])
      bm->summary[w / 64] |= 1ULL << (w % 64);
}

/* Large maps (16 TiB at 64 KiB is 32 MiB of words) are touched in full by
 * load and by dense writes: ask for transparent huge pages so that this
 * costs tens of page faults, not thousands.  Advice only; calloc's memory
 * is still zero and freeable with free(). */
#define HUGE_ADVICE_MIN (4u << 20)
#define HUGE_PAGE (2u << 20)

static void
advise_huge (void *p, size_t len)
{
#ifdef MADV_HUGEPAGE
  uintptr_t s = ((uintptr_t) p + HUGE_PAGE - 1) & ~(uintptr_t) (HUGE_PAGE - 1);
  uintptr_t e = ((uintptr_t) p + len) & ~(uintptr_t) (HUGE_PAGE - 1);
  if (len >= HUGE_ADVICE_MIN && e > s)
    madvise ((void *) s, e - s, MADV_HUGEPAGE);   /* failure is harmless */
#else
  (void) p; (void) len;
#endif
}

/* Allocate zeroed arrays for nbits; does not touch *bm on failure. */
static int
alloc_arrays (uint64_t nbits, uint64_t **words, uint64_t **summary)
{
  uint64_t nwords, nsum;

  if (nbits > CBW_BITMAP_MAX_BITS) {
    errno = EOVERFLOW;
    return -1;
  }
  nwords = div_up64 (nbits);
  nsum = div_up64 (nwords);
  /* Always allocate at least one word so the pointers are never NULL. */
  *words = calloc (nwords ? nwords : 1, sizeof (uint64_t));
  *summary = calloc (nsum ? nsum : 1, sizeof (uint64_t));
  if (*words == NULL || *summary == NULL) {
    free (*words);
    free (*summary);
    *words = *summary = NULL;
    errno = ENOMEM;
    return -1;
  }
  advise_huge (*words, nwords * sizeof (uint64_t));
  return 0;
}

int
cbw_bitmap_init (struct cbw_bitmap *bm, uint64_t nbits)
{
  uint64_t *words, *summary;

  if (alloc_arrays (nbits, &words, &summary) < 0)
    return -1;
  bm->nbits = nbits;
  bm->nwords = div_up64 (nbits);
  bm->words = words;
  bm->summary = summary;
  bm->external_words = false;
  return 0;
}

void
cbw_bitmap_free (struct cbw_bitmap *bm)
{
  if (bm == NULL)
    return;
  if (!bm->external_words)
    free (bm->words);
  free (bm->summary);
  bm->words = bm->summary = NULL;
  bm->nbits = bm->nwords = 0;
  bm->external_words = false;
}

int
cbw_bitmap_resize (struct cbw_bitmap *bm, uint64_t nbits)
{
  uint64_t *words, *summary, keep;
  struct cbw_bitmap n;

  if (alloc_arrays (nbits, &words, &summary) < 0)
    return -1;
  n.nbits = nbits;
  n.nwords = div_up64 (nbits);
  n.words = words;
  n.summary = summary;
  n.external_words = false;
  keep = n.nwords < bm->nwords ? n.nwords : bm->nwords;
  if (keep)
    memcpy (n.words, bm->words, keep * sizeof (uint64_t));
  if (nbits % 64 && n.nwords <= bm->nwords)
    n.words[n.nwords - 1] &= bit_mask_below (nbits % 64);
  summary_rebuild (&n);
  if (!bm->external_words)
    free (bm->words);
  free (bm->summary);
  *bm = n;
  return 0;
}

int
cbw_bitmap_copy (struct cbw_bitmap *dst, const struct cbw_bitmap *src)
{
  if (cbw_bitmap_init (dst, src->nbits) < 0)
    return -1;
  if (src->nwords) {
    memcpy (dst->words, src->words, src->nwords * sizeof (uint64_t));
    memcpy (dst->summary, src->summary, div_up64 (src->nwords) * sizeof (uint64_t));
  }
  return 0;
}

void
cbw_bitmap_use_external_words (struct cbw_bitmap *bm, uint64_t *words)
{
  if (bm->words == words)
    return;
  if (bm->nwords)
    memcpy (words, bm->words, bm->nwords * sizeof (uint64_t));
  if (!bm->external_words)
    free (bm->words);
  bm->words = words;
  bm->external_words = true;
}

void
cbw_bitmap_set_range (struct cbw_bitmap *bm, uint64_t start, uint64_t count)
{
  uint64_t end;

  if (!clip (bm->nbits, start, count, &end))
    return;
  array_set (bm->words, start, end);
  array_set (bm->summary, start / 64, (end - 1) / 64 + 1);
}

void
cbw_bitmap_set_range_atomic (struct cbw_bitmap *bm, uint64_t start, uint64_t count)
{
  uint64_t end, w, we;

  if (!clip (bm->nbits, start, count, &end))
    return;
  we = (end - 1) / 64;
  for (w = start / 64; w <= we; w++) {
    uint64_t m = ~0ULL;
    uint64_t sbit = 1ULL << (w % 64);

    if (w == start / 64) m &= bit_mask_from (start % 64);
    if (w == we) m &= bit_mask_below ((unsigned) ((end - 1) % 64) + 1);
    /* Fast path (already dirty): no store, no cache-line ownership. */
    if ((__atomic_load_n (&bm->words[w], __ATOMIC_RELAXED) & m) == m)
      continue;
    /* Summary first: a non-zero word must never be seen with its summary
     * bit clear. */
    if (!(__atomic_load_n (&bm->summary[w / 64], __ATOMIC_RELAXED) & sbit))
      __atomic_fetch_or (&bm->summary[w / 64], sbit, __ATOMIC_RELEASE);
    __atomic_fetch_or (&bm->words[w], m, __ATOMIC_RELEASE);
  }
}

void
cbw_bitmap_clear_range (struct cbw_bitmap *bm, uint64_t start, uint64_t count)
{
  uint64_t end, ws, we;

  if (!clip (bm->nbits, start, count, &end))
    return;
  array_clear (bm->words, start, end);
  ws = start / 64;
  we = (end - 1) / 64;
  /* Interior words are now zero; the two edge words may not be. */
  array_clear (bm->summary, ws, we + 1);
  summary_fix (bm, ws);
  summary_fix (bm, we);
}

void
cbw_bitmap_clear_all (struct cbw_bitmap *bm)
{
  if (bm->nwords == 0)
    return;
  memset (bm->words, 0, bm->nwords * sizeof (uint64_t));
  memset (bm->summary, 0, div_up64 (bm->nwords) * sizeof (uint64_t));
}

bool
cbw_bitmap_test (const struct cbw_bitmap *bm, uint64_t bit)
{
  if (bit >= bm->nbits)
    return false;
  return (__atomic_load_n (&bm->words[bit / 64], __ATOMIC_ACQUIRE) >> (bit % 64)) & 1;
}

/* Index of the first word >= w whose summary bit is set, or nwords. */
static inline uint64_t
next_marked_word (const struct cbw_bitmap *bm, uint64_t w)
{
  uint64_t nsum = div_up64 (bm->nwords);
  uint64_t sw = w / 64;

  if (w >= bm->nwords)
    return bm->nwords;
  uint64_t s = bm->summary[sw] & bit_mask_from (w % 64);
  for (;;) {
    if (s) {
      uint64_t r = sw * 64 + (uint64_t) __builtin_ctzll (s);
      return r < bm->nwords ? r : bm->nwords;
    }
    if (++sw >= nsum)
      return bm->nwords;
    s = bm->summary[sw];
  }
}

uint64_t
cbw_bitmap_next_set (const struct cbw_bitmap *bm, uint64_t from)
{
  uint64_t w, x;

  if (from >= bm->nbits)
    return UINT64_MAX;
  w = from / 64;
  x = bm->words[w] & bit_mask_from (from % 64);
  while (x == 0) {
    w = next_marked_word (bm, w + 1);
    if (w >= bm->nwords)
      return UINT64_MAX;
    x = bm->words[w];       /* may be 0 if the summary is conservative */
  }
  return w * 64 + (uint64_t) __builtin_ctzll (x);
}

uint64_t
cbw_bitmap_next_clear (const struct cbw_bitmap *bm, uint64_t from)
{
  uint64_t w, x, r;

  if (from >= bm->nbits)
    return UINT64_MAX;
  w = from / 64;
  x = ~bm->words[w] & bit_mask_from (from % 64);
  while (x == 0) {
    if (++w >= bm->nwords)
      return UINT64_MAX;
    /* An unmarked word is zero, so its first bit is clear. */
    if (!((bm->summary[w / 64] >> (w % 64)) & 1))
      return w * 64;
    x = ~bm->words[w];
  }
  r = w * 64 + (uint64_t) __builtin_ctzll (x);
  return r < bm->nbits ? r : UINT64_MAX;
}

bool
cbw_bitmap_next_extent (const struct cbw_bitmap *bm, uint64_t from,
                        uint64_t *start, uint64_t *count)
{
  uint64_t s = cbw_bitmap_next_set (bm, from), e;

  if (s == UINT64_MAX)
    return false;
  e = cbw_bitmap_next_clear (bm, s);
  if (e == UINT64_MAX)
    e = bm->nbits;
  *start = s;
  *count = e - s;
  return true;
}

bool
cbw_bitmap_any_in_range (const struct cbw_bitmap *bm, uint64_t start, uint64_t count)
{
  uint64_t end;

  if (!clip (bm->nbits, start, count, &end))
    return false;
  return cbw_bitmap_next_set (bm, start) < end;
}

bool
cbw_bitmap_all_in_range (const struct cbw_bitmap *bm, uint64_t start, uint64_t count)
{
  uint64_t end;

  if (!clip (bm->nbits, start, count, &end))
    return true;                /* vacuously: no bit of the range exists */
  return cbw_bitmap_next_clear (bm, start) >= end;
}

uint64_t
cbw_bitmap_count (const struct cbw_bitmap *bm)
{
  uint64_t n = 0, nsum = div_up64 (bm->nwords);

  for (uint64_t sw = 0; sw < nsum; sw++) {
    uint64_t s = bm->summary[sw];
    while (s) {
      uint64_t w = sw * 64 + (uint64_t) __builtin_ctzll (s);
      s &= s - 1;
      n += (uint64_t) __builtin_popcountll (bm->words[w]);
    }
  }
  return n;
}

uint64_t
cbw_bitmap_count_range (const struct cbw_bitmap *bm, uint64_t start, uint64_t count)
{
  uint64_t end, ws, we, n = 0;

  if (!clip (bm->nbits, start, count, &end))
    return 0;
  ws = start / 64;
  we = (end - 1) / 64;
  if (ws == we)
    return (uint64_t) __builtin_popcountll (bm->words[ws] & bit_mask_from (start % 64)
                                            & bit_mask_below ((unsigned) ((end - 1) % 64) + 1));
  n += (uint64_t) __builtin_popcountll (bm->words[ws] & bit_mask_from (start % 64));
  for (uint64_t w = next_marked_word (bm, ws + 1); w < we; w = next_marked_word (bm, w + 1))
    n += (uint64_t) __builtin_popcountll (bm->words[w]);
  n += (uint64_t) __builtin_popcountll (bm->words[we]
                                        & bit_mask_below ((unsigned) ((end - 1) % 64) + 1));
  return n;
}

int
cbw_bitmap_or (struct cbw_bitmap *dst, const struct cbw_bitmap *src)
{
  if (dst->nbits != src->nbits) {
    errno = EINVAL;
    return -1;
  }
  for (uint64_t w = next_marked_word (src, 0); w < src->nwords;
       w = next_marked_word (src, w + 1)) {
    if (src->words[w]) {
      dst->words[w] |= src->words[w];
      dst->summary[w / 64] |= 1ULL << (w % 64);
    }
  }
  return 0;
}

int
cbw_bitmap_andnot (struct cbw_bitmap *dst, const struct cbw_bitmap *src)
{
  if (dst->nbits != src->nbits) {
    errno = EINVAL;
    return -1;
  }
  for (uint64_t w = next_marked_word (dst, 0); w < dst->nwords;
       w = next_marked_word (dst, w + 1)) {
    dst->words[w] &= ~src->words[w];
    summary_fix (dst, w);
  }
  return 0;
}

uint64_t
cbw_bitmap_serialized_size (const struct cbw_bitmap *bm)
{
  return bm->nbits / 8 + (bm->nbits % 8 != 0);
}

void
cbw_bitmap_serialize (const struct cbw_bitmap *bm, void *buf)
{
  uint64_t len = cbw_bitmap_serialized_size (bm), full = len / 8;
  unsigned char *p = buf;

#if __BYTE_ORDER == __LITTLE_ENDIAN
  memcpy (p, bm->words, full * 8);
#else
  for (uint64_t w = 0; w < full; w++) {
    uint64_t le = htole64 (bm->words[w]);
    memcpy (p + w * 8, &le, 8);
  }
#endif
  if (len % 8) {
    uint64_t le = htole64 (bm->words[full]);
    memcpy (p + full * 8, &le, len % 8);
  }
}

int
cbw_bitmap_deserialize_in_place (struct cbw_bitmap *bm)
{
#if __BYTE_ORDER != __LITTLE_ENDIAN
  for (uint64_t w = 0; w < bm->nwords; w++)
    bm->words[w] = le64toh (bm->words[w]);
#endif
  /* Padding bits of the last byte, and any byte past len in the last word. */
  if (bm->nbits % 64 && (bm->words[bm->nwords - 1] >> (bm->nbits % 64)) != 0) {
    errno = EINVAL;
    return -1;
  }
  summary_rebuild (bm);
  return 0;
}

int
cbw_bitmap_deserialize (struct cbw_bitmap *bm, const void *buf, uint64_t len)
{
  const unsigned char *p = buf;
  uint64_t full = len / 8;

  if (len != cbw_bitmap_serialized_size (bm)) {
    errno = EINVAL;
    return -1;
  }
  /* Padding bits past nbits in the last byte must be zero. */
  if (bm->nbits % 8 && (p[len - 1] >> (bm->nbits % 8)) != 0) {
    errno = EINVAL;
    return -1;
  }
#if __BYTE_ORDER == __LITTLE_ENDIAN
  if (full)
    memcpy (bm->words, p, full * 8);
#else
  for (uint64_t w = 0; w < full; w++) {
    uint64_t le;
    memcpy (&le, p + w * 8, 8);
    bm->words[w] = le64toh (le);
  }
#endif
  if (len % 8) {
    uint64_t le = 0;
    memcpy (&le, p + full * 8, len % 8);
    bm->words[full] = le64toh (le);
  }
  summary_rebuild (bm);
  return 0;
}
