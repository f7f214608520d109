"""dam-compile: a torch.compile backend that runs long-context attention block-sparse (DAM).

``torch.compile(model, backend="dam")`` works without importing this package (entry point); import it for
``backend(**options)``, :class:`DAMConfig`, the reports and the kernels' public API.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


# Where each subpackage's module is: passes/ and kernels/ have no __init__.py (see their _package.py), so Python
# never imports them by itself, under our name or a top-level one.
_SUBPACKAGE_MODULE = "_package.py"


def _load_subpackages() -> None:
    """Load ``kernels/`` and ``passes/`` as ``dam_compile.kernels`` / ``dam_compile.passes``: inside this folder
    when installed, beside it in a source checkout (a clone's root on ``sys.path``, or an editable install)."""
    here = _Path(__file__).parent
    for sub in ("kernels", "passes"):  # kernels first: passes imports it
        name = f"{__name__}.{sub}"
        if name in _sys.modules:
            continue
        folder = here / sub if (here / sub).is_dir() else here.parent / sub
        spec = _importlib_util.spec_from_file_location(
            name, folder / _SUBPACKAGE_MODULE, submodule_search_locations=[str(folder)]
        )
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del _sys.modules[name]
            raise
        globals()[sub] = module


_load_subpackages()

from .calibration import calibrate
from .compile_backend import backend, clear_graph_reports, dam_backend, graph_reports
from .config import DAMConfig
from .context_parallel import context_parallel
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
    "context_parallel",
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
