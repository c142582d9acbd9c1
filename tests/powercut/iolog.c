/* iolog: an LD_PRELOAD shim that logs every data-changing file operation under
 * one directory, so a power cut can be replayed from the log (see crashsim.py).
 *
 * Environment:
 *   IOLOG_DIR         absolute directory to watch (files directly in it, and the
 *                     directory itself for directory fsyncs)
 *   IOLOG_FILE        append-only log, outside IOLOG_DIR
 *   IOLOG_MARK_FD     an fd (the ack pipe): each write to it is logged as a MARK
 *                     before it is passed on, so acks have exact log positions
 *   IOLOG_KILL_AFTER  SIGKILL the process once this many file ops are logged
 *   IOLOG_DROP_SYNC   "1": fsync/fdatasync of watched files do nothing (a
 *                     negative control: nothing is ever durable)
 *
 * Files ending in "-shm" are ignored: SQLite mmaps them and rebuilds them
 * after a crash. Calls are passed through; each is logged after it succeeded
 * (a sync logged only once done), under one lock so the log order is the order
 * the kernel saw. Record: struct rec, then `plen` path bytes, then `dlen` data.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

enum { R_OPEN = 1, R_WRITE, R_TRUNC, R_SYNC, R_UNLINK, R_RENAME, R_MARK };

struct rec {
    uint32_t type;
    uint32_t plen;     /* path bytes (RENAME: "old\0new") */
    uint64_t ino;
    int64_t off;       /* WRITE: offset; TRUNC: new length; OPEN: 1 if a directory */
    uint64_t dlen;     /* WRITE/MARK: data bytes */
};

#define MAXFD 4096
static uint64_t fd_ino[MAXFD];           /* 0: not watched */
static pthread_mutex_t lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static int log_fd = -1, mark_fd = -1, drop_sync = 0;
static long kill_after = -1, n_ops = 0;
static char dir[4096];
static size_t dir_len;

static void setup(void) __attribute__((constructor));
static void setup(void) {
    const char *d = getenv("IOLOG_DIR"), *f = getenv("IOLOG_FILE");
    if (!d || !f) return;
    strncpy(dir, d, sizeof dir - 1);
    dir_len = strlen(dir);
    while (dir_len > 1 && dir[dir_len - 1] == '/') dir[--dir_len] = 0;
    log_fd = (int)syscall(SYS_openat, AT_FDCWD, f, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    const char *m = getenv("IOLOG_MARK_FD"), *k = getenv("IOLOG_KILL_AFTER"),
               *s = getenv("IOLOG_DROP_SYNC");
    if (m) mark_fd = atoi(m);
    if (k) kill_after = atol(k);
    drop_sync = s && strcmp(s, "1") == 0;
}

static void put(uint32_t type, uint64_t ino, int64_t off, const char *path, size_t plen,
                const void *data, size_t dlen) {
    struct rec r = {type, (uint32_t)plen, ino, off, dlen};
    struct iovec v[3] = {{&r, sizeof r}, {(void *)path, plen}, {(void *)data, dlen}};
    size_t want = sizeof r + plen + dlen;
    ssize_t n = syscall(SYS_writev, log_fd, v, 3);
    if (n != (ssize_t)want) abort();    /* a short log would make the replay lie */
    if (type != R_MARK && ++n_ops == kill_after) kill(getpid(), SIGKILL);
}

/* The path relative to the watched directory ("" for the directory itself), or NULL. */
static const char *watched(const char *path) {
    if (log_fd < 0 || !path || path[0] != '/' || strncmp(path, dir, dir_len) != 0) return NULL;
    const char *rest = path + dir_len;
    if (*rest == 0) return rest;
    if (*rest != '/' || strchr(rest + 1, '/')) return NULL;
    size_t n = strlen(rest);
    if (n >= 4 && strcmp(rest + n - 4, "-shm") == 0) return NULL;
    return rest + 1;
}

static int tracked(int fd) { return fd >= 0 && fd < MAXFD && fd_ino[fd] != 0; }

#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)

static void opened(int fd, const char *path) {
    const char *rel = watched(path);
    struct stat st;
    if (fd < 0 || fd >= MAXFD || !rel || fstat(fd, &st) != 0) return;
    int is_dir = S_ISDIR(st.st_mode);
    fd_ino[fd] = (uint64_t)st.st_ino;
    put(R_OPEN, st.st_ino, is_dir, rel, strlen(rel), NULL, 0);
}

/* After any open: watch the fd if its path is in the directory. */
static int after_open(int fd, int dirfd, const char *path, int flags) {
    int saved = errno;
    pthread_mutex_lock(&lock);
    if (fd >= 0 && fd < MAXFD) fd_ino[fd] = 0;
    if (fd >= 0 && (dirfd == AT_FDCWD || path[0] == '/')) opened(fd, path);
    if (tracked(fd) && (flags & O_TRUNC)) put(R_TRUNC, fd_ino[fd], 0, NULL, 0, NULL, 0);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

#define OPEN(name)                                                              \
    int name(const char *path, int flags, ...) {                                \
        REAL(name);                                                             \
        va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap); \
        return after_open(real(path, flags, m), AT_FDCWD, path, flags);         \
    }
OPEN(open)
OPEN(open64)

#define OPENAT(name)                                                            \
    int name(int dirfd, const char *path, int flags, ...) {                     \
        REAL(name);                                                             \
        va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap); \
        return after_open(real(dirfd, path, flags, m), dirfd, path, flags);     \
    }
OPENAT(openat)
OPENAT(openat64)

int creat(const char *path, mode_t mode) {
    REAL(creat);
    return after_open(real(path, mode), AT_FDCWD, path, O_TRUNC);
}

int close(int fd) {
    REAL(close);
    pthread_mutex_lock(&lock);
    int r = real(fd);
    int saved = errno;
    if (r == 0 && fd >= 0 && fd < MAXFD) fd_ino[fd] = 0;
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

static void wrote(int fd, off_t off, const void *buf, ssize_t n) {
    if (n > 0) put(R_WRITE, fd_ino[fd], off, NULL, 0, buf, (size_t)n);
}

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    if (fd == mark_fd && log_fd >= 0) {   /* an ack: log it first, then send it */
        pthread_mutex_lock(&lock);
        put(R_MARK, 0, 0, NULL, 0, buf, count);
        pthread_mutex_unlock(&lock);
        return real(fd, buf, count);
    }
    if (!tracked(fd)) return real(fd, buf, count);
    pthread_mutex_lock(&lock);
    off_t off = lseek(fd, 0, SEEK_CUR);
    ssize_t n = real(fd, buf, count);
    int saved = errno;
    wrote(fd, off, buf, n);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

#define PWRITE(name, offtype)                                           \
    ssize_t name(int fd, const void *buf, size_t count, offtype off) {  \
        REAL(name);                                                     \
        if (!tracked(fd)) return real(fd, buf, count, off);             \
        pthread_mutex_lock(&lock);                                      \
        ssize_t n = real(fd, buf, count, off);                          \
        int saved = errno;                                              \
        wrote(fd, off, buf, n);                                         \
        pthread_mutex_unlock(&lock);                                    \
        errno = saved;                                                  \
        return n;                                                       \
    }
PWRITE(pwrite, off_t)
PWRITE(pwrite64, off64_t)

/* Log the first n bytes that iov[] holds, as one write at off. */
static void wrote_iov(int fd, off_t off, const struct iovec *iov, int cnt, ssize_t n) {
    for (int i = 0; i < cnt && n > 0; i++) {
        size_t len = iov[i].iov_len < (size_t)n ? iov[i].iov_len : (size_t)n;
        wrote(fd, off, iov[i].iov_base, (ssize_t)len);
        off += (off_t)len;
        n -= (ssize_t)len;
    }
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    REAL(writev);
    if (!tracked(fd)) return real(fd, iov, cnt);
    pthread_mutex_lock(&lock);
    off_t off = lseek(fd, 0, SEEK_CUR);
    ssize_t n = real(fd, iov, cnt);
    int saved = errno;
    wrote_iov(fd, off, iov, cnt, n);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

#define PWRITEV(name, offtype)                                                  \
    ssize_t name(int fd, const struct iovec *iov, int cnt, offtype off) {       \
        REAL(name);                                                             \
        if (!tracked(fd)) return real(fd, iov, cnt, off);                       \
        pthread_mutex_lock(&lock);                                              \
        ssize_t n = real(fd, iov, cnt, off);                                    \
        int saved = errno;                                                      \
        wrote_iov(fd, off, iov, cnt, n);                                        \
        pthread_mutex_unlock(&lock);                                            \
        errno = saved;                                                          \
        return n;                                                               \
    }
PWRITEV(pwritev, off_t)
PWRITEV(pwritev64, off64_t)

#define FTRUNCATE(name, offtype)                                \
    int name(int fd, offtype len) {                             \
        REAL(name);                                             \
        if (!tracked(fd)) return real(fd, len);                 \
        pthread_mutex_lock(&lock);                              \
        int r = real(fd, len);                                  \
        int saved = errno;                                      \
        if (r == 0) put(R_TRUNC, fd_ino[fd], len, NULL, 0, NULL, 0); \
        pthread_mutex_unlock(&lock);                            \
        errno = saved;                                          \
        return r;                                               \
    }
FTRUNCATE(ftruncate, off_t)
FTRUNCATE(ftruncate64, off64_t)

#define SYNC(name)                                              \
    int name(int fd) {                                          \
        REAL(name);                                             \
        if (!tracked(fd)) return real(fd);                      \
        if (drop_sync) return 0;                                \
        pthread_mutex_lock(&lock);                              \
        int r = real(fd);                                       \
        int saved = errno;                                      \
        if (r == 0) put(R_SYNC, fd_ino[fd], 0, NULL, 0, NULL, 0); \
        pthread_mutex_unlock(&lock);                            \
        errno = saved;                                          \
        return r;                                               \
    }
SYNC(fsync)
SYNC(fdatasync)

int unlink(const char *path) {
    REAL(unlink);
    pthread_mutex_lock(&lock);
    int r = real(path);
    int saved = errno;
    const char *rel = watched(path);
    if (r == 0 && rel) put(R_UNLINK, 0, 0, rel, strlen(rel), NULL, 0);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

int unlinkat(int dirfd, const char *path, int flags) {
    REAL(unlinkat);
    pthread_mutex_lock(&lock);
    int r = real(dirfd, path, flags);
    int saved = errno;
    const char *rel = (dirfd == AT_FDCWD || path[0] == '/') ? watched(path) : NULL;
    if (r == 0 && rel) put(R_UNLINK, 0, 0, rel, strlen(rel), NULL, 0);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

static void renamed(const char *from, const char *to) {
    const char *a = watched(from), *b = watched(to);
    if (!a && !b) return;
    char both[8192];
    size_t la = strlen(a ? a : ""), lb = strlen(b ? b : "");
    if (la + lb + 1 > sizeof both) abort();
    memcpy(both, a ? a : "", la + 1);
    memcpy(both + la + 1, b ? b : "", lb);
    /* a rename into or out of the directory is a create or an unlink there */
    put(R_RENAME, 0, (a ? 1 : 0) | (b ? 2 : 0), both, la + 1 + lb, NULL, 0);
}

int rename(const char *from, const char *to) {
    REAL(rename);
    pthread_mutex_lock(&lock);
    int r = real(from, to);
    int saved = errno;
    if (r == 0) renamed(from, to);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

int renameat(int fromfd, const char *from, int tofd, const char *to) {
    REAL(renameat);
    pthread_mutex_lock(&lock);
    int r = real(fromfd, from, tofd, to);
    int saved = errno;
    if (r == 0 && (fromfd == AT_FDCWD || from[0] == '/') && (tofd == AT_FDCWD || to[0] == '/'))
        renamed(from, to);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}
