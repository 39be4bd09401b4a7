/*
 * shmq latency histogram (see hist.h). The index arithmetic is HdrHistogram's, with the lowest
 * discernible value 1 (unit magnitude 0): a value's bucket is its power of two above the
 * sub-bucket range, its sub-bucket the top bits, so every value is kept to `significant
 * figures` decimal digits.
 *
 * Concurrency: any number of processes may record at once (relaxed atomic adds and CAS loops on
 * min and max: nothing else is ordered by these words). Readers load relaxed and get a
 * snapshot that may miss samples being recorded; percentiles are computed from the counts alone,
 * so they are consistent with each other.
 */
#include "hist.h"

#include <string.h>

#define RELAXED memory_order_relaxed
#define U64_AT(base, off) ((_Atomic uint64_t *)((base) + (off)))

enum { OFF_MAGIC = 0, OFF_VERSION = 8, OFF_SIGFIGS = 12, OFF_HIGHEST = 16, OFF_COUNTS_LEN = 24,
       OFF_TOTAL = 32, OFF_MIN = 40, OFF_MAX = 48, OFF_SUM = 56, OFF_CREATOR_PID = 64,
       OFF_CREATED_NS = 72 };

/* Layout parameters for `highest` and `sf`; counts_len 0 if out of range. */
static void layout(shmq_hist *h, uint64_t highest, uint32_t sf)
{
    memset(h, 0, sizeof(*h));
    if (sf < 1 || sf > 5 || highest < 2 || highest > (UINT64_MAX >> 2))
        return;
    uint64_t single_unit = 2;
    for (uint32_t i = 0; i < sf; i++)
        single_unit *= 10;
    int sub_bucket_count_magnitude = 0;
    while ((1ull << sub_bucket_count_magnitude) < single_unit)
        sub_bucket_count_magnitude++;
    int half_magnitude = (sub_bucket_count_magnitude > 1 ? sub_bucket_count_magnitude : 1) - 1;
    int64_t sub_bucket_count = 1ll << (half_magnitude + 1);
    uint64_t smallest_untrackable = (uint64_t)sub_bucket_count;
    uint64_t buckets = 1;
    while (smallest_untrackable <= highest) {
        if (smallest_untrackable > (UINT64_MAX >> 1)) {
            buckets++;
            break;
        }
        smallest_untrackable <<= 1;
        buckets++;
    }
    h->highest = highest;
    h->significant_figures = sf;
    h->sub_bucket_half_count_magnitude = half_magnitude;
    h->sub_bucket_count = sub_bucket_count;
    h->sub_bucket_half_count = sub_bucket_count / 2;
    h->sub_bucket_mask = (uint64_t)sub_bucket_count - 1;
    h->counts_len = (buckets + 1) * (uint64_t)(sub_bucket_count / 2);
}

uint64_t shmq_hist_size(uint64_t highest, uint32_t significant_figures)
{
    shmq_hist h;
    layout(&h, highest, significant_figures);
    return h.counts_len ? SHMQ_HIST_HEADER + 8 * h.counts_len : 0;
}

int shmq_hist_init(uint8_t *base, uint64_t size, uint64_t highest, uint32_t significant_figures,
                   uint64_t creator_pid, uint64_t created_ns)
{
    shmq_hist h;
    layout(&h, highest, significant_figures);
    if (!h.counts_len || size < SHMQ_HIST_HEADER + 8 * h.counts_len)
        return -1;
    *(uint32_t *)(base + OFF_VERSION) = SHMQ_HIST_VERSION;
    *(uint32_t *)(base + OFF_SIGFIGS) = significant_figures;
    *(uint64_t *)(base + OFF_HIGHEST) = highest;
    *(uint64_t *)(base + OFF_COUNTS_LEN) = h.counts_len;
    *(uint64_t *)(base + OFF_CREATOR_PID) = creator_pid;
    *(uint64_t *)(base + OFF_CREATED_NS) = created_ns;
    atomic_store_explicit(U64_AT(base, OFF_MIN), UINT64_MAX, RELAXED);
    /* SYNC: release pairs with the acquire load of the magic in shmq_hist_attach(). */
    atomic_store_explicit(U64_AT(base, OFF_MAGIC), SHMQ_HIST_MAGIC, memory_order_release);
    return 0;
}

int shmq_hist_attach(shmq_hist *h, uint8_t *base, uint64_t size)
{
    memset(h, 0, sizeof(*h));
    if (size < SHMQ_HIST_HEADER ||
        atomic_load_explicit(U64_AT(base, OFF_MAGIC), memory_order_acquire) != SHMQ_HIST_MAGIC ||
        *(uint32_t *)(base + OFF_VERSION) != SHMQ_HIST_VERSION)
        return -1;
    layout(h, *(uint64_t *)(base + OFF_HIGHEST), *(uint32_t *)(base + OFF_SIGFIGS));
    /* The block is untrusted: its stated length must be the one its parameters give. */
    if (!h->counts_len || *(uint64_t *)(base + OFF_COUNTS_LEN) != h->counts_len ||
        size < SHMQ_HIST_HEADER + 8 * h->counts_len) {
        h->counts_len = 0;
        return -1;
    }
    h->base = base;
    h->counts = U64_AT(base, SHMQ_HIST_HEADER);
    return 0;
}

static inline int bucket_of(const shmq_hist *h, uint64_t value)
{
    int pow2ceiling = 64 - __builtin_clzll(value | h->sub_bucket_mask);
    return pow2ceiling - (h->sub_bucket_half_count_magnitude + 1);
}

static inline uint64_t index_of(const shmq_hist *h, uint64_t value)
{
    int bucket = bucket_of(h, value);
    int64_t sub_bucket = (int64_t)(value >> bucket);
    return ((uint64_t)(bucket + 1) << h->sub_bucket_half_count_magnitude) +
           (uint64_t)(sub_bucket - h->sub_bucket_half_count);
}

static inline uint64_t value_at(const shmq_hist *h, uint64_t index)
{
    int64_t bucket = (int64_t)(index >> h->sub_bucket_half_count_magnitude) - 1;
    int64_t sub_bucket = (int64_t)(index & (uint64_t)(h->sub_bucket_half_count - 1)) + h->sub_bucket_half_count;
    if (bucket < 0) {
        sub_bucket -= h->sub_bucket_half_count;
        bucket = 0;
    }
    return (uint64_t)sub_bucket << bucket;
}

uint64_t shmq_hist_lowest_equivalent(const shmq_hist *h, uint64_t value)
{
    int bucket = bucket_of(h, value);
    return (value >> bucket) << bucket;
}

uint64_t shmq_hist_highest_equivalent(const shmq_hist *h, uint64_t value)
{
    int bucket = bucket_of(h, value);
    int64_t sub_bucket = (int64_t)(value >> bucket);
    int adjusted = sub_bucket >= h->sub_bucket_count ? bucket + 1 : bucket;
    return shmq_hist_lowest_equivalent(h, value) + (1ull << adjusted) - 1;
}

/* min and max under concurrent recorders: a CAS loop that only ever moves them outward. */
static inline void lower_to(_Atomic uint64_t *word, uint64_t value)
{
    uint64_t seen = atomic_load_explicit(word, RELAXED);
    while (value < seen && !atomic_compare_exchange_weak_explicit(word, &seen, value, RELAXED, RELAXED)) {
    }
}

static inline void raise_to(_Atomic uint64_t *word, uint64_t value)
{
    uint64_t seen = atomic_load_explicit(word, RELAXED);
    while (value > seen && !atomic_compare_exchange_weak_explicit(word, &seen, value, RELAXED, RELAXED)) {
    }
}

int shmq_hist_record(shmq_hist *h, uint64_t value, uint64_t count)
{
    int clamped = value > h->highest;
    if (clamped)
        value = h->highest;
    uint64_t index = index_of(h, value);
    if (index >= h->counts_len) /* (cannot happen for value <= highest; never write past the block) */
        index = h->counts_len - 1;
    atomic_fetch_add_explicit(&h->counts[index], count, RELAXED);
    atomic_fetch_add_explicit(U64_AT(h->base, OFF_TOTAL), count, RELAXED);
    atomic_fetch_add_explicit(U64_AT(h->base, OFF_SUM), value * count, RELAXED);
    lower_to(U64_AT(h->base, OFF_MIN), value);
    raise_to(U64_AT(h->base, OFF_MAX), value);
    return clamped;
}

uint64_t shmq_hist_percentile(const shmq_hist *h, double percentile)
{
    uint64_t total = 0;
    for (uint64_t i = 0; i < h->counts_len; i++)
        total += atomic_load_explicit(&h->counts[i], RELAXED);
    if (total == 0)
        return 0;
    if (percentile < 0)
        percentile = 0;
    if (percentile > 100)
        percentile = 100;
    /* HdrHistogram's rounding: the sample count at the percentile, at least 1. */
    uint64_t target = (uint64_t)(percentile * (double)total / 100.0 + 0.5);
    if (target < 1)
        target = 1;
    uint64_t running = 0;
    for (uint64_t i = 0; i < h->counts_len; i++) {
        running += atomic_load_explicit(&h->counts[i], RELAXED);
        if (running >= target) {
            uint64_t v = value_at(h, i);
            return percentile > 0 ? shmq_hist_highest_equivalent(h, v) : shmq_hist_lowest_equivalent(h, v);
        }
    }
    return shmq_hist_highest_equivalent(h, value_at(h, h->counts_len - 1));
}

int shmq_hist_add(shmq_hist *dst, const shmq_hist *src)
{
    if (dst->highest != src->highest || dst->significant_figures != src->significant_figures)
        return -1;
    for (uint64_t i = 0; i < src->counts_len; i++) {
        uint64_t c = atomic_load_explicit(&src->counts[i], RELAXED);
        if (c)
            atomic_fetch_add_explicit(&dst->counts[i], c, RELAXED);
    }
    atomic_fetch_add_explicit(U64_AT(dst->base, OFF_TOTAL), shmq_hist_total(src), RELAXED);
    atomic_fetch_add_explicit(U64_AT(dst->base, OFF_SUM), shmq_hist_sum(src), RELAXED);
    lower_to(U64_AT(dst->base, OFF_MIN), shmq_hist_min(src));
    raise_to(U64_AT(dst->base, OFF_MAX), shmq_hist_max(src));
    return 0;
}

void shmq_hist_reset(shmq_hist *h)
{
    for (uint64_t i = 0; i < h->counts_len; i++)
        atomic_store_explicit(&h->counts[i], 0, RELAXED);
    atomic_store_explicit(U64_AT(h->base, OFF_TOTAL), 0, RELAXED);
    atomic_store_explicit(U64_AT(h->base, OFF_SUM), 0, RELAXED);
    atomic_store_explicit(U64_AT(h->base, OFF_MIN), UINT64_MAX, RELAXED);
    atomic_store_explicit(U64_AT(h->base, OFF_MAX), 0, RELAXED);
}

uint64_t shmq_hist_total(const shmq_hist *h) { return atomic_load_explicit(U64_AT(h->base, OFF_TOTAL), RELAXED); }
uint64_t shmq_hist_min(const shmq_hist *h) { return atomic_load_explicit(U64_AT(h->base, OFF_MIN), RELAXED); }
uint64_t shmq_hist_max(const shmq_hist *h) { return atomic_load_explicit(U64_AT(h->base, OFF_MAX), RELAXED); }
uint64_t shmq_hist_sum(const shmq_hist *h) { return atomic_load_explicit(U64_AT(h->base, OFF_SUM), RELAXED); }
