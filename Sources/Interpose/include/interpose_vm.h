/*
 * interpose_vm.h - the C ABI a patched QEMU calls to serve plover's VM replica agent.
 *
 * The agent (`plover vm primary|backup`, Sources/VMReplica) listens on a Unix-domain socket.
 * A QEMU that links libinterpose.so connects to it once, states its RAM geometry, and then:
 *
 *   - hands in its dirty log (KVM's or TCG's dirty bitmap, QEMU's layout: bit i % 64 of word
 *     i / 64 is guest page i) as often as it likes with interpose_vm_dirty_log*; the library ORs
 *     the bitmaps in memory and sends the union when the agent asks for it at a checkpoint;
 *   - serves the agent's requests from interpose_vm_poll: stop the VM, let it run again, sync
 *     the dirty log now, save the device state (the vmstate blob, RAM excluded) and load one, each
 *     through a hook QEMU registered (interpose_vm_hooks).
 *
 * This part is pure C: no Swift code runs in QEMU's process for it, and nothing needs the
 * replication ABI of interpose.h. Page indices are offsets into the VM's one RAM region (the
 * memory-backend-file the agent maps too) divided by the page size.
 *
 * Versioned: INTERPOSE_VM_ABI_VERSION changes whenever a declaration here or the wire format
 * below changes incompatibly; the agent refuses a hello of another version. Every function is
 * prefixed `interpose_vm_`. Failing calls return a negative INTERPOSE_VM_E* code and leave a
 * message for interpose_vm_last_error() on the calling thread.
 *
 * Threads:
 *   - interpose_vm_poll is called by one thread at a time (QEMU's main loop, holding the big
 *     QEMU lock, is the natural one: watch interpose_vm_fd and poll with timeout 0 when it is
 *     readable). Every hook runs on that thread, inside interpose_vm_poll.
 *   - interpose_vm_dirty_log and interpose_vm_dirty_log_range may be called from any thread at
 *     any time, concurrently with interpose_vm_poll and from inside a hook: they only OR into
 *     memory under a lock, never do I/O and never wait for the agent.
 *   - interpose_vm_state_append and interpose_vm_hook_error are only for use inside a hook.
 *   - interpose_vm_disconnect must not run concurrently with any other call on the same handle,
 *     nor from inside a hook.
 *   - interpose_vm_fd, interpose_vm_abi_version and interpose_vm_last_error: any thread.
 *
 * Wire format (Unix stream socket, integers little-endian). Every frame is
 *
 *     u32 length | u8 type | body (length bytes)
 *
 * with length at most INTERPOSE_VM_MAX_FRAME. `seq` is the agent's request number; a reply
 * carries the number of the request it answers, and a DIRTY_LOG frame that of the SYNC_DIRTY
 * request it belongs to.
 *
 *   QEMU -> agent                                  agent -> QEMU
 *   0x01 HELLO       u32 abi, u32 page_size,       0x81 WELCOME     u32 abi
 *                    u64 ram_bytes                 0x82 REFUSE      UTF-8 reason; then it closes
 *   0x02 DIRTY_LOG   u32 seq, u64 first_word,      0x83 STOP        u32 seq
 *                    u64 words[]                   0x84 CONT        u32 seq
 *   0x03 OK          u32 seq                       0x85 SYNC_DIRTY  u32 seq
 *   0x04 STATE       u32 seq, device state bytes   0x86 SAVE        u32 seq
 *   0x05 ERROR       u32 seq, i32 code,            0x87 LOAD        u32 seq, device state bytes
 *                    UTF-8 message
 *
 * The first frame is HELLO; the agent answers WELCOME, or REFUSE (wrong ABI version, other
 * geometry). Then the agent sends one request at a time and QEMU answers each in order: OK for
 * STOP, CONT and LOAD; for SYNC_DIRTY zero or more DIRTY_LOG frames (the union handed in since
 * the previous SYNC_DIRTY, all-zero stretches left out) followed by OK; STATE for SAVE; ERROR
 * when a hook is missing or failed. Either side closes the socket on a frame it cannot accept
 * (REFUSE names the reason first when the agent does it).
 */
#ifndef INTERPOSE_VM_H
#define INTERPOSE_VM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INTERPOSE_VM_ABI_VERSION 1

/* The largest frame body either side accepts (64 MiB): the device state must fit in one. */
#define INTERPOSE_VM_MAX_FRAME (64u * 1024u * 1024u)

/* Return codes. 0 is success; every failure is negative. */
#define INTERPOSE_VM_OK 0
#define INTERPOSE_VM_EINVAL (-1)    /* a bad argument: NULL, geometry that is not a whole number of pages */
#define INTERPOSE_VM_EBITMAP (-2)   /* a dirty bitmap of the wrong size, or with bits past the last page */
#define INTERPOSE_VM_ECONNECT (-3)  /* the agent's socket cannot be reached */
#define INTERPOSE_VM_EREFUSED (-4)  /* the agent refused the connection; the message is its reason */
#define INTERPOSE_VM_EPROTO (-5)    /* the agent sent a frame this library cannot accept */
#define INTERPOSE_VM_ECLOSED (-6)   /* the agent closed the connection, or the socket failed */
#define INTERPOSE_VM_ETIMEDOUT (-7) /* the agent did not answer the hello, or stalled inside a frame */
#define INTERPOSE_VM_ESTATE (-8)    /* the connection failed earlier: only interpose_vm_disconnect is left */
#define INTERPOSE_VM_ENOHOOK (-9)   /* (sent to the agent) the request's hook is not registered */
#define INTERPOSE_VM_EHOOK (-10)    /* (sent to the agent) the hook returned a failure */
#define INTERPOSE_VM_ETOOBIG (-11)  /* the saved device state exceeds INTERPOSE_VM_MAX_FRAME */

/* One connection to the agent. */
typedef struct interpose_vm interpose_vm;

/* Collects the device state a save_device_state hook produces (interpose_vm_state_append). */
typedef struct interpose_vm_state interpose_vm_state;

/* What QEMU does on the agent's requests. Each hook returns 0 on success and anything else on
 * failure (it may call interpose_vm_hook_error first to say why). A NULL hook answers its
 * request with INTERPOSE_VM_ENOHOOK. Hooks run on the thread in interpose_vm_poll and may block
 * (a device state save takes milliseconds); the agent waits for the answer with its own timeout.
 * The struct is copied by interpose_vm_connect. */
typedef struct interpose_vm_hooks {
    /* Stop the VM (vm_stop): no guest code runs and no device changes state until cont. */
    int (*stop)(void *context);
    /* Let the stopped VM run again (vm_start). */
    int (*cont)(void *context);
    /* Sync the dirty log now (the VM is stopped) and hand in what it holds with
     * interpose_vm_dirty_log* before returning: the agent's union then covers every write
     * made until the stop. NULL when the dirty log is only handed in by other means. */
    int (*sync_dirty_log)(void *context, interpose_vm *vm);
    /* Write the device state of the stopped VM (what a migration sends with RAM excluded) into
     * `out` with interpose_vm_state_append, in as many pieces as convenient. */
    int (*save_device_state)(void *context, interpose_vm_state *out);
    /* Load a device state saved by the primary's save_device_state into this stopped VM, in
     * place: the running QEMU takes it, no new process is started. `data` is valid only during
     * the call. */
    int (*load_device_state)(void *context, const void *data, size_t length);
} interpose_vm_hooks;

/* The ABI version this library was built with; compare with INTERPOSE_VM_ABI_VERSION. */
int interpose_vm_abi_version(void);

/* Connects to the agent listening at `socket_path`, sends the hello (ABI version, `ram_bytes`
 * of guest RAM in pages of `page_size` bytes) and waits up to 10 s for the answer. `page_size`
 * is a power of two from 512 to 2 MiB and divides `ram_bytes`. `hooks` (may be NULL: no hooks)
 * and `context`, passed to every hook, are kept for the connection's life. On success `*out`
 * receives the handle; on failure it is set to NULL and the code says which step failed
 * (ECONNECT, EREFUSED with the agent's reason, ETIMEDOUT, ECLOSED, EPROTO, EINVAL).
 * The stall limit (30 s; INTERPOSE_VM_STALL_MS in the environment sets another, 100 ms to 1 h,
 * EINVAL for a value outside that) bounds the agent inside a frame it sends and the time it
 * takes to accept a whole answer of QEMU's. */
int interpose_vm_connect(const char *socket_path, uint64_t ram_bytes, uint32_t page_size,
                         const interpose_vm_hooks *hooks, void *context, interpose_vm **out);

/* The connection's socket, to watch for readability in QEMU's main loop; -1 for NULL. */
int interpose_vm_fd(const interpose_vm *vm);

/* Waits up to `timeout_ms` (0: do not wait, -1: no limit) for requests from the agent and serves
 * every complete one that is there, running its hook. Returns how many it served (0 when none
 * came), or a negative code: ECLOSED when the agent went away, EPROTO for a frame it cannot
 * accept, ETIMEDOUT when the agent stalled inside a frame, or did not take a whole answer, within
 * the stall limit (30 s), ESTATE after an earlier
 * failure. After a negative code the connection is unusable (disconnect it). A failing hook is
 * not a failure of interpose_vm_poll: the agent gets the error. */
int interpose_vm_poll(interpose_vm *vm, int timeout_ms);

/* Hands in a whole dirty bitmap: `nwords` must be exactly (pages + 63) / 64 and no bit past the
 * last page may be set (INTERPOSE_VM_EBITMAP otherwise; nothing is recorded). The bits are ORed
 * into the union the agent gets at its next SYNC_DIRTY request; `words` may be reused at once. */
int interpose_vm_dirty_log(interpose_vm *vm, const uint64_t *words, size_t nwords);

/* Like interpose_vm_dirty_log for words `first_word` .. `first_word + nwords - 1` of the bitmap
 * only (one memory slot, say). The range must lie inside the bitmap and set no bit past the last
 * page (INTERPOSE_VM_EBITMAP otherwise). */
int interpose_vm_dirty_log_range(interpose_vm *vm, uint64_t first_word, const uint64_t *words, size_t nwords);

/* Inside save_device_state: appends `length` bytes to the device state. INTERPOSE_VM_ETOOBIG once
 * the total would exceed INTERPOSE_VM_MAX_FRAME (the agent then gets an error, not a short state). */
int interpose_vm_state_append(interpose_vm_state *out, const void *data, size_t length);

/* Inside a hook that is about to fail: the message the agent gets with the error (copied). */
void interpose_vm_hook_error(interpose_vm *vm, const char *message);

/* Closes the connection and frees the handle (NULL is ignored). The agent sees the socket close. */
void interpose_vm_disconnect(interpose_vm *vm);

/* The message of the last failed call on this thread ("" if none). Valid until the next call. */
const char *interpose_vm_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
