/* cbw — server/orch/overlay.c: a disk's overlay chain, seen from the
 * orchestrator: where its descriptor lives, what the chain plugin says about
 * it (layers, running commit), how many overlays a stopped disk has (read
 * from the descriptor, so `disk-remove` never deletes overlays holding guest
 * data), and the `top` backup set: the top overlay's allocated extents,
 * paged out of the chain plugin (`layer-extents`) and loaded into a bitmap
 * of the disk's dirtybitmap filter (`mark`), from where the cbw session,
 * the PIT export's qemu:dirty-bitmap context and push jobs read it exactly
 * as they read an incremental backup's bitmap (docs/design/orchestration.md,
 * "Overlays and sync mode top").
 *
 * The chain descriptor is the one source of truth for the layers: the
 * orchestrator's state file only records where it is (disk field "chain").
 *
 * Locking: none of its own; called by the busy owner (or a read-only
 * command) without o->lock held, doing only module control calls and file
 * reads.
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cleanup.h"
#include "orch_internal.h"
#ifdef ORCH_HAVE_FORMATS
#include "overlay.h"
#endif

/* Extents per `mark` request: ~40 bytes each in JSON, well under the
 * control protocol's 1 MiB request line. */
#define MARK_BATCH 16384

char *
orch_chain_default_path (const char *state_dir, const char *name)
{
  return orch_strdup_printf ("%s/disks/%s/overlays/%s.chain", state_dir, name, name);
}

struct json_object *
orch_chain_status (struct orch_disk *d, struct cbw_err *err)
{
  if (d->chain == NULL) {
    cbw_err_set (err, EINVAL, "disk %s has no overlay chain (it was added without "
                 "overlays: its image is served raw)", d->name);
    return NULL;
  }
  struct json_object *r = orch_mod_call (d->ctl_chain, "status", NULL, NULL, 0, err), *c;
  if (r == NULL) {
    cbw_err_prefix (err, "disk %s", d->name);
    return NULL;
  }
  if (!json_object_object_get_ex (r, "chain", &c) || !json_object_is_type (c, json_type_object)) {
    json_object_put (r);
    cbw_err_set (err, EPROTO, "disk %s: %s: status has no \"chain\" (is nbdkit running "
                 "without chain=?)", d->name, d->ctl_chain);
    return NULL;
  }
  json_object_get (c);
  json_object_put (r);
  return c;
}

/* One LAYER argument: index or name -> index in 0..n (n = overlays). */
static int
layer_index (const char *disk, struct json_object *layers, const char *what,
             const char *arg, unsigned *idx, struct cbw_err *err)
{
  size_t nl = json_object_array_length (layers);
  if (arg[0] == 0)
    return cbw_err_set (err, EINVAL, "--%s: empty layer (give an index or a name as "
                        "`cbw disk chain %s` shows them)", what, disk);
  if (strspn (arg, "0123456789") == strlen (arg)) {
    if (strlen (arg) > 9 || strtoul (arg, NULL, 10) >= nl)
      return cbw_err_set (err, EINVAL, "--%s %.32s: disk %s has no layer with that index "
                          "(its layers are 0..%zu, 0 = the image)", what, arg, disk, nl - 1);
    *idx = (unsigned) strtoul (arg, NULL, 10);
    return 0;
  }
  for (size_t i = 0; i < nl; i++) {
    struct json_object *l = json_object_array_get_idx (layers, i), *nm;
    if (json_object_object_get_ex (l, "name", &nm) &&
        strcmp (json_object_get_string (nm), arg) == 0) {
      *idx = (unsigned) i;
      return 0;
    }
  }
  return cbw_err_set (err, EINVAL, "--%s %.200s: disk %s has no layer of that name (see "
                      "`cbw disk chain %s`)", what, arg, disk, disk);
}

int
orch_commit_range (const char *disk, struct json_object *layers, const char *base,
                   const char *top, unsigned *lo, unsigned *hi, struct cbw_err *err)
{
  if (layers == NULL || !json_object_is_type (layers, json_type_array) ||
      json_object_array_length (layers) < 1)
    return cbw_err_set (err, EPROTO, "disk %s: the chain status lists no layers", disk);
  unsigned n = (unsigned) json_object_array_length (layers) - 1, b, t = n;
  if (n == 0)
    return cbw_err_set (err, EINVAL, "disk %s has no overlay to commit (its chain is "
                        "the image alone; `cbw disk snapshot %s` adds one)", disk, disk);
  if (top && layer_index (disk, layers, "top", top, &t, err) < 0)
    return -1;
  if (t == 0)
    return cbw_err_set (err, EINVAL, "--top %.200s is the image (layer 0): there is no "
                        "layer below it to merge into", top);
  b = t - 1;
  if (base && layer_index (disk, layers, "base", base, &b, err) < 0)
    return -1;
  if (b == n)
    return cbw_err_set (err, EINVAL, "--base %.200s is the active layer %u (it takes the "
                        "guest's writes): a commit merges layers into one below them",
                        base, n);
  if (b >= t)
    return cbw_err_set (err, EINVAL, "--base %.200s (layer %u) is not below --top %s "
                        "(layer %u): the base receives layers base+1..top", base, b,
                        top ? top : "(the active layer)", t);
  *lo = b + 1;
  *hi = t;
  return 0;
}

int
orch_chain_info (struct orch_disk *d, struct orch_chain_info *ci, struct cbw_err *err)
{
  memset (ci, 0, sizeof *ci);
  struct json_object *c = orch_chain_status (d, err), *v, *op;
  if (c == NULL)
    return -1;
  if (json_object_object_get_ex (c, "layers", &v) && json_object_is_type (v, json_type_array) &&
      json_object_array_length (v) >= 1) {
    ci->overlays = (unsigned) json_object_array_length (v) - 1;
    struct json_object *top = json_object_array_get_idx (v, json_object_array_length (v) - 1), *nm;
    if (json_object_object_get_ex (top, "name", &nm))
      snprintf (ci->top, sizeof ci->top, "%s", json_object_get_string (nm));
  }
  if (json_object_object_get_ex (c, "cluster_size", &v))
    ci->cluster_size = (uint64_t) json_object_get_int64 (v);
  if (json_object_object_get_ex (c, "operation", &op) && op &&
      json_object_object_get_ex (op, "state", &v))
    ci->commit_running = strcmp (json_object_get_string (v), "running") == 0;
  json_object_put (c);
  if (ci->cluster_size == 0 || (ci->cluster_size & (ci->cluster_size - 1)))
    return cbw_err_set (err, EPROTO, "disk %s: chain status: bad cluster size %" PRIu64,
                        d->name, ci->cluster_size);
  return 0;
}

/* A file in the chain's directory named like one of its layers (the chain
 * plugin names them after the chain file, without ".json": STEM.ov...),
 * copied into buf; false if there is none.  Other chains whose file name
 * has the same stem match too: callers only use it to refuse. */
static bool
layer_file_exists (const char *chain, char *buf, size_t len)
{
  CLEANUP_FREE char *copy = strdup (chain);
  char *slash = copy ? strrchr (copy, '/') : NULL;
  char stem[300];
  size_t n = 0;
  if (slash == NULL)
    return true;                /* out of memory (paths are absolute): assume one */
  *slash = '\0';
  for (const char *b = slash + 1; *b && n < sizeof stem - 4; b++)
    stem[n++] = ((*b >= 'a' && *b <= 'z') || (*b >= 'A' && *b <= 'Z') ||
                 (*b >= '0' && *b <= '9') || *b == '.' || *b == '_' || *b == '-')
      ? *b : '_';
  stem[n] = '\0';
  if (n > 5 && strcmp (stem + n - 5, ".json") == 0)
    stem[n -= 5] = '\0';
  memcpy (stem + n, ".ov", 4);
  DIR *dir = opendir (copy[0] ? copy : "/");
  if (dir == NULL)
    return errno != ENOENT;     /* unreadable: assume there is one */
  bool found = false;
  for (struct dirent *e; !found && (e = readdir (dir)) != NULL; )
    if (strncmp (e->d_name, stem, n + 3) == 0) {
      snprintf (buf, len, "%s/%s", copy, e->d_name);
      found = true;
    }
  closedir (dir);
  return found;
}

int
orch_chain_overlays_offline (struct orch_disk *d, unsigned *n, struct cbw_err *err)
{
  *n = 0;
  if (d->chain == NULL)
    return 0;
  if (access (d->chain, F_OK) < 0) {
    char f[600] = "";
    if (errno != ENOENT)
      return cbw_err_set (err, errno, "%s: %s", d->chain, strerror (errno));
    /* Never created (a disk-add interrupted before its first start), or
     * lost: lost with its layers still there, they may hold guest data. */
    if (layer_file_exists (d->chain, f, sizeof f))
      return cbw_err_set (err, ENOENT, "chain descriptor %s is missing but layer "
                          "files remain (%s)", d->chain, f[0] ? f : "the directory "
                          "cannot be read");
    return 0;
  }
#ifdef ORCH_HAVE_FORMATS
  struct cbw_chain_desc cd = { 0 };
  if (cbw_chain_desc_load (d->chain, &cd, err) < 0)
    return -1;
  *n = (unsigned) cd.nlayers;
  cbw_chain_desc_free (&cd);
  return 0;
#else
  return cbw_err_set (err, ENOTSUP, "%s: this cbwd cannot read chain descriptors (built "
                      "without formats/): assuming it has overlays", d->chain);
#endif
}

/* Send one batch of extents to the dirtybitmap filter's `mark`. */
static int
mark_batch (struct orch_disk *d, const char *bm, struct json_object *batch,
            struct cbw_err *err)
{
  struct json_object *a = json_object_new_object ();
  json_object_object_add (a, "name", json_object_new_string (bm));
  json_object_object_add (a, "extents", batch);
  struct json_object *r = orch_mod_call (d->ctl_bitmap, "mark", a, NULL, 0, err);
  if (r == NULL)
    return -1;
  json_object_put (r);
  return 0;
}

int
orch_chain_top_to_bitmap (struct orch_disk *d, const char *bm, uint64_t size,
                          uint64_t *bytes, struct cbw_err *err)
{
  uint64_t pos = 0;
  char name0[256] = "";
  struct json_object *batch = json_object_new_array ();
  size_t nbatch = 0;
  unsigned pages = 0;
  *bytes = 0;
  for (;;) {
    struct json_object *a = json_object_new_object (), *r, *ext, *nx, *nm;
    json_object_object_add (a, "offset", json_object_new_int64 ((int64_t) pos));
    json_object_object_add (a, "max-extents", json_object_new_int (65536));
    r = orch_mod_call (d->ctl_chain, "layer-extents", a, NULL, 0, err);
    if (r == NULL)
      goto fail;
    if (!json_object_object_get_ex (r, "extents", &ext) ||
        !json_object_is_type (ext, json_type_array) ||
        !json_object_object_get_ex (r, "next", &nx) ||
        !json_object_object_get_ex (r, "name", &nm)) {
      json_object_put (r);
      cbw_err_set (err, EPROTO, "%s: layer-extents: malformed reply", d->ctl_chain);
      goto fail;
    }
    /* the top must stay the same layer across pages */
    if (name0[0] == '\0')
      snprintf (name0, sizeof name0, "%s", json_object_get_string (nm));
    else if (strcmp (name0, json_object_get_string (nm)) != 0) {
      cbw_err_set (err, EBUSY, "%s: the top overlay changed while its extents were read "
                   "(%s, then %s): a snapshot or commit ran meanwhile", d->ctl_chain, name0,
                   json_object_get_string (nm));
      json_object_put (r);
      goto fail;
    }
    uint64_t last = pos;
    for (size_t i = 0; i < json_object_array_length (ext); i++) {
      struct json_object *e = json_object_array_get_idx (ext, i), *vo, *vl;
      if (!json_object_object_get_ex (e, "offset", &vo) ||
          !json_object_object_get_ex (e, "length", &vl)) {
        json_object_put (r);
        cbw_err_set (err, EPROTO, "%s: layer-extents: malformed extent", d->ctl_chain);
        goto fail;
      }
      int64_t o = json_object_get_int64 (vo), l = json_object_get_int64 (vl);
      /* never trust a length or offset from a socket */
      if (o < (int64_t) last || l <= 0 || (uint64_t) o >= size ||
          (uint64_t) l > size - (uint64_t) o) {
        json_object_put (r);
        cbw_err_set (err, EPROTO, "%s: layer-extents: extent %" PRId64 "+%" PRId64
                     " out of order or past the disk (%" PRIu64 " bytes)", d->ctl_chain, o, l,
                     size);
        goto fail;
      }
      last = (uint64_t) (o + l);
      *bytes += (uint64_t) l;
      struct json_object *p = json_object_new_array ();
      json_object_array_add (p, json_object_new_int64 (o));
      json_object_array_add (p, json_object_new_int64 (l));
      json_object_array_add (batch, p);
      if (++nbatch == MARK_BATCH) {
        struct json_object *full = batch;
        batch = json_object_new_array ();
        nbatch = 0;
        if (mark_batch (d, bm, full, err) < 0) {
          json_object_put (r);
          goto fail;
        }
      }
    }
    bool more = nx && json_object_is_type (nx, json_type_int);
    uint64_t next = more ? (uint64_t) json_object_get_int64 (nx) : 0;
    json_object_put (r);
    if (!more)
      break;
    if (next <= pos || next < last || next > size || ++pages > 100000000) {
      cbw_err_set (err, EPROTO, "%s: layer-extents: paging does not advance (%" PRIu64
                   " after %" PRIu64 ")", d->ctl_chain, next, pos);
      goto fail;
    }
    pos = next;
  }
  if (nbatch > 0)
    return mark_batch (d, bm, batch, err);
  json_object_put (batch);
  return 0;
 fail:
  json_object_put (batch);
  return -1;
}
