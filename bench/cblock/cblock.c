/*
 * cblock: a PROTOTYPE (bench only, issue 14) of the block worker's data path in C against
 * libfuse3's low-level API, to learn which ratio a compiled path reaches. Not product code.
 *
 *   cblock --device RAW --target FILE --state DIR [--threads N] [--max-background N]
 *          [--keep-segments] [--floor 1|2] MOUNTPOINT
 *
 * Like app/engine/blockworker.py it serves one file, `disk`, whose bytes are RAW (opened
 * O_EXCL), with direct_io and no writeback cache. Every write goes to RAW and, if that worked,
 * becomes a journal record before the reply; fsync makes RAW and the journal durable (records
 * not yet on disk are written to the segment file, which is fdatasync'ed). An applier thread
 * writes the records to FILE in order. Records use the journal's on-disk format
 * (app/engine/journal.py):
 *
 *   u32 length | u32 crc32(seq..end) | u64 seq | u8 kind | u16 op_len | u32 args_len | op | args | data
 *
 * with kind 2 (block), op "write", args {"offset":N}, in segment files DIR/<seq %020>.seg rolled
 * at 5 MB. A second file, `status`, reads "last_seq applied_seq lag_ms".
 *
 * What the prototype leaves out: the daemon protocol (status/verify/mirror over a socket),
 * offset/size-limit windows, resync at start, and spilling to disk when the 64 MiB memory queue
 * (one ring, allocated once: no malloc and no page faults per record) is full: a writer waits
 * for the applier instead. With --threads N > 1 several threads read
 * /dev/fuse (cloned fds); pwrite + append happen under one lock, so the journal's order is the
 * order the device saw. --floor is for measuring what is left when work is taken away: 1 replies
 * to every write at once (nothing written: the FUSE + loop path alone), 2 writes RAW but keeps
 * no journal (nothing captured).
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
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define KIND_BLOCK 2
#define SEGMENT_BYTES (5 * 1000 * 1000)
#define MEMORY_BYTES (64u << 20)
#define INO_DISK 2
#define INO_STATUS 3

struct rec {
	struct rec *next;
	size_t pos, need, charge; /* where it sits in the ring, its size, the ring bytes it holds */
	uint64_t seq;
	uint64_t offset; /* device offset of the write */
	double when;     /* capture time, for the lag */
	int on_disk;     /* already in a segment file */
	size_t len;      /* encoded length */
	size_t data_at;  /* where the payload starts in buf */
	unsigned char buf[];
};

static struct {
	int raw, target, state_dir;
	off_t size;
	int keep_segments;
	int floor; /* --floor: 1 = reply to writes at once, 2 = pwrite to RAW only (no journal) */
	pthread_mutex_t lock; /* journal queue and counters */
	pthread_cond_t more, room;
	pthread_mutex_t order; /* pwrite + append: the journal's order is the device's */
	struct rec *head, *tail, *unspilled; /* unspilled: first record not yet on disk */
	unsigned char *ring; /* the 64 MiB memory queue: records are placed and freed in order */
	size_t head_off, tail_off, used;
	uint64_t last_seq, applied_seq;
	int seg_fd;
	size_t seg_size;
	int stop;
	int applier_asleep; /* waiting on `more`: only then does an append wake it */
} J = {.lock = PTHREAD_MUTEX_INITIALIZER, .more = PTHREAD_COND_INITIALIZER,
       .room = PTHREAD_COND_INITIALIZER, .order = PTHREAD_MUTEX_INITIALIZER, .seg_fd = -1};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void put16(unsigned char *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }

/* Lay out one write record as journal.py's Record.encode does, all but its checksum: like
 * journal.py, only a record that goes to disk pays for it (see seal()). */
/* Room for `n` bytes at the ring's tail, or -1 (J.lock held). Records are freed oldest first,
 * so the live part is [head_off, tail_off), wrapped at most once; a record that does not fit
 * before the end goes to the start, and the end it skips is charged to it. */
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

static void ring_free(struct rec *r)
{
	J.head_off = r->pos + r->need;
	J.used -= r->charge;
}

static struct rec *encode(uint64_t seq, uint64_t offset, const void *data, size_t n)
{
	char args[48];
	int alen = snprintf(args, sizeof args, "{\"offset\":%llu}", (unsigned long long)offset);
	size_t head = 8 + 1 + 2 + 4 + 5 + alen; /* seq, kind, op_len, args_len, "write", args */
	size_t len = 8 + head + n;
	size_t need = (sizeof(struct rec) + len + 15) & ~(size_t)15, waste;
	long pos;
	while ((pos = ring_place(need, &waste)) < 0)
		pthread_cond_wait(&J.room, &J.lock);
	struct rec *r = (struct rec *)(J.ring + pos);
	r->pos = pos;
	r->need = need;
	r->charge = need + waste;
	J.tail_off = pos + need;
	J.used += r->charge;
	unsigned char *p = r->buf + 8;
	put64(p, seq);
	p[8] = KIND_BLOCK;
	put16(p + 9, 5);
	put32(p + 11, alen);
	memcpy(p + 15, "write", 5);
	memcpy(p + 20, args, alen);
	memcpy(p + head, data, n);
	put32(r->buf, head + n);
	r->next = NULL;
	r->seq = seq;
	r->offset = offset;
	r->when = now();
	r->on_disk = 0;
	r->len = len;
	r->data_at = 8 + head;
	return r;
}

static void seal(struct rec *r)
{
	put32(r->buf + 4, crc32(crc32(0L, Z_NULL, 0), r->buf + 8, r->len - 8));
}

static int roll(uint64_t seq)
{
	char name[32];
	if (J.seg_fd >= 0)
		close(J.seg_fd); /* made durable already: a roll happens inside spill(), before its sync */
	snprintf(name, sizeof name, "%020llu.seg", (unsigned long long)seq);
	J.seg_fd = openat(J.state_dir, name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	J.seg_size = 0;
	return J.seg_fd < 0 ? -errno : 0;
}

/* Write every record not yet on disk to the segment file and fdatasync it (J.lock held). */
static int spill(void)
{
	int synced_fd = -1;
	for (struct rec *r = J.unspilled; r; r = r->next) {
		if (J.seg_fd < 0 || J.seg_size + r->len > SEGMENT_BYTES) {
			if (J.seg_fd >= 0 && fdatasync(J.seg_fd) < 0)
				return -errno;
			int err = roll(r->seq);
			if (err)
				return err;
		}
		seal(r);
		if (write(J.seg_fd, r->buf, r->len) != (ssize_t)r->len)
			return -EIO;
		J.seg_size += r->len;
		r->on_disk = 1;
		synced_fd = J.seg_fd;
	}
	J.unspilled = NULL;
	if (synced_fd >= 0 && fdatasync(synced_fd) < 0)
		return -errno;
	return 0;
}

static int append(uint64_t offset, const void *data, size_t n)
{
	pthread_mutex_lock(&J.lock);
	struct rec *r = encode(J.last_seq + 1, offset, data, n);
	if (!r) {
		pthread_mutex_unlock(&J.lock);
		return -ENOMEM;
	}
	J.last_seq = r->seq;
	if (J.tail)
		J.tail->next = r;
	else
		J.head = r;
	J.tail = r;
	if (!J.unspilled)
		J.unspilled = r;
	if (J.applier_asleep)
		pthread_cond_signal(&J.more);
	pthread_mutex_unlock(&J.lock);
	return 0;
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

/* Delete every segment: everything on disk is applied and the applied seq is durable. */
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

/* The applier: records in order onto the target; the applied seq made durable (after the
 * target's data) at most every second while busy and 0.25 s after catching up, as applier.py. */
static void *applier(void *arg)
{
	(void)arg;
	double last_persist = now(), last_work = 0;
	uint64_t persisted = J.applied_seq;
	pthread_mutex_lock(&J.lock);
	for (;;) {
		if (!J.head && !J.stop && now() - last_work < 0.05) {
			/* busy lately: look again in 1 ms rather than be woken by every append (a
			 * wake-up per record cost the capture thread more than the record itself) */
			pthread_mutex_unlock(&J.lock);
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
			size_t n = r->len - r->data_at;
			if (pwrite(J.target, r->buf + r->data_at, n, r->offset) != (ssize_t)n)
				perror("cblock: apply");
			pthread_mutex_lock(&J.lock);
			J.head = r->next;
			if (!J.head)
				J.tail = NULL;
			if (J.unspilled == r)
				J.unspilled = r->next; /* taken before any sync: as journal.py, never spilled */
			J.applied_seq = r->seq;
			ring_free(r);
			pthread_cond_broadcast(&J.room);
		}
		double since = now() - last_persist;
		if (J.applied_seq != persisted && (since > 1.0 || (!J.head && (since > 0.25 || J.stop)))) {
			uint64_t seq = J.applied_seq;
			pthread_mutex_unlock(&J.lock);
			fdatasync(J.target);
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
	return NULL;
}

/* -- FUSE -------------------------------------------------------------------------------- */
static void attr_of(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof *st);
	st->st_ino = ino;
	st->st_blksize = 4096;
	if (ino == INO_DISK) {
		st->st_mode = S_IFREG | 0600;
		st->st_size = J.size;
		st->st_blocks = (J.size + 511) / 512;
		st->st_nlink = 1;
	} else if (ino == INO_STATUS) {
		st->st_mode = S_IFREG | 0400;
		st->st_size = 64;
		st->st_nlink = 1;
	} else {
		st->st_mode = S_IFDIR | 0700;
		st->st_nlink = 2;
	}
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	memset(&e, 0, sizeof e);
	if (parent != FUSE_ROOT_ID)
		return (void)fuse_reply_err(req, ENOENT);
	if (!strcmp(name, "disk"))
		e.ino = INO_DISK;
	else if (!strcmp(name, "status"))
		e.ino = INO_STATUS;
	else
		return (void)fuse_reply_err(req, ENOENT);
	e.attr_timeout = e.entry_timeout = 3600;
	attr_of(e.ino, &e.attr);
	fuse_reply_entry(req, &e);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi;
	struct stat st;
	attr_of(ino, &st);
	fuse_reply_attr(req, &st, 3600);
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
	(void)fi;
	if ((to_set & FUSE_SET_ATTR_SIZE) && attr->st_size != J.size)
		return (void)fuse_reply_err(req, EPERM);
	struct stat st;
	attr_of(ino, &st);
	fuse_reply_attr(req, &st, 3600);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino == FUSE_ROOT_ID)
		return (void)fuse_reply_err(req, EISDIR);
	fi->direct_io = 1; /* no second page cache under the loop's own; every write reaches us */
	fi->keep_cache = 0;
	fuse_reply_open(req, fi);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)fi;
	if (ino == INO_STATUS) {
		char s[96];
		pthread_mutex_lock(&J.lock);
		double lag = J.head ? now() - J.head->when : 0;
		int n = snprintf(s, sizeof s, "%llu %llu %d\n", (unsigned long long)J.last_seq,
				 (unsigned long long)J.applied_seq, (int)(lag * 1000));
		pthread_mutex_unlock(&J.lock);
		if (off >= n)
			return (void)fuse_reply_buf(req, NULL, 0);
		return (void)fuse_reply_buf(req, s + off, (size_t)n - off < size ? (size_t)n - off : size);
	}
	if (off >= J.size)
		return (void)fuse_reply_buf(req, NULL, 0);
	if ((off_t)size > J.size - off)
		size = J.size - off;
	char *buf = malloc(size);
	if (!buf)
		return (void)fuse_reply_err(req, ENOMEM);
	ssize_t n = pread(J.raw, buf, size, off);
	if (n < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_buf(req, buf, n);
	free(buf);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	(void)fi;
	if (ino != INO_DISK)
		return (void)fuse_reply_err(req, EPERM);
	if (off >= J.size && size)
		return (void)fuse_reply_err(req, ENOSPC);
	if ((off_t)size > J.size - off)
		size = J.size - off;
	if (J.floor == 1)
		return (void)fuse_reply_write(req, size);
	if (J.floor == 2) {
		ssize_t n = pwrite(J.raw, buf, size, off);
		return (void)(n < 0 ? fuse_reply_err(req, errno) : fuse_reply_write(req, n));
	}
	pthread_mutex_lock(&J.order);
	ssize_t done = pwrite(J.raw, buf, size, off);
	int err = done < 0 ? errno : 0;
	if (done > 0)
		err = -append(off, buf, done);
	pthread_mutex_unlock(&J.order);
	if (err)
		fuse_reply_err(req, err);
	else
		fuse_reply_write(req, done);
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino; (void)datasync; (void)fi;
	if (fdatasync(J.raw) < 0)
		return (void)fuse_reply_err(req, errno);
	pthread_mutex_lock(&J.lock);
	int err = spill();
	pthread_mutex_unlock(&J.lock);
	fuse_reply_err(req, -err);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	fuse_reply_err(req, ENOSYS);
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	fuse_reply_err(req, 0);
}

static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)fi;
	static const char *names[] = {".", "..", "disk", "status"};
	static const fuse_ino_t inos[] = {FUSE_ROOT_ID, FUSE_ROOT_ID, INO_DISK, INO_STATUS};
	if (ino != FUSE_ROOT_ID)
		return (void)fuse_reply_err(req, ENOTDIR);
	char buf[1024];
	size_t used = 0;
	for (off_t i = off; i < 4; i++) {
		struct stat st;
		attr_of(inos[i], &st);
		size_t n = fuse_add_direntry(req, buf + used, sizeof buf - used, names[i], &st, i + 1);
		if (used + n > size || n > sizeof buf - used)
			break;
		used += n;
	}
	fuse_reply_buf(req, buf, used);
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino)
{
	(void)ino;
	struct statvfs s;
	memset(&s, 0, sizeof s);
	s.f_bsize = s.f_frsize = 4096;
	s.f_blocks = (J.size + 4095) / 4096;
	s.f_files = 2;
	s.f_namemax = 255;
	fuse_reply_statfs(req, &s);
}

static const struct fuse_lowlevel_ops ops = {
	.lookup = ll_lookup, .getattr = ll_getattr, .setattr = ll_setattr, .open = ll_open,
	.read = ll_read, .write = ll_write, .fsync = ll_fsync, .flush = ll_flush,
	.release = ll_release, .readdir = ll_readdir, .statfs = ll_statfs,
};

static void usage(void)
{
	fprintf(stderr, "usage: cblock --device RAW --target FILE --state DIR [--threads N] "
		"[--max-background N] [--keep-segments] [--floor 1|2] MOUNTPOINT\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *device = NULL, *target = NULL, *state = NULL, *mnt = NULL;
	int threads = 1, max_bg = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--device") && i + 1 < argc)
			device = argv[++i];
		else if (!strcmp(argv[i], "--target") && i + 1 < argc)
			target = argv[++i];
		else if (!strcmp(argv[i], "--state") && i + 1 < argc)
			state = argv[++i];
		else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
			threads = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--max-background") && i + 1 < argc)
			max_bg = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--keep-segments"))
			J.keep_segments = 1;
		else if (!strcmp(argv[i], "--floor") && i + 1 < argc)
			J.floor = atoi(argv[++i]);
		else if (argv[i][0] != '-' && !mnt)
			mnt = argv[i];
		else
			usage();
	}
	if (!device || !target || !state || !mnt || threads < 1)
		usage();
	J.raw = open(device, O_RDWR | O_EXCL | O_CLOEXEC);
	if (J.raw < 0) {
		fprintf(stderr, "cblock: open %s exclusively: %s\n", device, strerror(errno));
		return 1;
	}
	J.size = lseek(J.raw, 0, SEEK_END);
	J.target = open(target, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	struct stat tst;
	if (J.target < 0 || fstat(J.target, &tst) < 0 ||
	    (S_ISREG(tst.st_mode) && ftruncate(J.target, J.size) < 0)) {
		fprintf(stderr, "cblock: target %s: %s\n", target, strerror(errno));
		return 1;
	}
	J.ring = mmap(NULL, MEMORY_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (J.ring == MAP_FAILED) {
		perror("cblock: memory queue");
		return 1;
	}
	mkdir(state, 0700);
	J.state_dir = open(state, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (J.state_dir < 0) {
		fprintf(stderr, "cblock: state %s: %s\n", state, strerror(errno));
		return 1;
	}
	/* the target starts equal to the device (the bench gives both zeros; a real worker resyncs) */
	char opts[128];
	snprintf(opts, sizeof opts, "fsname=mirrorblk,subtype=mirrorblk,default_permissions%s%d",
		 max_bg ? ",max_background=" : "", max_bg);
	if (!max_bg)
		opts[strlen(opts) - 1] = '\0';
	char *fargv[] = {argv[0], "-o", opts, NULL};
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
	if (!se || fuse_set_signal_handlers(se) || fuse_session_mount(se, mnt)) {
		fprintf(stderr, "cblock: cannot mount %s\n", mnt);
		return 1;
	}
	pthread_t app;
	pthread_create(&app, NULL, applier, NULL);
	int ret;
	if (threads > 1) {
		struct fuse_loop_config *cfg = fuse_loop_cfg_create();
		fuse_loop_cfg_set_clone_fd(cfg, 1);
		fuse_loop_cfg_set_max_threads(cfg, threads);
		fuse_loop_cfg_set_idle_threads(cfg, threads);
		ret = fuse_session_loop_mt(se, cfg);
		fuse_loop_cfg_destroy(cfg);
	} else {
		ret = fuse_session_loop(se);
	}
	fuse_session_unmount(se);
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	pthread_mutex_lock(&J.lock);
	J.stop = 1;
	pthread_cond_broadcast(&J.more);
	pthread_mutex_unlock(&J.lock);
	pthread_join(app, NULL); /* drains the queue onto the target, persists the applied seq */
	fdatasync(J.raw);
	int fd = openat(J.state_dir, "clean", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
	return ret < 0 ? 1 : 0;
}
