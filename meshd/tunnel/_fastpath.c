/* meshd.tunnel._fastpath: the tunnel's native fast path.
 *
 * A C thread owns the reads of the TUN fd and the tunnel's UDP socket and moves the common case
 * -- a lone data packet under a peer's current keys on a direct path -- between them without
 * entering the interpreter. Everything else (handshakes, STUN, TURN, GRO-coalesced reads, bulk
 * offload frames, other keys, anything odd) is handed to Python unchanged, in arrival order,
 * through a queue and an eventfd (`FastPath.drain`). A datagram under a route's receiver index
 * that fails authentication is the exception: dropped and counted here (`auth_failed`), since
 * Python would open it a second time only to reject it the same way.
 *
 * Wire formats are meshd/tunnel/wire.py's (0xE3 data, 0xE4 fragments; big-endian headers) and
 * meshd/tunnel/offload.py's (10-byte little-endian virtio_net_hdr in front of a frame). AEAD:
 * ChaCha20-Poly1305 (RFC 8439 §2.8, 16-byte tag, no associated data); the 96-bit nonce is 4
 * zero bytes and the 64-bit counter little-endian (Noise §5.1 as WireGuard uses it).
 *
 * Threads and locks:
 * - the thread never takes the GIL and never touches a Python object's Python state: only the
 *   C state of the Counter (an atomic) and ReplayWindow (its own mutex) of installed peers. The
 *   peer table holds references to both; they are dropped under the GIL, only after the peer
 *   left the table under `peers_lock`, so the thread cannot be using them then;
 * - `peers_lock` guards the peer table, the peers' cipher contexts and per-peer stats. The
 *   thread holds it from the lookup to the end of the AEAD call, never across I/O;
 * - `queue_lock` guards the hand-off queue. The two are never held together;
 * - Python callers wait for either lock with the GIL released, and never run Python code (which
 *   may release the GIL) while holding one; lock order peers_lock -> a ReplayWindow's lock.
 *
 * The thread reads and writes its own dup()s of the caller's fds (a caller that closes or reuses
 * a number cannot pull the file from under it). An error it cannot get past (poll failing, mesh0
 * gone, the socket shut down) ends it: it records the errno and where (`FastPath.error`) as its
 * last act, after its last hand-off, and wakes Python through the eventfd, so that Python reads
 * `error` and then drains everything the thread had queued.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "../native/sockaddr.h"
#include "../native/udp.h"

enum {
    TYPE_DATA = 0xE3,
    TYPE_FRAGMENT = 0xE4,
    DATA_HEADER = 13,     /* !BIQ: type, receiver index, counter */
    FRAGMENT_HEADER = 15, /* !BIQBB: ... part, count */
    TAGLEN = 16,
    KEYLEN = 32,
    NONCELEN = 12,
    VNET_HDR = 10,        /* <BBHHHH: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset */
    F_NEEDS_CSUM = 1,
    F_DATA_VALID = 2,
    GSO_NONE = 0,
    GSO_TCPV4 = 1,
    GSO_TCPV6 = 4,
    GSO_UDP_L4 = 5,
    GSO_ECN = 0x80,
    MIN_IPV4 = 20,
    MAX_FRAGMENTS = 64,               /* wire.MAX_FRAGMENTS; also the kernel's UDP_MAX_SEGMENTS */
    GSO_MAX_BYTES = 65000,            /* one GSO send's UDP payload at most (service.py's) */
    TUN_READ = VNET_HDR + 0xFFFF + 1, /* 65546: the largest frame and one byte */
    UDP_READ = 65535,                 /* what the Python reader asks for */
    HEADROOM = 32,                    /* room for headers in front of a TUN read */
    CHANNEL_HEADER = 4,               /* TURN ChannelData: channel, length (RFC 8656 §12.4) */
    CHANNEL_MIN = 0x4000,             /* RFC 8656 §12: channel numbers 0x4000..0x4FFF */
    CHANNEL_MAX = 0x4FFF,
    BATCH = 64,                       /* reads per fd per wake-up, for fairness */
    RETRY_MS = 50,                    /* an fd that failed is polled again after this */
    ENTRY_OVERHEAD = 64,              /* what a queued entry costs besides its bytes */
};

/* Cumulative counters, in `counters()` order. */
enum {
    C_TUN_READS, C_UDP_READS, C_FAST_TX, C_FAST_RX, C_HANDED_TUN, C_HANDED_UDP,
    C_TUN_WRITE_ERRORS, C_SEND_ERRORS, C_REPLAY_RACES, C_PAUSED, C_AUTH_FAILED, C_GSO_SENDS,
    C_GRO_READS, N_COUNTS
};
static const char *const count_names[N_COUNTS] = {
    "tun_reads", "udp_reads", "fast_tx", "fast_rx", "handed_tun", "handed_udp",
    "tun_write_errors", "send_errors", "replay_races", "paused", "auth_failed", "gso_sends",
    "gro_reads",
};

/* ---------------------------------------------------------------------------------------------
 * Helpers for arguments
 */

/* A bound `counter < limit` for any Python int: below 0 it is 0 (nothing passes), at or above
 * 2**64 it is *unlimited (everything of 64 bits passes). */
static int
limit_arg(PyObject *obj, uint64_t *limit, bool *unlimited)
{
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL)
        return -1;
    int overflow = 0;
    long long small = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (small == -1 && PyErr_Occurred()) {
        Py_DECREF(index);
        return -1;
    }
    if (overflow < 0 || (overflow == 0 && small < 0)) {
        *limit = 0;
        *unlimited = false;
    }
    else if (overflow == 0) {
        *limit = (uint64_t)small;
        *unlimited = false;
    }
    else {
        unsigned long long value = PyLong_AsUnsignedLongLong(index);
        if (value == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                Py_DECREF(index);
                return -1;
            }
            PyErr_Clear();
            *limit = UINT64_MAX;
            *unlimited = true;
        }
        else {
            *limit = value;
            *unlimited = false;
        }
    }
    Py_DECREF(index);
    return 0;
}

/* Exactly `size` bytes of a bytes-like object into `out`. */
static int
bytes_arg(PyObject *obj, const char *name, uint8_t *out, Py_ssize_t size)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view.len != size) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd bytes, not %zd", name, size, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    memcpy(out, view.buf, (size_t)size);
    PyBuffer_Release(&view);
    return 0;
}

/* Lock `m` from a Python method: without blocking while holding the GIL (the holder may be a
 * Python thread that waits for it, or the fast path thread in the middle of an AEAD call). */
static void
lock_from_python(pthread_mutex_t *m)
{
    if (pthread_mutex_trylock(m) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(m);
    Py_END_ALLOW_THREADS
}

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.monotonic() reads on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t
load_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t
load_be64(const uint8_t *p)
{
    return (uint64_t)load_be32(p) << 32 | load_be32(p + 4);
}

static void
store_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static unsigned
load_be16(const uint8_t *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static void
store_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void
store_be64(uint8_t *p, uint64_t v)
{
    store_be32(p, (uint32_t)(v >> 32));
    store_be32(p + 4, (uint32_t)v);
}

static unsigned
load_le16(const uint8_t *p)
{
    return (unsigned)p[0] | (unsigned)p[1] << 8;
}

/* ---------------------------------------------------------------------------------------------
 * Counter: a keypair's send counter, taken from by Python and by the thread
 */

typedef struct {
    PyObject_HEAD
    _Atomic uint64_t next;
} CounterObject;

static PyTypeObject CounterType;

/* Reserve one counter below `limit`: the limit check and the increment are one atomic step,
 * so the thread never goes past a limit Python raced it to. The last value 2**64-1 is never
 * handed out (the counter cannot move past it). */
static bool
counter_take_below(CounterObject *c, uint64_t limit, uint64_t *out)
{
    uint64_t v = atomic_load_explicit(&c->next, memory_order_relaxed);
    do {
        if (v >= limit || v == UINT64_MAX)
            return false;
    } while (!atomic_compare_exchange_weak_explicit(&c->next, &v, v + 1, memory_order_relaxed,
                                                    memory_order_relaxed));
    *out = v;
    return true;
}

static PyObject *
Counter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"start", NULL};
    PyObject *start_obj = NULL;
    uint64_t start = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:Counter", kwlist, &start_obj))
        return NULL;
    if (start_obj != NULL && u64_arg(start_obj, "start", &start) < 0)
        return NULL;
    CounterObject *self = (CounterObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    atomic_init(&self->next, start);
    return (PyObject *)self;
}

static PyObject *
Counter_take(CounterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n", NULL};
    PyObject *n_obj = NULL;
    uint64_t n = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:take", kwlist, &n_obj))
        return NULL;
    if (n_obj != NULL && u64_arg(n_obj, "n", &n) < 0)
        return NULL;
    uint64_t v = atomic_load_explicit(&self->next, memory_order_relaxed);
    do {
        if (n > UINT64_MAX - v) {
            PyErr_SetString(PyExc_OverflowError, "send counter exhausted");
            return NULL;
        }
    } while (!atomic_compare_exchange_weak_explicit(&self->next, &v, v + n,
                                                    memory_order_relaxed,
                                                    memory_order_relaxed));
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *
Counter_value(CounterObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&self->next, memory_order_relaxed));
}

static PyObject *
Counter_repr(CounterObject *self)
{
    return PyUnicode_FromFormat("Counter(%llu)", (unsigned long long)atomic_load_explicit(
        &self->next, memory_order_relaxed));
}

static PyMethodDef Counter_methods[] = {
    {"take", (PyCFunction)(void (*)(void))Counter_take, METH_VARARGS | METH_KEYWORDS,
     "take(n=1): reserve n consecutive counters atomically; the first of them."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Counter_getset[] = {
    {"value", (getter)Counter_value, NULL, "The next counter take() would return.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meshd.tunnel._fastpath.Counter",
    .tp_basicsize = sizeof(CounterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counter(start=0): a keypair's send counter, shared by Python and the fast path.",
    .tp_new = Counter_new,
    .tp_repr = (reprfunc)Counter_repr,
    .tp_methods = Counter_methods,
    .tp_getset = Counter_getset,
};

/* ---------------------------------------------------------------------------------------------
 * ReplayWindow: meshd/tunnel/replay.py's window (RFC 6479 ring of 64-bit blocks), locked
 */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    bool lock_ready;
    uint64_t *ring;
    uint64_t mask;     /* blocks - 1 */
    uint64_t window;   /* bits - 64 */
    uint64_t highest;  /* valid when `any` */
    bool any;
    uint64_t limit;    /* counters >= limit are refused, unless `unlimited` */
    bool unlimited;
    PyObject *limit_obj;
} ReplayObject;

static PyTypeObject ReplayType;

static bool
replay_check_locked(const ReplayObject *r, uint64_t c)
{
    if (!r->any || c > r->highest)
        return r->unlimited || c < r->limit;
    if (r->highest - c >= r->window)
        return false;
    return !((r->ring[(c >> 6) & r->mask] >> (c & 63)) & 1);
}

static void
replay_set_locked(ReplayObject *r, uint64_t c)
{
    uint64_t block = c >> 6;
    if (!r->any || c > r->highest) {
        /* Nothing marked yet: the ring is all zero. Else clear only the blocks the highest
         * counter moves into (RFC 6479 §3). */
        if (r->any) {
            uint64_t top = r->highest >> 6;
            if (block - top > r->mask)
                memset(r->ring, 0, (size_t)(r->mask + 1) * sizeof(uint64_t));
            else
                for (uint64_t b = top + 1; b <= block; b++)
                    r->ring[b & r->mask] = 0;
        }
        r->highest = c;
        r->any = true;
    }
    r->ring[block & r->mask] |= (uint64_t)1 << (c & 63);
}

static bool
replay_check(ReplayObject *r, uint64_t c)
{
    pthread_mutex_lock(&r->lock);
    bool ok = replay_check_locked(r, c);
    pthread_mutex_unlock(&r->lock);
    return ok;
}

/* Check and mark as one step: false, with nothing changed, if the check fails. */
static bool
replay_mark(ReplayObject *r, uint64_t c)
{
    pthread_mutex_lock(&r->lock);
    bool ok = replay_check_locked(r, c);
    if (ok)
        replay_set_locked(r, c);
    pthread_mutex_unlock(&r->lock);
    return ok;
}

static PyObject *
Replay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"bits", "limit", NULL};
    Py_ssize_t bits = 2048;
    PyObject *limit_obj = NULL;
    uint64_t limit = UINT64_MAX;
    bool unlimited = true;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n$O:ReplayWindow", kwlist, &bits,
                                     &limit_obj))
        return NULL;
    Py_ssize_t blocks = bits / 64;
    if (bits < 128 || bits % 64 || (blocks & (blocks - 1))) {
        PyErr_SetString(PyExc_ValueError,
                        "bits must be a power of two multiple of 64, at least 128");
        return NULL;
    }
    if (limit_obj != NULL) {
        if (limit_arg(limit_obj, &limit, &unlimited) < 0)
            return NULL;
        limit_obj = PyNumber_Index(limit_obj);
    }
    else {
        limit_obj = PyLong_FromString("18446744073709551616", NULL, 10); /* 2**64 */
    }
    if (limit_obj == NULL)
        return NULL;
    ReplayObject *self = (ReplayObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(limit_obj);
        return NULL;
    }
    self->limit_obj = limit_obj;
    self->ring = calloc((size_t)blocks, sizeof(uint64_t));
    if (self->ring == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (pthread_mutex_init(&self->lock, NULL) != 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->lock_ready = true;
    self->mask = (uint64_t)blocks - 1;
    self->window = (uint64_t)bits - 64;
    self->limit = limit;
    self->unlimited = unlimited;
    return (PyObject *)self;
}

static void
Replay_dealloc(ReplayObject *self)
{
    if (self->lock_ready)
        pthread_mutex_destroy(&self->lock);
    free(self->ring);
    Py_XDECREF(self->limit_obj);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Replay_check(ReplayObject *self, PyObject *arg)
{
    uint64_t c;
    if (u64_arg(arg, "counter", &c) < 0)
        return NULL;
    return PyBool_FromLong(replay_check(self, c));
}

static PyObject *
Replay_mark(ReplayObject *self, PyObject *arg)
{
    uint64_t c;
    if (u64_arg(arg, "counter", &c) < 0)
        return NULL;
    return PyBool_FromLong(replay_mark(self, c));
}

static PyObject *
Replay_highest(ReplayObject *self, void *closure)
{
    pthread_mutex_lock(&self->lock);
    bool any = self->any;
    uint64_t highest = self->highest;
    pthread_mutex_unlock(&self->lock);
    return any ? PyLong_FromUnsignedLongLong(highest) : PyLong_FromLong(-1);
}

static PyObject *
Replay_limit(ReplayObject *self, void *closure)
{
    return Py_NewRef(self->limit_obj);
}

static PyObject *
Replay_window(ReplayObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->window);
}

static PyMethodDef Replay_methods[] = {
    {"check", (PyCFunction)Replay_check, METH_O,
     "check(counter): True if counter is acceptable (not seen, not too old, below the limit)."},
    {"mark", (PyCFunction)Replay_mark, METH_O,
     "mark(counter): check and record as one atomic step; False, nothing changed, if refused."},
    {"accept", (PyCFunction)Replay_mark, METH_O, "accept(counter): the same as mark."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Replay_getset[] = {
    {"highest", (getter)Replay_highest, NULL, "The highest counter marked (-1: none).", NULL},
    {"limit", (getter)Replay_limit, NULL, "Counters at or above this are refused.", NULL},
    {"window", (getter)Replay_window, NULL, "How far behind the highest is still accepted.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReplayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meshd.tunnel._fastpath.ReplayWindow",
    .tp_basicsize = sizeof(ReplayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ReplayWindow(bits=2048, *, limit=2**64): meshd.tunnel.replay's window, "
              "thread-safe.",
    .tp_new = Replay_new,
    .tp_dealloc = (destructor)Replay_dealloc,
    .tp_methods = Replay_methods,
    .tp_getset = Replay_getset,
};

/* ---------------------------------------------------------------------------------------------
 * FastPath
 */

/* What a peer entry owns that needs the GIL or OpenSSL to release. */
typedef struct {
    EVP_CIPHER_CTX *seal;
    EVP_CIPHER_CTX *open;
    CounterObject *counter;
    ReplayObject *replay;
} Keys;

typedef struct {
    long long key;
    bool active;    /* false: removed, kept only until take_stats reports its last stats */
    Keys k;
    uint8_t overlay[4];
    uint32_t remote_index;
    uint32_t local_index;
    uint64_t send_limit;
    bool send_fragments;
    bool has_endpoint;
    struct sockaddr_storage endpoint;
    socklen_t endpoint_len;
    uint16_t channel;     /* nonzero: `endpoint` is our TURN server, and datagrams to and from
                           * the peer travel in ChannelData of this channel (relayed path) */
    double send_until;    /* from here on TUN reads for this peer go to Python */
    double receive_until; /* ... and datagrams under its index too */
    /* since the last take_stats */
    uint64_t tx_packets, tx_bytes, rx_packets, rx_bytes, auth_failed;
    double last_tx, last_rx;
} Peer;

typedef struct Entry {
    struct Entry *next;
    size_t len;
    int segment;
    socklen_t addr_len;
    struct sockaddr_storage addr;
    uint8_t data[];
} Entry;

typedef struct {
    Entry *head;
    Entry *tail;
} Queue;

typedef struct {
    PyObject_HEAD
    /* fixed at construction */
    int udp_fd, tun_fd, udp_family; /* our dup()s of the caller's fds, closed by close() */
    bool frames, check_source;
    size_t fragment_part, queue_limit;
    int notify_fd; /* eventfd for Python: readable while hand-offs wait */
    int wake_fd;   /* eventfd for the thread: stop, or the queue was drained */
    uint8_t *tun_buf, *udp_buf, *rx_buf;
    bool tun_nonblock;
    /* thread */
    pthread_t thread;
    bool locks_ready, started, joined, closed;
    atomic_bool stop;
    /* peers_lock */
    pthread_mutex_t peers_lock;
    Peer **peers;
    size_t npeers, cap;
    /* queue_lock */
    pthread_mutex_t queue_lock;
    Queue tun_q, udp_q;
    size_t queued;
    atomic_bool paused;           /* written under queue_lock */
    atomic_size_t tun_waiting;    /* entries of each part, written under queue_lock */
    atomic_size_t udp_waiting;
    /* Drained but not yet released by Python (`release()`): Python is still sending or
     * writing those reads, so later ones of that kind must not overtake them natively. */
    atomic_bool tun_held;
    atomic_bool udp_held;
    _Atomic uint64_t counts[N_COUNTS];
    /* The thread stopped on this errno (0: it did not); `error_where` is written before it. */
    atomic_int error_errno;
    const char *error_where;
    atomic_int inject_errno; /* _fail_for_test: the thread's next poll fails with this */
    atomic_bool no_gso; /* the kernel refused a UDP GSO send: messages of several parts go to
                         * Python, which finds the same and sends them datagram by datagram */
    double busy_poll;   /* seconds the thread polls without sleeping after an event that came
                         * within this long of the one before it (0: never) */
} FastPathObject;

static PyTypeObject FastPathType;

static void
count(FastPathObject *fp, int which)
{
    atomic_fetch_add_explicit(&fp->counts[which], 1, memory_order_relaxed);
}

static void
signal_fd(int fd)
{
    uint64_t one = 1;
    ssize_t n;
    do {
        n = write(fd, &one, sizeof one);
    } while (n < 0 && errno == EINTR); /* EAGAIN: the counter is full, so already readable */
}

static void
clear_fd(int fd)
{
    uint64_t value;
    ssize_t n;
    do {
        n = read(fd, &value, sizeof value);
    } while (n < 0 && errno == EINTR);
}

static void
keys_release(Keys *k)
{
    EVP_CIPHER_CTX_free(k->seal);
    EVP_CIPHER_CTX_free(k->open);
    Py_XDECREF(k->counter);
    Py_XDECREF(k->replay);
    memset(k, 0, sizeof *k);
}

/* Called by the thread with peers_lock held. */
static Peer *
peer_by_overlay(FastPathObject *fp, const uint8_t *address)
{
    for (size_t i = 0; i < fp->npeers; i++) {
        Peer *p = fp->peers[i];
        if (p->active && p->has_endpoint && memcmp(p->overlay, address, 4) == 0)
            return p;
    }
    return NULL;
}

static Peer *
peer_by_index(FastPathObject *fp, uint32_t index)
{
    for (size_t i = 0; i < fp->npeers; i++) {
        Peer *p = fp->peers[i];
        if (p->active && p->local_index == index)
            return p;
    }
    return NULL;
}

/* -- AEAD -------------------------------------------------------------------------------------- */

static void
make_nonce(uint8_t nonce[NONCELEN], uint64_t counter)
{
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (uint8_t)(counter >> (8 * i));
}

/* Seal data[0..len) in place; the tag goes to data[len..len+16). */
static bool
aead_seal(EVP_CIPHER_CTX *ctx, uint64_t counter, uint8_t *data, size_t len)
{
    uint8_t nonce[NONCELEN];
    int out = 0, final = 0;
    make_nonce(nonce, counter);
    if (len > INT32_MAX || EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1)
        return false;
    if (len && EVP_EncryptUpdate(ctx, data, &out, data, (int)len) != 1)
        return false;
    if (EVP_EncryptFinal_ex(ctx, data + out, &final) != 1)
        return false;
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAGLEN, data + len) == 1;
}

/* Open `len` bytes of ciphertext followed by their tag into `out` (which then holds `len`
 * bytes of plaintext; unauthenticated garbage when this returns false). */
static bool
aead_open(EVP_CIPHER_CTX *ctx, uint64_t counter, const uint8_t *in, size_t len, uint8_t *out)
{
    uint8_t nonce[NONCELEN], tag[TAGLEN];
    int outl = 0, final = 0;
    make_nonce(nonce, counter);
    memcpy(tag, in + len, TAGLEN);
    if (len > INT32_MAX || EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1)
        return false;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAGLEN, tag) != 1)
        return false;
    if (len && EVP_DecryptUpdate(ctx, out, &outl, in, (int)len) != 1)
        return false;
    return EVP_DecryptFinal_ex(ctx, out + outl, &final) == 1;
}

/* -- frame and packet checks ------------------------------------------------------------------ */

/* offload.check_frame: known flags, an IPv4/IPv6 packet, a GSO type that matches its IP version
 * with a segment size and a partial checksum, a partial checksum field inside the packet. */
static bool
frame_ok(const uint8_t *f, size_t len)
{
    if (len < VNET_HDR + MIN_IPV4)
        return false;
    unsigned flags = f[0], kind = f[1] & ~(unsigned)GSO_ECN;
    if (flags & ~(unsigned)(F_NEEDS_CSUM | F_DATA_VALID))
        return false;
    unsigned version = f[VNET_HDR] >> 4;
    if (kind != GSO_NONE) {
        bool matches = (kind == GSO_TCPV4 && version == 4) || (kind == GSO_TCPV6 && version == 6)
                       || (kind == GSO_UDP_L4 && (version == 4 || version == 6));
        if (!matches || load_le16(f + 4) == 0 || !(flags & F_NEEDS_CSUM))
            return false;
    }
    else if (version != 4 && version != 6) {
        return false;
    }
    if (flags & F_NEEDS_CSUM) {
        size_t start = load_le16(f + 6), offset = load_le16(f + 8);
        if (start < MIN_IPV4 || VNET_HDR + start + offset + 2 > len)
            return false;
    }
    return true;
}

/* The frames a one-part message carries natively: no GSO (the ECN bit is a GSO type's). */
static bool
plain_frame_ok(const uint8_t *f, size_t len)
{
    return frame_ok(f, len) && f[1] == GSO_NONE;
}

/* The inner source check: an IPv4 packet from the peer's overlay address. */
static bool
source_ok(const uint8_t *packet, size_t len, const uint8_t overlay[4])
{
    return len >= 16 && packet[0] >> 4 == 4 && memcmp(packet + 12, overlay, 4) == 0;
}

/* -- I/O of the thread ------------------------------------------------------------------------- */

static void
tun_write(FastPathObject *fp, const uint8_t *data, size_t len)
{
    ssize_t n;
    do {
        n = write(fp->tun_fd, data, len);
    } while (n < 0 && errno == EINTR);
    if (n < 0) /* ENOBUFS, EAGAIN, EINVAL, EIO: dropped, as the Python path drops it */
        count(fp, C_TUN_WRITE_ERRORS);
}

static void
udp_send(FastPathObject *fp, const uint8_t *data, size_t len, const struct sockaddr_storage *to,
         socklen_t to_len)
{
    ssize_t n;
    do {
        n = sendto(fp->udp_fd, data, len, MSG_DONTWAIT, (const struct sockaddr *)to, to_len);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        count(fp, C_SEND_ERRORS);
}

/* Send a sealed message (`message`: its 15-byte 0xE4 header, then `len` bytes of ciphertext
 * and tag) as `parts` fragments of fragment_part bytes (the last shorter) with one sendmsg: UDP
 * GSO (Linux 4.18+) cuts it into datagrams of header + part bytes, as the Python adapter's
 * `_send_segmented` does, so the peer's GRO reads the message whole. Scatter-gather: the headers
 * come from a small array, the parts straight from the sealed frame. */
static void
send_message(FastPathObject *fp, const uint8_t *message, size_t len, size_t parts,
             uint16_t channel, const struct sockaddr_storage *to, socklen_t to_len)
{
    uint8_t headers[MAX_FRAGMENTS][CHANNEL_HEADER + FRAGMENT_HEADER];
    struct iovec iov[2 * MAX_FRAGMENTS];
    size_t part = fp->fragment_part;
    size_t wrap = channel ? CHANNEL_HEADER : 0; /* relayed: each fragment in ChannelData */
    const uint8_t *sealed = message + FRAGMENT_HEADER;
    for (size_t k = 0; k < parts; k++) {
        size_t at = k * part, size = len - at < part ? len - at : part;
        uint8_t *h = headers[k];
        if (channel) {
            store_be16(h, channel);
            store_be16(h + 2, (uint16_t)(FRAGMENT_HEADER + size));
        }
        memcpy(h + wrap, message, FRAGMENT_HEADER);
        h[wrap + 13] = (uint8_t)k;
        iov[2 * k] = (struct iovec){.iov_base = h, .iov_len = wrap + FRAGMENT_HEADER};
        iov[2 * k + 1] = (struct iovec){.iov_base = (void *)(sealed + at), .iov_len = size};
    }
    ssize_t n = udp_gso_sendmsg(fp->udp_fd, to, to_len, iov, 2 * parts,
                                (uint16_t)(wrap + FRAGMENT_HEADER + part));
    if (n >= 0) {
        count(fp, C_GSO_SENDS);
        return;
    }
    /* A kernel or socket without UDP GSO (the Python adapter turns it off on the same errnos):
     * this message is lost, later ones go to Python. Anything else (a full buffer): lost. */
    if (errno == EIO || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOPROTOOPT)
        atomic_store(&fp->no_gso, true);
    count(fp, C_SEND_ERRORS);
}

/* Queue a copy of a read for Python. */
static void
hand_off(FastPathObject *fp, bool from_tun, const uint8_t *data, size_t len, int segment,
         const struct sockaddr_storage *from, socklen_t from_len)
{
    Entry *e = malloc(sizeof(Entry) + len);
    if (e == NULL)
        return; /* out of memory: dropped, as a full socket buffer would drop it */
    e->next = NULL;
    e->len = len;
    e->segment = segment;
    e->addr_len = 0;
    if (from != NULL && from_len > 0) {
        e->addr_len = from_len < (socklen_t)sizeof e->addr ? from_len
                                                            : (socklen_t)sizeof e->addr;
        memcpy(&e->addr, from, (size_t)e->addr_len);
    }
    if (len)
        memcpy(e->data, data, len);

    /* Counted before Python can see the entry (the eventfd below): counters() read after a
     * drain() include it. */
    count(fp, from_tun ? C_HANDED_TUN : C_HANDED_UDP);
    pthread_mutex_lock(&fp->queue_lock);
    bool was_empty = fp->tun_q.head == NULL && fp->udp_q.head == NULL;
    Queue *q = from_tun ? &fp->tun_q : &fp->udp_q;
    atomic_size_t *waiting = from_tun ? &fp->tun_waiting : &fp->udp_waiting;
    if (q->tail != NULL)
        q->tail->next = e;
    else
        q->head = e;
    q->tail = e;
    atomic_fetch_add(waiting, 1);
    fp->queued += ENTRY_OVERHEAD + len;
    if (fp->queued >= fp->queue_limit && !atomic_load(&fp->paused)) {
        atomic_store(&fp->paused, true);
        count(fp, C_PAUSED);
    }
    if (was_empty)
        signal_fd(fp->notify_fd);
    pthread_mutex_unlock(&fp->queue_lock);
}

/* A read from TUN (`buf` has HEADROOM bytes in front and TAGLEN behind): sealed and sent, or
 * false (nothing changed) for Python to handle. */
static bool
send_native(FastPathObject *fp, uint8_t *buf, size_t n)
{
    uint8_t *packet = buf;
    size_t packet_len = n;
    if (fp->frames) {
        if (n < VNET_HDR + MIN_IPV4)
            return false;
        packet += VNET_HDR;
        packet_len -= VNET_HDR;
    }
    else if (n < MIN_IPV4) {
        return false;
    }
    if (packet[0] >> 4 != 4)
        return false;

    pthread_mutex_lock(&fp->peers_lock);
    Peer *p = peer_by_overlay(fp, packet + 16);
    if (p == NULL)
        goto python;
    double now = monotonic_now();
    if (!(now < p->send_until))
        goto python;
    bool fragment = false;
    size_t parts = 1;
    size_t wrap = p->channel ? CHANNEL_HEADER : 0; /* relayed: each datagram in ChannelData */
    if (fp->frames) {
        unsigned flags = buf[0], gso = buf[1];
        if (p->send_fragments) {
            /* The whole frame, header included, as one 0xE4 message. */
            size_t part = fp->fragment_part;
            parts = (n + TAGLEN + part - 1) / part;
            if (parts == 1) { /* the short path the peer's thread takes too (receive_native) */
                if (gso != GSO_NONE || flags & ~(unsigned)(F_NEEDS_CSUM | F_DATA_VALID))
                    goto python;
            }
            /* Several parts: one GSO send (send_message), which the peer reads whole. */
            else if (parts > MAX_FRAGMENTS
                     || n + TAGLEN + parts * (wrap + FRAGMENT_HEADER) > GSO_MAX_BYTES
                     || atomic_load_explicit(&fp->no_gso, memory_order_relaxed)) {
                goto python;
            }
            fragment = true;
        }
        else if (gso != GSO_NONE || flags != 0) { /* a partial checksum: Python completes it */
            goto python;
        }
    }
    uint64_t counter;
    if (!counter_take_below(p->k.counter, p->send_limit, &counter))
        goto python;
    uint8_t *plain = fragment ? buf : packet;
    size_t plain_len = fragment ? n : packet_len;
    size_t header = fragment ? FRAGMENT_HEADER : DATA_HEADER;
    uint8_t *message = plain - header;
    message[0] = fragment ? TYPE_FRAGMENT : TYPE_DATA;
    store_be32(message + 1, p->remote_index);
    store_be64(message + 5, counter);
    if (fragment) {
        message[13] = 0; /* part 0 of `parts` */
        message[14] = (uint8_t)parts;
    }
    if (!aead_seal(p->k.seal, counter, plain, plain_len)) {
        pthread_mutex_unlock(&fp->peers_lock);
        count(fp, C_SEND_ERRORS); /* the counter is spent; the packet is lost */
        return true;
    }
    p->tx_packets++;
    p->tx_bytes += packet_len;
    p->last_tx = now;
    uint16_t channel = p->channel;
    struct sockaddr_storage to = p->endpoint;
    socklen_t to_len = p->endpoint_len;
    pthread_mutex_unlock(&fp->peers_lock);
    count(fp, C_FAST_TX);
    if (parts > 1) {
        send_message(fp, message, plain_len + TAGLEN, parts, channel, &to, to_len);
    }
    else {
        size_t len = header + plain_len + TAGLEN;
        if (channel) { /* RFC 8656 §12.4; over UDP without padding (§12.5), as _TurnLink */
            message -= CHANNEL_HEADER;
            store_be16(message, channel);
            store_be16(message + 2, (uint16_t)len);
            len += CHANNEL_HEADER;
        }
        udp_send(fp, message, len, &to, to_len);
    }
    return true;

python:
    pthread_mutex_unlock(&fp->peers_lock);
    return false;
}

/* A ChannelData message of `n` bytes (n >= 4): its channel and the length of its data, which
 * must fit; up to 3 bytes after it are padding (RFC 8656 §12.5: optional over UDP). */
static bool
unwrap_channel(const uint8_t *d, size_t n, unsigned *channel, size_t *length)
{
    size_t len = load_be16(d + 2);
    if (CHANNEL_HEADER + len > n || n - CHANNEL_HEADER - len > 3)
        return false;
    *channel = load_be16(d);
    *length = len;
    return true;
}

/* A datagram's way in fits the route: a direct one (channel 0) always -- the keys decide --,
 * ChannelData only on the route's own channel from its relay (what the Python path takes:
 * TurnClient reads ChannelData from the server only, and the channel names the peer). */
static bool
relayed_ok(const Peer *p, unsigned channel, const struct sockaddr_storage *from,
           socklen_t from_len)
{
    return channel == 0
           || (channel == p->channel && p->has_endpoint
               && same_address(from, from_len, &p->endpoint, p->endpoint_len));
}

/* The route a message under `index` and `counter` that came in by `channel` (0: directly) may
 * be opened with natively: returned with peers_lock held, or NULL (unlocked) for Python. */
static Peer *
receiving_route(FastPathObject *fp, uint32_t index, uint64_t counter, unsigned channel,
                const struct sockaddr_storage *from, socklen_t from_len, double *now)
{
    pthread_mutex_lock(&fp->peers_lock);
    Peer *p = peer_by_index(fp, index);
    if (p != NULL && relayed_ok(p, channel, from, from_len)) {
        *now = monotonic_now();
        if (*now < p->receive_until && replay_check(p->k.replay, counter))
            return p;
    }
    pthread_mutex_unlock(&fp->peers_lock);
    return NULL;
}

/* A message that failed authentication under `p`'s current keys (peers_lock held, released
 * here): Python would open it again only to reach the same verdict (`auth-failed`), so it is
 * dropped and counted for it. Other keypairs of the peer (previous, next) have other indexes:
 * theirs go to Python. Nothing was marked. */
static void
drop_forged(FastPathObject *fp, Peer *p)
{
    p->auth_failed++;
    pthread_mutex_unlock(&fp->peers_lock);
    count(fp, C_AUTH_FAILED);
}

/* An opened and checked message (peers_lock held, released here): marked, counted for `p` and
 * written to TUN. Marked before writing: Python may have opened the same counter from another
 * copy since the check; then this copy is the duplicate and is dropped. */
static void
deliver(FastPathObject *fp, Peer *p, uint64_t counter, size_t inner, double now,
        const uint8_t *out, size_t out_len, bool whole_read)
{
    if (!replay_mark(p->k.replay, counter)) {
        pthread_mutex_unlock(&fp->peers_lock);
        count(fp, C_REPLAY_RACES);
        return;
    }
    p->rx_packets++;
    p->rx_bytes += inner;
    p->last_rx = now;
    pthread_mutex_unlock(&fp->peers_lock);
    count(fp, C_FAST_RX);
    if (whole_read)
        count(fp, C_GRO_READS);
    tun_write(fp, out, out_len);
}

/* A datagram from the socket: opened and written to TUN (or dropped as a replay that lost a
 * race with Python), or false, with nothing changed, for Python to handle. */
static bool
receive_native(FastPathObject *fp, const uint8_t *d, size_t n, const struct sockaddr_storage *from,
               socklen_t from_len)
{
    unsigned channel = 0;
    if (d[0] >= 0x40 && d[0] <= 0x7F) { /* ChannelData from the relay (RFC 8656 §12.4) */
        if (n < CHANNEL_HEADER || !unwrap_channel(d, n, &channel, &n))
            return false;
        d += CHANNEL_HEADER;
    }
    size_t header;
    if (n > DATA_HEADER + TAGLEN && d[0] == TYPE_DATA)
        header = DATA_HEADER;
    else if (n > FRAGMENT_HEADER + TAGLEN && d[0] == TYPE_FRAGMENT && d[13] == 0 && d[14] == 1)
        header = FRAGMENT_HEADER;
    else
        return false; /* handshakes, keepalives, STUN, TURN, fragments of several parts */
    uint32_t index = load_be32(d + 1);
    uint64_t counter = load_be64(d + 5);
    size_t len = n - header - TAGLEN; /* >= 1, <= UDP_READ */
    uint8_t *plain = fp->rx_buf + VNET_HDR; /* room for a virtio header in front */
    const uint8_t *out;
    size_t out_len, inner;

    double now;
    Peer *p = receiving_route(fp, index, counter, channel, from, from_len, &now);
    if (p == NULL)
        return false;
    if (!aead_open(p->k.open, counter, d + header, len, plain)) {
        drop_forged(fp, p);
        return true;
    }
    if (header == FRAGMENT_HEADER) { /* an offload frame */
        if (!plain_frame_ok(plain, len))
            goto python;
        if (fp->check_source && !source_ok(plain + VNET_HDR, len - VNET_HDR, p->overlay))
            goto python;
        inner = len - VNET_HDR;
        if (fp->frames) {
            out = plain;
            out_len = len;
        }
        else {
            if (plain[0] != 0) /* a partial checksum: Python completes it */
                goto python;
            out = plain + VNET_HDR;
            out_len = inner;
        }
    }
    else {
        if (fp->check_source && !source_ok(plain, len, p->overlay))
            goto python;
        inner = len;
        if (fp->frames) {
            memset(fp->rx_buf, 0, VNET_HDR); /* a complete packet: nothing left to do */
            out = fp->rx_buf;
            out_len = len + VNET_HDR;
        }
        else {
            out = plain;
            out_len = len;
        }
    }
    deliver(fp, p, counter, inner, now, out, out_len, false);
    return true;

python:
    pthread_mutex_unlock(&fp->peers_lock);
    return false;
}

/* A GRO read (`segment`-byte datagrams, the last shorter) that is exactly the fragments of one
 * 0xE4 message in order -- what one send_message (or the Python adapter's GSO send) arrives as,
 * directly or each in ChannelData from our relay -- opened from its parts in place, checked
 * (offload.check_frame, inner source) and written to TUN as one frame; or false, nothing
 * changed, for Python (session.receive_message takes the same short way; its per-fragment path
 * reassembles messages split over reads). */
static bool
receive_message_native(FastPathObject *fp, const uint8_t *d, size_t n, size_t segment,
                       const struct sockaddr_storage *from, socklen_t from_len)
{
    if (!fp->frames || n <= segment || segment < CHANNEL_HEADER)
        return false; /* without offloads Python cuts the frame into packets */
    size_t parts = (n + segment - 1) / segment;
    if (parts > MAX_FRAGMENTS)
        return false;
    bool wrapped = d[0] >= 0x40 && d[0] <= 0x7F;
    unsigned channel = 0;
    const uint8_t *frag[MAX_FRAGMENTS]; /* each fragment (its 0xE4 header) ... */
    size_t size[MAX_FRAGMENTS];         /* ... and the bytes of its part after the header */
    size_t sealed = 0;                  /* ciphertext and tag */
    for (size_t k = 0; k < parts; k++) {
        const uint8_t *f = d + k * segment;
        size_t len = k == parts - 1 ? n - k * segment : segment;
        if (wrapped) {
            unsigned ch;
            if (len < CHANNEL_HEADER || !unwrap_channel(f, len, &ch, &len)
                || (k > 0 && ch != channel))
                return false;
            channel = ch;
            f += CHANNEL_HEADER;
        }
        if (len <= FRAGMENT_HEADER || f[0] != TYPE_FRAGMENT || f[13] != k || f[14] != parts
            || (k > 0 && memcmp(f, frag[0], 13) != 0))
            return false;
        frag[k] = f;
        size[k] = len - FRAGMENT_HEADER;
        sealed += size[k];
    }
    if (sealed < TAGLEN + VNET_HDR + MIN_IPV4 || sealed - TAGLEN > VNET_HDR + UDP_READ)
        return false;
    size_t len = sealed - TAGLEN;
    uint32_t index = load_be32(frag[0] + 1);
    uint64_t counter = load_be64(frag[0] + 5);
    /* The parts joined into one buffer (ciphertext, then the tag), then one AEAD call in
     * place: OpenSSL's ChaCha20-Poly1305 runs at half speed when fed part by part (1406-byte
     * updates split its 64-byte blocks), which costs far more than this copy. */
    uint8_t *frame = fp->rx_buf; /* sealed < UDP_READ: it fits */
    size_t at = 0;
    for (size_t k = 0; k < parts; k++) {
        memcpy(frame + at, frag[k] + FRAGMENT_HEADER, size[k]);
        at += size[k];
    }
    double now;
    Peer *p = receiving_route(fp, index, counter, channel, from, from_len, &now);
    if (p == NULL)
        return false;
    bool opened = aead_open(p->k.open, counter, frame, len, frame);
    if (!opened) {
        drop_forged(fp, p);
        return true;
    }
    if (!frame_ok(frame, len)
        || (fp->check_source && !source_ok(frame + VNET_HDR, len - VNET_HDR, p->overlay))) {
        pthread_mutex_unlock(&fp->peers_lock);
        return false; /* Python opens it again, reaches the same verdict and counts it */
    }
    deliver(fp, p, counter, len - VNET_HDR, now, frame, len, true);
    return true;
}

/* What a drain of one fd came to. */
enum {
    READ_OK,    /* read until EAGAIN, or a batch */
    READ_EMPTY, /* the first read found nothing */
    READ_REST,  /* out of memory or buffers: the fd rests RETRY_MS */
    READ_FATAL, /* an error no later read gets past: the thread stops */
};

/* Drain TUN (READ_FATAL sets *err: an errno, 0 for end of file). */
static int
read_tun(FastPathObject *fp, int *err)
{
    uint8_t *buf = fp->tun_buf + HEADROOM;
    bool any = false;
    for (int i = 0; i < BATCH; i++) {
        ssize_t n = read(fp->tun_fd, buf, TUN_READ);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return any ? READ_OK : READ_EMPTY;
            if (errno == ENOMEM || errno == ENOBUFS)
                return READ_REST;
            *err = errno; /* EBADFD: the device is gone; EIO, EFAULT, EINVAL: nothing better */
            return READ_FATAL;
        }
        if (n == 0) { /* a TUN device never reads empty: end of file, the fd is not a TUN's */
            *err = 0;
            return READ_FATAL;
        }
        any = true;
        count(fp, C_TUN_READS);
        /* In order: while earlier reads wait for Python, later ones follow them. */
        if (atomic_load(&fp->tun_waiting) != 0 || atomic_load(&fp->tun_held)
            || !send_native(fp, buf, (size_t)n))
            hand_off(fp, true, buf, (size_t)n, 0, NULL, 0);
        if (!fp->tun_nonblock || atomic_load(&fp->paused))
            break;
    }
    return READ_OK;
}

/* Drain the socket (READ_FATAL sets *err). */
static int
read_udp(FastPathObject *fp, int *err)
{
    for (int i = 0; i < BATCH; i++) {
        struct sockaddr_storage from;
        udp_gro_control control;
        struct iovec iov = {.iov_base = fp->udp_buf, .iov_len = UDP_READ};
        struct msghdr msg = {
            .msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov, .msg_iovlen = 1,
            .msg_control = control.buf, .msg_controllen = sizeof control.buf,
        };
        ssize_t n = recvmsg(fp->udp_fd, &msg, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return READ_OK;
            if (errno == ENOMEM || errno == ENOBUFS)
                return READ_REST;
            if (errno == EBADF || errno == ENOTSOCK || errno == EINVAL || errno == EFAULT) {
                *err = errno;
                return READ_FATAL;
            }
            continue; /* EINTR, or an ICMP error reported on the socket: read on */
        }
        count(fp, C_UDP_READS);
        int segment = udp_gro_segment(&msg);
        size_t len = (size_t)n;
        /* GRO joined datagrams of `segment` bytes: one whole message is taken here, anything
         * else Python splits or takes whole. */
        int seg = segment > 0 && (size_t)segment < len ? segment : 0;
        bool native = !(msg.msg_flags & MSG_TRUNC) && atomic_load(&fp->udp_waiting) == 0
                      && !atomic_load(&fp->udp_held);
        if (native && len > 0)
            native = seg ? receive_message_native(fp, fp->udp_buf, len, (size_t)seg, &from,
                                                  msg.msg_namelen)
                         : receive_native(fp, fp->udp_buf, len, &from, msg.msg_namelen);
        else
            native = false;
        if (!native && seg && atomic_load(&fp->udp_waiting) == 0 && !atomic_load(&fp->udp_held)
            && !(msg.msg_flags & MSG_TRUNC)) {
            /* Datagrams that are each a whole message (a relay's batch of small packets, TCP
             * ACKs): taken one by one while they go natively; Python gets the rest of the read
             * as a coalesced read of its own, after them. */
            size_t at = 0;
            while (at < len) {
                size_t one = len - at < (size_t)seg ? len - at : (size_t)seg;
                if (!receive_native(fp, fp->udp_buf + at, one, &from, msg.msg_namelen))
                    break;
                at += one;
            }
            if (at > 0) {
                native = true;
                if (at < len) {
                    size_t rest = len - at;
                    hand_off(fp, false, fp->udp_buf + at, rest,
                             (size_t)seg < rest ? seg : 0, &from, msg.msg_namelen);
                }
            }
        }
        if (!native)
            hand_off(fp, false, fp->udp_buf, len, seg, &from, msg.msg_namelen);
        if (atomic_load(&fp->paused))
            break;
    }
    return READ_OK;
}

/* POLLERR on the socket: a pending error is returned (and cleared) by the next recvmsg; an
 * error queue (IP_RECVERR, which meshd does not set) is emptied here, or poll would report it
 * for ever. */
static void
drop_error_queue(FastPathObject *fp)
{
    for (int i = 0; i < BATCH; i++) {
        char data[64], control[512];
        struct iovec iov = {.iov_base = data, .iov_len = sizeof data};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        if (recvmsg(fp->udp_fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0 && errno != EINTR)
            return;
    }
}

/* The thread cannot go on. Its last act (after its last hand-off): record why, wake Python. */
static void
thread_failed(FastPathObject *fp, int err, const char *where)
{
    fp->error_where = where;
    atomic_store(&fp->error_errno, err > 0 ? err : EIO);
    signal_fd(fp->notify_fd);
}

static void
rest(void)
{
    struct timespec ts = {0, RETRY_MS * 1000000L};
    nanosleep(&ts, NULL);
}

static void *
fastpath_run(void *arg)
{
    FastPathObject *fp = arg;
    double tun_rest = 0, udp_rest = 0; /* an fd short of memory is not polled before this */
    /* Busy polling (busy_poll_us): a sleeping thread pays a wake-up per event, tens to hundreds
     * of µs on a loaded VM, four per round trip through two agents. While events come closer
     * together than the budget (a request and its answer, TCP's flights in slow start) the
     * thread keeps polling, yielding the core to anything runnable, for up to the budget
     * after the last event; sparser traffic sleeps as before. */
    double last_event = 0;
    bool hot = false;
    while (!atomic_load(&fp->stop)) {
        struct pollfd fds[3];
        nfds_t nfds = 0;
        int tun_at = -1, udp_at = -1, timeout = -1;
        fds[nfds++] = (struct pollfd){.fd = fp->wake_fd, .events = POLLIN};
        if (!atomic_load(&fp->paused)) { /* paused: until drain() makes room */
            double now = monotonic_now();
            if (now >= tun_rest) {
                tun_at = (int)nfds;
                fds[nfds++] = (struct pollfd){.fd = fp->tun_fd, .events = POLLIN};
            }
            else {
                timeout = RETRY_MS;
            }
            if (now >= udp_rest) {
                udp_at = (int)nfds;
                /* POLLRDHUP: shut down for reading, recvmsg would return 0 bytes for ever */
                fds[nfds++] = (struct pollfd){.fd = fp->udp_fd, .events = POLLIN | POLLRDHUP};
            }
            else {
                timeout = RETRY_MS;
            }
        }
        bool spinning = false;
        if (fp->busy_poll > 0 && hot && timeout != 0
            && monotonic_now() - last_event < fp->busy_poll) {
            timeout = 0;
            spinning = true;
        }
        int ready = poll(fds, nfds, timeout);
        if (spinning && ready == 0) {
            sched_yield();
            continue;
        }
        if (ready > 0 && fp->busy_poll > 0) {
            double now = monotonic_now();
            hot = now - last_event < fp->busy_poll;
            last_event = now;
        }
        if (atomic_load_explicit(&fp->inject_errno, memory_order_relaxed)) {
            int injected = atomic_exchange(&fp->inject_errno, 0);
            if (injected) { /* _fail_for_test: as if poll had failed with it */
                ready = -1;
                errno = injected;
            }
        }
        if (ready < 0) {
            int e = errno;
            if (e == EINTR)
                continue;
            if (e == EAGAIN || e == ENOMEM) {
                rest();
                continue;
            }
            thread_failed(fp, e, "poll");
            return NULL;
        }
        if (fds[0].revents)
            clear_fd(fp->wake_fd);
        if (atomic_load(&fp->stop))
            break;
        int err = 0;
        short revents = tun_at >= 0 ? fds[tun_at].revents : 0;
        if (revents & POLLNVAL) {
            thread_failed(fp, EBADF, "mesh0 poll");
            return NULL;
        }
        if (revents) {
            bool broken = revents & (POLLERR | POLLHUP);
            /* A blocking fd with an error and nothing to read would block the read. */
            int r = broken && !(revents & POLLIN) && !fp->tun_nonblock ? READ_EMPTY
                                                                        : read_tun(fp, &err);
            if (r == READ_FATAL) {
                thread_failed(fp, err ? err : EIO,
                              err ? "mesh0 read" : "mesh0 read (end of file)");
                return NULL;
            }
            if (r == READ_EMPTY && broken) { /* an error no read reports: poll would spin */
                thread_failed(fp, EIO, "mesh0 poll (error or hang-up)");
                return NULL;
            }
            if (r == READ_REST)
                tun_rest = monotonic_now() + RETRY_MS / 1000.0;
        }
        revents = udp_at >= 0 ? fds[udp_at].revents : 0;
        if (revents & (POLLNVAL | POLLHUP | POLLRDHUP)) {
            thread_failed(fp, revents & POLLNVAL ? EBADF : ESHUTDOWN, "socket poll");
            return NULL;
        }
        if (revents) {
            int r = read_udp(fp, &err);
            if (r == READ_FATAL) {
                thread_failed(fp, err, "socket read");
                return NULL;
            }
            if (r == READ_REST)
                udp_rest = monotonic_now() + RETRY_MS / 1000.0;
            if (revents & POLLERR)
                drop_error_queue(fp);
        }
    }
    return NULL;
}

/* -- Python methods ---------------------------------------------------------------------------- */

static PyObject *
required_missing(const char *function, const char *name)
{
    return PyErr_Format(PyExc_TypeError, "%s() missing required keyword argument '%s'",
                        function, name);
}

static PyObject *
FastPath_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"udp_fd", "tun_fd", "frames", "check_source", "fragment_part",
                             "queue_bytes", "busy_poll_us", NULL};
    int udp_fd, tun_fd;
    PyObject *frames_obj = NULL, *check_obj = NULL, *part_obj = NULL;
    Py_ssize_t queue_bytes = 8 << 20, busy_poll_us = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii|$OOOnn:FastPath", kwlist, &udp_fd,
                                     &tun_fd, &frames_obj, &check_obj, &part_obj, &queue_bytes,
                                     &busy_poll_us))
        return NULL;
    if (busy_poll_us < 0 || busy_poll_us > 10000)
        return PyErr_Format(PyExc_ValueError, "busy_poll_us %zd out of range (0..10000)",
                            busy_poll_us);
    if (frames_obj == NULL)
        return required_missing("FastPath", "frames");
    if (check_obj == NULL)
        return required_missing("FastPath", "check_source");
    if (part_obj == NULL)
        return required_missing("FastPath", "fragment_part");
    int frames = PyObject_IsTrue(frames_obj), check_source = PyObject_IsTrue(check_obj);
    if (frames < 0 || check_source < 0)
        return NULL;
    Py_ssize_t part = PyNumber_AsSsize_t(part_obj, PyExc_ValueError);
    if (part == -1 && PyErr_Occurred())
        return NULL;
    if (part <= TAGLEN || part > 0xFFFF)
        return PyErr_Format(PyExc_ValueError, "fragment_part %zd out of range (17..65535)", part);
    if (queue_bytes <= 0)
        return PyErr_Format(PyExc_ValueError, "queue_bytes must be positive, not %zd",
                            queue_bytes);
    if (udp_fd < 0 || tun_fd < 0)
        return PyErr_Format(PyExc_ValueError, "bad file descriptor (udp_fd %d, tun_fd %d)",
                            udp_fd, tun_fd);
    int family = 0, socktype = 0;
    socklen_t optlen = sizeof family;
    if (getsockopt(udp_fd, SOL_SOCKET, SO_DOMAIN, &family, &optlen) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    optlen = sizeof socktype;
    if (getsockopt(udp_fd, SOL_SOCKET, SO_TYPE, &socktype, &optlen) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if ((family != AF_INET && family != AF_INET6) || socktype != SOCK_DGRAM)
        return PyErr_Format(PyExc_ValueError, "udp_fd %d is not a UDP socket", udp_fd);
    if (fcntl(tun_fd, F_GETFD) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);

    FastPathObject *fp = (FastPathObject *)type->tp_alloc(type, 0);
    if (fp == NULL)
        return NULL;
    fp->notify_fd = fp->wake_fd = fp->udp_fd = fp->tun_fd = -1;
    fp->udp_family = family;
    fp->frames = frames;
    fp->check_source = check_source;
    fp->fragment_part = (size_t)part;
    fp->queue_limit = (size_t)queue_bytes;
    fp->busy_poll = (double)busy_poll_us / 1e6;
    atomic_init(&fp->stop, false);
    atomic_init(&fp->paused, false);
    atomic_init(&fp->tun_waiting, 0);
    atomic_init(&fp->udp_waiting, 0);
    atomic_init(&fp->tun_held, false);
    atomic_init(&fp->udp_held, false);
    atomic_init(&fp->error_errno, 0);
    atomic_init(&fp->inject_errno, 0);
    for (int i = 0; i < N_COUNTS; i++)
        atomic_init(&fp->counts[i], 0);
    if (pthread_mutex_init(&fp->peers_lock, NULL) != 0) {
        Py_DECREF(fp);
        return PyErr_NoMemory();
    }
    if (pthread_mutex_init(&fp->queue_lock, NULL) != 0) {
        pthread_mutex_destroy(&fp->peers_lock);
        Py_DECREF(fp);
        return PyErr_NoMemory();
    }
    fp->locks_ready = true;
    /* Our own descriptions of the caller's files: closing or reusing its numbers (the owner
     * of the socket, a test) cannot hand the thread another file. */
    fp->udp_fd = fcntl(udp_fd, F_DUPFD_CLOEXEC, 0);
    if (fp->udp_fd >= 0)
        fp->tun_fd = fcntl(tun_fd, F_DUPFD_CLOEXEC, 0);
    if (fp->tun_fd >= 0)
        fp->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fp->notify_fd >= 0)
        fp->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fp->wake_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(fp);
        return NULL;
    }
    fp->tun_buf = malloc(HEADROOM + TUN_READ + TAGLEN);
    fp->udp_buf = malloc(UDP_READ);
    fp->rx_buf = malloc(VNET_HDR + UDP_READ);
    if (fp->tun_buf == NULL || fp->udp_buf == NULL || fp->rx_buf == NULL) {
        Py_DECREF(fp);
        return PyErr_NoMemory();
    }
    return (PyObject *)fp;
}

static PyObject *
FastPath_start(FastPathObject *fp, PyObject *unused)
{
    if (fp->closed)
        return PyErr_Format(PyExc_ValueError, "FastPath is closed");
    if (fp->started)
        return PyErr_Format(PyExc_RuntimeError, "FastPath already started");
    int flags = fcntl(fp->tun_fd, F_GETFL);
    if (flags < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    fp->tun_nonblock = flags & O_NONBLOCK; /* else one read per wake-up: a read never blocks */
    /* The thread takes no signals: they go to the interpreter's threads. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&fp->thread, NULL, fastpath_run, fp);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    fp->started = true;
    Py_RETURN_NONE;
}

static void
free_entries(Entry *e)
{
    while (e != NULL) {
        Entry *next = e->next;
        free(e);
        e = next;
    }
}

/* Stop and join the thread, free the queue and every peer's keys (a peer with stats not yet
 * taken stays as a removed entry), close the eventfds and our dups of the fds. Idempotent. */
static void
fastpath_close(FastPathObject *fp)
{
    if (fp->closed)
        return;
    fp->closed = true; /* before the GIL is released: other callers see it */
    if (fp->started && !fp->joined) {
        atomic_store(&fp->stop, true);
        signal_fd(fp->wake_fd);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(fp->thread, NULL);
        Py_END_ALLOW_THREADS
        fp->joined = true;
    }
    if (fp->locks_ready) {
        lock_from_python(&fp->queue_lock);
        Entry *tun = fp->tun_q.head, *udp = fp->udp_q.head;
        fp->tun_q = (Queue){NULL, NULL};
        fp->udp_q = (Queue){NULL, NULL};
        fp->queued = 0;
        atomic_store(&fp->tun_waiting, 0);
        atomic_store(&fp->udp_waiting, 0);
        pthread_mutex_unlock(&fp->queue_lock);
        free_entries(tun);
        free_entries(udp);

        /* The thread is gone, and releasing keys runs no Python code (Counter and ReplayWindow
         * cannot be subclassed, hold no Python objects but an int): done under the lock. */
        lock_from_python(&fp->peers_lock);
        size_t kept = 0;
        for (size_t i = 0; i < fp->npeers; i++) {
            Peer *p = fp->peers[i];
            keys_release(&p->k);
            p->active = false;
            if (p->tx_packets || p->rx_packets || p->auth_failed)
                fp->peers[kept++] = p;
            else
                free(p);
        }
        fp->npeers = kept;
        pthread_mutex_unlock(&fp->peers_lock);
    }
    int fds[] = {fp->notify_fd, fp->wake_fd, fp->udp_fd, fp->tun_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    fp->notify_fd = fp->wake_fd = fp->udp_fd = fp->tun_fd = -1;
    free(fp->tun_buf);
    free(fp->udp_buf);
    free(fp->rx_buf);
    fp->tun_buf = fp->udp_buf = fp->rx_buf = NULL;
}

static PyObject *
FastPath_close(FastPathObject *fp, PyObject *unused)
{
    fastpath_close(fp);
    Py_RETURN_NONE;
}

static void
FastPath_dealloc(FastPathObject *fp)
{
    fastpath_close(fp);
    for (size_t i = 0; i < fp->npeers; i++)
        free(fp->peers[i]); /* removed entries: their keys went in close */
    free(fp->peers);
    if (fp->locks_ready) {
        pthread_mutex_destroy(&fp->peers_lock);
        pthread_mutex_destroy(&fp->queue_lock);
    }
    Py_TYPE(fp)->tp_free((PyObject *)fp);
}

static PyObject *
FastPath_fileno(FastPathObject *fp, PyObject *unused)
{
    if (fp->closed)
        return PyErr_Format(PyExc_ValueError, "FastPath is closed");
    return PyLong_FromLong(fp->notify_fd);
}

/* A source address as Python's socket module gives it for the family: (host, port) for
 * AF_INET, (host, port, flowinfo, scope_id) for AF_INET6 (host without a %scope suffix, as
 * since Python 3.7), so a hand-off carries what recvmsg would have. */
static PyObject *
address_tuple(const struct sockaddr_storage *a, socklen_t len)
{
    char host[INET6_ADDRSTRLEN] = "";
    if (a->ss_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)a;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        return Py_BuildValue("(sIII)", host, (unsigned)ntohs(in6->sin6_port),
                             (unsigned)ntohl(in6->sin6_flowinfo), (unsigned)in6->sin6_scope_id);
    }
    unsigned port = 0;
    if (a->ss_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)a;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        port = ntohs(in->sin_port);
    }
    return Py_BuildValue("(sI)", host, port);
}

static PyObject *
FastPath_drain(FastPathObject *fp, PyObject *unused)
{
    Entry *tun = NULL, *udp = NULL;
    if (!fp->closed) {
        lock_from_python(&fp->queue_lock);
        if (!fp->closed) { /* close() may have run while we waited */
            tun = fp->tun_q.head;
            udp = fp->udp_q.head;
            fp->tun_q = (Queue){NULL, NULL};
            fp->udp_q = (Queue){NULL, NULL};
            fp->queued = 0;
            /* held before waiting is cleared: the thread checks waiting, then held, and must
             * never see both clear while Python still holds drained reads (order). */
            atomic_store(&fp->tun_held, tun != NULL);
            atomic_store(&fp->udp_held, udp != NULL);
            atomic_store(&fp->tun_waiting, 0);
            atomic_store(&fp->udp_waiting, 0);
            clear_fd(fp->notify_fd);
            /* A thread that stopped keeps the eventfd readable: the clear above may have eaten
             * its signal after the caller looked at `error`, and what it queued since is
             * drained only on the next call. */
            if (atomic_load(&fp->error_errno))
                signal_fd(fp->notify_fd);
            if (atomic_load(&fp->paused)) {
                atomic_store(&fp->paused, false);
                signal_fd(fp->wake_fd);
            }
        }
        pthread_mutex_unlock(&fp->queue_lock);
    }
    PyObject *tun_list = PyList_New(0), *udp_list = PyList_New(0);
    bool ok = tun_list != NULL && udp_list != NULL;
    for (Entry *e = tun, *next; e != NULL; e = next) {
        next = e->next;
        if (ok) {
            PyObject *b = PyBytes_FromStringAndSize((const char *)e->data, (Py_ssize_t)e->len);
            ok = b != NULL && PyList_Append(tun_list, b) == 0;
            Py_XDECREF(b);
        }
        free(e);
    }
    for (Entry *e = udp, *next; e != NULL; e = next) {
        next = e->next;
        if (ok) {
            PyObject *address = address_tuple(&e->addr, e->addr_len);
            PyObject *item = address == NULL ? NULL
                : Py_BuildValue("(y#iN)", (const char *)e->data, (Py_ssize_t)e->len,
                                e->segment, address);
            ok = item != NULL && PyList_Append(udp_list, item) == 0;
            Py_XDECREF(item);
        }
        free(e);
    }
    if (!ok) {
        Py_XDECREF(tun_list);
        Py_XDECREF(udp_list);
        return NULL;
    }
    return Py_BuildValue("(NN)", tun_list, udp_list);
}

static int
endpoint_arg(FastPathObject *fp, PyObject *obj, struct sockaddr_storage *out, socklen_t *len)
{
    if (!PyTuple_Check(obj)) { /* None is the caller's: no endpoint */
        PyErr_SetString(PyExc_TypeError, "endpoint must be None, (host, port) or "
                        "(host, port, flowinfo, scope_id)");
        return -1;
    }
    return sockaddr_arg(obj, fp->udp_family, "endpoint", out, len);
}

static EVP_CIPHER_CTX *
new_cipher(const uint8_t key[KEYLEN], bool encrypt)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    int ok = encrypt ? EVP_EncryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL)
                     : EVP_DecryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL);
    if (ok != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static PyObject *
FastPath_set_peer(FastPathObject *fp, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "overlay", "remote_index", "send_key", "counter",
                             "send_limit", "send_fragments", "local_index", "receive_key",
                             "replay", "endpoint", "send_until", "receive_until", "channel",
                             NULL};
    enum { OVERLAY, REMOTE_INDEX, SEND_KEY, COUNTER, SEND_LIMIT, SEND_FRAGMENTS, LOCAL_INDEX,
           RECEIVE_KEY, REPLAY, ENDPOINT, SEND_UNTIL, RECEIVE_UNTIL, N_REQUIRED, CHANNEL = N_REQUIRED,
           N_ARGS };
    PyObject *a[N_ARGS] = {NULL};
    long long key;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L|$OOOOOOOOOOOOO:set_peer", kwlist, &key,
                                     &a[OVERLAY], &a[REMOTE_INDEX], &a[SEND_KEY], &a[COUNTER],
                                     &a[SEND_LIMIT], &a[SEND_FRAGMENTS], &a[LOCAL_INDEX],
                                     &a[RECEIVE_KEY], &a[REPLAY], &a[ENDPOINT], &a[SEND_UNTIL],
                                     &a[RECEIVE_UNTIL], &a[CHANNEL]))
        return NULL;
    for (int i = 0; i < N_REQUIRED; i++)
        if (a[i] == NULL)
            return required_missing("set_peer", kwlist[i + 1]);
    if (fp->closed)
        return PyErr_Format(PyExc_ValueError, "FastPath is closed");

    Peer np;
    memset(&np, 0, sizeof np);
    np.key = key;
    np.active = true;
    uint8_t send_key[KEYLEN], receive_key[KEYLEN];
    uint64_t remote_index, local_index;
    bool unlimited;
    int send_fragments;
    if (bytes_arg(a[OVERLAY], "overlay", np.overlay, 4) < 0
        || u64_arg(a[REMOTE_INDEX], "remote_index", &remote_index) < 0
        || u64_arg(a[LOCAL_INDEX], "local_index", &local_index) < 0
        || limit_arg(a[SEND_LIMIT], &np.send_limit, &unlimited) < 0
        || (send_fragments = PyObject_IsTrue(a[SEND_FRAGMENTS])) < 0)
        return NULL;
    if (remote_index > UINT32_MAX || local_index > UINT32_MAX)
        return PyErr_Format(PyExc_ValueError, "%s out of range (0..2**32-1)",
                            remote_index > UINT32_MAX ? "remote_index" : "local_index");
    np.remote_index = (uint32_t)remote_index;
    np.local_index = (uint32_t)local_index;
    np.send_fragments = send_fragments;
    if (!PyObject_TypeCheck(a[COUNTER], &CounterType))
        return PyErr_Format(PyExc_TypeError, "counter must be a Counter, not %s",
                            Py_TYPE(a[COUNTER])->tp_name);
    if (!PyObject_TypeCheck(a[REPLAY], &ReplayType))
        return PyErr_Format(PyExc_TypeError, "replay must be a ReplayWindow, not %s",
                            Py_TYPE(a[REPLAY])->tp_name);
    np.send_until = PyFloat_AsDouble(a[SEND_UNTIL]);
    if (np.send_until == -1.0 && PyErr_Occurred())
        return NULL;
    np.receive_until = PyFloat_AsDouble(a[RECEIVE_UNTIL]);
    if (np.receive_until == -1.0 && PyErr_Occurred())
        return NULL;
    if (a[ENDPOINT] != Py_None) {
        if (endpoint_arg(fp, a[ENDPOINT], &np.endpoint, &np.endpoint_len) < 0)
            return NULL;
        np.has_endpoint = true;
    }
    if (a[CHANNEL] != NULL && a[CHANNEL] != Py_None) { /* a relayed path: endpoint = relay */
        uint64_t channel;
        if (u64_arg(a[CHANNEL], "channel", &channel) < 0)
            return NULL;
        if (channel < CHANNEL_MIN || channel > CHANNEL_MAX)
            return PyErr_Format(PyExc_ValueError,
                                "channel %llu out of range (0x4000..0x4FFF, RFC 8656 section 12)",
                                (unsigned long long)channel);
        if (!np.has_endpoint)
            return PyErr_Format(PyExc_ValueError, "channel needs an endpoint (the relay)");
        np.channel = (uint16_t)channel;
    }
    if (bytes_arg(a[SEND_KEY], "send_key", send_key, KEYLEN) < 0)
        return NULL;
    if (bytes_arg(a[RECEIVE_KEY], "receive_key", receive_key, KEYLEN) < 0) {
        OPENSSL_cleanse(send_key, KEYLEN);
        return NULL;
    }
    np.k.seal = new_cipher(send_key, true);
    np.k.open = new_cipher(receive_key, false);
    OPENSSL_cleanse(send_key, KEYLEN);
    OPENSSL_cleanse(receive_key, KEYLEN);
    if (np.k.seal == NULL || np.k.open == NULL) {
        keys_release(&np.k);
        return PyErr_Format(PyExc_RuntimeError, "OpenSSL refused ChaCha20-Poly1305 keys");
    }
    np.k.counter = (CounterObject *)Py_NewRef(a[COUNTER]);
    np.k.replay = (ReplayObject *)Py_NewRef(a[REPLAY]);

    Keys old = {0};
    lock_from_python(&fp->peers_lock);
    if (fp->closed) {
        pthread_mutex_unlock(&fp->peers_lock);
        keys_release(&np.k);
        return PyErr_Format(PyExc_ValueError, "FastPath is closed");
    }
    Peer *existing = NULL;
    for (size_t i = 0; i < fp->npeers; i++)
        if (fp->peers[i]->key == key)
            existing = fp->peers[i];
    if (existing != NULL) { /* replace the route, keep the stats not yet taken */
        old = existing->k;
        np.tx_packets = existing->tx_packets;
        np.tx_bytes = existing->tx_bytes;
        np.auth_failed = existing->auth_failed;
        np.last_tx = existing->last_tx;
        np.rx_packets = existing->rx_packets;
        np.rx_bytes = existing->rx_bytes;
        np.last_rx = existing->last_rx;
        *existing = np;
    }
    else {
        Peer *p = malloc(sizeof *p);
        if (p != NULL && fp->npeers == fp->cap) {
            size_t cap = fp->cap ? 2 * fp->cap : 8;
            Peer **grown = realloc(fp->peers, cap * sizeof *grown);
            if (grown == NULL) {
                free(p);
                p = NULL;
            }
            else {
                fp->peers = grown;
                fp->cap = cap;
            }
        }
        if (p == NULL) {
            pthread_mutex_unlock(&fp->peers_lock);
            keys_release(&np.k);
            return PyErr_NoMemory();
        }
        *p = np;
        fp->peers[fp->npeers++] = p;
    }
    pthread_mutex_unlock(&fp->peers_lock);
    keys_release(&old);
    Py_RETURN_NONE;
}

static PyObject *
FastPath_remove_peer(FastPathObject *fp, PyObject *arg)
{
    long long key = PyLong_AsLongLong(arg);
    if (key == -1 && PyErr_Occurred())
        return NULL;
    if (!fp->locks_ready)
        Py_RETURN_NONE;
    Keys old = {0};
    lock_from_python(&fp->peers_lock);
    for (size_t i = 0; i < fp->npeers; i++) {
        Peer *p = fp->peers[i];
        if (p->key != key || !p->active)
            continue;
        old = p->k;
        memset(&p->k, 0, sizeof p->k);
        p->active = false;
        if (!p->tx_packets && !p->rx_packets && !p->auth_failed) {
            fp->peers[i] = fp->peers[--fp->npeers];
            free(p);
        }
        break;
    }
    pthread_mutex_unlock(&fp->peers_lock);
    keys_release(&old);
    Py_RETURN_NONE;
}

typedef struct {
    long long key;
    uint64_t tx_packets, tx_bytes, rx_packets, rx_bytes, auth_failed;
    double last_tx, last_rx;
} Stats;

static PyObject *
FastPath_take_stats(FastPathObject *fp, PyObject *unused)
{
    Stats *stats = NULL;
    size_t n = 0;
    lock_from_python(&fp->peers_lock);
    if (fp->npeers) {
        stats = malloc(fp->npeers * sizeof *stats);
        if (stats == NULL) {
            pthread_mutex_unlock(&fp->peers_lock);
            return PyErr_NoMemory();
        }
    }
    for (size_t i = 0; i < fp->npeers;) {
        Peer *p = fp->peers[i];
        if (p->tx_packets || p->rx_packets || p->auth_failed) {
            stats[n++] = (Stats){p->key, p->tx_packets, p->tx_bytes, p->rx_packets,
                                 p->rx_bytes, p->auth_failed, p->last_tx, p->last_rx};
            p->tx_packets = p->tx_bytes = p->rx_packets = p->rx_bytes = p->auth_failed = 0;
            p->last_tx = p->last_rx = 0.0;
        }
        if (!p->active) { /* removed: its last stats are taken */
            fp->peers[i] = fp->peers[--fp->npeers];
            free(p);
        }
        else {
            i++;
        }
    }
    pthread_mutex_unlock(&fp->peers_lock);
    PyObject *result = PyDict_New();
    for (size_t i = 0; result != NULL && i < n; i++) {
        Stats *s = &stats[i];
        PyObject *key = PyLong_FromLongLong(s->key);
        PyObject *value = Py_BuildValue("(KKdKKdK)", (unsigned long long)s->tx_packets,
                                        (unsigned long long)s->tx_bytes, s->last_tx,
                                        (unsigned long long)s->rx_packets,
                                        (unsigned long long)s->rx_bytes, s->last_rx,
                                        (unsigned long long)s->auth_failed);
        if (key == NULL || value == NULL || PyDict_SetItem(result, key, value) < 0)
            Py_CLEAR(result);
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    free(stats);
    return result;
}

static PyObject *
FastPath_counters(FastPathObject *fp, PyObject *unused)
{
    PyObject *result = PyDict_New();
    for (int i = 0; result != NULL && i < N_COUNTS; i++) {
        PyObject *value = PyLong_FromUnsignedLongLong(
            atomic_load_explicit(&fp->counts[i], memory_order_relaxed));
        if (value == NULL || PyDict_SetItemString(result, count_names[i], value) < 0)
            Py_CLEAR(result);
        Py_XDECREF(value);
    }
    return result;
}

/* Python is done with what the last drain() gave it (sent, written): native handling may
 * resume for both kinds. */
static PyObject *
FastPath_release(FastPathObject *fp, PyObject *unused)
{
    atomic_store(&fp->tun_held, false);
    atomic_store(&fp->udp_held, false);
    Py_RETURN_NONE;
}

/* Why the thread stopped on its own: an OSError (errno, "where: strerror"), or None. */
static PyObject *
FastPath_error(FastPathObject *fp, void *closure)
{
    int err = atomic_load(&fp->error_errno);
    if (err == 0)
        Py_RETURN_NONE;
    PyObject *message = PyUnicode_FromFormat("fast path thread stopped: %s: %s",
                                             fp->error_where, strerror(err));
    if (message == NULL)
        return NULL;
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "iN", err, message);
    return exc;
}

/* Test only: the thread's next poll() fails with `errno` (a fatal one stops the thread as a
 * real failure would; EINTR is retried). */
static PyObject *
FastPath_fail_for_test(FastPathObject *fp, PyObject *arg)
{
    long err = PyLong_AsLong(arg);
    if (err == -1 && PyErr_Occurred())
        return NULL;
    if (err <= 0 || err > 4095)
        return PyErr_Format(PyExc_ValueError, "errno out of range (1..4095): %ld", err);
    if (fp->closed)
        return PyErr_Format(PyExc_ValueError, "FastPath is closed");
    atomic_store(&fp->inject_errno, (int)err);
    signal_fd(fp->wake_fd);
    Py_RETURN_NONE;
}

static PyGetSetDef FastPath_getset[] = {
    {"error", (getter)FastPath_error, NULL,
     "Why the thread stopped on its own (OSError); None if it did not.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef FastPath_methods[] = {
    {"start", (PyCFunction)FastPath_start, METH_NOARGS, "Start the thread (once)."},
    {"close", (PyCFunction)FastPath_close, METH_NOARGS,
     "Stop and join the thread, free the queue and keys; idempotent. The fds stay open."},
    {"fileno", (PyCFunction)FastPath_fileno, METH_NOARGS,
     "An eventfd, readable while handed-off reads wait."},
    {"drain", (PyCFunction)FastPath_drain, METH_NOARGS,
     "Everything waiting: (TUN reads, socket reads as (data, gro_segment or 0, source)).\n"
     "Until release(), later reads of a kind drained go to Python too (order)."},
    {"release", (PyCFunction)FastPath_release, METH_NOARGS,
     "Python sent/wrote what drain() gave it: native handling may resume."},
    {"set_peer", (PyCFunction)(void (*)(void))FastPath_set_peer, METH_VARARGS | METH_KEYWORDS,
     "Install or replace a peer's route."},
    {"remove_peer", (PyCFunction)FastPath_remove_peer, METH_O,
     "Remove a peer's route (no error if absent)."},
    {"take_stats", (PyCFunction)FastPath_take_stats, METH_NOARGS,
     "Per peer with activity since the last call: (tx_packets, tx_bytes, last_tx, rx_packets,"
     " rx_bytes, last_rx)."},
    {"counters", (PyCFunction)FastPath_counters, METH_NOARGS, "Cumulative counters."},
    {"_fail_for_test", (PyCFunction)FastPath_fail_for_test, METH_O,
     "Test only: the thread's next poll() fails with this errno (fatal ones stop it)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meshd.tunnel._fastpath.FastPath",
    .tp_basicsize = sizeof(FastPathObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FastPath(udp_fd, tun_fd, *, frames, check_source, fragment_part, "
              "queue_bytes=8<<20): the tunnel's native data path thread.",
    .tp_new = FastPath_new,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_methods = FastPath_methods,
    .tp_getset = FastPath_getset,
};

/* ---------------------------------------------------------------------------------------------
 * Module
 */

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meshd.tunnel._fastpath",
    .m_doc = "The tunnel's native fast path: lone data packets between TUN and UDP in a C "
             "thread; everything else handed to Python.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&CounterType) < 0 || PyType_Ready(&ReplayType) < 0
        || PyType_Ready(&FastPathType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Counter", (PyObject *)&CounterType) < 0
        || PyModule_AddObjectRef(m, "ReplayWindow", (PyObject *)&ReplayType) < 0
        || PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
