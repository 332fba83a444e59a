"""Which model specs run code, and the one rule for a spec read from an artifact (DESIGN.md
section 9): a `MODULE:FACTORY` spec from a run.json, a manifest, a checkpoint or a recipe is
imported only when the user names the same spec (`--model`, `model=`) or passes
`--trust-model-code`. Torch-free, so the console scripts check it before anything loads.
"""

from __future__ import annotations

import re

TORCHVISION_PREFIX = "torchvision:"
# `NAME:K`: a built-in net at width multiplier K (models/registry.py), e.g. `small:4`. A
# digits-only part after the colon is never a Python attribute, so it cannot be mistaken for
# MODULE:FACTORY, and it imports nothing. Defined here, not in models.external,
# because this module must not import torch.
WIDTH_SPEC = re.compile(r"([A-Za-z_]\w*):(\d+)")
# How a run records a module passed to `dnr_deploy.compress(model=...)`: its class, in a form
# no stage can build, so that export and resume ask for the module again.
MODULE_RECORD = "<module: {}>"


class UntrustedModelCode(ValueError):
    """An artifact names a `MODULE:FACTORY` spec the user neither named nor trusted."""


def is_module_record(spec: object) -> bool:
    prefix, suffix = MODULE_RECORD.split("{}")
    return isinstance(spec, str) and spec.startswith(prefix) and spec.endswith(suffix)


def imports_code(spec: object) -> bool:
    """A spec whose building imports a module (MODULE:FACTORY). Registry names (no colon, or
    widened: `small:4`), torchvision:NAME and the record of an API module import nothing an
    artifact chooses."""
    return (isinstance(spec, str) and ":" in spec and not spec.startswith(TORCHVISION_PREFIX)
            and not is_module_record(spec) and not WIDTH_SPEC.fullmatch(spec))


def check_spec_trusted(spec: object, origin: str, named: str | None, trust: bool) -> None:
    """Refuse to build a model spec read from an artifact unless the user chose it.

    Args:
        spec: the spec the artifact records.
        origin: which file recorded it ("run.json of 'runs/x'"), for the message.
        named: the spec the user named (`--model`, `model=`), or None.
        trust: `--trust-model-code` / `trust_model_code=True`.

    Raises:
        UntrustedModelCode: the artifact's spec imports a module and the user neither named
            that spec nor trusts model code; or `named` is another spec than `spec`.
    """
    if named is not None and named != spec:
        raise UntrustedModelCode(f"--model {named!r} is not the model {origin} records "
                                 f"({spec!r}); name that one, or leave --model out")
    if not imports_code(spec) or trust or named == spec:
        return
    module = str(spec).partition(":")[0]
    raise UntrustedModelCode(
        f"{origin} names model code {spec!r}; module {module!r} was not imported: pass "
        f"--model {spec} (or --trust-model-code) if you trust it")
