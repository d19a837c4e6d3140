/* meshd.turn._relaypath: the relay's native data path.
 *
 * `meshd server` relays ChannelData (RFC 8656 §12.4) and peer datagrams in Python
 * (meshd/turn/server.py) with every check the RFC asks for. Once Python has relayed a read of a
 * (socket, source, channel) it tells this module what it did, as a route: where the payloads go
 * and until when that stays true (the earliest expiry of the allocations, channels and
 * permissions it checked). Later reads that match a live route exactly are relayed here, on the
 * same wake-up, without entering the interpreter: recvmsg (UDP GRO) -> the same checks ->
 * one sendmsg (UDP GSO) per run. Anything else -- STUN, a channel or source without a route,
 * an expired route, a read of odd shape -- is handed back to Python unchanged, and the drain
 * stops there so that nothing overtakes it.
 *
 * Three kinds of route, as server.py relays:
 * - STRIP: ChannelData from a client on a listening socket -> its payloads, from the
 *   allocation's relayed socket to the channel's peer (§12.4, §11.3 once permitted);
 * - REWRITE: the same, when the peer is another relayed address of this server whose client
 *   has a channel and permission for ours (`TurnServer._rewrite_locally`): the 4-byte headers
 *   are rewritten in place and the read leaves from that client's listening socket;
 * - WRAP: datagrams from a peer on a relayed socket -> ChannelData of the peer's channel to
 *   the allocation's client (§12.4: a 4-byte header in front of each, no padding over UDP).
 *
 * Python forgets every route when an allocation goes (`forget`), so a route never outlives what
 * it was learnt from; expiries cover the rest. No thread, no lock: `drain` runs under the GIL
 * on the event loop's wake-up, and `now` comes from the caller's clock.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "../native/sockaddr.h"
#include "../native/udp.h"


enum {
    READ_BYTES = 65536,      /* a GRO read is at most one 64 KB skb */
    GSO_MAX_SEGMENTS = 64,   /* the kernel's UDP_MAX_SEGMENTS */
    GSO_MAX_BYTES = 65000,   /* meshd/udp.py: below one IP packet with any header */
    MAX_DATAGRAMS = READ_BYTES / 4 + 1, /* 4 bytes of ChannelData header at least */
    BUCKETS = 1024,
    MAX_ROUTES = 1 << 16,
    CHANNEL_MIN = 0x4000,    /* RFC 8656 §12: 0x4000 through 0x4FFF; the core also binds up */
    CHANNEL_MAX = 0x7FFF,    /* to 0x7FFF for RFC 5766 clients */
};

enum Kind { STRIP, REWRITE, WRAP };

enum {
    C_READS, C_DATAGRAMS_READ, C_RELAYED_READS, C_COALESCED_READS, C_HANDED, C_EXPIRED,
    C_DATAGRAMS_OUT, C_BYTES_OUT, C_DATAGRAMS_IN, C_BYTES_IN, C_RELAYED_LOCALLY,
    C_BATCHES, C_BATCHED_DATAGRAMS, C_GSO_SENDS, C_DATAGRAMS_SENT, C_GSO_REFUSED,
    C_SEND_ERRORS, N_COUNTS
};
static const char *const count_names[N_COUNTS] = {
    "reads", "datagrams_read", "relayed_reads", "coalesced_reads", "handed", "expired",
    "datagrams_out", "bytes_out", "datagrams_in", "bytes_in", "relayed_locally",
    "batches", "batched_datagrams", "gso_sends", "datagrams_sent", "gso_refused",
    "send_errors",
};

typedef struct Route {
    struct Route *next;
    /* key */
    int in_fd;
    int channel; /* -1: WRAP (datagrams from a peer on a relayed socket) */
    struct sockaddr_storage source;
    socklen_t source_len;
    /* action */
    enum Kind kind;
    int out_fd;
    int out_channel; /* REWRITE, WRAP: the channel the client knows the other end by */
    struct sockaddr_storage destination;
    socklen_t destination_len;
    double expires;
} Route;

typedef struct {
    PyObject_HEAD
    Route *buckets[BUCKETS];
    size_t routes;
    bool no_gso; /* the kernel cannot segment (EOPNOTSUPP, ENOPROTOOPT): one sendmsg each */
    uint64_t counts[N_COUNTS];
    uint8_t *buf;
    struct iovec *iov;  /* two per datagram at most: header + payload */
    uint8_t *headers;   /* WRAP: one 4-byte header per datagram */
} RelayPathObject;

typedef struct {
    size_t first, n; /* iov[first .. first+n) is one datagram */
    size_t len;
} Datagram;

static PyTypeObject RelayPathType;

/* --- routes -------------------------------------------------------------------------------- */

static unsigned
route_hash(int fd, int channel, const struct sockaddr_storage *a)
{
    uint32_t h = (uint32_t)fd * 0x9E3779B1u ^ (uint32_t)(channel + 1) * 0x85EBCA77u;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)a;
        h ^= in->sin_addr.s_addr * 0xC2B2AE3Du ^ in->sin_port;
    }
    else if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)a;
        uint32_t w[4];
        memcpy(w, &in6->sin6_addr, sizeof w);
        h ^= (w[0] ^ w[1] * 31u ^ w[2] * 131u ^ w[3] * 0xC2B2AE3Du) ^ in6->sin6_port;
    }
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    return h % BUCKETS;
}

static Route **
route_slot(RelayPathObject *rp, int fd, int channel, const struct sockaddr_storage *source,
           socklen_t source_len)
{
    Route **slot = &rp->buckets[route_hash(fd, channel, source)];
    for (; *slot != NULL; slot = &(*slot)->next) {
        Route *r = *slot;
        if (r->in_fd == fd && r->channel == channel
            && same_address(source, source_len, &r->source, r->source_len))
            return slot;
    }
    return slot;
}

static void
forget_all(RelayPathObject *rp)
{
    for (size_t b = 0; b < BUCKETS; b++) {
        Route *r = rp->buckets[b];
        while (r != NULL) {
            Route *next = r->next;
            PyMem_Free(r);
            r = next;
        }
        rp->buckets[b] = NULL;
    }
    rp->routes = 0;
}

/* --- sending ------------------------------------------------------------------------------- */

static bool
gso_refused(int err)
{
    /* meshd/udp.py's _GSO_REFUSED: EIO, the route's device lacks checksum offload; EINVAL and
     * EMSGSIZE, a segment above the path MTU; the last two, no UDP GSO in this kernel. */
    return err == EIO || err == EINVAL || err == EMSGSIZE || err == EOPNOTSUPP
           || err == ENOPROTOOPT;
}

static bool
send_one(RelayPathObject *rp, int fd, const struct sockaddr_storage *to, socklen_t to_len,
         struct iovec *iov, size_t n)
{
    struct msghdr msg = {.msg_name = (void *)to, .msg_namelen = to_len, .msg_iov = iov,
                         .msg_iovlen = n};
    ssize_t sent;
    do {
        sent = sendmsg(fd, &msg, MSG_DONTWAIT);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        rp->counts[C_SEND_ERRORS]++;
        return false;
    }
    rp->counts[C_DATAGRAMS_SENT]++;
    return true;
}

/* `count` datagrams (all `segment` bytes but the last, which may be shorter) to one
 * destination: one sendmsg with UDP_SEGMENT per GSO_MAX_SEGMENTS datagrams or GSO_MAX_BYTES
 * bytes, as meshd.udp.BatchSocket.send_segments; one by one when the kernel refuses. */
static void
send_run(RelayPathObject *rp, int fd, const struct sockaddr_storage *to, socklen_t to_len,
         const Datagram *d, size_t count, size_t segment)
{
    size_t per = segment > 0 ? GSO_MAX_BYTES / segment : 0;
    if (per > GSO_MAX_SEGMENTS)
        per = GSO_MAX_SEGMENTS;
    if (per < 1)
        per = 1;
    size_t i = 0;
    while (i < count) {
        size_t k = count - i < per ? count - i : per;
        if (k >= 2 && !rp->no_gso) {
            size_t first = d[i].first, n = d[i + k - 1].first + d[i + k - 1].n - first;
            if (udp_gso_sendmsg(fd, to, to_len, &rp->iov[first], n, (uint16_t)segment) >= 0) {
                rp->counts[C_GSO_SENDS]++;
                rp->counts[C_DATAGRAMS_SENT] += k;
                i += k;
                continue;
            }
            if (!gso_refused(errno)) {
                rp->counts[C_SEND_ERRORS] += k; /* buffer full, unreachable: UDP drops */
                i += k;
                continue;
            }
            rp->counts[C_GSO_REFUSED]++;
            if (errno == EOPNOTSUPP || errno == ENOPROTOOPT)
                rp->no_gso = true;
        }
        for (size_t j = i; j < i + k; j++)
            send_one(rp, fd, to, to_len, &rp->iov[d[j].first], d[j].n);
        i += k;
    }
}

/* --- reads --------------------------------------------------------------------------------- */

static inline unsigned
be16(const uint8_t *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static inline void
put_be16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* A read on a listening socket that is ChannelData of one channel throughout, in the shapes
 * server.py relays without a second look: a single datagram (Length within it; anything after
 * the payload is padding, §12.5), or datagrams of `segment` bytes each carrying exactly
 * `segment - 4` (no padding over UDP) and a shorter last one filling its datagram. Sets the
 * channel; false: Python decides. */
static bool
channel_read(const uint8_t *d, size_t size, size_t segment, unsigned *channel, size_t *count)
{
    if (size < 4)
        return false;
    unsigned number = be16(d);
    if (number < CHANNEL_MIN || number > CHANNEL_MAX)
        return false;
    if (segment == 0) {
        if (4 + (size_t)be16(d + 2) > size)
            return false;
        *channel = number;
        *count = 1;
        return true;
    }
    if (segment < 5 || be16(d + 2) != segment - 4)
        return false;
    size_t full = size / segment, tail = size - full * segment;
    for (size_t i = 1; i < full; i++)
        if (memcmp(d + i * segment, d, 4) != 0)
            return false;
    if (tail != 0) {
        const uint8_t *t = d + full * segment;
        if (tail < 4 || be16(t) != number || be16(t + 2) != tail - 4)
            return false;
    }
    *channel = number;
    *count = full + (tail != 0);
    return true;
}

static PyObject *
source_tuple(const struct sockaddr_storage *a)
{
    char host[INET6_ADDRSTRLEN];
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)a;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(in->sin_port));
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)a;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(in6->sin6_port),
                             (unsigned)ntohl(in6->sin6_flowinfo),
                             (unsigned)in6->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* Relay one read natively if a live route covers it; false: Python's. */
static bool
relay_read(RelayPathObject *rp, int fd, bool listening, size_t size, size_t segment,
           const struct sockaddr_storage *from, socklen_t from_len, double now)
{
    uint8_t *d = rp->buf;
    unsigned channel = 0;
    size_t count = 1;
    if (listening && !channel_read(d, size, segment, &channel, &count))
        return false;
    if (!listening)
        count = segment > 0 ? (size + segment - 1) / segment : 1;
    if (segment == 0)
        segment = size;
    Route *r = *route_slot(rp, fd, listening ? (int)channel : -1, from, from_len);
    if (r == NULL)
        return false;
    if (!(now < r->expires)) {
        rp->counts[C_EXPIRED]++;
        return false;
    }
    Datagram dg[GSO_MAX_SEGMENTS * 2];
    if (count > sizeof dg / sizeof dg[0])
        return false; /* more datagrams than a GRO read carries: not the kernel's shape */
    size_t payload = 0, out_segment;
    if (r->kind == WRAP) {
        uint8_t *h = rp->headers;
        for (size_t i = 0; i < count; i++) {
            size_t start = i * segment, len = size - start < segment ? size - start : segment;
            put_be16(h + 4 * i, (unsigned)r->out_channel);
            put_be16(h + 4 * i + 2, (unsigned)len);
            rp->iov[2 * i] = (struct iovec){h + 4 * i, 4};
            rp->iov[2 * i + 1] = (struct iovec){d + start, len};
            dg[i] = (Datagram){2 * i, 2, len + 4};
            payload += len;
        }
        out_segment = segment + 4;
        rp->counts[C_DATAGRAMS_IN] += count;
        rp->counts[C_BYTES_IN] += payload;
    }
    else {
        for (size_t i = 0; i < count; i++) {
            size_t start = i * segment;
            size_t body = be16(d + start + 2); /* within the datagram: channel_read checked */
            if (r->kind == STRIP) {
                rp->iov[i] = (struct iovec){d + start + 4, body};
                dg[i] = (Datagram){i, 1, body};
            }
            else { /* the header rewritten; padding of a single datagram left behind */
                put_be16(d + start, (unsigned)r->out_channel);
                rp->iov[i] = (struct iovec){d + start, 4 + body};
                dg[i] = (Datagram){i, 1, 4 + body};
            }
            payload += body;
        }
        out_segment = r->kind == STRIP ? segment - 4 : segment;
        rp->counts[C_DATAGRAMS_OUT] += count;
        rp->counts[C_BYTES_OUT] += payload;
        if (r->kind == REWRITE) {
            rp->counts[C_RELAYED_LOCALLY] += count;
            rp->counts[C_DATAGRAMS_IN] += count;
            rp->counts[C_BYTES_IN] += payload;
        }
    }
    if (count >= 2) {
        rp->counts[C_BATCHES]++;
        rp->counts[C_BATCHED_DATAGRAMS] += count;
    }
    if (count == 1 && out_segment == 0) { /* an empty payload is one empty datagram */
        send_one(rp, r->out_fd, &r->destination, r->destination_len, &rp->iov[0], dg[0].n);
        return true;
    }
    send_run(rp, r->out_fd, &r->destination, r->destination_len, dg, count, out_segment);
    return true;
}

/* --- Python -------------------------------------------------------------------------------- */

static PyObject *
RelayPath_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, ":RelayPath", kwlist))
        return NULL;
    RelayPathObject *rp = (RelayPathObject *)type->tp_alloc(type, 0);
    if (rp == NULL)
        return NULL;
    rp->buf = PyMem_Malloc(READ_BYTES);
    rp->iov = PyMem_Calloc(2 * GSO_MAX_SEGMENTS * 2, sizeof(struct iovec));
    rp->headers = PyMem_Malloc(4 * GSO_MAX_SEGMENTS * 2);
    if (rp->buf == NULL || rp->iov == NULL || rp->headers == NULL) {
        Py_DECREF(rp);
        return PyErr_NoMemory();
    }
    return (PyObject *)rp;
}

static void
RelayPath_dealloc(RelayPathObject *rp)
{
    forget_all(rp);
    PyMem_Free(rp->buf);
    PyMem_Free(rp->iov);
    PyMem_Free(rp->headers);
    Py_TYPE(rp)->tp_free((PyObject *)rp);
}

static int
fd_arg(PyObject *obj, const char *name, int *fd, int *family)
{
    uint64_t v;
    if (u64_arg(obj, name, &v) < 0)
        return -1;
    if (v > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s %llu is not a file descriptor", name,
                     (unsigned long long)v);
        return -1;
    }
    struct sockaddr_storage local;
    socklen_t len = sizeof local;
    int type = 0;
    socklen_t type_len = sizeof type;
    if (getsockname((int)v, (struct sockaddr *)&local, &len) < 0
        || getsockopt((int)v, SOL_SOCKET, SO_TYPE, &type, &type_len) < 0 || type != SOCK_DGRAM
        || (local.ss_family != AF_INET && local.ss_family != AF_INET6)) {
        PyErr_Format(PyExc_ValueError, "%s %d is not a UDP socket", name, (int)v);
        return -1;
    }
    *fd = (int)v;
    if (family != NULL)
        *family = local.ss_family;
    return 0;
}

static int
channel_arg(PyObject *obj, const char *name, int *channel)
{
    if (obj == Py_None) {
        *channel = -1;
        return 0;
    }
    uint64_t v;
    if (u64_arg(obj, name, &v) < 0)
        return -1;
    if (v < CHANNEL_MIN || v > CHANNEL_MAX) {
        char hex[24];
        snprintf(hex, sizeof hex, "0x%llx", (unsigned long long)v);
        PyErr_Format(PyExc_ValueError, "%s %s is not a channel number (0x4000..0x7FFF, "
                     "RFC 8656 section 12, RFC 5766)", name, hex);
        return -1;
    }
    *channel = (int)v;
    return 0;
}

static PyObject *
RelayPath_learn(RelayPathObject *rp, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"in_fd", "source", "channel", "out_fd", "destination",
                             "out_channel", "expires", NULL};
    PyObject *in_obj, *source_obj, *channel_obj, *out_obj, *dest_obj, *out_channel_obj;
    double expires;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOd:learn", kwlist, &in_obj,
                                     &source_obj, &channel_obj, &out_obj, &dest_obj,
                                     &out_channel_obj, &expires))
        return NULL;
    Route r;
    memset(&r, 0, sizeof r);
    int in_family, out_family;
    if (fd_arg(in_obj, "in_fd", &r.in_fd, &in_family) < 0
        || fd_arg(out_obj, "out_fd", &r.out_fd, &out_family) < 0
        || channel_arg(channel_obj, "channel", &r.channel) < 0
        || channel_arg(out_channel_obj, "out_channel", &r.out_channel) < 0
        || sockaddr_arg(source_obj, in_family, "source", &r.source, &r.source_len) < 0
        || sockaddr_arg(dest_obj, out_family, "destination", &r.destination,
                        &r.destination_len) < 0)
        return NULL;
    if (r.channel < 0 && r.out_channel < 0) {
        PyErr_SetString(PyExc_ValueError, "a route needs a channel, an out_channel or both");
        return NULL;
    }
    r.kind = r.channel < 0 ? WRAP : r.out_channel < 0 ? STRIP : REWRITE;
    r.expires = expires;
    Route **slot = route_slot(rp, r.in_fd, r.channel, &r.source, r.source_len);
    if (*slot != NULL) {
        r.next = (*slot)->next;
        **slot = r;
        Py_RETURN_NONE;
    }
    if (rp->routes >= MAX_ROUTES)
        forget_all(rp); /* relearnt from Python on the next read of each; memory stays bounded */
    Route *fresh = PyMem_Malloc(sizeof *fresh);
    if (fresh == NULL)
        return PyErr_NoMemory();
    *fresh = r;
    slot = &rp->buckets[route_hash(r.in_fd, r.channel, &r.source)];
    fresh->next = *slot;
    *slot = fresh;
    rp->routes++;
    Py_RETURN_NONE;
}

static PyObject *
RelayPath_forget(RelayPathObject *rp, PyObject *Py_UNUSED(ignored))
{
    forget_all(rp);
    Py_RETURN_NONE;
}

static PyObject *
RelayPath_drain(RelayPathObject *rp, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fd", "listening", "now", "limit", NULL};
    int fd, listening, limit;
    double now;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ipdi:drain", kwlist, &fd, &listening, &now,
                                     &limit))
        return NULL;
    for (int i = 0; i < limit; i++) {
        struct sockaddr_storage from;
        udp_gro_control control;
        struct iovec iov = {rp->buf, READ_BYTES};
        struct msghdr msg = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov,
                             .msg_iovlen = 1, .msg_control = control.buf,
                             .msg_controllen = sizeof control.buf};
        ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == EINTR)
                continue;
            if (errno == EBADF || errno == ENOTSOCK)
                return PyErr_SetFromErrno(PyExc_OSError);
            continue; /* e.g. ECONNREFUSED from an earlier send: nothing was read */
        }
        size_t size = (size_t)n, segment = (size_t)udp_gro_segment(&msg);
        if (segment >= size)
            segment = 0;
        /* Socket counters count every read; the core's (coalesced_reads...) only those
         * relayed here, since Python counts the ones it is handed. */
        rp->counts[C_READS]++;
        rp->counts[C_DATAGRAMS_READ] += segment ? (size + segment - 1) / segment : 1;
        if ((msg.msg_flags & MSG_TRUNC) == 0
            && relay_read(rp, fd, listening, size, segment, &from, msg.msg_namelen, now)) {
            rp->counts[C_RELAYED_READS]++;
            if (segment)
                rp->counts[C_COALESCED_READS]++;
            continue;
        }
        /* Python's: hand it over and stop, so that nothing read later overtakes it. */
        rp->counts[C_HANDED]++;
        PyObject *source = source_tuple(&from);
        if (source == NULL)
            return NULL;
        PyObject *read = Py_BuildValue("(y#nN)", (const char *)rp->buf, (Py_ssize_t)size,
                                       (Py_ssize_t)segment, source);
        if (read == NULL)
            return NULL;
        PyObject *out = PyList_New(1);
        if (out == NULL) {
            Py_DECREF(read);
            return NULL;
        }
        PyList_SET_ITEM(out, 0, read);
        return out;
    }
    return PyList_New(0);
}

static PyObject *
RelayPath_stats(RelayPathObject *rp, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (int i = 0; i < N_COUNTS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(rp->counts[i]);
        if (v == NULL || PyDict_SetItemString(out, count_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

static PyObject *
RelayPath_get_routes(RelayPathObject *rp, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(rp->routes);
}

static PyObject *
RelayPath_get_gso(RelayPathObject *rp, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(!rp->no_gso);
}

static PyGetSetDef RelayPath_getset[] = {
    {"routes", (getter)RelayPath_get_routes, NULL, "Routes held.", NULL},
    {"gso", (getter)RelayPath_get_gso, NULL, "Segmented sends are tried.", NULL},
    {NULL},
};

static PyMethodDef RelayPath_methods[] = {
    {"learn", (PyCFunction)(void (*)(void))RelayPath_learn, METH_VARARGS | METH_KEYWORDS,
     "Add or replace the route of (in_fd, source, channel)."},
    {"forget", (PyCFunction)RelayPath_forget, METH_NOARGS, "Drop every route."},
    {"drain", (PyCFunction)(void (*)(void))RelayPath_drain, METH_VARARGS | METH_KEYWORDS,
     "Read fd until it runs dry or `limit` reads; relay what routes cover; return the first "
     "read they do not, as [(data, segment, source)], or []."},
    {"stats", (PyCFunction)RelayPath_stats, METH_NOARGS, "Counters since creation."},
    {NULL},
};

static PyTypeObject RelayPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meshd.turn._relaypath.RelayPath",
    .tp_basicsize = sizeof(RelayPathObject),
    .tp_dealloc = (destructor)RelayPath_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Routes Python learnt, and the reads they relay without it.",
    .tp_methods = RelayPath_methods,
    .tp_getset = RelayPath_getset,
    .tp_new = RelayPath_new,
};

static struct PyModuleDef relaypath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meshd.turn._relaypath",
    .m_doc = "The relay's native data path (meshd/turn/_relaypath.c).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__relaypath(void)
{
    if (PyType_Ready(&RelayPathType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relaypath_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayPathType);
    if (PyModule_AddObject(m, "RelayPath", (PyObject *)&RelayPathType) < 0) {
        Py_DECREF(&RelayPathType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
