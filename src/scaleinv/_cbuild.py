"""Build the C kernels once per machine and load them safely.

The package ships its kernels as C sources (``scaleinv/csrc``) and compiles them on first use
with the system compiler (``$CC``, else ``cc``, ``gcc``, ``clang``: the toolchain that
``torch.compile`` needs on a CPU too). Why at run time rather than at install time: the
package stays pure Python (one wheel everywhere, no compiler needed to install it), and
``-march=native`` tunes the kernels for the machine that runs them. The cost, about a second,
is paid once per machine and source version.

The cache is built to never load a library it did not build:

* the folder is ``$SCALEINV_CACHE_DIR``, else ``$XDG_CACHE_HOME/scaleinv``, else
  ``~/.cache/scaleinv``; it is created ``0700`` and used only if it is a real folder owned by
  this user that nobody else can write. Otherwise (no home folder, a read-only or foreign
  folder) a fresh private temporary folder of this process is used, never a shared one;
* names are content-hashed: the key covers the sources, the compiler and its version, the
  flags and the CPU's features (``-march=native``);
* each library is written under a temporary name and moved into place, beside a file with the
  SHA-256 of its bytes; before loading, owner, permissions and hash are checked, and a library
  that fails any check, or fails to load, is rebuilt;
* the compiler runs with a timeout (``$SCALEINV_BUILD_TIMEOUT`` seconds, default 120); its
  diagnostics are kept (:func:`last_build_log`) and shown in the warning when no build works.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from scaleinv._constants import c_defines

__all__ = ["BuildError", "cache_dir", "last_build_log", "load_library"]

SOURCE = "fused_cpu.c"
HEADERS = ("fused_cpu_body.h",)
_BASE_FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared", "-std=c99")
# Tried in order: OpenMP threads; SIMD pragmas only (macOS clang has no -fopenmp); neither;
# and the same without -march=native for compilers that refuse it.
_FLAG_CHOICES: tuple[tuple[str, ...], ...] = tuple(
    (*arch, *_BASE_FLAGS, *openmp)
    for arch in (("-march=native",), ())
    for openmp in (("-fopenmp",), ("-fopenmp-simd",), ("-Wno-unknown-pragmas",))
)


class BuildError(RuntimeError):
    """No compiler could build the kernels; the message holds its diagnostics."""


_lock = threading.Lock()
_private_tmp: Path | None = None
_build_log: list[str] = []


def last_build_log() -> str:
    """What the compiler said in this process's failed builds (empty if none failed)."""
    return "\n".join(_build_log)


def _configured_dir() -> Path | None:
    configured = os.environ.get("SCALEINV_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "scaleinv"
    try:
        return Path.home() / ".cache" / "scaleinv"
    except (RuntimeError, KeyError):  # HOME unset and the uid has no passwd entry
        return None


def _is_ours(path: Path, is_kind: Callable[[int], bool]) -> bool:
    """``path`` is of the kind ``is_kind`` tests (not a link), owned by this user, and no one
    else may write it."""
    try:
        info = path.lstat()
    except OSError:
        return False
    owner_ok = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return (is_kind(info.st_mode) and owner_ok
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _is_private_dir(path: Path) -> bool:
    """A real folder (not a link), owned by this user, that no one else may write."""
    return _is_ours(path, stat.S_ISDIR)


def _ensure_private_dir(path: Path) -> bool:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return _is_private_dir(path) and os.access(path, os.W_OK | os.X_OK)


def cache_dir() -> Path:
    """The folder built kernels go to: the configured one if it is private to this user, else
    a fresh private temporary folder of this process."""
    global _private_tmp
    configured = _configured_dir()
    if configured is not None and _ensure_private_dir(configured):
        return configured
    if _private_tmp is None or not _is_private_dir(_private_tmp):
        _private_tmp = Path(tempfile.mkdtemp(prefix="scaleinv-kernels-"))  # 0700, unique
    return _private_tmp


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which(
        "clang")


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("flags", "Features", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _timeout() -> float:
    value = os.environ.get("SCALEINV_BUILD_TIMEOUT", "120")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(
            f"Invalid SCALEINV_BUILD_TIMEOUT: {value!r}; expected a number of seconds > 0"
        ) from None
    if not seconds > 0:
        raise ValueError(f"Invalid SCALEINV_BUILD_TIMEOUT: {value!r}; expected seconds > 0")
    return seconds


def _sources() -> dict[str, bytes]:
    folder = resources.files("scaleinv") / "csrc"
    return {name: (folder / name).read_bytes() for name in (SOURCE, *HEADERS)}


def _key(sources: dict[str, bytes], compiler: str, version: str, flags: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in (*(n.encode() + b"\0" + s for n, s in sorted(sources.items())), compiler.encode(),
                 version.encode(), "\0".join(flags).encode(), platform.machine().encode(),
                 _cpu_features().encode()):
        digest.update(part + b"\0\0")
    return digest.hexdigest()[:24]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _owned_file(path: Path) -> bool:
    return _is_ours(path, stat.S_ISREG)


def _verified(library: Path) -> bool:
    """The library and its hash file are ours and the bytes match the hash."""
    digest_file = library.with_name(library.name + ".sha256")
    if not (_owned_file(library) and _owned_file(digest_file)):
        return False
    try:
        return digest_file.read_text().strip() == _sha256(library)
    except OSError:
        return False


def _write_atomically(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build(compiler: str, flags: Sequence[str], sources: dict[str, bytes], target: Path) -> bool:
    """Compile into ``target`` (and its hash file); ``False`` with the diagnostics logged."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        for name, data in sources.items():
            (Path(tmp) / name).write_bytes(data)
        built = Path(tmp) / "kernels.so"
        command = [compiler, *flags, *c_defines(), str(Path(tmp) / SOURCE), "-o", str(built),
                   "-lm"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False,
                                    timeout=_timeout())
        except subprocess.TimeoutExpired:
            _build_log.append(f"$ {' '.join(command)}\ntimed out after {_timeout():g} s")
            return False
        except OSError as error:
            _build_log.append(f"$ {' '.join(command)}\n{error}")
            return False
        if result.returncode != 0:
            _build_log.append(f"$ {' '.join(command)}\n{result.stderr.strip()}")
            return False
        digest_file = target.with_name(target.name + ".sha256")
        _write_atomically(digest_file, _sha256(built).encode())
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return _verified(target)


def _load(target: Path) -> ctypes.CDLL | None:
    if not _verified(target):
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        _build_log.append(f"loading {target} failed: {error}")
        return None


def load_library() -> ctypes.CDLL:
    """The kernel library: a verified cached build, else a new one. Raises
    :class:`BuildError` (with the compiler's diagnostics) when no build works."""
    with _lock:
        compiler = _compiler()
        if compiler is None:
            raise BuildError("no C compiler found (set $CC, or install cc, gcc or clang)")
        try:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                     check=False, timeout=_timeout()).stdout
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BuildError(f"the C compiler {compiler} does not run: {error}") from None
        sources = _sources()
        folder = cache_dir()
        for flags in _FLAG_CHOICES:
            target = folder / f"fused_cpu-{_key(sources, compiler, version, flags)}.so"
            library = _load(target)
            if library is None:
                try:
                    built = _build(compiler, flags, sources, target)
                except OSError as error:  # the folder went read-only, the disk is full, ...
                    _build_log.append(f"writing into {folder} failed: {error}")
                    built = False
                library = _load(target) if built else None
            if library is not None:
                return library
        log = last_build_log()
        raise BuildError(f"{compiler} could not build scaleinv's C kernels:\n"
                         f"{log[-4000:]}")


def warn_fallback(error: BuildError) -> None:
    """Warn once that the fused CPU kernels are unavailable, with the reason."""
    warnings.warn(f"scaleinv's fused CPU kernels are unavailable, using the multi-tensor body "
                  f"instead: {error}", RuntimeWarning, stacklevel=4)
