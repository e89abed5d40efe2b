#include <xxhash.h>
/* The runtime-dispatching XXH3 entry points (XXH3_64bits_dispatch …) that Debian's libxxhash
   exports on x86-64; the replace macros are off so the plain names stay the generic build. */
#if defined(__x86_64__) && __has_include(<xxh_x86dispatch.h>)
#define XXH_DISPATCH_DISABLE_REPLACE 1
#include <xxh_x86dispatch.h>
#endif
