/*
 * shmq latency histogram: an HDR histogram (the bucket layout of HdrHistogram, so its percentiles
 * match that library's to the same precision) over a block of memory the caller provides, which
 * may be shared between processes: recording is a few atomic adds, constant time, no allocation.
 *
 * Why not the hdrhistogram package: its record_value is pure Python, 1.3 us per sample measured
 * here, more than a shmq receive; this records in a few ns, and lives in shared memory so another
 * process can read it while it fills.
 *
 * Block layout (little-endian):
 *   0   u64 magic "SHMQHIST"      stored last by shmq_hist_init (release)
 *   8   u32 version (1)           12 u32 significant figures (1..5)
 *   16  u64 highest trackable value (ns)
 *   24  u64 counts_len
 *   32  u64 total count           40 u64 min (UINT64_MAX while empty)
 *   48  u64 max                   56 u64 sum of recorded values (for the mean)
 *   64  u64 creator pid           72 u64 created, ns since the epoch (for shmq ls / gc)
 *   128 u64 counts[counts_len]
 * Values below 1 are recorded as 1; values above the highest as the highest (and counted in
 * `clamped`, process-local in the handle).
 */
#ifndef SHMQ_HIST_H
#define SHMQ_HIST_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define SHMQ_HIST_MAGIC 0x54534948514D4853ull /* "SHMQHIST" */
#define SHMQ_HIST_VERSION 1u
#define SHMQ_HIST_HEADER 128u

typedef struct shmq_hist {
    uint8_t *base;
    _Atomic uint64_t *counts;
    uint64_t counts_len;
    uint64_t highest;
    uint32_t significant_figures;
    int32_t sub_bucket_half_count_magnitude;
    int64_t sub_bucket_half_count;
    uint64_t sub_bucket_mask;
    int64_t sub_bucket_count;
} shmq_hist;

/* Bytes a block needs for these parameters; 0 if they are out of range. */
uint64_t shmq_hist_size(uint64_t highest, uint32_t significant_figures);
/* Formats a zeroed block of shmq_hist_size() bytes. */
int shmq_hist_init(uint8_t *base, uint64_t size, uint64_t highest, uint32_t significant_figures,
                   uint64_t creator_pid, uint64_t created_ns);
/* Attaches to a formatted block: 0 on success, -1 if it is not one (or does not fit `size`). */
int shmq_hist_attach(shmq_hist *h, uint8_t *base, uint64_t size);

/* Records `count` samples of `value`; returns 1 if the value was above the highest (clamped). */
int shmq_hist_record(shmq_hist *h, uint64_t value, uint64_t count);
/* The smallest recorded value v such that `percentile` % of the samples are <= v (to the
 * histogram's precision: the highest value equivalent to v's bucket); 0 when empty. */
uint64_t shmq_hist_percentile(const shmq_hist *h, double percentile);
/* Adds every count of `src` (same parameters) into `dst`. -1 if their parameters differ. */
int shmq_hist_add(shmq_hist *dst, const shmq_hist *src);
void shmq_hist_reset(shmq_hist *h);
uint64_t shmq_hist_total(const shmq_hist *h);
uint64_t shmq_hist_min(const shmq_hist *h);
uint64_t shmq_hist_max(const shmq_hist *h);
uint64_t shmq_hist_sum(const shmq_hist *h);
/* The lowest and highest values that land in the same bucket as `value`. */
uint64_t shmq_hist_lowest_equivalent(const shmq_hist *h, uint64_t value);
uint64_t shmq_hist_highest_equivalent(const shmq_hist *h, uint64_t value);

#endif /* SHMQ_HIST_H */
