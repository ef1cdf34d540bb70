/* nvpool.client._csync: the blocking API's compiled round trip (the fast path of
 * client/syncpath.py's _Channel.call).
 *
 * The pure-Python _Channel.call is the specification: it sends one encoded command (and a WRITE's
 * payload), receives the 24-byte completion, checks it, then receives a READ's payload straight into
 * the caller's buffer. This module does the same bytes with fewer system calls and without the
 * interpreter in between:
 *
 *   exchange(fd, header, payload, dest, tag) -> (status, length, info, message)
 *
 *   - ``header`` (the encoded command, from proto/dataplane.encode_command: the codec stays in
 *     Python) and ``payload`` (or None) go out with one writev, continued where a partial write
 *     stopped;
 *   - the completion and, for a READ, the payload are received with readv into [completion, dest],
 *     so a 4 KiB read usually costs one writev and one readv;
 *   - the completion must carry the completion magic, ``tag`` and no flag bits, else OSError
 *     ("unexpected completion": the caller drops the connection); status OK with a payload length
 *     other than len(dest) (a READ) or a payload on anything else is OSError too;
 *   - status not OK: its error message (``length`` bytes, at most MAX_MESSAGE) is received and
 *     returned as ``message``; the caller turns the status into its fast-path miss. Bytes of that
 *     message may have landed in ``dest`` first: a failed read leaves the caller's buffer undefined
 *     (as pread(2) does), and the caller's retry on the full path overwrites it.
 *
 * The descriptor is a blocking socket whose SO_SNDTIMEO / SO_RCVTIMEO carry the channel's timeout
 * (set by syncpath when it uses this module): a wait that runs out raises TimeoutError; EINTR runs
 * the interpreter's signal handlers (their exception propagates; the channel is then mid-command and
 * the caller drops it). The GIL is released for the system calls, so other threads run meanwhile;
 * the buffers stay exported (pinned) for the whole call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define COMPLETION_MAGIC 0x434E
#define COMPLETION_SIZE 24
#define MAX_MESSAGE 4096

static inline uint16_t ld16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* errno of a failed call -> a Python exception; 0 when a signal handler ran and asked to go on */
static int raise_errno(int err) {
    if (err == EINTR) {
        if (PyErr_CheckSignals() < 0) return -1;
        return 0; /* retry */
    }
    if (err == EAGAIN || err == EWOULDBLOCK) {
        PyErr_SetString(PyExc_TimeoutError, "the agent did not answer in time");
        return -1;
    }
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* advance an iovec array past ``n`` bytes; returns the new count */
static int iov_advance(struct iovec *iov, int cnt, size_t n) {
    int i = 0;
    while (i < cnt && n >= iov[i].iov_len) {
        n -= iov[i].iov_len;
        i++;
    }
    if (i < cnt) {
        iov[i].iov_base = (char *)iov[i].iov_base + n;
        iov[i].iov_len -= n;
    }
    if (i) memmove(iov, iov + i, (size_t)(cnt - i) * sizeof(*iov));
    return cnt - i;
}

/* write all of iov; -1 with an exception set */
static int write_all(int fd, struct iovec *iov, int cnt) {
    while (cnt > 0) {
        ssize_t k;
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        k = writev(fd, iov, cnt);
        if (k < 0) err = errno;
        Py_END_ALLOW_THREADS
        if (k < 0) {
            if (raise_errno(err) < 0) return -1;
            continue;
        }
        cnt = iov_advance(iov, cnt, (size_t)k);
    }
    return 0;
}

/* read until ``want`` bytes have arrived into iov (which holds at least that many); -1 with an
 * exception set (connection closed: ConnectionError) */
static int read_upto(int fd, struct iovec *iov, int *cnt, size_t want, size_t *got) {
    while (*got < want) {
        ssize_t k;
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        k = readv(fd, iov, *cnt);
        if (k < 0) err = errno;
        Py_END_ALLOW_THREADS
        if (k < 0) {
            if (raise_errno(err) < 0) return -1;
            continue;
        }
        if (k == 0) {
            PyErr_SetString(PyExc_ConnectionError, "connection closed");
            return -1;
        }
        *got += (size_t)k;
        *cnt = iov_advance(iov, *cnt, (size_t)k);
    }
    return 0;
}

static PyObject *exchange(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer hdr, pay = {0}, dst = {0};
    PyObject *payload, *dest;
    unsigned long tag;
    if (!PyArg_ParseTuple(args, "iy*OOk", &fd, &hdr, &payload, &dest, &tag)) return NULL;
    PyObject *result = NULL;
    int have_pay = 0, have_dst = 0;
    if (payload != Py_None) {
        if (PyObject_GetBuffer(payload, &pay, PyBUF_SIMPLE) < 0) goto out;
        have_pay = 1;
    }
    if (dest != Py_None) {
        if (PyObject_GetBuffer(dest, &dst, PyBUF_WRITABLE) < 0) goto out;
        have_dst = 1;
    }
    {
        struct iovec out[2];
        int n_out = 0;
        out[n_out].iov_base = hdr.buf;
        out[n_out++].iov_len = (size_t)hdr.len;
        if (have_pay && pay.len) {
            out[n_out].iov_base = pay.buf;
            out[n_out++].iov_len = (size_t)pay.len;
        }
        if (write_all(fd, out, n_out) < 0) goto out;

        unsigned char comp[COMPLETION_SIZE];
        struct iovec in[2];
        int n_in = 0;
        in[n_in].iov_base = comp;
        in[n_in++].iov_len = COMPLETION_SIZE;
        size_t dlen = have_dst ? (size_t)dst.len : 0;
        if (dlen) {
            in[n_in].iov_base = dst.buf;
            in[n_in++].iov_len = dlen;
        }
        size_t got = 0;
        if (read_upto(fd, in, &n_in, COMPLETION_SIZE, &got) < 0) goto out;
        uint16_t magic = ld16(comp);
        unsigned status = comp[2], flags = comp[3];
        uint32_t ctag = ld32(comp + 4), length = ld32(comp + 8);
        uint64_t info = ld64(comp + 16);
        if (magic != COMPLETION_MAGIC || ctag != (uint32_t)tag || flags) {
            PyErr_SetString(PyExc_OSError, "unexpected completion");
            goto out;
        }
        size_t extra = got - COMPLETION_SIZE; /* bytes already in dest */
        if (status != 0) {
            if (length > MAX_MESSAGE || extra > length) {
                PyErr_SetString(PyExc_OSError, "unexpected completion");
                goto out;
            }
            char msg[MAX_MESSAGE];
            if (extra) memcpy(msg, dst.buf, extra);
            struct iovec m = {msg + extra, length - extra};
            size_t mgot = 0;
            int n_m = 1;
            if (read_upto(fd, &m, &n_m, length - extra, &mgot) < 0) goto out;
            result = Py_BuildValue("IIKy#", status, (unsigned)length, (unsigned long long)info, msg, (Py_ssize_t)length);
            goto out;
        }
        if (length != dlen || (length && !have_dst)) {
            PyErr_SetString(PyExc_OSError, length != dlen && have_dst ? "unexpected payload length" : "unexpected payload");
            goto out;
        }
        if (read_upto(fd, in, &n_in, COMPLETION_SIZE + dlen, &got) < 0) goto out;
        result = Py_BuildValue("IIKO", status, (unsigned)length, (unsigned long long)info, Py_None);
    }
out:
    PyBuffer_Release(&hdr);
    if (have_pay) PyBuffer_Release(&pay);
    if (have_dst) PyBuffer_Release(&dst);
    return result;
}

/* ---------------------------------------------------------------------- batched reads
 *
 *   reads(fds, jobs, timeout) -> (statuses, failed)
 *
 * ``fds``: the blocking agent sockets taking part; ``jobs``: (fd index, tag, extent id, offset,
 * generation, dest) for READ commands of len(dest) bytes, encoded here as proto/dataplane.encode_command
 * encodes them (no flags: no digests); each completion must carry its ``tag`` (tags unique per socket)
 * and, on success, exactly len(dest) bytes. Every command
 * is sent and every completion received with the GIL released, on all sockets at once: non-blocking
 * sends and receives driven by poll(), so a socket whose commands are not all sent yet is still read
 * (an agent never waits for us to read while we wait for it to read). Completions are received
 * through a 64 KiB staging buffer per socket and copied into their ``dest`` (a payload of 64 KiB or
 * more still missing goes straight into ``dest``), so many completions cost one recv.
 *
 * ``statuses[i]`` is job i's completion status (0: its ``dest`` holds the data; an error's message is
 * skipped), or -1 when its socket failed. ``failed``: the indices (into ``fds``) of the sockets that failed
 * (closed, a system error, a completion that is not one of its jobs' or breaks the framing, bytes after
 * the last completion, or ``timeout`` seconds in which no byte moved on any socket still waited for):
 * the caller drops them, their connections being out of step. A failed read leaves its ``dest``
 * undefined (as pread(2) does). A signal handler's exception aborts the whole call (every socket is
 * then out of step); handlers do not extend the timeout.
 */
#define STAGE 65536
#define MAX_JOBS 65536 /* per call (syncpath.read_batch sends larger batches in parts) */
#define CMD_SIZE 48
#define COMMAND_MAGIC 0x564E
#define OP_READ 1
#define MAX_IO (16u * 1024u * 1024u)

static inline void st16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void st64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

/* a READ command as proto/dataplane.encode_command encodes it (no flags, no region) */
static void encode_read(unsigned char *h, uint32_t tag, uint64_t extent_id, uint64_t offset, uint32_t length,
                        uint64_t generation) {
    memset(h, 0, CMD_SIZE);
    st16(h, COMMAND_MAGIC);
    h[2] = OP_READ;
    st32(h + 4, tag);
    st64(h + 8, extent_id);
    st64(h + 16, offset);
    st32(h + 24, length);
    st64(h + 40, generation);
}
#define DIRECT_MIN 65536

typedef struct {
    int fd;
    unsigned char *out;   /* the commands to send, back to back */
    size_t out_len, out_sent;
    unsigned char *stage; /* received bytes not yet placed */
    size_t s_pos, s_end;
    Py_ssize_t first, count; /* its jobs: order[first .. first+count) */
    Py_ssize_t pending;
    Py_ssize_t cur;          /* the job whose payload or message is arriving, or -1 */
    size_t remaining;        /* of that payload or message */
    int ready;               /* the last poll() said it has something (or it was not polled yet) */
    int failed;
} Sock;

typedef struct {
    Py_ssize_t sock;
    uint32_t tag;
    unsigned char hdr[CMD_SIZE];
    Py_buffer dst;
    int have_dst;
    int done;
    int status;             /* the completion's (its error message is skipped), or -1: the socket failed */
    size_t placed;          /* payload bytes in dst */
} Job;

static void sock_fail(Sock *s, Job *jobs, Py_ssize_t *order) {
    if (s->failed) return;
    s->failed = 1;
    for (Py_ssize_t k = s->first; k < s->first + s->count; k++) {
        Job *j = &jobs[order[k]];
        if (!j->done) {
            j->done = 1;
            j->status = -1;
        }
    }
    s->pending = 0;
}

/* the job of ``s`` with ``tag`` that is not done, or -1 (hint: completions usually come in order) */
static Py_ssize_t find_job(Sock *s, Job *jobs, Py_ssize_t *order, uint32_t tag, Py_ssize_t *hint) {
    for (Py_ssize_t n = 0; n < s->count; n++) {
        Py_ssize_t k = s->first + (*hint + n) % s->count;
        Job *j = &jobs[order[k]];
        if (j->tag == tag && !j->done) {
            *hint = (k - s->first + 1) % s->count;
            return order[k];
        }
    }
    return -1;
}

/* place what the stage holds; 0, or -1 when the socket failed (framing) */
static int sock_parse(Sock *s, Job *jobs, Py_ssize_t *order, Py_ssize_t *hint) {
    for (;;) {
        size_t avail = s->s_end - s->s_pos;
        if (s->cur < 0) {
            if (avail < COMPLETION_SIZE) break;
            const unsigned char *c = s->stage + s->s_pos;
            unsigned status = c[2], flags = c[3];
            uint32_t tag = ld32(c + 4), length = ld32(c + 8);
            Py_ssize_t ji = ld16(c) == COMPLETION_MAGIC && !flags ? find_job(s, jobs, order, tag, hint) : -1;
            if (ji < 0 || (status == 0 ? length != (uint32_t)jobs[ji].dst.len : length > MAX_MESSAGE)) {
                sock_fail(s, jobs, order);
                return -1;
            }
            Job *j = &jobs[ji];
            j->status = (int)status;
            s->s_pos += COMPLETION_SIZE;
            s->cur = ji;
            s->remaining = length;
        }
        Job *j = &jobs[s->cur];
        size_t k = avail = s->s_end - s->s_pos;
        if (k > s->remaining) k = s->remaining;
        if (k) {
            if (j->status == 0) { /* (an error's message is skipped) */
                memcpy((unsigned char *)j->dst.buf + j->placed, s->stage + s->s_pos, k);
                j->placed += k;
            }
            s->s_pos += k;
            s->remaining -= k;
        }
        if (s->remaining) break;
        j->done = 1;
        s->pending--;
        s->cur = -1;
    }
    if (s->s_pos == s->s_end) s->s_pos = s->s_end = 0;
    return 0;
}

/* receive what the socket has (never blocking; *progress set when bytes arrived); 0, or -1 when it failed */
static int sock_recv(Sock *s, Job *jobs, Py_ssize_t *order, Py_ssize_t *hint, int *progress) {
    for (;;) {
        ssize_t k;
        if (s->cur >= 0 && jobs[s->cur].status == 0 && s->s_pos == s->s_end && s->remaining >= DIRECT_MIN) {
            Job *j = &jobs[s->cur]; /* a large payload: straight into its buffer */
            k = recv(s->fd, (unsigned char *)j->dst.buf + j->placed, s->remaining, MSG_DONTWAIT);
            if (k > 0) {
                *progress = 1;
                j->placed += (size_t)k;
                s->remaining -= (size_t)k;
                if (!s->remaining) {
                    j->done = 1;
                    s->pending--;
                    s->cur = -1;
                }
                continue;
            }
        } else {
            if (s->s_pos > 0 && s->s_pos == s->s_end) s->s_pos = s->s_end = 0;
            if (s->s_end == STAGE) { /* compact */
                memmove(s->stage, s->stage + s->s_pos, s->s_end - s->s_pos);
                s->s_end -= s->s_pos;
                s->s_pos = 0;
            }
            k = recv(s->fd, s->stage + s->s_end, STAGE - s->s_end, MSG_DONTWAIT);
            if (k > 0) {
                *progress = 1;
                s->s_end += (size_t)k;
                if (sock_parse(s, jobs, order, hint) < 0) return -1;
                if (!s->pending) return 0;
                continue;
            }
        }
        if (k == 0) {
            sock_fail(s, jobs, order);
            return -1;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        sock_fail(s, jobs, order);
        return -1;
    }
}

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *reads(PyObject *self, PyObject *args) {
    PyObject *fds, *jobl;
    double timeout;
    if (!PyArg_ParseTuple(args, "O!O!d", &PyList_Type, &fds, &PyList_Type, &jobl, &timeout)) return NULL;
    Py_ssize_t nf = PyList_GET_SIZE(fds), nj = PyList_GET_SIZE(jobl);
    if (nf < 1 || nf > MAX_JOBS || nj < 1 || nj > MAX_JOBS || !(timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "reads: 1..MAX_JOBS sockets and jobs, and a positive timeout");
        return NULL;
    }
    Sock *socks = calloc((size_t)nf, sizeof(Sock));
    Job *jobs = calloc((size_t)nj, sizeof(Job));
    Py_ssize_t *order = calloc((size_t)nj, sizeof(Py_ssize_t));
    struct pollfd *pfd = calloc((size_t)nf, sizeof(struct pollfd));
    Py_ssize_t *pidx = calloc((size_t)nf, sizeof(Py_ssize_t));
    Py_ssize_t *hints = calloc((size_t)nf, sizeof(Py_ssize_t));
    PyObject *result = NULL;
    if (!socks || !jobs || !order || !pfd || !pidx || !hints) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < nf; i++) {
        socks[i].fd = (int)PyLong_AsLong(PyList_GET_ITEM(fds, i));
        socks[i].cur = -1;
        socks[i].ready = 1;
        if (PyErr_Occurred()) goto out;
    }
    for (Py_ssize_t i = 0; i < nj; i++) {
        PyObject *t = PyList_GET_ITEM(jobl, i), *dst;
        Py_ssize_t si;
        unsigned long tag;
        unsigned long long extent_id, offset, generation;
        if (!PyTuple_Check(t)) {
            PyErr_SetString(PyExc_TypeError, "reads: jobs are tuples");
            goto out;
        }
        if (!PyArg_ParseTuple(t, "nkKKKO", &si, &tag, &extent_id, &offset, &generation, &dst)) goto out;
        if (si < 0 || si >= nf || tag > 0xFFFFFFFFul) {
            PyErr_SetString(PyExc_ValueError, "reads: a job names no socket, or a tag beyond 32 bits");
            goto out;
        }
        Job *j = &jobs[i];
        j->sock = si;
        j->tag = (uint32_t)tag;
        if (PyObject_GetBuffer(dst, &j->dst, PyBUF_WRITABLE) < 0) goto out;
        j->have_dst = 1;
        if (j->dst.len < 1 || j->dst.len > MAX_IO) {
            PyErr_SetString(PyExc_ValueError, "reads: a destination of 1 byte to MAX_IO bytes");
            goto out;
        }
        encode_read(j->hdr, j->tag, extent_id, offset, (uint32_t)j->dst.len, generation);
        socks[si].count++;
        socks[si].out_len += CMD_SIZE;
    }
    { /* jobs grouped by socket, in their order */
        Py_ssize_t pos = 0;
        for (Py_ssize_t i = 0; i < nf; i++) {
            socks[i].first = pos;
            pos += socks[i].count;
            socks[i].count = 0;
        }
        for (Py_ssize_t i = 0; i < nj; i++) {
            Sock *s = &socks[jobs[i].sock];
            order[s->first + s->count++] = i;
        }
    }
    for (Py_ssize_t i = 0; i < nf; i++) {
        Sock *s = &socks[i];
        s->pending = s->count;
        if (!s->count) continue;
        s->out = malloc(s->out_len);
        s->stage = malloc(STAGE);
        if (!s->out || !s->stage) {
            PyErr_NoMemory();
            goto out;
        }
        size_t at = 0;
        for (Py_ssize_t k = s->first; k < s->first + s->count; k++) {
            Job *j = &jobs[order[k]];
            memcpy(s->out + at, j->hdr, CMD_SIZE);
            at += CMD_SIZE;
        }
    }
    double deadline = mono_now() + timeout; /* (kept across signal handlers: they do not extend it) */
    for (;;) {
        int err = 0, rc = 0, np = 0;
        Py_BEGIN_ALLOW_THREADS
        for (;;) {
            np = 0;
            for (Py_ssize_t i = 0; i < nf; i++) {
                Sock *s = &socks[i];
                if (!s->pending || s->failed) continue;
                int progress = 0;
                /* send what the socket takes */
                while (s->ready && s->out_sent < s->out_len) {
                    ssize_t k = send(s->fd, s->out + s->out_sent, s->out_len - s->out_sent, MSG_DONTWAIT | MSG_NOSIGNAL);
                    if (k > 0) { s->out_sent += (size_t)k; progress = 1; continue; }
                    if (k < 0 && errno == EINTR) continue;
                    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
                    sock_fail(s, jobs, order);
                    break;
                }
                if (s->failed) continue;
                if (s->ready && sock_recv(s, jobs, order, &hints[i], &progress) < 0) continue;
                if (progress) deadline = mono_now() + timeout; /* no progress for ``timeout``: the end */
                if (!s->pending) continue;
                pfd[np].fd = s->fd;
                pfd[np].events = POLLIN | (s->out_sent < s->out_len ? POLLOUT : 0);
                pfd[np].revents = 0;
                pidx[np++] = i;
            }
            if (!np) break;
            double left = deadline - mono_now();
            if (left <= 0) { rc = 0; break; }
            rc = poll(pfd, (nfds_t)np, (int)(left * 1000) + 1);
            for (int q = 0; q < np && rc >= 0; q++) socks[pidx[q]].ready = pfd[q].revents != 0;
            if (rc < 0) {
                err = errno;
                break; /* EINTR: run the signal handlers (with the GIL), then go on */
            }
            if (rc == 0 && mono_now() >= deadline) break;
        }
        Py_END_ALLOW_THREADS
        if (np && rc < 0 && err == EINTR) {
            if (PyErr_CheckSignals() < 0) goto out;
            continue;
        }
        if (np && rc < 0) {
            for (Py_ssize_t q = 0; q < np; q++) sock_fail(&socks[pidx[q]], jobs, order);
        } else if (np) { /* no progress for ``timeout`` seconds */
            for (Py_ssize_t q = 0; q < np; q++) sock_fail(&socks[pidx[q]], jobs, order);
        }
        break;
    }
    for (Py_ssize_t i = 0; i < nf; i++) { /* bytes beyond the last completion: the socket is out of step */
        Sock *s = &socks[i];
        if (s->count && s->s_end > s->s_pos) s->failed = 1;
    }
    {
        PyObject *res = PyList_New(nj), *failed = PyList_New(0);
        if (!res || !failed) {
            Py_XDECREF(res);
            Py_XDECREF(failed);
            goto out;
        }
        for (Py_ssize_t i = 0; i < nj; i++) {
            PyObject *t = PyLong_FromLong(jobs[i].status);
            if (t == NULL) {
                Py_DECREF(res);
                Py_DECREF(failed);
                goto out;
            }
            PyList_SET_ITEM(res, i, t);
        }
        for (Py_ssize_t i = 0; i < nf; i++) {
            if (!socks[i].failed) continue;
            PyObject *v = PyLong_FromSsize_t(i);
            if (v == NULL || PyList_Append(failed, v) < 0) {
                Py_XDECREF(v);
                Py_DECREF(res);
                Py_DECREF(failed);
                goto out;
            }
            Py_DECREF(v);
        }
        result = Py_BuildValue("(NN)", res, failed);
    }
out:
    if (jobs) {
        for (Py_ssize_t i = 0; i < nj; i++) {
            if (jobs[i].have_dst) PyBuffer_Release(&jobs[i].dst);
        }
    }
    if (socks) {
        for (Py_ssize_t i = 0; i < nf; i++) {
            free(socks[i].out);
            free(socks[i].stage);
        }
    }
    free(socks);
    free(jobs);
    free(order);
    free(pfd);
    free(pidx);
    free(hints);
    return result;
}

static PyMethodDef methods[] = {
    {"exchange", exchange, METH_VARARGS,
     "exchange(fd, header, payload, dest, tag) -> (status, length, info, message): one command's "
     "round trip on a blocking agent socket (see the module's header comment)."},
    {"reads", reads, METH_VARARGS,
     "reads(fds, jobs, timeout) -> (statuses, failed): many READs on many agent sockets at once (see "
     "'batched reads' in the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "nvpool.client._csync", NULL, -1, methods};

PyMODINIT_FUNC PyInit__csync(void) { return PyModule_Create(&module); }
