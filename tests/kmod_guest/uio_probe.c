// SPDX-License-Identifier: GPL-2.0
/*
 * Runs in the guest of tests/test_kmod.py, against the avatar_uio driver: maps the
 * UIO devices, tries what userspace must not be allowed, and rings the trap
 * doorbell through the distributor's map (GICD_ISPENDR). One line per check,
 * "ok ..." or "FAIL ...". Usage: uio_probe DOORBELL_INTID
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../uio_user.h"

#define CHECK(cond, ...) do { printf((cond) ? "ok " : "FAIL "); printf(__VA_ARGS__); \
			      printf(" (%s)\n", strerror(errno)); errno = 0; } while (0)

static int open_uio_readonly(int fd)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	return open(path, O_RDONLY);
}

int main(int argc, char **argv)
{
	long page = sysconf(_SC_PAGESIZE);
	unsigned intid = argc > 1 ? strtoul(argv[1], NULL, 0) : 0;
	int trap = uio_open("avatar-trap"), ram = uio_open("avatar-vm0-ram");
	int gicd = uio_open("avatar-gicd");
	uint32_t count = 0;

	CHECK(trap >= 0 && ram >= 0 && gicd >= 0, "devices open");
	CHECK(uio_open("avatar-misaligned") < 0 && uio_open("avatar-mapped") < 0 &&
	      uio_open("avatar-ram-by-reg") < 0 && uio_open("avatar-carveout-by-reg") < 0 &&
	      uio_open("avatar-bad-irq") < 0, "refused nodes have no device");
	CHECK(uio_open("avatar-past-ram") >= 0, "registers past the end of RAM have a device");

	volatile uint32_t *t = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED, trap, 0);
	CHECK(t != MAP_FAILED, "trap page mapped");
	if (t != MAP_FAILED) {
		t[0] = 0x12345678;
		t[0x3fff] = 0xabcdef01;
		CHECK(t[0] == 0x12345678 && t[0x3fff] == 0xabcdef01, "trap page reads back");
	}
	char *r = mmap(NULL, 0x100000, PROT_READ | PROT_WRITE, MAP_SHARED, ram, 0);
	CHECK(r != MAP_FAILED, "guest RAM mapped");
	if (r != MAP_FAILED) {
		memset(r, 0x5a, 0x100000);
		memmove(r + 1, r + 4099, 10000);
		CHECK(r[1] == 0x5a && r[0xfffff] == 0x5a, "memset and unaligned memmove in guest RAM");
	}

	CHECK(mmap(NULL, 0x20000, PROT_READ, MAP_SHARED, trap, 0) == MAP_FAILED && errno == EINVAL,
	      "a map longer than the region is refused");
	CHECK(mmap(NULL, page, PROT_READ, MAP_SHARED, trap, page) == MAP_FAILED && errno == EINVAL,
	      "a map index the device lacks is refused");
	CHECK(mmap(NULL, page, PROT_READ, MAP_SHARED, trap, 1L << 40) == MAP_FAILED,
	      "a huge offset is refused");
	CHECK(mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE, trap, 0) == MAP_FAILED &&
	      errno == EINVAL, "a copy-on-write map is refused");
	volatile uint32_t *ro = mmap(NULL, page, PROT_READ, MAP_SHARED, open_uio_readonly(trap), 0);
	CHECK(ro != MAP_FAILED && ro[0] == 0x12345678, "a read-only map reads the trap page");
	CHECK(mmap(NULL, page, PROT_READ | PROT_EXEC, MAP_SHARED, trap, 0) == MAP_FAILED &&
	      errno == EPERM, "an executable map is refused");
	CHECK(t == MAP_FAILED || mprotect((void *)t, page, PROT_READ | PROT_EXEC) != 0,
	      "mprotect to executable is refused");

	volatile uint32_t *g = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED, gicd, 0);
	CHECK(g != MAP_FAILED && (g[0] & 1), "distributor mapped, GICD_CTLR enabled");
	if (g == MAP_FAILED || !intid)
		return 1;
	volatile uint32_t *ispendr = &g[(0x200 + intid / 32 * 4) / 4];
	for (uint32_t round = 1; round <= 2; round++) {
		*ispendr = 1u << (intid % 32);
		CHECK(uio_wait(trap, 30000, &count) && count == 2 * round - 1,
		      "doorbell %u: event count %u", round, count);
		*ispendr = 1u << (intid % 32);		/* masked now: held, not delivered */
		CHECK(!uio_wait(trap, 200, &count), "masked: no event before the unmask");
		CHECK(uio_unmask(trap), "unmask");
		CHECK(uio_wait(trap, 30000, &count) && count == 2 * round,
		      "the doorbell rung while masked arrives after the unmask: count %u", count);
		CHECK(uio_unmask(trap), "unmask");
	}
	printf("uio_probe: done\n");
	return 0;
}
