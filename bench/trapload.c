/*
 * trapload.c - a stand-in for Avatar's EL2 stub that posts register accesses
 * to the trap page as fast as the model answers them, and times each one.
 *
 *   trapload PAGE DOORBELL_FIFO VM SLOT COUNT WARMUP GAP_NS OP [OP ...]
 *
 * PAGE is the trap page file (already initialised by the stub side and
 * attached by a model); DOORBELL_FIFO is where a ring goes (a 4-byte count,
 * as the kernel hands one to a UIO reader) when the model sleeps. Each OP is
 * rADDR (4-byte read) or wADDR=VALUE (4-byte write), addresses and values in
 * hex; the OPs are posted round-robin, WARMUP untimed then COUNT timed.
 * GAP_NS > 0 spins that long between one answer and the next post (the
 * guest running between traps), long enough for a model to fall asleep.
 *
 * The protocol is the stub's side of docs/trap-abi.md: write the slot
 * fields, state = POSTED (store-release), full fence, ring if model_sleeping;
 * spin until state == DONE (load-acquire), read data/status, state = FREE
 * (store-release). Every trap is timed from just before POSTED to just after
 * DONE was seen with CLOCK_MONOTONIC; the result is one JSON object on
 * stdout with the rate and the latency percentiles (nanoseconds).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "avatar_trap.h"
#include "spin.h"

struct op {
    avt_u64 gpa;
    avt_u64 value;
    int is_write;
};

static avt_u64 now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (avt_u64)ts.tv_sec * 1000000000ull + (avt_u64)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "trapload: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int parse_op(const char *text, struct op *op)
{
    char *end;
    if (text[0] != 'r' && text[0] != 'w')
        return -1;
    op->is_write = text[0] == 'w';
    op->gpa = strtoull(text + 1, &end, 16);
    op->value = 0;
    if (op->is_write) {
        if (*end != '=')
            return -1;
        op->value = strtoull(end + 1, &end, 16);
    }
    return *end == '\0' ? 0 : -1;
}

static int compare_u64(const void *a, const void *b)
{
    avt_u64 x = *(const avt_u64 *)a, y = *(const avt_u64 *)b;
    return (x > y) - (x < y);
}

static avt_u64 percentile(const avt_u64 *sorted, long n, double p)
{
    long index = (long)(p * (double)n);
    return sorted[index >= n ? n - 1 : index];
}

int main(int argc, char **argv)
{
    if (argc < 9) {
        fprintf(stderr, "usage: trapload PAGE DOORBELL_FIFO VM SLOT COUNT WARMUP GAP_NS "
                        "OP [OP ...]\n");
        return 2;
    }
    int page_fd = open(argv[1], O_RDWR);
    if (page_fd < 0)
        die(argv[1]);
    void *map = mmap(NULL, AVT_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, page_fd, 0);
    if (map == MAP_FAILED)
        die("mmap of the trap page");
    int bell = open(argv[2], O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (bell < 0)
        die(argv[2]);
    unsigned vm = (unsigned)strtoul(argv[3], NULL, 0);
    unsigned index = (unsigned)strtoul(argv[4], NULL, 0);
    long count = strtol(argv[5], NULL, 0), warmup = strtol(argv[6], NULL, 0);
    avt_u64 gap = strtoull(argv[7], NULL, 0);
    int n_ops = argc - 8;
    struct op *ops = calloc((size_t)n_ops, sizeof *ops);
    avt_u64 *lat = malloc(sizeof *lat * (size_t)(count > 0 ? count : 1));
    if (!ops || !lat || count <= 0)
        return 2;
    for (int i = 0; i < n_ops; i++) {
        if (parse_op(argv[8 + i], &ops[i]) < 0) {
            fprintf(stderr, "trapload: bad op %s (rADDR or wADDR=VALUE, hex)\n", argv[8 + i]);
            return 2;
        }
    }

    struct avt_header *header = map;
    if (header->magic != AVT_MAGIC || index >= header->slot_count) {
        fprintf(stderr, "trapload: %s is not an initialised trap page with slot %u\n",
                argv[1], index);
        return 2;
    }
    if (__atomic_load_n(&header->model_state, __ATOMIC_ACQUIRE) != AVT_MODEL_ATTACHED) {
        fprintf(stderr, "trapload: no model attached to %s\n", argv[1]);
        return 2;
    }
    struct avt_slot *slot = (struct avt_slot *)((char *)map + AVT_SLOTS_OFFSET) + index;

    avt_u32 seq = slot->seq, rings = 0, unhandled = 0;
    avt_u64 started = 0, check = 0;
    for (long i = -warmup; i < count; i++) {
        const struct op *op = &ops[(i + warmup) % n_ops];
        if (i == 0)
            started = now_ns();
        slot->seq = ++seq;
        slot->gpa = op->gpa;
        slot->data = op->value;
        slot->size = 4;
        slot->direction = op->is_write ? AVT_DIR_WRITE : AVT_DIR_READ;
        slot->status = AVT_STATUS_OK;
        slot->flags = 0;
        slot->vm_id = (avt_u16)vm;
        slot->vcpu_id = (avt_u16)index;
        avt_u64 t0 = now_ns();
        slot->t_post = t0;
        __atomic_store_n(&slot->state, AVT_SLOT_POSTED, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&header->model_sleeping, __ATOMIC_RELAXED)) {
            avt_u32 ring = ++rings;
            if (write(bell, &ring, sizeof ring) < 0 && errno != EAGAIN)
                die("doorbell write");
        }
        while (__atomic_load_n(&slot->state, __ATOMIC_ACQUIRE) != AVT_SLOT_DONE)
            cpu_relax();
        avt_u64 t1 = now_ns();
        slot->t_done = t1;
        if (slot->status != AVT_STATUS_OK)
            unhandled++;
        check += slot->data;
        __atomic_store_n(&slot->state, AVT_SLOT_FREE, __ATOMIC_RELEASE);
        if (i >= 0)
            lat[i] = t1 - t0;
        while (gap && now_ns() - t1 < gap)
            cpu_relax();
    }
    avt_u64 elapsed = now_ns() - started;

    qsort(lat, (size_t)count, sizeof *lat, compare_u64);
    double sum = 0;
    for (long i = 0; i < count; i++)
        sum += (double)lat[i];
    printf("{\"count\": %ld, \"elapsed_ns\": %llu, \"traps_per_s\": %.1f, \"mean_ns\": %.1f, "
           "\"p50_ns\": %llu, \"p90_ns\": %llu, \"p99_ns\": %llu, \"p999_ns\": %llu, "
           "\"min_ns\": %llu, \"max_ns\": %llu, \"rings\": %u, \"unhandled\": %u, "
           "\"read_sum\": %llu}\n",
           count, elapsed, (double)count * 1e9 / (double)elapsed, sum / (double)count,
           percentile(lat, count, 0.50), percentile(lat, count, 0.90),
           percentile(lat, count, 0.99), percentile(lat, count, 0.999), lat[0],
           lat[count - 1], rings, unhandled, check);
    return 0;
}
