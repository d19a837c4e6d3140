/* UDP segmentation offload for meshd's native modules (meshd/tunnel/_fastpath.c,
 * meshd/turn/_relaypath.c): one copy of the GSO send and of reading the GRO segment size, as
 * meshd/udp.py does them in Python. What a caller does when the kernel refuses stays its own. */
#ifndef MESHD_NATIVE_UDP_H
#define MESHD_NATIVE_UDP_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

enum {
    MESHD_SOL_UDP = 17,
    MESHD_UDP_SEGMENT = 103, /* linux/udp.h: the GSO segment size, a cmsg of sendmsg */
    MESHD_UDP_GRO = 104,     /* linux/udp.h: coalesced reads, the segment size as a cmsg */
};

/* Control buffer room for one int-sized cmsg (UDP_GRO on recvmsg). */
typedef union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} udp_gro_control;

/* One sendmsg of `iov` cut by the kernel into datagrams of `segment` bytes (Linux 4.18+;
 * the last may be shorter), without blocking, EINTR retried. -1 with errno as sendmsg's. */
static inline ssize_t
udp_gso_sendmsg(int fd, const struct sockaddr_storage *to, socklen_t to_len,
                struct iovec *iov, size_t iovlen, uint16_t segment)
{
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {.msg_name = (void *)to, .msg_namelen = to_len, .msg_iov = iov,
                         .msg_iovlen = iovlen, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = MESHD_SOL_UDP;
    cm->cmsg_type = MESHD_UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(cm), &segment, sizeof segment);
    ssize_t n;
    do {
        n = sendmsg(fd, &msg, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n;
}

/* The GRO segment size a recvmsg reported (0: one datagram, or none said). */
static inline int
udp_gro_segment(struct msghdr *msg)
{
    int segment = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm != NULL; cm = CMSG_NXTHDR(msg, cm))
        if (cm->cmsg_level == MESHD_SOL_UDP && cm->cmsg_type == MESHD_UDP_GRO
            && cm->cmsg_len >= CMSG_LEN(sizeof(int)))
            memcpy(&segment, CMSG_DATA(cm), sizeof(int));
    return segment > 0 ? segment : 0;
}

#endif
