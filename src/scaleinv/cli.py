"""Entry point of the ``scaleinv`` command (the commands are in
:mod:`scaleinv.experiments.commands`).

This module imports neither torch nor typer: on an installation without the ``experiments``
extra, ``scaleinv`` prints which extra to install and exits with status 2.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

__all__ = ["EXTRA_HINT", "main"]

REQUIRED = ("typer", "tqdm", "matplotlib")
EXTRA_HINT = "pip install 'scaleinv[experiments]'"


def _missing() -> list[str]:
    missing = []
    for name in REQUIRED:
        found: object
        try:
            found = sys.modules.get(name, ...) is not None and importlib.util.find_spec(name)
        except ValueError:  # a module object without a spec
            found = True
        if not found:
            missing.append(name)
    return missing


def main() -> None:
    """Run the ``scaleinv`` command."""
    missing = _missing()
    if missing:
        print(f"scaleinv: the command needs {', '.join(missing)} from the 'experiments' extra: "
              f"{EXTRA_HINT}", file=sys.stderr)
        raise SystemExit(2)
    from scaleinv.experiments.commands import app

    app()


def __getattr__(name: str) -> Any:
    if name in ("app", "INTERRUPTED_EXIT_CODE"):
        from scaleinv.experiments import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'scaleinv.cli' has no attribute {name!r}")


if __name__ == "__main__":  # pragma: no cover
    main()
