#ifndef PLOVER_BDB_HASH_H
#define PLOVER_BDB_HASH_H

#include <stdint.h>

/* Berkeley DB checksums every log record it writes with its `__ham_func4` hash
 * (h = 33 * h + byte over the record, from 0), one byte at a time: a third of the log writer's
 * CPU with 4 KiB entries. This module defines `__ham_func4` again, computing the same value
 * 32 bytes at a time. libdb calls it through its PLT, so the linker exports this definition from
 * an executable that links libdb (libinterpose.so lists it in its version script) and libdb's
 * calls bind to it: docs/design/stable-log.md, "The log's checksum". */

/** The value Berkeley DB's `__ham_func4` gives for `length` bytes at `bytes`. */
uint32_t plover_bdb_hash4(const void *bytes, uint32_t length);

/** The same value by the path a machine without AVX2 takes (eight bytes a step), for the tests. */
uint32_t plover_bdb_hash4_portable(const void *bytes, uint32_t length);

/** 1 when the process's own lookup of `__ham_func4` finds this module's definition, 0 when
 * another (libdb's own). What libdb's calls bind to, the dynamic linker reports (`LD_DEBUG`). */
int plover_bdb_hash4_in_effect(void);

#endif
