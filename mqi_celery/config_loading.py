"""Configuration Manager, the reading: a YAML file and ``MQI_<SECTION>__<KEY>=value``
environment variables (which override the file) into validated ``config.Settings``;
``MQI_CONFIG`` (or ``--config``) names the file. A setting that is wrong is an error that
names it, the file, and the fix (a near key, or where a moved key lives now)."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import Settings
from .errors import ConfigError

ENV_PREFIX = "MQI_"


def env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``MQI_ENGINE__TIMEOUT_SECONDS=60`` -> {"engine": {"timeout_seconds": "60"}}."""
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(value) if value else value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys an earlier version had, and the one setting that replaced them.
MOVED = {"worker.log_level": "logging.level"}


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _section_model(e["loc"][:-1])
            known = list(section.model_fields) if section else []
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
            moved = MOVED.get(where)
            lines.append(f"  {where}: merged into {moved}; set it there" if moved else
                         f"  {where}: unknown key{suggestion}")
        else:
            lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Settings
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def load_settings(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read the YAML file (or defaults), apply env overrides, validate, resolve paths."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("MQI_CONFIG")
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if path:
        file = Path(path)
        source = str(file)
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist: check --config / MQI_CONFIG") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {file} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"configuration file {file} must be a mapping of sections, got {type(data).__name__}")
    overrides = env_overrides(environ)
    if overrides:
        source += " + MQI_* environment"
    try:
        settings = Settings.model_validate({**_merge(data, overrides), "source": source})
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None
    return settings.resolved(Path.cwd())
