/* cbw — plugin/dirtybitmap/commands.c: control-socket commands of the
 * dirtybitmap filter (see commands.h).  Handlers run on the control thread,
 * range-check every argument themselves (types were checked by common/control)
 * and call the tracker, which takes its own locks; a bad request only gets an
 * error reply and never touches I/O state.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "bitmap_store.h"
#include "cleanup.h"
#include "commands.h"
#include "tracker.h"

static int
fail_err (struct cbw_ctl_reply *r, const struct cbw_err *err)
{
  enum cbw_ctl_error_class c;

  switch (err->errnum) {
  case ENOENT: c = CBW_CTL_NOT_FOUND; break;
  case EEXIST: c = CBW_CTL_EXISTS; break;
  case EINVAL: case ERANGE: c = CBW_CTL_INVALID_PARAMETER; break;
  case EIO: case ENOSPC: case EROFS: case EDQUOT: c = CBW_CTL_IO_ERROR; break;
  default: c = CBW_CTL_GENERIC_ERROR; break;
  }
  return cbw_ctl_fail (r, c, "%s", err->msg);
}

static int
do_add (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  const char *name = cbw_ctl_arg_str (args, "name", NULL);
  long long gran = cbw_ctl_arg_int (args, "granularity", (long long) CBW_BITMAP_GRAN_DEFAULT);
  bool enabled = cbw_ctl_arg_bool (args, "enabled", true);

  if (gran <= 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "granularity must be a power of two between %llu and %llu",
                         CBW_BITMAP_GRAN_MIN, CBW_BITMAP_GRAN_MAX);
  if (dbm_tracker_add (data, name, (uint64_t) gran, enabled, &err) < 0)
    return fail_err (r, &err);
  return 0;
}

static int
do_remove (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  if (dbm_tracker_remove (data, cbw_ctl_arg_str (args, "name", ""), &err) < 0)
    return fail_err (r, &err);
  return 0;
}

static int
do_clear (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  if (dbm_tracker_clear (data, cbw_ctl_arg_str (args, "name", ""), &err) < 0)
    return fail_err (r, &err);
  return 0;
}

static int
do_enable (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  if (dbm_tracker_set_enabled (data, cbw_ctl_arg_str (args, "name", ""), true, &err) < 0)
    return fail_err (r, &err);
  return 0;
}

static int
do_disable (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  if (dbm_tracker_set_enabled (data, cbw_ctl_arg_str (args, "name", ""), false, &err) < 0)
    return fail_err (r, &err);
  return 0;
}

static int
do_merge (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  const char *src = cbw_ctl_arg_str (args, "src", "");
  const char *dst = cbw_ctl_arg_str (args, "dst", "");

  if (strcmp (src, dst) == 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "src and dst are the same bitmap '%s'", src);
  if (dbm_tracker_merge (data, src, dst, &err) < 0)
    return fail_err (r, &err);
  return 0;
}

/* "extents": [{"offset":O,"length":L}] or [[O,L]], at most one request
 * line's worth (the control protocol bounds it). */
static int
do_mark (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  struct json_object *a = NULL;
  json_object_object_get_ex (args, "extents", &a);
  size_t n = json_object_array_length (a);
  CLEANUP_FREE struct dbm_extent *x = calloc (n ? n : 1, sizeof *x);
  if (x == NULL)
    return cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory");
  for (size_t i = 0; i < n; i++) {
    struct json_object *e = json_object_array_get_idx (a, i), *o = NULL, *l = NULL;
    if (json_object_is_type (e, json_type_array) && json_object_array_length (e) == 2) {
      o = json_object_array_get_idx (e, 0);
      l = json_object_array_get_idx (e, 1);
    }
    else if (json_object_is_type (e, json_type_object)) {
      json_object_object_get_ex (e, "offset", &o);
      json_object_object_get_ex (e, "length", &l);
    }
    if (!json_object_is_type (o, json_type_int) || !json_object_is_type (l, json_type_int) ||
        json_object_get_int64 (o) < 0 || json_object_get_int64 (l) <= 0)
      return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "extents[%zu]: expected "
                           "{\"offset\":O,\"length\":L} or [O,L] with O >= 0, L > 0", i);
    x[i].offset = (uint64_t) json_object_get_int64 (o);
    x[i].length = (uint64_t) json_object_get_int64 (l);
  }
  if (dbm_tracker_mark (data, cbw_ctl_arg_str (args, "name", ""), x, n, &err) < 0)
    return fail_err (r, &err);
  return 0;
}

static int
do_list (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  CLEANUP_FREE struct dbm_bitmap_info *info = NULL;
  size_t n, i;
  struct json_object *ret, *arr;

  (void) args;
  if (dbm_tracker_list (data, &info, &n, &err) < 0)
    return fail_err (r, &err);
  ret = json_object_new_object ();
  arr = json_object_new_array ();
  for (i = 0; i < n; ++i) {
    struct json_object *o = json_object_new_object ();
    json_object_object_add (o, "name", json_object_new_string (info[i].name));
    json_object_object_add (o, "granularity", json_object_new_int64 ((int64_t) info[i].granularity));
    json_object_object_add (o, "enabled", json_object_new_boolean (info[i].enabled));
    json_object_object_add (o, "dirty-bytes", json_object_new_int64 ((int64_t) info[i].dirty_bytes));
    json_object_object_add (o, "state", json_object_new_string (
                              info[i].state == CBW_BITMAP_CLEAN ? "clean" : "in-use"));
    json_object_object_add (o, "generation", json_object_new_int64 ((int64_t) info[i].generation));
    json_object_array_add (arr, o);
  }
  json_object_object_add (ret, "bitmaps", arr);
  r->ret = ret;
  return 0;
}

static int
do_extents (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  struct dbm_tracker *t = data;
  uint64_t size = dbm_tracker_image_size (t), next;
  long long off = cbw_ctl_arg_int (args, "offset", 0);
  long long len = cbw_ctl_arg_int (args, "length", -1);
  long long max = cbw_ctl_arg_int (args, "max-extents", DBM_EXTENTS_DEFAULT);
  CLEANUP_FREE struct dbm_extent *ext = NULL;
  struct json_object *ret, *arr;
  size_t n, i;

  if (off < 0 || (uint64_t) off > size)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "offset %lld is outside the image (%" PRIu64 " bytes)", off, size);
  if (json_object_object_get_ex (args, "length", NULL)) {
    if (len < 0 || (uint64_t) len > size - (uint64_t) off)
      return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                           "length %lld at offset %lld is outside the image (%" PRIu64 " bytes)",
                           len, off, size);
  }
  else
    len = (long long) (size - (uint64_t) off);
  if (max < 1 || max > DBM_EXTENTS_MAX)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "max-extents must be between 1 and %d", DBM_EXTENTS_MAX);
  ext = malloc ((size_t) max * sizeof *ext);
  if (ext == NULL)
    return cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory");
  if (dbm_tracker_extents (t, cbw_ctl_arg_str (args, "name", ""), (uint64_t) off,
                           (uint64_t) len, (size_t) max, ext, &n, &next, &err) < 0)
    return fail_err (r, &err);
  ret = json_object_new_object ();
  arr = json_object_new_array ();
  for (i = 0; i < n; ++i) {
    struct json_object *o = json_object_new_object ();
    json_object_object_add (o, "offset", json_object_new_int64 ((int64_t) ext[i].offset));
    json_object_object_add (o, "length", json_object_new_int64 ((int64_t) ext[i].length));
    json_object_array_add (arr, o);
  }
  json_object_object_add (ret, "extents", arr);
  if (next < (uint64_t) off + (uint64_t) len)
    json_object_object_add (ret, "next", json_object_new_int64 ((int64_t) next));
  else
    json_object_object_add (ret, "next", NULL);
  r->ret = ret;
  return 0;
}

static int
do_checkpoint (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err err = { 0 };
  (void) args;
  if (dbm_tracker_checkpoint (data, &err) < 0)
    return fail_err (r, &err);
  return 0;
}

static int
do_info (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct dbm_tracker_stats s;
  struct json_object *o = json_object_new_object ();

  (void) args;
  dbm_tracker_stats (data, &s);
  json_object_object_add (o, "descriptor", json_object_new_string (s.descriptor));
  json_object_object_add (o, "journal", json_object_new_string (s.journal));
  json_object_object_add (o, "livemap", json_object_new_boolean (s.livemap));
  json_object_object_add (o, "image-size", json_object_new_int64 ((int64_t) s.image_size));
  json_object_object_add (o, "region-size", json_object_new_int64 ((int64_t) s.region_size));
  json_object_object_add (o, "regions", json_object_new_int64 ((int64_t) s.nregions));
  json_object_object_add (o, "journal-regions", json_object_new_int64 ((int64_t) s.journal_regions));
  json_object_object_add (o, "journal-writes", json_object_new_int64 ((int64_t) s.journal_writes));
  json_object_object_add (o, "checkpoints", json_object_new_int64 ((int64_t) s.checkpoints));
  json_object_object_add (o, "recovery", json_object_new_string (dbm_recovery_name (s.recovery)));
  r->ret = o;
  return 0;
}

static const struct cbw_ctl_arg name_arg[] = {
  { "name", CBW_ARG_STRING, true, "Bitmap name." },
  { NULL },
};
static const struct cbw_ctl_arg add_args[] = {
  { "name", CBW_ARG_STRING, true, "New bitmap name: `[A-Za-z0-9_.:-]{1,128}`, not `.` or `..`." },
  { "granularity", CBW_ARG_UINT, false, "Bytes per bit, a power of two from 512 to 2 GiB (default 65536)." },
  { "enabled", CBW_ARG_BOOL, false, "Record writes from now on (default true)." },
  { NULL },
};
static const struct cbw_ctl_arg merge_args[] = {
  { "src", CBW_ARG_STRING, true, "Bitmap whose dirty bits are added." },
  { "dst", CBW_ARG_STRING, true, "Bitmap that receives them." },
  { NULL },
};
static const struct cbw_ctl_arg extents_args[] = {
  { "name", CBW_ARG_STRING, true, "Bitmap name." },
  { "offset", CBW_ARG_UINT, false, "Start of the byte range (default 0)." },
  { "length", CBW_ARG_UINT, false, "Length of the byte range (default: to the end of the image)." },
  { "max-extents", CBW_ARG_UINT, false, "At most this many extents in the reply (default 1024, max 65536)." },
  { NULL },
};
static const struct cbw_ctl_arg mark_args[] = {
  { "name", CBW_ARG_STRING, true, "Bitmap name." },
  { "extents", CBW_ARG_ARRAY, true, "Byte ranges to mark dirty: `[{\"offset\":O,\"length\":L},...]` or `[[O,L],...]`." },
  { NULL },
};
static const struct cbw_ctl_arg no_args[] = { { NULL } };

static const struct cbw_ctl_command commands[] = {
  { "add", do_add, add_args,
    "Create a bitmap, all clean, and save it durably.  If enabled it records every write, "
    "zero and trim whose recording point (see `disable`) comes after this command took the "
    "bitmap lock.",
    "`{}`" },
  { "remove", do_remove, name_arg,
    "Delete a bitmap and its data files.", "`{}`" },
  { "clear", do_clear, name_arg,
    "Mark every granule of a bitmap clean and save it durably.  A write recorded before the "
    "clear is forgotten; one recorded after is kept.", "`{}`" },
  { "enable", do_enable, name_arg,
    "Start recording writes into a bitmap (saved durably before the reply).", "`{}`" },
  { "disable", do_disable, name_arg,
    "Stop recording writes into a bitmap.  Each request is recorded at one instant, before "
    "it is sent down, under the bitmap read lock; `disable` takes the write lock.  So a write "
    "in flight during `disable` is either in the bitmap (recorded before; it may still be in "
    "flight below) or not recorded and sent down only after `disable` took effect.  Every "
    "write that completed before `disable` was sent is in the bitmap.  The bitmap is saved "
    "durably before the reply.", "`{}`" },
  { "merge", do_merge, merge_args,
    "dst |= src, atomically with respect to writes (same rule as `disable`).  Granularities "
    "may differ: every dst granule overlapping a dirty src granule becomes dirty.  Saved "
    "durably before the reply.", "`{}`" },
  { "mark", do_mark, mark_args,
    "Mark byte ranges dirty (every granule they touch), atomically with respect to writes "
    "(same rule as `disable`), and save durably.  For loading a set computed elsewhere, "
    "e.g. the extents an overlay holds (cbwd's `top` backups).  Nothing is marked if a "
    "range is empty or past the end of the image.", "`{}`" },
  { "list", do_list, no_args,
    "List the bitmaps.",
    "`{\"bitmaps\": [{\"name\", \"granularity\", \"enabled\", \"dirty-bytes\", \"state\" "
    "(\"in-use\" while this filter runs, \"clean\" after a clean save), \"generation\"}]}`" },
  { "extents", do_extents, extents_args,
    "Dirty extents of a bitmap inside a byte range, in bytes, clipped to the range, "
    "ascending and non-adjacent.  The reply is bounded by `max-extents`; if it was cut, "
    "`next` is the offset to continue from, else `next` is null.",
    "`{\"extents\": [{\"offset\", \"length\"}], \"next\": OFFSET|null}`" },
  { "checkpoint", do_checkpoint, no_args,
    "Force a fine checkpoint now: save every bitmap durably and shrink the write-ahead "
    "journal to the regions written since.", "`{}`" },
  { "info", do_info, no_args,
    "State of the filter's storage: descriptor and journal paths, image and region size, "
    "regions set in the journal, counters, and how the bitmaps were recovered at startup "
    "(\"clean\", \"map\": exact, from the live-bitmap map after a process crash, "
    "\"journal\": whole regions, or \"all-dirty\"); \"livemap\" says whether the "
    "live bitmaps are kept in the map file (false: a crash recovers from the journal).",
    "`{\"descriptor\", \"journal\", \"livemap\", \"image-size\", \"region-size\", \"regions\", "
    "\"journal-regions\", \"journal-writes\", \"checkpoints\", \"recovery\"}`" },
  { NULL },
};

const struct cbw_ctl_table dbm_ctl_table = { "dirtybitmap", commands };
