/* cbw — common/control.c: the vocabulary shared by the control socket's
 * server, its handlers and its clients: the error classes and their names,
 * cbw_ctl_fail() to fill a handler's reply, and the getters of validated
 * arguments.  The protocol is in control.h; the server is split by concern
 * (see control_internal.h for the list of files).
 *
 * Threads and locking: nothing here keeps state; every function may be
 * called from any thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <json-c/json.h>

#include "control.h"

/* ---- error classes ------------------------------------------------------ */

static const char *const class_names[CBW_CTL_ERROR_CLASS_COUNT] = {
  [CBW_CTL_GENERIC_ERROR] = "GenericError",
  [CBW_CTL_COMMAND_NOT_FOUND] = "CommandNotFound",
  [CBW_CTL_INVALID_PARAMETER] = "InvalidParameter",
  [CBW_CTL_PARSE_ERROR] = "ParseError",
  [CBW_CTL_NOT_FOUND] = "NotFound",
  [CBW_CTL_EXISTS] = "Exists",
  [CBW_CTL_BUSY] = "Busy",
  [CBW_CTL_IO_ERROR] = "IOError",
  [CBW_CTL_TIMEOUT] = "Timeout",
  [CBW_CTL_PERMISSION_DENIED] = "PermissionDenied",
};

const char *
cbw_ctl_error_class_name (enum cbw_ctl_error_class c)
{
  if ((unsigned) c >= CBW_CTL_ERROR_CLASS_COUNT)
    return "GenericError";
  return class_names[c];
}

int
cbw_ctl_error_class_from_name (const char *name)
{
  int i;

  if (name == NULL)
    return -1;
  for (i = 0; i < CBW_CTL_ERROR_CLASS_COUNT; ++i)
    if (strcmp (name, class_names[i]) == 0)
      return i;
  return -1;
}

int
cbw_ctl_fail (struct cbw_ctl_reply *r, enum cbw_ctl_error_class c,
              const char *fmt, ...)
{
  va_list ap;

  if ((unsigned) c >= CBW_CTL_ERROR_CLASS_COUNT)
    c = CBW_CTL_GENERIC_ERROR;
  r->err_class = c;
  va_start (ap, fmt);
  vsnprintf (r->err_desc, sizeof r->err_desc, fmt, ap);
  va_end (ap);
  return -1;
}

/* ---- argument getters --------------------------------------------------- */

const char *
cbw_ctl_arg_str (struct json_object *args, const char *name, const char *dflt)
{
  struct json_object *v;

  if (args && json_object_object_get_ex (args, name, &v) &&
      json_object_is_type (v, json_type_string))
    return json_object_get_string (v);
  return dflt;
}

long long
cbw_ctl_arg_int (struct json_object *args, const char *name, long long dflt)
{
  struct json_object *v;

  if (args && json_object_object_get_ex (args, name, &v) &&
      json_object_is_type (v, json_type_int))
    return (long long) json_object_get_int64 (v);
  return dflt;
}

bool
cbw_ctl_arg_bool (struct json_object *args, const char *name, bool dflt)
{
  struct json_object *v;

  if (args && json_object_object_get_ex (args, name, &v) &&
      json_object_is_type (v, json_type_boolean))
    return json_object_get_boolean (v);
  return dflt;
}
