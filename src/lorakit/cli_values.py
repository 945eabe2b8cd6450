"""How option values are read: on the command line, argparse types that refuse a bad value while
parsing, naming its flag (`positive_int`, `non_negative_int`, `device_name`); in a `--config`
YAML file, each value checked as its flag would check it (`config_defaults`)."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count of things that needs at least one (--beams, --batch-size, --limit, ...)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A count where 0 means off (--no-repeat-ngram)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (0: off), got {value}")
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps; whether that device exists here is checked when the command
    starts (commands.check_device), since --help must work on any machine."""
    if text in DEVICES or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device lorakit can use; give auto, cpu, cuda, cuda:N "
                                     f"(the N-th GPU, from 0) or mps")


# --- --config FILE: options of a command as YAML ------------------------------------------------

# Options whose value is a comma list, which a config file may also give as a YAML list.
_COMMA_LISTS = {"targets", "modules_to_save"}


def config_defaults(path: str, sub: argparse.ArgumentParser) -> dict:
    """The options in the YAML file ``path`` as defaults of ``sub``, each value checked as its flag
    checks it; a bad file ends the parse with ``sub``'s usage and a message naming the file and key."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        sub.error(f"--config {path}: {e}")
    if not isinstance(values, dict):
        sub.error(f"--config {path}: expected a mapping of option names to values, got {type(values).__name__}")
    # A key is a flag without its dashes (`no_compile` for --no-compile) or a flag's dest.
    actions: dict[str, argparse.Action] = {}
    for action in sub._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and action.dest not in ("help", "config"):
                actions[flag[2:].replace("-", "_")] = action
                actions.setdefault(action.dest, action)
    defaults: dict = {}
    given: dict[str, str] = {}  # dest -> the key that set it
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name == "config":
            sub.error(f"--config {path}: {key}: a config file cannot name another one; put its options in this file")
        if name not in actions:
            close = difflib.get_close_matches(name, actions, n=3)
            sub.error(f"--config {path}: unknown option {key!r}; " + (
                f"did you mean {' or '.join(close)}?" if close else
                f"the options are the flags of `{sub.prog}` without their dashes (see `{sub.prog} --help`)"))
        action = actions[name]
        if action.dest in given:
            sub.error(f"--config {path}: {key} and {given[action.dest]} set the same option; keep one")
        given[action.dest] = str(key)
        if value is None:
            continue  # `steps:` with no value: as if the key were not there
        try:
            checked = _config_value(action, value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            sub.error(f"--config {path}: {key}: {e}")
        if checked is not _ABSENT:
            defaults[action.dest] = checked
    return defaults


_ABSENT = object()  # a switch set to false: the switch not given
_EXPECTED = {int: "a whole number", float: "a number"}


def _config_value(action: argparse.Action, value):
    """``value`` from a config file as the flag would give it; raises with what the flag expects."""
    if action.nargs == 0:  # a switch: store_true, store_const (--no-compile)
        if not isinstance(value, bool):
            raise ValueError(f"a switch takes true or false, got {value!r}")
        return action.const if value else _ABSENT
    if isinstance(value, bool) and action.choices and {"on", "off"} <= set(action.choices):
        value = "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as a boolean
    if isinstance(value, list) and action.dest in _COMMA_LISTS:
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of names, got {value!r}")
        value = ",".join(value)
    expected = _EXPECTED.get(action.type, "text")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or (
            action.type is None and not isinstance(value, str)):
        raise ValueError(f"expected {expected}, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))  # argparse.ArgumentTypeError says what a lorakit type expects
        except (ValueError, TypeError):
            raise ValueError(f"expected {expected}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value
