/*
 * shmq ring engine: lock-free SPSC / MPSC / MPMC byte rings in shared memory.
 *
 * Pure C11 (<stdatomic.h>), no Python: the CPython binding (_ringmodule.c) and
 * the C reference benchmark (benchmarks/c_pingpong.c) both build on this file.
 * docs/ARCHITECTURE.md explains the algorithm and the memory-ordering argument;
 * the comments here name, at every release, the acquire it pairs with.
 *
 * Segment layout (all integers little-endian, offsets in bytes):
 *
 *   0     u64 magic         "SHMQRING"; stored last (release) by the creator
 *   8     u32 version       SHMQ_VERSION
 *   12    u32 kind          1 spsc, 2 mpsc, 3 mpmc
 *   16    u64 capacity      data bytes, a power of two
 *   24    u64 creator_pid
 *   32    u64 created_ns    CLOCK_REALTIME at creation
 *   40    u64 max_message   largest payload accepted (capacity / 2 - 8)
 *   48    u32 header_size   SHMQ_HEADER_SIZE (data starts here)
 *   52    u32 frame_align   8
 *   56..255                 reserved (zero)
 *   256   u64 tail_claim    multi-producer claim cursor (unused by spsc)
 *   384   u64 tail_commit   everything below is readable;  +8 put_count, +16 put_bytes
 *   512   u64 head_claim    multi-consumer claim cursor (unused by single consumer)
 *   640   u64 head_release  everything below is free;       +8 get_count, +16 get_bytes
 *   768   u32 data_futex, u32 data_waiters, u64 get_waits, u64 data_wakes
 *   896   u32 space_futex, u32 space_waiters, u64 put_waits, u64 space_wakes
 *   1024  u64 deferred_count    deferrals published and not yet committed
 *   1032  u64 deferred_total    claims ever handed over (statistics)
 *   1040  u64 recover_lock      owner word of the process recovering a dead peer's claim (0: none)
 *   1048  u64 dead_producer_claims  stalls recovered: dead producers' claims turned into padding
 *   1056  u64 dead_producer_bytes   ring bytes those claims held
 *   1064  u64 dead_consumer_messages  messages dead consumers had taken, released for them
 *   1152  16 deferred-commit slots of 64 bytes:
 *         u32 state (low byte: 0 free, 1 writing, 2 ready, 3 taken; writing and taken
 *         carry 1 + the setter's attachment entry in the bits above), u32 zero,
 *         u64 start, u64 end, u64 count, u64 bytes
 *   2176  u64 untracked       handles attached without a table entry (it was full)
 *   2240  93 attachment entries of 64 bytes (who uses the ring: shmq ls, shmq gc, recovery):
 *         u64 owner (0 free; pid | process start time in clock ticks << 22),
 *         u32 role (1 creator, 2 user, 3 router), u32 flags (1: claims tracked),
 *         u64 attached_ns, u64 write_pending, u64 read_pending, 24 bytes zero.
 *         write_pending / read_pending: with flags & 1, a lower bound of the start of
 *         every claim this handle holds on that side (SHMQ_NO_CLAIM when it holds none)
 *   8192  data[capacity]
 *
 * Each hot word starts its own 128-byte block (two cache lines, so the
 * adjacent-line prefetcher cannot make producer and consumer lines share).
 * Positions are 64-bit byte counters that only grow; offset = pos & (capacity-1).
 *
 * A frame is { u32 length; u32 state; payload; zero padding to 8 bytes }.
 * state = type (MSG or PAD) | DONE bit (set by a multi-consumer reader when it
 * is finished with the frame). A frame never wraps: when it does not fit before
 * the end of the data area, a PAD frame fills the rest and it starts at offset 0.
 */
#ifndef SHMQ_RING_H
#define SHMQ_RING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define SHMQ_MAGIC 0x474E4952514D4853ull /* "SHMQRING" read as a little-endian u64 */
#define SHMQ_VERSION 2u
#define SHMQ_HEADER_SIZE 8192u
#define SHMQ_FRAME_HEADER 8u
#define SHMQ_FRAME_ALIGN 8u
#define SHMQ_MIN_CAPACITY 64ull
#define SHMQ_MAX_CAPACITY (1ull << 32)

#define SHMQ_OFF_MAGIC 0
#define SHMQ_OFF_VERSION 8
#define SHMQ_OFF_KIND 12
#define SHMQ_OFF_CAPACITY 16
#define SHMQ_OFF_CREATOR_PID 24
#define SHMQ_OFF_CREATED_NS 32
#define SHMQ_OFF_MAX_MESSAGE 40
#define SHMQ_OFF_HEADER_SIZE 48
#define SHMQ_OFF_FRAME_ALIGN 52
#define SHMQ_OFF_TAIL_CLAIM 256
#define SHMQ_OFF_TAIL_COMMIT 384
#define SHMQ_OFF_PUT_COUNT 392
#define SHMQ_OFF_PUT_BYTES 400
#define SHMQ_OFF_HEAD_CLAIM 512
#define SHMQ_OFF_HEAD_RELEASE 640
#define SHMQ_OFF_GET_COUNT 648
#define SHMQ_OFF_GET_BYTES 656
#define SHMQ_OFF_DATA_FUTEX 768
#define SHMQ_OFF_DATA_WAITERS 772
#define SHMQ_OFF_GET_WAITS 776
#define SHMQ_OFF_DATA_WAKES 784
#define SHMQ_OFF_SPACE_FUTEX 896
#define SHMQ_OFF_SPACE_WAITERS 900
#define SHMQ_OFF_PUT_WAITS 904
#define SHMQ_OFF_SPACE_WAKES 912
#define SHMQ_OFF_DEFERRED_COUNT 1024
#define SHMQ_OFF_DEFERRED_TOTAL 1032
#define SHMQ_OFF_DEFERRED 1152
#define SHMQ_DEFERRED_SLOTS 16
#define SHMQ_DEFERRED_SLOT_SIZE 64
#define SHMQ_OFF_RECOVER_LOCK 1040
#define SHMQ_OFF_DEAD_PRODUCER_CLAIMS 1048
#define SHMQ_OFF_DEAD_PRODUCER_BYTES 1056
#define SHMQ_OFF_DEAD_CONSUMER_MESSAGES 1064
#define SHMQ_OFF_UNTRACKED 2176
#define SHMQ_OFF_ATTACH 2240
#define SHMQ_ATTACH_SLOT_SIZE 64
#define SHMQ_ATTACH_SLOTS 93
/* Fields of an attachment entry (offsets inside it). */
#define SHMQ_ENTRY_OWNER 0
#define SHMQ_ENTRY_ROLE 8
#define SHMQ_ENTRY_FLAGS 12
#define SHMQ_ENTRY_ATTACHED_NS 16
#define SHMQ_ENTRY_WRITE_PENDING 24
#define SHMQ_ENTRY_READ_PENDING 32
#define SHMQ_ENTRY_TRACKED 1u
#define SHMQ_NO_CLAIM UINT64_MAX
/* Claims one handle can hold at once with exact tracking (threads sharing a handle); beyond
 * that its pending bound stays at the oldest until they are all handed over. */
#define SHMQ_OPEN_CLAIMS 32
/* A commit or release cursor that has not moved for this long, with claims beyond it, is
 * checked for a dead owner (and recovered if it has one). */
#define SHMQ_RECOVER_AFTER_NS 100000000LL

enum shmq_kind { SHMQ_SPSC = 1, SHMQ_MPSC = 2, SHMQ_MPMC = 3 };

enum shmq_frame_state {
    SHMQ_FRAME_MSG = 1,
    SHMQ_FRAME_PAD = 2,
    SHMQ_FRAME_TYPE_MASK = 0xff,
    SHMQ_FRAME_DONE = 0x100,
};

/* Result codes: the hot path returns these; the binding maps them to
 * exceptions in exactly one place (raise_code in _ringmodule.c). */
enum shmq_code {
    SHMQ_OK = 0,
    SHMQ_FULL = 1,
    SHMQ_EMPTY = 2,
    SHMQ_TOO_LARGE = 3,
    SHMQ_CORRUPT = 4,      /* a frame or position failed its bounds check */
    SHMQ_TIMEOUT = 5,
    SHMQ_INTERRUPTED = 6,  /* a signal arrived while blocked */
    SHMQ_BAD_MAGIC = 7,
    SHMQ_BAD_VERSION = 8,
    SHMQ_BAD_KIND = 9,
    SHMQ_BAD_SIZE = 10,    /* capacity / segment size mismatch */
    SHMQ_NOT_READY = 11,   /* magic still zero: creator has not finished */
    SHMQ_BAD_ARGUMENT = 12,
};

enum shmq_wait_strategy {
    SHMQ_WAIT_SPIN = 0,
    SHMQ_WAIT_YIELD = 1,
    SHMQ_WAIT_BLOCK = 2,
    SHMQ_WAIT_ADAPTIVE = 3,
};

enum shmq_condition {
    SHMQ_READABLE = 0,     /* a committed frame is there to read */
    SHMQ_WRITABLE = 1,     /* arg = payload length that must fit */
    SHMQ_COMMIT_TURN = 2,  /* arg = claim start: all earlier claims are committed */
};

typedef struct shmq_ring {
    uint8_t *base;
    uint8_t *data;
    uint64_t capacity;
    uint64_t mask;
    uint64_t max_message;
    uint32_t kind;
    int multi_producer;
    int multi_consumer;
    _Atomic uint64_t *tail_claim, *tail_commit, *head_claim, *head_release;
    _Atomic uint64_t *put_count, *put_bytes, *get_count, *get_bytes;
    _Atomic uint64_t *get_waits, *put_waits, *data_wakes, *space_wakes;
    _Atomic uint32_t *data_futex, *data_waiters, *space_futex, *space_waiters;
    _Atomic uint64_t *deferred_count, *deferred_total;
    _Atomic uint64_t *recover_lock, *dead_producer_claims, *dead_producer_bytes;
    _Atomic uint64_t *dead_consumer_messages;
    /* Process-local caches of the other side's cursor. Cursors only grow, so a
     * stale value is conservative (less space, fewer frames), never unsafe. */
    _Atomic uint64_t cached_head;
    _Atomic uint64_t cached_tail;
    /* Claim tracking (see shmq_track): this handle's attachment entry, or NULL. The rest is
     * process-local bookkeeping; callers serialize claims and hand-overs per handle (the
     * binding holds the GIL for them). Side 0 is writing, side 1 reading. */
    uint8_t *entry;
    int entry_index;
    uint32_t open_n[2], open_overflow[2];
    uint64_t open_start[2][SHMQ_OPEN_CLAIMS];
    /* When a stalled cursor was first seen at its value, and when to look next (shmq_recover). */
    uint64_t stall_pos[2];
    int64_t stall_since[2];
    int64_t recover_next_ns;
} shmq_ring;

/* A claimed range of the ring: [start, end) holds `count` frames (plus at most
 * one PAD frame at the wrap). */
typedef struct shmq_span {
    uint64_t start;
    uint64_t end;
    uint64_t count;
    uint64_t bytes;
} shmq_span;

static inline uint64_t shmq_frame_size(uint64_t length)
{
    return (SHMQ_FRAME_HEADER + length + (SHMQ_FRAME_ALIGN - 1)) & ~(uint64_t)(SHMQ_FRAME_ALIGN - 1);
}

/* Segment lifecycle. size is the whole mapping (header + capacity). */
int shmq_format(uint8_t *base, uint64_t size, uint32_t kind, uint64_t capacity,
                uint64_t creator_pid, uint64_t created_ns);
int shmq_attach(shmq_ring *r, uint8_t *base, uint64_t size);
/* The attachment table. `owner` identifies a process for good (a pid alone is reused).
 * Claim returns the entry index, or -1 when the table is full (the caller frees entries of
 * dead owners with shmq_attach_release and tries again, or counts itself untracked). */
int shmq_attach_claim(uint8_t *base, uint64_t owner, uint32_t role, uint64_t now_ns);
/* Frees entry `index` if it still belongs to `owner`: 1 freed, 0 not (someone else's now). */
int shmq_attach_release(uint8_t *base, int index, uint64_t owner);
/* Adds `delta` to the count of handles attached without an entry; returns the new count. */
uint64_t shmq_attach_untracked(uint8_t *base, int delta);

/* Producer side. lengths must each be <= max_message (checked by the caller
 * with shmq_check_length before anything is written). */
int shmq_check_length(const shmq_ring *r, uint64_t length);
/* Ring bytes a message of `length` needs at the current tail (header and wrap padding). */
uint64_t shmq_bytes_needed(shmq_ring *r, uint64_t length);
int shmq_claim(shmq_ring *r, const uint64_t *lengths, size_t n, shmq_span *span);
/* Claims room for one frame right after `after`, the end of this producer's
 * last claim that is not committed yet (single-producer rings: several claims
 * can then be committed together as one span from the first start to the last
 * end). Multi-producer rings ignore `after` and claim as shmq_claim() does. */
int shmq_claim_after(shmq_ring *r, uint64_t after, uint64_t length, shmq_span *span);
uint8_t *shmq_place(shmq_ring *r, uint64_t *pos, uint32_t length);
int shmq_commit_ready(shmq_ring *r, const shmq_span *span);
void shmq_commit(shmq_ring *r, const shmq_span *span);
void shmq_abandon(shmq_ring *r, const shmq_span *span);
/* Hands a written claim whose commit turn has not come to whoever commits its
 * predecessor (or commits it now if the turn came meanwhile), so a producer
 * never waits on another producer's progress. With `abandon`, the frames
 * become padding first: nothing is delivered. SHMQ_FULL if all slots are in
 * use (then the caller has to wait for its turn). Multi-producer rings only. */
int shmq_defer_commit(shmq_ring *r, const shmq_span *span, int abandon);

/* Consumer side. */
/* Claims up to max_messages frames; stops early once max_bytes of payload are
 * taken (at least one message is always taken). */
int shmq_read(shmq_ring *r, size_t max_messages, uint64_t max_bytes, shmq_span *span);
const uint8_t *shmq_next(shmq_ring *r, uint64_t *pos, uint64_t end, uint32_t *length);
void shmq_release(shmq_ring *r, const shmq_span *span);

/* Waiting: returns SHMQ_OK when the condition holds, SHMQ_TIMEOUT at the
 * deadline (CLOCK_MONOTONIC ns; < 0 waits forever), SHMQ_INTERRUPTED on a
 * signal. Never call with the GIL held. */
int shmq_wait(shmq_ring *r, int condition, uint64_t arg, int strategy,
              int64_t deadline_ns, int64_t spin_ns);
int shmq_condition_holds(shmq_ring *r, int condition, uint64_t arg);
int64_t shmq_now_ns(void);
/* Wakes every sleeper on both futex words (they re-check and may sleep again). */
void shmq_wake_all(shmq_ring *r);

/* Dead peers (docs/ARCHITECTURE.md, "Dead processes").
 * shmq_track makes this handle publish its claims in attachment entry `index` (claimed by the
 * caller with shmq_attach_claim), so recovery can tell them from a dead process's; -1 stops.
 * shmq_recover checks, at most once per SHMQ_RECOVER_AFTER_NS of stall, whether the claim the
 * commit cursor waits for (or the frame the release cursor waits for) belongs to a process that
 * is gone, and if so turns the claim into padding (releases the frames). Returns how many
 * stalls it cleared; 0 also when it has nothing to do or cannot be sure. */
void shmq_track(shmq_ring *r, int index);
int shmq_recover(shmq_ring *r, int64_t now_ns);
/* The same at once, without waiting for a stall to last (tests, tools). */
int shmq_recover_now(shmq_ring *r);
/* Whether the process an owner word names runs (unknown counts as running). */
int shmq_owner_alive(uint64_t owner);

/* Observation (approximate while other processes run). */
uint64_t shmq_depth_messages(shmq_ring *r);
uint64_t shmq_depth_bytes(shmq_ring *r);

#endif /* SHMQ_RING_H */
