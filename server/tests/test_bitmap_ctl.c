/* cbw — server/tests/test_bitmap_ctl.c: the `ctl` bitmap source: a fake
 * dirtybitmap control socket (common/control.h server with an `extents`
 * command that pages two extents at a time) feeds cbwd's dirty-bitmap
 * context; the context must report exactly the model's ranges, and bad
 * replies (out of order, outside the export, unknown bitmap) must fail.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control.h"
#include "export.h"
#include "nbd_proto.h"

static const int64_t model[][2] = { { 0, 4096 }, { 65536, 65536 }, { 200000, 1 },
                                    { 1 << 20, 8192 }, { (2 << 20) - 512, 512 } };
static int mode;   /* 0 good, 1 out of order, 2 outside */

static int
h_extents (void *data, struct json_object *args, struct cbw_ctl_reply *r)
{
  (void) data;
  if (strcmp (cbw_ctl_arg_str (args, "name", ""), "frozen") != 0)
    return cbw_ctl_fail (r, CBW_CTL_NOT_FOUND, "no such bitmap");
  int64_t off = cbw_ctl_arg_int (args, "offset", 0);
  struct json_object *a = json_object_new_array ();
  size_t n = sizeof model / sizeof model[0], i, k = 0;
  for (i = 0; i < n && model[i][0] < off; i++) ;
  int64_t next = -1;
  for (; i < n; i++) {
    if (k == 2) { next = model[i][0]; break; }
    struct json_object *e = json_object_new_object ();
    int64_t o = model[i][0], l = model[i][1];
    if (mode == 1 && i == 3) o = 10;
    if (mode == 2 && i == 4) l = 4096;
    json_object_object_add (e, "offset", json_object_new_int64 (o));
    json_object_object_add (e, "length", json_object_new_int64 (l));
    json_object_array_add (a, e);
    k++;
  }
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "extents", a);
  json_object_object_add (r->ret, "next", next >= 0 ? json_object_new_int64 (next) : NULL);
  return 0;
}

static const struct cbw_ctl_arg ext_args[] = {
  { "name", CBW_ARG_STRING, true, "bitmap" },
  { "offset", CBW_ARG_UINT, false, "start" },
  { "length", CBW_ARG_UINT, false, "length" },
  { "max-extents", CBW_ARG_UINT, false, "max" },
  { NULL },
};
static const struct cbw_ctl_command cmds[] = {
  { "extents", h_extents, ext_args, "test", "extents" },
  { NULL },
};
static const struct cbw_ctl_table table = { "dirtybitmap", cmds };

Test (bitmap_ctl, paged_extents_become_the_context)
{
  char dir[] = "/tmp/cbwd-ctl.XXXXXX", path[128];
  cr_assert (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/ctl.sock", dir);
  struct cbw_err err = { 0 };
  struct cbw_ctl_server *srv = cbw_ctl_server_start (path, &table, NULL, &err);
  cr_assert (srv, "%s", err.msg);
  uint64_t size = 2 << 20;
  struct cbwd_export *e = cbwd_export_memory_new ("m", size, true, &err);
  struct cbwd_meta m;
  mode = 0;
  cr_assert_eq (cbwd_meta_bitmap_from_ctl (&m, "backup-sda", path, "frozen", size, &err), 0,
                "%s", err.msg);
  cr_assert_str_eq (m.name, "qemu:dirty-bitmap:backup-sda");
  struct cbwd_extents x;
  cbwd_extents_init (&x, 0, size, 1000);
  cr_assert_eq (m.extents (e, &m, &x, &err), 0);
  /* Walk the extents and compare every boundary with the model. */
  uint64_t o = 0;
  size_t mi = 0;
  for (size_t i = 0; i < x.n; i++) {
    bool in = mi < 5 && (uint64_t) model[mi][0] == o;
    cr_assert_eq (x.e[i].flags, in ? NBD_STATE_DIRTY : 0, "extent %zu at %lu", i, (unsigned long) o);
    if (in) { cr_assert_eq (x.e[i].length, model[mi][1]); mi++; }
    o += x.e[i].length;
  }
  cr_assert_eq (o, size);
  cr_assert_eq (mi, 5);
  cbwd_extents_free (&x);
  m.free (&m);
  mode = 1;
  cr_assert_eq (cbwd_meta_bitmap_from_ctl (&m, "b", path, "frozen", size, &err), -1);
  mode = 2;
  cr_assert_eq (cbwd_meta_bitmap_from_ctl (&m, "b", path, "frozen", size, &err), -1);
  cr_assert (strstr (err.msg, "outside"), "%s", err.msg);
  mode = 0;
  cr_assert_eq (cbwd_meta_bitmap_from_ctl (&m, "b", path, "nope", size, &err), -1);
  cr_assert_eq (err.errnum, ENOENT, "%d %s", err.errnum, err.msg);
  cbw_ctl_server_stop (srv);
  cbwd_export_free (e);
  rmdir (dir);
}
