/*
 * cfs: a PROTOTYPE (bench only, issue 14) of mirrorfs's request handling in C against libfuse3's
 * low-level API, to learn which ratio to passthrough_ll a compiled file-system capture reaches.
 * Not product code.
 *
 *   cfs --source DIR --target DIR --state DIR [--keep-segments] MOUNTPOINT
 *
 * Like app/engine/mirrorfs.py it is mounted over DIR (default_permissions, allow_other, no
 * writeback cache, 1 s entry/attribute timeouts) and passes every request through to DIR's
 * tree, reached through an O_PATH fd per known inode (as libfuse's passthrough_ll does). Every
 * change is applied below and, if that worked, queued as a journal record before the reply, in
 * the request order (one thread serves /dev/fuse); fsync makes the records durable: those not
 * yet on disk are written to the segment file in the journal's format (app/engine/journal.py,
 * kind 1, the op names and JSON arguments mirrorfs writes) and fdatasync'ed. An applier thread
 * replays the records onto the target directory in order, as app/engine/applier.py does.
 * mirrorfs's owner rules are kept: the caller owns what it creates, a set-group-ID directory
 * hands down its group, and times are recorded after each change and at release.
 *
 * STATE/status (shared memory) reads "last_seq applied_seq lag_ms" for the bench's drain and lag.
 * Left out: the daemon protocol, freeze for mirror/verify, nested mounts, replicate_atime, more
 * than one name per hard-linked inode, names that are not ASCII in the JSON (escaped bytewise),
 * and spilling to disk when the 64 MiB memory queue is full (the capture waits instead).
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <fuse_lowlevel.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define KIND_FS 1
#define SEGMENT_BYTES (5 * 1000 * 1000)
#define MEMORY_BYTES (64u << 20)
#define TIMEOUT 1.0

/* -- inodes: an O_PATH fd each, and one name (parent, name) for the journal's paths -------- */
struct node {
	struct node *hnext; /* (dev, ino) hash chain */
	dev_t dev;
	ino_t ino;
	int fd;
	uint64_t nlookup;
	struct node *parent; /* NULL: no name left (unlinked), or the root */
	char *name;
	int no_caps; /* security.capability known absent */
};

#define HASH 65536
static struct node *table[HASH];
static struct node root;

static unsigned hash(dev_t dev, ino_t ino) { return (unsigned)((ino * 2654435761u) ^ dev) % HASH; }

static struct node *find(dev_t dev, ino_t ino)
{
	for (struct node *n = table[hash(dev, ino)]; n; n = n->hnext)
		if (n->dev == dev && n->ino == ino)
			return n;
	return NULL;
}

static struct node *N(fuse_ino_t ino) { return ino == FUSE_ROOT_ID ? &root : (struct node *)(uintptr_t)ino; }
static fuse_ino_t I(struct node *n) { return n == &root ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)n; }

static void set_name(struct node *n, struct node *parent, const char *name)
{
	free(n->name);
	n->parent = parent;
	n->name = parent ? strdup(name) : NULL;
}

/* The entry-relative path of n ("" for the root) into buf; -1 when it has no name left. */
static int path_of(struct node *n, char *buf, size_t size)
{
	const char *parts[256];
	int k = 0;
	for (struct node *p = n; p != &root; p = p->parent) {
		if (!p->parent || k == 256)
			return -1;
		parts[k++] = p->name;
	}
	size_t used = 0;
	buf[0] = '\0';
	while (k--) {
		int w = snprintf(buf + used, size - used, used ? "/%s" : "%s", parts[k]);
		if (w < 0 || (size_t)w >= size - used)
			return -1;
		used += w;
	}
	return 0;
}

static int child_path(struct node *parent, const char *name, char *buf, size_t size)
{
	if (path_of(parent, buf, size) < 0)
		return -1;
	size_t used = strlen(buf);
	int w = snprintf(buf + used, size - used, used ? "/%s" : "%s", name);
	return w < 0 || (size_t)w >= size - used ? -1 : 0;
}

/* -- journal: records in one ring, encoded to journal.py's format only when spilled -------- */
enum op { OP_CREATE, OP_TIMES, OP_WRITE, OP_MKDIR, OP_SYMLINK, OP_LINK, OP_UNLINK, OP_RMDIR, OP_RENAME,
	  OP_TRUNCATE, OP_CHMOD, OP_CHOWN, OP_SETXATTR, OP_REMOVEXATTR, OP_MKNOD };
static const char *op_names[] = {"create", "times", "write", "mkdir", "symlink", "link", "unlink", "rmdir",
				 "rename", "truncate", "chmod", "chown", "setxattr", "removexattr", "mknod"};

struct rec {
	struct rec *next;
	size_t pos, need, charge;
	uint64_t seq;
	double when;
	int op;
	int64_t a, b, c, d; /* mode/size/offset/uid/gid/mtime/flags/rdev, by op */
	uint32_t p1len, p2len;
	size_t dlen;
	unsigned char bytes[]; /* path, second path (or xattr name / symlink target), data */
};

static struct {
	int target, state_dir, keep_segments;
	pthread_mutex_t lock;
	pthread_cond_t more, room;
	unsigned char *ring;
	size_t head_off, tail_off, used;
	struct rec *head, *tail, *unspilled;
	uint64_t last_seq, applied_seq;
	int seg_fd;
	size_t seg_size;
	int stop, applier_asleep;
	char *status; /* STATE/status, shared memory: "last_seq applied_seq lag_ms" for the bench */
} J = {.lock = PTHREAD_MUTEX_INITIALIZER, .more = PTHREAD_COND_INITIALIZER,
       .room = PTHREAD_COND_INITIALIZER, .seg_fd = -1};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long ring_place(size_t n, size_t *waste)
{
	*waste = 0;
	if (J.used == 0)
		J.head_off = J.tail_off = 0;
	if (J.used == 0 || J.tail_off > J.head_off) {
		if (J.tail_off + n <= MEMORY_BYTES)
			return J.tail_off;
		if (n < J.head_off) {
			*waste = MEMORY_BYTES - J.tail_off;
			return 0;
		}
		return -1;
	}
	return J.tail_off + n < J.head_off ? (long)J.tail_off : -1;
}

static void show_status(void)
{
	double lag = J.head ? now() - J.head->when : 0;
	snprintf(J.status, 64, "%llu %llu %d\n%40s", (unsigned long long)J.last_seq,
		 (unsigned long long)J.applied_seq, (int)(lag * 1000), "");
}

static void record(int op, const char *p1, const char *p2, const void *data, size_t dlen,
		   int64_t a, int64_t b, int64_t c, int64_t d)
{
	size_t l1 = strlen(p1), l2 = p2 ? strlen(p2) : 0;
	size_t need = (sizeof(struct rec) + l1 + l2 + dlen + 15) & ~(size_t)15, waste;
	long pos;
	pthread_mutex_lock(&J.lock);
	while ((pos = ring_place(need, &waste)) < 0)
		pthread_cond_wait(&J.room, &J.lock);
	struct rec *r = (struct rec *)(J.ring + pos);
	r->pos = pos;
	r->need = need;
	r->charge = need + waste;
	J.tail_off = pos + need;
	J.used += r->charge;
	r->next = NULL;
	r->seq = ++J.last_seq;
	r->when = now();
	r->op = op;
	r->a = a, r->b = b, r->c = c, r->d = d;
	r->p1len = l1, r->p2len = l2, r->dlen = dlen;
	memcpy(r->bytes, p1, l1);
	if (l2)
		memcpy(r->bytes + l1, p2, l2);
	if (dlen)
		memcpy(r->bytes + l1 + l2, data, dlen);
	if (J.tail)
		J.tail->next = r;
	else
		J.head = r;
	J.tail = r;
	if (!J.unspilled)
		J.unspilled = r;
	if (J.applier_asleep)
		pthread_cond_signal(&J.more);
	show_status();
	pthread_mutex_unlock(&J.lock);
}

static size_t json_str(char *out, const unsigned char *s, size_t n)
{
	size_t k = 0;
	out[k++] = '"';
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = s[i];
		if (ch == '"' || ch == '\\')
			k += sprintf(out + k, "\\%c", ch);
		else if (ch < 0x20 || ch >= 0x7f)
			k += sprintf(out + k, "\\u%04x", ch < 0x80 ? ch : 0xdc00 + ch); /* surrogate escape */
		else
			out[k++] = ch;
	}
	out[k++] = '"';
	return k;
}

/* The record's JSON arguments, keys as mirrorfs writes them. */
static size_t json_args(struct rec *r, char *out)
{
	char p1[8192], p2[8192];
	p1[json_str(p1, r->bytes, r->p1len)] = '\0';
	p2[json_str(p2, r->bytes + r->p1len, r->p2len)] = '\0';
	switch (r->op) {
	case OP_CREATE: case OP_MKDIR:
		return sprintf(out, "{\"path\":%s,\"mode\":%lld,\"uid\":%lld,\"gid\":%lld}", p1, (long long)r->a,
			       (long long)r->b, (long long)r->c);
	case OP_MKNOD:
		return sprintf(out, "{\"path\":%s,\"mode\":%lld,\"rdev\":%lld,\"uid\":%lld,\"gid\":%lld}", p1,
			       (long long)r->a, (long long)r->d, (long long)r->b, (long long)r->c);
	case OP_TIMES:
		return r->b < 0 ? sprintf(out, "{\"path\":%s,\"atime\":null,\"mtime\":%lld}", p1, (long long)r->a)
				: sprintf(out, "{\"path\":%s,\"atime\":%lld,\"mtime\":%lld}", p1, (long long)r->b,
					  (long long)r->a);
	case OP_WRITE:
		return sprintf(out, "{\"path\":%s,\"offset\":%lld}", p1, (long long)r->a);
	case OP_SYMLINK:
		return sprintf(out, "{\"path\":%s,\"target\":%s,\"uid\":%lld,\"gid\":%lld}", p1, p2, (long long)r->b,
			       (long long)r->c);
	case OP_LINK:
		return sprintf(out, "{\"src\":%s,\"path\":%s}", p2, p1);
	case OP_RENAME:
		return sprintf(out, "{\"old\":%s,\"new\":%s,\"flags\":%lld}", p1, p2, (long long)r->a);
	case OP_TRUNCATE:
		return sprintf(out, "{\"path\":%s,\"size\":%lld}", p1, (long long)r->a);
	case OP_CHMOD:
		return sprintf(out, "{\"path\":%s,\"mode\":%lld}", p1, (long long)r->a);
	case OP_CHOWN:
		return sprintf(out, "{\"path\":%s,\"uid\":%lld,\"gid\":%lld}", p1, (long long)r->b, (long long)r->c);
	case OP_SETXATTR: case OP_REMOVEXATTR:
		return sprintf(out, "{\"path\":%s,\"name\":%s}", p1, p2);
	default: /* unlink, rmdir */
		return sprintf(out, "{\"path\":%s}", p1);
	}
}

static void put16(unsigned char *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }

/* Write every record not yet on disk in journal.py's format, then fdatasync (J.lock held). */
static int spill(void)
{
	static char args[40000];
	unsigned char head[64];
	int synced = 0;
	for (struct rec *r = J.unspilled; r; r = r->next) {
		const char *op = op_names[r->op];
		size_t olen = strlen(op), alen = json_args(r, args);
		const unsigned char *data = r->bytes + r->p1len + r->p2len;
		size_t dlen = (r->op == OP_WRITE || r->op == OP_SETXATTR) ? r->dlen : 0;
		put64(head + 8, r->seq);
		head[16] = KIND_FS;
		put16(head + 17, olen);
		put32(head + 19, alen);
		uLong crc = crc32(0L, Z_NULL, 0);
		crc = crc32(crc, head + 8, 15);
		crc = crc32(crc, (const unsigned char *)op, olen);
		crc = crc32(crc, (const unsigned char *)args, alen);
		crc = crc32(crc, data, dlen);
		size_t len = 15 + olen + alen + dlen;
		put32(head, len);
		put32(head + 4, crc);
		if (J.seg_fd < 0 || J.seg_size + 8 + len > SEGMENT_BYTES) {
			char name[32];
			if (J.seg_fd >= 0) {
				fdatasync(J.seg_fd);
				close(J.seg_fd);
			}
			snprintf(name, sizeof name, "%020llu.seg", (unsigned long long)r->seq);
			J.seg_fd = openat(J.state_dir, name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
			J.seg_size = 0;
			if (J.seg_fd < 0)
				return -errno;
		}
		struct iovec iov[4] = {{head, 23}, {(void *)op, olen}, {args, alen}, {(void *)data, dlen}};
		if (writev(J.seg_fd, iov, 4) != (ssize_t)(8 + len))
			return -EIO;
		J.seg_size += 8 + len;
		synced = 1;
	}
	J.unspilled = NULL;
	if (synced && fdatasync(J.seg_fd) < 0)
		return -errno;
	return 0;
}

static int journal_sync(void)
{
	pthread_mutex_lock(&J.lock);
	int err = spill();
	pthread_mutex_unlock(&J.lock);
	return err;
}

/* -- the applier: records in order onto the target, as applier.py ------------------------- */
static char cached_path[4096];
static int cached_fd = -1;

static int target_fd_for(const char *p)
{
	if (cached_fd >= 0 && !strcmp(p, cached_path))
		return cached_fd;
	if (cached_fd >= 0)
		close(cached_fd);
	cached_fd = openat(J.target, *p ? p : ".", O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
	snprintf(cached_path, sizeof cached_path, "%s", p);
	return cached_fd;
}

static void forget_cached(void)
{
	if (cached_fd >= 0)
		close(cached_fd);
	cached_fd = -1;
}

static void apply(struct rec *r)
{
	char p1[4096], p2[4096];
	memcpy(p1, r->bytes, r->p1len);
	p1[r->p1len] = '\0';
	memcpy(p2, r->bytes + r->p1len, r->p2len);
	p2[r->p2len] = '\0';
	const char *at = *p1 ? p1 : ".";
	const unsigned char *data = r->bytes + r->p1len + r->p2len;
	int t = J.target, fd;
	switch (r->op) {
	case OP_WRITE:
		pwrite(target_fd_for(p1), data, r->dlen, r->a);
		break;
	case OP_TRUNCATE:
		ftruncate(target_fd_for(p1), r->a);
		break;
	case OP_TIMES: {
		struct timespec ts[2] = {{0, UTIME_OMIT}, {r->a / 1000000000, r->a % 1000000000}};
		if (r->b >= 0)
			ts[0] = (struct timespec){r->b / 1000000000, r->b % 1000000000};
		utimensat(t, at, ts, AT_SYMLINK_NOFOLLOW);
		break;
	}
	case OP_CREATE:
		fd = openat(t, p1, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, r->a);
		if (fd < 0 && errno == EEXIST)
			fd = openat(t, p1, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC);
		if (fd >= 0) {
			fchmod(fd, r->a);
			fchown(fd, r->b, r->c);
			close(fd);
		}
		break;
	case OP_MKDIR:
		mkdirat(t, p1, r->a);
		fchmodat(t, p1, r->a, 0);
		fchownat(t, p1, r->b, r->c, AT_SYMLINK_NOFOLLOW);
		break;
	case OP_MKNOD:
		if (mknodat(t, p1, r->a, r->d) < 0 && errno == EEXIST) {
			unlinkat(t, p1, 0);
			mknodat(t, p1, r->a, r->d);
		}
		fchownat(t, p1, r->b, r->c, AT_SYMLINK_NOFOLLOW);
		break;
	case OP_SYMLINK:
		if (symlinkat(p2, t, p1) < 0 && errno == EEXIST) {
			unlinkat(t, p1, 0);
			symlinkat(p2, t, p1);
		}
		fchownat(t, p1, r->b, r->c, AT_SYMLINK_NOFOLLOW);
		break;
	case OP_LINK:
		forget_cached();
		linkat(t, p2, t, p1, 0);
		break;
	case OP_UNLINK:
		forget_cached();
		unlinkat(t, p1, 0);
		break;
	case OP_RMDIR:
		forget_cached();
		unlinkat(t, p1, AT_REMOVEDIR);
		break;
	case OP_RENAME:
		forget_cached();
		renameat2(t, p1, t, p2, r->a & RENAME_EXCHANGE);
		break;
	case OP_CHMOD:
		fchmodat(t, at, r->a, 0);
		break;
	case OP_CHOWN:
		fchownat(t, at, r->b, r->c, AT_SYMLINK_NOFOLLOW);
		break;
	case OP_SETXATTR: case OP_REMOVEXATTR: {
		char proc[4200];
		snprintf(proc, sizeof proc, "/proc/self/fd/%d/%s", t, p1);
		if (r->op == OP_SETXATTR)
			lsetxattr(proc, p2, data, r->dlen, 0);
		else
			lremovexattr(proc, p2);
		break;
	}
	}
}

static void persist_applied(uint64_t seq)
{
	char buf[32];
	int n = snprintf(buf, sizeof buf, "%llu\n", (unsigned long long)seq);
	int fd = openat(J.state_dir, "applied.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	if (write(fd, buf, n) == n && fsync(fd) == 0)
		renameat(J.state_dir, "applied.tmp", J.state_dir, "applied");
	close(fd);
}

static void drop_segments(void)
{
	if (J.keep_segments)
		return;
	if (J.seg_fd >= 0) {
		close(J.seg_fd);
		J.seg_fd = -1;
	}
	int dfd = openat(J.state_dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
	struct dirent *e;
	while (d && (e = readdir(d)))
		if (strlen(e->d_name) == 24 && !strcmp(e->d_name + 20, ".seg"))
			unlinkat(J.state_dir, e->d_name, 0);
	if (d)
		closedir(d);
}

static void *applier(void *arg)
{
	(void)arg;
	double last_persist = now(), last_work = 0;
	uint64_t persisted = 0;
	pthread_mutex_lock(&J.lock);
	for (;;) {
		if (!J.head && !J.stop && now() - last_work < 0.05) {
			pthread_mutex_unlock(&J.lock); /* busy lately: look again in 1 ms */
			usleep(1000);
			pthread_mutex_lock(&J.lock);
		} else if (!J.head && !J.stop) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += 100 * 1000 * 1000;
			if (ts.tv_nsec >= 1000000000) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			J.applier_asleep = 1;
			pthread_cond_timedwait(&J.more, &J.lock, &ts);
			J.applier_asleep = 0;
		}
		struct rec *r = J.head;
		if (r) {
			last_work = now();
			pthread_mutex_unlock(&J.lock);
			apply(r);
			pthread_mutex_lock(&J.lock);
			J.head = r->next;
			if (!J.head)
				J.tail = NULL;
			if (J.unspilled == r)
				J.unspilled = r->next;
			J.applied_seq = r->seq;
			J.head_off = r->pos + r->need;
			J.used -= r->charge;
			show_status();
			pthread_cond_broadcast(&J.room);
		}
		double since = now() - last_persist;
		if (J.applied_seq != persisted && (since > 1.0 || (!J.head && (since > 0.25 || J.stop)))) {
			uint64_t seq = J.applied_seq;
			pthread_mutex_unlock(&J.lock);
			syncfs(J.target);
			persist_applied(seq);
			pthread_mutex_lock(&J.lock);
			persisted = seq;
			last_persist = now();
			if (!J.head && persisted == J.last_seq)
				drop_segments();
		}
		if (J.stop && !J.head && J.applied_seq == persisted)
			break;
	}
	pthread_mutex_unlock(&J.lock);
	forget_cached();
	return NULL;
}

/* -- FUSE --------------------------------------------------------------------------------- */
#define PATH_MAX_ 4096
#define FAIL(req, err) do { fuse_reply_err(req, err); return; } while (0)

static int lower_stat(struct node *n, struct stat *st)
{
	return fstatat(n->fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
}

static void times_of(struct node *n, const struct stat *given)
{
	char p[PATH_MAX_];
	struct stat st;
	if (path_of(n, p, sizeof p) < 0)
		return;
	if (!given) {
		if (lower_stat(n, &st) < 0)
			return;
		given = &st;
	}
	record(OP_TIMES, p, NULL, NULL, 0, given->st_mtim.tv_sec * 1000000000LL + given->st_mtim.tv_nsec, -1, 0, 0);
}

/* The node for name in parent (made if new), counted as a lookup; e filled for the reply. */
static int do_lookup(struct node *parent, const char *name, struct fuse_entry_param *e)
{
	memset(e, 0, sizeof *e);
	e->attr_timeout = e->entry_timeout = TIMEOUT;
	if (fstatat(parent->fd, name, &e->attr, AT_SYMLINK_NOFOLLOW) < 0)
		return errno;
	struct node *n = find(e->attr.st_dev, e->attr.st_ino);
	if (!n) {
		int fd = openat(parent->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0)
			return errno;
		n = calloc(1, sizeof *n);
		n->fd = fd;
		n->dev = e->attr.st_dev;
		n->ino = e->attr.st_ino;
		unsigned h = hash(n->dev, n->ino);
		n->hnext = table[h];
		table[h] = n;
		set_name(n, parent, name);
	} else if (!n->parent || strcmp(n->name, name) || n->parent != parent) {
		set_name(n, parent, name);
	}
	n->nlookup++;
	e->ino = I(n);
	return 0;
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	int err = do_lookup(N(parent), name, &e);
	if (err) { /* ENOENT as mirrorfs and passthrough_ll answer it: no negative entry cached */
		fuse_reply_err(req, err);
	} else {
		fuse_reply_entry(req, &e);
	}
}

static void forget_one(fuse_ino_t ino, uint64_t nlookup)
{
	struct node *n = N(ino);
	if (n == &root)
		return;
	n->nlookup -= nlookup < n->nlookup ? nlookup : n->nlookup;
	if (n->nlookup)
		return;
	struct node **pp = &table[hash(n->dev, n->ino)];
	while (*pp != n)
		pp = &(*pp)->hnext;
	*pp = n->hnext;
	close(n->fd);
	free(n->name);
	free(n);
}

static void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	forget_one(ino, nlookup);
	fuse_reply_none(req);
}

static void ll_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *f)
{
	for (size_t i = 0; i < count; i++)
		forget_one(f[i].ino, f[i].nlookup);
	fuse_reply_none(req);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;
	int r = fi ? fstat(fi->fh, &st) : lower_stat(N(ino), &st);
	if (r < 0)
		FAIL(req, errno);
	fuse_reply_attr(req, &st, TIMEOUT);
}

static void proc_of(struct node *n, char *buf) { sprintf(buf, "/proc/self/fd/%d", n->fd); }

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int valid, struct fuse_file_info *fi)
{
	struct node *n = N(ino);
	char proc[64], p[PATH_MAX_];
	int named = path_of(n, p, sizeof p) == 0;
	proc_of(n, proc);
	if (valid & FUSE_SET_ATTR_SIZE) {
		if ((fi ? ftruncate(fi->fh, attr->st_size) : truncate(proc, attr->st_size)) < 0)
			FAIL(req, errno);
		if (named)
			record(OP_TRUNCATE, p, NULL, NULL, 0, attr->st_size, 0, 0, 0);
	}
	if (valid & FUSE_SET_ATTR_MODE) {
		if (chmod(proc, attr->st_mode & 07777) < 0)
			FAIL(req, errno);
		if (named)
			record(OP_CHMOD, p, NULL, NULL, 0, attr->st_mode & 07777, 0, 0, 0);
	}
	if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
		uid_t uid = valid & FUSE_SET_ATTR_UID ? attr->st_uid : (uid_t)-1;
		gid_t gid = valid & FUSE_SET_ATTR_GID ? attr->st_gid : (gid_t)-1;
		if (fchownat(n->fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
			FAIL(req, errno);
		if (named)
			record(OP_CHOWN, p, NULL, NULL, 0, 0, (int)uid, (int)gid, 0);
	}
	if (valid & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
		struct timespec ts[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
		if (valid & FUSE_SET_ATTR_ATIME_NOW)
			ts[0].tv_nsec = UTIME_NOW;
		else if (valid & FUSE_SET_ATTR_ATIME)
			ts[0] = attr->st_atim;
		if (valid & FUSE_SET_ATTR_MTIME_NOW)
			ts[1].tv_nsec = UTIME_NOW;
		else if (valid & FUSE_SET_ATTR_MTIME)
			ts[1] = attr->st_mtim;
		int r = S_ISLNK(attr->st_mode) ? 0 : utimensat(AT_FDCWD, proc, ts, 0);
		if (r < 0)
			FAIL(req, errno);
		struct stat st;
		if (named && lower_stat(n, &st) == 0)
			record(OP_TIMES, p, NULL, NULL, 0, st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec,
			       st.st_atim.tv_sec * 1000000000LL + st.st_atim.tv_nsec, 0, 0);
	}
	ll_getattr(req, ino, fi);
}

static void ll_readlink(fuse_req_t req, fuse_ino_t ino)
{
	char buf[PATH_MAX_ + 1];
	ssize_t r = readlinkat(N(ino)->fd, "", buf, sizeof buf - 1);
	if (r < 0)
		FAIL(req, errno);
	buf[r] = '\0';
	fuse_reply_readlink(req, buf);
}

/* uid, gid for a new name in parent (the caller's; a set-group-ID directory's group) */
static void owner(fuse_req_t req, const struct stat *pst, uid_t *uid, gid_t *gid)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	*uid = ctx->uid;
	*gid = pst->st_mode & S_ISGID ? pst->st_gid : ctx->gid;
}

static void made(fuse_req_t req, struct node *parent, const char *name, int op, const char *p2, int64_t mode,
		 dev_t rdev)
{
	struct stat pst;
	struct fuse_entry_param e;
	char p[PATH_MAX_];
	uid_t uid;
	gid_t gid;
	if (lower_stat(parent, &pst) < 0)
		FAIL(req, errno);
	owner(req, &pst, &uid, &gid);
	if (fchownat(parent->fd, name, uid, gid, AT_SYMLINK_NOFOLLOW) < 0)
		FAIL(req, errno);
	int err = do_lookup(parent, name, &e);
	if (err)
		FAIL(req, err);
	if (child_path(parent, name, p, sizeof p) == 0) {
		record(op, p, p2, NULL, 0, mode, uid, gid, rdev);
		times_of(N(e.ino), &e.attr);
		times_of(parent, NULL);
	}
	fuse_reply_entry(req, &e);
}

static void ll_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	struct node *pn = N(parent);
	struct stat pst;
	if (lower_stat(pn, &pst) < 0)
		FAIL(req, errno);
	mode = (mode & ~fuse_req_ctx(req)->umask & 07777) | (pst.st_mode & S_ISGID);
	if (mkdirat(pn->fd, name, mode) < 0 || fchmodat(pn->fd, name, mode, 0) < 0)
		FAIL(req, errno);
	made(req, pn, name, OP_MKDIR, NULL, mode, 0);
}

static void ll_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
	struct node *pn = N(parent);
	mode &= ~fuse_req_ctx(req)->umask;
	if (mknodat(pn->fd, name, mode, rdev) < 0)
		FAIL(req, errno);
	made(req, pn, name, OP_MKNOD, NULL, mode, rdev);
}

static void ll_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
	struct node *pn = N(parent);
	if (symlinkat(link, pn->fd, name) < 0)
		FAIL(req, errno);
	made(req, pn, name, OP_SYMLINK, link, 0, 0);
}

static void ll_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char *name)
{
	struct node *n = N(ino), *pn = N(parent);
	char src[PATH_MAX_], p[PATH_MAX_], proc[64];
	int had_name = path_of(n, src, sizeof src) == 0;
	proc_of(n, proc);
	if (linkat(AT_FDCWD, proc, pn->fd, name, AT_SYMLINK_FOLLOW) < 0)
		FAIL(req, errno);
	struct fuse_entry_param e;
	int err = do_lookup(pn, name, &e);
	if (err)
		FAIL(req, err);
	if (had_name && child_path(pn, name, p, sizeof p) == 0) {
		record(OP_LINK, p, src, NULL, 0, 0, 0, 0, 0);
		times_of(pn, NULL);
	}
	fuse_reply_entry(req, &e);
}

/* the node now known under (parent, name), before that name goes */
static struct node *known_as(struct node *parent, const char *name)
{
	struct stat st;
	if (fstatat(parent->fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return NULL;
	struct node *n = find(st.st_dev, st.st_ino);
	return n && n->parent == parent && !strcmp(n->name, name) ? n : NULL;
}

static void removed(fuse_req_t req, fuse_ino_t parent, const char *name, int flags, int op)
{
	struct node *pn = N(parent), *n = known_as(pn, name);
	char p[PATH_MAX_];
	int named = child_path(pn, name, p, sizeof p) == 0;
	if (unlinkat(pn->fd, name, flags) < 0)
		FAIL(req, errno);
	if (n)
		set_name(n, NULL, NULL);
	if (named) {
		record(op, p, NULL, NULL, 0, 0, 0, 0, 0);
		times_of(pn, NULL);
	}
	fuse_reply_err(req, 0);
}

static void ll_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) { removed(req, parent, name, 0, OP_UNLINK); }
static void ll_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) { removed(req, parent, name, AT_REMOVEDIR, OP_RMDIR); }

static void ll_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
		      const char *newname, unsigned int flags)
{
	struct node *pn = N(parent), *npn = N(newparent);
	struct node *a = known_as(pn, name), *b = known_as(npn, newname);
	char p1[PATH_MAX_], p2[PATH_MAX_];
	int named = child_path(pn, name, p1, sizeof p1) == 0 && child_path(npn, newname, p2, sizeof p2) == 0;
	if (renameat2(pn->fd, name, npn->fd, newname, flags) < 0)
		FAIL(req, errno);
	if (b)
		set_name(b, flags & RENAME_EXCHANGE ? pn : NULL, name);
	if (a)
		set_name(a, npn, newname);
	if (named) {
		record(OP_RENAME, p1, p2, NULL, 0, flags, 0, 0, 0);
		times_of(pn, NULL);
		if (npn != pn)
			times_of(npn, NULL);
	}
	fuse_reply_err(req, 0);
}

/* fi->fh: the lower fd; high bit of fi->lock_owner unused, so "wrote" lives in a side table */
static unsigned char wrote[1 << 20];

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct node *n = N(ino);
	char proc[64], p[PATH_MAX_];
	proc_of(n, proc);
	int fd = open(proc, (fi->flags & ~(O_CREAT | O_EXCL | O_NOCTTY | O_APPEND)) | O_CLOEXEC);
	if (fd < 0)
		FAIL(req, errno);
	if (fd < (int)sizeof wrote)
		wrote[fd] = 0;
	if ((fi->flags & O_TRUNC) && path_of(n, p, sizeof p) == 0) {
		record(OP_TRUNCATE, p, NULL, NULL, 0, 0, 0, 0, 0);
		wrote[fd] = 1;
	}
	fi->fh = fd;
	fuse_reply_open(req, fi);
}

static void ll_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
	struct node *pn = N(parent);
	char p[PATH_MAX_];
	int base = (fi->flags & ~(O_CREAT | O_EXCL | O_NOCTTY | O_APPEND)) | O_CLOEXEC | O_NOFOLLOW, created = 1;
	mode = mode & ~fuse_req_ctx(req)->umask & 07777;
	int fd = openat(pn->fd, name, base | O_CREAT | O_EXCL, mode);
	if (fd < 0 && errno == EEXIST && !(fi->flags & O_EXCL)) {
		fd = openat(pn->fd, name, base);
		created = 0;
	}
	if (fd < 0)
		FAIL(req, errno);
	struct stat pst;
	uid_t uid = 0;
	gid_t gid = 0;
	if (created) {
		if (lower_stat(pn, &pst) < 0 || (owner(req, &pst, &uid, &gid), fchown(fd, uid, gid)) < 0) {
			int err = errno;
			close(fd);
			FAIL(req, err);
		}
	}
	struct fuse_entry_param e;
	int err = do_lookup(pn, name, &e);
	if (err) {
		close(fd);
		FAIL(req, err);
	}
	N(e.ino)->no_caps |= created;
	if (child_path(pn, name, p, sizeof p) == 0) {
		if (created) {
			record(OP_CREATE, p, NULL, NULL, 0, mode, uid, gid, 0);
			times_of(pn, &pst);
		} else if (fi->flags & O_TRUNC) {
			record(OP_TRUNCATE, p, NULL, NULL, 0, 0, 0, 0, 0);
		}
	}
	if (fd < (int)sizeof wrote)
		wrote[fd] = 1;
	fi->fh = fd;
	fuse_reply_create(req, &e, fi);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)ino;
	struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
	buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
	buf.buf[0].fd = fi->fh;
	buf.buf[0].pos = off;
	fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	char p[PATH_MAX_];
	ssize_t done = pwrite(fi->fh, buf, size, off);
	if (done < 0)
		FAIL(req, errno);
	if (fi->fh < sizeof wrote)
		wrote[fi->fh] = 1;
	if (path_of(N(ino), p, sizeof p) == 0) /* no name left: gone at the target too */
		record(OP_WRITE, p, NULL, buf, done, off, 0, 0, 0);
	fuse_reply_write(req, done);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	fuse_reply_err(req, ENOSYS); /* nothing to do at close(2): the kernel stops asking */
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;
	if (fi->fh < sizeof wrote && wrote[fi->fh] && fstat(fi->fh, &st) == 0)
		times_of(N(ino), &st);
	close(fi->fh);
	fuse_reply_err(req, 0);
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino;
	if ((datasync ? fdatasync(fi->fh) : fsync(fi->fh)) < 0)
		FAIL(req, errno);
	fuse_reply_err(req, -journal_sync());
}

static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	int fd = openat(N(ino)->fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		int err = errno;
		if (fd >= 0)
			close(fd);
		FAIL(req, err);
	}
	fi->fh = (uintptr_t)d;
	fuse_reply_open(req, fi);
}

static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)ino;
	DIR *d = (DIR *)(uintptr_t)fi->fh;
	char *buf = malloc(size);
	size_t used = 0;
	if (!buf)
		FAIL(req, ENOMEM);
	seekdir(d, off);
	struct dirent *e;
	while ((e = readdir(d))) {
		struct stat st = {.st_ino = e->d_ino, .st_mode = e->d_type << 12};
		size_t n = fuse_add_direntry(req, buf + used, size - used, e->d_name, &st, telldir(d));
		if (n > size - used)
			break;
		used += n;
	}
	fuse_reply_buf(req, buf, used);
	free(buf);
}

static void ll_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	closedir((DIR *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

static void ll_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino; (void)datasync; (void)fi;
	fuse_reply_err(req, -journal_sync());
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct statvfs s;
	if (fstatvfs(N(ino)->fd, &s) < 0)
		FAIL(req, errno);
	fuse_reply_statfs(req, &s);
}

static void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	struct node *n = N(ino);
	char proc[64], buf[65536];
	if (n->no_caps && !strcmp(name, "security.capability"))
		FAIL(req, ENODATA);
	proc_of(n, proc);
	ssize_t r = getxattr(proc, name, size ? buf : NULL, size < sizeof buf ? size : sizeof buf);
	if (r < 0) {
		if (errno == ENODATA && !strcmp(name, "security.capability"))
			n->no_caps = 1;
		FAIL(req, errno);
	}
	if (size == 0)
		fuse_reply_xattr(req, r);
	else
		fuse_reply_buf(req, buf, r);
}

static void ll_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	char proc[64], buf[65536];
	proc_of(N(ino), proc);
	ssize_t r = listxattr(proc, size ? buf : NULL, size < sizeof buf ? size : sizeof buf);
	if (r < 0)
		FAIL(req, errno);
	if (size == 0)
		fuse_reply_xattr(req, r);
	else
		fuse_reply_buf(req, buf, r);
}

static void ll_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags)
{
	struct node *n = N(ino);
	char proc[64], p[PATH_MAX_];
	proc_of(n, proc);
	if (!strcmp(name, "security.capability"))
		n->no_caps = 0;
	if (setxattr(proc, name, value, size, flags) < 0)
		FAIL(req, errno);
	if (path_of(n, p, sizeof p) == 0)
		record(OP_SETXATTR, p, name, value, size, 0, 0, 0, 0);
	fuse_reply_err(req, 0);
}

static void ll_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	struct node *n = N(ino);
	char proc[64], p[PATH_MAX_];
	proc_of(n, proc);
	if (removexattr(proc, name) < 0)
		FAIL(req, errno);
	if (path_of(n, p, sizeof p) == 0)
		record(OP_REMOVEXATTR, p, name, NULL, 0, 0, 0, 0, 0);
	fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops ops = {
	.lookup = ll_lookup, .forget = ll_forget, .forget_multi = ll_forget_multi, .getattr = ll_getattr,
	.setattr = ll_setattr, .readlink = ll_readlink, .mknod = ll_mknod, .mkdir = ll_mkdir,
	.symlink = ll_symlink, .link = ll_link, .unlink = ll_unlink, .rmdir = ll_rmdir, .rename = ll_rename,
	.open = ll_open, .create = ll_create, .read = ll_read, .write = ll_write, .flush = ll_flush,
	.release = ll_release, .fsync = ll_fsync, .opendir = ll_opendir, .readdir = ll_readdir,
	.releasedir = ll_releasedir, .fsyncdir = ll_fsyncdir, .statfs = ll_statfs, .getxattr = ll_getxattr,
	.listxattr = ll_listxattr, .setxattr = ll_setxattr, .removexattr = ll_removexattr,
};

int main(int argc, char **argv)
{
	const char *source = NULL, *target = NULL, *state = NULL, *mnt = NULL;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--source") && i + 1 < argc)
			source = argv[++i];
		else if (!strcmp(argv[i], "--target") && i + 1 < argc)
			target = argv[++i];
		else if (!strcmp(argv[i], "--state") && i + 1 < argc)
			state = argv[++i];
		else if (!strcmp(argv[i], "--keep-segments"))
			J.keep_segments = 1;
		else if (argv[i][0] != '-' && !mnt)
			mnt = argv[i];
		else
			mnt = NULL, i = argc;
	}
	if (!source || !target || !state || !mnt) {
		fprintf(stderr, "usage: cfs --source DIR --target DIR --state DIR [--keep-segments] MOUNTPOINT\n");
		return 2;
	}
	umask(0); /* modes come from the caller's request, masked by the caller's umask */
	root.fd = open(source, O_PATH | O_DIRECTORY | O_CLOEXEC); /* before the mount: the lower tree's door */
	mkdir(target, 0700);
	mkdir(state, 0700);
	J.target = open(target, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	J.state_dir = open(state, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	J.ring = mmap(NULL, MEMORY_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (root.fd < 0 || J.target < 0 || J.state_dir < 0 || J.ring == MAP_FAILED) {
		perror("cfs: open source, target, state or memory queue");
		return 1;
	}
	int sfd = openat(J.state_dir, "status", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (sfd < 0 || ftruncate(sfd, 64) < 0 ||
	    (J.status = mmap(NULL, 64, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0)) == MAP_FAILED) {
		perror("cfs: status file");
		return 1;
	}
	show_status();
	struct stat st;
	fstat(root.fd, &st);
	root.dev = st.st_dev, root.ino = st.st_ino, root.nlookup = 1;
	char *fargv[] = {argv[0], "-o", "fsname=mirrorfs,subtype=cfs,default_permissions,allow_other", NULL};
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
	if (!se || fuse_set_signal_handlers(se) || fuse_session_mount(se, mnt)) {
		fprintf(stderr, "cfs: cannot mount %s\n", mnt);
		return 1;
	}
	pthread_t app;
	pthread_create(&app, NULL, applier, NULL);
	int ret = fuse_session_loop(se);
	fuse_session_unmount(se);
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	pthread_mutex_lock(&J.lock);
	J.stop = 1;
	pthread_cond_broadcast(&J.more);
	pthread_mutex_unlock(&J.lock);
	pthread_join(app, NULL);
	int fd = openat(J.state_dir, "clean", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
	return ret < 0 ? 1 : 0;
}
