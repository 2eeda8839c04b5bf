/* cbw — common/units.h: sizes as people write them ("512K", "10GiB").
 *
 * One grammar for every size cbw takes (cbwd options and export keys, the
 * orchestrator's environment, cbw's flags): decimal digits, then optionally
 * K, M, G or T (powers of 1024, either case), an optional "i" after the
 * letter and an optional "B".  Nothing else: no sign, no blanks, no
 * fractions.  No locking: pure functions. */
#ifndef CBW_UNITS_H
#define CBW_UNITS_H

#include <stdint.h>

/* 0 and *out set, or -1 (out untouched) if s is not a size or the value
 * does not fit in max. */
int cbw_parse_size (const char *s, uint64_t max, uint64_t *out);

#endif
