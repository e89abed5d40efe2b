/* apus_leader.h - internal: the leader's clients, shared by apus.c (hooks' paths), readahead.c
 * (read-ahead rounds) and role.c (readiness). Everything here is guarded by the shim's lock
 * (apus_lock) and used on the server thread only. */
#ifndef INTERPOSE_APUS_LEADER_H
#define INTERPOSE_APUS_LEADER_H

#include <pthread.h>

#include "apus.h"
#include "fdtable.h"

/* A client connection the server accepted while this replica led.
 *
 * Everything the server learns of a client follows the log: its bytes and its end of stream are
 * handed out only once committed, and only in log order across clients (the pending queue); a
 * client of a lost term reads nothing more until a committed CLOSE ends it; write errors are
 * hidden, so the server never frees a client at a point of its own choosing. */
struct client {
    conn_id id;
    int fd;
    int broken;       /* leadership was lost or a proposal failed: reads wait for a committed CLOSE */
    int close_logged; /* a CLOSE entry (or an end-of-stream item) was proposed */
    int eof;          /* a committed end of stream: reads return 0 once buf is consumed */
    int eof_returned; /* the server has read that 0 */
    int queued;       /* on the pending queue: committed bytes or a committed end not yet read */
    int owed;         /* told EAGAIN only because another client came first: report it again */
    struct client *pending_next;
    /* Bytes read ahead in epoll_wait and committed, not yet handed to the server. */
    unsigned char *buf;
    size_t buf_len, buf_off;
    /* How the server watches the fd on its epoll (from epoll_ctl). */
    uint64_t data;
    uint32_t events;
    int watched;
    struct client *next;
};

extern struct client *apus_clients;
extern struct client *apus_pending_head;
extern int apus_client_count;
extern atomic_int apus_app_epfd;

/* A client of an ended term: the real client hears the end at once, the server only when a
 * committed CLOSE says so. Its fd leaves the kernel's epoll set (a shut-down socket would wake
 * the server in a loop) and the server's later epoll_ctl calls on it are only recorded. */
void apus_break_client(struct client *c);
/* Committed input of a round for `c`: bytes (ownership passes), or its end when `bytes` is NULL. */
void apus_take_committed(struct client *c, unsigned char *bytes, size_t len);
struct client *apus_client_for_event(uint64_t data);

/* readahead.c: reads ahead every client the events report readable, proposes the bytes as BATCH
 * entries and waits for the commit (the shim's lock held; released while waiting). */
void apus_read_ahead(struct epoll_event *events, int n);

/* role.c */
/* Follows leadership by term; never waits for the replica (the shim's lock held). */
void apus_update_role(void);
/* 1 while this replica may take clients: it is ready in the term it leads now. */
int apus_ready(void);
/* Proposes CLOSE of `id` without waiting. With `retry`, one that does not commit is proposed
 * again when this replica next leads (a client the server freed has nothing else to recall it). */
void apus_propose_close(conn_id id, int retry);
void apus_ignore_outcome(void *context, int status, uint64_t index);

#endif
