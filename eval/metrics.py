"""The paper's metrics under their `eval` name: `from eval.metrics import score_image` keeps working.

The implementation lives in `cpsam.metrics` (one implementation, used below `eval` by training
validation and distillation too); this module only re-exports it for scripts written against `eval`.
"""

from cpsam.metrics import *  # noqa: F403 - the re-export is this module's purpose
from cpsam.metrics import __all__  # noqa: F401
