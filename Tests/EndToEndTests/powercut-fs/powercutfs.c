// powercutfs: a FUSE file system for power-loss tests.
//
//   powercutfs BACKING MOUNTPOINT [--fsync-lies] [--cut-at-sync NAME:N [--torn | --eio]]
//
// Runs in the foreground. Files live in BACKING, which plays the disk's platters. A write lands
// in this process's memory only (the "page cache"), and reaches BACKING when the file is fsynced
// (fsync or fdatasync, or a write through a descriptor opened with O_SYNC or O_DSYNC). Killing
// this process with SIGKILL is the power cut: every write not synced is gone, and a new instance
// on the same BACKING shows what the disk held. Namespace changes (create, unlink, rename, mkdir)
// reach BACKING at once, as on a file system that journals its metadata synchronously; a file
// created and never synced comes back empty.
//
// --fsync-lies makes fsync of Berkeley DB's write-ahead log files (log.*) report success without
// writing anything: a disk that acknowledges flushes it never did. The databases and everything
// else still sync, so a store comes back and opens, but without what its log held since the
// last checkpoint: the broken variant the power-loss tests must catch.
//
// --cut-at-sync NAME:N cuts the power by itself at the Nth fsync of the file named NAME (its last
// path component), before that sync writes anything: a power cut at an exact point of a
// protocol, e.g. the first sync of a new log file. With --torn the cut comes halfway through that
// sync instead: the first half of its changed pages reach BACKING, the rest do not, as when a
// disk loses power while it writes a large flush (pages of 4 KiB are the unit a disk writes
// whole; a database page bigger than that may be torn). With --eio there is no cut: that sync
// fails with EIO and writes nothing (its pages stay unsynced), and the file system goes on, as
// with a disk that reports a failed flush.
//
// Single-threaded (-s): every request is served in turn, so no locking is needed.

#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define PAGE 4096

// A file whose content differs from BACKING: all of it in memory, with the pages written since
// the last sync marked.
struct cached {
    char *path;          // relative to BACKING, without the leading slash
    unsigned char *data;
    size_t size, cap;
    unsigned char *dirty; // one byte per page
    size_t dirty_pages;   // length of `dirty`
    int size_changed;
    struct cached *next;
};

static char backing[PATH_MAX];
static int fsync_lies;
static const char *cut_name; // --cut-at-sync NAME:N
static long cut_at, cut_syncs;
static int cut_torn, cut_eio;
static struct cached *files;
static unsigned long long syncs, synced_bytes;

static void real_path(char *out, const char *path) { snprintf(out, PATH_MAX, "%s%s", backing, path); }

static struct cached *find(const char *path) {
    for (struct cached *c = files; c; c = c->next)
        if (strcmp(c->path, path) == 0) return c;
    return NULL;
}

static void drop(const char *path) {
    for (struct cached **p = &files; *p; p = &(*p)->next) {
        if (strcmp((*p)->path, path) == 0) {
            struct cached *c = *p;
            *p = c->next;
            free(c->path);
            free(c->data);
            free(c->dirty);
            free(c);
            return;
        }
    }
}

static int reserve(struct cached *c, size_t size) {
    if (size > c->cap) {
        size_t cap = c->cap ? c->cap : 65536;
        while (cap < size) cap *= 2;
        unsigned char *d = realloc(c->data, cap);
        if (!d) return -ENOMEM;
        memset(d + c->cap, 0, cap - c->cap);
        c->data = d;
        c->cap = cap;
    }
    size_t pages = (size + PAGE - 1) / PAGE;
    if (pages > c->dirty_pages) {
        size_t n = c->dirty_pages ? c->dirty_pages : 16;
        while (n < pages) n *= 2;
        unsigned char *d = realloc(c->dirty, n);
        if (!d) return -ENOMEM;
        memset(d + c->dirty_pages, 0, n - c->dirty_pages);
        c->dirty = d;
        c->dirty_pages = n;
    }
    return 0;
}

// The file's cache entry, read from BACKING the first time it is changed.
static int load(const char *path, struct cached **out) {
    struct cached *c = find(path);
    if (c) { *out = c; return 0; }
    char rp[PATH_MAX];
    real_path(rp, path);
    int fd = open(rp, O_RDONLY);
    if (fd < 0) return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0) { int e = -errno; close(fd); return e; }
    c = calloc(1, sizeof *c);
    if (!c) { close(fd); return -ENOMEM; }
    c->path = strdup(path);
    int r = reserve(c, (size_t)st.st_size);
    size_t done = 0;
    while (r == 0 && done < (size_t)st.st_size) {
        ssize_t n = pread(fd, c->data + done, (size_t)st.st_size - done, (off_t)done);
        if (n < 0) r = -errno;
        if (n <= 0) break;
        done += (size_t)n;
    }
    close(fd);
    if (r != 0) { free(c->path); free(c->data); free(c->dirty); free(c); return r; }
    c->size = (size_t)st.st_size;
    c->next = files;
    files = c;
    *out = c;
    return 0;
}

static void mark(struct cached *c, size_t from, size_t to) {
    for (size_t p = from / PAGE; p * PAGE < to; p++) c->dirty[p] = 1;
}

// Writes the file's changed pages and size to BACKING.
static int lies_about(const char *path) {
    const char *base = strrchr(path, '/');
    return fsync_lies && strncmp(base ? base + 1 : path, "log.", 4) == 0;
}

// Whether this sync is the one --cut-at-sync names.
static int cut_here(const char *path) {
    const char *base = strrchr(path, '/');
    if (!cut_name || strcmp(base ? base + 1 : path, cut_name) != 0) return 0;
    return ++cut_syncs == cut_at;
}

static void power_cut(const char *path, size_t written) {
    fprintf(stderr, "powercutfs: power cut at sync %ld of %s after %zu pages\n", cut_syncs, path, written);
    fflush(stderr);
    kill(getpid(), SIGKILL);
}

static int sync_file(const char *path) {
    struct cached *c = find(path);
    int cut = cut_here(path);
    if (cut && cut_eio) {
        fprintf(stderr, "powercutfs: sync %ld of %s fails with EIO\n", cut_syncs, path);
        return -EIO;
    }
    if (cut && !cut_torn) power_cut(path, 0);
    if (!c || lies_about(path)) return 0;
    char rp[PATH_MAX];
    real_path(rp, path);
    int fd = open(rp, O_WRONLY);
    if (fd < 0) return -errno;
    int r = 0;
    size_t pages = (c->size + PAGE - 1) / PAGE, dirty = 0, written = 0;
    for (size_t p = 0; p < pages; p++) dirty += c->dirty[p];
    for (size_t p = 0; p < pages && r == 0; p++) {
        if (!c->dirty[p]) continue;
        if (cut && written == dirty / 2) { close(fd); power_cut(path, written); }
        written++;
        size_t off = p * PAGE, len = c->size - off < PAGE ? c->size - off : PAGE;
        if (pwrite(fd, c->data + off, len, (off_t)off) != (ssize_t)len) r = -EIO;
        synced_bytes += len;
        c->dirty[p] = 0;
    }
    if (r == 0 && ftruncate(fd, (off_t)c->size) < 0) r = -errno;
    close(fd);
    c->size_changed = 0;
    syncs++;
    return r;
}

static int pc_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    (void)fi;
    char rp[PATH_MAX];
    real_path(rp, path);
    if (lstat(rp, st) < 0) return -errno;
    struct cached *c = find(path);
    if (c) {
        st->st_size = (off_t)c->size;
        st->st_blocks = (blkcnt_t)((c->size + 511) / 512);
    }
    return 0;
}

static int pc_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off, struct fuse_file_info *fi,
                      enum fuse_readdir_flags flags) {
    (void)off; (void)fi; (void)flags;
    char rp[PATH_MAX];
    real_path(rp, path);
    DIR *d = opendir(rp);
    if (!d) return -errno;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) fill(buf, e->d_name, NULL, 0, 0);
    closedir(d);
    return 0;
}

static int pc_create(const char *path, mode_t mode, struct fuse_file_info *fi) {
    char rp[PATH_MAX];
    real_path(rp, path);
    int fd = open(rp, O_CREAT | O_WRONLY | (fi->flags & O_EXCL), mode);
    if (fd < 0) return -errno;
    close(fd);
    if (fi->flags & O_TRUNC) {
        struct cached *c;
        int r = load(path, &c);
        if (r) return r;
        c->size = 0;
        c->size_changed = 1;
    }
    return 0;
}

static int pc_open(const char *path, struct fuse_file_info *fi) {
    char rp[PATH_MAX];
    real_path(rp, path);
    if (access(rp, F_OK) < 0) return -errno;
    if (fi->flags & O_TRUNC) {
        struct cached *c;
        int r = load(path, &c);
        if (r) return r;
        c->size = 0;
        c->size_changed = 1;
    }
    return 0;
}

static int pc_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    struct cached *c = find(path);
    if (c) {
        if ((size_t)off >= c->size) return 0;
        size_t n = c->size - (size_t)off < size ? c->size - (size_t)off : size;
        memcpy(buf, c->data + off, n);
        return (int)n;
    }
    char rp[PATH_MAX];
    real_path(rp, path);
    int fd = open(rp, O_RDONLY);
    if (fd < 0) return -errno;
    ssize_t n = pread(fd, buf, size, off);
    int e = errno;
    close(fd);
    return n < 0 ? -e : (int)n;
}

static int pc_write(const char *path, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    struct cached *c;
    int r = load(path, &c);
    if (r) return r;
    size_t end = (size_t)off + size;
    if ((r = reserve(c, end)) != 0) return r;
    memcpy(c->data + off, buf, size);
    if (end > c->size) { c->size = end; c->size_changed = 1; }
    mark(c, (size_t)off, end);
    if (fi && (fi->flags & (O_SYNC | O_DSYNC)) && (r = sync_file(path)) != 0) return r;
    return (int)size;
}

static int resize(const char *path, off_t size) {
    struct cached *c;
    int r = load(path, &c);
    if (r) return r;
    if ((r = reserve(c, (size_t)size)) != 0) return r;
    if ((size_t)size > c->size) {
        memset(c->data + c->size, 0, (size_t)size - c->size);
        mark(c, c->size, (size_t)size);
    } else if ((size_t)size < c->cap) {
        memset(c->data + size, 0, c->cap - (size_t)size);
    }
    c->size = (size_t)size;
    c->size_changed = 1;
    return 0;
}

static int pc_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    (void)fi;
    return resize(path, size);
}

static int pc_fallocate(const char *path, int mode, off_t off, off_t len, struct fuse_file_info *fi) {
    (void)fi;
    if (mode != 0) return -EOPNOTSUPP;
    struct cached *c;
    int r = load(path, &c);
    if (r) return r;
    return (size_t)(off + len) > c->size ? resize(path, off + len) : 0;
}

static int pc_fsync(const char *path, int datasync, struct fuse_file_info *fi) {
    (void)datasync; (void)fi;
    return sync_file(path);
}

static int pc_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi) {
    (void)path; (void)datasync; (void)fi;
    return 0; // namespace changes are on BACKING already
}

static int pc_unlink(const char *path) {
    char rp[PATH_MAX];
    real_path(rp, path);
    if (unlink(rp) < 0) return -errno;
    drop(path);
    return 0;
}

static int pc_rename(const char *from, const char *to, unsigned int flags) {
    if (flags) return -EINVAL;
    char a[PATH_MAX], b[PATH_MAX];
    real_path(a, from);
    real_path(b, to);
    if (rename(a, b) < 0) return -errno;
    drop(to);
    struct cached *c = find(from);
    if (c) { free(c->path); c->path = strdup(to); }
    return 0;
}

static int pc_mkdir(const char *path, mode_t mode) {
    char rp[PATH_MAX];
    real_path(rp, path);
    return mkdir(rp, mode) < 0 ? -errno : 0;
}

static int pc_rmdir(const char *path) {
    char rp[PATH_MAX];
    real_path(rp, path);
    return rmdir(rp) < 0 ? -errno : 0;
}

static int pc_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) {
    (void)fi;
    char rp[PATH_MAX];
    real_path(rp, path);
    return chmod(rp, mode) < 0 ? -errno : 0;
}

static int pc_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi) {
    (void)fi;
    char rp[PATH_MAX];
    real_path(rp, path);
    return lchown(rp, uid, gid) < 0 ? -errno : 0;
}

static int pc_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi) {
    (void)fi;
    char rp[PATH_MAX];
    real_path(rp, path);
    return utimensat(AT_FDCWD, rp, tv, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}

static int pc_statfs(const char *path, struct statvfs *st) {
    (void)path;
    return statvfs(backing, st) < 0 ? -errno : 0;
}

static const struct fuse_operations ops = {
    .getattr = pc_getattr,
    .readdir = pc_readdir,
    .create = pc_create,
    .open = pc_open,
    .read = pc_read,
    .write = pc_write,
    .truncate = pc_truncate,
    .fallocate = pc_fallocate,
    .fsync = pc_fsync,
    .fsyncdir = pc_fsyncdir,
    .unlink = pc_unlink,
    .rename = pc_rename,
    .mkdir = pc_mkdir,
    .rmdir = pc_rmdir,
    .chmod = pc_chmod,
    .chown = pc_chown,
    .utimens = pc_utimens,
    .statfs = pc_statfs,
};

int main(int argc, char **argv) {
    const char *usage = "usage: %s BACKING MOUNTPOINT [--fsync-lies] [--cut-at-sync NAME:N [--torn | --eio]]\n";
    if (argc < 3) { fprintf(stderr, usage, argv[0]); return 2; }
    if (!realpath(argv[1], backing)) { perror(argv[1]); return 2; }
    for (int i = 3; i < argc; i++) {
        if (strcmp(argv[i], "--fsync-lies") == 0) {
            fsync_lies = 1;
        } else if (strcmp(argv[i], "--torn") == 0) {
            cut_torn = 1;
        } else if (strcmp(argv[i], "--eio") == 0) {
            cut_eio = 1;
        } else if (strcmp(argv[i], "--cut-at-sync") == 0 && i + 1 < argc) {
            char *spec = argv[++i], *colon = strrchr(spec, ':'), *end = NULL;
            if (colon) cut_at = strtol(colon + 1, &end, 10);
            if (!colon || colon == spec || !end || *end || cut_at < 1) {
                fprintf(stderr, "--cut-at-sync '%s': expected NAME:N with N >= 1\n", spec);
                return 2;
            }
            *colon = 0;
            cut_name = spec;
        } else {
            fprintf(stderr, "unknown argument '%s'\n", argv[i]);
            fprintf(stderr, usage, argv[0]);
            return 2;
        }
    }
    if ((cut_torn || cut_eio) && !cut_name) { fprintf(stderr, "--torn and --eio need --cut-at-sync\n"); return 2; }
    if (cut_torn && cut_eio) { fprintf(stderr, "--torn and --eio exclude each other\n"); return 2; }
    char *args[] = {argv[0], argv[2], "-f", "-s", "-o", "fsname=powercutfs,subtype=powercutfs", NULL};
    return fuse_main(6, args, &ops, NULL);
}
