/* TEST ONLY: a hostile PID 1 for tests/test_hostile.py, never part of a real box.
 * It does the handshake as guest/agent.c does (HELLO, then READY to SETUP), then misbehaves as the SETUP's
 * hostname record `h` (the box's name) says, writing up to FLOOD bytes as fast as the channel takes them:
 *   stream0   frames on the control stream after READY
 *   unopened  output frames for streams the host never opened
 *   credit    output on the first stream the host opens, ignoring flow control
 *   garbage   random bytes
 * Then it idles (PID 1 must not exit). Built by the test with `cc -static`. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FLOOD (256LL << 20)
#define CHUNK 65536

static unsigned char buf[9 + CHUNK];
static int con = -1;

static void say(const char *msg)
{
	if (con >= 0 && write(con, msg, strlen(msg)) < 0) { /* nothing to do */ }
}

static void put32(unsigned char *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static uint32_t get32(const unsigned char *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }

static int full(int fd, unsigned char *p, size_t n, int out)
{
	while (n) {
		ssize_t k = out ? write(fd, p, n) : read(fd, p, n);
		if (k <= 0) return -1;
		p += k;
		n -= k;
	}
	return 0;
}

static void header(uint32_t len, uint32_t stream, int type)
{
	put32(buf, len);
	put32(buf + 4, stream);
	buf[8] = type;
}

/* Reads one frame into buf; returns its type, its stream in *stream and its length in *len. */
static int next_frame(int fd, uint32_t *stream, uint32_t *len)
{
	if (full(fd, buf, 9, 0) < 0) return -1;
	*len = get32(buf);
	*stream = get32(buf + 4);
	int type = buf[8];
	if (*len > CHUNK || full(fd, buf + 9, *len, 0) < 0) return -1;
	return type;
}

static int open_port(void)
{
	for (int i = 0; i < 500; i++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			char path[300], name[32] = "";
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
			int f = open(path, O_RDONLY);
			if (f < 0) continue;
			ssize_t n = read(f, name, sizeof name - 1);
			close(f);
			if (n < 9 || strncmp(name, "boxlite.0", 9)) continue;
			snprintf(path, sizeof path, "/dev/%s", e->d_name);
			int fd = open(path, O_RDWR);
			if (fd >= 0) { closedir(d); return fd; }
		}
		if (d) closedir(d);
		usleep(10000);
	}
	return -1;
}

static void load_core_modules(void)
{
	static char order[65536];
	int f = open("/modules.order", O_RDONLY);
	ssize_t n = f >= 0 ? read(f, order, sizeof order - 1) : -1;
	if (f >= 0) close(f);
	order[n > 0 ? n : 0] = 0;
	for (char *line = strtok(order, "\n"); line; line = strtok(NULL, "\n")) {
		if (strchr(line, ' ')) continue; /* an optional group: no such device here */
		int m = open(line, O_RDONLY);
		if (m >= 0) { syscall(SYS_finit_module, m, "", 0); close(m); }
	}
}

int main(void)
{
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	con = open("/dev/console", O_WRONLY);
	load_core_modules();
	int fd = open_port();
	if (fd < 0) { say("flood-agent: no channel\n"); for (;;) pause(); }

	header(0, 0, 0x01); /* HELLO */
	full(fd, buf, 9, 1);
	uint32_t stream, len;
	char mode[65] = "";
	while (next_frame(fd, &stream, &len) != 0x02) {} /* SETUP */
	for (uint32_t pos = 9; pos + 5 <= 9 + len;) {
		uint32_t vlen = get32(buf + pos + 1);
		if (buf[pos] == 'h' && vlen < sizeof mode) memcpy(mode, buf + pos + 5, vlen);
		pos += 5 + vlen;
	}
	header(0, 0, 0x03); /* READY */
	full(fd, buf, 9, 1);

	char msg[128];
	snprintf(msg, sizeof msg, "flood-agent: ready, flooding: %s\n", mode);
	say(msg);
	uint32_t target = 0;
	int type = 0x22; /* PONG */
	if (!strcmp(mode, "unopened")) { target = 1u << 30; type = 0x13; }
	if (!strcmp(mode, "credit")) {
		while (next_frame(fd, &stream, &len) != 0x10) {} /* the first EXEC */
		target = stream;
		type = 0x13; /* STDOUT */
	}
	int random = open("/dev/urandom", O_RDONLY);
	long long sent = 0;
	while (sent < FLOOD) {
		if (!strcmp(mode, "garbage")) {
			if (random < 0 || read(random, buf, sizeof buf) <= 0 || full(fd, buf, sizeof buf, 1) < 0) break;
			sent += sizeof buf;
			continue;
		}
		memset(buf + 9, 'x', CHUNK);
		header(CHUNK, target, type);
		if (full(fd, buf, sizeof buf, 1) < 0) break;
		sent += sizeof buf;
		if (!strcmp(mode, "unopened")) target++;
	}
	snprintf(msg, sizeof msg, "flood-agent: sent %lld bytes\n", sent);
	say(msg);
	for (;;) pause();
}
