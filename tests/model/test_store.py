"""The hidden state beside the models: records, partial downloads, moved-aside files."""

from __future__ import annotations

from pathlib import Path

from orion_llamaccp.model import store


def test_stale_partials_are_only_this_files_other_versions(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    current = store.partial_path(tmp_path, model, "a" * 64)
    older = store.partial_path(tmp_path, model, "b" * 64)
    neighbour = store.partial_path(tmp_path, tmp_path / "m.gguf.v2.gguf", "c" * 64)
    for path in (current, older, neighbour):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    assert store.stale_partials(tmp_path, model, keep=current) == [older]


def test_partial_names_survive_odd_etags(tmp_path: Path) -> None:
    path = store.partial_path(tmp_path, tmp_path / "sub" / "m.gguf", 'W/"abc-12/../x"')

    assert path.parent == tmp_path / store.STATE_DIR / "partial" / "sub"
    assert path.name == "m.gguf.Wabc12x.part"


def test_record_holds_while_the_file_is_unchanged(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"one")
    store.write_record(tmp_path, model, sha256="f" * 64, repo_id="o/r", commit="c" * 40)

    record = store.read_record(tmp_path, model)
    assert record is not None and record.sha256 == "f" * 64 and record.repo_id == "o/r"

    model.write_bytes(b"other")
    assert store.read_record(tmp_path, model) is None


def test_move_aside_never_overwrites_earlier_evidence(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    moved = []
    for content in (b"first", b"second"):
        model.write_bytes(content)
        moved.append(store.move_aside(model))

    assert [p.read_bytes() for p in moved] == [b"first", b"second"]
    assert all(p.name.startswith("m.gguf.corrupt-") for p in moved)
    assert not model.exists()


def test_a_record_written_for_the_partial_holds_once_it_is_renamed(tmp_path: Path) -> None:
    """A download records its file before the rename that installs it (``like``): a stop
    between the two leaves a record without its file, never a file without its record."""
    model = tmp_path / "m.gguf"
    partial = store.partial_path(tmp_path, model, "a" * 64)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"downloaded")
    store.write_record(tmp_path, model, sha256="f" * 64, like=partial)
    assert store.read_record(tmp_path, model) is None  # no file yet: nothing to hold for

    partial.rename(model)
    record = store.read_record(tmp_path, model)
    assert record is not None and record.sha256 == "f" * 64 and record.size == len(b"downloaded")
