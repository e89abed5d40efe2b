/* wire.c - the APUS log entry format (wire.h describes it). */
#include <string.h>

#include "wire.h"

static void put64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static uint64_t get64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}
static uint32_t get32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void put_id(unsigned char *p, conn_id id) { put64(p, id.inc); put64(p + 8, id.serial); }
static conn_id get_id(const unsigned char *p) { return (conn_id){ get64(p), get64(p + 8) }; }

size_t wire_control(unsigned char *out, int op, conn_id id) {
    out[0] = (unsigned char)op;
    put_id(out + 1, id);
    return WIRE_CONTROL_BYTES;
}

size_t wire_barrier(unsigned char *out) {
    out[0] = WIRE_BARRIER;
    return 1;
}

size_t wire_snapshot(unsigned char *out) {
    out[0] = WIRE_SNAPSHOT;
    return 1;
}

size_t wire_batch_start(unsigned char *out) {
    out[0] = WIRE_BATCH;
    return 1;
}

size_t wire_batch_item(unsigned char *out, size_t off, conn_id id, const void *data, size_t len) {
    put_id(out + off, id);
    put32(out + off + WIRE_ID_BYTES, data ? (uint32_t)len : WIRE_END_OF_STREAM);
    if (data && len) memcpy(out + off + WIRE_ITEM_HEADER_BYTES, data, len);
    return off + WIRE_ITEM_HEADER_BYTES + (data ? len : 0);
}

void wire_batch_part(unsigned char *entry, int i, int n) {
    entry[0] = n <= 1 ? WIRE_BATCH : i == 0 ? WIRE_BATCH_HEAD : i == n - 1 ? WIRE_BATCH_TAIL : WIRE_BATCH_BODY;
}

int wire_round_part(const unsigned char *entry, size_t len) {
    if (len == 0) return 0;
    switch (entry[0]) {
    case WIRE_BATCH_HEAD: return WIRE_ROUND_GOES_ON;
    case WIRE_BATCH_BODY: return WIRE_ROUND_CONTINUES | WIRE_ROUND_GOES_ON;
    case WIRE_BATCH_TAIL: return WIRE_ROUND_CONTINUES;
    default: return 0;
    }
}

/* Walks a BATCH's items; visits them only if `visit` is not NULL. -1 if they do not tile the entry. */
static int walk_batch(const unsigned char *p, size_t len, wire_visit_fn visit, void *ctx, const char **why) {
    size_t off = 1;
    while (off < len) {
        if (len - off < WIRE_ITEM_HEADER_BYTES) { *why = "a BATCH item header is cut short"; return -1; }
        conn_id id = get_id(p + off);
        uint32_t n = get32(p + off + WIRE_ID_BYTES);
        off += WIRE_ITEM_HEADER_BYTES;
        if (n == WIRE_END_OF_STREAM) {
            if (visit) visit(ctx, WIRE_ITEM_END, id, NULL, 0);
            continue;
        }
        if (n > len - off) { *why = "a BATCH item is longer than the rest of the entry"; return -1; }
        if (n == 0) { *why = "a BATCH item has no bytes"; return -1; }
        if (visit) visit(ctx, WIRE_ITEM_DATA, id, p + off, n);
        off += n;
    }
    return 0;
}

int wire_decode(const unsigned char *p, size_t len, wire_visit_fn visit, void *ctx, const char **why) {
    if (len == 0) { *why = "the entry is empty"; return -1; }
    switch (p[0]) {
    case WIRE_OPEN:
    case WIRE_CLOSE:
        if (len != WIRE_CONTROL_BYTES) { *why = "an OPEN or CLOSE entry has the wrong length"; return -1; }
        visit(ctx, p[0], get_id(p + 1), NULL, 0);
        return 0;
    case WIRE_BARRIER:
        if (len != 1) { *why = "a BARRIER entry has the wrong length"; return -1; }
        visit(ctx, WIRE_BARRIER, (conn_id){ 0, 0 }, NULL, 0);
        return 0;
    case WIRE_SNAPSHOT:
        if (len != 1) { *why = "a SNAPSHOT entry has the wrong length"; return -1; }
        visit(ctx, WIRE_SNAPSHOT, (conn_id){ 0, 0 }, NULL, 0);
        return 0;
    case WIRE_BATCH:
    case WIRE_BATCH_HEAD:
    case WIRE_BATCH_BODY:
    case WIRE_BATCH_TAIL:
        if (len == 1) { *why = "a BATCH entry has no items"; return -1; }
        if (walk_batch(p, len, NULL, NULL, why) != 0) return -1;
        return walk_batch(p, len, visit, ctx, why);
    case 1: case 2: case 3: case 4:
        *why = "the entry is in the earlier libinterpose format (8-byte connection ids), which this version does not replay";
        return -1;
    default:
        *why = "the entry has an unknown op";
        return -1;
    }
}
