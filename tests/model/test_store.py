"""The hidden state beside the models: records, partial downloads, moved-aside files."""

from __future__ import annotations

import subprocess
import sys
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


_REWRITES = """
import sys, time
from pathlib import Path
from orion_llamaccp.model import store

root = Path(sys.argv[1])
until = time.monotonic() + float(sys.argv[2])
print("writing", flush=True)
while time.monotonic() < until:
    store.write_record(root, root / "m.gguf", sha256="f" * 64, repo_id="o/r")
"""


def test_a_record_rewritten_while_another_process_reads_it_is_never_seen_torn(
    tmp_path: Path,
) -> None:
    """A record is written beside itself and renamed over the old one: another worker
    starting on the same model_root (two profiles of one model, a ``verify`` beside a
    worker) reads the old record or the new one, never a half-written one, which counts
    as none (the file taken for a copy by hand: no sha256, no source). Written in place,
    it was seen empty or cut short, and no test read one while it was written."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"downloaded")
    store.write_record(tmp_path, model, sha256="f" * 64, repo_id="o/r")
    writer = subprocess.Popen(
        [sys.executable, "-c", _REWRITES, str(tmp_path), "2"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        reads, torn = 0, 0
        while writer.poll() is None:
            reads += 1
            torn += store.read_record(tmp_path, model) is None
    finally:
        writer.kill()
        writer.wait()
    assert reads > 100 and torn == 0, (reads, torn)
