/*
 * C reference for benchmarks/bench_queue.py: the round-trip floor without Python.
 *
 * Two processes (fork) share one anonymous MAP_SHARED mapping, so nothing is
 * left in /dev/shm whatever happens; the child dies with its parent
 * (PR_SET_PDEATHSIG). The parent sends a 64-byte message, the child echoes it,
 * and the parent times every round trip with clock_gettime(CLOCK_MONOTONIC)
 * (vDSO; the ~20 ns of two clock reads are included, as perf_counter_ns is in
 * the Python numbers).
 *
 * Modes (argv[1]):
 *   spin   two shmq spsc rings formatted by shmq_format(); each side sends with
 *          shmq_claim / shmq_place / memcpy / shmq_commit and receives with
 *          shmq_wait(SHMQ_WAIT_SPIN) + shmq_read / shmq_next / memcpy / shmq_release.
 *          Both processes busy-poll: two spinning processes.
 *   block  the same, but waiting with shmq_wait(SHMQ_WAIT_BLOCK) (futex sleep).
 *   futex  no ring: one shared 32-bit word, each hand-off is a store, a
 *          FUTEX_WAKE and a FUTEX_WAIT. The cost of a kernel wake-up hand-off,
 *          i.e. the floor of any blocking queue.
 *
 * Usage: c_pingpong MODE ROUND_TRIPS WARMUP [free|pin|split]
 *   free (default): the scheduler places the two processes; pin: both on CPU 0;
 *   split: parent on CPU 0, child on CPU 1 (sched_setaffinity).
 * Prints one JSON object: mode, placement, n, warmup, and min/p50/p99/p999/max/mean in ns.
 * Build: gcc -O2 -std=c11 -I shmq/_native c_pingpong.c shmq/_native/ring.c
 */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MSG_SIZE 64
#define CAPACITY (1u << 16)
#define SEGMENT (SHMQ_HEADER_SIZE + CAPACITY)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what, int code)
{
    fprintf(stderr, "c_pingpong: %s failed (%d)\n", what, code);
    exit(2);
}

static void pin_to_cpu(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        die("sched_setaffinity", errno);
}

/* ---------------------------------------------------------------- ring */

static void ring_send(shmq_ring *r, const uint8_t *msg)
{
    uint64_t length = MSG_SIZE;
    shmq_span span;
    int rc = shmq_claim(r, &length, 1, &span); /* ping-pong: never full */
    if (rc != SHMQ_OK)
        die("shmq_claim", rc);
    uint64_t pos = span.start;
    uint8_t *dst = shmq_place(r, &pos, MSG_SIZE);
    memcpy(dst, msg, MSG_SIZE);
    shmq_commit(r, &span);
}

static void ring_recv(shmq_ring *r, int strategy, uint8_t *out)
{
    shmq_span span;
    for (;;) {
        int rc = shmq_read(r, 1, MSG_SIZE, &span);
        if (rc == SHMQ_OK)
            break;
        if (rc != SHMQ_EMPTY)
            die("shmq_read", rc);
        rc = shmq_wait(r, SHMQ_READABLE, 0, strategy, -1, 0);
        if (rc != SHMQ_OK && rc != SHMQ_INTERRUPTED)
            die("shmq_wait", rc);
    }
    uint64_t pos = span.start;
    uint32_t length;
    const uint8_t *src = shmq_next(r, &pos, span.end, &length);
    if (!src || length != MSG_SIZE)
        die("shmq_next", (int)length);
    memcpy(out, src, MSG_SIZE);
    shmq_release(r, &span);
}

/* --------------------------------------------------------------- futex */

static long futex(_Atomic uint32_t *word, int op, uint32_t val)
{
    return syscall(SYS_futex, (uint32_t *)word, op, val, NULL, NULL, 0);
}

/* The word counts hand-offs: odd = the child's turn, even = the parent's. */
static void futex_pass(_Atomic uint32_t *word, uint32_t to)
{
    atomic_store_explicit(word, to, memory_order_release);
    futex(word, FUTEX_WAKE, INT_MAX);
}

static void futex_await(_Atomic uint32_t *word, uint32_t want)
{
    for (;;) {
        uint32_t seen = atomic_load_explicit(word, memory_order_acquire);
        if (seen == want)
            return;
        futex(word, FUTEX_WAIT, seen);
    }
}

/* ---------------------------------------------------------------- main */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile, the same rule bench_queue.py uses. */
static uint64_t pct(const uint64_t *sorted, size_t n, double q)
{
    size_t rank = (size_t)(q * (double)n + 0.999999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return sorted[rank - 1];
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s spin|block|futex ROUND_TRIPS WARMUP [pin]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    size_t n = strtoull(argv[2], NULL, 10), warm = strtoull(argv[3], NULL, 10);
    const char *placement = argc > 4 ? argv[4] : "free";
    int pinned = strcmp(placement, "pin") == 0, split = strcmp(placement, "split") == 0;
    int use_futex = strcmp(mode, "futex") == 0;
    int strategy = strcmp(mode, "block") == 0 ? SHMQ_WAIT_BLOCK : SHMQ_WAIT_SPIN;
    if (n == 0 || (!use_futex && strcmp(mode, "spin") && strcmp(mode, "block")) ||
        (!pinned && !split && strcmp(placement, "free"))) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }

    uint8_t *shared = mmap(NULL, 2 * SEGMENT, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        die("mmap", errno);
    uint8_t *seg_ab = shared, *seg_ba = shared + SEGMENT; /* parent->child, child->parent */
    _Atomic uint32_t *word = (_Atomic uint32_t *)shared;
    if (!use_futex) {
        int rc = shmq_format(seg_ab, SEGMENT, SHMQ_SPSC, CAPACITY, (uint64_t)getpid(), 0);
        if (rc == SHMQ_OK)
            rc = shmq_format(seg_ba, SEGMENT, SHMQ_SPSC, CAPACITY, (uint64_t)getpid(), 0);
        if (rc != SHMQ_OK)
            die("shmq_format", rc);
    }
    if (pinned || split)
        pin_to_cpu(0); /* inherited by the child */
    size_t total = warm + n;
    uint64_t *lat = malloc(n * sizeof(uint64_t));
    if (!lat)
        die("malloc", 0);
    uint8_t msg[MSG_SIZE], back[MSG_SIZE];
    memset(msg, 0xab, sizeof(msg));

    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        die("fork", errno);
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        if (split)
            pin_to_cpu(1);
        if (use_futex) {
            for (size_t i = 0; i < total; i++) {
                futex_await(word, (uint32_t)(2 * i + 1));
                futex_pass(word, (uint32_t)(2 * i + 2));
            }
        } else {
            shmq_ring in, out;
            if (shmq_attach(&in, seg_ab, SEGMENT) != SHMQ_OK || shmq_attach(&out, seg_ba, SEGMENT) != SHMQ_OK)
                _exit(3);
            for (size_t i = 0; i < total; i++) {
                ring_recv(&in, strategy, back);
                ring_send(&out, back);
            }
        }
        _exit(0);
    }

    shmq_ring out, in;
    if (!use_futex) {
        int rc = shmq_attach(&out, seg_ab, SEGMENT);
        if (rc == SHMQ_OK)
            rc = shmq_attach(&in, seg_ba, SEGMENT);
        if (rc != SHMQ_OK)
            die("shmq_attach", rc);
    }
    for (size_t i = 0; i < total; i++) {
        uint64_t t0 = now_ns();
        if (use_futex) {
            futex_pass(word, (uint32_t)(2 * i + 1));
            futex_await(word, (uint32_t)(2 * i + 2));
        } else {
            msg[0] = (uint8_t)i;
            ring_send(&out, msg);
            ring_recv(&in, strategy, back);
            if (back[0] != msg[0])
                die("echo check", back[0]);
        }
        uint64_t t1 = now_ns();
        if (i >= warm)
            lat[i - warm] = t1 - t0;
    }
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die("child", status);

    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += (double)lat[i];
    qsort(lat, n, sizeof(uint64_t), cmp_u64);
    printf("{\"mode\": \"%s\", \"placement\": \"%s\", \"n\": %zu, \"warmup\": %zu, \"min\": %llu, "
           "\"p50\": %llu, \"p99\": %llu, \"p999\": %llu, \"max\": %llu, \"mean\": %.1f}\n",
           mode, placement, n, warm, (unsigned long long)lat[0],
           (unsigned long long)pct(lat, n, 0.50), (unsigned long long)pct(lat, n, 0.99),
           (unsigned long long)pct(lat, n, 0.999), (unsigned long long)lat[n - 1], sum / (double)n);
    free(lat);
    munmap(shared, 2 * SEGMENT);
    return 0;
}
