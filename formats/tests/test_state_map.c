/* cbw — formats/tests/test_state_map.c: the state map's header check and
 * its run scanner (formats/state_map.h), on maps built in memory.
 *
 * Locking: single-threaded.
 */
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "state_map.h"

/* A map of n blocks with the states in s (one character a block, '0'..'5'). */
static _Atomic uint8_t *
map_of (const char *s)
{
  size_t n = strlen (s);
  _Atomic uint8_t *st = calloc (n ? n : 1, 1);
  cr_assert_not_null (st);
  for (size_t i = 0; i < n; i++)
    atomic_store (&st[i], (uint8_t) (s[i] - '0'));
  return st;
}

/* Granularity 512 (shift 9) throughout. */
#define SH 9
#define B(n) ((uint64_t) (n) << SH)

Test (state_map, run_stops_at_a_change)
{
  _Atomic uint8_t *st = map_of ("1113300");
  uint64_t rb, rend;
  cr_expect_eq (cbw_sm_run (st, 7, SH, 0, B (7), &rb, &rend), 1);
  cr_expect_eq (rb, 3);
  cr_expect_eq (rend, B (3));
  cr_expect_eq (cbw_sm_run (st, 7, SH, B (3) + 10, B (7), &rb, &rend), 3);
  cr_expect_eq (rb, 5);
  cr_expect_eq (rend, B (5));
  cr_expect_eq (cbw_sm_run (st, 7, SH, B (5), B (7), &rb, &rend), 0);
  cr_expect_eq (rb, 7);
  cr_expect_eq (rend, B (7));
  free ((void *) st);
}

Test (state_map, run_stops_at_the_request_end)
{
  _Atomic uint8_t *st = map_of ("11111111");
  uint64_t rb, rend;
  /* end in the middle of block 2: the run holds blocks 0..2, its bytes
   * end at the request's end, and block 3 is never looked at */
  cr_expect_eq (cbw_sm_run (st, 8, SH, 100, B (2) + 7, &rb, &rend), 1);
  cr_expect_eq (rb, 3);
  cr_expect_eq (rend, B (2) + 7);
  /* end on a block boundary: the block after is not part of the run */
  cr_expect_eq (cbw_sm_run (st, 8, SH, 0, B (4), &rb, &rend), 1);
  cr_expect_eq (rb, 4);
  cr_expect_eq (rend, B (4));
  free ((void *) st);
}

Test (state_map, run_stops_at_the_map_end)
{
  /* a disk of 2.5 blocks: 3 blocks, the last one partial */
  _Atomic uint8_t *st = map_of ("222");
  uint64_t rb, rend, size = B (2) + 256;
  cr_expect_eq (cbw_sm_run (st, 3, SH, B (1), size, &rb, &rend), 2);
  cr_expect_eq (rb, 3);
  cr_expect_eq (rend, size);
  /* a single byte in the last block */
  cr_expect_eq (cbw_sm_run (st, 3, SH, size - 1, size, &rb, &rend), 2);
  cr_expect_eq (rb, 3);
  cr_expect_eq (rend, size);
  free ((void *) st);
}

Test (state_map, first_changed)
{
  _Atomic uint8_t *st = map_of ("3333433");
  cr_expect_eq (cbw_sm_first_changed (st, 0, 7, 3), 4);
  cr_expect_eq (cbw_sm_first_changed (st, 0, 4, 3), 4);  /* none in range: b1 */
  cr_expect_eq (cbw_sm_first_changed (st, 5, 7, 3), 7);
  cr_expect_eq (cbw_sm_first_changed (st, 2, 2, 3), 2);  /* empty range */
  atomic_store (&st[1], CBW_SM_FAILED);
  cr_expect_eq (cbw_sm_first_changed (st, 0, 7, 3), 1);
  free ((void *) st);
}

static void
good_header (struct cbw_sm_header *h, uint64_t disk_size, unsigned shift)
{
  memset (h, 0, sizeof *h);
  memcpy (h->magic, CBW_SM_MAGIC, 8);
  h->version = CBW_SM_VERSION;
  h->header_size = CBW_SM_HEADER_SIZE;
  h->gran_shift = shift;
  h->disk_size = disk_size;
  h->nblocks = (disk_size + (UINT64_C (1) << shift) - 1) >> shift;
  h->session_id = 42;
  h->checksum = cbw_sm_checksum (h);
}

Test (state_map, header_check)
{
  struct cbw_sm_header h;
  struct cbw_err err = { 0 };
  good_header (&h, B (2) + 256, SH);
  uint64_t fsz = cbw_sm_file_size (3);
  cr_expect_eq (cbw_sm_check_header (&h, fsz, B (2) + 256, 512, "t", &err), 0, "%s", err.msg);
  cr_expect_eq (cbw_sm_check_header (&h, fsz + 1, 0, 0, "t", &err), -1);
  cr_expect (strstr (err.msg, "expected") != NULL, "%s", err.msg);
  cr_expect_eq (cbw_sm_check_header (&h, fsz, B (3), 0, "t", &err), -1);
  cr_expect (strstr (err.msg, "disk size") != NULL, "%s", err.msg);
  cr_expect_eq (cbw_sm_check_header (&h, fsz, 0, 4096, "t", &err), -1);
  h.nblocks++;
  cr_expect_eq (cbw_sm_check_header (&h, fsz, 0, 0, "t", &err), -1);
  cr_expect (strstr (err.msg, "checksum") != NULL, "%s", err.msg);
  h.checksum = cbw_sm_checksum (&h);
  cr_expect_eq (cbw_sm_check_header (&h, cbw_sm_file_size (4), 0, 0, "t", &err), -1);
  cr_expect (strstr (err.msg, "blocks do not match") != NULL, "%s", err.msg);
  good_header (&h, B (2), SH);
  h.status = 7;
  cr_expect_eq (cbw_sm_check_header (&h, cbw_sm_file_size (2), 0, 0, "t", &err), -1);
  cr_expect (strstr (err.msg, "unknown status") != NULL, "%s", err.msg);
}
