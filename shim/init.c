/*
 * kestrel-shim: the init (PID 1) of a kestrel image in default mode.
 *
 * The kernel runs /init from the initramfs with nothing mounted and, when the
 * image has no /dev/console, no stdio at all. This program does the few
 * things that must happen before Python can run, then replaces itself with
 * the agent:
 *
 *   1. devtmpfs on /dev and /dev/console as fds 0, 1, 2;
 *   2. proc, sysfs, devpts, /dev/shm, /run, /tmp, cgroup2;
 *   3. the kernel modules listed in /etc/kestrel/modules.load, in order;
 *   4. execv("/bin/kestrel") with the environment the kernel gave us.
 *
 * Doing all mounts here keeps kestrel's boot path free of ctypes: kestrel
 * mounts only what is still missing. The shim never forks, never waits and
 * never returns: a PID 1 that exits panics the kernel, so every fatal error
 * prints "INIT PANIC: <what>: <strerror>" and powers the machine off.
 *
 * Read top to bottom. Build: see builder/shim.py (static, -Os, reproducible).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

/* Shared with kestrel/layout.py (AGENT_PATH, MODULES_LOAD_LIST). */
#define AGENT_PATH "/bin/kestrel"
#define MODULES_LOAD_LIST "/etc/kestrel/modules.load"
#define MODULES_ROOT "/lib/modules"

/* finit_module(2): x86_64 syscall 313 (arch/x86/entry/syscalls/syscall_64.tbl).
 * Called through syscall(2) because neither glibc nor musl wraps it. */
#ifndef SYS_finit_module
#if defined(__x86_64__)
#define SYS_finit_module 313
#else
#error "SYS_finit_module unknown for this architecture"
#endif
#endif

/* /dev/console is character device 5:1 (Documentation/admin-guide/devices.txt). */
#define CONSOLE_MAJOR 5
#define CONSOLE_MINOR 1

/* ---- output ------------------------------------------------------------- */

/* One write(2) per line: the kernel console may interleave its own messages,
 * and a line written in pieces would be torn. Errors are ignored: there is
 * nowhere else to report them. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
	while (len > 0) {
		ssize_t w = write(STDERR_FILENO, line, len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		memmove(line, line + w, len - (size_t)w);
		len -= (size_t)w;
	}
}

/* Fatal: report, flush filesystems, power off. reboot(2) only returns on
 * failure (no CAP_SYS_BOOT); even then PID 1 must not exit, so it parks. */
static void __attribute__((noreturn)) panic(const char *what, int err)
{
	say("INIT PANIC: %s: %s\n", what, strerror(err));
	sync();
	if (reboot(RB_POWER_OFF) != 0)
		say("INIT PANIC: reboot(RB_POWER_OFF): %s\n", strerror(errno));
	for (;;)
		pause();
}

static double now_ms(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		panic("clock_gettime(CLOCK_MONOTONIC)", errno);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ---- mounts ------------------------------------------------------------- */

/* A directory is a mount point when it lives on another device than its
 * parent, or is its own parent ("/"). /proc/self/mountinfo is not available
 * yet when /dev is checked, and in an initramfs nothing is bind-mounted, so
 * the mountpoint(1) rule is enough. */
static int is_mountpoint(const char *path)
{
	char parent[PATH_MAX];
	struct stat self, up;
	if (snprintf(parent, sizeof parent, "%s/..", path) >= (int)sizeof parent)
		return 0;
	if (stat(path, &self) != 0 || stat(parent, &up) != 0)
		return 0;
	return self.st_dev != up.st_dev || self.st_ino == up.st_ino;
}

static void make_dir(const char *path, mode_t mode)
{
	if (mkdir(path, mode) != 0 && errno != EEXIST) {
		char what[PATH_MAX + 16];
		snprintf(what, sizeof what, "mkdir %s", path);
		panic(what, errno);
	}
}

struct mountspec {
	const char *source;
	const char *target;
	const char *fstype;
	unsigned long flags;
	const char *data;
	mode_t dir_mode;  /* 0: never create the directory (it lives on sysfs) */
	int required;     /* 0: best effort, a failure is only reported */
};

/* Order matters: devpts and shm live under /dev (mounted before), cgroup2
 * under /sys. Data strings match what systemd and Docker use. */
static const struct mountspec mounts[] = {
	{ "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0555, 1 },
	{ "sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0555, 1 },
	/* newinstance: a private pty namespace; gid 5 is "tty" in Debian and
	 * busybox images; ptmxmode lets non-root workloads open /dev/pts/ptmx. */
	{ "devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
	  "mode=0620,gid=5,ptmxmode=0666,newinstance", 0755, 1 },
	{ "shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 01777, 1 },
	{ "tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", 0755, 1 },
	{ "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 01777, 1 },
	/* Best effort: a kernel without cgroup2 still runs workloads; kestrel
	 * then reports OOM from the kernel log instead of memory.events. */
	{ "cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC,
	  NULL, 0, 0 },
};

static void mount_one(const struct mountspec *m)
{
	char what[PATH_MAX + 32];
	snprintf(what, sizeof what, "mount %s on %s", m->fstype, m->target);
	if (m->dir_mode != 0)
		make_dir(m->target, m->dir_mode);
	else if (access(m->target, F_OK) != 0) {
		if (m->required)
			panic(what, errno);
		say("INIT: %s: %s (skipped)\n", what, strerror(errno));
		return;
	}
	/* Already mounted (an initramfs with a pre-mounted /dev, a re-exec):
	 * mounting again would stack a second, empty instance on top. */
	if (is_mountpoint(m->target))
		return;
	if (mount(m->source, m->target, m->fstype, m->flags, m->data) != 0) {
		if (m->required)
			panic(what, errno);
		say("INIT: %s: %s (skipped)\n", what, strerror(errno));
	}
}

/* /dev first: without /dev/console there is nowhere to print the rest. */
static void setup_console(void)
{
	make_dir("/dev", 0755);
	if (!is_mountpoint("/dev") &&
	    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") != 0 &&
	    errno != EBUSY)
		panic("mount devtmpfs on /dev", errno);

	/* devtmpfs normally provides the node; a kernel without devtmpfs or an
	 * image with its own /dev may not. */
	struct stat st;
	if (stat("/dev/console", &st) != 0) {
		if (errno != ENOENT)
			panic("stat /dev/console", errno);
		if (mknod("/dev/console", S_IFCHR | 0600,
			  makedev(CONSOLE_MAJOR, CONSOLE_MINOR)) != 0)
			panic("mknod /dev/console", errno);
	}

	/* O_NOCTTY: PID 1 must not get a controlling terminal, or a hang-up on
	 * the console would send it SIGHUP. */
	int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0)
		panic("open /dev/console", errno);
	for (int target = 0; target <= 2; target++) {
		/* dup2 clears O_CLOEXEC on the copies: kestrel inherits 0-2. */
		if (dup2(fd, target) < 0)
			panic("dup2 /dev/console", errno);
	}
	if (fd > 2 && close(fd) != 0)
		panic("close /dev/console", errno);
}

/* ---- modules ------------------------------------------------------------ */

/* A module that fails to load is reported and the boot continues. The shim
 * does not know which modules matter for this boot (virtio_mmio is useless
 * on a PCI machine, a built-in driver has no .ko); kestrel does, because it
 * knows its channel, and it reports a missing channel device with the
 * manifest in hand before powering off. Stopping here would hide that. */
static int load_module(const char *release, const char *relpath)
{
	char path[PATH_MAX];
	if (snprintf(path, sizeof path, "%s/%s/%s", MODULES_ROOT, release, relpath) >=
	    (int)sizeof path) {
		say("INIT: module %s: %s\n", relpath, strerror(ENAMETOOLONG));
		return 0;
	}
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		say("INIT: module %s: %s\n", relpath, strerror(errno));
		return 0;
	}
	long rc = syscall(SYS_finit_module, fd, "", 0);
	int err = errno;
	if (close(fd) != 0)
		say("INIT: module %s: close: %s\n", relpath, strerror(errno));
	/* EEXIST: already loaded (a dependency listed twice, or built in). */
	if (rc != 0 && err != EEXIST) {
		say("INIT: module %s: %s\n", relpath, strerror(err));
		return 0;
	}
	return 1;
}

/* Returns the number of modules loaded (or already present). */
static int load_modules(void)
{
	FILE *list = fopen(MODULES_LOAD_LIST, "re");
	if (list == NULL) {
		/* No list: an image without modules (custom kernel, all built in). */
		if (errno == ENOENT)
			return 0;
		panic("open " MODULES_LOAD_LIST, errno);
	}
	struct utsname uts;
	if (uname(&uts) != 0)
		panic("uname", errno);

	int loaded = 0;
	char *line = NULL;
	size_t cap = 0;
	ssize_t len;
	errno = 0;
	while ((len = getline(&line, &cap, list)) >= 0) {
		/* Trim surrounding blanks and the newline; skip comments. */
		char *start = line;
		while (*start == ' ' || *start == '\t')
			start++;
		char *end = start + strlen(start);
		while (end > start && (end[-1] == '\n' || end[-1] == '\r' ||
				       end[-1] == ' ' || end[-1] == '\t'))
			*--end = '\0';
		if (*start == '\0' || *start == '#')
			continue;
		loaded += load_module(uts.release, start);
		errno = 0;
	}
	if (ferror(list))
		panic("read " MODULES_LOAD_LIST, errno ? errno : EIO);
	free(line);
	if (fclose(list) != 0)
		panic("close " MODULES_LOAD_LIST, errno);
	return loaded;
}

/* ---- main --------------------------------------------------------------- */

int main(void)
{
	/* Everything below mounts filesystems and powers the machine off on
	 * error: refuse to do that to a host where someone ran us by mistake. */
	if (getpid() != 1) {
		fprintf(stderr, "kestrel-shim: not PID 1 (pid %ld): this is the init of a "
			"kestrel image; refusing to run\n", (long)getpid());
		return 2;
	}
	setup_console();
	for (size_t i = 0; i < sizeof mounts / sizeof mounts[0]; i++)
		mount_one(&mounts[i]);

	/* Timed: under TCG module loading is the shim's only slow step. */
	double start = now_ms();
	int loaded = load_modules();

	say("kestrel-shim: modules loaded (%d) in %.1f ms, exec %s\n", loaded,
	    now_ms() - start, AGENT_PATH);

	/* execv passes environ on: the kernel's environment (HOME, TERM and
	 * any key=value from the command line it did not recognise). */
	char *const argv[] = { "kestrel", NULL };
	execv(AGENT_PATH, argv);
	int err = errno;
	/* execve reports a missing #! interpreter or ELF loader as ENOENT, which
	 * reads as if /bin/kestrel itself were missing: say which it is. */
	if (err == ENOENT && access(AGENT_PATH, F_OK) == 0)
		panic("exec " AGENT_PATH " (its interpreter is missing)", err);
	panic("exec " AGENT_PATH, err);
}
