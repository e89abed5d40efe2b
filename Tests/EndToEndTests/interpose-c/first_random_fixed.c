/* first_random_fixed.c - an LD_PRELOAD library for the libinterpose tests: the first getrandom()
 * that libinterpose.so itself makes gets the same fixed bytes in every process; every other call
 * gets the kernel's. Preloaded ahead of libinterpose.so on every replica, it makes them all draw
 * the same connection-id incarnation, the collision the shim must notice and draw again for. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

static atomic_int used;

ssize_t getrandom(void *buf, size_t len, unsigned int flags) {
    Dl_info info;
    if (dladdr(__builtin_return_address(0), &info) && info.dli_fname && strstr(info.dli_fname, "libinterpose")
        && !atomic_exchange(&used, 1)) {
        memset(buf, 0x5a, len);
        return (ssize_t)len;
    }
    return syscall(SYS_getrandom, buf, len, flags);
}
