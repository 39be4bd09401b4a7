/*
 * shmq pub/sub engine: the message format carried in ring frames, header
 * lookup, the `where=` filter machine, and the router's forwarding loop.
 *
 * Pure C11, no Python (the binding is _pubsub.c). docs/ARCHITECTURE.md has the
 * layouts; the comments here name, at every release, the acquire it pairs with.
 *
 * A pub/sub message is the payload of one ring frame (all little-endian):
 *
 *   0   u32 topic_id       publisher rings: the publisher's own number for the
 *                          topic; subscriber rings: the router's number
 *   4   u16 topic_len      1..255
 *   6   u16 headers_len    0..65535, the encoded headers below
 *   8   u32 publisher_id   chosen at random by the publisher, kept across restarts
 *   12  u32 flags          SHMQ_MSG_LAST_VALUE: replayed from the last-value cache;
 *                          SHMQ_MSG_REDELIVERED: a durable subscription saw it before
 *   16  u64 seq            per publisher and topic, from 1
 *   24  u64 timestamp_ns   CLOCK_MONOTONIC at publish (time.monotonic_ns())
 *   32  u64 log_seq        durable topics: the record's sequence in the log; else 0
 *   40  topic bytes (UTF-8), then headers, then the payload
 *
 * Headers are a sequence of entries:
 *   u8 key_len (1..255), key bytes (UTF-8), u8 type, value:
 *   type 1 str: u16 length + UTF-8 bytes; 2 int: i64; 3 float: f64; 4 bool: u8 0/1.
 *
 * Router-to-subscriber rings carry the same bytes: the router copies each
 * message whole and only rewrites topic_id, flags and log_seq in the copy.
 */
#ifndef SHMQ_BUS_H
#define SHMQ_BUS_H

#include <stddef.h>
#include <stdint.h>

#include "log.h"
#include "ring.h"

#define SHMQ_MSG_HEADER 40u
#define SHMQ_MSG_OFF_TOPIC_ID 0
#define SHMQ_MSG_OFF_TOPIC_LEN 4
#define SHMQ_MSG_OFF_HEADERS_LEN 6
#define SHMQ_MSG_OFF_PUBLISHER 8
#define SHMQ_MSG_OFF_FLAGS 12
#define SHMQ_MSG_OFF_SEQ 16
#define SHMQ_MSG_OFF_TIMESTAMP 24
#define SHMQ_MSG_OFF_LOG_SEQ 32
#define SHMQ_MSG_LAST_VALUE 1u
#define SHMQ_MSG_REDELIVERED 2u
#define SHMQ_MAX_TOPIC 255u
#define SHMQ_MAX_HEADERS 65535u

enum shmq_value_type { SHMQ_V_MISSING = 0, SHMQ_V_STR = 1, SHMQ_V_INT = 2, SHMQ_V_FLOAT = 3, SHMQ_V_BOOL = 4 };

typedef struct shmq_value {
    int type;
    const uint8_t *str; /* SHMQ_V_STR: bytes (not NUL-terminated) */
    uint32_t len;
    int64_t i;          /* SHMQ_V_INT, and SHMQ_V_BOOL (0/1) */
    double f;
} shmq_value;

/* The parts of a message, bounds-checked. Returns SHMQ_OK or SHMQ_CORRUPT. */
typedef struct shmq_msg {
    uint32_t topic_id;
    uint32_t publisher_id;
    uint32_t flags;
    uint64_t seq;
    uint64_t timestamp_ns;
    uint64_t log_seq;
    const uint8_t *topic;
    uint32_t topic_len;
    const uint8_t *headers;
    uint32_t headers_len;
    const uint8_t *payload;
    uint64_t payload_len;
} shmq_msg;

int shmq_msg_parse(const uint8_t *frame, uint64_t length, shmq_msg *msg);
/* Checks that headers are well formed (every entry inside the bounds). */
int shmq_headers_check(const uint8_t *headers, uint32_t length);
/* Reads one entry at *pos (advancing it); SHMQ_OK, SHMQ_EMPTY at the end, or SHMQ_CORRUPT. */
int shmq_headers_next(const uint8_t *headers, uint32_t length, uint32_t *pos, const uint8_t **key,
                      uint32_t *key_len, shmq_value *value);
/* The value of header `key`, or type SHMQ_V_MISSING. Headers must have passed shmq_headers_check. */
void shmq_headers_get(const uint8_t *headers, uint32_t length, const uint8_t *key, uint32_t key_len,
                      shmq_value *value);

/*
 * Filter programs: a `where=` expression compiled (by shmq/_wire.py) into a
 * flat postfix program for a stack machine:
 *   1 FIELD  u8 key_len, key          push the header's value (or missing)
 *   2 CONST  value (type byte + data) push a literal
 *   3 CMP    u8 op (0 == 1 != 2 < 3 <= 4 > 5 >=)  pop literal, value; push bool
 *   4 IN     u8 negated, u16 n, n values          pop value; push bool
 *   5 AND  6 OR  7 NOT                 on booleans
 * Semantics are those of shmq/filters.py: a missing header or a value of
 * another kind makes a test false; ints and floats compare exactly.
 */
enum { SHMQ_OP_FIELD = 1, SHMQ_OP_CONST, SHMQ_OP_CMP, SHMQ_OP_IN, SHMQ_OP_AND, SHMQ_OP_OR, SHMQ_OP_NOT };
#define SHMQ_FILTER_MAX_STACK 256

/* Validates a program (structure and stack discipline); SHMQ_OK or SHMQ_BAD_ARGUMENT. */
int shmq_filter_check(const uint8_t *program, uint32_t length);
/* 1 if the headers pass, 0 if not. The program must have passed shmq_filter_check. */
int shmq_filter_eval(const uint8_t *program, uint32_t length, const uint8_t *headers,
                     uint32_t headers_len);

/* -------------------------------------------------------------------- */
/* The bus segment shared by the router and its clients                  */
/* -------------------------------------------------------------------- */

#define SHMQ_BUS_MAGIC 0x0053554251514D48ull /* "HMQQBUS\0" read as a little-endian u64 */
#define SHMQ_BUS_VERSION 2u
#define SHMQ_BUS_OFF_DOORBELL 128  /* u32 futex: bumped to wake a sleeping router */
#define SHMQ_BUS_OFF_SLEEPING 132  /* u32: 1 while the router sleeps on the doorbell */
#define SHMQ_BUS_OFF_LOG_ERROR 104 /* u32 errno of the durable log's last failure (0: healthy) */
#define SHMQ_BUS_OFF_LOG_NEXT 112  /* u64 the log's next sequence */
#define SHMQ_BUS_OFF_LOG_SYNCED 120 /* u64 every record up to here is on disk */
#define SHMQ_BUS_OFF_COUNTERS 256  /* router counters, see shmq_bus_counters */

/* Router-wide counters at SHMQ_BUS_OFF_COUNTERS (the router is the only writer). */
enum shmq_bus_counter {
    SHMQ_C_MESSAGES = 0,   /* messages read from publisher rings */
    SHMQ_C_BYTES,          /* their payload bytes (whole messages) */
    SHMQ_C_DELIVERIES,     /* copies written to subscriber rings */
    SHMQ_C_DROPS,          /* copies dropped by a dropping policy */
    SHMQ_C_STALLS,         /* times a message waited for a full `block` subscriber */
    SHMQ_C_SLEEPS,         /* times the router slept on the doorbell */
    SHMQ_C_PASSES,         /* forwarding passes that moved something */
    SHMQ_C_REDELIVERIES,   /* messages a gone group member left, offered to the others */
    SHMQ_C_APPENDED,       /* records appended to the durable log */
    SHMQ_C_LOG_BYTES,      /* their bytes */
    SHMQ_C_SYNCS,          /* fdatasync calls that flushed the log */
    SHMQ_C_SPILLED,        /* copies written to spill files */
    SHMQ_C_REPLAYED,       /* copies delivered from the log to replaying or durable subscribers */
    SHMQ_C_COUNT
};

/* Per-publisher statistics slot (router writes; offsets within the slot). */
enum { SHMQ_PS_MESSAGES = 16, SHMQ_PS_BYTES = 24, SHMQ_PS_STALLS = 32,
       /* fsync="always": its ring is durable up to this position; the u32 after it is a futex
        * bumped (and woken) each time that moves */
       SHMQ_PS_DURABLE_POS = 128, SHMQ_PS_SYNC_FUTEX = 136 };
#define SHMQ_PUBLISHER_SLOT 256
/* Per-subscriber statistics slot. */
enum {
    SHMQ_SS_DELIVERED = 16, SHMQ_SS_BYTES = 24, SHMQ_SS_DROPS = 32, SHMQ_SS_FILTERED = 40,
    SHMQ_SS_PENDING = 48, SHMQ_SS_PENDING_MAX = 56,
    /* 64..95: received, depth and capacity, written by the router's housekeeping */
    SHMQ_SS_STOLEN = 96,     /* drop_oldest: messages the router took back out of the ring */
    SHMQ_SS_TOO_LARGE = 104, /* messages larger than the ring's max_message (also in drops) */
    SHMQ_SS_SPILLED = 112,   /* spill: messages written to its spill file */
    SHMQ_SS_SPILL_BYTES = 120, /* spill: bytes in its spill file now */
    SHMQ_SS_SPILL_FULL = 128,  /* spill: times the file was at max_spill_bytes (it blocked instead) */
    SHMQ_SS_REPLAYED = 136,  /* messages delivered from the durable log */
    SHMQ_SS_LOG_SEQ = 144,   /* the log sequence of the last of them */
    SHMQ_SS_SKIPPED = 152,   /* log records it never got: removed by retention, or damaged */
    SHMQ_SS_SPILL_MAX = 160, /* spill: the most bytes its spill file held */
    SHMQ_SS_SPILL_MSGS = 168, /* spill: messages in its spill file now */
    /* Log-fed: stored before each commit, so that after a crash between the commit and the
     * store of LOG_SEQ the ring's tail_commit tells whether the commit happened (>= END: it
     * did, and SEQ is the last seq the ring got). END first, then SEQ. */
    SHMQ_SS_INTENT_END = 176,
    SHMQ_SS_INTENT_SEQ = 184
};
#define SHMQ_SUBSCRIBER_SLOT 768
/* Per-topic statistics slot. */
enum { SHMQ_TS_MESSAGES = 8, SHMQ_TS_BYTES = 16, SHMQ_TS_DELIVERIES = 24, SHMQ_TS_DROPS = 32,
       SHMQ_TS_LAST_SEQ = 40, SHMQ_TS_LAST_TIMESTAMP = 48 };

/* Wakes a router sleeping on the bus doorbell. Call after a commit: the
 * seq_cst fence in shmq_commit() orders the commit before our load. */
void shmq_bus_ring_doorbell(uint8_t *bus);

/* -------------------------------------------------------------------- */
/* The forwarder: the router's data plane                               */
/* -------------------------------------------------------------------- */

enum shmq_policy { SHMQ_BLOCK = 0, SHMQ_DROP = 1, SHMQ_DROP_OLDEST = 2, SHMQ_CONFLATE = 3, SHMQ_SPILL = 4 };

typedef struct fwd_output fwd_output;
typedef struct fwd_route fwd_route;
typedef struct fwd_input fwd_input;
typedef struct shmq_forwarder shmq_forwarder;

/* One destination of a route: a subscriber, or a queue group (round robin). */
typedef struct fwd_target {
    uint8_t *filter;      /* owned program, or NULL */
    uint32_t filter_len;
    uint32_t n;           /* outputs (1 unless a group) */
    fwd_output **outs;    /* referenced, not owned */
    uint32_t next;        /* group: where the round robin goes on */
    int group;
    int group_policy;     /* groups: SHMQ_BLOCK or SHMQ_DROP */
} fwd_target;

/* Results of shmq_fwd_pass() that need the caller (the Python router). */
enum shmq_fwd_event {
    SHMQ_EV_NONE = 0,
    SHMQ_EV_UNKNOWN_TOPIC = 1, /* an input used a topic number not mapped yet */
    SHMQ_EV_CORRUPT = 2,       /* an input ring or message failed a bounds check */
    SHMQ_EV_LOG_TOPIC = 3,     /* a log record's topic has no router number yet (topic, topic_len) */
    SHMQ_EV_LOG_ERROR = 4,     /* the durable log could not be written (error: errno) */
};

typedef struct shmq_fwd_event_info {
    int event;
    uint32_t input_id;
    uint32_t local_topic;
    uint8_t topic[SHMQ_MAX_TOPIC + 1];
    uint32_t topic_len;
    int error;
    const char *error_what;
} shmq_fwd_event_info;

shmq_forwarder *shmq_fwd_new(uint8_t *bus, uint64_t bus_size);
void shmq_fwd_free(shmq_forwarder *f);

/* All of these must be called with the forwarder's lock held (the binding does). */
int shmq_fwd_add_input(shmq_forwarder *f, uint32_t id, uint8_t *base, uint64_t size, int64_t stats_off);
/* Makes input `id` a redelivery input: its messages (already routed once) go to
 * `target` instead of through the topic table. Takes ownership of target. */
int shmq_fwd_set_input_target(shmq_forwarder *f, uint32_t id, fwd_target *target);
int shmq_fwd_remove_input(shmq_forwarder *f, uint32_t id);
/* Stops reading input `id` (a damaged ring): what it holds stays unread. */
int shmq_fwd_isolate_input(shmq_forwarder *f, uint32_t id);
/* Messages still unread in input `id` (-1 if there is no such input). */
int64_t shmq_fwd_input_depth(shmq_forwarder *f, uint32_t id);
int shmq_fwd_add_output(shmq_forwarder *f, uint32_t id, uint8_t *base, uint64_t size, int policy,
                        int64_t stats_off);
int shmq_fwd_remove_output(shmq_forwarder *f, uint32_t id);
fwd_output *shmq_fwd_output(shmq_forwarder *f, uint32_t id);
int shmq_fwd_add_topic(shmq_forwarder *f, uint32_t global_id, int64_t stats_off, int keep_last, int durable,
                       const uint8_t *name, uint32_t name_len);

/* The durable log (owned by the caller, who must keep it open while it is set). With
 * `confirm`, inputs' positions are published to their slots as syncs cover them. */
void shmq_fwd_set_log(shmq_forwarder *f, shmq_log *log, int confirm);
/* After a sync: publishes confirmations up to the log's synced_seq. */
void shmq_fwd_log_synced(shmq_forwarder *f);
/* Feeds output `id` from the log, from record `start_seq` on, instead of from the routes of
 * durable topics (the caller leaves it out of those). Records up to `redelivered_upto` are
 * flagged redelivered; `delivered` (may be NULL) is kept at the last seq committed to it,
 * and `intent` (two words: ring position, seq; NULL with delivered) says before each commit
 * what it will be, as SHMQ_SS_INTENT_* do. Takes ownership of filter. */
int shmq_fwd_set_output_log(shmq_forwarder *f, uint32_t id, uint64_t start_seq, uint64_t redelivered_upto,
                            uint64_t *delivered, uint64_t *intent, uint8_t *filter, uint32_t filter_len);
/* Whether log-fed output `id` takes topic `global_id` (set for every topic the log carries). */
int shmq_fwd_set_output_match(shmq_forwarder *f, uint32_t id, uint32_t global_id, int match);
/* Makes output `id` spill to files under `dir` (created, and removed when drained) when its ring
 * is full, up to max_bytes; past that it blocks. */
int shmq_fwd_set_output_spill(shmq_forwarder *f, uint32_t id, const char *dir, uint64_t max_bytes,
                              uint64_t segment_size);
int shmq_fwd_map_topic(shmq_forwarder *f, uint32_t input_id, uint32_t local_id, uint32_t global_id);
/* Replaces a topic's route with `targets` (ownership passes to the forwarder). */
int shmq_fwd_set_route(shmq_forwarder *f, uint32_t global_id, fwd_target *targets, uint32_t n);
/* Writes (or queues, if it is full) the last message of each topic that passes
 * `filter` (NULL: all) for output `out_id`: last_value=True. */
int shmq_fwd_replay_last(shmq_forwarder *f, uint32_t out_id, const uint32_t *topics, uint32_t n,
                         const uint8_t *filter, uint32_t filter_len);
void shmq_fwd_free_targets(fwd_target *targets, uint32_t n);

/* One pass over every input: moves what it can, never waits. Returns the
 * number of messages taken from inputs; fills *ev when the caller must act
 * (the input then resumes at the same message on the next pass). *stalled is
 * set when some message waits for a full `block` subscriber. */
int64_t shmq_fwd_pass(shmq_forwarder *f, shmq_fwd_event_info *ev, int *stalled);
/* 1 if any input has something to read or any pending delivery could move. */
int shmq_fwd_has_work(shmq_forwarder *f);
/* Going to sleep, in two halves. With the lock held: announce the sleep (the
 * doorbell flag, and the sleepers bit of each subscriber ring a message waits
 * for) and re-check; returns 1 if there is work after all. Then without the
 * lock: shmq_fwd_sleep() waits (when `sleep` is 1) until a publisher rings,
 * room frees up in a watched ring, or timeout_ns passes, and clears the flag. */
int shmq_fwd_sleep_prepare(shmq_forwarder *f);
void shmq_fwd_sleep(shmq_forwarder *f, int64_t timeout_ns, int sleep);
/* Ids of outputs freed since the last call (their rings may now be unmapped). */
uint32_t shmq_fwd_reap(shmq_forwarder *f, uint32_t *ids, uint32_t max);
void shmq_fwd_wake(shmq_forwarder *f);

#endif /* SHMQ_BUS_H */
