/*
 * siptls_gen: a SIP-over-TLS load generator for the tlsbridge benchmark.
 *
 * One thread, epoll (edge-triggered) and OpenSSL on non-blocking sockets, so that one core of
 * generator outruns one core of system under test. Three workloads:
 *
 *   w1  N persistent TLS connections, closed-loop OPTIONS (one outstanding per connection):
 *       warm-up, then a measured window; transactions/s, p50/p99 latency.
 *   w2  a new TLS connection per transaction (full handshake, no resumption: no session is
 *       ever offered), C of them at once; connections/s, p50/p99 of connect -> 200.
 *   w3  open N TLS connections (handshake + one OPTIONS/200 each) with at most C opening at a
 *       time, say "ready", hold them until a line (or EOF) on stdin or SIGTERM/SIGINT/SIGUSR1,
 *       then say how many were still alive.
 *
 * Output: JSON lines on stdout. w1/w2 print {"event":"start"} and {"event":"stop"} at the
 * edges of the measured window (so a supervisor can read CPU counters there), w3 prints
 * {"event":"ready",...}; every mode ends with one {"event":"result",...} line.
 * Every run is bounded: -T seconds at most (default 900), then it stops with what it has.
 *
 * Build: gcc -O2 -o siptls_gen siptls_gen.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { W1, W2, W3 };
enum state { ST_FREE, ST_CONNECTING, ST_HANDSHAKE, ST_SEND, ST_WAIT, ST_IDLE };

#define RBUF 8192
#define WBUF 1024
#define TAG_STDIN ((uint64_t)-1)
#define TAG_SIGNAL ((uint64_t)-2)

struct conn {
    int fd;
    SSL *ssl;
    enum state st;
    int slot;
    uint32_t seq;
    uint16_t lport;
    double t_open;   /* connect() time (w2/w3) */
    double t_sent;   /* request written (w1) */
    double deadline; /* for connect, handshake and each reply */
    int rlen, wlen, woff;
    char rbuf[RBUF];
    char wbuf[WBUF];
};

struct samples {
    uint32_t *v;
    size_t n, cap;
};

static struct {
    enum mode mode;
    const char *host, *sni, *ca;
    int port, conns, concurrency;
    double duration, warmup, timeout, max_total, hold_max;
    int quiet;
} opt = {W1, "127.0.0.1", "localhost", NULL, 0, 50, 20, 10.0, 2.0, 5.0, 900.0, 3600.0, 0};

static SSL_CTX *ctx;
static int ep;
static struct sockaddr_in target;
static struct conn **slots;
static int nslots;
static unsigned long run_id;
static struct samples lat;
static double win_start, win_stop;
static int measuring;
/* counters */
static long ok_total, ok_window, non200, errors, timeouts, connect_errors, tls_errors, eofs;
static long opened, failed, alive;
static char last_error[256];

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "siptls_gen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void note_error(const char *what)
{
    unsigned long e = ERR_peek_last_error();
    if (e) {
        char buf[200];
        ERR_error_string_n(e, buf, sizeof buf);
        snprintf(last_error, sizeof last_error, "%s: %s", what, buf);
    } else {
        snprintf(last_error, sizeof last_error, "%s: %s", what, errno ? strerror(errno) : "-");
    }
    ERR_clear_error();
}

static void emit(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void sample_add(uint32_t us)
{
    if (lat.n == lat.cap) {
        lat.cap = lat.cap ? lat.cap * 2 : 65536;
        lat.v = realloc(lat.v, lat.cap * sizeof *lat.v);
        if (!lat.v)
            die("out of memory");
    }
    lat.v[lat.n++] = us;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p)
{
    if (!lat.n)
        return 0;
    size_t i = (size_t)(p * (lat.n - 1) + 0.5);
    return lat.v[i];
}

/* --- connections ------------------------------------------------------------------------ */

static void conn_free(struct conn *c)
{
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd); /* closing removes it from the epoll set */
        c->fd = -1;
    }
    c->st = ST_FREE;
}

static void build_request(struct conn *c)
{
    c->seq++;
    c->wlen = snprintf(c->wbuf, WBUF,
                       "OPTIONS sip:%s:%d SIP/2.0\r\n"
                       "Via: SIP/2.0/TLS %s:%u;branch=z9hG4bK-%lx-%d-%u;rport\r\n"
                       "From: <sip:bench@localhost>;tag=%lx%d\r\n"
                       "To: <sip:%s:%d>\r\n"
                       "Call-ID: %lx-%d-%u@bench\r\n"
                       "CSeq: %u OPTIONS\r\n"
                       "Max-Forwards: 70\r\n"
                       "User-Agent: siptls_gen\r\n"
                       "Content-Length: 0\r\n\r\n",
                       opt.host, opt.port, opt.host, c->lport, run_id, c->slot, c->seq, run_id,
                       c->slot, opt.host, opt.port, run_id, c->slot, c->seq, c->seq);
    c->woff = 0;
    c->rlen = 0;
    c->st = ST_SEND;
}

static int conn_open(struct conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        note_error("socket");
        return -1;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->t_open = now();
    c->deadline = c->t_open + opt.timeout;
    c->rlen = c->wlen = c->woff = 0;
    if (connect(c->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        note_error("connect");
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    c->st = ST_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    return 0;
}

/* Parses a complete reply at the start of rbuf: its length, or 0 if incomplete. */
static int reply_complete(struct conn *c, int *status)
{
    c->rbuf[c->rlen] = 0;
    char *end = strstr(c->rbuf, "\r\n\r\n");
    if (!end)
        return 0;
    int clen = 0;
    for (char *p = c->rbuf; p && p < end; p = strstr(p, "\r\n")) {
        if (*p == '\r')
            p += 2;
        if (!strncasecmp(p, "Content-Length:", 15))
            clen = atoi(p + 15);
        else if (!strncasecmp(p, "l:", 2))
            clen = atoi(p + 2);
    }
    int total = (int)(end - c->rbuf) + 4 + clen;
    if (c->rlen < total)
        return 0;
    *status = strncmp(c->rbuf, "SIP/2.0 ", 8) ? 0 : atoi(c->rbuf + 8);
    return total;
}

static void conn_fail(struct conn *c, long *counter, const char *what);
static void slot_next(int slot);

/* One transaction finished on c at time t. */
static void transaction_done(struct conn *c, double t, int status)
{
    if (status != 200) {
        non200++;
        snprintf(last_error, sizeof last_error, "status %d", status);
    }
    ok_total++;
    double t0 = opt.mode == W1 ? c->t_sent : c->t_open;
    if (measuring && t >= win_start && t < win_stop) {
        ok_window++;
        double us = (t - t0) * 1e6;
        sample_add(us > 4e9 ? 4000000000u : (uint32_t)us);
    }
}

/* Drives c as far as it goes without blocking. */
static void drive(struct conn *c)
{
    for (;;) {
        int r, err;
        switch (c->st) {
        case ST_FREE:
            return;
        case ST_CONNECTING: {
            socklen_t len = sizeof err;
            err = 0;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err && err != EINPROGRESS) {
                errno = err;
                note_error("connect");
                conn_fail(c, &connect_errors, NULL);
                return;
            }
            struct sockaddr_in local;
            len = sizeof local;
            if (getsockname(c->fd, (struct sockaddr *)&local, &len) < 0)
                return; /* not connected yet */
            struct sockaddr_in peer;
            len = sizeof peer;
            if (getpeername(c->fd, (struct sockaddr *)&peer, &len) < 0)
                return; /* ENOTCONN: still connecting */
            c->lport = ntohs(local.sin_port);
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, c->fd);
            SSL_set_tlsext_host_name(c->ssl, opt.sni);
            SSL_set1_host(c->ssl, opt.sni);
            SSL_set_connect_state(c->ssl);
            c->st = ST_HANDSHAKE;
            break;
        }
        case ST_HANDSHAKE:
            r = SSL_do_handshake(c->ssl);
            if (r == 1) {
                build_request(c);
                c->t_sent = now();
                c->deadline = c->t_sent + opt.timeout;
                break;
            }
            err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                return;
            note_error("handshake");
            conn_fail(c, &tls_errors, NULL);
            return;
        case ST_SEND:
            r = SSL_write(c->ssl, c->wbuf + c->woff, c->wlen - c->woff);
            if (r > 0) {
                c->woff += r;
                if (c->woff == c->wlen)
                    c->st = ST_WAIT;
                break;
            }
            err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                return;
            note_error("write");
            conn_fail(c, &errors, NULL);
            return;
        case ST_WAIT:
        case ST_IDLE:
            if (c->rlen >= RBUF - 1) {
                snprintf(last_error, sizeof last_error, "reply larger than %d bytes", RBUF);
                conn_fail(c, &errors, NULL);
                return;
            }
            r = SSL_read(c->ssl, c->rbuf + c->rlen, RBUF - 1 - c->rlen);
            if (r <= 0) {
                err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                    return;
                if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && !errno)) {
                    snprintf(last_error, sizeof last_error, "server closed the connection");
                    conn_fail(c, &eofs, NULL);
                } else {
                    note_error("read");
                    conn_fail(c, &errors, NULL);
                }
                return;
            }
            c->rlen += r;
            if (c->st == ST_IDLE) {
                c->rlen = 0; /* nothing is expected on an idle connection */
                break;
            }
            int status, total = reply_complete(c, &status);
            if (!total)
                break;
            double t = now();
            transaction_done(c, t, status);
            memmove(c->rbuf, c->rbuf + total, c->rlen - total);
            c->rlen -= total;
            if (opt.mode == W1) {
                if (win_stop > 0 && t >= win_stop) {
                    c->st = ST_IDLE;
                    return;
                }
                build_request(c);
                c->t_sent = t;
                c->deadline = t + opt.timeout;
            } else if (opt.mode == W2) {
                SSL_shutdown(c->ssl); /* close_notify, then FIN */
                int slot = c->slot;
                conn_free(c);
                slot_next(slot);
                return;
            } else {
                c->st = ST_IDLE;
                c->deadline = 0;
                opened++;
                alive++;
                slot_next(-1);
            }
            break;
        }
    }
}

static void conn_fail(struct conn *c, long *counter, const char *what)
{
    if (what)
        snprintf(last_error, sizeof last_error, "%s", what);
    (*counter)++;
    int was_idle = c->st == ST_IDLE;
    int slot = c->slot;
    conn_free(c);
    if (opt.mode == W3) {
        if (was_idle)
            alive--;
        else {
            failed++;
            slot_next(-1);
        }
        return;
    }
    (void)slot; /* w1/w2: revive_slots() reopens it within 100 ms */
}

/* --- scheduling ------------------------------------------------------------------------- */

static int stopping;
static int w3_next; /* w3: next connection index to open */
static int w3_inflight;

/* w1/w2: (re)start work on slot; w3: open more while under the concurrency bound. */
static void slot_next(int slot)
{
    if (opt.mode == W3) {
        if (slot < 0 && w3_inflight > 0)
            w3_inflight--;
        while (!stopping && w3_next < opt.conns && w3_inflight < opt.concurrency) {
            struct conn *c = slots[w3_next];
            c->slot = w3_next++;
            w3_inflight++;
            if (conn_open(c) < 0) {
                connect_errors++;
                failed++;
                w3_inflight--;
                continue;
            }
            drive(c);
        }
        return;
    }
    if (stopping || (win_stop > 0 && now() >= win_stop))
        return;
    struct conn *c = slots[slot];
    if (opt.mode == W1) {
        /* a lost persistent connection is reopened */
        c->slot = slot;
        if (conn_open(c) < 0) {
            connect_errors++;
            return;
        }
        drive(c);
        return;
    }
    c->slot = slot;
    if (conn_open(c) < 0) {
        connect_errors++;
        return;
    }
    drive(c);
}

/* w1/w2: a slot whose connection failed (or could not be opened) starts again. */
static void revive_slots(void)
{
    if (opt.mode == W3)
        return;
    for (int i = 0; i < nslots; i++)
        if (slots[i]->st == ST_FREE)
            slot_next(i);
}

static void check_timeouts(double t)
{
    for (int i = 0; i < nslots; i++) {
        struct conn *c = slots[i];
        if (c->st != ST_FREE && c->st != ST_IDLE && c->deadline > 0 && t > c->deadline) {
            snprintf(last_error, sizeof last_error, "timeout in state %d", c->st);
            conn_fail(c, &timeouts, NULL);
        }
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: siptls_gen -m w1|w2|w3 -p PORT [-h HOST] [-a CAFILE] [-s SNI]\n"
            "  -n N     connections (w1: persistent, w3: idle)            [50]\n"
            "  -c C     concurrent new connections (w2; w3 opening)       [20]\n"
            "  -d SEC   measured seconds (w1, w2)                         [10]\n"
            "  -w SEC   warm-up seconds before the window (w1, w2)        [2]\n"
            "  -t SEC   timeout of a connect, handshake or reply          [5]\n"
            "  -H SEC   w3: hold at most this long, then release           [3600]\n"
            "  -T SEC   the whole run ends after this long whatever happens [900]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int ch;
    while ((ch = getopt(argc, argv, "m:h:p:a:s:n:c:d:w:t:T:H:q")) != -1) {
        switch (ch) {
        case 'm':
            if (!strcmp(optarg, "w1"))
                opt.mode = W1;
            else if (!strcmp(optarg, "w2"))
                opt.mode = W2;
            else if (!strcmp(optarg, "w3"))
                opt.mode = W3;
            else
                usage();
            break;
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'a': opt.ca = optarg; break;
        case 's': opt.sni = optarg; break;
        case 'n': opt.conns = atoi(optarg); break;
        case 'c': opt.concurrency = atoi(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 't': opt.timeout = atof(optarg); break;
        case 'T': opt.max_total = atof(optarg); break;
        case 'H': opt.hold_max = atof(optarg); break;
        case 'q': opt.quiet = 1; break;
        default: usage();
        }
    }
    if (opt.port <= 0 || opt.conns <= 0 || opt.concurrency <= 0)
        usage();
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons(opt.port);
    if (inet_pton(AF_INET, opt.host, &target.sin_addr) != 1)
        die("host must be an IPv4 address: %s", opt.host);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    signal(SIGPIPE, SIG_IGN);

    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    /* No session is ever stored or offered: every handshake is a full one. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ENABLE_PARTIAL_WRITE |
                             SSL_MODE_RELEASE_BUFFERS);
    if (opt.ca) {
        if (SSL_CTX_load_verify_locations(ctx, opt.ca, NULL) != 1)
            die("cannot load CA file %s", opt.ca);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    }

    ep = epoll_create1(EPOLL_CLOEXEC);
    run_id = ((unsigned long)getpid() << 20) ^ (unsigned long)time(NULL);

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGHUP);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    struct epoll_event sev = {.events = EPOLLIN, .data.u64 = TAG_SIGNAL};
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &sev);

    nslots = opt.mode == W2 ? opt.concurrency : opt.conns;
    slots = calloc(nslots, sizeof *slots);
    for (int i = 0; i < nslots; i++) {
        slots[i] = calloc(1, sizeof(struct conn));
        slots[i]->fd = -1;
        slots[i]->slot = i;
    }

    double t_begin = now(), t_end_all = t_begin + opt.max_total;
    double t_ready = 0, t_release = 0;
    int ready = 0, released = 0, timed_out = 0;
    const char *release_reason = "";

    if (opt.mode == W3) {
        slot_next(-1);
    } else {
        for (int i = 0; i < nslots; i++)
            slot_next(i);
        win_start = t_begin + opt.warmup;
    }

    struct epoll_event evs[256];
    double last_check = t_begin;
    while (!released) {
        int n = epoll_wait(ep, evs, 256, 20);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == TAG_SIGNAL) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof si) == sizeof si)
                    ;
                stopping = 1;
                release_reason = "signal";
                continue;
            }
            if (evs[i].data.u64 == TAG_STDIN) {
                char buf[256];
                ssize_t r = read(0, buf, sizeof buf);
                if (r <= 0 || memchr(buf, '\n', r)) {
                    stopping = 1;
                    release_reason = r <= 0 ? "stdin-eof" : "stdin";
                    epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
                }
                continue;
            }
            drive((struct conn *)evs[i].data.ptr);
        }
        double t = now();
        if (t - last_check > 0.1) {
            check_timeouts(t);
            revive_slots();
            last_check = t;
        }
        if (t >= t_end_all) {
            timed_out = 1;
            release_reason = "max-time";
            stopping = 1;
        }
        if (opt.mode == W3) {
            if (!ready && (opened + failed >= opt.conns || stopping)) {
                ready = 1;
                t_ready = t;
                emit("{\"event\":\"ready\",\"opened\":%ld,\"failed\":%ld,\"seconds\":%.3f,"
                     "\"last_error\":\"%s\"}",
                     opened, failed, t - t_begin, last_error);
                struct epoll_event iev = {.events = EPOLLIN, .data.u64 = TAG_STDIN};
                if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &iev) < 0) {
                    /* stdin is not pollable (a file, /dev/null): hold until a signal */
                }
            }
            if (ready && (stopping || t - t_ready >= opt.hold_max)) {
                if (!stopping)
                    release_reason = "hold-max";
                t_release = t;
                released = 1;
            }
            continue;
        }
        if (!measuring && t >= win_start) {
            measuring = 1;
            win_stop = t + opt.duration;
            win_start = t;
            emit("{\"event\":\"start\"}");
        }
        if (measuring && t >= win_stop) {
            emit("{\"event\":\"stop\"}");
            win_stop = t;
            released = 1;
        }
        if (stopping)
            released = 1;
    }

    if (opt.mode == W3) {
        emit("{\"event\":\"result\",\"mode\":\"w3\",\"requested\":%d,\"opened\":%ld,"
             "\"failed\":%ld,\"alive_at_release\":%ld,\"open_seconds\":%.3f,"
             "\"held_seconds\":%.3f,\"release\":\"%s\",\"connect_errors\":%ld,"
             "\"tls_errors\":%ld,\"timeouts\":%ld,\"eofs\":%ld,\"errors\":%ld,\"non200\":%ld,"
             "\"last_error\":\"%s\"}",
             opt.conns, opened, failed, alive, t_ready - t_begin, t_release - t_ready,
             release_reason, connect_errors, tls_errors, timeouts, eofs, errors, non200,
             last_error);
    } else {
        double secs = measuring ? win_stop - win_start : 0;
        qsort(lat.v, lat.n, sizeof *lat.v, cmp_u32);
        emit("{\"event\":\"result\",\"mode\":\"%s\",\"conns\":%d,\"concurrency\":%d,"
             "\"seconds\":%.3f,\"transactions\":%ld,\"rate\":%.1f,\"p50_us\":%.0f,"
             "\"p99_us\":%.0f,\"max_us\":%.0f,\"total_transactions\":%ld,\"non200\":%ld,"
             "\"connect_errors\":%ld,\"tls_errors\":%ld,\"timeouts\":%ld,\"eofs\":%ld,"
             "\"errors\":%ld,\"timed_out\":%s,\"last_error\":\"%s\"}",
             opt.mode == W1 ? "w1" : "w2", opt.mode == W1 ? opt.conns : 0,
             opt.mode == W2 ? opt.concurrency : 0, secs, ok_window,
             secs > 0 ? ok_window / secs : 0.0, pct(0.50), pct(0.99),
             lat.n ? (double)lat.v[lat.n - 1] : 0.0, ok_total, non200, connect_errors,
             tls_errors, timeouts, eofs, errors, timed_out ? "true" : "false", last_error);
    }
    /* Teardown is not measured: close abortively (RST), so that thousands of idle connections
     * leave no TIME_WAIT sockets holding ports for the next run. */
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    for (int i = 0; i < nslots; i++) {
        if (slots[i]->fd >= 0)
            setsockopt(slots[i]->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        conn_free(slots[i]);
    }
    return 0;
}
