/* cbw — server/orch/plan.c: checkpoint arithmetic, pure functions.
 *
 * Model: checkpoint C covers a set of disks.  On each covered disk the
 * dirtybitmap filter holds bitmap "cp-C", which records the writes made
 * after C and before the next checkpoint covering that disk (while C is the
 * latest on the disk, "cp-C" is enabled; when a newer checkpoint is created
 * it is disabled, i.e. frozen).  Hence the blocks changed on disk D since
 * checkpoint X are the union of the bitmaps of X and of every later
 * checkpoint covering D; deleting C merges "cp-C" into the bitmap of the
 * previous checkpoint covering D (if C was the latest, that one is enabled
 * again first), so "since" queries on older checkpoints stay exact.
 *
 * No locking: callers hold o->lock or own the state exclusively.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "orch_internal.h"

void
orch_cp_bitmap (const char *cp, char *buf, size_t len)
{
  snprintf (buf, len, "cp-%s", cp);
}

bool
orch_cp_has_disk (const struct orch_checkpoint *c, const char *disk)
{
  for (size_t i = 0; i < c->ndisks; i++)
    if (strcmp (c->disks[i], disk) == 0)
      return true;
  return false;
}

ssize_t
orch_latest_cp (const struct orch_state *st, const char *disk)
{
  for (size_t i = st->ncps; i-- > 0;)
    if (orch_cp_has_disk (&st->cps[i], disk))
      return (ssize_t) i;
  return -1;
}

ssize_t
orch_plan_since (const struct orch_state *st, const char *disk,
                 const char *since, size_t *idx, struct cbw_err *err)
{
  size_t i, n = 0;
  for (i = 0; i < st->ncps; i++)
    if (strcmp (st->cps[i].name, since) == 0)
      break;
  if (i == st->ncps)
    return cbw_err_set (err, ENOENT, "checkpoint \"%s\" does not exist", since);
  if (!orch_cp_has_disk (&st->cps[i], disk))
    return cbw_err_set (err, ENOENT, "checkpoint \"%s\" does not cover disk \"%s\"",
                        since, disk);
  for (; i < st->ncps; i++)
    if (orch_cp_has_disk (&st->cps[i], disk))
      idx[n++] = i;
  return (ssize_t) n;
}

ssize_t
orch_plan_delete_into (const struct orch_state *st, size_t ci, const char *disk)
{
  for (size_t i = ci; i-- > 0;)
    if (orch_cp_has_disk (&st->cps[i], disk))
      return (ssize_t) i;
  return -1;
}
