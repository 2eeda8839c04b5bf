/* cbw — plugin/dirtybitmap/livemap.c: the live-bitmap map file (see
 * livemap.h; byte-level spec: docs/formats/bitmaps.md, "Live-bitmap map").
 *
 * Everything in the file is little-endian, and the bitmap words are used in
 * place by the data path (atomic OR on the mapping), so the map is only
 * created and trusted on little-endian hosts; elsewhere the filter runs on
 * the region journal alone, as before the map existed.
 *
 * Header fields are immutable after creation and covered by the checksum,
 * except saved/saving generation, which the owner updates with single
 * aligned 8-byte stores (each intermediate state is safe to read after a
 * crash; see dbm_livemap_load).
 *
 * Locking: none (see livemap.h).
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "bitmap_store.h"
#include "cleanup.h"
#include "livemap.h"

#define OFF_MAGIC 0
#define OFF_VERSION 8
#define OFF_HDR_SIZE 12
#define OFF_CHECKSUM 16
#define OFF_IMAGE_SIZE 24
#define OFF_BASE_GEN 32
#define OFF_SAVED_GEN 40
#define OFF_SAVING_GEN 48
#define OFF_NSLOTS 56
#define OFF_FLAGS 60
#define OFF_BOOT_ID 64
#define OFF_FILE_SIZE 104
#define SLOT_GRAN 136
#define SLOT_NBITS 144
#define SLOT_OFFSET 152
#define DATA_ALIGN 64
/* A map larger than this is not one we wrote (1024 bitmaps of 2^35 bits). */
#define MAX_FILE_SIZE (1ULL << 42)

struct dbm_livemap {
  char *path, *tmp_path;
  void *base;
  size_t size;
};

static void put_le32 (uint8_t *p, uint32_t v) { v = htole32 (v); memcpy (p, &v, 4); }
static void put_le64 (uint8_t *p, uint64_t v) { v = htole64 (v); memcpy (p, &v, 8); }
static uint32_t get_le32 (const uint8_t *p) { uint32_t v; memcpy (&v, p, 4); return le32toh (v); }
static uint64_t get_le64 (const uint8_t *p) { uint64_t v; memcpy (&v, p, 8); return le64toh (v); }

static uint64_t
nwords_of (uint64_t nbits)
{
  return nbits / 64 + (nbits % 64 != 0);
}

static uint64_t
header_size_of (uint64_t nslots)
{
  uint64_t h = DBM_LIVEMAP_HDR_FIXED + nslots * DBM_LIVEMAP_SLOT_SIZE;
  return (h + DBM_LIVEMAP_ALIGN - 1) / DBM_LIVEMAP_ALIGN * DBM_LIVEMAP_ALIGN;
}

/* XXH64 of the header with the checksum and the two mutable fields as 0. */
static uint64_t
header_checksum (const uint8_t *hdr, uint64_t header_size)
{
  XXH64_state_t *s = XXH64_createState ();
  static const uint8_t zero[24];
  uint64_t h;

  if (s == NULL)
    return 0;                     /* never matches a real header by chance */
  XXH64_reset (s, 0);
  XXH64_update (s, hdr, OFF_CHECKSUM);
  XXH64_update (s, zero, 8);
  XXH64_update (s, hdr + OFF_IMAGE_SIZE, OFF_SAVED_GEN - OFF_IMAGE_SIZE);
  XXH64_update (s, zero, 16);
  XXH64_update (s, hdr + OFF_NSLOTS, header_size - OFF_NSLOTS);
  h = XXH64_digest (s);
  XXH64_freeState (s);
  return h;
}

int
dbm_livemap_boot_id (char buf[DBM_LIVEMAP_BOOT_ID_FIELD], struct cbw_err *err)
{
  const char *env = getenv (DBM_LIVEMAP_BOOT_ID_ENV);
  ssize_t r;
  int fd;

  memset (buf, 0, DBM_LIVEMAP_BOOT_ID_FIELD);
  if (env && *env) {
    snprintf (buf, DBM_LIVEMAP_BOOT_ID_FIELD, "%s", env);
    return 0;
  }
  fd = open ("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return cbw_err_set (err, errno, "/proc/sys/kernel/random/boot_id: %s", strerror (errno));
  r = read (fd, buf, DBM_LIVEMAP_BOOT_ID_FIELD - 1);
  close (fd);
  if (r <= 0) {
    memset (buf, 0, DBM_LIVEMAP_BOOT_ID_FIELD);
    return cbw_err_set (err, EIO, "/proc/sys/kernel/random/boot_id: empty");
  }
  while (r > 0 && (buf[r - 1] == '\n' || buf[r - 1] == 0))
    buf[--r] = 0;
  if (r == 0)
    return cbw_err_set (err, EIO, "/proc/sys/kernel/random/boot_id: empty");
  return 0;
}

struct dbm_livemap *
dbm_livemap_create (const char *path, uint64_t image_size, uint64_t generation,
                    size_t n, struct dbm_livemap_slot *slots, struct cbw_err *err)
{
  struct dbm_livemap *m = NULL;
  char boot_id[DBM_LIVEMAP_BOOT_ID_FIELD];
  uint64_t hsize, fsize, off;
  uint8_t *h;
  size_t i;
  int fd = -1;

#if __BYTE_ORDER != __LITTLE_ENDIAN
  cbw_err_set (err, ENOTSUP, "%s: the live-bitmap map needs a little-endian host", path);
  return NULL;
#endif
  if (n > CBW_BITMAP_MAX_COUNT) {
    cbw_err_set (err, EINVAL, "%s: %zu bitmaps (at most %d)", path, n, CBW_BITMAP_MAX_COUNT);
    return NULL;
  }
  if (dbm_livemap_boot_id (boot_id, err) < 0)
    return NULL;
  hsize = header_size_of (n);
  off = hsize;
  for (i = 0; i < n; ++i) {
    off = (off + DATA_ALIGN - 1) / DATA_ALIGN * DATA_ALIGN;
    off += nwords_of (slots[i].nbits) * 8;
  }
  fsize = (off + DBM_LIVEMAP_ALIGN - 1) / DBM_LIVEMAP_ALIGN * DBM_LIVEMAP_ALIGN;
  if (fsize > MAX_FILE_SIZE) {
    cbw_err_set (err, EFBIG, "%s: %" PRIu64 " bytes is too large", path, fsize);
    return NULL;
  }

  m = calloc (1, sizeof *m);
  if (m == NULL || (m->path = strdup (path)) == NULL ||
      asprintf (&m->tmp_path, "%s.tmp", path) < 0) {
    if (m) m->tmp_path = NULL;
    cbw_err_set (err, ENOMEM, "%s: out of memory", path);
    goto fail;
  }
  unlink (m->tmp_path);
  fd = open (m->tmp_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    cbw_err_set (err, errno, "%s: %s", m->tmp_path, strerror (errno));
    goto fail;
  }
  /* posix_fallocate, not ftruncate: a full file system must fail here, not
   * as SIGBUS on the data path */
  int e = posix_fallocate (fd, 0, (off_t) fsize);
  if (e != 0) {
    cbw_err_set (err, e, "%s: allocating %" PRIu64 " bytes: %s", m->tmp_path, fsize,
                 strerror (e));
    goto fail;
  }
  m->base = mmap (NULL, fsize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m->base == MAP_FAILED) {
    m->base = NULL;
    cbw_err_set (err, errno, "%s: mmap: %s", m->tmp_path, strerror (errno));
    goto fail;
  }
  m->size = fsize;
  close (fd);
  fd = -1;

  h = m->base;
  memcpy (h + OFF_MAGIC, DBM_LIVEMAP_MAGIC, 8);
  put_le32 (h + OFF_VERSION, DBM_LIVEMAP_VERSION);
  put_le32 (h + OFF_HDR_SIZE, (uint32_t) hsize);
  put_le64 (h + OFF_IMAGE_SIZE, image_size);
  put_le64 (h + OFF_BASE_GEN, generation);
  put_le64 (h + OFF_SAVED_GEN, generation);
  put_le64 (h + OFF_SAVING_GEN, 0);
  put_le32 (h + OFF_NSLOTS, (uint32_t) n);
  put_le32 (h + OFF_FLAGS, 0);
  memcpy (h + OFF_BOOT_ID, boot_id, DBM_LIVEMAP_BOOT_ID_FIELD);
  put_le64 (h + OFF_FILE_SIZE, fsize);
  off = hsize;
  for (i = 0; i < n; ++i) {
    uint8_t *s = h + DBM_LIVEMAP_HDR_FIXED + i * DBM_LIVEMAP_SLOT_SIZE;
    off = (off + DATA_ALIGN - 1) / DATA_ALIGN * DATA_ALIGN;
    snprintf ((char *) s, DBM_LIVEMAP_NAME_FIELD, "%s", slots[i].name);
    put_le64 (s + SLOT_GRAN, slots[i].granularity);
    put_le64 (s + SLOT_NBITS, slots[i].nbits);
    put_le64 (s + SLOT_OFFSET, off);
    slots[i].words = (uint64_t *) (h + off);
    off += nwords_of (slots[i].nbits) * 8;
  }
  put_le64 (h + OFF_CHECKSUM, header_checksum (h, hsize));
  return m;

 fail:
  if (fd >= 0)
    close (fd);
  if (m && m->tmp_path)
    unlink (m->tmp_path);
  dbm_livemap_close (m, false);
  return NULL;
}

int
dbm_livemap_publish (struct dbm_livemap *m, struct cbw_err *err)
{
  if (rename (m->tmp_path, m->path) < 0) {
    int e = errno;
    unlink (m->tmp_path);
    return cbw_err_set (err, e, "rename %s -> %s: %s", m->tmp_path, m->path, strerror (e));
  }
  return 0;
}

void
dbm_livemap_saving (struct dbm_livemap *m, uint64_t gen)
{
  if (m)
    __atomic_store_n ((uint64_t *) ((uint8_t *) m->base + OFF_SAVING_GEN), htole64 (gen),
                      __ATOMIC_SEQ_CST);
}

void
dbm_livemap_saved (struct dbm_livemap *m, uint64_t gen)
{
  if (m == NULL)
    return;
  /* saved first, then saving cleared: every state in between is one the
   * reader accepts for the generation that is on disk */
  __atomic_store_n ((uint64_t *) ((uint8_t *) m->base + OFF_SAVED_GEN), htole64 (gen),
                    __ATOMIC_SEQ_CST);
  __atomic_store_n ((uint64_t *) ((uint8_t *) m->base + OFF_SAVING_GEN), 0,
                    __ATOMIC_SEQ_CST);
}

void
dbm_livemap_invalidate (struct dbm_livemap *m)
{
  if (m)
    __atomic_store_n ((uint64_t *) m->base, 0, __ATOMIC_SEQ_CST);
}

void
dbm_livemap_close (struct dbm_livemap *m, bool remove)
{
  if (m == NULL)
    return;
  if (m->base)
    munmap (m->base, m->size);
  if (remove && m->path)
    unlink (m->path);
  free (m->path);
  free (m->tmp_path);
  free (m);
}

/* ---- loading for recovery ------------------------------------------------ */

void
dbm_livemap_unload (struct dbm_livemap_loaded *l)
{
  if (l == NULL)
    return;
  if (l->base)
    munmap (l->base, l->size);
  free (l->slots);
  free (l);
}

int
dbm_livemap_load (const char *path, uint64_t image_size, uint64_t store_gen,
                  struct dbm_livemap_loaded **out, struct cbw_err *err)
{
  struct dbm_livemap_loaded *l = NULL;
  char boot_id[DBM_LIVEMAP_BOOT_ID_FIELD];
  struct stat sb;
  const uint8_t *h;
  uint64_t hsize, nslots, saved, saving, base_gen;
  size_t i;
  int fd;

  *out = NULL;
#if __BYTE_ORDER != __LITTLE_ENDIAN
  return cbw_err_set (err, ENOTSUP, "%s: not used on big-endian hosts", path);
#endif
  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return cbw_err_set (err, errno, "%s: %s", path, strerror (errno));
  if (fstat (fd, &sb) < 0) {
    int e = errno;
    close (fd);
    return cbw_err_set (err, e, "%s: fstat: %s", path, strerror (e));
  }
  if (!S_ISREG (sb.st_mode) || sb.st_size < DBM_LIVEMAP_ALIGN ||
      (uint64_t) sb.st_size > MAX_FILE_SIZE) {
    close (fd);
    return cbw_err_set (err, EINVAL, "%s: not a live-bitmap map (size %" PRIu64 ")",
                        path, (uint64_t) sb.st_size);
  }
  l = calloc (1, sizeof *l);
  if (l == NULL) {
    close (fd);
    return cbw_err_set (err, ENOMEM, "%s: out of memory", path);
  }
  l->size = (size_t) sb.st_size;
  l->base = mmap (NULL, l->size, PROT_READ, MAP_SHARED, fd, 0);
  close (fd);
  if (l->base == MAP_FAILED) {
    l->base = NULL;
    dbm_livemap_unload (l);
    return cbw_err_set (err, errno, "%s: mmap: %s", path, strerror (errno));
  }
  h = l->base;

#define BAD(e, ...) do { cbw_err_set (err, e, __VA_ARGS__); goto fail; } while (0)
  if (memcmp (h + OFF_MAGIC, DBM_LIVEMAP_MAGIC, 8) != 0)
    BAD (EINVAL, "%s: bad magic (not a live-bitmap map, or invalidated)", path);
  if (get_le32 (h + OFF_VERSION) != DBM_LIVEMAP_VERSION)
    BAD (EINVAL, "%s: unsupported version %" PRIu32, path, get_le32 (h + OFF_VERSION));
  hsize = get_le32 (h + OFF_HDR_SIZE);
  nslots = get_le32 (h + OFF_NSLOTS);
  if (nslots > CBW_BITMAP_MAX_COUNT)
    BAD (EINVAL, "%s: %" PRIu64 " bitmaps (at most %d)", path, nslots, CBW_BITMAP_MAX_COUNT);
  if (hsize != header_size_of (nslots) || hsize > l->size)
    BAD (EINVAL, "%s: header size %" PRIu64 " does not fit %" PRIu64 " bitmaps in a "
         "%zu-byte file", path, hsize, nslots, l->size);
  if (get_le64 (h + OFF_CHECKSUM) != header_checksum (h, hsize))
    BAD (EIO, "%s: header checksum mismatch", path);
  if (get_le32 (h + OFF_FLAGS) != 0)
    BAD (EINVAL, "%s: unknown flags 0x%" PRIx32, path, get_le32 (h + OFF_FLAGS));
  if (get_le64 (h + OFF_FILE_SIZE) != l->size)
    BAD (EINVAL, "%s: file is %zu bytes, header says %" PRIu64, path, l->size,
         get_le64 (h + OFF_FILE_SIZE));
  if (get_le64 (h + OFF_IMAGE_SIZE) != image_size)
    BAD (EINVAL, "%s: map of a %" PRIu64 "-byte image, the image is %" PRIu64 " bytes",
         path, get_le64 (h + OFF_IMAGE_SIZE), image_size);
  if (h[OFF_BOOT_ID + DBM_LIVEMAP_BOOT_ID_FIELD - 1] != 0)
    BAD (EINVAL, "%s: boot id field not terminated", path);
  if (dbm_livemap_boot_id (boot_id, err) < 0)
    goto fail;
  if (memcmp (h + OFF_BOOT_ID, boot_id, DBM_LIVEMAP_BOOT_ID_FIELD) != 0)
    BAD (EXDEV, "%s: written before a reboot (boot id %.39s, now %s)", path,
         (const char *) h + OFF_BOOT_ID, boot_id);
  base_gen = get_le64 (h + OFF_BASE_GEN);
  saved = get_le64 (h + OFF_SAVED_GEN);
  saving = get_le64 (h + OFF_SAVING_GEN);
  if (saved < base_gen || !(store_gen == saved || (saving != 0 && store_gen == saving)))
    BAD (ESTALE, "%s: belongs to descriptor generation %" PRIu64 " (saving %" PRIu64
         "), the descriptor is at %" PRIu64, path, saved, saving, store_gen);

  l->n = (size_t) nslots;
  l->slots = calloc (l->n ? l->n : 1, sizeof *l->slots);
  if (l->slots == NULL)
    BAD (ENOMEM, "%s: out of memory", path);
  for (i = 0; i < l->n; ++i) {
    const uint8_t *s = h + DBM_LIVEMAP_HDR_FIXED + i * DBM_LIVEMAP_SLOT_SIZE;
    struct dbm_livemap_slot *sl = &l->slots[i];
    uint64_t gran = get_le64 (s + SLOT_GRAN), nbits = get_le64 (s + SLOT_NBITS);
    uint64_t off = get_le64 (s + SLOT_OFFSET);
    struct cbw_err nerr = { 0 };

    if (memchr (s, 0, DBM_LIVEMAP_NAME_FIELD) == NULL ||
        cbw_bitmap_name_valid ((const char *) s, &nerr) < 0)
      BAD (EINVAL, "%s: bitmap %zu: bad name", path, i);
    if (cbw_bitmap_granularity_valid (gran, &nerr) < 0)
      BAD (EINVAL, "%s: bitmap '%s': bad granularity %" PRIu64, path, (const char *) s, gran);
    if (nbits != image_size / gran + (image_size % gran != 0))
      BAD (EINVAL, "%s: bitmap '%s': %" PRIu64 " bits, a %" PRIu64 "-byte image at "
           "granularity %" PRIu64 " needs %" PRIu64, path, (const char *) s, nbits,
           image_size, gran, image_size / gran + (image_size % gran != 0));
    if (off % DATA_ALIGN != 0 || off < hsize || off > l->size ||
        nwords_of (nbits) * 8 > l->size - off)
      BAD (EINVAL, "%s: bitmap '%s': data at %" PRIu64 " (+%" PRIu64 ") outside the "
           "%zu-byte file", path, (const char *) s, off, nwords_of (nbits) * 8, l->size);
    sl->name = (const char *) s;
    sl->granularity = gran;
    sl->nbits = nbits;
    sl->words = (uint64_t *) ((uint8_t *) l->base + off);
  }
#undef BAD
  *out = l;
  return 0;

 fail:
  dbm_livemap_unload (l);
  return -1;
}
