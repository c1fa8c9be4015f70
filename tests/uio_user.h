/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The userspace side of a UIO device (Documentation/driver-api/uio-howto.rst), shared by
 * the tests' C programs that run on Linux over avatar_uio (tests/kmod_guest/uio_probe.c,
 * tests/board_linux/trap_doorbell.c): find a device by name, wait for its interrupt,
 * unmask it again.
 */
#ifndef AVATAR_TESTS_UIO_USER_H
#define AVATAR_TESTS_UIO_USER_H

#include <fcntl.h>
#include <glob.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* /dev/uioN of the UIO device called NAME (sysfs name), opened read-write; -1 if none. */
static inline int uio_open(const char *name)
{
	glob_t names;
	char line[64], dev[32];
	int fd = -1;

	if (glob("/sys/class/uio/uio*/name", 0, NULL, &names) != 0) {
		globfree(&names);
		return -1;
	}
	for (size_t i = 0; i < names.gl_pathc && fd < 0; i++) {
		FILE *f = fopen(names.gl_pathv[i], "r");
		int n;

		if (f && fgets(line, sizeof(line), f) && !strcmp(strtok(line, "\n"), name) &&
		    sscanf(names.gl_pathv[i], "/sys/class/uio/uio%d", &n) == 1) {
			snprintf(dev, sizeof(dev), "/dev/uio%d", n);
			fd = open(dev, O_RDWR);
		}
		if (f)
			fclose(f);
	}
	globfree(&names);
	return fd;
}

/* Wait up to TIMEOUT_MS for an interrupt of UIO device FD: 1 with the device's event count
 * in *COUNT, 0 if none came. */
static inline int uio_wait(int fd, int timeout_ms, uint32_t *count)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	if (poll(&p, 1, timeout_ms) != 1)
		return 0;
	return read(fd, count, sizeof(*count)) == sizeof(*count);
}

/* Unmask (re-enable) the interrupt of UIO device FD: 1 on success. */
static inline int uio_unmask(int fd)
{
	uint32_t on = 1;

	return write(fd, &on, sizeof(on)) == sizeof(on);
}

#endif
