/* cbw — common/tests/ctl_test_util.h: for unit tests of a module's control
 * command table: one request line dispatched on the test thread
 * (cbw_ctl_dispatch_line), the reply parsed, and its error class.
 * Header-only (static inline), Criterion assertions on failure; no locking.
 * Link the test with the INTERFACE target cbwctltest. */
#ifndef CBW_CTL_TEST_UTIL_H
#define CBW_CTL_TEST_UTIL_H

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <json-c/json.h>

#include "control.h"

/* One control request line through table with data; the parsed reply. */
static inline struct json_object *
ctl_test_call (const struct cbw_ctl_table *table, void *data, const char *line)
{
  char *reply = cbw_ctl_dispatch_line (table, data, line, strlen (line));
  cr_assert_not_null (reply);
  struct json_object *o = json_tokener_parse (reply);
  cr_assert_not_null (o, "bad reply %s", reply);
  free (reply);
  return o;
}

/* The error class of a reply; NULL if it succeeded. */
static inline const char *
ctl_test_err_class (struct json_object *o)
{
  struct json_object *e, *c;
  if (!json_object_object_get_ex (o, "error", &e))
    return NULL;
  json_object_object_get_ex (e, "class", &c);
  return json_object_get_string (c);
}

#endif
