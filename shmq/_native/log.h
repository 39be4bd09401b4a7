/*
 * shmq durable log: an append-only, segmented, memory-mapped record log.
 *
 * Pure C11 + POSIX, no Python (the binding is _log.c). The router appends
 * durable topics' messages here before routing them; replaying subscribers,
 * spill files and `shmq log` read it back. docs/ARCHITECTURE.md has the byte
 * layouts; in short (all integers little-endian):
 *
 * A log is a directory of segment files named <base_seq, 20 digits>.seg.
 * Each segment is preallocated whole (posix_fallocate), so a full disk shows
 * up as an error when a segment is created, never as SIGBUS on a store.
 *
 *   segment header (64 bytes)
 *   0   u64 magic "SHMQLOG1"
 *   8   u32 version
 *   12  u32 header_size        64
 *   16  u64 base_seq           sequence of the first record in this segment
 *   24  u64 size               the file's size
 *   32  u64 created_ns         CLOCK_REALTIME
 *   40..63 reserved (zero)
 *
 *   record, at 8-byte aligned offsets from 64:
 *   0   u32 length             bytes 0..length (24 + body); 0 marks the end
 *   4   u32 crc32c             CRC-32C (Castagnoli) of bytes 8..length
 *   8   u64 seq                from 1, one more than the record before it
 *   16  u64 time_ns            CLOCK_REALTIME when appended, never decreasing
 *   24  body                   for the bus: a pub/sub message (bus.h)
 *   zero padding to 8 bytes
 *
 * The writer stores the body, CRC and seq first and the length last (a
 * release store), so a reader that sees a length sees the whole record.
 */
#ifndef SHMQ_LOG_H
#define SHMQ_LOG_H

#include <stddef.h>
#include <stdint.h>

#define SHMQ_LOG_MAGIC 0x31474F4C514D4853ull /* "SHMQLOG1" read as a little-endian u64 */
#define SHMQ_LOG_VERSION 1u
#define SHMQ_LOG_HEADER 64u
#define SHMQ_REC_HEADER 24u
#define SHMQ_LOG_MIN_SEGMENT 4096ull
#define SHMQ_LOG_MAX_SEGMENT (1ull << 40)

/* Results (negative: failures; errors carry errno in the log or cursor). */
enum {
    SHMQ_LOG_OK = 0,
    SHMQ_LOG_END = 1,      /* cursor: nothing more to read yet */
    SHMQ_LOG_ERR = -1,     /* an OS call failed: see ->error (errno) and ->error_what */
    SHMQ_LOG_BAD = -2,     /* a bad argument */
};

uint32_t shmq_crc32c(uint32_t crc, const void *data, size_t n);

/* What recovery, a cursor or a scan found wrong, for the caller to report. */
typedef struct shmq_log_damage {
    uint64_t segment;  /* base_seq of the segment (its file name) */
    uint64_t offset;   /* where the bad bytes start */
    uint64_t length;   /* how many bytes were skipped or cut */
    int truncated;     /* 1: a torn tail, cut off; 0: skipped in the middle */
} shmq_log_damage;

#define SHMQ_LOG_MAX_DAMAGE 16

/* Recovery's memory of the last records per (publisher, topic): a publisher ring
 * re-read after a crash may hold messages the log already has. */
typedef struct shmq_log_seen {
    uint64_t *keys;   /* hash of (publisher_id, topic); 0 = free */
    uint64_t *seqs;   /* the highest publisher seq seen */
    uint32_t cap, n;
} shmq_log_seen;

typedef struct shmq_log {
    char *dir;
    uint64_t segment_size;   /* for new segments (a record larger gets a segment of its own size) */
    int checksums;           /* 0: spill files, which never outlive the router */
    int syncs;               /* rolled segments are kept open until a sync has flushed them */
    uint8_t *last_body;      /* the body of the record appended last (in the mapping) */
    /* the active segment */
    int fd;
    uint8_t *map;
    uint64_t map_size;
    uint64_t base_seq;
    uint64_t pos;            /* where the next record goes */
    uint64_t next_seq;
    uint64_t last_time_ns;
    uint64_t first_seq;      /* oldest record in the directory (0: none) */
    /* segments rolled since the last sync, still to be flushed (dup'ed fds) */
    int pending_fds[8];
    int npending;
    uint64_t synced_seq;     /* every record up to here is on disk */
    uint64_t bytes_appended;
    uint64_t segments_created;
    int error;
    const char *error_what;
    shmq_log_damage damage[SHMQ_LOG_MAX_DAMAGE];
    uint32_t ndamage;
    shmq_log_seen seen;
    struct shmq_log_cursor *check; /* shmq_log_holds's reader, kept while its seqs grow */
} shmq_log;

enum {
    SHMQ_LOG_CHECKSUMS = 1, /* write and check CRC-32C */
    SHMQ_LOG_REMEMBER = 2,  /* fill ->seen from the last segments */
    SHMQ_LOG_SYNCS = 4,     /* the caller syncs (shmq_log_sync_*) */
};
/* Opens (creating if needed) the log in `dir` and recovers its tail: a torn
 * or corrupt last record is cut off (reported in ->damage), numbering goes on
 * after the last good record. */
/* Permission bits of the files this process creates for logs (and spill); their directories get
 * the matching x bits. Owner-only (0600) unless the router was given another mode. */
extern unsigned shmq_log_file_mode;
int shmq_log_open(shmq_log *log, const char *dir, uint64_t segment_size, int flags);
void shmq_log_close(shmq_log *log);
/* Closes the log and removes its segments and directory (spill files, once drained). */
void shmq_log_destroy(shmq_log *log);
/* Appends one record; its seq in *seq. On SHMQ_LOG_ERR nothing was written. With
 * `message`, the body is a pub/sub message: the copy's topic_id and flags are zeroed
 * and its log_seq set to the record's seq before the checksum is taken. */
int shmq_log_append(shmq_log *log, const uint8_t *body, uint32_t len, int message, uint64_t *seq);
/* The highest publisher seq recovery saw for (publisher, topic), 0 if none. */
uint64_t shmq_log_seen_seq(const shmq_log *log, uint32_t publisher, const uint8_t *topic, uint32_t topic_len);
/* 1 if record `seq` is the pub/sub message (publisher, pub_seq), 0 if not (or if the log
 * cannot say). For frames a dead router marked as appended: the mark is a claim the log must
 * confirm, since the directory may have been replaced since. */
int shmq_log_holds(shmq_log *log, uint64_t seq, uint32_t publisher, uint64_t pub_seq);

/* Syncing in three steps, so the slow middle one runs without the caller's lock:
 * prepare (locked) picks what to flush, run (unlocked) flushes, finish (locked)
 * records it. */
typedef struct shmq_log_sync {
    int fds[9];
    int nfds;
    uint64_t upto;
    int error;
} shmq_log_sync;
int shmq_log_sync_prepare(shmq_log *log, shmq_log_sync *s);
int shmq_log_sync_run(shmq_log_sync *s);
void shmq_log_sync_finish(shmq_log *log, shmq_log_sync *s);

/* Segments of a directory, oldest first (base_seq of each). Returns how many (-1: error). */
int64_t shmq_log_segments(const char *dir, uint64_t **bases);
/* Removes every segment but the active one whose records all start before `seq`
 * (bytes and age retention pick `seq`; the caller decides). Returns segments removed. */
int shmq_log_remove_before(shmq_log *log, uint64_t seq);

/* A reader. It maps one segment at a time and moves to the next on its own. */
typedef struct shmq_log_cursor {
    char *dir;
    int fd;
    uint8_t *map;
    uint64_t map_size;
    uint64_t base_seq;       /* segment mapped (0: none) */
    uint64_t pos;
    uint64_t next_seq;       /* the seq the next record should have */
    uint64_t walked_seq;     /* the last intact record's seq seen in this segment (resync starts after it) */
    uint64_t end_checked;    /* offset in the mapped segment already searched for records after a zero length */
    uint64_t skipped;        /* records lost to damage or removed by retention */
    uint64_t damaged_bytes;
    int checksums;
    int error;
    const char *error_what;
    shmq_log_damage damage[SHMQ_LOG_MAX_DAMAGE];
    uint32_t ndamage;
} shmq_log_cursor;

/* A read record: pointers into the mapping, valid until the next call. */
typedef struct shmq_log_record {
    uint64_t seq;
    uint64_t time_ns;
    const uint8_t *body;
    uint32_t len;
    uint64_t segment;
    uint64_t offset;
} shmq_log_record;

enum { SHMQ_START_SEQ = 0, SHMQ_START_TIME = 1 };
/* Positions a new cursor at the first record with seq >= `at` (or time_ns >= `at`). */
int shmq_log_cursor_open(shmq_log_cursor *c, const char *dir, int checksums, int kind, uint64_t at);
void shmq_log_cursor_close(shmq_log_cursor *c);
/* The next record, if its seq < `limit` (0: no limit); SHMQ_LOG_END when there is none yet. */
int shmq_log_cursor_next(shmq_log_cursor *c, uint64_t limit, shmq_log_record *r);
/* Moves past the record the last call returned. */
void shmq_log_cursor_advance(shmq_log_cursor *c, const shmq_log_record *r);

/* Statistics of one segment file, for `shmq log inspect`. */
typedef struct shmq_log_segment_info {
    uint64_t base_seq, size, used, records, first_seq, last_seq, first_time, last_time;
    uint64_t damaged_records, damaged_bytes;
    int bad_header;
} shmq_log_segment_info;
int shmq_log_segment_scan(const char *path, int checksums, shmq_log_segment_info *info,
                          shmq_log_damage *damage, uint32_t *ndamage);

#endif /* SHMQ_LOG_H */
