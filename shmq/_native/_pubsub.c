/*
 * CPython binding of the pub/sub engine (bus.c): `Message`, the hot halves of
 * the publisher and subscriber (`PublisherCore`, `SubscriberCore`) and the
 * router's `Forwarder`.
 *
 * This file is #included by _ringmodule.c (one translation unit), so it uses
 * the ring binding's helpers directly: parse_timeout, wait_for, claim_one,
 * finish_claim, read_span, raise_code and the error classes.
 */
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "bus.h"

/* Closed and too-large errors in the words of pub/sub (the ring's own speak of queues). */
static int check_client_open(RingObject *ring, const char *what)
{
    if (ring->closed || !ring->mapped) {
        PyErr_Format(error_class(E_CLOSED), "this %s is closed; create a new one to go on", what);
        return -1;
    }
    return 0;
}

static int check_publish_length(RingObject *ring, uint64_t length, Py_ssize_t payload)
{
    if (shmq_check_length(&ring->ring, length) == SHMQ_OK)
        return 0;
    unsigned long long cap = SHMQ_MIN_CAPACITY;
    while (cap < 2 * shmq_frame_size(length) && cap < SHMQ_MAX_CAPACITY)
        cap <<= 1;
    PyErr_Format(error_class(E_TOO_LARGE),
                 "a message of %zd bytes (%llu with its topic and headers) is larger than this "
                 "publisher's ring takes (%llu); nothing was published. Create the Publisher with "
                 "capacity=%llu or more (subscribers need as much to receive it)",
                 payload, (unsigned long long)length, (unsigned long long)ring->ring.max_message, cap);
    return -1;
}

static PyObject *raise_corrupt_message(RingObject *ring)
{
    PyErr_Format(error_class(E_CORRUPT),
                 "bus ring %R holds a message that fails its bounds check (damaged shared memory?)",
                 ring_name(ring));
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Headers                                                             */
/* ------------------------------------------------------------------ */

static PyObject *value_to_python(const shmq_value *v)
{
    switch (v->type) {
    case SHMQ_V_STR:
        /* surrogatepass: the encoder (_wire.encode_value) writes lone surrogates that way */
        return PyUnicode_DecodeUTF8((const char *)v->str, v->len, "surrogatepass");
    case SHMQ_V_INT:
        return PyLong_FromLongLong(v->i);
    case SHMQ_V_FLOAT:
        return PyFloat_FromDouble(v->f);
    default:
        return PyBool_FromLong((long)v->i);
    }
}

/* Text from the wire that is not UTF-8 comes from damage or a hostile publisher, not from a bug in
 * the caller: raise it as a shmq error (class `cls`), keeping the codec's complaint as the cause. */
static void wire_text_error(int cls, const char *what)
{
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        return;
    PyObject *type, *cause, *tb;
    PyErr_Fetch(&type, &cause, &tb);
    PyErr_NormalizeException(&type, &cause, &tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    PyErr_Format(error_class(cls), "%s is not UTF-8 text: %S", what, cause);
    PyObject *t, *v, *vtb;
    PyErr_Fetch(&t, &v, &vtb);
    PyErr_NormalizeException(&t, &v, &vtb);
    if (v && cause)
        PyException_SetCause(v, cause); /* (steals cause) */
    else
        Py_XDECREF(cause);
    PyErr_Restore(t, v, vtb);
}

static PyObject *decode_headers(const uint8_t *h, uint32_t len)
{
    PyObject *d = PyDict_New();
    uint32_t pos = 0, kl;
    const uint8_t *key;
    shmq_value v;
    int rc;
    while (d && (rc = shmq_headers_next(h, len, &pos, &key, &kl, &v)) == SHMQ_OK) {
        PyObject *k = PyUnicode_DecodeUTF8((const char *)key, kl, "surrogatepass"); /* as encoded */
        PyObject *val = k ? value_to_python(&v) : NULL;
        if (!val || PyDict_SetItem(d, k, val) < 0)
            Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(val);
    }
    if (d && rc != SHMQ_EMPTY) {
        Py_DECREF(d);
        PyErr_SetString(error_class(E_CORRUPT), "message headers are damaged");
        return NULL;
    }
    if (!d)
        wire_text_error(E_MESSAGE_DECODE, "a message header");
    return d;
}

/* ------------------------------------------------------------------ */
/* Message                                                             */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *topic;       /* str */
    PyObject *data;        /* bytes */
    PyObject *headers_raw; /* bytes, or NULL when there are none */
    PyObject *headers;     /* dict, decoded on first use */
    uint64_t seq;
    uint64_t timestamp_ns;
    uint64_t log_seq;
    uint32_t publisher_id;
    uint32_t flags;
    PyObject *acker;       /* a durable subscription's ack(log_seq), or NULL */
} MessageObject;

static PyTypeObject MessageType;

static MessageObject *message_new(PyObject *topic, const shmq_msg *m)
{
    MessageObject *msg = PyObject_New(MessageObject, &MessageType);
    if (!msg)
        return NULL;
    Py_INCREF(topic);
    msg->topic = topic;
    msg->headers = NULL;
    msg->headers_raw = NULL;
    msg->seq = m->seq;
    msg->timestamp_ns = m->timestamp_ns;
    msg->log_seq = m->log_seq;
    msg->publisher_id = m->publisher_id;
    msg->flags = m->flags;
    msg->acker = NULL;
    msg->data = PyBytes_FromStringAndSize((const char *)m->payload, (Py_ssize_t)m->payload_len);
    if (msg->data && m->headers_len)
        msg->headers_raw = PyBytes_FromStringAndSize((const char *)m->headers, m->headers_len);
    if (!msg->data || (m->headers_len && !msg->headers_raw)) {
        Py_DECREF(msg);
        return NULL;
    }
    return msg;
}

static void Message_dealloc(MessageObject *self)
{
    Py_XDECREF(self->topic);
    Py_XDECREF(self->data);
    Py_XDECREF(self->headers_raw);
    Py_XDECREF(self->headers);
    Py_XDECREF(self->acker);
    PyObject_Free(self);
}

static PyObject *Message_get_topic(MessageObject *self, void *Py_UNUSED(c)) { return Py_NewRef(self->topic); }
static PyObject *Message_get_data(MessageObject *self, void *Py_UNUSED(c)) { return Py_NewRef(self->data); }
static PyObject *Message_get_seq(MessageObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->seq);
}
static PyObject *Message_get_timestamp(MessageObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->timestamp_ns);
}
static PyObject *Message_get_publisher(MessageObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(self->publisher_id);
}
static PyObject *Message_get_last_value(MessageObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->flags & SHMQ_MSG_LAST_VALUE);
}
static PyObject *Message_get_redelivered(MessageObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong((self->flags & SHMQ_MSG_REDELIVERED) != 0);
}
static PyObject *Message_get_log_seq(MessageObject *self, void *Py_UNUSED(c))
{
    if (!self->log_seq)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(self->log_seq);
}

static PyObject *Message_ack(MessageObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->acker) {
        PyErr_SetString(error_class(E_INVALID_ARGUMENT),
                        "this message did not come from a durable subscription: only "
                        "Subscriber(..., durable=name) messages are acknowledged");
        return NULL;
    }
    return PyObject_CallFunction(self->acker, "K", (unsigned long long)self->log_seq);
}

static PyObject *Message_get_headers(MessageObject *self, void *Py_UNUSED(c))
{
    if (!self->headers) {
        if (self->headers_raw)
            self->headers = decode_headers((const uint8_t *)PyBytes_AS_STRING(self->headers_raw),
                                           (uint32_t)PyBytes_GET_SIZE(self->headers_raw));
        else
            self->headers = PyDict_New();
        if (!self->headers)
            return NULL;
    }
    /* A copy: the message stays as it was received whatever the caller does. */
    return PyDict_Copy(self->headers);
}

static PyObject *Message_view(MessageObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyMemoryView_FromObject(self->data);
}

static PyObject *Message_latency(MessageObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(shmq_now_ns() - (int64_t)self->timestamp_ns);
}

static PyObject *Message_repr(MessageObject *self)
{
    Py_ssize_t n = PyBytes_GET_SIZE(self->data);
    if (n <= 32)
        return PyUnicode_FromFormat("<shmq.Message topic=%R seq=%llu data=%R>", self->topic,
                                    (unsigned long long)self->seq, self->data);
    return PyUnicode_FromFormat("<shmq.Message topic=%R seq=%llu %zd bytes>", self->topic,
                                (unsigned long long)self->seq, n);
}

static PyObject *mod_make_message(PyObject *Py_UNUSED(m), PyObject *args);

static PyObject *Message_reduce(MessageObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *make = PyObject_GetAttrString(PyImport_AddModule("shmq._native._ring"), "_make_message");
    if (!make)
        return NULL;
    return Py_BuildValue("N(OOKKOkkK)", make, self->topic, self->data, (unsigned long long)self->seq,
                         (unsigned long long)self->timestamp_ns,
                         self->headers_raw ? self->headers_raw : Py_None,
                         (unsigned long)self->publisher_id, (unsigned long)self->flags,
                         (unsigned long long)self->log_seq);
}

static PyObject *Message_richcompare(MessageObject *a, PyObject *other, int op)
{
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(other, &MessageType))
        Py_RETURN_NOTIMPLEMENTED;
    MessageObject *b = (MessageObject *)other;
    int eq = a->seq == b->seq && a->timestamp_ns == b->timestamp_ns &&
             a->publisher_id == b->publisher_id && a->flags == b->flags && a->log_seq == b->log_seq;
    if (eq) {
        int t = PyObject_RichCompareBool(a->topic, b->topic, Py_EQ);
        int d = t > 0 ? PyObject_RichCompareBool(a->data, b->data, Py_EQ) : t;
        int h = d > 0 ? PyObject_RichCompareBool(a->headers_raw ? a->headers_raw : Py_None,
                                                 b->headers_raw ? b->headers_raw : Py_None, Py_EQ)
                      : d;
        if (h < 0)
            return NULL;
        eq = h;
    }
    return PyBool_FromLong(op == Py_EQ ? eq : !eq);
}

static PyMethodDef Message_methods[] = {
    {"view", (PyCFunction)Message_view, METH_NOARGS,
     "view() -> memoryview: the payload without a copy (read-only)."},
    {"latency_ns", (PyCFunction)Message_latency, METH_NOARGS,
     "latency_ns() -> int: time.monotonic_ns() - timestamp_ns, the one-way latency so far."},
    {"__reduce__", (PyCFunction)Message_reduce, METH_NOARGS, NULL},
    {"ack", (PyCFunction)Message_ack, METH_NOARGS,
     "ack(): acknowledge this message and every one before it (durable subscriptions)."},
    {NULL},
};

static PyGetSetDef Message_getset[] = {
    {"topic", (getter)Message_get_topic, NULL, "the topic it was published on (str)", NULL},
    {"data", (getter)Message_get_data, NULL, "the payload (bytes)", NULL},
    {"seq", (getter)Message_get_seq, NULL, "sequence number per publisher and topic, from 1", NULL},
    {"timestamp_ns", (getter)Message_get_timestamp, NULL,
     "time.monotonic_ns() at publish (CLOCK_MONOTONIC: comparable across processes)", NULL},
    {"headers", (getter)Message_get_headers, NULL, "the headers (a new dict each time)", NULL},
    {"publisher_id", (getter)Message_get_publisher, NULL, "the publishing Publisher's id", NULL},
    {"last_value", (getter)Message_get_last_value, NULL,
     "True if replayed from the router's last-value cache when subscribing", NULL},
    {"redelivered", (getter)Message_get_redelivered, NULL,
     "True if a durable subscription was sent it before and did not acknowledge it", NULL},
    {"log_seq", (getter)Message_get_log_seq, NULL,
     "its sequence in the durable log (durable topics), else None", NULL},
    {NULL},
};

static PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq.Message",
    .tp_basicsize = sizeof(MessageObject),
    .tp_dealloc = (destructor)Message_dealloc,
    .tp_repr = (reprfunc)Message_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A message received from a bus (immutable).",
    .tp_methods = Message_methods,
    .tp_getset = Message_getset,
    .tp_richcompare = (richcmpfunc)Message_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
};

static PyObject *mod_make_message(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *topic, *data, *headers;
    unsigned long long seq, ts;
    unsigned long pub = 0, flags = 0;
    unsigned long long log_seq = 0;
    if (!PyArg_ParseTuple(args, "UO!KKO|kkK:_make_message", &topic, &PyBytes_Type, &data, &seq, &ts,
                          &headers, &pub, &flags, &log_seq))
        return NULL;
    if (headers != Py_None && !PyBytes_Check(headers)) {
        PyErr_SetString(PyExc_TypeError, "headers must be the encoded bytes or None");
        return NULL;
    }
    if (headers != Py_None &&
        shmq_headers_check((const uint8_t *)PyBytes_AS_STRING(headers), (uint32_t)PyBytes_GET_SIZE(headers)) !=
            SHMQ_OK) {
        PyErr_SetString(error_class(E_CORRUPT), "message headers are damaged");
        return NULL;
    }
    MessageObject *msg = PyObject_New(MessageObject, &MessageType);
    if (!msg)
        return NULL;
    msg->topic = Py_NewRef(topic);
    msg->data = Py_NewRef(data);
    msg->headers_raw = headers == Py_None || PyBytes_GET_SIZE(headers) == 0 ? NULL : Py_NewRef(headers);
    msg->headers = NULL;
    msg->seq = seq;
    msg->timestamp_ns = ts;
    msg->publisher_id = (uint32_t)pub;
    msg->flags = (uint32_t)flags;
    msg->log_seq = log_seq;
    msg->acker = NULL;
    return (PyObject *)msg;
}

/* ------------------------------------------------------------------ */
/* PublisherCore                                                       */
/* ------------------------------------------------------------------ */

typedef struct {
    uint8_t *bytes;  /* topic in UTF-8 */
    uint32_t len;
    uint64_t seq;    /* last sequence number used */
} pub_topic;

typedef struct {
    PyObject_HEAD
    RingObject *ring;
    PyObject *topic_ids;   /* str -> int: our numbers for topics */
    pub_topic *topics;
    uint32_t ntopics, topics_cap;
    uint32_t publisher_id;
    Py_buffer bus;         /* the router's bus segment (doorbell), while connected */
    int have_bus;
    uint64_t last_end;     /* ring position after the last message this publisher committed */
    PyObject *weakreflist;
} PublisherCoreObject;

static int PublisherCore_init(PublisherCoreObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ring", "publisher_id", NULL};
    PyObject *ring;
    unsigned long pid;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!k:PublisherCore", kwlist, &RingType, &ring, &pid))
        return -1;
    if (self->ring) {
        PyErr_SetString(error_class(E_BASE), "PublisherCore.__init__ called twice");
        return -1;
    }
    self->ring = (RingObject *)Py_NewRef(ring);
    self->publisher_id = (uint32_t)pid;
    self->topic_ids = PyDict_New();
    return self->topic_ids ? 0 : -1;
}

static void PublisherCore_dealloc(PublisherCoreObject *self)
{
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->have_bus)
        PyBuffer_Release(&self->bus);
    for (uint32_t i = 0; i < self->ntopics; i++)
        free(self->topics[i].bytes);
    free(self->topics);
    Py_XDECREF(self->ring);
    Py_XDECREF(self->topic_ids);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _add_topic(topic, last_seq) -> int: our number for the topic (the caller validated it). */
static PyObject *PublisherCore_add_topic(PublisherCoreObject *self, PyObject *args)
{
    PyObject *topic;
    unsigned long long last_seq;
    if (!PyArg_ParseTuple(args, "UK:_add_topic", &topic, &last_seq))
        return NULL;
    PyObject *known = PyDict_GetItemWithError(self->topic_ids, topic);
    if (known)
        return Py_NewRef(known);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(topic, &len);
    if (!utf8)
        return NULL;
    if (len < 1 || len > (Py_ssize_t)SHMQ_MAX_TOPIC) {
        PyErr_SetString(error_class(E_INVALID_ARGUMENT), "a topic must have 1 to 255 bytes");
        return NULL;
    }
    if (self->ntopics == self->topics_cap) {
        uint32_t cap = self->topics_cap ? self->topics_cap * 2 : 16;
        pub_topic *t = realloc(self->topics, cap * sizeof *t);
        if (!t)
            return PyErr_NoMemory();
        self->topics = t;
        self->topics_cap = cap;
    }
    uint8_t *copy = malloc((size_t)len);
    if (!copy)
        return PyErr_NoMemory();
    memcpy(copy, utf8, (size_t)len);
    uint32_t id = self->ntopics;
    PyObject *num = PyLong_FromUnsignedLong(id);
    if (!num || PyDict_SetItem(self->topic_ids, topic, num) < 0) {
        free(copy);
        Py_XDECREF(num);
        return NULL;
    }
    self->topics[id] = (pub_topic){copy, (uint32_t)len, last_seq};
    self->ntopics++;
    return num;
}

/* _set_bus(buffer or None): where the doorbell is; None means disconnected. */
static PyObject *PublisherCore_set_bus(PublisherCoreObject *self, PyObject *bus)
{
    if (self->have_bus) {
        PyBuffer_Release(&self->bus);
        self->have_bus = 0;
    }
    if (bus != Py_None) {
        if (PyObject_GetBuffer(bus, &self->bus, PyBUF_WRITABLE) < 0)
            return NULL;
        if (self->bus.len < 4096) {
            PyBuffer_Release(&self->bus);
            PyErr_SetString(error_class(E_CORRUPT), "bus segment too small");
            return NULL;
        }
        self->have_bus = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *PublisherCore_last_end(PublisherCoreObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(self->last_end);
}

/* _wait_durable(pos, slot_offset, timeout) -> bool: waits (GIL released) until the router says
 * this publisher's ring is on disk up to `pos` (fsync="always"); False at the timeout or
 * without a router. */
static PyObject *PublisherCore_wait_durable(PublisherCoreObject *self, PyObject *args)
{
    unsigned long long pos;
    long long off;
    double timeout;
    if (!PyArg_ParseTuple(args, "KLd:_wait_durable", &pos, &off, &timeout))
        return NULL;
    if (!self->have_bus || off < 0 || off + SHMQ_PUBLISHER_SLOT > self->bus.len)
        Py_RETURN_FALSE;
    /* Our own export of the mapping for the wait: the link thread may drop the bus (router gone)
     * meanwhile, and its unmap must wait until we are done reading it. */
    Py_buffer pin;
    if (PyObject_GetBuffer(self->bus.obj, &pin, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pin.len < off + SHMQ_PUBLISHER_SLOT) {
        PyBuffer_Release(&pin);
        Py_RETURN_FALSE;
    }
    uint8_t *slot = (uint8_t *)pin.buf + off;
    _Atomic uint32_t *word = (_Atomic uint32_t *)(slot + SHMQ_PS_SYNC_FUTEX);
    _Atomic uint64_t *durable = (_Atomic uint64_t *)(slot + SHMQ_PS_DURABLE_POS);
    int64_t deadline = shmq_now_ns() + (int64_t)(timeout * 1e9);
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        /* SYNC: the word first, then the position (acquire both): a confirmation published
         * after our load of the word changes the word, so the futex wait returns at once. */
        uint32_t seen = atomic_load_explicit(word, memory_order_acquire);
        if (atomic_load_explicit(durable, memory_order_acquire) >= pos) {
            ok = 1;
            break;
        }
        int64_t left = deadline - shmq_now_ns();
        if (left <= 0)
            break;
        if (left > 20000000)
            left = 20000000; /* re-check now and then: the router may have gone */
        struct timespec ts = {left / 1000000000, left % 1000000000};
        syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&pin);
    return PyBool_FromLong(ok);
}

/* Drops a topic's number, so that the next publish on it asks the Python half again (_prepare):
 * for a topic a new router's ACL refuses. Its slot stays (numbers are never reused). */
static PyObject *PublisherCore_forget_topic(PublisherCoreObject *self, PyObject *topic)
{
    if (PyDict_DelItem(self->topic_ids, topic) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return NULL;
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

static PyObject *PublisherCore_get_connected(PublisherCoreObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->have_bus);
}

static PyObject *PublisherCore_last_seqs(PublisherCoreObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_New();
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (d && PyDict_Next(self->topic_ids, &pos, &key, &value)) {
        PyObject *seq = PyLong_FromUnsignedLongLong(self->topics[PyLong_AsUnsignedLong(value)].seq);
        if (!seq || PyDict_SetItem(d, key, seq) < 0)
            Py_CLEAR(d);
        Py_XDECREF(seq);
    }
    return d;
}

/* The topic's number, after the Python half registered it and waited for a
 * router if needed (it raises InvalidTopic, RouterUnavailable, Closed...). */
static int publisher_topic(PublisherCoreObject *self, PyObject *topic, int64_t deadline, uint32_t *id)
{
    PyObject *num = PyDict_GetItemWithError(self->topic_ids, topic);
    if (num && self->have_bus) {
        *id = (uint32_t)PyLong_AsUnsignedLong(num);
        return 0;
    }
    if (PyErr_Occurred())
        return -1;
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_prepare", "OL", topic, (long long)deadline);
    if (!r)
        return -1;
    Py_DECREF(r);
    num = PyDict_GetItemWithError(self->topic_ids, topic);
    if (!num) {
        if (!PyErr_Occurred())
            PyErr_Format(error_class(E_BASE), "topic %R was not registered", topic);
        return -1;
    }
    *id = (uint32_t)PyLong_AsUnsignedLong(num);
    return 0;
}

/* Encoded headers (a new bytes object), or NULL with an exception; None -> b"". */
static PyObject *publisher_headers(PublisherCoreObject *self, PyObject *headers)
{
    if (!headers || headers == Py_None)
        return PyBytes_FromStringAndSize(NULL, 0);
    PyObject *enc = PyObject_CallMethod((PyObject *)self, "_encode_headers", "O", headers);
    if (enc && !PyBytes_Check(enc)) {
        Py_DECREF(enc);
        PyErr_SetString(PyExc_TypeError, "_encode_headers must return bytes");
        return NULL;
    }
    return enc;
}

static void write_message_header(uint8_t *dst, uint32_t topic_id, const pub_topic *t, uint32_t headers_len,
                                 uint32_t publisher_id, uint64_t seq, int64_t now)
{
    uint16_t tl = (uint16_t)t->len, hl = (uint16_t)headers_len;
    uint32_t flags = 0;
    uint64_t ts = (uint64_t)now;
    memcpy(dst + SHMQ_MSG_OFF_TOPIC_ID, &topic_id, 4);
    memcpy(dst + SHMQ_MSG_OFF_TOPIC_LEN, &tl, 2);
    memcpy(dst + SHMQ_MSG_OFF_HEADERS_LEN, &hl, 2);
    memcpy(dst + SHMQ_MSG_OFF_PUBLISHER, &publisher_id, 4);
    memcpy(dst + SHMQ_MSG_OFF_FLAGS, &flags, 4);
    memcpy(dst + SHMQ_MSG_OFF_SEQ, &seq, 8);
    memcpy(dst + SHMQ_MSG_OFF_TIMESTAMP, &ts, 8);
    memset(dst + SHMQ_MSG_OFF_LOG_SEQ, 0, 8);
    memcpy(dst + SHMQ_MSG_HEADER, t->bytes, t->len);
}

static PyObject *publisher_timed_out(PublisherCoreObject *self, uint64_t nbytes)
{
    /* Drop the Full raised by claim_one: the Python half says why it timed out. */
    PyErr_Clear();
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_timed_out", "K", (unsigned long long)nbytes);
    Py_XDECREF(r);
    if (!PyErr_Occurred())
        PyErr_SetString(error_class(E_FULL), "publish timed out");
    return NULL;
}

static void publisher_ring_doorbell(PublisherCoreObject *self)
{
    if (self->have_bus)
        shmq_bus_ring_doorbell(self->bus.buf);
}

static const char *const publish_names[] = {"topic", "data", "headers", "timeout"};

static PyObject *PublisherCore_publish(PublisherCoreObject *self, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames)
{
    PyObject *a[4];
    int64_t deadline = -1;
    if (parse_args("publish", args, nargs, kwnames, publish_names, 4, 2, a) < 0 ||
        (a[3] && parse_timeout(a[3], &deadline) < 0))
        return NULL;
    RingObject *ring = self->ring;
    if (check_client_open(ring, "publisher") < 0)
        return NULL;
    if (!PyUnicode_Check(a[0])) {
        PyErr_Format(error_class(E_ARGUMENT_TYPE), "a topic must be a str, got %.100s",
                     Py_TYPE(a[0])->tp_name);
        return NULL;
    }
    uint32_t id;
    if (publisher_topic(self, a[0], deadline, &id) < 0)
        return NULL;
    Py_buffer view;
    if (get_message_buffer(a[1], &view) < 0)
        return NULL;
    PyObject *headers = publisher_headers(self, a[2]);
    if (!headers) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t hl = PyBytes_GET_SIZE(headers);
    pub_topic *t = &self->topics[id];
    uint64_t length = (uint64_t)SHMQ_MSG_HEADER + t->len + (uint64_t)hl + (uint64_t)view.len;
    shmq_span span;
    if (hl > (Py_ssize_t)SHMQ_MAX_HEADERS) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT),
                     "headers take %zd bytes encoded, more than the limit of %u", hl, SHMQ_MAX_HEADERS);
    } else if (check_publish_length(ring, length, view.len) == 0) {
        if (claim_one(ring, length, deadline, &span) < 0) {
            if (PyErr_ExceptionMatches(error_class(E_FULL)))
                publisher_timed_out(self, length);
        } else {
            t = &self->topics[id]; /* claim_one may have run Python code (signal handlers) */
            uint64_t pos = span.start;
            uint8_t *dst = shmq_place(&ring->ring, &pos, (uint32_t)length);
            uint64_t seq = t->seq + 1;
            write_message_header(dst, id, t, (uint32_t)hl, self->publisher_id, seq, shmq_now_ns());
            memcpy(dst + SHMQ_MSG_HEADER + t->len, PyBytes_AS_STRING(headers), (size_t)hl);
            memcpy(dst + SHMQ_MSG_HEADER + t->len + hl, view.buf, (size_t)view.len);
            if (finish_claim(ring, &span, 1, deadline) == 0) {
                t->seq = seq;
                self->last_end = span.end;
                publisher_ring_doorbell(self);
                result = PyLong_FromUnsignedLongLong(seq);
            }
        }
    }
    Py_DECREF(headers);
    PyBuffer_Release(&view);
    return result;
}

static const char *const publish_many_names[] = {"topic", "messages", "headers", "timeout"};

/* publish_many(topic, messages, headers=None, timeout=None) -> int: the last
 * sequence number. Claims and commits in pieces, one doorbell per piece. */
static PyObject *PublisherCore_publish_many(PublisherCoreObject *self, PyObject *const *args,
                                            Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[4];
    int64_t deadline = -1;
    if (parse_args("publish_many", args, nargs, kwnames, publish_many_names, 4, 2, a) < 0 ||
        (a[3] && parse_timeout(a[3], &deadline) < 0))
        return NULL;
    RingObject *ring = self->ring;
    if (check_client_open(ring, "publisher") < 0)
        return NULL;
    if (!PyUnicode_Check(a[0])) {
        PyErr_Format(error_class(E_ARGUMENT_TYPE), "a topic must be a str, got %.100s",
                     Py_TYPE(a[0])->tp_name);
        return NULL;
    }
    if (PyBytes_Check(a[1]) || PyByteArray_Check(a[1]) || PyMemoryView_Check(a[1]) || PyUnicode_Check(a[1])) {
        PyErr_Format(error_class(E_ARGUMENT_TYPE),
                     "publish_many() takes an iterable of messages, got a single %.100s; use publish() "
                     "for one message", Py_TYPE(a[1])->tp_name);
        return NULL;
    }
    uint32_t id;
    if (publisher_topic(self, a[0], deadline, &id) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(a[1], "publish_many() needs an iterable of messages");
    if (!seq) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(error_class(E_ARGUMENT_TYPE), "publish_many() takes an iterable of messages, got %.100s",
                         Py_TYPE(a[1])->tp_name);
        }
        return NULL;
    }
    PyObject *headers = publisher_headers(self, a[2]);
    if (!headers) {
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), hl = PyBytes_GET_SIZE(headers);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer views[PUT_MANY_CHUNK];
    uint64_t lengths[PUT_MANY_CHUNK];
    Py_ssize_t done = 0;
    int failed = 0;
    if (hl > (Py_ssize_t)SHMQ_MAX_HEADERS) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT),
                     "headers take %zd bytes encoded, more than the limit of %u", hl, SHMQ_MAX_HEADERS);
        failed = 1;
    }
    while (!failed && done < n) {
        Py_ssize_t k = 0;
        uint64_t piece = 0;
        uint32_t tl = self->topics[id].len;
        /* Take buffers for the next piece; check every length before writing. */
        for (; done + k < n && k < PUT_MANY_CHUNK && piece < BATCH_BYTES; k++) {
            if (get_message_buffer(items[done + k], &views[k]) < 0) {
                failed = 1;
                break;
            }
            lengths[k] = (uint64_t)SHMQ_MSG_HEADER + tl + (uint64_t)hl + (uint64_t)views[k].len;
            piece += lengths[k];
            if (check_publish_length(ring, lengths[k], views[k].len) < 0) {
                PyBuffer_Release(&views[k]);
                failed = 1;
                break;
            }
        }
        Py_ssize_t got = 0;
        while (!failed && got < k) {
            shmq_span span;
            int rc = shmq_claim(&ring->ring, lengths + got, (size_t)(k - got), &span);
            if (rc == SHMQ_CORRUPT) {
                raise_code(ring, rc, lengths[got]);
                failed = 1;
                continue;
            }
            if (rc != SHMQ_OK) {
                int w = wait_for(ring, SHMQ_WRITABLE, lengths[got], deadline, ring->strategy);
                if (w == WAIT_ERROR)
                    failed = 1;
                else if (w == WAIT_TIMED_OUT) {
                    raise_code(ring, SHMQ_FULL, lengths[got]);
                    publisher_timed_out(self, lengths[got]);
                    failed = 1;
                }
                continue;
            }
            pub_topic *t = &self->topics[id];
            uint64_t pos = span.start, s = t->seq;
            int64_t now = shmq_now_ns();
            for (uint64_t i = 0; i < span.count; i++) {
                Py_buffer *v = &views[got + i];
                uint8_t *dst = shmq_place(&ring->ring, &pos, (uint32_t)lengths[got + i]);
                write_message_header(dst, id, t, (uint32_t)hl, self->publisher_id, ++s, now);
                memcpy(dst + SHMQ_MSG_HEADER + t->len, PyBytes_AS_STRING(headers), (size_t)hl);
                memcpy(dst + SHMQ_MSG_HEADER + t->len + hl, v->buf, (size_t)v->len);
            }
            if (finish_claim(ring, &span, 1, deadline) < 0) {
                failed = 1;
                break;
            }
            t->seq = s;
            self->last_end = span.end;
            got += (Py_ssize_t)span.count;
            publisher_ring_doorbell(self);
        }
        for (Py_ssize_t i = 0; i < k; i++)
            PyBuffer_Release(&views[i]);
        done += got;
    }
    Py_DECREF(headers);
    Py_DECREF(seq);
    if (failed) {
        /* Say how many went out: the exception carries it. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (value) {
            PyObject *num = PyLong_FromSsize_t(done);
            if (num && PyObject_SetAttrString(value, "published", num) < 0)
                PyErr_Clear();
            Py_XDECREF(num);
        }
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(self->topics[id].seq);
}

static PyMethodDef PublisherCore_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))PublisherCore_publish, METH_FASTCALL | METH_KEYWORDS,
     "publish(topic, data, headers=None, timeout=None) -> int: the message's sequence number."},
    {"publish_many", (PyCFunction)(void (*)(void))PublisherCore_publish_many, METH_FASTCALL | METH_KEYWORDS,
     "publish_many(topic, messages, headers=None, timeout=None) -> int: the last sequence number."},
    {"_add_topic", (PyCFunction)PublisherCore_add_topic, METH_VARARGS, NULL},
    {"_set_bus", (PyCFunction)PublisherCore_set_bus, METH_O, NULL},
    {"_last_end", (PyCFunction)PublisherCore_last_end, METH_NOARGS, NULL},
    {"_wait_durable", (PyCFunction)PublisherCore_wait_durable, METH_VARARGS, NULL},
    {"_last_seqs", (PyCFunction)PublisherCore_last_seqs, METH_NOARGS, NULL},
    {"_forget_topic", (PyCFunction)PublisherCore_forget_topic, METH_O, NULL},
    {NULL},
};

static PyGetSetDef PublisherCore_getset[] = {
    {"connected", (getter)PublisherCore_get_connected, NULL, "True while a router is attached", NULL},
    {NULL},
};

static PyTypeObject PublisherCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._native._ring.PublisherCore",
    .tp_basicsize = sizeof(PublisherCoreObject),
    .tp_dealloc = (destructor)PublisherCore_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The native half of shmq.Publisher.",
    .tp_methods = PublisherCore_methods,
    .tp_getset = PublisherCore_getset,
    .tp_init = (initproc)PublisherCore_init,
    .tp_new = PyType_GenericNew,
    .tp_weaklistoffset = offsetof(PublisherCoreObject, weakreflist),
};

/* ------------------------------------------------------------------ */
/* SubscriberCore                                                      */
/* ------------------------------------------------------------------ */

#define TOPIC_CACHE 256

typedef struct {
    uint32_t id;
    uint32_t len;
    uint8_t bytes[SHMQ_MAX_TOPIC];
    PyObject *str;
} cached_topic;

typedef struct {
    PyObject_HEAD
    RingObject *ring;
    cached_topic *cache;   /* by router topic number, direct-mapped */
    PyObject *acker;       /* durable subscriptions: given to each message for msg.ack() */
    HistogramObject *latency; /* record_latency: now - timestamp of each message received */
    PyObject *weakreflist;
} SubscriberCoreObject;

static int SubscriberCore_init(SubscriberCoreObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ring", NULL};
    PyObject *ring;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!:SubscriberCore", kwlist, &RingType, &ring))
        return -1;
    if (self->ring) {
        PyErr_SetString(error_class(E_BASE), "SubscriberCore.__init__ called twice");
        return -1;
    }
    self->cache = calloc(TOPIC_CACHE, sizeof *self->cache);
    if (!self->cache) {
        PyErr_NoMemory();
        return -1;
    }
    self->ring = (RingObject *)Py_NewRef(ring);
    return 0;
}

static void SubscriberCore_dealloc(SubscriberCoreObject *self)
{
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->cache)
        for (int i = 0; i < TOPIC_CACHE; i++)
            Py_XDECREF(self->cache[i].str);
    free(self->cache);
    Py_XDECREF(self->ring);
    Py_XDECREF(self->acker);
    Py_XDECREF(self->latency);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The topic as a str, from the cache when the same bytes came under this
 * number before (numbers change when the router restarts: bytes decide). */
static PyObject *topic_str(SubscriberCoreObject *self, const shmq_msg *m)
{
    cached_topic *c = &self->cache[m->topic_id % TOPIC_CACHE];
    if (c->str && c->id == m->topic_id && c->len == m->topic_len && memcmp(c->bytes, m->topic, c->len) == 0)
        return c->str;
    PyObject *s = PyUnicode_DecodeUTF8((const char *)m->topic, m->topic_len, "strict");
    if (!s) {
        /* (the router lets only valid topics through: the ring is damaged) */
        wire_text_error(E_CORRUPT, "a message's topic");
        return NULL;
    }
    Py_XSETREF(c->str, s);
    c->id = m->topic_id;
    c->len = m->topic_len;
    memcpy(c->bytes, m->topic, m->topic_len);
    return s;
}

static MessageObject *decode_frame(SubscriberCoreObject *self, const uint8_t *src, uint32_t length)
{
    shmq_msg m;
    if (shmq_msg_parse(src, length, &m) != SHMQ_OK || shmq_headers_check(m.headers, m.headers_len) != SHMQ_OK) {
        raise_corrupt_message(self->ring);
        return NULL;
    }
    PyObject *topic = topic_str(self, &m);
    MessageObject *msg = topic ? message_new(topic, &m) : NULL;
    if (msg && self->acker && m.log_seq)
        msg->acker = Py_NewRef(self->acker);
    if (msg && self->latency && self->latency->hist.counts_len) {
        /* Publish to receive, on the clock the publisher stamped (CLOCK_MONOTONIC). */
        int64_t waited = shmq_now_ns() - (int64_t)m.timestamp_ns;
        self->latency->clamped += (unsigned)shmq_hist_record(&self->latency->hist, waited > 0 ? (uint64_t)waited : 0, 1);
    }
    return msg;
}

static PyObject *raise_no_message(RingObject *ring)
{
    PyErr_Format(error_class(E_EMPTY), "no message arrived on subscriber ring %R within the timeout",
                 ring_name(ring));
    return NULL;
}

static const char *const recv_names[] = {"timeout"};

static PyObject *SubscriberCore_recv(SubscriberCoreObject *self, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames)
{
    PyObject *a[1];
    int64_t deadline = -1;
    if (nargs || kwnames) {
        if (parse_args("recv", args, nargs, kwnames, recv_names, 1, 0, a) < 0 ||
            parse_timeout(a[0], &deadline) < 0)
            return NULL;
    }
    RingObject *ring = self->ring;
    if (check_client_open(ring, "subscriber") < 0)
        return NULL;
    shmq_span span;
    int got = read_span(ring, 1, deadline, &span);
    if (got <= 0)
        return got == 0 ? raise_no_message(ring) : NULL;
    uint64_t pos = span.start;
    uint32_t length;
    const uint8_t *src = shmq_next(&ring->ring, &pos, span.end, &length);
    PyObject *out = src ? (PyObject *)decode_frame(self, src, length) : raise_code(ring, SHMQ_CORRUPT, 0);
    /* A message that cannot be decoded is released all the same: it would
     * fail again forever. Only a failed allocation leaves it queued. */
    if (out || !PyErr_ExceptionMatches(PyExc_MemoryError) || ring->ring.multi_consumer)
        shmq_release(&ring->ring, &span);
    return out;
}

static PyObject *make_message(void *self, RingObject *Py_UNUSED(ring), const uint8_t *src, uint32_t length)
{
    return (PyObject *)decode_frame((SubscriberCoreObject *)self, src, length);
}

static const char *const recv_many_names[] = {"max_messages", "timeout"};

static PyObject *SubscriberCore_recv_many(SubscriberCoreObject *self, PyObject *const *args,
                                          Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[2];
    int64_t deadline = -1;
    Py_ssize_t max = 1024;
    if (parse_args("recv_many", args, nargs, kwnames, recv_many_names, 2, 0, a) < 0 ||
        (a[1] && parse_timeout(a[1], &deadline) < 0))
        return NULL;
    if (parse_max_messages(a[0], &max) < 0)
        return NULL;
    RingObject *ring = self->ring;
    if (check_client_open(ring, "subscriber") < 0)
        return NULL;
    return read_many(ring, max, deadline, make_message, self);
}

static PyObject *SubscriberCore_set_acker(SubscriberCoreObject *self, PyObject *acker)
{
    Py_XSETREF(self->acker, acker == Py_None ? NULL : Py_NewRef(acker));
    Py_RETURN_NONE;
}

static PyObject *SubscriberCore_set_latency(SubscriberCoreObject *self, PyObject *arg)
{
    if (arg != Py_None && !PyObject_TypeCheck(arg, &HistogramType)) {
        PyErr_SetString(error_class(E_ARGUMENT_TYPE), "_set_latency() takes a Histogram or None");
        return NULL;
    }
    Py_XSETREF(self->latency, arg == Py_None ? NULL : (HistogramObject *)Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyMethodDef SubscriberCore_methods[] = {
    {"_set_acker", (PyCFunction)SubscriberCore_set_acker, METH_O, NULL},
    {"_set_latency", (PyCFunction)SubscriberCore_set_latency, METH_O, NULL},
    {"recv", (PyCFunction)(void (*)(void))SubscriberCore_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv(timeout=None) -> Message: the next message; raises Empty at the timeout."},
    {"recv_many", (PyCFunction)(void (*)(void))SubscriberCore_recv_many, METH_FASTCALL | METH_KEYWORDS,
     "recv_many(max_messages=1024, timeout=None) -> list[Message]: wait for one, then take what is "
     "there; [] at the timeout."},
    {NULL},
};

static PyTypeObject SubscriberCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._native._ring.SubscriberCore",
    .tp_basicsize = sizeof(SubscriberCoreObject),
    .tp_dealloc = (destructor)SubscriberCore_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The native half of shmq.Subscriber.",
    .tp_methods = SubscriberCore_methods,
    .tp_init = (initproc)SubscriberCore_init,
    .tp_new = PyType_GenericNew,
    .tp_weaklistoffset = offsetof(SubscriberCoreObject, weakreflist),
};

/* ------------------------------------------------------------------ */
/* Forwarder                                                           */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    shmq_forwarder *f;
    pthread_mutex_t lock;
    Py_buffer bus;
    int have_bus;
    PyObject *buffers;     /* ("i" | "o" | "d", id) -> capsule holding a ring's (or state's) Py_buffer */
    _Atomic int stopping;
    int running;
    shmq_log log;          /* the durable log, when have_log */
    int have_log;
    int confirm;           /* fsync="always": publishers wait for syncs */
    pthread_cond_t appended; /* signalled when records were appended (the flusher waits on it) */
} ForwarderObject;

static void lock_forwarder(ForwarderObject *self)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    Py_END_ALLOW_THREADS
}

static void unlock_forwarder(ForwarderObject *self) { pthread_mutex_unlock(&self->lock); }

static void buffer_capsule_free(PyObject *capsule)
{
    Py_buffer *view = PyCapsule_GetPointer(capsule, "shmq.buffer");
    if (view) {
        PyBuffer_Release(view);
        PyMem_Free(view);
    }
}

/* Takes a writable buffer on `obj`, kept in self->buffers under key. */
static Py_buffer *keep_buffer(ForwarderObject *self, const char *kind, unsigned long id, PyObject *obj)
{
    Py_buffer *view = PyMem_Malloc(sizeof *view);
    if (!view) {
        PyErr_NoMemory();
        return NULL;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0) {
        PyMem_Free(view);
        return NULL;
    }
    PyObject *capsule = PyCapsule_New(view, "shmq.buffer", buffer_capsule_free);
    if (!capsule) {
        PyBuffer_Release(view);
        PyMem_Free(view);
        return NULL;
    }
    PyObject *key = Py_BuildValue("(sk)", kind, id);
    int rc = key ? PyDict_SetItem(self->buffers, key, capsule) : -1;
    Py_XDECREF(key);
    Py_DECREF(capsule);
    return rc < 0 ? NULL : view;
}

static void drop_buffer(ForwarderObject *self, const char *kind, unsigned long id)
{
    PyObject *key = Py_BuildValue("(sk)", kind, id);
    if (key && PyDict_DelItem(self->buffers, key) < 0)
        PyErr_Clear();
    Py_XDECREF(key);
}

/* Releases the rings of outputs the engine has let go of. Lock held. */
static void reap_outputs(ForwarderObject *self)
{
    uint32_t ids[64], n;
    while ((n = shmq_fwd_reap(self->f, ids, 64)) > 0)
        for (uint32_t i = 0; i < n; i++) {
            drop_buffer(self, "o", ids[i]);
            drop_buffer(self, "d", ids[i]);
        }
}

static PyObject *fwd_result(ForwarderObject *self, int rc, const char *what)
{
    if (rc == SHMQ_OK)
        Py_RETURN_NONE;
    if (rc == -1)
        return PyErr_NoMemory();
    if (rc == SHMQ_BAD_ARGUMENT) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT), "forwarder: bad %s (unknown or duplicate id)", what);
        return NULL;
    }
    (void)self;
    return raise_code(NULL, rc, 0);
}

static int Forwarder_init(ForwarderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"bus", NULL};
    PyObject *bus;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Forwarder", kwlist, &bus))
        return -1;
    if (self->f) {
        PyErr_SetString(error_class(E_BASE), "Forwarder.__init__ called twice");
        return -1;
    }
    if (PyObject_GetBuffer(bus, &self->bus, PyBUF_WRITABLE) < 0)
        return -1;
    self->have_bus = 1;
    self->buffers = PyDict_New();
    self->f = shmq_fwd_new(self->bus.buf, (uint64_t)self->bus.len);
    if (!self->buffers || !self->f) {
        if (!PyErr_Occurred())
            PyErr_SetString(error_class(E_INVALID_ARGUMENT), "bus segment too small");
        return -1;
    }
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->appended, NULL);
    return 0;
}

static void Forwarder_dealloc(ForwarderObject *self)
{
    if (self->f) {
        shmq_fwd_free(self->f);
        pthread_mutex_destroy(&self->lock);
        pthread_cond_destroy(&self->appended);
    }
    if (self->have_log)
        shmq_log_close(&self->log);
    Py_XDECREF(self->buffers);
    if (self->have_bus)
        PyBuffer_Release(&self->bus);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define FWD_CHECK(self)                                                            \
    do {                                                                           \
        if (!(self)->f) {                                                          \
            PyErr_SetString(error_class(E_BASE), "Forwarder is not initialised");  \
            return NULL;                                                           \
        }                                                                          \
    } while (0)

static PyObject *Forwarder_add_input(ForwarderObject *self, PyObject *args)
{
    unsigned long id;
    PyObject *ring;
    long long stats_off;
    if (!PyArg_ParseTuple(args, "kOL:add_input", &id, &ring, &stats_off))
        return NULL;
    FWD_CHECK(self);
    Py_buffer *view = keep_buffer(self, "i", id, ring);
    if (!view)
        return NULL;
    lock_forwarder(self);
    int rc = shmq_fwd_add_input(self->f, (uint32_t)id, view->buf, (uint64_t)view->len, stats_off);
    unlock_forwarder(self);
    if (rc != SHMQ_OK)
        drop_buffer(self, "i", id);
    shmq_fwd_wake(self->f);
    return fwd_result(self, rc, "input");
}

static int parse_id(PyObject *arg, unsigned long *id)
{
    *id = PyLong_AsUnsignedLong(arg);
    return *id == (unsigned long)-1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *Forwarder_remove_input(ForwarderObject *self, PyObject *arg)
{
    unsigned long id;
    if (parse_id(arg, &id) < 0)
        return NULL;
    FWD_CHECK(self);
    lock_forwarder(self);
    int rc = shmq_fwd_remove_input(self->f, (uint32_t)id);
    reap_outputs(self);
    unlock_forwarder(self);
    if (rc == SHMQ_OK)
        drop_buffer(self, "i", id);
    return fwd_result(self, rc, "input");
}

static PyObject *Forwarder_isolate_input(ForwarderObject *self, PyObject *arg)
{
    unsigned long id;
    if (parse_id(arg, &id) < 0)
        return NULL;
    FWD_CHECK(self);
    lock_forwarder(self);
    int rc = shmq_fwd_isolate_input(self->f, (uint32_t)id);
    unlock_forwarder(self);
    return fwd_result(self, rc, "input");
}

static PyObject *Forwarder_input_depth(ForwarderObject *self, PyObject *arg)
{
    unsigned long id;
    if (parse_id(arg, &id) < 0)
        return NULL;
    FWD_CHECK(self);
    lock_forwarder(self);
    int64_t depth = shmq_fwd_input_depth(self->f, (uint32_t)id);
    unlock_forwarder(self);
    return PyLong_FromLongLong(depth);
}

static PyObject *Forwarder_add_output(ForwarderObject *self, PyObject *args)
{
    unsigned long id;
    PyObject *ring;
    int policy;
    long long stats_off;
    if (!PyArg_ParseTuple(args, "kOiL:add_output", &id, &ring, &policy, &stats_off))
        return NULL;
    FWD_CHECK(self);
    Py_buffer *view = keep_buffer(self, "o", id, ring);
    if (!view)
        return NULL;
    lock_forwarder(self);
    int rc = shmq_fwd_add_output(self->f, (uint32_t)id, view->buf, (uint64_t)view->len, policy, stats_off);
    unlock_forwarder(self);
    if (rc != SHMQ_OK)
        drop_buffer(self, "o", id);
    return fwd_result(self, rc, "output");
}

static PyObject *Forwarder_remove_output(ForwarderObject *self, PyObject *arg)
{
    unsigned long id;
    if (parse_id(arg, &id) < 0)
        return NULL;
    FWD_CHECK(self);
    lock_forwarder(self);
    int rc = shmq_fwd_remove_output(self->f, (uint32_t)id);
    reap_outputs(self);
    unlock_forwarder(self);
    return fwd_result(self, rc, "output");
}

static PyObject *Forwarder_add_topic(ForwarderObject *self, PyObject *args)
{
    unsigned long gid;
    long long stats_off;
    int keep_last, durable;
    const char *name;
    Py_ssize_t name_len;
    if (!PyArg_ParseTuple(args, "kLppy#:add_topic", &gid, &stats_off, &keep_last, &durable, &name, &name_len))
        return NULL;
    FWD_CHECK(self);
    if (durable && !self->have_log) {
        PyErr_SetString(error_class(E_INVALID_ARGUMENT), "a durable topic needs the log open first");
        return NULL;
    }
    lock_forwarder(self);
    int rc = shmq_fwd_add_topic(self->f, (uint32_t)gid, stats_off, keep_last, durable, (const uint8_t *)name,
                                (uint32_t)name_len);
    unlock_forwarder(self);
    return fwd_result(self, rc, "topic");
}

static PyObject *Forwarder_map_topic(ForwarderObject *self, PyObject *args)
{
    unsigned long input, local, gid;
    if (!PyArg_ParseTuple(args, "kkk:map_topic", &input, &local, &gid))
        return NULL;
    FWD_CHECK(self);
    lock_forwarder(self);
    int rc = shmq_fwd_map_topic(self->f, (uint32_t)input, (uint32_t)local, (uint32_t)gid);
    unlock_forwarder(self);
    return fwd_result(self, rc, "topic mapping");
}

/* Builds targets from [(filter_program | None, [output ids], is_group, group_policy)].
 * Lock held (outputs are looked up). Returns NULL with an exception on error. */
static fwd_target *build_targets(ForwarderObject *self, PyObject *list, uint32_t *n_out)
{
    PyObject *seq = PySequence_Fast(list, "targets must be a list");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    fwd_target *t = calloc(n ? (size_t)n : 1, sizeof *t);
    if (!t) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *prog, *outs;
        int group, group_policy;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OOpi:target", &prog, &outs, &group,
                              &group_policy))
            goto fail;
        if (prog != Py_None) {
            char *buf;
            Py_ssize_t len;
            if (PyBytes_AsStringAndSize(prog, &buf, &len) < 0)
                goto fail;
            if (shmq_filter_check((const uint8_t *)buf, (uint32_t)len) != SHMQ_OK) {
                PyErr_SetString(error_class(E_INVALID_ARGUMENT), "forwarder: malformed filter program");
                goto fail;
            }
            t[i].filter = malloc((size_t)len);
            if (!t[i].filter) {
                PyErr_NoMemory();
                goto fail;
            }
            memcpy(t[i].filter, buf, (size_t)len);
            t[i].filter_len = (uint32_t)len;
        }
        PyObject *oseq = PySequence_Fast(outs, "outputs must be a list");
        if (!oseq)
            goto fail;
        Py_ssize_t no = PySequence_Fast_GET_SIZE(oseq);
        t[i].outs = calloc(no ? (size_t)no : 1, sizeof *t[i].outs);
        if (!t[i].outs) {
            Py_DECREF(oseq);
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t k = 0; k < no; k++) {
            unsigned long oid = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(oseq, k));
            fwd_output *o = oid == (unsigned long)-1 && PyErr_Occurred() ? NULL
                                                                          : shmq_fwd_output(self->f, (uint32_t)oid);
            if (!o) {
                Py_DECREF(oseq);
                if (!PyErr_Occurred())
                    PyErr_Format(error_class(E_INVALID_ARGUMENT), "forwarder: no output %lu", oid);
                goto fail;
            }
            t[i].outs[t[i].n++] = o;
        }
        Py_DECREF(oseq);
        if (!group && t[i].n != 1) {
            PyErr_SetString(error_class(E_INVALID_ARGUMENT), "forwarder: a plain target has one output");
            goto fail;
        }
        t[i].group = group;
        t[i].group_policy = group_policy == SHMQ_DROP ? SHMQ_DROP : SHMQ_BLOCK;
    }
    Py_DECREF(seq);
    *n_out = (uint32_t)n;
    return t;
fail:
    Py_DECREF(seq);
    shmq_fwd_free_targets(t, (uint32_t)n);
    return NULL;
}

/*
 * update(routes, replay=None): sets every (router_topic_id, targets) route in
 * `routes` and then, with no message forwarded in between, writes the last
 * values of replay = (output_id, [router topic ids], program | None) to that
 * output. A new subscriber so gets each topic's last value before any live one.
 */
static PyObject *Forwarder_update(ForwarderObject *self, PyObject *args)
{
    PyObject *routes, *replay = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:update", &routes, &replay))
        return NULL;
    FWD_CHECK(self);
    PyObject *seq = PySequence_Fast(routes, "routes must be a list of (topic id, targets)");
    if (!seq)
        return NULL;
    unsigned long out = 0;
    PyObject *topics = NULL, *prog = Py_None;
    uint32_t *ids = NULL;
    Py_ssize_t nids = 0;
    Py_buffer program = {0};
    int rc = SHMQ_OK, have_program = 0;
    if (replay != Py_None) {
        if (!PyArg_ParseTuple(replay, "kOO:replay", &out, &topics, &prog))
            goto done;
        PyObject *tseq = PySequence_Fast(topics, "replay topics must be a list of ints");
        if (!tseq)
            goto done;
        nids = PySequence_Fast_GET_SIZE(tseq);
        ids = PyMem_Malloc((nids ? (size_t)nids : 1) * sizeof *ids);
        for (Py_ssize_t i = 0; ids && i < nids; i++)
            ids[i] = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(tseq, i));
        Py_DECREF(tseq);
        if (!ids) {
            PyErr_NoMemory();
            goto done;
        }
        if (PyErr_Occurred())
            goto done;
        if (prog != Py_None) {
            if (PyObject_GetBuffer(prog, &program, PyBUF_SIMPLE) < 0)
                goto done;
            have_program = 1;
            if (shmq_filter_check(program.buf, (uint32_t)program.len) != SHMQ_OK) {
                PyErr_SetString(error_class(E_INVALID_ARGUMENT), "forwarder: malformed filter program");
                goto done;
            }
        }
    }
    lock_forwarder(self);
    for (Py_ssize_t i = 0; rc == SHMQ_OK && i < PySequence_Fast_GET_SIZE(seq); i++) {
        unsigned long gid;
        PyObject *targets;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "kO:route", &gid, &targets))
            break;
        uint32_t n;
        fwd_target *t = build_targets(self, targets, &n);
        if (!t)
            break;
        rc = shmq_fwd_set_route(self->f, (uint32_t)gid, t, n);
        if (rc != SHMQ_OK)
            shmq_fwd_free_targets(t, n);
    }
    if (rc == SHMQ_OK && !PyErr_Occurred() && replay != Py_None)
        rc = shmq_fwd_replay_last(self->f, (uint32_t)out, ids, (uint32_t)nids,
                                  have_program ? program.buf : NULL, have_program ? (uint32_t)program.len : 0);
    reap_outputs(self);
    unlock_forwarder(self);
    shmq_fwd_wake(self->f);
done:
    if (have_program)
        PyBuffer_Release(&program);
    PyMem_Free(ids);
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return NULL;
    return fwd_result(self, rc, "route");
}

static PyObject *Forwarder_set_input_target(ForwarderObject *self, PyObject *args)
{
    unsigned long id;
    PyObject *target;
    if (!PyArg_ParseTuple(args, "kO:set_input_target", &id, &target))
        return NULL;
    FWD_CHECK(self);
    PyObject *one = PyList_New(1);
    if (!one)
        return NULL;
    PyList_SET_ITEM(one, 0, Py_NewRef(target));
    lock_forwarder(self);
    uint32_t n;
    fwd_target *t = build_targets(self, one, &n);
    int rc = t ? shmq_fwd_set_input_target(self->f, (uint32_t)id, t) : SHMQ_OK;
    if (t && rc != SHMQ_OK)
        shmq_fwd_free_targets(t, n);
    reap_outputs(self);
    unlock_forwarder(self);
    Py_DECREF(one);
    if (!t)
        return NULL;
    shmq_fwd_wake(self->f);
    return fwd_result(self, rc, "input");
}

/*
 * run(timeout, wait, spin_ns) -> None | event tuple. Forwards with the GIL
 * released until `timeout` seconds pass, stop() is called, or the router has
 * to act: ("topic", input_id, local_id, topic_bytes) or ("corrupt", input_id).
 */
static PyObject *Forwarder_run(ForwarderObject *self, PyObject *args)
{
    double timeout;
    int strategy;
    long long spin_ns;
    if (!PyArg_ParseTuple(args, "diL:run", &timeout, &strategy, &spin_ns))
        return NULL;
    FWD_CHECK(self);
    if (self->running) {
        PyErr_SetString(error_class(E_BASE), "Forwarder.run() is already running in another thread");
        return NULL;
    }
    self->running = 1;
    shmq_fwd_event_info ev;
    ev.event = SHMQ_EV_NONE;
    int64_t deadline = shmq_now_ns() + (int64_t)(timeout * 1e9);
    Py_BEGIN_ALLOW_THREADS
    int64_t idle_since = -1;
    unsigned spins = 0;
    while (!atomic_load_explicit(&self->stopping, memory_order_relaxed)) {
        int stalled;
        pthread_mutex_lock(&self->lock);
        uint64_t before = self->have_log ? self->log.next_seq : 0;
        int64_t moved = shmq_fwd_pass(self->f, &ev, &stalled);
        if (self->confirm && self->log.next_seq != before)
            pthread_cond_signal(&self->appended); /* the flusher's next group commit */
        pthread_mutex_unlock(&self->lock);
        if (ev.event != SHMQ_EV_NONE)
            break;
        if (moved > 0) {
            idle_since = -1;
            continue;
        }
        int64_t now = shmq_now_ns();
        if (now >= deadline)
            break;
        if (idle_since < 0)
            idle_since = now;
        if (strategy == SHMQ_WAIT_SPIN || (strategy == SHMQ_WAIT_ADAPTIVE && now - idle_since < spin_ns)) {
            if (strategy == SHMQ_WAIT_SPIN && stalled && (++spins & 1023) == 0)
                sched_yield(); /* a spinning router must not starve the subscriber it waits for */
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        if (strategy == SHMQ_WAIT_YIELD) {
            sched_yield();
            continue;
        }
        pthread_mutex_lock(&self->lock);
        int work = shmq_fwd_sleep_prepare(self->f);
        pthread_mutex_unlock(&self->lock);
        int64_t left = deadline - now;
        shmq_fwd_sleep(self->f, left, !work && !atomic_load_explicit(&self->stopping, memory_order_relaxed));
        idle_since = -1;
    }
    Py_END_ALLOW_THREADS
    self->running = 0;
    if (ev.event == SHMQ_EV_UNKNOWN_TOPIC)
        return Py_BuildValue("(skky#)", "topic", (unsigned long)ev.input_id, (unsigned long)ev.local_topic,
                             (const char *)ev.topic, (Py_ssize_t)ev.topic_len);
    if (ev.event == SHMQ_EV_CORRUPT)
        return Py_BuildValue("(sk)", "corrupt", (unsigned long)ev.input_id);
    if (ev.event == SHMQ_EV_LOG_TOPIC)
        return Py_BuildValue("(sky#)", "log_topic", (unsigned long)ev.input_id, (const char *)ev.topic,
                             (Py_ssize_t)ev.topic_len);
    if (ev.event == SHMQ_EV_LOG_ERROR)
        return Py_BuildValue("(skis)", "log_error", (unsigned long)ev.input_id, ev.error,
                             ev.error_what ? ev.error_what : "write the log");
    if (PyErr_CheckSignals() < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Forwarder_stop(ForwarderObject *self, PyObject *Py_UNUSED(ignored))
{
    FWD_CHECK(self);
    atomic_store(&self->stopping, 1);
    shmq_fwd_wake(self->f);
    pthread_mutex_lock(&self->lock);
    pthread_cond_broadcast(&self->appended);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *Forwarder_wake(ForwarderObject *self, PyObject *Py_UNUSED(ignored))
{
    FWD_CHECK(self);
    shmq_fwd_wake(self->f);
    Py_RETURN_NONE;
}

#include "_log.c"

static PyMethodDef Forwarder_methods[] = {
    LOG_FORWARDER_METHODS
    {"add_input", (PyCFunction)Forwarder_add_input, METH_VARARGS,
     "add_input(id, ring_buffer, stats_offset): read a publisher ring."},
    {"remove_input", (PyCFunction)Forwarder_remove_input, METH_O, "remove_input(id)"},
    {"input_depth", (PyCFunction)Forwarder_input_depth, METH_O, "input_depth(id) -> messages unread"},
    {"isolate_input", (PyCFunction)Forwarder_isolate_input, METH_O, "isolate_input(id): stop reading it"},
    {"set_input_target", (PyCFunction)Forwarder_set_input_target, METH_VARARGS,
     "set_input_target(id, (program, [outputs], is_group, group_policy)): redeliver this input there."},
    {"add_output", (PyCFunction)Forwarder_add_output, METH_VARARGS,
     "add_output(id, ring_buffer, policy, stats_offset): write a subscriber ring."},
    {"remove_output", (PyCFunction)Forwarder_remove_output, METH_O, "remove_output(id)"},
    {"add_topic", (PyCFunction)Forwarder_add_topic, METH_VARARGS,
     "add_topic(router_topic_id, stats_offset, keep_last)"},
    {"map_topic", (PyCFunction)Forwarder_map_topic, METH_VARARGS,
     "map_topic(input_id, publisher_topic_id, router_topic_id)"},
    {"update", (PyCFunction)Forwarder_update, METH_VARARGS,
     "update([(router_topic_id, [(program | None, [output ids], is_group, group_policy), ...]), ...], "
     "replay=None | (output_id, [router topic ids], program | None))"},
    {"run", (PyCFunction)Forwarder_run, METH_VARARGS, "run(timeout, wait, spin_ns) -> None | event"},
    {"stop", (PyCFunction)Forwarder_stop, METH_NOARGS, "Make run() return soon, and every later call at once."},
    {"wake", (PyCFunction)Forwarder_wake, METH_NOARGS, "Wake a sleeping run()."},
    {NULL},
};

static PyTypeObject ForwarderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._native._ring.Forwarder",
    .tp_basicsize = sizeof(ForwarderObject),
    .tp_dealloc = (destructor)Forwarder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The router's forwarding engine (shmq/_native/bus.c).",
    .tp_methods = Forwarder_methods,
    .tp_init = (initproc)Forwarder_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ */
/* Module functions for pub/sub                                        */
/* ------------------------------------------------------------------ */

static PyObject *mod_filter_eval(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer prog, headers;
    if (!PyArg_ParseTuple(args, "y*y*:filter_eval", &prog, &headers))
        return NULL;
    PyObject *result = NULL;
    if (shmq_filter_check(prog.buf, (uint32_t)prog.len) != SHMQ_OK)
        PyErr_SetString(error_class(E_INVALID_ARGUMENT), "malformed filter program");
    else if (shmq_headers_check(headers.buf, (uint32_t)headers.len) != SHMQ_OK)
        PyErr_SetString(error_class(E_CORRUPT), "malformed headers");
    else
        result = PyBool_FromLong(shmq_filter_eval(prog.buf, (uint32_t)prog.len, headers.buf, (uint32_t)headers.len));
    PyBuffer_Release(&prog);
    PyBuffer_Release(&headers);
    return result;
}

static PyObject *mod_filter_check(PyObject *Py_UNUSED(m), PyObject *arg)
{
    Py_buffer prog;
    if (PyObject_GetBuffer(arg, &prog, PyBUF_SIMPLE) < 0)
        return NULL;
    int ok = shmq_filter_check(prog.buf, (uint32_t)prog.len) == SHMQ_OK;
    PyBuffer_Release(&prog);
    return PyBool_FromLong(ok);
}

static PyObject *mod_decode_headers(PyObject *Py_UNUSED(m), PyObject *arg)
{
    Py_buffer h;
    if (PyObject_GetBuffer(arg, &h, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *d = decode_headers(h.buf, (uint32_t)h.len);
    PyBuffer_Release(&h);
    return d;
}

static PyObject *mod_ring_doorbell(PyObject *Py_UNUSED(m), PyObject *arg)
{
    Py_buffer bus;
    if (PyObject_GetBuffer(arg, &bus, PyBUF_WRITABLE) < 0)
        return NULL;
    if (bus.len >= 4096)
        shmq_bus_ring_doorbell(bus.buf);
    PyBuffer_Release(&bus);
    Py_RETURN_NONE;
}

#define PUBSUB_METHODS                                                                                   \
    {"filter_eval", mod_filter_eval, METH_VARARGS, "filter_eval(program, headers) -> bool (for tests)"}, \
    {"filter_check", mod_filter_check, METH_O, "filter_check(program) -> bool"},                       \
    {"decode_headers", mod_decode_headers, METH_O, "decode_headers(encoded) -> dict"},                 \
    {"ring_doorbell", mod_ring_doorbell, METH_O, "ring_doorbell(bus): wake a sleeping router"},        \
    {"_make_message", mod_make_message, METH_VARARGS, "rebuild a pickled Message"},                    \
    LOG_MODULE_METHODS

static int pubsub_add_types(PyObject *m)
{
    if (PyType_Ready(&MessageType) < 0 || PyType_Ready(&PublisherCoreType) < 0 ||
        PyType_Ready(&SubscriberCoreType) < 0 || PyType_Ready(&ForwarderType) < 0 ||
        PyType_Ready(&LogReaderType) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Message", (PyObject *)&MessageType) < 0 ||
        PyModule_AddObjectRef(m, "PublisherCore", (PyObject *)&PublisherCoreType) < 0 ||
        PyModule_AddObjectRef(m, "SubscriberCore", (PyObject *)&SubscriberCoreType) < 0 ||
        PyModule_AddObjectRef(m, "Forwarder", (PyObject *)&ForwarderType) < 0 ||
        PyModule_AddObjectRef(m, "LogReader", (PyObject *)&LogReaderType) < 0)
        return -1;
    struct { const char *name; long value; } constants[] = {
        {"MSG_HEADER", SHMQ_MSG_HEADER}, {"MAX_HEADERS", SHMQ_MAX_HEADERS},
        {"BUS_OFF_DOORBELL", SHMQ_BUS_OFF_DOORBELL}, {"BUS_OFF_SLEEPING", SHMQ_BUS_OFF_SLEEPING},
        {"BUS_OFF_COUNTERS", SHMQ_BUS_OFF_COUNTERS},
        {"POLICY_BLOCK", SHMQ_BLOCK}, {"POLICY_DROP", SHMQ_DROP},
        {"POLICY_DROP_OLDEST", SHMQ_DROP_OLDEST}, {"POLICY_CONFLATE", SHMQ_CONFLATE},
        {"POLICY_SPILL", SHMQ_SPILL},
        {"BUS_OFF_LOG_ERROR", SHMQ_BUS_OFF_LOG_ERROR}, {"BUS_OFF_LOG_NEXT", SHMQ_BUS_OFF_LOG_NEXT},
        {"BUS_OFF_LOG_SYNCED", SHMQ_BUS_OFF_LOG_SYNCED},
        {"PUBLISHER_SLOT", SHMQ_PUBLISHER_SLOT}, {"SUBSCRIBER_SLOT", SHMQ_SUBSCRIBER_SLOT},
        {"PS_DURABLE_POS", SHMQ_PS_DURABLE_POS},
        {"LOG_HEADER", SHMQ_LOG_HEADER}, {"REC_HEADER", SHMQ_REC_HEADER},
        {"LOG_MIN_SEGMENT", SHMQ_LOG_MIN_SEGMENT},
    };
    for (size_t i = 0; i < sizeof(constants) / sizeof(constants[0]); i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0)
            return -1;
    return 0;
}
