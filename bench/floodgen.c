/* floodgen: open loopback TCP connections at a fixed rate and count the answers.
 *
 * Python clients on two shared cores reach ~3,000-4,400 connections/s; this
 * one process (epoll, non-blocking connects) reaches 10,000/s and more, so the
 * objecthost, not the load generator, is what gets measured.
 *
 *   floodgen --port P --rate R --seconds S --payloads FILE [--mode line|hold]
 *            [--timeout T] [--max-inflight N] [--sources N] [--byte-every S]
 *
 * Connections go to 127.0.0.1:P only, from 127.0.0.2 .. 127.0.0.(1+N) (so no
 * source address runs out of ephemeral ports). FILE holds the payloads, each a
 * 4-byte little-endian length then the bytes; connection i sends payload
 * i % count. Modes:
 *   line  send the payload at once, read one answer line;
 *   hold  send the payload one byte every --byte-every seconds (slowloris).
 * A connection ends at its answer line, at EOF, at a reset, or after --timeout
 * seconds (then it is aborted and counted "timeout"). Every loop is bounded:
 * launching stops after --seconds, everything stops --timeout seconds later.
 *
 * Prints one JSON object: offered, launched, not-launched (in-flight cap),
 * launch seconds, achieved rate, outcomes (the answer line, or "closed",
 * "reset", "timeout", "connect <errno name>", "error <errno name>") and
 * connection lifetimes (p50/p99/max).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_FD 65536
#define MAX_OUTCOMES 48
#define ANSWER_MAX 96
#define MAX_LIFETIMES (1 << 21)

enum { FREE = 0, CONNECTING, SENDING, READING };

struct conn {
    int state;
    uint32_t payload;
    uint32_t sent;
    uint32_t got;
    double started, next_byte;
    char answer[ANSWER_MAX];
};

static struct conn conns[MAX_FD];
static int open_fds[MAX_FD];      /* fds in flight, for the timeout and hold sweeps */
static int open_pos[MAX_FD];
static int n_open;

static char *outcome_name[MAX_OUTCOMES];
static long outcome_count[MAX_OUTCOMES];
static int n_outcomes;
static long outcome_other;

static float *lifetimes;
static long n_lifetimes;

static unsigned char **payload;
static uint32_t *payload_len;
static uint32_t n_payloads;

static int epfd, hold_mode;
static struct sockaddr_in target = {.sin_family = AF_INET};
static double timeout_s = 8.0, byte_every = 1.0;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void count(const char *name) {
    for (int i = 0; i < n_outcomes; i++)
        if (strcmp(outcome_name[i], name) == 0) { outcome_count[i]++; return; }
    if (n_outcomes == MAX_OUTCOMES) { outcome_other++; return; }
    outcome_name[n_outcomes] = strdup(name);
    outcome_count[n_outcomes++] = 1;
}

static void count_errno(const char *what, int err) {
    char buf[64];
    const char *name = strerrorname_np(err);
    snprintf(buf, sizeof buf, "%s %s", what, name ? name : "errno");
    count(buf);
}

static void finish(int fd, const char *outcome, int abort_it) {
    struct conn *c = &conns[fd];
    if (outcome) count(outcome);
    if (n_lifetimes < MAX_LIFETIMES) lifetimes[n_lifetimes++] = (float)(now() - c->started);
    if (abort_it) {
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    c->state = FREE;
    int pos = open_pos[fd], last = open_fds[--n_open];
    open_fds[pos] = last;
    open_pos[last] = pos;
}

static void watch(int fd, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(epfd, op, fd, &ev);
}

/* Send what is due: the whole payload (line mode) or the next byte (hold mode). */
static void send_some(int fd) {
    struct conn *c = &conns[fd];
    uint32_t len = payload_len[c->payload];
    if (c->sent >= len) return;
    uint32_t want = hold_mode ? 1 : len - c->sent;
    ssize_t n = send(fd, payload[c->payload] + c->sent, want, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) { watch(fd, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD); return; }
        if (errno == ECONNRESET || errno == EPIPE) { finish(fd, "reset", 0); return; }
        count_errno("error", errno);
        finish(fd, NULL, 1);
        return;
    }
    c->sent += (uint32_t)n;
    c->next_byte = now() + byte_every;
    if (c->sent < len && !hold_mode) { watch(fd, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD); return; }
    c->state = READING;
    watch(fd, EPOLLIN, EPOLL_CTL_MOD);
}

static void on_readable(int fd) {
    struct conn *c = &conns[fd];
    char buf[4096];
    for (int rounds = 0; rounds < 4; rounds++) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n == 0) {
            if (c->got) break;
            finish(fd, "closed", 0);
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == ECONNRESET) { finish(fd, c->got ? c->answer : "reset", 0); return; }
            count_errno("error", errno);
            finish(fd, NULL, 1);
            return;
        }
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n') { c->answer[c->got] = 0; finish(fd, c->answer, 0); return; }
            if (c->got < ANSWER_MAX - 1) {
                unsigned char ch = (unsigned char)buf[i];
                c->answer[c->got++] = (ch >= 32 && ch < 127 && ch != '"' && ch != '\\') ? (char)ch : '?';
            }
        }
    }
    c->answer[c->got] = 0;               /* EOF after a partial answer line */
    finish(fd, c->answer, 0);
}

static void launch(uint32_t index, int sources) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { count_errno("socket", errno); return; }
    if (fd >= MAX_FD) { close(fd); count("socket fd too high"); return; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(0x7f000002u + index % (uint32_t)sources);
    struct conn *c = &conns[fd];
    memset(c, 0, sizeof *c);
    c->payload = index % n_payloads;
    c->started = now();
    open_pos[fd] = n_open;
    open_fds[n_open++] = fd;
    if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) { count_errno("bind", errno); finish(fd, NULL, 1); return; }
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        count_errno("connect", errno);
        finish(fd, NULL, 1);
        return;
    }
    c->state = CONNECTING;
    watch(fd, EPOLLIN | EPOLLOUT, EPOLL_CTL_ADD);
}

static void on_event(int fd, uint32_t events) {
    struct conn *c = &conns[fd];
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { count_errno("connect", err); finish(fd, NULL, 1); return; }
        c->state = SENDING;
        send_some(fd);
        if (conns[fd].state == FREE || !(events & EPOLLIN)) return;
    } else if (c->state == SENDING && (events & EPOLLOUT) && !hold_mode) {
        send_some(fd);
        if (conns[fd].state == FREE) return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(fd);
}

/* Time out old connections; in hold mode, send the bytes that are due. */
static void sweep(double t) {
    for (int i = n_open - 1; i >= 0; i--) {
        if (i >= n_open) continue;
        int fd = open_fds[i];
        struct conn *c = &conns[fd];
        if (t - c->started > timeout_s) { finish(fd, "timeout", 1); continue; }
        if (hold_mode && c->state == READING && c->sent < payload_len[c->payload] && t >= c->next_byte)
            send_some(fd);
    }
}

static int load_payloads(const char *path) {
    FILE *fh = fopen(path, "rb");
    if (!fh) { perror(path); return -1; }
    uint32_t cap = 1024;
    payload = malloc(cap * sizeof *payload);
    payload_len = malloc(cap * sizeof *payload_len);
    unsigned char head[4];
    while (fread(head, 1, 4, fh) == 4 && n_payloads < 1000000) {
        uint32_t len = head[0] | head[1] << 8 | head[2] << 16 | (uint32_t)head[3] << 24;
        if (len > (1u << 24)) { fprintf(stderr, "payload too long\n"); return -1; }
        if (n_payloads == cap) {
            cap *= 2;
            payload = realloc(payload, cap * sizeof *payload);
            payload_len = realloc(payload_len, cap * sizeof *payload_len);
        }
        payload[n_payloads] = malloc(len ? len : 1);
        if (fread(payload[n_payloads], 1, len, fh) != len) { fprintf(stderr, "short payload file\n"); return -1; }
        payload_len[n_payloads++] = len;
    }
    fclose(fh);
    if (!n_payloads) { fprintf(stderr, "no payloads in %s\n", path); return -1; }
    return 0;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static double pct(double p) {
    if (!n_lifetimes) return 0;
    long rank = (long)(p / 100 * n_lifetimes + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n_lifetimes) rank = n_lifetimes;
    return lifetimes[rank - 1];
}

int main(int argc, char **argv) {
    int port = 0, sources = 39, max_inflight = 30000;
    double rate = 10000, seconds = 2;
    const char *payload_path = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--port")) port = atoi(v);
        else if (!strcmp(k, "--rate")) rate = atof(v);
        else if (!strcmp(k, "--seconds")) seconds = atof(v);
        else if (!strcmp(k, "--payloads")) payload_path = v;
        else if (!strcmp(k, "--mode")) hold_mode = !strcmp(v, "hold");
        else if (!strcmp(k, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(k, "--max-inflight")) max_inflight = atoi(v);
        else if (!strcmp(k, "--sources")) sources = atoi(v);
        else if (!strcmp(k, "--byte-every")) byte_every = atof(v);
        else { fprintf(stderr, "unknown option %s\n", k); return 2; }
    }
    if (port <= 0 || port > 65535 || rate <= 0 || seconds <= 0 || seconds > 600 || timeout_s <= 0
        || timeout_s > 120 || sources < 1 || sources > 250 || !payload_path) {
        fprintf(stderr, "usage: floodgen --port P --rate R --seconds S (<= 600) --payloads FILE "
                        "[--mode line|hold] [--timeout T (<= 120)] [--max-inflight N] [--sources N]\n");
        return 2;
    }
    if (load_payloads(payload_path)) return 2;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max < MAX_FD ? rl.rlim_max : MAX_FD;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (max_inflight > (int)rl.rlim_cur - 16) max_inflight = (int)rl.rlim_cur - 16;
    target.sin_port = htons((uint16_t)port);
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    lifetimes = malloc(MAX_LIFETIMES * sizeof *lifetimes);
    epfd = epoll_create1(0);

    long offered = 0, launched = 0, skipped = 0;
    long total = (long)(rate * seconds);
    double start = now(), launch_end = start, last_sweep = start;
    struct epoll_event events[1024];
    for (;;) {
        double t = now();
        if (offered < total) {
            long due = (long)((t - start) * rate) + 1;
            if (due > total) due = total;
            for (; offered < due; offered++) {
                if (n_open >= max_inflight) { skipped++; continue; }
                launch((uint32_t)launched++, sources);
            }
            launch_end = now();
        } else if (n_open == 0 || t - launch_end > timeout_s + 1) {
            break;
        }
        int n = epoll_wait(epfd, events, 1024, 1);
        for (int i = 0; i < n; i++)
            if (conns[events[i].data.fd].state != FREE) on_event(events[i].data.fd, events[i].events);
        t = now();
        if (t - last_sweep >= 0.05) { sweep(t); last_sweep = t; }
    }
    while (n_open) finish(open_fds[n_open - 1], "timeout", 1);

    double launch_s = launch_end - start;
    qsort(lifetimes, (size_t)n_lifetimes, sizeof *lifetimes, cmp_float);
    printf("{\"offered\": %ld, \"launched\": %ld, \"not_launched\": %ld, \"launch_seconds\": %.3f, "
           "\"rate\": %.1f, \"lifetime_p50\": %.4f, \"lifetime_p99\": %.4f, \"lifetime_max\": %.4f, "
           "\"outcomes\": {",
           offered, launched, skipped, launch_s, launched / (launch_s > 0 ? launch_s : 1e-9),
           pct(50), pct(99), n_lifetimes ? lifetimes[n_lifetimes - 1] : 0.0);
    for (int i = 0; i < n_outcomes; i++)
        printf("%s\"%s\": %ld", i ? ", " : "", outcome_name[i], outcome_count[i]);
    if (outcome_other) printf("%s\"other\": %ld", n_outcomes ? ", " : "", outcome_other);
    printf("}}\n");
    return 0;
}
