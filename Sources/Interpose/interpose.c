#include "interpose.h"

int interpose_abi_version(void) { return INTERPOSE_ABI_VERSION; }
