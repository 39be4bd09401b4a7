/*
 * shmq ring engine. See ring.h for the layout and docs/ARCHITECTURE.md for the
 * algorithm. Every release below names the acquire it pairs with ("SYNC").
 */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <linux/futex.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RELAXED memory_order_relaxed
#define ACQUIRE memory_order_acquire
#define RELEASE memory_order_release
#define SEQ_CST memory_order_seq_cst
#define ACQ_REL memory_order_acq_rel

#define U64_AT(base, off) ((_Atomic uint64_t *)((base) + (off)))
#define U32_AT(base, off) ((_Atomic uint32_t *)((base) + (off)))

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

int64_t shmq_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* Segment lifecycle                                                   */
/* ------------------------------------------------------------------ */

static int is_power_of_two(uint64_t x) { return x && !(x & (x - 1)); }

int shmq_format(uint8_t *base, uint64_t size, uint32_t kind, uint64_t capacity,
                uint64_t creator_pid, uint64_t created_ns)
{
    if (kind < SHMQ_SPSC || kind > SHMQ_MPMC)
        return SHMQ_BAD_KIND;
    if (!is_power_of_two(capacity) || capacity < SHMQ_MIN_CAPACITY || capacity > SHMQ_MAX_CAPACITY)
        return SHMQ_BAD_ARGUMENT;
    if (size != SHMQ_HEADER_SIZE + capacity)
        return SHMQ_BAD_SIZE;
    /* A fresh mapping is zero already; clearing the header makes re-formatting
     * a reused segment safe. The data area needs no clearing: readers only look
     * below tail_commit, which covers bytes written in this lifetime only. */
    memset(base, 0, SHMQ_HEADER_SIZE);
    *(uint32_t *)(base + SHMQ_OFF_VERSION) = SHMQ_VERSION;
    *(uint32_t *)(base + SHMQ_OFF_KIND) = kind;
    *(uint64_t *)(base + SHMQ_OFF_CAPACITY) = capacity;
    *(uint64_t *)(base + SHMQ_OFF_CREATOR_PID) = creator_pid;
    *(uint64_t *)(base + SHMQ_OFF_CREATED_NS) = created_ns;
    *(uint64_t *)(base + SHMQ_OFF_MAX_MESSAGE) = capacity / 2 - SHMQ_FRAME_HEADER;
    *(uint32_t *)(base + SHMQ_OFF_HEADER_SIZE) = SHMQ_HEADER_SIZE;
    *(uint32_t *)(base + SHMQ_OFF_FRAME_ALIGN) = SHMQ_FRAME_ALIGN;
    /* SYNC: pairs with the acquire load of magic in shmq_attach(): an attacher
     * that sees the magic sees the whole header. */
    atomic_store_explicit(U64_AT(base, SHMQ_OFF_MAGIC), SHMQ_MAGIC, RELEASE);
    return SHMQ_OK;
}

int shmq_attach(shmq_ring *r, uint8_t *base, uint64_t size)
{
    memset(r, 0, sizeof(*r));
    r->entry_index = -1; /* untracked until shmq_track */
    if (size < SHMQ_HEADER_SIZE)
        return SHMQ_BAD_SIZE;
    uint64_t magic = atomic_load_explicit(U64_AT(base, SHMQ_OFF_MAGIC), ACQUIRE);
    if (magic == 0)
        return SHMQ_NOT_READY;
    if (magic != SHMQ_MAGIC)
        return SHMQ_BAD_MAGIC;
    if (*(uint32_t *)(base + SHMQ_OFF_VERSION) != SHMQ_VERSION)
        return SHMQ_BAD_VERSION;
    uint32_t kind = *(uint32_t *)(base + SHMQ_OFF_KIND);
    if (kind < SHMQ_SPSC || kind > SHMQ_MPMC)
        return SHMQ_BAD_KIND;
    uint64_t capacity = *(uint64_t *)(base + SHMQ_OFF_CAPACITY);
    if (!is_power_of_two(capacity) || capacity < SHMQ_MIN_CAPACITY || capacity > SHMQ_MAX_CAPACITY ||
        *(uint32_t *)(base + SHMQ_OFF_HEADER_SIZE) != SHMQ_HEADER_SIZE ||
        *(uint64_t *)(base + SHMQ_OFF_MAX_MESSAGE) != capacity / 2 - SHMQ_FRAME_HEADER ||
        size != SHMQ_HEADER_SIZE + capacity)
        return SHMQ_BAD_SIZE;

    r->base = base;
    r->data = base + SHMQ_HEADER_SIZE;
    r->capacity = capacity;
    r->mask = capacity - 1;
    r->max_message = capacity / 2 - SHMQ_FRAME_HEADER;
    r->kind = kind;
    r->multi_producer = kind != SHMQ_SPSC;
    r->multi_consumer = kind == SHMQ_MPMC;
    r->tail_claim = U64_AT(base, SHMQ_OFF_TAIL_CLAIM);
    r->tail_commit = U64_AT(base, SHMQ_OFF_TAIL_COMMIT);
    r->head_claim = U64_AT(base, SHMQ_OFF_HEAD_CLAIM);
    r->head_release = U64_AT(base, SHMQ_OFF_HEAD_RELEASE);
    r->put_count = U64_AT(base, SHMQ_OFF_PUT_COUNT);
    r->put_bytes = U64_AT(base, SHMQ_OFF_PUT_BYTES);
    r->get_count = U64_AT(base, SHMQ_OFF_GET_COUNT);
    r->get_bytes = U64_AT(base, SHMQ_OFF_GET_BYTES);
    r->get_waits = U64_AT(base, SHMQ_OFF_GET_WAITS);
    r->put_waits = U64_AT(base, SHMQ_OFF_PUT_WAITS);
    r->data_wakes = U64_AT(base, SHMQ_OFF_DATA_WAKES);
    r->space_wakes = U64_AT(base, SHMQ_OFF_SPACE_WAKES);
    r->data_futex = U32_AT(base, SHMQ_OFF_DATA_FUTEX);
    r->data_waiters = U32_AT(base, SHMQ_OFF_DATA_WAITERS);
    r->space_futex = U32_AT(base, SHMQ_OFF_SPACE_FUTEX);
    r->space_waiters = U32_AT(base, SHMQ_OFF_SPACE_WAITERS);
    r->deferred_count = U64_AT(base, SHMQ_OFF_DEFERRED_COUNT);
    r->deferred_total = U64_AT(base, SHMQ_OFF_DEFERRED_TOTAL);
    r->recover_lock = U64_AT(base, SHMQ_OFF_RECOVER_LOCK);
    r->dead_producer_claims = U64_AT(base, SHMQ_OFF_DEAD_PRODUCER_CLAIMS);
    r->dead_producer_bytes = U64_AT(base, SHMQ_OFF_DEAD_PRODUCER_BYTES);
    r->dead_consumer_messages = U64_AT(base, SHMQ_OFF_DEAD_CONSUMER_MESSAGES);

    /* The cursors are untrusted input: check their invariants once here, and
     * every frame header again before it is used. */
    uint64_t head = atomic_load_explicit(r->head_release, ACQUIRE);
    uint64_t tail = atomic_load_explicit(r->tail_commit, ACQUIRE);
    if (tail - head > capacity || (head | tail) % SHMQ_FRAME_ALIGN)
        return SHMQ_CORRUPT;
    /* Multi sides keep head_release <= head_claim <= tail_commit <= tail_claim
     * (a concurrent user can only move them forward, within one capacity). */
    if (r->multi_consumer) {
        uint64_t claimed = atomic_load_explicit(r->head_claim, ACQUIRE);
        if (claimed - head > capacity || claimed % SHMQ_FRAME_ALIGN)
            return SHMQ_CORRUPT;
    }
    if (r->multi_producer) {
        uint64_t claimed = atomic_load_explicit(r->tail_claim, ACQUIRE);
        if (claimed - head > capacity || claimed % SHMQ_FRAME_ALIGN)
            return SHMQ_CORRUPT;
    }
    atomic_store_explicit(&r->cached_head, head, RELAXED);
    atomic_store_explicit(&r->cached_tail, tail, RELAXED);
    return SHMQ_OK;
}

/* ------------------------------------------------------------------ */
/* The attachment table                                                */
/* ------------------------------------------------------------------ */

static inline _Atomic uint64_t *attach_owner(uint8_t *base, int i)
{
    return U64_AT(base, SHMQ_OFF_ATTACH + i * SHMQ_ATTACH_SLOT_SIZE);
}

int shmq_attach_claim(uint8_t *base, uint64_t owner, uint32_t role, uint64_t now_ns)
{
    for (int i = 0; i < SHMQ_ATTACH_SLOTS; i++) {
        uint64_t expected = 0;
        /* The CAS alone decides who gets an entry: two attachers never share one. Relaxed
         * stores of the details after it: readers (ls, gc) only count and name owners, and
         * an entry seen with its owner but not yet its role reads as "attaching". */
        if (atomic_load_explicit(attach_owner(base, i), RELAXED) == 0 &&
            atomic_compare_exchange_strong_explicit(attach_owner(base, i), &expected, owner, SEQ_CST,
                                                    RELAXED)) {
            uint8_t *e = base + SHMQ_OFF_ATTACH + i * SHMQ_ATTACH_SLOT_SIZE;
            /* (A recoverer that reads the new owner with the last owner's flags and bounds
             * errs on the safe side: a bound is only ever a reason to recover less, and this
             * owner holds no claim before shmq_track sets its own.) */
            atomic_store_explicit(U32_AT(e, SHMQ_ENTRY_FLAGS), 0, RELAXED);
            atomic_store_explicit(U64_AT(e, SHMQ_ENTRY_WRITE_PENDING), SHMQ_NO_CLAIM, RELAXED);
            atomic_store_explicit(U64_AT(e, SHMQ_ENTRY_READ_PENDING), SHMQ_NO_CLAIM, RELAXED);
            atomic_store_explicit(U32_AT(e, SHMQ_ENTRY_ROLE), role, RELAXED);
            atomic_store_explicit(U64_AT(e, SHMQ_ENTRY_ATTACHED_NS), now_ns, RELAXED);
            return i;
        }
    }
    return -1;
}

int shmq_attach_release(uint8_t *base, int index, uint64_t owner)
{
    if (index < 0 || index >= SHMQ_ATTACH_SLOTS || owner == 0)
        return 0;
    /* A CAS on the whole identity (pid and start time): freeing a dead owner's entry cannot
     * free one that a new process with the same pid took meanwhile. */
    uint64_t expected = owner;
    return atomic_compare_exchange_strong_explicit(attach_owner(base, index), &expected, 0, SEQ_CST, RELAXED);
}

uint64_t shmq_attach_untracked(uint8_t *base, int delta)
{
    /* An atomic add: untracked handles come and go in many processes at once. */
    return atomic_fetch_add_explicit(U64_AT(base, SHMQ_OFF_UNTRACKED), (uint64_t)(int64_t)delta, RELAXED) +
           (uint64_t)(int64_t)delta;
}

/* ------------------------------------------------------------------ */
/* Claim tracking: what recovery needs to tell a live claim from a dead one */
/* ------------------------------------------------------------------ */

/*
 * Each tracked handle keeps, per side, a bound in its attachment entry: no claim it holds
 * starts below it. It is stored before the claim CAS (which is a release, so a recoverer that
 * acquires the cursor past the claim sees the bound) and raised only after the claim is
 * handed over (a release store after the commit, deferral or DONE marks, so a recoverer that
 * sees the raised bound sees the hand-over too). The claims themselves are listed here, in
 * process memory, to compute the new bound.
 */
enum { SIDE_WRITE = 0, SIDE_READ = 1 };

static inline _Atomic uint64_t *pending_word(const shmq_ring *r, int side)
{
    return U64_AT(r->entry, side == SIDE_READ ? SHMQ_ENTRY_READ_PENDING : SHMQ_ENTRY_WRITE_PENDING);
}

/* Before a claim CAS from `from`: with no claim open, the bound becomes `from` (the claim, if
 * the CAS succeeds, starts exactly there; a failed CAS retries from further on). */
static inline void track_attempt(shmq_ring *r, int side, uint64_t from)
{
    if (r->entry && r->open_n[side] == 0 && r->open_overflow[side] == 0)
        /* Relaxed: published by the release claim CAS that follows. */
        atomic_store_explicit(pending_word(r, side), from, RELAXED);
}

/* The attempt ended without a claim (full, empty, damage). */
static inline void track_gave_up(shmq_ring *r, int side)
{
    if (r->entry && r->open_n[side] == 0 && r->open_overflow[side] == 0)
        atomic_store_explicit(pending_word(r, side), SHMQ_NO_CLAIM, RELAXED);
}

static inline void track_open(shmq_ring *r, int side, uint64_t start)
{
    if (!r->entry)
        return;
    if (r->open_n[side] < SHMQ_OPEN_CLAIMS)
        r->open_start[side][r->open_n[side]++] = start;
    else
        r->open_overflow[side]++;
}

/* After the claim at `start` was handed over: the bound rises to the oldest claim still open. */
static void track_close(shmq_ring *r, int side, uint64_t start)
{
    if (!r->entry)
        return;
    uint32_t i, n = r->open_n[side];
    for (i = 0; i < n && r->open_start[side][i] != start; i++) {
    }
    if (i < n)
        r->open_start[side][i] = r->open_start[side][--r->open_n[side]];
    else if (r->open_overflow[side])
        r->open_overflow[side]--;
    if (r->open_overflow[side])
        return; /* a claim not listed may be the oldest: keep the bound where it is */
    uint64_t bound = SHMQ_NO_CLAIM;
    for (i = 0; i < r->open_n[side]; i++)
        if (r->open_start[side][i] < bound)
            bound = r->open_start[side][i];
    /* SYNC: release pairs with the acquire load of the bound in live_bound(): a recoverer
     * that sees the raised bound sees our hand-over (tail_commit, a READY slot, DONE marks). */
    atomic_store_explicit(pending_word(r, side), bound, RELEASE);
}

void shmq_track(shmq_ring *r, int index)
{
    memset(r->open_n, 0, sizeof(r->open_n));
    memset(r->open_overflow, 0, sizeof(r->open_overflow));
    memset(r->stall_since, 0, sizeof(r->stall_since));
    r->recover_next_ns = 0;
    if (index < 0 || index >= SHMQ_ATTACH_SLOTS) {
        r->entry = NULL;
        r->entry_index = -1;
        return;
    }
    r->entry_index = index;
    r->entry = r->base + SHMQ_OFF_ATTACH + (size_t)index * SHMQ_ATTACH_SLOT_SIZE;
    atomic_store_explicit(pending_word(r, SIDE_WRITE), SHMQ_NO_CLAIM, RELAXED);
    atomic_store_explicit(pending_word(r, SIDE_READ), SHMQ_NO_CLAIM, RELAXED);
    /* SYNC: release pairs with the acquire load of the flags in live_bound(): an entry seen
     * as tracked has its bounds set. */
    atomic_fetch_or_explicit(U32_AT(r->entry, SHMQ_ENTRY_FLAGS), SHMQ_ENTRY_TRACKED, RELEASE);
}

/* ------------------------------------------------------------------ */
/* Frames                                                              */
/* ------------------------------------------------------------------ */

static inline _Atomic uint32_t *frame_length(const shmq_ring *r, uint64_t pos)
{
    return (_Atomic uint32_t *)(r->data + (pos & r->mask));
}

static inline _Atomic uint32_t *frame_state(const shmq_ring *r, uint64_t pos)
{
    return (_Atomic uint32_t *)(r->data + (pos & r->mask) + 4);
}

/* Where a frame of `length` payload bytes lands if placed at or after `pos`:
 * returns the position after it and stores its header position. */
static inline uint64_t frame_extent(const shmq_ring *r, uint64_t pos, uint64_t length,
                                    uint64_t *frame_pos)
{
    uint64_t size = shmq_frame_size(length);
    uint64_t off = pos & r->mask;
    if (off + size > r->capacity)
        pos += r->capacity - off; /* PAD frame to the end, then wrap */
    *frame_pos = pos;
    return pos + size;
}

/* Reads and bounds-checks the frame at pos, which must lie below limit.
 * Headers are read with relaxed atomics: a multi-consumer reader may race with
 * a producer reusing the bytes, and then the claim CAS that follows fails. */
static inline int frame_at(const shmq_ring *r, uint64_t pos, uint64_t limit,
                           uint64_t *next, uint32_t *type, uint32_t *length)
{
    uint32_t len = atomic_load_explicit(frame_length(r, pos), RELAXED);
    uint32_t state = atomic_load_explicit(frame_state(r, pos), RELAXED);
    uint64_t size = shmq_frame_size(len);
    uint64_t off = pos & r->mask;
    uint32_t t = state & SHMQ_FRAME_TYPE_MASK;
    if ((t != SHMQ_FRAME_MSG && t != SHMQ_FRAME_PAD) || off + size > r->capacity ||
        size > limit - pos || (t == SHMQ_FRAME_MSG && len > r->max_message))
        return SHMQ_CORRUPT;
    *next = pos + size;
    *type = t;
    *length = len;
    return SHMQ_OK;
}

static inline void write_header(shmq_ring *r, uint64_t pos, uint32_t length, uint32_t type)
{
    /* Relaxed: published by the release store of tail_commit in shmq_commit. */
    atomic_store_explicit(frame_length(r, pos), length, RELAXED);
    atomic_store_explicit(frame_state(r, pos), type, RELAXED);
}

/* ------------------------------------------------------------------ */
/* Wake-up (the writer half of the eventcount)                         */
/* ------------------------------------------------------------------ */

static inline long futex(_Atomic uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    /* Not FUTEX_PRIVATE_FLAG: the word lives in memory shared between processes. */
    return syscall(SYS_futex, (uint32_t *)word, op, val, ts, NULL, 0);
}

/*
 * Futex words: bit 0 says "someone may be asleep on this word"; the other bits
 * are a sequence that changes with every wake. A waiter sets the bit before its
 * last condition check; the waker that clears it (CAS) makes the one FUTEX_WAKE
 * for that sleep. Every other waker sees the bit clear and makes no syscall, so
 * a sleeping (or dead) peer costs one syscall, not one per message.
 */
#define SLEEPERS_BIT 1u

static inline void wake_waiters(_Atomic uint32_t *word, _Atomic uint64_t *wakes)
{
    /* SYNC: Dekker pair with shmq_wait(), which sets SLEEPERS_BIT, fences, then
     * re-checks the cursors. Our cursor store came before this fence, so either
     * we see the bit here or the waiter sees our cursor there. */
    atomic_thread_fence(SEQ_CST);
    uint32_t w = atomic_load_explicit(word, RELAXED);
    while (w & SLEEPERS_BIT) {
        /* w + 1 clears the bit and carries into the sequence. SYNC: release
         * pairs with the waiter's acquire load of the word (a waiter that sees
         * the new value also sees our cursor store). */
        if (atomic_compare_exchange_weak_explicit(word, &w, w + 1, RELEASE, RELAXED)) {
            futex(word, FUTEX_WAKE, INT_MAX, NULL);
            atomic_fetch_add_explicit(wakes, 1, RELAXED);
            return;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Producer side                                                       */
/* ------------------------------------------------------------------ */

int shmq_check_length(const shmq_ring *r, uint64_t length)
{
    return length > r->max_message ? SHMQ_TOO_LARGE : SHMQ_OK;
}

static inline uint64_t producer_cursor(shmq_ring *r)
{
    /* A single producer owns tail_commit; multiple producers race on tail_claim. */
    return atomic_load_explicit(r->multi_producer ? r->tail_claim : r->tail_commit, RELAXED);
}

uint64_t shmq_bytes_needed(shmq_ring *r, uint64_t length)
{
    uint64_t fp, t = producer_cursor(r);
    return frame_extent(r, t, length, &fp) - t;
}

/* How many of the messages fit after t, given the head we know of. */
static inline size_t fit(const shmq_ring *r, uint64_t t, uint64_t head, const uint64_t *lengths,
                         size_t n, uint64_t *end, uint64_t *bytes)
{
    size_t k = 0;
    uint64_t pos = t, fp, total = 0;
    while (k < n) {
        uint64_t next = frame_extent(r, pos, lengths[k], &fp);
        if (next - head > r->capacity)
            break;
        pos = next;
        total += lengths[k];
        k++;
    }
    *end = pos;
    *bytes = total;
    return k;
}

int shmq_claim(shmq_ring *r, const uint64_t *lengths, size_t n, shmq_span *span)
{
    uint64_t t = producer_cursor(r);
    for (;;) {
        /* Cursors are untrusted: a misaligned one would put a header across the data area's
         * end. (Checked per claim, not per frame: frame sizes keep positions aligned.) */
        if (t % SHMQ_FRAME_ALIGN) {
            track_gave_up(r, SIDE_WRITE);
            return SHMQ_CORRUPT;
        }
        uint64_t head = atomic_load_explicit(&r->cached_head, RELAXED);
        uint64_t end, bytes;
        size_t k = fit(r, t, head, lengths, n, &end, &bytes);
        if (k < n) {
            /* SYNC: acquire pairs with the release store (single consumer) or
             * CAS (multi consumer) of head_release in shmq_release(): the
             * readers' last reads of the bytes we are about to reuse happen
             * before our writes. */
            head = atomic_load_explicit(r->head_release, ACQUIRE);
            atomic_store_explicit(&r->cached_head, head, RELAXED);
            k = fit(r, t, head, lengths, n, &end, &bytes);
            if (k == 0) {
                track_gave_up(r, SIDE_WRITE);
                return SHMQ_FULL;
            }
        }
        if (r->multi_producer)
            track_attempt(r, SIDE_WRITE, t);
        /* A single producer owns the cursor; several race for it. The claim only has to be
         * atomic (the bytes are published by the ordered commit, and our view of head came
         * from the acquire above), but the CAS is a release: SYNC: it pairs with the acquire
         * load of tail_claim in recover_commits(), which then sees the bound stored above. */
        if (!r->multi_producer ||
            atomic_compare_exchange_weak_explicit(r->tail_claim, &t, end, RELEASE, RELAXED)) {
            if (r->multi_producer)
                track_open(r, SIDE_WRITE, t);
            span->start = t;
            span->end = end;
            span->count = k;
            span->bytes = bytes;
            return SHMQ_OK;
        }
        /* t now holds the current claim cursor: fit again from there. */
    }
}

int shmq_claim_after(shmq_ring *r, uint64_t after, uint64_t length, shmq_span *span)
{
    if (r->multi_producer)
        return shmq_claim(r, &length, 1, span);
    /* A single producer with claims still uncommitted continues from the end of
     * the last one (`after`), not from tail_commit: nobody else writes here. */
    for (int pass = 0; pass < 2; pass++) {
        uint64_t head = pass ? atomic_load_explicit(r->head_release, ACQUIRE)
                             : atomic_load_explicit(&r->cached_head, RELAXED);
        /* SYNC (second pass): acquire pairs with the release store of
         * head_release in shmq_release(), as in shmq_claim(). */
        if (pass)
            atomic_store_explicit(&r->cached_head, head, RELAXED);
        uint64_t end, bytes;
        if (fit(r, after, head, &length, 1, &end, &bytes) == 1) {
            span->start = after;
            span->end = end;
            span->count = 1;
            span->bytes = bytes;
            return SHMQ_OK;
        }
    }
    return SHMQ_FULL;
}

uint8_t *shmq_place(shmq_ring *r, uint64_t *pos, uint32_t length)
{
    uint64_t fp;
    uint64_t next = frame_extent(r, *pos, length, &fp);
    if (fp != *pos)
        write_header(r, *pos, (uint32_t)(fp - *pos - SHMQ_FRAME_HEADER), SHMQ_FRAME_PAD);
    write_header(r, fp, length, SHMQ_FRAME_MSG);
    *pos = next;
    return r->data + (fp & r->mask) + SHMQ_FRAME_HEADER;
}

int shmq_commit_ready(shmq_ring *r, const shmq_span *span)
{
    if (!r->multi_producer)
        return 1;
    /* SYNC: acquire pairs with the predecessor's release store of tail_commit
     * in shmq_commit(): we take over its counters and order after its frames. */
    return atomic_load_explicit(r->tail_commit, ACQUIRE) == span->start;
}

static void pad_frames(shmq_ring *r, const shmq_span *span);

/* The deferred-commit slot i. */
static inline _Atomic uint32_t *slot_state(const shmq_ring *r, int i)
{
    return U32_AT(r->base, SHMQ_OFF_DEFERRED + i * SHMQ_DEFERRED_SLOT_SIZE);
}

static inline _Atomic uint64_t *slot_field(const shmq_ring *r, int i, int field)
{
    return U64_AT(r->base, SHMQ_OFF_DEFERRED + i * SHMQ_DEFERRED_SLOT_SIZE + 8 + 8 * field);
}

enum { SLOT_FREE = 0, SLOT_WRITING = 1, SLOT_READY = 2, SLOT_TAKEN = 3 };
/* WRITING and TAKEN carry, above the low byte, 1 + the attachment entry of the handle that set
 * them (0: unknown, an untracked handle): recovery can then tell a slot whose writer or taker
 * died from one in use (sweep_dead_slots). */
#define SLOT_KIND(state) ((state) & 0xffu)
static inline uint32_t slot_tag(const shmq_ring *r, uint32_t kind)
{
    return kind | (uint32_t)(r->entry_index + 1) << 8;
}
enum { FIELD_START = 0, FIELD_END = 1, FIELD_COUNT = 2, FIELD_BYTES = 3 };

/* Makes [start, end) readable. Caller holds the commit turn (tail_commit == start). */
static inline void publish(shmq_ring *r, uint64_t end, uint64_t count, uint64_t bytes)
{
    /* Commits are ordered, so the committer is the only writer of the put
     * counters at this moment: plain read-modify-write, no atomic RMW. */
    atomic_store_explicit(r->put_count, atomic_load_explicit(r->put_count, RELAXED) + count, RELAXED);
    atomic_store_explicit(r->put_bytes, atomic_load_explicit(r->put_bytes, RELAXED) + bytes, RELAXED);
    /* SYNC: release pairs with the acquire loads of tail_commit in shmq_read()
     * (consumers see our headers and payloads), in shmq_commit_ready() (the
     * next producer), and in shmq_condition_holds(). */
    atomic_store_explicit(r->tail_commit, end, RELEASE);
}

/* Commits every deferred claim whose turn has come, in order. */
static void run_deferred(shmq_ring *r)
{
    for (;;) {
        uint64_t t = atomic_load_explicit(r->tail_commit, ACQUIRE);
        int progressed = 0;
        for (int i = 0; i < SHMQ_DEFERRED_SLOTS && !progressed; i++) {
            /* SYNC: seq_cst load pairs with the seq_cst READY store in
             * shmq_defer_commit() (acquire half: the slot fields are visible). */
            if (atomic_load_explicit(slot_state(r, i), SEQ_CST) != SLOT_READY ||
                atomic_load_explicit(slot_field(r, i, FIELD_START), RELAXED) != t)
                continue;
            uint32_t expected = SLOT_READY;
            if (!atomic_compare_exchange_strong_explicit(slot_state(r, i), &expected,
                                                         slot_tag(r, SLOT_TAKEN), SEQ_CST, RELAXED))
                continue;
            /* Taken: re-check, the slot may have been reused between our reads. */
            if (atomic_load_explicit(slot_field(r, i, FIELD_START), RELAXED) != t ||
                atomic_load_explicit(r->tail_commit, ACQUIRE) != t) {
                atomic_store_explicit(slot_state(r, i), SLOT_READY, SEQ_CST);
                continue;
            }
            publish(r, atomic_load_explicit(slot_field(r, i, FIELD_END), RELAXED),
                    atomic_load_explicit(slot_field(r, i, FIELD_COUNT), RELAXED),
                    atomic_load_explicit(slot_field(r, i, FIELD_BYTES), RELAXED));
            atomic_store_explicit(slot_state(r, i), SLOT_FREE, RELEASE);
            atomic_fetch_sub_explicit(r->deferred_count, 1, RELAXED);
            progressed = 1;
        }
        if (!progressed)
            return;
        /* SYNC: Dekker with shmq_defer_commit() again, for the next claim. */
        atomic_thread_fence(SEQ_CST);
    }
}

void shmq_commit(shmq_ring *r, const shmq_span *span)
{
    publish(r, span->end, span->count, span->bytes);
    if (r->multi_producer) {
        track_close(r, SIDE_WRITE, span->start);
        /* SYNC: Dekker pair with shmq_defer_commit(), which publishes a slot
         * and then loads tail_commit: either we see its count here, or it
         * sees our tail_commit there and commits by itself. */
        atomic_thread_fence(SEQ_CST);
        if (atomic_load_explicit(r->deferred_count, RELAXED) != 0)
            run_deferred(r);
    }
    wake_waiters(r->data_futex, r->data_wakes);
}

int shmq_defer_commit(shmq_ring *r, const shmq_span *span, int abandon)
{
    int i;
    for (i = 0; i < SHMQ_DEFERRED_SLOTS; i++) {
        uint32_t expected = SLOT_FREE;
        if (atomic_compare_exchange_strong_explicit(slot_state(r, i), &expected, slot_tag(r, SLOT_WRITING),
                                                    ACQUIRE, RELAXED))
            break;
    }
    if (i == SHMQ_DEFERRED_SLOTS)
        return SHMQ_FULL;
    uint64_t count = span->count, bytes = span->bytes;
    if (abandon) {
        pad_frames(r, span);
        count = bytes = 0;
    }
    atomic_store_explicit(slot_field(r, i, FIELD_START), span->start, RELAXED);
    atomic_store_explicit(slot_field(r, i, FIELD_END), span->end, RELAXED);
    atomic_store_explicit(slot_field(r, i, FIELD_COUNT), count, RELAXED);
    atomic_store_explicit(slot_field(r, i, FIELD_BYTES), bytes, RELAXED);
    atomic_fetch_add_explicit(r->deferred_total, 1, RELAXED);
    atomic_fetch_add_explicit(r->deferred_count, 1, SEQ_CST);
    /* SYNC: pairs with the seq_cst state load in run_deferred(). */
    atomic_store_explicit(slot_state(r, i), SLOT_READY, SEQ_CST);
    track_close(r, SIDE_WRITE, span->start);
    /* SYNC: the other half of the Dekker pair in shmq_commit(). */
    if (atomic_load_explicit(r->tail_commit, SEQ_CST) == span->start) {
        run_deferred(r);
        wake_waiters(r->data_futex, r->data_wakes);
    }
    return SHMQ_OK;
}

/* Turns every frame of a written claim into padding: nothing will be delivered.
 * (A claim may contain the wrap's PAD frame, so walk it frame by frame.) */
static void pad_frames(shmq_ring *r, const shmq_span *span)
{
    uint64_t pos = span->start;
    while (pos < span->end) {
        uint32_t len = atomic_load_explicit(frame_length(r, pos), RELAXED);
        atomic_store_explicit(frame_state(r, pos), SHMQ_FRAME_PAD, RELAXED);
        pos += shmq_frame_size(len);
    }
}

void shmq_abandon(shmq_ring *r, const shmq_span *span)
{
    pad_frames(r, span);
    shmq_span empty = {span->start, span->end, 0, 0};
    shmq_commit(r, &empty);
}

/* ------------------------------------------------------------------ */
/* Consumer side                                                       */
/* ------------------------------------------------------------------ */

/* Walks frames from h towards limit, at most max_messages MSG frames. */
static inline int walk(const shmq_ring *r, uint64_t h, uint64_t limit, size_t max_messages,
                       uint64_t max_bytes, shmq_span *span)
{
    uint64_t pos = h, count = 0, bytes = 0;
    while (pos != limit && count < max_messages && (count == 0 || bytes < max_bytes)) {
        uint64_t next;
        uint32_t type, len;
        if (frame_at(r, pos, limit, &next, &type, &len) != SHMQ_OK) {
            if (pos == h)
                return SHMQ_CORRUPT;
            break; /* deliver what was good; the bad frame is reported next call */
        }
        if (type == SHMQ_FRAME_MSG) {
            count++;
            bytes += len;
        }
        pos = next;
    }
    span->start = h;
    span->end = pos;
    span->count = count;
    span->bytes = bytes;
    return SHMQ_OK;
}

static void advance_release(shmq_ring *r);

int shmq_read(shmq_ring *r, size_t max_messages, uint64_t max_bytes, shmq_span *span)
{
    if (max_messages == 0)
        return SHMQ_BAD_ARGUMENT;
    for (;;) {
        if (!r->multi_consumer) {
            uint64_t h = atomic_load_explicit(r->head_release, RELAXED); /* we own it */
            uint64_t t = atomic_load_explicit(&r->cached_tail, RELAXED);
            /* Reload when caught up, or when the cache is behind head: another
             * handle (an earlier consumer process) may have read past it. */
            if ((int64_t)(t - h) <= 0) {
                /* SYNC: acquire pairs with the release store of tail_commit in
                 * shmq_commit(): frames below t are fully written. */
                t = atomic_load_explicit(r->tail_commit, ACQUIRE);
                atomic_store_explicit(&r->cached_tail, t, RELAXED);
                if (h == t)
                    return SHMQ_EMPTY;
            }
            /* A misaligned h would read a header across the data area's end (checked per read:
             * frame sizes keep later positions aligned; a misaligned t is only a limit). */
            if (t - h > r->capacity || h % SHMQ_FRAME_ALIGN)
                return SHMQ_CORRUPT;
            int rc = walk(r, h, t, max_messages, max_bytes, span);
            if (rc != SHMQ_OK)
                return rc;
        } else {
            uint64_t h = atomic_load_explicit(r->head_claim, RELAXED);
            for (;;) {
                /* SYNC: acquire pairs with the release store in shmq_commit(). */
                uint64_t t = atomic_load_explicit(r->tail_commit, ACQUIRE);
                if (h == t) {
                    track_gave_up(r, SIDE_READ);
                    return SHMQ_EMPTY;
                }
                int rc = SHMQ_CORRUPT;
                if (t - h <= r->capacity && !(h % SHMQ_FRAME_ALIGN))
                    rc = walk(r, h, t, max_messages, max_bytes, span);
                if (rc != SHMQ_OK) {
                    /* Either h went stale under us (another consumer took the
                     * frame and a producer reused it) or the ring is damaged. */
                    uint64_t now = atomic_load_explicit(r->head_claim, RELAXED);
                    if (now == h) {
                        track_gave_up(r, SIDE_READ);
                        return SHMQ_CORRUPT;
                    }
                    h = now;
                    continue;
                }
                track_attempt(r, SIDE_READ, h);
                /* Success proves h was still unclaimed, so the headers we read
                 * were the committed ones (nobody may reuse an unclaimed frame).
                 * SYNC: the release half pairs with the acquire load of head_claim in
                 * recover_reads(), which then sees the bound stored just above. */
                if (atomic_compare_exchange_weak_explicit(r->head_claim, &h, span->end, ACQ_REL,
                                                          RELAXED)) {
                    track_open(r, SIDE_READ, span->start);
                    break;
                }
            }
        }
        if (span->count > 0)
            return SHMQ_OK;
        /* Only PAD frames (e.g. abandoned put_view claims): free them, look again. */
        shmq_release(r, span);
    }
}

const uint8_t *shmq_next(shmq_ring *r, uint64_t *pos, uint64_t end, uint32_t *length)
{
    while (*pos < end) {
        uint64_t next;
        uint32_t type, len;
        if (frame_at(r, *pos, end, &next, &type, &len) != SHMQ_OK)
            return NULL; /* the frame changed after shmq_read checked it */
        uint64_t at = *pos;
        *pos = next;
        if (type == SHMQ_FRAME_MSG) {
            *length = len;
            return r->data + (at & r->mask) + SHMQ_FRAME_HEADER;
        }
    }
    return NULL;
}

/* Moves head_release over consecutive DONE frames. Any consumer may do it. */
static void advance_release(shmq_ring *r)
{
    uint64_t p = atomic_load_explicit(r->head_release, SEQ_CST);
    for (;;) {
        uint64_t claimed = atomic_load_explicit(r->head_claim, ACQUIRE);
        /* (more than a lap between them is damage: walking it would take forever) */
        if (p >= claimed || claimed - p > r->capacity || p % SHMQ_FRAME_ALIGN)
            return;
        /* SYNC: seq_cst load pairs with the seq_cst DONE store in
         * shmq_release() (acquire half: that reader's payload reads happen
         * before our CAS, which producers acquire) and completes the Dekker
         * pattern with its head_release load: either we see DONE here or that
         * reader sees our CAS result and advances by itself. */
        uint32_t state = atomic_load_explicit(frame_state(r, p), SEQ_CST);
        if (!(state & SHMQ_FRAME_DONE))
            return;
        uint32_t len = atomic_load_explicit(frame_length(r, p), RELAXED);
        uint64_t size = shmq_frame_size(len);
        if (size > r->capacity - (p & r->mask))
            return; /* stale read (the CAS would fail) or damage: never advance on it */
        /* SYNC: release half pairs with the acquire load of head_release in
         * shmq_claim(); seq_cst for the Dekker pattern above. */
        if (atomic_compare_exchange_strong_explicit(r->head_release, &p, p + size, SEQ_CST,
                                                    SEQ_CST))
            p += size;
        /* on failure p holds the current head_release: continue from there */
    }
}

void shmq_release(shmq_ring *r, const shmq_span *span)
{
    if (!r->multi_consumer) {
        atomic_store_explicit(r->get_count,
                              atomic_load_explicit(r->get_count, RELAXED) + span->count, RELAXED);
        atomic_store_explicit(r->get_bytes,
                              atomic_load_explicit(r->get_bytes, RELAXED) + span->bytes, RELAXED);
        /* SYNC: release pairs with the acquire load of head_release in
         * shmq_claim(): our payload reads happen before a producer reuses them. */
        atomic_store_explicit(r->head_release, span->end, RELEASE);
    } else {
        /* Counted at release, as for a single consumer: a leased message is still queued. */
        atomic_fetch_add_explicit(r->get_count, span->count, RELAXED);
        atomic_fetch_add_explicit(r->get_bytes, span->bytes, RELAXED);
        uint64_t pos = span->start;
        while (pos < span->end) {
            uint32_t len = atomic_load_explicit(frame_length(r, pos), RELAXED);
            uint32_t state = atomic_load_explicit(frame_state(r, pos), RELAXED);
            /* SYNC: pairs with the seq_cst state load in advance_release(). */
            atomic_store_explicit(frame_state(r, pos), state | SHMQ_FRAME_DONE, SEQ_CST);
            pos += shmq_frame_size(len);
        }
        advance_release(r);
        track_close(r, SIDE_READ, span->start);
    }
    wake_waiters(r->space_futex, r->space_wakes);
}

/* ------------------------------------------------------------------ */
/* Waiting (the reader half of the eventcount)                         */
/* ------------------------------------------------------------------ */

int shmq_condition_holds(shmq_ring *r, int condition, uint64_t arg)
{
    switch (condition) {
    case SHMQ_READABLE: {
        uint64_t h = atomic_load_explicit(r->multi_consumer ? r->head_claim : r->head_release, RELAXED);
        /* SYNC: acquire pairs with the release store in shmq_commit(). */
        return atomic_load_explicit(r->tail_commit, ACQUIRE) != h;
    }
    case SHMQ_WRITABLE: {
        uint64_t fp;
        uint64_t next = frame_extent(r, producer_cursor(r), arg, &fp);
        /* SYNC: acquire pairs with the head_release release in shmq_release(). */
        return next - atomic_load_explicit(r->head_release, ACQUIRE) <= r->capacity;
    }
    case SHMQ_COMMIT_TURN:
        /* SYNC: acquire pairs with the release store in shmq_commit(). */
        return atomic_load_explicit(r->tail_commit, ACQUIRE) == arg;
    default:
        return 1;
    }
}

int shmq_wait(shmq_ring *r, int condition, uint64_t arg, int strategy, int64_t deadline_ns,
              int64_t spin_ns)
{
    if (shmq_condition_holds(r, condition, arg))
        return SHMQ_OK;
    if (strategy != SHMQ_WAIT_BLOCK) {
        int64_t start = shmq_now_ns();
        int64_t until = deadline_ns;
        if (strategy == SHMQ_WAIT_ADAPTIVE && (until < 0 || start + spin_ns < until))
            until = start + spin_ns;
        for (unsigned i = 1;; i++) {
            if (strategy == SHMQ_WAIT_YIELD)
                sched_yield();
            else
                cpu_relax();
            if (shmq_condition_holds(r, condition, arg))
                return SHMQ_OK;
            if ((strategy == SHMQ_WAIT_YIELD || (i & 63) == 0) && until >= 0 && shmq_now_ns() >= until)
                break;
        }
        if (strategy != SHMQ_WAIT_ADAPTIVE)
            return SHMQ_TIMEOUT;
    }

    int readable = condition != SHMQ_WRITABLE;
    _Atomic uint32_t *word = readable ? r->data_futex : r->space_futex;
    _Atomic uint32_t *waiters = readable ? r->data_waiters : r->space_waiters;
    if (condition != SHMQ_COMMIT_TURN) /* commit-order waits are not reader waits */
        atomic_fetch_add_explicit(readable ? r->get_waits : r->put_waits, 1, RELAXED);
    atomic_fetch_add_explicit(waiters, 1, RELAXED); /* observability only */
    int rc;
    for (;;) {
        /* SYNC: the RMW and the fence are the waiter half of the Dekker pair in
         * wake_waiters(): either the waker sees our bit, or the condition check
         * below sees its cursor. Acquire: pairs with the waker's release CAS. */
        uint32_t seen = atomic_fetch_or_explicit(word, SLEEPERS_BIT, SEQ_CST) | SLEEPERS_BIT;
        atomic_thread_fence(SEQ_CST);
        if (shmq_condition_holds(r, condition, arg)) {
            rc = SHMQ_OK;
            break;
        }
        struct timespec ts, *tsp = NULL;
        if (deadline_ns >= 0) {
            int64_t left = deadline_ns - shmq_now_ns();
            if (left <= 0) {
                rc = SHMQ_TIMEOUT;
                break;
            }
            ts.tv_sec = left / 1000000000LL;
            ts.tv_nsec = left % 1000000000LL;
            tsp = &ts;
        }
        /* Returns at once if the word moved since `seen` (a wake we would
         * otherwise miss), on FUTEX_WAKE, at the timeout, or on a signal. */
        if (futex(word, FUTEX_WAIT, seen, tsp) == -1 && errno == EINTR) {
            rc = SHMQ_INTERRUPTED;
            break;
        }
    }
    atomic_fetch_sub_explicit(waiters, 1, RELAXED);
    return rc;
}

void shmq_wake_all(shmq_ring *r)
{
    /* +2: change the sequence, keep the sleepers bit as it is. */
    atomic_fetch_add_explicit(r->data_futex, 2, RELEASE);
    atomic_fetch_add_explicit(r->space_futex, 2, RELEASE);
    futex(r->data_futex, FUTEX_WAKE, INT_MAX, NULL);
    futex(r->space_futex, FUTEX_WAKE, INT_MAX, NULL);
}

/* ------------------------------------------------------------------ */
/* Dead peers                                                          */
/* ------------------------------------------------------------------ */

#define PID_BITS 22

int shmq_owner_alive(uint64_t owner)
{
    if (!owner)
        return 0;
    unsigned pid = (unsigned)(owner & ((1u << PID_BITS) - 1));
    char path[48], buf[1024];
    snprintf(path, sizeof(path), "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return !(errno == ENOENT || errno == ESRCH); /* unreadable (hidepid...): assume alive */
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    int read_errno = errno;
    close(fd);
    if (n <= 0)
        return n < 0 && read_errno != ESRCH;
    buf[n] = 0;
    /* The command name (field 2) may hold spaces and ')': the fields after it start after the
     * last ')'. Field 3 is the state (a zombie is dead), field 22 the start time in ticks. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return 1;
    p += 2;
    if (*p == 'Z' || *p == 'X')
        return 0;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p)
            return 1;
        p++;
    }
    unsigned long long ticks = strtoull(p, NULL, 10);
    return (((uint64_t)ticks << PID_BITS) | pid) == owner;
}

/*
 * The lowest bound among live handles' claims on `side` that lies above `floor`, into *bound
 * (which it only lowers). Returns 0 when recovery must not go on: a live handle may hold the
 * claim at `floor` (its bound is at or below it), or a live handle's claims are not tracked
 * (a router's side of a ring, a handle without an entry).
 */
static int live_bound(shmq_ring *r, int side, uint64_t floor, uint64_t *bound)
{
    if (atomic_load_explicit(U64_AT(r->base, SHMQ_OFF_UNTRACKED), ACQUIRE) != 0)
        return 0;
    uint64_t me = atomic_load_explicit(U64_AT(r->entry, SHMQ_ENTRY_OWNER), RELAXED);
    for (int i = 0; i < SHMQ_ATTACH_SLOTS; i++) {
        uint8_t *e = r->base + SHMQ_OFF_ATTACH + (size_t)i * SHMQ_ATTACH_SLOT_SIZE;
        uint64_t owner = atomic_load_explicit(U64_AT(e, SHMQ_ENTRY_OWNER), ACQUIRE);
        if (!owner || (owner != me && !shmq_owner_alive(owner)))
            continue;
        /* SYNC: acquire pairs with the release in shmq_track() (flags) and in track_close()
         * (a raised bound: the hand-over before it is visible to our later loads). */
        if (!(atomic_load_explicit(U32_AT(e, SHMQ_ENTRY_FLAGS), ACQUIRE) & SHMQ_ENTRY_TRACKED))
            return 0;
        uint64_t p = atomic_load_explicit(
            U64_AT(e, side == SIDE_READ ? SHMQ_ENTRY_READ_PENDING : SHMQ_ENTRY_WRITE_PENDING), ACQUIRE);
        if (p == SHMQ_NO_CLAIM)
            continue;
        if (p <= floor)
            return 0;
        if (p < *bound)
            *bound = p;
    }
    return 1;
}

/*
 * What may be dead on `side`: [*from, *to) from the cursor that waits (tail_commit, head_release)
 * to the claim cursor, cut at the lowest bound of a live handle above it. 0 when nothing is
 * claimed, the cursors are damaged, or a live handle may hold the claim at *from.
 */
static int dead_range(shmq_ring *r, int side, uint64_t *from, uint64_t *to)
{
    uint64_t lo = atomic_load_explicit(side == SIDE_WRITE ? r->tail_commit : r->head_release, SEQ_CST);
    /* SYNC: acquire (seq_cst) pairs with the release claim CAS in shmq_claim() / shmq_read():
     * the bound a claimer stored before its CAS is visible for every claim below this. */
    uint64_t hi = atomic_load_explicit(side == SIDE_WRITE ? r->tail_claim : r->head_claim, SEQ_CST);
    if (lo == hi || hi - lo > r->capacity || (lo | hi) % SHMQ_FRAME_ALIGN)
        return 0;
    *from = lo;
    *to = hi;
    return live_bound(r, side, lo, to);
}

/*
 * Deferred-commit slots that a process left mid-way when it died (the tag names its entry, and
 * that entry's owner is gone). WRITING: it was handing over its own claim, which the caller pads
 * as any dead claim; the slot is freed. TAKEN: it was committing someone else's handed-over claim
 * (complete, READY before it took it): at the commit cursor it is made READY again, to be
 * committed; below it (published, not yet freed) it is freed. Caller holds the recovery lock;
 * p is tail_commit. (A dead writer may leave deferred_count one too high: commits then look at
 * the slots once more than needed, nothing worse.)
 */
static void sweep_dead_slots(shmq_ring *r, uint64_t p)
{
    for (int i = 0; i < SHMQ_DEFERRED_SLOTS; i++) {
        uint32_t state = atomic_load_explicit(slot_state(r, i), SEQ_CST);
        uint32_t kind = SLOT_KIND(state), index = state >> 8;
        if ((kind != SLOT_WRITING && kind != SLOT_TAKEN) || index == 0 || index > SHMQ_ATTACH_SLOTS)
            continue;
        uint8_t *e = r->base + SHMQ_OFF_ATTACH + (size_t)(index - 1) * SHMQ_ATTACH_SLOT_SIZE;
        uint64_t owner = atomic_load_explicit(U64_AT(e, SHMQ_ENTRY_OWNER), ACQUIRE);
        if (owner && shmq_owner_alive(owner))
            continue; /* in use (or the entry went to a live process since: left alone) */
        uint64_t start = atomic_load_explicit(slot_field(r, i, FIELD_START), RELAXED);
        uint32_t next = SLOT_FREE;
        if (kind == SLOT_TAKEN && start == p)
            next = SLOT_READY;
        else if (kind == SLOT_TAKEN && start > p)
            continue; /* (cannot be: taken only at its turn) */
        /* SYNC: seq_cst as every slot state change (pairs with the loads in run_deferred()). */
        if (atomic_compare_exchange_strong_explicit(slot_state(r, i), &state, next, SEQ_CST, RELAXED) &&
            kind == SLOT_TAKEN && next == SLOT_FREE)
            atomic_fetch_sub_explicit(r->deferred_count, 1, RELAXED);
    }
}

/*
 * The commit cursor P waits for a claim. Every claim in [P, S) belongs to a dead process, where
 * S is the lowest of: a live handle's bound, a deferred claim's start, the claim cursor. Why:
 * a claim [a, b) with a < S was made by a CAS that our acquire load of tail_claim follows, so
 * its owner's bound (stored before that CAS) is visible; a live owner still holding it would
 * have a bound <= a, which either stopped us (<= P) or made S <= a. A claim handed over since
 * shows in the deferred slots or moved tail_commit, which the re-check below catches. Nobody
 * else writes in [P, S) then, and no reader looks there: we write padding over it and commit it.
 */
static int recover_commits(shmq_ring *r)
{
    uint64_t p, s;
    if (!dead_range(r, SIDE_WRITE, &p, &s))
        return 0;
    sweep_dead_slots(r, p);
    for (int i = 0; i < SHMQ_DEFERRED_SLOTS; i++) {
        /* SYNC: seq_cst pairs with the READY store in shmq_defer_commit() (the fields). */
        uint32_t state = atomic_load_explicit(slot_state(r, i), SEQ_CST);
        if (state == SLOT_FREE)
            continue;
        uint64_t start = atomic_load_explicit(slot_field(r, i, FIELD_START), RELAXED);
        if (start < p || start >= s)
            continue; /* (an older use's start, below P, while a slot is being filled) */
        if (start == p) {
            if (state != SLOT_READY)
                return 0; /* being handed over or committed right now, by a live process */
            run_deferred(r); /* its turn came: commit it (a wake that went missing) */
            wake_waiters(r->data_futex, r->data_wakes);
            return 0;
        }
        s = start;
    }
    /* SYNC: a commit at P stored tail_commit before its bound rose (release), and we loaded
     * the bound with acquire: if it committed, this load sees it. */
    if (atomic_load_explicit(r->tail_commit, SEQ_CST) != p)
        return 0;
    for (uint64_t pos = p; pos < s;) {
        uint64_t room = r->capacity - (pos & r->mask);
        uint64_t size = s - pos < room ? s - pos : room; /* a frame never wraps */
        write_header(r, pos, (uint32_t)(size - SHMQ_FRAME_HEADER), SHMQ_FRAME_PAD);
        pos += size;
    }
    /* SYNC: release (seq_cst) pairs with the acquire loads of tail_commit in shmq_read() (the
     * padding is visible) and in shmq_commit_ready() (the next producer's turn). A CAS: only
     * damage could have moved it, and then we must not. */
    uint64_t expected = p;
    if (!atomic_compare_exchange_strong_explicit(r->tail_commit, &expected, s, SEQ_CST, RELAXED))
        return 0;
    atomic_fetch_add_explicit(r->dead_producer_claims, 1, RELAXED);
    atomic_fetch_add_explicit(r->dead_producer_bytes, s - p, RELAXED);
    /* SYNC: Dekker with shmq_defer_commit(), as in shmq_commit(). */
    atomic_thread_fence(SEQ_CST);
    if (atomic_load_explicit(r->deferred_count, RELAXED) != 0)
        run_deferred(r);
    wake_waiters(r->data_futex, r->data_wakes);
    return 1;
}

/*
 * The release cursor H waits for a frame a consumer claimed. As above, with head_claim for the
 * claim cursor: every claimed frame in [H, X) that is not DONE belongs to a dead consumer. We
 * mark them DONE one at a time, each while it is the frame at head_release: a frame there that
 * is not DONE cannot be released (and its bytes reused) by anyone else, so re-reading
 * head_release after its state proves the state was this lap's.
 */
static int recover_reads(shmq_ring *r)
{
    uint64_t h, x;
    if (!dead_range(r, SIDE_READ, &h, &x))
        return 0;
    uint64_t messages = 0, bytes = 0, marked = 0;
    for (uint64_t steps = 0; steps <= r->capacity / SHMQ_FRAME_ALIGN; steps++) {
        h = atomic_load_explicit(r->head_release, SEQ_CST);
        if (h >= x || x - h > r->capacity)
            break;
        uint32_t state = atomic_load_explicit(frame_state(r, h), SEQ_CST);
        if (state & SHMQ_FRAME_DONE) {
            advance_release(r); /* released already: someone else's progress */
            continue;
        }
        uint32_t len = atomic_load_explicit(frame_length(r, h), SEQ_CST);
        if (atomic_load_explicit(r->head_release, SEQ_CST) != h)
            continue; /* it moved on: what we read may be a later lap's */
        uint64_t next;
        uint32_t type, checked_len;
        if (frame_at(r, h, x, &next, &type, &checked_len) != SHMQ_OK || checked_len != len)
            break; /* damage: leave it to the readers, who report it */
        /* SYNC: pairs with the seq_cst state load in advance_release(), as in shmq_release(). */
        if (!atomic_compare_exchange_strong_explicit(frame_state(r, h), &state,
                                                     state | SHMQ_FRAME_DONE, SEQ_CST, RELAXED))
            continue;
        marked++;
        if (type == SHMQ_FRAME_MSG) {
            messages++;
            bytes += len;
        }
        advance_release(r);
    }
    /* They were taken (by the dead consumer): counted as got, and as lost with it. */
    atomic_fetch_add_explicit(r->get_count, messages, RELAXED);
    atomic_fetch_add_explicit(r->get_bytes, bytes, RELAXED);
    atomic_fetch_add_explicit(r->dead_consumer_messages, messages, RELAXED);
    wake_waiters(r->space_futex, r->space_wakes);
    return marked > 0;
}

/* One recoverer at a time per ring; a dead recoverer's lock is taken over. */
static int take_recover_lock(shmq_ring *r, uint64_t me)
{
    uint64_t holder = 0;
    /* SYNC: acquire pairs with the release store that freed the lock: we see what the last
     * recoverer wrote. */
    if (atomic_compare_exchange_strong_explicit(r->recover_lock, &holder, me, ACQUIRE, RELAXED))
        return 1;
    if (holder == me || shmq_owner_alive(holder))
        return 0;
    return atomic_compare_exchange_strong_explicit(r->recover_lock, &holder, me, ACQUIRE, RELAXED);
}

/* Recovers what it can on one side, under the ring's recovery lock; returns the stalls cleared. */
static int recover_side(shmq_ring *r, int side)
{
    uint64_t me = atomic_load_explicit(U64_AT(r->entry, SHMQ_ENTRY_OWNER), RELAXED);
    if (!me || !take_recover_lock(r, me))
        return 0;
    int cleared = 0;
    /* (a few rounds: dead claims may be split by deferred claims of live producers) */
    for (int round = 0; round < 4; round++) {
        int got = side == SIDE_WRITE ? recover_commits(r) : recover_reads(r);
        cleared += got;
        if (!got)
            break;
    }
    /* SYNC: release pairs with the acquire CAS in take_recover_lock(). */
    atomic_store_explicit(r->recover_lock, 0, RELEASE);
    return cleared;
}

static int side_used(const shmq_ring *r, int side)
{
    return side == SIDE_WRITE ? r->multi_producer : r->multi_consumer;
}

int shmq_recover(shmq_ring *r, int64_t now_ns)
{
    if (!r->entry)
        return 0; /* (an untracked handle could not name itself as the recoverer) */
    /* Looking costs loads of cursor lines the other side is writing: in a busy hand-off that
     * is a cache miss per wait. So look only every half interval: a stall is still seen
     * within 1.5 intervals. */
    if (now_ns < r->recover_next_ns)
        return 0;
    r->recover_next_ns = now_ns + SHMQ_RECOVER_AFTER_NS / 2;
    int cleared = 0;
    for (int side = SIDE_WRITE; side <= SIDE_READ; side++) {
        if (!side_used(r, side))
            continue;
        uint64_t cursor = atomic_load_explicit(side ? r->head_release : r->tail_commit, RELAXED);
        uint64_t ahead = atomic_load_explicit(side ? r->head_claim : r->tail_claim, RELAXED);
        if (cursor == ahead) {
            r->stall_since[side] = 0;
            continue;
        }
        if (r->stall_since[side] == 0 || r->stall_pos[side] != cursor) {
            r->stall_pos[side] = cursor;
            r->stall_since[side] = now_ns;
            continue;
        }
        if (now_ns - r->stall_since[side] < SHMQ_RECOVER_AFTER_NS)
            continue;
        r->stall_since[side] = now_ns; /* look again after another interval, whatever happens */
        cleared += recover_side(r, side);
    }
    return cleared;
}

int shmq_recover_now(shmq_ring *r)
{
    if (!r->entry)
        return 0;
    int cleared = 0;
    for (int side = SIDE_WRITE; side <= SIDE_READ; side++)
        if (side_used(r, side))
            cleared += recover_side(r, side);
    return cleared;
}

/* ------------------------------------------------------------------ */
/* Observation                                                         */
/* ------------------------------------------------------------------ */

uint64_t shmq_depth_messages(shmq_ring *r)
{
    uint64_t got = atomic_load_explicit(r->get_count, RELAXED);
    uint64_t put = atomic_load_explicit(r->put_count, RELAXED);
    return put > got ? put - got : 0;
}

uint64_t shmq_depth_bytes(shmq_ring *r)
{
    uint64_t head = atomic_load_explicit(r->head_release, RELAXED);
    uint64_t tail = atomic_load_explicit(r->tail_commit, RELAXED);
    return tail > head ? tail - head : 0;
}
