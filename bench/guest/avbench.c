/*
 * avbench.c - the guest side of bench/board.py: one static arm64 binary run
 * from the busybox shell on hvc0, printing one "avbench ..." result line.
 *
 *   avbench seqread  DEV BYTES [buffered]  1 MiB O_DIRECT reads from offset 0 (buffered:
 *                                          without O_DIRECT, for file systems refusing it)
 *   avbench seqwrite DEV BYTES [buffered]  1 MiB O_DIRECT writes from offset 0, then fsync
 *   avbench randread DEV COUNT SECONDS  4 KiB O_DIRECT reads at random aligned offsets,
 *                                       queue depth 1; stops after COUNT or SECONDS
 *   avbench rng BYTES SECONDS           reads /dev/hwrng (4 KiB reads)
 *   avbench meta DIR COUNT              COUNT small files in DIR: create (512 bytes written
 *                                       each), then after sync and drop_caches (so each
 *                                       lookup reaches the file system) stat, then unlink
 *   avbench tx BYTES                    console guest->host: raw mode on stdout, prints
 *                                       "AVB-TX-START\n", then BYTES of data, then the result
 *   avbench rx BYTES                    console host->guest: raw mode, no echo on stdin,
 *                                       prints "AVB-RX-GO\n", reads BYTES, then the result
 *   avbench vsock-echo PORT MAXBYTES    AF_VSOCK: listens on PORT, accepts one connection and
 *                                       echoes it until the host's end of stream (keeping at
 *                                       most MAXBYTES), then half-closes and prints the result
 *   avbench vsock-send PORT BYTES       AF_VSOCK: connects to host CID 2 PORT, sends BYTES of
 *                                       pseudo-random data while reading the echo, half-closes
 *                                       after the last byte, reads to the end, prints both sums
 *   avbench net-tx IFACE BYTES          AF_PACKET: BYTES in broadcast frames of 1500-byte
 *                                       payloads (EtherType 0x88b5, local experimental), as fast
 *                                       as the interface takes them; the host counts what arrives
 *
 *   avbench mmio ADDR COUNT [VALUE]     COUNT 32-bit reads (or writes of VALUE) of the register
 *                                       at guest-physical ADDR, mapped from /dev/mem (boot with
 *                                       iomem=relaxed: the virtio-mmio driver holds it); each
 *                                       timed: the trap round trip (bench/board_linux.py)
 *
 * tx, rx and vsock-* report the SHA-256 of the bytes sent or received; the host
 * compares it with its own. Times are CLOCK_MONOTONIC in the guest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <linux/vm_sockets.h>           /* after sys/socket.h: it needs struct sockaddr */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MIB (1u << 20)
#define BLOCK 4096

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    printf("avbench error %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t xorshift(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void *aligned(size_t size)
{
    void *p;
    if (posix_memalign(&p, BLOCK, size))
        die("posix_memalign");
    memset(p, 0x5A, size);
    return p;
}

/* -- SHA-256 (FIPS 180-4) ------------------------------------------------------------------ */

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16
             | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (int i = 0; i < 64; i++) {
        t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

static void sha256_hex(const unsigned char *data, uint64_t len, char out[65])
{
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    unsigned char tail[128] = {0};
    uint64_t full = len & ~63ull, rest = len - full;
    for (uint64_t off = 0; off < full; off += 64)
        sha256_block(h, data + off);
    memcpy(tail, data + full, rest);
    tail[rest] = 0x80;
    int blocks = rest < 56 ? 1 : 2;
    uint64_t bits = len * 8;
    for (int i = 0; i < 8; i++)
        tail[64 * blocks - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (int i = 0; i < blocks; i++)
        sha256_block(h, tail + 64 * i);
    for (int i = 0; i < 8; i++)
        sprintf(out + 8 * i, "%08x", h[i]);
}

/* -- block ------------------------------------------------------------------------------------ */

static int seq(const char *dev, uint64_t bytes, int writing, int buffered)
{
    int fd = open(dev, (writing ? O_WRONLY : O_RDONLY) | (buffered ? 0 : O_DIRECT));
    if (fd < 0)
        die(dev);
    unsigned char *buf = aligned(MIB);
    uint64_t start = now_ns(), done = 0;
    while (done < bytes) {
        ssize_t n = writing ? pwrite(fd, buf, MIB, (off_t)done) : pread(fd, buf, MIB, (off_t)done);
        if (n != (ssize_t)MIB)
            die(writing ? "pwrite" : "pread");
        done += MIB;
    }
    if (writing && fsync(fd) < 0)
        die("fsync");
    uint64_t ns = now_ns() - start;
    printf("avbench %s bytes=%llu ns=%llu\n", writing ? "seqwrite" : "seqread",
           (unsigned long long)done, (unsigned long long)ns);
    return 0;
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int randread(const char *dev, long count, double seconds)
{
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0)
        die(dev);
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < BLOCK)
        die("device size");
    uint64_t blocks = (uint64_t)size / BLOCK, *lat = calloc((size_t)count, sizeof *lat);
    unsigned char *buf = aligned(BLOCK);
    uint64_t start = now_ns(), limit = (uint64_t)(seconds * 1e9);
    long n = 0;
    while (n < count && now_ns() - start < limit) {
        off_t off = (off_t)(xorshift() % blocks) * BLOCK;
        uint64_t t0 = now_ns();
        if (pread(fd, buf, BLOCK, off) != BLOCK)
            die("pread");
        lat[n++] = now_ns() - t0;
    }
    uint64_t ns = now_ns() - start;
    qsort(lat, (size_t)n, sizeof *lat, compare_u64);
    printf("avbench randread ios=%ld ns=%llu p50_ns=%llu p99_ns=%llu\n", n,
           (unsigned long long)ns, (unsigned long long)lat[n / 2],
           (unsigned long long)lat[(long)(n * 0.99)]);
    return 0;
}

/* -- rng -------------------------------------------------------------------------------------- */

static int rng(uint64_t bytes, double seconds)
{
    int fd = open("/dev/hwrng", O_RDONLY);
    if (fd < 0)
        die("/dev/hwrng");
    unsigned char buf[BLOCK];
    uint64_t start = now_ns(), limit = (uint64_t)(seconds * 1e9), done = 0;
    while (done < bytes && now_ns() - start < limit) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0)
            die("read /dev/hwrng");
        done += (uint64_t)n;
    }
    printf("avbench rng bytes=%llu ns=%llu\n", (unsigned long long)done,
           (unsigned long long)(now_ns() - start));
    return 0;
}

/* -- console ---------------------------------------------------------------------------------- */

/* -- file system metadata --------------------------------------------------------------------- */

static int meta(const char *dir, long count)
{
    char path[4096], data[512];
    struct stat st;
    memset(data, 'm', sizeof data);
    uint64_t t0 = now_ns();
    for (long i = 0; i < count; i++) {
        snprintf(path, sizeof path, "%s/m%ld", dir, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0)
            die("create");
        if (write(fd, data, sizeof data) != (ssize_t)sizeof data)
            die("write");
        if (close(fd) < 0)
            die("close");
    }
    uint64_t t1 = now_ns();
    sync();
    int drop = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (drop < 0 || write(drop, "3", 1) != 1)
        die("drop_caches");
    close(drop);
    uint64_t t2 = now_ns();
    for (long i = 0; i < count; i++) {
        snprintf(path, sizeof path, "%s/m%ld", dir, i);
        if (stat(path, &st) < 0)
            die("stat");
        if (st.st_size != (off_t)sizeof data) {
            errno = EIO;
            die("stat size");
        }
    }
    uint64_t t3 = now_ns();
    for (long i = 0; i < count; i++) {
        snprintf(path, sizeof path, "%s/m%ld", dir, i);
        if (unlink(path) < 0)
            die("unlink");
    }
    uint64_t t4 = now_ns();
    printf("avbench meta files=%ld create_ns=%llu stat_ns=%llu unlink_ns=%llu\n", count,
           (unsigned long long)(t1 - t0), (unsigned long long)(t3 - t2),
           (unsigned long long)(t4 - t3));
    return 0;
}

static struct termios saved;

static void raw_mode(int fd)
{
    struct termios t;
    if (tcgetattr(fd, &saved) < 0)
        die("tcgetattr");
    t = saved;
    cfmakeraw(&t);
    if (tcsetattr(fd, TCSAFLUSH, &t) < 0)
        die("tcsetattr");
}

static void restore_mode(int fd)
{
    tcdrain(fd);
    tcsetattr(fd, TCSANOW, &saved);
}

static int console_tx(uint64_t bytes)
{
    unsigned char *buf = malloc(bytes);
    if (!buf)
        die("malloc");
    for (uint64_t i = 0; i + 8 <= bytes; i += 8) {
        uint64_t v = xorshift();
        memcpy(buf + i, &v, 8);
    }
    char hex[65];
    sha256_hex(buf, bytes, hex);
    raw_mode(1);
    if (write(1, "AVB-TX-START\n", 13) != 13)
        die("write");
    uint64_t start = now_ns(), done = 0;
    while (done < bytes) {
        ssize_t n = write(1, buf + done, bytes - done > 65536 ? 65536 : bytes - done);
        if (n < 0 && errno != EINTR)
            die("write hvc");
        if (n > 0)
            done += (uint64_t)n;
    }
    restore_mode(1);
    uint64_t ns = now_ns() - start;
    printf("\navbench tx bytes=%llu ns=%llu sha256=%s\n", (unsigned long long)done,
           (unsigned long long)ns, hex);
    return 0;
}

static int console_rx(uint64_t bytes)
{
    unsigned char *buf = malloc(bytes);
    if (!buf)
        die("malloc");
    raw_mode(0);
    if (write(1, "AVB-RX-GO\n", 10) != 10)
        die("write");
    uint64_t start = 0, done = 0;
    while (done < bytes) {
        ssize_t n = read(0, buf + done, bytes - done);
        if (n < 0 && errno != EINTR)
            die("read hvc");
        if (n > 0) {
            if (!done)
                start = now_ns();
            done += (uint64_t)n;
        }
    }
    uint64_t ns = now_ns() - start;
    restore_mode(0);
    char hex[65];
    sha256_hex(buf, bytes, hex);
    printf("avbench rx bytes=%llu ns=%llu sha256=%s\n", (unsigned long long)done,
           (unsigned long long)ns, hex);
    return 0;
}

/* -- vsock ------------------------------------------------------------------------------------ */

/* Send tx (or, with echo, what arrived) while receiving into rx, with poll on a non-blocking
 * socket; half-close after the last byte (with echo: after the peer's end of stream and the
 * last echoed byte); returns the bytes received when the peer's end of stream came. */
static uint64_t vsock_transfer(int fd, const unsigned char *tx, uint64_t tx_len,
                               unsigned char *rx, uint64_t rx_cap, int echo)
{
    uint64_t sent = 0, got = 0;
    int eof = 0, shut = 0;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    while (!(eof && shut)) {
        const unsigned char *out = echo ? rx : tx;
        uint64_t avail = echo ? got : tx_len;
        if (!shut && sent == avail && (!echo || eof)) {
            if (shutdown(fd, SHUT_WR))
                die("shutdown");
            shut = 1;
            continue;
        }
        struct pollfd p = {fd, (short)((eof ? 0 : POLLIN) | (sent < avail ? POLLOUT : 0)), 0};
        if (poll(&p, 1, -1) < 0)
            die("poll");
        if (!eof && p.revents & (POLLIN | POLLHUP | POLLERR)) {
            uint64_t room = rx_cap - got;
            unsigned char extra;            /* full: only the end of stream may come */
            ssize_t n = room ? recv(fd, rx + got, room < MIB ? room : MIB, 0)
                             : recv(fd, &extra, 1, 0);
            if (n < 0 && errno != EAGAIN)
                die("recv");
            if (n > 0 && !room) {
                errno = ENOBUFS;
                die("more data than expected");
            }
            if (n == 0)
                eof = 1;
            else if (n > 0)
                got += (uint64_t)n;
        }
        if (sent < avail && p.revents & POLLOUT) {
            uint64_t left = avail - sent;
            ssize_t n = send(fd, out + sent, left < MIB ? left : MIB, MSG_NOSIGNAL);
            if (n < 0 && errno != EAGAIN)
                die("send");
            if (n > 0)
                sent += (uint64_t)n;
        }
    }
    return got;
}

static int vsock_echo(unsigned port, uint64_t cap)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                               .svm_port = port};
    int lfd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (lfd < 0)
        die("socket(AF_VSOCK)");
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 1))
        die("bind/listen");
    printf("avbench vsock-echo listening port=%u\n", port);
    fflush(stdout);
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    unsigned char *buf = aligned(cap ? cap : 1);
    uint64_t t0 = now_ns();
    uint64_t got = vsock_transfer(fd, NULL, 0, buf, cap, 1);
    uint64_t ns = now_ns() - t0;
    char hex[65];
    sha256_hex(buf, got, hex);
    printf("avbench vsock-echo bytes=%llu ns=%llu sha256=%s\n", (unsigned long long)got,
           (unsigned long long)ns, hex);
    close(fd);
    close(lfd);
    return 0;
}

static int vsock_send(unsigned port, uint64_t bytes)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
                               .svm_port = port};
    unsigned char *tx = aligned(bytes ? bytes : 1), *rx = aligned(bytes ? bytes : 1);
    for (uint64_t i = 0; i + 8 <= bytes; i += 8) {
        uint64_t v = xorshift();
        memcpy(tx + i, &v, 8);
    }
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket(AF_VSOCK)");
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr))
        die("connect");
    uint64_t t0 = now_ns();
    uint64_t got = vsock_transfer(fd, tx, bytes, rx, bytes, 0);
    uint64_t ns = now_ns() - t0;
    char sent_hex[65], got_hex[65];
    sha256_hex(tx, bytes, sent_hex);
    sha256_hex(rx, got, got_hex);
    printf("avbench vsock-send bytes=%llu received=%llu ns=%llu sha256=%s echo_sha256=%s\n",
           (unsigned long long)bytes, (unsigned long long)got, (unsigned long long)ns,
           sent_hex, got_hex);
    close(fd);
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int mmio(uint64_t addr, long count, int write, uint32_t value)
{
    long page = sysconf(_SC_PAGESIZE);
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0 || count <= 0)
        die("/dev/mem");
    char *base = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                      (off_t)(addr & ~(uint64_t)(page - 1)));
    if (base == MAP_FAILED)
        die("mmap the register (boot with iomem=relaxed)");
    volatile uint32_t *reg = (volatile uint32_t *)(base + (addr & (page - 1)));
    uint64_t *ns = malloc(count * sizeof *ns);
    uint32_t seen = 0;
    if (!ns)
        die("malloc");
    uint64_t t0 = now_ns();
    for (long i = 0; i < count; i++) {
        uint64_t t = now_ns();
        if (write)
            *reg = value;       /* one 32-bit store: one trap */
        else
            seen = *reg;        /* one 32-bit load: one trap */
        ns[i] = now_ns() - t;
    }
    uint64_t total = now_ns() - t0;
    qsort(ns, count, sizeof *ns, cmp_u64);
    printf("avbench mmio %s count=%ld ns=%llu p50_ns=%llu p99_ns=%llu max_ns=%llu value=0x%x\n",
           write ? "write" : "read", count, (unsigned long long)total,
           (unsigned long long)ns[count / 2], (unsigned long long)ns[count * 99 / 100],
           (unsigned long long)ns[count - 1], write ? value : seen);
    return 0;
}

/* -- net -------------------------------------------------------------------------------------- */

#define NET_ETHERTYPE 0x88b5
#define NET_PAYLOAD 1500

static int net_tx(const char *ifname, uint64_t bytes)
{
    int fd = socket(AF_PACKET, SOCK_DGRAM, htons(NET_ETHERTYPE));
    if (fd < 0)
        die("socket AF_PACKET");
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_protocol = htons(NET_ETHERTYPE),
                             .sll_ifindex = (int)if_nametoindex(ifname), .sll_halen = 6};
    if (!to.sll_ifindex)
        die(ifname);
    memset(to.sll_addr, 0xff, 6);                   /* broadcast: every backend forwards it */
    unsigned char frame[NET_PAYLOAD];
    for (int i = 0; i < NET_PAYLOAD; i++)
        frame[i] = (unsigned char)xorshift();
    uint64_t start = now_ns(), sent = 0, frames = 0;
    while (sent < bytes) {
        ssize_t n = sendto(fd, frame, sizeof frame, 0, (struct sockaddr *)&to, sizeof to);
        if (n < 0) {
            if (errno == ENOBUFS || errno == EAGAIN)  /* the queue is full: try again */
                continue;
            die("sendto");
        }
        sent += (uint64_t)n;
        frames++;
    }
    printf("avbench net-tx bytes=%llu frames=%llu ns=%llu\n", (unsigned long long)sent,
           (unsigned long long)frames, (unsigned long long)(now_ns() - start));
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    int buffered = argc == 5 && !strcmp(argv[4], "buffered");
    if ((argc == 4 || buffered) && !strcmp(argv[1], "seqread"))
        return seq(argv[2], strtoull(argv[3], NULL, 0), 0, buffered);
    if ((argc == 4 || buffered) && !strcmp(argv[1], "seqwrite"))
        return seq(argv[2], strtoull(argv[3], NULL, 0), 1, buffered);
    if (argc == 5 && !strcmp(argv[1], "randread"))
        return randread(argv[2], strtol(argv[3], NULL, 0), atof(argv[4]));
    if (argc == 4 && !strcmp(argv[1], "rng"))
        return rng(strtoull(argv[2], NULL, 0), atof(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "meta"))
        return meta(argv[2], strtol(argv[3], NULL, 0));
    if (argc == 3 && !strcmp(argv[1], "tx"))
        return console_tx(strtoull(argv[2], NULL, 0));
    if (argc == 3 && !strcmp(argv[1], "rx"))
        return console_rx(strtoull(argv[2], NULL, 0));
    if (argc == 4 && !strcmp(argv[1], "vsock-echo"))
        return vsock_echo((unsigned)strtoul(argv[2], NULL, 0), strtoull(argv[3], NULL, 0));
    if (argc == 4 && !strcmp(argv[1], "vsock-send"))
        return vsock_send((unsigned)strtoul(argv[2], NULL, 0), strtoull(argv[3], NULL, 0));
    if ((argc == 4 || argc == 5) && !strcmp(argv[1], "mmio"))
        return mmio(strtoull(argv[2], NULL, 0), strtol(argv[3], NULL, 0), argc == 5,
                    (uint32_t)strtoul(argc == 5 ? argv[4] : "0", NULL, 0));
    if (argc == 4 && !strcmp(argv[1], "net-tx"))
        return net_tx(argv[2], strtoull(argv[3], NULL, 0));
    fprintf(stderr, "usage: avbench seqread|seqwrite DEV BYTES [buffered] | randread DEV COUNT SECONDS | "
                    "rng BYTES SECONDS | meta DIR COUNT | tx BYTES | rx BYTES | vsock-echo PORT MAXBYTES | "
                    "vsock-send PORT BYTES | mmio ADDR COUNT [VALUE] | net-tx IFACE BYTES\n");
    return 2;
}
