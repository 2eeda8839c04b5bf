/* cbw — plugin/cbw/tools/ctl_docs.c: print the cbw filter's control command
 * reference (docs/control/cbw.md), generated from the command table of the
 * built module.  Usage: cbw-ctl-docs PATH/nbdkit-cbw-filter.so
 *
 * The table lives in the module next to handlers that call into nbdkit, so
 * the module is dlopen'ed lazily (nbdkit's functions are never called) and
 * the table fetched through cbw_filter_ctl_table().  No locking: one thread.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include "control.h"

int
main (int argc, char **argv)
{
  const struct cbw_ctl_table *(*get) (void);
  void *dl;
  char *md;

  if (argc != 2) {
    fprintf (stderr, "usage: %s nbdkit-cbw-filter.so\n", argv[0]);
    return 2;
  }
  dl = dlopen (argv[1], RTLD_LAZY | RTLD_LOCAL);
  if (dl == NULL) {
    fprintf (stderr, "%s: %s\n", argv[0], dlerror ());
    return 1;
  }
  *(void **) &get = dlsym (dl, "cbw_filter_ctl_table");
  if (get == NULL) {
    fprintf (stderr, "%s: %s\n", argv[0], dlerror ());
    return 1;
  }
  md = cbw_ctl_docs_markdown (get ());
  if (md == NULL) {
    fprintf (stderr, "%s: out of memory\n", argv[0]);
    return 1;
  }
  fputs (md, stdout);
  free (md);
  return 0;
}
