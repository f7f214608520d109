"""dam-compile: a torch.compile backend that runs long-context attention block-sparse (DAM).

``torch.compile(model, backend="dam")`` works without importing this package (entry point); import it for
``backend(**options)``, :class:`DAMConfig`, the reports and the kernels' public API.
"""

from .calibration.calibrate import calibrate
from .compile_backend import backend, clear_graph_reports, dam_backend, graph_reports
from .config import DAMConfig
from .context_parallel import context_parallel
from .explain import ExplainReport, explain
from .export import export_mlir, export_rewritten
from .plan.block_plan import BlockSparsePlan
from .ops.dispatch import DenseAttentionWarning, reset_runtime_stats, runtime_stats
from .ops.attention import sparse_attention
from .calibration.profile import DAMProfile, ProfileMismatchError
from .calibration.profile_file import load_profile, save_profile
from .report.visuals import plot_profile
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
    "load_profile",
    "metrics",
    "plot_profile",
    "reset_runtime_stats",
    "runtime_stats",
    "save_profile",
    "sparse_attention",
]
