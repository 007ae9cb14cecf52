/*
 * targetmirror express lane: plain READ/WRITE commands served straight from the TCMU ring.
 *
 * Why this exists: under load almost every command is a small plain READ or WRITE, and the
 * Python path spends ~125 interpreter calls on each (ring parse, decode, admission, range lock,
 * bitmap test, two pwritev, metrics, completion).  Profiles of the lab guest show that cost,
 * not the disk, is the wall.  This function does the same work for a run of such commands in C,
 * with the GIL released, and stops at the first command it does not fully understand; Python
 * then takes over at exactly that entry, so everything unusual still goes the one general way.
 *
 * It is only called when the caller has made the world simple (see targetmirror/express):
 * no command of this device in flight, the ring's tail equal to its read pointer, the mirror
 * quiet (no copy, no split draining, no failed leg) and its admission lock held, so nothing
 * can change the legs, the bitmap or the split instant while we run.
 *
 * Memory safety is the ring code's rule: the data area is touched only through the iovecs of
 * the command being served, each checked to lie inside [data_off, map size) first (a page
 * outside a live command may be unmapped: SIGBUS).  Every ring offset read from shared memory
 * is bounds-checked before use.
 *
 * Written for targetmirror; the layout constants are checked against
 * targetmirror/tcmu/layout.py by tests/express/test_lane.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#define MB_CMD_HEAD_OFF 12
#define MB_CMD_TAIL_OFF 64
#define OP_MASK 0x7u
#define OP_PAD 0u
#define OP_CMD 1u
#define HDR_ID_FLAGS_OFF 4
#define REQ_OFF 8
#define REQ_IOV_OFF 48
#define IOV_SIZE 16
#define CMD_ENTRY_SIZE 112
#define OP_ALIGN 8u
#define MAX_IOV 1024

/* why the lane stopped: Python reads these names from the module */
enum stop {
    STOP_HEAD = 0,      /* reached cmd_head: every queued command was served */
    STOP_ENTRY = 1,     /* an entry that is not a plain READ/WRITE we may run: Python's turn */
    STOP_GATE = 2,      /* a write whose bitmap bits are not set (admission must mark them) */
    STOP_IO = 3,        /* a read or write failed: Python re-runs it and handles the leg */
    STOP_FULL = 4,      /* the touched-region buffer is full */
    STOP_CORRUPT = 5,   /* cmd_head or an entry length is not valid: Python raises for it */
};

static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* whole transfer, retrying short transfers; 0 or an errno */
static int xfer(int fd, int write, struct iovec *iov, int cnt, uint64_t off)
{
    while (cnt > 0) {
        ssize_t n = write ? pwritev(fd, iov, cnt, (off_t)off) : preadv(fd, iov, cnt, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return write ? ENOSPC : EIO; /* a read past the image's end: let Python say so */
        off += (uint64_t)n;
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

struct lane {
    uint8_t *map;
    uint64_t map_size, cmdr_off, cmdr_size, data_off;
    int wfd[2], rfd, rleg;
    uint64_t block_size, num_blocks, max_bytes;
    const uint8_t *gate;
    uint64_t gate_bits;
    int gate_shift;
    uint64_t *touched;
    Py_ssize_t touched_cap, touched_n;
    int64_t *stats;
    Py_ssize_t stats_len;
    const int64_t *bounds;
    Py_ssize_t nbounds;
    Py_ssize_t stride, bytes_off;
    int err;
};

static void count(struct lane *l, int dir, int64_t ns, uint64_t nbytes, int leg_a, int leg_b)
{
    Py_ssize_t base = dir * l->stride, b = 0;
    while (b < l->nbounds && ns > l->bounds[b])
        b++;
    l->stats[base] += 1;
    l->stats[base + 1] += ns;
    l->stats[base + 2 + b] += 1;
    if (leg_a)
        l->stats[l->bytes_off + dir * 2] += (int64_t)nbytes;
    if (leg_b)
        l->stats[l->bytes_off + dir * 2 + 1] += (int64_t)nbytes;
}

/* every region bit of [off, off+len) set in the gate? */
static int gate_open(const struct lane *l, uint64_t off, uint64_t len)
{
    if (!l->gate)
        return 1;
    uint64_t r0 = off >> l->gate_shift, r1 = (off + len - 1) >> l->gate_shift;
    if (r1 >= l->gate_bits)
        return 0;
    for (uint64_t r = r0; r <= r1; r++)
        if (!(l->gate[r >> 3] & (1u << (r & 7))))
            return 0;
    return 1;
}

/*
 * Serve one command entry at map offset eoff of ring length len.  Returns STOP_HEAD when it
 * was served and answered, or the reason Python must serve it (nothing was answered then).
 */
static int serve(struct lane *l, uint64_t eoff, uint64_t len, struct iovec *iov)
{
    const uint8_t *e = l->map + eoff;
    if (len < CMD_ENTRY_SIZE)
        return STOP_ENTRY;
    uint32_t iov_cnt = ld32(e + REQ_OFF), bidi = ld32(e + REQ_OFF + 4);
    uint32_t dif = ld32(e + REQ_OFF + 8);
    uint64_t cdb_off = ld64(e + REQ_OFF + 16);
    if (bidi || dif || iov_cnt == 0 || iov_cnt > MAX_IOV)
        return STOP_ENTRY;
    uint64_t iov_end = eoff + REQ_IOV_OFF + (uint64_t)IOV_SIZE * iov_cnt;
    /* cdb_off is an offset from the start of the map, like the kernel writes it */
    if (iov_end > eoff + len || cdb_off < iov_end || cdb_off >= eoff + len)
        return STOP_ENTRY;
    const uint8_t *cdb = l->map + cdb_off;
    uint64_t room = eoff + len - cdb_off, lba, blocks;
    int write;
    switch (cdb[0]) {
    case 0x28: case 0x2A:
        if (room < 10 || (cdb[1] & ~0x18) || cdb[6] || cdb[9])
            return STOP_ENTRY;
        lba = be(cdb + 2, 4);
        blocks = be(cdb + 7, 2);
        break;
    case 0x88: case 0x8A:
        if (room < 16 || (cdb[1] & ~0x18) || cdb[14] || cdb[15])
            return STOP_ENTRY;
        lba = be(cdb + 2, 8);
        blocks = be(cdb + 10, 4);
        break;
    default:
        return STOP_ENTRY;
    }
    if (cdb[1] & 0x08) /* FUA: the flush and its error mapping stay in Python */
        return STOP_ENTRY;
    write = (cdb[0] & 0x02) != 0;
    if (blocks == 0 || lba >= l->num_blocks || blocks > l->num_blocks - lba)
        return STOP_ENTRY;
    uint64_t length = blocks * l->block_size, off = lba * l->block_size;
    if (length > l->max_bytes)
        return STOP_ENTRY;
    if (write ? (l->wfd[0] < 0 && l->wfd[1] < 0) : l->rfd < 0)
        return STOP_ENTRY;
    uint64_t total = 0;
    const uint8_t *d = l->map + eoff + REQ_IOV_OFF;
    for (uint32_t i = 0; i < iov_cnt; i++, d += IOV_SIZE) {
        uint64_t base = ld64(d), n = ld64(d + 8);
        if (n == 0 || base < l->data_off || base > l->map_size || n > l->map_size - base)
            return STOP_ENTRY; /* the ring code names the bad iovec */
        iov[i].iov_base = l->map + base;
        iov[i].iov_len = (size_t)n;
        total += n;
    }
    if (total != length)
        return STOP_ENTRY;
    if (write && !gate_open(l, off, length))
        return STOP_GATE;
    if (write && l->gate) {
        uint64_t r0 = off >> l->gate_shift, r1 = (off + length - 1) >> l->gate_shift;
        if ((uint64_t)(l->touched_cap - l->touched_n) < r1 - r0 + 1)
            return STOP_FULL;
    }
    int64_t t0 = now_ns();
    if (write) {
        /* iov is consumed by a short transfer: rebuild it for the second leg */
        for (int leg = 0; leg < 2; leg++) {
            if (l->wfd[leg] < 0)
                continue;
            if (leg == 1 && l->wfd[0] >= 0) {
                d = l->map + eoff + REQ_IOV_OFF;
                for (uint32_t i = 0; i < iov_cnt; i++, d += IOV_SIZE) {
                    iov[i].iov_base = l->map + ld64(d);
                    iov[i].iov_len = (size_t)ld64(d + 8);
                }
            }
            int err = xfer(l->wfd[leg], 1, iov, (int)iov_cnt, off);
            if (err) {
                l->err = err;
                return STOP_IO;
            }
        }
        if (l->gate) {
            uint64_t r0 = off >> l->gate_shift, r1 = (off + length - 1) >> l->gate_shift;
            for (uint64_t r = r0; r <= r1; r++)
                if (!l->touched_n || l->touched[l->touched_n - 1] != r)
                    l->touched[l->touched_n++] = r;
        }
    } else {
        int err = xfer(l->rfd, 0, iov, (int)iov_cnt, off);
        if (err) {
            l->err = err;
            return STOP_IO;
        }
    }
    int64_t ns = now_ns() - t0;
    if (write)
        count(l, 1, ns, length, l->wfd[0] >= 0, l->wfd[1] >= 0);
    else
        count(l, 0, ns, length, l->rleg == 0, l->rleg == 1);
    /* the response, in place: cmd_id stays, kflags/uflags 0, GOOD, read_len 0 */
    uint8_t *w = l->map + eoff + HDR_ID_FLAGS_OFF;
    w[2] = 0;
    w[3] = 0;
    memset(w + 4, 0, 8);
    return STOP_HEAD;
}

static int run(struct lane *l, uint64_t *rp_io, Py_ssize_t *served)
{
    struct iovec iov[MAX_IOV];
    uint8_t *mb = l->map;
    uint32_t head = __atomic_load_n((uint32_t *)(mb + MB_CMD_HEAD_OFF), __ATOMIC_ACQUIRE);
    uint64_t rp = *rp_io;
    int why = STOP_HEAD;
    if (head >= l->cmdr_size || head % OP_ALIGN)
        return STOP_CORRUPT;
    while (rp != head) {
        uint64_t avail = head > rp ? head - rp : l->cmdr_size - rp;
        uint64_t eoff = l->cmdr_off + rp;
        uint32_t len_op = ld32(mb + eoff);
        uint64_t len = len_op & ~OP_MASK;
        uint32_t op = len_op & OP_MASK;
        if (len == 0 || len > avail) {
            why = STOP_CORRUPT;
            break;
        }
        if (op == OP_CMD) {
            why = serve(l, eoff, len, iov);
            if (why != STOP_HEAD)
                break;
            (*served)++;
        } else if (op != OP_PAD) {
            why = STOP_ENTRY; /* a TMR or an unknown opcode */
            break;
        }
        rp += len;
        if (rp == l->cmdr_size)
            rp = 0;
    }
    if (rp != *rp_io) {
        /* the responses above are stored before the tail that publishes them */
        __atomic_store_n((uint32_t *)(mb + MB_CMD_TAIL_OFF), (uint32_t)rp, __ATOMIC_RELEASE);
        *rp_io = rp;
    }
    return why;
}

PyDoc_STRVAR(drain_doc,
"drain(map, cmdr_off, cmdr_size, rp, wfd_a, wfd_b, rfd, rleg, block_size, num_blocks,\n"
"      max_bytes, gate, gate_shift, gate_bits, touched, stats, bounds, stride, bytes_off)\n"
"-> (rp, served, touched_n, stop, errno)\n\n"
"Serve plain READ/WRITE commands from ring offset rp (== cmd_tail, nothing in flight) until\n"
"cmd_head or the first entry Python must handle; answer each GOOD in place and advance\n"
"cmd_tail.  Runs without the GIL: the caller holds every lock that guards what it uses.");

static PyObject *drain(PyObject *self, PyObject *args)
{
    Py_buffer map = {0}, touched = {0}, stats = {0}, bounds = {0}, gate = {0};
    PyObject *gate_obj;
    unsigned long long cmdr_off, cmdr_size, rp, block_size, num_blocks, max_bytes, gate_bits;
    int wfd_a, wfd_b, rfd, rleg, gate_shift;
    Py_ssize_t stride, bytes_off;
    struct lane l;
    if (!PyArg_ParseTuple(args, "w*KKKiiiiKKKOiKw*w*y*nn:drain", &map, &cmdr_off, &cmdr_size,
                          &rp, &wfd_a, &wfd_b, &rfd, &rleg, &block_size, &num_blocks,
                          &max_bytes, &gate_obj, &gate_shift, &gate_bits, &touched, &stats,
                          &bounds, &stride, &bytes_off))
        return NULL;
    memset(&l, 0, sizeof l);
    PyObject *ret = NULL;
    if (gate_obj != Py_None && PyObject_GetBuffer(gate_obj, &gate, PyBUF_SIMPLE) < 0)
        goto out;
    if (cmdr_off < 128 || cmdr_size == 0 || cmdr_off + cmdr_size > (uint64_t)map.len
        || rp >= cmdr_size || rp % OP_ALIGN || block_size == 0 || gate_shift < 0
        || gate_shift > 63 || (gate.buf && gate_bits > (uint64_t)gate.len * 8)
        || touched.itemsize != 8 || stats.itemsize != 8 || bounds.itemsize != 8
        || stride < 2 + bounds.len / 8 + 1 || bytes_off + 4 > stats.len / 8
        || 2 * stride > bytes_off) {
        PyErr_SetString(PyExc_ValueError, "drain: inconsistent ring or lane geometry");
        goto out;
    }
    l.map = map.buf;
    l.map_size = (uint64_t)map.len;
    l.cmdr_off = cmdr_off;
    l.cmdr_size = cmdr_size;
    l.data_off = cmdr_off + cmdr_size;
    l.wfd[0] = wfd_a;
    l.wfd[1] = wfd_b;
    l.rfd = rfd;
    l.rleg = rleg;
    l.block_size = block_size;
    l.num_blocks = num_blocks;
    l.max_bytes = max_bytes;
    l.gate = gate.buf;
    l.gate_bits = gate_bits;
    l.gate_shift = gate_shift;
    l.touched = touched.buf;
    l.touched_cap = touched.len / 8;
    l.stats = stats.buf;
    l.stats_len = stats.len / 8;
    l.bounds = bounds.buf;
    l.nbounds = bounds.len / 8;
    l.stride = stride;
    l.bytes_off = bytes_off;
    uint64_t new_rp = rp;
    Py_ssize_t served = 0;
    int why;
    Py_BEGIN_ALLOW_THREADS
    why = run(&l, &new_rp, &served);
    Py_END_ALLOW_THREADS
    ret = Py_BuildValue("Knnii", (unsigned long long)new_rp, served, l.touched_n, why, l.err);
out:
    PyBuffer_Release(&map);
    PyBuffer_Release(&touched);
    PyBuffer_Release(&stats);
    PyBuffer_Release(&bounds);
    if (gate.buf)
        PyBuffer_Release(&gate);
    return ret;
}

static PyMethodDef methods[] = {
    {"drain", drain, METH_VARARGS, drain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lane",
    "The express lane's compiled core (see targetmirror/express/__init__.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__lane(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "STOP_HEAD", STOP_HEAD) < 0
        || PyModule_AddIntConstant(m, "STOP_ENTRY", STOP_ENTRY) < 0
        || PyModule_AddIntConstant(m, "STOP_GATE", STOP_GATE) < 0
        || PyModule_AddIntConstant(m, "STOP_IO", STOP_IO) < 0
        || PyModule_AddIntConstant(m, "STOP_FULL", STOP_FULL) < 0
        || PyModule_AddIntConstant(m, "STOP_CORRUPT", STOP_CORRUPT) < 0
        || PyModule_AddIntConstant(m, "MB_CMD_HEAD_OFF", MB_CMD_HEAD_OFF) < 0
        || PyModule_AddIntConstant(m, "MB_CMD_TAIL_OFF", MB_CMD_TAIL_OFF) < 0
        || PyModule_AddIntConstant(m, "REQ_IOV_OFF", REQ_IOV_OFF) < 0
        || PyModule_AddIntConstant(m, "CMD_ENTRY_SIZE", CMD_ENTRY_SIZE) < 0
        || PyModule_AddIntConstant(m, "HDR_ID_FLAGS_OFF", HDR_ID_FLAGS_OFF) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
