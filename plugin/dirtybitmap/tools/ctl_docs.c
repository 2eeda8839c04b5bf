/* cbw — plugin/dirtybitmap/tools/ctl_docs.c: print the markdown reference of
 * the dirtybitmap control commands, generated from the one command table
 * (docs/control/dirtybitmap.md is this program's output; a test checks it).
 * Single-threaded, no locking. */
#include <stdio.h>
#include <stdlib.h>

#include "commands.h"

int
main (void)
{
  char *md = cbw_ctl_docs_markdown (&dbm_ctl_table);

  if (md == NULL) {
    perror ("cbw_ctl_docs_markdown");
    return 1;
  }
  fputs (md, stdout);
  free (md);
  return 0;
}
