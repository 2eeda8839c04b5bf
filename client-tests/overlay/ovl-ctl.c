/* cbw — client-tests/overlay/ovl-ctl.c: send one control request to a cbw
 * module and print the reply line (like ctl() in functions.sh, without a
 * Python start-up per call).  Usage: ovl-ctl SOCKET '{"execute":...}'.
 * Single-threaded. */
#include <stdio.h>
#include <string.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "control.h"

int
main (int argc, char **argv)
{
  struct cbw_err err = { 0 };
  struct json_object *req, *cmd, *args = NULL, *reply;
  struct cbw_ctl_client *c;

  if (argc != 3) {
    fprintf (stderr, "usage: ovl-ctl SOCKET JSON\n");
    return 2;
  }
  req = json_tokener_parse (argv[2]);
  if (req == NULL || !json_object_object_get_ex (req, "execute", &cmd)) {
    fprintf (stderr, "ovl-ctl: request must be a JSON object with \"execute\"\n");
    return 2;
  }
  if (json_object_object_get_ex (req, "arguments", &args))
    json_object_get (args);
  c = cbw_ctl_client_connect (argv[1], &err);
  if (c == NULL) {
    fprintf (stderr, "ovl-ctl: %s\n", err.msg);
    return 1;
  }
  reply = cbw_ctl_client_call (c, json_object_get_string (cmd), args, &err);
  if (reply == NULL) {
    fprintf (stderr, "ovl-ctl: %s\n", err.msg);
    cbw_ctl_client_close (c);
    return 1;
  }
  printf ("%s\n", json_object_to_json_string_ext (reply, JSON_C_TO_STRING_PLAIN));
  json_object_put (reply);
  json_object_put (req);
  cbw_ctl_client_close (c);
  return 0;
}
