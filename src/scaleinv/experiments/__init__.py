"""Experiments that reproduce the AdamP paper's claims on offline data (``scaleinv compare``).

Modules: :mod:`.data` (offline data sets), :mod:`.models`, :mod:`.optimizers`, :mod:`.tasks`,
:mod:`.runner` (training and the comparison loop), :mod:`.report` (tables and figures),
:mod:`.toy` (the paper's 2-D toy problem).
"""
