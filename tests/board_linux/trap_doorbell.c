// SPDX-License-Identifier: GPL-2.0
/*
 * Runs in the board Linux of tests/test_emulated_board_linux.py (board mode): the
 * smallest device model loop over avatar_uio. Maps the trap page through the
 * avatar-trap UIO device, attaches (model_sleeping = 1, so the stub rings the
 * doorbell SPI for every posted trap), then sleeps in read() on /dev/uioN,
 * answers every POSTED slot UNHANDLED (reads as zero), re-arms with write() and
 * scans again, until COUNT traps were answered; then detaches. Prints one line:
 * "trap_doorbell: N traps, M wake-ups, slots S, vcpu V, first gpa 0x..."
 * Usage: trap_doorbell COUNT
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../boards/abi/avatar_trap.h"
#include "../uio_user.h"

static int answer(volatile struct avt_header *hdr, unsigned long long *first_gpa, int *vcpu)
{
	int answered = 0;

	for (unsigned i = 0; i < hdr->slot_count; i++) {
		volatile struct avt_slot *slot = (volatile struct avt_slot *)
			((volatile char *)hdr + hdr->slots_offset + i * hdr->slot_size);

		if (__atomic_load_n(&slot->state, __ATOMIC_ACQUIRE) != AVT_SLOT_POSTED)
			continue;
		if (!*first_gpa) {
			*first_gpa = slot->gpa;
			*vcpu = slot->vcpu_id;
		}
		slot->data = 0;
		slot->status = AVT_STATUS_UNHANDLED;
		__atomic_store_n(&slot->state, AVT_SLOT_DONE, __ATOMIC_RELEASE);
		answered++;
	}
	return answered;
}

int main(int argc, char **argv)
{
	int want = argc > 1 ? atoi(argv[1]) : 1, traps = 0, wakeups = 0, vcpu = -1;
	unsigned long long first_gpa = 0;
	uint32_t events;
	int fd = uio_open("avatar-trap");

	if (fd < 0) {
		printf("trap_doorbell: no avatar-trap UIO device\n");
		return 1;
	}
	volatile struct avt_header *hdr = mmap(NULL, AVT_PAGE_SIZE, PROT_READ | PROT_WRITE,
					       MAP_SHARED, fd, 0);
	if (hdr == MAP_FAILED || hdr->magic != AVT_MAGIC) {
		printf("trap_doorbell: no trap page behind avatar-trap\n");
		return 1;
	}
	hdr->model_pid = (uint32_t)getpid();
	hdr->model_sleeping = 1;
	__atomic_store_n(&hdr->model_state, AVT_MODEL_ATTACHED, __ATOMIC_RELEASE);
	while (traps < want) {
		if (!uio_unmask(fd))
			break;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		traps += answer(hdr, &first_gpa, &vcpu);
		if (traps >= want || !uio_wait(fd, 60000, &events))
			break;
		wakeups++;
		traps += answer(hdr, &first_gpa, &vcpu);
	}
	hdr->model_sleeping = 0;
	__atomic_store_n(&hdr->model_state, AVT_MODEL_DETACHED, __ATOMIC_RELEASE);
	printf("trap_doorbell: %d traps, %d wake-ups, slots %u, vcpu %d, first gpa 0x%llx\n",
	       traps, wakeups, hdr->slot_count, vcpu, first_gpa);
	return traps >= want ? 0 : 1;
}
