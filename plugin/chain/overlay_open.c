/* cbw — plugin/chain/overlay_open.c: creating, opening (validation and
 * recovery of an interrupted commit) and closing an overlay chain.
 *
 * Recovery at open: a commit interrupted before its switch left the chain
 * unchanged (layer lo-1 only received clusters that lo..hi shadow; an old
 * "copy" record is dropped); one that recorded phase "finish" is rolled
 * forward (ovc__roll_forward), so the chain is the merged one.
 *
 * Locking: ovc_open and ovc_close run alone (no other call on the chain may
 * run concurrently, see overlay_chain.h); the locks are initialised here and
 * destroyed in ovc_close after the commit and reaper threads were joined.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "fileutil.h"
#include "imagelock.h"
#include "overlay_chain_int.h"

/* Metadata saves of open/create (durability hook). */
static int
map_save (const char *path, struct cbw_ovl_map *m, struct cbw_err *err)
{
  if (cbw_ovl_map_save (path, m, err) < 0) return -1;
  ovc__durable (path);
  return 0;
}

static int
desc_save (const char *dir, const struct cbw_ovl_desc *d, struct cbw_err *err)
{
  if (cbw_ovl_desc_save (dir, d, err) < 0) return -1;
  ovc__durable_in (dir, d->name);
  return 0;
}

int
ovc_create (const char *chain_path, const char *base, uint32_t cluster_size,
            struct cbw_err *err)
{
  struct cbw_chain_desc d = { 0 };
  CLEANUP_FREE char *dir = cbw_ovl_dirname (chain_path);
  CLEANUP_FREE char *bpath = NULL;
  if (dir == NULL || (bpath = cbw_ovl_join (dir, base)) == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  int fd = open (bpath, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return cbw_err_set (err, errno, "base %s: %s", bpath, strerror (errno));
  off_t sz = lseek (fd, 0, SEEK_END);
  close (fd);
  if (sz <= 0)
    return cbw_err_set (err, EINVAL, "base %s: empty or unreadable size", bpath);
  d.size = (uint64_t) sz;
  d.cluster_size = cluster_size ? cluster_size : CBW_OVL_CLUSTER_DEFAULT;
  d.base = (char *) base;
  d.layers = NULL;
  d.nlayers = 0;
  struct cbw_ovl_map m;   /* validates cluster size */
  if (cbw_ovl_map_init (&m, d.size, d.cluster_size, err) < 0)
    return -1;
  cbw_ovl_map_free (&m);
  /* O_EXCL: whatever is at chain_path (a chain, a dangling link) stays. */
  if (cbw_chain_desc_create (chain_path, &d, err) < 0)
    return -1;
  ovc__durable (chain_path);
  return 0;
}

/* Roll a recorded "finish" forward on disk (idempotent). d is updated to
 * the final chain (no operation) and saved. */
int
ovc__roll_forward (const char *chain_path, const char *dir, struct cbw_chain_desc *d,
              struct cbw_err *err)
{
  unsigned lo = d->op.lo, hi = d->op.hi, i;
  if (d->op.mode == CBW_COMMIT_MAKE_EMPTY) {
    for (i = lo; i <= hi; i++) {
      struct cbw_ovl_desc od;
      struct cbw_ovl_map m;
      if (cbw_ovl_desc_load (dir, d->layers[i - 1], &od, err) < 0)
        return -1;
      CLEANUP_FREE char *mp = cbw_ovl_join (dir, od.map);
      int r = mp && cbw_ovl_map_init (&m, d->size, d->cluster_size, err) == 0 ? 0 : -1;
      if (r == 0) {
        /* keep the generation increasing */
        struct cbw_ovl_map old;
        if (cbw_ovl_map_load (mp, d->size, d->cluster_size, &old, NULL) == 0) {
          m.generation = old.generation;
          cbw_ovl_map_free (&old);
        }
        r = ovc__hook ("finish-empty", err) < 0 ? -1 : map_save (mp, &m, err);
        cbw_ovl_map_free (&m);
      }
      cbw_ovl_desc_free (&od);
      if (r < 0)
        return -1;
    }
    d->op.type = CBW_CHAIN_OP_NONE;
    return ovc__chain_save (chain_path, d, err);
  }
  /* delete: relink the layer above hi, drop lo..hi, remove their files */
  const char *below = lo == 1 ? d->base : d->layers[lo - 2];
  if (hi < d->nlayers) {
    struct cbw_ovl_desc od;
    if (cbw_ovl_desc_load (dir, d->layers[hi], &od, err) < 0)
      return -1;
    int r = 0;
    if (strcmp (od.backing, below) != 0) {
      char *nb = strdup (below);
      if (nb == NULL) r = cbw_err_set (err, ENOMEM, "out of memory");
      else {
        free (od.backing);
        od.backing = nb;
        r = ovc__hook ("finish-relink", err) < 0 ? -1 : desc_save (dir, &od, err);
      }
    }
    cbw_ovl_desc_free (&od);
    if (r < 0)
      return -1;
  }
  char **dropped = calloc (hi - lo + 2, sizeof (char *));
  if (dropped == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  for (i = lo; i <= hi; i++)
    dropped[i - lo] = d->layers[i - 1];
  memmove (&d->layers[lo - 1], &d->layers[hi], (d->nlayers - hi) * sizeof (char *));
  d->nlayers -= hi - lo + 1;
  d->op.type = CBW_CHAIN_OP_NONE;
  int r = ovc__hook ("finish-save", err) < 0 ? -1 : ovc__chain_save (chain_path, d, err);
  for (i = 0; dropped[i]; i++) {
    if (r == 0) {
      struct cbw_ovl_desc od;
      if (cbw_ovl_desc_load (dir, dropped[i], &od, NULL) == 0) {
        cbw_ovl_remove (dir, &od, NULL);
        cbw_ovl_desc_free (&od);
      }
    }
    free (dropped[i]);
  }
  free (dropped);
  return r;
}

struct ovc *
ovc_open (const char *chain_path, const struct ovc_open_opts *opts,
          char **recovered, struct cbw_err *err)
{
  struct ovc *c = calloc (1, sizeof *c);
  unsigned i;

  if (recovered) *recovered = NULL;
  if (c == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    return NULL;
  }
  pthread_mutex_init (&c->gate_lock, NULL);
  pthread_cond_init (&c->gate_cond, NULL);
  pthread_mutex_init (&c->map_lock, NULL);
  pthread_mutex_init (&c->range_lock, NULL);
  pthread_cond_init (&c->range_cond, NULL);
  pthread_mutex_init (&c->flush_lock, NULL);
  pthread_cond_init (&c->flush_cond, NULL);
  pthread_mutex_init (&c->op_lock, NULL);
  pthread_mutex_init (&c->op_iter_lock, NULL);
  c->mirror = -1;
  c->readonly = opts && opts->readonly;
  c->force_share = opts && opts->force_share;
  c->chain_path = strdup (chain_path);
  c->dir = cbw_ovl_dirname (chain_path);
  if (c->chain_path == NULL || c->dir == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  if (cbw_chain_desc_load (chain_path, &c->desc, err) < 0)
    goto fail;
  if (c->desc.op.type == CBW_CHAIN_OP_COMMIT) {
    char note[256];
    if (c->readonly) {
      cbw_err_set (err, EBUSY, "%s: an interrupted commit must be recovered; "
                   "open the chain read-write once", chain_path);
      goto fail;
    }
    snprintf (note, sizeof note, "commit of layers %u..%u (%s) was interrupted %s",
              c->desc.op.lo, c->desc.op.hi, cbw_commit_mode_name (c->desc.op.mode),
              c->desc.op.phase == CBW_CHAIN_PHASE_COPY
              ? "while copying: undone, the chain is unchanged (run it again)"
              : "while switching: finished");
    if (c->desc.op.phase == CBW_CHAIN_PHASE_COPY) {
      c->desc.op.type = CBW_CHAIN_OP_NONE;
      if (ovc__chain_save (chain_path, &c->desc, err) < 0)
        goto fail;
    }
    else if (ovc__roll_forward (chain_path, c->dir, &c->desc, err) < 0) {
      cbw_err_prefix (err, "%s: recovering interrupted commit", chain_path);
      goto fail;
    }
    if (recovered) *recovered = strdup (note);
  }
  if (cbw_chain_validate (c->dir, &c->desc, err) < 0) {
    cbw_err_prefix (err, "%s", chain_path);
    goto fail;
  }
  c->size = c->desc.size;
  c->csize = c->desc.cluster_size;
  c->cbits = (uint32_t) __builtin_ctz (c->csize);
  c->nl = (unsigned) c->desc.nlayers + 1;
  c->layers = calloc (c->nl, sizeof *c->layers);
  if (c->layers == NULL) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto fail;
  }
  for (i = 0; i < c->nl; i++) {
    c->layers[i] = ovc__layer_open (c, i == 0 ? c->desc.base : c->desc.layers[i - 1],
                               i == 0, err);
    if (c->layers[i] == NULL) {
      cbw_err_prefix (err, "%s: layer %u", chain_path, i);
      goto fail;
    }
  }
  return c;
 fail:
  if (c->layers)
    for (i = 0; i < c->nl; i++) ovc__layer_free (c->layers[i]);
  free (c->layers);
  cbw_chain_desc_free (&c->desc);
  free (c->chain_path);
  free (c->dir);
  free (c);
  if (recovered) { free (*recovered); *recovered = NULL; }
  return NULL;
}

void
ovc_close (struct ovc *c)
{
  struct cbw_err e;
  if (c == NULL) return;
  ovc_commit_cancel (c, &e);
  ovc_commit_wait (c, &e);
  ovc__reap_wait (c);
  if (!c->readonly)
    ovc__do_flush (c, &e);
  for (unsigned i = 0; i < c->nl; i++)
    ovc__layer_free (c->layers[i]);
  free (c->layers);
  free (c->ranges);
  cbw_chain_desc_free (&c->desc);
  cbw_bitmap_free (&c->op_bits);
  free (c->chain_path);
  free (c->dir);
  free (c);
}
