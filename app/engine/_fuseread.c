/*
 * app.engine._fuseread: the request loop's read of /dev/fuse, compiled (issue 14).
 *
 * After answering a request the loop polls /dev/fuse for the next one for a few tens of
 * microseconds before it parks in trio's epoll (an application doing one request after another
 * sends its next within microseconds, and parking then waking costs more than that). Polled
 * from Python, every empty read raised and caught a BlockingIOError, and the loop held the GIL
 * all the while, so the applier thread beside it could not run. Here the poll runs with the GIL
 * released and an empty read costs one system call.
 *
 * Optional: built by the project's own install step (pip install, a C compiler and Python's
 * headers); without it app/engine/fusewire.py polls from Python as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* read_request(fd, buffer, spin_ns) -> int: the length of the request read into `buffer`
 * (0 at end of file), or minus the errno of the read: -EAGAIN once `spin_ns` passed with
 * nothing to read (`fd` is non-blocking); EINTR is retried. */
static PyObject *read_request(PyObject *self, PyObject *args)
{
	int fd, err = 0;
	Py_buffer buf;
	long long spin, start = 0;
	ssize_t n;

	if (!PyArg_ParseTuple(args, "iw*L:read_request", &fd, &buf, &spin))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	for (;;) {
		n = read(fd, buf.buf, (size_t)buf.len);
		if (n >= 0)
			break;
		err = errno;
		if (err == EINTR)
			continue;
		if (err != EAGAIN)
			break;
		long long t = now_ns();
		if (!start)
			start = t;
		if (t - start >= spin)
			break;
#if defined(__x86_64__) || defined(__i386__)
		__builtin_ia32_pause();
#endif
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&buf);
	return PyLong_FromSsize_t(n >= 0 ? n : -(ssize_t)err);
}

static PyMethodDef methods[] = {
	{"read_request", read_request, METH_VARARGS,
	 "read_request(fd, buffer, spin_ns) -> length read, or -errno (-EAGAIN: nothing within spin_ns)"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fuseread", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fuseread(void)
{
	return PyModule_Create(&module);
}
