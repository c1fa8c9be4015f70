/* avgpu: full-screen frames through the guest's virtio_gpu DRM driver, for bench/board.py.
 *
 *   avgpu frames N [push]
 *
 * Shows a dumb buffer of the connector's preferred mode on the CRTC, then draws N frames:
 * each one written whole into the mapped buffer (a new value each time; not with ``push``,
 * which measures the device's side alone) and pushed with
 * DRM_IOCTL_MODE_DIRTYFB (one clip, the whole screen), which virtio_gpu turns into
 * TRANSFER_TO_HOST_2D and RESOURCE_FLUSH. Those two are not fenced for a dumb buffer, so
 * the clock stops only after a fenced request queued behind them was answered: a 16x16
 * resource made with DRM_IOCTL_VIRTGPU_RESOURCE_CREATE (fenced) and DRM_IOCTL_VIRTGPU_WAIT
 * on it (the control queue is served in order, ours and QEMU's).
 *
 * Prints: gpu-frames frames=N bytes=B ns=T width=W height=H
 */
#define _GNU_SOURCE
#include <drm/drm.h>
#include <drm/drm_mode.h>
#include <drm/virtgpu_drm.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    fprintf(stderr, "avgpu: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void xioctl(int fd, unsigned long request, void *arg, const char *what)
{
    while (ioctl(fd, request, arg) < 0)
        if (errno != EINTR && errno != EAGAIN)
            die(what);
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Returns once every request queued before it was answered by the device. */
static void drain(int fd)
{
    struct drm_virtgpu_resource_create rc = {
        .target = 2, .format = 2, .bind = 2, .width = 16, .height = 16, .depth = 1,
        .array_size = 1, .size = 16 * 16 * 4,
    };
    xioctl(fd, DRM_IOCTL_VIRTGPU_RESOURCE_CREATE, &rc, "VIRTGPU_RESOURCE_CREATE");
    struct drm_virtgpu_3d_wait wait = { .handle = rc.bo_handle };
    xioctl(fd, DRM_IOCTL_VIRTGPU_WAIT, &wait, "VIRTGPU_WAIT");
    struct drm_gem_close close_bo = { .handle = rc.bo_handle };
    xioctl(fd, DRM_IOCTL_GEM_CLOSE, &close_bo, "GEM_CLOSE");
}

int main(int argc, char **argv)
{
    int draw = argc == 3;
    if ((argc != 3 && (argc != 4 || strcmp(argv[3], "push"))) || strcmp(argv[1], "frames")) {
        fprintf(stderr, "usage: avgpu frames N [push]\n");
        return 2;
    }
    int frames = atoi(argv[2]);
    int fd = open("/dev/dri/card0", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("/dev/dri/card0");

    uint32_t conns[8], crtcs[8];
    struct drm_mode_card_res res = {0};
    xioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res, "GETRESOURCES");
    if (!res.count_connectors || !res.count_crtcs || res.count_connectors > 8 ||
        res.count_crtcs > 8) {
        fprintf(stderr, "avgpu: %u connectors, %u crtcs\n", res.count_connectors,
                res.count_crtcs);
        return 1;
    }
    res = (struct drm_mode_card_res){
        .connector_id_ptr = (uintptr_t)conns, .count_connectors = res.count_connectors,
        .crtc_id_ptr = (uintptr_t)crtcs, .count_crtcs = res.count_crtcs,
    };
    xioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res, "GETRESOURCES");

    struct drm_mode_modeinfo modes[64];
    struct drm_mode_get_connector conn = {
        .connector_id = conns[0], .modes_ptr = (uintptr_t)modes, .count_modes = 64,
    };
    xioctl(fd, DRM_IOCTL_MODE_GETCONNECTOR, &conn, "GETCONNECTOR");
    if (!conn.count_modes) {
        fprintf(stderr, "avgpu: connector %u has no mode\n", conns[0]);
        return 1;
    }
    struct drm_mode_modeinfo mode = modes[0];
    for (unsigned i = 0; i < conn.count_modes && i < 64; i++)
        if (modes[i].type & DRM_MODE_TYPE_PREFERRED) {
            mode = modes[i];
            break;
        }

    struct drm_mode_create_dumb dumb = { .width = mode.hdisplay, .height = mode.vdisplay,
                                         .bpp = 32 };
    xioctl(fd, DRM_IOCTL_MODE_CREATE_DUMB, &dumb, "CREATE_DUMB");
    struct drm_mode_fb_cmd fb = { .width = dumb.width, .height = dumb.height,
                                  .pitch = dumb.pitch, .bpp = 32, .depth = 24,
                                  .handle = dumb.handle };
    xioctl(fd, DRM_IOCTL_MODE_ADDFB, &fb, "ADDFB");
    struct drm_mode_map_dumb map = { .handle = dumb.handle };
    xioctl(fd, DRM_IOCTL_MODE_MAP_DUMB, &map, "MAP_DUMB");
    uint8_t *pixels = mmap(NULL, dumb.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                           map.offset);
    if (pixels == MAP_FAILED)
        die("mmap");
    struct drm_mode_crtc crtc = { .crtc_id = crtcs[0], .fb_id = fb.fb_id,
                                  .set_connectors_ptr = (uintptr_t)conns,
                                  .count_connectors = 1, .mode = mode, .mode_valid = 1 };
    xioctl(fd, DRM_IOCTL_MODE_SETCRTC, &crtc, "SETCRTC");
    drain(fd);

    struct drm_clip_rect clip = { 0, 0, dumb.width, dumb.height };
    struct drm_mode_fb_dirty_cmd dirty = { .fb_id = fb.fb_id, .num_clips = 1,
                                           .clips_ptr = (uintptr_t)&clip };
    size_t frame = (size_t)dumb.pitch * dumb.height;
    long long start = now_ns();
    for (int i = 0; i < frames; i++) {
        if (draw)
            memset(pixels, 0x11 * (i % 15 + 1), frame);
        xioctl(fd, DRM_IOCTL_MODE_DIRTYFB, &dirty, "DIRTYFB");
    }
    drain(fd);
    long long ns = now_ns() - start;
    printf("gpu-frames frames=%d bytes=%zu ns=%lld width=%u height=%u\n", frames,
           frame * frames, ns, dumb.width, dumb.height);
    return 0;
}
