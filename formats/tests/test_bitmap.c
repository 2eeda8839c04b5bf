/* cbw — formats/tests/test_bitmap.c: cbw_bitmap against a naive model.
 *
 * The model is one bool per bit; every operation of bitmap.h is applied to
 * both on random data (many seeds, sizes around word and summary-word
 * boundaries, sparse and dense fills) and every query is compared with the
 * model's answer computed by brute force.  White-box checks also verify the
 * two structural invariants (no bits past nbits, non-zero word => summary
 * bit).  Single-threaded except the atomic-setter test.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"

static const uint64_t sizes[] = {
  0, 1, 2, 7, 8, 9, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097, 8191, 8193,
  64 * 4096 - 1, 64 * 4096, 64 * 4096 + 1, 262144 + 13,
};
#define NSIZES (sizeof sizes / sizeof sizes[0])

/* splitmix64: deterministic per seed. */
static uint64_t rng_state;
static uint64_t
rnd (void)
{
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
static uint64_t
rnd_below (uint64_t n)
{
  return n ? rnd () % n : 0;
}

struct model {
  uint64_t nbits;
  bool *b;
};

static void
model_init (struct model *m, uint64_t nbits)
{
  m->nbits = nbits;
  m->b = calloc (nbits + 1, 1);
  cr_assert_not_null (m->b);
}

static uint64_t
model_end (const struct model *m, uint64_t start, uint64_t count)
{
  if (start >= m->nbits) return start;
  return count > m->nbits - start ? m->nbits : start + count;
}

static void
model_fill (struct model *m, uint64_t start, uint64_t count, bool v)
{
  for (uint64_t i = start; i < model_end (m, start, count); i++)
    m->b[i] = v;
}

static uint64_t
model_next (const struct model *m, uint64_t from, bool v)
{
  for (uint64_t i = from; i < m->nbits; i++)
    if (m->b[i] == v) return i;
  return UINT64_MAX;
}

static uint64_t
model_count (const struct model *m, uint64_t start, uint64_t count)
{
  uint64_t n = 0;
  for (uint64_t i = start; i < model_end (m, start, count); i++)
    n += m->b[i];
  return n;
}

/* A random range biased towards interesting shapes. */
static void
rnd_range (uint64_t nbits, bool big, uint64_t *start, uint64_t *count)
{
  uint64_t lim = nbits + 70;
  switch (rnd_below (8)) {
  case 0: *start = rnd_below (lim); *count = UINT64_MAX - rnd_below (3); break;
  case 1: *start = rnd_below (lim) & ~63ULL; *count = 64 * (1 + rnd_below (4)); break;
  case 2: *start = rnd_below (lim); *count = 0; break;
  case 3: *start = rnd_below (lim) & ~4095ULL; *count = 4096 * (1 + rnd_below (2)); break;
  default:
    *start = rnd_below (lim);
    *count = big ? rnd_below (nbits / 4 + 2) : rnd_below (130);
  }
}

static void
check_invariants (const struct cbw_bitmap *bm)
{
  cr_assert_eq (bm->nwords, bm->nbits / 64 + (bm->nbits % 64 != 0));
  if (bm->nbits % 64)
    cr_assert_eq (bm->words[bm->nwords - 1] >> (bm->nbits % 64), 0,
                  "bits past nbits set (nbits=%lu)", (unsigned long) bm->nbits);
  for (uint64_t w = 0; w < bm->nwords; w++)
    if (bm->words[w])
      cr_assert ((bm->summary[w / 64] >> (w % 64)) & 1,
                 "word %lu non-zero but summary bit clear", (unsigned long) w);
}

/* Full comparison: walks the map with next_set/next_clear/next_extent and
 * compares every bit and the count. */
static void
check_full (const struct cbw_bitmap *bm, const struct model *m)
{
  uint64_t i, pos, s, c, n = 0;

  cr_assert_eq (bm->nbits, m->nbits);
  check_invariants (bm);
  for (i = 0; i < m->nbits; i++) {
    cr_assert_eq (cbw_bitmap_test (bm, i), m->b[i], "bit %lu of %lu",
                  (unsigned long) i, (unsigned long) m->nbits);
    n += m->b[i];
  }
  cr_assert (!cbw_bitmap_test (bm, m->nbits));
  cr_assert (!cbw_bitmap_test (bm, UINT64_MAX));
  cr_assert_eq (cbw_bitmap_count (bm), n);
  /* Extent walk reproduces the model exactly. */
  pos = 0;
  i = 0;
  while (cbw_bitmap_next_extent (bm, pos, &s, &c)) {
    cr_assert_gt (c, 0);
    cr_assert_eq (s, model_next (m, pos, true));
    cr_assert_eq (s + c, m->nbits > s ? (model_next (m, s, false) == UINT64_MAX
                                          ? m->nbits : model_next (m, s, false)) : s);
    i += c;
    pos = s + c;
  }
  cr_assert_eq (model_next (m, pos, true), UINT64_MAX);
  cr_assert_eq (i, n);
}

static void
check_queries (const struct cbw_bitmap *bm, const struct model *m, int nq)
{
  for (int q = 0; q < nq; q++) {
    uint64_t start, count, from = rnd_below (m->nbits + 3);
    rnd_range (m->nbits, rnd () & 1, &start, &count);
    cr_assert_eq (cbw_bitmap_next_set (bm, from), model_next (m, from, true),
                  "next_set(%lu) nbits %lu", (unsigned long) from, (unsigned long) m->nbits);
    cr_assert_eq (cbw_bitmap_next_clear (bm, from), model_next (m, from, false),
                  "next_clear(%lu) nbits %lu", (unsigned long) from, (unsigned long) m->nbits);
    uint64_t end = model_end (m, start, count);
    uint64_t cnt = model_count (m, start, count);
    cr_assert_eq (cbw_bitmap_count_range (bm, start, count), cnt,
                  "count_range(%lu,%lu)", (unsigned long) start, (unsigned long) count);
    cr_assert_eq (cbw_bitmap_any_in_range (bm, start, count), cnt > 0);
    cr_assert_eq (cbw_bitmap_all_in_range (bm, start, count),
                  cnt == (end > start ? end - start : 0));
  }
}

/* Random mutation on both; density in percent steers set vs clear. */
static void
mutate (struct cbw_bitmap *bm, struct model *m, int density)
{
  uint64_t start, count;
  unsigned op = (unsigned) rnd_below (100);
  bool big = rnd_below (4) == 0;

  rnd_range (m->nbits, big, &start, &count);
  if (op < 1) {
    cbw_bitmap_clear_all (bm);
    model_fill (m, 0, UINT64_MAX, false);
  }
  else if ((int) op < density) {
    if (rnd () & 1) cbw_bitmap_set_range (bm, start, count);
    else cbw_bitmap_set_range_atomic (bm, start, count);
    model_fill (m, start, count, true);
  }
  else {
    cbw_bitmap_clear_range (bm, start, count);
    model_fill (m, start, count, false);
  }
}

static void
run_random (int density, int seeds, int ops)
{
  for (size_t si = 0; si < NSIZES; si++) {
    for (int seed = 0; seed < seeds; seed++) {
      struct cbw_bitmap bm;
      struct model m;

      rng_state = (uint64_t) seed * 1000003 + si * 7919 + (uint64_t) density;
      cr_assert_eq (cbw_bitmap_init (&bm, sizes[si]), 0);
      model_init (&m, sizes[si]);
      check_full (&bm, &m);
      for (int i = 0; i < ops; i++) {
        mutate (&bm, &m, density);
        check_queries (&bm, &m, 3);
      }
      check_full (&bm, &m);
      cbw_bitmap_free (&bm);
      free (m.b);
    }
  }
}

Test (bitmap, random_sparse) { run_random (20, 6, 60); }
Test (bitmap, random_balanced) { run_random (55, 6, 60); }
Test (bitmap, random_dense) { run_random (90, 6, 60); }

Test (bitmap, single_bits_sparse)
{
  /* Very sparse: isolated bits far apart, the summary-skip path. */
  for (int seed = 0; seed < 20; seed++) {
    struct cbw_bitmap bm;
    struct model m;
    uint64_t nbits = 262144 + 13 + (uint64_t) seed * 4096;

    rng_state = (uint64_t) seed + 17;
    cr_assert_eq (cbw_bitmap_init (&bm, nbits), 0);
    model_init (&m, nbits);
    for (int k = 0; k < 1 + seed % 5; k++) {
      uint64_t b = rnd_below (nbits);
      cbw_bitmap_set_range (&bm, b, 1);
      m.b[b] = true;
    }
    if (seed % 3 == 0) {        /* the very last bit */
      cbw_bitmap_set_range (&bm, nbits - 1, 1);
      m.b[nbits - 1] = true;
    }
    check_full (&bm, &m);
    check_queries (&bm, &m, 50);
    cbw_bitmap_free (&bm);
    free (m.b);
  }
}

Test (bitmap, or_andnot)
{
  for (size_t si = 0; si < NSIZES; si++) {
    for (int seed = 0; seed < 4; seed++) {
      struct cbw_bitmap a, b, c;
      struct model ma, mb;

      rng_state = (uint64_t) seed * 31 + si;
      cr_assert_eq (cbw_bitmap_init (&a, sizes[si]), 0);
      cr_assert_eq (cbw_bitmap_init (&b, sizes[si]), 0);
      model_init (&ma, sizes[si]);
      model_init (&mb, sizes[si]);
      for (int i = 0; i < 20; i++) {
        mutate (&a, &ma, 50);
        mutate (&b, &mb, 50);
      }
      cr_assert_eq (cbw_bitmap_copy (&c, &a), 0);
      check_full (&c, &ma);
      cr_assert_eq (cbw_bitmap_or (&a, &b), 0);
      for (uint64_t i = 0; i < ma.nbits; i++) ma.b[i] = ma.b[i] || mb.b[i];
      check_full (&a, &ma);
      check_full (&b, &mb);
      cr_assert_eq (cbw_bitmap_andnot (&a, &b), 0);
      for (uint64_t i = 0; i < ma.nbits; i++) ma.b[i] = ma.b[i] && !mb.b[i];
      check_full (&a, &ma);
      check_queries (&a, &ma, 10);
      /* c is an independent copy: untouched by the ops on a. */
      cbw_bitmap_andnot (&c, &c);
      cr_assert_eq (cbw_bitmap_count (&c), 0);
      check_invariants (&c);
      cbw_bitmap_free (&a);
      cbw_bitmap_free (&b);
      cbw_bitmap_free (&c);
      free (ma.b);
      free (mb.b);
    }
  }
}

Test (bitmap, or_andnot_size_mismatch)
{
  struct cbw_bitmap a, b;
  cr_assert_eq (cbw_bitmap_init (&a, 100), 0);
  cr_assert_eq (cbw_bitmap_init (&b, 101), 0);
  errno = 0;
  cr_assert_eq (cbw_bitmap_or (&a, &b), -1);
  cr_assert_eq (errno, EINVAL);
  errno = 0;
  cr_assert_eq (cbw_bitmap_andnot (&a, &b), -1);
  cr_assert_eq (errno, EINVAL);
  cbw_bitmap_free (&a);
  cbw_bitmap_free (&b);
}

Test (bitmap, resize)
{
  for (size_t si = 0; si < NSIZES; si++) {
    for (size_t sj = 0; sj < NSIZES; sj += 1 + si % 3) {
      struct cbw_bitmap bm;
      struct model m, m2;

      rng_state = si * 100 + sj;
      cr_assert_eq (cbw_bitmap_init (&bm, sizes[si]), 0);
      model_init (&m, sizes[si]);
      for (int i = 0; i < 10; i++) mutate (&bm, &m, 70);
      cr_assert_eq (cbw_bitmap_resize (&bm, sizes[sj]), 0);
      model_init (&m2, sizes[sj]);
      for (uint64_t i = 0; i < m2.nbits && i < m.nbits; i++) m2.b[i] = m.b[i];
      check_full (&bm, &m2);
      /* Growing again after a shrink must not resurrect dropped bits. */
      cr_assert_eq (cbw_bitmap_resize (&bm, sizes[sj] + 100), 0);
      free (m.b);
      model_init (&m, sizes[sj] + 100);
      for (uint64_t i = 0; i < m2.nbits; i++) m.b[i] = m2.b[i];
      check_full (&bm, &m);
      cbw_bitmap_free (&bm);
      free (m.b);
      free (m2.b);
    }
  }
}

Test (bitmap, serialize_round_trip)
{
  for (size_t si = 0; si < NSIZES; si++) {
    for (int seed = 0; seed < 4; seed++) {
      struct cbw_bitmap bm, bm2;
      struct model m;
      uint64_t len;
      unsigned char *buf;

      rng_state = (uint64_t) seed + si * 13;
      cr_assert_eq (cbw_bitmap_init (&bm, sizes[si]), 0);
      model_init (&m, sizes[si]);
      for (int i = 0; i < 20; i++) mutate (&bm, &m, seed * 30);
      len = cbw_bitmap_serialized_size (&bm);
      cr_assert_eq (len, (sizes[si] + 7) / 8);
      buf = malloc (len + 1);
      memset (buf, 0xa5, len + 1);
      cbw_bitmap_serialize (&bm, buf);
      cr_assert_eq (buf[len], 0xa5, "serialize wrote past its size");
      /* Byte layout: bit i is bit i%8 of byte i/8, independently checked. */
      for (uint64_t i = 0; i < m.nbits; i++)
        cr_assert_eq ((buf[i / 8] >> (i % 8)) & 1, m.b[i]);
      for (uint64_t i = m.nbits; i < len * 8; i++)
        cr_assert_eq ((buf[i / 8] >> (i % 8)) & 1, 0, "padding bit set");
      cr_assert_eq (cbw_bitmap_init (&bm2, sizes[si]), 0);
      cbw_bitmap_set_range (&bm2, 0, UINT64_MAX);   /* must be overwritten */
      cr_assert_eq (cbw_bitmap_deserialize (&bm2, buf, len), 0);
      check_full (&bm2, &m);
      check_queries (&bm2, &m, 10);
      /* in place: bytes copied straight into a fresh map's words */
      struct cbw_bitmap bm3;
      cr_assert_eq (cbw_bitmap_init (&bm3, sizes[si]), 0);
      memcpy (bm3.words, buf, len);
      cr_assert_eq (cbw_bitmap_deserialize_in_place (&bm3), 0);
      check_full (&bm3, &m);
      cbw_bitmap_free (&bm3);
      cbw_bitmap_free (&bm);
      cbw_bitmap_free (&bm2);
      free (buf);
      free (m.b);
    }
  }
}

Test (bitmap, deserialize_rejects)
{
  for (size_t si = 0; si < NSIZES; si++) {
    struct cbw_bitmap bm;
    uint64_t nbits = sizes[si], len = (nbits + 7) / 8;
    unsigned char *buf = calloc (len + 2, 1);

    cr_assert_eq (cbw_bitmap_init (&bm, nbits), 0);
    cbw_bitmap_set_range (&bm, 0, 1);
    /* wrong lengths */
    errno = 0;
    cr_assert_eq (cbw_bitmap_deserialize (&bm, buf, len + 1), -1);
    cr_assert_eq (errno, EINVAL);
    if (len > 0) {
      errno = 0;
      cr_assert_eq (cbw_bitmap_deserialize (&bm, buf, len - 1), -1);
      cr_assert_eq (errno, EINVAL);
    }
    /* each nonzero padding bit */
    for (uint64_t b = nbits; b < len * 8; b++) {
      memset (buf, 0, len);
      buf[b / 8] |= (unsigned char) (1u << (b % 8));
      errno = 0;
      cr_assert_eq (cbw_bitmap_deserialize (&bm, buf, len), -1,
                    "padding bit %lu accepted", (unsigned long) b);
      cr_assert_eq (errno, EINVAL);
    }
    /* in place: a padding bit, or a stray byte past len in the last word */
    if (nbits % 64) {
      struct cbw_bitmap bm3;
      unsigned b = (unsigned) (nbits % 64) + (unsigned) (rnd () % (64 - nbits % 64));
      cr_assert_eq (cbw_bitmap_init (&bm3, nbits), 0);
      bm3.words[bm3.nwords - 1] |= 1ULL << b;
      errno = 0;
      cr_assert_eq (cbw_bitmap_deserialize_in_place (&bm3), -1, "bit %u accepted", b);
      cr_assert_eq (errno, EINVAL);
      cbw_bitmap_free (&bm3);
    }
    /* failed deserialize left the map as it was */
    if (nbits > 0) {
      cr_assert (cbw_bitmap_test (&bm, 0));
      cr_assert_eq (cbw_bitmap_count (&bm), 1);
    }
    /* the last real bit is accepted */
    if (nbits > 0) {
      memset (buf, 0, len);
      buf[(nbits - 1) / 8] |= (unsigned char) (1u << ((nbits - 1) % 8));
      cr_assert_eq (cbw_bitmap_deserialize (&bm, buf, len), 0);
      cr_assert_eq (cbw_bitmap_count (&bm), 1);
      cr_assert_eq (cbw_bitmap_next_set (&bm, 0), nbits - 1);
    }
    cbw_bitmap_free (&bm);
    free (buf);
  }
}

Test (bitmap, init_limits)
{
  struct cbw_bitmap bm;
  errno = 0;
  cr_assert_eq (cbw_bitmap_init (&bm, UINT64_MAX), -1);
  cr_assert_eq (errno, EOVERFLOW);
  errno = 0;
  cr_assert_eq (cbw_bitmap_init (&bm, 1ULL << 62), -1);
  cr_assert_eq (errno, EOVERFLOW);
  cr_assert_eq (cbw_bitmap_init (&bm, 0), 0);
  cr_assert_eq (cbw_bitmap_count (&bm), 0);
  cr_assert_eq (cbw_bitmap_next_set (&bm, 0), UINT64_MAX);
  cr_assert_eq (cbw_bitmap_next_clear (&bm, 0), UINT64_MAX);
  cr_assert_eq (cbw_bitmap_serialized_size (&bm), 0);
  cr_assert_eq (cbw_bitmap_deserialize (&bm, "", 0), 0);
  cbw_bitmap_free (&bm);
  cbw_bitmap_free (NULL);
}

Test (bitmap, large_16tib_at_64k)
{
  /* 16 TiB / 64 KiB = 2^28 bits: full set and clear must be fast and exact. */
  struct cbw_bitmap bm;
  uint64_t n = 1ULL << 28, s, c;

  cr_assert_eq (cbw_bitmap_init (&bm, n), 0);
  cbw_bitmap_set_range (&bm, 5, n);
  cr_assert_eq (cbw_bitmap_count (&bm), n - 5);
  cr_assert_eq (cbw_bitmap_next_clear (&bm, 5), UINT64_MAX);
  cr_assert (cbw_bitmap_next_extent (&bm, 0, &s, &c));
  cr_assert_eq (s, 5);
  cr_assert_eq (c, n - 5);
  cbw_bitmap_clear_range (&bm, 64, n - 128);
  cr_assert_eq (cbw_bitmap_count (&bm), 59 + 64);
  cr_assert_eq (cbw_bitmap_next_set (&bm, 64), n - 64);
  cr_assert_eq (cbw_bitmap_count_range (&bm, 0, n), 123);
  cbw_bitmap_free (&bm);
}

/* Concurrent atomic setters on overlapping ranges: the union must be set
 * and nothing else (lost updates would show up as missing bits). */
struct setter_arg {
  struct cbw_bitmap *bm;
  unsigned id;
};

static void *
setter (void *p)
{
  struct setter_arg *a = p;
  for (uint64_t i = a->id; i < a->bm->nbits; i += 4)
    cbw_bitmap_set_range_atomic (a->bm, i, 1);
  return NULL;
}

Test (bitmap, atomic_concurrent)
{
  struct cbw_bitmap bm;
  pthread_t th[4];
  struct setter_arg args[4];
  uint64_t n = 64 * 4096 * 2 + 7;

  cr_assert_eq (cbw_bitmap_init (&bm, n), 0);
  for (unsigned i = 0; i < 3; i++) {         /* ids 0..2 set, 3 left clear */
    args[i].bm = &bm;
    args[i].id = i;
    pthread_create (&th[i], NULL, setter, &args[i]);
  }
  for (unsigned i = 0; i < 3; i++)
    pthread_join (th[i], NULL);
  check_invariants (&bm);
  for (uint64_t i = 0; i < n; i++)
    cr_assert_eq (cbw_bitmap_test (&bm, i), i % 4 != 3, "bit %lu", (unsigned long) i);
  cbw_bitmap_free (&bm);
}

/* Words moved to caller memory keep their bits, take new ones there, and are
 * not freed by the map (the caller's buffer is checked after the free). */
Test (bitmap, external_words)
{
  struct cbw_bitmap bm;
  uint64_t *a = calloc (3, sizeof *a), *b = calloc (3, sizeof *b);

  cr_assert_eq (cbw_bitmap_init (&bm, 150), 0);
  cbw_bitmap_set_range (&bm, 3, 2);
  cbw_bitmap_use_external_words (&bm, a);
  cr_assert (bm.external_words);
  cr_assert_eq (a[0], 0x18);
  cbw_bitmap_set_range_atomic (&bm, 140, 5);
  cr_assert_eq (a[2], 0x1fULL << 12);
  cr_assert_eq (cbw_bitmap_count (&bm), 7);
  cr_assert_eq (cbw_bitmap_next_set (&bm, 5), 140, "summary kept");
  cbw_bitmap_use_external_words (&bm, b);        /* external to external */
  cr_assert_eq (b[0], 0x18);
  cr_assert_eq (b[2], 0x1fULL << 12);
  cbw_bitmap_clear_range (&bm, 3, 1);
  cr_assert_eq (b[0], 0x10);
  cr_assert_eq (a[0], 0x18, "old memory no longer written");
  cbw_bitmap_free (&bm);
  cr_assert_eq (b[2], 0x1fULL << 12, "caller memory not freed");
  free (a);
  free (b);
}
