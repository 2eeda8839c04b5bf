/* cbw — plugin/dirtybitmap/journal.c: on-disk write-ahead region journal
 * (see journal.h for the format summary, docs/formats/bitmaps.md for the
 * byte-level spec).
 *
 * Slot layout (little-endian), slot_size = roundup(64 + ceil(nregions/8), 4096):
 *   0 magic "CBWRJNL\0"   8 u32 version   12 u32 header size (64)
 *  16 u64 seq            24 u64 region size  32 u64 image size
 *  40 u64 nregions       48 u32 bitmap bytes 52 u32 reserved (0)
 *  56 u64 XXH64 (seed 0) of bytes [0, 64 + bitmap bytes) with this field 0
 *  64 region bits, then zero padding.
 * The file is exactly 2 * slot_size bytes.  Slot (seq % 2) holds state seq.
 *
 * Locking: none (see journal.h).  Every failure fills a cbw_err naming the file.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "cleanup.h"
#include "fileutil.h"
#include "journal.h"
#include "powerloss.h"

struct dbm_journal {
  char *path;
  int fd;
  uint64_t seq;            /* seq of the newest state on disk */
  uint64_t region_size, image_size, nregions;
  size_t slot_size;
  void *buf;               /* slot_size bytes, reused */
  unsigned sync_delay_us;  /* CBW_TEST_JOURNAL_SYNC_DELAY_US (tests only) */
};

static void put32 (unsigned char *p, uint32_t v) { v = htole32 (v); memcpy (p, &v, 4); }
static void put64 (unsigned char *p, uint64_t v) { v = htole64 (v); memcpy (p, &v, 8); }
static uint32_t get32 (const unsigned char *p) { uint32_t v; memcpy (&v, p, 4); return le32toh (v); }
static uint64_t get64 (const unsigned char *p) { uint64_t v; memcpy (&v, p, 8); return le64toh (v); }

static size_t
bitmap_bytes (uint64_t nregions)
{
  return (size_t) ((nregions + 7) / 8);
}

size_t
dbm_journal_slot_size (uint64_t nregions)
{
  size_t n = DBM_JOURNAL_HEADER_SIZE + bitmap_bytes (nregions);
  return (n + DBM_JOURNAL_ALIGN - 1) / DBM_JOURNAL_ALIGN * DBM_JOURNAL_ALIGN;
}

uint64_t
dbm_journal_nregions (uint64_t image_size, uint64_t region_size)
{
  uint64_t n;

  if (region_size < DBM_REGION_SIZE_MIN || region_size > DBM_REGION_SIZE_MAX ||
      (region_size & (region_size - 1)) != 0)
    return 0;
  n = image_size / region_size + (image_size % region_size != 0);
  if (n == 0)
    n = 1;                        /* an empty image still has a valid journal */
  if (bitmap_bytes (n) > DBM_JOURNAL_MAX_BITMAP_BYTES)
    return 0;
  return n;
}

static uint64_t
slot_checksum (const unsigned char *buf, size_t nbits_bytes)
{
  unsigned char hdr[DBM_JOURNAL_HEADER_SIZE];
  XXH64_state_t *s = XXH64_createState ();
  uint64_t h;

  memcpy (hdr, buf, sizeof hdr);
  memset (hdr + 56, 0, 8);
  if (s == NULL) {                /* fall back to a one-shot over a copy */
    unsigned char *tmp = malloc (sizeof hdr + nbits_bytes);
    if (tmp == NULL) return 0;    /* caller treats as mismatch */
    memcpy (tmp, hdr, sizeof hdr);
    memcpy (tmp + sizeof hdr, buf + sizeof hdr, nbits_bytes);
    h = XXH64 (tmp, sizeof hdr + nbits_bytes, 0);
    free (tmp);
    return h;
  }
  XXH64_reset (s, 0);
  XXH64_update (s, hdr, sizeof hdr);
  XXH64_update (s, buf + sizeof hdr, nbits_bytes);
  h = XXH64_digest (s);
  XXH64_freeState (s);
  return h;
}

void
dbm_journal_encode_slot (void *vbuf, size_t slot_size, uint64_t seq,
                         uint64_t region_size, uint64_t image_size,
                         uint64_t nregions, const uint8_t *bits)
{
  unsigned char *buf = vbuf;
  size_t nb = bitmap_bytes (nregions);

  memset (buf, 0, slot_size);
  memcpy (buf, DBM_JOURNAL_MAGIC, 8);
  put32 (buf + 8, DBM_JOURNAL_VERSION);
  put32 (buf + 12, DBM_JOURNAL_HEADER_SIZE);
  put64 (buf + 16, seq);
  put64 (buf + 24, region_size);
  put64 (buf + 32, image_size);
  put64 (buf + 40, nregions);
  put32 (buf + 48, (uint32_t) nb);
  if (bits)
    memcpy (buf + DBM_JOURNAL_HEADER_SIZE, bits, nb);
  /* padding bits past nregions in the last byte are always zero */
  if (nregions % 8)
    buf[DBM_JOURNAL_HEADER_SIZE + nb - 1] &= (unsigned char) ((1u << (nregions % 8)) - 1);
  put64 (buf + 56, slot_checksum (buf, nb));
}

int
dbm_journal_decode_slot (const void *vbuf, size_t slot_size,
                         struct dbm_journal_state *out, const char *what,
                         struct cbw_err *err)
{
  const unsigned char *buf = vbuf;
  uint64_t seq, rs, isz, nr, sum, want;
  uint32_t ver, hsz, nb;

  memset (out, 0, sizeof *out);
  if (slot_size < DBM_JOURNAL_HEADER_SIZE)
    return cbw_err_set (err, EIO, "%s: slot too small (%zu bytes)", what, slot_size);
  if (memcmp (buf, DBM_JOURNAL_MAGIC, 8) != 0)
    return cbw_err_set (err, EIO, "%s: bad magic (not a cbw region journal)", what);
  ver = get32 (buf + 8);
  hsz = get32 (buf + 12);
  if (ver != DBM_JOURNAL_VERSION)
    return cbw_err_set (err, EIO, "%s: unsupported version %u (expected %u)",
                        what, ver, DBM_JOURNAL_VERSION);
  if (hsz != DBM_JOURNAL_HEADER_SIZE)
    return cbw_err_set (err, EIO, "%s: bad header size %u", what, hsz);
  seq = get64 (buf + 16);
  rs = get64 (buf + 24);
  isz = get64 (buf + 32);
  nr = get64 (buf + 40);
  nb = get32 (buf + 48);
  if (get32 (buf + 52) != 0)
    return cbw_err_set (err, EIO, "%s: reserved field not zero", what);
  if (seq == 0)
    return cbw_err_set (err, EIO, "%s: sequence number 0", what);
  want = dbm_journal_nregions (isz, rs);
  if (want == 0)
    return cbw_err_set (err, EIO, "%s: bad region size %" PRIu64 " for image size %" PRIu64,
                        what, rs, isz);
  if (nr != want || nb != bitmap_bytes (nr))
    return cbw_err_set (err, EIO, "%s: region count %" PRIu64 " / %u bytes does not match "
                        "image size %" PRIu64 " and region size %" PRIu64,
                        what, nr, nb, isz, rs);
  if (DBM_JOURNAL_HEADER_SIZE + (size_t) nb > slot_size)
    return cbw_err_set (err, EIO, "%s: %u region bytes do not fit a %zu-byte slot",
                        what, nb, slot_size);
  sum = get64 (buf + 56);
  if ((want = slot_checksum (buf, nb)) != sum)
    return cbw_err_set (err, EIO, "%s: bad checksum (expected 0x%016" PRIx64
                        ", got 0x%016" PRIx64 ")", what, want, sum);
  if (nr % 8 && (buf[DBM_JOURNAL_HEADER_SIZE + nb - 1] >> (nr % 8)) != 0)
    return cbw_err_set (err, EIO, "%s: padding bits set past region %" PRIu64, what, nr);

  out->bits = malloc (nb ? nb : 1);
  if (out->bits == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", what);
  memcpy (out->bits, buf + DBM_JOURNAL_HEADER_SIZE, nb);
  out->seq = seq;
  out->region_size = rs;
  out->image_size = isz;
  out->nregions = nr;
  return 0;
}

void
dbm_journal_state_free (struct dbm_journal_state *s)
{
  free (s->bits);
  s->bits = NULL;
}

int
dbm_journal_read (const char *path, struct dbm_journal_state *out,
                  struct cbw_err *err)
{
  CLEANUP_CLOSE int fd = open (path, O_RDONLY | O_CLOEXEC);
  CLEANUP_FREE unsigned char *buf = NULL;
  struct dbm_journal_state s[2];
  struct cbw_err e[2];
  struct stat sb;
  size_t slot;
  int ok[2], i;
  char what[64];

  memset (out, 0, sizeof *out);
  if (fd < 0)
    return cbw_err_set (err, errno, "%s: open: %s", path, strerror (errno));
  if (fstat (fd, &sb) < 0)
    return cbw_err_set (err, errno, "%s: stat: %s", path, strerror (errno));
  if (!S_ISREG (sb.st_mode))
    return cbw_err_set (err, EINVAL, "%s: not a regular file", path);
  if (sb.st_size <= 0 || sb.st_size % (2 * DBM_JOURNAL_ALIGN) != 0 ||
      (uint64_t) sb.st_size > 2 * dbm_journal_slot_size (8ULL * DBM_JOURNAL_MAX_BITMAP_BYTES))
    return cbw_err_set (err, EIO, "%s: bad size %lld (truncated or not a journal)",
                        path, (long long) sb.st_size);
  slot = (size_t) sb.st_size / 2;
  buf = malloc (slot);
  if (buf == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", path);
  for (i = 0; i < 2; ++i) {
    if (cbw_pread_full (fd, buf, slot, (uint64_t) i * slot) < 0)
      return cbw_err_set (err, errno, "%s: read: %s", path,
                          errno == EIO ? "file shrank while reading" : strerror (errno));
    snprintf (what, sizeof what, "slot %d", i);
    ok[i] = dbm_journal_decode_slot (buf, slot, &s[i], what, &e[i]) == 0;
    /* a valid slot must be the size its own header implies */
    if (ok[i] && dbm_journal_slot_size (s[i].nregions) != slot) {
      cbw_err_set (&e[i], EIO, "slot %d: slot size %zu does not match %" PRIu64 " regions",
                   i, slot, s[i].nregions);
      dbm_journal_state_free (&s[i]);
      ok[i] = 0;
    }
    if (ok[i] && s[i].seq % 2 != (uint64_t) i) {
      cbw_err_set (&e[i], EIO, "slot %d: sequence %" PRIu64 " in the wrong slot", i, s[i].seq);
      dbm_journal_state_free (&s[i]);
      ok[i] = 0;
    }
  }
  if (!ok[0] && !ok[1])
    return cbw_err_set (err, EIO, "%s: no valid slot (%s; %s)", path, e[0].msg, e[1].msg);
  i = !ok[0] ? 1 : !ok[1] ? 0 : (s[1].seq > s[0].seq);
  *out = s[i];
  if (ok[!i])
    dbm_journal_state_free (&s[!i]);
  return 0;
}

struct dbm_journal *
dbm_journal_create (const char *path, uint64_t image_size, uint64_t region_size,
                    struct cbw_err *err)
{
  struct dbm_journal *j;
  CLEANUP_FREE unsigned char *file = NULL;
  uint64_t nr = dbm_journal_nregions (image_size, region_size);
  size_t slot;

  if (nr == 0) {
    cbw_err_set (err, EINVAL, "%s: region size %" PRIu64 " is invalid for image size %" PRIu64
                 " (power of two, 1M..1T, at most %u regions)",
                 path, region_size, image_size, 8 * DBM_JOURNAL_MAX_BITMAP_BYTES);
    return NULL;
  }
  slot = dbm_journal_slot_size (nr);
  file = calloc (2, slot);
  j = calloc (1, sizeof *j);
  if (file == NULL || j == NULL || (j->buf = malloc (slot)) == NULL ||
      (j->path = strdup (path)) == NULL) {
    cbw_err_set (err, ENOMEM, "%s: out of memory", path);
    goto fail;
  }
  j->fd = -1;
  {
    const char *d = getenv ("CBW_TEST_JOURNAL_SYNC_DELAY_US");
    j->sync_delay_us = d ? (unsigned) strtoul (d, NULL, 10) % 1000000 : 0;
  }
  j->slot_size = slot;
  j->nregions = nr;
  j->region_size = region_size;
  j->image_size = image_size;
  /* both slots valid and empty: seq 2 in slot 0, seq 1 in slot 1 */
  dbm_journal_encode_slot (file, slot, 2, region_size, image_size, nr, NULL);
  dbm_journal_encode_slot (file + slot, slot, 1, region_size, image_size, nr, NULL);
  j->seq = 2;
  if (cbw_write_file_atomic (path, file, 2 * slot, err) < 0)
    goto fail;
  if (dbm_powerloss_journal_synced (path, err) < 0)
    goto fail;
  j->fd = open (path, O_RDWR | O_CLOEXEC);
  if (j->fd < 0) {
    cbw_err_set (err, errno, "%s: open: %s", path, strerror (errno));
    goto fail;
  }
  return j;

 fail:
  if (j) {
    free (j->buf);
    free (j->path);
    free (j);
  }
  return NULL;
}

int
dbm_journal_write (struct dbm_journal *j, const uint8_t *bits, struct cbw_err *err)
{
  uint64_t seq = j->seq + 1;

  dbm_journal_encode_slot (j->buf, j->slot_size, seq, j->region_size,
                           j->image_size, j->nregions, bits);
  /* On failure the slot we wrote may be torn, or may hold seq: the other
   * slot (seq - 1) is the last state known durable, so it must not be the
   * next one overwritten.  Skip seq + 1: the next write uses seq + 2, which
   * goes to this same slot again and is newer than anything in it. */
  if (cbw_pwrite_full (j->fd, j->buf, j->slot_size, (seq % 2) * j->slot_size) < 0) {
    j->seq = seq + 1;
    return cbw_err_set (err, errno, "%s: write: %s", j->path, strerror (errno));
  }
  if (j->sync_delay_us)             /* test hook: widen the unsynced window */
    usleep (j->sync_delay_us);
  if (cbw_fdatasync (j->fd) < 0) {
    j->seq = seq + 1;
    return cbw_err_set (err, errno, "%s: fdatasync: %s", j->path, strerror (errno));
  }
  j->seq = seq;
  return dbm_powerloss_journal_synced (j->path, err);
}

uint64_t dbm_journal_get_nregions (const struct dbm_journal *j) { return j->nregions; }
uint64_t dbm_journal_get_seq (const struct dbm_journal *j) { return j->seq; }
const char *dbm_journal_path (const struct dbm_journal *j) { return j->path; }

void
dbm_journal_close (struct dbm_journal *j)
{
  if (j == NULL)
    return;
  if (j->fd >= 0)
    close (j->fd);
  free (j->buf);
  free (j->path);
  free (j);
}
