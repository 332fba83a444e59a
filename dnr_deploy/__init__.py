"""dnr-deploy: robust pruning by Dynamic Network Rewiring, and verified deployment of the result.

`dnr_deploy.compress(CompressConfig(...))` does exactly what `dnr-compress` does.
"""

from dnr_deploy.trainer import compress
from dnr_deploy.training import CompressConfig, Run

__version__ = "0.1.0"

__all__ = ["CompressConfig", "Run", "__version__", "compress"]
