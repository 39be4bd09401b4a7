/*
 * CPython binding of the durable log (log.c): the Forwarder's log methods
 * (included by _pubsub.c inside the Forwarder section), the `LogReader` type
 * that `shmq log` and tests use, and module helpers.
 */

static PyObject *damage_list(const shmq_log_damage *d, uint32_t n)
{
    PyObject *list = PyList_New(0);
    for (uint32_t i = 0; list && i < n; i++) {
        PyObject *item = Py_BuildValue("(KKKO)", (unsigned long long)d[i].segment, (unsigned long long)d[i].offset,
                                       (unsigned long long)d[i].length, d[i].truncated ? Py_True : Py_False);
        if (!item || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
    }
    return list;
}

static PyObject *raise_log_error(int err, const char *what, const char *dir)
{
    if (!err)
        err = EIO;
    PyObject *msg = PyUnicode_FromFormat("could not %s under %s: %s", what ? what : "use the log",
                                         dir ? dir : "?", strerror(err));
    PyObject *exc_args = msg ? Py_BuildValue("(iN)", err, msg) : NULL;
    if (exc_args) {
        PyErr_SetObject(PyExc_OSError, exc_args);
        Py_DECREF(exc_args);
    }
    return NULL;
}

/* -- the Forwarder's log -------------------------------------------------- */

static PyObject *Forwarder_open_log(ForwarderObject *self, PyObject *args)
{
    const char *dir;
    unsigned long long segment_size;
    int fsync_mode;
    if (!PyArg_ParseTuple(args, "sKi:open_log", &dir, &segment_size, &fsync_mode))
        return NULL;
    FWD_CHECK(self);
    if (self->have_log) {
        PyErr_SetString(error_class(E_INVALID_ARGUMENT), "the forwarder has a log already");
        return NULL;
    }
    if (segment_size < SHMQ_LOG_MIN_SEGMENT || segment_size > SHMQ_LOG_MAX_SEGMENT) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT), "segment_bytes must be between %llu and %llu, got %llu",
                     (unsigned long long)SHMQ_LOG_MIN_SEGMENT, (unsigned long long)SHMQ_LOG_MAX_SEGMENT,
                     segment_size);
        return NULL;
    }
    int flags = SHMQ_LOG_CHECKSUMS | SHMQ_LOG_REMEMBER | (fsync_mode ? SHMQ_LOG_SYNCS : 0);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shmq_log_open(&self->log, dir, segment_size, flags);
    Py_END_ALLOW_THREADS
    if (rc != SHMQ_LOG_OK) {
        int err = self->log.error;
        const char *what = self->log.error_what;
        shmq_log_close(&self->log);
        return raise_log_error(err, what, dir);
    }
    self->have_log = 1;
    self->confirm = fsync_mode == 2;
    lock_forwarder(self);
    shmq_fwd_set_log(self->f, &self->log, self->confirm);
    unlock_forwarder(self);
    return Py_BuildValue("{sKsKsKsN}", "next_seq", (unsigned long long)self->log.next_seq, "first_seq",
                         (unsigned long long)self->log.first_seq, "synced_seq",
                         (unsigned long long)self->log.synced_seq, "damage",
                         damage_list(self->log.damage, self->log.ndamage));
}

#define LOG_CHECK(self)                                                                   \
    do {                                                                                  \
        FWD_CHECK(self);                                                                  \
        if (!(self)->have_log) {                                                          \
            PyErr_SetString(error_class(E_INVALID_ARGUMENT), "the router has no data_dir"); \
            return NULL;                                                                  \
        }                                                                                 \
    } while (0)

/*
 * sync(wait) -> int: flushes the log to disk and returns the seq it is synced up
 * to. With wait > 0, first waits up to that many seconds for something to flush
 * (fsync="always": the flusher thread sleeps here between group commits).
 */
static PyObject *Forwarder_sync(ForwarderObject *self, PyObject *args)
{
    double wait = 0;
    if (!PyArg_ParseTuple(args, "|d:sync", &wait))
        return NULL;
    LOG_CHECK(self);
    shmq_log_sync s;
    uint64_t synced;
    int n, failed = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    if (wait > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t end = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec + (int64_t)(wait * 1e9);
        ts.tv_sec = end / 1000000000LL;
        ts.tv_nsec = end % 1000000000LL;
        while (self->log.next_seq - 1 <= self->log.synced_seq &&
               !atomic_load_explicit(&self->stopping, memory_order_relaxed))
            if (pthread_cond_timedwait(&self->appended, &self->lock, &ts) == ETIMEDOUT)
                break;
    }
    n = shmq_log_sync_prepare(&self->log, &s);
    pthread_mutex_unlock(&self->lock);
    if (n > 0 || s.error) {
        failed = shmq_log_sync_run(&s) < 0 || s.error;
        pthread_mutex_lock(&self->lock);
        shmq_log_sync_finish(&self->log, &s);
        if (!failed)
            shmq_fwd_log_synced(self->f);
        pthread_mutex_unlock(&self->lock);
    }
    synced = self->log.synced_seq;
    Py_END_ALLOW_THREADS
    if (failed)
        return raise_log_error(s.error, "sync the log", self->log.dir);
    return PyLong_FromUnsignedLongLong(synced);
}

static PyObject *Forwarder_log_info(ForwarderObject *self, PyObject *Py_UNUSED(ignored))
{
    LOG_CHECK(self);
    lock_forwarder(self);
    shmq_log *l = &self->log;
    PyObject *r = Py_BuildValue("{sKsKsKsKsKsKsi}", "next_seq", (unsigned long long)l->next_seq, "first_seq",
                                (unsigned long long)l->first_seq, "synced_seq", (unsigned long long)l->synced_seq,
                                "bytes_appended", (unsigned long long)l->bytes_appended, "segments_created",
                                (unsigned long long)l->segments_created, "active_segment",
                                (unsigned long long)l->base_seq, "error", l->error);
    unlock_forwarder(self);
    return r;
}

static PyObject *Forwarder_log_remove_before(ForwarderObject *self, PyObject *arg)
{
    LOG_CHECK(self);
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    lock_forwarder(self);
    int n = shmq_log_remove_before(&self->log, seq);
    unlock_forwarder(self);
    return PyLong_FromLong(n);
}

/* set_output_log(id, start_seq, redelivered_upto, state_buffer | None, delivered_offset,
 *                intent_offset, filter | None) */
static PyObject *Forwarder_set_output_log(ForwarderObject *self, PyObject *args)
{
    unsigned long id;
    unsigned long long start, redelivered;
    PyObject *state, *filter;
    long long delivered_off, intent_off;
    if (!PyArg_ParseTuple(args, "kKKOLLO:set_output_log", &id, &start, &redelivered, &state, &delivered_off,
                          &intent_off, &filter))
        return NULL;
    LOG_CHECK(self);
    uint64_t *delivered = NULL, *intent = NULL;
    if (state != Py_None) {
        Py_buffer *view = keep_buffer(self, "d", id, state);
        if (!view)
            return NULL;
        if (delivered_off < 0 || delivered_off % 8 || delivered_off + 8 > view->len || intent_off < 0 ||
            intent_off % 8 || intent_off + 16 > view->len) {
            drop_buffer(self, "d", id);
            PyErr_SetString(error_class(E_INVALID_ARGUMENT), "bad state offset");
            return NULL;
        }
        delivered = (uint64_t *)((uint8_t *)view->buf + delivered_off);
        intent = (uint64_t *)((uint8_t *)view->buf + intent_off);
    }
    uint8_t *program = NULL;
    uint32_t program_len = 0;
    if (filter != Py_None) {
        if (!PyBytes_Check(filter) ||
            shmq_filter_check((const uint8_t *)PyBytes_AS_STRING(filter), (uint32_t)PyBytes_GET_SIZE(filter)) != SHMQ_OK) {
            PyErr_SetString(error_class(E_INVALID_ARGUMENT), "bad filter program");
            return NULL;
        }
        program_len = (uint32_t)PyBytes_GET_SIZE(filter);
        program = malloc(program_len ? program_len : 1);
        if (!program)
            return PyErr_NoMemory();
        memcpy(program, PyBytes_AS_STRING(filter), program_len);
    }
    lock_forwarder(self);
    int rc = shmq_fwd_set_output_log(self->f, (uint32_t)id, start, redelivered, delivered, intent, program,
                                     program_len);
    unlock_forwarder(self);
    if (rc != SHMQ_OK) {
        free(program);
        if (state != Py_None)
            drop_buffer(self, "d", id);
    }
    shmq_fwd_wake(self->f);
    return fwd_result(self, rc, "log-fed output");
}

/* set_output_match(id, [(topic id, wanted), ...]) */
static PyObject *Forwarder_set_output_match(ForwarderObject *self, PyObject *args)
{
    unsigned long id;
    PyObject *list;
    if (!PyArg_ParseTuple(args, "kO!:set_output_match", &id, &PyList_Type, &list))
        return NULL;
    LOG_CHECK(self);
    Py_ssize_t n = PyList_GET_SIZE(list);
    uint32_t *gids = PyMem_Malloc(sizeof *gids * (size_t)(n ? n : 1));
    uint8_t *want = PyMem_Malloc((size_t)(n ? n : 1));
    if (!gids || !want) {
        PyMem_Free(gids);
        PyMem_Free(want);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long g;
        int w;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(list, i), "kp", &g, &w)) {
            PyMem_Free(gids);
            PyMem_Free(want);
            return NULL;
        }
        gids[i] = (uint32_t)g;
        want[i] = (uint8_t)w;
    }
    lock_forwarder(self);
    int rc = SHMQ_OK;
    for (Py_ssize_t i = 0; i < n && rc == SHMQ_OK; i++)
        rc = shmq_fwd_set_output_match(self->f, (uint32_t)id, gids[i], want[i]);
    unlock_forwarder(self);
    PyMem_Free(gids);
    PyMem_Free(want);
    shmq_fwd_wake(self->f);
    return fwd_result(self, rc, "log-fed output");
}

static PyObject *Forwarder_set_output_spill(ForwarderObject *self, PyObject *args)
{
    unsigned long id;
    const char *dir;
    unsigned long long max_bytes, segment;
    if (!PyArg_ParseTuple(args, "ksKK:set_output_spill", &id, &dir, &max_bytes, &segment))
        return NULL;
    FWD_CHECK(self);
    lock_forwarder(self);
    int rc = shmq_fwd_set_output_spill(self->f, (uint32_t)id, dir, max_bytes, segment);
    unlock_forwarder(self);
    return fwd_result(self, rc, "spill output");
}

#define LOG_FORWARDER_METHODS                                                                        \
    {"open_log", (PyCFunction)Forwarder_open_log, METH_VARARGS,                                      \
     "open_log(dir, segment_bytes, fsync_mode) -> dict: open and recover the durable log"},          \
    {"sync", (PyCFunction)Forwarder_sync, METH_VARARGS, "sync(wait=0) -> int: flush the log"},       \
    {"log_info", (PyCFunction)Forwarder_log_info, METH_NOARGS, "log_info() -> dict"},                \
    {"log_remove_before", (PyCFunction)Forwarder_log_remove_before, METH_O,                          \
     "log_remove_before(seq) -> int: remove whole segments older than seq"},                         \
    {"set_output_log", (PyCFunction)Forwarder_set_output_log, METH_VARARGS,                          \
     "set_output_log(id, start, redelivered_upto, state, state_offset, filter)"},                    \
    {"set_output_match", (PyCFunction)Forwarder_set_output_match, METH_VARARGS,                      \
     "set_output_match(id, [(topic_id, wanted)])"},                                                  \
    {"set_output_spill", (PyCFunction)Forwarder_set_output_spill, METH_VARARGS,                      \
     "set_output_spill(id, dir, max_bytes, segment_bytes)"},

/* -- LogReader ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    shmq_log_cursor c;
    int open;
} LogReaderObject;

static int LogReader_init(LogReaderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"dir", "start", "time_ns", "checksums", NULL};
    const char *dir;
    unsigned long long start = 1;
    PyObject *time_ns = Py_None;
    int checksums = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s|KOp:LogReader", kwlist, &dir, &start, &time_ns, &checksums))
        return -1;
    if (self->open) {
        shmq_log_cursor_close(&self->c);
        self->open = 0;
    }
    int kind = SHMQ_START_SEQ;
    uint64_t at = start;
    if (time_ns != Py_None) {
        kind = SHMQ_START_TIME;
        at = PyLong_AsUnsignedLongLong(time_ns);
        if (PyErr_Occurred())
            return -1;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shmq_log_cursor_open(&self->c, dir, checksums, kind, at);
    Py_END_ALLOW_THREADS
    if (rc != SHMQ_LOG_OK) {
        int err = self->c.error;
        const char *what = self->c.error_what;
        shmq_log_cursor_close(&self->c);
        raise_log_error(err, what, dir);
        return -1;
    }
    self->open = 1;
    return 0;
}

static void LogReader_dealloc(LogReaderObject *self)
{
    if (self->open)
        shmq_log_cursor_close(&self->c);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* read(max_records=1024, limit=0) -> list[(seq, time_ns, segment, offset, body)] */
static PyObject *LogReader_read(LogReaderObject *self, PyObject *args)
{
    Py_ssize_t max = 1024;
    unsigned long long limit = 0;
    if (!PyArg_ParseTuple(args, "|nK:read", &max, &limit))
        return NULL;
    if (!self->open) {
        PyErr_SetString(error_class(E_CLOSED), "this LogReader is closed");
        return NULL;
    }
    PyObject *list = PyList_New(0);
    shmq_log_record r;
    int rc = SHMQ_LOG_END;
    while (list && PyList_GET_SIZE(list) < max && (rc = shmq_log_cursor_next(&self->c, limit, &r)) == SHMQ_LOG_OK) {
        PyObject *item = Py_BuildValue("(KKKKy#)", (unsigned long long)r.seq, (unsigned long long)r.time_ns,
                                       (unsigned long long)r.segment, (unsigned long long)r.offset,
                                       (const char *)r.body, (Py_ssize_t)r.len);
        if (!item || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
        shmq_log_cursor_advance(&self->c, &r);
    }
    if (list && rc == SHMQ_LOG_ERR) {
        Py_DECREF(list);
        return raise_log_error(self->c.error, self->c.error_what, self->c.dir);
    }
    return list;
}

static PyObject *LogReader_damage(LogReaderObject *self, PyObject *Py_UNUSED(ignored))
{
    return damage_list(self->c.damage, self->c.ndamage);
}

static PyObject *LogReader_close(LogReaderObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->open)
        shmq_log_cursor_close(&self->c);
    self->open = 0;
    Py_RETURN_NONE;
}

static PyObject *LogReader_get_next_seq(LogReaderObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->c.next_seq);
}

static PyObject *LogReader_get_skipped(LogReaderObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(self->c.skipped);
}

static PyMethodDef LogReader_methods[] = {
    {"read", (PyCFunction)LogReader_read, METH_VARARGS,
     "read(max_records=1024, limit=0) -> [(seq, time_ns, segment, offset, body)]: the next records"},
    {"damage", (PyCFunction)LogReader_damage, METH_NOARGS,
     "damage() -> [(segment, offset, length, truncated)]: damaged ranges skipped so far"},
    {"close", (PyCFunction)LogReader_close, METH_NOARGS, "close()"},
    {NULL},
};

static PyGetSetDef LogReader_getset[] = {
    {"next_seq", (getter)LogReader_get_next_seq, NULL, "the seq the next record should have", NULL},
    {"skipped", (getter)LogReader_get_skipped, NULL, "records lost to damage or retention so far", NULL},
    {NULL},
};

static PyTypeObject LogReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._native._ring.LogReader",
    .tp_basicsize = sizeof(LogReaderObject),
    .tp_dealloc = (destructor)LogReader_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reads a durable log directory in order (segment by segment).",
    .tp_methods = LogReader_methods,
    .tp_getset = LogReader_getset,
    .tp_init = (initproc)LogReader_init,
    .tp_new = PyType_GenericNew,
};

/* -- module functions ---------------------------------------------------- */

static PyObject *mod_crc32c(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer b;
    unsigned long crc = 0;
    if (!PyArg_ParseTuple(args, "y*|k:crc32c", &b, &crc))
        return NULL;
    uint32_t r = shmq_crc32c((uint32_t)crc, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(r);
}

static PyObject *mod_log_segments(PyObject *Py_UNUSED(m), PyObject *arg)
{
    const char *dir = PyUnicode_AsUTF8(arg);
    if (!dir)
        return NULL;
    uint64_t *bases;
    int64_t n = shmq_log_segments(dir, &bases);
    if (n < 0)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
    PyObject *list = PyList_New(0);
    for (int64_t i = 0; list && i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(bases[i]);
        if (!v || PyList_Append(list, v) < 0)
            Py_CLEAR(list);
        Py_XDECREF(v);
    }
    free(bases);
    return list;
}

static PyObject *mod_log_scan_segment(PyObject *Py_UNUSED(m), PyObject *args)
{
    const char *path;
    int checksums = 1;
    if (!PyArg_ParseTuple(args, "s|p:log_scan_segment", &path, &checksums))
        return NULL;
    shmq_log_segment_info i;
    shmq_log_damage d[SHMQ_LOG_MAX_DAMAGE];
    uint32_t nd;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shmq_log_segment_scan(path, checksums, &i, d, &nd);
    Py_END_ALLOW_THREADS
    if (rc != SHMQ_LOG_OK)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsOsN}", "base_seq", (unsigned long long)i.base_seq, "size",
                         (unsigned long long)i.size, "used", (unsigned long long)i.used, "records",
                         (unsigned long long)i.records, "first_seq", (unsigned long long)i.first_seq, "last_seq",
                         (unsigned long long)i.last_seq, "first_time_ns", (unsigned long long)i.first_time,
                         "last_time_ns", (unsigned long long)i.last_time, "damaged_records",
                         (unsigned long long)i.damaged_records, "damaged_bytes",
                         (unsigned long long)i.damaged_bytes, "bad_header", i.bad_header ? Py_True : Py_False,
                         "damage", damage_list(d, nd));
}

#define LOG_MODULE_METHODS                                                                             \
    {"crc32c", mod_crc32c, METH_VARARGS, "crc32c(data, crc=0) -> int: CRC-32C (Castagnoli)"},          \
    {"log_segments", mod_log_segments, METH_O, "log_segments(dir) -> [base_seq]: segments, oldest first"}, \
    {"log_scan_segment", mod_log_scan_segment, METH_VARARGS,                                           \
     "log_scan_segment(path, checksums=True) -> dict: records, sequences, times and damage"},
