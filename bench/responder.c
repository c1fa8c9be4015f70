/*
 * responder.c - the least a model can do on the trap page: the floor that
 * avatar-hw's trap path is measured against.
 *
 *   responder PAGE DOORBELL_FIFO poll|doorbell
 *
 * Attaches to the initialised trap page PAGE (model_state = ATTACHED with a
 * store-release) and answers every POSTED slot: a read gets a constant, a
 * write is acknowledged, state = DONE (store-release). In "poll" mode it spins
 * on the slots; in "doorbell" mode it sleeps in read() on DOORBELL_FIFO with
 * the model's side of the notification handshake (model_sleeping = 1, full
 * fence, re-scan every slot, then block), exactly as avatar_hw.trap does.
 * SIGTERM/SIGINT: answer what is posted, publish DETACHED, exit 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "avatar_trap.h"
#include "spin.h"

#define READ_ANSWER 0x74726976u   /* "virt": what a MagicValue read returns */

static volatile sig_atomic_t stopping;

static void on_signal(int signum)
{
    (void)signum;
    stopping = 1;
}

static int serve_posted(struct avt_slot *slots, unsigned count)
{
    int served = 0;
    for (unsigned i = 0; i < count; i++) {
        struct avt_slot *slot = &slots[i];
        if (__atomic_load_n(&slot->state, __ATOMIC_ACQUIRE) != AVT_SLOT_POSTED)
            continue;
        if (slot->direction == AVT_DIR_READ)
            slot->data = READ_ANSWER;
        slot->status = AVT_STATUS_OK;
        __atomic_store_n(&slot->state,
                         (slot->flags & AVT_SLOT_F_POSTED_WRITE) && slot->direction == AVT_DIR_WRITE
                             ? AVT_SLOT_FREE : AVT_SLOT_DONE,
                         __ATOMIC_RELEASE);
        served++;
    }
    return served;
}

int main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[3], "poll") && strcmp(argv[3], "doorbell"))) {
        fprintf(stderr, "usage: responder PAGE DOORBELL_FIFO poll|doorbell\n");
        return 2;
    }
    int poll_mode = !strcmp(argv[3], "poll");
    int page_fd = open(argv[1], O_RDWR);
    if (page_fd < 0) {
        fprintf(stderr, "responder: %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    void *map = mmap(NULL, AVT_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, page_fd, 0);
    int bell = open(argv[2], O_RDWR | O_CLOEXEC);      /* blocking reads: the doorbell wait */
    if (map == MAP_FAILED || bell < 0) {
        fprintf(stderr, "responder: cannot map %s or open %s: %s\n", argv[1], argv[2],
                strerror(errno));
        return 2;
    }
    struct avt_header *header = map;
    if (header->magic != AVT_MAGIC
            || __atomic_load_n(&header->stub_state, __ATOMIC_ACQUIRE) != AVT_STUB_READY) {
        fprintf(stderr, "responder: %s is not an initialised trap page\n", argv[1]);
        return 2;
    }
    struct sigaction action = {.sa_handler = on_signal};   /* no SA_RESTART: read() returns */
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);

    struct avt_slot *slots = (struct avt_slot *)((char *)map + AVT_SLOTS_OFFSET);
    unsigned count = header->slot_count;
    header->model_features = 0;
    header->model_pid = (avt_u32)getpid();
    header->model_sleeping = !poll_mode;
    __atomic_store_n(&header->model_state, AVT_MODEL_ATTACHED, __ATOMIC_RELEASE);

    char rings[4096];
    while (!stopping) {
        if (serve_posted(slots, count))
            continue;
        if (poll_mode) {
            cpu_relax();
            continue;
        }
        header->model_sleeping = 1;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (!serve_posted(slots, count) && read(bell, rings, sizeof rings) < 0 && errno != EINTR) {
            perror("responder: doorbell read");
            return 1;
        }
        header->model_sleeping = 0;
    }
    serve_posted(slots, count);
    header->model_sleeping = 0;
    header->model_pid = 0;
    __atomic_store_n(&header->model_state, AVT_MODEL_DETACHED, __ATOMIC_RELEASE);
    return 0;
}
