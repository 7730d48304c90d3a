"""``python -m scaleinv``: the ``scaleinv`` command."""

from scaleinv.cli import main

main()
