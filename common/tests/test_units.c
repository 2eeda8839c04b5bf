/* cbw — common/tests/test_units.c: the one size grammar (units.h). */
#include <stdint.h>

#include <criterion/criterion.h>

#include "units.h"

static uint64_t
ok (const char *s)
{
  uint64_t v = 12345;
  cr_assert_eq (cbw_parse_size (s, UINT64_MAX, &v), 0, "'%s' refused", s);
  return v;
}

static void
bad (const char *s, uint64_t max)
{
  uint64_t v = 12345;
  cr_assert_eq (cbw_parse_size (s, max, &v), -1, "'%s' accepted", s);
  cr_assert_eq (v, 12345, "'%s': out changed on failure", s);
}

Test (units, accepted)
{
  cr_assert_eq (ok ("0"), 0);
  cr_assert_eq (ok ("1048576"), 1048576);
  cr_assert_eq (ok ("512K"), 512 << 10);
  cr_assert_eq (ok ("512k"), 512 << 10);
  cr_assert_eq (ok ("10M"), 10ULL << 20);
  cr_assert_eq (ok ("10MiB"), 10ULL << 20);
  cr_assert_eq (ok ("10MB"), 10ULL << 20);
  cr_assert_eq (ok ("3g"), 3ULL << 30);
  cr_assert_eq (ok ("2T"), 2ULL << 40);
  cr_assert_eq (ok ("7B"), 7);
  cr_assert_eq (ok ("16777215T"), 16777215ULL << 40);
}

Test (units, refused)
{
  bad (NULL, UINT64_MAX);
  bad ("", UINT64_MAX);
  bad ("-1", UINT64_MAX);
  bad ("+1", UINT64_MAX);
  bad (" 1", UINT64_MAX);
  bad ("1 ", UINT64_MAX);
  bad ("1.5G", UINT64_MAX);
  bad ("1P", UINT64_MAX);
  bad ("1iB", UINT64_MAX);          /* "i" only after a unit letter */
  bad ("1GBB", UINT64_MAX);
  bad ("M", UINT64_MAX);
  bad ("18446744073709551616", UINT64_MAX);
  bad ("16777216T", UINT64_MAX);    /* 2^64 */
  bad ("8E", UINT64_MAX);
  bad ("9223372036854775808", INT64_MAX);
  bad ("8388608T", INT64_MAX);      /* 2^63 */
  uint64_t v;
  cr_assert_eq (cbw_parse_size ("8388607T", INT64_MAX, &v), 0);
}
