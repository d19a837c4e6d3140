/* Socket addresses between Python and C, shared by meshd's native modules
 * (meshd/tunnel/_fastpath.c, meshd/turn/_relaypath.c): one copy of the argument parsing and
 * the comparison, so both read `(host, port)` tuples and compare sources the same way. */
#ifndef MESHD_NATIVE_SOCKADDR_H
#define MESHD_NATIVE_SOCKADDR_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

/* An int argument as uint64_t, with an error naming the argument. */
static inline int
u64_arg(PyObject *obj, const char *name, uint64_t *out)
{
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s must be an int, not %s", name,
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s out of range (0..2**64-1)", name);
        }
        return -1;
    }
    *out = value;
    return 0;
}

/* `(host, port)` or `(host, port, flowinfo, scope_id)` as a sockaddr for a socket of `family`;
 * an IPv4 host on an AF_INET6 socket becomes its mapped address (RFC 4291 §2.5.5.2). `what`
 * names the argument in errors. */
static inline int
sockaddr_arg(PyObject *obj, int family, const char *what, struct sockaddr_storage *out,
             socklen_t *len)
{
    Py_ssize_t size = PyTuple_Check(obj) ? PyTuple_GET_SIZE(obj) : 0;
    if (size != 2 && size != 4) {
        PyErr_Format(PyExc_TypeError, "%s must be (host, port) or "
                     "(host, port, flowinfo, scope_id)", what);
        return -1;
    }
    uint64_t flowinfo = 0, scope_id = 0;
    if (size == 4 && (u64_arg(PyTuple_GET_ITEM(obj, 2), "flowinfo", &flowinfo) < 0
                      || u64_arg(PyTuple_GET_ITEM(obj, 3), "scope_id", &scope_id) < 0))
        return -1;
    if (flowinfo > 0xFFFFF || scope_id > UINT32_MAX) { /* RFC 6437: a 20-bit flow label */
        PyErr_Format(PyExc_ValueError, "%s flowinfo or scope_id out of range", what);
        return -1;
    }
    PyObject *host_obj = PyTuple_GET_ITEM(obj, 0);
    if (!PyUnicode_Check(host_obj)) {
        PyErr_Format(PyExc_TypeError, "%s host must be a str", what);
        return -1;
    }
    const char *host = PyUnicode_AsUTF8(host_obj);
    if (host == NULL)
        return -1;
    uint64_t port;
    if (u64_arg(PyTuple_GET_ITEM(obj, 1), "port", &port) < 0)
        return -1;
    if (port > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "%s port %llu out of range", what,
                     (unsigned long long)port);
        return -1;
    }
    memset(out, 0, sizeof *out);
    struct in_addr v4;
    struct in6_addr v6;
    if (inet_pton(AF_INET, host, &v4) == 1) {
        if (family == AF_INET) {
            struct sockaddr_in *in = (struct sockaddr_in *)out;
            in->sin_family = AF_INET;
            in->sin_port = htons((uint16_t)port);
            in->sin_addr = v4;
            *len = sizeof *in;
            return 0;
        }
        memset(&v6, 0, sizeof v6);
        v6.s6_addr[10] = v6.s6_addr[11] = 0xFF;
        memcpy(&v6.s6_addr[12], &v4, 4);
    }
    else if (inet_pton(AF_INET6, host, &v6) != 1) {
        PyErr_Format(PyExc_ValueError, "%s host %R is not an IP address", what, host_obj);
        return -1;
    }
    else if (family != AF_INET6) {
        PyErr_Format(PyExc_ValueError, "%s %R is IPv6 but the socket is IPv4", what, host_obj);
        return -1;
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)out;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    in6->sin6_flowinfo = htonl((uint32_t)flowinfo);
    in6->sin6_scope_id = (uint32_t)scope_id;
    in6->sin6_addr = v6;
    *len = sizeof *in6;
    return 0;
}

/* Same host and port (flow label and scope aside: the kernel reports what it received). */
static inline bool
same_address(const struct sockaddr_storage *a, socklen_t a_len,
             const struct sockaddr_storage *b, socklen_t b_len)
{
    if (a_len < (socklen_t)sizeof(sa_family_t) || a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET && a_len >= (socklen_t)sizeof(struct sockaddr_in)
        && b_len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6 && a_len >= (socklen_t)sizeof(struct sockaddr_in6)
        && b_len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
        return x->sin6_port == y->sin6_port
               && memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return false;
}

#endif
