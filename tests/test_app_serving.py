"""`workbench app` listens on the loopback address only, unless --host names another."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_browser import serving
from workbench.store.layout import write_manifest


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as the kernel writes them) of TCP sockets listening on port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table")
@pytest.mark.parametrize("extra,address", [((), "0100007F"), (("--host", "0.0.0.0"), "00000000")])  # 127.0.0.1; every interface
def test_the_app_binds_the_loopback_address_unless_host_says_otherwise(extra, address, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    write_manifest(store, {"format": 1, "model": {"name": "tiny-relu"}, "hooks": {}, "capture": {}})
    with serving(store, [], tmp_path / "log", extra) as url:
        assert listening_addresses(int(url.rsplit(":", 1)[1])) == {address}
