/* nvpool.proto._ccomplete: the client's compiled completion path (the fast path of
 * proto/transport.py's AgentConnection.buffer_updated).
 *
 * The pure-Python path (CompletionDecoder -> Completion -> pending.pop -> future.set_result) is
 * the specification; this module delivers exactly the completions that path would deliver as plain
 * successes, and hands everything else back to it before touching anything:
 *
 *   complete(scratch, pos, end, pending, completion_type) -> (pos, released)
 *
 * reads whole completion frames from ``scratch[pos:end)`` (the decoder's receive buffer, the reader
 * being between frames) and, for each one in order that is
 *
 *   - status OK, no flag bits (no digests), its payload (if any) wholly in ``scratch``,
 *   - for a tag in ``pending`` (tag -> transport._Pending) whose ``dest`` is a writable contiguous
 *     buffer of exactly the payload's length (or any ``dest``, when there is no payload),
 *
 * copies the payload into ``dest`` (the one copy the Python decoder makes too), removes the tag from
 * ``pending``, adds its ``nbytes`` to ``released`` and, unless its future is already done (a
 * cancelled caller), sets the future's result to ``completion_type(status, flags, tag, length, info,
 * dest-or-None)`` -- the same ``Completion`` the Python decoder builds, its payload being the
 * caller's buffer. The caller releases ``released`` bytes of its window afterwards.
 *
 * It stops at the first frame that is anything else (an error status, a digest, an unknown tag, a
 * destination that does not fit, a frame not yet complete), leaving ``pos`` at it for the Python
 * decoder, which answers it with its own errors. And it delivers nothing at all from a receive in
 * which any complete header is malformed or carries flags (checked first, over the whole receive):
 * the Python decoder parses a whole receive before delivering anything from it, so a malformed frame
 * fails every command of that receive with the connection, and the same must happen here.
 *
 * No state is kept between calls. Futures' results are set, never their callbacks run here (asyncio
 * schedules them), so nothing re-enters ``pending`` during a call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define COMPLETION_MAGIC 0x434E
#define COMPLETION_SIZE 24
#define KNOWN_FLAGS 0x07
#define MAX_IO (16u * 1024u * 1024u)
#define MAX_MESSAGE 4096u

#if PY_BIG_ENDIAN
#error "the wire format is little-endian; the compiled path assumes a little-endian machine"
#endif

static PyObject *s_dest, *s_future, *s_nbytes, *s_done, *s_set_result;

static inline uint16_t ld16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* 1 when every complete header in [pos, end) is well formed and flag-free (so the Python decoder
 * would raise on none of them and no digest needs checking), else 0. */
static int plain_framing(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end) {
    while (end - pos >= COMPLETION_SIZE) {
        const unsigned char *h = buf + pos;
        unsigned status = h[2], flags = h[3];
        uint32_t length = ld32(h + 8);
        if (ld16(h) != COMPLETION_MAGIC || flags != 0) return 0;
        if (length > (status == 0 ? MAX_IO : MAX_MESSAGE)) return 0;
        pos += COMPLETION_SIZE + (Py_ssize_t)length;
    }
    return 1;
}

/* Deliver one completion; 1 delivered, 0 hand back to Python, -1 error raised. */
static int deliver(const unsigned char *h, PyObject *pending, PyObject *completion_type, long long *released) {
    uint32_t tag = ld32(h + 4), length = ld32(h + 8);
    uint64_t info = ld64(h + 16);
    int result = -1;
    PyObject *key = NULL, *p = NULL, *dest = NULL, *fut = NULL, *comp = NULL, *nb = NULL, *done = NULL;
    if ((key = PyLong_FromUnsignedLong(tag)) == NULL) return -1;
    p = PyDict_GetItemWithError(pending, key); /* borrowed */
    if (p == NULL) {
        result = PyErr_Occurred() ? -1 : 0; /* unknown tag: the Python path drops the connection */
        goto done;
    }
    Py_INCREF(p);
    if ((dest = PyObject_GetAttr(p, s_dest)) == NULL) goto done;
    if (length > 0) {
        Py_buffer v;
        if (dest == Py_None) { result = 0; goto done; }
        if (PyObject_GetBuffer(dest, &v, PyBUF_WRITABLE) < 0) {
            PyErr_Clear(); /* not a plain writable buffer: the Python decoder's business */
            result = 0;
            goto done;
        }
        if (v.len != (Py_ssize_t)length || v.itemsize != 1) {
            PyBuffer_Release(&v);
            result = 0;
            goto done;
        }
        memcpy(v.buf, h + COMPLETION_SIZE, length);
        PyBuffer_Release(&v);
    }
    if ((nb = PyObject_GetAttr(p, s_nbytes)) == NULL) goto done;
    long long n = PyLong_AsLongLong(nb);
    if (n == -1 && PyErr_Occurred()) goto done;
    if ((fut = PyObject_GetAttr(p, s_future)) == NULL) goto done;
    if (PyDict_DelItem(pending, key) < 0) goto done;
    *released += n;
    comp = PyObject_CallFunction(completion_type, "iiIIKO", 0, 0, (unsigned int)tag, (unsigned int)length,
                                 (unsigned long long)info, length > 0 ? dest : Py_None);
    if (comp == NULL) goto done;
    if ((done = PyObject_CallMethodNoArgs(fut, s_done)) == NULL) goto done;
    int is_done = PyObject_IsTrue(done);
    if (is_done < 0) goto done;
    if (!is_done) {
        PyObject *r = PyObject_CallMethodOneArg(fut, s_set_result, comp);
        if (r == NULL) goto done;
        Py_DECREF(r);
    }
    result = 1;
done:
    Py_XDECREF(done);
    Py_XDECREF(comp);
    Py_XDECREF(fut);
    Py_XDECREF(nb);
    Py_XDECREF(dest);
    Py_XDECREF(p);
    Py_XDECREF(key);
    return result;
}

static PyObject *complete(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "complete(scratch, pos, end, pending, completion_type)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    PyObject *pending = args[3], *completion_type = args[4];
    if (!PyDict_Check(pending)) {
        PyErr_SetString(PyExc_TypeError, "pending must be a dict");
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
    long long released = 0;
    int failed = 0;
    if (plain_framing(buf, pos, end)) {
        while (end - pos >= COMPLETION_SIZE) {
            const unsigned char *h = buf + pos;
            uint32_t length = ld32(h + 8);
            if (h[2] != 0) break; /* an error completion: its message is the Python decoder's */
            if (end - pos < COMPLETION_SIZE + (Py_ssize_t)length) break;
            int r = deliver(h, pending, completion_type, &released);
            if (r < 0) { failed = 1; break; }
            if (r == 0) break;
            pos += COMPLETION_SIZE + (Py_ssize_t)length;
        }
    }
    PyBuffer_Release(&view);
    if (failed) return NULL;
    return Py_BuildValue("(nL)", pos, released);
}

static PyMethodDef methods[] = {
    {"complete", (PyCFunction)(void (*)(void))complete, METH_FASTCALL,
     "complete(scratch, pos, end, pending, completion_type) -> (pos, released)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ccomplete", "The client's compiled completion path.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__ccomplete(void) {
    if ((s_dest = PyUnicode_InternFromString("dest")) == NULL) return NULL;
    if ((s_future = PyUnicode_InternFromString("future")) == NULL) return NULL;
    if ((s_nbytes = PyUnicode_InternFromString("nbytes")) == NULL) return NULL;
    if ((s_done = PyUnicode_InternFromString("done")) == NULL) return NULL;
    if ((s_set_result = PyUnicode_InternFromString("set_result")) == NULL) return NULL;
    return PyModule_Create(&module);
}
