/*
 * CPython binding of the ring engine (ring.c): the `Ring` type that
 * shmq.Queue subclasses, and the zero-copy `ReadSlot` / `WriteSlot` leases.
 *
 * Rules kept here:
 *  - claim, copy and commit (or read, copy and release) happen with the GIL
 *    held, so threads of one process never interleave inside one operation;
 *  - every wait releases the GIL and returns to Python at least every
 *    WAIT_SLICE_NS so that Ctrl-C and timeouts are honoured;
 *  - result codes become exceptions in exactly one place: raise_code();
 *  - the mapping stays alive while any thread waits on it or any slot
 *    exists, even after close() (see ring_unpin()).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <string.h>

#include "ring.h"

#define WAIT_SLICE_NS 100000000LL   /* return to Python this often while blocked */
#define DEFAULT_SPIN_NS 50000LL     /* adaptive: spin this long before sleeping */
#define GIL_SPIN_ITERATIONS 256     /* spin/adaptive: poll this often before dropping the GIL */
#define PUT_MANY_CHUNK 256
/* Batches are claimed and released in pieces of about this many payload
 * bytes, so the other side can work on one piece while we do the next. */
#define BATCH_BYTES (64 * 1024)
#ifndef GET_MANY_BYTES
#define GET_MANY_BYTES (256 * 1024) /* get_many stops after about this much payload */
#endif

/* ------------------------------------------------------------------ */
/* Exceptions: classes come from shmq/_errors.py via set_error_classes() */
/* ------------------------------------------------------------------ */

enum error_class {
    E_BASE, E_FULL, E_EMPTY, E_TOO_LARGE, E_CORRUPT, E_INCOMPATIBLE, E_CLOSED,
    E_MESSAGE_TYPE, E_INVALID_ARGUMENT, E_ARGUMENT_TYPE, E_MESSAGE_DECODE, E_COUNT
};
static const char *error_class_names[E_COUNT] = {
    "ShmqError", "Full", "Empty", "MessageTooLarge", "CorruptSegment", "IncompatibleSegment",
    "Closed", "MessageTypeError", "InvalidArgument", "ArgumentTypeError", "MessageDecodeError",
};
static PyObject *error_classes[E_COUNT];

static PyObject *error_class(enum error_class which)
{
    return error_classes[which] ? error_classes[which] : PyExc_RuntimeError;
}

typedef struct {
    PyObject_HEAD
    shmq_ring ring;
    Py_buffer mapping;
    int mapped;           /* mapping holds a buffer we must release */
    int closed;           /* close() was called: refuse new operations */
    Py_ssize_t pins;      /* waits in progress + live slots: keep the mapping */
    Py_ssize_t read_slots;
    Py_ssize_t write_slots;
    unsigned long write_slot_thread;
    int strategy;
    int64_t spin_ns;
    PyObject *name;
    PyObject *weakreflist;
} RingObject;

static PyObject *ring_name(RingObject *self)
{
    return self->name ? self->name : Py_None;
}

/*
 * The one place where a result code becomes an exception. `size` carries the
 * message size for SHMQ_TOO_LARGE and SHMQ_FULL.
 */
static PyObject *raise_code(RingObject *self, int code, uint64_t size)
{
    PyObject *name = self ? ring_name(self) : Py_None;
    shmq_ring *r = self ? &self->ring : NULL;
    switch (code) {
    case SHMQ_FULL:
        PyErr_Format(error_class(E_FULL),
                     "queue %R is full: %llu of %llu bytes in use and a %llu-byte message needs "
                     "%llu here (frame header and padding included); wait longer (timeout=), read "
                     "faster, or create the queue with a larger capacity",
                     name, (unsigned long long)shmq_depth_bytes(r),
                     (unsigned long long)r->capacity, (unsigned long long)size,
                     (unsigned long long)shmq_bytes_needed(r, size));
        break;
    case SHMQ_EMPTY:
        PyErr_Format(error_class(E_EMPTY), "queue %R is empty", name);
        break;
    case SHMQ_TOO_LARGE: {
        unsigned long long need = 2 * shmq_frame_size(size);
        unsigned long long cap = SHMQ_MIN_CAPACITY;
        while (cap < need && cap < SHMQ_MAX_CAPACITY)
            cap <<= 1;
        PyErr_Format(error_class(E_TOO_LARGE),
                     "message of %llu bytes is larger than max_message=%llu of queue %R "
                     "(capacity %llu); nothing was written. Create the queue with capacity >= %llu",
                     (unsigned long long)size, (unsigned long long)r->max_message, name,
                     (unsigned long long)r->capacity, cap);
        break;
    }
    case SHMQ_CORRUPT:
        PyErr_Format(error_class(E_CORRUPT),
                     "queue %R is corrupt: a frame header or cursor in shared memory failed its "
                     "bounds check; remove the segment (Queue.unlink()) and create it again",
                     name);
        break;
    case SHMQ_BAD_MAGIC:
        PyErr_Format(error_class(E_CORRUPT),
                     "segment %R is not a shmq ring (wrong magic number); was it created by "
                     "another program, or overwritten?", name);
        break;
    case SHMQ_NOT_READY:
        PyErr_Format(error_class(E_CORRUPT),
                     "segment %R was never finished by its creator (magic is zero); the creator "
                     "probably died while creating it: unlink it and create it again", name);
        break;
    case SHMQ_BAD_VERSION:
        PyErr_Format(error_class(E_INCOMPATIBLE),
                     "segment %R has a ring layout version this shmq does not speak (it speaks "
                     "version %u); use the same shmq version in every process", name,
                     (unsigned)SHMQ_VERSION);
        break;
    case SHMQ_BAD_KIND:
        PyErr_Format(error_class(E_INCOMPATIBLE), "segment %R has an unknown ring kind", name);
        break;
    case SHMQ_BAD_SIZE:
        PyErr_Format(error_class(E_CORRUPT),
                     "segment %R has a size that does not match its header (capacity must be a "
                     "power of two from %llu to %llu plus a %u-byte header)", name,
                     (unsigned long long)SHMQ_MIN_CAPACITY, (unsigned long long)SHMQ_MAX_CAPACITY,
                     (unsigned)SHMQ_HEADER_SIZE);
        break;
    case SHMQ_BAD_ARGUMENT:
        PyErr_Format(error_class(E_INVALID_ARGUMENT),
                     "invalid ring argument for %R: capacity must be a power of two from %llu to "
                     "%llu and kind one of spsc, mpsc, mpmc", name,
                     (unsigned long long)SHMQ_MIN_CAPACITY, (unsigned long long)SHMQ_MAX_CAPACITY);
        break;
    default:
        PyErr_Format(error_class(E_BASE), "queue %R: unexpected ring result code %d", name, code);
    }
    return NULL;
}

static PyObject *raise_closed(RingObject *self)
{
    PyErr_Format(error_class(E_CLOSED), "queue %R is closed; open it again by name to use it",
                 ring_name(self));
    return NULL;
}

#define CHECK_OPEN(self, ret)                  \
    do {                                       \
        if ((self)->closed || !(self)->mapped) { \
            raise_closed(self);                \
            return ret;                        \
        }                                      \
    } while (0)

/* ------------------------------------------------------------------ */
/* Pinning: the mapping outlives close() while anyone still uses it     */
/* ------------------------------------------------------------------ */

static void ring_pin(RingObject *self) { self->pins++; }

static void ring_unpin(RingObject *self)
{
    if (--self->pins == 0 && self->closed && self->mapped) {
        PyBuffer_Release(&self->mapping);
        self->mapped = 0;
    }
}

/* ------------------------------------------------------------------ */
/* Timeouts and waiting                                                */
/* ------------------------------------------------------------------ */

/* None -> wait forever (-1); 0 -> do not wait (0); else an absolute deadline.
 * A bool is multiprocessing's `block` flag in the same position (q.get(False),
 * q.put(x, False)): True waits forever, False does not wait; it never means
 * "1 second". */
static int parse_timeout(PyObject *timeout, int64_t *deadline)
{
    if (timeout == NULL || timeout == Py_None || timeout == Py_True) {
        *deadline = -1;
        return 0;
    }
    if (timeout == Py_False) {
        *deadline = 0;
        return 0;
    }
    double seconds = PyFloat_AsDouble(timeout);
    if (seconds == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(error_class(E_ARGUMENT_TYPE),
                     "timeout must be a number of seconds or None, got %.100s",
                     Py_TYPE(timeout)->tp_name);
        return -1;
    }
    if (!(seconds >= 0)) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT),
                     "timeout must be a non-negative number of seconds or None, got %R", timeout);
        return -1;
    }
    if (seconds == 0) {
        *deadline = 0;
        return 0;
    }
    if (seconds > 1e9) { /* effectively forever; avoids int64 overflow */
        *deadline = -1;
        return 0;
    }
    *deadline = shmq_now_ns() + (int64_t)(seconds * 1e9);
    if (*deadline <= 0)
        *deadline = 1;
    return 0;
}

enum { WAIT_AGAIN = 0, WAIT_TIMED_OUT = 1, WAIT_ERROR = -1 };

/*
 * Waits for `condition` with the GIL released, for at most one slice.
 * WAIT_AGAIN: try the operation again; WAIT_TIMED_OUT: the deadline passed;
 * WAIT_ERROR: an exception is set (a signal handler raised, or closed).
 */
static int wait_for(RingObject *self, int condition, uint64_t arg, int64_t deadline, int strategy)
{
    int64_t now = shmq_now_ns();
    /* Whoever waits also checks, now and then, whether a dead process holds what it waits for
     * (a claim the commit cursor waits on, a frame the release cursor waits on). Once per
     * recovery interval of stall; a few loads otherwise. */
    if (shmq_recover(&self->ring, now) > 0 && shmq_condition_holds(&self->ring, condition, arg))
        return WAIT_AGAIN;
    if (deadline == 0)
        return WAIT_TIMED_OUT;
    if (deadline > 0 && now >= deadline)
        return WAIT_TIMED_OUT;
    if (strategy == SHMQ_WAIT_SPIN || strategy == SHMQ_WAIT_ADAPTIVE) {
        /* Dropping and retaking the GIL costs more than a whole hand-off: poll
         * briefly with it held first. */
        for (int i = 0; i < GIL_SPIN_ITERATIONS; i++) {
            if (shmq_condition_holds(&self->ring, condition, arg))
                return WAIT_AGAIN;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
    int64_t slice_end = now + WAIT_SLICE_NS;
    int64_t until = (deadline < 0 || deadline > slice_end) ? slice_end : deadline;
    int rc;
    ring_pin(self);
    Py_BEGIN_ALLOW_THREADS
    rc = shmq_wait(&self->ring, condition, arg, strategy, until, self->spin_ns);
    Py_END_ALLOW_THREADS
    ring_unpin(self);
    if (PyErr_CheckSignals() < 0)
        return WAIT_ERROR;
    if (self->closed || !self->mapped) {
        raise_closed(self);
        return WAIT_ERROR;
    }
    (void)rc;
    if (deadline > 0 && shmq_now_ns() >= deadline && !shmq_condition_holds(&self->ring, condition, arg))
        return WAIT_TIMED_OUT;
    return WAIT_AGAIN;
}

/*
 * Commits a written claim (or, with deliver=0, abandons it: nothing delivered).
 * Multi-producer commits go in claim order; our predecessor is normally
 * mid-copy and done within nanoseconds, but it may hold a put_view, be
 * descheduled, or be dead. So we wait for our turn only until `deadline`
 * (0: not at all) and while no signal is pending; then we hand the claim to
 * whoever commits our predecessor (shmq_defer_commit) and return: we never wait
 * on another producer longer than our caller allowed. After a signal the claim
 * is handed over as padding (nothing delivered) and -1 returns with the
 * exception set. Only if all deferral slots are busy do we keep waiting.
 */
static int finish_claim(RingObject *self, const shmq_span *span, int deliver, int64_t deadline)
{
    shmq_ring *r = &self->ring;
    int interrupted = 0;
    for (int i = 0; i < GIL_SPIN_ITERATIONS && !shmq_commit_ready(r, span); i++) {
    }
    if (!shmq_commit_ready(r, span)) {
        ring_pin(self);
        for (;;) {
            if (shmq_commit_ready(r, span))
                break;
            int64_t now = shmq_now_ns();
            if (shmq_recover(r, now) > 0 && shmq_commit_ready(r, span))
                break; /* the claim we waited behind was a dead producer's */
            if (interrupted || deadline == 0 || (deadline > 0 && now >= deadline)) {
                if (shmq_defer_commit(r, span, !deliver || interrupted) == SHMQ_OK) {
                    ring_unpin(self);
                    return interrupted ? -1 : 0;
                }
            }
            int64_t until = now + WAIT_SLICE_NS;
            if (deadline > now && deadline < until)
                until = deadline;
            Py_BEGIN_ALLOW_THREADS
            shmq_wait(r, SHMQ_COMMIT_TURN, span->start, SHMQ_WAIT_ADAPTIVE, until, self->spin_ns);
            Py_END_ALLOW_THREADS
            if (!interrupted && PyErr_CheckSignals() < 0)
                interrupted = 1;
        }
        ring_unpin(self);
    }
    if (deliver && !interrupted)
        shmq_commit(r, span);
    else
        shmq_abandon(r, span);
    return interrupted ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* Message buffers                                                     */
/* ------------------------------------------------------------------ */

static int get_message_buffer(PyObject *data, Py_buffer *view)
{
    if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) == 0)
        return 0;
    if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_TypeError) ||
        PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (PyUnicode_Check(data))
            PyErr_Format(error_class(E_MESSAGE_TYPE),
                         "a message must be a bytes-like object, got str; encode it first "
                         "(e.g. text.encode()) or use put_obj()");
        else if (PyObject_CheckBuffer(data))
            PyErr_Format(error_class(E_MESSAGE_TYPE),
                         "a message must be a C-contiguous buffer, got a non-contiguous %.100s "
                         "(%S); copy it first, e.g. numpy.ascontiguousarray(x)",
                         Py_TYPE(data)->tp_name, value ? value : Py_None);
        else
            PyErr_Format(error_class(E_MESSAGE_TYPE),
                         "a message must be a C-contiguous buffer (bytes, bytearray, memoryview, "
                         "numpy array), got %.100s; use put_obj() to send any picklable object",
                         Py_TYPE(data)->tp_name);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    return -1;
}

static int check_length(RingObject *self, Py_ssize_t length)
{
    if (shmq_check_length(&self->ring, (uint64_t)length) != SHMQ_OK) {
        raise_code(self, SHMQ_TOO_LARGE, (uint64_t)length);
        return -1;
    }
    return 0;
}

/* nbytes arguments: an int >= 0; oversize is MessageTooLarge, not OverflowError. */
static int parse_nbytes(RingObject *self, PyObject *obj, Py_ssize_t *nbytes)
{
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(error_class(E_ARGUMENT_TYPE), "nbytes must be an int, got %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *nbytes = PyNumber_AsSsize_t(obj, NULL); /* clamps instead of overflowing */
    if (*nbytes == -1 && PyErr_Occurred())
        return -1;
    if (*nbytes < 0) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT), "nbytes must be >= 0, got %R", obj);
        return -1;
    }
    return check_length(self, *nbytes);
}

/* A put_view left open in this thread would deadlock the ordered commit of
 * anything put after it (and breaks the single-producer promise on spsc). */
static int check_no_open_write_slot(RingObject *self)
{
    if (self->write_slots &&
        (!self->ring.multi_producer || self->write_slot_thread == PyThread_get_thread_ident())) {
        PyErr_Format(error_class(E_BASE),
                     "a put_view() on queue %R is still open; leave its with-block before "
                     "putting more from this %s", ring_name(self),
                     self->ring.multi_producer ? "thread" : "single-producer queue");
        return -1;
    }
    return 0;
}

static int check_no_open_read_slot(RingObject *self)
{
    if (self->read_slots && !self->ring.multi_consumer) {
        PyErr_Format(error_class(E_BASE),
                     "a get_view() on single-consumer queue %R is still open, or a view or array "
                     "made from it is still alive; leave the with-block (and drop such objects) "
                     "before reading more", ring_name(self));
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Argument parsing for the FASTCALL hot paths                         */
/* ------------------------------------------------------------------ */

/* Fills out[0..n) from positional args and keywords named in `names`. */
static int parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames, const char *const *names, int n, int required,
                      PyObject **out)
{
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname, n,
                     nargs);
        return -1;
    }
    for (int i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    if (kwnames) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nk; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            int found = 0;
            for (int i = 0; i < n; i++) {
                if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                    if (out[i]) {
                        PyErr_Format(PyExc_TypeError, "%s() got multiple values for '%s'", fname,
                                     names[i]);
                        return -1;
                    }
                    out[i] = args[nargs + k];
                    found = 1;
                    break;
                }
            }
            if (!found) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname,
                             key);
                return -1;
            }
        }
    }
    for (int i = 0; i < required; i++) {
        if (!out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Producer operations                                                 */
/* ------------------------------------------------------------------ */

/* Claims room for one frame of `length` bytes, waiting up to the deadline. */
static int claim_one(RingObject *self, uint64_t length, int64_t deadline, shmq_span *span)
{
    for (;;) {
        int rc = shmq_claim(&self->ring, &length, 1, span);
        if (rc == SHMQ_OK)
            return 0;
        if (rc != SHMQ_FULL) {
            raise_code(self, rc, length);
            return -1;
        }
        int w = wait_for(self, SHMQ_WRITABLE, length, deadline, self->strategy);
        if (w == WAIT_ERROR)
            return -1;
        if (w == WAIT_TIMED_OUT) {
            raise_code(self, SHMQ_FULL, length);
            return -1;
        }
    }
}

static PyObject *put_impl(RingObject *self, PyObject *data, int64_t deadline)
{
    CHECK_OPEN(self, NULL);
    if (check_no_open_write_slot(self) < 0)
        return NULL;
    Py_buffer view;
    const char *src;
    Py_ssize_t length;
    int have_view = 0;
    if (PyBytes_CheckExact(data)) { /* fast path: no buffer protocol round trip */
        src = PyBytes_AS_STRING(data);
        length = PyBytes_GET_SIZE(data);
    } else {
        if (get_message_buffer(data, &view) < 0)
            return NULL;
        have_view = 1;
        src = view.buf;
        length = view.len;
    }
    PyObject *result = NULL;
    shmq_span span;
    if (check_length(self, length) == 0 && claim_one(self, (uint64_t)length, deadline, &span) == 0) {
        uint64_t pos = span.start;
        uint8_t *dst = shmq_place(&self->ring, &pos, (uint32_t)length);
        memcpy(dst, src, (size_t)length);
        if (finish_claim(self, &span, 1, deadline) == 0) {
            result = Py_None;
            Py_INCREF(result);
        }
    }
    if (have_view)
        PyBuffer_Release(&view);
    return result;
}

static const char *const put_names[] = {"data", "timeout"};

static PyObject *Ring_put(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    PyObject *a[2];
    int64_t deadline;
    if (!kwnames && nargs == 1) { /* hot path */
        deadline = -1;
        return put_impl(self, args[0], deadline);
    }
    if (parse_args("put", args, nargs, kwnames, put_names, 2, 1, a) < 0 ||
        parse_timeout(a[1], &deadline) < 0)
        return NULL;
    return put_impl(self, a[0], deadline);
}

static PyObject *Ring_put_nowait(RingObject *self, PyObject *data)
{
    return put_impl(self, data, 0);
}

static const char *const put_many_names[] = {"messages", "timeout"};

static PyObject *Ring_put_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[2];
    int64_t deadline;
    if (parse_args("put_many", args, nargs, kwnames, put_many_names, 2, 1, a) < 0 ||
        parse_timeout(a[1], &deadline) < 0)
        return NULL;
    CHECK_OPEN(self, NULL);
    if (check_no_open_write_slot(self) < 0)
        return NULL;
    if (PyBytes_Check(a[0]) || PyByteArray_Check(a[0]) || PyMemoryView_Check(a[0]) ||
        PyUnicode_Check(a[0])) {
        PyErr_Format(error_class(E_ARGUMENT_TYPE),
                     "put_many() takes an iterable of messages, got a single %.100s; use put() for "
                     "one message", Py_TYPE(a[0])->tp_name);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(a[0], "put_many() needs an iterable of messages");
    if (!seq) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(error_class(E_ARGUMENT_TYPE),
                         "put_many() takes an iterable of messages, got %.100s",
                         Py_TYPE(a[0])->tp_name);
        }
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);

    /* Validate every message first: a bad one raises before anything is written. */
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t length;
        if (PyBytes_CheckExact(items[i])) {
            length = PyBytes_GET_SIZE(items[i]);
        } else {
            Py_buffer v;
            if (get_message_buffer(items[i], &v) < 0) {
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                PyErr_Format(type, "message %zd of %zd: %S", i, n, value);
                Py_XDECREF(type);
                Py_XDECREF(value);
                Py_XDECREF(tb);
                Py_DECREF(seq);
                return NULL;
            }
            length = v.len;
            PyBuffer_Release(&v);
        }
        if (check_length(self, length) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }

    Py_buffer views[PUT_MANY_CHUNK];
    uint64_t lengths[PUT_MANY_CHUNK];
    const char *srcs[PUT_MANY_CHUNK];
    char have[PUT_MANY_CHUNK];
    Py_ssize_t done = 0;
    int failed = 0;
    while (done < n && !failed) {
        Py_ssize_t chunk = n - done < PUT_MANY_CHUNK ? n - done : PUT_MANY_CHUNK;
        for (Py_ssize_t j = 0; j < chunk; j++) {
            PyObject *item = items[done + j];
            have[j] = 0;
            if (PyBytes_CheckExact(item)) {
                srcs[j] = PyBytes_AS_STRING(item);
                lengths[j] = (uint64_t)PyBytes_GET_SIZE(item);
            } else if (PyObject_GetBuffer(item, &views[j], PyBUF_SIMPLE) == 0) {
                have[j] = 1;
                srcs[j] = views[j].buf;
                lengths[j] = (uint64_t)views[j].len;
                if (shmq_check_length(&self->ring, lengths[j]) != SHMQ_OK) {
                    /* The buffer changed size since validation: stop before writing it. */
                    raise_code(self, SHMQ_TOO_LARGE, lengths[j]);
                    chunk = j + 1;
                    failed = 1;
                    break;
                }
            } else {
                chunk = j + 1;
                failed = 1;
                break;
            }
        }
        Py_ssize_t usable = failed ? chunk - 1 : chunk;
        Py_ssize_t j = 0;
        while (j < usable) {
            shmq_span span;
            Py_ssize_t take = 1;
            uint64_t piece = lengths[j];
            while (j + take < usable && piece < BATCH_BYTES)
                piece += lengths[j + take++];
            int rc = shmq_claim(&self->ring, lengths + j, (size_t)take, &span);
            if (rc == SHMQ_CORRUPT) {
                raise_code(self, rc, lengths[j]);
                failed = 1;
                break;
            }
            if (rc != SHMQ_OK) {
                int w = wait_for(self, SHMQ_WRITABLE, lengths[j], deadline, self->strategy);
                if (w == WAIT_AGAIN)
                    continue;
                if (w == WAIT_ERROR)
                    failed = 1;
                else
                    failed = 2; /* timed out: report how many were put */
                break;
            }
            uint64_t pos = span.start;
            for (uint64_t k = 0; k < span.count; k++) {
                uint8_t *dst = shmq_place(&self->ring, &pos, (uint32_t)lengths[j + k]);
                memcpy(dst, srcs[j + k], (size_t)lengths[j + k]);
            }
            if (finish_claim(self, &span, 1, deadline) < 0) {
                failed = 1;
                break;
            }
            j += (Py_ssize_t)span.count;
        }
        done += j;
        for (Py_ssize_t k = 0; k < chunk; k++)
            if (have[k])
                PyBuffer_Release(&views[k]);
        if (failed == 2) {
            failed = 0;
            break;
        }
    }
    Py_DECREF(seq);
    if (failed)
        return NULL;
    return PyLong_FromSsize_t(done);
}

/* ------------------------------------------------------------------ */
/* Consumer operations                                                 */
/* ------------------------------------------------------------------ */

/* Reads up to max frames, waiting up to the deadline for the first.
 * Returns 1 with a span, 0 if the deadline passed with nothing, -1 on error. */
static int read_span(RingObject *self, size_t max, int64_t deadline, shmq_span *span)
{
    for (;;) {
        int rc = shmq_read(&self->ring, max, BATCH_BYTES, span);
        if (rc == SHMQ_OK)
            return 1;
        if (rc != SHMQ_EMPTY) {
            raise_code(self, rc, 0);
            return -1;
        }
        int w = wait_for(self, SHMQ_READABLE, 0, deadline, self->strategy);
        if (w == WAIT_ERROR)
            return -1;
        if (w == WAIT_TIMED_OUT)
            return 0;
    }
}

static PyObject *get_impl(RingObject *self, int64_t deadline)
{
    CHECK_OPEN(self, NULL);
    if (check_no_open_read_slot(self) < 0)
        return NULL;
    shmq_span span;
    int got = read_span(self, 1, deadline, &span);
    if (got <= 0)
        return got == 0 ? raise_code(self, SHMQ_EMPTY, 0) : NULL;
    uint64_t pos = span.start;
    uint32_t length;
    const uint8_t *src = shmq_next(&self->ring, &pos, span.end, &length);
    if (!src) {
        shmq_release(&self->ring, &span);
        return raise_code(self, SHMQ_CORRUPT, 0);
    }
    PyObject *out = PyBytes_FromStringAndSize((const char *)src, length);
    /* On a single-consumer ring a failed allocation leaves the message queued;
     * a multi-consumer claim cannot be undone, so it is released either way. */
    if (out || self->ring.multi_consumer)
        shmq_release(&self->ring, &span);
    return out;
}

static const char *const get_names[] = {"timeout"};

static PyObject *Ring_get(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    PyObject *a[1];
    int64_t deadline;
    if (!kwnames && nargs == 0)
        return get_impl(self, -1);
    if (parse_args("get", args, nargs, kwnames, get_names, 1, 0, a) < 0 ||
        parse_timeout(a[0], &deadline) < 0)
        return NULL;
    return get_impl(self, deadline);
}

static PyObject *Ring_get_nowait(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    return get_impl(self, 0);
}

/* Makes the Python object for one message of read_many(); NULL with an exception. */
typedef PyObject *(*make_item_fn)(void *ctx, RingObject *ring, const uint8_t *src, uint32_t length);

static PyObject *make_bytes(void *Py_UNUSED(ctx), RingObject *Py_UNUSED(ring), const uint8_t *src,
                            uint32_t length)
{
    return PyBytes_FromStringAndSize((const char *)src, length);
}

/*
 * The loop of get_many() and of the subscriber's recv_many(): waits for the first piece, then
 * takes the following pieces while messages are there, up to max messages and about
 * GET_MANY_BYTES (a bounded list stays in the allocator's and the cache's working set;
 * multi-megabyte ones are returned to the kernel on free and page-faulted back every call).
 * Each piece is released as soon as it is copied, so producers refill the ring while we copy
 * the next one.
 */
static PyObject *read_many(RingObject *self, Py_ssize_t max, int64_t deadline, make_item_fn make, void *ctx)
{
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    uint64_t taken = 0;
    while (PyList_GET_SIZE(list) < max && taken < GET_MANY_BYTES) {
        shmq_span span;
        Py_ssize_t want = max - PyList_GET_SIZE(list);
        int got = read_span(self, (size_t)want, PyList_GET_SIZE(list) ? 0 : deadline, &span);
        if (got < 0) {
            if (PyList_GET_SIZE(list) == 0)
                goto fail;
            PyErr_Clear(); /* deliver what we have; the error comes back next call */
            break;
        }
        if (got == 0)
            break;
        uint64_t pos = span.start;
        for (uint64_t i = 0; i < span.count; i++) {
            uint32_t length;
            const uint8_t *src = shmq_next(&self->ring, &pos, span.end, &length);
            if (!src) {
                shmq_release(&self->ring, &span);
                raise_code(self, SHMQ_CORRUPT, 0);
                goto fail;
            }
            PyObject *item = make(ctx, self, src, length);
            if (!item || PyList_Append(list, item) < 0) {
                Py_XDECREF(item);
                /* Out of memory, a single consumer leaves the piece queued (a multi-consumer
                 * claim cannot be undone); a message that cannot be made (damaged) is
                 * released, or it would fail again forever. */
                if (self->ring.multi_consumer || !PyErr_ExceptionMatches(PyExc_MemoryError))
                    shmq_release(&self->ring, &span);
                goto fail;
            }
            Py_DECREF(item);
        }
        taken += span.bytes;
        shmq_release(&self->ring, &span);
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

/* max_messages arguments: None (keep the default) or an int >= 1. */
static int parse_max_messages(PyObject *obj, Py_ssize_t *max)
{
    if (!obj || obj == Py_None)
        return 0;
    if (PyBool_Check(obj) || !PyLong_Check(obj)) {
        PyErr_Format(error_class(E_ARGUMENT_TYPE), "max_messages must be an int, got %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *max = PyLong_AsSsize_t(obj);
    if (*max == -1 && PyErr_Occurred())
        return -1;
    if (*max < 1) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT), "max_messages must be at least 1, got %zd", *max);
        return -1;
    }
    return 0;
}

static const char *const get_many_names[] = {"max_messages", "timeout"};

static PyObject *Ring_get_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[2];
    int64_t deadline;
    Py_ssize_t max = 1024;
    if (parse_args("get_many", args, nargs, kwnames, get_many_names, 2, 0, a) < 0 ||
        parse_timeout(a[1], &deadline) < 0)
        return NULL;
    if (parse_max_messages(a[0], &max) < 0)
        return NULL;
    CHECK_OPEN(self, NULL);
    if (check_no_open_read_slot(self) < 0)
        return NULL;
    return read_many(self, max, deadline, make_bytes, NULL);
}

/* ------------------------------------------------------------------ */
/* Zero-copy slots                                                     */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    RingObject *ring;   /* strong reference; NULL once released */
    shmq_span span;
    uint8_t *payload;
    Py_ssize_t length;
    int writable;
    Py_ssize_t exports;
    PyObject *view;     /* the memoryview handed out by __enter__ */
} SlotObject;

static PyTypeObject ReadSlotType;
static PyTypeObject WriteSlotType;

static SlotObject *slot_new(PyTypeObject *type, RingObject *ring, const shmq_span *span,
                            uint8_t *payload, Py_ssize_t length)
{
    SlotObject *slot = PyObject_New(SlotObject, type);
    if (!slot)
        return NULL;
    Py_INCREF(ring);
    slot->ring = ring;
    slot->span = *span;
    slot->payload = payload;
    slot->length = length;
    slot->writable = type == &WriteSlotType;
    slot->exports = 0;
    slot->view = NULL;
    ring_pin(ring);
    if (slot->writable) {
        ring->write_slots++;
        ring->write_slot_thread = PyThread_get_thread_ident();
    } else {
        ring->read_slots++;
    }
    return slot;
}

/* Ends the lease: a read slot releases its frame; a write slot commits it, or
 * turns it into padding (nothing delivered) when `deliver` is false. Returns -1
 * with an exception set if a signal interrupted the commit (nothing delivered). */
static int slot_finish(SlotObject *slot, int deliver, int64_t deadline)
{
    RingObject *ring = slot->ring;
    int rc = 0;
    if (!ring)
        return 0;
    slot->ring = NULL;
    if (slot->writable) {
        rc = finish_claim(ring, &slot->span, deliver, deadline);
        ring->write_slots--;
    } else {
        shmq_release(&ring->ring, &slot->span);
        ring->read_slots--;
    }
    ring_unpin(ring);
    Py_DECREF(ring);
    return rc;
}

static int Slot_getbuffer(SlotObject *self, Py_buffer *view, int flags)
{
    if (!self->ring) {
        PyErr_SetString(PyExc_BufferError,
                        "this shmq view was already released (its with-block has ended)");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->payload, self->length, !self->writable,
                          flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void Slot_releasebuffer(SlotObject *self, Py_buffer *Py_UNUSED(view)) { self->exports--; }

static PyBufferProcs Slot_as_buffer = {
    (getbufferproc)Slot_getbuffer,
    (releasebufferproc)Slot_releasebuffer,
};

static PyObject *Slot_enter(SlotObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->ring) {
        PyErr_SetString(error_class(E_BASE), "this shmq view was already released");
        return NULL;
    }
    if (!self->view) {
        self->view = PyMemoryView_FromObject((PyObject *)self);
        if (!self->view)
            return NULL;
    }
    Py_INCREF(self->view);
    return self->view;
}

/* Ends our memoryview. Returns -1 (BufferError set) if a buffer derived from it
 * is still alive: numpy.frombuffer(view), a slice, memoryview(view). Those keep
 * pointers into the ring, so the lease must outlive them: the slot stays
 * claimed, and alive (the derived buffers reference it), and Slot_dealloc ends
 * the lease when the last of them is gone. Never a dangling pointer. */
static int slot_drop_view(SlotObject *self)
{
    if (self->view) {
        PyObject *r = PyObject_CallMethod(self->view, "release", NULL);
        if (r)
            Py_DECREF(r);
        else if (PyErr_ExceptionMatches(PyExc_BufferError))
            PyErr_Clear(); /* something holds an export of the view itself */
        else
            return -1;
        Py_CLEAR(self->view); /* also breaks the slot <-> view reference cycle */
    }
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError,
                        "a buffer made from the shmq view (numpy.frombuffer(view), a slice, "
                        "memoryview(view), ...) is still alive at the end of the with-block. The "
                        "message stays leased (its bytes are not reused) until that object is "
                        "deleted; copy what you need inside the block instead (bytes(view), "
                        "array.copy())");
        return -1;
    }
    return 0;
}

static PyObject *Slot_exit(SlotObject *self, PyObject *args)
{
    PyObject *exc_type = PyTuple_GET_SIZE(args) > 0 ? PyTuple_GET_ITEM(args, 0) : Py_None;
    if (slot_drop_view(self) < 0)
        return NULL; /* lease deferred; a write slot will deliver nothing */
    if (slot_finish(self, exc_type == Py_None, -1) < 0)
        return NULL;
    Py_RETURN_FALSE;
}

static PyObject *Slot_release(SlotObject *self, PyObject *Py_UNUSED(ignored))
{
    if (slot_drop_view(self) < 0 || slot_finish(self, 0, -1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Slot_commit(SlotObject *self, PyObject *Py_UNUSED(ignored))
{
    if (slot_drop_view(self) < 0 || slot_finish(self, 1, -1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void Slot_dealloc(SlotObject *self)
{
    Py_CLEAR(self->view);
    if (self->ring) {
        /* Never wait in a destructor: hand the claim over at once if need be. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        slot_finish(self, 0, 0);
        PyErr_Restore(type, value, tb);
    }
    PyObject_Free(self);
}

static PyObject *Slot_get_nbytes(SlotObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(self->length);
}

static PyObject *Slot_get_released(SlotObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->ring == NULL);
}

static PyMethodDef ReadSlot_methods[] = {
    {"__enter__", (PyCFunction)Slot_enter, METH_NOARGS, "Return a read-only memoryview of the message."},
    {"__exit__", (PyCFunction)Slot_exit, METH_VARARGS, "Release the message back to the ring."},
    {"release", (PyCFunction)Slot_release, METH_NOARGS, "Release the message back to the ring."},
    {NULL},
};

static PyMethodDef WriteSlot_methods[] = {
    {"__enter__", (PyCFunction)Slot_enter, METH_NOARGS, "Return a writable memoryview into the ring."},
    {"__exit__", (PyCFunction)Slot_exit, METH_VARARGS,
     "Commit the message, or abandon it if the block raised."},
    {"commit", (PyCFunction)Slot_commit, METH_NOARGS, "Deliver the message."},
    {"abandon", (PyCFunction)Slot_release, METH_NOARGS, "Deliver nothing; the space is reused once readers pass it."},
    {NULL},
};

static PyGetSetDef Slot_getset[] = {
    {"nbytes", (getter)Slot_get_nbytes, NULL, "payload size in bytes", NULL},
    {"released", (getter)Slot_get_released, NULL, "True once the lease has ended", NULL},
    {NULL},
};

static PyTypeObject ReadSlotType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._native._ring.ReadSlot",
    .tp_basicsize = sizeof(SlotObject),
    .tp_dealloc = (destructor)Slot_dealloc,
    .tp_as_buffer = &Slot_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A message leased from the ring; use it as a context manager.",
    .tp_methods = ReadSlot_methods,
    .tp_getset = Slot_getset,
};

static PyTypeObject WriteSlotType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._native._ring.WriteSlot",
    .tp_basicsize = sizeof(SlotObject),
    .tp_dealloc = (destructor)Slot_dealloc,
    .tp_as_buffer = &Slot_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Space claimed in the ring; use it as a context manager.",
    .tp_methods = WriteSlot_methods,
    .tp_getset = Slot_getset,
};

static const char *const put_view_names[] = {"nbytes", "timeout"};

static PyObject *Ring_put_view(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[2];
    int64_t deadline;
    if (parse_args("put_view", args, nargs, kwnames, put_view_names, 2, 1, a) < 0 ||
        parse_timeout(a[1], &deadline) < 0)
        return NULL;
    Py_ssize_t nbytes;
    CHECK_OPEN(self, NULL);
    if (parse_nbytes(self, a[0], &nbytes) < 0 || check_no_open_write_slot(self) < 0)
        return NULL;
    shmq_span span;
    if (claim_one(self, (uint64_t)nbytes, deadline, &span) < 0)
        return NULL;
    uint64_t pos = span.start;
    uint8_t *dst = shmq_place(&self->ring, &pos, (uint32_t)nbytes);
    SlotObject *slot = slot_new(&WriteSlotType, self, &span, dst, nbytes);
    if (!slot) {
        finish_claim(self, &span, 0, 0); /* out of memory: never wedge the ring */
        return NULL;
    }
    return (PyObject *)slot;
}

static PyObject *Ring_get_view(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[1];
    int64_t deadline;
    if (parse_args("get_view", args, nargs, kwnames, get_names, 1, 0, a) < 0 ||
        parse_timeout(a[0], &deadline) < 0)
        return NULL;
    CHECK_OPEN(self, NULL);
    if (check_no_open_read_slot(self) < 0)
        return NULL;
    shmq_span span;
    int got = read_span(self, 1, deadline, &span);
    if (got <= 0)
        return got == 0 ? raise_code(self, SHMQ_EMPTY, 0) : NULL;
    uint64_t pos = span.start;
    uint32_t length;
    const uint8_t *src = shmq_next(&self->ring, &pos, span.end, &length);
    if (!src) {
        shmq_release(&self->ring, &span);
        return raise_code(self, SHMQ_CORRUPT, 0);
    }
    SlotObject *slot = slot_new(&ReadSlotType, self, &span, (uint8_t *)src, length);
    if (!slot && self->ring.multi_consumer)
        shmq_release(&self->ring, &span);
    return (PyObject *)slot;
}

/* ------------------------------------------------------------------ */
/* Waiting without consuming (asyncio waiter threads use these)        */
/* ------------------------------------------------------------------ */

static PyObject *wait_condition(RingObject *self, int condition, uint64_t arg, PyObject *timeout)
{
    int64_t deadline;
    if (parse_timeout(timeout, &deadline) < 0)
        return NULL;
    CHECK_OPEN(self, NULL);
    for (;;) {
        if (shmq_condition_holds(&self->ring, condition, arg))
            Py_RETURN_TRUE;
        /* Block, not spin: these run in helper threads that should cost nothing. */
        int w = wait_for(self, condition, arg, deadline, SHMQ_WAIT_BLOCK);
        if (w == WAIT_ERROR)
            return NULL;
        if (w == WAIT_TIMED_OUT)
            return PyBool_FromLong(shmq_condition_holds(&self->ring, condition, arg));
    }
}

static const char *const wait_readable_names[] = {"timeout"};

static PyObject *Ring_wait_readable(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    PyObject *a[1];
    if (parse_args("wait_readable", args, nargs, kwnames, wait_readable_names, 1, 0, a) < 0)
        return NULL;
    return wait_condition(self, SHMQ_READABLE, 0, a[0]);
}

static const char *const wait_writable_names[] = {"nbytes", "timeout"};

static PyObject *Ring_wait_writable(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    PyObject *a[2];
    if (parse_args("wait_writable", args, nargs, kwnames, wait_writable_names, 2, 1, a) < 0)
        return NULL;
    Py_ssize_t nbytes;
    CHECK_OPEN(self, NULL);
    if (parse_nbytes(self, a[0], &nbytes) < 0)
        return NULL;
    return wait_condition(self, SHMQ_WRITABLE, (uint64_t)nbytes, a[1]);
}

/* ------------------------------------------------------------------ */
/* Observation, lifecycle                                              */
/* ------------------------------------------------------------------ */

static PyObject *Ring_qsize(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self, NULL);
    return PyLong_FromUnsignedLongLong(shmq_depth_messages(&self->ring));
}

static PyObject *Ring_empty(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self, NULL);
    return PyBool_FromLong(shmq_depth_messages(&self->ring) == 0);
}

static PyObject *Ring_full(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self, NULL);
    return PyBool_FromLong(!shmq_condition_holds(&self->ring, SHMQ_WRITABLE, 0));
}

static PyObject *Ring_counters(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self, NULL);
    shmq_ring *r = &self->ring;
#define LOAD(p) (unsigned long long)atomic_load_explicit((p), memory_order_relaxed)
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "messages_put",
        LOAD(r->put_count), "bytes_put", LOAD(r->put_bytes), "messages_got", LOAD(r->get_count),
        "bytes_got", LOAD(r->get_bytes), "put_waits", LOAD(r->put_waits), "get_waits",
        LOAD(r->get_waits), "data_wakes", LOAD(r->data_wakes), "space_wakes",
        LOAD(r->space_wakes), "tail_claim", LOAD(r->tail_claim), "tail_commit",
        LOAD(r->tail_commit), "head_claim", LOAD(r->head_claim), "head_release",
        LOAD(r->head_release), "depth_messages", (unsigned long long)shmq_depth_messages(r),
        "depth_bytes", (unsigned long long)shmq_depth_bytes(r), "deferred_commits",
        LOAD(r->deferred_total), "dead_producer_claims", LOAD(r->dead_producer_claims),
        "dead_producer_bytes", LOAD(r->dead_producer_bytes), "dead_consumer_messages",
        LOAD(r->dead_consumer_messages));
#undef LOAD
}

/* Publish this handle's claims in attachment entry `index` (-1: none), so that recovery can
 * tell them from a dead process's. Called by shmq.Queue once it holds the entry, and again in
 * a forked child for the child's own entry. */
static PyObject *Ring_track(RingObject *self, PyObject *arg)
{
    CHECK_OPEN(self, NULL);
    long index = PyLong_AsLong(arg);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < -1 || index >= SHMQ_ATTACH_SLOTS) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT), "attachment entry %ld out of range", index);
        return NULL;
    }
    shmq_track(&self->ring, (int)index);
    Py_RETURN_NONE;
}

static PyObject *Ring_recover_now(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self, NULL);
    return PyLong_FromLong(shmq_recover_now(&self->ring));
}

static PyObject *Ring_open_claims(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self, NULL);
    shmq_ring *r = &self->ring;
    return Py_BuildValue("(nn)", (Py_ssize_t)(r->open_n[0] + r->open_overflow[0]),
                         (Py_ssize_t)(r->open_n[1] + r->open_overflow[1]));
}

static PyObject *Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed)
        Py_RETURN_NONE;
    self->closed = 1;
    if (self->mapped) {
        /* Hurry our own waiting threads; waiters elsewhere re-check and sleep on. */
        shmq_wake_all(&self->ring);
        if (self->pins == 0) {
            PyBuffer_Release(&self->mapping);
            self->mapped = 0;
        }
    }
    Py_RETURN_NONE;
}

static int Ring_init(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "name", "wait", "spin_ns", NULL};
    PyObject *buffer, *name = Py_None;
    int strategy = SHMQ_WAIT_ADAPTIVE;
    long long spin_ns = DEFAULT_SPIN_NS;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OiL:Ring", kwlist, &buffer, &name, &strategy,
                                     &spin_ns))
        return -1;
    if (self->mapped) {
        PyErr_SetString(error_class(E_BASE), "Ring.__init__ called twice");
        return -1;
    }
    if (strategy < SHMQ_WAIT_SPIN || strategy > SHMQ_WAIT_ADAPTIVE || spin_ns < 0) {
        PyErr_SetString(error_class(E_INVALID_ARGUMENT), "invalid wait strategy or spin_ns");
        return -1;
    }
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    if (PyObject_GetBuffer(buffer, &self->mapping, PyBUF_WRITABLE) < 0)
        return -1;
    int rc = shmq_attach(&self->ring, self->mapping.buf, (uint64_t)self->mapping.len);
    if (rc != SHMQ_OK) {
        PyBuffer_Release(&self->mapping);
        raise_code(self, rc, 0);
        return -1;
    }
    self->mapped = 1;
    self->closed = 0;
    self->strategy = strategy;
    self->spin_ns = spin_ns;
    return 0;
}

static void Ring_dealloc(RingObject *self)
{
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->mapped)
        PyBuffer_Release(&self->mapping);
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Ring_get_capacity(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->ring.capacity);
}

static PyObject *Ring_get_max_message(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->ring.max_message);
}

static PyObject *Ring_get_kind_code(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->ring.kind);
}

static PyObject *Ring_get_closed(RingObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->closed || !self->mapped);
}

static PyObject *Ring_get_wait_code(RingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->strategy);
}

static PyMethodDef Ring_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Ring_put, METH_FASTCALL | METH_KEYWORDS,
     "put(data, timeout=None): copy one message into the ring, waiting for room."},
    {"put_nowait", (PyCFunction)Ring_put_nowait, METH_O, "put_nowait(data): put or raise Full."},
    {"put_many", (PyCFunction)(void (*)(void))Ring_put_many, METH_FASTCALL | METH_KEYWORDS,
     "put_many(messages, timeout=None) -> int: put all in order; returns how many were put."},
    {"get", (PyCFunction)(void (*)(void))Ring_get, METH_FASTCALL | METH_KEYWORDS,
     "get(timeout=None) -> bytes: take one message, waiting for one."},
    {"get_nowait", (PyCFunction)Ring_get_nowait, METH_NOARGS, "get_nowait() -> bytes or raise Empty."},
    {"get_many", (PyCFunction)(void (*)(void))Ring_get_many, METH_FASTCALL | METH_KEYWORDS,
     "get_many(max_messages=1024, timeout=None) -> list[bytes]: wait for one, then take what is there "
     "(up to max_messages and about 256 KiB; [] on timeout)."},
    {"put_view", (PyCFunction)(void (*)(void))Ring_put_view, METH_FASTCALL | METH_KEYWORDS,
     "put_view(nbytes, timeout=None) -> WriteSlot: claim space to fill in place."},
    {"get_view", (PyCFunction)(void (*)(void))Ring_get_view, METH_FASTCALL | METH_KEYWORDS,
     "get_view(timeout=None) -> ReadSlot: lease the next message without copying."},
    {"wait_readable", (PyCFunction)(void (*)(void))Ring_wait_readable,
     METH_FASTCALL | METH_KEYWORDS, "wait_readable(timeout=None) -> bool (blocks, GIL released)."},
    {"wait_writable", (PyCFunction)(void (*)(void))Ring_wait_writable,
     METH_FASTCALL | METH_KEYWORDS, "wait_writable(nbytes, timeout=None) -> bool."},
    {"qsize", (PyCFunction)Ring_qsize, METH_NOARGS, "Approximate number of queued messages."},
    {"empty", (PyCFunction)Ring_empty, METH_NOARGS, "True if no message is ready to read."},
    {"full", (PyCFunction)Ring_full, METH_NOARGS, "True if not even an empty message fits."},
    {"_counters", (PyCFunction)Ring_counters, METH_NOARGS, "Raw counters and cursors."},
    {"_track", (PyCFunction)Ring_track, METH_O,
     "_track(index): publish this handle's claims in attachment entry index (-1: stop)."},
    {"_recover_now", (PyCFunction)Ring_recover_now, METH_NOARGS,
     "_recover_now() -> int: recover dead peers' claims now (see ARCHITECTURE); stalls cleared."},
    {"_open_claims", (PyCFunction)Ring_open_claims, METH_NOARGS,
     "_open_claims() -> (writes, reads): claims this handle holds, as tracked."},
    {"_close_ring", (PyCFunction)Ring_close, METH_NOARGS, "Stop using the mapping."},
    {NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"capacity", (getter)Ring_get_capacity, NULL, "data bytes in the ring", NULL},
    {"max_message", (getter)Ring_get_max_message, NULL, "largest payload accepted", NULL},
    {"_kind_code", (getter)Ring_get_kind_code, NULL, "1 spsc, 2 mpsc, 3 mpmc", NULL},
    {"closed", (getter)Ring_get_closed, NULL, "True after close()", NULL},
    {"_wait_code", (getter)Ring_get_wait_code, NULL, "wait strategy code", NULL},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._native._ring.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A ring in a shared-memory mapping (shmq.Queue is the public face).",
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
    .tp_init = (initproc)Ring_init,
    .tp_new = PyType_GenericNew,
    .tp_weaklistoffset = offsetof(RingObject, weakreflist),
};

/* The pub/sub binding shares this translation unit (and its helpers). */
#include "_hist.c"
#include "_pubsub.c"

/* ------------------------------------------------------------------ */
/* Module functions                                                    */
/* ------------------------------------------------------------------ */

static PyObject *mod_format_segment(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *buffer;
    unsigned int kind;
    unsigned long long capacity, pid, created;
    if (!PyArg_ParseTuple(args, "OIKKK:format_segment", &buffer, &kind, &capacity, &pid, &created))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    int rc = shmq_format(view.buf, (uint64_t)view.len, kind, capacity, pid, created);
    PyBuffer_Release(&view);
    if (rc != SHMQ_OK)
        return raise_code(NULL, rc, 0);
    Py_RETURN_NONE;
}

/* The attachment table lives in the header of a ring segment (any size >= HEADER_SIZE). */
static int header_view(PyObject *buffer, Py_buffer *view)
{
    if (PyObject_GetBuffer(buffer, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len < (Py_ssize_t)SHMQ_HEADER_SIZE) {
        PyBuffer_Release(view);
        PyErr_SetString(error_class(E_INVALID_ARGUMENT), "not a ring segment: shorter than its header");
        return -1;
    }
    return 0;
}

static PyObject *mod_attach_claim(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *buffer;
    unsigned long long owner, now;
    unsigned int role;
    if (!PyArg_ParseTuple(args, "OKIK:attach_claim", &buffer, &owner, &role, &now))
        return NULL;
    if (owner == 0) {
        PyErr_SetString(error_class(E_INVALID_ARGUMENT), "owner must not be 0");
        return NULL;
    }
    Py_buffer view;
    if (header_view(buffer, &view) < 0)
        return NULL;
    int index = shmq_attach_claim(view.buf, owner, role, now);
    PyBuffer_Release(&view);
    return PyLong_FromLong(index);
}

static PyObject *mod_attach_release(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *buffer;
    int index;
    unsigned long long owner;
    if (!PyArg_ParseTuple(args, "OiK:attach_release", &buffer, &index, &owner))
        return NULL;
    Py_buffer view;
    if (header_view(buffer, &view) < 0)
        return NULL;
    int done = shmq_attach_release(view.buf, index, owner);
    PyBuffer_Release(&view);
    return PyBool_FromLong(done);
}

static PyObject *mod_attach_untracked(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *buffer;
    int delta;
    if (!PyArg_ParseTuple(args, "Oi:attach_untracked", &buffer, &delta))
        return NULL;
    Py_buffer view;
    if (header_view(buffer, &view) < 0)
        return NULL;
    uint64_t now = shmq_attach_untracked(view.buf, delta);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(now);
}

static PyObject *mod_frame_size(PyObject *Py_UNUSED(m), PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(shmq_frame_size(n));
}

static PyObject *mod_set_error_classes(PyObject *Py_UNUSED(m), PyObject *mapping)
{
    if (!PyDict_Check(mapping)) {
        PyErr_SetString(PyExc_TypeError, "set_error_classes() needs a dict");
        return NULL;
    }
    for (int i = 0; i < E_COUNT; i++) {
        PyObject *cls = PyDict_GetItemString(mapping, error_class_names[i]);
        if (!cls) {
            PyErr_Format(PyExc_KeyError, "missing error class %s", error_class_names[i]);
            return NULL;
        }
        Py_INCREF(cls);
        Py_XSETREF(error_classes[i], cls);
    }
    Py_RETURN_NONE;
}

static PyObject *mod_monotonic_ns(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyLong_FromLongLong(shmq_now_ns());
}

static PyObject *mod_set_file_mode(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long mode = PyLong_AsLong(arg);
    if (mode == -1 && PyErr_Occurred())
        return NULL;
    if (mode < 0 || mode > 0777) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT), "file mode %lo is not permission bits", mode);
        return NULL;
    }
    shmq_log_file_mode = (unsigned)mode;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"format_segment", mod_format_segment, METH_VARARGS,
     "format_segment(buffer, kind, capacity, creator_pid, created_ns): write a fresh header."},
    {"frame_size", mod_frame_size, METH_O, "Bytes a payload of n bytes occupies in the ring."},
    {"attach_claim", mod_attach_claim, METH_VARARGS,
     "attach_claim(buffer, owner, role, now_ns): an attachment entry's index, or -1 if the table is full."},
    {"attach_release", mod_attach_release, METH_VARARGS,
     "attach_release(buffer, index, owner): free the entry if it is still owner's."},
    {"attach_untracked", mod_attach_untracked, METH_VARARGS,
     "attach_untracked(buffer, delta): add delta to the untracked-handles count; returns the new count."},
    {"set_error_classes", mod_set_error_classes, METH_O, "Install shmq's exception classes."},
    {"monotonic_ns", mod_monotonic_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns (same as time.monotonic_ns)."},
    {"set_file_mode", mod_set_file_mode, METH_O,
     "set_file_mode(mode): permission bits of log and spill files this process creates (default 0o600)."},
    PUBSUB_METHODS
    HIST_METHODS
    {NULL},
};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT, "_ring", "shmq's native ring engine.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__ring(void)
{
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&ReadSlotType) < 0 ||
        PyType_Ready(&WriteSlotType) < 0 || PyType_Ready(&HistogramType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ring_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObjectRef(m, "ReadSlot", (PyObject *)&ReadSlotType) < 0 ||
        PyModule_AddObjectRef(m, "WriteSlot", (PyObject *)&WriteSlotType) < 0 ||
        PyModule_AddObjectRef(m, "Histogram", (PyObject *)&HistogramType) < 0 ||
        pubsub_add_types(m) < 0)
        goto fail;
    struct { const char *name; long long value; } constants[] = {
        {"VERSION", SHMQ_VERSION}, {"HEADER_SIZE", SHMQ_HEADER_SIZE},
        {"FRAME_HEADER", SHMQ_FRAME_HEADER}, {"FRAME_ALIGN", SHMQ_FRAME_ALIGN},
        {"MIN_CAPACITY", (long long)SHMQ_MIN_CAPACITY}, {"MAX_CAPACITY", (long long)SHMQ_MAX_CAPACITY},
        {"KIND_SPSC", SHMQ_SPSC}, {"KIND_MPSC", SHMQ_MPSC}, {"KIND_MPMC", SHMQ_MPMC},
        {"WAIT_SPIN", SHMQ_WAIT_SPIN}, {"WAIT_YIELD", SHMQ_WAIT_YIELD},
        {"WAIT_BLOCK", SHMQ_WAIT_BLOCK}, {"WAIT_ADAPTIVE", SHMQ_WAIT_ADAPTIVE},
        {"DEFAULT_SPIN_NS", DEFAULT_SPIN_NS},
        {"FRAME_MSG", SHMQ_FRAME_MSG}, {"FRAME_PAD", SHMQ_FRAME_PAD}, {"FRAME_DONE", SHMQ_FRAME_DONE},
        {"OFF_MAGIC", SHMQ_OFF_MAGIC}, {"OFF_VERSION", SHMQ_OFF_VERSION}, {"OFF_KIND", SHMQ_OFF_KIND},
        {"OFF_CAPACITY", SHMQ_OFF_CAPACITY}, {"OFF_CREATOR_PID", SHMQ_OFF_CREATOR_PID},
        {"OFF_CREATED_NS", SHMQ_OFF_CREATED_NS}, {"OFF_MAX_MESSAGE", SHMQ_OFF_MAX_MESSAGE},
        {"OFF_TAIL_CLAIM", SHMQ_OFF_TAIL_CLAIM}, {"OFF_TAIL_COMMIT", SHMQ_OFF_TAIL_COMMIT},
        {"OFF_HEAD_CLAIM", SHMQ_OFF_HEAD_CLAIM}, {"OFF_HEAD_RELEASE", SHMQ_OFF_HEAD_RELEASE},
        {"OFF_DATA_WAITERS", SHMQ_OFF_DATA_WAITERS}, {"OFF_SPACE_WAITERS", SHMQ_OFF_SPACE_WAITERS},
        {"OFF_UNTRACKED", SHMQ_OFF_UNTRACKED}, {"OFF_ATTACH", SHMQ_OFF_ATTACH},
        {"OFF_RECOVER_LOCK", SHMQ_OFF_RECOVER_LOCK}, {"RECOVER_AFTER_NS", SHMQ_RECOVER_AFTER_NS},
        {"OFF_DEFERRED", SHMQ_OFF_DEFERRED}, {"DEFERRED_SLOTS", SHMQ_DEFERRED_SLOTS},
        {"DEFERRED_SLOT_SIZE", SHMQ_DEFERRED_SLOT_SIZE},
        {"HIST_HEADER", SHMQ_HIST_HEADER}, {"HIST_VERSION", SHMQ_HIST_VERSION},
        {"ATTACH_SLOT_SIZE", SHMQ_ATTACH_SLOT_SIZE}, {"ATTACH_SLOTS", SHMQ_ATTACH_SLOTS},
    };
    for (size_t i = 0; i < sizeof(constants) / sizeof(constants[0]); i++)
        if (PyModule_AddIntConstant(m, constants[i].name, (long)constants[i].value) < 0)
            goto fail;
    if (PyModule_AddObject(m, "MAGIC", PyLong_FromUnsignedLongLong(SHMQ_MAGIC)) < 0 ||
        PyModule_AddObject(m, "HIST_MAGIC", PyLong_FromUnsignedLongLong(SHMQ_HIST_MAGIC)) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
