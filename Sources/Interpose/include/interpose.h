/*
 * interpose.h - the stable C ABI of plover's replication library.
 *
 * Versioned: INTERPOSE_ABI_VERSION changes whenever a declaration here changes
 * incompatibly. Every exported symbol is prefixed `interpose_`.
 */
#ifndef INTERPOSE_H
#define INTERPOSE_H

#ifdef __cplusplus
extern "C" {
#endif

#define INTERPOSE_ABI_VERSION 1

/* The ABI version this library was built with; compare with INTERPOSE_ABI_VERSION. */
int interpose_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif
