"""The defaults of DAM's and the plans' options, named once at the lowest layer: ``DAMConfig``'s fields,
``calibrate()``'s arguments and the planners' keyword defaults all read them from here (``MaskOptions`` itself
has none: its values come from the config).
"""

from __future__ import annotations

DEFAULT_BLOCK_SIZE = 128  # tokens per query and key block of a plan
DEFAULT_PCL = 128  # DAM's pattern capture length (the paper recommends 128)

# DAM's mask: the threshold on the shifted Box-Cox map, the Box-Cox lambda and the pattern match ratio (a block
# diagonal or column is kept whole when this share of it passed the threshold).
DEFAULT_TAU = 0.3
DEFAULT_BOX_COX_LAMBDA = 0.5
DEFAULT_MU = 0.8

# The blocks every query keeps (streaming and dynamic plans): leading key blocks, and key blocks up to and
# including the diagonal.
DEFAULT_SINK_BLOCKS = 1
DEFAULT_LOCAL_BLOCKS = 2
