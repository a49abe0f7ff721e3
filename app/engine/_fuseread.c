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
 * Optional: built by the project's own install step (pip install, a C compiler and Python's
 * headers); without it app/engine/fusewire.py polls from Python as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
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

static PyMethodDef methods[] = {
	{"read_request", read_request, METH_VARARGS,
	 "read_request(fd, buffer, spin_ns) -> length read, or -errno (-EAGAIN: nothing within spin_ns)"},
	{"serve_writes", serve_writes, METH_VARARGS,
	 "serve_writes(fd, buffer, spin_ns, raw_fd, base, size, file_ino, gen, clock, data, meta, "
	 "max_records, largest) -> (n, count, clock): a block capture's WRITEs answered here (see the source)"},
	{"pwrite_all", pwrite_all, METH_VARARGS,
	 "pwrite_all(fd, base, offsets, datas) -> (count written, errno of the one that failed or 0)"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fuseread", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fuseread(void)
{
	return PyModule_Create(&module);
}
