"""Shared test settings: one thread (the test machines are small and shared) and seeded
hypothesis profiles: ``scaleinv`` (the default) and ``scaleinv-noshrink`` (report the first
failing example at once; for debugging: ``pytest --hypothesis-profile=scaleinv-noshrink``).

Without a GPU, Triton (if installed) runs kernels through its interpreter: ``TRITON_INTERPRET``
must be set before anything imports Triton, so it is set here (``tests/test_triton.py``).

``python -m pytest -m quick`` runs the core contract only (the modules in ``QUICK_MODULES``:
parity with ``adamp`` 0.3.0, the branches of the cosine test, the ``torch.optim`` API,
argument validation, checkpoints and the README example)."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)

settings.register_profile(
    "scaleinv",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "scaleinv-noshrink",
    parent=settings.get_profile("scaleinv"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile("scaleinv")

QUICK_MODULES = frozenset({
    "test_parity_adamp.py", "test_parity_sgdp.py", "test_branches.py", "test_optimizer_api.py",
    "test_validation.py", "test_state_dict.py", "test_readme.py", "test_layers.py",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.path)).name in QUICK_MODULES and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.quick)
