/* cbw — plugin/chain/overlay_ctl.c: the chain plugin's control-socket
 * commands on an overlay chain (snapshot, commit, commit-cancel,
 * commit-speed, status, list, layer-extents): argument tables, validation of
 * the request, mapping to the engine's API (overlay_chain.h) and of its
 * errors to control error classes.  chain.c's table points at these.
 *
 * Locking: none here; every engine call is thread-safe.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "control.h"
#include "overlay_chain.h"

const struct cbw_ctl_arg ovc_ctl_snapshot_args[] = {
  { "label", CBW_ARG_STRING, false, "free text stored in the new overlay's descriptor" },
  { NULL },
};
const struct cbw_ctl_arg ovc_ctl_commit_args[] = {
  { "base", CBW_ARG_UINT, false, "layer receiving the data (0 = raw base); default top-1" },
  { "top", CBW_ARG_UINT, false, "highest layer merged; default the active top" },
  { "mode", CBW_ARG_STRING, false, "`delete` (default) or `make-empty`" },
  { "speed", CBW_ARG_UINT, false, "bytes per second, 0 = unlimited (default)" },
  { NULL },
};
const struct cbw_ctl_arg ovc_ctl_speed_args[] = {
  { "speed", CBW_ARG_UINT, true, "bytes per second, 0 = unlimited" },
  { NULL },
};
const struct cbw_ctl_arg ovc_ctl_no_args[] = { { NULL } };

static int
ctl_err (struct cbw_ctl_reply *r, const struct cbw_err *e)
{
  enum cbw_ctl_error_class cl;
  switch (e->errnum) {
  case EBUSY: cl = CBW_CTL_BUSY; break;
  case EINVAL: case ERANGE: cl = CBW_CTL_INVALID_PARAMETER; break;
  case ENOENT: cl = CBW_CTL_NOT_FOUND; break;
  case EEXIST: cl = CBW_CTL_EXISTS; break;
  case EIO: case ENOSPC: case EROFS: cl = CBW_CTL_IO_ERROR; break;
  default: cl = CBW_CTL_GENERIC_ERROR; break;
  }
  return cbw_ctl_fail (r, cl, "%s", e->msg);
}

int
ovc_ctl_snapshot (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  char *name = NULL;
  if (ovc_snapshot (c, cbw_ctl_arg_str (args, "label", NULL), &name, &e) < 0)
    return ctl_err (r, &e);
  unsigned n = ovc_nlayers (c);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "layer", json_object_new_string (name));
  json_object_object_add (r->ret, "index", json_object_new_int ((int) n));
  json_object_object_add (r->ret, "layers", json_object_new_int ((int) n + 1));
  free (name);
  return 0;
}

int
ovc_ctl_commit (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  unsigned n = ovc_nlayers (c);
  long long top = cbw_ctl_arg_int (args, "top", n);
  long long base = cbw_ctl_arg_int (args, "base", top - 1);
  long long speed = cbw_ctl_arg_int (args, "speed", 0);
  const char *mode = cbw_ctl_arg_str (args, "mode", "delete");
  enum cbw_commit_mode m;
  if (strcmp (mode, "delete") == 0) m = CBW_COMMIT_DELETE;
  else if (strcmp (mode, "make-empty") == 0) m = CBW_COMMIT_MAKE_EMPTY;
  else
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "mode '%.64s': expected 'delete' or 'make-empty'", mode);
  if (n == 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "the chain has no overlay to commit");
  if (top < 1 || top > (long long) n || base < 0 || base >= top)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER,
                         "commit base %lld, top %lld: not in the chain (layers 0..%u, "
                         "need 0 <= base < top <= %u)", base, top, n, n);
  if (speed < 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "speed must be >= 0");
  if (ovc_commit_start (c, (unsigned) base + 1, (unsigned) top, m,
                        (uint64_t) speed, &e) < 0)
    return ctl_err (r, &e);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "lo", json_object_new_int ((int) base + 1));
  json_object_object_add (r->ret, "hi", json_object_new_int ((int) top));
  json_object_object_add (r->ret, "active", json_object_new_boolean (top == (long long) n));
  return 0;
}

int
ovc_ctl_commit_cancel (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  (void) args;
  if (ovc_commit_cancel (c, &e) < 0)
    return ctl_err (r, &e);
  return 0;
}

int
ovc_ctl_commit_speed (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  long long speed = cbw_ctl_arg_int (args, "speed", 0);
  if (speed < 0)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "speed must be >= 0");
  if (ovc_commit_set_speed (c, (uint64_t) speed, &e) < 0)
    return ctl_err (r, &e);
  return 0;
}

int
ovc_ctl_status (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  (void) args;
  r->ret = ovc_status_json (c);
  return 0;
}

const struct cbw_ctl_arg ovc_ctl_layer_extents_args[] = {
  { "layer", CBW_ARG_UINT, false, "overlay index, 1 = lowest (default 0 = the top)" },
  { "offset", CBW_ARG_UINT, false, "start of the byte range (default 0)" },
  { "length", CBW_ARG_UINT, false, "length of the byte range (default: to the end of the disk)" },
  { "max-extents", CBW_ARG_UINT, false, "at most this many runs in the reply (default 1024, "
    "max 65536)" },
  { NULL },
};

int
ovc_ctl_layer_extents (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct cbw_err e = { 0 };
  long long layer = cbw_ctl_arg_int (args, "layer", 0);
  long long off = cbw_ctl_arg_int (args, "offset", 0);
  long long max = cbw_ctl_arg_int (args, "max-extents", OVC_EXTENTS_DEFAULT);
  uint64_t size = ovc_size (c);
  if (off < 0 || (uint64_t) off > size)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "offset %lld is past the end of "
                         "the disk (%" PRIu64 " bytes)", off, size);
  long long len = cbw_ctl_arg_int (args, "length", (long long) (size - (uint64_t) off));
  if (len < 0 || (uint64_t) len > size - (uint64_t) off)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "range %lld+%lld is past the end "
                         "of the disk (%" PRIu64 " bytes)", off, len, size);
  if (max < 1 || max > OVC_EXTENTS_MAX)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "max-extents must be 1..%d",
                         OVC_EXTENTS_MAX);
  if (layer < 0 || layer > CBW_CHAIN_MAX_LAYERS)
    return cbw_ctl_fail (r, CBW_CTL_INVALID_PARAMETER, "layer %lld: not an overlay index",
                         layer);
  struct ovc_extent *x = malloc ((size_t) max * sizeof *x);
  if (x == NULL)
    return cbw_ctl_fail (r, CBW_CTL_GENERIC_ERROR, "out of memory");
  size_t n;
  uint64_t next;
  unsigned k;
  char *name = NULL;
  if (ovc_layer_extents (c, (unsigned) layer, (uint64_t) off, (uint64_t) len, (size_t) max,
                         x, &n, &next, &k, &name, &e) < 0) {
    free (x);
    return ctl_err (r, &e);
  }
  struct json_object *a = json_object_new_array_ext ((int) n);
  for (size_t i = 0; i < n; i++) {
    struct json_object *o = json_object_new_object ();
    json_object_object_add (o, "offset", json_object_new_int64 ((int64_t) x[i].offset));
    json_object_object_add (o, "length", json_object_new_int64 ((int64_t) x[i].length));
    json_object_object_add (o, "zero", json_object_new_boolean (x[i].zero));
    json_object_array_add (a, o);
  }
  free (x);
  r->ret = json_object_new_object ();
  json_object_object_add (r->ret, "layer", json_object_new_int ((int) k));
  json_object_object_add (r->ret, "name", json_object_new_string (name));
  json_object_object_add (r->ret, "cluster-size", json_object_new_int64 (ovc_cluster_size (c)));
  json_object_object_add (r->ret, "extents", a);
  json_object_object_add (r->ret, "next", next == UINT64_MAX ? NULL
                          : json_object_new_int64 ((int64_t) next));
  free (name);
  return 0;
}

int
ovc_ctl_list (struct ovc *c, struct json_object *args, struct cbw_ctl_reply *r)
{
  struct json_object *st = ovc_status_json (c), *layers;
  (void) args;
  r->ret = json_object_new_object ();
  if (json_object_object_get_ex (st, "layers", &layers))
    json_object_object_add (r->ret, "layers", json_object_get (layers));
  json_object_put (st);
  return 0;
}
