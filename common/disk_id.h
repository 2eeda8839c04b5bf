/* cbw — common/disk_id.h: the stable identity of a cbw disk.
 *
 * Every disk gets a random UUID when it is added (cbwd keeps it in its state
 * file).  The chain plugin takes it as disk-id=UUID and announces it as the
 * NBD export description "cbw-disk-id:UUID" of the live export, so that any
 * NBD client (a push job of this or another cbwd, over a Unix socket, TCP or
 * a proxy) can tell that an export is a live cbw disk before writing to it.
 *
 * No state, no locking: pure functions.
 */
#ifndef CBW_DISK_ID_H
#define CBW_DISK_ID_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#define CBW_DISK_ID_LEN 36                     /* 8-4-4-4-12 hex digits */
#define CBW_DISK_ID_DESC_PREFIX "cbw-disk-id:"  /* export description */

/* Lowercase canonical UUID text. */
static inline bool
cbw_disk_id_valid (const char *s)
{
  if (s == NULL || strlen (s) != CBW_DISK_ID_LEN)
    return false;
  for (size_t i = 0; i < CBW_DISK_ID_LEN; i++) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (s[i] != '-')
        return false;
    }
    else if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
      return false;
  }
  return true;
}

/* A new random (version 4) UUID into out (CBW_DISK_ID_LEN + 1 bytes);
 * 0, or -1 with errno when the kernel has no randomness for us. */
static inline int
cbw_disk_id_new (char *out)
{
  uint8_t b[16];
  size_t got = 0;
  while (got < sizeof b) {
    ssize_t r = getrandom (b + got, sizeof b - got, 0);
    if (r < 0)
      return -1;
    got += (size_t) r;
  }
  b[6] = (uint8_t) ((b[6] & 0x0f) | 0x40);
  b[8] = (uint8_t) ((b[8] & 0x3f) | 0x80);
  snprintf (out, CBW_DISK_ID_LEN + 1,
            "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
            b[12], b[13], b[14], b[15]);
  return 0;
}

/* The disk id announced by an export description, or NULL if the
 * description is not a cbw disk's. */
static inline const char *
cbw_disk_id_from_desc (const char *desc)
{
  size_t n = strlen (CBW_DISK_ID_DESC_PREFIX);
  if (desc == NULL || strncmp (desc, CBW_DISK_ID_DESC_PREFIX, n) != 0)
    return NULL;
  return desc + n;
}

#endif
