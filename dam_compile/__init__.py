"""dam-compile: a torch.compile backend that runs long-context attention block-sparse (DAM).

``torch.compile(model, backend="dam")`` works without importing this package (entry point); import it for
``backend(**options)``, :class:`DAMConfig`, the reports and the kernels' public API.
"""

from .compile_backend import backend, clear_graph_reports, dam_backend, graph_reports
from .config import DAMConfig
from .kernels import BlockSparsePlan, reset_runtime_stats, runtime_stats, sparse_attention

__version__ = "0.1.0"

__all__ = [
    "BlockSparsePlan",
    "DAMConfig",
    "__version__",
    "backend",
    "clear_graph_reports",
    "dam_backend",
    "graph_reports",
    "reset_runtime_stats",
    "runtime_stats",
    "sparse_attention",
]
