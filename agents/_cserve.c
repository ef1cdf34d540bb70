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
#include <stdint.h>
#include <string.h>
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

#define STOP_NEED_PYTHON 0
#define STOP_FULL 1

static PyObject *drive_type = NULL;   /* agents.drive.Drive: only plain drives are served here */
static double buckets[MAX_BUCKETS];
static Py_ssize_t n_buckets = 0;

static PyObject *s_extents, *s_drives, *s_secrets, *s_serve_until, *s_copies, *s_dirty, *s_stats;
static PyObject *s_volume_id, *s_min_generation, *s_replicas, *s_length, *s_drive_id, *s_drive_offset;
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
        if (k == 0) return -1; /* short read: the Python path reports it */
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
static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32c(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* The Python decoder parses a whole receive before anything in it runs, so a framing error anywhere
 * in it (bad magic, unknown flag bits, a length above MAX_IO, a header digest mismatch) means none of
 * its commands run: the connection is dropped. 1 if every complete header in [pos, end) is sound. */
static int framing_ok(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end) {
    while (end - pos >= CMD_SIZE) {
        const unsigned char *h = buf + pos;
        unsigned op = h[2], flags = h[3];
        uint32_t length = ld32(h + 24);
        if (ld16(h) != COMMAND_MAGIC || (flags & ~KNOWN_FLAGS) || length > MAX_IO) return 0;
        Py_ssize_t frame = CMD_SIZE;
        if (flags & F_HDGST) {
            if (end - pos < CMD_SIZE + 4) return 1; /* the digest has not arrived: nothing to judge yet */
            if (ld32(h + CMD_SIZE) != crc32c(h, CMD_SIZE)) return 0;
            frame += 4;
        }
        if ((op == OP_WRITE || op == OP_AUTH) && length) frame += (Py_ssize_t)length + ((flags & F_DDGST) ? 4 : 0);
        pos += frame;
    }
    return 1;
}

typedef struct {
    PyObject *extents, *drives, *caps, *stats_drives, *stats_volumes, *latency;
    int check_caps;
    int writes_ok;       /* no migration copy or dirty tracking on the core */
    double serve_until;  /* monotonic */
    double wall_now;     /* time.time() for capability expiry, once per call */
} Ctx;

/* 1: served (completion appended); 0: for the Python path; -1: a Python error (bug or memory) */
static int serve_one(Ctx *c, const unsigned char *h, const unsigned char *payload, unsigned char *region,
                     PyObject *out, long long *nread, long long *nwritten, size_t *outbytes) {
    double t0 = now_clock(CLOCK_MONOTONIC);
    unsigned op = h[2], flags = h[3];
    uint32_t tag = ld32(h + 4);
    uint64_t extent_id = ld64(h + 8), offset = ld64(h + 16), generation = ld64(h + 40);
    uint32_t length = ld32(h + 24);
    int write = (op == OP_WRITE || op == OP_WRITE_REGION);
    int in_region = (op == OP_READ_REGION || op == OP_WRITE_REGION); /* data through ``region``, not the socket */
    PyObject *op_name = op == OP_READ ? s_read : op == OP_WRITE ? s_write : op == OP_READ_REGION ? s_read_region
                                                                                                 : s_write_region;

    PyObject *key = PyLong_FromUnsignedLongLong(extent_id);
    if (key == NULL) return -1;
    PyObject *rec = PyDict_GetItemWithError(c->extents, key); /* borrowed */
    Py_DECREF(key);
    if (rec == NULL) return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(rec);
    int result = 0;
    PyObject *volume_id = NULL, *drive_id = NULL, *drive = NULL, *bytes = NULL;
    long long min_gen, replicas, rlength, drive_offset, fd;

    volume_id = PyObject_GetAttr(rec, s_volume_id);
    if (volume_id == NULL) goto error;
    if (c->check_caps) { /* dataplane._authorize */
        PyObject *cap = PyDict_GetItemWithError(c->caps, volume_id);
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
    drive_id = PyObject_GetAttr(rec, s_drive_id);
    if (drive_id == NULL) goto error;
    drive = PyDict_GetItemWithError(c->drives, drive_id);
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
    if (fd < 0) goto python;
    off_t at = (off_t)(drive_offset + (long long)offset);

    if (in_region) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = write ? full_pwrite((int)fd, region, length, at) : full_pread((int)fd, region, length, at);
        if (rc == 0 && write && (flags & F_FUA)) rc = fdatasync((int)fd);
        Py_END_ALLOW_THREADS
        if (rc < 0) goto python;
        bytes = PyBytes_FromStringAndSize(NULL, COMP_SIZE);
        if (bytes == NULL) goto error;
        encode_completion((unsigned char *)PyBytes_AS_STRING(bytes), tag, 0);
        if (write) *nwritten += length; else *nread += length;
        *outbytes += COMP_SIZE;
    } else if (write) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = full_pwrite((int)fd, payload, length, at);
        if (rc == 0 && (flags & F_FUA)) rc = fdatasync((int)fd);
        Py_END_ALLOW_THREADS
        if (rc < 0) goto python; /* the Python path writes again and reports the drive's error */
        bytes = PyBytes_FromStringAndSize(NULL, COMP_SIZE);
        if (bytes == NULL) goto error;
        encode_completion((unsigned char *)PyBytes_AS_STRING(bytes), tag, 0);
        *nwritten += length;
        *outbytes += COMP_SIZE;
    } else {
        bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)COMP_SIZE + length);
        if (bytes == NULL) goto error;
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(bytes);
        if (full_pread((int)fd, p + COMP_SIZE, length, at) < 0) goto python;
        encode_completion(p, tag, length);
        *nread += length;
        *outbytes += COMP_SIZE + length;
    }
    if (PyList_Append(out, bytes) < 0) goto error;
    if (stats_io(c->stats_drives, c->stats_volumes, drive_id, volume_id, write, length) < 0) goto error;
    if (stats_observe(c->latency, op_name, now_clock(CLOCK_MONOTONIC) - t0) < 0) goto error;
    result = 1;
    goto done;
python:
    result = 0;
    goto done;
error:
    result = -1;
done:
    Py_XDECREF(bytes);
    Py_XDECREF(drive);
    Py_XDECREF(drive_id);
    Py_XDECREF(volume_id);
    Py_DECREF(rec);
    return result;
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
    const unsigned char *buf = (const unsigned char *)view.buf;
    Ctx c = {0};
    PyObject *stats = NULL, *secrets = NULL, *copies = NULL, *dirty = NULL, *su = NULL;
    long long nread = 0, nwritten = 0, ncommands = 0;
    size_t outbytes = 0;
    int stop = STOP_NEED_PYTHON, failed = 0;

    c.caps = caps;
    if ((c.extents = PyObject_GetAttr(core, s_extents)) == NULL) goto fail;
    if ((c.drives = PyObject_GetAttr(core, s_drives)) == NULL) goto fail;
    if ((stats = PyObject_GetAttr(core, s_stats)) == NULL) goto fail;
    if ((c.stats_drives = PyObject_GetAttr(stats, s_drives_stats)) == NULL) goto fail;
    if ((c.stats_volumes = PyObject_GetAttr(stats, s_volumes)) == NULL) goto fail;
    if ((c.latency = PyObject_GetAttr(stats, s_latency)) == NULL) goto fail;
    if (!PyDict_Check(c.extents) || !PyDict_Check(c.drives) || !PyDict_Check(c.stats_drives) ||
        !PyDict_Check(c.stats_volumes) || !PyDict_Check(c.latency)) {
        PyErr_SetString(PyExc_TypeError, "the core's tables must be dicts");
        goto fail;
    }
    if ((secrets = PyObject_GetAttr(core, s_secrets)) == NULL) goto fail;
    if ((c.check_caps = PyObject_IsTrue(secrets)) < 0) goto fail;
    if ((copies = PyObject_GetAttr(core, s_copies)) == NULL || (dirty = PyObject_GetAttr(core, s_dirty)) == NULL)
        goto fail;
    {
        int a = PyObject_IsTrue(copies), b = PyObject_IsTrue(dirty);
        if (a < 0 || b < 0) goto fail;
        c.writes_ok = !a && !b;
    }
    if ((su = PyObject_GetAttr(core, s_serve_until)) == NULL) goto fail;
    c.serve_until = PyFloat_AsDouble(su);
    if (c.serve_until == -1.0 && PyErr_Occurred()) goto fail;
    c.wall_now = now_clock(CLOCK_REALTIME);

    if (!framing_ok(buf, pos, end)) goto finish; /* the Python decoder raises; nothing here runs */
    while (pos < end) {
        if (outbytes >= (size_t)batch_bytes) { stop = STOP_FULL; break; }
        if (end - pos < CMD_SIZE) break;
        const unsigned char *h = buf + pos;
        unsigned op = h[2], flags = h[3];
        uint32_t length = ld32(h + 24);
        if (ld16(h) != COMMAND_MAGIC || (flags & ~KNOWN_FLAGS) || length > MAX_IO) break; /* ProtocolError there */
        if (flags & (F_HDGST | F_DDGST) || length == 0) break;
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
                          &nread, &nwritten, &outbytes);
        if (have_region) PyBuffer_Release(&rv);
        if (r < 0) goto fail;
        if (r == 0) break;
        ncommands++;
        pos += frame;
    }
    goto finish;
fail:
    failed = 1;
finish:
    if (stats != NULL) { /* the counters of what was served, also when a later command raised */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        int bad = attr_add(stats, s_commands, ncommands) < 0 || attr_add(stats, s_bytes_read, nread) < 0 ||
                  attr_add(stats, s_bytes_written, nwritten) < 0;
        if (et != NULL) {
            if (bad) PyErr_Clear();
            PyErr_Restore(et, ev, tb);
        } else if (bad) {
            failed = 1;
        }
    }
    PyBuffer_Release(&view);
    Py_XDECREF(su);
    Py_XDECREF(dirty);
    Py_XDECREF(copies);
    Py_XDECREF(secrets);
    Py_XDECREF(c.latency);
    Py_XDECREF(c.stats_volumes);
    Py_XDECREF(c.stats_drives);
    Py_XDECREF(stats);
    Py_XDECREF(c.drives);
    Py_XDECREF(c.extents);
    if (failed) return NULL;
    return Py_BuildValue("(ni)", pos, stop);
}

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

static PyMethodDef methods[] = {
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(scratch, pos, end, core, caps, out, small_read_max, batch_bytes) -> (pos, stop)"},
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
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "STOP_NEED_PYTHON", STOP_NEED_PYTHON) < 0 ||
        PyModule_AddIntConstant(m, "STOP_FULL", STOP_FULL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
