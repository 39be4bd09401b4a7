/*
 * shmq pub/sub engine (see bus.h): message parsing, headers, filters and the
 * router's forwarding loop. The forwarder is driven by one thread at a time
 * (the binding's lock); nothing here allocates on the per-message path except
 * the last-value cache and the pending lists, which grow to a bound.
 */
#define _GNU_SOURCE
#include "bus.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RELAXED memory_order_relaxed
#define ACQUIRE memory_order_acquire
#define RELEASE memory_order_release
#define SEQ_CST memory_order_seq_cst
#define U64_AT(base, off) ((_Atomic uint64_t *)((base) + (off)))
#define U32_AT(base, off) ((_Atomic uint32_t *)((base) + (off)))

#define READ_MESSAGES 64         /* messages taken from an input per read */
#define READ_BYTES (64 * 1024)   /* ... or about this many bytes */
#define COMMIT_EVERY 64          /* commit an output at least this often */
#define STEAL_MESSAGES 64        /* drop_oldest: messages taken back at once */
#define MAX_WAIT_WORDS 8

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Statistics: the router is the only writer of its slots, readers only load,
 * so a relaxed load + store is enough (no torn values, no RMW cost). */
static inline void stat_add(uint8_t *slot, int off, uint64_t v)
{
    if (slot) {
        _Atomic uint64_t *w = U64_AT(slot, off);
        atomic_store_explicit(w, atomic_load_explicit(w, RELAXED) + v, RELAXED);
    }
}

static inline void stat_set(uint8_t *slot, int off, uint64_t v)
{
    if (slot)
        atomic_store_explicit(U64_AT(slot, off), v, RELAXED);
}

/* ------------------------------------------------------------------ */
/* Messages and headers                                                */
/* ------------------------------------------------------------------ */

int shmq_msg_parse(const uint8_t *frame, uint64_t length, shmq_msg *m)
{
    if (length < SHMQ_MSG_HEADER)
        return SHMQ_CORRUPT;
    m->topic_id = rd32(frame + SHMQ_MSG_OFF_TOPIC_ID);
    m->topic_len = rd16(frame + SHMQ_MSG_OFF_TOPIC_LEN);
    m->headers_len = rd16(frame + SHMQ_MSG_OFF_HEADERS_LEN);
    m->publisher_id = rd32(frame + SHMQ_MSG_OFF_PUBLISHER);
    m->flags = rd32(frame + SHMQ_MSG_OFF_FLAGS);
    m->seq = rd64(frame + SHMQ_MSG_OFF_SEQ);
    m->timestamp_ns = rd64(frame + SHMQ_MSG_OFF_TIMESTAMP);
    m->log_seq = rd64(frame + SHMQ_MSG_OFF_LOG_SEQ);
    uint64_t fixed = (uint64_t)SHMQ_MSG_HEADER + m->topic_len + m->headers_len;
    if (m->topic_len == 0 || m->topic_len > SHMQ_MAX_TOPIC || fixed > length)
        return SHMQ_CORRUPT;
    m->topic = frame + SHMQ_MSG_HEADER;
    m->headers = m->topic + m->topic_len;
    m->payload = m->headers + m->headers_len;
    m->payload_len = length - fixed;
    return SHMQ_OK;
}

/* Reads a value of `type` at p (bounded by end); returns the bytes used or 0. */
static uint32_t read_value(int type, const uint8_t *p, const uint8_t *end, shmq_value *v)
{
    v->type = type;
    switch (type) {
    case SHMQ_V_STR:
        if (end - p < 2)
            return 0;
        v->len = rd16(p);
        if ((uint64_t)(end - p - 2) < v->len)
            return 0;
        v->str = p + 2;
        return 2 + v->len;
    case SHMQ_V_INT:
        if (end - p < 8)
            return 0;
        v->i = (int64_t)rd64(p);
        return 8;
    case SHMQ_V_FLOAT:
        if (end - p < 8)
            return 0;
        memcpy(&v->f, p, 8);
        return 8;
    case SHMQ_V_BOOL:
        if (end - p < 1 || p[0] > 1)
            return 0;
        v->i = p[0];
        return 1;
    default:
        return 0;
    }
}

int shmq_headers_next(const uint8_t *h, uint32_t length, uint32_t *pos, const uint8_t **key,
                      uint32_t *key_len, shmq_value *value)
{
    const uint8_t *p = h + *pos, *end = h + length;
    if (p == end)
        return SHMQ_EMPTY;
    uint32_t kl = p[0];
    if (kl == 0 || end - p < 2 + (int64_t)kl)
        return SHMQ_CORRUPT;
    *key = p + 1;
    *key_len = kl;
    int type = p[1 + kl];
    uint32_t used = read_value(type, p + 2 + kl, end, value);
    if (!used)
        return SHMQ_CORRUPT;
    *pos += 2 + kl + used;
    return SHMQ_OK;
}

int shmq_headers_check(const uint8_t *h, uint32_t length)
{
    uint32_t pos = 0, kl;
    const uint8_t *k;
    shmq_value v;
    int rc;
    while ((rc = shmq_headers_next(h, length, &pos, &k, &kl, &v)) == SHMQ_OK) {
    }
    return rc == SHMQ_EMPTY ? SHMQ_OK : SHMQ_CORRUPT;
}

void shmq_headers_get(const uint8_t *h, uint32_t length, const uint8_t *key, uint32_t key_len,
                      shmq_value *value)
{
    uint32_t pos = 0, kl;
    const uint8_t *k;
    /* The last entry of a key wins, as in a dict built from the entries. */
    shmq_value found = {.type = SHMQ_V_MISSING};
    while (shmq_headers_next(h, length, &pos, &k, &kl, value) == SHMQ_OK)
        if (kl == key_len && memcmp(k, key, kl) == 0)
            found = *value;
    *value = found;
}

/* ------------------------------------------------------------------ */
/* Filters                                                             */
/* ------------------------------------------------------------------ */

enum { CMP_EQ, CMP_NE, CMP_LT, CMP_LE, CMP_GT, CMP_GE };
enum { ORD_LESS = -1, ORD_EQUAL = 0, ORD_GREATER = 1, ORD_UNORDERED = 2 };

/* Exact ordering of an int and a double, as Python compares them. */
static int order_int_double(int64_t i, double d)
{
    if (isnan(d))
        return ORD_UNORDERED;
    if (d >= 9223372036854775808.0) /* 2^63: above every int64 */
        return ORD_LESS;
    if (d < -9223372036854775808.0)
        return ORD_GREATER;
    double t = trunc(d); /* exact, and in int64 range here */
    int64_t ti = (int64_t)t;
    if (i != ti)
        return i < ti ? ORD_LESS : ORD_GREATER;
    double frac = d - t; /* exact */
    return frac > 0 ? ORD_LESS : frac < 0 ? ORD_GREATER : ORD_EQUAL;
}

static int is_number(int type) { return type == SHMQ_V_INT || type == SHMQ_V_FLOAT; }

/* Ordering of two values of the same kind, or ORD_UNORDERED. */
static int order(const shmq_value *a, const shmq_value *b)
{
    if (a->type == SHMQ_V_STR && b->type == SHMQ_V_STR) {
        /* UTF-8 byte order is code point order. */
        uint32_t n = a->len < b->len ? a->len : b->len;
        int c = memcmp(a->str, b->str, n);
        if (c)
            return c < 0 ? ORD_LESS : ORD_GREATER;
        return a->len < b->len ? ORD_LESS : a->len > b->len ? ORD_GREATER : ORD_EQUAL;
    }
    if (a->type == SHMQ_V_BOOL && b->type == SHMQ_V_BOOL)
        return a->i < b->i ? ORD_LESS : a->i > b->i ? ORD_GREATER : ORD_EQUAL;
    if (is_number(a->type) && is_number(b->type)) {
        if (a->type == SHMQ_V_INT && b->type == SHMQ_V_INT)
            return a->i < b->i ? ORD_LESS : a->i > b->i ? ORD_GREATER : ORD_EQUAL;
        if (a->type == SHMQ_V_FLOAT && b->type == SHMQ_V_FLOAT) {
            if (isnan(a->f) || isnan(b->f))
                return ORD_UNORDERED;
            return a->f < b->f ? ORD_LESS : a->f > b->f ? ORD_GREATER : ORD_EQUAL;
        }
        if (a->type == SHMQ_V_INT)
            return order_int_double(a->i, b->f);
        int o = order_int_double(b->i, a->f);
        return o == ORD_UNORDERED ? o : -o;
    }
    return ORD_UNORDERED; /* different kinds (callers check same_kind() first) */
}

static int same_kind(const shmq_value *a, const shmq_value *b)
{
    if (a->type == SHMQ_V_MISSING || b->type == SHMQ_V_MISSING)
        return 0;
    return a->type == b->type || (is_number(a->type) && is_number(b->type));
}

static int compare(const shmq_value *v, int op, const shmq_value *lit)
{
    if (!same_kind(v, lit))
        return 0; /* missing, or another kind: false for every operator, != too */
    int o = order(v, lit);
    if (o == ORD_UNORDERED) /* NaN: only != holds, as in IEEE 754 */
        return op == CMP_NE;
    switch (op) {
    case CMP_EQ: return o == ORD_EQUAL;
    case CMP_NE: return o != ORD_EQUAL;
    case CMP_LT: return o == ORD_LESS;
    case CMP_LE: return o != ORD_GREATER;
    case CMP_GT: return o == ORD_GREATER;
    default: return o != ORD_LESS;
    }
}

/* Reads a literal (type byte + data). Returns bytes used or 0. */
static uint32_t read_literal(const uint8_t *p, const uint8_t *end, shmq_value *v)
{
    if (p >= end)
        return 0;
    uint32_t used = read_value(p[0], p + 1, end, v);
    return used ? used + 1 : 0;
}

/* Walks a program; with check=1 validates it, else evaluates it on headers. */
static int filter_run(const uint8_t *prog, uint32_t length, const uint8_t *h, uint32_t hl, int check)
{
    shmq_value stack[SHMQ_FILTER_MAX_STACK];
    int depth = 0;
    const uint8_t *p = prog, *end = prog + length;
    /* In checking mode stack entries only carry their role: a value or a bool. */
    enum { ROLE_VALUE = 100, ROLE_BOOL = 101 };
    while (p < end) {
        int op = *p++;
        switch (op) {
        case SHMQ_OP_FIELD: {
            if (p >= end || p[0] == 0 || end - p < 1 + (int64_t)p[0] || depth >= SHMQ_FILTER_MAX_STACK)
                return -1;
            uint32_t kl = p[0];
            if (check)
                stack[depth].type = ROLE_VALUE;
            else
                shmq_headers_get(h, hl, p + 1, kl, &stack[depth]);
            depth++;
            p += 1 + kl;
            break;
        }
        case SHMQ_OP_CONST: {
            shmq_value lit;
            uint32_t used = read_literal(p, end, &lit);
            if (!used || depth >= SHMQ_FILTER_MAX_STACK)
                return -1;
            stack[depth++] = lit;
            p += used;
            break;
        }
        case SHMQ_OP_CMP: {
            if (p >= end || p[0] > CMP_GE || depth < 2)
                return -1;
            if (check) {
                if (stack[depth - 2].type != ROLE_VALUE || stack[depth - 1].type < SHMQ_V_STR ||
                    stack[depth - 1].type > SHMQ_V_BOOL)
                    return -1;
                stack[depth - 2].type = ROLE_BOOL;
            } else {
                stack[depth - 2].i = compare(&stack[depth - 2], p[0], &stack[depth - 1]);
            }
            depth--;
            p++;
            break;
        }
        case SHMQ_OP_IN: {
            if (end - p < 3 || depth < 1 || p[0] > 1)
                return -1;
            int negated = p[0];
            uint32_t n = rd16(p + 1);
            p += 3;
            if (check && (n == 0 || stack[depth - 1].type != ROLE_VALUE))
                return -1;
            shmq_value *v = &stack[depth - 1];
            int any_same = 0, equal = 0;
            for (uint32_t k = 0; k < n; k++) {
                shmq_value lit;
                uint32_t used = read_literal(p, end, &lit);
                if (!used)
                    return -1;
                p += used;
                if (!check && same_kind(v, &lit)) {
                    any_same = 1;
                    if (order(v, &lit) == ORD_EQUAL)
                        equal = 1;
                }
            }
            if (check)
                v->type = ROLE_BOOL;
            else
                v->i = negated ? (any_same && !equal) : equal;
            break;
        }
        case SHMQ_OP_AND:
        case SHMQ_OP_OR:
            if (depth < 2)
                return -1;
            if (check) {
                if (stack[depth - 1].type != ROLE_BOOL || stack[depth - 2].type != ROLE_BOOL)
                    return -1;
            } else if (op == SHMQ_OP_AND) {
                stack[depth - 2].i = stack[depth - 2].i && stack[depth - 1].i;
            } else {
                stack[depth - 2].i = stack[depth - 2].i || stack[depth - 1].i;
            }
            depth--;
            break;
        case SHMQ_OP_NOT:
            if (depth < 1 || (check && stack[depth - 1].type != ROLE_BOOL))
                return -1;
            if (!check)
                stack[depth - 1].i = !stack[depth - 1].i;
            break;
        default:
            return -1;
        }
    }
    if (depth != 1 || (check && stack[0].type != ROLE_BOOL))
        return -1;
    return check ? 1 : (int)stack[0].i;
}

int shmq_filter_check(const uint8_t *program, uint32_t length)
{
    return filter_run(program, length, NULL, 0, 1) == 1 ? SHMQ_OK : SHMQ_BAD_ARGUMENT;
}

int shmq_filter_eval(const uint8_t *program, uint32_t length, const uint8_t *h, uint32_t hl)
{
    return filter_run(program, length, h, hl, 0) == 1;
}

/* ------------------------------------------------------------------ */
/* Doorbell                                                            */
/* ------------------------------------------------------------------ */

static long futex(_Atomic uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, (uint32_t *)word, op, val, ts, NULL, 0);
}

void shmq_bus_ring_doorbell(uint8_t *bus)
{
    _Atomic uint32_t *sleeping = U32_AT(bus, SHMQ_BUS_OFF_SLEEPING);
    /* The caller's shmq_commit() ended with a seq_cst fence after its
     * tail_commit store: this load is the waker half of the Dekker pair with
     * shmq_fwd_sleep_prepare() (either we see the flag or the router sees our
     * commit). */
    if (atomic_load_explicit(sleeping, RELAXED)) {
        atomic_store_explicit(sleeping, 0, RELAXED);
        _Atomic uint32_t *bell = U32_AT(bus, SHMQ_BUS_OFF_DOORBELL);
        /* SYNC: release pairs with the router's acquire load of the doorbell. */
        atomic_fetch_add_explicit(bell, 1, RELEASE);
        futex(bell, FUTEX_WAKE, INT_MAX, NULL);
    }
}

/* ------------------------------------------------------------------ */
/* The forwarder                                                       */
/* ------------------------------------------------------------------ */

typedef struct pending_msg {
    uint32_t topic;   /* router topic number */
    uint32_t flags;
    uint32_t len;
    uint8_t *buf;
} pending_msg;

struct fwd_output {
    shmq_ring ring;
    uint32_t id;
    int policy;
    int dead;            /* unsubscribed or gone: deliveries skip it */
    int refs;            /* the table + each route target naming it */
    uint8_t *stats;
    int open;            /* `span` holds claims written but not committed yet */
    shmq_span span;
    int touched;         /* in f->touched */
    /* Messages waiting for room: conflation, or last values that did not fit. */
    pending_msg *pend;
    uint32_t pend_head, pend_n, pend_cap;
    uint32_t *pend_index; /* conflate: topic -> pend position + 1 */
    uint32_t index_cap;
    /* Fed from the durable log (replay, durable subscriptions) rather than by durable routes: */
    shmq_log_cursor *cursor;
    uint8_t *match;           /* router topic -> 0 not known yet, 1 no, 2 yes */
    uint32_t match_cap;
    uint8_t *log_filter;
    uint32_t log_filter_len;
    uint64_t redelivered_upto;
    uint64_t *delivered;      /* (a durable subscription's state file) last seq committed */
    uint64_t *intent;         /* (same file) ring position and last seq of the commit under way */
    uint64_t written_seq;     /* last seq written, committed with the span */
    uint64_t committed_seq;   /* written_seq as of the last commit */
    /* Spill: a private log of what did not fit, drained in order as room frees up. */
    char *spill_dir;
    uint64_t spill_max, spill_segment, spill_bytes, spill_msgs, spill_reading;
    int spill_blocked;
    shmq_log *spill;
    shmq_log_cursor *spill_cursor;
};

struct fwd_route {
    int refs;
    uint32_t n;
    fwd_target *t;
};

typedef struct fwd_topic {
    fwd_route *route;
    uint8_t *stats;
    int keep_last;
    int durable;
    uint8_t *last;
    uint32_t last_len, last_cap;
    uint32_t name_len;
    uint8_t name[SHMQ_MAX_TOPIC];
} fwd_topic;

/* Where an input's messages stand in the log, for fsync="always": its ring position `pos` is
 * durable once the log is synced up to `seq`. */
typedef struct confirm_mark {
    uint64_t seq, pos;
} confirm_mark;

struct fwd_input {
    shmq_ring ring;
    uint32_t id;
    uint8_t *stats;
    uint32_t *local;      /* publisher topic number -> router topic number + 1 */
    uint32_t nlocal;
    fwd_target *fixed;    /* redelivery input: everything goes here */
    int corrupt;
    /* A message that waits for a full `block` subscriber: */
    int stalled;
    fwd_route *stall_route;
    uint32_t stall_target;
    fwd_output *stall_out;   /* the full subscriber it waits for (NULL: a group without members) */
    fwd_target *stall_group; /* or the group whose members are all full */
    uint32_t stall_len;
    uint64_t stall_log_seq;  /* the stalled message's log record (it is appended once) */
    int seen_checked;        /* recovery's memory was looked up for this publisher: 1 in it, 2 not */
    confirm_mark *marks;
    uint32_t marks_head, marks_n, marks_cap;
};

struct shmq_forwarder {
    uint8_t *bus;
    uint64_t bus_size;
    fwd_input **inputs;
    uint32_t ninputs, inputs_cap, next_input;
    fwd_output **outputs;
    uint32_t noutputs, outputs_cap;
    fwd_topic **topics;
    uint32_t ntopics;
    fwd_output **touched;
    uint32_t ntouched, touched_cap;
    int redelivering;     /* the input being read is a redelivery input */
    uint32_t *reaped;     /* ids of outputs freed since shmq_fwd_reap() */
    uint32_t nreaped, reaped_cap;
    /* what shmq_fwd_sleep_prepare() chose to wait on */
    _Atomic uint32_t *wait_words[MAX_WAIT_WORDS];
    uint32_t wait_values[MAX_WAIT_WORDS];
    int nwait;
    /* the durable log (NULL: none) */
    shmq_log *log;
    int confirm;
    uint64_t cur_log_seq;   /* stamped into the copies being written (0: leave the frame's) */
    uint32_t *names;        /* open addressing: topic name -> router topic + 1 */
    uint32_t names_cap, names_n;
};

static int grow(void **arr, uint32_t *cap, uint32_t need, size_t item)
{
    if (need <= *cap)
        return 0;
    uint32_t n = *cap ? *cap : 8;
    while (n < need)
        n *= 2;
    void *p = realloc(*arr, (size_t)n * item);
    if (!p)
        return -1;
    memset((uint8_t *)p + (size_t)*cap * item, 0, (size_t)(n - *cap) * item);
    *arr = p;
    *cap = n;
    return 0;
}

static uint8_t *slot(shmq_forwarder *f, int64_t off, uint64_t size)
{
    if (off < 0 || (uint64_t)off + size > f->bus_size)
        return NULL;
    return f->bus + off;
}

static inline void count(shmq_forwarder *f, int which, uint64_t v)
{
    stat_add(f->bus + SHMQ_BUS_OFF_COUNTERS, 8 * which, v);
}

shmq_forwarder *shmq_fwd_new(uint8_t *bus, uint64_t bus_size)
{
    if (bus_size < 4096)
        return NULL;
    shmq_forwarder *f = calloc(1, sizeof *f);
    if (f) {
        f->bus = bus;
        f->bus_size = bus_size;
    }
    return f;
}

/* -- outputs ---------------------------------------------------------- */

static void pend_clear(fwd_output *o)
{
    for (uint32_t i = o->pend_head; i < o->pend_n; i++)
        free(o->pend[i].buf);
    o->pend_head = o->pend_n = 0;
    if (o->pend_index)
        memset(o->pend_index, 0, o->index_cap * sizeof *o->pend_index);
}

static void output_close_log(fwd_output *o);

static void output_unref(shmq_forwarder *f, fwd_output *o)
{
    if (--o->refs > 0)
        return;
    pend_clear(o);
    free(o->pend);
    free(o->pend_index);
    output_close_log(o);
    free(o->match);
    free(o->log_filter);
    free(o->spill_dir);
    if (!grow((void **)&f->reaped, &f->reaped_cap, f->nreaped + 1, sizeof *f->reaped))
        f->reaped[f->nreaped++] = o->id;
    free(o);
}

uint32_t shmq_fwd_reap(shmq_forwarder *f, uint32_t *ids, uint32_t max)
{
    uint32_t n = f->nreaped < max ? f->nreaped : max;
    if (n == 0)
        return 0;
    memcpy(ids, f->reaped, n * sizeof *ids);
    memmove(f->reaped, f->reaped + n, (f->nreaped - n) * sizeof *ids);
    f->nreaped -= n;
    return n;
}

fwd_output *shmq_fwd_output(shmq_forwarder *f, uint32_t id)
{
    for (uint32_t i = 0; i < f->noutputs; i++)
        if (f->outputs[i]->id == id)
            return f->outputs[i];
    return NULL;
}

int shmq_fwd_add_output(shmq_forwarder *f, uint32_t id, uint8_t *base, uint64_t size, int policy,
                        int64_t stats_off)
{
    if (policy < SHMQ_BLOCK || policy > SHMQ_SPILL || shmq_fwd_output(f, id))
        return SHMQ_BAD_ARGUMENT;
    fwd_output *o = calloc(1, sizeof *o);
    if (!o)
        return -1;
    int rc = shmq_attach(&o->ring, base, size);
    if (rc != SHMQ_OK || (policy == SHMQ_DROP_OLDEST && !o->ring.multi_consumer)) {
        free(o);
        return rc != SHMQ_OK ? rc : SHMQ_BAD_KIND;
    }
    if (grow((void **)&f->outputs, &f->outputs_cap, f->noutputs + 1, sizeof *f->outputs)) {
        free(o);
        return -1;
    }
    o->id = id;
    o->policy = policy;
    o->refs = 1;
    o->stats = slot(f, stats_off, SHMQ_SUBSCRIBER_SLOT);
    f->outputs[f->noutputs++] = o;
    return SHMQ_OK;
}

static void commit_output(fwd_output *o)
{
    if (o->open) {
        int logged = o->cursor && o->written_seq != o->committed_seq;
        if (logged) {
            /* The intent: a router dying between the commit and the stores after it leaves
             * LOG_SEQ and `delivered` behind; whoever resumes compares the ring's tail_commit
             * with INTENT_END to learn whether the records up to INTENT_SEQ reached the ring.
             * END goes first: a death between the two stores leaves the old SEQ beside an END
             * the ring never reaches, which reads "not committed", as it was. Relaxed: the
             * reader runs after this process is gone, and the commit's release store below
             * orders them before the frames for anyone watching live. */
            stat_set(o->stats, SHMQ_SS_INTENT_END, o->span.end);
            stat_set(o->stats, SHMQ_SS_INTENT_SEQ, o->written_seq);
            if (o->intent) {
                atomic_store_explicit((_Atomic uint64_t *)&o->intent[0], o->span.end, RELAXED);
                atomic_store_explicit((_Atomic uint64_t *)&o->intent[1], o->written_seq, RELAXED);
            }
        }
        /* Our claims were made in order by us alone, so the turn is ours. */
        shmq_commit(&o->ring, &o->span);
        o->open = 0;
        if (logged) {
            o->committed_seq = o->written_seq;
            stat_set(o->stats, SHMQ_SS_LOG_SEQ, o->written_seq);
            /* SYNC: release, after the commit: a durable subscription's state never says a
             * record was delivered before its subscriber could read it. */
            if (o->delivered)
                atomic_store_explicit((_Atomic uint64_t *)o->delivered, o->written_seq, RELEASE);
        }
    }
}

static void output_close_log(fwd_output *o)
{
    if (o->cursor) {
        shmq_log_cursor_close(o->cursor);
        free(o->cursor);
        o->cursor = NULL;
    }
    if (o->spill) {
        shmq_log_cursor_close(o->spill_cursor);
        free(o->spill_cursor);
        o->spill_cursor = NULL;
        shmq_log_destroy(o->spill);
        free(o->spill);
        o->spill = NULL;
        o->spill_bytes = 0;
        o->spill_msgs = 0;
    }
}

int shmq_fwd_remove_output(shmq_forwarder *f, uint32_t id)
{
    for (uint32_t i = 0; i < f->noutputs; i++) {
        fwd_output *o = f->outputs[i];
        if (o->id != id)
            continue;
        commit_output(o);
        o->dead = 1;
        pend_clear(o);
        output_close_log(o);
        f->outputs[i] = f->outputs[--f->noutputs];
        for (uint32_t k = 0; k < f->ntouched; k++)
            if (f->touched[k] == o)
                f->touched[k] = f->touched[--f->ntouched];
        o->touched = 0;
        output_unref(f, o);
        return SHMQ_OK;
    }
    return SHMQ_BAD_ARGUMENT;
}

/* Writes one message into an output, or returns 0 if it does not fit. */
static int try_write(fwd_output *o, shmq_forwarder *f, const uint8_t *frame, uint32_t len, uint32_t topic,
                     uint32_t flags)
{
    shmq_span s;
    int rc = o->open ? shmq_claim_after(&o->ring, o->span.end, len, &s)
                     : shmq_claim(&o->ring, (const uint64_t[]){len}, 1, &s);
    if (rc != SHMQ_OK)
        return 0;
    uint64_t pos = s.start;
    uint8_t *dst = shmq_place(&o->ring, &pos, len);
    memcpy(dst, frame, len);
    wr32(dst + SHMQ_MSG_OFF_TOPIC_ID, topic);
    wr32(dst + SHMQ_MSG_OFF_FLAGS, flags);
    if (f->cur_log_seq)
        wr64(dst + SHMQ_MSG_OFF_LOG_SEQ, f->cur_log_seq);
    if (o->open) {
        o->span.end = s.end;
        o->span.count += 1;
        o->span.bytes += len;
    } else {
        o->span = s;
        o->open = 1;
        if (!o->touched) {
            if (!grow((void **)&f->touched, &f->touched_cap, f->ntouched + 1, sizeof *f->touched)) {
                f->touched[f->ntouched++] = o;
                o->touched = 1;
            }
        }
        if (!o->touched) /* could not track it: commit right away */
            commit_output(o);
    }
    if (o->open && o->span.count >= COMMIT_EVERY)
        commit_output(o);
    stat_add(o->stats, SHMQ_SS_DELIVERED, 1);
    stat_add(o->stats, SHMQ_SS_BYTES, len);
    if (!f->redelivering) {
        if (topic < f->ntopics && f->topics[topic])
            stat_add(f->topics[topic]->stats, SHMQ_TS_DELIVERIES, 1);
        count(f, SHMQ_C_DELIVERIES, 1);
    }
    return 1;
}

static void drop_many(shmq_forwarder *f, fwd_output *o, uint8_t *topic_stats, uint64_t n)
{
    stat_add(o ? o->stats : NULL, SHMQ_SS_DROPS, n);
    stat_add(topic_stats, SHMQ_TS_DROPS, n);
    count(f, SHMQ_C_DROPS, n);
}

static void drop(shmq_forwarder *f, fwd_output *o, uint8_t *topic_stats)
{
    drop_many(f, o, topic_stats, 1);
}

static void pend_update_stats(fwd_output *o)
{
    uint64_t n = o->pend_n - o->pend_head;
    stat_set(o->stats, SHMQ_SS_PENDING, n);
    if (o->stats && n > atomic_load_explicit(U64_AT(o->stats, SHMQ_SS_PENDING_MAX), RELAXED))
        stat_set(o->stats, SHMQ_SS_PENDING_MAX, n);
}

static void drain_spill(shmq_forwarder *f, fwd_output *o);
static int spill_backlog(const fwd_output *o);
static int spill_put(shmq_forwarder *f, fwd_output *o, const uint8_t *frame, uint32_t len, uint32_t topic);

/* Moves pending messages into the ring while they fit (then spilled ones: they are newer). */
static void flush_pending(shmq_forwarder *f, fwd_output *o)
{
    if (o->pend_head == o->pend_n) {
        if (o->spill)
            drain_spill(f, o);
        return;
    }
    while (o->pend_head < o->pend_n) {
        pending_msg *p = &o->pend[o->pend_head];
        if (!try_write(o, f, p->buf, p->len, p->topic, p->flags))
            break;
        if (o->pend_index && p->topic < o->index_cap)
            o->pend_index[p->topic] = 0;
        free(p->buf);
        o->pend_head++;
    }
    if (o->pend_head == o->pend_n) {
        o->pend_head = o->pend_n = 0;
    } else if (o->pend_head > 64 && o->pend_head * 2 > o->pend_n) {
        /* Compact, and move the conflation index with the entries. */
        uint32_t live = o->pend_n - o->pend_head;
        memmove(o->pend, o->pend + o->pend_head, live * sizeof *o->pend);
        o->pend_head = 0;
        o->pend_n = live;
        if (o->pend_index)
            for (uint32_t i = 0; i < live; i++)
                if (o->pend[i].topic < o->index_cap)
                    o->pend_index[o->pend[i].topic] = i + 1;
    }
    pend_update_stats(o);
}

/* Queues a copy for later; with `replace`, a message already pending for the
 * same topic is replaced in place (conflation). Returns 1 if one was replaced. */
static int pend_put(shmq_forwarder *f, fwd_output *o, const uint8_t *frame, uint32_t len, uint32_t topic,
                    uint32_t flags, int replace)
{
    if (replace) {
        if (grow((void **)&o->pend_index, &o->index_cap, topic + 1, sizeof *o->pend_index))
            return -1;
        uint32_t at = o->pend_index[topic];
        if (at) {
            pending_msg *p = &o->pend[at - 1];
            if (p->len != len) {
                uint8_t *b = realloc(p->buf, len);
                if (!b)
                    return -1;
                p->buf = b;
                p->len = len;
            }
            memcpy(p->buf, frame, len);
            if (f->cur_log_seq && len >= SHMQ_MSG_HEADER)
                wr64(p->buf + SHMQ_MSG_OFF_LOG_SEQ, f->cur_log_seq);
            p->flags = flags;
            return 1;
        }
    }
    if (grow((void **)&o->pend, &o->pend_cap, o->pend_n + 1, sizeof *o->pend))
        return -1;
    uint8_t *b = malloc(len ? len : 1);
    if (!b)
        return -1;
    memcpy(b, frame, len);
    if (f->cur_log_seq && len >= SHMQ_MSG_HEADER)
        wr64(b + SHMQ_MSG_OFF_LOG_SEQ, f->cur_log_seq);
    o->pend[o->pend_n] = (pending_msg){.topic = topic, .flags = flags, .len = len, .buf = b};
    o->pend_n++;
    if (replace)
        o->pend_index[topic] = o->pend_n;
    pend_update_stats(o);
    return 0;
}

/* drop_oldest: takes the oldest committed messages out of the subscriber's ring (the ring is
 * multi-consumer for this): up to STEAL_MESSAGES or an eighth of the ring at once, so that a
 * stalled subscriber costs one take per batch of new messages, not one per message (the
 * newest messages are kept either way). Returns how many were taken. */
static uint64_t steal_oldest(shmq_forwarder *f, fwd_output *o)
{
    shmq_span s;
    if (shmq_read(&o->ring, STEAL_MESSAGES, o->ring.capacity / 8, &s) != SHMQ_OK)
        return 0;
    /* Each dropped message counts against its topic, as every other drop does. */
    uint64_t pos = s.start;
    uint32_t len;
    const uint8_t *frame;
    while ((frame = shmq_next(&o->ring, &pos, s.end, &len)) != NULL)
        if (len >= SHMQ_MSG_HEADER) {
            uint32_t topic = rd32(frame + SHMQ_MSG_OFF_TOPIC_ID);
            if (topic < f->ntopics && f->topics[topic])
                stat_add(f->topics[topic]->stats, SHMQ_TS_DROPS, 1);
        }
    shmq_release(&o->ring, &s);
    return s.count;
}

enum { DELIVERED = 0, STALL = 1 };

/* A message larger than the subscriber's ring can ever hold (its max_message) would wait
 * forever: it is dropped for that subscriber, whatever its policy, and counted (too_large). */
static int too_large(shmq_forwarder *f, fwd_output *o, uint32_t len, uint8_t *topic_stats)
{
    if (shmq_check_length(&o->ring, len) == SHMQ_OK)
        return 0;
    stat_add(o->stats, SHMQ_SS_TOO_LARGE, 1);
    drop(f, o, topic_stats);
    return 1;
}

/* Offers one message to one subscriber, applying its policy when it is full. */
static int offer(shmq_forwarder *f, fwd_output *o, const uint8_t *frame, uint32_t len, uint32_t topic,
                 uint8_t *topic_stats)
{
    if (too_large(f, o, len, topic_stats))
        return DELIVERED;
    flush_pending(f, o);
    if (o->pend_head == o->pend_n && !spill_backlog(o) && try_write(o, f, frame, len, topic, 0))
        return DELIVERED;
    switch (o->policy) {
    case SHMQ_BLOCK:
        return STALL;
    case SHMQ_SPILL:
        return spill_put(f, o, frame, len, topic);
    case SHMQ_DROP:
        drop(f, o, topic_stats);
        return DELIVERED;
    case SHMQ_DROP_OLDEST:
        commit_output(o); /* our own claims must be readable to be taken back */
        for (;;) {
            flush_pending(f, o);
            if (o->pend_head == o->pend_n && try_write(o, f, frame, len, topic, 0))
                return DELIVERED;
            uint64_t taken = steal_oldest(f, o);
            if (!taken)
                break;
            stat_add(o->stats, SHMQ_SS_STOLEN, taken);
            drop_many(f, o, NULL, taken); /* (steal_oldest counted them per topic) */
        }
        drop(f, o, topic_stats); /* the subscriber holds the oldest (a view): drop the new one */
        return DELIVERED;
    default: /* SHMQ_CONFLATE */
        {
            int r = pend_put(f, o, frame, len, topic, 0, 1);
            if (r == 1)
                drop(f, o, topic_stats); /* the older pending value of this topic is gone */
            else if (r < 0)
                drop(f, o, topic_stats); /* out of memory: counted, never silent */
        }
        return DELIVERED;
    }
}

/* Picks the next group member with room; STALL (block) or a counted drop if none. */
static int offer_group(shmq_forwarder *f, fwd_target *t, const uint8_t *frame, uint32_t len,
                       uint32_t topic, uint8_t *topic_stats, fwd_output **full)
{
    fwd_output *first_live = NULL;
    int fits_somewhere = 0;
    for (uint32_t k = 0; k < t->n; k++) {
        uint32_t at = (t->next + k) % t->n;
        fwd_output *o = t->outs[at];
        if (o->dead || shmq_check_length(&o->ring, len) != SHMQ_OK)
            continue;
        fits_somewhere = 1;
        if (!first_live)
            first_live = o;
        flush_pending(f, o);
        if (o->pend_head == o->pend_n && try_write(o, f, frame, len, topic, 0)) {
            t->next = at + 1;
            return DELIVERED;
        }
    }
    if (!fits_somewhere && t->n) {
        for (uint32_t k = 0; k < t->n; k++)
            if (!t->outs[k]->dead) {
                too_large(f, t->outs[k], len, topic_stats); /* larger than every member's ring */
                return DELIVERED;
            }
    }
    if (first_live && t->group_policy == SHMQ_DROP) {
        drop(f, first_live, topic_stats);
        return DELIVERED;
    }
    *full = first_live;
    return STALL; /* every member is full, or none is left: the message waits */
}

static int deliver_target(shmq_forwarder *f, fwd_target *t, const uint8_t *frame, uint32_t len,
                          const shmq_msg *m, uint32_t topic, uint8_t *topic_stats, fwd_output **full)
{
    if (t->filter && !shmq_filter_eval(t->filter, t->filter_len, m->headers, m->headers_len)) {
        if (!t->group && !t->outs[0]->dead)
            stat_add(t->outs[0]->stats, SHMQ_SS_FILTERED, 1);
        return DELIVERED;
    }
    if (t->group)
        return offer_group(f, t, frame, len, topic, topic_stats, full);
    fwd_output *o = t->outs[0];
    if (o->dead)
        return DELIVERED;
    int rc = offer(f, o, frame, len, topic, topic_stats);
    if (rc == STALL)
        *full = o;
    return rc;
}

/* -- routes and topics ------------------------------------------------ */

static int64_t names_get(shmq_forwarder *f, const uint8_t *name, uint32_t len);
static int names_put(shmq_forwarder *f, uint32_t g);

void shmq_fwd_free_targets(fwd_target *targets, uint32_t n)
{
    if (!targets)
        return;
    for (uint32_t i = 0; i < n; i++) {
        free(targets[i].filter);
        free(targets[i].outs);
    }
    free(targets);
}

static void target_unref_outputs(shmq_forwarder *f, fwd_target *targets, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t k = 0; k < targets[i].n; k++)
            output_unref(f, targets[i].outs[k]);
}

static void route_unref(shmq_forwarder *f, fwd_route *r)
{
    if (!r || --r->refs > 0)
        return;
    target_unref_outputs(f, r->t, r->n);
    shmq_fwd_free_targets(r->t, r->n);
    free(r);
}

/* Route targets hold a reference to each output they name. */
static void target_ref_outputs(fwd_target *targets, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t k = 0; k < targets[i].n; k++)
            targets[i].outs[k]->refs++;
}

int shmq_fwd_add_topic(shmq_forwarder *f, uint32_t global_id, int64_t stats_off, int keep_last, int durable,
                       const uint8_t *name, uint32_t name_len)
{
    if ((global_id < f->ntopics && f->topics[global_id]) || name_len > SHMQ_MAX_TOPIC || names_get(f, name, name_len) >= 0)
        return SHMQ_BAD_ARGUMENT;
    if (grow((void **)&f->topics, &f->ntopics, global_id + 1, sizeof *f->topics))
        return -1;
    fwd_topic *t = calloc(1, sizeof *t);
    if (!t)
        return -1;
    t->stats = slot(f, stats_off, 64);
    t->keep_last = keep_last;
    t->durable = durable;
    memcpy(t->name, name, name_len);
    t->name_len = name_len;
    f->topics[global_id] = t;
    if (names_put(f, global_id)) {
        f->topics[global_id] = NULL;
        free(t);
        return -1;
    }
    return SHMQ_OK;
}

int shmq_fwd_set_route(shmq_forwarder *f, uint32_t global_id, fwd_target *targets, uint32_t n)
{
    if (global_id >= f->ntopics || !f->topics[global_id])
        return SHMQ_BAD_ARGUMENT;
    fwd_route *r = calloc(1, sizeof *r);
    if (!r)
        return -1;
    r->refs = 1;
    r->n = n;
    r->t = targets;
    target_ref_outputs(targets, n);
    route_unref(f, f->topics[global_id]->route);
    f->topics[global_id]->route = r;
    return SHMQ_OK;
}

int shmq_fwd_replay_last(shmq_forwarder *f, uint32_t out_id, const uint32_t *topics, uint32_t n,
                         const uint8_t *filter, uint32_t filter_len)
{
    fwd_output *o = shmq_fwd_output(f, out_id);
    if (!o)
        return SHMQ_BAD_ARGUMENT;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t g = topics[i];
        if (g >= f->ntopics || !f->topics[g] || !f->topics[g]->last)
            continue;
        fwd_topic *t = f->topics[g];
        shmq_msg m;
        if (shmq_msg_parse(t->last, t->last_len, &m) != SHMQ_OK)
            continue;
        if (filter && !shmq_filter_eval(filter, filter_len, m.headers, m.headers_len))
            continue;
        if (o->pend_head != o->pend_n || !try_write(o, f, t->last, t->last_len, g, SHMQ_MSG_LAST_VALUE))
            if (pend_put(f, o, t->last, t->last_len, g, SHMQ_MSG_LAST_VALUE, o->policy == SHMQ_CONFLATE) < 0)
                return -1;
    }
    commit_output(o);
    return SHMQ_OK;
}

static void keep_last(fwd_topic *t, const uint8_t *frame, uint32_t len)
{
    if (t->last_cap < len) {
        uint8_t *b = realloc(t->last, len);
        if (!b)
            return; /* the cache keeps the previous value; routing goes on */
        t->last = b;
        t->last_cap = len;
    }
    memcpy(t->last, frame, len);
    t->last_len = len;
}

/* -- the durable log ---------------------------------------------------- */

static uint32_t name_hash(const uint8_t *p, uint32_t n)
{
    uint32_t h = 2166136261u;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static int64_t names_get(shmq_forwarder *f, const uint8_t *name, uint32_t len)
{
    if (!f->names_cap)
        return -1;
    uint32_t mask = f->names_cap - 1, at = name_hash(name, len) & mask;
    for (; f->names[at]; at = (at + 1) & mask) {
        fwd_topic *t = f->topics[f->names[at] - 1];
        if (t->name_len == len && memcmp(t->name, name, len) == 0)
            return f->names[at] - 1;
    }
    return -1;
}

static int names_put(shmq_forwarder *f, uint32_t g)
{
    if ((f->names_n + 1) * 2 > f->names_cap) {
        uint32_t cap = f->names_cap ? f->names_cap * 2 : 256;
        uint32_t *n = calloc(cap, sizeof *n);
        if (!n)
            return -1;
        for (uint32_t i = 0; i < f->names_cap; i++)
            if (f->names[i]) {
                fwd_topic *t = f->topics[f->names[i] - 1];
                uint32_t at = name_hash(t->name, t->name_len) & (cap - 1);
                while (n[at])
                    at = (at + 1) & (cap - 1);
                n[at] = f->names[i];
            }
        free(f->names);
        f->names = n;
        f->names_cap = cap;
    }
    fwd_topic *t = f->topics[g];
    uint32_t at = name_hash(t->name, t->name_len) & (f->names_cap - 1);
    while (f->names[at])
        at = (at + 1) & (f->names_cap - 1);
    f->names[at] = g + 1;
    f->names_n++;
    return 0;
}

void shmq_fwd_set_log(shmq_forwarder *f, shmq_log *log, int confirm)
{
    f->log = log;
    f->confirm = confirm;
    if (log) {
        stat_set(f->bus, SHMQ_BUS_OFF_LOG_NEXT, log->next_seq);
        stat_set(f->bus, SHMQ_BUS_OFF_LOG_SYNCED, log->synced_seq);
    }
}

/* Tells a publisher waiting under fsync="always" that its ring is durable up to `pos`. */
static void publish_confirm(fwd_input *in, uint64_t pos)
{
    if (!in->stats)
        return;
    /* SYNC: release pairs with the publisher's acquire load of the position, after it
     * sees the futex word move. */
    atomic_store_explicit(U64_AT(in->stats, SHMQ_PS_DURABLE_POS), pos, RELEASE);
    _Atomic uint32_t *word = U32_AT(in->stats, SHMQ_PS_SYNC_FUTEX);
    atomic_fetch_add_explicit(word, 1, RELEASE);
    futex(word, FUTEX_WAKE, INT_MAX, NULL);
}

/* After an input released up to `pos`: that position is durable once the log is synced up to
 * what has been appended so far. */
static void mark_released(shmq_forwarder *f, fwd_input *in, uint64_t pos)
{
    uint64_t seq = f->log->next_seq - 1;
    if (in->marks_head == in->marks_n) {
        in->marks_head = in->marks_n = 0;
        if (seq <= f->log->synced_seq) {
            publish_confirm(in, pos);
            return;
        }
    } else if (in->marks[in->marks_n - 1].seq == seq) {
        in->marks[in->marks_n - 1].pos = pos;
        return;
    }
    if (grow((void **)&in->marks, &in->marks_cap, in->marks_n + 1, sizeof *in->marks))
        return; /* (out of memory: its publisher is confirmed with the next mark) */
    in->marks[in->marks_n++] = (confirm_mark){seq, pos};
}

void shmq_fwd_log_synced(shmq_forwarder *f)
{
    if (!f->log)
        return;
    uint64_t synced = f->log->synced_seq;
    stat_set(f->bus, SHMQ_BUS_OFF_LOG_SYNCED, synced);
    count(f, SHMQ_C_SYNCS, 1);
    for (uint32_t i = 0; i < f->ninputs; i++) {
        fwd_input *in = f->inputs[i];
        uint64_t pos = 0;
        int moved = 0;
        while (in->marks_head < in->marks_n && in->marks[in->marks_head].seq <= synced) {
            pos = in->marks[in->marks_head++].pos;
            moved = 1;
        }
        if (moved)
            publish_confirm(in, pos);
    }
}

/* Appends a durable topic's message to the log (once: a stalled message is not appended
 * again). Returns 0, or -1 with *ev set. */
static int log_message(shmq_forwarder *f, fwd_input *in, const uint8_t *frame, uint32_t len,
                       const shmq_msg *m, shmq_fwd_event_info *ev)
{
    f->cur_log_seq = 0;
    in->stall_log_seq = 0;
    /* A message this publisher's ring still held when the last router died may be in the
     * log already (appended, not yet released). Appending marks the frame in the ring with
     * its record's seq; the mark counts once the log confirms it. */
    if (m->log_seq && shmq_log_holds(f->log, m->log_seq, m->publisher_id, m->seq)) {
        f->cur_log_seq = in->stall_log_seq = m->log_seq;
        return 0;
    }
    /* The last record may have been appended and not yet marked when the router died:
     * recovery remembers the last seq per publisher and topic of the last segments.
     * Publisher seqs only grow, so anything not above it is there. */
    if (f->log->seen.n && m->seq <= shmq_log_seen_seq(f->log, m->publisher_id, m->topic, m->topic_len))
        return 0;
    uint64_t seq;
    int rc = shmq_log_append(f->log, frame, len, 1, &seq);
    if (rc != SHMQ_LOG_OK) {
        ev->event = SHMQ_EV_LOG_ERROR;
        ev->input_id = in->id;
        ev->error = rc == SHMQ_LOG_BAD ? EMSGSIZE : f->log->error;
        ev->error_what = rc == SHMQ_LOG_BAD ? "append a record larger than 4 GiB" : f->log->error_what;
        return -1;
    }
    count(f, SHMQ_C_APPENDED, 1);
    count(f, SHMQ_C_LOG_BYTES, len + SHMQ_REC_HEADER);
    stat_set(f->bus, SHMQ_BUS_OFF_LOG_NEXT, f->log->next_seq);
    if (atomic_load_explicit(U32_AT(f->bus, SHMQ_BUS_OFF_LOG_ERROR), RELAXED))
        atomic_store_explicit(U32_AT(f->bus, SHMQ_BUS_OFF_LOG_ERROR), 0, RELAXED);
    /* The ring's frame is committed and not yet released, so its publisher leaves it alone
     * until we do; the next router reads the mark there (a plain store: a dead process's
     * stores to shared memory stay). */
    wr64((uint8_t *)frame + SHMQ_MSG_OFF_LOG_SEQ, seq);
    f->cur_log_seq = in->stall_log_seq = seq;
    return 0;
}

int shmq_fwd_set_output_log(shmq_forwarder *f, uint32_t id, uint64_t start_seq, uint64_t redelivered_upto,
                            uint64_t *delivered, uint64_t *intent, uint8_t *filter, uint32_t filter_len)
{
    fwd_output *o = shmq_fwd_output(f, id);
    if (!o || !f->log || o->cursor)
        return SHMQ_BAD_ARGUMENT;
    shmq_log_cursor *c = calloc(1, sizeof *c);
    if (!c)
        return -1;
    /* 0: from the next record on ("latest") */
    uint64_t at = start_seq == 0 ? f->log->next_seq : start_seq;
    if (shmq_log_cursor_open(c, f->log->dir, f->log->checksums, SHMQ_START_SEQ, at ? at : 1) != SHMQ_LOG_OK) {
        shmq_log_cursor_close(c);
        free(c);
        return -1;
    }
    o->cursor = c;
    o->redelivered_upto = redelivered_upto;
    o->delivered = delivered;
    o->intent = intent;
    o->log_filter = filter;
    o->log_filter_len = filter_len;
    return SHMQ_OK;
}

int shmq_fwd_set_output_match(shmq_forwarder *f, uint32_t id, uint32_t global_id, int match)
{
    fwd_output *o = shmq_fwd_output(f, id);
    if (!o || !o->cursor)
        return SHMQ_BAD_ARGUMENT;
    if (grow((void **)&o->match, &o->match_cap, global_id + 1, 1))
        return -1;
    o->match[global_id] = match ? 2 : 1;
    return SHMQ_OK;
}

/* Delivers what the log holds for a log-fed output, as room allows. Returns records it
 * moved past, or -1 with *ev set (a record's topic must be made known first). */
static int64_t feed_from_log(shmq_forwarder *f, fwd_output *o, shmq_fwd_event_info *ev)
{
    shmq_log_record r;
    int64_t moved = 0;
    int rc;
    while ((rc = shmq_log_cursor_next(o->cursor, f->log->next_seq, &r)) == SHMQ_LOG_OK) {
        shmq_msg m;
        if (shmq_msg_parse(r.body, r.len, &m) != SHMQ_OK || shmq_headers_check(m.headers, m.headers_len) != SHMQ_OK) {
            o->cursor->skipped++; /* intact by its checksum, yet no message: not ours to route */
            shmq_log_cursor_advance(o->cursor, &r);
            continue;
        }
        int64_t g = names_get(f, m.topic, m.topic_len);
        uint8_t want = g >= 0 && (uint64_t)g < o->match_cap ? o->match[g] : 0;
        if (!want) {
            ev->event = SHMQ_EV_LOG_TOPIC;
            ev->input_id = o->id;
            memcpy(ev->topic, m.topic, m.topic_len);
            ev->topic[m.topic_len] = 0;
            ev->topic_len = m.topic_len;
            return -1;
        }
        if (want == 2) {
            uint8_t *topic_stats = f->topics[g]->stats;
            if (o->log_filter && !shmq_filter_eval(o->log_filter, o->log_filter_len, m.headers, m.headers_len)) {
                stat_add(o->stats, SHMQ_SS_FILTERED, 1);
            } else if (!too_large(f, o, r.len, topic_stats)) {
                uint64_t before = o->written_seq;
                o->written_seq = r.seq;
                f->cur_log_seq = r.seq;
                int ok = try_write(o, f, r.body, (uint32_t)r.len, (uint32_t)g,
                                   r.seq <= o->redelivered_upto ? SHMQ_MSG_REDELIVERED : 0);
                f->cur_log_seq = 0;
                if (!ok) {
                    o->written_seq = before;
                    break;
                }
                stat_add(o->stats, SHMQ_SS_REPLAYED, 1);
                count(f, SHMQ_C_REPLAYED, 1);
            }
        }
        shmq_log_cursor_advance(o->cursor, &r);
        moved++;
    }
    stat_set(o->stats, SHMQ_SS_SKIPPED, o->cursor->skipped);
    if (rc == SHMQ_LOG_ERR) {
        ev->event = SHMQ_EV_LOG_ERROR;
        ev->input_id = o->id;
        ev->error = o->cursor->error;
        ev->error_what = o->cursor->error_what;
        return -1;
    }
    return moved;
}

/* 1 if a log-fed output has a record to take and room for it. */
static int log_has_work(shmq_forwarder *f, fwd_output *o)
{
    shmq_log_record r;
    if (!o->cursor || o->cursor->next_seq >= f->log->next_seq)
        return 0;
    if (shmq_log_cursor_next(o->cursor, f->log->next_seq, &r) != SHMQ_LOG_OK)
        return 0;
    return shmq_condition_holds(&o->ring, SHMQ_WRITABLE, r.len);
}

/* -- spill -------------------------------------------------------------- */

int shmq_fwd_set_output_spill(shmq_forwarder *f, uint32_t id, const char *dir, uint64_t max_bytes,
                              uint64_t segment_size)
{
    fwd_output *o = shmq_fwd_output(f, id);
    if (!o || o->policy != SHMQ_SPILL || o->spill_dir || segment_size < SHMQ_LOG_MIN_SEGMENT)
        return SHMQ_BAD_ARGUMENT;
    o->spill_dir = strdup(dir);
    if (!o->spill_dir)
        return -1;
    o->spill_max = max_bytes;
    o->spill_segment = segment_size;
    return SHMQ_OK;
}

static int spill_backlog(const fwd_output *o)
{
    return o->spill && o->spill_cursor->next_seq < o->spill->next_seq;
}

static void spill_stats(fwd_output *o)
{
    stat_set(o->stats, SHMQ_SS_SPILL_BYTES, o->spill_bytes);
    stat_set(o->stats, SHMQ_SS_SPILL_MSGS, o->spill_msgs);
    if (o->stats && o->spill_bytes > atomic_load_explicit(U64_AT(o->stats, SHMQ_SS_SPILL_MAX), RELAXED))
        stat_set(o->stats, SHMQ_SS_SPILL_MAX, o->spill_bytes);
}

/* The ring is full (or older messages are spilled): the message goes to the spill file. Past
 * max_spill_bytes, or when the file cannot grow, the subscriber blocks instead (counted once
 * per episode in spill_full). */
static int spill_put(shmq_forwarder *f, fwd_output *o, const uint8_t *frame, uint32_t len, uint32_t topic)
{
    if (!o->spill_dir)
        return STALL;
    if (o->spill_bytes + len > o->spill_max)
        goto full;
    if (!o->spill) {
        o->spill = calloc(1, sizeof *o->spill);
        o->spill_cursor = calloc(1, sizeof *o->spill_cursor);
        if (!o->spill || !o->spill_cursor ||
            shmq_log_open(o->spill, o->spill_dir, o->spill_segment, 0) != SHMQ_LOG_OK ||
            shmq_log_cursor_open(o->spill_cursor, o->spill_dir, 0, SHMQ_START_SEQ, 1) != SHMQ_LOG_OK) {
            if (o->spill_cursor) {
                shmq_log_cursor_close(o->spill_cursor);
                free(o->spill_cursor);
            }
            if (o->spill) {
                shmq_log_destroy(o->spill);
                free(o->spill);
            }
            o->spill = NULL;
            o->spill_cursor = NULL;
            goto full;
        }
        o->spill_reading = 0;
    }
    uint64_t seq;
    if (shmq_log_append(o->spill, frame, len, 0, &seq) != SHMQ_LOG_OK)
        goto full;
    /* Stamped as the ring copy would be; drained back as it is. */
    uint8_t *body = o->spill->last_body;
    wr32(body + SHMQ_MSG_OFF_TOPIC_ID, topic);
    wr32(body + SHMQ_MSG_OFF_FLAGS, 0);
    if (f->cur_log_seq)
        wr64(body + SHMQ_MSG_OFF_LOG_SEQ, f->cur_log_seq);
    o->spill_bytes += len;
    o->spill_msgs++;
    o->spill_blocked = 0;
    stat_add(o->stats, SHMQ_SS_SPILLED, 1);
    count(f, SHMQ_C_SPILLED, 1);
    spill_stats(o);
    return DELIVERED;
full:
    if (!o->spill_blocked) {
        o->spill_blocked = 1;
        stat_add(o->stats, SHMQ_SS_SPILL_FULL, 1);
    }
    return STALL;
}

/* Moves spilled messages back into the ring as room allows; removes the files once drained. */
static void drain_spill(shmq_forwarder *f, fwd_output *o)
{
    if (!spill_backlog(o))
        return;
    shmq_log_record r;
    uint64_t keep = f->cur_log_seq;
    f->cur_log_seq = 0; /* (the spilled copy carries its own) */
    while (shmq_log_cursor_next(o->spill_cursor, o->spill->next_seq, &r) == SHMQ_LOG_OK) {
        if (!try_write(o, f, r.body, r.len, rd32(r.body + SHMQ_MSG_OFF_TOPIC_ID), rd32(r.body + SHMQ_MSG_OFF_FLAGS)))
            break;
        shmq_log_cursor_advance(o->spill_cursor, &r);
        o->spill_bytes -= r.len;
        o->spill_msgs--;
    }
    f->cur_log_seq = keep;
    if (!spill_backlog(o)) {
        /* Drained: the copies are in the ring (committed with the pass), the file goes. */
        shmq_log_cursor_close(o->spill_cursor);
        free(o->spill_cursor);
        o->spill_cursor = NULL;
        shmq_log_destroy(o->spill);
        free(o->spill);
        o->spill = NULL;
        o->spill_bytes = 0;
        o->spill_msgs = 0;
    } else if (o->spill_cursor->base_seq != o->spill_reading) {
        /* The reader moved to a newer segment: the older ones are done with. */
        o->spill_reading = o->spill_cursor->base_seq;
        shmq_log_remove_before(o->spill, o->spill_reading);
    }
    spill_stats(o);
}

static int spill_has_work(fwd_output *o)
{
    shmq_log_record r;
    if (!spill_backlog(o) || o->pend_head != o->pend_n)
        return 0;
    if (shmq_log_cursor_next(o->spill_cursor, o->spill->next_seq, &r) != SHMQ_LOG_OK)
        return 0;
    return shmq_condition_holds(&o->ring, SHMQ_WRITABLE, r.len);
}

/* -- inputs ----------------------------------------------------------- */

static void mark_released(shmq_forwarder *f, fwd_input *in, uint64_t pos);

static fwd_input *find_input(shmq_forwarder *f, uint32_t id)
{
    for (uint32_t i = 0; i < f->ninputs; i++)
        if (f->inputs[i]->id == id)
            return f->inputs[i];
    return NULL;
}

int shmq_fwd_add_input(shmq_forwarder *f, uint32_t id, uint8_t *base, uint64_t size, int64_t stats_off)
{
    if (find_input(f, id))
        return SHMQ_BAD_ARGUMENT;
    fwd_input *in = calloc(1, sizeof *in);
    if (!in)
        return -1;
    int rc = shmq_attach(&in->ring, base, size);
    if (rc != SHMQ_OK || in->ring.multi_consumer) {
        free(in);
        return rc != SHMQ_OK ? rc : SHMQ_BAD_KIND;
    }
    if (grow((void **)&f->inputs, &f->inputs_cap, f->ninputs + 1, sizeof *f->inputs)) {
        free(in);
        return -1;
    }
    in->id = id;
    in->stats = slot(f, stats_off, SHMQ_PUBLISHER_SLOT);
    f->inputs[f->ninputs++] = in;
    /* What an earlier router released from this ring is in the log already (recovery synced
     * it): confirm it, or a publisher waiting for it across the restart would wait forever. */
    if (f->confirm && f->log)
        mark_released(f, in, atomic_load_explicit(in->ring.head_release, ACQUIRE));
    return SHMQ_OK;
}

int shmq_fwd_set_input_target(shmq_forwarder *f, uint32_t id, fwd_target *target)
{
    fwd_input *in = find_input(f, id);
    if (!in)
        return SHMQ_BAD_ARGUMENT;
    if (in->stalled) { /* the new target starts the waiting message over */
        route_unref(f, in->stall_route);
        in->stall_route = NULL;
        in->stalled = 0;
    }
    if (in->fixed) {
        target_unref_outputs(f, in->fixed, 1);
        shmq_fwd_free_targets(in->fixed, 1);
    }
    target_ref_outputs(target, 1);
    in->fixed = target;
    return SHMQ_OK;
}

int shmq_fwd_map_topic(shmq_forwarder *f, uint32_t input_id, uint32_t local_id, uint32_t global_id)
{
    fwd_input *in = find_input(f, input_id);
    if (!in || global_id >= f->ntopics || !f->topics[global_id] || local_id == UINT32_MAX)
        return SHMQ_BAD_ARGUMENT;
    if (grow((void **)&in->local, &in->nlocal, local_id + 1, sizeof *in->local))
        return -1;
    in->local[local_id] = global_id + 1;
    return SHMQ_OK;
}

int shmq_fwd_remove_input(shmq_forwarder *f, uint32_t id)
{
    for (uint32_t i = 0; i < f->ninputs; i++) {
        fwd_input *in = f->inputs[i];
        if (in->id != id)
            continue;
        if (in->stalled)
            route_unref(f, in->stall_route);
        if (in->fixed) {
            target_unref_outputs(f, in->fixed, 1);
            shmq_fwd_free_targets(in->fixed, 1);
        }
        free(in->local);
        free(in->marks);
        free(in);
        f->inputs[i] = f->inputs[--f->ninputs];
        return SHMQ_OK;
    }
    return SHMQ_BAD_ARGUMENT;
}

int shmq_fwd_isolate_input(shmq_forwarder *f, uint32_t id)
{
    fwd_input *in = find_input(f, id);
    if (!in)
        return SHMQ_BAD_ARGUMENT;
    in->corrupt = 1;
    return SHMQ_OK;
}

int64_t shmq_fwd_input_depth(shmq_forwarder *f, uint32_t id)
{
    fwd_input *in = find_input(f, id);
    return in ? (int64_t)shmq_depth_messages(&in->ring) : -1;
}

/* Routes one message from an input. */
static int deliver(shmq_forwarder *f, fwd_input *in, const uint8_t *frame, uint32_t len, const shmq_msg *m,
                   shmq_fwd_event_info *ev)
{
    fwd_output *full = NULL;
    if (in->fixed) {
        int rc = deliver_target(f, in->fixed, frame, len, m, m->topic_id, NULL, &full);
        in->stalled = rc == STALL; /* (no route to hold: the target is the input's own) */
        if (rc == STALL) {
            in->stall_out = full;
            in->stall_group = in->fixed->group ? in->fixed : NULL;
            in->stall_len = len;
        }
        return rc;
    }
    uint32_t g1 = m->topic_id < in->nlocal ? in->local[m->topic_id] : 0;
    if (!g1 && m->topic_id >= (1u << 24)) {
        /* A publisher numbers its topics 0, 1, 2 ... in order of first use: a number this high
         * is damage. Mapping it would size the input's table by it (gigabytes, or a u32
         * overflow in grow() that loops forever; UINT32_MAX made map_topic fail and stopped
         * the router): isolate the ring instead. */
        in->corrupt = 1;
        ev->event = SHMQ_EV_CORRUPT;
        ev->input_id = in->id;
        return -1;
    }
    if (!g1) {
        ev->event = SHMQ_EV_UNKNOWN_TOPIC;
        ev->input_id = in->id;
        ev->local_topic = m->topic_id;
        memcpy(ev->topic, m->topic, m->topic_len);
        ev->topic[m->topic_len] = 0;
        ev->topic_len = m->topic_len;
        return -1;
    }
    uint32_t g = g1 - 1;
    fwd_topic *t = f->topics[g];
    fwd_route *r;
    uint32_t start;
    if (in->stalled) {
        r = in->stall_route;
        start = in->stall_target;
        f->cur_log_seq = in->stall_log_seq;
    } else {
        /* Durable: in the log before any subscriber can see it (copies are committed later). */
        if (t->durable && f->log && log_message(f, in, frame, len, m, ev) < 0)
            return -1;
        r = t->route;
        start = 0;
        stat_add(t->stats, SHMQ_TS_MESSAGES, 1);
        stat_add(t->stats, SHMQ_TS_BYTES, len);
        stat_set(t->stats, SHMQ_TS_LAST_SEQ, m->seq);
        stat_set(t->stats, SHMQ_TS_LAST_TIMESTAMP, m->timestamp_ns);
        if (t->keep_last)
            keep_last(t, frame, len);
    }
    for (uint32_t i = start; r && i < r->n; i++) {
        if (deliver_target(f, &r->t[i], frame, len, m, g, t->stats, &full) == STALL) {
            if (!in->stalled) {
                in->stalled = 1;
                in->stall_route = r;
                r->refs++;
            }
            in->stall_target = i;
            in->stall_out = full;
            in->stall_group = r->t[i].group ? &r->t[i] : NULL;
            in->stall_len = len;
            return STALL;
        }
    }
    if (in->stalled) {
        route_unref(f, in->stall_route);
        in->stall_route = NULL;
        in->stalled = 0;
    }
    return DELIVERED;
}

/* Reads and routes what one input holds; returns messages taken, or -1 with *ev set. */
static void commit_touched(shmq_forwarder *f);

/* Frees the first `done` messages of an input read, after committing every copy made of them:
 * a router killed in between then delivers them twice (the publisher ring still holds them),
 * never zero times. */
static void finish_read(shmq_forwarder *f, fwd_input *in, uint64_t start, uint64_t end, uint64_t done,
                        uint64_t bytes)
{
    commit_touched(f);
    if (done || end != start) {
        shmq_span part = {start, end, done, bytes};
        shmq_release(&in->ring, &part);
        if (f->confirm && f->log && !in->fixed)
            mark_released(f, in, end);
    }
    stat_add(in->stats, SHMQ_PS_MESSAGES, done);
    stat_add(in->stats, SHMQ_PS_BYTES, bytes);
    /* A redelivery input re-offers messages that were counted when first routed. */
    count(f, in->fixed ? SHMQ_C_REDELIVERIES : SHMQ_C_MESSAGES, done);
    if (!in->fixed)
        count(f, SHMQ_C_BYTES, bytes);
}

/* Reads and routes what one input holds; returns messages taken, or -1 with *ev set. */
static int64_t pass_input(shmq_forwarder *f, fwd_input *in, shmq_fwd_event_info *ev, int *stalled)
{
    shmq_span span;
    int rc = shmq_read(&in->ring, READ_MESSAGES, READ_BYTES, &span);
    if (rc == SHMQ_EMPTY)
        return 0;
    if (rc != SHMQ_OK)
        goto corrupt;
    f->redelivering = in->fixed != NULL;
    uint64_t pos = span.start, done = 0, bytes = 0;
    for (uint64_t k = 0; k < span.count; k++) {
        uint64_t at = pos;
        uint32_t len;
        const uint8_t *frame = shmq_next(&in->ring, &pos, span.end, &len);
        shmq_msg m;
        if (!frame || shmq_msg_parse(frame, len, &m) != SHMQ_OK ||
            shmq_headers_check(m.headers, m.headers_len) != SHMQ_OK) {
            finish_read(f, in, span.start, at, done, bytes);
            goto corrupt;
        }
        int r = deliver(f, in, frame, len, &m, ev);
        f->cur_log_seq = 0;
        if (r != DELIVERED) {
            /* Free what is done; the rest is read again on the next pass. */
            finish_read(f, in, span.start, at, done, bytes);
            f->redelivering = 0;
            if (r == STALL) {
                *stalled = 1;
                stat_add(in->stats, SHMQ_PS_STALLS, 1);
                count(f, SHMQ_C_STALLS, 1);
            }
            return r == STALL ? (int64_t)done : -1;
        }
        done++;
        bytes += len;
    }
    finish_read(f, in, span.start, span.end, done, bytes);
    f->redelivering = 0;
    return (int64_t)done;
corrupt:
    f->redelivering = 0;
    in->corrupt = 1;
    ev->event = SHMQ_EV_CORRUPT;
    ev->input_id = in->id;
    return -1;
}

static void commit_touched(shmq_forwarder *f)
{
    for (uint32_t i = 0; i < f->ntouched; i++) {
        commit_output(f->touched[i]);
        f->touched[i]->touched = 0;
    }
    f->ntouched = 0;
}

int64_t shmq_fwd_pass(shmq_forwarder *f, shmq_fwd_event_info *ev, int *stalled)
{
    ev->event = SHMQ_EV_NONE;
    *stalled = 0;
    int64_t total = 0;
    /* Pending messages (conflation, last values) move first, as room allows. */
    for (uint32_t i = 0; i < f->noutputs; i++)
        flush_pending(f, f->outputs[i]);
    uint32_t n = f->ninputs;
    for (uint32_t k = 0; k < n; k++) {
        /* Start where the last pass stopped, so no input is always served last. */
        fwd_input *in = f->inputs[(f->next_input + k) % n];
        if (in->corrupt)
            continue;
        int64_t got = pass_input(f, in, ev, stalled);
        if (got < 0) {
            f->next_input = (f->next_input + k) % n;
            commit_touched(f);
            return total;
        }
        total += got;
    }
    if (n)
        f->next_input = (f->next_input + 1) % n;
    /* Log-fed subscribers after the inputs, so what was just appended goes out in this pass. */
    if (f->log)
        for (uint32_t i = 0; i < f->noutputs; i++) {
            if (!f->outputs[i]->cursor)
                continue;
            int64_t fed = feed_from_log(f, f->outputs[i], ev);
            if (fed < 0)
                break;
            total += fed;
        }
    commit_touched(f);
    if (total)
        count(f, SHMQ_C_PASSES, 1);
    return total;
}

static int input_has_work(fwd_input *in)
{
    if (in->corrupt || !shmq_condition_holds(&in->ring, SHMQ_READABLE, 0))
        return 0;
    if (!in->stalled)
        return 1;
    if (in->stall_group) { /* room in any member will do */
        for (uint32_t k = 0; k < in->stall_group->n; k++) {
            fwd_output *o = in->stall_group->outs[k];
            if (!o->dead && shmq_condition_holds(&o->ring, SHMQ_WRITABLE, in->stall_len))
                return 1;
        }
        return 0; /* (with no member left, the router is told when one joins) */
    }
    return in->stall_out && shmq_condition_holds(&in->stall_out->ring, SHMQ_WRITABLE, in->stall_len);
}

int shmq_fwd_has_work(shmq_forwarder *f)
{
    for (uint32_t i = 0; i < f->ninputs; i++)
        if (input_has_work(f->inputs[i]))
            return 1;
    for (uint32_t i = 0; i < f->noutputs; i++) {
        fwd_output *o = f->outputs[i];
        if (o->pend_head != o->pend_n &&
            shmq_condition_holds(&o->ring, SHMQ_WRITABLE, o->pend[o->pend_head].len))
            return 1;
        if ((o->spill && spill_has_work(o)) || (o->cursor && log_has_work(f, o)))
            return 1;
    }
    return 0;
}

/* Registers interest in room freeing up in a subscriber ring: sets the ring's
 * sleepers bit, as a blocked producer would, so the subscriber's next release
 * issues a FUTEX_WAKE on the word we then wait on. */
static void watch_space(shmq_forwarder *f, fwd_output *o)
{
    if (!o || f->nwait >= MAX_WAIT_WORDS)
        return;
    for (int i = 0; i < f->nwait; i++)
        if (f->wait_words[i] == o->ring.space_futex)
            return;
    /* SYNC: seq_cst RMW, the waiter half of the Dekker pair in wake_waiters()
     * (ring.c): the subscriber's release either sees our bit or our re-check
     * in shmq_fwd_has_work() sees its head_release. */
    uint32_t seen = atomic_fetch_or_explicit(o->ring.space_futex, 1u, SEQ_CST) | 1u;
    f->wait_words[f->nwait] = o->ring.space_futex;
    f->wait_values[f->nwait] = seen;
    f->nwait++;
}

int shmq_fwd_sleep_prepare(shmq_forwarder *f)
{
    _Atomic uint32_t *bell = U32_AT(f->bus, SHMQ_BUS_OFF_DOORBELL);
    f->nwait = 0;
    /* SYNC: acquire pairs with the release increment in shmq_bus_ring_doorbell(). */
    f->wait_words[0] = bell;
    f->wait_values[0] = atomic_load_explicit(bell, ACQUIRE);
    f->nwait = 1;
    /* SYNC: seq_cst store + fence, the sleeper half of the Dekker pair with
     * shmq_bus_ring_doorbell(): either a publisher sees the flag, or the
     * re-check below sees its commit. */
    atomic_store_explicit(U32_AT(f->bus, SHMQ_BUS_OFF_SLEEPING), 1, SEQ_CST);
    for (uint32_t i = 0; i < f->ninputs; i++) {
        fwd_input *in = f->inputs[i];
        if (!in->stalled)
            continue;
        if (in->stall_group) {
            for (uint32_t k = 0; k < in->stall_group->n; k++)
                if (!in->stall_group->outs[k]->dead)
                    watch_space(f, in->stall_group->outs[k]);
        } else {
            watch_space(f, in->stall_out);
        }
    }
    for (uint32_t i = 0; i < f->noutputs; i++) {
        fwd_output *o = f->outputs[i];
        if (o->pend_head != o->pend_n || spill_backlog(o) || (o->cursor && o->cursor->next_seq < f->log->next_seq))
            watch_space(f, o);
    }
    atomic_thread_fence(SEQ_CST);
    return shmq_fwd_has_work(f);
}

struct futex_waitv_entry {
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#define FUTEX2_SIZE_U32_FLAG 0x02

void shmq_fwd_sleep(shmq_forwarder *f, int64_t timeout_ns, int sleep)
{
    if (sleep) {
        count(f, SHMQ_C_SLEEPS, 1);
        struct timespec ts;
        if (f->nwait > 1) {
            /* Wait for a publisher's doorbell or room in any watched
             * subscriber ring, whichever comes first (Linux >= 5.16). The
             * words are only passed to the kernel: a ring unmapped meanwhile
             * gives EFAULT, never a fault here. */
            struct futex_waitv_entry w[MAX_WAIT_WORDS];
            for (int i = 0; i < f->nwait; i++)
                w[i] = (struct futex_waitv_entry){f->wait_values[i], (uint64_t)(uintptr_t)f->wait_words[i],
                                                  FUTEX2_SIZE_U32_FLAG, 0};
            clock_gettime(CLOCK_MONOTONIC, &ts);
            int64_t end = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec + timeout_ns;
            ts.tv_sec = end / 1000000000LL;
            ts.tv_nsec = end % 1000000000LL;
            long rc = syscall(SYS_futex_waitv, w, (unsigned)f->nwait, 0, &ts, CLOCK_MONOTONIC);
            if (rc == -1 && errno == ENOSYS) {
                /* Older kernel: poll the rings briefly instead. */
                ts.tv_sec = 0;
                ts.tv_nsec = timeout_ns < 200000 ? timeout_ns : 200000;
                futex(f->wait_words[0], FUTEX_WAIT, f->wait_values[0], &ts);
            }
        } else {
            ts.tv_sec = timeout_ns / 1000000000LL;
            ts.tv_nsec = timeout_ns % 1000000000LL;
            futex(f->wait_words[0], FUTEX_WAIT, f->wait_values[0], &ts);
        }
    }
    atomic_store_explicit(U32_AT(f->bus, SHMQ_BUS_OFF_SLEEPING), 0, RELAXED);
}

void shmq_fwd_wake(shmq_forwarder *f)
{
    _Atomic uint32_t *bell = U32_AT(f->bus, SHMQ_BUS_OFF_DOORBELL);
    atomic_fetch_add_explicit(bell, 1, RELEASE);
    futex(bell, FUTEX_WAKE, INT_MAX, NULL);
}

void shmq_fwd_free(shmq_forwarder *f)
{
    if (!f)
        return;
    while (f->ninputs)
        shmq_fwd_remove_input(f, f->inputs[0]->id);
    for (uint32_t i = 0; i < f->ntopics; i++) {
        fwd_topic *t = f->topics[i];
        if (t) {
            route_unref(f, t->route);
            free(t->last);
            free(t);
        }
    }
    while (f->noutputs)
        shmq_fwd_remove_output(f, f->outputs[0]->id);
    free(f->inputs);
    free(f->outputs);
    free(f->topics);
    free(f->touched);
    free(f->reaped);
    free(f->names);
    free(f);
}
