"""The run-time build of the C kernels (``scaleinv._cbuild``): a cache that never loads a
library it did not build, rebuilds what is damaged, and says why when nothing builds."""

from __future__ import annotations

import importlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CBUILD = importlib.import_module("scaleinv._cbuild")
CONSTANTS = importlib.import_module("scaleinv._constants")

needs_cc = pytest.mark.skipif(CBUILD._compiler() is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no private temporary folder and an empty build log."""
    monkeypatch.setattr(CBUILD, "_private_tmp", None)
    monkeypatch.setattr(CBUILD, "_build_log", [])
    monkeypatch.delenv("SCALEINV_BUILD_TIMEOUT", raising=False)


def library_path(library: object) -> Path:
    return Path(library._name)  # type: ignore[attr-defined]


@needs_cc
def test_builds_into_a_private_folder_with_a_verified_hash(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SCALEINV_CACHE_DIR", str(folder))
    library = CBUILD.load_library()
    path = library_path(library)
    assert path.parent == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert CBUILD._verified(path)
    assert hasattr(library, "scaleinv_adamp_f32") and hasattr(library, "scaleinv_sgdp_f64")
    # a second load takes the cached build: nothing new is written
    before = sorted(p.name for p in folder.iterdir())
    assert library_path(CBUILD.load_library()) == path
    assert sorted(p.name for p in folder.iterdir()) == before


@needs_cc
def test_a_folder_others_can_write_is_not_used(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A library planted in a shared folder is never loaded: the folder is refused, and the
    build goes to a fresh private temporary folder instead."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SCALEINV_CACHE_DIR", str(shared))
    first = CBUILD.load_library()
    planted_name = library_path(first).name
    (shared / planted_name).write_bytes(b"not a library")
    path = library_path(CBUILD.load_library())
    assert path.parent != shared
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert list(shared.iterdir()) == [shared / planted_name]  # nothing of ours went there


@needs_cc
def test_an_unwritable_folder_falls_back_to_a_private_one(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("SCALEINV_CACHE_DIR", str(blocker / "cache"))
    path = library_path(CBUILD.load_library())
    assert not str(path).startswith(str(blocker))
    assert CBUILD._is_private_dir(path.parent)


def test_no_home_folder_gives_a_private_temporary_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOME unset and a uid without a passwd entry: ``Path.home()`` raises."""
    monkeypatch.delenv("SCALEINV_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    folder = CBUILD.cache_dir()
    assert CBUILD._is_private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert CBUILD.cache_dir() == folder  # one per process
    shutil.rmtree(folder)


@needs_cc
@pytest.mark.parametrize("damage", ["corrupted", "truncated", "hash_missing"])
def test_a_damaged_cached_library_is_rebuilt(damage: str, tmp_path: Path) -> None:
    """Built in one process, damaged on disk, loaded in a fresh one (a truncated library that
    a loader maps can kill the process with SIGBUS): verified, rebuilt, loaded."""
    folder = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        os.environ["SCALEINV_CACHE_DIR"] = {str(folder)!r}
        from scaleinv import _cbuild
        path = Path(_cbuild.load_library()._name)
        print(path, _cbuild._verified(path))
    """)
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.split()[0])
    data = path.read_bytes()
    if damage == "corrupted":
        path.write_bytes(data[:1000] + bytes(len(data) - 1000))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.with_name(path.name + ".sha256").unlink()
    assert not CBUILD._verified(path)
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr  # no SIGBUS, no error
    assert second.stdout.split() == [str(path), "True"]


def fake_compiler(tmp_path: Path, body: str) -> str:
    """An executable that answers ``--version`` and runs ``body`` for anything else."""
    path = tmp_path / "fake-cc"
    path.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo fake 1.0; exit 0; fi\n'
                    f"{body}\n")
    path.chmod(0o755)
    return str(path)


def test_a_hanging_compiler_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", fake_compiler(tmp_path, "exec sleep 60"))
    monkeypatch.setenv("SCALEINV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SCALEINV_BUILD_TIMEOUT", "0.5")
    with pytest.raises(CBUILD.BuildError, match="timed out after 0.5 s"):
        CBUILD.load_library()


def test_compiler_diagnostics_are_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", fake_compiler(tmp_path, "echo 'fused_cpu.c:1: error: boom' >&2; "
                                                     "exit 1"))
    monkeypatch.setenv("SCALEINV_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CBUILD.BuildError, match="error: boom"):
        CBUILD.load_library()
    assert "error: boom" in CBUILD.last_build_log()


def test_a_bad_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEINV_BUILD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SCALEINV_BUILD_TIMEOUT"):
        CBUILD._timeout()


def test_the_key_covers_sources_compiler_flags_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = CBUILD._sources()
    key = CBUILD._key(sources, "cc", "1.0", ("-O3",))
    assert CBUILD._key(sources, "cc", "1.0", ("-O2",)) != key
    assert CBUILD._key(sources, "cc", "1.1", ("-O3",)) != key
    assert CBUILD._key({**sources, "fused_cpu.c": b"changed"}, "cc", "1.0", ("-O3",)) != key
    monkeypatch.setattr(CBUILD, "_cpu_features", lambda: "flags: other")
    assert CBUILD._key(sources, "cc", "1.0", ("-O3",)) != key


@needs_cc
@pytest.mark.parametrize("openmp", ["-fopenmp", "-fopenmp-simd", None])
def test_sources_compile_without_warnings(openmp: str | None, tmp_path: Path) -> None:
    """The kernels build cleanly with -Wall -Wextra -Werror in every flag set the cache tries."""
    folder = Path(CBUILD.__file__).parent / "csrc"
    flags = [openmp] if openmp else ["-Wno-unknown-pragmas"]
    result = subprocess.run(
        [CBUILD._compiler(), "-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
         *flags, *CONSTANTS.c_defines(), str(folder / CBUILD.SOURCE), "-o",
         str(tmp_path / "k.so"), "-lm"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LC_ALL": "C"},
    )
    assert result.returncode == 0, result.stderr
