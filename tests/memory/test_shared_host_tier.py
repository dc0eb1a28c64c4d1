"""The host tier in shared memory: managers (one per worker process) map the same files."""

from __future__ import annotations

import os

import pytest

from ptmserve import errors
from ptmserve.memory.shared import SharedFiles

from .helpers import add_model, assert_same, batch, model_bytes, reference, run, segment_of, tiny_config


def files(folder) -> list[str]:  # noqa: ANN001
    return sorted(os.listdir(folder))


def test_a_second_manager_maps_what_the_first_read_and_reads_nothing(repo, make_manager, tmp_path) -> None:
    cfg = tiny_config(labels=("x", "y"))
    tensors = add_model(repo, "a", cfg, seed=1)
    folder = tmp_path / "shm"
    first, second = make_manager(shared_memory=folder), make_manager(shared_memory=folder)
    b0 = batch()
    ref = reference(cfg, tensors, b0)
    assert_same(run(first, "a", b0, classify=True), ref)
    published = files(folder)
    assert len(published) == len(tensors) and not any(f.endswith(".part") for f in published)
    assert sum(os.path.getsize(folder / f) for f in published) == model_bytes(tensors)

    assert_same(run(second, "a", b0, classify=True), ref)
    assert second.shared is not None and second.shared.mapped_existing == len(tensors)
    assert not [e for e in second.events if e.kind == "load" and e.tier == "host"]  # nothing read from disk
    assert files(folder) == published  # no second copy


def test_a_file_lives_while_any_manager_maps_it(repo, make_manager, tmp_path) -> None:
    cfg = tiny_config()
    add_model(repo, "a", cfg, seed=1)
    folder = tmp_path / "shm"
    first, second = make_manager(shared_memory=folder), make_manager(shared_memory=folder)
    for m in (first, second):
        run(m, "a", batch())
    count = len(files(folder))
    assert first.evict("a", host=True)
    assert len(files(folder)) == count  # the second still maps them
    assert second.evict("a", host=True)
    assert files(folder) == []  # the last user removed them


def test_damaged_bytes_are_never_published(repo, make_manager, tmp_path) -> None:
    cfg = tiny_config()
    add_model(repo, "a", cfg, seed=1)
    segment = segment_of(repo, "a", "layers.1")
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    folder = tmp_path / "shm"
    m = make_manager(shared_memory=folder, pipelined=False)
    with pytest.raises(errors.CorruptData, match="checksum"):
        m.acquire("a")
    assert m.stats().host.used_bytes == 0
    assert files(folder) == []  # a failed load publishes nothing, and its parts are gone


def test_parts_left_by_a_dead_process_are_removed(tmp_path) -> None:
    folder = tmp_path / "shm"
    folder.mkdir()
    dead = folder / "0123abcd.999999999.0.part"
    dead.write_bytes(b"half written")
    mine = folder / f"0123abcd.{os.getpid()}.0.part"
    mine.write_bytes(b"in progress")
    SharedFiles(folder)
    assert not dead.exists() and mine.exists()
