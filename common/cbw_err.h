/* cbw — common/cbw_err.h: the one error type used by the libraries in formats/
 * and common/.
 *
 * A library function that can fail takes a `struct cbw_err *` and returns -1
 * (or NULL) after filling it: `errnum` is a positive errno value (EINVAL for
 * bad input, EIO for corrupt data, ENOENT, ENOSPC, ...) and `msg` names the
 * file and the problem, e.g. "disk.img.bitmaps.json: bitmap 'b0': bad
 * checksum (expected 0x..., got 0x...)".  Callers in nbdkit modules pass it to
 * nbdkit_error() and set errno = err.errnum.  Not thread-shared: one per call.
 */
#ifndef CBW_ERR_H
#define CBW_ERR_H

#include <stddef.h>

#define CBW_ERR_MSG_MAX 512

struct cbw_err {
  int errnum;                     /* positive errno value, 0 = no error */
  char msg[CBW_ERR_MSG_MAX];
};

/* Fill *err (if non-NULL) and return -1; printf-style message. */
int cbw_err_set (struct cbw_err *err, int errnum, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

/* Prefix an existing message: "PREFIX: old message". Returns -1. */
int cbw_err_prefix (struct cbw_err *err, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

#endif
