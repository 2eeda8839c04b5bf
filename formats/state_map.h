/* cbw — formats/state_map.h: the shared block-state map of a cbw backup
 * session (docs/formats/cbw-state-map.md), the one definition used by its
 * writer (the cbw filter, plugin/cbw/session.c) and its readers (the
 * filter's own point-in-time view, and cbwd's point-in-time export,
 * server/export_pit.c): the header, its check, and the run scanner both
 * point-in-time readers serve requests with.
 *
 * The file: a 4096-byte header, then one byte per block (the block states
 * below, values fixed by the spec).  The writer changes state bytes with
 * atomic compare-and-swap in a MAP_SHARED mapping; readers map it read-only
 * and load them with atomics.  No lock: see the spec for the protocol
 * (liveness = the writer's OFD lock on byte 0 of the file).
 *
 * Header-only (static inline), so neither side needs another library: the
 * checksum is XXH3-64 from xxhash.h compiled inline.
 */
#ifndef CBW_FORMATS_STATE_MAP_H
#define CBW_FORMATS_STATE_MAP_H

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "cbw_err.h"

#if !defined (__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "cbw state maps are little-endian; this host is not"
#endif

#define CBW_SM_MAGIC "CBWSTMAP"          /* 8 bytes, no NUL */
#define CBW_SM_VERSION 1
#define CBW_SM_HEADER_SIZE 4096          /* the state bytes start here */
#define CBW_SM_MIN_SHIFT 9               /* granularity 512 .. 1 GiB */
#define CBW_SM_MAX_SHIFT 30

/* Block state bytes.  FIXED by the format: never renumber. */
enum cbw_sm_state {
  CBW_SM_NOT_NEEDED = 0,
  CBW_SM_NEEDED = 1,
  CBW_SM_COPYING = 2,
  CBW_SM_COPIED = 3,
  CBW_SM_FAILED = 4,
  CBW_SM_BUFFERED = 5,
};
#define CBW_SM_NSTATES 6

/* status word (offset 56) */
#define CBW_SM_STATUS_ACTIVE 0
#define CBW_SM_STATUS_ENDED 1

struct cbw_sm_header {
  char magic[8];              /*  0 "CBWSTMAP" */
  uint32_t version;           /*  8 CBW_SM_VERSION */
  uint32_t header_size;       /* 12 CBW_SM_HEADER_SIZE */
  uint32_t gran_shift;        /* 16 log2 (granularity) */
  uint32_t creator_pid;       /* 20 informational */
  uint64_t nblocks;           /* 24 ceil (disk_size / granularity) */
  uint64_t disk_size;         /* 32 bytes */
  uint64_t session_id;        /* 40 random, new per session */
  uint64_t checksum;          /* 48 XXH3-64 (seed 0) of bytes 0..47 */
  uint64_t status;            /* 56 CBW_SM_STATUS_*: changes at run time,
                                 not covered by the checksum */
};
_Static_assert (sizeof (struct cbw_sm_header) == 64, "header layout");
_Static_assert (offsetof (struct cbw_sm_header, gran_shift) == 16, "layout");
_Static_assert (offsetof (struct cbw_sm_header, nblocks) == 24, "layout");
_Static_assert (offsetof (struct cbw_sm_header, checksum) == 48, "layout");
_Static_assert (offsetof (struct cbw_sm_header, status) == 56, "layout");

static inline uint64_t
cbw_sm_checksum (const struct cbw_sm_header *h)
{
  return XXH3_64bits (h, offsetof (struct cbw_sm_header, checksum));
}

static inline uint64_t
cbw_sm_file_size (uint64_t nblocks)
{
  return CBW_SM_HEADER_SIZE + nblocks;
}

/* Validate a header read from `what` (a file of file_size bytes).
 * expect_size: the disk size the reader serves (0: any); expect_gran: the
 * granularity it expects (0: any).  0, or -1 with *err naming the problem. */
static inline int
cbw_sm_check_header (const struct cbw_sm_header *h, uint64_t file_size,
                     uint64_t expect_size, uint64_t expect_gran,
                     const char *what, struct cbw_err *err)
{
  uint64_t sum;

  if (file_size < CBW_SM_HEADER_SIZE)
    return cbw_err_set (err, EINVAL, "state map %s: %" PRIu64 " bytes, "
                        "shorter than its %d byte header", what, file_size,
                        CBW_SM_HEADER_SIZE);
  if (memcmp (h->magic, CBW_SM_MAGIC, 8) != 0)
    return cbw_err_set (err, EINVAL, "state map %s: bad magic (not a cbw "
                        "state map)", what);
  if (h->version != CBW_SM_VERSION)
    return cbw_err_set (err, EINVAL, "state map %s: version %" PRIu32
                        " (this program reads version %d)", what, h->version,
                        CBW_SM_VERSION);
  sum = cbw_sm_checksum (h);
  if (h->checksum != sum)
    return cbw_err_set (err, EINVAL, "state map %s: bad header checksum "
                        "(stored 0x%016" PRIx64 ", computed 0x%016" PRIx64 ")",
                        what, h->checksum, sum);
  if (h->header_size != CBW_SM_HEADER_SIZE)
    return cbw_err_set (err, EINVAL, "state map %s: header size %" PRIu32
                        " (expected %d)", what, h->header_size,
                        CBW_SM_HEADER_SIZE);
  if (h->gran_shift < CBW_SM_MIN_SHIFT || h->gran_shift > CBW_SM_MAX_SHIFT)
    return cbw_err_set (err, EINVAL, "state map %s: granularity 2^%" PRIu32
                        " out of range (512 .. 1G)", what, h->gran_shift);
  if (h->disk_size > (UINT64_C (1) << 62) ||
      h->nblocks != (h->disk_size + (UINT64_C (1) << h->gran_shift) - 1)
                    >> h->gran_shift)
    return cbw_err_set (err, EINVAL, "state map %s: %" PRIu64 " blocks do "
                        "not match disk size %" PRIu64 " at granularity %"
                        PRIu64, what, h->nblocks, h->disk_size,
                        UINT64_C (1) << h->gran_shift);
  if (file_size != cbw_sm_file_size (h->nblocks))
    return cbw_err_set (err, EINVAL, "state map %s: file is %" PRIu64
                        " bytes, expected %" PRIu64 " (header + %" PRIu64
                        " blocks)", what, file_size,
                        cbw_sm_file_size (h->nblocks), h->nblocks);
  if (expect_size && h->disk_size != expect_size)
    return cbw_err_set (err, EINVAL, "state map %s: disk size %" PRIu64
                        " differs from the export's %" PRIu64, what,
                        h->disk_size, expect_size);
  if (expect_gran && (UINT64_C (1) << h->gran_shift) != expect_gran)
    return cbw_err_set (err, EINVAL, "state map %s: granularity %" PRIu64
                        " differs from the expected %" PRIu64, what,
                        UINT64_C (1) << h->gran_shift, expect_gran);
  if (h->status != CBW_SM_STATUS_ACTIVE && h->status != CBW_SM_STATUS_ENDED)
    return cbw_err_set (err, EINVAL, "state map %s: unknown status %" PRIu64,
                        what, h->status);
  return 0;
}

/* The run scanner.  A point-in-time reader serves [pos, end) one run of
 * blocks with the same state at a time.  cbw_sm_run: the state v of the
 * block holding pos, and the run of blocks from there with state v, cut at
 * the block that holds end - 1 and at the map's end: *rb = the first block
 * after the run, *rend = where the run's bytes end (min (rb << shift,
 * end)).  Requires pos < end and pos within the disk.  Each state byte is
 * loaded once, atomically: the writer may change any of them meanwhile, so
 * a reader that must know a run did not change while it read the data
 * calls cbw_sm_first_changed afterwards. */
static inline uint8_t
cbw_sm_run (const _Atomic uint8_t *st, uint64_t nblocks, unsigned shift,
            uint64_t pos, uint64_t end, uint64_t *rb, uint64_t *rend)
{
  uint64_t b = pos >> shift, r;
  uint8_t v = atomic_load (&st[b]);
  for (r = b + 1; r < nblocks && (r << shift) < end; ++r)
    if (atomic_load (&st[r]) != v)
      break;
  *rb = r;
  *rend = r << shift < end ? r << shift : end;
  return v;
}

/* The first block in [b0, b1) whose state is not v, or b1. */
static inline uint64_t
cbw_sm_first_changed (const _Atomic uint8_t *st, uint64_t b0, uint64_t b1, uint8_t v)
{
  for (; b0 < b1; ++b0)
    if (atomic_load (&st[b0]) != v)
      return b0;
  return b1;
}

#endif
