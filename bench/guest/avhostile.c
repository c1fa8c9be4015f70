/*
 * avhostile.c - a hostile guest program for the emulated board's two-guest
 * tests and bench (tests/test_emulated_two_guests.py, bench/two_guests.py):
 * everything a guest root can do to its own virtio-mmio window, bounded in time.
 *
 *   avhostile WINDOW SECONDS SPOOF_MAC [SEED]
 *
 * 1. Frames with another VM's MAC (SPOOF_MAC) as source on eth0, through a raw
 *    AF_PACKET socket, while the guest's virtio_net driver still runs.
 * 2. For SECONDS: on random device slots of the 64 KiB window at WINDOW
 *    (mapped from /dev/mem; the guest kernel needs iomem=relaxed, since
 *    Debian's has CONFIG_IO_STRICT_DEVMEM and its drivers hold the regions):
 *    resets the device under its driver, negotiates random features, places
 *    queues of random sizes in its own pages, fills descriptor tables (also
 *    indirect ones), avail rings and used rings with random values, floods
 *    QueueNotify, and writes and reads random registers of every size.
 * 3. Resets every device of the window and exits, printing what it did.
 *
 * Only its own RAM is ever given to a device as writable: buffers the device
 * may write are in this program's locked pages (guest-physical addresses from
 * /proc/self/pagemap) or outside RAM. Readable buffers may be anywhere. The
 * guest's kernel stays intact, so the test can reload the virtio drivers and
 * check the devices work again. Every MMIO access is one ldr/str of its size
 * (inline assembly): a pair or writeback form would not be decodable by the
 * stub (ISV = 0).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WINDOW_SIZE 0x10000u
#define SLOT_SIZE 0x1000u
#define SLOTS (WINDOW_SIZE / SLOT_SIZE)
#define PAGE 4096u
#define PAGES 64u
#define RAM_END 0x60000000ull        /* guest RAM: 0x40000000 + 510 MiB, rounded up */
#define SPOOF_SECONDS 1.0

/* virtio-mmio registers (virtio 1.2, 4.2.2) */
#define MAGIC 0x000
#define DEVICE_FEATURES 0x010
#define DEVICE_FEATURES_SEL 0x014
#define DRIVER_FEATURES 0x020
#define DRIVER_FEATURES_SEL 0x024
#define QUEUE_SEL 0x030
#define QUEUE_NUM_MAX 0x034
#define QUEUE_NUM 0x038
#define QUEUE_READY 0x044
#define QUEUE_NOTIFY 0x050
#define INTERRUPT_ACK 0x064
#define STATUS 0x070
#define QUEUE_DESC_LOW 0x080
#define QUEUE_DESC_HIGH 0x084
#define QUEUE_DRIVER_LOW 0x090
#define QUEUE_DRIVER_HIGH 0x094
#define QUEUE_DEVICE_LOW 0x0a0
#define QUEUE_DEVICE_HIGH 0x0a4
#define CONFIG 0x100

#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u

static volatile uint8_t *window;
static uint8_t *pages;
static uint64_t page_phys[PAGES];
static uint64_t counts[4];           /* register writes, reads, notifies, rounds */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    printf("avhostile error %s: %s\n", what, strerror(errno));
    exit(1);
}

/* -- MMIO: one access of the given size, as Linux's readl/writel ---------------------------- */

static void mmio_write(uint32_t offset, unsigned size, uint64_t v)
{
    volatile void *p = window + offset;
    switch (size) {
    case 1: __asm__ volatile("strb %w0, [%1]" :: "r"((uint32_t)v), "r"(p) : "memory"); break;
    case 2: __asm__ volatile("strh %w0, [%1]" :: "r"((uint32_t)v), "r"(p) : "memory"); break;
    case 4: __asm__ volatile("str %w0, [%1]" :: "r"((uint32_t)v), "r"(p) : "memory"); break;
    default: __asm__ volatile("str %0, [%1]" :: "r"(v), "r"(p) : "memory"); break;
    }
    counts[0]++;
}

static uint64_t mmio_read(uint32_t offset, unsigned size)
{
    volatile void *p = window + offset;
    uint64_t v;
    uint32_t w;
    switch (size) {
    case 1: __asm__ volatile("ldrb %w0, [%1]" : "=r"(w) : "r"(p) : "memory"); v = w; break;
    case 2: __asm__ volatile("ldrh %w0, [%1]" : "=r"(w) : "r"(p) : "memory"); v = w; break;
    case 4: __asm__ volatile("ldr %w0, [%1]" : "=r"(w) : "r"(p) : "memory"); v = w; break;
    default: __asm__ volatile("ldr %0, [%1]" : "=r"(v) : "r"(p) : "memory"); break;
    }
    counts[1]++;
    return v;
}

static void reg(uint32_t slot, uint32_t offset, uint32_t v)
{
    mmio_write(slot * SLOT_SIZE + offset, 4, v);
}

/* -- addresses a device may see ------------------------------------------------------------- */

/* Physical address of byte ``offset`` in own page ``n``. */
static uint64_t own(unsigned n, uint32_t offset)
{
    return page_phys[n % PAGES] + offset % PAGE;
}

/* An address for a buffer the device may write: own pages, or no RAM at all. */
static uint64_t writable_addr(uint32_t *len)
{
    switch (rnd() % 5) {
    case 0: return rnd();                                   /* almost surely no RAM */
    case 1: *len = (uint32_t)rnd(); return RAM_END + (rnd() & 0xffffff);
    case 2: return 0x40000000ull - (rnd() & 0xfff);         /* just below RAM */
    default: {
        uint32_t off = (uint32_t)rnd() % PAGE;
        if (*len > PAGE - off)
            *len = (uint32_t)rnd() % (PAGE - off + 1);
        return own((unsigned)rnd(), off);
    }
    }
}

/* An address the device may only read: anywhere. */
static uint64_t readable_addr(void)
{
    switch (rnd() % 4) {
    case 0: return 0x40000000ull + (rnd() % (RAM_END - 0x40000000ull));
    case 1: return rnd();
    default: return own((unsigned)rnd(), (uint32_t)rnd());
    }
}

static uint32_t random_len(void)
{
    switch (rnd() % 6) {
    case 0: return 0;
    case 1: return (uint32_t)rnd();
    case 2: return 0xffffffffu;
    default: return (uint32_t)rnd() % 8192;
    }
}

static void random_descriptor(uint8_t *d, uint32_t qsize)
{
    uint32_t len = random_len();
    uint16_t flags = (uint16_t)(rnd() & 7);
    uint64_t addr;
    if (flags & F_INDIRECT)
        addr = own((unsigned)rnd(), (uint32_t)rnd() & ~15u);   /* a table of random entries */
    else if (flags & F_WRITE)
        addr = writable_addr(&len);
    else
        addr = readable_addr();
    uint16_t next = (uint16_t)(rnd() % 4 ? rnd() % (qsize ? qsize : 1) : rnd());
    memcpy(d, &addr, 8);
    memcpy(d + 8, &len, 4);
    memcpy(d + 12, &flags, 2);
    memcpy(d + 14, &next, 2);
}

/* Random descriptors everywhere in own pages (indirect tables included), random rings. */
static void scribble_pages(uint32_t qsize)
{
    for (unsigned n = 0; n < 8; n++) {
        uint8_t *page = pages + (rnd() % PAGES) * PAGE;
        unsigned kind = (unsigned)rnd() % 3;
        for (uint32_t off = 0; off < PAGE; off += 16) {
            if (kind == 0)
                random_descriptor(page + off, qsize);
            else if (kind == 1) {                    /* avail-ring-like: small heads */
                for (unsigned i = 0; i < 16; i += 2) {
                    uint16_t v = (uint16_t)(rnd() % 3 ? rnd() % (qsize + 2) : rnd());
                    memcpy(page + off + i, &v, 2);
                }
            } else {
                uint64_t a = rnd(), b = rnd();
                memcpy(page + off, &a, 8);
                memcpy(page + off + 8, &b, 8);
            }
        }
    }
}

/* -- one round on one device ---------------------------------------------------------------- */

static void notify_flood(uint32_t slot, unsigned count)
{
    for (unsigned i = 0; i < count; i++) {
        uint32_t q = rnd() % 8 ? (uint32_t)rnd() % 3 : (uint32_t)rnd();
        reg(slot, QUEUE_NOTIFY, q);
        counts[2]++;
    }
}

static void take_over(uint32_t slot)
{
    reg(slot, STATUS, 0);
    reg(slot, STATUS, 1);
    reg(slot, STATUS, 3);
    for (uint32_t sel = 0; sel < 3; sel++) {
        reg(slot, DEVICE_FEATURES_SEL, sel);
        uint32_t offered = (uint32_t)mmio_read(slot * SLOT_SIZE + DEVICE_FEATURES, 4);
        reg(slot, DRIVER_FEATURES_SEL, sel);
        reg(slot, DRIVER_FEATURES, rnd() % 3 ? offered & (uint32_t)rnd() : (uint32_t)rnd());
    }
    reg(slot, STATUS, rnd() % 4 ? 11 : (uint32_t)rnd() & 0xff);
    unsigned queues = 1 + (unsigned)(rnd() % 4);
    for (uint32_t q = 0; q < queues; q++) {
        reg(slot, QUEUE_SEL, rnd() % 8 ? q : (uint32_t)rnd());
        uint32_t max = (uint32_t)mmio_read(slot * SLOT_SIZE + QUEUE_NUM_MAX, 4);
        uint32_t num;
        switch (rnd() % 5) {
        case 0: num = (uint32_t)rnd(); break;
        case 1: num = max; break;
        default: num = 1u << (rnd() % 9); break;
        }
        reg(slot, QUEUE_NUM, num);
        /* The areas the device writes (descriptors of a packed ring, the used ring)
         * start a page: with at most 256 entries (every device's QueueNumMax) they
         * stay in it. */
        uint64_t areas[3] = { own((unsigned)rnd(), 0), own((unsigned)rnd(), (uint32_t)rnd() & 0xffe),
                              own((unsigned)rnd(), 0) };
        if (num > 256 || rnd() % 8 == 0)
            areas[0] = areas[2] = rnd() % 2 ? rnd() | (1ull << 40) : RAM_END;
        for (unsigned i = 0; i < 3; i++) {
            reg(slot, QUEUE_DESC_LOW + 0x10 * i, (uint32_t)areas[i]);
            reg(slot, QUEUE_DESC_HIGH + 0x10 * i, (uint32_t)(areas[i] >> 32));
        }
        reg(slot, QUEUE_READY, rnd() % 8 ? 1 : (uint32_t)rnd());
    }
    reg(slot, STATUS, rnd() % 4 ? 15 : (uint32_t)rnd() & 0xff);
}

/* A register write or read of any size anywhere in the slot, except that queue
 * addresses only ever name the start of an own page, or no RAM. */
static void random_register(uint32_t slot)
{
    uint32_t offset = (uint32_t)rnd() % SLOT_SIZE;
    unsigned size = 1u << (rnd() % 4);
    offset &= ~(size - 1);
    if (rnd() % 3 == 0) {
        (void)mmio_read(slot * SLOT_SIZE + offset, size);
        return;
    }
    uint64_t value = rnd();
    if (offset >= QUEUE_DESC_LOW && offset < QUEUE_DEVICE_HIGH + 4) {
        uint64_t addr = rnd() % 3 ? own((unsigned)rnd(), 0) : RAM_END + (rnd() & 0xfffff000);
        value = offset & 4 ? addr >> 32 : addr;
        size = 4;
        offset &= ~3u;
    }
    mmio_write(slot * SLOT_SIZE + offset, size, value);
}

static void round_on(uint32_t slot)
{
    if (rnd() % 2)
        take_over(slot);
    for (unsigned i = 0; i < 20; i++) {
        scribble_pages(1u << (rnd() % 9));
        notify_flood(slot, 50);
        if (rnd() % 4 == 0)
            random_register(slot);
        if (rnd() % 4 == 0)
            reg(slot, INTERRUPT_ACK, (uint32_t)rnd());
    }
    for (unsigned i = 0; i < 64; i++)
        random_register(slot);
    counts[3]++;
}

/* -- frames with another VM's MAC ----------------------------------------------------------- */

static long spoof(const char *mac_text)
{
    unsigned char mac[6];
    if (sscanf(mac_text, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3],
               &mac[4], &mac[5]) != 6) {
        printf("avhostile error: %s is not a MAC address\n", mac_text);
        exit(2);
    }
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0)
        die("AF_PACKET socket");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strcpy(ifr.ifr_name, "eth0");
    if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0)
        die("eth0");
    struct sockaddr_ll to;
    memset(&to, 0, sizeof(to));
    to.sll_family = AF_PACKET;
    to.sll_ifindex = ifr.ifr_ifindex;
    to.sll_halen = 6;
    unsigned char frame[1514];
    long sent = 0;
    double end = now() + SPOOF_SECONDS;
    while (now() < end) {
        size_t len = 60 + rnd() % (sizeof(frame) - 59);
        for (size_t i = 0; i < len; i++)
            frame[i] = (unsigned char)rnd();
        memset(frame, 0xff, 6);                 /* broadcast, or to the victim itself */
        if (rnd() % 2)
            memcpy(frame, mac, 6);
        memcpy(frame + 6, mac, 6);
        frame[12] = 0x08;
        frame[13] = rnd() % 2 ? 0x00 : 0x06;    /* IPv4 or ARP */
        memcpy(to.sll_addr, frame, 6);
        if (sendto(fd, frame, len, MSG_DONTWAIT, (struct sockaddr *)&to, sizeof(to)) == (ssize_t)len)
            sent++;
        else if (errno != ENOBUFS && errno != EAGAIN)
            die("sendto");
    }
    close(fd);
    return sent;
}

/* -- main ----------------------------------------------------------------------------------- */

static void own_pages(void)
{
    pages = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
    if (pages == MAP_FAILED)
        die("mmap pages");
    memset(pages, 0, PAGES * PAGE);
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        die("/proc/self/pagemap");
    for (unsigned n = 0; n < PAGES; n++) {
        uint64_t entry;
        off_t at = (off_t)((uintptr_t)(pages + n * PAGE) / PAGE * 8);
        if (pread(fd, &entry, 8, at) != 8)
            die("pagemap read");
        if (!(entry >> 63) || !(entry & ((1ull << 55) - 1))) {
            printf("avhostile error: no physical address for page %u (not root?)\n", n);
            exit(1);
        }
        page_phys[n] = (entry & ((1ull << 55) - 1)) * PAGE;
    }
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: avhostile WINDOW SECONDS SPOOF_MAC [SEED]\n");
        return 2;
    }
    uint64_t base = strtoull(argv[1], NULL, 0);
    double seconds = atof(argv[2]);
    rng_state = argc > 4 ? strtoull(argv[4], NULL, 0) | 1 : 0x9E3779B97F4A7C15ull;
    setvbuf(stdout, NULL, _IOLBF, 0);

    long frames = spoof(argv[3]);
    printf("avhostile spoofed frames=%ld\n", frames);

    own_pages();
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0)
        die("/dev/mem");
    window = mmap(NULL, WINDOW_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)base);
    if (window == MAP_FAILED)
        die("mmap the window (boot with iomem=relaxed)");
    uint32_t magic = (uint32_t)mmio_read(MAGIC, 4);
    printf("avhostile window 0x%llx magic 0x%x\n", (unsigned long long)base, magic);

    double end = now() + seconds;
    while (now() < end)
        round_on((uint32_t)(rnd() % SLOTS));
    for (uint32_t slot = 0; slot < SLOTS; slot++)
        reg(slot, STATUS, 0);                    /* devices let go of these pages */
    printf("avhostile done writes=%llu reads=%llu notifies=%llu rounds=%llu\n",
           (unsigned long long)counts[0], (unsigned long long)counts[1],
           (unsigned long long)counts[2], (unsigned long long)counts[3]);
    return 0;
}
