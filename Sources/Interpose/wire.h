/* wire.h - internal: the APUS log entry format, in one place (encoders and one validating decoder).
 * Pure functions over byte buffers: no locks, no libc hooks, so it can be fuzzed on its own
 * (Tests/EndToEndTests/interpose-c/wire_fuzz.c compiles wire.c alone).
 *
 * Every entry (the bytes after the C ABI's kind byte) starts with an op byte:
 *   OPEN    | id          a leader accepted a connection
 *   CLOSE   | id          the connection ended (the server closed it, or a new leader ends it)
 *   BATCH   | item*       a read-ahead round; item = id | length (u32 LE) | length bytes, in the
 *                         order the server reads them; length 0xFFFFFFFF (no bytes) is that
 *                         client's end of stream, in its place in the round
 *   BATCH_HEAD, BATCH_BODY, BATCH_TAIL | item*
 *                         a round too large for one entry, in consecutive entries: its first
 *                         part, any middle ones, its last (followers replay the parts together)
 *   BARRIER               a leader's marker (readiness); every replica skips it
 *   SNAPSHOT              a leader's cut: every replica with a snapshot protocol saves its server
 *                         here if no connection of the log is open (snapshot.c)
 * A connection id is 16 bytes: the 64-bit random incarnation of the process that accepted it
 * and a 64-bit serial number it counts (both little-endian), so ids never wrap and processes
 * pick ids without asking one another. The ops of the earlier format (8-byte ids, ops 1-4) are
 * recognised only to refuse them. */
#ifndef INTERPOSE_WIRE_H
#define INTERPOSE_WIRE_H

#include <stddef.h>
#include <stdint.h>

typedef struct { uint64_t inc, serial; } conn_id;

static inline int conn_id_eq(conn_id a, conn_id b) { return a.inc == b.inc && a.serial == b.serial; }

enum { WIRE_OPEN = 0x11, WIRE_CLOSE = 0x13, WIRE_BATCH = 0x14, WIRE_BARRIER = 0x15, WIRE_SNAPSHOT = 0x16,
       WIRE_BATCH_HEAD = 0x17, WIRE_BATCH_BODY = 0x18, WIRE_BATCH_TAIL = 0x19 };
/* What wire_round_part says of an entry: it continues the round of the entry before it; the
 * round goes on in the entry after it. */
enum { WIRE_ROUND_CONTINUES = 1, WIRE_ROUND_GOES_ON = 2 };
/* What the decoder reports per item: the ops above, plus a BATCH's items. */
enum { WIRE_ITEM_DATA = 0x21, WIRE_ITEM_END = 0x22 };

#define WIRE_ID_BYTES 16
#define WIRE_CONTROL_BYTES (1 + WIRE_ID_BYTES)     /* OPEN and CLOSE entries */
#define WIRE_ITEM_HEADER_BYTES (WIRE_ID_BYTES + 4) /* a BATCH item's id and length */
#define WIRE_END_OF_STREAM 0xFFFFFFFFu

/* OPEN or CLOSE of `id` into `out` (WIRE_CONTROL_BYTES); returns the length. */
size_t wire_control(unsigned char *out, int op, conn_id id);
/* A BARRIER entry into `out` (1 byte); returns the length. */
size_t wire_barrier(unsigned char *out);
/* A SNAPSHOT entry into `out` (1 byte); returns the length. */
size_t wire_snapshot(unsigned char *out);
/* Starts a BATCH entry in `out`; returns the offset of its first item. */
size_t wire_batch_start(unsigned char *out);
/* Part `i` of a round packed into `n` BATCH entries: sets the entry's op (BATCH when n is 1). */
void wire_batch_part(unsigned char *entry, int i, int n);
/* For a valid BATCH entry of any part, its WIRE_ROUND_* flags (0 for a whole round or any other entry). */
int wire_round_part(const unsigned char *entry, size_t len);
/* Appends one item at `off` (room for WIRE_ITEM_HEADER_BYTES + len): bytes, or the client's end
 * of stream when `data` is NULL. Returns the offset after it. */
size_t wire_batch_item(unsigned char *out, size_t off, conn_id id, const void *data, size_t len);

/* Receives one decoded item: `op` is WIRE_OPEN, WIRE_CLOSE, WIRE_BARRIER, WIRE_SNAPSHOT, WIRE_ITEM_DATA (with
 * bytes) or WIRE_ITEM_END; `data` points into the entry. */
typedef void (*wire_visit_fn)(void *ctx, int op, conn_id id, const unsigned char *data, size_t len);

/* Checks a whole entry first and only then visits its items, so a malformed entry is rejected
 * whole (every replica decodes the same bytes, so they all reject it alike). Returns 0, or -1
 * with a static message in *why. */
int wire_decode(const unsigned char *entry, size_t len, wire_visit_fn visit, void *ctx, const char **why);

#endif
