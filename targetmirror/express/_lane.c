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
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifdef TM_HAVE_URING
#include <liburing.h>
#endif

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

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
    STOP_IDLE = 6,      /* loop: no command came within the timeout, or the time budget ended */
    STOP_REVOKED = 7,   /* loop: the mirror wants the lane to stop (stop_fd readable) */
    STOP_WAKE = 8,      /* loop: the ring thread's own wake-up fd (a worker, a stop request) */
    STOP_DEVICE = 9,    /* loop: the uio fd failed (device removed): Python raises for it */
};

#define URING_ENTRIES 256      /* submission queue: two legs x the largest batch */
#define BATCH_MAX 128          /* commands submitted together */
#define BATCH_IOV 8192         /* iovecs of one batch (a 1 MiB command has up to 256) */

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
    int fua_ok;               /* FUA writes are served, as RWF_DSYNC writes */
    uint64_t uring_min;       /* smaller commands are served by plain calls even with ur */
    int64_t *io_clock;        /* [2]: when a call on leg A / B started, 0 when none is running */
    int64_t t_last;           /* end of the previous command: the next one's start */
    struct uring *ur;         /* batched submission, or NULL: one pwritev/preadv per leg */
};

struct job {
    uint64_t eoff, off, length, next_rp;
    uint32_t iov0, iov_cnt;
    int write, fua;
    int32_t res[2];
};

struct uring {
#ifdef TM_HAVE_URING
    struct io_uring ring;
#endif
    int broken;               /* a submission went wrong: its entries may still be queued */
    struct job jobs[BATCH_MAX];
    struct iovec iov[BATCH_IOV];
};

static inline void clock_set(struct lane *l, int leg, int64_t v)
{
    if (l->io_clock)
        __atomic_store_n(&l->io_clock[leg], v, __ATOMIC_RELAXED);
}

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
 * Check one command entry at map offset eoff of ring length len and describe it in *j, its
 * iovecs in iov (room for `room` of them).  Returns STOP_HEAD when the lane may serve it, or
 * the reason Python must (nothing was done then).  -1: the iovecs do not fit `room`.
 */
static int check(struct lane *l, uint64_t eoff, uint64_t len, struct job *j,
                 struct iovec *iov, uint32_t room)
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
    uint64_t room_cdb = eoff + len - cdb_off, lba, blocks;
    switch (cdb[0]) {
    case 0x28: case 0x2A:
        if (room_cdb < 10 || (cdb[1] & ~0x18) || cdb[6] || cdb[9])
            return STOP_ENTRY;
        lba = be(cdb + 2, 4);
        blocks = be(cdb + 7, 2);
        break;
    case 0x88: case 0x8A:
        if (room_cdb < 16 || (cdb[1] & ~0x18) || cdb[14] || cdb[15])
            return STOP_ENTRY;
        lba = be(cdb + 2, 8);
        blocks = be(cdb + 10, 4);
        break;
    default:
        return STOP_ENTRY;
    }
    j->write = (cdb[0] & 0x02) != 0;
    j->fua = (cdb[1] & 0x08) != 0;
    /* FUA: a write made durable by RWF_DSYNC when the caller allows it; a FUA read is a
     * plain read (the page cache is what a flush would make the medium agree with) */
    if (j->fua && j->write && !l->fua_ok)
        return STOP_ENTRY;
    if (j->fua && !j->write && !l->fua_ok)
        return STOP_ENTRY;
    if (blocks == 0 || lba >= l->num_blocks || blocks > l->num_blocks - lba)
        return STOP_ENTRY;
    uint64_t length = blocks * l->block_size, off = lba * l->block_size;
    if (length > l->max_bytes)
        return STOP_ENTRY;
    if (j->write ? (l->wfd[0] < 0 && l->wfd[1] < 0) : l->rfd < 0)
        return STOP_ENTRY;
    if (iov_cnt > room)
        return -1;
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
    if (j->write && !gate_open(l, off, length))
        return STOP_GATE;
    j->eoff = eoff;
    j->off = off;
    j->length = length;
    j->iov_cnt = iov_cnt;
    return STOP_HEAD;
}

static uint64_t regions(const struct lane *l, const struct job *j)
{
    if (!j->write || !l->gate)
        return 0;
    return ((j->off + j->length - 1) >> l->gate_shift) - (j->off >> l->gate_shift) + 1;
}

/* iovecs of the entry again (a short transfer consumes them), advanced by `skip` bytes */
static int rebuild_iov(const struct lane *l, const struct job *j, struct iovec *iov,
                       uint64_t skip)
{
    const uint8_t *d = l->map + j->eoff + REQ_IOV_OFF;
    int n = 0;
    for (uint32_t i = 0; i < j->iov_cnt; i++, d += IOV_SIZE) {
        uint64_t len = ld64(d + 8);
        if (skip >= len) {
            skip -= len;
            continue;
        }
        iov[n].iov_base = l->map + ld64(d) + skip;
        iov[n].iov_len = (size_t)(len - skip);
        skip = 0;
        n++;
    }
    return n;
}

/* whole transfer with pwritev2/preadv2, retrying short transfers; 0 or an errno */
static int xfer2(const struct lane *l, const struct job *j, int fd, uint64_t done)
{
    struct iovec iov[MAX_IOV];
    int flags = j->write && j->fua ? RWF_DSYNC : 0;
    while (done < j->length) {
        int cnt = rebuild_iov(l, j, iov, done);
        ssize_t n = j->write ? pwritev2(fd, iov, cnt, (off_t)(j->off + done), flags)
                             : preadv2(fd, iov, cnt, (off_t)(j->off + done), 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return j->write ? ENOSPC : EIO; /* a read past the image's end: let Python say so */
        done += (uint64_t)n;
    }
    return 0;
}

/* the response, in place: cmd_id stays, kflags/uflags 0, GOOD, read_len 0; count it */
static void answer(struct lane *l, const struct job *j, int64_t ns)
{
    if (j->write) {
        count(l, 1, ns, j->length, l->wfd[0] >= 0, l->wfd[1] >= 0);
        if (l->gate) {
            uint64_t r0 = j->off >> l->gate_shift;
            uint64_t r1 = (j->off + j->length - 1) >> l->gate_shift;
            for (uint64_t r = r0; r <= r1; r++)
                if (!l->touched_n || l->touched[l->touched_n - 1] != r)
                    l->touched[l->touched_n++] = r;
        }
    } else {
        count(l, 0, ns, j->length, l->rleg == 0, l->rleg == 1);
    }
    uint8_t *w = l->map + j->eoff + HDR_ID_FLAGS_OFF;
    w[2] = 0;
    w[3] = 0;
    memset(w + 4, 0, 8);
}

/*
 * One command, one call per leg (no io_uring): legs one after the other.  Returns STOP_HEAD
 * when it was served and answered, or STOP_IO (nothing answered, l->err set).
 */
static int serve_sync(struct lane *l, const struct job *j)
{
    int64_t t0 = l->t_last;
    if (j->write) {
        for (int leg = 0; leg < 2; leg++) {
            if (l->wfd[leg] < 0)
                continue;
            clock_set(l, leg, t0);
            int err = xfer2(l, j, l->wfd[leg], 0);
            clock_set(l, leg, 0);
            if (err) {
                l->err = err;
                return STOP_IO;
            }
        }
    } else {
        clock_set(l, l->rleg, t0);
        int err = xfer2(l, j, l->rfd, 0);
        clock_set(l, l->rleg, 0);
        if (err) {
            l->err = err;
            return STOP_IO;
        }
    }
    int64_t t1 = now_ns();
    l->t_last = t1;
    answer(l, j, t1 - t0);
    return STOP_HEAD;
}

static int overlaps(const struct job *jobs, int n, const struct job *j)
{
    for (int i = 0; i < n; i++)
        if (j->off < jobs[i].off + jobs[i].length && jobs[i].off < j->off + j->length)
            return 1;
    return 0;
}

#ifdef TM_HAVE_URING
/*
 * Submit every leg of jobs[0..n) in one io_uring_enter and reap them all.  Each job's result
 * per leg goes to res[] (bytes or -errno); a short transfer is finished synchronously.
 */
static int submit_batch(struct lane *l, struct uring *u, struct job *jobs, int n)
{
    int nsqe = 0, legs_used[2] = {0, 0};
    for (int k = 0; k < n; k++) {
        struct job *j = &jobs[k];
        j->res[0] = j->res[1] = 0;
        for (int leg = 0; leg < 2; leg++) {
            int fd = j->write ? l->wfd[leg] : (leg == l->rleg ? l->rfd : -1);
            if (fd < 0)
                continue;
            struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
            if (!sqe)
                return EBUSY; /* cannot happen: URING_ENTRIES >= 2 * BATCH_MAX */
            if (j->write) {
                io_uring_prep_writev(sqe, fd, &u->iov[j->iov0], j->iov_cnt, j->off);
                if (j->fua)
                    sqe->rw_flags = RWF_DSYNC;
            } else {
                io_uring_prep_readv(sqe, fd, &u->iov[j->iov0], j->iov_cnt, j->off);
            }
            io_uring_sqe_set_data64(sqe, (uint64_t)k * 2 + (uint64_t)leg);
            legs_used[leg] = 1;
            nsqe++;
        }
    }
    for (int leg = 0; leg < 2; leg++)
        if (legs_used[leg])
            clock_set(l, leg, l->t_last);
    int ret;
    do {
        ret = io_uring_submit_and_wait(&u->ring, (unsigned)nsqe);
    } while (ret == -EINTR);
    int reaped = 0, fatal = ret < 0 ? -ret : 0;
    if (ret >= 0 && ret < nsqe)
        fatal = EAGAIN; /* not all were taken: reap what was, then fail the run */
    int expect = ret < 0 ? 0 : ret;
    while (reaped < expect) {
        struct io_uring_cqe *cqe;
        int w = io_uring_wait_cqe(&u->ring, &cqe);
        if (w == -EINTR)
            continue;
        if (w < 0) {
            fatal = -w;
            break;
        }
        uint64_t tag = io_uring_cqe_get_data64(cqe);
        jobs[tag / 2].res[tag % 2] = cqe->res;
        io_uring_cqe_seen(&u->ring, cqe);
        reaped++;
    }
    for (int leg = 0; leg < 2; leg++)
        if (legs_used[leg])
            clock_set(l, leg, 0);
    if (fatal && reaped < expect) {
        /* completions we could not wait for would land later in a ring we reuse: give up
         * on io_uring for this lane (Python is told through the error) */
        return fatal;
    }
    if (ret >= 0 && ret < nsqe) {
        /* unsubmitted entries stay in the SQ: drop them by running the ring dry */
        return EAGAIN;
    }
    if (ret < 0)
        return fatal;
    /* finish short transfers synchronously */
    for (int k = 0; k < n; k++) {
        struct job *j = &jobs[k];
        for (int leg = 0; leg < 2; leg++) {
            int fd = j->write ? l->wfd[leg] : (leg == l->rleg ? l->rfd : -1);
            if (fd < 0 || j->res[leg] < 0 || (uint64_t)j->res[leg] >= j->length)
                continue;
            if (j->res[leg] == 0 && !j->write) {
                j->res[leg] = -EIO;
                continue;
            }
            int err = xfer2(l, j, fd, (uint64_t)j->res[leg]);
            j->res[leg] = err ? -err : (int32_t)j->length;
        }
    }
    return 0;
}
#endif

/*
 * Walk the ring from *rp_io and serve what the lane may.  Answers are written in place; the
 * tail is stored once at the end.  With io_uring, a batch of commands (up to BATCH_MAX, cut
 * before a command whose range overlaps one already in the batch, so the order of writes to
 * a block is ring order on both legs) goes to the kernel in one call, both legs in parallel.
 */
static int run(struct lane *l, uint64_t *rp_io, Py_ssize_t *served)
{
    uint8_t *mb = l->map;
    uint32_t head = __atomic_load_n((uint32_t *)(mb + MB_CMD_HEAD_OFF), __ATOMIC_ACQUIRE);
    uint64_t rp = *rp_io;
    int why = STOP_HEAD;
    if (head >= l->cmdr_size || head % OP_ALIGN)
        return STOP_CORRUPT;
    l->t_last = now_ns();
    struct uring *u = l->ur;
    struct iovec iov_one[MAX_IOV];
    while (rp != head && why == STOP_HEAD) {
        struct job *jobs = u ? u->jobs : NULL, one;
        int n = 0;
        uint32_t niov = 0;
        uint64_t pend_regions = 0, walk = rp;
        /* collect: one command without io_uring, a batch with it */
        while (walk != head) {
            uint64_t avail = head > walk ? head - walk : l->cmdr_size - walk;
            uint64_t eoff = l->cmdr_off + walk;
            uint32_t len_op = ld32(mb + eoff);
            uint64_t len = len_op & ~OP_MASK;
            uint32_t op = len_op & OP_MASK;
            if (len == 0 || len > avail) {
                why = STOP_CORRUPT;
                break;
            }
            uint64_t next = walk + len == l->cmdr_size ? 0 : walk + len;
            if (op == OP_PAD) {
                walk = next;
                if (n)
                    jobs[n - 1].next_rp = next;
                else
                    rp = next; /* nothing pending before it: consume it now */
                continue;
            }
            if (op != OP_CMD) {
                why = STOP_ENTRY; /* a TMR or an unknown opcode */
                break;
            }
            struct job *j = u ? &jobs[n] : &one;
            struct iovec *iov = u ? &u->iov[niov] : iov_one;
            int c = check(l, eoff, len, j, iov, u ? BATCH_IOV - niov : MAX_IOV);
            if (c < 0)
                break; /* the batch's iovecs are full: serve it, then go on */
            if (c != STOP_HEAD) {
                why = c;
                break;
            }
            uint64_t reg = regions(l, j);
            if ((uint64_t)(l->touched_cap - l->touched_n) < pend_regions + reg) {
                why = STOP_FULL;
                break;
            }
            /* small commands are cheaper as plain calls than through io_uring, which hands
             * page-cache writes it cannot do without blocking to a worker thread */
            int small = u && j->length < l->uring_min;
            if (u && n && (small || overlaps(jobs, n, j)))
                break; /* serve the batch first: ring order on each leg */
            j->iov0 = niov;
            j->next_rp = next;
            walk = next;
            if (!u || small) {
                int r = serve_sync(l, j);
                if (r != STOP_HEAD) {
                    why = r;
                    break;
                }
                (*served)++;
                rp = next;
                continue;
            }
            pend_regions += reg;
            niov += j->iov_cnt;
            if (++n == BATCH_MAX)
                break;
        }
#ifdef TM_HAVE_URING
        if (u && n) {
            int64_t t0 = l->t_last;
            int err = submit_batch(l, u, jobs, n);
            int64_t t1 = now_ns();
            l->t_last = t1;
            if (err) {
                l->err = err;
                why = STOP_IO;
                u->broken = 1; /* it may hold stale entries: never used again */
                break;
            }
            /* the commands of a batch ran side by side: each took the batch's time */
            int64_t each = t1 - t0;
            for (int k = 0; k < n; k++) {
                struct job *j = &jobs[k];
                int bad = 0;
                for (int leg = 0; leg < 2; leg++)
                    if (j->res[leg] < 0) {
                        bad = 1;
                        l->err = -j->res[leg];
                    }
                if (bad) {
                    /* this and the later commands of the batch are Python's (their I/O is
                     * done again there, in ring order, which gives the same bytes) */
                    why = STOP_IO;
                    break;
                }
                answer(l, j, each);
                (*served)++;
                rp = j->next_rp;
            }
        }
#else
        (void)jobs;
        (void)n;
        (void)niov;
#endif
        if (!u)
            break; /* the synchronous walk above went to the head or to a stop */
        if (!n && walk == rp)
            break; /* nothing consumed, nothing batched: a stop (why says which) */
    }
    if (rp != *rp_io) {
        /* the responses above are stored before the tail that publishes them */
        __atomic_store_n((uint32_t *)(mb + MB_CMD_TAIL_OFF), (uint32_t)rp, __ATOMIC_RELEASE);
        *rp_io = rp;
    }
    return why;
}

/*
 * The wait loop: serve, notify once per batch, wait on the uio fd (and the mirror's stop_fd,
 * and the ring thread's wake fd) and serve again, until something needs Python.
 */
static int loop(struct lane *l, int uio_fd, int stop_fd, int wake_fd, int timeout_ms,
                int64_t budget_ns, uint64_t *rp_io, Py_ssize_t *served, int *notifies,
                int *unnotified)
{
    static const uint32_t one = 0;
    int64_t start = now_ns();
    for (;;) {
        uint64_t before = *rp_io;
        int why = run(l, rp_io, served);
        int moved = *rp_io != before;
        if (why != STOP_HEAD || uio_fd < 0) {
            *unnotified = moved;
            return why;
        }
        if (moved) {
            ssize_t w;
            do {
                w = write(uio_fd, &one, 4);
            } while (w < 0 && errno == EINTR);
            if (w != 4) {
                l->err = w < 0 ? errno : EIO;
                *unnotified = 1;
                return STOP_DEVICE;
            }
            (*notifies)++;
        }
        *unnotified = 0;
        if (l->t_last - start > budget_ns)
            return STOP_IDLE;
        struct pollfd p[3] = {{uio_fd, POLLIN, 0}, {stop_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
        int n = poll(p, 3, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            l->err = errno;
            return STOP_DEVICE;
        }
        if (n == 0)
            return STOP_IDLE;
        if (p[1].revents)
            return STOP_REVOKED;
        if (p[2].revents)
            return STOP_WAKE;
        if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            l->err = EIO;
            return STOP_DEVICE;
        }
        uint32_t events;
        ssize_t r = read(uio_fd, &events, 4);
        if (r < 0 && errno != EAGAIN && errno != EINTR) {
            l->err = errno;
            return STOP_DEVICE;
        }
        if (r >= 0 && r != 4) { /* a UIO fd reads 4 bytes or fails: end of file, device gone */
            l->err = EIO;
            return STOP_DEVICE;
        }
    }
}

PyDoc_STRVAR(drain_doc,
"drain(map, cmdr_off, cmdr_size, rp, wfd_a, wfd_b, rfd, rleg, block_size, num_blocks,\n"
"      max_bytes, gate, gate_shift, gate_bits, touched, stats, bounds, stride, bytes_off)\n"
"-> (rp, served, touched_n, stop, errno)\n\n"
"Serve plain READ/WRITE commands from ring offset rp (== cmd_tail, nothing in flight) until\n"
"cmd_head or the first entry Python must handle; answer each GOOD in place and advance\n"
"cmd_tail.  Runs without the GIL: the caller holds every lock that guards what it uses.");

PyDoc_STRVAR(loop_doc,
"loop(<drain's arguments>, uio_fd, stop_fd, wake_fd, timeout_ms, budget_ns, io_clock, uring,\n"
"     fua_ok, uring_min) -> (rp, served, touched_n, stop, errno, notifies, unnotified)\n\n"
"drain, then notify the kernel (one 4-byte write to uio_fd per batch) and wait in poll for\n"
"the next commands, serving them the same way, without going back to Python.  Returns for an\n"
"entry Python must handle (unnotified: answers are in the ring but the kernel was not told),\n"
"when stop_fd or wake_fd is readable (neither is read), after timeout_ms without a command\n"
"or once budget_ns have passed, or when the uio fd fails.  io_clock (2 x int64 or None)\n"
"holds CLOCK_MONOTONIC ns while a call on leg A / B runs, else 0.  uring: a handle from\n"
"uring() (both legs of a batch of commands of at least uring_min bytes each in one\n"
"io_uring_enter; smaller ones one call per leg) or None.  fua_ok: serve FUA writes as\n"
"RWF_DSYNC writes.");

#ifdef TM_HAVE_URING
static void uring_free(PyObject *cap)
{
    struct uring *u = PyCapsule_GetPointer(cap, "targetmirror.uring");
    if (u) {
        io_uring_queue_exit(&u->ring);
        free(u);
    }
}
#endif

PyDoc_STRVAR(uring_doc,
"uring() -> handle for loop()'s batched submission; OSError if the kernel refuses io_uring,\n"
"NotImplementedError if the lane was built without liburing.");

static PyObject *uring(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
#ifdef TM_HAVE_URING
    struct uring *u = calloc(1, sizeof *u);
    if (!u)
        return PyErr_NoMemory();
    int r = io_uring_queue_init(URING_ENTRIES, &u->ring, 0);
    if (r < 0) {
        free(u);
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *cap = PyCapsule_New(u, "targetmirror.uring", uring_free);
    if (!cap) {
        io_uring_queue_exit(&u->ring);
        free(u);
    }
    return cap;
#else
    PyErr_SetString(PyExc_NotImplementedError, "the express lane was built without liburing");
    return NULL;
#endif
}

static PyObject *call(PyObject *args, int is_loop)
{
    Py_buffer map = {0}, touched = {0}, stats = {0}, bounds = {0}, gate = {0}, clock = {0};
    PyObject *gate_obj, *clock_obj = Py_None, *uring_obj = Py_None;
    unsigned long long cmdr_off, cmdr_size, rp, block_size, num_blocks, max_bytes, gate_bits;
    int wfd_a, wfd_b, rfd, rleg, gate_shift;
    int uio_fd = -1, stop_fd = -1, wake_fd = -1, timeout_ms = 0, fua_ok = 0;
    unsigned long long uring_min = 0;
    long long budget_ns = 0;
    Py_ssize_t stride, bytes_off;
    struct lane l;
    int ok = is_loop
        ? PyArg_ParseTuple(args, "w*KKKiiiiKKKOiKw*w*y*nniiiiLOOpK:loop", &map, &cmdr_off,
                           &cmdr_size, &rp, &wfd_a, &wfd_b, &rfd, &rleg, &block_size,
                           &num_blocks, &max_bytes, &gate_obj, &gate_shift, &gate_bits,
                           &touched, &stats, &bounds, &stride, &bytes_off, &uio_fd, &stop_fd,
                           &wake_fd, &timeout_ms, &budget_ns, &clock_obj, &uring_obj, &fua_ok,
                           &uring_min)
        : PyArg_ParseTuple(args, "w*KKKiiiiKKKOiKw*w*y*nn:drain", &map, &cmdr_off, &cmdr_size,
                           &rp, &wfd_a, &wfd_b, &rfd, &rleg, &block_size, &num_blocks,
                           &max_bytes, &gate_obj, &gate_shift, &gate_bits, &touched, &stats,
                           &bounds, &stride, &bytes_off);
    if (!ok)
        return NULL;
    memset(&l, 0, sizeof l);
    PyObject *ret = NULL;
    if (gate_obj != Py_None && PyObject_GetBuffer(gate_obj, &gate, PyBUF_SIMPLE) < 0)
        goto out;
    if (clock_obj != Py_None && PyObject_GetBuffer(clock_obj, &clock, PyBUF_WRITABLE) < 0)
        goto out;
    if (cmdr_off < 128 || cmdr_size == 0 || cmdr_off + cmdr_size > (uint64_t)map.len
        || rp >= cmdr_size || rp % OP_ALIGN || block_size == 0 || gate_shift < 0
        || gate_shift > 63 || (gate.buf && gate_bits > (uint64_t)gate.len * 8)
        || touched.itemsize != 8 || stats.itemsize != 8 || bounds.itemsize != 8
        || stride < 2 + bounds.len / 8 + 1 || bytes_off + 4 > stats.len / 8
        || 2 * stride > bytes_off || (clock.buf && clock.len < 16) || rleg < 0 || rleg > 1
        || timeout_ms < -1) {
        PyErr_SetString(PyExc_ValueError, "drain: inconsistent ring or lane geometry");
        goto out;
    }
    if (uring_obj != Py_None) {
        l.ur = PyCapsule_GetPointer(uring_obj, "targetmirror.uring");
        if (!l.ur)
            goto out;
        if (l.ur->broken)
            l.ur = NULL; /* Python sees HAVE_URING and a broken handle: one pwritev per leg */
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
    l.io_clock = clock.buf;
    l.fua_ok = fua_ok;
    l.uring_min = uring_min;
    uint64_t new_rp = rp;
    Py_ssize_t served = 0;
    int why, notifies = 0, unnotified = 0;
    Py_BEGIN_ALLOW_THREADS
    why = loop(&l, is_loop ? uio_fd : -1, stop_fd, wake_fd, timeout_ms, (int64_t)budget_ns,
               &new_rp, &served, &notifies, &unnotified);
    Py_END_ALLOW_THREADS
    if (is_loop)
        ret = Py_BuildValue("Knniiii", (unsigned long long)new_rp, served, l.touched_n, why,
                            l.err, notifies, unnotified);
    else
        ret = Py_BuildValue("Knnii", (unsigned long long)new_rp, served, l.touched_n, why,
                            l.err);
out:
    PyBuffer_Release(&map);
    PyBuffer_Release(&touched);
    PyBuffer_Release(&stats);
    PyBuffer_Release(&bounds);
    if (gate.buf)
        PyBuffer_Release(&gate);
    if (clock.buf)
        PyBuffer_Release(&clock);
    return ret;
}

static PyObject *drain(PyObject *self, PyObject *args)
{
    (void)self;
    return call(args, 0);
}

static PyObject *loop_py(PyObject *self, PyObject *args)
{
    (void)self;
    return call(args, 1);
}

static PyMethodDef methods[] = {
    {"drain", drain, METH_VARARGS, drain_doc},
    {"loop", loop_py, METH_VARARGS, loop_doc},
    {"uring", uring, METH_NOARGS, uring_doc},
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
        || PyModule_AddIntConstant(m, "STOP_IDLE", STOP_IDLE) < 0
        || PyModule_AddIntConstant(m, "STOP_REVOKED", STOP_REVOKED) < 0
        || PyModule_AddIntConstant(m, "STOP_WAKE", STOP_WAKE) < 0
        || PyModule_AddIntConstant(m, "STOP_DEVICE", STOP_DEVICE) < 0
#ifdef TM_HAVE_URING
        || PyModule_AddIntConstant(m, "HAVE_URING", 1) < 0
#else
        || PyModule_AddIntConstant(m, "HAVE_URING", 0) < 0
#endif
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
