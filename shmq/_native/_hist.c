/*
 * CPython binding of the latency histogram (hist.c): the `Histogram` type that
 * shmq.LatencyRecorder wraps. Included by _ringmodule.c (one extension module).
 */
#include "hist.h"

typedef struct {
    PyObject_HEAD
    shmq_hist hist;
    Py_buffer buffer;
    int has_buffer;
    unsigned long long clamped; /* samples above the highest value, recorded as the highest */
} HistogramObject;

static PyTypeObject HistogramType;

static int Histogram_init(HistogramObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "highest", "significant_figures", "creator_pid", "created_ns", NULL};
    PyObject *buffer;
    unsigned long long highest = 0, pid = 0, created = 0;
    unsigned int figures = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|KIKK:Histogram", kwlist, &buffer, &highest, &figures,
                                     &pid, &created))
        return -1;
    if (self->has_buffer) {
        PyErr_SetString(error_class(E_BASE), "Histogram.__init__ called twice");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->buffer, PyBUF_WRITABLE) < 0)
        return -1;
    self->has_buffer = 1;
    uint8_t *base = self->buffer.buf;
    uint64_t size = (uint64_t)self->buffer.len;
    if (highest && shmq_hist_init(base, size, highest, figures, pid, created) < 0) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT),
                     "cannot make a histogram of highest=%llu, significant_figures=%u in %llu bytes "
                     "(figures 1..5, highest >= 2; size from hist_size())",
                     highest, figures, (unsigned long long)size);
        return -1;
    }
    if (shmq_hist_attach(&self->hist, base, size) < 0) {
        PyErr_SetString(error_class(E_CORRUPT), "this memory does not hold a shmq latency histogram");
        return -1;
    }
    return 0;
}

static void Histogram_dealloc(HistogramObject *self)
{
    if (self->has_buffer)
        PyBuffer_Release(&self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define CHECK_HIST(self)                                                                            \
    do {                                                                                            \
        if (!(self)->has_buffer || !(self)->hist.counts_len) {                                      \
            PyErr_SetString(error_class(E_CLOSED), "this latency recorder is closed");            \
            return NULL;                                                                            \
        }                                                                                           \
    } while (0)

static int sample_of(PyObject *obj, uint64_t *value)
{
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(error_class(E_ARGUMENT_TYPE), "a latency sample is an int of ns, got %.100s",
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    if (v < 0) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT),
                     "a latency sample cannot be negative (%lld ns): clocks of different hosts, or "
                     "timestamps from another clock than time.time_ns()?", v);
        return -1;
    }
    *value = (uint64_t)v;
    return 0;
}

static PyObject *Histogram_record(HistogramObject *self, PyObject *arg)
{
    CHECK_HIST(self);
    uint64_t v;
    if (sample_of(arg, &v) < 0)
        return NULL;
    self->clamped += (unsigned)shmq_hist_record(&self->hist, v, 1);
    Py_RETURN_NONE;
}

static PyObject *Histogram_record_many(HistogramObject *self, PyObject *arg)
{
    CHECK_HIST(self);
    Py_buffer view;
    /* A buffer of 8-byte signed ints (array('q'), a numpy int64 array) is read directly. */
    if (PyObject_CheckBuffer(arg) && PyObject_GetBuffer(arg, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0) {
        int ok = view.itemsize == 8 && view.format && (strcmp(view.format, "q") == 0 ||
                                                       strcmp(view.format, "l") == 0 ||
                                                       strcmp(view.format, "<q") == 0 ||
                                                       strcmp(view.format, "=q") == 0);
        if (!ok) {
            PyBuffer_Release(&view);
            PyErr_SetString(error_class(E_ARGUMENT_TYPE),
                            "record_many() takes int64 samples (array('q'), numpy int64) or an iterable of ints");
            return NULL;
        }
        const int64_t *v = view.buf;
        Py_ssize_t n = view.len / 8;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (v[i] < 0) {
                PyBuffer_Release(&view);
                PyErr_Format(error_class(E_INVALID_ARGUMENT),
                             "sample %zd is negative (%lld ns); the %zd before it were recorded", i,
                             (long long)v[i], i);
                return NULL;
            }
            self->clamped += (unsigned)shmq_hist_record(&self->hist, (uint64_t)v[i], 1);
        }
        PyBuffer_Release(&view);
        return PyLong_FromSsize_t(n);
    }
    PyErr_Clear();
    PyObject *it = PyObject_GetIter(arg);
    if (!it) {
        PyErr_Clear();
        PyErr_Format(error_class(E_ARGUMENT_TYPE), "record_many() takes an iterable of ints, got %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    Py_ssize_t n = 0;
    PyObject *item;
    while ((item = PyIter_Next(it))) {
        uint64_t v;
        int rc = sample_of(item, &v);
        Py_DECREF(item);
        if (rc < 0) {
            Py_DECREF(it);
            return NULL;
        }
        self->clamped += (unsigned)shmq_hist_record(&self->hist, v, 1);
        n++;
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSsize_t(n);
}

static PyObject *Histogram_record_corrected(HistogramObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_HIST(self);
    uint64_t v, interval;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "record_corrected(value, expected_interval) takes 2 arguments");
        return NULL;
    }
    if (sample_of(args[0], &v) < 0 || sample_of(args[1], &interval) < 0)
        return NULL;
    /* Coordinated omission, as HdrHistogram corrects it: a sample that took longer than the
     * interval between intended sends stands for the samples that could not be sent meanwhile,
     * each waiting one interval less. */
    for (;;) {
        self->clamped += (unsigned)shmq_hist_record(&self->hist, v, 1);
        if (interval == 0 || v <= interval)
            break;
        v -= interval;
    }
    Py_RETURN_NONE;
}

static PyObject *Histogram_percentile(HistogramObject *self, PyObject *arg)
{
    CHECK_HIST(self);
    double p = PyFloat_AsDouble(arg);
    if (p == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(p >= 0.0 && p <= 100.0)) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT), "a percentile is between 0 and 100, got %R", arg);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(shmq_hist_percentile(&self->hist, p));
}

static PyObject *Histogram_add(HistogramObject *self, PyObject *arg)
{
    CHECK_HIST(self);
    if (!PyObject_TypeCheck(arg, &HistogramType)) {
        PyErr_Format(error_class(E_ARGUMENT_TYPE), "add() takes a Histogram, got %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    HistogramObject *other = (HistogramObject *)arg;
    CHECK_HIST(other);
    if (shmq_hist_add(&self->hist, &other->hist) < 0) {
        PyErr_Format(error_class(E_INVALID_ARGUMENT),
                     "cannot merge histograms of different ranges (highest %llu, %u figures vs %llu, %u)",
                     (unsigned long long)self->hist.highest, self->hist.significant_figures,
                     (unsigned long long)other->hist.highest, other->hist.significant_figures);
        return NULL;
    }
    self->clamped += other->clamped;
    Py_RETURN_NONE;
}

static PyObject *Histogram_reset(HistogramObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_HIST(self);
    shmq_hist_reset(&self->hist);
    self->clamped = 0;
    Py_RETURN_NONE;
}

static PyObject *Histogram_counters(HistogramObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_HIST(self);
    shmq_hist *h = &self->hist;
    uint64_t lo = shmq_hist_min(h);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:I,s:K}", "count", (unsigned long long)shmq_hist_total(h),
                         "min", (unsigned long long)(lo == UINT64_MAX ? 0 : lo), "max",
                         (unsigned long long)shmq_hist_max(h), "sum", (unsigned long long)shmq_hist_sum(h),
                         "highest", (unsigned long long)h->highest, "significant_figures",
                         h->significant_figures, "clamped", self->clamped);
}

static PyObject *Histogram_equivalent_range(HistogramObject *self, PyObject *arg)
{
    CHECK_HIST(self);
    uint64_t v;
    if (sample_of(arg, &v) < 0)
        return NULL;
    if (v > self->hist.highest)
        v = self->hist.highest;
    return Py_BuildValue("(KK)", (unsigned long long)shmq_hist_lowest_equivalent(&self->hist, v),
                         (unsigned long long)shmq_hist_highest_equivalent(&self->hist, v));
}

static PyMethodDef Histogram_methods[] = {
    {"record", (PyCFunction)Histogram_record, METH_O, "record(ns): one sample."},
    {"record_many", (PyCFunction)Histogram_record_many, METH_O,
     "record_many(samples) -> int: int64 buffer or iterable of ints."},
    {"record_corrected", (PyCFunction)(void (*)(void))Histogram_record_corrected, METH_FASTCALL,
     "record_corrected(ns, expected_interval_ns): one sample, corrected for coordinated omission."},
    {"percentile", (PyCFunction)Histogram_percentile, METH_O, "percentile(p) -> ns."},
    {"add", (PyCFunction)Histogram_add, METH_O, "add(other): merge other's samples into this one."},
    {"reset", (PyCFunction)Histogram_reset, METH_NOARGS, "Forget every sample."},
    {"counters", (PyCFunction)Histogram_counters, METH_NOARGS, "count, min, max, sum, highest, ..."},
    {"equivalent_range", (PyCFunction)Histogram_equivalent_range, METH_O,
     "equivalent_range(ns) -> (lowest, highest): the values recorded as the same as ns."},
    {NULL},
};

static PyTypeObject HistogramType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._native._ring.Histogram",
    .tp_basicsize = sizeof(HistogramObject),
    .tp_dealloc = (destructor)Histogram_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An HDR latency histogram in a writable buffer (shmq.LatencyRecorder is the public face).",
    .tp_methods = Histogram_methods,
    .tp_init = (initproc)Histogram_init,
    .tp_new = PyType_GenericNew,
};

static PyObject *mod_hist_size(PyObject *Py_UNUSED(m), PyObject *args)
{
    unsigned long long highest;
    unsigned int figures;
    if (!PyArg_ParseTuple(args, "KI:hist_size", &highest, &figures))
        return NULL;
    return PyLong_FromUnsignedLongLong(shmq_hist_size(highest, figures));
}

#define HIST_METHODS                                                                                \
    {"hist_size", mod_hist_size, METH_VARARGS,                                                      \
     "hist_size(highest, significant_figures) -> bytes a Histogram needs (0: out of range)."},
