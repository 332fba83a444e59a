"""The training side of the pipeline (`dnr-compress`): settings (config), the loop (trainer,
training), checkpoints and run dirs, evaluation, the own-model API (byo), torchrun (distributed).

`dnr_deploy.compress(config)` is also the public API's name for a run, so this package is
callable: calling it runs `trainer.compress`. The package stays torch-free to import (the
settings and the torch-free runtime install import from it); the trainer loads on the call.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    """A module whose call is `trainer.compress` (assigned to this module's __class__, which
    Python allows for modules): one name for the package and for the API function."""

    def __call__(self, *args, **kwargs):
        from dnr_deploy.compress.trainer import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
