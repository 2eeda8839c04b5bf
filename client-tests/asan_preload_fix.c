/* cbw — client-tests/asan_preload_fix.c: preloaded into nbdkit (after the
 * ASan and UBSan runtimes) in the sanitizer build only.
 *
 * Why: nbdkit links libgnutls → libp11-kit, whose constructor calls
 * newlocale() before the preloaded ASan runtime has initialised.  newlocale
 * holds glibc's __libc_setlocale_lock for writing and calls malloc; ASan's
 * malloc then initialises ASan, which looks up the optional symbol
 * swift_demangle with dlsym and, not finding it, calls dlerror().  Translating
 * that message tries to read-lock the same lock (EDEADLK, ignored), and the
 * matching unlock leaves the lock's reader count at -1.  From then on every
 * duplocale()/newlocale() — json-c calls one on every parse, so every control
 * request — blocks forever.  Defining swift_demangle makes ASan's lookup
 * succeed, so dlerror() never runs inside newlocale.  (Diagnosed with gdb
 * breakpoints on the rwlock; see docs/testing.md.)
 *
 * No state, no locking.
 */
#include <stddef.h>
#include <stdint.h>

char *swift_demangle (const char *mangled, size_t len, char *out,
                      size_t *out_len, uint32_t flags);

char *
swift_demangle (const char *mangled, size_t len, char *out, size_t *out_len,
                uint32_t flags)
{
  (void) mangled; (void) len; (void) out; (void) out_len; (void) flags;
  return NULL;                  /* "cannot demangle": ASan falls back to the raw name */
}
