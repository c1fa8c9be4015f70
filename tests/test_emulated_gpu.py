"""virtio-gpu used by a real arm64 Linux guest on the emulated board (marker ``emulated``):
the ``virtio_gpu`` DRM driver binds, ``/dev/dri/card0`` and ``/dev/fb0`` appear, the
framebuffer console draws, and a pattern written to ``/dev/fb0`` is, pixel for pixel, what
``avatar-hw screenshot`` gives through the control socket."""

import base64
import time

import pytest

from avatar_hw import control
from avatar_hw.emulated.session import EmulatedBoard
from test_emulated_devices import run
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)
from test_gpu import decode_png, rgb_of

WIDTH, HEIGHT = 640, 480
TEXT = "avatar-hw gpu"


@pytest.fixture(scope="module")
def board():
    board = EmulatedBoard(devices=f"gpu = {{ width = {WIDTH}, height = {HEIGHT} }}\n").start()
    try:
        board.guest = board.shell(timeout=120)
        yield board
    finally:
        board.stop()


def screenshot(board):
    shot = control.request("screenshot", board.daemon.control.path, vm=0)
    return decode_png(base64.b64decode(shot["png"]))


def wait_screen(board, check, timeout=30):
    """The first screenshot for which ``check(rgb)`` holds (the guest's fbdev flushes
    damage from a worker, some tens of milliseconds after a write)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            width, height, rgb = screenshot(board)
            if check(rgb):
                return width, height, rgb
        except Exception:
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, "the screen never showed what was expected"
        time.sleep(0.2)


def test_guest_binds_virtio_gpu_and_gets_drm_and_fbdev(board):
    assert "device 0x0010 driver virtio_gpu" in board.guest.banner, board.guest.banner
    assert sorted(run(board, "ls /dev/dri/card0 /dev/fb0").split()) == ["/dev/dri/card0",
                                                                       "/dev/fb0"]
    assert run(board, "cat /sys/class/graphics/fb0/virtual_size").strip() == f"{WIDTH},{HEIGHT}"
    modes = run(board, "cat /sys/class/drm/card0-Virtual-1/modes").split()
    assert modes[0] == f"{WIDTH}x{HEIGHT}"                    # the EDID's preferred mode
    assert run(board, "wc -c < /sys/class/drm/card0-Virtual-1/edid").strip() == "128"


def test_framebuffer_console_draws_text(board):
    # cleared, cursor hidden: black; then the text lands in the first line (8x16 font)
    run(board, "printf '\\033[2J\\033[H\\033[?25l' > /dev/tty1")
    width, height, _ = wait_screen(board, lambda rgb: not any(rgb))
    assert (width, height) == (WIDTH, HEIGHT)
    run(board, f"printf '{TEXT}' > /dev/tty1")
    line = WIDTH * 3 * 16
    wait_screen(board, lambda rgb: any(rgb[:line]) and not any(rgb[line:]))


def test_a_pattern_written_to_fb0_is_the_screenshot_exactly(board):
    # fbcon off (its cursor would blink over the pattern), then every byte of the frame
    run(board, "for v in /sys/class/vtconsole/vtcon*; do grep -q 'frame buffer' $v/name && "
               "echo 0 > $v/bind; done; true")
    assert run(board, "cat /sys/class/graphics/fb0/stride").strip() == str(WIDTH * 4)
    size = WIDTH * HEIGHT * 4
    # whole groups of scanlines per write: Linux 6.1's fbdev damage clip for a write that
    # starts and ends on one scanline (drm_fb_helper_memory_range_to_clip) can end at x 0,
    # and that write's pixels are never flushed (seen with a pipe's odd-sized writes)
    run(board, f"yes avatar-hw-gpu | head -c {size} > /tmp/frame && "
               f"dd if=/tmp/frame of=/dev/fb0 bs={WIDTH * 4 * 8} 2>/dev/null")
    frame = (b"avatar-hw-gpu\n" * (size // 14 + 1))[:size]       # XRGB8888: B, G, R, X
    expected = rgb_of(frame)
    _, _, rgb = wait_screen(board, lambda rgb: rgb == expected)
    assert rgb == expected
    info = next(d for d in board.daemon.subsystem.device_info() if d["name"] == "gpu")
    assert info["transfers"] > 0 and info["guest_errors"] == 0
