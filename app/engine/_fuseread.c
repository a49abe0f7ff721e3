/*
 * app.engine._fuseread: the capture's hot paths, compiled (issue 14): the request loop's read of
 * /dev/fuse, a block capture's small writes, a block applier's writes.
 *
 * After answering a request the loop polls /dev/fuse for the next one for a few tens of
 * microseconds before it parks in trio's epoll (an application doing one request after another
 * sends its next within microseconds, and parking then waking costs more than that). Polled
 * from Python, every empty read raised and caught a BlockingIOError, and the loop held the GIL
 * all the while, so the applier thread beside it could not run. Here the poll runs with the GIL
 * released and an empty read costs one system call.
 *
 * serve_writes() is a block capture's hot path (app/engine/blockfs.py): it answers the WRITE
 * requests to the capture's file itself, in arrival order, each written to the raw device and
 * copied into the caller's batch before its reply, and hands anything else back. The caller
 * puts the batch into the journal before it answers that other request or lets any other task
 * run, so the journal's order is still the order the device saw.
 *
 * pwrite_all() is a block applier's batch (app/engine/applier.py): one GIL release for a batch
 * of records instead of one per record, so the applier and the request loop no longer hand the
 * GIL to each other at every record.
 *
 * fs_apply_run() is a directory applier's run of single-call records (app/engine/applier.py):
 * writes to files it holds open, times, chmod and chown by name, files made or removed, a
 * walk's whole small files (puts), one GIL release for the run.
 *
 * Optional: built by the project's own install step (pip install, a C compiler and Python's
 * headers); without it app/engine/fusewire.py polls from Python as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One read of the next request, polling for up to `spin` ns: its length, 0 at end of file, or
 * minus the errno (-EAGAIN: nothing came). Called without the GIL. */
static ssize_t next_request(int fd, void *buf, size_t len, long long spin)
{
	long long start = 0;
	for (;;) {
		ssize_t n = read(fd, buf, len);
		if (n >= 0)
			return n;
		int err = errno;
		if (err == EINTR)
			continue;
		if (err != EAGAIN)
			return -err;
		long long t = now_ns();
		if (!start)
			start = t;
		if (t - start >= spin)
			return -EAGAIN;
#if defined(__x86_64__) || defined(__i386__)
		__builtin_ia32_pause();
#endif
	}
}

/* read_request(fd, buffer, spin_ns) -> int: the length of the request read into `buffer`
 * (0 at end of file), or minus the errno of the read: -EAGAIN once `spin_ns` passed with
 * nothing to read (`fd` is non-blocking); EINTR is retried. */
static PyObject *read_request(PyObject *self, PyObject *args)
{
	int fd;
	Py_buffer buf;
	long long spin;
	ssize_t n;

	if (!PyArg_ParseTuple(args, "iw*L:read_request", &fd, &buf, &spin))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	n = next_request(fd, buf.buf, (size_t)buf.len, spin);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&buf);
	return PyLong_FromSsize_t(n);
}

/* <linux/fuse.h>, as app/engine/fusewire.py has them */
#define FUSE_WRITE 16
#define IN_HEADER 40 /* fuse_in_header */
#define WRITE_IN 40 /* fuse_write_in */
#define WRITE_KILL_SUIDGID (1u << 2)
#define BLOCK_SHIFT 20 /* app/engine/sync.py BLOCK: 1 MiB */

struct in_header {
	uint32_t len, opcode;
	uint64_t unique, nodeid;
	uint32_t uid, gid, pid;
	uint16_t extlen, padding;
};

struct write_in {
	uint64_t fh, offset;
	uint32_t size, write_flags;
	uint64_t lock_owner;
	uint32_t flags, padding;
};

struct write_reply {
	uint32_t len;
	int32_t error;
	uint64_t unique;
	uint32_t size, padding; /* fuse_write_out */
};

/* serve_writes(fd, buffer, spin_ns, raw_fd, base, size, file_ino, gen, clock, data, meta,
 *              max_records, largest) -> (n, count, clock)
 *
 * Reads requests like read_request() and answers each WRITE of at most `largest` bytes to node
 * `file_ino` itself (a larger one costs more in the second copy, from `data` into the journal's
 * record, than it saves in dispatch: it is handed back): the
 * bytes that fit the window [0, size) are written to `raw_fd` at `base` + offset (beyond it:
 * ENOSPC; a failed write: its errno, nothing kept), then, if any were written, the clock is
 * advanced, `gen` (u64 per 1 MiB block) takes it for every block written, the bytes are
 * appended to `data` and (offset, length) to `meta`, and the reply goes back. It stops, with
 * n the length of a request it did not answer (left in `buffer`), 0 at end of file, minus the
 * errno of a failed read or reply (-EAGAIN: nothing came within spin_ns), or -ENOBUFS when
 * `max_records` were kept or `data` has no room for another `largest` bytes. `count` records were
 * kept: the caller journals them before anything else. */
static PyObject *serve_writes(PyObject *self, PyObject *args)
{
	int fd, raw_fd;
	Py_buffer buf, gen, data, meta;
	long long spin;
	unsigned long long base, size, file_ino, clock;
	Py_ssize_t max_records, largest, count = 0, used = 0;
	ssize_t n = 0;

	if (!PyArg_ParseTuple(args, "iw*LiKKKw*Kw*w*nn:serve_writes", &fd, &buf, &spin, &raw_fd, &base,
			      &size, &file_ino, &gen, &clock, &data, &meta, &max_records, &largest))
		return NULL;
	uint64_t *gens = gen.buf, *metas = meta.buf;
	size_t nblocks = (size_t)gen.len / sizeof(uint64_t);
	if ((size_t)meta.len < 2 * sizeof(uint64_t) * (size_t)max_records || largest < 0 || largest > data.len ||
	    nblocks < ((size + (1ull << BLOCK_SHIFT) - 1) >> BLOCK_SHIFT) || buf.len < IN_HEADER + WRITE_IN) {
		PyBuffer_Release(&buf); PyBuffer_Release(&gen); PyBuffer_Release(&data); PyBuffer_Release(&meta);
		PyErr_SetString(PyExc_ValueError, "serve_writes: buffers too small for the window or the batch");
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	for (;;) {
		if (count >= max_records || used + largest > data.len) {
			n = -ENOBUFS;
			break;
		}
		n = next_request(fd, buf.buf, (size_t)buf.len, spin);
		if (n < IN_HEADER + WRITE_IN)
			break; /* an error, end of file, or too short for a write: the caller's */
		struct in_header h;
		struct write_in w;
		memcpy(&h, buf.buf, sizeof h);
		memcpy(&w, (char *)buf.buf + IN_HEADER, sizeof w);
		if (h.opcode != FUSE_WRITE || h.nodeid != file_ino || w.size > (uint64_t)largest ||
		    w.write_flags & WRITE_KILL_SUIDGID ||
		    h.len != (uint32_t)n || (uint64_t)IN_HEADER + WRITE_IN + w.size + 8ull * h.extlen > h.len)
			break; /* not ours to answer here */
		const char *bytes = (const char *)buf.buf + IN_HEADER + WRITE_IN;
		ssize_t done = 0;
		int err = 0;
		if (w.offset >= size) {
			err = w.size ? ENOSPC : 0;
		} else {
			size_t len = w.size < size - w.offset ? w.size : (size_t)(size - w.offset);
			do
				done = pwrite(raw_fd, bytes, len, (off_t)(base + w.offset));
			while (done < 0 && errno == EINTR);
			if (done < 0) {
				err = errno;
				done = 0;
			}
		}
		if (done > 0) {
			clock++;
			for (uint64_t b = w.offset >> BLOCK_SHIFT; b <= (w.offset + done - 1) >> BLOCK_SHIFT; b++)
				gens[b] = clock;
			memcpy((char *)data.buf + used, bytes, (size_t)done);
			metas[2 * count] = w.offset;
			metas[2 * count + 1] = (uint64_t)done;
			used += done;
			count++;
		}
		struct write_reply r = {err ? 16 : sizeof r, -err, h.unique, (uint32_t)done, 0};
		if (write(fd, &r, r.len) < 0 && errno != ENOENT && errno != ENODEV && errno != ECONNABORTED) {
			n = -errno; /* ENOENT: interrupted, nobody waits; unmounted or aborted: the next read says */
			break;
		}
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&buf); PyBuffer_Release(&gen); PyBuffer_Release(&data); PyBuffer_Release(&meta);
	return Py_BuildValue("nnK", n, count, clock);
}

/* pwrite_all(fd, base, offsets, datas) -> (count, errno): datas[i] (a bytes-like object)
 * written whole at base + offsets[i], in order, with the GIL released once for them all (a
 * short write is continued). Stops at the first that fails: count is how many were written,
 * errno that one's (0: all were). */
static PyObject *pwrite_all(PyObject *self, PyObject *args)
{
	int fd, err = 0;
	unsigned long long base;
	PyObject *offsets, *datas;
	Py_ssize_t n, i = 0, got = 0;

	if (!PyArg_ParseTuple(args, "iKO!O!:pwrite_all", &fd, &base, &PyList_Type, &offsets,
			      &PyList_Type, &datas))
		return NULL;
	n = PyList_GET_SIZE(datas);
	if (PyList_GET_SIZE(offsets) != n) {
		PyErr_SetString(PyExc_ValueError, "pwrite_all: as many offsets as datas");
		return NULL;
	}
	Py_buffer *bufs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
	unsigned long long *offs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(unsigned long long));
	if (!bufs || !offs) {
		PyMem_Free(bufs);
		PyMem_Free(offs);
		return PyErr_NoMemory();
	}
	for (; got < n; got++) {
		offs[got] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(offsets, got));
		if (PyErr_Occurred() || PyObject_GetBuffer(PyList_GET_ITEM(datas, got), &bufs[got], PyBUF_SIMPLE) < 0)
			break;
	}
	if (got == n) {
		Py_BEGIN_ALLOW_THREADS
		for (i = 0; i < n && !err; i++) {
			const char *p = bufs[i].buf;
			size_t left = (size_t)bufs[i].len;
			unsigned long long off = base + offs[i];
			while (left) {
				ssize_t w = pwrite(fd, p, left, (off_t)off);
				if (w < 0) {
					if (errno == EINTR)
						continue;
					err = errno;
					break;
				}
				p += w;
				left -= (size_t)w;
				off += (unsigned long long)w;
			}
		}
		Py_END_ALLOW_THREADS
	}
	for (Py_ssize_t j = 0; j < got; j++)
		PyBuffer_Release(&bufs[j]);
	PyMem_Free(bufs);
	PyMem_Free(offs);
	if (got < n)
		return NULL;
	return Py_BuildValue("ni", err ? i - 1 : n, err);
}

/* fs_apply_run(dir_fd, ops) -> (count, errno, made): a directory applier's records, in order,
 * with the GIL released once for them all. Each op is a tuple:
 *   (0, fd, offset, data)          data written whole at offset of the open file fd; fd -k-1:
 *                                  the file op k (a create of this run) made
 *   (1, name, atime, mtime)        utimensat(dir_fd, name, AT_SYMLINK_NOFOLLOW), times in ns,
 *                                  atime None: left as it is (UTIME_OMIT)
 *   (2, name, mode)                fchmodat2(dir_fd, name, mode, AT_SYMLINK_NOFOLLOW)
 *   (3, name, uid, gid)            fchownat(dir_fd, name, uid, gid, AT_SYMLINK_NOFOLLOW)
 *   (4, name, mode, uid, gid)      a file made (O_EXCL; one already there is opened and
 *                                  truncated, never through a symlink), then fchown, fchmod
 *   (5, name)                      unlinkat(dir_fd, name): a name already gone is no error
 *   (6, name, mode, uid, gid, data, size, atime, mtime)
 *                                  a whole small file (a walk's put): made O_EXCL (a name
 *                                  already there is EEXIST: the caller removes it its own way),
 *                                  fchown, fchmod, data written at 0, ftruncate to size when
 *                                  that differs, futimens; mtime None: times left alone
 * made: [(k, fd)] the files the creates and puts made, open, for the caller to keep (and
 * close); a write's fd -k-1 may name a put's file as well as a create's.
 * Stops at the first that fails: count is how many were done, errno that one's (0: all were);
 * the caller applies that one again its own way, which says why (or, for a symlink's chmod,
 * leaves it alone). */
enum { OP_WRITE, OP_TIMES, OP_CHMOD, OP_CHOWN, OP_CREATE, OP_UNLINK, OP_PUT };
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif

struct fs_op {
	int op, fd;
	const char *name;
	long long a, b, c; /* offset | atime, mtime | mode | uid, gid */
	long long size, atime, mtime; /* a put's */
	int omit_atime, has_times;
	Py_buffer buf;
	int has_buf;
};

static void split_ns(long long ns, struct timespec *ts)
{
	ts->tv_sec = ns / 1000000000LL;
	ts->tv_nsec = ns % 1000000000LL;
	if (ts->tv_nsec < 0) { /* floor, as Python's divmod */
		ts->tv_nsec += 1000000000LL;
		ts->tv_sec -= 1;
	}
}

static int fs_op_parse(PyObject *t, struct fs_op *o)
{
	if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 2) {
		PyErr_SetString(PyExc_TypeError, "fs_apply_run: each op is a tuple (code, ...)");
		return -1;
	}
	Py_ssize_t size = PyTuple_GET_SIZE(t);
	o->op = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
	if (PyErr_Occurred())
		return -1;
	if (o->op == OP_WRITE) {
		if (size != 4)
			goto bad;
		o->fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 1));
		o->a = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
		if (PyErr_Occurred() || PyObject_GetBuffer(PyTuple_GET_ITEM(t, 3), &o->buf, PyBUF_SIMPLE) < 0)
			return -1;
		o->has_buf = 1;
		return 0;
	}
	PyObject *name = PyTuple_GET_ITEM(t, 1);
	if (!PyBytes_Check(name) || (size_t)PyBytes_GET_SIZE(name) != strlen(PyBytes_AS_STRING(name))) {
		PyErr_SetString(PyExc_ValueError, "fs_apply_run: a name is bytes without NUL");
		return -1;
	}
	o->name = PyBytes_AS_STRING(name);
	if (o->op == OP_TIMES && size == 4) {
		PyObject *atime = PyTuple_GET_ITEM(t, 2);
		o->omit_atime = atime == Py_None;
		o->a = o->omit_atime ? 0 : PyLong_AsLongLong(atime);
		o->b = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 3));
	} else if (o->op == OP_CHMOD && size == 3) {
		o->a = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
	} else if (o->op == OP_CHOWN && size == 4) {
		o->a = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
		o->b = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 3));
	} else if (o->op == OP_CREATE && size == 5) {
		o->a = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
		o->b = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 3));
		o->c = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 4));
	} else if (o->op == OP_UNLINK && size == 2) {
		/* the name alone */
	} else if (o->op == OP_PUT && size == 9) {
		o->a = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
		o->b = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 3));
		o->c = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 4));
		o->size = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 6));
		o->has_times = PyTuple_GET_ITEM(t, 8) != Py_None;
		if (o->has_times) {
			o->atime = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 7));
			o->mtime = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 8));
		}
		if (PyErr_Occurred() || PyObject_GetBuffer(PyTuple_GET_ITEM(t, 5), &o->buf, PyBUF_SIMPLE) < 0)
			return -1;
		o->has_buf = 1;
		return 0;
	} else {
		goto bad;
	}
	return PyErr_Occurred() ? -1 : 0;
bad:
	PyErr_SetString(PyExc_ValueError, "fs_apply_run: an op of an unknown code or size");
	return -1;
}

/* pwrite all of it: a write cut short goes on until done or an error says why */
static int write_whole(int fd, const char *p, size_t left, off_t off)
{
	while (left) {
		ssize_t w = pwrite(fd, p, left, off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		if (w == 0)
			return ENOSPC;
		p += w;
		left -= (size_t)w;
		off += w;
	}
	return 0;
}

/* a put: the file made, owned, its mode, data, size and times (as applier._made_file) */
static int fs_put(int dir_fd, struct fs_op *o)
{
	int err = 0;
	int fd = openat(dir_fd, o->name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)o->a);
	if (fd < 0)
		return errno;
	if (fchown(fd, (uid_t)o->b, (gid_t)o->c) < 0 || fchmod(fd, (mode_t)o->a) < 0)
		err = errno;
	if (!err)
		err = write_whole(fd, o->buf.buf, (size_t)o->buf.len, 0);
	if (!err && o->size != (long long)o->buf.len && ftruncate(fd, (off_t)o->size) < 0)
		err = errno;
	if (!err && o->has_times) {
		struct timespec ts[2];
		split_ns(o->atime, &ts[0]);
		split_ns(o->mtime, &ts[1]);
		if (futimens(fd, ts) < 0)
			err = errno;
	}
	if (err) {
		close(fd);
		return err;
	}
	o->fd = fd;
	return 0;
}

static int fs_op_do(int dir_fd, struct fs_op *o, struct fs_op *ops)
{
	int r;
	if (o->op == OP_WRITE)
		return write_whole(o->fd >= 0 ? o->fd : ops[-o->fd - 1].fd, o->buf.buf,
				   (size_t)o->buf.len, (off_t)o->a);
	if (o->op == OP_PUT)
		return fs_put(dir_fd, o);
	if (o->op == OP_TIMES) {
		struct timespec ts[2];
		if (o->omit_atime) {
			ts[0].tv_sec = 0;
			ts[0].tv_nsec = UTIME_OMIT;
		} else {
			split_ns(o->a, &ts[0]);
		}
		split_ns(o->b, &ts[1]);
		r = utimensat(dir_fd, o->name, ts, AT_SYMLINK_NOFOLLOW);
	} else if (o->op == OP_CHMOD) {
		r = (int)syscall(SYS_fchmodat2, dir_fd, o->name, (mode_t)o->a, AT_SYMLINK_NOFOLLOW);
	} else if (o->op == OP_CREATE) {
		int fd = openat(dir_fd, o->name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)o->a);
		if (fd < 0 && errno == EEXIST) /* replayed: the file starts again */
			fd = openat(dir_fd, o->name, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0)
			return errno;
		if (fchown(fd, (uid_t)o->b, (gid_t)o->c) < 0 || fchmod(fd, (mode_t)o->a) < 0) {
			int err = errno;
			close(fd);
			return err;
		}
		o->fd = fd;
		return 0;
	} else if (o->op == OP_UNLINK) {
		r = unlinkat(dir_fd, o->name, 0);
		if (r < 0 && errno == ENOENT)
			r = 0;
	} else {
		r = fchownat(dir_fd, o->name, (uid_t)o->a, (gid_t)o->b, AT_SYMLINK_NOFOLLOW);
	}
	return r < 0 ? errno : 0;
}

static PyObject *fs_apply_run(PyObject *self, PyObject *args)
{
	int dir_fd, err = 0;
	PyObject *ops;
	Py_ssize_t n, got = 0, i = 0;

	if (!PyArg_ParseTuple(args, "iO!:fs_apply_run", &dir_fd, &PyList_Type, &ops))
		return NULL;
	n = PyList_GET_SIZE(ops);
	struct fs_op *o = PyMem_Calloc(n ? (size_t)n : 1, sizeof(struct fs_op));
	if (!o)
		return PyErr_NoMemory();
	for (; got < n; got++) {
		if (fs_op_parse(PyList_GET_ITEM(ops, got), &o[got]) < 0)
			break;
		long k = -(long)o[got].fd - 1; /* a write to a file this run makes: an earlier create or put */
		if (o[got].op == OP_WRITE && o[got].fd < 0 &&
		    (k >= got || (o[k].op != OP_CREATE && o[k].op != OP_PUT))) {
			PyErr_SetString(PyExc_ValueError, "fs_apply_run: a write to a file no earlier op makes");
			PyBuffer_Release(&o[got].buf);
			o[got].has_buf = 0;
			break;
		}
	}
	if (got == n) {
		Py_BEGIN_ALLOW_THREADS
		for (i = 0; i < n; i++)
			if ((err = fs_op_do(dir_fd, &o[i], o)) != 0)
				break;
		Py_END_ALLOW_THREADS
	}
	for (Py_ssize_t j = 0; j <= got && j < n; j++)
		if (o[j].has_buf)
			PyBuffer_Release(&o[j].buf);
	if (got < n) { /* an op that would not parse: nothing was done */
		PyMem_Free(o);
		return NULL;
	}
	PyObject *made = PyList_New(0);
	for (Py_ssize_t j = 0; made && j < i; j++) {
		if (o[j].op != OP_CREATE && o[j].op != OP_PUT)
			continue;
		PyObject *pair = Py_BuildValue("ni", j, o[j].fd);
		if (!pair || PyList_Append(made, pair) < 0)
			Py_CLEAR(made);
		Py_XDECREF(pair);
	}
	if (!made) /* (no memory left: the files made are closed, and the error goes up) */
		for (Py_ssize_t j = 0; j < i; j++)
			if (o[j].op == OP_CREATE || o[j].op == OP_PUT)
				close(o[j].fd);
	PyMem_Free(o);
	return made ? Py_BuildValue("niN", i, err, made) : NULL;
}

static PyMethodDef methods[] = {
	{"read_request", read_request, METH_VARARGS,
	 "read_request(fd, buffer, spin_ns) -> length read, or -errno (-EAGAIN: nothing within spin_ns)"},
	{"serve_writes", serve_writes, METH_VARARGS,
	 "serve_writes(fd, buffer, spin_ns, raw_fd, base, size, file_ino, gen, clock, data, meta, "
	 "max_records, largest) -> (n, count, clock): a block capture's WRITEs answered here (see the source)"},
	{"pwrite_all", pwrite_all, METH_VARARGS,
	 "pwrite_all(fd, base, offsets, datas) -> (count written, errno of the one that failed or 0)"},
	{"fs_apply_run", fs_apply_run, METH_VARARGS,
	 "fs_apply_run(dir_fd, ops) -> (count done, errno of the one that failed or 0, [(op, fd made)]): see the source"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fuseread", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fuseread(void)
{
	return PyModule_Create(&module);
}
