"""Problems that one generic OSError text used to answer, each with its own message and fix.

A busy demo port, a host that is not this machine's, make-shapes into a non-empty folder (an
OSError subclass that the CLI reported as "a file: ...; check the path, its permissions and the
free disk space"), and an image size without a UNet layout (which suggested a --resize option
that does not exist).
"""
import socket

import pytest

from diffusekit.config import ConfigError
from diffusekit.data.shapes import write_shapes_folder
from diffusekit.demo import check_address
from diffusekit.nn.layout import derive_unet_config


def test_a_busy_port_is_named_with_a_free_one_to_try():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"port {port} on 127.0.0.1 is in use .*--port {port + 1}"):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", port)     # closed: free again (a closed server does not count as busy)


def test_a_host_that_is_not_this_machine_is_named():
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): a valid address that no machine here owns; no DNS involved
    with pytest.raises(ConfigError, match=r"host '192.0.2.1' is not an address of this machine; serve on 127.0.0.1"):
        check_address("192.0.2.1", 7860)


@pytest.mark.parametrize("failure", [socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                                     UnicodeError("label too long")])
def test_a_host_that_does_not_resolve_is_named(monkeypatch, failure):
    """The name lookup fails (no DNS needed: getaddrinfo is replaced): the message names the host and the two
    addresses that always work, and no socket is opened."""
    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        raise failure
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "socket", lambda *a, **k: pytest.fail("no socket for a host that does not resolve"))
    with pytest.raises(ConfigError, match=r"host 'no-such-host\.invalid' is not an address or name this machine can "
                                          r"resolve \(.+\); serve on 127\.0\.0\.1 .* or 0\.0\.0\.0"):
        check_address("no-such-host.invalid", 7860)
    assert asked == ["no-such-host.invalid"]


def test_a_host_that_resolves_is_served_on_its_address(monkeypatch):
    """A name that resolves (here to 127.0.0.1, by a replaced getaddrinfo) passes on a free port, and the port is
    then probed on the resolved address: busy there, the name and a free port to try are given."""
    real = socket.getaddrinfo
    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        return real("127.0.0.1" if host == "demo.example" else host, port, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        server.listen()
        with pytest.raises(ConfigError, match=rf"port {port} on demo\.example is in use .*--port {port + 1}"):
            check_address("demo.example", port)
    check_address("demo.example", port)        # closed: the name resolves and the port is free
    assert asked == ["demo.example", "demo.example"]


def test_make_shapes_into_a_non_empty_folder_is_a_value_error_naming_the_fix(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty; choose a new folder, or pass overwrite=True \(--overwrite\)") as err:
        write_shapes_folder(tmp_path, n=2)
    assert isinstance(err.value, FileExistsError)          # still what callers caught before
    assert (tmp_path / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_size_without_a_layout_names_options_that_exist():
    with pytest.raises(ConfigError) as err:
        derive_unet_config(30, in_channels=1)
    message = str(err.value)
    assert "--resize" not in message and "--image-size N" in message and "--crop" in message
