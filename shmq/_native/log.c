/*
 * shmq durable log (see log.h for the layout).
 *
 * One writer (the router's forwarder thread, under the forwarder lock) and any
 * number of readers, in this process (replay cursors) or others (`shmq log`).
 * Readers in this process are bounded by the writer's next_seq, read under
 * the same lock; readers elsewhere rely on the release store of each record's
 * length.
 */
#define _GNU_SOURCE
#include "log.h"

unsigned shmq_log_file_mode = 0600;

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint64_t align8(uint64_t v) { return (v + 7) & ~7ull; }

/* ------------------------------------------------------------------ */
/* CRC-32C: the SSE4.2 instruction where the CPU has it, else a table  */
/* ------------------------------------------------------------------ */

static uint32_t crc_table[8][256];

static void crc_init_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

static uint32_t crc_soft(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint64_t v = rd64(p) ^ crc;
        crc = crc_table[7][v & 0xff] ^ crc_table[6][(v >> 8) & 0xff] ^ crc_table[5][(v >> 16) & 0xff] ^
              crc_table[4][(v >> 24) & 0xff] ^ crc_table[3][(v >> 32) & 0xff] ^
              crc_table[2][(v >> 40) & 0xff] ^ crc_table[1][(v >> 48) & 0xff] ^ crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        c = __builtin_ia32_crc32di(c, rd64(p));
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

static int crc_mode; /* 0 unknown, 1 table, 2 hardware; a benign race: every thread picks the same */

uint32_t shmq_crc32c(uint32_t crc, const void *data, size_t n)
{
    if (!crc_mode) {
        crc_init_table();
#if defined(__x86_64__)
        __builtin_cpu_init();
        crc_mode = __builtin_cpu_supports("sse4.2") ? 2 : 1;
#else
        crc_mode = 1;
#endif
    }
    crc = ~crc;
#if defined(__x86_64__)
    if (crc_mode == 2)
        return ~crc_hw(crc, data, n);
#endif
    return ~crc_soft(crc, data, n);
}

/* ------------------------------------------------------------------ */
/* Records                                                             */
/* ------------------------------------------------------------------ */

static uint64_t now_realtime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The length word at `at`, read with acquire: pairs with the release store in append. */
static uint32_t load_length(const uint8_t *map, uint64_t at)
{
    return atomic_load_explicit((_Atomic uint32_t *)(void *)(map + at), memory_order_acquire);
}

/* 1 if a whole, intact record starts at `at` (expected seq: 0 for any). */
static int record_ok(const uint8_t *map, uint64_t size, uint64_t at, int checksums, uint64_t expect)
{
    if (at + SHMQ_REC_HEADER > size)
        return 0;
    uint32_t len = load_length(map, at);
    if (len < SHMQ_REC_HEADER || len > size - at)
        return 0;
    if (expect && rd64(map + at + 8) != expect)
        return 0;
    if (!checksums)
        return 1;
    return shmq_crc32c(0, map + at + 8, len - 8) == rd32(map + at + 4);
}

static void note_damage(shmq_log_damage *d, uint32_t *n, uint64_t segment, uint64_t offset, uint64_t length,
                        int truncated)
{
    if (*n < SHMQ_LOG_MAX_DAMAGE)
        d[(*n)++] = (shmq_log_damage){segment, offset, length, truncated};
}

/* The next intact record after a damaged one at `at`: the first 8-aligned offset
 * where one starts with a seq above `after`. Returns its offset, or 0 if none. */
static uint64_t resync(const uint8_t *map, uint64_t size, uint64_t at, int checksums, uint64_t after)
{
    for (uint64_t p = at + 8; p + SHMQ_REC_HEADER <= size; p += 8) {
        uint32_t len = rd32(map + p);
        if (len < SHMQ_REC_HEADER || len > size - p)
            continue;
        uint64_t seq = rd64(map + p + 8);
        if (seq <= after)
            continue;
        if (record_ok(map, size, p, checksums, 0))
            return p;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Segment files                                                       */
/* ------------------------------------------------------------------ */

static char *segment_path(const char *dir, uint64_t base)
{
    size_t n = strlen(dir) + 32;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%020" PRIu64 ".seg", dir, base);
    return p;
}

static int parse_name(const char *name, uint64_t *base)
{
    size_t n = strlen(name);
    if (n != 24 || strcmp(name + 20, ".seg") != 0)
        return 0;
    uint64_t v = 0;
    for (int i = 0; i < 20; i++) {
        if (name[i] < '0' || name[i] > '9')
            return 0;
        v = v * 10 + (uint64_t)(name[i] - '0');
    }
    *base = v;
    return 1;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int64_t shmq_log_segments(const char *dir, uint64_t **bases)
{
    *bases = NULL;
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    uint64_t *v = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        uint64_t base;
        if (!parse_name(e->d_name, &base))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            uint64_t *nv = realloc(v, cap * sizeof *v);
            if (!nv) {
                free(v);
                closedir(d);
                errno = ENOMEM;
                return -1;
            }
            v = nv;
        }
        v[n++] = base;
    }
    closedir(d);
    if (n > 1) /* (qsort with a NULL base is undefined even for 0 elements) */
        qsort(v, n, sizeof *v, cmp_u64);
    *bases = v;
    return (int64_t)n;
}

/* Maps a segment; checks its header. Returns 0, or -1 with errno (EBADMSG: bad header). */
static int map_segment(const char *dir, uint64_t base, int writable, int *fd_out, uint8_t **map_out,
                       uint64_t *size_out)
{
    char *path = segment_path(dir, base);
    if (!path)
        return -1;
    int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    free(path);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size < (off_t)SHMQ_LOG_HEADER) {
        int e = errno;
        close(fd);
        errno = st.st_size < (off_t)SHMQ_LOG_HEADER ? EBADMSG : e;
        return -1;
    }
    uint64_t size = (uint64_t)st.st_size;
    uint8_t *map = mmap(NULL, size, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    if (rd64(map) != SHMQ_LOG_MAGIC || rd32(map + 8) != SHMQ_LOG_VERSION ||
        rd32(map + 12) != SHMQ_LOG_HEADER || rd64(map + 16) != base || rd64(map + 24) > size) {
        munmap(map, size);
        close(fd);
        errno = EBADMSG;
        return -1;
    }
    *fd_out = fd;
    *map_out = map;
    *size_out = rd64(map + 24);
    return 0;
}

/* Creates a segment whole: written under a temporary name, renamed into place, so a
 * segment file with the right name always has a good header. */
static int create_segment(shmq_log *log, uint64_t base, uint64_t size)
{
    char *path = segment_path(log->dir, base);
    if (!path)
        return -1;
    size_t n = strlen(path) + 8;
    char *tmp = malloc(n);
    if (!tmp) {
        free(path);
        return -1;
    }
    snprintf(tmp, n, "%s.new", path);
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, shmq_log_file_mode);
    if (fd < 0) {
        log->error_what = "create a segment";
        goto fail;
    }
    fchmod(fd, shmq_log_file_mode); /* exactly: the umask may have narrowed it */
    /* Every block now, so a full disk is an error here rather than a SIGBUS on a store later. */
    int rc = posix_fallocate(fd, 0, (off_t)size);
    if (rc) {
        errno = rc;
        log->error_what = "allocate a segment";
        goto fail_fd;
    }
    uint8_t head[SHMQ_LOG_HEADER] = {0};
    wr64(head, SHMQ_LOG_MAGIC);
    wr32(head + 8, SHMQ_LOG_VERSION);
    wr32(head + 12, SHMQ_LOG_HEADER);
    wr64(head + 16, base);
    wr64(head + 24, size);
    wr64(head + 32, now_realtime());
    if (pwrite(fd, head, sizeof head, 0) != (ssize_t)sizeof head) {
        if (!errno)
            errno = EIO;
        log->error_what = "write a segment header";
        goto fail_fd;
    }
    uint8_t *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        log->error_what = "map a segment";
        goto fail_fd;
    }
    if (rename(tmp, path) < 0) {
        munmap(map, size);
        log->error_what = "name a segment";
        goto fail_fd;
    }
    free(tmp);
    free(path);
    log->fd = fd;
    log->map = map;
    log->map_size = size;
    log->base_seq = base;
    log->pos = SHMQ_LOG_HEADER;
    log->segments_created++;
    if (!log->first_seq)
        log->first_seq = base;
    return 0;
fail_fd:
    {
        int e = errno;
        close(fd);
        unlink(tmp);
        errno = e;
    }
fail:
    log->error = errno;
    free(tmp);
    free(path);
    return -1;
}

/* ------------------------------------------------------------------ */
/* Recovery's (publisher, topic) memory                                */
/* ------------------------------------------------------------------ */

static uint64_t seen_key(uint32_t publisher, const uint8_t *topic, uint32_t len)
{
    uint64_t h = 1469598103934665603ull ^ publisher;
    for (uint32_t i = 0; i < len; i++)
        h = (h ^ topic[i]) * 1099511628211ull;
    h ^= (uint64_t)publisher << 17;
    return h ? h : 1;
}

static int seen_put(shmq_log_seen *s, uint64_t key, uint64_t seq)
{
    if ((s->n + 1) * 2 > s->cap) {
        uint32_t cap = s->cap ? s->cap * 2 : 1024;
        uint64_t *k = calloc(cap, sizeof *k), *v = calloc(cap, sizeof *v);
        if (!k || !v) {
            free(k);
            free(v);
            return -1;
        }
        for (uint32_t i = 0; i < s->cap; i++)
            if (s->keys[i]) {
                uint32_t at = (uint32_t)(s->keys[i] & (cap - 1));
                while (k[at])
                    at = (at + 1) & (cap - 1);
                k[at] = s->keys[i];
                v[at] = s->seqs[i];
            }
        free(s->keys);
        free(s->seqs);
        s->keys = k;
        s->seqs = v;
        s->cap = cap;
    }
    uint32_t at = (uint32_t)(key & (s->cap - 1));
    while (s->keys[at] && s->keys[at] != key)
        at = (at + 1) & (s->cap - 1);
    if (!s->keys[at]) {
        s->keys[at] = key;
        s->n++;
    }
    if (seq > s->seqs[at])
        s->seqs[at] = seq;
    return 0;
}

uint64_t shmq_log_seen_seq(const shmq_log *log, uint32_t publisher, const uint8_t *topic, uint32_t topic_len)
{
    const shmq_log_seen *s = &log->seen;
    if (!s->n)
        return 0;
    uint64_t key = seen_key(publisher, topic, topic_len);
    uint32_t at = (uint32_t)(key & (s->cap - 1));
    while (s->keys[at]) {
        if (s->keys[at] == key)
            return s->seqs[at];
        at = (at + 1) & (s->cap - 1);
    }
    return 0;
}

/* Bodies are pub/sub messages: u32 topic_id, u16 topic_len, u16 headers_len,
 * u32 publisher_id, u32 flags, u64 seq, ... then the topic at byte 40. */
static void remember(shmq_log *log, const uint8_t *body, uint32_t len)
{
    if (len < 40)
        return;
    uint32_t topic_len = rd32(body + 4) & 0xffff;
    if (40ull + topic_len > len)
        return;
    seen_put(&log->seen, seen_key(rd32(body + 8), body + 40, topic_len), rd64(body + 16));
}

static void drop_check(shmq_log *log)
{
    if (log->check) {
        shmq_log_cursor_close(log->check);
        free(log->check);
        log->check = NULL;
    }
}

int shmq_log_holds(shmq_log *log, uint64_t seq, uint32_t publisher, uint64_t pub_seq)
{
    if (!seq || seq >= log->next_seq)
        return 0;
    /* The frames to check come in runs of growing seqs (one input's unreleased reads), so
     * one reader serves a run; an earlier seq starts a new one. */
    if (log->check && log->check->next_seq > seq)
        drop_check(log);
    if (!log->check) {
        log->check = calloc(1, sizeof *log->check);
        if (!log->check)
            return 0;
        if (shmq_log_cursor_open(log->check, log->dir, log->checksums, SHMQ_START_SEQ, seq) != SHMQ_LOG_OK) {
            drop_check(log);
            return 0;
        }
    }
    log->check->next_seq = seq;
    shmq_log_record r;
    if (shmq_log_cursor_next(log->check, seq + 1, &r) != SHMQ_LOG_OK || r.seq != seq || r.len < 40)
        return 0;
    return rd32(r.body + 8) == publisher && rd64(r.body + 16) == pub_seq;
}

/* ------------------------------------------------------------------ */
/* The writer                                                          */
/* ------------------------------------------------------------------ */

/* Scans a mapped segment from its first record: returns the end of its good records
 * and the seq after them, noting damage; `cut` zeroes a torn tail. */
static uint64_t scan(shmq_log *log, uint8_t *map, uint64_t size, uint64_t base, uint64_t *next_seq,
                     uint64_t *last_time, int cut, int remember_seen)
{
    uint64_t at = SHMQ_LOG_HEADER, seq = base;
    for (;;) {
        if (at + SHMQ_REC_HEADER > size)
            break;
        if (load_length(map, at) == 0) {
            /* The normal end, unless a zeroed length hides good records after it. */
            uint64_t next = resync(map, size, at, log->checksums, seq - 1);
            if (!next)
                break;
            note_damage(log->damage, &log->ndamage, base, at, next - at, 0);
            seq = rd64(map + next + 8);
            at = next;
            continue;
        }
        if (record_ok(map, size, at, log->checksums, seq)) {
            uint32_t len = load_length(map, at);
            *last_time = rd64(map + at + 16);
            if (remember_seen)
                remember(log, map + at + SHMQ_REC_HEADER, len - SHMQ_REC_HEADER);
            seq++;
            at += align8(len);
            continue;
        }
        uint64_t next = resync(map, size, at, log->checksums, seq - 1);
        if (next) {
            /* Damage in the middle: the records after it are good; skip over it. */
            note_damage(log->damage, &log->ndamage, base, at, next - at, 0);
            seq = rd64(map + next + 8);
            at = next;
            continue;
        }
        /* A torn or corrupt last record: nothing good follows it. */
        note_damage(log->damage, &log->ndamage, base, at, size - at, 1);
        if (cut)
            memset(map + at, 0, (size_t)(size - at));
        break;
    }
    *next_seq = seq;
    return at;
}

/* Segments a writer died creating (still under their temporary name) hold nothing. */
static void remove_unfinished(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n > 8 && strcmp(e->d_name + n - 8, ".seg.new") == 0)
            unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
}

int shmq_log_open(shmq_log *log, const char *dir, uint64_t segment_size, int flags)
{
    int checksums = (flags & SHMQ_LOG_CHECKSUMS) != 0, remember_seen = (flags & SHMQ_LOG_REMEMBER) != 0;
    memset(log, 0, sizeof *log);
    log->fd = -1;
    if (segment_size < SHMQ_LOG_MIN_SEGMENT || segment_size > SHMQ_LOG_MAX_SEGMENT)
        return SHMQ_LOG_BAD;
    log->dir = strdup(dir);
    if (!log->dir)
        return SHMQ_LOG_ERR;
    log->segment_size = segment_size & ~7ull;
    log->checksums = checksums;
    log->syncs = (flags & SHMQ_LOG_SYNCS) != 0;
    unsigned dir_mode = shmq_log_file_mode | (shmq_log_file_mode & 0444) >> 2;
    if (mkdir(dir, dir_mode) == 0) {
        chmod(dir, dir_mode);
    } else if (errno != EEXIST) {
        log->error = errno;
        log->error_what = "create the log directory";
        return SHMQ_LOG_ERR;
    }
    remove_unfinished(dir);
    uint64_t *bases;
    int64_t n = shmq_log_segments(dir, &bases);
    if (n < 0) {
        log->error = errno;
        log->error_what = "list the log directory";
        return SHMQ_LOG_ERR;
    }
    log->next_seq = 1;
    /* The newest segment with a good header is the active one. */
    for (int64_t i = n - 1; i >= 0; i--) {
        int fd;
        uint8_t *map;
        uint64_t size;
        if (map_segment(dir, bases[i], 1, &fd, &map, &size) < 0) {
            if (errno != EBADMSG) {
                log->error = errno;
                log->error_what = "open a segment";
                free(bases);
                return SHMQ_LOG_ERR;
            }
            note_damage(log->damage, &log->ndamage, bases[i], 0, 0, 0);
            continue;
        }
        if (remember_seen && i > 0) {
            /* A message stalled on a full subscriber may have been appended a segment earlier. */
            int pfd;
            uint8_t *pmap;
            uint64_t psize, ps, pt;
            if (map_segment(dir, bases[i - 1], 0, &pfd, &pmap, &psize) == 0) {
                uint32_t keep = log->ndamage; /* the older segment's damage is not ours to report */
                scan(log, pmap, psize, bases[i - 1], &ps, &pt, 0, 1);
                log->ndamage = keep;
                munmap(pmap, psize);
                close(pfd);
            }
        }
        log->fd = fd;
        log->map = map;
        log->map_size = size;
        log->base_seq = bases[i];
        log->pos = scan(log, map, size, bases[i], &log->next_seq, &log->last_time_ns, 1, remember_seen);
        break;
    }
    for (int64_t i = 0; i < n; i++) {
        int fd;
        uint8_t *map;
        uint64_t size;
        if (bases[i] == log->base_seq && log->map) {
            log->first_seq = bases[i];
            break;
        }
        if (map_segment(dir, bases[i], 0, &fd, &map, &size) == 0) {
            munmap(map, size);
            close(fd);
            log->first_seq = bases[i];
            break;
        }
    }
    if (log->syncs) {
        /* A crashed writer may have left pages unflushed in its last segments (it keeps at
         * most 8 rolled ones waiting for a sync): flush them before counting them synced. */
        for (int64_t i = n > 9 ? n - 9 : 0; i < n; i++) {
            char *path = segment_path(dir, bases[i]);
            int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
            if (fd >= 0) {
                fdatasync(fd);
                close(fd);
            }
            free(path);
        }
    }
    free(bases);
    log->synced_seq = log->next_seq - 1;
    return SHMQ_LOG_OK;
}

void shmq_log_close(shmq_log *log)
{
    if (log->map)
        munmap(log->map, log->map_size);
    if (log->fd >= 0)
        close(log->fd);
    for (int i = 0; i < log->npending; i++)
        close(log->pending_fds[i]);
    free(log->dir);
    free(log->seen.keys);
    free(log->seen.seqs);
    drop_check(log);
    memset(log, 0, sizeof *log);
    log->fd = -1;
}

/* Starts a new segment for a record of `need` bytes; the old one is synced later. */
static int roll(shmq_log *log, uint64_t need)
{
    uint64_t size = log->segment_size;
    if (SHMQ_LOG_HEADER + need + 8 > size)
        size = align8(SHMQ_LOG_HEADER + need + 8); /* a record larger than a segment gets its own */
    if (log->npending == (int)(sizeof log->pending_fds / sizeof *log->pending_fds)) {
        /* Rolling faster than syncs run (tiny segments): flush the oldest here. */
        fdatasync(log->pending_fds[0]);
        close(log->pending_fds[0]);
        memmove(log->pending_fds, log->pending_fds + 1, sizeof *log->pending_fds * (size_t)--log->npending);
    }
    int old_fd = log->fd;
    uint8_t *old_map = log->map;
    uint64_t old_size = log->map_size;
    if (create_segment(log, log->next_seq, size) < 0)
        return -1;
    if (old_map) {
        munmap(old_map, old_size);
        if (log->syncs && log->synced_seq + 1 < log->base_seq)
            log->pending_fds[log->npending++] = old_fd;
        else
            close(old_fd);
    }
    return 0;
}

int shmq_log_append(shmq_log *log, const uint8_t *body, uint32_t len, int message, uint64_t *seq)
{
    uint64_t need = SHMQ_REC_HEADER + (uint64_t)len;
    if (need > UINT32_MAX)
        return SHMQ_LOG_BAD;
    if (!log->map || log->pos + align8(need) > log->map_size) {
        if (roll(log, need) < 0)
            return SHMQ_LOG_ERR;
    }
    uint8_t *rec = log->map + log->pos;
    uint64_t now = now_realtime();
    if (now < log->last_time_ns)
        now = log->last_time_ns; /* time never goes back inside a log: replay by time bisects on it */
    wr64(rec + 8, log->next_seq);
    wr64(rec + 16, now);
    memcpy(rec + SHMQ_REC_HEADER, body, len);
    if (message && len >= 40) {
        /* bus.h: u32 topic_id at 0 (the publisher's own number: meaningless here), u32 flags
         * at 12, u64 log_seq at 32 */
        wr32(rec + SHMQ_REC_HEADER, 0);
        wr32(rec + SHMQ_REC_HEADER + 12, 0);
        wr64(rec + SHMQ_REC_HEADER + 32, log->next_seq);
    }
    log->last_body = rec + SHMQ_REC_HEADER;
    wr32(rec + 4, log->checksums ? shmq_crc32c(0, rec + 8, need - 8) : 0);
    /* SYNC: release pairs with load_length()'s acquire in readers elsewhere:
     * whoever sees the length sees the record. */
    atomic_store_explicit((_Atomic uint32_t *)(void *)rec, (uint32_t)need, memory_order_release);
    log->pos += align8(need);
    log->last_time_ns = now;
    log->bytes_appended += need;
    *seq = log->next_seq++;
    return SHMQ_LOG_OK;
}

void shmq_log_destroy(shmq_log *log)
{
    char *dir = log->dir ? strdup(log->dir) : NULL;
    shmq_log_close(log);
    if (!dir)
        return;
    uint64_t *bases;
    int64_t n = shmq_log_segments(dir, &bases);
    for (int64_t i = 0; i < n; i++) {
        char *path = segment_path(dir, bases[i]);
        if (path)
            unlink(path);
        free(path);
    }
    free(bases);
    rmdir(dir);
    free(dir);
}

int shmq_log_sync_prepare(shmq_log *log, shmq_log_sync *s)
{
    s->nfds = 0;
    s->error = 0;
    s->upto = log->next_seq - 1;
    if (s->upto <= log->synced_seq)
        return 0;
    for (int i = 0; i < log->npending; i++)
        s->fds[s->nfds++] = log->pending_fds[i]; /* ownership moves to s */
    log->npending = 0;
    if (log->fd >= 0) {
        int fd = dup(log->fd); /* the writer may roll and close its own meanwhile */
        if (fd >= 0)
            s->fds[s->nfds++] = fd;
        else
            s->error = errno;
    }
    return s->nfds;
}

int shmq_log_sync_run(shmq_log_sync *s)
{
    for (int i = 0; i < s->nfds; i++) {
        if (fdatasync(s->fds[i]) < 0 && !s->error)
            s->error = errno;
        close(s->fds[i]);
    }
    s->nfds = 0;
    return s->error ? -1 : 0;
}

void shmq_log_sync_finish(shmq_log *log, shmq_log_sync *s)
{
    if (s->error) {
        log->error = s->error;
        log->error_what = "sync the log";
        return;
    }
    if (s->upto > log->synced_seq)
        log->synced_seq = s->upto;
}

int shmq_log_remove_before(shmq_log *log, uint64_t seq)
{
    uint64_t *bases;
    int64_t n = shmq_log_segments(log->dir, &bases);
    if (n < 0)
        return -1;
    int removed = 0;
    drop_check(log); /* (it may map a segment about to go) */
    /* Segment i holds seqs bases[i] .. bases[i+1]-1: it may go when bases[i+1] <= seq. */
    for (int64_t i = 0; i + 1 < n; i++) {
        if (bases[i + 1] > seq || bases[i] == log->base_seq)
            break;
        char *path = segment_path(log->dir, bases[i]);
        if (path && unlink(path) == 0)
            removed++;
        free(path);
        log->first_seq = bases[i + 1];
    }
    free(bases);
    return removed;
}

/* ------------------------------------------------------------------ */
/* Cursors                                                             */
/* ------------------------------------------------------------------ */

static void cursor_unmap(shmq_log_cursor *c)
{
    c->walked_seq = 0;
    c->end_checked = 0;
    if (c->map)
        munmap(c->map, c->map_size);
    if (c->fd >= 0)
        close(c->fd);
    c->map = NULL;
    c->fd = -1;
    c->base_seq = 0;
}

/* Maps the segment holding `seq`, or the first one after it (retention may have removed it).
 * Returns 0, or SHMQ_LOG_END if there is none yet. */
static int cursor_seek_segment(shmq_log_cursor *c, uint64_t seq)
{
    uint64_t *bases;
    int64_t n = shmq_log_segments(c->dir, &bases);
    if (n < 0) {
        c->error = errno;
        c->error_what = "list the log directory";
        return SHMQ_LOG_ERR;
    }
    int rc = SHMQ_LOG_END;
    int64_t pick = -1;
    for (int64_t i = 0; i < n; i++)
        if (bases[i] <= seq)
            pick = i;
    if (pick < 0 && n > 0)
        pick = 0;
    for (; pick >= 0 && pick < n; pick++) {
        int fd;
        uint8_t *map;
        uint64_t size;
        if (map_segment(c->dir, bases[pick], 0, &fd, &map, &size) < 0) {
            if (errno == ENOENT)
                continue; /* removed meanwhile */
            if (errno == EBADMSG) {
                note_damage(c->damage, &c->ndamage, bases[pick], 0, 0, 0);
                continue;
            }
            c->error = errno;
            c->error_what = "open a segment";
            rc = SHMQ_LOG_ERR;
            break;
        }
        cursor_unmap(c);
        c->fd = fd;
        c->map = map;
        c->map_size = size;
        c->base_seq = bases[pick];
        c->pos = SHMQ_LOG_HEADER;
        if (bases[pick] > c->next_seq) {
            c->skipped += bases[pick] - c->next_seq;
            c->next_seq = bases[pick];
        }
        rc = SHMQ_LOG_OK;
        break;
    }
    free(bases);
    return rc;
}

/* The seq of the segment after the mapped one, if one exists (0 if not). */
static uint64_t next_segment(shmq_log_cursor *c)
{
    uint64_t *bases;
    int64_t n = shmq_log_segments(c->dir, &bases);
    uint64_t next = 0;
    for (int64_t i = 0; i < n; i++)
        if (bases[i] > c->base_seq) {
            next = bases[i];
            break;
        }
    free(bases);
    return next;
}

int shmq_log_cursor_next(shmq_log_cursor *c, uint64_t limit, shmq_log_record *r)
{
    for (;;) {
        if (limit && c->next_seq >= limit)
            return SHMQ_LOG_END;
        if (!c->map) {
            int rc = cursor_seek_segment(c, c->next_seq);
            if (rc != SHMQ_LOG_OK)
                return rc;
        }
        uint64_t at = c->pos;
        uint32_t len = at + SHMQ_REC_HEADER <= c->map_size ? load_length(c->map, at) : 0;
        if (len == 0) {
            /* The end of this segment's records: go on to the next segment once it exists. */
            uint64_t next = next_segment(c);
            /* A zeroed length word must not hide good records after it (the writer only ever
             * writes at the end, so a good record beyond a zero length is a hole). Searched once
             * per position: a reader tailing the active segment does not rescan its free space. */
            uint64_t good = 0;
            if (c->end_checked != at) {
                good = resync(c->map, c->map_size, at, c->checksums,
                              c->walked_seq ? c->walked_seq : c->base_seq - 1);
                c->end_checked = good ? 0 : at;
            }
            if (!next && !good)
                return SHMQ_LOG_END;
            if (good) {
                note_damage(c->damage, &c->ndamage, c->base_seq, at, good - at, 0);
                c->damaged_bytes += good - at;
                c->pos = good;
                continue;
            }
            if (limit && next > limit)
                return SHMQ_LOG_END;
            uint64_t keep = c->next_seq;
            cursor_unmap(c);
            c->next_seq = keep;
            if (next > c->next_seq) {
                c->skipped += next - c->next_seq;
                c->next_seq = next;
            }
            int rc = cursor_seek_segment(c, next);
            if (rc != SHMQ_LOG_OK)
                return rc;
            continue;
        }
        if (!record_ok(c->map, c->map_size, at, c->checksums, 0)) {
            /* (after the last record walked past, not where reading starts: records between
             * them are good ones this cursor skips, not damage) */
            uint64_t after = c->walked_seq ? c->walked_seq : c->base_seq - 1;
            uint64_t next = resync(c->map, c->map_size, at, c->checksums, after);
            uint64_t end = next ? next : c->map_size;
            /* A tailing reader meets a damaged last record on every call: note it once. */
            shmq_log_damage *last = c->ndamage ? &c->damage[c->ndamage - 1] : NULL;
            if (!last || last->segment != c->base_seq || last->offset != at) {
                note_damage(c->damage, &c->ndamage, c->base_seq, at, end - at, !next);
                c->damaged_bytes += end - at;
            }
            if (!next) {
                /* Nothing good in the rest of this segment: go on from the next one. */
                uint64_t following = next_segment(c);
                if (!following)
                    return SHMQ_LOG_END;
                cursor_unmap(c);
                c->skipped += following > c->next_seq ? following - c->next_seq : 0;
                c->next_seq = following;
                continue;
            }
            uint64_t seq = rd64(c->map + next + 8);
            if (seq > c->next_seq) { /* (walking to a later start, the records are not ours anyway) */
                c->skipped += seq - c->next_seq;
                c->next_seq = seq;
            }
            c->pos = next;
            continue;
        }
        uint64_t seq = rd64(c->map + at + 8);
        if (seq < c->next_seq) {
            /* Before where we start (the first record wanted is further on). */
            c->walked_seq = seq;
            c->pos = at + align8(len);
            continue;
        }
        if (limit && seq >= limit)
            return SHMQ_LOG_END;
        r->seq = seq;
        r->time_ns = rd64(c->map + at + 16);
        r->body = c->map + at + SHMQ_REC_HEADER;
        r->len = len - SHMQ_REC_HEADER;
        r->segment = c->base_seq;
        r->offset = at;
        return SHMQ_LOG_OK;
    }
}

void shmq_log_cursor_advance(shmq_log_cursor *c, const shmq_log_record *r)
{
    c->pos = r->offset + align8(SHMQ_REC_HEADER + (uint64_t)r->len);
    c->walked_seq = r->seq;
    if (r->seq > c->next_seq)
        c->skipped += r->seq - c->next_seq;
    c->next_seq = r->seq + 1;
}

/* Time of the first record of a segment (0 if it has none). */
static uint64_t first_time(const char *dir, uint64_t base, int checksums)
{
    int fd;
    uint8_t *map;
    uint64_t size, t = 0;
    if (map_segment(dir, base, 0, &fd, &map, &size) < 0)
        return 0;
    if (record_ok(map, size, SHMQ_LOG_HEADER, checksums, 0))
        t = rd64(map + SHMQ_LOG_HEADER + 16);
    munmap(map, size);
    close(fd);
    return t;
}

int shmq_log_cursor_open(shmq_log_cursor *c, const char *dir, int checksums, int kind, uint64_t at)
{
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->checksums = checksums;
    c->dir = strdup(dir);
    if (!c->dir)
        return SHMQ_LOG_ERR;
    struct stat st;
    int bad = stat(dir, &st) < 0 ? errno : !S_ISDIR(st.st_mode) ? ENOTDIR : 0;
    if (bad) {
        c->error = bad;
        c->error_what = "open the log directory";
        return SHMQ_LOG_ERR;
    }
    if (kind == SHMQ_START_SEQ) {
        c->next_seq = at ? at : 1;
        return SHMQ_LOG_OK;
    }
    /* By time: start in the last segment whose first record is not later, then walk. */
    uint64_t *bases;
    int64_t n = shmq_log_segments(dir, &bases);
    if (n < 0) {
        c->error = errno;
        c->error_what = "list the log directory";
        return SHMQ_LOG_ERR;
    }
    uint64_t start = n ? bases[0] : 1;
    for (int64_t i = 0; i < n; i++) {
        uint64_t t = first_time(dir, bases[i], checksums);
        if (t && t <= at)
            start = bases[i];
        else if (t > at)
            break;
    }
    free(bases);
    c->next_seq = start;
    shmq_log_record r;
    for (;;) {
        int rc = shmq_log_cursor_next(c, 0, &r);
        if (rc != SHMQ_LOG_OK)
            return rc == SHMQ_LOG_END ? SHMQ_LOG_OK : rc; /* (at the end: starts with the next one) */
        if (r.time_ns >= at)
            return SHMQ_LOG_OK;
        shmq_log_cursor_advance(c, &r);
    }
}

void shmq_log_cursor_close(shmq_log_cursor *c)
{
    cursor_unmap(c);
    free(c->dir);
    c->dir = NULL;
}

int shmq_log_segment_scan(const char *path, int checksums, shmq_log_segment_info *info,
                          shmq_log_damage *damage, uint32_t *ndamage)
{
    memset(info, 0, sizeof *info);
    *ndamage = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return SHMQ_LOG_ERR;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return SHMQ_LOG_ERR;
    }
    info->size = (uint64_t)st.st_size;
    if (info->size < SHMQ_LOG_HEADER) {
        close(fd);
        info->bad_header = 1;
        return SHMQ_LOG_OK;
    }
    uint8_t *map = mmap(NULL, info->size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return SHMQ_LOG_ERR;
    uint64_t size = info->size;
    if (rd64(map) != SHMQ_LOG_MAGIC || rd32(map + 8) != SHMQ_LOG_VERSION || rd32(map + 12) != SHMQ_LOG_HEADER ||
        rd64(map + 24) > size) {
        info->bad_header = 1;
        munmap(map, info->size);
        return SHMQ_LOG_OK;
    }
    info->base_seq = rd64(map + 16);
    size = rd64(map + 24);
    uint64_t at = SHMQ_LOG_HEADER, last = info->base_seq ? info->base_seq - 1 : 0;
    while (at + SHMQ_REC_HEADER <= size) {
        uint32_t len = load_length(map, at);
        if (len == 0 && !resync(map, size, at, checksums, last))
            break;
        if (!record_ok(map, size, at, checksums, 0)) {
            uint64_t next = resync(map, size, at, checksums, last);
            uint64_t end = next ? next : size;
            note_damage(damage, ndamage, info->base_seq, at, end - at, !next);
            info->damaged_records++;
            info->damaged_bytes += end - at;
            if (!next)
                break;
            at = next;
            continue;
        }
        uint64_t seq = rd64(map + at + 8), t = rd64(map + at + 16);
        if (!info->records) {
            info->first_seq = seq;
            info->first_time = t;
        }
        info->records++;
        info->last_seq = last = seq;
        info->last_time = t;
        at += align8(len);
    }
    info->used = at;
    munmap(map, info->size);
    return SHMQ_LOG_OK;
}
