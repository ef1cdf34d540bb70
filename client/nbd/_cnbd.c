/* nvpool.client._cnbd: the NBD export's compiled transmission loop (the fast path of client/nbd/server.py).
 *
 * The asyncio server (server.py + the sans-IO codec proto.py) is the specification. It runs the
 * handshake; once a client enters transmission on a pool volume, server.py hands the connection to an
 * ``Engine``, which serves it from native threads, without the GIL:
 *
 *   - one *reader* thread reads requests from the NBD socket, frames and validates them exactly as
 *     ``proto.ServerConnection`` does (``validate`` below is ``_validate``, in nbdkit's order; a test
 *     compares the two on random headers), admits them within the same per-connection budget
 *     (MAX_IN_FLIGHT commands, MAX_BYTES_IN_FLIGHT pinned bytes, a request alone always admitted), and
 *     posts each small READ/WRITE that maps to one piece of an unreplicated layout to the agent holding
 *     it, on a connection of this engine's own, batched (one sendmsg per agent per batch of requests);
 *   - one *receiver* thread per agent connection reads completions and writes the NBD replies (one
 *     writev per batch; a READ's data goes from the receive buffer to the NBD socket, no copy here);
 *   - one *writer* thread sends the replies the Python side produced.
 *
 * Everything else goes to Python *untouched*: a request the engine does not serve (FLUSH, TRIM,
 * WRITE_ZEROES, CACHE, unknown commands, invalid requests, large ones, a range that is not one piece, a
 * write the layout does not allow this engine to send: replicas, a migration target, a fenced lease),
 * and a posted command whose completion is anything but plain success (STALE_LAYOUT, NO_EXTENT, DENIED,
 * a drive error) or whose agent connection broke or did not answer within ``agent_timeout``. Python takes
 * them (``take``) and serves them through ``server._Connection._serve`` on the full client path
 * (``client/volume.py``), which refreshes layouts, retries, maps errors and replies (``reply``). A request
 * is owned by exactly one party at a time (the slot's state, under the engine's mutex), so it is answered
 * exactly once.
 *
 * Safety: the engine sends the same protocol the Python client sends: each command carries the layout
 * generation Python gave it (``set_layout``), so agents fence a stale engine exactly as they fence a stale
 * client (STALE_LAYOUT -> the request goes to Python, which refreshes and pushes the new layout here); the
 * volume's capability is presented (AUTH) on each agent connection before the first command after it
 * changed (``set_cap``); writes are sent only while ``set_layout`` says the volume may be written here.
 * Bounded: at most MAX_IN_FLIGHT requests and MAX_BYTES_IN_FLIGHT bytes per connection (a WRITE's payload
 * buffer is committed page by page as its bytes arrive), a client that stops reading replies stops being
 * read, a refused WRITE's payload is read and discarded (up to MAX_SKIP, beyond which the connection is
 * dropped, as proto.py does), an agent that does not answer is cut off after ``agent_timeout``.
 *
 * Python is told of work through a pipe (one byte per wake-up); ``take()`` returns the requests for it,
 * whether the engine has finished (the client disconnected, or sent bytes that cannot be answered: then
 * ``reason`` says why) and the agents whose connection was lost.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* NBD */
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668E33EFu
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_DISC 2
#define CMD_FLUSH 3
#define CMD_TRIM 4
#define CMD_CACHE 5
#define CMD_WRITE_ZEROES 6
#define FLAG_FUA 1
#define FLAG_NO_HOLE 2
#define FLAG_DF 4
#define FLAG_REQ_ONE 8
#define FLAG_FAST_ZERO 16
#define KNOWN_CMD_FLAGS 31
#define REPLY_FLAG_DONE 1
#define REPLY_TYPE_OFFSET_DATA 1
#define NBD_EPERM 1
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define HARD_MAX_REQUEST (64ull * 1024 * 1024)
#define MAX_SKIP (2 * HARD_MAX_REQUEST)
#define REQ_HDR 28
/* nvpool data plane (proto/dataplane.py) */
#define COMMAND_MAGIC 0x564E
#define COMPLETION_MAGIC 0x434E
#define CMD_SIZE 48
#define COMP_SIZE 24
#define DP_READ 1
#define DP_WRITE 2
#define DP_AUTH 0x20
#define DP_FUA 4
#define MAX_MESSAGE 4096
/* engine */
#define MAX_IN_FLIGHT 128              /* server.MAX_IN_FLIGHT */
#define MAX_BYTES_IN_FLIGHT (16u << 20) /* server.MAX_BYTES_IN_FLIGHT */
#define FAST_MAX (1u << 20)            /* largest READ/WRITE the engine posts itself */
#define RBUF (256u << 10)              /* reader's receive buffer */
#define ABUF (FAST_MAX + (64u << 10))  /* a receiver's buffer: a whole READ completion fits */
#define AGENT_IOV 128
#define REPLY_BATCH 64
#define MAX_AGENTS 1024
#define AUTH_TAG 0xFFFFFFFFu

enum { S_FREE = 0, S_AGENT, S_REPLYING, S_SLOW, S_PY, S_ZOMBIE };

typedef struct {
    int state;
    int hold;          /* the reader still has this slot's command queued for sending */
    uint32_t seq;
    uint16_t cmd, flags;
    uint64_t handle, offset;
    uint32_t length;
    uint64_t cost;
    int agent;
    int verdict;       /* NBD error the request was refused with (0: valid) */
    int astatus;       /* agent status that sent it to Python (-1: the agent connection failed) */
    double t0;
    char *payload;     /* WRITE data, malloc'd */
    unsigned char cmdhdr[CMD_SIZE];
    char *reply;       /* reply bytes from Python, for the writer */
    size_t reply_len;
    int next;          /* slow queue / writer queue link */
} slot_t;

typedef struct {
    uint64_t start, length, extent_id;
    int agent;
} ext_t;

typedef struct {
    int n;
    ext_t *e;
} column_t;

typedef struct {
    uint64_t generation, su;
    int width;
    int reads, writes;
    column_t *cols;
} layout_t;

struct engine;

typedef struct {
    struct engine *eng;
    int index;
    int fd;
    int dead;
    int thread_started;
    pthread_t thread;
    uint64_t cap_version;  /* capability version presented on this connection (reader's) */
    uint64_t conn_id;      /* this connection's id, carried in its AUTH (proto/transport.py, "Abandoned connections") */
    /* the reader's queue of unsent iovecs and the slots they belong to */
    struct iovec iov[AGENT_IOV];
    int niov;
    int qslots[AGENT_IOV];
    int nq;
    unsigned char authhdr[CMD_SIZE];
} agent_t;

typedef struct engine {
    PyObject_HEAD
    int nbd_fd, notify_fd;
    uint64_t size, max_block;
    int read_only, structured, block_size_negotiated;
    double agent_timeout;
    pthread_mutex_t mu;
    pthread_cond_t cv;          /* admission (slots freed) and the end */
    pthread_cond_t wcv;         /* writer thread: replies from Python */
    pthread_mutex_t wmu;        /* writes to the NBD socket */
    slot_t slots[MAX_IN_FLIGHT];
    int in_flight;
    uint64_t bytes_in_flight;
    int slow_head, slow_tail;   /* requests for Python */
    int wq_head, wq_tail;       /* replies from Python, for the writer */
    layout_t *layout;
    agent_t *agents[MAX_AGENTS];
    int nagents;
    char *cap;
    Py_ssize_t cap_len;
    char **old_caps;            /* replaced capabilities: the reader may still be sending one */
    int nold_caps;
    uint64_t cap_version;
    int stop, finished, nbd_broken, started, closed;
    char reason[256];
    pthread_t reader, writer;
    int reader_started, writer_started;
    char *initial;
    Py_ssize_t initial_len;
    /* counters */
    uint64_t n_fast_read, n_fast_write, n_slow, n_handed_back, n_agent_lost;
    uint64_t reads_ok, writes_ok, read_bytes, write_bytes;  /* fast requests answered with success */
    int dead_pending[MAX_AGENTS];
    int ndead_pending;
} Engine;

/* ------------------------------------------------------------------ helpers */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Test hook: NVPOOL_TEST_CNBD_ANSWER_DELAY=SECONDS makes a receiver wait that long between reading a
 * completion's slot and committing its answer (answer_batch), so a test can lose the agent connection in
 * that window (tests/test_nbd_engine.py). Read once when the module loads; unset, it costs one compare per
 * completion. */
static double test_answer_delay;

static void test_delay(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static void put_be16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = (unsigned char)v; }
static void put_be32(unsigned char *p, uint32_t v) { for (int i = 3; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; } }
static void put_be64(unsigned char *p, uint64_t v) { for (int i = 7; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; } }
static uint16_t get_be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static uint32_t get_be32(const unsigned char *p) { return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]; }
static uint64_t get_be64(const unsigned char *p) { return ((uint64_t)get_be32(p) << 32) | get_be32(p + 4); }
static void put_le16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static void put_le32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_le64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint16_t get_le16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t get_le32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static void notify(Engine *e) {
    char b = 1;
    ssize_t r = write(e->notify_fd, &b, 1); /* non-blocking: a full pipe already wakes Python */
    (void)r;
}

/* write all of iov (modified) to fd; 0 ok, -1 error */
static int writev_all(int fd, struct iovec *iov, int n) {
    while (n > 0) {
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = iov;
        m.msg_iovlen = n > 1024 ? 1024 : n;
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0 && w > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static int recv_all(int fd, char *p, size_t n) {
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* proto.ServerConnection._validate: the NBD error a request is refused with, 0 if it may be served */
static int validate(uint64_t size, uint64_t max_block, int read_only, int structured, int bsn,
                    int cmd, int flags, uint64_t offset, uint64_t length) {
    int past = length == 0 || offset + length < offset || offset + length > size;
    if (cmd <= CMD_WRITE && !(flags & ~FLAG_FUA) && length > 0 && length <= max_block && max_block <= HARD_MAX_REQUEST
        && !past && !(cmd == CMD_WRITE && read_only))
        return 0;
    if (read_only && (cmd == CMD_WRITE || cmd == CMD_TRIM || cmd == CMD_WRITE_ZEROES)) return NBD_EPERM;
    if (cmd == CMD_READ || cmd == CMD_WRITE || cmd == CMD_TRIM || cmd == CMD_CACHE || cmd == CMD_WRITE_ZEROES) {
        if (past) return (cmd == CMD_WRITE || cmd == CMD_WRITE_ZEROES) ? NBD_ENOSPC : NBD_EINVAL;
    } else if (cmd == CMD_FLUSH) {
        if (offset || length) return NBD_EINVAL;
    } else {
        return NBD_EINVAL;
    }
    if (flags & ~KNOWN_CMD_FLAGS) return NBD_EINVAL;
    if ((flags & FLAG_NO_HOLE) && cmd != CMD_WRITE_ZEROES) return NBD_EINVAL;
    if (flags & FLAG_FAST_ZERO) return NBD_EINVAL;
    if (flags & FLAG_REQ_ONE) return NBD_EINVAL;
    if (flags & FLAG_DF) {
        if (cmd != CMD_READ) return NBD_EINVAL;
        if (!structured) return NBD_EINVAL;
    }
    if (cmd == CMD_READ || cmd == CMD_WRITE) {
        if (bsn && length > max_block) return NBD_EINVAL;
        if (length > HARD_MAX_REQUEST) return NBD_ENOMEM;
    }
    return 0;
}

static void free_layout(layout_t *l) {
    if (!l) return;
    if (l->cols) {
        for (int i = 0; i < l->width; i++) free(l->cols[i].e);
        free(l->cols);
    }
    free(l);
}

/* Layout.single_piece for an unreplicated layout: the extent, the offset in it and its agent; -1 if none */
static int map_piece(const layout_t *l, uint64_t offset, uint64_t length, uint64_t *ext_id, uint64_t *ext_off) {
    if (!l || l->width <= 0 || l->su == 0) return -1;
    uint64_t s = offset / l->su, within = offset % l->su;
    if (within + length > l->su) return -1;
    const column_t *c = &l->cols[s % (uint64_t)l->width];
    uint64_t col_off = (s / (uint64_t)l->width) * l->su + within;
    int lo = 0, hi = c->n - 1, found = -1;
    while (lo <= hi) { /* last extent with start <= col_off */
        int mid = (lo + hi) / 2;
        if (c->e[mid].start <= col_off) { found = mid; lo = mid + 1; } else hi = mid - 1;
    }
    if (found < 0) return -1;
    const ext_t *x = &c->e[found];
    uint64_t eo = col_off - x->start;
    if (eo >= x->length || eo + length > x->length) return -1;
    *ext_id = x->extent_id;
    *ext_off = eo;
    return x->agent;
}

/* ------------------------------------------------------------------ slots (called with mu held) */
static void slot_release(Engine *e, int i) {
    slot_t *s = &e->slots[i];
    if (s->hold) { s->state = S_ZOMBIE; return; }
    free(s->payload);
    s->payload = NULL;
    free(s->reply);
    s->reply = NULL;
    s->state = S_FREE;
    e->in_flight--;
    e->bytes_in_flight -= s->cost;
    pthread_cond_broadcast(&e->cv);
}

static void slow_push(Engine *e, int i) {
    slot_t *s = &e->slots[i];
    s->state = S_SLOW;
    s->next = -1;
    if (e->slow_tail >= 0) e->slots[e->slow_tail].next = i; else e->slow_head = i;
    e->slow_tail = i;
    e->n_slow++;
}

/* an agent connection failed: everything posted on it goes to Python (called with mu held) */
static void agent_lost(Engine *e, agent_t *a) {
    if (a->dead) return;
    a->dead = 1;
    shutdown(a->fd, SHUT_RDWR);
    e->n_agent_lost++;
    for (int i = 0; i < MAX_IN_FLIGHT; i++) {
        slot_t *s = &e->slots[i];
        if (s->state == S_AGENT && s->agent == a->index) {
            s->astatus = -1;
            e->n_handed_back++;
            slow_push(e, i);
        }
    }
    if (e->ndead_pending < MAX_AGENTS) e->dead_pending[e->ndead_pending++] = a->index;
}

/* ------------------------------------------------------------------ the reader */
static void flush_agents(Engine *e) {
    pthread_mutex_lock(&e->mu);
    int nagents = e->nagents; /* agents are only ever added, and freed by close() after the reader ended */
    pthread_mutex_unlock(&e->mu);
    for (int k = 0; k < nagents; k++) {
        agent_t *a = e->agents[k];
        if (!a || !a->nq) continue;
        int failed = a->dead || writev_all(a->fd, a->iov, a->niov) < 0;
        pthread_mutex_lock(&e->mu);
        if (failed) agent_lost(e, a);
        for (int j = 0; j < a->nq; j++) {
            slot_t *s = &e->slots[a->qslots[j]];
            s->hold = 0;
            if (s->state == S_ZOMBIE) slot_release(e, a->qslots[j]);
        }
        pthread_mutex_unlock(&e->mu);
        if (failed) notify(e);
        a->niov = a->nq = 0;
    }
}

static void reader_stop(Engine *e, const char *why) {
    pthread_mutex_lock(&e->mu);
    if (why && !e->reason[0]) snprintf(e->reason, sizeof e->reason, "%s", why);
    pthread_mutex_unlock(&e->mu);
}

/* the fast path: queue the command of slot i on its agent; 1 if posted, 0 for Python (mu held) */
static int try_post(Engine *e, int i) {
    slot_t *s = &e->slots[i];
    layout_t *l = e->layout;
    if (s->verdict || (s->cmd != CMD_READ && s->cmd != CMD_WRITE) || s->length > FAST_MAX || !l) return 0;
    if (s->cmd == CMD_READ ? (!l->reads || (s->flags & ~(FLAG_FUA | FLAG_DF))) : (!l->writes || (s->flags & ~FLAG_FUA)))
        return 0;
    uint64_t ext_id = 0, ext_off = 0;
    int ai = map_piece(l, s->offset, s->length, &ext_id, &ext_off);
    if (ai < 0 || ai >= e->nagents) return 0;
    agent_t *a = e->agents[ai];
    if (!a || a->dead) return 0;
    if (a->niov + 4 > AGENT_IOV || a->nq + 2 > AGENT_IOV) return -1; /* flush first, then retry */
    if (a->cap_version != e->cap_version && e->cap_len) {
        unsigned char *h = a->authhdr;
        memset(h, 0, CMD_SIZE);
        put_le16(h, COMMAND_MAGIC); h[2] = DP_AUTH; h[3] = 0;
        put_le32(h + 4, AUTH_TAG);
        put_le64(h + 8, a->conn_id);
        put_le32(h + 24, (uint32_t)e->cap_len);
        a->iov[a->niov].iov_base = h; a->iov[a->niov++].iov_len = CMD_SIZE;
        a->iov[a->niov].iov_base = e->cap; a->iov[a->niov++].iov_len = (size_t)e->cap_len;
        a->cap_version = e->cap_version;
    }
    unsigned char *h = s->cmdhdr;
    put_le16(h, COMMAND_MAGIC);
    h[2] = s->cmd == CMD_READ ? DP_READ : DP_WRITE;
    h[3] = (s->cmd == CMD_WRITE && (s->flags & FLAG_FUA)) ? DP_FUA : 0;
    put_le32(h + 4, (s->seq << 8) | (uint32_t)i);
    put_le64(h + 8, ext_id);
    put_le64(h + 16, ext_off);
    put_le32(h + 24, s->length);
    put_le32(h + 28, 0);
    put_le64(h + 32, 0);
    put_le64(h + 40, l->generation);
    a->iov[a->niov].iov_base = h; a->iov[a->niov++].iov_len = CMD_SIZE;
    if (s->cmd == CMD_WRITE) { a->iov[a->niov].iov_base = s->payload; a->iov[a->niov++].iov_len = s->length; }
    a->qslots[a->nq++] = i;
    s->hold = 1;
    s->agent = ai;
    s->state = S_AGENT;
    if (s->cmd == CMD_READ) e->n_fast_read++; else e->n_fast_write++;
    return 1;
}

static void *reader_main(void *arg) {
    Engine *e = (Engine *)arg;
    char *buf = malloc(RBUF);
    size_t pos = 0, have = 0;
    uint32_t seq = 0;
    if (!buf) { reader_stop(e, "out of memory"); goto out; }
    if (e->initial_len) {
        size_t n = (size_t)e->initial_len < RBUF ? (size_t)e->initial_len : RBUF;
        memcpy(buf, e->initial, n);
        have = n;
    }
    for (;;) {
        if (have - pos < REQ_HDR) {
            if (pos) { memmove(buf, buf + pos, have - pos); have -= pos; pos = 0; }
            flush_agents(e);
            ssize_t r = recv(e->nbd_fd, buf + have, RBUF - have, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break; /* the client hung up (or close() shut the socket) */
            have += (size_t)r;
            continue;
        }
        const unsigned char *p = (const unsigned char *)buf + pos;
        uint32_t magic = get_be32(p);
        if (magic != REQUEST_MAGIC) {
            char why[64];
            snprintf(why, sizeof why, "bad request magic 0x%08x", magic);
            reader_stop(e, why);
            break;
        }
        int flags = get_be16(p + 4), cmd = get_be16(p + 6);
        uint64_t handle = get_be64(p + 8), offset = get_be64(p + 16);
        uint64_t length = get_be32(p + 24);
        int verdict = validate(e->size, e->max_block, e->read_only, e->structured, e->block_size_negotiated,
                               cmd, flags, offset, length);
        if (cmd == CMD_DISC) break;
        if (cmd == CMD_WRITE && verdict && length > MAX_SKIP) {
            char why[128];
            snprintf(why, sizeof why, "WRITE of %llu bytes is too large even to skip", (unsigned long long)length);
            reader_stop(e, why);
            break;
        }
        uint64_t cost = (cmd <= CMD_WRITE && !verdict) ? length : 0;
        /* admission: the budget, a request alone always admitted */
        pthread_mutex_lock(&e->mu);
        if (e->in_flight && (e->in_flight >= MAX_IN_FLIGHT || e->bytes_in_flight + cost > MAX_BYTES_IN_FLIGHT)) {
            pthread_mutex_unlock(&e->mu);
            flush_agents(e); /* what waits for room must be on its way */
            pthread_mutex_lock(&e->mu);
            while (!e->stop && e->in_flight
                   && (e->in_flight >= MAX_IN_FLIGHT || e->bytes_in_flight + cost > MAX_BYTES_IN_FLIGHT))
                pthread_cond_wait(&e->cv, &e->mu);
        }
        if (e->stop) { pthread_mutex_unlock(&e->mu); break; }
        int i = 0;
        while (e->slots[i].state != S_FREE) i++; /* in_flight < MAX_IN_FLIGHT: there is one */
        slot_t *s = &e->slots[i];
        memset(s, 0, offsetof(slot_t, cmdhdr));
        s->state = S_PY; /* being built: nobody else touches it */
        s->seq = (++seq) & 0xFFFFFF;
        s->cmd = (uint16_t)cmd; s->flags = (uint16_t)flags; s->handle = handle; s->offset = offset;
        s->length = (uint32_t)length; s->cost = cost; s->verdict = verdict; s->agent = -1; s->t0 = now_s();
        e->in_flight++;
        e->bytes_in_flight += cost;
        pthread_mutex_unlock(&e->mu);
        pos += REQ_HDR;
        if (cmd == CMD_WRITE) {
            size_t here = have - pos < length ? have - pos : (size_t)length;
            int err = 0;
            if (verdict) { /* refused: read and discard its payload */
                pos += here;
                uint64_t left = length - here;
                if (left) { /* the buffer held nothing after it: receive the rest into it, and drop it */
                    while (left && !err) {
                        size_t n = left < RBUF ? (size_t)left : RBUF;
                        ssize_t r = recv(e->nbd_fd, buf, n, 0);
                        if (r < 0 && errno == EINTR) continue;
                        if (r <= 0) err = 1; else left -= (uint64_t)r;
                    }
                    if (!err) pos = have = 0;
                }
            } else {
                s->payload = malloc(length); /* large: mmap'd, committed as the bytes arrive */
                if (!s->payload) err = 2;
                else {
                    memcpy(s->payload, buf + pos, here);
                    pos += here;
                    if (here < length && recv_all(e->nbd_fd, s->payload + here, (size_t)(length - here)) < 0) err = 1;
                }
            }
            if (err) {
                pthread_mutex_lock(&e->mu);
                s->hold = 0;
                slot_release(e, i);
                pthread_mutex_unlock(&e->mu);
                if (err == 2) reader_stop(e, "out of memory for a WRITE payload");
                break; /* the client hung up half-way */
            }
        }
        pthread_mutex_lock(&e->mu);
        int posted = try_post(e, i);
        if (posted < 0) {
            pthread_mutex_unlock(&e->mu);
            flush_agents(e);
            pthread_mutex_lock(&e->mu);
            posted = try_post(e, i);
        }
        if (posted <= 0) slow_push(e, i);
        pthread_mutex_unlock(&e->mu);
        if (posted <= 0) notify(e);
    }
    flush_agents(e);
out:
    free(buf);
    /* wait for every admitted request to be answered (bounded: agents time out, Python answers) */
    pthread_mutex_lock(&e->mu);
    while (!e->stop && e->in_flight) pthread_cond_wait(&e->cv, &e->mu);
    e->finished = 1;
    pthread_mutex_unlock(&e->mu);
    shutdown(e->nbd_fd, SHUT_RDWR);
    notify(e);
    return NULL;
}

/* ------------------------------------------------------------------ agents' completions */
static void nbd_write(Engine *e, struct iovec *iov, int n) {
    pthread_mutex_lock(&e->wmu);
    if (!e->nbd_broken && writev_all(e->nbd_fd, iov, n) < 0) {
        e->nbd_broken = 1;
        shutdown(e->nbd_fd, SHUT_RDWR); /* wakes the reader: the connection ends */
    }
    pthread_mutex_unlock(&e->wmu);
}

/* Parse and answer the complete completions in buf[*pos, have), at most REPLY_BATCH replies (one writev).
 * Returns the replies written, or -1 when the agent sent something that breaks the stream. */
static int answer_batch(Engine *e, agent_t *a, char *buf, size_t *ppos, size_t have) {
    unsigned char hdrs[REPLY_BATCH][28];
    struct iovec iov[2 * REPLY_BATCH];
    int done[REPLY_BATCH];
    int nrep = 0, niov = 0, bad = 0;
    size_t pos = *ppos;
    while (have - pos >= COMP_SIZE && nrep < REPLY_BATCH) {
        const unsigned char *p = (const unsigned char *)buf + pos;
        int status = p[2], cflags = p[3];
        uint32_t tag = get_le32(p + 4), n = get_le32(p + 8);
        if (get_le16(p) != COMPLETION_MAGIC || cflags) { bad = 1; break; }
        if (tag == AUTH_TAG) { /* a refused AUTH shows as DENIED on the commands after it */
            if (n > MAX_MESSAGE) { bad = 1; break; }
            if (have - pos < COMP_SIZE + n) break;
            pos += COMP_SIZE + n;
            continue;
        }
        int i = (int)(tag & 0xFF);
        if (i >= MAX_IN_FLIGHT) { bad = 1; break; }
        pthread_mutex_lock(&e->mu);
        slot_t *s = &e->slots[i];
        int ok = s->state == S_AGENT && s->agent == a->index && s->seq == (tag >> 8);
        uint16_t cmd = s->cmd;
        uint32_t want = s->length;
        uint64_t handle = s->handle, offset = s->offset;
        pthread_mutex_unlock(&e->mu);
        if (!ok) { bad = 1; break; }
        uint32_t expect = status ? n : (cmd == CMD_READ ? want : 0);
        if (n != expect || (status && n > MAX_MESSAGE)) { bad = 1; break; }
        if (have - pos < COMP_SIZE + n) break; /* the rest is on its way */
        if (test_answer_delay > 0) test_delay(test_answer_delay);
        pthread_mutex_lock(&e->mu);
        /* Claim the slot: check it again, under the same hold of mu as the state change below. A slot in
         * S_AGENT leaves that state only under mu, and only once: to S_REPLYING or S_SLOW here, or to S_SLOW
         * in agent_lost, which the reader (flush_agents: a send to this agent failed) may call while mu was
         * released above. Whoever moves it first owns the request and answers it; the other skips it. Were
         * the slot committed on the first check, a request agent_lost handed to Python would be answered
         * twice (two replies for one handle, counted out of flight twice) or pushed on the slow queue twice
         * (a cycle take() never leaves). The completion of a slot handed back is dropped: Python answers it,
         * and this connection is lost anyway. Agent indices are never reused and seq changes with each
         * request in the slot, so a slot that was freed and filled again in the window fails the check too. */
        if (s->state != S_AGENT || s->agent != a->index || s->seq != (tag >> 8)) {
            pthread_mutex_unlock(&e->mu);
            pos += COMP_SIZE + n;
            continue;
        }
        if (status) { /* not a plain success: Python serves it on the full path */
            s->astatus = status;
            e->n_handed_back++;
            slow_push(e, i);
            pthread_mutex_unlock(&e->mu);
            notify(e);
            pos += COMP_SIZE + n;
            continue;
        }
        s->state = S_REPLYING; /* ours now: a lost connection no longer hands it to Python */
        if (cmd == CMD_READ) { e->reads_ok++; e->read_bytes += want; } else { e->writes_ok++; e->write_bytes += want; }
        pthread_mutex_unlock(&e->mu);
        unsigned char *h = hdrs[nrep];
        if (cmd == CMD_READ && e->structured) {
            put_be32(h, STRUCTURED_REPLY_MAGIC); put_be16(h + 4, REPLY_FLAG_DONE);
            put_be16(h + 6, REPLY_TYPE_OFFSET_DATA); put_be64(h + 8, handle);
            put_be32(h + 16, 8 + n); put_be64(h + 20, offset);
            iov[niov].iov_base = h; iov[niov++].iov_len = 28;
        } else {
            put_be32(h, SIMPLE_REPLY_MAGIC); put_be32(h + 4, 0); put_be64(h + 8, handle);
            iov[niov].iov_base = h; iov[niov++].iov_len = 16;
        }
        if (n) { iov[niov].iov_base = buf + pos + COMP_SIZE; iov[niov++].iov_len = n; }
        done[nrep++] = i;
        pos += COMP_SIZE + n;
    }
    if (nrep) {
        nbd_write(e, iov, niov);
        pthread_mutex_lock(&e->mu);
        for (int k = 0; k < nrep; k++) slot_release(e, done[k]);
        pthread_mutex_unlock(&e->mu);
    }
    *ppos = pos;
    return bad ? -1 : nrep;
}

static void *receiver_main(void *arg) {
    agent_t *a = (agent_t *)arg;
    Engine *e = a->eng;
    char *buf = malloc(ABUF);
    size_t have = 0;
    if (!buf) goto lost;
    for (;;) {
        ssize_t r = recv(a->fd, buf + have, ABUF - have, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { /* SO_RCVTIMEO: any command overdue? */
            double t = now_s();
            int overdue = 0;
            pthread_mutex_lock(&e->mu);
            for (int i = 0; i < MAX_IN_FLIGHT; i++) {
                slot_t *s = &e->slots[i];
                if (s->state == S_AGENT && s->agent == a->index && t - s->t0 > e->agent_timeout) overdue = 1;
            }
            int stop = e->stop || a->dead;
            pthread_mutex_unlock(&e->mu);
            if (overdue || stop) break;
            continue;
        }
        if (r <= 0) break;
        have += (size_t)r;
        int n;
        do { /* a full batch may leave more complete completions behind: answer them before blocking */
            size_t pos = 0;
            n = answer_batch(e, a, buf, &pos, have);
            if (pos) { memmove(buf, buf + pos, have - pos); have -= pos; }
        } while (n == REPLY_BATCH);
        if (n < 0) break;
    }
lost:
    free(buf);
    pthread_mutex_lock(&e->mu);
    agent_lost(e, a);
    pthread_mutex_unlock(&e->mu);
    notify(e);
    return NULL;
}

/* ------------------------------------------------------------------ replies made by Python */
static void *writer_main(void *arg) {
    Engine *e = (Engine *)arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->stop && e->wq_head < 0) pthread_cond_wait(&e->wcv, &e->mu);
        if (e->wq_head < 0) break; /* stopping, nothing left */
        int i = e->wq_head;
        slot_t *s = &e->slots[i];
        e->wq_head = s->next;
        if (e->wq_head < 0) e->wq_tail = -1;
        pthread_mutex_unlock(&e->mu);
        struct iovec v = {s->reply, s->reply_len};
        nbd_write(e, &v, 1);
        pthread_mutex_lock(&e->mu);
        slot_release(e, i);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

/* ------------------------------------------------------------------ the Python type */
static int Engine_init(Engine *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"nbd_fd", "notify_fd", "size", "max_block", "read_only", "structured",
                             "block_size_negotiated", "agent_timeout", "initial", NULL};
    int nbd_fd, notify_fd, ro, st, bsn;
    unsigned long long size, max_block;
    double timeout;
    Py_buffer initial = {0};
    if (self->started) { PyErr_SetString(PyExc_RuntimeError, "engine already initialised"); return -1; }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiKKpppdy*", kwlist, &nbd_fd, &notify_fd, &size, &max_block, &ro, &st,
                                     &bsn, &timeout, &initial))
        return -1;
    self->nbd_fd = nbd_fd;
    self->notify_fd = notify_fd;
    self->size = size;
    self->max_block = max_block;
    self->read_only = ro;
    self->structured = st;
    self->block_size_negotiated = bsn;
    self->agent_timeout = timeout;
    self->slow_head = self->slow_tail = self->wq_head = self->wq_tail = -1;
    if (initial.len) {
        self->initial = malloc((size_t)initial.len);
        if (!self->initial) { PyBuffer_Release(&initial); PyErr_NoMemory(); return -1; }
        memcpy(self->initial, initial.buf, (size_t)initial.len);
        self->initial_len = initial.len;
    }
    PyBuffer_Release(&initial);
    pthread_mutex_init(&self->mu, NULL);
    pthread_mutex_init(&self->wmu, NULL);
    pthread_cond_init(&self->cv, NULL);
    pthread_cond_init(&self->wcv, NULL);
    self->started = 1; /* initialised (threads start with start()) */
    return 0;
}

static PyObject *Engine_add_agent(Engine *self, PyObject *args) {
    int fd;
    unsigned long long conn_id = 0;
    if (!PyArg_ParseTuple(args, "i|K", &fd, &conn_id)) return NULL;
    if (self->closed) { PyErr_SetString(PyExc_RuntimeError, "engine is closed"); return NULL; }
    pthread_mutex_lock(&self->mu);
    int n = self->nagents;
    pthread_mutex_unlock(&self->mu);
    if (n >= MAX_AGENTS) { PyErr_SetString(PyExc_RuntimeError, "too many agent connections"); return NULL; }
    agent_t *a = calloc(1, sizeof *a);
    if (!a) return PyErr_NoMemory();
    a->eng = self;
    a->index = n;
    a->fd = fd;
    a->conn_id = conn_id;
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct timeval sv = {(time_t)self->agent_timeout, (suseconds_t)((self->agent_timeout - (time_t)self->agent_timeout) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &sv, sizeof sv);
    if (pthread_create(&a->thread, NULL, receiver_main, a) != 0) {
        free(a);
        PyErr_SetString(PyExc_OSError, "cannot start a receiver thread");
        return NULL;
    }
    a->thread_started = 1;
    pthread_mutex_lock(&self->mu);
    self->agents[n] = a;
    self->nagents = n + 1;
    pthread_mutex_unlock(&self->mu);
    return PyLong_FromLong(n);
}

/* columns = [[(start, length, extent_id, agent), ...], ...] -> a layout_t (NULL with an exception set) */
static layout_t *parse_layout(PyObject *cols, uint64_t gen, uint64_t su, int reads, int writes) {
    PyObject *seq = PySequence_Fast(cols, "columns must be a sequence");
    if (!seq) return NULL;
    layout_t *l = calloc(1, sizeof *l);
    if (!l) { Py_DECREF(seq); PyErr_NoMemory(); return NULL; }
    l->generation = gen; l->su = su; l->reads = reads; l->writes = writes;
    l->width = (int)PySequence_Fast_GET_SIZE(seq);
    l->cols = calloc(l->width ? (size_t)l->width : 1, sizeof(column_t));
    if (!l->cols) { free(l); Py_DECREF(seq); PyErr_NoMemory(); return NULL; }
    for (int c = 0; c < l->width; c++) {
        PyObject *col = PySequence_Fast(PySequence_Fast_GET_ITEM(seq, c), "a column must be a sequence");
        if (!col) goto fail;
        int n = (int)PySequence_Fast_GET_SIZE(col);
        l->cols[c].e = calloc(n ? (size_t)n : 1, sizeof(ext_t));
        l->cols[c].n = n;
        if (!l->cols[c].e) { Py_DECREF(col); PyErr_NoMemory(); goto fail; }
        for (int k = 0; k < n; k++) {
            ext_t *x = &l->cols[c].e[k];
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(col, k), "KKKi", &x->start, &x->length, &x->extent_id, &x->agent)) {
                Py_DECREF(col);
                goto fail;
            }
            if (k && x->start < l->cols[c].e[k - 1].start + l->cols[c].e[k - 1].length) {
                Py_DECREF(col);
                PyErr_SetString(PyExc_ValueError, "a column's extents must be in order and not overlap");
                goto fail;
            }
        }
        Py_DECREF(col);
    }
    Py_DECREF(seq);
    return l;
fail:
    Py_DECREF(seq);
    free_layout(l);
    return NULL;
}

/* set_layout(generation, stripe_unit, reads, writes, columns) */
static PyObject *Engine_set_layout(Engine *self, PyObject *args) {
    unsigned long long gen, su;
    int reads, writes;
    PyObject *cols;
    if (!PyArg_ParseTuple(args, "KKppO", &gen, &su, &reads, &writes, &cols)) return NULL;
    layout_t *l = parse_layout(cols, gen, su, reads, writes);
    if (!l) return NULL;
    pthread_mutex_lock(&self->mu);
    layout_t *old = self->layout;
    self->layout = l;
    pthread_mutex_unlock(&self->mu);
    free_layout(old); /* only ever read under mu */
    Py_RETURN_NONE;
}

static PyObject *Engine_set_cap(Engine *self, PyObject *args) {
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*", &b)) return NULL;
    char *c = malloc(b.len ? (size_t)b.len : 1);
    if (!c) { PyBuffer_Release(&b); return PyErr_NoMemory(); }
    memcpy(c, b.buf, (size_t)b.len);
    /* the reader may be sending the old one: keep it until the engine is closed (capabilities change
       with lease renewals, every few seconds at most: a few hundred bytes each) */
    char **olds = self->cap ? realloc(self->old_caps, sizeof(char *) * (size_t)(self->nold_caps + 1)) : self->old_caps;
    if (self->cap && !olds) { free(c); PyBuffer_Release(&b); return PyErr_NoMemory(); }
    pthread_mutex_lock(&self->mu);
    if (self->cap) { olds[self->nold_caps++] = self->cap; self->old_caps = olds; }
    self->cap = c;
    self->cap_len = b.len;
    self->cap_version++;
    pthread_mutex_unlock(&self->mu);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *Engine_start(Engine *self, PyObject *unused) {
    if (!self->started || self->closed || self->reader_started) {
        PyErr_SetString(PyExc_RuntimeError, "engine cannot start");
        return NULL;
    }
    /* the socket is shared with the (paused) asyncio transport, which made it non-blocking */
    int fl = fcntl(self->nbd_fd, F_GETFL);
    if (fl < 0 || fcntl(self->nbd_fd, F_SETFL, fl & ~O_NONBLOCK) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    if (pthread_create(&self->writer, NULL, writer_main, self) != 0) {
        PyErr_SetString(PyExc_OSError, "cannot start the writer thread");
        return NULL;
    }
    self->writer_started = 1;
    if (pthread_create(&self->reader, NULL, reader_main, self) != 0) {
        PyErr_SetString(PyExc_OSError, "cannot start the reader thread");
        return NULL;
    }
    self->reader_started = 1;
    Py_RETURN_NONE;
}

/* take() -> (requests, finished, reason, lost_agents); requests: (token, cmd, flags, handle, offset, length,
   payload or None, verdict, agent_status, age_s) */
static PyObject *Engine_take(Engine *self, PyObject *unused) {
    char drain[256];
    while (read(self->notify_fd, drain, sizeof drain) > 0) {
    }
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    double t = now_s();
    for (;;) {
        pthread_mutex_lock(&self->mu);
        int i = self->slow_head;
        if (i < 0) { pthread_mutex_unlock(&self->mu); break; }
        slot_t *s = &self->slots[i];
        self->slow_head = s->next;
        if (self->slow_head < 0) self->slow_tail = -1;
        s->state = S_PY;
        pthread_mutex_unlock(&self->mu);
        /* S_PY: only Python touches the slot now (the reader may still hold its payload: read-only) */
        PyObject *payload;
        if (s->cmd == CMD_WRITE && !s->verdict && s->payload) payload = PyBytes_FromStringAndSize(s->payload, s->length);
        else { payload = Py_None; Py_INCREF(payload); }
        if (!payload) { Py_DECREF(list); return NULL; }
        PyObject *item = Py_BuildValue("(KiiKKKNiid)", (unsigned long long)(((uint64_t)s->seq << 8) | (uint64_t)i),
                                       (int)s->cmd, (int)s->flags, (unsigned long long)s->handle,
                                       (unsigned long long)s->offset, (unsigned long long)s->length, payload,
                                       s->verdict, s->astatus, t - s->t0);
        if (!item || PyList_Append(list, item) < 0) { Py_XDECREF(item); Py_DECREF(list); return NULL; }
        Py_DECREF(item);
    }
    pthread_mutex_lock(&self->mu);
    int finished = self->finished;
    PyObject *lost = PyList_New(self->ndead_pending);
    for (int k = 0; lost && k < self->ndead_pending; k++) PyList_SET_ITEM(lost, k, PyLong_FromLong(self->dead_pending[k]));
    self->ndead_pending = 0;
    PyObject *reason = PyUnicode_DecodeUTF8(self->reason, (Py_ssize_t)strlen(self->reason), "replace");
    pthread_mutex_unlock(&self->mu);
    if (!lost || !reason) { Py_XDECREF(lost); Py_XDECREF(reason); Py_DECREF(list); return NULL; }
    return Py_BuildValue("(NON N)", list, finished ? Py_True : Py_False, reason, lost);
}

/* reply(token, data): the whole reply to a request Python took */
static PyObject *Engine_reply(Engine *self, PyObject *args) {
    unsigned long long token;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "Ky*", &token, &b)) return NULL;
    int i = (int)(token & 0xFF);
    uint32_t seq = (uint32_t)(token >> 8);
    char *copy = i < MAX_IN_FLIGHT ? malloc(b.len ? (size_t)b.len : 1) : NULL;
    if (copy) memcpy(copy, b.buf, (size_t)b.len);
    size_t len = (size_t)b.len;
    PyBuffer_Release(&b);
    if (!copy) {
        if (i >= MAX_IN_FLIGHT) { PyErr_SetString(PyExc_ValueError, "no such request"); return NULL; }
        return PyErr_NoMemory();
    }
    pthread_mutex_lock(&self->mu);
    slot_t *s = &self->slots[i];
    if (s->state != S_PY || s->seq != seq) {
        pthread_mutex_unlock(&self->mu);
        free(copy);
        PyErr_SetString(PyExc_ValueError, "no such request in Python's hands");
        return NULL;
    }
    s->reply = copy;
    s->reply_len = len;
    s->state = S_REPLYING;
    s->next = -1;
    if (self->wq_tail >= 0) self->slots[self->wq_tail].next = i; else self->wq_head = i;
    self->wq_tail = i;
    pthread_cond_signal(&self->wcv);
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *Engine_stats(Engine *self, PyObject *unused) {
    pthread_mutex_lock(&self->mu);
    int dead = 0;
    for (int k = 0; k < self->nagents; k++) dead += self->agents[k] && self->agents[k]->dead;
    PyObject *d = Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:i,s:K,s:i,s:i}", "reads_ok",
                                (unsigned long long)self->reads_ok, "writes_ok", (unsigned long long)self->writes_ok,
                                "read_bytes", (unsigned long long)self->read_bytes,
                                "write_bytes", (unsigned long long)self->write_bytes,
                                "fast_reads", (unsigned long long)self->n_fast_read,
                                "fast_writes", (unsigned long long)self->n_fast_write, "to_python", (unsigned long long)self->n_slow,
                                "handed_back", (unsigned long long)self->n_handed_back, "agents_lost",
                                (unsigned long long)self->n_agent_lost, "in_flight", self->in_flight,
                                "bytes_in_flight", (unsigned long long)self->bytes_in_flight, "agents", self->nagents,
                                "agents_dead", dead);
    pthread_mutex_unlock(&self->mu);
    return d;
}

static void engine_close(Engine *self) {
    if (self->closed || !self->started) return;
    self->closed = 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    self->stop = 1;
    pthread_cond_broadcast(&self->cv);
    pthread_cond_broadcast(&self->wcv);
    int n = self->nagents;
    for (int k = 0; k < n; k++)
        if (self->agents[k]) shutdown(self->agents[k]->fd, SHUT_RDWR);
    pthread_mutex_unlock(&self->mu);
    shutdown(self->nbd_fd, SHUT_RDWR);
    if (self->reader_started) pthread_join(self->reader, NULL);
    if (self->writer_started) pthread_join(self->writer, NULL);
    for (int k = 0; k < n; k++) {
        agent_t *a = self->agents[k];
        if (!a) continue;
        if (a->thread_started) pthread_join(a->thread, NULL);
        close(a->fd);
        free(a);
        self->agents[k] = NULL;
    }
    Py_END_ALLOW_THREADS
    close(self->nbd_fd);
    for (int i = 0; i < MAX_IN_FLIGHT; i++) {
        free(self->slots[i].payload);
        free(self->slots[i].reply);
        self->slots[i].payload = self->slots[i].reply = NULL;
    }
    free_layout(self->layout);
    self->layout = NULL;
    free(self->initial);
    self->initial = NULL;
    for (int k = 0; k < self->nold_caps; k++) free(self->old_caps[k]);
    free(self->old_caps);
    free(self->cap);
    self->old_caps = NULL;
    self->cap = NULL;
    self->nold_caps = 0;
}

static PyObject *Engine_close(Engine *self, PyObject *unused) {
    engine_close(self);
    Py_RETURN_NONE;
}

static void Engine_dealloc(Engine *self) {
    engine_close(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Engine_methods[] = {
    {"add_agent", (PyCFunction)Engine_add_agent, METH_VARARGS, "add_agent(fd, conn_id=0) -> index: a connected, blocking agent socket (owned from now on); conn_id goes in its AUTH"},
    {"set_layout", (PyCFunction)Engine_set_layout, METH_VARARGS, "set_layout(generation, stripe_unit, reads, writes, columns)"},
    {"set_cap", (PyCFunction)Engine_set_cap, METH_VARARGS, "set_cap(capability): presented (AUTH) on each agent connection before its next command"},
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "start serving"},
    {"take", (PyCFunction)Engine_take, METH_NOARGS, "take() -> (requests for Python, finished, reason, lost agent indices)"},
    {"reply", (PyCFunction)Engine_reply, METH_VARARGS, "reply(token, data): the reply to a request taken"},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "counters"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "stop every thread and close the sockets"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nvpool.client._cnbd.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One NBD connection's transmission phase, served from native threads (see the module comment).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static PyObject *py_validate(PyObject *mod, PyObject *args) {
    unsigned long long size, max_block, offset, length;
    int ro, st, bsn, cmd, flags;
    if (!PyArg_ParseTuple(args, "KKpppiiKK", &size, &max_block, &ro, &st, &bsn, &cmd, &flags, &offset, &length)) return NULL;
    return PyLong_FromLong(validate(size, max_block, ro, st, bsn, cmd, flags, offset, length));
}

static PyObject *py_map_piece(PyObject *mod, PyObject *args) {
    /* map_piece(stripe_unit, columns, offset, length) -> (agent, extent_id, extent_offset) or None: for tests */
    unsigned long long su, offset, length;
    PyObject *cols;
    if (!PyArg_ParseTuple(args, "KOKK", &su, &cols, &offset, &length)) return NULL;
    layout_t *l = parse_layout(cols, 0, su, 1, 1);
    if (!l) return NULL;
    uint64_t ext = 0, off = 0;
    int ai = length ? map_piece(l, offset, length, &ext, &off) : -1;
    free_layout(l);
    if (ai < 0) Py_RETURN_NONE;
    return Py_BuildValue("(iKK)", ai, (unsigned long long)ext, (unsigned long long)off);
}

static PyMethodDef methods[] = {
    {"validate", py_validate, METH_VARARGS, "validate(size, max_block, read_only, structured, block_size_negotiated, cmd, flags, offset, length) -> NBD error"},
    {"map_piece", py_map_piece, METH_VARARGS, "map_piece(stripe_unit, columns, offset, length) -> (agent, extent_id, extent_offset) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cnbd", "The NBD export's compiled transmission loop.", -1, methods};

PyMODINIT_FUNC PyInit__cnbd(void) {
    {
        uint16_t probe = 1;
        unsigned char b;
        memcpy(&b, &probe, 1);
        if (b != 1) {
            PyErr_SetString(PyExc_ImportError, "_cnbd supports little-endian hosts only");
            return NULL;
        }
    }
    {
        const char *d = getenv("NVPOOL_TEST_CNBD_ANSWER_DELAY");
        if (d && *d) test_answer_delay = strtod(d, NULL);
    }
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "FAST_MAX", FAST_MAX) < 0 ||
        PyModule_AddIntConstant(m, "MAX_IN_FLIGHT", MAX_IN_FLIGHT) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BYTES_IN_FLIGHT", MAX_BYTES_IN_FLIGHT) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
