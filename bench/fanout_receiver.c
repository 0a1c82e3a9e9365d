/* One receiving process of bench/fanout.py (--client c): COUNT listening connections in C, so
 * that the receivers cost the machine a read() per wake-up instead of Python's ~19 us per
 * delivery, and the figures show the pooler rather than the instrument.
 *
 * It speaks the same line protocol as fanout.py's receive_main():
 *   stdout "ready"               every connection has logged in (trust) and run LISTEN bench
 *   stdout "done steady"/"done burst"  every notification of the phase reached all COUNT
 *                                (or a connection failed: the result then names the error)
 *   stdin  "stop"                after 0.3 s more (a duplicate would arrive then), one JSON line:
 *   {"phases": [{"sent": {seq: ns}, "last": {seq: ns}, "first": {seq: ns}, "complete": k}, x2],
 *    "bad": listeners that did not get exactly 0..total-1 in order,
 *    "problems": [up to 3 descriptions], "errors": [up to 3]}
 * Notifications carry "<seq>:<CLOCK_MONOTONIC ns at send>"; every notification of one read()
 * is stamped with that read's time, as the Python receivers do.
 *
 * Usage: fanout_receiver HOST_OR_SOCKET_DIR PORT COUNT NOTIFICATIONS_PER_PHASE
 * Built by fanout.py with the system C compiler; bench code only, not part of pgproxy. */
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
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CHANNEL "bench"
#define CARRY_MAX 4096 /* a partial message kept between reads (notifications are ~40 bytes) */

typedef struct {
    int fd;
    int32_t next;  /* the seq this listener expects next */
    int32_t got;   /* notifications received */
    int bad;       /* got something other than `next` */
    int carry_len;
    char carry[CARRY_MAX];
} listener_t;

static listener_t *L;
static int n_listeners, per_phase, total;
static int64_t *sent_ns, *last_ns, *first_ns;
static int32_t *got_per_seq;
static int complete[2], done_printed, failed;
static char errors[3][200];
static int n_errors;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "fanout_receiver: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void note_error(const char *text) {
    if (n_errors < 3)
        snprintf(errors[n_errors], sizeof errors[0], "%s", text);
    n_errors++;
    failed = 1;
}

static void print_done(void) {
    /* "done <phase>" in phase order, as soon as a phase is complete (or everything failed). */
    while (done_printed < 2 && (failed || complete[done_printed] == per_phase)) {
        printf("done %s\n", done_printed == 0 ? "steady" : "burst");
        fflush(stdout);
        done_printed++;
    }
}

static uint32_t be32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

static void put_be32(char *p, uint32_t v) {
    p[0] = (char)(v >> 24); p[1] = (char)(v >> 16); p[2] = (char)(v >> 8); p[3] = (char)v;
}

static void write_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        buf += w;
        len -= (size_t)w;
    }
}

static int open_connection(const char *host, int port) {
    int fd;
    if (host[0] == '/') { /* a socket directory, as libpq reads a host */
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s/.s.PGSQL.%d", host, port);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect (unix)");
    } else {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) die("host must be an IPv4 address");
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect (tcp)");
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

/* Blocking read of whole messages until ReadyForQuery; an ErrorResponse is fatal. */
static void read_until_ready(int fd) {
    char head[5];
    for (;;) {
        size_t have = 0;
        while (have < 5) {
            ssize_t r = read(fd, head + have, 5 - have);
            if (r <= 0) die("login: connection closed");
            have += (size_t)r;
        }
        uint32_t len = be32(head + 1);
        if (len < 4 || len > 1 << 20) { errno = EPROTO; die("login: bad length"); }
        char *body = malloc(len - 4 + 1);
        size_t got = 0;
        while (got < len - 4) {
            ssize_t r = read(fd, body + got, len - 4 - got);
            if (r <= 0) die("login: connection closed");
            got += (size_t)r;
        }
        body[len - 4] = 0;
        if (head[0] == 'E') {
            fprintf(stderr, "fanout_receiver: login failed (ErrorResponse)\n");
            exit(2);
        }
        if (head[0] == 'R' && len >= 8 && be32(body) != 0) {
            fprintf(stderr, "fanout_receiver: only trust authentication is supported\n");
            exit(2);
        }
        free(body);
        if (head[0] == 'Z') return;
    }
}

static void login_and_listen(int fd) {
    static const char params[] = "user\0postgres\0database\0postgres\0\0";
    char startup[8 + sizeof params - 1];
    put_be32(startup, sizeof startup);
    put_be32(startup + 4, 196608); /* protocol 3.0 */
    memcpy(startup + 8, params, sizeof params - 1);
    write_all(fd, startup, sizeof startup);
    read_until_ready(fd);
    static const char sql[] = "LISTEN " CHANNEL;
    char query[5 + sizeof sql];
    query[0] = 'Q';
    put_be32(query + 1, 4 + sizeof sql);
    memcpy(query + 5, sql, sizeof sql);
    write_all(fd, query, sizeof query);
    read_until_ready(fd);
}

static void on_notification(listener_t *l, const char *body, uint32_t len, int64_t t) {
    /* body: pid int32, channel \0, payload \0 */
    const char *end = body + len;
    const char *channel = body + 4;
    const char *payload = memchr(channel, 0, (size_t)(end - channel));
    if (!payload || ++payload >= end) return;
    char *colon;
    long seq = strtol(payload, &colon, 10);
    if (*colon != ':') return;
    long long sent = strtoll(colon + 1, NULL, 10);
    l->got++;
    if (seq != l->next) l->bad = 1; /* a gap, a duplicate or out of order */
    l->next = (int32_t)seq + 1;
    if (seq < 0 || seq >= total || strcmp(channel, CHANNEL) != 0) return;
    sent_ns[seq] = sent;
    if (t > last_ns[seq]) last_ns[seq] = t;
    if (!first_ns[seq] || t < first_ns[seq]) first_ns[seq] = t;
    if (++got_per_seq[seq] == n_listeners) {
        complete[seq / per_phase]++;
        print_done();
    }
}

static char rbuf[CARRY_MAX + 256 * 1024];

static void on_readable(int idx, int64_t t) {
    listener_t *l = &L[idx];
    for (;;) {
        memcpy(rbuf, l->carry, (size_t)l->carry_len);
        ssize_t r = read(l->fd, rbuf + l->carry_len, sizeof rbuf - (size_t)l->carry_len);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (r <= 0) {
            char text[120];
            snprintf(text, sizeof text, "listener %d lost: %s", idx,
                     r == 0 ? "connection closed" : strerror(errno));
            note_error(text);
            close(l->fd);
            l->fd = -1;
            print_done();
            return;
        }
        size_t end = (size_t)l->carry_len + (size_t)r, pos = 0;
        while (end - pos >= 5) {
            uint32_t len = be32(rbuf + pos + 1);
            if (len < 4 || len > CARRY_MAX - 1) {
                char text[120];
                snprintf(text, sizeof text, "listener %d: message of length %u", idx, len);
                note_error(text);
                print_done();
                return;
            }
            if (end - pos - 1 < len) break;
            char kind = rbuf[pos];
            if (kind == 'A')
                on_notification(l, rbuf + pos + 5, len - 4, t);
            else if (kind == 'E') {
                char text[120];
                snprintf(text, sizeof text, "listener %d: ErrorResponse", idx);
                note_error(text);
                print_done();
            }
            pos += 1 + len;
        }
        l->carry_len = (int)(end - pos);
        memmove(l->carry, rbuf + pos, (size_t)l->carry_len);
        if ((size_t)r < sizeof rbuf - CARRY_MAX) return; /* drained: no second read() */
    }
}

static void print_map(const int64_t *values, int from, int to) {
    int first = 1;
    putchar('{');
    for (int s = from; s < to; s++) {
        if (!values[s]) continue;
        printf("%s\"%d\": %lld", first ? "" : ", ", s, (long long)values[s]);
        first = 0;
    }
    putchar('}');
}

static void print_result(void) {
    printf("{\"phases\": [");
    for (int p = 0; p < 2; p++) {
        int from = p * per_phase, to = from + per_phase;
        printf("%s{\"sent\": ", p ? ", " : "");
        print_map(sent_ns, from, to);
        printf(", \"last\": ");
        print_map(last_ns, from, to);
        printf(", \"first\": ");
        print_map(first_ns, from, to);
        printf(", \"complete\": %d}", complete[p]);
    }
    int bad = 0, shown = 0;
    printf("], \"problems\": [");
    for (int i = 0; i < n_listeners; i++) {
        listener_t *l = &L[i];
        int ok = !l->bad && l->got == total && l->next == total;
        if (ok) continue;
        bad++;
        if (shown < 3)
            printf("%s\"listener %d: %d received, %s\"", shown ? ", " : "", i, l->got,
                   l->bad ? "OUT OF ORDER or duplicated" : "some missing");
        shown++;
    }
    printf("], \"bad\": %d, \"errors\": [", bad);
    for (int e = 0; e < n_errors && e < 3; e++) printf("%s\"%s\"", e ? ", " : "", errors[e]);
    printf("]}\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST_OR_SOCKET_DIR PORT COUNT NOTIFICATIONS_PER_PHASE\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    n_listeners = atoi(argv[3]);
    per_phase = atoi(argv[4]);
    if (n_listeners < 1 || per_phase < 1) return 2;
    total = 2 * per_phase;
    L = calloc((size_t)n_listeners, sizeof *L);
    sent_ns = calloc((size_t)total, sizeof *sent_ns);
    last_ns = calloc((size_t)total, sizeof *last_ns);
    first_ns = calloc((size_t)total, sizeof *first_ns);
    got_per_seq = calloc((size_t)total, sizeof *got_per_seq);
    if (!L || !sent_ns || !last_ns || !first_ns || !got_per_seq) die("calloc");

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < n_listeners; i++) {
        L[i].fd = open_connection(host, port);
        login_and_listen(L[i].fd);
        if (fcntl(L[i].fd, F_SETFL, fcntl(L[i].fd, F_GETFL) | O_NONBLOCK) < 0) die("fcntl");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, L[i].fd, &ev) < 0) die("epoll_ctl");
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &ev) < 0) die("epoll_ctl stdin");
    usleep(300000); /* every connection is waiting for notifications */
    printf("ready\n");
    fflush(stdout);

    int64_t stop_at = 0;
    struct epoll_event events[1024];
    for (;;) {
        int timeout = -1;
        if (stop_at) {
            int64_t left = stop_at - now_ns();
            if (left <= 0) break;
            timeout = (int)(left / 1000000) + 1;
        }
        int k = epoll_wait(ep, events, 1024, timeout);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        int64_t t = now_ns();
        for (int e = 0; e < k; e++) {
            uint32_t idx = events[e].data.u32;
            if (idx == UINT32_MAX) {
                char line[64];
                ssize_t r = read(STDIN_FILENO, line, sizeof line);
                if (r <= 0 || memmem(line, (size_t)r, "stop", 4)) {
                    stop_at = now_ns() + 300000000;
                    epoll_ctl(ep, EPOLL_CTL_DEL, STDIN_FILENO, NULL);
                }
                continue;
            }
            if (L[idx].fd >= 0) on_readable((int)idx, t);
        }
    }
    print_result();
    return 0;
}
