"""Experiments that reproduce the AdamP paper's claims on offline data (``scaleinv compare``).

Modules: :mod:`.data` (offline data sets), :mod:`.models`, :mod:`.optimizers`, :mod:`.tasks`,
:mod:`.records` (what a run records, strict JSON, atomic writes), :mod:`.runner` (training and
the comparison loop), :mod:`.report` (tables and figures), :mod:`.toy` (the paper's 2-D toy
problem), :mod:`.commands` (the ``scaleinv`` command).

This package file imports nothing heavy: the names below let the command's help list the tasks
and optimizers without importing torch (a test checks they match the real registries).
"""

TASK_NAMES = ("digits", "mnist", "mnist1d", "mnist1d-mlp", "mnist1d-mlp-nowd", "mnist1d-hard",
              "mnist1d-hard-nowd", "shakespeare", "retrieval")
OPTIMIZER_NAMES = ("sgd", "sgdp", "adam", "adamw", "adamp", "radam", "radamp", "nadam", "nadamp")
