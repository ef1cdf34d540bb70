/* nvpool.agents._cserve: the agent's compiled command loop (the fast path of agents/dataplane.py).
 *
 * The pure-Python path (CommandDecoder -> Command -> dataplane.execute -> AgentCore) is the
 * specification; this module serves exactly the commands whose outcome that path would give as a
 * plain success, and hands everything else back to it *before touching anything*:
 *
 *   serve(scratch, pos, end, core, caps, regions, out, small_read_max, batch_bytes) -> (pos, stop)
 *
 * reads whole command frames from ``scratch[pos:end)`` (the decoder's receive buffer, the reader
 * being between frames), and for each one, in order:
 *
 *   - READ of 1..small_read_max-1 bytes and WRITE (payload wholly in ``scratch``), without digests;
 *   - READ_REGION and WRITE_REGION (the same-host transport, agents/shm.py): the data moves between
 *     the drive and the connection's registered region (``regions``: id -> writable buffer), checked
 *     as ``dataplane._region`` checks it (registered, the range inside the region), then as a READ or
 *     WRITE; their completion carries no payload;
 *   - checked exactly as the Python path checks them: framing (magic, flag bits, MAX_IO), then, when
 *     the core holds secrets, the connection's capability for the extent's volume (expiry, access,
 *     generation bound), then the core's checks (extent held, generation fence, serve lease of a
 *     replicated extent, range, drive present and not failed, a plain ``Drive``), and for a WRITE
 *     no migration copy or dirty tracking active on the core (those record writes in Python);
 *   - executed with pread/pwrite (fdatasync for FUA) on the drive's descriptor; the completion (and
 *     a READ's data, in the same bytes object) is appended to ``out``; the core's counters and the
 *     latency histogram are updated as ``Stats.io`` / ``Stats.observe`` would.
 *
 * Anything else (another opcode, a digest, a refusal of any kind, a frame not yet complete, a failed
 * or short system call) stops the loop at that frame with ``pos`` pointing at it, so the Python
 * decoder parses it and the Python path answers it with its own errors and side effects (a drive
 * error marks the drive failed there; a retried pread/pwrite is idempotent). ``stop`` says why:
 * STOP_NEED_PYTHON (the frame at pos, possibly incomplete, is for the Python path) or STOP_FULL
 * (``batch_bytes`` of replies are in ``out``: send them and call again). pos == end is STOP_NEED_PYTHON
 * with nothing left. Nothing here keeps state between calls: the extent table, fences, capabilities
 * and the serve lease are read from the Python objects on every call, so a fence raised by a control
 * call between two receives is seen by the next command, exactly as on the Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define COMMAND_MAGIC 0x564E
#define COMPLETION_MAGIC 0x434E
#define CMD_SIZE 48
#define COMP_SIZE 24
#define F_HDGST 1
#define F_DDGST 2
#define F_FUA 4
#define KNOWN_FLAGS 7
#define OP_READ 1
#define OP_WRITE 2
#define OP_READ_REGION 0x10
#define OP_WRITE_REGION 0x11
#define OP_AUTH 0x20
#define MAX_IO (16u * 1024u * 1024u)
#define ACCESS_WRITE 2
#define MAX_BUCKETS 64
#define INTENT_GRAIN (64u * 1024u) /* agents/intent.py INTENT_GRAIN (checked by tests/test_write_intent.py) */

#define STOP_NEED_PYTHON 0
#define STOP_FULL 1

static PyObject *drive_type = NULL;   /* agents.drive.Drive: only plain drives are served here */
static double buckets[MAX_BUCKETS];
static Py_ssize_t n_buckets = 0;

static PyObject *s_extents, *s_drives, *s_secrets, *s_serve_until, *s_copies, *s_dirty, *s_stats, *s_intent;
static PyObject *s_volume_id, *s_min_generation, *s_replicas, *s_length, *s_drive_id, *s_drive_offset;
static PyObject *s_sums_at;
static PyObject *s_failed, *s_fd, *s_expires, *s_access, *s_max_generation;
static PyObject *s_commands, *s_bytes_read, *s_bytes_written, *s_drives_stats, *s_volumes, *s_latency;
static PyObject *s_read, *s_write, *s_read_region, *s_write_region;

static inline uint16_t ld16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline double now_clock(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* attribute as a C integer; -1 with an exception set on failure */
static int attr_ll(PyObject *obj, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (*out == -1 && PyErr_Occurred()) return -1;
    return 0;
}

static int attr_ull(PyObject *obj, PyObject *name, unsigned long long *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    return 0;
}

/* list[i] += delta (a list of ints) */
static int list_add(PyObject *list, Py_ssize_t i, long long delta) {
    PyObject *old = PyList_GET_ITEM(list, i);
    long long v = PyLong_AsLongLong(old);
    if (v == -1 && PyErr_Occurred()) return -1;
    PyObject *nv = PyLong_FromLongLong(v + delta);
    if (nv == NULL) return -1;
    PyList_SET_ITEM(list, i, nv);
    Py_DECREF(old);
    return 0;
}

/* d[key] as a list of n ints, created as [0]*n when missing (Stats.io's dicts) */
static PyObject *counter_list(PyObject *d, PyObject *key, Py_ssize_t n) {
    PyObject *l = PyDict_GetItemWithError(d, key); /* borrowed */
    if (l != NULL) {
        if (!PyList_Check(l) || PyList_GET_SIZE(l) < n) {
            PyErr_SetString(PyExc_TypeError, "stats counter is not a list of the expected size");
            return NULL;
        }
        return l;
    }
    if (PyErr_Occurred()) return NULL;
    l = PyList_New(n);
    if (l == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *z = PyLong_FromLong(0);
        if (z == NULL) { Py_DECREF(l); return NULL; }
        PyList_SET_ITEM(l, i, z);
    }
    int rc = PyDict_SetItem(d, key, l);
    Py_DECREF(l);
    return rc < 0 ? NULL : l; /* borrowed from d */
}

/* Stats.io(rec, write, n) */
static int stats_io(PyObject *drives_stats, PyObject *volumes, PyObject *drive_id, PyObject *volume_id,
                    int write, long long n) {
    PyObject *d = counter_list(drives_stats, drive_id, 4);
    if (d == NULL) return -1;
    PyObject *v = counter_list(volumes, volume_id, 2);
    if (v == NULL) return -1;
    if (write) {
        if (list_add(d, 1, n) < 0 || list_add(d, 3, 1) < 0 || list_add(v, 1, n) < 0) return -1;
    } else {
        if (list_add(d, 0, n) < 0 || list_add(d, 2, 1) < 0 || list_add(v, 0, n) < 0) return -1;
    }
    return 0;
}

/* Stats.observe(op, seconds): bucket counts (bisect_left over the bounds) and the sum */
static int stats_observe(PyObject *latency, PyObject *op, double seconds) {
    PyObject *h = PyDict_GetItemWithError(latency, op);
    if (h == NULL) {
        if (PyErr_Occurred()) return -1;
        PyObject *counts = PyList_New(n_buckets + 1);
        if (counts == NULL) return -1;
        for (Py_ssize_t i = 0; i <= n_buckets; i++) {
            PyObject *z = PyLong_FromLong(0);
            if (z == NULL) { Py_DECREF(counts); return -1; }
            PyList_SET_ITEM(counts, i, z);
        }
        PyObject *sum = Py_BuildValue("[d]", 0.0);
        if (sum == NULL) { Py_DECREF(counts); return -1; }
        h = PyTuple_Pack(2, counts, sum);
        Py_DECREF(counts);
        Py_DECREF(sum);
        if (h == NULL) return -1;
        int rc = PyDict_SetItem(latency, op, h);
        Py_DECREF(h);
        if (rc < 0) return -1;
    }
    if (!PyTuple_Check(h) || PyTuple_GET_SIZE(h) != 2) {
        PyErr_SetString(PyExc_TypeError, "latency histogram is not a (counts, [sum]) tuple");
        return -1;
    }
    PyObject *counts = PyTuple_GET_ITEM(h, 0), *sum = PyTuple_GET_ITEM(h, 1);
    if (!PyList_Check(counts) || PyList_GET_SIZE(counts) != n_buckets + 1 || !PyList_Check(sum) ||
        PyList_GET_SIZE(sum) < 1) {
        PyErr_SetString(PyExc_TypeError, "latency histogram has an unexpected shape");
        return -1;
    }
    Py_ssize_t i = 0;
    while (i < n_buckets && buckets[i] < seconds) i++;
    if (list_add(counts, i, 1) < 0) return -1;
    PyObject *old = PyList_GET_ITEM(sum, 0);
    double s = PyFloat_AsDouble(old);
    if (s == -1.0 && PyErr_Occurred()) return -1;
    PyObject *ns = PyFloat_FromDouble(s + seconds);
    if (ns == NULL) return -1;
    PyList_SET_ITEM(sum, 0, ns);
    Py_DECREF(old);
    return 0;
}

/* obj.name += delta */
static int attr_add(PyObject *obj, PyObject *name, long long delta) {
    if (delta == 0) return 0;
    long long v;
    if (attr_ll(obj, name, &v) < 0) return -1;
    PyObject *nv = PyLong_FromLongLong(v + delta);
    if (nv == NULL) return -1;
    int rc = PyObject_SetAttr(obj, name, nv);
    Py_DECREF(nv);
    return rc;
}

static void encode_completion(unsigned char *p, uint32_t tag, uint32_t length) {
    uint16_t magic = COMPLETION_MAGIC;
    uint64_t info = 0;
    uint32_t reserved = 0;
    memcpy(p, &magic, 2);
    p[2] = 0; /* status OK */
    p[3] = 0; /* flags: no digests on this path */
    memcpy(p + 4, &tag, 4);
    memcpy(p + 8, &length, 4);
    memcpy(p + 12, &reserved, 4);
    memcpy(p + 16, &info, 8);
}

static int full_pread(int fd, unsigned char *buf, size_t n, off_t off) {
    size_t got = 0;
    while (got < n) {
        ssize_t k = pread(fd, buf + got, n - got, off + (off_t)got);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (k == 0) { /* short read: the Python path reports it */
            errno = EIO;
            return -1;
        }
        got += (size_t)k;
    }
    return 0;
}

static int full_pwrite(int fd, const unsigned char *buf, size_t n, off_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t k = pwrite(fd, buf + done, n - done, off + (off_t)done);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (k == 0) return -1;
        done += (size_t)k;
    }
    return 0;
}

/* CRC32C (Castagnoli, reflected), for header digests in the framing check */
#define SUM_BLOCK_BYTES 4096u /* SUM_BLOCK below: one block's bytes */
static uint32_t crc_table[256];
static int crc_hw = 0; /* the CPU has SSE4.2's crc32 instruction (crc_init) */

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

static void shift_init(uint32_t t[4][256], size_t n);
static uint32_t shift_a[4][256], shift_c[4][256];
static void shifts_init(void) {
    shift_init(shift_a, 1360u);
    shift_init(shift_c, 1376u);
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t c, const unsigned char *p, size_t n) {
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = __builtin_ia32_crc32di(c64, v);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--) c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

static uint32_t crc32c(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
#if defined(__x86_64__)
    if (crc_hw) return crc32c_hw(c, p, n) ^ 0xFFFFFFFFu;
#endif
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* crc32c of exactly one 4 KiB block, three times as fast on x86-64: the crc32 instruction takes three
 * cycles but can start every cycle, so three independent streams over the block's thirds run at once
 * and are joined by linearity (a CRC register advanced over n zero bytes is a fixed GF(2)-linear map of
 * it: ``shift_*`` tables, built by crc_init; the technique of Intel's crc_pcl and Linux's crc32c-intel). */
#define THIRD_A 1360u /* 4096 = 1360 + 1360 + 1376, each a multiple of 8 */
#define THIRD_C 1376u
static uint32_t zeros_advance(uint32_t c, size_t n) { /* the register after n zero bytes (table path) */
    while (n--) c = crc_table[c & 0xFF] ^ (c >> 8);
    return c;
}

static void shift_init(uint32_t t[4][256], size_t n) {
    uint32_t bit[32];
    for (int i = 0; i < 32; i++) bit[i] = zeros_advance(1u << i, n);
    for (int k = 0; k < 4; k++)
        for (int v = 0; v < 256; v++) {
            uint32_t r = 0;
            for (int i = 0; i < 8; i++)
                if (v >> i & 1) r ^= bit[8 * k + i];
            t[k][v] = r;
        }
}

static inline uint32_t shifted(uint32_t t[4][256], uint32_t c) {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_block_hw(const unsigned char *p) {
    uint64_t a = 0xFFFFFFFFu, b = 0, c = 0;
    const unsigned char *pb = p + THIRD_A, *pc = p + 2 * THIRD_A;
    for (size_t i = 0; i < THIRD_A; i += 8) {
        uint64_t va, vb, vc;
        memcpy(&va, p + i, 8);
        memcpy(&vb, pb + i, 8);
        memcpy(&vc, pc + i, 8);
        a = __builtin_ia32_crc32di(a, va);
        b = __builtin_ia32_crc32di(b, vb);
        c = __builtin_ia32_crc32di(c, vc);
    }
    for (size_t i = THIRD_A; i < THIRD_C; i += 8) {
        uint64_t vc;
        memcpy(&vc, pc + i, 8);
        c = __builtin_ia32_crc32di(c, vc);
    }
    uint32_t ab = shifted(shift_a, (uint32_t)a) ^ (uint32_t)b; /* the register after the first two thirds */
    return (shifted(shift_c, ab) ^ (uint32_t)c) ^ 0xFFFFFFFFu;
}
#endif

static uint32_t crc32c_block(const unsigned char *p) {
#if defined(__x86_64__)
    if (crc_hw) return crc32c_block_hw(p);
#endif
    return crc32c(p, SUM_BLOCK_BYTES);
}

/* ---- Block sums of replicated extents (agents/checksums.py, which argues them; the same bytes) ----
 * sealed_pwrite writes ``n`` bytes at drive offset ``at`` and then the sums of every 4 KiB block they
 * touch into the drive's sums area at ``sums_at``. A block covered in part is read first and checked
 * against its stored sum: if that does not match, the stored sum is kept (the block stays flagged).
 * The caller holds the GIL throughout, so no other command touches these blocks in between.
 * 0, or -1 with errno set (the Python path then writes again and reports the drive's error). */
#define SUM_BLOCK 4096u
#define DATA_OFFSET (2ll * 1024 * 1024) /* agents/drive.py DATA_OFFSET */

static inline uint32_t seal(uint32_t c) { return c ? c : 0xFFFFFFFFu; }
static inline void st32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }

static int sealed_pwrite_locked(int fd, long long sums_at, off_t at, const unsigned char *p, size_t n) {
    if (at < DATA_OFFSET) { errno = EINVAL; return -1; }
    off_t end = at + (off_t)n;
    off_t first = at - at % SUM_BLOCK, last = (end - 1) - (end - 1) % SUM_BLOCK;
    off_t edges[2] = {first, last};
    unsigned char old[2][SUM_BLOCK];
    uint32_t keep[2] = {0, 0};
    int part[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        off_t b = edges[k];
        if (k == 1 && last == first) break;
        if (b >= at && b + (off_t)SUM_BLOCK <= end) continue; /* wholly overwritten */
        part[k] = 1;
        unsigned char raw[4];
        if (full_pread(fd, old[k], SUM_BLOCK, b) < 0) return -1;
        if (full_pread(fd, raw, 4, (off_t)(sums_at + (b - DATA_OFFSET) / SUM_BLOCK * 4)) < 0) return -1;
        uint32_t stored = ld32(raw);
        keep[k] = (stored && stored != seal(crc32c_block(old[k]))) ? stored : 0;
    }
    if (full_pwrite(fd, p, n, at) < 0) return -1;
    size_t nb = (size_t)((last - first) / SUM_BLOCK + 1);
    unsigned char small[256 * 4];
    unsigned char *sums = nb <= 256 ? small : malloc(nb * 4);
    if (sums == NULL) { errno = ENOMEM; return -1; }
    for (size_t i = 0; i < nb; i++) {
        off_t b = first + (off_t)i * SUM_BLOCK;
        int k = (b == first && part[0]) ? 0 : (b == last && part[1]) ? 1 : -1;
        uint32_t v;
        if (k >= 0) {
            if (keep[k]) {
                v = keep[k];
            } else {
                off_t s = b > at ? b : at, e = b + (off_t)SUM_BLOCK < end ? b + (off_t)SUM_BLOCK : end;
                memcpy(old[k] + (s - b), p + (s - at), (size_t)(e - s));
                v = seal(crc32c_block(old[k]));
            }
        } else {
            v = seal(crc32c_block(p + (b - at)));
        }
        st32(sums + i * 4, v);
    }
    int rc = full_pwrite(fd, sums, nb * 4, (off_t)(sums_at + (first - DATA_OFFSET) / SUM_BLOCK * 4));
    if (sums != small) {
        int saved = errno;
        free(sums);
        errno = saved;
    }
    return rc;
}

/* Two writes of one block (disjoint bytes of it: the writer never has overlapping writes in flight, but
 * two sub-block writes may share a block) must not interleave their read of the old block, their data
 * and their sum, or the later sum would describe bytes the block no longer holds. The compiled loop's
 * native threads write with the GIL held, but the Python path and the event loop's own compiled batch
 * release it around the system calls, as they did before sums existed; so the blocks at the edges of a
 * sealed write (the only ones another write can share) are held under striped locks for its duration.
 * No lock holder ever waits for the GIL, and the two stripes are taken in order: no deadlock. */
#define SUM_STRIPES 64
static pthread_mutex_t sum_stripes[SUM_STRIPES] = {[0 ... SUM_STRIPES - 1] = PTHREAD_MUTEX_INITIALIZER};

static inline unsigned stripe_of(int fd, off_t block_start) {
    return (unsigned)((((uint64_t)block_start / SUM_BLOCK) * 0x9E3779B97F4A7C15ull + (uint64_t)fd * 0xBF58476D1CE4E5B9ull) >> 58);
}

static int sealed_pwrite(int fd, long long sums_at, off_t at, const unsigned char *p, size_t n) {
    if (n == 0) return 0;
    if (at < DATA_OFFSET) { errno = EINVAL; return -1; }
    off_t end = at + (off_t)n;
    unsigned s1 = stripe_of(fd, at - at % SUM_BLOCK), s2 = stripe_of(fd, (end - 1) - (end - 1) % SUM_BLOCK);
    if (s1 > s2) { unsigned t = s1; s1 = s2; s2 = t; }
    pthread_mutex_lock(&sum_stripes[s1]);
    if (s2 != s1) pthread_mutex_lock(&sum_stripes[s2]);
    int rc = sealed_pwrite_locked(fd, sums_at, at, p, n);
    int saved = errno;
    if (s2 != s1) pthread_mutex_unlock(&sum_stripes[s2]);
    pthread_mutex_unlock(&sum_stripes[s1]);
    errno = saved;
    return rc;
}

/* The Python decoder parses a whole receive before anything in it runs, so a framing error anywhere
 * in it (bad magic, unknown flag bits, a length above MAX_IO, a header digest mismatch) means none of
 * its commands run: the connection is dropped. 1 if every complete header in [pos, end) is sound. */
static int framing_ok(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t *checked) {
    /* ``checked`` (optional): [pos, *checked) is already known sound (whole frames), so the scan starts
     * there; it is moved to the end of the last whole frame scanned */
    if (checked != NULL && *checked > pos && *checked <= end) pos = *checked;
    while (end - pos >= CMD_SIZE) {
        const unsigned char *h = buf + pos;
        unsigned op = h[2], flags = h[3];
        uint32_t length = ld32(h + 24);
        if (ld16(h) != COMMAND_MAGIC || (flags & ~KNOWN_FLAGS) || length > MAX_IO) return 0;
        Py_ssize_t frame = CMD_SIZE;
        if (flags & F_HDGST) {
            if (end - pos < CMD_SIZE + 4) break; /* the digest has not arrived: nothing to judge yet */
            if (ld32(h + CMD_SIZE) != crc32c(h, CMD_SIZE)) return 0;
            frame += 4;
        }
        if ((op == OP_WRITE || op == OP_AUTH) && length) frame += (Py_ssize_t)length + ((flags & F_DDGST) ? 4 : 0);
        if (frame > end - pos) break; /* (its header is sound; the rest has not arrived) */
        pos += frame;
    }
    if (checked != NULL) *checked = pos;
    return 1;
}

typedef struct {
    PyObject *extents, *drives, *caps, *stats, *stats_drives, *stats_volumes, *latency;
    PyObject *intent;    /* extent id -> current write-intent bitmap (agents/intent.py) */
    int check_caps;
    int writes_ok;       /* no migration copy or dirty tracking on the core */
    double serve_until;  /* monotonic */
    double wall_now;     /* time.time() for capability expiry, once per call */
    int threaded;        /* a native connection thread (see "Native connections"): keep the GIL across
                            each command's checks and I/O, so no control call runs in between */
    long long nread, nwritten, ncommands;
} Ctx;

static void ctx_clear(Ctx *c) {
    Py_CLEAR(c->intent);
    Py_CLEAR(c->latency);
    Py_CLEAR(c->stats_volumes);
    Py_CLEAR(c->stats_drives);
    Py_CLEAR(c->stats);
    Py_CLEAR(c->drives);
    Py_CLEAR(c->extents);
}

/* Read the core's state for one batch (the GIL is held from here to ctx_close): 0, or -1 with an
 * exception set (then ctx_clear). */
/* The core's flags a command's checks depend on besides its extent and capability (secrets, migration
 * copies and dirty tracking, the serve lease): read at the start of a batch and, in a native thread,
 * again before every command. (A native thread holds the GIL through a batch, but Python code can still
 * run inside it: a first-time stats entry is a container allocation, which may start a collection,
 * whose finalizers run bytecode, during which the GIL can pass to the event loop. Re-reading the flags
 * before each command, and making no container allocation between a command's checks and its I/O,
 * keeps every command's checks and I/O together.) 0, or -1 with an exception set. */
static int ctx_flags(Ctx *c, PyObject *core) {
    PyObject *secrets = NULL, *copies = NULL, *dirty = NULL, *su = NULL;
    int rc = -1;
    if ((secrets = PyObject_GetAttr(core, s_secrets)) == NULL) goto done;
    if ((c->check_caps = PyObject_IsTrue(secrets)) < 0) goto done;
    if ((copies = PyObject_GetAttr(core, s_copies)) == NULL || (dirty = PyObject_GetAttr(core, s_dirty)) == NULL)
        goto done;
    {
        int a = PyObject_IsTrue(copies), b = PyObject_IsTrue(dirty);
        if (a < 0 || b < 0) goto done;
        c->writes_ok = !a && !b;
    }
    if ((su = PyObject_GetAttr(core, s_serve_until)) == NULL) goto done;
    c->serve_until = PyFloat_AsDouble(su);
    if (c->serve_until == -1.0 && PyErr_Occurred()) goto done;
    c->wall_now = now_clock(CLOCK_REALTIME);
    rc = 0;
done:
    Py_XDECREF(secrets);
    Py_XDECREF(copies);
    Py_XDECREF(dirty);
    Py_XDECREF(su);
    return rc;
}

static int ctx_open(Ctx *c, PyObject *core, PyObject *caps, int threaded) {
    memset(c, 0, sizeof(*c));
    c->caps = caps;
    c->threaded = threaded;
    if ((c->extents = PyObject_GetAttr(core, s_extents)) == NULL) return -1;
    if ((c->drives = PyObject_GetAttr(core, s_drives)) == NULL) return -1;
    if ((c->stats = PyObject_GetAttr(core, s_stats)) == NULL) return -1;
    if ((c->stats_drives = PyObject_GetAttr(c->stats, s_drives_stats)) == NULL) return -1;
    if ((c->stats_volumes = PyObject_GetAttr(c->stats, s_volumes)) == NULL) return -1;
    if ((c->latency = PyObject_GetAttr(c->stats, s_latency)) == NULL) return -1;
    if ((c->intent = PyObject_GetAttr(core, s_intent)) == NULL) return -1;
    if (!PyDict_Check(c->extents) || !PyDict_Check(c->drives) || !PyDict_Check(c->stats_drives) ||
        !PyDict_Check(c->stats_volumes) || !PyDict_Check(c->latency) || !PyDict_Check(c->intent)) {
        PyErr_SetString(PyExc_TypeError, "the core's tables must be dicts");
        return -1;
    }
    return ctx_flags(c, core);
}

/* Add what the batch served to the core's counters and drop the references; -1 if that failed (an
 * exception already set is kept). */
static int ctx_close(Ctx *c) {
    int bad = 0;
    if (c->stats != NULL) { /* the counters of what was served, also when a later command raised */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        bad = attr_add(c->stats, s_commands, c->ncommands) < 0 || attr_add(c->stats, s_bytes_read, c->nread) < 0 ||
              attr_add(c->stats, s_bytes_written, c->nwritten) < 0;
        if (et != NULL) {
            if (bad) PyErr_Clear();
            PyErr_Restore(et, ev, tb);
        }
    }
    ctx_clear(c);
    return bad ? -1 : 0;
}

/* Where a command's bytes are, once every check of the Python path passed. */
typedef struct {
    int fd;
    off_t at;
    long long sums_at; /* a write to a replicated extent on a drive with a sums area: where it starts */
    PyObject *drive_id, *volume_id; /* owned */
} Located;

static void located_clear(Located *L) {
    Py_CLEAR(L->drive_id);
    Py_CLEAR(L->volume_id);
}

/* The checks of dataplane._authorize (the connection's capability for the extent's volume: expiry,
 * access, generation bound) and AgentCore.locate (extent held, generation fence, serve lease of a
 * replicated extent, range, a plain Drive present and not failed). 1: passed (``L`` filled);
 * 0: for the Python path (a refusal it words itself); -1: a Python error (bug or memory). */
static int locate(Ctx *c, const unsigned char *h, Located *L) {
    unsigned op = h[2];
    uint64_t extent_id = ld64(h + 8), offset = ld64(h + 16), generation = ld64(h + 40);
    uint32_t length = ld32(h + 24);
    int write = (op == OP_WRITE || op == OP_WRITE_REGION);
    memset(L, 0, sizeof(*L));

    PyObject *key = PyLong_FromUnsignedLongLong(extent_id);
    if (key == NULL) return -1;
    PyObject *rec = PyDict_GetItemWithError(c->extents, key); /* borrowed */
    Py_DECREF(key);
    if (rec == NULL) return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(rec);
    int result = 0;
    PyObject *drive = NULL;
    long long min_gen, replicas, rlength, drive_offset, fd;

    L->volume_id = PyObject_GetAttr(rec, s_volume_id);
    if (L->volume_id == NULL) goto error;
    if (c->check_caps) { /* dataplane._authorize */
        PyObject *cap = PyDict_GetItemWithError(c->caps, L->volume_id);
        if (cap == NULL) { if (PyErr_Occurred()) goto error; goto python; }
        long long expires, access;
        unsigned long long maxgen;
        if (attr_ll(cap, s_expires, &expires) < 0 || attr_ll(cap, s_access, &access) < 0 ||
            attr_ull(cap, s_max_generation, &maxgen) < 0)
            goto error;
        if (c->wall_now >= (double)expires || (write && access != ACCESS_WRITE) || generation > maxgen)
            goto python;
    }
    /* AgentCore.locate */
    if (attr_ll(rec, s_min_generation, &min_gen) < 0) goto error;
    if (min_gen < 0 || generation < (uint64_t)min_gen) goto python;
    if (attr_ll(rec, s_replicas, &replicas) < 0) goto error;
    if (replicas > 1 && now_clock(CLOCK_MONOTONIC) > c->serve_until) goto python;
    if (attr_ll(rec, s_length, &rlength) < 0) goto error;
    if (offset + (uint64_t)length > (uint64_t)rlength || offset + (uint64_t)length < offset) goto python;
    L->drive_id = PyObject_GetAttr(rec, s_drive_id);
    if (L->drive_id == NULL) goto error;
    drive = PyDict_GetItemWithError(c->drives, L->drive_id);
    if (drive == NULL) { if (PyErr_Occurred()) goto error; goto python; }
    Py_INCREF(drive);
    if ((PyObject *)Py_TYPE(drive) != drive_type) goto python;
    {
        PyObject *failed = PyObject_GetAttr(drive, s_failed);
        if (failed == NULL) goto error;
        int is_failed = PyObject_IsTrue(failed);
        Py_DECREF(failed);
        if (is_failed < 0) goto error;
        if (is_failed) goto python;
    }
    if (attr_ll(drive, s_fd, &fd) < 0 || attr_ll(rec, s_drive_offset, &drive_offset) < 0) goto error;
    if (fd < 0 || fd > INT32_MAX) goto python;
    if (write && replicas > 1) {
        long long sums_at;
        if (attr_ll(drive, s_sums_at, &sums_at) < 0) goto error;
        if (sums_at < 0) goto python;
        L->sums_at = sums_at;
        /* Write intent (agents/intent.py): mark the grains before the bytes are applied, in the same
         * GIL hold as the checks above and the I/O that follows. No bitmap yet: Python creates it. */
        PyObject *k2 = PyLong_FromUnsignedLongLong(extent_id);
        if (k2 == NULL) goto error;
        PyObject *bm = PyDict_GetItemWithError(c->intent, k2); /* borrowed */
        Py_DECREF(k2);
        if (bm == NULL) { if (PyErr_Occurred()) goto error; goto python; }
        if (!PyByteArray_Check(bm)) goto python;
        uint64_t g0 = offset / INTENT_GRAIN, g1 = length ? (offset + length - 1) / INTENT_GRAIN : g0;
        Py_ssize_t size = PyByteArray_GET_SIZE(bm);
        if (length == 0) goto marked;
        if ((uint64_t)size * 8u <= g1) goto python;
        {
            unsigned char *bits = (unsigned char *)PyByteArray_AS_STRING(bm);
            for (uint64_t g = g0; g <= g1; g++) bits[g >> 3] |= (unsigned char)(1u << (g & 7));
        }
    marked:;
    }
    L->fd = (int)fd;
    L->at = (off_t)(drive_offset + (long long)offset);
    result = 1;
    goto done;
python:
    result = 0;
    goto done;
error:
    result = -1;
done:
    if (result != 1) located_clear(L);
    Py_XDECREF(drive);
    Py_DECREF(rec);
    return result;
}

static PyObject *op_name_of(unsigned op) {
    return op == OP_READ ? s_read : op == OP_WRITE ? s_write : op == OP_READ_REGION ? s_read_region : s_write_region;
}

/* 1: served (completion appended); 0: for the Python path; -1: a Python error (bug or memory) */
static int serve_one(Ctx *c, const unsigned char *h, const unsigned char *payload, unsigned char *region,
                     PyObject *out, size_t *outbytes) {
    double t0 = now_clock(CLOCK_MONOTONIC);
    unsigned op = h[2], flags = h[3];
    uint32_t tag = ld32(h + 4);
    uint32_t length = ld32(h + 24);
    int write = (op == OP_WRITE || op == OP_WRITE_REGION);
    int in_region = (op == OP_READ_REGION || op == OP_WRITE_REGION); /* data through ``region``, not the socket */
    Located L;
    int result = locate(c, h, &L);
    if (result != 1) return result;
    PyObject *bytes = NULL;
    int fd = L.fd;
    off_t at = L.at;

    if (write && L.sums_at > 0) { /* data and their sums (agents/checksums.py) */
        const unsigned char *src = in_region ? region : payload;
        int rc;
        if (c->threaded) {
            rc = sealed_pwrite(fd, L.sums_at, at, src, length);
        } else {
            Py_BEGIN_ALLOW_THREADS
            rc = sealed_pwrite(fd, L.sums_at, at, src, length);
            if (rc == 0 && (flags & F_FUA)) rc = fdatasync(fd);
            Py_END_ALLOW_THREADS
        }
        if (rc < 0) goto python;
        bytes = PyBytes_FromStringAndSize(NULL, COMP_SIZE);
        if (bytes == NULL) goto error;
        encode_completion((unsigned char *)PyBytes_AS_STRING(bytes), tag, 0);
        c->nwritten += length;
        *outbytes += COMP_SIZE;
    } else if (in_region) {
        int rc;
        if (c->threaded) { /* (FUA never reaches here in a thread: see serve_core) */
            rc = write ? full_pwrite(fd, region, length, at) : full_pread(fd, region, length, at);
        } else {
            Py_BEGIN_ALLOW_THREADS
            rc = write ? full_pwrite(fd, region, length, at) : full_pread(fd, region, length, at);
            if (rc == 0 && write && (flags & F_FUA)) rc = fdatasync(fd);
            Py_END_ALLOW_THREADS
        }
        if (rc < 0) goto python;
        bytes = PyBytes_FromStringAndSize(NULL, COMP_SIZE);
        if (bytes == NULL) goto error;
        encode_completion((unsigned char *)PyBytes_AS_STRING(bytes), tag, 0);
        if (write) c->nwritten += length; else c->nread += length;
        *outbytes += COMP_SIZE;
    } else if (write) {
        int rc;
        if (c->threaded) {
            rc = full_pwrite(fd, payload, length, at);
        } else {
            Py_BEGIN_ALLOW_THREADS
            rc = full_pwrite(fd, payload, length, at);
            if (rc == 0 && (flags & F_FUA)) rc = fdatasync(fd);
            Py_END_ALLOW_THREADS
        }
        if (rc < 0) goto python; /* the Python path writes again and reports the drive's error */
        bytes = PyBytes_FromStringAndSize(NULL, COMP_SIZE);
        if (bytes == NULL) goto error;
        encode_completion((unsigned char *)PyBytes_AS_STRING(bytes), tag, 0);
        c->nwritten += length;
        *outbytes += COMP_SIZE;
    } else {
        bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)COMP_SIZE + length);
        if (bytes == NULL) goto error;
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(bytes);
        if (full_pread(fd, p + COMP_SIZE, length, at) < 0) goto python;
        encode_completion(p, tag, length);
        c->nread += length;
        *outbytes += COMP_SIZE + length;
    }
    if (PyList_Append(out, bytes) < 0) goto error;
    if (stats_io(c->stats_drives, c->stats_volumes, L.drive_id, L.volume_id, write, length) < 0) goto error;
    if (stats_observe(c->latency, op_name_of(op), now_clock(CLOCK_MONOTONIC) - t0) < 0) goto error;
    c->ncommands++;
    result = 1;
    goto done;
python:
    result = 0;
    goto done;
error:
    result = -1;
done:
    Py_XDECREF(bytes);
    located_clear(&L);
    return result;
}

/* The loop over the frames of [pos, end): serves the plain ones at the front, stops at the first frame
 * for Python (or an incomplete one) or when ``batch_bytes`` of replies are in ``out``. The GIL is held
 * throughout, so the table state read at the start stays valid for the whole call. *pos is moved past
 * what was served; returns STOP_NEED_PYTHON / STOP_FULL, or -1 with an exception set. In a native
 * thread (``threaded``), a FUA write goes to Python too (its fdatasync must not hold the GIL, and
 * releasing it would let a control call run between the write and its completion). */
static int serve_core(const unsigned char *buf, Py_ssize_t *pos_io, Py_ssize_t end, PyObject *core, PyObject *caps,
                      PyObject *regions, PyObject *out, Py_ssize_t small_read_max, Py_ssize_t batch_bytes,
                      int threaded, long long *served, Py_ssize_t *checked) {
    Py_ssize_t pos = *pos_io;
    Ctx c;
    size_t outbytes = 0;
    int stop = STOP_NEED_PYTHON, failed = 0;

    if (ctx_open(&c, core, caps, threaded) < 0) {
        ctx_clear(&c);
        return -1;
    }
    if (!framing_ok(buf, pos, end, checked)) goto finish; /* the Python decoder raises; nothing here runs */
    while (pos < end) {
        if (outbytes >= (size_t)batch_bytes) { stop = STOP_FULL; break; }
        if (end - pos < CMD_SIZE) break;
        if (threaded && pos > *pos_io && ctx_flags(&c, core) < 0) goto fail; /* (see ctx_flags) */
        const unsigned char *h = buf + pos;
        unsigned op = h[2], flags = h[3];
        uint32_t length = ld32(h + 24);
        if (ld16(h) != COMMAND_MAGIC || (flags & ~KNOWN_FLAGS) || length > MAX_IO) break; /* ProtocolError there */
        if (flags & (F_HDGST | F_DDGST) || length == 0) break;
        if (threaded && (flags & F_FUA)) break;
        Py_ssize_t frame = CMD_SIZE;
        const unsigned char *payload = NULL;
        Py_buffer rv;
        int have_region = 0;
        if (op == OP_READ) {
            if ((Py_ssize_t)length >= small_read_max) break;
        } else if (op == OP_WRITE) {
            if (!c.writes_ok) break;
            frame += length;
            if (end - pos < frame) break; /* the Python decoder takes the partial frame */
            payload = h + CMD_SIZE;
        } else if (op == OP_READ_REGION || op == OP_WRITE_REGION) {
            /* dataplane._region: a region registered on this connection, the range inside it */
            if (op == OP_WRITE_REGION && !c.writes_ok) break;
            uint64_t roff = ld64(h + 32);
            PyObject *rkey = PyLong_FromUnsignedLong(ld32(h + 28));
            if (rkey == NULL) goto fail;
            PyObject *region = PyDict_GetItemWithError(regions, rkey); /* borrowed */
            Py_DECREF(rkey);
            if (region == NULL) { if (PyErr_Occurred()) goto fail; break; }
            if (PyObject_GetBuffer(region, &rv, PyBUF_WRITABLE) < 0) { PyErr_Clear(); break; }
            have_region = 1;
            if (roff > (uint64_t)rv.len || (uint64_t)length > (uint64_t)rv.len - roff) {
                PyBuffer_Release(&rv);
                break;
            }
        } else {
            break;
        }
        int r = serve_one(&c, h, payload, have_region ? (unsigned char *)rv.buf + ld64(h + 32) : NULL, out,
                          &outbytes);
        if (have_region) PyBuffer_Release(&rv);
        if (r < 0) goto fail;
        if (r == 0) break;
        pos += frame;
    }
    goto finish;
fail:
    failed = 1;
finish:
    if (served != NULL) *served += c.ncommands;
    if (ctx_close(&c) < 0) failed = 1;
    *pos_io = pos;
    return failed ? -1 : stop;
}

static PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "serve(scratch, pos, end, core, caps, regions, out, small_read_max, batch_bytes)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t small_read_max = PyLong_AsSsize_t(args[7]), batch_bytes = PyLong_AsSsize_t(args[8]);
    if (PyErr_Occurred()) return NULL;
    PyObject *core = args[3], *caps = args[4], *regions = args[5], *out = args[6];
    if (!PyDict_Check(caps) || !PyDict_Check(regions) || !PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "caps and regions must be dicts and out a list");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (pos < 0 || end < pos || end > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos/end outside the scratch buffer");
        return NULL;
    }
    int stop = serve_core((const unsigned char *)view.buf, &pos, end, core, caps, regions, out, small_read_max,
                          batch_bytes, 0, NULL, NULL);
    PyBuffer_Release(&view);
    if (stop < 0) return NULL;
    return Py_BuildValue("(ni)", pos, stop);
}

/* ====================================================================== native connections
 *
 * Conn(fd, core, caps, regions, on_event, small_read_max, batch_bytes): one data-plane connection
 * served by a thread of its own, off the event loop (agents/dataplane.py, "Native connections", says
 * when and why). The thread owns the socket in both directions:
 *
 *   - it receives into a buffer of its own (grown to the frame at its front, at most one MAX_IO frame;
 *     memory is committed only as bytes arrive), and sends with blocking sendmsg, so a peer that does
 *     not read its replies stops the thread in send and the commands it sends wait in the kernel;
 *   - each time the buffer holds a complete frame it takes the GIL and runs serve_core over
 *     [pos, end) (threaded: the GIL is kept through the batch, each command checked against the
 *     tables and flags read afresh right before its pread/pwrite, so a fence, a release or a
 *     capability change made by Python can never fall between the two; see ctx_flags), then releases
 *     the GIL and sends the replies (a large batch of replies is released before the thread waits for
 *     the peer again);
 *   - a plain READ of small_read_max bytes or more (no digest) is sent in steps of COPY_STEP bytes from a
 *     buffer of the connection's: before each step, with the GIL held, the command is checked again
 *     exactly as serve_one checks it and the step is read with pread under that same GIL hold; the
 *     send (blocking) runs without the GIL. A check that fails before the completion header went out
 *     hands the command to Python (which words the refusal); after it, the connection is closed (the
 *     peer can only learn of it that way). Never sendfile: it queues references to page-cache pages,
 *     whose bytes are copied only when the peer reads them, so bytes written after the check (after
 *     the extent was released and its space given to another volume, say) could reach this peer;
 *   - every other complete frame (another opcode, digests, FUA, any refusal) is handed to Python with
 *     the complete frames behind it (up to HANDOFF_BUDGET bytes of frames and read lengths):
 *     on_event(EV_FRAMES, bytes) (or EV_BAD_FRAMING when framing_ok failed: Python drops the
 *     connection) and the thread waits, without the GIL, until Python calls answer(frames, close),
 *     sends those frames, and goes on (or closes). Execution stays in order: nothing behind a handed
 *     frame runs before Python has answered it;
 *   - post(frames) queues completions Python finishes later (a FLUSH waits for fdatasync on the drives'
 *     worker threads while the connection goes on, as on the Python path), announced by expect() before
 *     the answer they follow; the thread sends them when it is woken through an eventfd or after its
 *     next batch, never in the middle of another frame. It waits in one blocking recv while no post is
 *     announced or queued, and for the socket and the eventfd together (poll) otherwise;
 *   - when the peer closes, the socket fails or stop() is called, the thread shuts the socket down,
 *     calls on_event(EV_ENDED, reason) (not after stop()) and ends. The descriptor is closed by stop()
 *     after the thread ended, or when the object goes away: never while the thread may still use it.
 *
 * on_event runs on the thread (with the GIL): it must only hand the event to the event loop
 * (call_soon_threadsafe). An exception from it ends the connection.
 */

#define RECV_INITIAL (256 * 1024)
#define RECV_KEEP (1024 * 1024)
#define HANDOFF_BUDGET (1024 * 1024)
#define EV_FRAMES 1
#define EV_ENDED 2
#define EV_BAD_FRAMING 3

typedef struct {
    PyObject_HEAD
    int fd;
    PyObject *core, *caps, *regions, *on_event;
    Py_ssize_t small_read_max, batch_bytes;
    pthread_t thread;
    int started, joined, sync_init;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stopping;  /* under mu */
    int waiting;   /* frames handed to Python and not answered (under mu) */
    int answered;  /* under mu */
    PyObject *reply; /* answer()'s frames (set and taken with the GIL held) */
    int reply_close;
    int efd;           /* eventfd: post() wakes the thread with it */
    PyObject *posted;  /* post()'s frames not yet sent (a list; with the GIL held) */
    int n_posted;      /* under mu: post() calls not yet taken by the thread */
    int expected;      /* under mu: posts announced by expect() and not yet made */
    unsigned char *buf;
    size_t cap, pos, end;
    size_t checked;      /* [pos, checked) holds whole frames whose framing is known sound */
    unsigned char *sbuf; /* large_read's buffer (COMP_SIZE + COPY_STEP bytes, made on first use) */
    PyObject *sent;      /* the last batch's replies, sent: released at the next GIL hold */
    size_t sent_bytes;   /* their size (a large one is released before the thread waits for the peer) */
    char why_buf[160];   /* the thread's reason for ending, when it is a system error's text */
    /* counters, written by the thread with the GIL held */
    long long batches, served, handoffs, handed_bytes, large_reads;
} Conn;

static PyTypeObject ConnType;

static int conn_stopping(Conn *c) {
    pthread_mutex_lock(&c->mu);
    int s = c->stopping;
    pthread_mutex_unlock(&c->mu);
    return s;
}

/* a system error's text, in the connection's own buffer (strerror is not thread-safe) */
static const char *conn_err(Conn *c, int err) {
    return strerror_r(err, c->why_buf, sizeof(c->why_buf));
}

/* 1 if the header at h is well framed (the checks that make the Python decoder raise otherwise) */
static int header_sound(const unsigned char *h) {
    return ld16(h) == COMMAND_MAGIC && !(h[3] & ~KNOWN_FLAGS) && ld32(h + 24) <= MAX_IO;
}

/* the whole frame's size for a sound header (header, header digest, payload, data digest) */
static size_t frame_size(const unsigned char *h) {
    unsigned op = h[2], flags = h[3];
    uint32_t length = ld32(h + 24);
    size_t f = CMD_SIZE + ((flags & F_HDGST) ? 4 : 0);
    if ((op == OP_WRITE || op == OP_AUTH) && length) f += length + ((flags & F_DDGST) ? 4 : 0);
    return f;
}

/* bytes the frame at the buffer's front needs in all (a header that is not sound counts as complete:
 * the serving step finds the framing error and hands it to Python) */
static size_t front_need(Conn *c) {
    size_t avail = c->end - c->pos;
    if (avail < CMD_SIZE) return CMD_SIZE;
    const unsigned char *h = c->buf + c->pos;
    if (!header_sound(h)) return CMD_SIZE;
    return frame_size(h);
}

/* room to receive the rest of a frame of ``need`` bytes from pos: 0, or -1 (out of memory) */
static int ensure_room(Conn *c, size_t need) {
    if (c->pos == c->end) {
        c->pos = c->end = c->checked = 0;
        if (c->cap > RECV_KEEP) { /* a large frame went through: give its memory back */
            unsigned char *nb = malloc(RECV_INITIAL);
            if (nb == NULL) return -1;
            free(c->buf);
            c->buf = nb;
            c->cap = RECV_INITIAL;
        }
    }
    if (c->cap - c->pos >= need && c->end < c->cap) return 0;
    if (c->pos > 0) {
        memmove(c->buf, c->buf + c->pos, c->end - c->pos);
        c->end -= c->pos;
        c->checked = c->checked > c->pos ? c->checked - c->pos : 0;
        c->pos = 0;
    }
    if (c->cap >= need && c->end < c->cap) return 0;
    size_t ncap = c->cap;
    while (ncap < need || ncap <= c->end) ncap *= 2;
    /* (malloc maps large blocks lazily: pages are committed as the bytes arrive) */
    unsigned char *nb = realloc(c->buf, ncap);
    if (nb == NULL) return -1;
    c->buf = nb;
    c->cap = ncap;
    return 0;
}

/* send all of iov[0..cnt) with blocking sendmsg; 0, or an errno */
static int send_all(int fd, struct iovec *v, int left) {
    while (left > 0) {
        struct msghdr m;
        memset(&m, 0, sizeof(m));
        m.msg_iov = v;
        m.msg_iovlen = (size_t)left;
        ssize_t k = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        size_t done = (size_t)k;
        while (left > 0 && done >= v->iov_len) {
            done -= v->iov_len;
            v++;
            left--;
        }
        if (left > 0) {
            v->iov_base = (char *)v->iov_base + done;
            v->iov_len -= done;
        }
    }
    return 0;
}

/* send every bytes object of ``frames`` (a list the caller owns and shares with nobody, so it is read
 * without the GIL); 0, or an errno */
static int send_frames(int fd, PyObject *frames, size_t *total) {
    Py_ssize_t n = PyList_GET_SIZE(frames), i = 0;
    struct iovec iov[64];
    while (i < n) {
        int cnt = 0;
        while (i + cnt < n && cnt < 64) {
            PyObject *b = PyList_GET_ITEM(frames, i + cnt);
            iov[cnt].iov_base = PyBytes_AS_STRING(b);
            iov[cnt].iov_len = (size_t)PyBytes_GET_SIZE(b);
            if (total != NULL) *total += iov[cnt].iov_len;
            cnt++;
        }
        i += cnt;
        int err = send_all(fd, iov, cnt);
        if (err) return err;
    }
    return 0;
}

/* send what post() queued; 0, or an errno. Called without the GIL. */
static int send_posted(Conn *c, PyThreadState *ts) {
    pthread_mutex_lock(&c->mu);
    int n = c->n_posted;
    c->n_posted = 0;
    pthread_mutex_unlock(&c->mu);
    if (!n) return 0;
    PyEval_RestoreThread(ts);
    PyObject *frames = c->posted;
    c->posted = PyList_New(0);
    if (c->posted == NULL) { /* no memory: put them back and let the caller end the connection */
        c->posted = frames;
        PyErr_Clear();
        PyEval_SaveThread();
        return ENOMEM;
    }
    PyEval_SaveThread();
    int err = send_frames(c->fd, frames, NULL);
    PyEval_RestoreThread(ts);
    Py_DECREF(frames);
    PyEval_SaveThread();
    return err;
}

/* The end of the frames handed to Python from pos: every complete frame, up to HANDOFF_BUDGET bytes of
 * frames and read lengths (at least one frame). The frame at pos is complete and framing_ok passed. */
static size_t handoff_cut(Conn *c) {
    size_t cut = c->pos, budget = 0;
    while (cut < c->end && budget < HANDOFF_BUDGET) {
        if (c->end - cut < CMD_SIZE) break;
        const unsigned char *h = c->buf + cut;
        if (!header_sound(h)) break;
        size_t f = frame_size(h);
        if (c->end - cut < f) break;
        budget += f + ((h[2] == OP_READ) ? ld32(h + 24) : 0);
        cut += f;
    }
    return cut;
}

/* A plain READ of small_read_max bytes or more (see the header): in steps of COPY_STEP bytes, each
 * checked again and read with pread under one GIL hold, then sent (blocking, without the GIL) from the
 * connection's own buffer. 0 served; 1 for Python (nothing sent yet); -1 end the connection (*why).
 * Called without the GIL. */
#define COPY_STEP (1024 * 1024)
static int large_read(Conn *c, PyThreadState *ts, const unsigned char *h, const char **why) {
    uint32_t tag = ld32(h + 4), n = ld32(h + 24);
    size_t done = 0;
    double t0 = now_clock(CLOCK_MONOTONIC);
    if (c->sbuf == NULL && (c->sbuf = malloc(COMP_SIZE + COPY_STEP)) == NULL) {
        *why = "out of memory";
        return -1;
    }
    while (done < n) {
        size_t step = n - done < COPY_STEP ? n - done : COPY_STEP;
        size_t head = done == 0 ? COMP_SIZE : 0;
        PyEval_RestoreThread(ts);
        if (conn_stopping(c)) {
            PyEval_SaveThread();
            *why = "stopped";
            return -1;
        }
        Ctx cx;
        Located L;
        int r = -1;
        if (ctx_open(&cx, c->core, c->caps, 1) == 0) r = locate(&cx, h, &L);
        if (r == 1 && full_pread(L.fd, c->sbuf + head, step, L.at + (off_t)done) < 0) {
            located_clear(&L);
            r = 0;
        }
        if (r != 1) {
            ctx_close(&cx);
            PyErr_Clear();
            PyEval_SaveThread();
            if (done == 0) return 1;
            *why = "a read failed its checks after its completion was sent";
            return -1;
        }
        if (head) encode_completion(c->sbuf, tag, n);
        if (done + step == n) {
            cx.nread += n;
            cx.ncommands++;
            if (stats_io(cx.stats_drives, cx.stats_volumes, L.drive_id, L.volume_id, 0, n) < 0 ||
                stats_observe(cx.latency, s_read, now_clock(CLOCK_MONOTONIC) - t0) < 0)
                PyErr_Clear();
            c->large_reads++;
        }
        located_clear(&L);
        if (ctx_close(&cx) < 0) PyErr_Clear();
        PyEval_SaveThread();
        struct iovec v = {c->sbuf, head + step};
        int err = send_all(c->fd, &v, 1);
        if (err) {
            *why = conn_err(c, err);
            return -1;
        }
        done += step;
    }
    return 0;
}

/* Hand [pos, cut) to Python and wait for its answer; then send it. 0 go on; -1 end (*why). Called
 * without the GIL. */
static int handoff(Conn *c, PyThreadState *ts, size_t cut, int kind, const char **why) {
    pthread_mutex_lock(&c->mu);
    c->waiting = 1; /* before Python can see the frames: its answer may come at once */
    c->answered = 0;
    pthread_mutex_unlock(&c->mu);
    PyEval_RestoreThread(ts);
    PyObject *data = PyBytes_FromStringAndSize((const char *)c->buf + c->pos, (Py_ssize_t)(cut - c->pos));
    PyObject *r = data == NULL ? NULL : PyObject_CallFunction(c->on_event, "iO", kind, data);
    Py_XDECREF(data);
    if (r == NULL) {
        PyErr_Clear(); /* no event loop to hand it to (it closed): nobody can answer */
        PyEval_SaveThread();
        *why = "the event loop is gone";
        return -1;
    }
    Py_DECREF(r);
    c->handoffs++;
    c->handed_bytes += (long long)(cut - c->pos);
    PyEval_SaveThread();
    pthread_mutex_lock(&c->mu);
    while (!c->answered && !c->stopping) pthread_cond_wait(&c->cv, &c->mu);
    int stopped = !c->answered;
    c->waiting = 0;
    pthread_mutex_unlock(&c->mu);
    if (stopped) {
        *why = "stopped";
        return -1;
    }
    PyEval_RestoreThread(ts);
    PyObject *reply = c->reply;
    c->reply = NULL;
    int close_after = c->reply_close;
    PyEval_SaveThread();
    int err = reply != NULL ? send_frames(c->fd, reply, NULL) : 0;
    PyEval_RestoreThread(ts);
    Py_XDECREF(reply);
    PyEval_SaveThread();
    if (err) {
        *why = conn_err(c, err);
        return -1;
    }
    c->pos = cut;
    if (close_after || kind == EV_BAD_FRAMING) {
        *why = "";
        return -1;
    }
    return 0;
}

static void *conn_main(void *arg) {
    Conn *c = (Conn *)arg;
    PyGILState_STATE g = PyGILState_Ensure();
    PyThreadState *ts = PyEval_SaveThread(); /* this thread's state, kept for every batch */
    const char *why = "";
    char whybuf[160];
    for (;;) {
        size_t need = front_need(c);
        if (c->end - c->pos < need) { /* receive */
            if (ensure_room(c, need) < 0) {
                why = "out of memory";
                break;
            }
            /* no post() can come (none announced, none queued): one blocking recv; else recv without
             * waiting, then poll for the socket or the eventfd */
            pthread_mutex_lock(&c->mu);
            int may_post = c->expected > 0 || c->n_posted > 0;
            pthread_mutex_unlock(&c->mu);
            if (c->sent != NULL && c->sent_bytes > 64 * 1024) { /* not held while the peer thinks */
                PyEval_RestoreThread(ts);
                Py_CLEAR(c->sent);
                PyEval_SaveThread();
            }
            ssize_t k = recv(c->fd, c->buf + c->end, c->cap - c->end, may_post ? MSG_DONTWAIT : 0);
            if (k == 0) {
                why = c->end > c->pos ? "closed in the middle of a command" : "";
                break;
            }
            if (k < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) { /* nothing yet: wait for it or for post() */
                    struct pollfd p[2] = {{c->fd, POLLIN, 0}, {c->efd, POLLIN, 0}};
                    if (poll(p, 2, -1) < 0 && errno != EINTR) {
                        why = conn_err(c, errno);
                        break;
                    }
                    if (p[1].revents & POLLIN) {
                        uint64_t v;
                        if (read(c->efd, &v, sizeof(v)) < 0 && errno != EAGAIN) {
                            why = conn_err(c, errno);
                            break;
                        }
                        int err = send_posted(c, ts);
                        if (err) {
                            why = conn_err(c, err);
                            break;
                        }
                    }
                    if (conn_stopping(c)) {
                        why = "stopped";
                        break;
                    }
                    continue;
                }
                why = conn_stopping(c) ? "stopped" : conn_err(c, errno);
                break;
            }
            c->end += (size_t)k;
            continue;
        }
        /* a complete frame at pos: serve what can be served here */
        PyEval_RestoreThread(ts);
        if (conn_stopping(c)) {
            PyEval_SaveThread();
            why = "stopped";
            break;
        }
        Py_CLEAR(c->sent);
        PyObject *out = PyList_New(0);
        Py_ssize_t pos = (Py_ssize_t)c->pos, checked = (Py_ssize_t)c->checked;
        int stop = out == NULL ? -1 : serve_core(c->buf, &pos, (Py_ssize_t)c->end, c->core, c->caps, c->regions,
                                                 out, c->small_read_max, c->batch_bytes, 1, &c->served, &checked);
        if (stop < 0) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyObject *text = ev != NULL ? PyObject_Repr(ev) : NULL;
            const char *utf8 = text != NULL && PyUnicode_Check(text) ? PyUnicode_AsUTF8(text) : NULL;
            snprintf(whybuf, sizeof(whybuf), "internal error %s", utf8 != NULL ? utf8 : "(unknown)");
            PyErr_Clear();
            Py_XDECREF(text);
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
            Py_XDECREF(out);
            PyEval_SaveThread();
            why = whybuf;
            break;
        }
        c->batches++;
        c->pos = (size_t)pos;
        int kind = 0, large = 0;
        size_t cut = c->pos;
        if (stop == STOP_NEED_PYTHON && c->pos < c->end && front_need(c) <= c->end - c->pos) {
            const unsigned char *h = c->buf + c->pos;
            if (!framing_ok(c->buf, (Py_ssize_t)c->pos, (Py_ssize_t)c->end, &checked)) {
                kind = EV_BAD_FRAMING;
                cut = c->end;
            } else if (h[2] == OP_READ && !(h[3] & (F_HDGST | F_DDGST)) && ld32(h + 24) >= c->small_read_max) {
                large = 1;
            } else {
                kind = EV_FRAMES;
                cut = handoff_cut(c);
            }
        }
        c->checked = (size_t)checked > c->pos ? (size_t)checked : c->pos;
        PyEval_SaveThread();
        size_t out_bytes = 0;
        int err = send_frames(c->fd, out, &out_bytes);
        c->sent = out; /* (no GIL needed to keep a reference; it is dropped at the next GIL hold) */
        c->sent_bytes = out_bytes;
        if (!err) err = send_posted(c, ts);
        if (err) {
            why = conn_err(c, err);
            break;
        }
        if (large) {
            int r = large_read(c, ts, c->buf + c->pos, &why);
            if (r < 0) break;
            if (r == 0) {
                c->pos += CMD_SIZE;
                continue;
            }
            kind = EV_FRAMES; /* the checks refused it: Python words the refusal */
            cut = handoff_cut(c);
        }
        if (kind && handoff(c, ts, cut, kind, &why) < 0) break;
    }
    shutdown(c->fd, SHUT_RDWR); /* the peer sees the end now; the descriptor is closed by stop() */
    PyEval_RestoreThread(ts);
    Py_CLEAR(c->sent);
    if (!conn_stopping(c)) {
        PyObject *text = PyUnicode_DecodeUTF8(why, (Py_ssize_t)strlen(why), "replace");
        PyObject *r = text == NULL ? NULL : PyObject_CallFunction(c->on_event, "iO", EV_ENDED, text);
        if (r == NULL) PyErr_Clear();
        Py_XDECREF(r);
        Py_XDECREF(text);
    }
    /* the thread is done with them; on_event (a bound method of the Python side, which holds this
     * object) would otherwise keep a reference cycle that no collector sees */
    Py_CLEAR(c->on_event);
    Py_CLEAR(c->core);
    Py_CLEAR(c->caps);
    Py_CLEAR(c->regions);
    free(c->buf);
    c->buf = NULL;
    free(c->sbuf);
    c->sbuf = NULL;
    c->cap = c->pos = c->end = 0;
    Py_DECREF((PyObject *)c); /* the thread's reference */
    PyGILState_Release(g);
    return NULL;
}

static PyObject *Conn_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    int fd;
    PyObject *core, *caps, *regions, *on_event;
    Py_ssize_t small_read_max, batch_bytes;
    if (!PyArg_ParseTuple(args, "iOO!O!Onn", &fd, &core, &PyDict_Type, &caps, &PyDict_Type, &regions, &on_event,
                          &small_read_max, &batch_bytes))
        return NULL;
    if (fd < 0 || small_read_max < 1 || batch_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "Conn: bad descriptor or sizes");
        return NULL;
    }
    Conn *c = (Conn *)type->tp_alloc(type, 0);
    if (c == NULL) return NULL;
    c->fd = -1;
    c->efd = -1;
    if (pthread_mutex_init(&c->mu, NULL) != 0) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    if (pthread_cond_init(&c->cv, NULL) != 0) {
        pthread_mutex_destroy(&c->mu);
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    c->sync_init = 1;
    c->buf = malloc(RECV_INITIAL);
    if (c->buf == NULL) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    c->cap = RECV_INITIAL;
    c->efd = -1;
    c->posted = PyList_New(0);
    if (c->posted == NULL) {
        Py_DECREF(c);
        return NULL;
    }
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->efd < 0) {
        Py_DECREF(c);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    c->fd = fd; /* owned from here on */
    Py_INCREF(core); c->core = core;
    Py_INCREF(caps); c->caps = caps;
    Py_INCREF(regions); c->regions = regions;
    Py_INCREF(on_event); c->on_event = on_event;
    c->small_read_max = small_read_max;
    c->batch_bytes = batch_bytes;
    return (PyObject *)c;
}

static PyObject *Conn_start(Conn *c, PyObject *unused) {
    if (c->started) {
        PyErr_SetString(PyExc_RuntimeError, "already started");
        return NULL;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 2 * 1024 * 1024); /* (Python code can run here: finalizers, repr) */
    Py_INCREF(c); /* the thread's reference */
    int rc = pthread_create(&c->thread, &attr, conn_main, c);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        Py_DECREF(c);
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    c->started = 1;
    Py_RETURN_NONE;
}

/* answer(frames: list[bytes], close: bool) -> bool: Python's answer to the frames it was handed */
static PyObject *Conn_answer(Conn *c, PyObject *args) {
    PyObject *frames;
    int close_after;
    if (!PyArg_ParseTuple(args, "O!p", &PyList_Type, &frames, &close_after)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(frames);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(PyList_GET_ITEM(frames, i))) {
            PyErr_SetString(PyExc_TypeError, "answer: frames must be bytes");
            return NULL;
        }
    }
    PyObject *copy = PyList_GetSlice(frames, 0, n); /* ours alone: the thread reads it without the GIL */
    if (copy == NULL) return NULL;
    pthread_mutex_lock(&c->mu);
    if (!c->waiting || c->answered) {
        pthread_mutex_unlock(&c->mu);
        Py_DECREF(copy);
        Py_RETURN_FALSE;
    }
    Py_XSETREF(c->reply, copy);
    c->reply_close = close_after;
    c->answered = 1;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    Py_RETURN_TRUE;
}

/* expect(): a post() will follow (called before answer() returns the frames it belongs to): until it
 * comes, the thread waits for the socket and the eventfd together instead of in a blocking recv */
static PyObject *Conn_expect(Conn *c, PyObject *unused) {
    pthread_mutex_lock(&c->mu);
    c->expected++;
    pthread_mutex_unlock(&c->mu);
    Py_RETURN_NONE;
}

/* post(frames: list[bytes]): completions to send when the thread next can (see the header) */
static PyObject *Conn_post(Conn *c, PyObject *args) {
    PyObject *frames;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &frames)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(frames);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(PyList_GET_ITEM(frames, i))) {
            PyErr_SetString(PyExc_TypeError, "post: frames must be bytes");
            return NULL;
        }
    }
    if (c->posted == NULL || c->efd < 0) Py_RETURN_FALSE;
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyList_Append(c->posted, PyList_GET_ITEM(frames, i)) < 0) return NULL;
    pthread_mutex_lock(&c->mu);
    c->n_posted++;
    if (c->expected > 0) c->expected--;
    int stopping = c->stopping;
    pthread_mutex_unlock(&c->mu);
    if (!stopping) {
        uint64_t one = 1;
        if (write(c->efd, &one, sizeof(one)) < 0 && errno != EAGAIN) return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_TRUE;
}

/* stop(): end the thread (the peer's socket is shut down) and wait for it; idempotent */
static PyObject *Conn_stop(Conn *c, PyObject *unused) {
    pthread_mutex_lock(&c->mu);
    c->stopping = 1;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (c->fd >= 0) shutdown(c->fd, SHUT_RDWR);
    if (c->started && !c->joined && !pthread_equal(pthread_self(), c->thread)) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(c->thread, NULL);
        Py_END_ALLOW_THREADS
        c->joined = 1;
    }
    if (c->joined || !c->started) {
        Py_CLEAR(c->on_event); /* (see the end of conn_main) */
        Py_CLEAR(c->core);
        Py_CLEAR(c->caps);
        Py_CLEAR(c->regions);
        if (c->fd >= 0) {
            close(c->fd);
            c->fd = -1;
        }
        if (c->efd >= 0) {
            close(c->efd);
            c->efd = -1;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *Conn_stats(Conn *c, PyObject *unused) {
    return Py_BuildValue("{sLsLsLsLsL}", "batches", c->batches, "served", c->served, "handoffs", c->handoffs,
                         "handed_bytes", c->handed_bytes, "large_reads", c->large_reads);
}

static void Conn_dealloc(Conn *c) {
    /* the thread holds a reference while it runs: here it has ended, or is this thread (its last step) */
    if (c->started && !c->joined) pthread_detach(c->thread);
    if (c->fd >= 0) close(c->fd);
    if (c->efd >= 0) close(c->efd);
    free(c->buf);
    free(c->sbuf);
    Py_XDECREF(c->sent);
    Py_XDECREF(c->reply);
    Py_XDECREF(c->posted);
    Py_XDECREF(c->core);
    Py_XDECREF(c->caps);
    Py_XDECREF(c->regions);
    Py_XDECREF(c->on_event);
    if (c->sync_init) {
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->cv);
    }
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Conn_methods[] = {
    {"start", (PyCFunction)Conn_start, METH_NOARGS, "start the connection's thread"},
    {"answer", (PyCFunction)Conn_answer, METH_VARARGS,
     "answer(frames, close) -> bool: the completions of the frames handed to Python (False: none wait)"},
    {"stop", (PyCFunction)Conn_stop, METH_NOARGS, "end the thread and wait for it (idempotent)"},
    {"post", (PyCFunction)Conn_post, METH_VARARGS, "post(frames): completions to send when the thread next can"},
    {"expect", (PyCFunction)Conn_expect, METH_NOARGS, "expect(): announce a post() (before the answer it follows)"},
    {"stats", (PyCFunction)Conn_stats, METH_NOARGS, "what the thread did: batches, served, handoffs, ..."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nvpool.agents._cserve.Conn",
    .tp_basicsize = sizeof(Conn),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A data-plane connection served by a native thread (see the module's header).",
    .tp_new = Conn_new,
    .tp_dealloc = (destructor)Conn_dealloc,
    .tp_methods = Conn_methods,
};

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *dtype, *bounds;
    if (!PyArg_ParseTuple(args, "OO", &dtype, &bounds)) return NULL;
    if (!PyType_Check(dtype)) {
        PyErr_SetString(PyExc_TypeError, "configure(Drive, latency_buckets): Drive must be a class");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(bounds, "latency_buckets must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_BUCKETS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many latency buckets");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double b = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (b == -1.0 && PyErr_Occurred()) { Py_DECREF(seq); return NULL; }
        buckets[i] = b;
    }
    Py_DECREF(seq);
    n_buckets = n;
    Py_INCREF(dtype);
    Py_XSETREF(drive_type, dtype);
    Py_RETURN_NONE;
}

/* sealed_pwrite(fd, sums_at, offset, buffer): the Python path's sealed write (agents/drive.py), without
 * the GIL (the edge blocks' stripe locks order it with every other sealed write); raises OSError. */
static PyObject *py_sealed_pwrite(PyObject *self, PyObject *args) {
    int fd;
    long long sums_at, offset;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "iLLy*", &fd, &sums_at, &offset, &view)) return NULL;
    int rc;
    if (sums_at > DATA_OFFSET && offset >= DATA_OFFSET) {
        Py_BEGIN_ALLOW_THREADS
        rc = sealed_pwrite(fd, sums_at, (off_t)offset, (const unsigned char *)view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        errno = EINVAL;
        rc = -1;
    }
    PyBuffer_Release(&view);
    if (rc < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* crc32c(buffer) -> int (hardware where the CPU has it; for tests and the scrub) */
static PyObject *py_crc32c(PyObject *self, PyObject *args) {
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view)) return NULL;
    uint32_t c = crc32c((const unsigned char *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

/* crc32c_block(buffer of 4096 bytes) -> int (the sealed write's block checksum; for tests) */
static PyObject *py_crc32c_block(PyObject *self, PyObject *args) {
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view)) return NULL;
    if (view.len != SUM_BLOCK_BYTES) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "a block is 4096 bytes");
        return NULL;
    }
    uint32_t c = crc32c_block((const unsigned char *)view.buf);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

static PyMethodDef methods[] = {
    {"crc32c_block", py_crc32c_block, METH_VARARGS, "CRC-32C of one 4 KiB block."},
    {"sealed_pwrite", py_sealed_pwrite, METH_VARARGS, "Write data and the sums of its blocks (agents/checksums.py)."},
    {"crc32c", py_crc32c, METH_VARARGS, "CRC-32C of a buffer."},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(scratch, pos, end, core, caps, regions, out, small_read_max, batch_bytes) -> (pos, stop)"},
    {"configure", configure, METH_VARARGS, "configure(Drive, latency_buckets)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cserve", "The agent's compiled command loop.", -1,
                                    methods};

#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__cserve(void) {
    {
        uint16_t probe = 1;
        unsigned char b;
        memcpy(&b, &probe, 1);
        if (b != 1) {
            PyErr_SetString(PyExc_ImportError, "_cserve supports little-endian hosts only");
            return NULL;
        }
    }
    INTERN(s_extents, "extents"); INTERN(s_drives, "drives"); INTERN(s_secrets, "secrets");
    INTERN(s_serve_until, "serve_until"); INTERN(s_copies, "_copies"); INTERN(s_dirty, "_dirty");
    INTERN(s_intent, "_intent"); INTERN(s_sums_at, "sums_at");
    INTERN(s_stats, "stats"); INTERN(s_volume_id, "volume_id"); INTERN(s_min_generation, "min_generation");
    INTERN(s_replicas, "replicas"); INTERN(s_length, "length"); INTERN(s_drive_id, "drive_id");
    INTERN(s_drive_offset, "drive_offset"); INTERN(s_failed, "failed"); INTERN(s_fd, "fd");
    INTERN(s_expires, "expires"); INTERN(s_access, "access"); INTERN(s_max_generation, "max_generation");
    INTERN(s_commands, "commands"); INTERN(s_bytes_read, "bytes_read"); INTERN(s_bytes_written, "bytes_written");
    INTERN(s_drives_stats, "drives"); INTERN(s_volumes, "volumes"); INTERN(s_latency, "latency");
    INTERN(s_read, "read"); INTERN(s_write, "write");
    INTERN(s_read_region, "read_region");
    INTERN(s_write_region, "write_region");
    crc_init();
    shifts_init();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyType_Ready(&ConnType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ConnType);
    if (PyModule_AddObject(m, "Conn", (PyObject *)&ConnType) < 0 ||
        PyModule_AddIntConstant(m, "STOP_NEED_PYTHON", STOP_NEED_PYTHON) < 0 ||
        PyModule_AddIntConstant(m, "STOP_FULL", STOP_FULL) < 0 ||
        PyModule_AddIntConstant(m, "INTENT_GRAIN", INTENT_GRAIN) < 0 ||
        PyModule_AddIntConstant(m, "SUM_BLOCK", SUM_BLOCK) < 0 || PyModule_AddIntConstant(m, "DATA_OFFSET", DATA_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "EV_FRAMES", EV_FRAMES) < 0 || PyModule_AddIntConstant(m, "EV_ENDED", EV_ENDED) < 0 ||
        PyModule_AddIntConstant(m, "EV_BAD_FRAMING", EV_BAD_FRAMING) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
