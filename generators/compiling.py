"""``torch.compile`` of a module in place, with eager as the fallback.

:func:`compile_in_place` is :meth:`torch.nn.Module.compile` (the module object stays the
same, so its config, adapters and state dict are untouched); torch compiles on the first
call, so a failure shows there: the caller catches it, calls :func:`make_eager` and runs
the call again eagerly (:class:`rl.samplers.Sampler` does, logging one warning).
"""

from __future__ import annotations

import logging
import shutil

import torch

log = logging.getLogger(__name__)

#: torch.compile's backend; tests replace it with one that fails
BACKEND: object = "inductor"
#: the C++ compilers inductor can use for cpu kernels
CXX = ("c++", "g++", "clang++")


def compile_in_place(module: torch.nn.Module) -> bool:
    """Compile ``module``'s calls; False (and one warning) when this machine cannot:
    inductor on the cpu needs a C++ compiler."""
    on_cpu = not any(p.device.type == "cuda" for p in module.parameters())
    if BACKEND == "inductor" and on_cpu and not any(map(shutil.which, CXX)):
        log.warning("torch.compile: no C++ compiler (%s) for inductor on the cpu; running eagerly",
                    ", ".join(CXX))  # fmt: skip
        return False
    try:
        module.compile(backend=BACKEND)
    except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("torch.compile failed (%s: %s); running eagerly", type(exc).__name__, exc)
        return False
    return True


def make_eager(module: torch.nn.Module) -> None:
    """Undo :func:`compile_in_place` (``Module.compile`` keeps the compiled call in
    ``_compiled_call_impl``; ``Module.__call__`` runs eagerly when it is None)."""
    module._compiled_call_impl = None
