/* boxlite-agent: PID 1 of a pytest-boxlite microVM (wire protocol: guest/PROTOCOL.md).
 * One single-threaded poll() loop multiplexes the host channel and every execution's pipes.
 * `--stdio` speaks the protocol on fd 0/1 with no mounts, no chroot and no reboot (unit tests). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "0.1.0"
#define HDR 9
#define MAX_PAYLOAD 65536
#define MAX_PROCS 256
#define OUT_WINDOW (1LL << 20)     /* initial guest->host output window per stream */
#define IN_WINDOW (256u << 10)     /* host->guest stdin window = bound of pending stdin */
#define MAX_GROUPS 64
#define NEWROOT "/newroot"

enum {
	T_HELLO = 0x01, T_SETUP = 0x02, T_READY = 0x03, T_RESUME = 0x04, T_EXEC = 0x10, T_STARTED = 0x11,
	T_STDIN = 0x12, T_STDOUT = 0x13, T_STDERR = 0x14, T_EXIT = 0x15, T_KILL = 0x16,
	T_CREDIT = 0x17, T_ERROR = 0x18, T_STAT = 0x20, T_PING = 0x21, T_PONG = 0x22,
	T_SHUTDOWN = 0x2f,
};

struct proc {
	int used, reaped, status, stdin_eof;
	uint32_t stream;
	pid_t pid;
	int fd_in, fd_out, fd_err;     /* agent-side pipe ends, -1 once closed */
	long long credit;              /* output bytes the host still accepts */
	size_t budget[2];              /* after reap: bytes still drained from stdout/stderr */
	unsigned char *inbuf;          /* pending stdin, at most IN_WINDOW bytes */
	size_t in_off, in_len;
};

static struct proc procs[MAX_PROCS];
static int stdio_mode, is_pid1, setup_done;
static int log_fd = 2, chan_in = -1, chan_out = -1, sig_pipe[2] = {-1, -1};
static unsigned char ibuf[HDR + MAX_PAYLOAD], obuf[HDR + MAX_PAYLOAD];
static size_t ilen;
static char **mounted;             /* what we mounted, unmounted in reverse at power off */
static size_t nmounted, mounted_cap;
static char errbuf[512];

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
	char b[512];
	int n = snprintf(b, sizeof b, "boxlite-agent: ");
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(b + n, sizeof b - n - 1, fmt, ap);
	va_end(ap);
	size_t l = strlen(b);
	b[l++] = '\n';
	if (log_fd >= 0 && write(log_fd, b, l) < 0) { /* nowhere left to report */ }
}

static void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* Reads at most cap-1 bytes of a (small, /proc or /sys) file and NUL-terminates. */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) return -1;
	size_t n = 0;
	while (n < cap - 1) {
		ssize_t r = read(fd, buf + n, cap - 1 - n);
		if (r < 0 && errno == EINTR) continue;
		if (r <= 0) break;
		n += r;
	}
	close(fd);
	buf[n] = 0;
	return n;
}

static int write_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
	if (fd < 0) return -1;
	size_t len = strlen(s);
	ssize_t w = write(fd, s, len);
	return (close(fd) < 0 || w != (ssize_t)len) ? -1 : 0;
}

/* ---------- power off / exit ---------- */

static void kill_all_and_reap(void)
{
	if (is_pid1) {
		kill(-1, SIGKILL);
	} else {
		for (int i = 0; i < MAX_PROCS; i++)
			if (procs[i].used && !procs[i].reaped) kill(-procs[i].pid, SIGKILL);
	}
	/* Bounded wait: a process stuck in D state must not keep the VM up. */
	for (int i = 0; i < 100; i++) {
		pid_t r = waitpid(-1, NULL, WNOHANG);
		if (r < 0 && errno == ECHILD) break;
		if (r <= 0) sleep_ms(10);
	}
}

static void finish(int code) __attribute__((noreturn));
static void finish(int code)
{
	kill_all_and_reap();
	if (!is_pid1) exit(code);
	sync();
	for (size_t i = nmounted; i-- > 0;)
		if (umount2(mounted[i], 0) < 0) umount2(mounted[i], MNT_DETACH);
	sync();
	reboot(RB_POWER_OFF);
	reboot(RB_AUTOBOOT);
	for (;;) pause(); /* PID 1 must never exit */
}

/* ---------- channel output ---------- */

static void write_all(int fd, const unsigned char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w > 0) { p += w; n -= w; continue; }
		if (w < 0 && errno == EINTR) continue;
		if (w < 0 && errno == EAGAIN) { /* fd shared with a non-blocking opener */
			struct pollfd pf = {fd, POLLOUT, 0};
			poll(&pf, 1, 1000);
			continue;
		}
		logmsg("channel write failed: %s", w < 0 ? strerror(errno) : "short write");
		finish(1);
	}
}

/* Sends a frame whose payload is already at obuf + HDR. */
static void send_raw(uint32_t stream, int type, size_t len)
{
	put32(obuf, len);
	put32(obuf + 4, stream);
	obuf[8] = type;
	write_all(chan_out, obuf, HDR + len);
}

static void send_error(uint32_t stream, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A payload that does not fit a frame is not cut short: the stream gets an ERROR saying so instead. */
static void send_frame(uint32_t stream, int type, const void *data, size_t len)
{
	if (len > MAX_PAYLOAD) {
		send_error(stream, "agent: a frame of type 0x%02x and %zu bytes exceeds %d", type, len, MAX_PAYLOAD);
		return;
	}
	if (len) memmove(obuf + HDR, data, len);
	send_raw(stream, type, len);
}

static void send_error(uint32_t stream, const char *fmt, ...)
{
	char b[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(b, sizeof b, fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof b) memcpy(b + sizeof b - 4, "...", 4); /* a long message says it was cut */
	if (stream == 0) logmsg("%s", b);
	send_frame(stream, T_ERROR, b, strlen(b));
}

/* Outgoing records (small control replies only). A record that does not fit marks the buffer as overflowed,
 * and send_records() reports that instead of sending a reply with records missing. */
struct rb { unsigned char b[512]; size_t n; int overflow; };

static void rb_add(struct rb *r, char key, const void *v, size_t len)
{
	if (len > sizeof r->b || r->n + 5 + len > sizeof r->b) { r->overflow = 1; return; }
	r->b[r->n] = key;
	put32(r->b + r->n + 1, len);
	memcpy(r->b + r->n + 5, v, len);
	r->n += 5 + len;
}

static void rb_num(struct rb *r, char key, long long v)
{
	char t[24];
	int l = snprintf(t, sizeof t, "%lld", v);
	rb_add(r, key, t, l);
}

static void send_records(uint32_t stream, int type, const struct rb *r)
{
	if (r->overflow) send_error(stream, "agent: the records of a frame of type 0x%02x exceed %zu bytes", type,
	                            sizeof r->b);
	else send_frame(stream, type, r->b, r->n);
}

static void send_credit(uint32_t stream, long long n)
{
	struct rb r = {.n = 0};
	rb_num(&r, 'n', n);
	send_records(stream, T_CREDIT, &r);
}

/* ---------- incoming records ---------- */

struct rec { char key; const unsigned char *v; uint32_t len; };

/* 1: got a record, 0: end, -1: malformed (length runs past the payload). */
static int rec_next(const unsigned char **p, const unsigned char *end, struct rec *r)
{
	if (*p == end) return 0;
	if (end - *p < 5) return -1;
	r->key = (char)(*p)[0];
	r->len = get32(*p + 1);
	if ((size_t)r->len > (size_t)(end - *p - 5)) return -1;
	r->v = *p + 5;
	*p += 5 + (size_t)r->len;
	return 1;
}

static int rec_check(const unsigned char *p, size_t len)
{
	struct rec r;
	int k;
	const unsigned char *end = p + len;
	while ((k = rec_next(&p, end, &r)) == 1) {}
	return k;
}

static int parse_u64(const unsigned char *v, size_t len, unsigned long long max, unsigned long long *out)
{
	unsigned long long x = 0;
	if (len == 0 || len > 20) return -1;
	for (size_t i = 0; i < len; i++) {
		if (v[i] < '0' || v[i] > '9') return -1;
		unsigned d = v[i] - '0';
		if (x > (max - d) / 10) return -1;
		x = x * 10 + d;
	}
	*out = x;
	return 0;
}

/* NUL-terminated copy; NULL if the value holds a NUL byte (no silent truncation) or on OOM. */
static char *dupz(const unsigned char *v, size_t len)
{
	if (memchr(v, 0, len)) return NULL;
	char *s = malloc(len + 1);
	if (!s) return NULL;
	memcpy(s, v, len);
	s[len] = 0;
	return s;
}

/* ---------- small filesystem helpers ---------- */

static int mkdir_p(const char *path, mode_t mode)
{
	char b[4096];
	if (snprintf(b, sizeof b, "%s", path) >= (int)sizeof b) { errno = ENAMETOOLONG; return -1; }
	for (char *s = b + 1; ; s++) {
		if (*s == '/' || *s == 0) {
			char c = *s;
			*s = 0;
			if (mkdir(b, mode) < 0 && errno != EEXIST) return -1;
			*s = c;
			if (!c) return 0;
		}
	}
}

static const char *fail(const char *what)
{
	snprintf(errbuf, sizeof errbuf, "%s: %s", what, strerror(errno));
	return errbuf;
}

static const char *do_mount(const char *src, const char *tgt, const char *type, unsigned long fl, const char *data)
{
	if (mkdir_p(tgt, 0755) < 0) {
		snprintf(errbuf, sizeof errbuf, "mkdir %s: %s", tgt, strerror(errno));
		return errbuf;
	}
	/* Room in the table first: a mount the agent could not unmount at power off would lose writes. */
	if (nmounted == mounted_cap) {
		size_t cap = mounted_cap ? 2 * mounted_cap : 32;
		char **grown = realloc(mounted, cap * sizeof *grown);
		if (!grown) return fail("mount table");
		mounted = grown;
		mounted_cap = cap;
	}
	char *copy = strdup(tgt);
	if (!copy) return fail("mount table");
	if (mount(src, tgt, type, fl, data) < 0) {
		free(copy);
		snprintf(errbuf, sizeof errbuf, "mount %s on %s: %s", type, tgt, strerror(errno));
		return errbuf;
	}
	mounted[nmounted++] = copy;
	return NULL;
}

/* ---------- boot: modules and channel ---------- */

/* Is `tag` one of the comma-separated groups in `boxlite.modules=` on the kernel command line? */
static int module_group_wanted(const char *cmdline, const char *tag)
{
	const char *p = strstr(cmdline, "boxlite.modules=");
	if (!p) return 0;
	p += 16;
	size_t n = strlen(tag);
	while (*p && *p != ' ' && *p != '\n') {
		size_t len = strcspn(p, ", \n");
		if (len == n && !strncmp(p, tag, n)) return 1;
		p += len;
		if (*p == ',') p++;
	}
	return 0;
}

/* A file of the initramfs that nothing reads again. Its pages are zeroed before it is unlinked: freed, they
 * would keep its bytes, and a snapshot's RAM file keeps every page that is not all zeros (docs/cache.md). */
static void discard_file(const char *path)
{
	static char zeros[65536]; /* .bss: reading it maps the zero page, nothing is allocated */
	int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
	struct stat st;
	if (fd >= 0 && fstat(fd, &st) == 0)
		for (off_t off = 0; off < st.st_size;) {
			size_t n = (size_t)(st.st_size - off) < sizeof zeros ? (size_t)(st.st_size - off) : sizeof zeros;
			ssize_t w = pwrite(fd, zeros, n, off);
			if (w <= 0) break;
			off += w;
		}
	if (fd >= 0) close(fd);
	unlink(path);
}

/* /modules.order: "PATH" lines are always loaded, "PATH GROUP" lines only when the host asks for GROUP
 * (a module loaded for a device the VM does not have is boot time spent for nothing). Modules are loaded at
 * boot only: their files (~1.5 MB with Debian's kernel) are discarded then. */
static void load_modules(void)
{
	static char order[65536], cmdline[4096];
	if (read_small("/modules.order", order, sizeof order) < 0) { logmsg("no /modules.order"); return; }
	if (read_small("/proc/cmdline", cmdline, sizeof cmdline) < 0) cmdline[0] = 0;
	for (char *line = order, *next; line && *line; line = next) {
		next = strchr(line, '\n');
		if (next) *next++ = 0;
		while (*line == '/') line++;
		if (!*line) continue;
		char *tag = strchr(line, ' ');
		if (tag) {
			*tag++ = 0;
			if (!module_group_wanted(cmdline, tag)) { discard_file(line); continue; }
		}
		int fd = open(line, O_RDONLY | O_CLOEXEC); /* relative to /, our cwd */
		if (fd < 0) { logmsg("module %s: %s", line, strerror(errno)); continue; }
		if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
			logmsg("module %s: %s", line, strerror(errno));
		close(fd);
		discard_file(line);
	}
	discard_file("/modules.order");
}

static int open_vsock(unsigned port)
{
	/* The vsock transport may still be probing: retry for ~5 s. */
	for (int i = 0; i < 100; i++) {
		int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s >= 0) {
			struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
			if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) return s;
			close(s);
		}
		sleep_ms(50);
	}
	logmsg("vsock port %u: %s", port, strerror(errno));
	return -1;
}

static int open_vport(void)
{
	/* virtio_console probes asynchronously: wait up to ~5 s for the port and its /dev node. */
	for (int i = 0; i < 250; i++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			char path[512], name[64];
			if (e->d_name[0] == '.') continue;
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
			if (read_small(path, name, sizeof name) < 0) continue;
			name[strcspn(name, "\n")] = 0;
			if (strcmp(name, "boxlite.0")) continue;
			snprintf(path, sizeof path, "/dev/%s", e->d_name);
			int fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
			if (fd >= 0) { closedir(d); return fd; }
		}
		if (d) closedir(d);
		sleep_ms(20);
	}
	logmsg("no virtio-serial port named boxlite.0");
	return -1;
}

static int open_channel(void)
{
	char cmd[4096];
	if (read_small("/proc/cmdline", cmd, sizeof cmd) < 0) cmd[0] = 0;
	for (char *t = strtok(cmd, " \t\n"); t; t = strtok(NULL, " \t\n")) {
		unsigned long long port;
		if (strncmp(t, "boxlite.vsock=", 14)) continue;
		if (parse_u64((unsigned char *)t + 14, strlen(t + 14), 0xffffffffULL, &port) < 0) {
			logmsg("bad boxlite.vsock=");
			return -1;
		}
		return open_vsock((unsigned)port);
	}
	return open_vport();
}

/* ---------- SETUP ---------- */

static const char *find_disk(const unsigned char *serial, size_t len, char *dev, size_t cap)
{
	for (int i = 0; i < 250; i++) { /* virtio_blk probes asynchronously */
		DIR *d = opendir("/sys/block");
		struct dirent *e;
		int found = 0;
		while (d && !found && (e = readdir(d))) {
			char path[512], s[128];
			if (strncmp(e->d_name, "vd", 2)) continue;
			snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
			ssize_t n = read_small(path, s, sizeof s);
			while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' ')) n--;
			if (n != (ssize_t)len || memcmp(s, serial, len)) continue;
			snprintf(dev, cap, "/dev/%s", e->d_name);
			found = 1;
		}
		if (d) closedir(d);
		if (found && access(dev, F_OK) == 0) return NULL;
		sleep_ms(20);
	}
	snprintf(errbuf, sizeof errbuf, "disk with serial '%.*s' not found", (int)(len > 64 ? 64 : len), serial);
	return errbuf;
}

static int set_addr(int s, unsigned long req, const char *ifname, const char *ip)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	inet_pton(AF_INET, ip, &sin->sin_addr);
	return ioctl(s, req, &ifr);
}

static int if_up(int s, const char *ifname)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) return -1;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static const char *setup_network(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) return fail("network socket");
	const char *err = NULL;
	if (set_addr(s, SIOCSIFADDR, "lo", "127.0.0.1") < 0 || if_up(s, "lo") < 0) err = fail("lo up");
	for (int i = 0; !err && i < 250 && !if_nametoindex("eth0"); i++) sleep_ms(20); /* virtio_net probe */
	if (!err && (set_addr(s, SIOCSIFADDR, "eth0", "10.0.2.15") < 0 ||
	             set_addr(s, SIOCSIFNETMASK, "eth0", "255.255.255.0") < 0 || if_up(s, "eth0") < 0))
		err = fail("eth0 up");
	if (!err) {
		struct rtentry rt;
		memset(&rt, 0, sizeof rt);
		struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst, *gw = (struct sockaddr_in *)&rt.rt_gateway,
		                   *mask = (struct sockaddr_in *)&rt.rt_genmask;
		dst->sin_family = gw->sin_family = mask->sin_family = AF_INET;
		inet_pton(AF_INET, "10.0.2.2", &gw->sin_addr);
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST) err = fail("default route");
	}
	close(s);
	/* DNS is best effort: replace a (possibly dangling or absolute) symlink with a plain file. */
	if (!err && (mkdir_p(NEWROOT "/etc", 0755) < 0 || (unlink(NEWROOT "/etc/resolv.conf") < 0 && errno != ENOENT) ||
	             write_file(NEWROOT "/etc/resolv.conf", "nameserver 10.0.2.3\n") < 0))
		logmsg("resolv.conf: %s", strerror(errno));
	/* The host's name for the gateway (its loopback ports a box may reach: host_ports), after the image's. */
	int hosts = err ? -1 : open(NEWROOT "/etc/hosts", O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0644);
	static const char entry[] = "10.0.2.2\thost.boxlite.internal\n";
	if (hosts >= 0) {
		if (write(hosts, entry, sizeof entry - 1) != (ssize_t)(sizeof entry - 1)) logmsg("hosts: %s", strerror(errno));
		close(hosts);
	}
	return err;
}

/* The ext4 on the disk with this serial, mounted at `tgt`. Its cached blocks are dropped first: a disk
 * restored into a VM from a snapshot may hold other contents than the one the kernel read at boot. */
static const char *mount_disk(const unsigned char *serial, size_t len, const char *tgt, unsigned long fl)
{
	char dev[300];
	const char *err = find_disk(serial, len, dev, sizeof dev);
	if (err) return err;
	int fd = open(dev, O_RDONLY | O_CLOEXEC);
	if (fd < 0) return fail(dev);
	int flushed = ioctl(fd, BLKFLSBUF, 0);
	close(fd);
	if (flushed < 0) return fail("BLKFLSBUF");
	return do_mount(dev, tgt, "ext4", fl, NULL);
}

/* A volume: from a virtiofs share (`disk` 0: SOURCE is its tag) or an ext4 disk (`disk` 1: SOURCE is its
 * virtio-blk serial). */
static const char *setup_volume(const unsigned char *v, size_t len, int disk)
{
	/* SOURCE \0 GUESTPATH \0 ro|rw|cow */
	const unsigned char *z1 = memchr(v, 0, len);
	const unsigned char *z2 = z1 ? memchr(z1 + 1, 0, len - (z1 + 1 - v)) : NULL;
	if (!z2) return "volume: want TAG\\0PATH\\0ro|rw|cow";
	char tag[64], path[4096], tgt[4200];
	size_t tl = z1 - v, pl = z2 - z1 - 1, ml = len - (z2 + 1 - v);
	const char *mode = (const char *)z2 + 1;
	int ro = ml == 2 && !memcmp(mode, "ro", 2);
	int cow = ml == 3 && !memcmp(mode, "cow", 3);
	if (tl == 0 || tl >= sizeof tag || pl == 0 || pl >= sizeof path ||
	    !(ro || cow || (ml == 2 && !memcmp(mode, "rw", 2))))
		return "volume: bad tag, path or mode";
	for (size_t i = 0; i < tl; i++) /* the tag becomes part of overlay options and paths */
		if (!isalnum(v[i]) && v[i] != '_' && v[i] != '-') return "volume: tag must be [A-Za-z0-9_-]";
	memcpy(tag, v, tl); tag[tl] = 0;
	memcpy(path, z1 + 1, pl); path[pl] = 0;
	if (path[0] != '/' || strstr(path, "/../") || (pl >= 3 && !strcmp(path + pl - 3, "/..")))
		return "volume: path must be absolute without '..'";
	snprintf(tgt, sizeof tgt, NEWROOT "%s", path);
	if (!cow) return disk ? mount_disk(v, tl, tgt, ro ? MS_RDONLY : 0)
	                      : do_mount(tag, tgt, "virtiofs", ro ? MS_RDONLY : 0, NULL);
	/* Copy-on-write: the host share (read-only on the host) is the lower layer of an overlay whose upper
	 * layer lives with the box's own writes, outside the box's view. */
	char lower[128], upper[128], work[128], opts[512];
	const char *err;
	snprintf(lower, sizeof lower, "/vols/%s", tag);
	snprintf(upper, sizeof upper, "/upperfs/vols/%s/upper", tag);
	snprintf(work, sizeof work, "/upperfs/vols/%s/work", tag);
	if ((err = disk ? mount_disk(v, tl, lower, MS_RDONLY) : do_mount(tag, lower, "virtiofs", MS_RDONLY, NULL)))
		return err;
	if (mkdir_p(upper, 0755) < 0 || mkdir_p(work, 0755) < 0) return fail("volume upper dirs");
	snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work);
	return do_mount("overlay", tgt, "overlay", 0, opts);
}

/* Hostname, wall clock and entropy: set at boot, and again in every VM restored from a snapshot, whose
 * clock is the snapshot's and whose random pool is shared with every other restored copy. */
static const char *apply_identity(const unsigned char *p, size_t len)
{
	const unsigned char *end = p + len;
	struct rec r;
	const char *err = NULL;
	for (const unsigned char *q = p; rec_next(&q, end, &r) == 1;) {
		if (r.key == 'h' && (r.len > 64 || sethostname((const char *)r.v, r.len) < 0)) return "sethostname failed";
		if (r.key == 't') {
			/* SECONDS.FRACTION: the fraction is read as decimal digits of a second. */
			const unsigned char *dot = memchr(r.v, '.', r.len);
			size_t sl = dot ? (size_t)(dot - r.v) : r.len;
			unsigned long long sec, ns = 0;
			if (parse_u64(r.v, sl, 1ULL << 40, &sec) < 0) return "bad time";
			for (size_t i = sl + 1, k = 0; dot && k < 9; i++, k++) {
				if (i < r.len && (r.v[i] < '0' || r.v[i] > '9')) return "bad time";
				ns = ns * 10 + (i < r.len ? r.v[i] - '0' : 0);
			}
			struct timespec ts = {(time_t)sec, (long)ns};
			if (clock_settime(CLOCK_REALTIME, &ts) < 0) return fail("clock_settime");
		}
		if (r.key == 'R' && r.len > 0) {
			struct rand_pool_info *rpi = malloc(sizeof *rpi + r.len);
			int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
			int ok = rpi && fd >= 0;
			if (ok) {
				rpi->entropy_count = (int)r.len * 8;
				rpi->buf_size = (int)r.len;
				memcpy(rpi->buf, r.v, r.len);
				ok = ioctl(fd, RNDADDENTROPY, rpi) == 0 && ioctl(fd, RNDRESEEDCRNG) == 0;
			}
			if (!ok) err = fail("RNDADDENTROPY/RNDRESEEDCRNG");
			free(rpi);
			if (fd >= 0) close(fd);
			if (err) return err;
		}
	}
	return NULL;
}

static const char *do_setup(const unsigned char *p, size_t len)
{
	const unsigned char *end = p + len;
	const unsigned char *root = NULL, *upper = NULL;
	size_t root_len = 0, upper_len = 0;
	int net = 0;
	struct rec r;
	const char *err;
	char dev[300];

	for (const unsigned char *q = p; rec_next(&q, end, &r) == 1;) {
		if (r.key == 'r') { root = r.v; root_len = r.len; }
		if (r.key == 'w') { upper = r.v; upper_len = r.len; }
		if (r.key == 'n') net = r.len == 1 && r.v[0] == '1';
	}
	if (!root || !root_len) return "setup: no root disk (r)";
	if (root_len > 9 && !memcmp(root, "virtiofs:", 9)) { /* the root is a share (the host image) */
		char tag[64];
		if (root_len - 9 >= sizeof tag) return "setup: root tag too long";
		memcpy(tag, root + 9, root_len - 9);
		tag[root_len - 9] = 0;
		if ((err = do_mount(tag, "/lower", "virtiofs", MS_RDONLY, NULL))) return err;
	} else {
		if ((err = find_disk(root, root_len, dev, sizeof dev))) return err;
		if ((err = do_mount(dev, "/lower", "ext4", MS_RDONLY, NULL))) return err;
	}
	if (!upper || (upper_len == 5 && !memcmp(upper, "tmpfs", 5))) {
		err = do_mount("tmpfs", "/upperfs", "tmpfs", 0, "mode=0755");
	} else {
		if ((err = find_disk(upper, upper_len, dev, sizeof dev))) return err;
		err = do_mount(dev, "/upperfs", "ext4", 0, NULL);
	}
	if (err) return err;
	if (mkdir_p("/upperfs/upper", 0755) < 0 || mkdir_p("/upperfs/work", 0755) < 0) return fail("upper dirs");
	if ((err = do_mount("overlay", NEWROOT, "overlay", 0, "lowerdir=/lower,upperdir=/upperfs/upper,workdir=/upperfs/work")))
		return err;
	if ((err = do_mount("proc", NEWROOT "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)) ||
	    (err = do_mount("sysfs", NEWROOT "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)) ||
	    (err = do_mount("devtmpfs", NEWROOT "/dev", "devtmpfs", MS_NOSUID, "mode=0755")) ||
	    (err = do_mount("devpts", NEWROOT "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5")) ||
	    (err = do_mount("shm", NEWROOT "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")) ||
	    (err = do_mount("run", NEWROOT "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")))
		return err;
	for (const unsigned char *q = p; rec_next(&q, end, &r) == 1;) {
		if (r.key == 'v' && (err = setup_volume(r.v, r.len, 0))) return err;
		if (r.key == 'd' && (err = setup_volume(r.v, r.len, 1))) return err;
	}
	if ((err = apply_identity(p, len))) return err;
	if (net && (err = setup_network())) return err;
	return NULL;
}

/* ---------- EXEC ---------- */

static struct proc *find_stream(uint32_t stream)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (procs[i].used && procs[i].stream == stream) return &procs[i];
	return NULL;
}

/* Child only: reads /etc/passwd or /etc/group of the current root (bounded). */
static char *slurp(const char *path)
{
	static char buf[1 << 20];
	return read_small(path, buf, sizeof buf) < 0 ? NULL : buf;
}

/* Child only: splits a colon-separated line in place; returns the field count. */
static int split(char *line, char **f, int max)
{
	int n = 0;
	f[n++] = line;
	for (char *s = line; *s && n < max; s++)
		if (*s == ':') { *s = 0; f[n++] = s + 1; }
	return n;
}

/* Child only: resolves `name`, `uid` or `uid:gid` (or `name:gid`) against the root's /etc files. */
static int resolve_user(const char *spec, uid_t *uid, gid_t *gid, gid_t *groups, int *ngroups, char *msg, size_t cap)
{
	char user[256], *colon, *f[8];
	unsigned long long u, g;
	int have_gid = 0, have_uid = 0, found = 0;
	if (snprintf(user, sizeof user, "%s", spec) >= (int)sizeof user) { /* never match a truncated name */
		snprintf(msg, cap, "user: name too long");
		return -1;
	}
	if ((colon = strchr(user, ':'))) {
		*colon = 0;
		if (parse_u64((unsigned char *)colon + 1, strlen(colon + 1), 0xfffffffeULL, &g) < 0) {
			snprintf(msg, cap, "user %s: bad gid", spec);
			return -1;
		}
		have_gid = 1;
	}
	have_uid = parse_u64((unsigned char *)user, strlen(user), 0xfffffffeULL, &u) == 0;
	*ngroups = 0;
	char *pw = slurp("/etc/passwd");
	for (char *line = pw, *next; line && *line; line = next) {
		if ((next = strchr(line, '\n'))) *next++ = 0;
		unsigned long long lu, lg;
		if (split(line, f, 8) < 4 || parse_u64((unsigned char *)f[2], strlen(f[2]), 0xfffffffeULL, &lu) < 0 ||
		    parse_u64((unsigned char *)f[3], strlen(f[3]), 0xfffffffeULL, &lg) < 0)
			continue;
		if (have_uid ? lu != u : strcmp(f[0], user)) continue;
		found = 1;
		u = lu;
		if (!have_gid) g = lg;
		snprintf(user, sizeof user, "%s", f[0]);
		break;
	}
	if (!found && !have_uid) {
		snprintf(msg, cap, "user %s: no such user in /etc/passwd", spec);
		return -1;
	}
	if (!found && !have_gid) g = 0; /* like docker: unknown uid runs with gid 0 */
	*uid = (uid_t)u;
	*gid = (gid_t)g;
	groups[(*ngroups)++] = *gid;
	char *gr = found ? slurp("/etc/group") : NULL;
	for (char *line = gr, *next; line && *line && *ngroups < MAX_GROUPS; line = next) {
		if ((next = strchr(line, '\n'))) *next++ = 0;
		unsigned long long lg;
		if (split(line, f, 8) < 4 || parse_u64((unsigned char *)f[2], strlen(f[2]), 0xfffffffeULL, &lg) < 0)
			continue;
		for (char *m = strtok(f[3], ","); m; m = strtok(NULL, ","))
			if (!strcmp(m, user) && lg != *gid) { groups[(*ngroups)++] = (gid_t)lg; break; }
	}
	return 0;
}

static void child_fail(int fd, const char *msg) __attribute__((noreturn));
static void child_fail(int fd, const char *msg)
{
	if (write(fd, msg, strlen(msg)) < 0) { /* parent sees exit 127 only */ }
	_exit(127);
}

/* The vfork child: it shares the agent's memory until it execs, so it only makes system calls, writes the
 * scratch buffers of resolve_user and `environ` (which the agent restores), and never returns. */
static void child_exec(int fds[8], int agent_root, const char *user, const char *cwd, char **argv, char **envp)
{
	char msg[512];
	int st = fds[7];
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	signal(SIGCHLD, SIG_DFL);
	if (setsid() < 0) child_fail(st, "setsid failed");
	/* Pipe fds are >= 3 (fds 0-2 are always held by the agent), so dup2 never aliases. */
	if (dup2(fds[0], 0) < 0 || dup2(fds[3], 1) < 0 || dup2(fds[5], 2) < 0) child_fail(st, "dup2 failed");
	if (!agent_root && (chroot(NEWROOT) < 0 || chdir("/") < 0)) {
		snprintf(msg, sizeof msg, "chroot: %s", strerror(errno));
		child_fail(st, msg);
	}
	if (user) {
		uid_t uid;
		gid_t gid, groups[MAX_GROUPS];
		int ng;
		if (resolve_user(user, &uid, &gid, groups, &ng, msg, sizeof msg) < 0) child_fail(st, msg);
		if (setgroups(ng, groups) < 0 || setgid(gid) < 0 || setuid(uid) < 0) {
			snprintf(msg, sizeof msg, "user %s: %s", user, strerror(errno));
			child_fail(st, msg);
		}
	}
	if (chdir(cwd ? cwd : "/") < 0) {
		snprintf(msg, sizeof msg, "chdir %s: %s", cwd ? cwd : "/", strerror(errno));
		child_fail(st, msg);
	}
	environ = envp; /* so that execvp searches the PATH the host gave */
	execvp(argv[0], argv);
	snprintf(msg, sizeof msg, "exec: %s", strerror(errno));
	child_fail(st, msg);
}

/* vfork: no page tables to copy and no copy-on-write faults afterwards, which under TCG made fork most of
 * an exec's cost. Returns once the child has exec'd or failed. A function of its own, so that no variable
 * of the caller lives across the vfork. */
static pid_t __attribute__((noinline)) spawn_child(int fds[8], int agent_root, const char *user, const char *cwd,
                                                   char **argv, char **envp)
{
	char **agent_environ = environ;
	pid_t pid = vfork();
	if (pid == 0) child_exec(fds, agent_root, user, cwd, argv, envp);
	environ = agent_environ;
	return pid;
}

static void do_exec(uint32_t stream, const unsigned char *p, size_t len)
{
	const unsigned char *q, *end = p + len;
	struct rec r;
	size_t na = 0, ne = 0;
	int k, agent_root = stdio_mode, slot = -1, fds[8];
	char **argv = NULL, **envp = NULL, *cwd = NULL, *user = NULL;

	if (stream == 0) { send_error(0, "protocol: EXEC on stream 0"); return; }
	if (find_stream(stream)) { send_error(0, "protocol: EXEC on busy stream %u", stream); return; }
	for (int i = 0; i < MAX_PROCS && slot < 0; i++)
		if (!procs[i].used) slot = i;
	if (slot < 0) { send_error(stream, "exec: too many executions"); return; }
	if (rec_check(p, len) < 0) { send_error(stream, "exec: malformed records"); return; }
	for (q = p; rec_next(&q, end, &r) == 1;) {
		na += r.key == 'a';
		ne += r.key == 'e';
	}
	if (na == 0) { send_error(stream, "exec: empty argv"); return; }
	argv = calloc(na + 1, sizeof *argv);
	envp = calloc(ne + 1, sizeof *envp);
	if (!argv || !envp) { send_error(stream, "exec: out of memory"); goto out; }
	na = ne = 0;
	for (q = p; rec_next(&q, end, &r) == 1;) {
		char *s = NULL, **dst = NULL;
		if (r.key == 'a') dst = &argv[na++];
		else if (r.key == 'e') dst = &envp[ne++];
		else if (r.key == 'c') { free(cwd); cwd = NULL; dst = &cwd; }
		else if (r.key == 'u') { free(user); user = NULL; dst = &user; }
		else if (r.key == 'r') {
			if (r.len == 5 && !memcmp(r.v, "agent", 5)) agent_root = 1;
			else if (!(r.len == 5 && !memcmp(r.v, "image", 5))) { send_error(stream, "exec: bad root"); goto out; }
		}
		if (dst && !(s = *dst = dupz(r.v, r.len))) {
			send_error(stream, "exec: value with NUL byte ('%c')", r.key);
			goto out;
		}
	}
	if (!agent_root && !setup_done) { send_error(stream, "exec: box root is not set up"); goto out; }

	/* fds: 0,1 stdin  2,3 stdout  4,5 stderr  6,7 exec status (read, write) */
	for (k = 0; k < 8; k++) fds[k] = -1;
	for (k = 0; k < 8; k += 2)
		if (pipe2(fds + k, O_CLOEXEC) < 0) { send_error(stream, "exec: pipe: %s", strerror(errno)); goto closefds; }
	/* Agent-side ends non-blocking (their own file descriptions) so a slow child never blocks the loop. */
	if (fcntl(fds[1], F_SETFL, O_NONBLOCK) < 0 || fcntl(fds[2], F_SETFL, O_NONBLOCK) < 0 ||
	    fcntl(fds[4], F_SETFL, O_NONBLOCK) < 0) {
		send_error(stream, "exec: fcntl: %s", strerror(errno));
		goto closefds;
	}
	int cf[8] = {fds[0], -1, -1, fds[3], -1, fds[5], -1, fds[7]};
	pid_t pid = spawn_child(cf, agent_root, user, cwd, argv, envp);
	if (pid < 0) { send_error(stream, "exec: vfork: %s", strerror(errno)); goto closefds; }
	close(fds[0]); close(fds[3]); close(fds[5]); close(fds[7]);
	fds[0] = fds[3] = fds[5] = fds[7] = -1;
	/* Exec status pipe: EOF on successful exec (CLOEXEC), else the child's error text. */
	char msg[512];
	size_t mn = 0;
	for (;;) {
		ssize_t n = read(fds[6], msg + mn, sizeof msg - 1 - mn);
		if (n < 0 && errno == EINTR) continue;
		if (n <= 0 || (mn += n) == sizeof msg - 1) break;
	}
	msg[mn] = 0;
	if (mn > 0) {
		int status;
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
		send_error(stream, "%s", msg);
		goto closefds;
	}
	close(fds[6]);
	struct proc *pr = &procs[slot];
	memset(pr, 0, sizeof *pr);
	pr->used = 1;
	pr->stream = stream;
	pr->pid = pid;
	pr->fd_in = fds[1];
	pr->fd_out = fds[2];
	pr->fd_err = fds[4];
	pr->credit = OUT_WINDOW;
	struct rb rb = {.n = 0};
	rb_num(&rb, 'p', pid);
	send_records(stream, T_STARTED, &rb);
	goto out;
closefds:
	for (k = 0; k < 8; k++)
		if (fds[k] >= 0) close(fds[k]);
out:
	for (size_t i = 0; argv && argv[i]; i++) free(argv[i]);
	for (size_t i = 0; envp && envp[i]; i++) free(envp[i]);
	free(argv); free(envp); free(cwd); free(user);
}

/* ---------- process I/O ---------- */

static void maybe_finish(struct proc *p)
{
	if (!p->reaped || p->fd_out >= 0 || p->fd_err >= 0) return;
	struct rb rb = {.n = 0};
	if (WIFSIGNALED(p->status)) rb_num(&rb, 's', WTERMSIG(p->status));
	else rb_num(&rb, 'x', WEXITSTATUS(p->status));
	send_records(p->stream, T_EXIT, &rb);
	if (p->fd_in >= 0) close(p->fd_in);
	free(p->inbuf);
	memset(p, 0, sizeof *p);
}

/* One read of stdout (w=0) or stderr (w=1) into a frame. 1: forwarded data (may read again). */
static int pump_out(struct proc *p, int w)
{
	int *fdp = w ? &p->fd_err : &p->fd_out;
	size_t want = MAX_PAYLOAD;
	if ((long long)want > p->credit) want = p->credit;
	if (p->reaped && want > p->budget[w]) want = p->budget[w];
	if (want == 0) {
		if (p->reaped && p->budget[w] == 0) { close(*fdp); *fdp = -1; }
		return 0; /* else: wait for CREDIT */
	}
	ssize_t n = read(*fdp, obuf + HDR, want);
	if (n > 0) {
		p->credit -= n;
		if (p->reaped) p->budget[w] -= n;
		send_raw(p->stream, w ? T_STDERR : T_STDOUT, n);
		return 1;
	}
	if (n < 0 && errno == EINTR) return 1;
	if (n < 0 && errno == EAGAIN && !p->reaped) return 0;
	/* EOF, error, or empty after reap (later output of grandchildren is dropped). */
	close(*fdp);
	*fdp = -1;
	return 0;
}

/* After reap: forward what the pipes hold, as far as credit allows, then EXIT. */
static void drain(struct proc *p)
{
	while (p->fd_out >= 0 && pump_out(p, 0)) {}
	while (p->fd_err >= 0 && pump_out(p, 1)) {}
	maybe_finish(p);
}

static void pump_in(struct proc *p)
{
	long long grant = 0;
	while (p->fd_in >= 0 && p->in_off < p->in_len) {
		ssize_t n = write(p->fd_in, p->inbuf + p->in_off, p->in_len - p->in_off);
		if (n > 0) { p->in_off += n; grant += n; continue; }
		if (n < 0 && errno == EINTR) continue;
		if (n < 0 && errno == EAGAIN) break;
		/* Reader gone (EPIPE): drop pending input, still credit it so the host's window stays right. */
		grant += p->in_len - p->in_off;
		p->in_off = p->in_len;
		close(p->fd_in);
		p->fd_in = -1;
	}
	if (p->in_off == p->in_len) {
		p->in_off = p->in_len = 0;
		if (p->stdin_eof && p->fd_in >= 0) { close(p->fd_in); p->fd_in = -1; }
	}
	if (grant) send_credit(p->stream, grant);
}

static void on_stdin(struct proc *p, const unsigned char *d, size_t len)
{
	if (len == 0) { p->stdin_eof = 1; pump_in(p); return; }
	if (p->fd_in < 0 || p->stdin_eof) { send_credit(p->stream, len); return; } /* discard */
	if (p->in_len - p->in_off + len > IN_WINDOW) {
		send_error(0, "protocol: stdin window exceeded on stream %u, %zu bytes dropped", p->stream, len);
		return;
	}
	if (!p->inbuf && !(p->inbuf = malloc(IN_WINDOW))) {
		send_error(0, "stdin: out of memory on stream %u", p->stream);
		return;
	}
	if (p->in_off) { /* compact so the append fits */
		memmove(p->inbuf, p->inbuf + p->in_off, p->in_len - p->in_off);
		p->in_len -= p->in_off;
		p->in_off = 0;
	}
	memcpy(p->inbuf + p->in_len, d, len);
	p->in_len += len;
	pump_in(p);
}

static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			if (!p->used || p->reaped || p->pid != pid) continue;
			p->reaped = 1;
			p->status = status;
			/* Drain at most what the pipes can hold, so a chatty grandchild cannot delay EXIT forever. */
			for (int w = 0; w < 2; w++) {
				int fd = w ? p->fd_err : p->fd_out;
				int sz = fd >= 0 ? fcntl(fd, F_GETPIPE_SZ) : 0;
				p->budget[w] = sz > 0 ? (size_t)sz : (1u << 20);
			}
			drain(p);
			break;
		}
	}
}

/* ---------- control ---------- */

static unsigned long long meminfo_kb(const char *buf, const char *key)
{
	const char *s = strstr(buf, key);
	return s ? strtoull(s + strlen(key), NULL, 10) : 0;
}

static void do_stat(uint32_t stream)
{
	char buf[8192];
	struct rb rb = {.n = 0};
	if (read_small("/proc/meminfo", buf, sizeof buf) < 0) buf[0] = 0;
	rb_num(&rb, 'm', (long long)meminfo_kb(buf, "MemTotal:"));
	rb_num(&rb, 'f', (long long)meminfo_kb(buf, "MemAvailable:"));
	unsigned long long u = 0, n = 0, s = 0;
	if (read_small("/proc/stat", buf, sizeof buf) >= 0 && sscanf(buf, "cpu %llu %llu %llu", &u, &n, &s) == 3)
		rb_num(&rb, 'u', (long long)(u + n + s));
	else
		rb_num(&rb, 'u', 0);
	unsigned long long sec = 0, cs = 0;
	if (read_small("/proc/uptime", buf, sizeof buf) >= 0) sscanf(buf, "%llu.%2llu", &sec, &cs);
	rb_num(&rb, 't', (long long)(sec * 100 + cs));
	long long np = 0;
	DIR *d = opendir("/proc");
	struct dirent *e;
	while (d && (e = readdir(d)))
		np += e->d_name[0] >= '1' && e->d_name[0] <= '9';
	if (d) closedir(d);
	rb_num(&rb, 'n', np);
	send_records(stream, T_STAT, &rb);
}

/* Value of the last record with `key` as a number, or `dflt` if absent. -1: malformed. */
static int rec_num(const unsigned char *p, size_t len, char key, unsigned long long max,
                   unsigned long long dflt, unsigned long long *out)
{
	struct rec r;
	const unsigned char *q = p;
	*out = dflt;
	if (rec_check(p, len) < 0) return -1;
	while (rec_next(&q, p + len, &r) == 1)
		if (r.key == key && parse_u64(r.v, r.len, max, out) < 0) return -1;
	return 0;
}

/* SETUP and RESUME records, checked as EXEC's are before anything is done: well-formed, no NUL byte in the
 * values used as strings, a network flag of 0 or 1, a hostname that fits. NULL if they are fine. */
static const char *check_setup_records(const unsigned char *p, size_t len)
{
	struct rec r;
	const unsigned char *q = p, *end = p + len;
	if (rec_check(p, len) < 0) return "malformed records";
	while (rec_next(&q, end, &r) == 1) {
		if (r.key && strchr("rwhtn", r.key) && memchr(r.v, 0, r.len)) {
			snprintf(errbuf, sizeof errbuf, "value with NUL byte ('%c')", r.key);
			return errbuf;
		}
		if (r.key == 'n' && !(r.len == 1 && (r.v[0] == '0' || r.v[0] == '1'))) return "bad network record (want 0 or 1)";
		if (r.key == 'h' && (r.len == 0 || r.len > 64)) return "hostname must be 1 to 64 bytes";
	}
	return NULL;
}

static void dispatch(uint32_t stream, int type, const unsigned char *p, size_t len)
{
	struct proc *pr = NULL;
	unsigned long long v;
	if (type == T_STDIN || type == T_KILL || type == T_CREDIT) {
		/* Streams that already ended are ignored: the host may race with EXIT. */
		if (stream == 0 || !(pr = find_stream(stream))) return;
	}
	switch (type) {
	case T_SETUP: {
		if (setup_done) { send_error(0, "setup: already done"); return; }
		const char *err = check_setup_records(p, len);
		if (!err && !stdio_mode) err = do_setup(p, len);
		if (err) { send_error(0, "setup: %s", err); return; }
		setup_done = 1;
		send_frame(0, T_READY, NULL, 0);
		return;
	}
	case T_RESUME: { /* the first message to a VM restored from a snapshot */
		const char *err = !setup_done ? "not set up" : check_setup_records(p, len);
		struct rec r;
		for (const unsigned char *q = p; !err && !stdio_mode && rec_next(&q, p + len, &r) == 1;)
			if (r.key == 'd') err = setup_volume(r.v, r.len, 1);
		if (!err && !stdio_mode) err = apply_identity(p, len);
		if (err) { send_error(0, "resume: %s", err); return; }
		send_frame(0, T_READY, NULL, 0);
		return;
	}
	case T_EXEC: do_exec(stream, p, len); return;
	case T_STDIN: on_stdin(pr, p, len); return;
	case T_KILL:
		if (rec_num(p, len, 'g', 64, SIGKILL, &v) < 0 || v == 0) { send_error(0, "protocol: bad KILL"); return; }
		if (!pr->reaped && kill(-pr->pid, (int)v) < 0) kill(pr->pid, (int)v);
		return;
	case T_CREDIT:
		if (rec_num(p, len, 'n', 1ULL << 40, 0, &v) < 0) { send_error(0, "protocol: bad CREDIT"); return; }
		if (pr->credit < (1LL << 42)) pr->credit += (long long)v;
		if (pr->reaped) drain(pr);
		return;
	case T_STAT: do_stat(stream); return;
	case T_PING: send_frame(stream, T_PONG, p, len); return;
	case T_SHUTDOWN: logmsg("shutdown"); finish(0);
	default: send_error(0, "protocol: unexpected frame type 0x%02x on stream %u", type, stream);
	}
}

static void read_channel(void)
{
	ssize_t n = read(chan_in, ibuf + ilen, sizeof ibuf - ilen);
	if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
	if (n <= 0) {
		logmsg("channel %s", n == 0 ? "closed" : strerror(errno));
		finish(n == 0 ? 0 : 1);
	}
	ilen += n;
	size_t off = 0;
	while (ilen - off >= HDR) {
		uint32_t len = get32(ibuf + off);
		if (len > MAX_PAYLOAD) {
			/* Framing is lost: nothing after this can be trusted to line up. */
			send_error(0, "protocol: frame length %u exceeds %d, closing", len, MAX_PAYLOAD);
			finish(2);
		}
		if (ilen - off < HDR + len) break;
		dispatch(get32(ibuf + off + 4), ibuf[off + 8], ibuf + off + HDR, len);
		off += HDR + len;
	}
	memmove(ibuf, ibuf + off, ilen - off);
	ilen -= off;
}

static void on_sigchld(int sig)
{
	int saved = errno;
	(void)sig;
	if (write(sig_pipe[1], "c", 1) < 0) { /* pipe full: a wakeup is already pending */ }
	errno = saved;
}

static void serve(void)
{
	static struct pollfd pfd[2 + 3 * MAX_PROCS];
	static short slot_of[2 + 3 * MAX_PROCS], which[2 + 3 * MAX_PROCS];
	for (;;) {
		int n = 2;
		pfd[0] = (struct pollfd){chan_in, POLLIN, 0};
		pfd[1] = (struct pollfd){sig_pipe[0], POLLIN, 0};
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			if (!p->used) continue;
			/* Reaped processes are drained from reap()/CREDIT; a used-up window stops polling. */
			if (!p->reaped && p->credit > 0) {
				if (p->fd_out >= 0) { pfd[n] = (struct pollfd){p->fd_out, POLLIN, 0}; slot_of[n] = i; which[n++] = 0; }
				if (p->fd_err >= 0) { pfd[n] = (struct pollfd){p->fd_err, POLLIN, 0}; slot_of[n] = i; which[n++] = 1; }
			}
			if (p->fd_in >= 0 && p->in_off < p->in_len) {
				pfd[n] = (struct pollfd){p->fd_in, POLLOUT, 0}; slot_of[n] = i; which[n++] = 2;
			}
		}
		if (poll(pfd, n, -1) < 0) {
			if (errno == EINTR) continue;
			logmsg("poll: %s", strerror(errno));
			finish(1);
		}
		for (int i = 2; i < n; i++) {
			struct proc *p = &procs[slot_of[i]];
			if (!pfd[i].revents || !p->used) continue;
			if (which[i] == 2 && p->fd_in == pfd[i].fd) pump_in(p);
			else if (which[i] == 0 && p->fd_out == pfd[i].fd && !p->reaped) pump_out(p, 0);
			else if (which[i] == 1 && p->fd_err == pfd[i].fd && !p->reaped) pump_out(p, 1);
		}
		if (pfd[1].revents) {
			char b[64];
			while (read(sig_pipe[0], b, sizeof b) > 0) {}
			reap();
		}
		if (pfd[0].revents) read_channel();
	}
}

int main(int argc, char **argv)
{
	stdio_mode = argc == 2 && !strcmp(argv[1], "--stdio");
	is_pid1 = !stdio_mode && getpid() == 1;
	if (!stdio_mode && !is_pid1) {
		fprintf(stderr, "usage: boxlite-agent --stdio (or run as PID 1 of a boxlite VM)\n");
		return 2;
	}
	if (is_pid1) {
		mkdir("/dev", 0755); mkdir("/proc", 0555); mkdir("/sys", 0555);
		if (chdir("/") < 0) { /* cannot happen; module paths are relative to / */ }
		/* EBUSY: already mounted (e.g. CONFIG_DEVTMPFS_MOUNT), which is fine. */
		int bad = (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY) |
		          (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) << 1 |
		          (mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) << 2;
		log_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
		if (bad) logmsg("early mounts failed (mask %d)", bad);
	}
	/* Keep fds 0-2 occupied so no pipe or channel lands there (the child dup2s onto them). */
	for (int fd; (fd = open("/dev/null", O_RDWR)) >= 0;)
		if (fd > 2) { close(fd); break; }
	if (log_fd >= 0 && log_fd <= 2 && is_pid1) log_fd = fcntl(log_fd, F_DUPFD_CLOEXEC, 3);
	signal(SIGPIPE, SIG_IGN);
	if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0) { logmsg("pipe: %s", strerror(errno)); finish(1); }
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_sigchld;
	sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
	sigaction(SIGCHLD, &sa, NULL);
	if (is_pid1) {
		load_modules();
		int fd = open_channel();
		if (fd < 0) { logmsg("no channel, powering off"); finish(1); }
		chan_in = chan_out = fd;
	} else {
		chan_in = 0;
		chan_out = 1;
	}
	struct utsname un;
	struct rb rb = {.n = 0};
	rb_add(&rb, 'v', AGENT_VERSION, strlen(AGENT_VERSION));
	if (uname(&un) == 0) rb_add(&rb, 'k', un.release, strlen(un.release));
	send_records(0, T_HELLO, &rb);
	serve();
	return 0;
}
