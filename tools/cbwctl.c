/* cbw — tools/cbwctl.c: send one command to a cbw control socket (the chain
 * plugin's, the cbw or dirtybitmap filter's, or cbwd's) and print the reply.
 *
 *   cbwctl [--timeout SECS] [--raw] SOCKET COMMAND ['{"arg": value, ...}']
 *
 * Prints the "return" value as pretty JSON (or the whole reply with --raw)
 * and exits 0; on an error reply prints "cbwctl: CLASS: desc" to stderr and
 * exits 1; usage errors exit 2; connection failures exit 3.  Single-threaded,
 * no locking.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "control.h"

static void
usage (FILE *f)
{
  fprintf (f,
           "usage: cbwctl [--timeout SECS] [--raw] SOCKET COMMAND ['{JSON arguments}']\n"
           "       cbwctl --help | --version\n"
           "Send one command to a cbw control socket and print the reply.\n"
           "Try COMMAND query-commands to list what a socket understands.\n");
}

int
main (int argc, char *argv[])
{
  static const struct option opts[] = {
    { "timeout", required_argument, NULL, 't' },
    { "raw", no_argument, NULL, 'r' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  struct cbw_err err = { 0 };
  struct cbw_ctl_client *c = NULL;
  struct json_object *args = NULL, *reply = NULL, *v;
  long timeout = 0;
  int raw = 0, opt, ret = 1;
  char *end;

  while ((opt = getopt_long (argc, argv, "t:rh", opts, NULL)) != -1) {
    switch (opt) {
    case 't':
      errno = 0;
      timeout = strtol (optarg, &end, 10);
      if (errno || *end || timeout < 0 || timeout > 86400) {
        fprintf (stderr, "cbwctl: --timeout: not a number of seconds: %s\n", optarg);
        return 2;
      }
      break;
    case 'r': raw = 1; break;
    case 'h': usage (stdout); return 0;
    case 'V': printf ("cbwctl %s\n", CBW_VERSION); return 0;
    default: usage (stderr); return 2;
    }
  }
  if (argc - optind < 2 || argc - optind > 3) {
    usage (stderr);
    return 2;
  }
  if (argc - optind == 3) {
    enum json_tokener_error jerr;
    args = json_tokener_parse_verbose (argv[optind + 2], &jerr);
    if (args == NULL || !json_object_is_type (args, json_type_object)) {
      fprintf (stderr, "cbwctl: arguments must be a JSON object: %s\n",
               args ? "not an object" : json_tokener_error_desc (jerr));
      json_object_put (args);
      return 2;
    }
  }

  c = cbw_ctl_client_connect (argv[optind], &err);
  if (c == NULL) {
    fprintf (stderr, "cbwctl: %s\n", err.msg);
    json_object_put (args);
    return 3;
  }
  if (timeout > 0)
    cbw_ctl_client_set_timeout (c, (int) (timeout * 1000));
  reply = cbw_ctl_client_call (c, argv[optind + 1], args, &err);
  if (reply == NULL) {
    fprintf (stderr, "cbwctl: %s\n", err.msg);
    ret = 3;
    goto cleanup;
  }
  if (raw) {
    puts (json_object_to_json_string_ext (reply, JSON_C_TO_STRING_PLAIN));
    ret = json_object_object_get_ex (reply, "error", NULL) ? 1 : 0;
    goto cleanup;
  }
  if (json_object_object_get_ex (reply, "return", &v)) {
    puts (json_object_to_json_string_ext (v, JSON_C_TO_STRING_PRETTY |
                                             JSON_C_TO_STRING_NOSLASHESCAPE));
    ret = 0;
  }
  else if (json_object_object_get_ex (reply, "error", &v)) {
    struct json_object *cls = NULL, *desc = NULL;
    json_object_object_get_ex (v, "class", &cls);
    json_object_object_get_ex (v, "desc", &desc);
    fprintf (stderr, "cbwctl: %s: %s\n",
             cls ? json_object_get_string (cls) : "?",
             desc ? json_object_get_string (desc) : "?");
    ret = 1;
  }
  else {
    fprintf (stderr, "cbwctl: unexpected reply: %s\n",
             json_object_to_json_string (reply));
    ret = 3;
  }

 cleanup:
  json_object_put (reply);
  cbw_ctl_client_close (c);
  return ret;
}
