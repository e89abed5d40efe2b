/* wire_fuzz.c - a seeded fuzzer for libinterpose's log entry format (Sources/Interpose/wire.c),
 * compiled with it alone (and sanitizers) by the tests.
 *
 *   wire_fuzz SEED ITERATIONS
 *
 * Each iteration builds a random valid entry (BATCH items with bytes or ends of stream, OPEN,
 * CLOSE, BARRIER, SNAPSHOT) and checks that it decodes to exactly what went in; then mutates it (flipped
 * bytes, cut short, grown, random lengths) and checks that the decoder either rejects it without
 * visiting anything or visits items that lie inside it. Prints "ok N" or the first "FAIL ...". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../../Sources/Interpose/wire.c"

static uint64_t state;
static uint64_t next(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}
static size_t below(size_t n) { return (size_t)(next() % n); }

#define MAX_ITEMS 12
#define MAX_BYTES 300

struct want { int op; conn_id id; const unsigned char *data; size_t len; };
struct seen { int count; int ok; const unsigned char *lo, *hi; struct want *want; int nwant; };

static void check(void *ctx, int op, conn_id id, const unsigned char *data, size_t len) {
    struct seen *s = ctx;
    if (data && (data < s->lo || data + len > s->hi)) { printf("FAIL item outside the entry\n"); exit(1); }
    if (s->want) {
        struct want *w = s->count < s->nwant ? &s->want[s->count] : NULL;
        if (!w || w->op != op || !conn_id_eq(w->id, id) || w->len != len || (len && memcmp(w->data, data, len) != 0)) s->ok = 0;
    }
    s->count++;
}

static size_t build(unsigned char *out, struct want *want, int *nwant, unsigned char *pool) {
    switch (below(4)) {
    case 0: {
        conn_id id = { next(), next() };
        int op = below(2) ? WIRE_OPEN : WIRE_CLOSE;
        want[0] = (struct want){ op, id, NULL, 0 };
        *nwant = 1;
        return wire_control(out, op, id);
    }
    case 1: {
        int snapshot = (int)below(2);
        want[0] = (struct want){ snapshot ? WIRE_SNAPSHOT : WIRE_BARRIER, { 0, 0 }, NULL, 0 };
        *nwant = 1;
        return snapshot ? wire_snapshot(out) : wire_barrier(out);
    }
    default: {
        size_t off = wire_batch_start(out);
        int n = 1 + (int)below(MAX_ITEMS);
        for (int i = 0; i < n; i++) {
            conn_id id = { next(), below(4) ? next() : 0 };
            size_t len = 1 + below(MAX_BYTES);
            unsigned char *data = below(5) ? pool + below(MAX_BYTES) : NULL;
            want[i] = (struct want){ data ? WIRE_ITEM_DATA : WIRE_ITEM_END, id, data, data ? len : 0 };
            off = wire_batch_item(out, off, id, data, len);
        }
        *nwant = n;
        /* One part of a round split over several entries, now and then. */
        int parts = below(3) ? 1 : 2 + (int)below(3), part = (int)below((size_t)parts);
        wire_batch_part(out, part, parts);
        int flags = wire_round_part(out, off);
        int expected = parts == 1 ? 0 : (part > 0 ? WIRE_ROUND_CONTINUES : 0) | (part < parts - 1 ? WIRE_ROUND_GOES_ON : 0);
        if (flags != expected) { printf("FAIL: part %d of %d reads as round flags %d, not %d\n", part, parts, flags, expected); exit(1); }
        return off;
    }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s SEED ITERATIONS\n", argv[0]); return 2; }
    state = strtoull(argv[1], NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
    long iterations = strtol(argv[2], NULL, 10);
    static unsigned char pool[2 * MAX_BYTES], entry[MAX_ITEMS * (WIRE_ITEM_HEADER_BYTES + MAX_BYTES) + 64];
    for (size_t i = 0; i < sizeof pool; i++) pool[i] = (unsigned char)next();
    struct want want[MAX_ITEMS];
    for (long it = 0; it < iterations; it++) {
        int nwant = 0;
        size_t len = build(entry, want, &nwant, pool);
        const char *why = NULL;
        struct seen s = { 0, 1, entry, entry + len, want, nwant };
        if (wire_decode(entry, len, check, &s, &why) != 0 || !s.ok || s.count != nwant) {
            printf("FAIL iteration %ld: a valid entry of %zu bytes did not decode to what was encoded (%s)\n", it, len, why ? why : "wrong items");
            return 1;
        }
        /* Mutate a copy in a buffer of exactly its size, so a read past it is caught. */
        size_t mlen = len;
        switch (below(4)) {
        case 0: mlen = below(len + 1); break;
        case 1: mlen = len + 1 + below(40); break;
        default: break;
        }
        unsigned char *m = malloc(mlen ? mlen : 1);
        for (size_t i = 0; i < mlen; i++) m[i] = i < len ? entry[i] : (unsigned char)next();
        for (int flips = (int)below(4); flips > 0 && mlen > 0; flips--) m[below(mlen)] ^= (unsigned char)(1 + below(255));
        if (mlen > 1 && below(3) == 0) m[0] = (unsigned char)below(32);
        struct seen t = { 0, 1, m, m + mlen, NULL, 0 };
        if (wire_decode(m, mlen, check, &t, &why) != 0 && t.count != 0) {
            printf("FAIL iteration %ld: a rejected entry had %d items visited first\n", it, t.count);
            return 1;
        }
        free(m);
    }
    printf("ok %ld\n", iterations);
    return 0;
}
