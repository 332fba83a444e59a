"""Stage configs from defaults, then a YAML recipe, then command-line flags (flags win).

The dataclass of each stage is the only place defaults are written: the parser is derived from
its fields, and a flag the user did not type never overrides a recipe or checkpoint value.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe file that is missing, not YAML, or names unknown settings."""


class _DuplicateKey(yaml.YAMLError):
    """A YAML mapping that writes one key twice (PyYAML would keep the last silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a repeated key: `lr: 0.1` ... `lr: 10` is a
    mistake (or a hidden override), never a setting."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden, as YAML intends
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"{key!r} is written twice (lines {seen[key]} and {line})")
                seen[key] = line
            except TypeError:
                pass  # an unhashable key: SafeLoader's own error says so
        return super().construct_mapping(node, deep=deep)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see --help)\n")

    def _suggestion(self, message: str) -> str:
        """"; did you mean --x?" for a mistyped flag (argparse does this from Python 3.14)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [flag for action in self._actions for flag in action.option_strings]
        for word in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
            if word.startswith("--") and close:
                return f"; did you mean {close[0]}?"
        return ""


def field_type(cls: type, name: str) -> type:
    """The plain type of a dataclass field: `float | None` -> float."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def parse_number(text: str) -> float:
    """A float flag's value: a number, or a fraction such as 8/255 (recorded as the number).

    Raises:
        ValueError: neither (argparse turns it into its one-line usage error).
    """
    numerator, slash, denominator = str(text).partition("/")
    if not slash:
        return float(text)
    try:
        return float(numerator) / float(denominator)
    except ZeroDivisionError:
        raise ValueError(f"{text!r} divides by zero") from None


parse_number.__name__ = "number"  # argparse's message: "invalid number value: 'x'"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric setting allows, written as in its help: "(0, 1]", "[0, 100]",
    ">= 1", "> 0", "[0, 2**63)". Every value must also be finite (nan and inf never are in)."""

    text: str

    def __post_init__(self) -> None:
        self.limits()  # a typo in a field's declaration fails at import, not at the user

    def limits(self) -> tuple[float | None, bool, float | None, bool]:
        """(low, low included, high, high included); None: no limit on that side."""
        text = self.text.strip()
        for sign, included in ((">=", True), (">", False)):
            if text.startswith(sign):
                return _bound(text[len(sign):]), included, None, False
        if text[0] not in "[(" or text[-1] not in "])" or text.count(",") != 1:
            raise ValueError(f"bounds {self.text!r}: write (a, b], [a, b), >= a or > a")
        low, high = text[1:-1].split(",")
        return _bound(low), text[0] == "[", _bound(high), text[-1] == "]"

    def admits(self, value: float) -> bool:
        low, low_in, high, high_in = self.limits()
        return (isinstance(value, int) or math.isfinite(value)) \
            and (low is None or value > low or (low_in and value == low)) \
            and (high is None or value < high or (high_in and value == high))

    def phrase(self) -> str:
        """"in (0, 1]" or ">= 1", for "density must be in (0, 1]"."""
        return self.text if self.text[0] in "<>" else f"in {self.text}"


def _bound(text: str) -> float:
    """One end of a Bounds: a number, or an integer power such as 2**63."""
    base, _, power = text.strip().partition("**")
    return int(base) ** int(power) if power else float(base)


def option(default: Any, help: str, bounds: str | None = None) -> Any:
    """A dataclass field with its flag's help text and, for a number, the values it allows
    (`Bounds` notation): the one place all three are written."""
    metadata: dict[str, Any] = {"help": help}
    if bounds is not None:
        metadata["bounds"] = Bounds(bounds)
    return dataclasses.field(default=default, metadata=metadata)


def check_settings(config: Any, error: type[Exception]) -> None:
    """The one rule for every numeric setting of every stage: a number of the field's type
    (an integer for an int field), finite, and inside the field's declared `bounds`. Called
    when a stage validates its config, so flags, YAML and the Python API all pass through it.

    Raises:
        error: the first setting that breaks it, named with its bounds, in one line.
    """
    for field in dataclasses.fields(config):
        bounds = field.metadata.get("bounds")
        value = getattr(config, field.name)
        if bounds is None or (value is None and _optional(type(config), field.name)):
            continue
        integral = field_type(type(config), field.name) is int
        kind = "an integer" if integral else "a finite number"
        number = isinstance(value, int | float) and not isinstance(value, bool) \
            and (isinstance(value, int) or not integral)
        if not number or not bounds.admits(value):
            raise error(f"{field.name} must be {kind} {bounds.phrase()}, got {value!r}")


def add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, choices: dict[str, list[str]],
    skip: tuple[str, ...] = (), help_text: dict[str, str] | None = None,
) -> None:
    """One `--flag` per field of `cls`, all defaulting to "not given" (argparse.SUPPRESS).

    The help comes from the field's metadata (`option`), or `help_text`; the default is shown
    only where it says something (not None or False, and not already described).
    """
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = field_type(cls, field.name)
        text = field.metadata.get("help") or (help_text or {}).get(field.name, "")
        # `is`, not `in (None, False)`: 0 == False would hide a default of 0 (--seed)
        if field.default is not None and field.default is not False and "default" not in text:
            text += f" (default: {field.default})"
        if "bounds" in field.metadata:
            text += f"; allowed: {field.metadata['bounds'].text}"
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=parse_number if kind is float else kind,
                                choices=choices.get(field.name),
                                default=argparse.SUPPRESS, help=text)


def load_recipe(path: str | Path, cls: type) -> dict[str, Any]:
    """Settings from a YAML recipe (safe loading: a recipe is data, never code).

    Raises:
        RecipeError: unreadable file, not a mapping, unknown key, or a value of the wrong type.
    """
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as err:
        raise RecipeError(f"recipe {str(path)!r}: key {err}; keep one") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err  # UnicodeDecodeError has no strerror
        raise RecipeError(f"cannot read recipe {str(path)!r}: {reason}") from None
    except yaml.YAMLError as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {first_line}") from None
    except RecursionError:
        raise RecipeError(f"recipe {str(path)!r} nests too deeply to be a recipe") from None
    if data is None:
        raise RecipeError(f"recipe {str(path)!r} is empty; write setting: value lines, or drop "
                          "--config")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of setting: value")
    known = {f.name: f for f in dataclasses.fields(cls)}
    settings = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in settings:  # batch-size and batch_size: one setting written twice
            raise RecipeError(f"recipe {str(path)!r}: setting {name!r} is written twice; keep one")
        if name not in known:
            raise RecipeError(
                f"recipe {str(path)!r}: unknown setting {key!r}; known: {', '.join(sorted(known))}"
            )
        settings[name] = coerce(cls, name, value, f"recipe {str(path)!r}")
    return settings


def _optional(cls: type, name: str) -> bool:
    """Whether the field's annotation admits None (`float | None`)."""
    hint = typing.get_type_hints(cls)[name]
    return type(None) in typing.get_args(hint)


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """`value` as the field's type (ints are accepted for floats; None only where the field
    admits it), or RecipeError."""
    kind = field_type(cls, name)
    if value is None and _optional(cls, name):
        return None
    if isinstance(value, str) and "\x00" in value:
        raise RecipeError(f"{where}: {name} holds a NUL character, which no path or name can")
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and "/" in value:  # eps: 8/255 in a recipe
        try:
            return parse_number(value)
        except ValueError:
            pass
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"{where}: {name} must be {kind.__name__}, got {value!r}")


def config_from(args: argparse.Namespace, cls: type) -> Any:
    """`cls` from its defaults, then the YAML file of `--config` (a recipe or profile), then
    the flags the user typed (flags win)."""
    settings = dict(vars(args))
    recipe = settings.pop("config", None)
    base = load_recipe(recipe, cls) if recipe else {}
    if recipe:
        _check_recipe_trust(recipe, base, settings)
    base.update(settings)
    return cls(**base)


def _check_recipe_trust(recipe: str, base: dict, flags: dict) -> None:
    """A recipe is a file, so it is untrusted like any artifact: it cannot grant
    --trust-model-code, and its MODULE:FACTORY model is imported only when the flags name it.

    Raises:
        RecipeError: either, with the fix.
    """
    from dnr_deploy.trust import UntrustedModelCode, check_spec_trusted

    if "trust_model_code" in base:
        raise RecipeError(f"recipe {str(recipe)!r} sets trust_model_code, which only the "
                          "command line can: pass --trust-model-code yourself")
    if "model" in base and "model" not in flags:
        try:
            check_spec_trusted(base["model"], f"recipe {str(recipe)!r}", None,
                               bool(flags.get("trust_model_code")))
        except UntrustedModelCode as err:
            raise RecipeError(str(err)) from None


def fail(prog: str, message: object, code: int = 2) -> int:
    """Print the one-line error every console script uses and return its exit code (line
    breaks inside `message`, e.g. from a library's error text, become spaces)."""
    from dnr_deploy.progress import terminal_safe

    print(terminal_safe(f"{prog}: error: {' '.join(str(message).split())}"), file=sys.stderr)
    return code
