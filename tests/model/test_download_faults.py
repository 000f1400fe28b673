"""Cut connections, stalls, 5xx, wrong bytes and two processes at once: the real
huggingface_hub client against a local server that speaks the Hub's download protocol
(tests/model/hub_server.py; the real Hub is out of reach here)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orion_llamaccp.errors import DownloadError, ModelCorrupt
from orion_llamaccp.model import ProgressEvent, ensure_model, refetch_corrupt, verify_gguf
from orion_llamaccp.model.download import (
    DownloadPolicy,
    Fetched,
    check_room_for_all,
    fetch_file,
)
from orion_llamaccp.model.hub import HubClient, HubFile
from orion_llamaccp.model.partial import PartialFile
from orion_llamaccp.model.progress import Reporter
from orion_llamaccp.model.store import STATE_DIR, partial_path, record_path
from orion_llamaccp.settings import Settings
from tests.model.conftest import FILENAME, REPO_ID, make_profile, make_split_gguf
from tests.model.hub_server import Fault, LocalHub
from tests.support.procs import free_port

SettingsFactory = Callable[..., Settings]
Bytes = Callable[[int], bytes]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _partials(root: Path) -> list[Path]:
    return list((root / STATE_DIR).rglob("*.part"))


def _aside(root: Path) -> list[Path]:
    return sorted(root.glob(f"{FILENAME}.corrupt-*"))


def test_cut_connection_resumes_from_where_it_broke(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hub.fault("cdn", Fault("cut", after=40_000))

    resolved = ensure_model(make_profile(), make_settings())

    first, second = hub.cdn_gets(sha)
    assert first.sent == 40_000
    assert second.range == "bytes=40000-"
    assert second.sent == len(data) - 40_000 < len(data)
    assert hub.bytes_sent(sha) == len(data)  # not one byte fetched twice
    assert resolved.sha256 == sha
    assert (cache_dir / FILENAME).read_bytes() == data


def test_interrupted_download_resumes_in_the_next_run(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hub.fault("cdn", Fault("cut", after=50_000))
    hub.fault("cdn", Fault("cut", after=0), times=1000)  # then the network is gone

    with pytest.raises(DownloadError, match="next try resumes") as err:
        ensure_model(make_profile(), make_settings(download_deadline_sec=0.5))

    assert "gave up downloading" in str(err.value)
    assert not (cache_dir / FILENAME).exists()  # never a half file at the final path
    [partial] = _partials(cache_dir)
    assert partial.stat().st_size == 50_000
    assert all(r.sent == 0 for r in hub.cdn_gets(sha)[1:])
    mark = len(hub.cdn_gets(sha))
    hub.clear_faults()

    resolved = ensure_model(make_profile(), make_settings())  # "the process restarted"

    [resumed] = hub.cdn_gets(sha)[mark:]
    assert resumed.range == "bytes=50000-"
    assert resumed.sent == len(data) - 50_000 < len(data)
    assert resolved.sha256 == sha  # the digest covers the bytes of both runs
    assert _partials(cache_dir) == []


def test_stalled_download_is_aborted_and_resumed(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    stall = hub.fault("cdn", Fault("stall", after=30_000))  # holds the connection open, silent
    events: list[ProgressEvent] = []

    settings = make_settings(download_stall_sec=1.0)
    resolved = ensure_model(make_profile(), settings, progress=events.append)

    assert stall.reached.is_set()
    first, second = hub.cdn_gets(sha)
    assert first.sent == 30_000
    assert second.range == "bytes=30000-"
    assert resolved.sha256 == sha
    assert max(e.attempt for e in events if e.phase == "downloading") == 2


@pytest.mark.parametrize(("at_hub", "at_cdn"), [(500, 503), (429, 429)])
def test_server_errors_are_retried_with_backoff(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, at_hub: int, at_cdn: int
) -> None:
    """A 5xx, or a 429 (too many requests: the Hub's rate limit), says "later", not "no":
    taken for a final refusal, a busy Hub failed the download at once."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.fault("resolve", Fault("status", status=at_hub), times=2)
    hub.fault("cdn", Fault("status", status=at_cdn))

    resolved = ensure_model(make_profile(), make_settings())

    assert [r.status for r in hub.resolves(FILENAME)] == [at_hub, at_hub, 302, 302]
    assert [r.status for r in hub.cdn_gets(sha)] == [at_cdn, 200]
    assert resolved.sha256 == sha


def test_gives_up_with_a_clear_error_when_nothing_moves(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.fault("resolve", Fault("status", status=503), times=1000)

    with pytest.raises(DownloadError) as err:
        ensure_model(make_profile(), make_settings(download_deadline_sec=1.0))

    message = str(err.value)
    assert "gave up downloading orion-test/tiny-llama/" in message
    assert "HTTP 503" in message
    assert "orion-llamaccp fetch" in message
    assert 2 <= len(hub.resolves(FILENAME)) < 1000
    assert not (cache_dir / FILENAME).exists()


def test_a_fresh_download_that_gives_up_blames_neither_range_nor_a_partial_file(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    """Every attempt cut before its first byte: nothing was resumed, so the server was
    never asked for a Range it could ignore, and no byte is on disk to resume from. The
    error said the server "ignores Range requests" (sending the user after the mirror)
    and that an empty partial file "is kept"."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.fault("cdn", Fault("cut", after=0), times=1000)

    with pytest.raises(DownloadError, match="gave up downloading") as err:
        ensure_model(make_profile(), make_settings(download_deadline_sec=0.5))

    assert "Range" not in str(err.value)
    assert "kept" not in str(err.value) and "resumes" not in str(err.value)


def test_a_hub_out_of_reach_says_what_an_offline_host_does(
    make_settings: SettingsFactory, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No connection to the Hub at all (here, a port nothing listens on): the worker
    retried for the whole deadline (10 minutes by default) saying only the network error,
    where a host that never reaches the Hub needs HF_HUB_OFFLINE or HF_ENDPOINT."""
    closed = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(hf_endpoint=closed, download_deadline_sec=1.0)
    with caplog.at_level(logging.WARNING), pytest.raises(DownloadError) as err:
        ensure_model(make_profile(), settings)
    assert "cannot reach the Hub" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and "HF_HUB_OFFLINE=1" in retries[0], retries
    assert not any("HF_HUB_OFFLINE" in said for said in retries[1:]), retries  # said once


def test_a_download_that_cannot_progress_gives_up_within_its_deadline_not_a_wait_after(
    make_settings: SettingsFactory, cache_dir: Path
) -> None:
    """No progress for ``ORION_LLAMACPP_DOWNLOAD_DEADLINE_SEC`` (3 s here) ends the download
    when the next retry's wait would run past it, not after that wait: its backoff then
    doubles past 30 s, and a worker kept waiting for nothing up to half a minute past the
    deadline. (Retries at 0, 0.15, 0.45, 1.05 and 2.25 s here, then a wait of 2.4 s: the
    deadline's next-wait term, whose mutant, gone, gave up at 4.65 s after a sixth attempt,
    passed every test.)"""
    closed = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(hf_endpoint=closed, download_deadline_sec=3.0)
    with pytest.raises(DownloadError, match="cannot reach the Hub") as err:
        ensure_model(make_profile(), settings)
    # Counted, not timed: a sixth attempt is the one after the wait past the deadline.
    assert "after 5 attempts" in str(err.value), err.value


def _fetch_with_a_short_deadline(hub: LocalHub, cache_dir: Path) -> None:
    """``fetch_file`` with a 1 s deadline, its backoff capped well below it as in
    production (30 s against 600 s); a download that never gives up is cancelled after
    30 s (``DownloadError`` too, but not "gave up")."""
    policy = DownloadPolicy(stall_sec=3.0, deadline_sec=1.0, backoff_max_sec=0.05)
    cancel = threading.Event()
    bound = threading.Timer(30, cancel.set)
    bound.start()
    try:
        _fetch(hub, cache_dir, policy, cancel)
    finally:
        bound.cancel()


def test_server_ignoring_range_that_keeps_cutting_off_gives_up(
    hub: LocalHub, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """Each attempt gets the same first bytes again: that is no progress."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hub.ignore_range = True
    cuts = 100  # then the whole file: a download that never gives up would succeed
    hub.fault("cdn", Fault("cut", after=40_000), times=cuts)

    with pytest.raises(DownloadError, match="ignores Range requests") as err:
        _fetch_with_a_short_deadline(hub, cache_dir)

    assert "gave up downloading" in str(err.value)
    gets = hub.cdn_gets(sha)
    assert 2 <= len(gets) < cuts
    assert all(r.range == "bytes=40000-" for r in gets[1:])


@pytest.mark.parametrize("extra", [4096, -4096])
def test_a_file_served_at_another_size_than_announced_gives_up(
    hub: LocalHub, gguf_bytes: Bytes, cache_dir: Path, extra: int
) -> None:
    """A mirror or proxy serves more or fewer bytes than the size the Hub announced:
    each attempt ends short or long, and the next starts over from byte 0 (the partial
    file is longer than the file, or its end is refused as a resume point). The same
    bytes again are no progress: it gives up. It used to count them as progress, and
    retry for ever."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hub.blobs[sha] = data + bytes(extra) if extra > 0 else data[:extra]
    with pytest.raises(DownloadError) as err:
        _fetch_with_a_short_deadline(hub, cache_dir)
    assert "gave up downloading" in str(err.value), err.value
    assert 2 <= len(hub.cdn_gets(sha)) < 100


def test_server_ignoring_range_still_delivers_the_file(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hub.ignore_range = True
    hub.fault("cdn", Fault("cut", after=40_000))

    resolved = ensure_model(make_profile(), make_settings())

    first, second = hub.cdn_gets(sha)
    assert (first.sent, second.range, second.sent) == (40_000, "bytes=40000-", len(data))
    assert resolved.sha256 == sha


def test_corrupt_file_on_disk_is_moved_aside_and_fetched_again(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    bad = data[: len(data) // 2]  # an earlier copy that was cut short
    (cache_dir / FILENAME).write_bytes(bad)

    resolved = ensure_model(make_profile(), make_settings())

    [aside] = _aside(cache_dir)
    assert aside.read_bytes() == bad  # kept for inspection, never deleted
    assert resolved.moved_aside == (aside,)
    assert (cache_dir / FILENAME).read_bytes() == data
    assert resolved.sha256 == sha


def test_wrong_bytes_from_the_hub_are_caught_by_sha256_and_fetched_again(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hub.fault("cdn", Fault("corrupt"))

    resolved = ensure_model(make_profile(), make_settings())

    assert len(hub.cdn_gets(sha)) == 2
    [aside] = _aside(cache_dir)
    assert len(aside.read_bytes()) == len(data) and aside.read_bytes() != data
    assert verify_gguf(aside).size == len(data)  # the header was fine: only the hash knew
    assert (cache_dir / FILENAME).read_bytes() == data
    assert resolved.moved_aside == (aside,)


def test_a_corrupt_file_on_disk_gets_one_download_and_stays_in_place_when_it_fails(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    (cache_dir / FILENAME).write_bytes(data[:1000])
    hub.fault("cdn", Fault("corrupt"))

    with pytest.raises(ModelCorrupt, match="so had the file in place, left there"):
        ensure_model(make_profile(), make_settings())

    assert len(hub.cdn_gets(sha)) == 1
    assert [len(p.read_bytes()) for p in _aside(cache_dir)] == [len(data)]
    assert (cache_dir / FILENAME).read_bytes() == data[:1000]


def test_cancel_stops_the_download_and_keeps_the_partial_file(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hold = hub.fault("cdn", Fault("hold", after=30_000))
    cancel = threading.Event()
    errors: list[Exception] = []

    def fetch() -> None:
        try:
            ensure_model(make_profile(), make_settings(), cancel=cancel)
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=fetch)
    worker.start()
    assert hold.reached.wait(20)
    cancel.set()
    hold.release.set()
    worker.join(20)

    [error] = errors
    assert isinstance(error, DownloadError) and "cancelled" in str(error)
    assert not (cache_dir / FILENAME).exists()
    [partial] = _partials(cache_dir)
    kept = partial.stat().st_size
    assert 0 < kept < len(data)  # what had arrived when the cancel was seen

    ensure_model(make_profile(), make_settings())  # the next run picks it up

    assert [r.range for r in hub.cdn_gets(sha)] == [None, f"bytes={kept}-"]


def _left_partial(root: Path, sha: str, data: bytes) -> Path:
    """The ``.part`` file a download cut off in an earlier run left (the Hub's ETag for an
    LFS file is its sha256)."""
    path = partial_path(root, root / FILENAME, sha)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def _is_hashing(event: ProgressEvent) -> bool:
    return event.phase == "verifying" and "hashing" in event.message


def test_a_resume_hashes_its_partial_before_it_opens_the_request(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """Hashing a 60 GB partial takes minutes: done with the GET open, the server may close
    the idle connection meanwhile, and the attempt is lost."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    _left_partial(cache_dir, sha, data[:50_000])
    gets_while_hashing: list[int] = []

    def hook(event: ProgressEvent) -> None:
        if _is_hashing(event):
            gets_while_hashing.append(len(hub.cdn_gets(sha)))

    resolved = ensure_model(make_profile(), make_settings(), progress=hook)

    assert gets_while_hashing and set(gets_while_hashing) == {0}
    [get] = hub.cdn_gets(sha)
    assert (get.range, get.sent) == ("bytes=50000-", len(data) - 50_000)
    assert resolved.sha256 == sha


def test_a_cancel_during_a_stalled_read_says_cancelled_not_check_the_network(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    """A SIGTERM while the file's server said nothing: the read's timeout ended the
    attempt, the cancel ended the retries, and the error was the stall's ("gave up ...
    check the network"), in the log of a worker that was only being stopped."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    stall = hub.fault("cdn", Fault("stall", after=30_000))
    cancel = threading.Event()

    def hook(event: ProgressEvent) -> None:
        if event.phase == "downloading" and event.bytes_done >= 30_000 and not cancel.is_set():
            # every byte before the stall taken: the next read waits, for a second
            threading.Timer(0.3, cancel.set).start()

    try:
        with pytest.raises(DownloadError) as err:
            settings = make_settings(download_stall_sec=1.0)
            ensure_model(make_profile(), settings, progress=hook, cancel=cancel)
    finally:
        stall.release.set()

    error = err.value
    assert isinstance(error, DownloadError)
    assert "cancelled" in str(error) and "network" not in str(error)


def test_a_cancel_while_hashing_a_partial_stops_before_any_request(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    partial = _left_partial(cache_dir, sha, data[:50_000])
    cancel = threading.Event()

    def hook(event: ProgressEvent) -> None:
        if _is_hashing(event):
            cancel.set()  # a SIGTERM during a hash of minutes

    with pytest.raises(DownloadError, match="cancelled"):
        ensure_model(make_profile(), make_settings(), progress=hook, cancel=cancel)

    assert hub.cdn_gets(sha) == []
    assert partial.read_bytes() == data[:50_000]


def test_a_long_hash_of_a_partial_does_not_use_up_the_deadline(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """The deadline bounds a network that does not move: a hash longer than it, then one
    failed GET, gave up at once instead of trying again."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    _left_partial(cache_dir, sha, data[:50_000])
    hub.fault("cdn", Fault("cut", after=0))

    def hook(event: ProgressEvent) -> None:
        if _is_hashing(event):
            time.sleep(1.5)  # a hash of minutes, at test scale: longer than the deadline

    settings = make_settings(download_deadline_sec=1.0)
    resolved = ensure_model(make_profile(), settings, progress=hook)

    assert [r.range for r in hub.cdn_gets(sha)] == ["bytes=50000-"] * 2
    assert resolved.sha256 == sha


def test_short_of_disk_space_names_the_copies_that_take_room_beside_the_model(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """Each corrupt file is kept whole for inspection, and the file a download replaces
    stays until then: when the disk is short, those are what to delete, and the error
    must say so."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hub.advertised_size[sha] = 10**18  # more than any disk holds: the check must refuse
    earlier = cache_dir / f"{FILENAME}.corrupt-20261201T000000"
    earlier.write_bytes(data[:30_000])
    (cache_dir / FILENAME).write_bytes(data[:60_000])  # a copy cut short: replaced

    with pytest.raises(DownloadError, match="not enough disk space") as err:
        ensure_model(make_profile(), make_settings())

    assert _aside(cache_dir) == [earlier]
    assert f"{earlier} (0.0 MB)" in str(err.value)
    assert "can be deleted" in str(err.value)
    assert f"{cache_dir / FILENAME} (0.1 MB), stays until" in str(err.value)
    assert (cache_dir / FILENAME).read_bytes() == data[:60_000]
    assert hub.cdn_gets(sha) == []


def test_parts_that_fit_one_by_one_but_not_together_are_refused_before_any_byte(
    hub: LocalHub, make_settings: SettingsFactory, cache_dir: Path, tmp_path: Path
) -> None:
    """Each part's download checked the room for itself alone: a disk with room for two
    parts of three filled up hours into the download. The files not on disk yet are
    sized together first, and none of them is fetched."""
    parts = make_split_gguf(tmp_path, "big", 3)
    shas = [hub.add(REPO_ID, p.name, p.read_bytes()) for p in parts]
    for sha in shas:  # each alone fits, the three together do not
        hub.advertised_size[sha] = shutil.disk_usage(cache_dir).free // 2

    events: list[ProgressEvent] = []
    with pytest.raises(DownloadError, match="not enough disk space") as err:
        ensure_model(
            make_profile(hf_filename=parts[0].name), make_settings(), progress=events.append
        )

    assert "the 3 files still to download" in str(err.value)
    assert all(p.name in str(err.value) for p in parts)
    assert [hub.cdn_gets(sha) for sha in shas] == [[], [], []]
    # A dashboard following the progress events is told too, file by file.
    assert [(e.phase, e.filename) for e in events] == [("failed", p.name) for p in parts]
    assert all(e.message == str(err.value) for e in events)


def test_a_cancel_before_the_room_check_asks_the_hub_nothing(
    hub: LocalHub, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """The room check sizes every missing file with a HEAD of its own, each up to the
    Hub's whole timeout when it is slow: a SIGTERM set the cancel and waited for all of
    them before the first download heard it."""
    parts = make_split_gguf(tmp_path, "big", 3)
    for part in parts:
        hub.add(REPO_ID, part.name, part.read_bytes())
    cancel = threading.Event()
    cancel.set()

    with pytest.raises(DownloadError, match="cancelled"):
        ensure_model(make_profile(hf_filename=parts[0].name), make_settings(), cancel=cancel)

    assert [hub.resolves(p.name) for p in parts] == [[], [], []]


def test_the_bytes_of_a_partial_download_count_as_room_taken_already(
    hub: LocalHub, cache_dir: Path, tmp_path: Path
) -> None:
    """Two files of 0.6 of the free space each do not fit together, unless most of one is
    on disk already (a download resumed): a sparse partial file, so that its size costs
    no disk here."""
    parts = make_split_gguf(tmp_path, "big", 2)
    shas = [hub.add(REPO_ID, p.name, p.read_bytes()) for p in parts]
    free = shutil.disk_usage(cache_dir).free
    if free < 1 << 30:  # 0.4 of it must hold the download's 64 MiB margin
        pytest.skip(f"{free} bytes free under {cache_dir}: too few to size against")
    size = free * 6 // 10
    for sha in shas:
        hub.advertised_size[sha] = size
    client = HubClient(endpoint=hub.endpoint, token=None, timeout=3.0)
    files = [(HubFile(REPO_ID, p.name), cache_dir / p.name) for p in parts]
    with pytest.raises(DownloadError, match="the 2 files still to download"):
        check_room_for_all(client, files, cache_dir)

    partial = partial_path(cache_dir, cache_dir / parts[0].name, shas[0])
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("wb") as sparse:
        sparse.truncate(size - 1000)

    check_room_for_all(client, files, cache_dir)  # 1000 bytes and one file to come: room


@pytest.mark.parametrize("status", [403, 410])
def test_a_link_refused_once_is_fetched_again_and_every_time_is_given_up_at_once(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path, status: int
) -> None:
    """A CDN's 403 (or 410) is an expired signed link once: the next attempt's fresh link
    gets the file. Every time, it is something in the way of that server (a proxy, a
    firewall), and the attempts went on to the download deadline (10 minutes by default)
    ending in "no progress"; it is given up after three, saying so."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.fault("cdn", Fault("status", status=status))
    assert ensure_model(make_profile(), make_settings()).files.model == cache_dir / FILENAME
    assert len(hub.cdn_gets(sha)) == 2
    (cache_dir / FILENAME).unlink()
    hub.fault("cdn", Fault("status", status=status), times=1000)

    with pytest.raises(DownloadError, match="3 times in a row") as err:
        ensure_model(make_profile(), make_settings(download_deadline_sec=60.0))

    assert "proxy or firewall" in str(err.value)
    assert len(hub.cdn_gets(sha)) == 2 + 3


def test_wrong_bytes_twice_is_an_error_that_keeps_both_downloads(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.fault("cdn", Fault("corrupt"), times=2)

    with pytest.raises(ModelCorrupt, match="failed its check twice") as err:
        ensure_model(make_profile(), make_settings())

    assert "does not match the Hub's" in str(err.value)
    assert len(_aside(cache_dir)) == 2
    assert all(str(p) in str(err.value) for p in _aside(cache_dir))
    assert not (cache_dir / FILENAME).exists()
    assert len(hub.cdn_gets(sha)) == 2


def test_a_broken_file_the_hub_gives_no_sha256_for_is_blamed_on_the_hub(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """A git file (or a mirror that passes no LFS digest on) has no sha256 to compare
    with: two downloads of the same broken bytes were blamed on "something that alters
    the bytes on the way (proxy, disk, mirror)", sending the user to the wrong place."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0)[:-4096], lfs=False)

    with pytest.raises(ModelCorrupt, match="on the Hub is not a usable GGUF") as err:
        ensure_model(make_profile(), make_settings())

    assert "Two downloads gave the same bytes" in str(err.value)
    assert "alters the bytes" not in str(err.value)
    assert len(_aside(cache_dir)) == 2


def test_a_broken_file_on_the_hub_is_not_downloaded_in_a_loop(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data[:-4096])  # published truncated: its sha256 "matches"

    with pytest.raises(ModelCorrupt, match="on the Hub is not a usable GGUF") as err:
        ensure_model(make_profile(), make_settings())

    assert "truncated" in str(err.value)
    assert len(hub.cdn_gets(sha)) == 1
    assert not (cache_dir / FILENAME).exists()


def _downloaded_then_damaged(
    make_settings: SettingsFactory, cache_dir: Path, data: bytes
) -> tuple[Path, bytes]:
    """The model downloaded, then one byte near its end flipped: a header still sound,
    damage only a hash can see, and a new mtime (the download's record no longer
    applies). Returns the file and its damaged bytes."""
    ensure_model(make_profile(), make_settings())
    target = cache_dir / FILENAME
    damaged = bytearray(data)
    damaged[-100] ^= 0xFF
    target.write_bytes(bytes(damaged))
    return target, bytes(damaged)


def test_refetch_corrupt_finds_damage_only_a_hash_can_see(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    target, damaged = _downloaded_then_damaged(make_settings, cache_dir, data)

    assert ensure_model(make_profile(), make_settings()).downloaded == ()  # header is fine
    resolved = refetch_corrupt(make_profile(), make_settings())

    assert resolved.downloaded == (target,)
    assert [p.read_bytes() for p in resolved.moved_aside] == [damaged]
    assert target.read_bytes() == data
    assert resolved.sha256 == sha
    assert len(hub.cdn_gets(sha)) == 2


def test_refetch_corrupt_asks_the_hub_for_a_file_with_no_record(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """Damage only a hash can see in a file whose record is lost (or one copied by hand
    from the repo): the deep check compares with the Hub's sha256, as the module says
    ("the recorded (or the Hub's) sha256"). A check of the record alone passed it."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    target, damaged = _downloaded_then_damaged(make_settings, cache_dir, data)
    record_path(cache_dir, target).unlink()

    resolved = refetch_corrupt(make_profile(), make_settings())

    assert resolved.downloaded == (target,)
    assert [p.read_bytes() for p in resolved.moved_aside] == [damaged]
    assert target.read_bytes() == data and resolved.sha256 == sha


def test_refetch_corrupt_leaves_a_sound_file_alone(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())

    resolved = refetch_corrupt(make_profile(), make_settings())

    assert resolved.downloaded == () and resolved.moved_aside == ()
    assert resolved.sha256 == sha
    assert len(hub.cdn_gets(sha)) == 1


def _worker(spec: dict[str, object]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "tests.model.fetch_worker", json.dumps(spec)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_fetching_one_file_download_it_once(
    hub: LocalHub, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hold = hub.fault("cdn", Fault("hold", after=20_000))
    spec = {
        "settings": {"cache_dir": str(cache_dir), "hf_endpoint": hub.endpoint},
        "llamacpp": {"model_root": "${LLM_CACHE_DIR}", "hf_repo_id": REPO_ID,
                     "hf_filename": FILENAME},
    }  # fmt: skip

    first = _worker(spec)
    assert hold.reached.wait(30), "first process never started downloading"
    second = _worker(spec)
    assert second.stderr is not None
    for line in second.stderr:  # the second process blocks on the first one's lock
        if "waiting for another process" in line:
            break
    else:
        pytest.fail("the second process never waited for the lock")
    assert not (cache_dir / FILENAME).exists()
    hold.release.set()
    out_first, err_first = first.communicate(timeout=60)
    out_second, _ = second.communicate(timeout=60)

    assert first.returncode == 0, err_first
    assert second.returncode == 0
    results = [json.loads(out_first), json.loads(out_second)]
    assert [r["downloaded"] for r in results] == [True, False]
    assert {r["sha256"] for r in results} == {sha}
    assert len(hub.cdn_gets(sha)) == 1
    assert hub.bytes_sent(sha) == len(data)
    assert len(hub.resolves(FILENAME)) == 1  # the second never even asked the Hub
    assert (cache_dir / FILENAME).read_bytes() == data


def test_a_file_changed_on_the_hub_drops_the_old_partial_and_starts_over(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    old_sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.fault("cdn", Fault("cut", after=50_000))
    hub.fault("cdn", Fault("cut", after=0), times=1000)
    with pytest.raises(DownloadError):
        ensure_model(make_profile(), make_settings(download_deadline_sec=0.5))
    [old_partial] = _partials(cache_dir)
    hub.clear_faults()
    new_sha = hub.add(REPO_ID, FILENAME, gguf_bytes(1))  # a new commit on main

    resolved = ensure_model(make_profile(), make_settings())

    assert resolved.sha256 == new_sha != old_sha
    assert [r.range for r in hub.cdn_gets(new_sha)] == [None]
    assert not old_partial.exists() and _partials(cache_dir) == []


def test_a_cdn_refusal_does_not_quote_the_signed_link(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """huggingface_hub's error quotes the URL, and the Hub's CDN links carry their
    signature in the query: it reached the error, the logs and the bus's error channel."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.fault("cdn", Fault("status", status=404))

    with pytest.raises(DownloadError, match="HTTP 404") as err:
        ensure_model(make_profile(), make_settings())

    assert f"/cdn/{sha}?…" in str(err.value)
    assert "Signature" not in str(err.value) and "Signature" not in caplog.text


def test_a_complete_partial_left_by_an_earlier_run_is_installed_without_a_download(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """A crash or cancel after the last byte arrived, before the install: the whole file
    was thrown away (or its end asked for again, refused, and started over) and every
    byte downloaded a second time."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    _left_partial(cache_dir, sha, data)

    resolved = ensure_model(make_profile(), make_settings())

    assert hub.cdn_gets(sha) == []
    assert resolved.sha256 == sha
    assert (cache_dir / FILENAME).read_bytes() == data
    assert _partials(cache_dir) == []


def _fetch(
    hub: LocalHub, cache_dir: Path, policy: DownloadPolicy, cancel: threading.Event | None = None
) -> Fetched:
    """``fetch_file`` of the test file under ``policy``, cancelled by ``cancel``."""
    return fetch_file(
        HubClient(endpoint=hub.endpoint, token=None, timeout=policy.stall_sec),
        HubFile(REPO_ID, FILENAME),
        target=cache_dir / FILENAME,
        root=cache_dir,
        policy=policy,
        reporter=Reporter(None),
        cancel=cancel,
    )


class _SignalledInBackoff(threading.Event):
    """The worker's cancel event, set by a SIGTERM that lands as the downloader begins to
    wait out a retry's backoff on it; ``waits`` are the backoffs it was waited for."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.set()
        return super().wait(timeout)


def test_a_cancel_during_a_retry_backoff_ends_the_wait_and_no_attempt_follows(
    hub: LocalHub, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """The backoff between attempts (up to 30 s) was a plain sleep: a SIGTERM during it
    was seen only when it had run out, so a worker being stopped sat out the whole
    backoff. It waits on the cancel event, and the cancel ends the download there."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    # Then the file: a download that never saw the cancel succeeds.
    hub.fault("cdn", Fault("status", status=503), times=3)
    cancel = _SignalledInBackoff()
    policy = DownloadPolicy(stall_sec=3.0, deadline_sec=60.0, backoff_max_sec=30.0)

    with pytest.raises(DownloadError, match="cancelled") as err:
        _fetch(hub, cache_dir, policy, cancel)

    assert "partial file is kept" in str(err.value)
    assert cancel.waits == [policy.backoff_initial_sec]  # the first backoff, waited on the event
    assert [r.status for r in hub.cdn_gets(sha)] == [503]  # no attempt after the cancel


def test_a_full_disk_while_writing_the_download_is_said_as_such_with_fake_enospc(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk filling up under the download (another process wrote to it after the
    free-space check) raised a bare OSError out of the fetch, not a DownloadError
    saying which download failed and to check free space. No real disk fills up here:
    the partial file's writes fail with ENOSPC."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    appender = PartialFile.appender

    @contextmanager
    def full_disk(self: PartialFile, start: int) -> Iterator[Callable[[bytes], None]]:
        with appender(self, start):

            def write(chunk: bytes) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            yield write

    monkeypatch.setattr(PartialFile, "appender", full_disk)

    with pytest.raises(DownloadError, match="cannot write the download") as err:
        ensure_model(make_profile(), make_settings())

    assert "free space" in str(err.value)
    assert os.strerror(errno.ENOSPC) in str(err.value)
    assert f"{REPO_ID}/{FILENAME}" in str(err.value)
    assert len(hub.cdn_gets(sha)) == 1  # the disk, not the network: not retried


def test_a_download_that_would_leave_less_than_the_margin_free_is_refused(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """A file that fits, but leaves the disk all but full: the download took the last
    bytes of the disk, and everything else writing there (the records, the logs, the
    other downloads) failed with it. It is refused while it would leave less than the
    64 MiB margin free; here it would leave half of it (half: what other writers change
    on this disk while the test runs, under 32 MiB, turns the answer neither way)."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.advertised_size[sha] = shutil.disk_usage(cache_dir).free - 32 * 1024 * 1024

    with pytest.raises(DownloadError, match="not enough disk space") as err:
        ensure_model(make_profile(), make_settings(download_deadline_sec=0.5))

    assert f"{REPO_ID}/{FILENAME}" in str(err.value)
    assert hub.cdn_gets(sha) == []


def test_refusals_apart_are_not_refusals_in_a_row(
    hub: LocalHub, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """Only a link refused three times in a row is given up as something in the way of
    the file's server: refusals with another error between them (an expired link, a 503,
    the next one expired again) are a flaky CDN, which a later attempt gets the file
    from. Counted apart as in a row, the download gave up, blaming a proxy or firewall."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    for status in (403, 503, 403, 503, 403):
        hub.fault("cdn", Fault("status", status=status))
    policy = DownloadPolicy(stall_sec=3.0, deadline_sec=60.0, backoff_max_sec=0.05)

    fetched = _fetch(hub, cache_dir, policy)

    assert [r.status for r in hub.cdn_gets(sha)] == [403, 503, 403, 503, 403, 200]
    assert fetched.sha256 == sha and fetched.attempts == 6


def test_the_bytes_are_asked_for_without_compression(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """httpx asks for gzip by default: a CDN or proxy that compresses its answer makes
    the byte offsets of the body (resume points, Content-Range) those of the compressed
    stream, not of the file, and a resume appends at the wrong place."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    hub.fault("cdn", Fault("cut", after=40_000))

    ensure_model(make_profile(), make_settings())

    gets = hub.cdn_gets(sha)
    assert [r.range for r in gets] == [None, "bytes=40000-"]
    assert [r.headers.get("accept-encoding") for r in gets] == ["identity", "identity"]


def test_a_resume_answered_from_a_later_byte_than_asked_is_tried_again(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """A 206 whose Content-Range starts past the offset asked for (a proxy that mangles
    ranges) leaves a hole in the file: its bytes cannot be appended, and taking them
    crashed the download with a ValueError instead of trying again."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    _left_partial(cache_dir, sha, data[:50_000])
    hub.late_range = 4096

    resolved = ensure_model(make_profile(), make_settings())

    assert [(r.range, r.status) for r in hub.cdn_gets(sha)] == [("bytes=50000-", 206)] * 2
    assert resolved.sha256 == sha
    assert (cache_dir / FILENAME).read_bytes() == data


def test_a_resume_offset_the_server_refuses_starts_the_file_over(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """A 416 says the partial file's bytes are no place to resume from (the file it
    came from is shorter): kept, every attempt asked for the same refused offset again
    until the deadline. They are thrown away and the file fetched from its first byte."""
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    _left_partial(cache_dir, sha, data[:50_000])
    hub.fault("cdn", Fault("status", status=416))

    resolved = ensure_model(make_profile(), make_settings())

    assert [(r.range, r.status) for r in hub.cdn_gets(sha)] == [
        ("bytes=50000-", 416),
        (None, 200),
    ]
    assert hub.cdn_gets(sha)[1].sent == len(data)
    assert resolved.sha256 == sha
    assert (cache_dir / FILENAME).read_bytes() == data
