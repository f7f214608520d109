"""dam-compile: a torch.compile backend that runs long-context attention block-sparse (DAM).

``torch.compile(model, backend="dam")`` works without importing this package (entry point); import it for
``backend(**options)``, :class:`DAMConfig`, the reports and the kernels' public API.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _map_checkout_subpackages() -> None:
    """In a source checkout, ``passes/`` and ``kernels/`` sit beside this folder (installed, they sit inside
    it). Load them as ``dam_compile.passes`` / ``dam_compile.kernels`` so that code run from the checkout root,
    where Python finds this folder before the installed package, imports the same modules."""
    here = _Path(__file__).parent
    for sub in ("kernels", "passes"):  # kernels first: passes imports it
        init = here.parent / sub / "__init__.py"
        if (here / sub).is_dir() or not init.is_file() or f"{__name__}.{sub}" in _sys.modules:
            continue
        spec = _importlib_util.spec_from_file_location(
            f"{__name__}.{sub}", init, submodule_search_locations=[str(init.parent)]
        )
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        globals()[sub] = module


_map_checkout_subpackages()

from .calibration import calibrate
from .compile_backend import backend, clear_graph_reports, dam_backend, graph_reports
from .config import DAMConfig
from .explain import ExplainReport, explain
from .export import export_mlir, export_rewritten
from .kernels import BlockSparsePlan, DenseAttentionWarning, reset_runtime_stats, runtime_stats, sparse_attention
from .profile import DAMProfile, ProfileMismatchError
from . import metrics

__version__ = "0.1.0"

__all__ = [
    "BlockSparsePlan",
    "DAMConfig",
    "DAMProfile",
    "DenseAttentionWarning",
    "ExplainReport",
    "ProfileMismatchError",
    "__version__",
    "backend",
    "calibrate",
    "clear_graph_reports",
    "dam_backend",
    "explain",
    "export_mlir",
    "export_rewritten",
    "graph_reports",
    "metrics",
    "reset_runtime_stats",
    "runtime_stats",
    "sparse_attention",
]
