/*
 * interpose.h - the stable C ABI of plover's replication library, libinterpose.so.
 *
 * One process holds at most one replica. interpose_init() starts it from a plover node config
 * file (TOML, the same file `plover node --config` reads: id, data_dir, durability, fabric,
 * cluster_key_file, [[members]]); the replica joins the cluster named there, persists the log
 * in Berkeley DB under data_dir and elects a leader with its peers. The leader proposes inputs;
 * every replica's deliver callback then sees every committed input once, in log order.
 *
 * Versioned: INTERPOSE_ABI_VERSION changes whenever a declaration here changes incompatibly.
 * Every exported function is prefixed `interpose_`. Failing calls return a negative
 * INTERPOSE_E* code and leave a message for interpose_last_error() on the calling thread.
 *
 * Threads: every function may be called from any thread except from inside a callback (which
 * runs on the library's replica thread and must not block). The blocking calls
 * (interpose_init, interpose_propose, interpose_checkpoint) must not be called from a callback.
 *
 * The same library is the LD_PRELOAD shim that replicates an unmodified TCP server (set
 * INTERPOSE_CONFIG and INTERPOSE_PORT; see docs/design/interpose.md). Without INTERPOSE_CONFIG
 * in the environment its libc hooks only pass calls through, so a program can link it for the
 * C ABI alone.
 */
#ifndef INTERPOSE_H
#define INTERPOSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INTERPOSE_ABI_VERSION 2

/* Return codes. 0 is success; every failure is negative. */
#define INTERPOSE_OK 0
#define INTERPOSE_EINVAL (-1)       /* a bad argument (NULL buffer, empty input, ...) */
#define INTERPOSE_ESTATE (-2)       /* not initialised, or already initialised */
#define INTERPOSE_ECONFIG (-3)      /* the config file is missing or wrong (the message says where) */
#define INTERPOSE_ESTART (-4)       /* the replica could not start (ports, log store, key) */
#define INTERPOSE_ENOTLEADER (-5)   /* this replica does not lead; the input was not proposed */
#define INTERPOSE_ESUPERSEDED (-6)  /* leadership changed first: the input did not commit */
#define INTERPOSE_EUNKNOWN (-7)     /* timed out or overtaken by a snapshot: it may or may not commit */
#define INTERPOSE_EREFUSED (-8)     /* the leader refused it (overloaded, too large, transfer running) */
#define INTERPOSE_ESTOPPED (-9)     /* the replica stopped (shut down, or its stable log failed) */

/* Kinds of committed entries passed to the deliver callback. */
#define INTERPOSE_ENTRY_INPUT 0      /* an input proposed with interpose_propose* */
#define INTERPOSE_ENTRY_CHECKPOINT 1 /* a checkpoint mark (interpose_checkpoint); data is empty */

/* Receives one committed entry: its kind, its log index (increasing) and its bytes (valid only
 * during the call). Runs on the replica thread, in log order, on every replica, leader included;
 * it must not block or call the blocking functions. After a restart, entries the replica had
 * already delivered before it stopped are delivered again from the start of its log. */
typedef void (*interpose_deliver_fn)(void *context, int kind, uint64_t index, const void *data, size_t length);

/* Receives the outcome of interpose_propose_async: INTERPOSE_OK with the entry's log index, or a
 * negative code (index 0). Runs on the replica thread; must not block. */
typedef void (*interpose_done_fn)(void *context, int status, uint64_t index);

/* The ABI version this library was built with; compare with INTERPOSE_ABI_VERSION. */
int interpose_abi_version(void);

/* Sets the callback for committed entries. Call before interpose_init so no entry is missed;
 * INTERPOSE_ESTATE afterwards. */
int interpose_set_deliver(interpose_deliver_fn deliver, void *context);

/* Starts this process's replica from the node config file at `config_path` and returns once it
 * serves (it may still be electing a leader). INTERPOSE_ECONFIG / INTERPOSE_ESTART on failure,
 * INTERPOSE_ESTATE if a replica already runs. */
int interpose_init(const char *config_path);

/* Stops the replica and closes its log. Pending proposals fail with INTERPOSE_ESTOPPED.
 * INTERPOSE_ESTATE if none runs. A stopped process cannot start another replica. */
int interpose_shutdown(void);

/* 1 if this replica leads now, 0 if not (or not initialised). */
int interpose_is_leader(void);

/* The term of this replica's ballot while it leads (at least 1), 0 while it does not. Two calls
 * that return the same non-zero term saw one unbroken tenure: a leadership lost and regained in
 * between returns a higher term. */
uint64_t interpose_leader_term(void);

/* The node id of the leader this replica knows of, 0 if none or not initialised. */
uint64_t interpose_leader_id(void);

/* Proposes `length` bytes (1 .. 1 MiB) and returns once they committed and this replica delivered
 * them (to the callback) — leader only. `*index` (may be NULL) receives the log index. */
int interpose_propose(const void *data, size_t length, uint64_t *index);

/* Like interpose_propose but returns at once; `done` gets the outcome. Inputs proposed one after
 * another from one thread enter the log in that order while the leader stays in office. */
int interpose_propose_async(const void *data, size_t length, interpose_done_fn done, void *context);

/* Commits a checkpoint mark (leader only) and returns once it committed and was delivered here:
 * every replica sees it at the same place in the input stream (syncvm runs at that cut).
 * `*index` (may be NULL) receives its log index. */
int interpose_checkpoint(uint64_t *index);

/* Writes this replica's status as "key=value" lines (id, role, leader, ballot, commit_index,
 * applied_index, ...) NUL-terminated into `buffer` and returns the full length without the NUL
 * (truncated if it does not fit in `capacity`), or a negative code. */
int interpose_status(char *buffer, size_t capacity);

/* The message of the last failed call on this thread ("" if none). Valid until the next call. */
const char *interpose_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
