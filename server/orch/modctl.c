/* cbw — server/orch/modctl.c: one request to a module's control socket
 * (chain plugin, cbw filter, dirtybitmap filter of a disk's nbdkit).
 *
 * A fresh connection per call: module sockets serve few clients, calls are
 * rare (checkpoints, backups), and a fresh connection cannot carry a stale
 * reply after a timeout.  Every failure names the socket and the command.
 *
 * Locking: none; called by the busy owner without o->lock held.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "control.h"
#include "orch_internal.h"

#define MODCTL_TIMEOUT_MS 60000

struct json_object *
orch_mod_call (const char *sock, const char *command, struct json_object *args,
               char *cls, size_t cls_len, struct cbw_err *err)
{
  struct json_object *ret = NULL;
  int ec = -1;

  if (cls && cls_len)
    cls[0] = '\0';
  struct cbw_ctl_client *c = cbw_ctl_client_connect (sock, err);
  if (c == NULL) {
    json_object_put (args);
    return NULL;
  }
  cbw_ctl_client_set_timeout (c, MODCTL_TIMEOUT_MS);
  if (cbw_ctl_client_execute (c, command, args, &ret, &ec, err) < 0) {
    if (cls && cls_len && ec >= 0)
      snprintf (cls, cls_len, "%s", cbw_ctl_error_class_name (ec));
    cbw_err_prefix (err, "%s", sock);
    cbw_ctl_client_close (c);
    return NULL;
  }
  cbw_ctl_client_close (c);
  return ret ? ret : json_object_new_object ();
}
