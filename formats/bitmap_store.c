/* cbw — formats/bitmap_store.c: the persistent bitmap store of
 * formats/bitmap_store.h.  Byte-level spec and the reasoning behind the save
 * protocol: docs/formats/bitmaps.md.
 *
 * Files, all in the directory of the descriptor D (e.g. disk.img.cbw-bitmaps.json):
 *   D          JSON descriptor, machine-written, ending in a checksum trailer
 *   D.lock     flock()ed exclusively while a store is open (never removed)
 *   D.tmp      the next descriptor while a save is in progress
 *   B.NAME.GEN.bmap  one data file per bitmap and generation, where B is the
 *              descriptor's file name without ".json"
 *
 * Save (crash-atomic, see the spec): write every bitmap that changed since
 * its data file was written to a data file of the new generation G+1 (fresh
 * names, never referenced by the current descriptor), fsync each, fsync the
 * directory; write D.tmp listing them (and the unchanged bitmaps with their
 * current files) plus a "garbage" list of the now-unreferenced old files,
 * fsync, rename over D, fsync the directory; only then unlink the garbage.
 * "Changed" is decided by content: the data checksum of the bits in memory
 * against the one of the bitmap's file (kept since open or the last save),
 * so whoever changes the bits (tracker, merge, clear, a shared mapping) needs
 * not say so, and a save costs one file write and fsync per changed bitmap,
 * not per bitmap (frozen checkpoint bitmaps are never rewritten).  A crash before the
 * rename leaves D (old state) intact and only unreferenced files behind; a
 * crash after it leaves the new state, and the garbage list lets the next
 * save finish the cleanup.
 *
 * Open never writes anything except creating D.lock (and, only when asked
 * with CBW_BITMAP_STORE_CREATE, the first descriptor of a new store); a
 * missing descriptor is otherwise an error; every validation
 * failure is reported as "PATH: problem" with a specific errno (table in the
 * spec).
 *
 * Locking: a store object is not thread-safe (the owner serialises calls).
 * Between processes, D.lock is held with flock(LOCK_EX|LOCK_NB) from open
 * to close; a second opener (any process, or the same process through a
 * second open) fails with EBUSY.  No I/O happens under any in-process lock
 * because there is none.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json-c/json.h>
#include <xxhash.h>

#include "bitmap_store.h"
#include "cleanup.h"
#include "fileutil.h"

#define FORMAT_NAME "cbw-bitmaps"
#define DATA_MAGIC "CBWBMAP\0"
#define DATA_HEADER_SIZE 64
#define DATA_OFFSET 4096           /* data starts page aligned */
#define SPARSE_CHUNK (1u << 20)    /* all-zero chunks of this size become holes */
#define CKSUM_PREFIX "xxh3:"
#define TRAILER_HEAD "  \"checksum\": \"" CKSUM_PREFIX
#define TRAILER_TAIL "\"\n}\n"
#define TRAILER_LEN (sizeof TRAILER_HEAD - 1 + 16 + sizeof TRAILER_TAIL - 1)
#define FILE_NAME_MAX 255
#define DATA_SUFFIX ".bmap"
#define VALUE_MAX (1ULL << 63)     /* sizes and generations fit in off_t */

/* The private part of a store; the public struct is its first member. */
struct store_impl {
  struct cbw_bitmap_store pub;
  char *base;                      /* descriptor file name without ".json" */
  char *files[CBW_BITMAP_MAX_COUNT]; /* data file of bitmaps[i] on disk, or NULL */
  uint64_t cksums[CBW_BITMAP_MAX_COUNT]; /* its data checksum (files[i] != NULL) */
  bool swept;                      /* orphans of a crashed save looked for */
  char **garbage;                  /* unreferenced files to unlink at next save */
  size_t ngarbage;
};

static inline struct store_impl *
impl (struct cbw_bitmap_store *st)
{
  return (struct store_impl *) st;
}

static void
free_list (char **list, size_t n)
{
  for (size_t i = 0; i < n; i++)
    free (list[i]);
  free (list);
}

static int
list_add (char ***list, size_t *n, const char *s)
{
  char **l;
  char *c;

  for (size_t i = 0; i < *n; i++)
    if (strcmp ((*list)[i], s) == 0)
      return 0;
  c = strdup (s);
  l = realloc (*list, (*n + 1) * sizeof *l);
  if (c == NULL || l == NULL) {
    free (c);
    if (l) *list = l;
    errno = ENOMEM;
    return -1;
  }
  l[(*n)++] = c;
  *list = l;
  return 0;
}

/* A printable copy of untrusted text for error messages. */
static void
sanitize (char *out, size_t outlen, const char *in)
{
  size_t i;
  for (i = 0; i + 1 < outlen && in[i]; i++)
    out[i] = (in[i] >= 0x20 && in[i] < 0x7f && in[i] != '\'') ? in[i] : '?';
  out[i] = '\0';
  if (in[i] && outlen > 4)
    memcpy (out + outlen - 4, "...", 4);
}

static void
crash_point (const char *step)
{
  const char *e = getenv (CBW_BITMAP_STORE_CRASH_ENV);
  if (e && strcmp (e, step) == 0)
    _exit (CBW_BITMAP_STORE_CRASH_EXIT);
}

static uint64_t
nbits_for (uint64_t image_size, uint64_t granularity)
{
  return image_size / granularity + (image_size % granularity != 0);
}

/* ---- validation helpers (public) ---- */

int
cbw_bitmap_name_valid (const char *name, struct cbw_err *err)
{
  char shown[64];
  size_t len;

  if (name == NULL)
    return cbw_err_set (err, EINVAL, "bitmap name missing");
  len = strnlen (name, CBW_BITMAP_NAME_MAX + 1);
  sanitize (shown, sizeof shown, name);
  if (len == 0)
    return cbw_err_set (err, EINVAL, "invalid bitmap name '': empty");
  if (len > CBW_BITMAP_NAME_MAX)
    return cbw_err_set (err, EINVAL, "invalid bitmap name '%s': longer than %d characters",
                        shown, CBW_BITMAP_NAME_MAX);
  if (strcmp (name, ".") == 0 || strcmp (name, "..") == 0)
    return cbw_err_set (err, EINVAL, "invalid bitmap name '%s': reserved", shown);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char) name[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
          || c == '_' || c == '.' || c == ':' || c == '-'))
      return cbw_err_set (err, EINVAL,
                          "invalid bitmap name '%s': character 0x%02x at offset %zu "
                          "not allowed (allowed: A-Z a-z 0-9 _ . : -)", shown, c, i);
  }
  return 0;
}

int
cbw_bitmap_granularity_valid (uint64_t granularity, struct cbw_err *err)
{
  if (granularity < CBW_BITMAP_GRAN_MIN)
    return cbw_err_set (err, EINVAL, "invalid granularity %" PRIu64 ": smaller than %llu",
                        granularity, CBW_BITMAP_GRAN_MIN);
  if (granularity > CBW_BITMAP_GRAN_MAX)
    return cbw_err_set (err, EINVAL, "invalid granularity %" PRIu64 ": larger than %llu",
                        granularity, CBW_BITMAP_GRAN_MAX);
  if (granularity & (granularity - 1))
    return cbw_err_set (err, EINVAL, "invalid granularity %" PRIu64 ": not a power of two",
                        granularity);
  return 0;
}

/* A data file name from a descriptor: a plain file name in the store's
 * directory, made of the same safe characters as bitmap names. */
static int
file_name_valid (const char *f, struct cbw_err *err)
{
  char shown[64];
  size_t len = strnlen (f, FILE_NAME_MAX + 1);

  sanitize (shown, sizeof shown, f);
  if (len == 0 || len > FILE_NAME_MAX || f[0] == '.')
    return cbw_err_set (err, EIO, "invalid data file name '%s'", shown);
  /* Only *.bmap files can ever be referenced or unlinked as garbage. */
  if (len <= strlen (DATA_SUFFIX) || strcmp (f + len - strlen (DATA_SUFFIX), DATA_SUFFIX) != 0)
    return cbw_err_set (err, EIO, "invalid data file name '%s': must end in \"" DATA_SUFFIX "\"",
                        shown);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char) f[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
          || c == '_' || c == '.' || c == ':' || c == '-' || c == '+'))
      return cbw_err_set (err, EIO, "invalid data file name '%s': character 0x%02x not allowed",
                          shown, c);
  }
  return 0;
}

char *
cbw_bitmap_store_default_path (const char *image_path)
{
  char *p;
  if (asprintf (&p, "%s.cbw-bitmaps.json", image_path) < 0)
    return NULL;
  return p;
}

/* ---- data files ---- */

static void
put_le32 (unsigned char *p, uint32_t v) { v = htole32 (v); memcpy (p, &v, 4); }
static void
put_le64 (unsigned char *p, uint64_t v) { v = htole64 (v); memcpy (p, &v, 8); }
static uint32_t
get_le32 (const unsigned char *p) { uint32_t v; memcpy (&v, p, 4); return le32toh (v); }
static uint64_t
get_le64 (const unsigned char *p) { uint64_t v; memcpy (&v, p, 8); return le64toh (v); }

static bool
all_zero (const unsigned char *p, size_t len)
{
  for (; len >= 8; p += 8, len -= 8) {
    uint64_t v;
    memcpy (&v, p, 8);
    if (v) return false;
  }
  for (; len; p++, len--)
    if (*p) return false;
  return true;
}

static char *
path_in_dir (const struct cbw_bitmap_store *st, const char *file)
{
  char *p;
  if (asprintf (&p, "%s/%s", st->dir, file) < 0)
    return NULL;
  return p;
}

/* The data checksum bitmap b's data file would have (as write_data_file). */
static int
bits_checksum (const struct cbw_stored_bitmap *b, uint64_t *cksum)
{
  uint64_t len = cbw_bitmap_serialized_size (&b->bits);
#if __BYTE_ORDER == __LITTLE_ENDIAN
  *cksum = XXH3_64bits (b->bits.words, len);
#else
  CLEANUP_FREE unsigned char *data = malloc (len ? len : 1);
  if (data == NULL)
    return -1;
  cbw_bitmap_serialize (&b->bits, data);
  *cksum = XXH3_64bits (data, len);
#endif
  return 0;
}

/* Write one data file (header page + little-endian bits), sparse where the
 * bits are zero, fsync it.  Returns the data checksum in *cksum. */
static int
write_data_file (const char *path, const struct cbw_stored_bitmap *b,
                 uint64_t image_size, uint64_t generation, uint64_t *cksum,
                 struct cbw_err *err)
{
  uint64_t len = cbw_bitmap_serialized_size (&b->bits);
  unsigned char hdr[DATA_OFFSET];
  CLEANUP_CLOSE int fd = -1;
  const unsigned char *src;

#if __BYTE_ORDER == __LITTLE_ENDIAN
  /* The in-memory words are already the on-disk byte order. */
  src = (const unsigned char *) b->bits.words;
#else
  CLEANUP_FREE unsigned char *data = malloc (len ? len : 1);

  if (data == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", path);
  cbw_bitmap_serialize (&b->bits, data);
  src = data;
#endif
  *cksum = XXH3_64bits (src, len);

  memset (hdr, 0, sizeof hdr);
  memcpy (hdr, DATA_MAGIC, 8);
  put_le32 (hdr + 8, CBW_BITMAP_FORMAT_VERSION);
  put_le32 (hdr + 12, DATA_OFFSET);
  put_le64 (hdr + 16, b->granularity);
  put_le64 (hdr + 24, image_size);
  put_le64 (hdr + 32, b->bits.nbits);
  put_le64 (hdr + 40, generation);
  put_le64 (hdr + 48, *cksum);
  put_le64 (hdr + 56, XXH3_64bits (hdr, 56));

  fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return cbw_err_set (err, errno, "%s: create: %s", path, strerror (errno));
  if (ftruncate (fd, (off_t) (DATA_OFFSET + len)) < 0)
    return cbw_err_set (err, errno, "%s: truncate: %s", path, strerror (errno));
  if (cbw_pwrite_full (fd, hdr, sizeof hdr, 0) < 0)
    return cbw_err_set (err, errno, "%s: write: %s", path, strerror (errno));
  /* One sequential pass; runs of zero chunks are left as holes (the file
   * was just truncated to its full size, so they read as zeros). */
  for (uint64_t off = 0; off < len; ) {
    uint64_t n = len - off < SPARSE_CHUNK ? len - off : SPARSE_CHUNK;
    uint64_t run = off;
    while (run < len) {
      uint64_t m = len - run < SPARSE_CHUNK ? len - run : SPARSE_CHUNK;
      if (all_zero (src + run, m)) break;
      run += m;
    }
    if (run > off) {
      if (cbw_pwrite_full (fd, src + off, run - off, DATA_OFFSET + off) < 0)
        return cbw_err_set (err, errno, "%s: write: %s", path, strerror (errno));
      off = run;
    }
    else
      off += n;
  }
  if (cbw_fsync (fd) < 0)
    return cbw_err_set (err, errno, "%s: fsync: %s", path, strerror (errno));
  if (close (fd) < 0) {
    fd = -1;
    return cbw_err_set (err, errno, "%s: close: %s", path, strerror (errno));
  }
  fd = -1;
  return 0;
}

/* Load and verify one data file into b->bits (already initialised to the
 * right size).  Errors name the data file. */
static int
load_data_file (const char *path, struct cbw_stored_bitmap *b, uint64_t image_size,
                uint64_t want_cksum, struct cbw_err *err)
{
  CLEANUP_CLOSE int fd = open (path, O_RDONLY | O_CLOEXEC);
  unsigned char hdr[DATA_OFFSET];
  uint64_t len = cbw_bitmap_serialized_size (&b->bits), got;
  struct stat sb;

  if (fd < 0)
    return cbw_err_set (err, errno, "%s: data file of bitmap '%s': open: %s",
                        path, b->name, strerror (errno));
  if (fstat (fd, &sb) < 0)
    return cbw_err_set (err, errno, "%s: stat: %s", path, strerror (errno));
  if (!S_ISREG (sb.st_mode))
    return cbw_err_set (err, EIO, "%s: data file of bitmap '%s' is not a regular file",
                        path, b->name);
  if ((uint64_t) sb.st_size < DATA_OFFSET + len)
    return cbw_err_set (err, EIO, "%s: data file of bitmap '%s' truncated "
                        "(%lld bytes, expected %" PRIu64 ")",
                        path, b->name, (long long) sb.st_size, DATA_OFFSET + len);
  if ((uint64_t) sb.st_size > DATA_OFFSET + len)
    return cbw_err_set (err, EIO, "%s: data file of bitmap '%s' too long "
                        "(%lld bytes, expected %" PRIu64 ")",
                        path, b->name, (long long) sb.st_size, DATA_OFFSET + len);
  if (cbw_pread_full (fd, hdr, sizeof hdr, 0) < 0)
    return cbw_err_set (err, errno, "%s: read header: %s", path, strerror (errno));
  if (memcmp (hdr, DATA_MAGIC, 8) != 0)
    return cbw_err_set (err, EIO, "%s: bad magic (not a cbw bitmap data file)", path);
  if (get_le64 (hdr + 56) != XXH3_64bits (hdr, 56))
    return cbw_err_set (err, EIO, "%s: bad header checksum (expected 0x%016" PRIx64
                        ", got 0x%016" PRIx64 ")", path,
                        XXH3_64bits (hdr, 56), get_le64 (hdr + 56));
  if (get_le32 (hdr + 8) != CBW_BITMAP_FORMAT_VERSION)
    return cbw_err_set (err, ENOTSUP, "%s: unsupported data file version %" PRIu32,
                        path, get_le32 (hdr + 8));
  if (get_le32 (hdr + 12) != DATA_OFFSET)
    return cbw_err_set (err, EIO, "%s: bad data offset %" PRIu32, path, get_le32 (hdr + 12));
  if (!all_zero (hdr + DATA_HEADER_SIZE, DATA_OFFSET - DATA_HEADER_SIZE))
    return cbw_err_set (err, EIO, "%s: non-zero bytes in header padding", path);
  if (get_le64 (hdr + 16) != b->granularity || get_le64 (hdr + 24) != image_size
      || get_le64 (hdr + 32) != b->bits.nbits || get_le64 (hdr + 40) != b->generation)
    return cbw_err_set (err, EIO, "%s: header does not match the descriptor for bitmap '%s' "
                        "(granularity %" PRIu64 "/%" PRIu64 ", image size %" PRIu64 "/%" PRIu64
                        ", bits %" PRIu64 "/%" PRIu64 ", generation %" PRIu64 "/%" PRIu64 ")",
                        path, b->name, get_le64 (hdr + 16), b->granularity,
                        get_le64 (hdr + 24), image_size, get_le64 (hdr + 32), b->bits.nbits,
                        get_le64 (hdr + 40), b->generation);
  /* Straight into the word array (one copy, no second buffer); its bytes
   * past len are still zero from cbw_bitmap_init(). */
  if (cbw_pread_full (fd, b->bits.words, len, DATA_OFFSET) < 0)
    return cbw_err_set (err, errno, "%s: read: %s", path,
                        errno == EIO ? "file shrank while reading" : strerror (errno));
  got = XXH3_64bits (b->bits.words, len);
  if (got != want_cksum)
    return cbw_err_set (err, EIO, "%s: bad data checksum for bitmap '%s' "
                        "(descriptor says 0x%016" PRIx64 ", data is 0x%016" PRIx64 ")",
                        path, b->name, want_cksum, got);
  if (got != get_le64 (hdr + 48))
    return cbw_err_set (err, EIO, "%s: bad data checksum (header says 0x%016" PRIx64
                        ", data is 0x%016" PRIx64 ")", path, get_le64 (hdr + 48), got);
  if (cbw_bitmap_deserialize_in_place (&b->bits) < 0)
    return cbw_err_set (err, EIO, "%s: padding bits past bit %" PRIu64 " are set",
                        path, b->bits.nbits);
  return 0;
}

/* ---- descriptor parsing ---- */

static const char *
type_name (json_object *o)
{
  return json_type_to_name (json_object_get_type (o));
}

/* Fetch a required member of a given JSON type. */
static int
get_member (json_object *obj, const char *key, json_type type, json_object **out,
            const char *where, struct cbw_err *err)
{
  if (!json_object_object_get_ex (obj, key, out))
    return cbw_err_set (err, EIO, "%smissing key \"%s\"", where, key);
  if (!json_object_is_type (*out, type))
    return cbw_err_set (err, EIO, "%skey \"%s\": expected %s, got %s",
                        where, key, json_type_to_name (type), type_name (*out));
  return 0;
}

static int
get_u64 (json_object *obj, const char *key, uint64_t *out, const char *where,
         struct cbw_err *err)
{
  json_object *v;

  if (get_member (obj, key, json_type_int, &v, where, err) < 0)
    return -1;
  if (json_object_get_int64 (v) < 0)
    return cbw_err_set (err, EIO, "%skey \"%s\": negative value", where, key);
  *out = json_object_get_uint64 (v);
  if (*out >= VALUE_MAX)
    return cbw_err_set (err, EIO, "%skey \"%s\": value %" PRIu64 " out of range",
                        where, key, *out);
  return 0;
}

static int
check_keys (json_object *obj, const char *const *known, const char *where,
            struct cbw_err *err)
{
  json_object_object_foreach (obj, key, val) {
    (void) val;
    bool ok = false;
    for (size_t i = 0; known[i]; i++)
      if (strcmp (key, known[i]) == 0) ok = true;
    if (!ok) {
      char shown[64];
      sanitize (shown, sizeof shown, key);
      return cbw_err_set (err, EIO, "%sunknown key \"%s\"", where, shown);
    }
  }
  return 0;
}

static int
parse_checksum (const char *s, uint64_t *out)
{
  char *end;
  if (strncmp (s, CKSUM_PREFIX, strlen (CKSUM_PREFIX)) != 0)
    return -1;
  s += strlen (CKSUM_PREFIX);
  if (strlen (s) != 16 || strspn (s, "0123456789abcdef") != 16)
    return -1;
  errno = 0;
  *out = strtoull (s, &end, 16);
  return errno || *end ? -1 : 0;
}

/* Verify the trailer checksum over buf[0 .. len-TRAILER_LEN). */
static int
verify_trailer (const char *buf, size_t len, struct cbw_err *err)
{
  const char *t;
  char hex[17];
  uint64_t want, got;

  if (len < TRAILER_LEN)
    return cbw_err_set (err, EIO, "checksum trailer missing (file too short)");
  t = buf + len - TRAILER_LEN;
  if (memcmp (t, TRAILER_HEAD, sizeof TRAILER_HEAD - 1) != 0
      || memcmp (buf + len - (sizeof TRAILER_TAIL - 1), TRAILER_TAIL,
                 sizeof TRAILER_TAIL - 1) != 0)
    return cbw_err_set (err, EIO, "checksum trailer missing or malformed "
                        "(the file must end with '  \"checksum\": \"xxh3:<16 hex>\"\\n}\\n')");
  memcpy (hex, t + sizeof TRAILER_HEAD - 1, 16);
  hex[16] = '\0';
  if (strspn (hex, "0123456789abcdef") != 16)
    return cbw_err_set (err, EIO, "checksum trailer malformed (not 16 lowercase hex digits)");
  want = strtoull (hex, NULL, 16);
  got = XXH3_64bits (buf, len - TRAILER_LEN);
  if (want != got)
    return cbw_err_set (err, EIO, "bad descriptor checksum (file says 0x%016" PRIx64
                        ", contents are 0x%016" PRIx64 ")", want, got);
  return 0;
}

static const char *const top_keys[] = {
  "format", "version", "generation", "image_size", "bitmaps", "garbage", "checksum", NULL
};
static const char *const bitmap_keys[] = {
  "name", "granularity", "image_size", "enabled", "state", "generation",
  "data_file", "checksum", NULL
};

/* Parse the descriptor text as one strict JSON value (nothing after it but
 * white space); *rootp on success. */
static int
parse_json (const char *path, const char *buf, size_t len, json_object **rootp,
            struct cbw_err *err)
{
  if (memchr (buf, '\0', len) != NULL)
    return cbw_err_set (err, EIO, "%s: malformed JSON: NUL byte in file", path);
  json_tokener *tok = json_tokener_new ();
  if (tok == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", path);
  json_tokener_set_flags (tok, JSON_TOKENER_STRICT);
  json_object *root = json_tokener_parse_ex (tok, buf, (int) len);
  if (root == NULL || json_tokener_get_error (tok) != json_tokener_success
      || strspn (buf + json_tokener_get_parse_end (tok), " \t\r\n")
         != len - json_tokener_get_parse_end (tok)) {
    enum json_tokener_error e = json_tokener_get_error (tok);
    cbw_err_set (err, EIO, "%s: malformed JSON at offset %zu: %s", path,
                 json_tokener_get_parse_end (tok),
                 root == NULL ? json_tokener_error_desc (e == json_tokener_continue
                                                         ? json_tokener_error_parse_eof : e)
                              : "trailing garbage after the JSON value");
    json_tokener_free (tok);
    json_object_put (root);
    return -1;
  }
  json_tokener_free (tok);
  *rootp = root;
  return 0;
}

/* The top level: format, version, checksum trailer, keys, generation and
 * image size; *bitmaps and *garbage are its two arrays. */
static int
check_top (struct cbw_bitmap_store *st, json_object *root, const char *buf, size_t len,
           uint64_t image_size, json_object **bitmaps, json_object **garbage,
           struct cbw_err *err)
{
  json_object *v = NULL;
  uint64_t disk_size;

  if (!json_object_is_type (root, json_type_object))
    return cbw_err_set (err, EIO, "%s: top level is %s, expected an object",
                        st->descriptor_path, type_name (root));
  if (!json_object_object_get_ex (root, "format", &v) || !json_object_is_type (v, json_type_string)
      || strcmp (json_object_get_string (v), FORMAT_NAME) != 0) {
    char shown[64] = "(missing)";
    if (v && json_object_is_type (v, json_type_string))
      sanitize (shown, sizeof shown, json_object_get_string (v));
    else if (v)
      snprintf (shown, sizeof shown, "(%s)", type_name (v));
    return cbw_err_set (err, EINVAL, "%s: wrong format \"%s\": not a cbw bitmap descriptor "
                        "(expected \"" FORMAT_NAME "\")", st->descriptor_path, shown);
  }
  if (!json_object_object_get_ex (root, "version", &v) || !json_object_is_type (v, json_type_int))
    return cbw_err_set (err, EIO, "%s: key \"version\" missing or not an integer",
                        st->descriptor_path);
  int64_t version = json_object_get_int64 (v);
  if (version != CBW_BITMAP_FORMAT_VERSION)
    return cbw_err_set (err, ENOTSUP, "%s: unsupported version %" PRId64 " (this build reads "
                        "version %d)", st->descriptor_path, version, CBW_BITMAP_FORMAT_VERSION);
  if (verify_trailer (buf, len, err) < 0
      || check_keys (root, top_keys, "", err) < 0
      || get_u64 (root, "generation", &st->generation, "", err) < 0
      || get_u64 (root, "image_size", &disk_size, "", err) < 0
      || get_member (root, "bitmaps", json_type_array, bitmaps, "", err) < 0
      || get_member (root, "garbage", json_type_array, garbage, "", err) < 0)
    return cbw_err_prefix (err, "%s", st->descriptor_path);
  if (disk_size != image_size)
    return cbw_err_set (err, EINVAL, "%s: image size mismatch: descriptor is for %" PRIu64
                        " bytes, image is %" PRIu64 " bytes", st->descriptor_path, disk_size,
                        image_size);
  if (json_object_array_length (*bitmaps) > CBW_BITMAP_MAX_COUNT)
    return cbw_err_set (err, EIO, "%s: too many bitmaps (%zu, limit %d)", st->descriptor_path,
                        json_object_array_length (*bitmaps), CBW_BITMAP_MAX_COUNT);
  return 0;
}

/* Bitmap entry i's name: valid, without NUL, not used by an earlier one. */
static int
check_bitmap_name (struct cbw_bitmap_store *st, size_t i, json_object *name,
                   struct cbw_err *err)
{
  if (cbw_bitmap_name_valid (json_object_get_string (name), err) < 0) {
    cbw_err_prefix (err, "%s: bitmap #%zu", st->descriptor_path, i);
    err->errnum = EIO;
    return -1;
  }
  if (strlen (json_object_get_string (name)) != (size_t) json_object_get_string_len (name))
    return cbw_err_set (err, EIO, "%s: bitmap #%zu: NUL byte in name", st->descriptor_path, i);
  for (size_t j = 0; j < i; j++)
    if (strcmp (st->bitmaps[j].name, json_object_get_string (name)) == 0)
      return cbw_err_set (err, EIO, "%s: duplicate bitmap name '%s' (entries #%zu and #%zu)",
                          st->descriptor_path, st->bitmaps[j].name, j, i);
  return 0;
}

/* Bitmap entry i, every field, no file I/O: st->bitmaps[i], si->files[i]
 * and *cksum (the data file's checksum). */
static int
parse_bitmap_entry (struct store_impl *si, size_t i, json_object *b, uint64_t image_size,
                    uint64_t *cksum, struct cbw_err *err)
{
  struct cbw_bitmap_store *st = &si->pub;
  json_object *name, *en, *state, *df, *ck;
  struct cbw_stored_bitmap *sb = &st->bitmaps[i];
  char where[64 + CBW_BITMAP_NAME_MAX];
  uint64_t bsize;

  snprintf (where, sizeof where, "bitmap #%zu: ", i);
  if (!json_object_is_type (b, json_type_object))
    return cbw_err_set (err, EIO, "%s: %sexpected an object, got %s", st->descriptor_path,
                        where, type_name (b));
  if (get_member (b, "name", json_type_string, &name, where, err) < 0)
    return cbw_err_prefix (err, "%s", st->descriptor_path);
  if (check_bitmap_name (st, i, name, err) < 0)
    return -1;
  snprintf (where, sizeof where, "bitmap '%s': ", json_object_get_string (name));
  if (check_keys (b, bitmap_keys, where, err) < 0
      || get_u64 (b, "granularity", &sb->granularity, where, err) < 0
      || get_u64 (b, "image_size", &bsize, where, err) < 0
      || get_u64 (b, "generation", &sb->generation, where, err) < 0
      || get_member (b, "enabled", json_type_boolean, &en, where, err) < 0
      || get_member (b, "state", json_type_string, &state, where, err) < 0
      || get_member (b, "data_file", json_type_string, &df, where, err) < 0
      || get_member (b, "checksum", json_type_string, &ck, where, err) < 0)
    return cbw_err_prefix (err, "%s", st->descriptor_path);
  if (cbw_bitmap_granularity_valid (sb->granularity, err) < 0) {
    cbw_err_prefix (err, "%s: bitmap '%s'", st->descriptor_path, json_object_get_string (name));
    err->errnum = EIO;
    return -1;
  }
  if (bsize != image_size)
    return cbw_err_set (err, EINVAL, "%s: bitmap '%s': image size mismatch: bitmap is for %"
                        PRIu64 " bytes, image is %" PRIu64 " bytes", st->descriptor_path,
                        json_object_get_string (name), bsize, image_size);
  if (sb->generation == 0 || sb->generation > st->generation)
    return cbw_err_set (err, EIO, "%s: %sgeneration %" PRIu64 " out of range (1..%" PRIu64 ")",
                        st->descriptor_path, where, sb->generation, st->generation);
  if (strcmp (json_object_get_string (state), "clean") == 0)
    sb->state = CBW_BITMAP_CLEAN;
  else if (strcmp (json_object_get_string (state), "in-use") == 0)
    sb->state = CBW_BITMAP_IN_USE;
  else {
    char shown[64];
    sanitize (shown, sizeof shown, json_object_get_string (state));
    return cbw_err_set (err, EIO, "%s: %sinvalid state \"%s\" (expected \"clean\" or "
                        "\"in-use\")", st->descriptor_path, where, shown);
  }
  if (parse_checksum (json_object_get_string (ck), cksum) < 0)
    return cbw_err_set (err, EIO, "%s: %smalformed checksum (expected \"" CKSUM_PREFIX
                        "<16 hex>\")", st->descriptor_path, where);
  if (file_name_valid (json_object_get_string (df), err) < 0)
    return cbw_err_prefix (err, "%s: %s", st->descriptor_path, where);
  for (size_t j = 0; j < i; j++)
    if (strcmp (si->files[j], json_object_get_string (df)) == 0)
      return cbw_err_set (err, EIO, "%s: %sdata file '%s' also used by bitmap '%s'",
                          st->descriptor_path, where, si->files[j], st->bitmaps[j].name);
  strcpy (sb->name, json_object_get_string (name));
  sb->enabled = json_object_get_boolean (en);
  si->files[i] = strdup (json_object_get_string (df));
  if (si->files[i] == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
  st->count = i + 1;
  return 0;
}

/* The garbage list: valid file names, none of them a bitmap's data file. */
static int
parse_garbage (struct store_impl *si, json_object *garbage, struct cbw_err *err)
{
  struct cbw_bitmap_store *st = &si->pub;
  for (size_t i = 0; i < json_object_array_length (garbage); i++) {
    json_object *g = json_object_array_get_idx (garbage, i);
    if (!json_object_is_type (g, json_type_string))
      return cbw_err_set (err, EIO, "%s: garbage entry #%zu: expected string, got %s",
                          st->descriptor_path, i, type_name (g));
    if (file_name_valid (json_object_get_string (g), err) < 0)
      return cbw_err_prefix (err, "%s: garbage entry #%zu", st->descriptor_path, i);
    for (size_t j = 0; j < st->count; j++)
      if (strcmp (si->files[j], json_object_get_string (g)) == 0)
        return cbw_err_set (err, EIO, "%s: garbage entry '%s' is the data file of bitmap '%s'",
                            st->descriptor_path, si->files[j], st->bitmaps[j].name);
    if (list_add (&si->garbage, &si->ngarbage, json_object_get_string (g)) < 0)
      return cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
  }
  return 0;
}

/* Every bitmap's data file, checked against its checksum cksums[i]. */
static int
load_data_files (struct store_impl *si, const uint64_t *cksums, uint64_t image_size,
                 struct cbw_err *err)
{
  struct cbw_bitmap_store *st = &si->pub;
  for (size_t i = 0; i < st->count; i++) {
    struct cbw_stored_bitmap *sb = &st->bitmaps[i];
    CLEANUP_FREE char *path = path_in_dir (st, si->files[i]);
    uint64_t nbits = nbits_for (image_size, sb->granularity);

    if (path == NULL)
      return cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
    if (cbw_bitmap_init (&sb->bits, nbits) < 0)
      return cbw_err_set (err, errno, "%s: bitmap '%s': cannot allocate %" PRIu64 " bits: %s",
                          st->descriptor_path, sb->name, nbits, strerror (errno));
    si->cksums[i] = cksums[i];
    if (load_data_file (path, sb, image_size, cksums[i], err) < 0)
      return -1;
  }
  return 0;
}

/* Parse and validate the descriptor text (pass 1: every field, no file
 * I/O), then load the data files (pass 2).  Every message names the
 * descriptor, except those of load_data_file, which name the data file. */
static int
load_descriptor (struct store_impl *si, const char *buf, size_t len,
                 uint64_t image_size, struct cbw_err *err)
{
  struct cbw_bitmap_store *st = &si->pub;
  json_object *root = NULL, *bitmaps, *garbage;
  uint64_t *cksums = NULL;
  int ret = -1;

  if (parse_json (st->descriptor_path, buf, len, &root, err) < 0)
    return -1;
  if (check_top (st, root, buf, len, image_size, &bitmaps, &garbage, err) < 0)
    goto out;
  cksums = calloc (json_object_array_length (bitmaps) + 1, sizeof *cksums);
  if (cksums == NULL) {
    cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
    goto out;
  }
  for (size_t i = 0; i < json_object_array_length (bitmaps); i++)
    if (parse_bitmap_entry (si, i, json_object_array_get_idx (bitmaps, i), image_size,
                            &cksums[i], err) < 0)
      goto out;
  if (parse_garbage (si, garbage, err) < 0 || load_data_files (si, cksums, image_size, err) < 0)
    goto out;
  ret = 0;
 out:
  free (cksums);
  json_object_put (root);
  return ret;
}

/* ---- open / close ---- */

static void
store_free (struct store_impl *si)
{
  struct cbw_bitmap_store *st = &si->pub;

  for (size_t i = 0; i < CBW_BITMAP_MAX_COUNT; i++) {
    cbw_bitmap_free (&st->bitmaps[i].bits);
    free (si->files[i]);
  }
  free (st->bitmaps);
  free_list (si->garbage, si->ngarbage);
  if (st->lock_fd >= 0)
    close (st->lock_fd);         /* releases the flock */
  free (st->descriptor_path);
  free (st->dir);
  free (si->base);
  free (si);
}

struct cbw_bitmap_store *
cbw_bitmap_store_open (const char *descriptor_path, uint64_t image_size,
                       struct cbw_err *err)
{
  return cbw_bitmap_store_open_ex (descriptor_path, image_size,
                                   CBW_BITMAP_STORE_EMPTY_IF_MISSING, err);
}

struct cbw_bitmap_store *
cbw_bitmap_store_open_ex (const char *descriptor_path, uint64_t image_size,
                          unsigned flags, struct cbw_err *err)
{
  struct store_impl *si;
  struct cbw_bitmap_store *st;
  struct cbw_err local_err;
  CLEANUP_FREE char *lock_path = NULL;
  CLEANUP_FREE char *buf = NULL;
  const char *slash;
  size_t len, blen;

  if (err == NULL)
    err = &local_err;           /* the loader inspects err->errnum */
  if (descriptor_path == NULL || descriptor_path[0] == '\0') {
    cbw_err_set (err, EINVAL, "bitmap store: empty descriptor path");
    return NULL;
  }
  if (image_size >= VALUE_MAX) {
    cbw_err_set (err, EINVAL, "%s: image size %" PRIu64 " out of range",
                 descriptor_path, image_size);
    return NULL;
  }
  si = calloc (1, sizeof *si);
  if (si == NULL) {
    cbw_err_set (err, ENOMEM, "%s: out of memory", descriptor_path);
    return NULL;
  }
  st = &si->pub;
  st->lock_fd = -1;
  st->image_size = image_size;
  /* Fixed capacity: pointers returned by find/add stay valid across add. */
  st->bitmaps = calloc (CBW_BITMAP_MAX_COUNT, sizeof *st->bitmaps);
  st->descriptor_path = strdup (descriptor_path);
  slash = strrchr (descriptor_path, '/');
  st->dir = slash == NULL ? strdup (".")
          : slash == descriptor_path ? strdup ("/")
          : strndup (descriptor_path, (size_t) (slash - descriptor_path));
  si->base = strdup (slash ? slash + 1 : descriptor_path);
  if (st->bitmaps == NULL || st->descriptor_path == NULL || st->dir == NULL || si->base == NULL
      || asprintf (&lock_path, "%s.lock", descriptor_path) < 0) {
    lock_path = NULL;
    cbw_err_set (err, ENOMEM, "%s: out of memory", descriptor_path);
    goto fail;
  }
  blen = strlen (si->base);
  if (blen == 0) {
    cbw_err_set (err, EINVAL, "%s: descriptor path names a directory", descriptor_path);
    goto fail;
  }
  if (blen > 5 && strcmp (si->base + blen - 5, ".json") == 0)
    si->base[blen - 5] = '\0';

  st->lock_fd = open (lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (st->lock_fd < 0) {
    cbw_err_set (err, errno, "%s: create lock file: %s", lock_path, strerror (errno));
    goto fail;
  }
  if (flock (st->lock_fd, LOCK_EX | LOCK_NB) < 0) {
    if (errno == EWOULDBLOCK)
      cbw_err_set (err, EBUSY, "%s: bitmap store is locked by another user "
                   "(lock file held)", lock_path);
    else
      cbw_err_set (err, errno, "%s: flock: %s", lock_path, strerror (errno));
    goto fail;
  }

  if (cbw_read_file (descriptor_path, CBW_BITMAP_DESCRIPTOR_MAX, &buf, &len, err) < 0) {
    if (err->errnum == ENOENT && (flags & CBW_BITMAP_STORE_EMPTY_IF_MISSING))
      return st;                 /* new, empty store, written at first save */
    if (err->errnum == ENOENT && (flags & CBW_BITMAP_STORE_CREATE)) {
      /* Written now: from here on a missing descriptor means lost metadata. */
      if (cbw_bitmap_store_save (st, err) < 0) {
        cbw_err_prefix (err, "%s: creating a new bitmap store", descriptor_path);
        goto fail;
      }
      return st;
    }
    if (err->errnum == ENOENT) {
      cbw_err_set (err, ENOENT, "%s: bitmap descriptor missing (the bitmaps of this "
                   "image are lost or were never created here; a new, empty store is "
                   "only created when asked for explicitly)", descriptor_path);
      goto fail;
    }
    if (err->errnum == EFBIG)
      cbw_err_set (err, EFBIG, "%s: descriptor too large (limit %d bytes)",
                   descriptor_path, CBW_BITMAP_DESCRIPTOR_MAX);
    goto fail;
  }
  if (load_descriptor (si, buf, len, image_size, err) < 0)
    goto fail;
  return st;

 fail:
  store_free (si);
  return NULL;
}

void
cbw_bitmap_store_close (struct cbw_bitmap_store *st)
{
  if (st)
    store_free (impl (st));
}

/* ---- in-memory edits ---- */

struct cbw_stored_bitmap *
cbw_bitmap_store_find (struct cbw_bitmap_store *st, const char *name)
{
  for (size_t i = 0; i < st->count; i++)
    if (strcmp (st->bitmaps[i].name, name) == 0)
      return &st->bitmaps[i];
  return NULL;
}

struct cbw_stored_bitmap *
cbw_bitmap_store_add (struct cbw_bitmap_store *st, const char *name,
                      uint64_t granularity, bool enabled, struct cbw_err *err)
{
  struct cbw_stored_bitmap *b;
  uint64_t nbits;

  if (cbw_bitmap_name_valid (name, err) < 0
      || cbw_bitmap_granularity_valid (granularity, err) < 0)
    return NULL;
  if (cbw_bitmap_store_find (st, name) != NULL) {
    cbw_err_set (err, EEXIST, "%s: bitmap '%s' already exists", st->descriptor_path, name);
    return NULL;
  }
  if (st->count >= CBW_BITMAP_MAX_COUNT) {
    cbw_err_set (err, ENOSPC, "%s: too many bitmaps (limit %d)", st->descriptor_path,
                 CBW_BITMAP_MAX_COUNT);
    return NULL;
  }
  b = &st->bitmaps[st->count];
  nbits = nbits_for (st->image_size, granularity);
  if (cbw_bitmap_init (&b->bits, nbits) < 0) {
    cbw_err_set (err, errno, "%s: bitmap '%s': cannot allocate %" PRIu64 " bits: %s",
                 st->descriptor_path, name, nbits, strerror (errno));
    return NULL;
  }
  strcpy (b->name, name);
  b->granularity = granularity;
  b->enabled = enabled;
  b->state = CBW_BITMAP_CLEAN;
  b->generation = 0;
  impl (st)->files[st->count] = NULL;
  st->count++;
  return b;
}

int
cbw_bitmap_store_remove (struct cbw_bitmap_store *st, const char *name,
                         struct cbw_err *err)
{
  struct store_impl *si = impl (st);
  struct cbw_stored_bitmap *b = cbw_bitmap_store_find (st, name);
  size_t i;

  if (b == NULL) {
    char shown[64];
    sanitize (shown, sizeof shown, name);
    return cbw_err_set (err, ENOENT, "%s: no bitmap named '%s'", st->descriptor_path, shown);
  }
  i = (size_t) (b - st->bitmaps);
  /* Its data file becomes garbage once a descriptor without it is saved. */
  if (si->files[i] && list_add (&si->garbage, &si->ngarbage, si->files[i]) < 0)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
  free (si->files[i]);
  cbw_bitmap_free (&b->bits);
  memmove (&st->bitmaps[i], &st->bitmaps[i + 1], (st->count - i - 1) * sizeof *b);
  memmove (&si->files[i], &si->files[i + 1], (st->count - i - 1) * sizeof si->files[0]);
  memmove (&si->cksums[i], &si->cksums[i + 1], (st->count - i - 1) * sizeof si->cksums[0]);
  st->count--;
  memset (&st->bitmaps[st->count], 0, sizeof *b);
  si->files[st->count] = NULL;
  return 0;
}

/* ---- save ---- */

static char *
descriptor_text (struct cbw_bitmap_store *st, uint64_t gen, char **files,
                 const uint64_t *gens, const uint64_t *cksums, char **garbage,
                 size_t ngarbage, size_t *len)
{
  char *text = NULL;
  size_t size = 0;
  FILE *f = open_memstream (&text, &size);
  char trailer[TRAILER_LEN + 1];

  if (f == NULL)
    return NULL;
  fprintf (f, "{\n  \"format\": \"" FORMAT_NAME "\",\n  \"version\": %d,\n"
           "  \"generation\": %" PRIu64 ",\n  \"image_size\": %" PRIu64 ",\n  \"bitmaps\": [",
           CBW_BITMAP_FORMAT_VERSION, gen, st->image_size);
  for (size_t i = 0; i < st->count; i++) {
    const struct cbw_stored_bitmap *b = &st->bitmaps[i];
    /* Names and file names are restricted to characters that need no
     * JSON escaping (validated on add and on load). */
    fprintf (f, "%s\n    {\n      \"name\": \"%s\",\n      \"granularity\": %" PRIu64 ",\n"
             "      \"image_size\": %" PRIu64 ",\n      \"enabled\": %s,\n"
             "      \"state\": \"%s\",\n      \"generation\": %" PRIu64 ",\n"
             "      \"data_file\": \"%s\",\n      \"checksum\": \"" CKSUM_PREFIX "%016" PRIx64
             "\"\n    }", i ? "," : "", b->name, b->granularity, st->image_size,
             b->enabled ? "true" : "false", b->state == CBW_BITMAP_IN_USE ? "in-use" : "clean",
             gens[i], files[i], cksums[i]);
  }
  fprintf (f, "%s],\n  \"garbage\": [", st->count ? "\n  " : "");
  for (size_t i = 0; i < ngarbage; i++)
    fprintf (f, "%s\"%s\"", i ? ", " : "", garbage[i]);
  fprintf (f, "],\n");
  if (fclose (f) != 0) {
    free (text);
    return NULL;
  }
  snprintf (trailer, sizeof trailer, TRAILER_HEAD "%016" PRIx64 TRAILER_TAIL,
            XXH3_64bits (text, size));
  char *all = realloc (text, size + TRAILER_LEN + 1);
  if (all == NULL) {
    free (text);
    return NULL;
  }
  memcpy (all + size, trailer, TRAILER_LEN + 1);
  *len = size + TRAILER_LEN;
  return all;
}

static bool
name_in (char *const *list, size_t n, const char *name)
{
  for (size_t i = 0; i < n; i++)
    if (list[i] && strcmp (list[i], name) == 0)
      return true;
  return false;
}

/* Would a data file of generation gen reuse a referenced or garbage name? */
static bool
gen_collides (struct store_impl *si, uint64_t gen)
{
  for (size_t i = 0; i < si->pub.count; i++) {
    CLEANUP_FREE char *n = NULL;
    if (asprintf (&n, "%s.%s.%" PRIu64 DATA_SUFFIX, si->base, si->pub.bitmaps[i].name, gen) < 0)
      return false;             /* the real formatting below reports ENOMEM */
    if (name_in (si->files, si->pub.count, n) || name_in (si->garbage, si->ngarbage, n))
      return true;
  }
  return false;
}

int
cbw_bitmap_store_save (struct cbw_bitmap_store *st, struct cbw_err *err)
{
  struct store_impl *si = impl (st);
  uint64_t gen = st->generation + 1;
  CLEANUP_FREE uint64_t *cksums = calloc (st->count + 1, sizeof (uint64_t));
  CLEANUP_FREE uint64_t *gens = calloc (st->count + 1, sizeof (uint64_t));
  CLEANUP_FREE bool *keep = calloc (st->count + 1, sizeof (bool));
  char **newfiles = calloc (st->count + 1, sizeof (char *));
  char **garbage = NULL;
  size_t ngarbage = 0, created = 0, len = 0, nwritten = 0;
  CLEANUP_FREE char *text = NULL;
  CLEANUP_FREE char *tmp = NULL;
  bool committed = false;
  int fd, ret = -1;

  if (cksums == NULL || gens == NULL || keep == NULL || newfiles == NULL) {
    free (newfiles);
    return cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
  }
  /* 1. New data files under new names.  Names embed the generation, so they
   * differ from every file the on-disk descriptor references, unless a
   * descriptor was written by hand with odd names: then skip generations. */
  while (gen_collides (si, gen))
    gen++;
  for (size_t i = 0; i < st->count; i++) {
    CLEANUP_FREE char *path = NULL;
    /* Unchanged since its file was written: the descriptor keeps that file
     * (and its generation); nothing is written for it. */
    if (si->files[i] && bits_checksum (&st->bitmaps[i], &cksums[i]) == 0 &&
        cksums[i] == si->cksums[i]) {
      keep[i] = true;
      gens[i] = st->bitmaps[i].generation;
      continue;
    }
    gens[i] = gen;
    if (asprintf (&newfiles[i], "%s.%s.%" PRIu64 DATA_SUFFIX, si->base,
                  st->bitmaps[i].name, gen) < 0) {
      newfiles[i] = NULL;
      cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
      goto out;
    }
    path = path_in_dir (st, newfiles[i]);
    if (path == NULL) {
      cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
      goto out;
    }
    created = i + 1;
    if (write_data_file (path, &st->bitmaps[i], st->image_size, gen, &cksums[i], err) < 0)
      goto out;
    if (nwritten++ == 0)
      crash_point ("data-file");
  }
  /* New names must be durable before a descriptor refers to them. */
  if (nwritten && cbw_fsync_dir_of (st->descriptor_path, err) < 0)
    goto out;
  crash_point ("data-files");

  /* 2. The garbage list: every file the current descriptor references or
   * lists as garbage, and files of removed bitmaps. */
  for (size_t i = 0; i < si->ngarbage; i++)
    if (list_add (&garbage, &ngarbage, si->garbage[i]) < 0)
      goto oom;
  for (size_t i = 0; i < st->count; i++)
    if (si->files[i] && !keep[i] && list_add (&garbage, &ngarbage, si->files[i]) < 0)
      goto oom;

  /* 3. Descriptor: temp, fsync, rename, fsync dir (cbw_write_file_atomic's
   * protocol, spelled out here so that each step has a crash point). */
  for (size_t i = 0; i < st->count; i++)
    if (keep[i] && (newfiles[i] = strdup (si->files[i])) == NULL)
      goto oom;
  text = descriptor_text (st, gen, newfiles, gens, cksums, garbage, ngarbage, &len);
  if (text == NULL || asprintf (&tmp, "%s.tmp", st->descriptor_path) < 0) {
    tmp = NULL;
    goto oom;
  }
  fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    cbw_err_set (err, errno, "%s: create: %s", tmp, strerror (errno));
    goto out;
  }
  if (cbw_pwrite_full (fd, text, len, 0) < 0 || cbw_fsync (fd) < 0) {
    cbw_err_set (err, errno, "%s: write: %s", tmp, strerror (errno));
    close (fd);
    unlink (tmp);
    goto out;
  }
  if (close (fd) < 0) {
    cbw_err_set (err, errno, "%s: close: %s", tmp, strerror (errno));
    unlink (tmp);
    goto out;
  }
  crash_point ("descriptor-tmp");
  if (rename (tmp, st->descriptor_path) < 0) {
    cbw_err_set (err, errno, "%s: rename to %s: %s", tmp, st->descriptor_path, strerror (errno));
    unlink (tmp);
    goto out;
  }
  /* From here the new state is what a reader sees: commit in memory even if
   * the directory fsync fails (then we still report the error). */
  committed = true;
  crash_point ("rename");
  st->generation = gen;
  for (size_t i = 0; i < st->count; i++) {
    st->bitmaps[i].generation = gens[i];
    free (si->files[i]);
    si->files[i] = newfiles[i];
    si->cksums[i] = cksums[i];
    newfiles[i] = NULL;
  }
  free_list (si->garbage, si->ngarbage);
  si->garbage = NULL;
  si->ngarbage = 0;
  if (cbw_fsync_dir_of (st->descriptor_path, err) < 0) {
    /* Keep the garbage: the rename may not be durable yet. */
    si->garbage = garbage;
    si->ngarbage = ngarbage;
    garbage = NULL;
    ngarbage = 0;
    goto out;
  }

  /* 4. Cleanup.  Failures are not errors: the next save retries them.
   * Once per open: a save that crashed before its commit left data files
   * of this generation behind; bitmaps rewritten now overwrote theirs, the
   * unchanged ones did not (their names are unreferenced: see gen_collides). */
  if (!si->swept) {
    for (size_t i = 0; i < st->count; i++) {
      char *orphan;
      if (keep[i] && asprintf (&orphan, "%s/%s.%s.%" PRIu64 DATA_SUFFIX, st->dir, si->base,
                               st->bitmaps[i].name, gen) >= 0) {
        unlink (orphan);
        free (orphan);
      }
    }
    si->swept = true;
  }
  for (size_t i = 0; i < ngarbage; i++) {
    CLEANUP_FREE char *path = path_in_dir (st, garbage[i]);
    if (path == NULL || (unlink (path) < 0 && errno != ENOENT)) {
      if (list_add (&si->garbage, &si->ngarbage, garbage[i]) < 0) { /* best effort */ }
    }
    crash_point ("cleanup");
  }
  ret = 0;
  goto out;

 oom:
  cbw_err_set (err, ENOMEM, "%s: out of memory", st->descriptor_path);
 out:
  if (!committed) {
    /* Nothing references the new files: remove them (best effort); the
     * files of unchanged bitmaps are the committed ones: kept. */
    for (size_t i = 0; i < created; i++) {
      CLEANUP_FREE char *path = newfiles[i] && !keep[i] ? path_in_dir (st, newfiles[i]) : NULL;
      if (path) unlink (path);
    }
  }
  free_list (newfiles, st->count);
  free_list (garbage, ngarbage);
  return ret;
}
