/* cbw — formats/overlay.c: read, validate and write the overlay chain files
 * (chain descriptor, overlay descriptors, allocation maps).  Spec:
 * docs/formats/overlay.md.
 *
 * JSON descriptors carry "checksum": "xxh64:HEX", the XXH64 (seed 0) of the
 * descriptor object without its checksum member, serialised by json-c in
 * plain form (JSON_C_TO_STRING_PLAIN | NOSLASHESCAPE), members in file order.
 * Map files are binary: a 64-byte little-endian header with its own XXH64
 * and the XXH64 of the payload (alloc bits, then zero bits).
 *
 * Nothing read from a file is trusted: sizes, counts and names are checked
 * before use, and every error names the file and the problem.
 *
 * Locking: none; callers serialise updates of one file.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <xxhash.h>

#include "cleanup.h"
#include "fileutil.h"
#include "overlay.h"

static const char MAP_MAGIC[8] = { 'C', 'B', 'W', 'O', 'V', 'M', 'A', 'P' };

/* ---------------------------------------------------------------- helpers */

char *
cbw_ovl_dirname (const char *path)
{
  CLEANUP_FREE char *c = strdup (path);
  if (c == NULL) return NULL;
  return strdup (dirname (c));
}

char *
cbw_ovl_join (const char *dir, const char *name)
{
  char *r;
  if (name[0] == '/')
    return strdup (name);
  if (asprintf (&r, "%s/%s", dir, name) < 0)
    return NULL;
  return r;
}

int
cbw_ovl_name_valid (const char *name, struct cbw_err *err)
{
  size_t i, n = strlen (name);
  if (n == 0 || n > CBW_OVL_NAME_MAX)
    return cbw_err_set (err, EINVAL, "layer name '%.64s': length must be 1..%d",
                        name, CBW_OVL_NAME_MAX);
  if (strcmp (name, ".") == 0 || strcmp (name, "..") == 0)
    return cbw_err_set (err, EINVAL, "layer name '%s' not allowed", name);
  for (i = 0; i < n; i++) {
    char ch = name[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
          (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' || ch == '-' ||
          ch == '+'))
      return cbw_err_set (err, EINVAL,
                          "layer name '%.64s': character 0x%02x not allowed "
                          "(use [A-Za-z0-9_.+-])", name, (unsigned char) ch);
  }
  return 0;
}

const char *
cbw_commit_mode_name (enum cbw_commit_mode m)
{
  return m == CBW_COMMIT_MAKE_EMPTY ? "make-empty" : "delete";
}

static int
cluster_size_valid (uint64_t cs, const char *what, struct cbw_err *err)
{
  if (cs < CBW_OVL_CLUSTER_MIN || cs > CBW_OVL_CLUSTER_MAX || (cs & (cs - 1)))
    return cbw_err_set (err, EINVAL, "%s: cluster size %" PRIu64
                        " invalid (power of two in %u..%u)", what, cs,
                        CBW_OVL_CLUSTER_MIN, CBW_OVL_CLUSTER_MAX);
  return 0;
}

static int
disk_size_valid (uint64_t size, const char *what, struct cbw_err *err)
{
  if (size == 0 || size > (UINT64_C (1) << 60))
    return cbw_err_set (err, EINVAL, "%s: disk size %" PRIu64 " invalid",
                        what, size);
  return 0;
}

static uint64_t
json_checksum (struct json_object *obj)
{
  const char *s = json_object_to_json_string_ext
    (obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
  return XXH64 (s, strlen (s), 0);
}

/* Add checksum member, write crash-atomically (pretty, one line per member);
 * with create, PATH must not exist (cbw_write_file_new: O_EXCL). */
static int
json_save_checksummed (const char *path, struct json_object *obj, bool create,
                       struct cbw_err *err)
{
  char sum[32];
  snprintf (sum, sizeof sum, "xxh64:%016" PRIx64, json_checksum (obj));
  json_object_object_add (obj, "checksum", json_object_new_string (sum));
  const char *s = json_object_to_json_string_ext
    (obj, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE);
  CLEANUP_FREE char *text = NULL;
  if (asprintf (&text, "%s\n", s) < 0) {
    text = NULL;
    return cbw_err_set (err, ENOMEM, "%s: out of memory", path);
  }
  if (create)
    return cbw_write_file_new (path, text, strlen (text), err);
  return cbw_write_file_atomic (path, text, strlen (text), err);
}

/* Read PATH, parse strictly, check format name, version and checksum.
 * Returns the object without its checksum member. */
static struct json_object *
json_load_checksummed (const char *path, const char *format,
                       struct cbw_err *err)
{
  CLEANUP_FREE char *buf = NULL;
  size_t len;
  struct json_tokener *tok;
  struct json_object *obj, *v;
  const char *sum;
  char want[32];

  if (cbw_read_file (path, CBW_OVL_JSON_MAX, &buf, &len, err) < 0)
    return NULL;
  if (len == 0) {
    cbw_err_set (err, EIO, "%s: empty file (truncated descriptor)", path);
    return NULL;
  }
  if (strlen (buf) != len) {
    cbw_err_set (err, EIO, "%s: NUL byte in descriptor (corrupt)", path);
    return NULL;
  }
  tok = json_tokener_new_ex (16);
  if (tok == NULL) {
    cbw_err_set (err, ENOMEM, "%s: out of memory", path);
    return NULL;
  }
  json_tokener_set_flags (tok, JSON_TOKENER_STRICT);
  obj = json_tokener_parse_ex (tok, buf, (int) len);
  enum json_tokener_error jerr = json_tokener_get_error (tok);
  size_t used = tok->char_offset;
  json_tokener_free (tok);
  if (obj == NULL || jerr != json_tokener_success) {
    cbw_err_set (err, EIO, "%s: not valid JSON (%s; truncated or corrupt)",
                 path, jerr == json_tokener_continue ? "unexpected end of file"
                 : json_tokener_error_desc (jerr));
    json_object_put (obj);
    return NULL;
  }
  for (; used < len; used++)
    if (buf[used] != ' ' && buf[used] != '\n' && buf[used] != '\t' && buf[used] != '\r') {
      cbw_err_set (err, EIO, "%s: trailing garbage after JSON object", path);
      json_object_put (obj);
      return NULL;
    }
  if (!json_object_is_type (obj, json_type_object)) {
    cbw_err_set (err, EIO, "%s: not a JSON object", path);
    json_object_put (obj);
    return NULL;
  }
  if (!json_object_object_get_ex (obj, "format", &v) ||
      !json_object_is_type (v, json_type_string) ||
      strcmp (json_object_get_string (v), format) != 0) {
    cbw_err_set (err, EIO, "%s: not a %s descriptor (\"format\" missing or wrong)",
                 path, format);
    json_object_put (obj);
    return NULL;
  }
  if (!json_object_object_get_ex (obj, "version", &v) ||
      !json_object_is_type (v, json_type_int)) {
    cbw_err_set (err, EIO, "%s: \"version\" missing", path);
    json_object_put (obj);
    return NULL;
  }
  if (json_object_get_int64 (v) != CBW_OVERLAY_FORMAT_VERSION) {
    cbw_err_set (err, ENOTSUP, "%s: unsupported version %" PRId64 " (this build reads %d)",
                 path, json_object_get_int64 (v), CBW_OVERLAY_FORMAT_VERSION);
    json_object_put (obj);
    return NULL;
  }
  if (!json_object_object_get_ex (obj, "checksum", &v) ||
      !json_object_is_type (v, json_type_string)) {
    cbw_err_set (err, EIO, "%s: \"checksum\" missing", path);
    json_object_put (obj);
    return NULL;
  }
  sum = json_object_get_string (v);
  char got[64];
  snprintf (got, sizeof got, "%s", sum);
  json_object_object_del (obj, "checksum");
  snprintf (want, sizeof want, "xxh64:%016" PRIx64, json_checksum (obj));
  if (strcmp (got, want) != 0) {
    cbw_err_set (err, EIO, "%s: bad checksum (file says %.40s, content hashes to %s)",
                 path, got, want);
    json_object_put (obj);
    return NULL;
  }
  return obj;
}

static int
get_u64 (struct json_object *obj, const char *key, uint64_t *out,
         const char *path, struct cbw_err *err)
{
  struct json_object *v;
  if (!json_object_object_get_ex (obj, key, &v) ||
      !json_object_is_type (v, json_type_int))
    return cbw_err_set (err, EIO, "%s: \"%s\" missing or not an integer", path, key);
  errno = 0;
  int64_t i = json_object_get_int64 (v);
  if (i < 0 || errno)
    return cbw_err_set (err, EIO, "%s: \"%s\" out of range", path, key);
  *out = (uint64_t) i;
  return 0;
}

static int
get_str (struct json_object *obj, const char *key, char **out, bool name,
         const char *path, struct cbw_err *err)
{
  struct json_object *v;
  if (!json_object_object_get_ex (obj, key, &v) ||
      !json_object_is_type (v, json_type_string))
    return cbw_err_set (err, EIO, "%s: \"%s\" missing or not a string", path, key);
  const char *s = json_object_get_string (v);
  if ((size_t) json_object_get_string_len (v) != strlen (s))
    return cbw_err_set (err, EIO, "%s: \"%s\" contains a NUL byte", path, key);
  if (name && cbw_ovl_name_valid (s, err) < 0)
    return cbw_err_prefix (err, "%s: \"%s\"", path, key);
  if (!name && (s[0] == '\0' || strlen (s) > 4096))
    return cbw_err_set (err, EIO, "%s: \"%s\" empty or too long", path, key);
  *out = strdup (s);
  if (*out == NULL)
    return cbw_err_set (err, ENOMEM, "%s: out of memory", path);
  return 0;
}

/* ------------------------------------------------------------------ maps */

int
cbw_ovl_map_init (struct cbw_ovl_map *m, uint64_t disk_size,
                  uint32_t cluster_size, struct cbw_err *err)
{
  memset (m, 0, sizeof *m);
  if (disk_size_valid (disk_size, "map", err) < 0 ||
      cluster_size_valid (cluster_size, "map", err) < 0)
    return -1;
  m->disk_size = disk_size;
  m->cluster_size = cluster_size;
  m->cluster_bits = (uint32_t) __builtin_ctz (cluster_size);
  m->nclusters = (disk_size + cluster_size - 1) / cluster_size;
  if (cbw_bitmap_init (&m->alloc, m->nclusters) < 0)
    return cbw_err_set (err, errno, "map: %s", strerror (errno));
  if (cbw_bitmap_init (&m->zero, m->nclusters) < 0) {
    int e = errno;
    cbw_bitmap_free (&m->alloc);
    return cbw_err_set (err, e, "map: %s", strerror (e));
  }
  return 0;
}

void
cbw_ovl_map_free (struct cbw_ovl_map *m)
{
  cbw_bitmap_free (&m->alloc);
  cbw_bitmap_free (&m->zero);
}

enum cbw_ovl_state
cbw_ovl_map_get (const struct cbw_ovl_map *m, uint64_t c)
{
  if (!cbw_bitmap_test (&m->alloc, c))
    return CBW_OVL_UNALLOC;
  return cbw_bitmap_test (&m->zero, c) ? CBW_OVL_ZERO : CBW_OVL_DATA;
}

void
cbw_ovl_map_set (struct cbw_ovl_map *m, uint64_t start, uint64_t count,
                 enum cbw_ovl_state st)
{
  switch (st) {
  case CBW_OVL_UNALLOC:
    cbw_bitmap_clear_range (&m->alloc, start, count);
    cbw_bitmap_clear_range (&m->zero, start, count);
    break;
  case CBW_OVL_DATA:
    cbw_bitmap_set_range (&m->alloc, start, count);
    cbw_bitmap_clear_range (&m->zero, start, count);
    break;
  case CBW_OVL_ZERO:
    cbw_bitmap_set_range (&m->alloc, start, count);
    cbw_bitmap_set_range (&m->zero, start, count);
    break;
  }
}

static void put64 (unsigned char *p, uint64_t v) { v = htole64 (v); memcpy (p, &v, 8); }
static void put32 (unsigned char *p, uint32_t v) { v = htole32 (v); memcpy (p, &v, 4); }
static uint64_t get64 (const unsigned char *p) { uint64_t v; memcpy (&v, p, 8); return le64toh (v); }
static uint32_t get32 (const unsigned char *p) { uint32_t v; memcpy (&v, p, 4); return le32toh (v); }

int
cbw_ovl_map_encode (const struct cbw_ovl_map *m, void **bufp, size_t *lenp,
                    struct cbw_err *err)
{
  uint64_t bl = cbw_bitmap_serialized_size (&m->alloc);
  size_t len = CBW_OVL_MAP_HEADER_SIZE + 2 * bl;
  unsigned char *buf = calloc (1, len);
  if (buf == NULL)
    return cbw_err_set (err, ENOMEM, "map: out of memory");
  cbw_bitmap_serialize (&m->alloc, buf + CBW_OVL_MAP_HEADER_SIZE);
  cbw_bitmap_serialize (&m->zero, buf + CBW_OVL_MAP_HEADER_SIZE + bl);
  memcpy (buf, MAP_MAGIC, 8);
  put32 (buf + 8, CBW_OVERLAY_FORMAT_VERSION);
  put32 (buf + 12, m->cluster_bits);
  put64 (buf + 16, m->disk_size);
  put64 (buf + 24, m->nclusters);
  put64 (buf + 32, m->generation);
  put64 (buf + 40, 2 * bl);
  put64 (buf + 48, XXH64 (buf + CBW_OVL_MAP_HEADER_SIZE, 2 * bl, 0));
  put64 (buf + 56, XXH64 (buf, 56, 0));
  *bufp = buf;
  *lenp = len;
  return 0;
}

int
cbw_ovl_map_decode (struct cbw_ovl_map *m, const void *vbuf, size_t len,
                    uint64_t disk_size, uint32_t cluster_size,
                    const char *what, struct cbw_err *err)
{
  const unsigned char *buf = vbuf;
  if (len < CBW_OVL_MAP_HEADER_SIZE)
    return cbw_err_set (err, EIO, "%s: truncated map (%zu bytes, header needs %d)",
                        what, len, CBW_OVL_MAP_HEADER_SIZE);
  if (memcmp (buf, MAP_MAGIC, 8) != 0)
    return cbw_err_set (err, EIO, "%s: not an overlay map (bad magic)", what);
  if (get64 (buf + 56) != XXH64 (buf, 56, 0))
    return cbw_err_set (err, EIO, "%s: map header checksum mismatch (corrupt)", what);
  if (get32 (buf + 8) != CBW_OVERLAY_FORMAT_VERSION)
    return cbw_err_set (err, ENOTSUP, "%s: unsupported map version %u", what,
                        get32 (buf + 8));
  if (cbw_ovl_map_init (m, disk_size, cluster_size, err) < 0)
    return cbw_err_prefix (err, "%s", what);
  uint64_t bl = cbw_bitmap_serialized_size (&m->alloc);
  if (get32 (buf + 12) != m->cluster_bits || get64 (buf + 16) != disk_size ||
      get64 (buf + 24) != m->nclusters) {
    cbw_err_set (err, EINVAL, "%s: map is for a disk of %" PRIu64 " bytes, cluster "
                 "2^%u, %" PRIu64 " clusters; expected %" PRIu64 " bytes, cluster 2^%u",
                 what, get64 (buf + 16), get32 (buf + 12), get64 (buf + 24),
                 disk_size, m->cluster_bits);
    goto fail;
  }
  if (get64 (buf + 40) != 2 * bl || len != CBW_OVL_MAP_HEADER_SIZE + 2 * bl) {
    cbw_err_set (err, EIO, "%s: map payload is %zu bytes (header says %" PRIu64
                 ", expected %" PRIu64 "): truncated or corrupt", what,
                 len - CBW_OVL_MAP_HEADER_SIZE, get64 (buf + 40), 2 * bl);
    goto fail;
  }
  if (get64 (buf + 48) != XXH64 (buf + CBW_OVL_MAP_HEADER_SIZE, 2 * bl, 0)) {
    cbw_err_set (err, EIO, "%s: map payload checksum mismatch (corrupt)", what);
    goto fail;
  }
  if (cbw_bitmap_deserialize (&m->alloc, buf + CBW_OVL_MAP_HEADER_SIZE, bl) < 0 ||
      cbw_bitmap_deserialize (&m->zero, buf + CBW_OVL_MAP_HEADER_SIZE + bl, bl) < 0) {
    cbw_err_set (err, EIO, "%s: map has bits set past the end of the disk", what);
    goto fail;
  }
  {
    uint64_t c = 0;
    while ((c = cbw_bitmap_next_set (&m->zero, c)) != UINT64_MAX) {
      if (!cbw_bitmap_test (&m->alloc, c)) {
        cbw_err_set (err, EIO, "%s: cluster %" PRIu64 " has the zero bit without "
                     "the allocated bit (corrupt)", what, c);
        goto fail;
      }
      c++;
    }
  }
  m->generation = get64 (buf + 32);
  return 0;
 fail:
  cbw_ovl_map_free (m);
  return -1;
}

int
cbw_ovl_map_load (const char *path, uint64_t disk_size, uint32_t cluster_size,
                  struct cbw_ovl_map *m, struct cbw_err *err)
{
  CLEANUP_FREE char *buf = NULL;
  size_t len;
  /* 2 bits per cluster of the smallest cluster size, plus header. */
  size_t max = CBW_OVL_MAP_HEADER_SIZE + 2 * (disk_size / CBW_OVL_CLUSTER_MIN / 8 + 1);
  if (cbw_read_file (path, max, &buf, &len, err) < 0)
    return -1;
  return cbw_ovl_map_decode (m, buf, len, disk_size, cluster_size, path, err);
}

int
cbw_ovl_map_save (const char *path, struct cbw_ovl_map *m, struct cbw_err *err)
{
  CLEANUP_FREE void *buf = NULL;
  size_t len;
  m->generation++;
  if (cbw_ovl_map_encode (m, &buf, &len, err) < 0)
    return cbw_err_prefix (err, "%s", path);
  return cbw_write_file_atomic (path, buf, len, err);
}

/* ------------------------------------------------------- overlay descriptors */

void
cbw_ovl_desc_free (struct cbw_ovl_desc *d)
{
  free (d->name); free (d->data); free (d->map); free (d->backing); free (d->label);
  memset (d, 0, sizeof *d);
}

int
cbw_ovl_desc_load (const char *dir, const char *name, struct cbw_ovl_desc *d,
                   struct cbw_err *err)
{
  CLEANUP_FREE char *path = NULL;
  struct json_object *obj, *v;
  uint64_t cs, created = 0;
  int r = -1;

  memset (d, 0, sizeof *d);
  if (cbw_ovl_name_valid (name, err) < 0)
    return -1;
  path = cbw_ovl_join (dir, name);
  if (path == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  obj = json_load_checksummed (path, "cbw-overlay", err);
  if (obj == NULL)
    return -1;
  if (get_u64 (obj, "size", &d->size, path, err) < 0 ||
      get_u64 (obj, "cluster_size", &cs, path, err) < 0 ||
      get_str (obj, "data", &d->data, true, path, err) < 0 ||
      get_str (obj, "map", &d->map, true, path, err) < 0 ||
      get_str (obj, "backing", &d->backing, false, path, err) < 0)
    goto out;
  if (disk_size_valid (d->size, path, err) < 0 ||
      cluster_size_valid (cs, path, err) < 0)
    goto out;
  d->cluster_size = (uint32_t) cs;
  if (json_object_object_get_ex (obj, "created", &v))
    get_u64 (obj, "created", &created, path, NULL);
  d->created = (int64_t) created;
  if (json_object_object_get_ex (obj, "label", &v) &&
      json_object_is_type (v, json_type_string))
    d->label = strndup (json_object_get_string (v), 1024);
  else
    d->label = strdup ("");
  d->name = strdup (name);
  if (d->label == NULL || d->name == NULL) {
    cbw_err_set (err, ENOMEM, "%s: out of memory", path);
    goto out;
  }
  if (strcmp (d->data, name) == 0 || strcmp (d->map, name) == 0 ||
      strcmp (d->data, d->map) == 0) {
    cbw_err_set (err, EIO, "%s: data, map and descriptor must be distinct files", path);
    goto out;
  }
  if (strcmp (d->backing, name) == 0) {
    cbw_err_set (err, ELOOP, "%s: overlay is its own backing layer (loop)", path);
    goto out;
  }
  r = 0;
 out:
  json_object_put (obj);
  if (r < 0)
    cbw_ovl_desc_free (d);
  return r;
}

static int
desc_write (const char *dir, const struct cbw_ovl_desc *d, bool create,
            struct cbw_err *err)
{
  CLEANUP_FREE char *path = cbw_ovl_join (dir, d->name);
  if (path == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  struct json_object *obj = json_object_new_object ();
  json_object_object_add (obj, "format", json_object_new_string ("cbw-overlay"));
  json_object_object_add (obj, "version", json_object_new_int (CBW_OVERLAY_FORMAT_VERSION));
  json_object_object_add (obj, "size", json_object_new_int64 ((int64_t) d->size));
  json_object_object_add (obj, "cluster_size", json_object_new_int64 (d->cluster_size));
  json_object_object_add (obj, "data", json_object_new_string (d->data));
  json_object_object_add (obj, "map", json_object_new_string (d->map));
  json_object_object_add (obj, "backing", json_object_new_string (d->backing));
  json_object_object_add (obj, "label", json_object_new_string (d->label ? d->label : ""));
  json_object_object_add (obj, "created", json_object_new_int64 (d->created));
  int r = json_save_checksummed (path, obj, create, err);
  json_object_put (obj);
  return r;
}

int
cbw_ovl_desc_save (const char *dir, const struct cbw_ovl_desc *d,
                   struct cbw_err *err)
{
  return desc_write (dir, d, false, err);
}

/* --------------------------------------------------------- chain descriptor */

void
cbw_chain_desc_free (struct cbw_chain_desc *c)
{
  size_t i;
  free (c->base);
  for (i = 0; i < c->nlayers; i++)
    free (c->layers[i]);
  free (c->layers);
  memset (c, 0, sizeof *c);
}

int
cbw_chain_desc_copy (struct cbw_chain_desc *dst, const struct cbw_chain_desc *src,
                     struct cbw_err *err)
{
  size_t i = 0;
  *dst = *src;
  dst->base = strdup (src->base);
  dst->layers = calloc (src->nlayers + 1, sizeof (char *));
  if (dst->base == NULL || dst->layers == NULL)
    goto oom;
  for (i = 0; i < src->nlayers; i++)
    if ((dst->layers[i] = strdup (src->layers[i])) == NULL)
      goto oom;
  return 0;
 oom:
  dst->nlayers = dst->layers ? i : 0;
  cbw_chain_desc_free (dst);
  return cbw_err_set (err, ENOMEM, "chain: out of memory");
}

int
cbw_chain_desc_load (const char *path, struct cbw_chain_desc *c,
                     struct cbw_err *err)
{
  struct json_object *obj, *arr, *op;
  uint64_t cs;
  size_t i, n;
  int r = -1;

  memset (c, 0, sizeof *c);
  obj = json_load_checksummed (path, "cbw-chain", err);
  if (obj == NULL)
    return -1;
  if (get_u64 (obj, "size", &c->size, path, err) < 0 ||
      get_u64 (obj, "cluster_size", &cs, path, err) < 0 ||
      get_u64 (obj, "generation", &c->generation, path, err) < 0 ||
      get_str (obj, "base", &c->base, false, path, err) < 0)
    goto out;
  if (disk_size_valid (c->size, path, err) < 0 ||
      cluster_size_valid (cs, path, err) < 0)
    goto out;
  c->cluster_size = (uint32_t) cs;
  if (!json_object_object_get_ex (obj, "layers", &arr) ||
      !json_object_is_type (arr, json_type_array)) {
    cbw_err_set (err, EIO, "%s: \"layers\" missing or not an array", path);
    goto out;
  }
  n = json_object_array_length (arr);
  if (n > CBW_CHAIN_MAX_LAYERS) {
    cbw_err_set (err, EINVAL, "%s: %zu layers (limit %d)", path, n, CBW_CHAIN_MAX_LAYERS);
    goto out;
  }
  c->layers = calloc (n + 1, sizeof (char *));
  if (c->layers == NULL) {
    cbw_err_set (err, ENOMEM, "%s: out of memory", path);
    goto out;
  }
  for (i = 0; i < n; i++) {
    struct json_object *v = json_object_array_get_idx (arr, i);
    if (!json_object_is_type (v, json_type_string)) {
      cbw_err_set (err, EIO, "%s: layers[%zu] is not a string", path, i);
      goto out;
    }
    const char *s = json_object_get_string (v);
    if (cbw_ovl_name_valid (s, err) < 0) {
      cbw_err_prefix (err, "%s: layers[%zu]", path, i);
      goto out;
    }
    for (size_t j = 0; j < i; j++)
      if (strcmp (c->layers[j], s) == 0) {
        cbw_err_set (err, ELOOP, "%s: layer '%s' appears twice in the chain (loop)",
                     path, s);
        goto out;
      }
    if ((c->layers[i] = strdup (s)) == NULL) {
      cbw_err_set (err, ENOMEM, "%s: out of memory", path);
      goto out;
    }
    c->nlayers = i + 1;
  }
  if (json_object_object_get_ex (obj, "operation", &op) &&
      !json_object_is_type (op, json_type_null)) {
    CLEANUP_FREE char *type = NULL, *phase = NULL, *mode = NULL;
    uint64_t lo, hi;
    if (!json_object_is_type (op, json_type_object)) {
      cbw_err_set (err, EIO, "%s: \"operation\" is not an object", path);
      goto out;
    }
    if (get_str (op, "type", &type, false, path, err) < 0 ||
        get_str (op, "phase", &phase, false, path, err) < 0 ||
        get_str (op, "mode", &mode, false, path, err) < 0 ||
        get_u64 (op, "lo", &lo, path, err) < 0 ||
        get_u64 (op, "hi", &hi, path, err) < 0)
      goto out;
    if (strcmp (type, "commit") != 0) {
      cbw_err_set (err, EIO, "%s: unknown operation type '%.32s'", path, type);
      goto out;
    }
    c->op.type = CBW_CHAIN_OP_COMMIT;
    if (strcmp (phase, "copy") == 0) c->op.phase = CBW_CHAIN_PHASE_COPY;
    else if (strcmp (phase, "finish") == 0) c->op.phase = CBW_CHAIN_PHASE_FINISH;
    else {
      cbw_err_set (err, EIO, "%s: unknown operation phase '%.32s'", path, phase);
      goto out;
    }
    if (strcmp (mode, "delete") == 0) c->op.mode = CBW_COMMIT_DELETE;
    else if (strcmp (mode, "make-empty") == 0) c->op.mode = CBW_COMMIT_MAKE_EMPTY;
    else {
      cbw_err_set (err, EIO, "%s: unknown commit mode '%.32s'", path, mode);
      goto out;
    }
    if (lo < 1 || lo > hi || hi > c->nlayers) {
      cbw_err_set (err, EIO, "%s: operation range %" PRIu64 "..%" PRIu64
                   " not in the chain (1..%zu)", path, lo, hi, c->nlayers);
      goto out;
    }
    c->op.lo = (uint32_t) lo;
    c->op.hi = (uint32_t) hi;
  }
  r = 0;
 out:
  json_object_put (obj);
  if (r < 0)
    cbw_chain_desc_free (c);
  return r;
}

static int
chain_desc_write (const char *path, struct cbw_chain_desc *c, bool create,
                  struct cbw_err *err)
{
  size_t i;
  c->generation++;
  struct json_object *obj = json_object_new_object ();
  struct json_object *arr = json_object_new_array ();
  json_object_object_add (obj, "format", json_object_new_string ("cbw-chain"));
  json_object_object_add (obj, "version", json_object_new_int (CBW_OVERLAY_FORMAT_VERSION));
  json_object_object_add (obj, "size", json_object_new_int64 ((int64_t) c->size));
  json_object_object_add (obj, "cluster_size", json_object_new_int64 (c->cluster_size));
  json_object_object_add (obj, "generation", json_object_new_int64 ((int64_t) c->generation));
  json_object_object_add (obj, "base", json_object_new_string (c->base));
  for (i = 0; i < c->nlayers; i++)
    json_object_array_add (arr, json_object_new_string (c->layers[i]));
  json_object_object_add (obj, "layers", arr);
  if (c->op.type == CBW_CHAIN_OP_COMMIT) {
    struct json_object *op = json_object_new_object ();
    json_object_object_add (op, "type", json_object_new_string ("commit"));
    json_object_object_add (op, "phase", json_object_new_string
                            (c->op.phase == CBW_CHAIN_PHASE_FINISH ? "finish" : "copy"));
    json_object_object_add (op, "mode", json_object_new_string
                            (cbw_commit_mode_name (c->op.mode)));
    json_object_object_add (op, "lo", json_object_new_int64 (c->op.lo));
    json_object_object_add (op, "hi", json_object_new_int64 (c->op.hi));
    json_object_object_add (obj, "operation", op);
  }
  int r = json_save_checksummed (path, obj, create, err);
  json_object_put (obj);
  return r;
}

int
cbw_chain_desc_save (const char *path, struct cbw_chain_desc *c,
                     struct cbw_err *err)
{
  return chain_desc_write (path, c, false, err);
}

int
cbw_chain_desc_create (const char *path, struct cbw_chain_desc *c,
                       struct cbw_err *err)
{
  if (chain_desc_write (path, c, true, err) < 0)
    return -1;
  return cbw_fsync_dir_of (path, err);
}

/* ------------------------------------------------------ create / remove */

int
cbw_ovl_create (const char *dir, const char *name, const char *backing,
                const char *label, uint64_t size, uint32_t cluster_size,
                struct cbw_err *err)
{
  struct cbw_ovl_desc d = { 0 };
  struct cbw_ovl_map m;
  CLEANUP_FREE char *data = NULL, *map = NULL, *dpath = NULL, *mpath = NULL;
  CLEANUP_FREE char *npath = NULL;
  CLEANUP_FREE void *mbuf = NULL;
  size_t mlen;
  bool have_map = false;
  int fd, e;

  if (cbw_ovl_name_valid (name, err) < 0)
    return -1;
  if (strlen (name) + 5 > CBW_OVL_NAME_MAX)
    return cbw_err_set (err, EINVAL, "layer name '%s' too long", name);
  if (asprintf (&data, "%s.data", name) < 0 || asprintf (&map, "%s.map", name) < 0) {
    data = map = NULL;
    return cbw_err_set (err, ENOMEM, "out of memory");
  }
  dpath = cbw_ovl_join (dir, data);
  mpath = cbw_ovl_join (dir, map);
  npath = cbw_ovl_join (dir, name);
  if (dpath == NULL || mpath == NULL || npath == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (cbw_ovl_map_init (&m, size, cluster_size, err) < 0)
    return -1;
  m.generation = 1;
  e = cbw_ovl_map_encode (&m, &mbuf, &mlen, err);
  cbw_ovl_map_free (&m);
  if (e < 0)
    return cbw_err_prefix (err, "%s", mpath);

  /* Every file is new: O_EXCL, so a name that is taken (another chain's
   * layer, anything) fails here and nothing of it is touched.  On failure
   * only the files created here are removed. */
  fd = open (dpath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST)
      return cbw_err_set (err, EEXIST, "%s: already exists (the new layer's data file "
                          "name is taken; the existing file is left untouched)", dpath);
    return cbw_err_set (err, errno, "%s: create: %s", dpath, strerror (errno));
  }
  if (ftruncate (fd, (off_t) size) < 0 || cbw_fsync (fd) < 0) {
    e = errno;
    close (fd);
    cbw_err_set (err, e, "%s: set size: %s", dpath, strerror (e));
    goto fail;
  }
  if (close (fd) < 0) {
    e = errno;
    cbw_err_set (err, e, "%s: close: %s", dpath, strerror (e));
    goto fail;
  }
  if (cbw_write_file_new (mpath, mbuf, mlen, err) < 0)
    goto fail;
  have_map = true;

  d.name = (char *) name;
  d.data = data;
  d.map = map;
  d.backing = (char *) backing;
  d.label = (char *) (label ? label : "");
  d.size = size;
  d.cluster_size = cluster_size;
  d.created = (int64_t) time (NULL);
  if (desc_write (dir, &d, true, err) < 0)
    goto fail;
  if (cbw_fsync_dir_of (npath, err) < 0) {
    unlink (npath);
    goto fail;
  }
  return 0;
 fail:
  if (have_map)
    unlink (mpath);
  unlink (dpath);
  return -1;
}

static int
unlink_in (const char *dir, const char *name, struct cbw_err *err)
{
  CLEANUP_FREE char *p = cbw_ovl_join (dir, name);
  if (p == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (unlink (p) < 0 && errno != ENOENT)
    return cbw_err_set (err, errno, "%s: unlink: %s", p, strerror (errno));
  return 0;
}

int
cbw_ovl_remove (const char *dir, const struct cbw_ovl_desc *d,
                struct cbw_err *err)
{
  if (unlink_in (dir, d->name, err) < 0 || unlink_in (dir, d->map, err) < 0 ||
      unlink_in (dir, d->data, err) < 0)
    return -1;
  return 0;
}

/* ----------------------------------------------------------- validation */

int
cbw_ovl_resolve_backing (const char *dir, const char *top, char ***names_out,
                         size_t *n_out, struct cbw_err *err)
{
  char **names = calloc (CBW_CHAIN_MAX_LAYERS + 2, sizeof (char *));
  size_t n = 0, i;
  char *cur;

  if (names == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  cur = strdup (top);
  if (cur == NULL)
    goto oom;
  for (;;) {
    struct cbw_ovl_desc d;
    for (i = 0; i < n; i++)
      if (strcmp (names[i], cur) == 0) {
        cbw_err_set (err, ELOOP, "loop in backing chain: '%s' is reached twice "
                     "(via '%s')", cur, names[n - 1]);
        free (cur);
        goto fail;
      }
    if (n > CBW_CHAIN_MAX_LAYERS) {
      cbw_err_set (err, ELOOP, "backing chain of '%s' deeper than %d layers",
                   top, CBW_CHAIN_MAX_LAYERS);
      free (cur);
      goto fail;
    }
    names[n++] = cur;
    /* A name that is not a valid overlay name, or not an overlay descriptor,
     * is the base; a broken overlay descriptor is an error. */
    if (cbw_ovl_name_valid (cur, NULL) < 0)
      break;
    CLEANUP_FREE char *p = cbw_ovl_join (dir, cur);
    if (p == NULL)
      goto oom;
    {
      /* An overlay descriptor is JSON (starts with '{'); anything else (a
       * raw disk, a device) is the base and ends the walk. */
      int fd = open (p, O_RDONLY | O_CLOEXEC);
      char b = 0;
      if (fd < 0) {
        if (n == 1) {
          cbw_err_set (err, errno, "%s: %s", p, strerror (errno));
          goto fail;
        }
        break;  /* a missing base is reported by cbw_chain_validate */
      }
      ssize_t r = read (fd, &b, 1);
      close (fd);
      if (r != 1 || b != '{')
        break;
    }
    if (cbw_ovl_desc_load (dir, cur, &d, err) < 0)
      goto fail;
    cur = strdup (d.backing);
    cbw_ovl_desc_free (&d);
    if (cur == NULL)
      goto oom;
  }
  /* reverse: bottom first */
  for (i = 0; i < n / 2; i++) {
    char *t = names[i]; names[i] = names[n - 1 - i]; names[n - 1 - i] = t;
  }
  *names_out = names;
  *n_out = n;
  return 0;
 oom:
  cbw_err_set (err, ENOMEM, "out of memory");
 fail:
  for (i = 0; i < n; i++) free (names[i]);
  free (names);
  return -1;
}

static int
file_size_is (const char *path, uint64_t want, const char *what,
              struct cbw_err *err)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return cbw_err_set (err, errno, "%s %s: %s", what, path, strerror (errno));
  off_t sz = lseek (fd, 0, SEEK_END);
  int e = errno;
  close (fd);
  if (sz < 0)
    return cbw_err_set (err, e, "%s %s: size: %s", what, path, strerror (e));
  if ((uint64_t) sz != want)
    return cbw_err_set (err, EINVAL, "%s %s: wrong size %lld bytes (chain is %"
                        PRIu64 " bytes)", what, path, (long long) sz, want);
  return 0;
}

int
cbw_chain_validate (const char *dir, const struct cbw_chain_desc *c,
                    struct cbw_err *err)
{
  size_t i, j;
  CLEANUP_FREE char *bpath = cbw_ovl_join (dir, c->base);
  if (bpath == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (file_size_is (bpath, c->size, "base", err) < 0)
    return -1;
  for (i = 0; i < c->nlayers; i++) {
    struct cbw_ovl_desc d;
    struct cbw_ovl_map m;
    const char *below = i == 0 ? c->base : c->layers[i - 1];
    for (j = 0; j < i; j++)
      if (strcmp (c->layers[i], c->layers[j]) == 0)
        return cbw_err_set (err, ELOOP, "layer '%s' appears twice in the chain (loop)",
                            c->layers[i]);
    if (strcmp (c->layers[i], c->base) == 0)
      return cbw_err_set (err, ELOOP, "layer '%s' is also the base (loop)", c->base);
    if (cbw_ovl_desc_load (dir, c->layers[i], &d, err) < 0)
      return cbw_err_prefix (err, "layer %zu", i + 1);
    if (d.size != c->size || d.cluster_size != c->cluster_size) {
      cbw_err_set (err, EINVAL, "layer %zu '%s': size %" PRIu64 "/cluster %u does not "
                   "match the chain (%" PRIu64 "/%u)", i + 1, d.name, d.size,
                   d.cluster_size, c->size, c->cluster_size);
      goto fail;
    }
    if (strcmp (d.backing, below) != 0) {
      bool loop = false;
      for (j = i; j < c->nlayers; j++)
        if (strcmp (d.backing, c->layers[j]) == 0) loop = true;
      cbw_err_set (err, loop ? ELOOP : EINVAL,
                   "layer %zu '%s': backing is '%s' but the layer below in the "
                   "chain is '%s'%s", i + 1, d.name, d.backing, below,
                   loop ? " (loop: it points at itself or a layer above)" : "");
      goto fail;
    }
    for (j = 0; j < c->nlayers; j++)
      if (strcmp (d.data, c->layers[j]) == 0 || strcmp (d.map, c->layers[j]) == 0 ||
          strcmp (d.data, c->base) == 0) {
        cbw_err_set (err, EINVAL, "layer %zu '%s': data/map file name clashes "
                     "with another layer", i + 1, d.name);
        goto fail;
      }
    {
      CLEANUP_FREE char *dp = cbw_ovl_join (dir, d.data);
      CLEANUP_FREE char *mp = cbw_ovl_join (dir, d.map);
      if (dp == NULL || mp == NULL) {
        cbw_err_set (err, ENOMEM, "out of memory");
        goto fail;
      }
      if (file_size_is (dp, c->size, "data file", err) < 0) {
        cbw_err_prefix (err, "layer %zu '%s'", i + 1, d.name);
        goto fail;
      }
      if (cbw_ovl_map_load (mp, c->size, c->cluster_size, &m, err) < 0) {
        cbw_err_prefix (err, "layer %zu '%s'", i + 1, d.name);
        goto fail;
      }
      cbw_ovl_map_free (&m);
    }
    cbw_ovl_desc_free (&d);
    continue;
  fail:
    cbw_ovl_desc_free (&d);
    return -1;
  }
  return 0;
}
