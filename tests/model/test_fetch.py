"""ensure_model against a real local Hub: downloads, hand-copied files, splits, extras."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from orion_llamaccp.devtools.random_gguf import write_random_llama
from orion_llamaccp.errors import ModelCorrupt, ModelError, ModelNotFound
from orion_llamaccp.model import (
    ProgressEvent,
    ensure_model,
    plan_files,
    refetch_corrupt,
    verify_gguf,
    verify_model,
)
from orion_llamaccp.model.fetch import plan_targets
from orion_llamaccp.model.hub import HubFile, RemoteFile
from orion_llamaccp.model.store import STATE_DIR, read_record, record_path
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.profiles.registry import load_registry
from orion_llamaccp.settings import Settings
from tests.model.conftest import FILENAME, REPO_ID, make_profile, make_split_gguf
from tests.model.hub_server import LocalHub

SettingsFactory = Callable[..., Settings]
Bytes = Callable[[int], bytes]


def test_clean_download_lands_at_model_root_with_its_sha256(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    sha = hub.add(REPO_ID, FILENAME, data)
    events: list[ProgressEvent] = []

    resolved = ensure_model(make_profile(), make_settings(), progress=events.append)

    target = cache_dir / FILENAME
    assert resolved.files.model == target
    assert target.read_bytes() == data
    assert resolved.sha256 == sha
    assert resolved.size == len(data)
    assert resolved.info.architecture == "llama"
    assert resolved.downloaded == (target,)
    assert [r.range for r in hub.cdn_gets(sha)] == [None]
    assert hub.bytes_sent(sha) == len(data)
    # Nothing but the model and our hidden state folder is left in model_root.
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([FILENAME, STATE_DIR])
    assert not list((cache_dir / STATE_DIR).rglob("*.part"))
    phases = [e.phase for e in events]
    assert phases[0] == "checking" and phases[-1] == "ready"
    assert phases.index("downloading") < phases.index("verifying") < phases.index("ready")
    assert events[-1].bytes_done == events[-1].bytes_total == len(data)


def test_an_endpoint_with_a_trailing_slash_downloads(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """HF_ENDPOINT written with a final "/" (as copied from a browser) made every URL
    "//org/repo/resolve/...", which a Hub or mirror that does not merge slashes answers
    with "not found" (Python's http.server merges them: the raw request line is checked)."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))

    resolved = ensure_model(make_profile(), make_settings(hf_endpoint=hub.endpoint + "/"))

    assert resolved.sha256 == sha
    assert [r.target for r in hub.resolves(FILENAME)] == [f"/{REPO_ID}/resolve/main/{FILENAME}"]


def test_a_file_without_a_sha256_from_the_hub_is_said_to_be_checked_less(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file the Hub keeps in git (not LFS), or a mirror that drops the LFS digest, has
    no sha256 to check the bytes against: the check was skipped without a word."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0), lfs=False)
    with caplog.at_level("WARNING", logger="orion_llamaccp.model.fetch"):
        ensure_model(make_profile(), make_settings())
    assert any("gave no sha256" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    hub.add(REPO_ID, "other.gguf", gguf_bytes(1))  # LFS: checked, nothing to say
    with caplog.at_level("WARNING", logger="orion_llamaccp.model.fetch"):
        ensure_model(make_profile(hf_filename="other.gguf"), make_settings())
    assert not any("gave no sha256" in r.getMessage() for r in caplog.records), caplog.text


def test_a_sha256_etag_in_capitals_is_still_checked() -> None:
    """A mirror may write the LFS digest in capitals: it was taken for no digest."""
    digest = "ab12" * 16
    remote = RemoteFile(HubFile(REPO_ID, FILENAME), "", False, None, digest.upper(), "c0")
    assert remote.sha256 == digest


def test_second_run_uses_the_file_and_its_record_without_network(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    mark = hub.mark()

    again = ensure_model(make_profile(), make_settings())

    assert hub.requests[mark:] == []
    assert again.sha256 == sha
    assert again.downloaded == ()


def test_record_of_a_replaced_file_is_not_trusted(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    target = cache_dir / FILENAME
    target.write_bytes(gguf_bytes(1))  # a human copies another build over it

    resolved = ensure_model(make_profile(), make_settings())

    copied = hashlib.sha256(gguf_bytes(1)).hexdigest()
    record = read_record(cache_dir, target)
    if len(gguf_bytes(1)) == len(gguf_bytes(0)):  # hashed: its own digest, remembered
        assert resolved.sha256 == copied and record is not None and record.changed == copied
    else:  # another size: taken for a copy by hand at once
        assert resolved.sha256 is None and record is None


def test_a_file_of_another_size_copied_over_a_download_loses_its_record_unhashed(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """Another size is another file, copied by hand: served as such, with no sha256 and
    no source. Taken for the download with its time changed, it was hashed (minutes for
    70 GB) and kept the old record, source and all, so that a switch of revision replaced
    the operator's own file."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    target = cache_dir / FILENAME
    write_random_llama(target, n_embd=32, n_layers=1, n_head=2, n_ff=128, vocab=300)
    assert target.stat().st_size != len(gguf_bytes(0))
    events: list[ProgressEvent] = []

    resolved = ensure_model(make_profile(), make_settings(), progress=events.append)

    assert resolved.sha256 is None and resolved.downloaded == ()
    assert read_record(cache_dir, target, any_time=True) is None
    assert not any(e.phase == "verifying" for e in events)


def test_a_corrupt_record_is_ignored_and_the_file_still_served(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """A record cut short (a full disk, a crash mid-write of an older version, a hand
    edit) is not JSON: its parse error reached the caller, and the worker could not start
    with a sound model in place. It counts as no record."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    target = cache_dir / FILENAME
    record_path(cache_dir, target).write_text("{")

    assert read_record(cache_dir, target) is None
    resolved = ensure_model(make_profile(), make_settings())

    assert resolved.files.model == target and resolved.downloaded == ()
    assert target.read_bytes() == gguf_bytes(0)


def test_a_record_with_fields_of_a_later_version_still_counts(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """A record written by a later version, with a field this one does not know, keeps
    the file's source: refused, it passed for a copy by hand (no sha256, kept whatever
    revision the profile names), after a mere downgrade. A record model that forbade
    extra fields passed every test."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    target = cache_dir / FILENAME
    written = json.loads(record_path(cache_dir, target).read_text())
    record_path(cache_dir, target).write_text(json.dumps({**written, "verified_at": 1.5}))

    resolved = ensure_model(make_profile(), make_settings())

    assert resolved.sha256 == sha and resolved.downloaded == ()
    record = read_record(cache_dir, target)
    assert record is not None and record.repo_id == REPO_ID


def test_file_copied_by_hand_is_used_without_any_network(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(1))  # the Hub has another file: must not matter
    target = cache_dir / FILENAME
    target.write_bytes(gguf_bytes(0))

    resolved = ensure_model(make_profile(), make_settings())

    assert hub.requests == []
    assert resolved.files.model == target
    assert target.read_bytes() == gguf_bytes(0)
    assert resolved.downloaded == ()
    assert resolved.sha256 is None  # never hashed on start: a 70 GB file would take minutes


def test_file_in_a_profile_without_hub_source_is_used(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    (cache_dir / "mine").mkdir()
    (cache_dir / "mine" / "model.gguf").write_bytes(gguf_bytes(0))
    profile = make_profile(hf_repo_id=None, hf_filename=None, model_path="mine/model.gguf")

    resolved = ensure_model(profile, make_settings())

    assert resolved.files.model == cache_dir / "mine" / "model.gguf"
    assert hub.requests == []


def test_missing_file_without_hub_source_says_where_to_copy_it(
    make_settings: SettingsFactory, cache_dir: Path
) -> None:
    profile = make_profile(hf_repo_id=None, hf_filename=None, model_path="mine/model.gguf")

    with pytest.raises(ModelNotFound, match="copy a good file there") as err:
        ensure_model(profile, make_settings())

    assert str(cache_dir / "mine" / "model.gguf") in str(err.value)


@pytest.mark.parametrize("by_override", [False, True])
def test_a_missing_model_chosen_by_a_path_says_nothing_is_downloaded(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    by_override: bool,
) -> None:
    """A model path wins over hf_repo_id + hf_filename: the error said to copy a file or
    to name the repo the profile already names, not that nothing would be downloaded."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    if by_override:
        monkeypatch.setenv("LLAMACPP_MODEL_PATH_OVERRIDE", "mine/model.gguf")
        profile, setting = make_profile(), "unset LLAMACPP_MODEL_PATH_OVERRIDE"
    else:
        profile = make_profile(model_path="mine/model.gguf")
        setting = "remove llamacpp.model_path from the profile"

    with pytest.raises(ModelNotFound) as err:
        ensure_model(profile, make_settings(profile_name="test"))

    message = str(err.value)
    assert f"wins over llamacpp.hf_repo_id {REPO_ID}, so nothing is downloaded" in message
    assert f"copy the GGUF to {cache_dir / 'mine' / 'model.gguf'}" in message
    assert f"{setting} to have {FILENAME} downloaded from {REPO_ID}" in message
    assert hub.requests == []


def test_pinned_revision_is_downloaded(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    pinned = hub.add(REPO_ID, FILENAME, gguf_bytes(1), revision="v1")

    resolved = ensure_model(make_profile(hf_revision="v1"), make_settings())

    assert resolved.sha256 == pinned
    assert (cache_dir / FILENAME).read_bytes() == gguf_bytes(1)
    assert all("/resolve/v1/" in r.path for r in hub.resolves(FILENAME))
    record = read_record(cache_dir, cache_dir / FILENAME)
    assert record is not None and record.revision == "v1"


OTHER_REPO = "orion-test/other-llama"


@pytest.mark.parametrize(
    ("before", "after", "new"),
    [
        ({"hf_revision": "v1"}, {"hf_revision": "v2"}, 2),
        ({"hf_revision": "v1"}, {}, 0),
        ({}, {"hf_repo_id": OTHER_REPO}, 3),
    ],
)
def test_a_file_from_another_repo_or_revision_is_replaced(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
    before: dict[str, str],
    after: dict[str, str],
    new: int,
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.add(REPO_ID, FILENAME, gguf_bytes(1), revision="v1")
    hub.add(REPO_ID, FILENAME, gguf_bytes(2), revision="v2")
    hub.add(OTHER_REPO, FILENAME, gguf_bytes(3))
    ensure_model(make_profile(**before), make_settings())

    resolved = ensure_model(make_profile(**after), make_settings())

    assert (cache_dir / FILENAME).read_bytes() == gguf_bytes(new)
    assert resolved.downloaded == (cache_dir / FILENAME,)
    assert resolved.moved_aside == ()  # not corrupt: another source's sound file
    assert list(cache_dir.glob("*.corrupt-*")) == []
    assert "the profile now names" in caplog.text
    assert "downloading it to replace it" in caplog.text


def test_a_file_replaced_for_another_revision_is_recorded_as_the_new_one(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """The record of a replacement must describe the downloaded file, not the one it
    replaced: written with the old file's size and time, it never matched, and the next
    start hashed the new file (minutes for 70 GB) to find it "changed since"."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(1), revision="v1")
    new_sha = hub.add(REPO_ID, FILENAME, gguf_bytes(2), revision="v2")
    ensure_model(make_profile(hf_revision="v1"), make_settings())
    ensure_model(make_profile(hf_revision="v2"), make_settings())

    record = read_record(cache_dir, cache_dir / FILENAME)
    assert record is not None and record.sha256 == new_sha and record.revision == "v2"
    events: list[ProgressEvent] = []
    again = ensure_model(make_profile(hf_revision="v2"), make_settings(), progress=events.append)
    assert again.sha256 == new_sha and again.downloaded == ()
    assert not any(e.phase == "verifying" for e in events)


@pytest.mark.parametrize(
    "after", [{"hf_revision": "v2-typo"}, {"hf_repo_id": "orion-test/tiny-llamaa"}]
)
def test_a_source_that_cannot_be_downloaded_leaves_the_file_in_place(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    cache_dir: Path,
    after: dict[str, str],
) -> None:
    """The file was renamed aside before its new source was even looked up: a typo in
    hf_revision left a service with no model, and undoing it downloaded the model again."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())

    with pytest.raises(ModelError, match="not found"):
        ensure_model(make_profile(**after), make_settings())

    assert (cache_dir / FILENAME).read_bytes() == gguf_bytes(0)
    assert list(cache_dir.glob("*.corrupt-*")) == []
    mark = hub.mark()
    resolved = ensure_model(make_profile(), make_settings())  # the typo undone
    assert [r for r in hub.requests[mark:] if r.path == f"/cdn/{sha}"] == []
    assert resolved.downloaded == () and resolved.sha256 == sha


MMPROJ = "mmproj-model-f16.gguf"


def _registry(path: Path, profiles: dict[str, tuple[str, str]]) -> dict[str, Profile]:
    """A registry whose profiles (name: repo, model file) share model_root and an mmproj
    file name, each taking the mmproj from its own repo."""
    blocks = {
        name: {
            "llamacpp": {
                "model_root": "${LLM_CACHE_DIR}",
                "hf_repo_id": repo,
                "hf_filename": model,
                "mmproj_filename": MMPROJ,
            }
        }
        for name, (repo, model) in profiles.items()
    }
    path.write_text(yaml.safe_dump({"profiles": blocks}))
    return load_registry(path).profiles


def test_two_profiles_naming_one_file_from_two_repos_do_not_replace_each_other_s(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    """Two services sharing model_root, whose profiles take a file of one name from two
    repos, moved each other's file aside and downloaded their own, on every start."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.add(REPO_ID, MMPROJ, gguf_bytes(1))
    hub.add(OTHER_REPO, "other.gguf", gguf_bytes(2))
    theirs = hub.add(OTHER_REPO, MMPROJ, gguf_bytes(3))
    registry = tmp_path / "llm_profiles.yaml"
    profiles = _registry(registry, {"a": (REPO_ID, FILENAME), "b": (OTHER_REPO, "other.gguf")})
    settings = make_settings(profiles_config_path=registry)
    ensure_model(profiles["a"], settings)

    with pytest.raises(ModelError) as err:
        ensure_model(profiles["b"], settings)

    message = str(err.value)
    assert f"{REPO_ID}/{MMPROJ}" in message and f"{OTHER_REPO}/{MMPROJ}" in message
    assert "profile 'a'" in message and "model_root of its own" in message
    assert (cache_dir / MMPROJ).read_bytes() == gguf_bytes(1)  # a's file, left alone
    assert hub.cdn_gets(theirs) == []
    assert list(cache_dir.glob("*.corrupt-*")) == []


def test_a_profile_switched_to_another_repo_still_replaces_its_file(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.add(REPO_ID, MMPROJ, gguf_bytes(1))
    hub.add(OTHER_REPO, FILENAME, gguf_bytes(2))
    hub.add(OTHER_REPO, MMPROJ, gguf_bytes(3))
    registry = tmp_path / "llm_profiles.yaml"
    settings = make_settings(profiles_config_path=registry)
    ensure_model(_registry(registry, {"a": (REPO_ID, FILENAME)})["a"], settings)

    switched = _registry(registry, {"a": (OTHER_REPO, FILENAME)})["a"]
    resolved = ensure_model(switched, settings)

    assert (cache_dir / MMPROJ).read_bytes() == gguf_bytes(3)
    assert (cache_dir / FILENAME).read_bytes() == gguf_bytes(2)
    assert resolved.downloaded == (cache_dir / FILENAME, cache_dir / MMPROJ)


def test_naming_the_default_revision_keeps_the_file(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    mark = hub.mark()

    resolved = ensure_model(make_profile(hf_revision="main"), make_settings())

    assert hub.requests[mark:] == []
    assert resolved.downloaded == resolved.moved_aside == ()


@pytest.mark.parametrize("length", [40, 7])
def test_pinning_the_commit_the_file_came_from_keeps_the_file(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, length: int
) -> None:
    """A profile pinned to the commit it already runs (``hf_revision`` = that commit's
    hash, whole or short) names the same file: it is kept, not moved aside and
    downloaded again (twice the disk, for a 70 GB model)."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    record = read_record(make_settings().cache_path, make_settings().cache_path / FILENAME)
    assert record is not None and record.commit is not None
    mark = hub.mark()

    resolved = ensure_model(make_profile(hf_revision=record.commit[:length]), make_settings())

    assert hub.requests[mark:] == []
    assert resolved.downloaded == resolved.moved_aside == ()


def test_file_missing_on_the_hub_is_a_clear_error(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    hub.add(REPO_ID, "other.gguf", gguf_bytes(0))

    with pytest.raises(ModelNotFound, match="is not in orion-test/tiny-llama") as err:
        ensure_model(make_profile(), make_settings())

    assert FILENAME in str(err.value)


def test_split_gguf_fetches_all_parts_and_serves_part_one(
    hub: LocalHub, make_settings: SettingsFactory, cache_dir: Path, tmp_path: Path
) -> None:
    parts = make_split_gguf(tmp_path, "big", 3)
    shas = [hub.add(REPO_ID, f"split/{p.name}", p.read_bytes()) for p in parts]
    profile = make_profile(hf_filename="split/big-00001-of-00003.gguf")

    resolved = ensure_model(profile, make_settings())

    local = [cache_dir / "split" / p.name for p in parts]
    assert resolved.files.model == local[0]
    assert resolved.files.parts == tuple(local)
    assert [p.read_bytes() for p in local] == [p.read_bytes() for p in parts]
    assert resolved.size == sum(p.stat().st_size for p in parts)
    assert resolved.info.split_count == 3
    assert [resolved.file_sha256[p] for p in local] == shas
    assert all(len(hub.cdn_gets(sha)) == 1 for sha in shas)


def test_a_split_model_s_parts_all_come_from_its_first_part_s_commit(
    hub: LocalHub, make_settings: SettingsFactory, cache_dir: Path, tmp_path: Path
) -> None:
    """A part fetched after the repo's ``main`` moved to a re-upload (a part lost, or a
    download resumed days later) came from the new commit beside parts of the old one:
    each checked against its own sha256, the split's counts alike, the model loaded with
    mixed weights. Later parts now come from the commit the first part came from."""
    old = make_split_gguf(tmp_path / "old", "big", 2)
    for part in old:
        hub.add(REPO_ID, part.name, part.read_bytes())
    profile = make_profile(hf_filename="big-00001-of-00002.gguf")
    ensure_model(profile, make_settings())
    second = cache_dir / old[1].name
    second.unlink()  # lost, with its record
    record_path(cache_dir, second).unlink()
    new = make_split_gguf(tmp_path / "new", "big", 2, seed=2)
    hub.push(REPO_ID, {p.name: p.read_bytes() for p in new})  # main moves on

    resolved = ensure_model(profile, make_settings())

    assert second.read_bytes() == old[1].read_bytes() != new[1].read_bytes()
    assert (cache_dir / old[0].name).read_bytes() == old[0].read_bytes()
    assert resolved.downloaded == (second,)


def test_split_gguf_with_a_part_missing_on_the_hub_fails_clearly(
    hub: LocalHub, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    parts = make_split_gguf(tmp_path, "big", 3)
    for part in parts[:2]:
        hub.add(REPO_ID, part.name, part.read_bytes())

    with pytest.raises(ModelNotFound, match=r"big-00003-of-00003\.gguf"):
        ensure_model(make_profile(hf_filename=parts[0].name), make_settings())


@pytest.mark.parametrize("name", ["m-00001-of-00000.gguf", "m-00005-of-00003.gguf"])
def test_a_split_name_that_cannot_be_is_refused_with_its_reason(
    make_settings: SettingsFactory, name: str
) -> None:
    """A part count of 0 gave no parts, and the worker died of an IndexError, a bug's
    traceback, before it told the fleet (only a model or config error is told); part 5
    of 3 was taken for part 1 of 3 without a word."""
    with pytest.raises(ModelError, match=r"split GGUF of \d parts, which cannot be"):
        ensure_model(make_profile(hf_filename=name), make_settings())


def test_split_parts_from_different_models_are_refused(
    make_settings: SettingsFactory, cache_dir: Path, tmp_path: Path
) -> None:
    one = make_split_gguf(tmp_path / "a", "m", 2)
    other = make_split_gguf(tmp_path / "b", "m", 3)
    (cache_dir / one[0].name).write_bytes(one[0].read_bytes())
    (cache_dir / one[1].name).write_bytes(other[1].read_bytes())  # part 2 of 3, named 2 of 2

    with pytest.raises(ModelCorrupt, match="do not belong together"):
        ensure_model(make_profile(hf_filename=one[0].name), make_settings())


def test_mmproj_from_its_own_repo_and_draft_model_are_fetched(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    mmproj_sha = hub.add("orion-test/vision", "mmproj-f16.gguf", gguf_bytes(1))
    draft_sha = hub.add("orion-test/draft", "draft.gguf", gguf_bytes(2))
    profile = make_profile(
        mmproj_filename="mmproj-f16.gguf",
        mmproj_repo_id="orion-test/vision",
        hf_draft_repo_id="orion-test/draft",
        hf_draft_filename="draft.gguf",
    )

    resolved = ensure_model(profile, make_settings())

    assert resolved.files.mmproj == cache_dir / "mmproj-f16.gguf"
    assert resolved.files.draft == cache_dir / "draft.gguf"
    assert resolved.file_sha256[cache_dir / "mmproj-f16.gguf"] == mmproj_sha
    assert resolved.file_sha256[cache_dir / "draft.gguf"] == draft_sha
    assert len(resolved.downloaded) == 3
    assert hub.resolves("mmproj-f16.gguf")[0].path.startswith("/orion-test/vision/")


def test_mmproj_defaults_to_the_main_repo(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.add(REPO_ID, "mmproj.gguf", gguf_bytes(1))

    resolved = ensure_model(make_profile(mmproj_filename="mmproj.gguf"), make_settings())

    assert resolved.files.mmproj is not None
    assert resolved.files.mmproj.read_bytes() == gguf_bytes(1)


def test_truncated_gguf_is_refused_before_launch(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    data = gguf_bytes(0)
    (cache_dir / FILENAME).write_bytes(data[: len(data) - 1000])
    profile = make_profile(hf_repo_id=None)  # nothing to re-download from

    with pytest.raises(ModelCorrupt, match="truncated") as err:
        ensure_model(profile, make_settings())

    assert str(cache_dir / FILENAME) in str(err.value)
    assert (cache_dir / FILENAME).exists()  # left in place: nothing to replace it with
    assert hub.requests == []


def test_verify_model_never_downloads(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))

    with pytest.raises(ModelNotFound, match="orion-llamaccp fetch"):
        verify_model(make_profile(), make_settings())

    assert hub.requests == []


def test_verify_model_deep_compares_with_the_recorded_sha256(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    assert verify_model(make_profile(), make_settings(), deep=True).sha256 == sha
    target = cache_dir / FILENAME
    stat = target.stat()
    _flip_tensor_byte(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot keeps the mtime

    with pytest.raises(ModelCorrupt, match="does not match"):
        verify_model(make_profile(), make_settings(), deep=True)


def _flip_tensor_byte(path: Path) -> None:
    """Damage tensor data only: the header still parses, only a hash can tell."""
    info = verify_gguf(path)
    with path.open("r+b") as handle:
        handle.seek(info.data_end - 10)
        byte = handle.read(1)
        handle.seek(info.data_end - 10)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_plan_targets_takes_each_file_from_the_right_repo_and_revision(
    make_settings: SettingsFactory,
) -> None:
    profile = make_profile(
        hf_revision="v1",
        mmproj_filename="mmproj.gguf",
        mmproj_repo_id="orion-test/vision",
        hf_draft_filename="draft.gguf",
    )
    files = plan_files(profile, None, make_settings().environ())

    model, mmproj, draft = plan_targets(profile, files)

    assert model.hub == HubFile(REPO_ID, FILENAME, "v1")
    assert mmproj.hub == HubFile("orion-test/vision", "mmproj.gguf", None)
    assert draft.hub == HubFile(REPO_ID, "draft.gguf", "v1")


def test_a_model_chosen_by_model_path_is_never_downloaded(make_settings: SettingsFactory) -> None:
    profile = make_profile(model_path="elsewhere/model.gguf")
    files = plan_files(profile, None, make_settings().environ())

    [model] = plan_targets(profile, files)

    assert model.hub is None


def _retimed(path: Path) -> None:
    """The model folder copied or restored without its times (``cp -r``, a backup)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 86_400 * 10**9))


def test_a_downloaded_file_that_only_changed_its_time_keeps_its_source(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """Its record used to be dropped with the mtime: the file passed for one copied by
    hand, kept whatever revision the profile named next, and without its sha256. It is
    hashed once: the same bytes keep their record (the next start hashes nothing), and
    a switch of revision replaces the file."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(1), revision="v1")
    hub.add(REPO_ID, FILENAME, gguf_bytes(2), revision="v2")
    ensure_model(make_profile(hf_revision="v1"), make_settings())
    target = cache_dir / FILENAME
    _retimed(target)
    events: list[ProgressEvent] = []

    kept = ensure_model(make_profile(hf_revision="v1"), make_settings(), progress=events.append)
    again: list[ProgressEvent] = []
    ensure_model(make_profile(hf_revision="v1"), make_settings(), progress=again.append)
    switched = ensure_model(make_profile(hf_revision="v2"), make_settings())

    assert kept.sha256 == sha and kept.downloaded == ()
    hashed = [e.bytes_done for e in events if e.phase == "verifying"]
    assert hashed and hashed[-1] == len(gguf_bytes(1))
    assert not any(e.phase == "verifying" for e in again)
    assert switched.downloaded == (target,)
    assert target.read_bytes() == gguf_bytes(2)


# A start (``ensure_model``) in a mount namespace of its own, with one folder bind-mounted
# read-only over itself, as on a read-only volume (as root, a folder chmod'ed read-only is
# still writable: only a read-only mount says no).
_START_IN_A_MOUNT_NAMESPACE = """
import json, sys
from orion_llamaccp.model import ensure_model
from orion_llamaccp.settings import Settings
from tests.model.conftest import make_profile

root, endpoint = sys.argv[1], sys.argv[2]
settings = Settings(cache_dir=root, hf_endpoint=endpoint, hf_hub_offline=False)
events = []
resolved = ensure_model(make_profile(hf_revision="v1"), settings, progress=events.append)
hashed = [e.bytes_done for e in events if e.phase == "verifying"]
print(json.dumps({"sha256": resolved.sha256, "hashed": hashed}))
"""


def _read_only_mounts_allowed() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    mount = "mount --bind /tmp /tmp && mount -o remount,ro,bind /tmp /tmp"
    done = subprocess.run(["unshare", "--mount", "sh", "-c", mount], capture_output=True)
    return done.returncode == 0


needs_read_only_mounts = pytest.mark.skipif(
    not _read_only_mounts_allowed(), reason="this machine permits no read-only bind mount"
)


def _start_with_read_only(
    read_only: Path, cache_dir: Path, hub: LocalHub
) -> subprocess.CompletedProcess[str]:
    folder = shlex.quote(str(read_only))
    script = (
        f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder} && "
        f'exec "$0" -c "$1" {shlex.quote(str(cache_dir))} {shlex.quote(hub.endpoint)}'
    )
    repo = Path(__file__).parents[2]
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, sys.executable, _START_IN_A_MOUNT_NAMESPACE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )


@needs_read_only_mounts
def test_a_retimed_download_on_a_read_only_root_is_not_hashed_at_every_start(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """Its record cannot be refreshed there, so a hash would be thrown away and done again
    at the next start (minutes for 70 GB, each time): the file is taken as copied by hand
    instead, unhashed, with no sha256. Only a chmod'ed folder was ever tried, which root
    may write: a ``can_record`` that said yes to every folder passed every test."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(1), revision="v1")
    ensure_model(make_profile(hf_revision="v1"), make_settings())
    _retimed(cache_dir / FILENAME)

    done = _start_with_read_only(cache_dir, cache_dir, hub)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sha256": None, "hashed": []}, done.stdout
    assert read_record(cache_dir, cache_dir / FILENAME, any_time=True) is not None  # untouched


@needs_read_only_mounts
def test_a_download_whose_record_cannot_be_written_is_served_and_says_so(
    hub: LocalHub, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """The records' folder read-only (or a disk full after the download): the download
    is installed and served all the same, with its sha256, and a warning says its record
    is missing. Nothing made that write fail, and a ``write_record`` that let its error
    through (a good download thrown away as a failed start) passed every test."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(1), revision="v1")
    records = cache_dir / STATE_DIR / "records"
    records.mkdir(parents=True)

    done = _start_with_read_only(records, cache_dir, hub)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sha256"] == sha, done.stdout
    assert "cannot record sha256 of" in done.stderr and "Read-only file system" in done.stderr
    assert (cache_dir / FILENAME).read_bytes() == gguf_bytes(1)
    assert not any(records.iterdir())


def test_other_bytes_of_the_same_size_under_a_record_are_served_and_remembered_as_changed(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hashed once, at the start after they changed: a start serves them, saying so, and
    the record keeps both digests (dropped, it left `verify --hash` nothing to compare
    with); the next start hashes nothing, and a switch of revision replaces them."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(1), revision="v1")
    hub.add(REPO_ID, FILENAME, gguf_bytes(2), revision="v2")
    ensure_model(make_profile(hf_revision="v1"), make_settings())
    target = cache_dir / FILENAME
    assert len(gguf_bytes(1)) == len(gguf_bytes(3))
    target.write_bytes(gguf_bytes(3))
    _retimed(target)

    served = ensure_model(make_profile(hf_revision="v1"), make_settings())
    again: list[ProgressEvent] = []
    ensure_model(make_profile(hf_revision="v1"), make_settings(), progress=again.append)
    with pytest.raises(ModelCorrupt, match="its bytes changed since"):
        verify_model(make_profile(hf_revision="v1"), make_settings(), deep=True)
    switched = ensure_model(make_profile(hf_revision="v2"), make_settings())

    assert served.downloaded == () and served.sha256 == hashlib.sha256(gguf_bytes(3)).hexdigest()
    assert "its bytes changed since" in caplog.text
    assert not any(e.phase == "verifying" for e in again)
    assert switched.downloaded == (target,) and target.read_bytes() == gguf_bytes(2)


def test_a_deep_check_says_when_the_bytes_of_a_downloaded_file_changed_since(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Damage written through the file system moves its mtime: ``verify --hash``
    printed ok (and dropped the record, though it claims never to touch the files), and
    an offline engine's check after a failed load accepted the same bytes again."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    target = cache_dir / FILENAME
    _flip_tensor_byte(target)
    _retimed(target)

    with pytest.raises(ModelCorrupt, match=f"differs from the {sha} recorded") as err:
        verify_model(make_profile(), make_settings(), deep=True)
    assert f"downloaded from {REPO_ID}" in str(err.value)
    assert read_record(cache_dir, target, any_time=True) is not None  # verify touched nothing
    with pytest.raises(ModelCorrupt, match="its bytes changed since"):
        refetch_corrupt(make_profile(), make_settings(hf_hub_offline=True))

    repaired = refetch_corrupt(make_profile(), make_settings())  # online: downloaded again

    assert repaired.sha256 == sha and target.read_bytes() == gguf_bytes(0)
    [aside] = repaired.moved_aside
    assert aside.read_bytes() != gguf_bytes(0) and len(aside.read_bytes()) == len(gguf_bytes(0))
    assert "its bytes changed since" in caplog.text  # a start would say it too


def test_a_directory_at_the_model_path_is_said_and_left_alone(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    """A container's bind mount of a host file that does not exist makes a directory
    there: it was taken for a missing file (offline: "does not exist") or renamed aside
    as a corrupt one (online), and a mount point could not be renamed at all."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    (cache_dir / FILENAME).mkdir()

    for settings in (make_settings(), make_settings(hf_hub_offline=True)):
        with pytest.raises(
            ModelError, match="is a folder, not a GGUF file: remove it, or point the profile"
        ):
            ensure_model(make_profile(), settings)

    assert (cache_dir / FILENAME).is_dir() and list(cache_dir.glob("*.corrupt-*")) == []
    assert hub.cdn_gets(sha) == []


@pytest.mark.parametrize("deep", [False, True])
def test_verify_of_a_file_that_only_changed_its_time_leaves_its_record_as_it_was(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path, deep: bool
) -> None:
    """`verify` says it never touches the files nor their records: a retimed file's
    record was rewritten to the new time by it (a check that changed what the next
    start trusts without hashing), as a start does."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    ensure_model(make_profile(), make_settings())
    target = cache_dir / FILENAME
    record = record_path(cache_dir, target)
    before = record.read_bytes()
    _retimed(target)
    mark = hub.mark()

    assert verify_model(make_profile(), make_settings(), deep=deep).sha256 == sha

    assert record.read_bytes() == before
    assert hub.requests[mark:] == []
