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
#include <sys/uio.h>
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

static PyMethodDef methods[] = {
    {"exchange", exchange, METH_VARARGS,
     "exchange(fd, header, payload, dest, tag) -> (status, length, info, message): one command's "
     "round trip on a blocking agent socket (see the module's header comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "nvpool.client._csync", NULL, -1, methods};

PyMODINIT_FUNC PyInit__csync(void) { return PyModule_Create(&module); }
