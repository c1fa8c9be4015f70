"""The VMs config: what it accepts, and one line naming file, key and problem for each mistake."""

import json
import re
import tomllib
from pathlib import Path

import pytest

from avatar_hw import config as config_module
from avatar_hw.config import DEVICES, device_module, load_config, parse_config
from avatar_hw.errors import AvatarError, ConfigError
from avatar_hw.loop import EventLoop

GOOD = """
[vm.0]
console = { endpoints = ["pty:/run/avatar/vm0", "file:/var/log/avatar/vm0.log"] }

[vm.1]
console = { backends = "unix:/run/avatar/vm1.sock", size = [80, 24] }   # the former name
block = [{ image = "/srv/a.img" }, { image = "/srv/b.img", readonly = true, serial = "B" }]
rng = { rate = 1024 }
net = { switch = "/run/avatar/switch", mac = "52:54:00:12:34:56" }
"""


def write(tmp_path, text):
    path = tmp_path / "vms.toml"
    path.write_text(text)
    return path


def test_good_config_gives_devices_in_slot_order(tmp_path):
    config = load_config(write(tmp_path, GOOD), max_vms=8)
    assert list(config.vms) == [0, 1]
    assert [(d.kind, d.key) for d in config.vms[1].devices] == [
        ("console", "vm.1.console"), ("block", "vm.1.block[0]"), ("block", "vm.1.block[1]"),
        ("rng", "vm.1.rng"), ("net", "vm.1.net")]
    assert config.vms[1].devices[2].options == {"image": "/srv/b.img", "readonly": True,
                                                "serial": "B"}
    assert config.vms[1].devices[1].options == {"image": "/srv/a.img", "readonly": False}
    assert config.vms[0].devices[0].options["endpoints"] == ["pty:/run/avatar/vm0",
                                                            "file:/var/log/avatar/vm0.log"]


MISTAKES = [
    ("[vm.0\n", None, "not a TOML file"),
    ("[vms.0]\nconsole = { endpoints = ['stdio'] }\n", "vms", "unknown table"),
    ("", "vm", "no VMs"),
    ("[vm.zero]\nconsole = { endpoints = ['stdio'] }\n", "vm.zero", "their numbers"),
    ("[vm.01]\nconsole = { endpoints = ['stdio'] }\n", "vm.01", "their numbers"),
    ("[vm.\"\u0663\"]\nconsole = { endpoints = ['stdio'] }\n", "vm.\u0663", "their numbers"),
    ("[vm.9]\nconsole = { endpoints = ['stdio'] }\n", "vm.9", "VMs 0..7"),
    ("[vm.0]\n", "vm.0", "no devices"),
    ("vm = 3\n", "vm", "no VMs"),
    ("[vm]\n0 = 'console'\n", "vm.0", "must be a table of devices"),
    ("[vm.0]\nfloppy = {}\n", "vm.0.floppy", "unknown device kind; expected one of console, block"),
    ("[vm.0]\nconsole = 3\n", "vm.0.console", "must be a table"),
    ("[vm.0]\nconsole = { backend = ['stdio'] }\n", "vm.0.console.backend",
     "unknown key for a console; expected one of endpoints"),
    ("[vm.0]\nconsole = {}\n", "vm.0.console.endpoints", "missing"),
    ("[vm.0]\nconsole = { endpoints = [] }\n", "vm.0.console.endpoints", "non-empty list"),
    ("[vm.0]\nconsole = { endpoints = [1] }\n", "vm.0.console.endpoints", "non-empty list"),
    ("[vm.0]\nconsole = { endpoints = ['vm0.log'] }\n", "vm.0.console.endpoints",
     "'vm0.log' is not a URL"),
    ("[vm.0]\nconsole = { endpoints = 'stdio', size = [80] }\n", "vm.0.console.size",
     "[columns, rows]"),
    ("[vm.0]\nconsole = { endpoints = 'stdio', buffer = 0 }\n", "vm.0.console.buffer",
     "must be positive"),
    ("[vm.0]\nconsole = { endpoints = 'stdio', ports = { log = [] } }\n",
     "vm.0.console.ports", "port 'log'"),
    ("[vm.0]\nblock = { readonly = true }\n", "vm.0.block.image", "missing"),
    ("[vm.0]\nblock = { image = '/x.img', readonly = 'no' }\n", "vm.0.block.readonly",
     "must be true or false, not str 'no'"),
    ("[vm.0]\nblock = { image = 5 }\n", "vm.0.block.image", "must be the path"),
    ("[vm.0]\nblock = []\n", "vm.0.block", "an empty list"),
    ("[vm.0]\nblock = { image = '/x.img', size = 100 }\n", "vm.0.block.size",
     "must be a multiple of 512 bytes (at least 512, below 2**63), not 100"),
    ("[vm.0]\nblock = { image = '/x.img', size = 1000 }\n", "vm.0.block.size",
     "must be a multiple of 512 bytes (at least 512, below 2**63), not 1000"),
    ("[vm.0]\nblock = { image = '/x.img', size = '64M' }\n", "vm.0.block.size",
     "must be an integer number of bytes"),
    ("[vm.0]\nblock = [{ image = '/a' }, { image = '/b', ro = true }]\n", "vm.0.block[1].ro",
     "unknown key for a block"),
    ("[vm.0]\nblock = { image = '/a', serial = 'x' }\n[vm.0.console]\nendpoints = 'stdio'\n"
     "[vm.0.console.size]\n", "vm.0.console.size", "must be [columns, rows]"),
    ("[vm.0]\nrng = { rate = -1 }\n", "vm.0.rng.rate", "must be positive"),
    ("[vm.0]\nrng = { rate = true }\n", "vm.0.rng.rate", "must be bytes per second"),
    ("[vm.0]\nnet = { tap = 'tap0', switch = '/s' }\n", "vm.0.net", "exactly one of tap or switch"),
    ("[vm.0]\nnet = { mac = '52:54:00:12:34:56' }\n", "vm.0.net", "exactly one of tap or switch"),
    ("[vm.0]\nnet = { tap = 'tap0', mac = '52:54:00:12:34' }\n", "vm.0.net.mac",
     "not a MAC address"),
    # a NUL in any string: the OS would cut a path there or refuse it much later
    ('[vm.0]\nblock = { image = "/a\\u0000b" }\n', "vm.0.block.image", "NUL character"),
    ('[vm.0]\nconsole = { endpoints = ["stdio", "unix:/a\\u0000b"] }\n',
     "vm.0.console.endpoints", "NUL character"),
    ('[vm.0]\nconsole = { endpoints = "stdio", ports = { "a\\u0000" = "stdio" } }\n',
     "vm.0.console.ports", "NUL character"),
    ('[vm.0]\nnet = { switch = "/s\\u0000" }\n', "vm.0.net.switch", "NUL character"),
    ("[vm.0]\nconsole = { endpoints = 'stdio', ports = { a = 1 } }\n", "vm.0.console.ports",
     "port 'a': must be a URL or a non-empty list"),
    ("[vm.0]\nblock = { image = '' }\n", "vm.0.block.image", "not empty"),
    ("[vm.0]\nvsock = { cid = 3, socket = '' }\n", "vm.0.vsock.socket", "not empty"),
    # bounds on what the daemon holds per device, and checks made before any device is built
    ("[vm.0]\nconsole = { endpoints = 'stdio', buffer = 0x1000000000 }\n", "vm.0.console.buffer",
     "must be at most 67108864 (64 MiB), not 68719476736"),
    ("[vm.0]\nconsole = { endpoints = 'stdio', log = 67108865 }\n", "vm.0.console.log",
     "must be at most 67108864 (64 MiB), not 67108865"),
    ("[vm.0]\nvsock = { cid = 3, socket = 's', max_connections = 1000000 }\n",
     "vm.0.vsock.max_connections", "must be at most 1024, not 1000000"),
    ("[vm.0]\nvsock = { cid = 3, socket = 's', max_connections = 0 }\n",
     "vm.0.vsock.max_connections", "must be positive, not 0"),
    ("[vm.0]\nblock = { image = '/x.img', queues = 17 }\n", "vm.0.block.queues",
     "queues = 17: give 1 to 16 request queues"),
    ("[vm.0]\nblock = { image = '/x.img', queues = 0 }\n", "vm.0.block.queues",
     "queues = 0: give 1 to 16 request queues"),
]


@pytest.mark.parametrize("text, key, problem", MISTAKES)
def test_each_mistake_is_one_line_naming_file_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, max_vms=8)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: " if key else f"{path}: ")
    assert problem in message
    assert err.value.key == key


@pytest.mark.parametrize("entry", ["block = { image = 'x.img', queues = 99 }",
                                   "console = { endpoints = 'stdio', log = 0x100000000 }",
                                   "vsock = { cid = 3, socket = 's', max_connections = 99999 }"])
def test_layout_refuses_what_the_device_would_refuse(tmp_path, capsys, entry):
    """``layout --config`` builds no device: a value only the constructor checked (block
    queues) passed there and failed only at serve."""
    from avatar_hw import cli
    path = write(tmp_path, f"[vm.0]\n{entry}\n")
    assert cli.main(["layout", "--board", "rpi4", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"avatar-hw: {path}: vm.0.") and err.count("\n") == 1, err


def test_the_former_key_backends_still_works_with_one_warning(tmp_path, caplog):
    path = write(tmp_path, "[vm.0]\nconsole = { backends = ['stdio'] }\n")
    config = load_config(path)
    assert config.vms[0].devices[0].options["endpoints"] == ["stdio"]
    warnings = [r.getMessage() for r in caplog.records if "backends" in r.getMessage()]
    assert warnings == [f"{path}: vm.0.console.backends is now called endpoints; please rename it"]
    with pytest.raises(ConfigError) as err:         # mistakes name the key as written
        load_config(write(tmp_path, "[vm.0]\nconsole = { backends = [] }\n"))
    assert str(err.value).startswith(f"{path}: vm.0.console.backends: must be a URL")
    with pytest.raises(ConfigError, match="vm.0.console.backends: give endpoints only"):
        load_config(write(tmp_path, "[vm.0]\nconsole = { backends = 'stdio', "
                                    "endpoints = 'stdio' }\n"))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such VMs config file"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)                       # a directory


def test_backend_errors_at_build_name_the_config_key(tmp_path):
    config = load_config(write(tmp_path, "[vm.0]\nconsole = { endpoints = ['serial:/x'] }\n"))
    with pytest.raises(ConfigError) as err:
        config.build_device(config.vms[0].devices[0])
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'vms.toml'}: vm.0.console: serial:/x: ")
    assert "unknown console endpoint 'serial'" in message and "\n" not in message


@pytest.mark.parametrize("endpoint, problem", [
    ("tcp:99999", "tcp: port 99999 is not 0-65535"),
    ("tcp:127.0.0.1:-1", "tcp: port -1 is not 0-65535"),
    ("rfc2217:70000", "rfc2217: port 70000 is not 0-65535"),
    ("unix:/tmp/" + "s" * 120, "AF_UNIX path too long"),    # Python's OSError: no errno
])
def test_endpoint_errors_at_build_are_one_line_with_the_reason(tmp_path, endpoint, problem):
    config = load_config(write(tmp_path, f"[vm.0]\nconsole = {{ endpoints = ['{endpoint}'] }}\n"))
    with pytest.raises(ConfigError) as err:
        config.build_device(config.vms[0].devices[0])
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'vms.toml'}: vm.0.console: {endpoint}: ")
    assert problem in message and "None" not in message and "\n" not in message


def test_an_os_error_at_build_names_the_path_and_the_reason_only(tmp_path):
    """An OSError out of a device's construction reads "PATH: reason", not Python's
    "[Errno 2] No such file or directory: 'PATH'"."""
    text = f"[vm.0]\nblock = {{ image = '{tmp_path}/none/vm0.img', size = 4096 }}\n"
    config = load_config(write(tmp_path, text))
    with pytest.raises(ConfigError) as err:
        config.build_device(config.vms[0].devices[0])
    assert str(err.value) == (f"{tmp_path / 'vms.toml'}: vm.0.block: {tmp_path}/none/vm0.img: "
                              "No such file or directory")


@pytest.mark.parametrize("text, key, problem", [
    ("[vm.0]\nnet = [{ switch = 'sw', mac = '52:54:00:00:00:01' }, "
     "{ switch = 'sw', mac = '52:54:00:00:00:01' }]\n", "vm.0.net[1].mac",
     "MAC 52:54:00:00:00:01 on switch sw is also vm.0.net[0]'s; give each its own mac"),
    ("[vm.0]\nvsock = { cid = 3, socket = 'vs' }\n[vm.1]\nvsock = { cid = 4, socket = 'vs' }\n",
     "vm.1.vsock.socket", "path vs is also vm.0.vsock's; give each its own socket"),
    ("[vm.0]\nvsock = { cid = 3, socket = 'run/vs' }\n[vm.1]\nvsock = { cid = 3, socket = "
     "'run/./vs_5' }\n", "vm.1.vsock.socket", "path run/vs_5 is also vm.0.vsock's "
     "(run/vs_PORT is where its guest connects to host port PORT); choose another"),
    ("[vm.0]\nvsock = { cid = 3, socket = 'vs' }\n[vm.1]\nconsole = { endpoints = "
     "['unix:vs_1024'] }\n", "vm.1.console.endpoints", "path vs_1024 is also vm.0.vsock's"),
    ("[vm.0]\nconsole = { endpoints = 'pty:vm0', ports = { log = ['file:x', 'pty:vm0'] } }\n",
     "vm.0.console.ports", "path vm0 is given twice; give each its own ports"),
    ("[vm.0]\nconsole = { endpoints = 'unix:c' }\n[vm.1]\nconsole = { endpoints = 'unix:c' }\n",
     "vm.1.console.endpoints", "path c is also vm.0.console's; give each its own endpoints"),
    ("[vm.0]\n9p = { tag = 'share', path = '.' }\nfs = { tag = 'share', shared_dir = '.' }\n",
     "vm.0.fs.tag", "mount tag 'share' is also vm.0.9p's; give each its own tag"),
    ("[vm.0]\nvsock = [{ cid = 3, socket = 'a' }, { cid = 4, socket = 'b' }]\n", "vm.0.vsock[1]",
     "a VM has at most one vsock device (a guest has one CID)"),
    ("[vm.0]\nballoon = [{}, {}]\n", "vm.0.balloon[1]", "a VM has at most one balloon device"),
])
def test_two_devices_claiming_one_thing_name_both_keys(tmp_path, text, key, problem):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value).startswith(f"{tmp_path / 'vms.toml'}: {key}: {problem}")


def test_things_claimed_per_vm_may_repeat_in_another_vm(tmp_path):
    text = "".join(f"[vm.{vm}]\n9p = {{ tag = 'share', path = '.' }}\n" for vm in (0, 1))
    assert len(load_config(write(tmp_path, text)).vms) == 2


def test_paths_near_a_vsock_socket_but_not_its_guests_are_allowed(tmp_path):
    """Only ``SOCKET_<digits>`` is where a vsock's guest connects: ``vs_5`` is another vsock's
    to use beside ``vs`` (its own guest goes to ``vs_5_PORT``), ``vs_x`` a console's."""
    text = ("[vm.0]\nvsock = { cid = 3, socket = 'vs_5' }\n"
            "[vm.1]\nvsock = { cid = 3, socket = 'vs_' }\nconsole = { endpoints = 'unix:vs_x' }\n")
    assert len(load_config(write(tmp_path, text)).vms) == 2


@pytest.mark.parametrize("queues, problem", [
    (99, "queues = 99: give 1 to 16 request queues"),
    (None, "size = 9223372036854775296: cannot make IMAGE that large (File too large)"),
])
def test_an_image_size_creates_could_not_use_is_removed(tmp_path, queues, problem):
    """An image created for ``size`` is not left behind by a device that failed: the next
    start, with the config fixed, creates it anew. (The schema refuses queues = 99 when the
    config is read: set here behind it, the device's own check refuses it.)"""
    image = tmp_path / "vm0.img"
    size = 4096 if queues else (1 << 63) - 512
    text = f"[vm.0]\nblock = {{ image = '{image}', size = {size} }}\n"
    config = load_config(write(tmp_path, text))
    if queues:
        config.vms[0].devices[0].options["queues"] = queues
    with pytest.raises(ConfigError) as err:
        config.build_device(config.vms[0].devices[0])
    assert str(err.value) == (f"{tmp_path / 'vms.toml'}: vm.0.block: "
                              + problem.replace("IMAGE", str(image)))
    assert not image.exists()


@pytest.mark.parametrize("kind, table", [
    ("console", "{ endpoints = 'unix:PATH' }"), ("net", "{ switch = 'PATH' }"),
    ("vsock", "{ cid = 3, socket = 'PATH' }")])
def test_a_socket_path_holding_a_file_or_a_directory_is_refused_and_kept(tmp_path, kind,
                                                                          table):
    """A socket path the user gave that holds a file or a directory: one line, and the file
    is still there (a unix: endpoint unlinked whatever was at its path; the switch, vsock
    and control sockets whatever refused a connection, a regular file included)."""
    for victim, make in (("file", lambda p: p.write_text("keep")), ("dir", Path.mkdir)):
        path = tmp_path / victim
        make(path)
        config = load_config(write(tmp_path, f"[vm.0]\n{kind} = "
                                             f"{table.replace('PATH', str(path))}\n"))
        with pytest.raises(ConfigError, match=f"{path}.* is not a socket; choose another path"):
            config.build_device(config.vms[0].devices[0])
        assert path.exists() and (path.is_dir() or path.read_text() == "keep")


def test_a_tcp_endpoint_on_port_0_is_listed_with_the_port_it_got(tmp_path):
    config = load_config(write(tmp_path, "[vm.0]\nconsole = { endpoints = ['tcp:0'] }\n"))
    device = config.build_device(config.vms[0].devices[0])
    try:
        [endpoint] = device.ports[0].backend.endpoints
        port = endpoint.listener.getsockname()[1]
        assert port != 0 and endpoint.url == f"tcp:127.0.0.1:{port}"
    finally:
        device.detach()


def test_console_is_built_with_its_endpoints(tmp_path):
    log = tmp_path / "vm0.log"
    config = load_config(write(tmp_path, f"[vm.0]\nconsole = {{ endpoints = ['file:{log}'], "
                                         "size = [100, 30] }\n"))
    device = config.build_device(config.vms[0].devices[0])
    try:
        assert device.name == "console"
        assert [ep.url for ep in device.ports[0].backend.endpoints] == [f"file:{log}"]
        assert log.exists()
    finally:
        device.detach()


def test_a_kind_whose_device_is_not_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(config_module.DEVICES, "gpu", "avatar_hw.devices.no_such_gpu")
    with pytest.raises(ConfigError, match=r"vm.0.gpu: gpu devices are not available"):
        load_config(write(tmp_path, "[vm.0]\ngpu = {}\n"))


def test_more_devices_than_a_vm_has_slots_is_one_line(tmp_path):
    text = "[vm.1]\nconsole = { endpoints = 'stdio' }\nrng = [" + "{}, " * 3 + "{}]\n"
    path = write(tmp_path, text)
    load_config(path, max_vms=8, devices_per_vm=5)
    with pytest.raises(ConfigError) as err:
        load_config(path, max_vms=8, devices_per_vm=4)
    assert str(err.value) == f"{path}: vm.1: 5 devices, but the board has 4 device slots per VM"


def test_the_toml_examples_of_docs_devices_md_are_valid_configs():
    """Every ```toml block of docs/devices.md passes the config checks (keys, types)."""
    text = (Path(__file__).parent.parent / "docs" / "devices.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        config = parse_config("devices.md", tomllib.loads(block))
        assert config.vms


def test_each_registered_device_documents_exactly_its_schema_keys():
    """A device is one module plus one registry line: the module exports SCHEMA and
    from_config, and docs/devices.md's key table for it lists exactly SCHEMA's keys."""
    import importlib

    from avatar_hw.schema import Schema
    text = (Path(__file__).parent.parent / "docs" / "devices.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    for kind, module_name in config_module.DEVICES.items():
        module = importlib.import_module(module_name)
        assert isinstance(module.SCHEMA, Schema) and callable(module.from_config)
        section = next(s for s in sections if f"`{module_name}`" in s.partition("\n")[0])
        documented = re.findall(r"^\| `(\w+)` \|", section, re.M)
        assert documented and sorted(documented) == sorted(module.SCHEMA.names()), kind


def test_the_how_to_add_a_device_example_is_the_rng_modules_code():
    """docs/devices.md shows rng's SCHEMA and from_config: each line is in the module."""
    text = (Path(__file__).parent.parent / "docs" / "devices.md").read_text()
    section = text.partition("## How to add a device")[2]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    source = (Path(__file__).parent.parent / "avatar_hw" / "devices" / "rng.py").read_text()
    lines = [line for line in example.splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) >= 6 and all(line in source.splitlines() for line in lines)
    assert '"rng": "avatar_hw.devices.rng",' in (
        Path(__file__).parent.parent / "avatar_hw" / "config.py").read_text()


def test_every_path_key_is_put_under_base_and_listed_in_the_docs():
    """Each device field read with ``path=under`` takes the base; config.py's list names them
    all."""
    import avatar_hw.config as config_module
    from avatar_hw.config import DEVICES, device_module
    from avatar_hw.schema import under
    for kind in DEVICES:
        schema = device_module("vms.toml", kind, kind).SCHEMA
        for field in schema.fields:
            if field.path is not under:         # console endpoints: URLs, their own rule
                continue
            assert f"``{kind}.{field.name}``" in config_module.__doc__, f"{kind}.{field.name}"
            assert field.path("rel/x", "/base") == "/base/rel/x"
            assert field.path("/abs/x", "/base") == "/abs/x"


# A valid table per device kind, each field of which the test below replaces in turn.
VALID = {"console": {"endpoints": ["file:vm0.log"]}, "block": {"image": "vm0.img", "size": 4096},
         "net": {"switch": "net0.sock"}, "9p": {"tag": "share", "path": "share", "create": True},
         "vsock": {"cid": 3, "socket": "vm0-vsock"}, "fs": {"tag": "fs", "shared_dir": "fs"},
         "vhost_user": {"socket": "vu.sock", "device_id": 26, "queues": [64]}}
ODD = [0, -1, 2**70, -2**70, 2**32, "", "x", "/", [], {}, [1, 2], ["a"], [[1]], True, 1.5,
       {"a": 1}, "a" * 5000]


def toml_value(value):
    """``value`` written as TOML (strings, ints, floats, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def test_every_field_of_every_device_with_odd_values_is_a_device_or_one_line(tmp_path,
                                                                              monkeypatch):
    """Each key of each device kind's schema given ints out of any range, empty and odd
    strings, lists, tables, booleans and floats in turn: either the device is built (and
    attaches and detaches), or one ``AvatarError`` line names the file and key — never
    another exception, and never a raw "[Errno N]" or "None" for the reason."""
    monkeypatch.chdir(tmp_path)
    loop = EventLoop()
    built = 0
    for kind in DEVICES:
        for field in device_module("vms.toml", kind, kind).SCHEMA.fields:
            for value in ODD:
                table = {**VALID.get(kind, {}), field.name: value}
                path = write(tmp_path, f'[vm.0]\n"{kind}" = {toml_value(table)}\n')
                case = f"{kind}.{field.name} = {value!r:.40}"
                try:
                    config = load_config(path)
                    if kind == "fs":            # builds start virtiofsd: the schema only
                        continue
                    device = config.build_device(config.vms[0].devices[0])
                except AvatarError as err:
                    message = str(err)
                    assert message.startswith(f"{path}: vm.0.{kind}"), (case, message)
                    assert "\n" not in message and "Errno" not in message, (case, message)
                    assert not message.endswith("None"), (case, message)
                    continue
                device.attach(loop)
                device.detach()
                built += 1
    loop.close()
    assert built > 20                               # the valid values did build devices
