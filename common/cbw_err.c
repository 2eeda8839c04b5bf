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
  /* "prefix: old", truncated to fit (spelled out: snprintf trips
   * -Wformat-truncation at -O2). */
  {
    size_t cap = sizeof err->msg - 1, n = 0, l;
    l = strlen (prefix); if (l > cap - n) l = cap - n;
    memcpy (err->msg + n, prefix, l); n += l;
    l = 2; if (l > cap - n) l = cap - n;
    memcpy (err->msg + n, ": ", l); n += l;
    l = strnlen (old, sizeof old); if (l > cap - n) l = cap - n;
    memcpy (err->msg + n, old, l); n += l;
    err->msg[n] = '\0';
  }
  return -1;
}
