/* cbw — common/cbw_err.c: see cbw_err.h. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "cbw_err.h"

int
cbw_err_set (struct cbw_err *err, int errnum, const char *fmt, ...)
{
  va_list ap;

  if (err == NULL)
    return -1;
  err->errnum = errnum > 0 ? errnum : 5 /* EIO */;
  va_start (ap, fmt);
  vsnprintf (err->msg, sizeof err->msg, fmt, ap);
  va_end (ap);
  return -1;
}

int
cbw_err_prefix (struct cbw_err *err, const char *fmt, ...)
{
  char prefix[CBW_ERR_MSG_MAX], old[CBW_ERR_MSG_MAX];
  va_list ap;

  if (err == NULL)
    return -1;
  va_start (ap, fmt);
  vsnprintf (prefix, sizeof prefix, fmt, ap);
  va_end (ap);
  memcpy (old, err->msg, sizeof old);
  snprintf (err->msg, sizeof err->msg, "%s: %s", prefix, old);
  return -1;
}
