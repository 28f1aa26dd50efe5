/*
 * A TEST DOUBLE of libkrun (not libkrun): the same symbols the engine binds, recording every call.
 * It cannot boot anything. Built by tests/test_libkrun.py with `cc -shared -fPIC` and loaded through
 * BOXLITE_LIBKRUN.
 *
 * Environment:
 *   KRUN_DOUBLE_LOG      file to append one line per call: name, then the arguments, tab-separated
 *   KRUN_DOUBLE_FAIL     name of a call that returns -KRUN_DOUBLE_ERRNO (default EINVAL) instead of 0
 *   KRUN_DOUBLE_CONNECT  "1": krun_start_enter connects to the last unix socket given to
 *                        krun_add_vsock_port2, as libkrun does when the guest connects to that port
 *   KRUN_DOUBLE_SLEEP    seconds krun_start_enter waits before exiting; "hang" waits forever
 *   KRUN_DOUBLE_EXIT     the status krun_start_enter exits with (libkrun exits with the VM's)
 * Built with -DKRUN_DOUBLE_OLD it lacks krun_add_virtiofs3 and krun_add_net_unixstream, like an old libkrun.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static char vsock_path[108];
static int next_ctx = 7; /* not 0: proves the engine passes the id it was given */

static int32_t record(const char *name, const char *fmt, ...)
{
	const char *path = getenv("KRUN_DOUBLE_LOG");
	if (path) {
		FILE *f = fopen(path, "a");
		if (f) {
			va_list ap;
			va_start(ap, fmt);
			fprintf(f, "%s", name);
			vfprintf(f, fmt, ap);
			fputc('\n', f);
			va_end(ap);
			fclose(f);
		}
	}
	const char *fail = getenv("KRUN_DOUBLE_FAIL");
	if (fail && !strcmp(fail, name)) {
		const char *e = getenv("KRUN_DOUBLE_ERRNO");
		return -(e ? atoi(e) : EINVAL);
	}
	return 0;
}

#define S(p) ((p) ? (p) : "NULL")

int32_t krun_set_log_level(uint32_t level) { return record(__func__, "\t%u", level); }

int32_t krun_create_ctx(void)
{
	int32_t r = record(__func__, "");
	return r < 0 ? r : next_ctx++;
}

int32_t krun_free_ctx(uint32_t ctx) { return record(__func__, "\t%u", ctx); }

int32_t krun_set_vm_config(uint32_t ctx, uint8_t cpus, uint32_t ram)
{
	return record(__func__, "\t%u\t%u\t%u", ctx, cpus, ram);
}

int32_t krun_set_kernel(uint32_t ctx, const char *kernel, uint32_t format, const char *initramfs, const char *cmdline)
{
	return record(__func__, "\t%u\t%s\t%u\t%s\t%s", ctx, S(kernel), format, S(initramfs), S(cmdline));
}

int32_t krun_add_disk2(uint32_t ctx, const char *id, const char *path, uint32_t format, bool ro)
{
	return record(__func__, "\t%u\t%s\t%s\t%u\t%d", ctx, S(id), S(path), format, ro);
}

int32_t krun_add_virtiofs(uint32_t ctx, const char *tag, const char *path)
{
	return record(__func__, "\t%u\t%s\t%s", ctx, S(tag), S(path));
}

#ifndef KRUN_DOUBLE_OLD
int32_t krun_add_virtiofs3(uint32_t ctx, const char *tag, const char *path, uint64_t shm, bool ro)
{
	return record(__func__, "\t%u\t%s\t%s\t%llu\t%d", ctx, S(tag), S(path), (unsigned long long)shm, ro);
}

int32_t krun_add_net_unixstream(uint32_t ctx, const char *path, int fd, uint8_t *const mac, uint32_t features,
				uint32_t flags)
{
	return record(__func__, "\t%u\t%s\t%d\t%02x:%02x:%02x:%02x:%02x:%02x\t%u\t%u", ctx, S(path), fd, mac[0], mac[1],
		      mac[2], mac[3], mac[4], mac[5], features, flags);
}
#endif

int32_t krun_add_vsock_port2(uint32_t ctx, uint32_t port, const char *path, bool listen)
{
	snprintf(vsock_path, sizeof vsock_path, "%s", S(path));
	return record(__func__, "\t%u\t%u\t%s\t%d", ctx, port, S(path), listen);
}

int32_t krun_set_console_output(uint32_t ctx, const char *path)
{
	return record(__func__, "\t%u\t%s", ctx, S(path));
}

int32_t krun_start_enter(uint32_t ctx)
{
	int32_t r = record(__func__, "\t%u", ctx);
	if (r < 0)
		return r;
	const char *connect_to = getenv("KRUN_DOUBLE_CONNECT");
	if (connect_to && !strcmp(connect_to, "1") && vsock_path[0]) {
		int s = socket(AF_UNIX, SOCK_STREAM, 0);
		struct sockaddr_un a = {.sun_family = AF_UNIX};
		snprintf(a.sun_path, sizeof a.sun_path, "%s", vsock_path);
		if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0)
			_exit(99);
		/* the socket stays open until the process ends, as libkrun's would */
	}
	const char *sleep_for = getenv("KRUN_DOUBLE_SLEEP");
	if (sleep_for && !strcmp(sleep_for, "hang"))
		for (;;)
			pause();
	if (sleep_for)
		usleep((useconds_t)(atof(sleep_for) * 1e6));
	const char *code = getenv("KRUN_DOUBLE_EXIT");
	exit(code ? atoi(code) : 0); /* libkrun exit()s at VM end: this function never returns on success */
}
