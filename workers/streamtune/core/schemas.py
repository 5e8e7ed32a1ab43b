"""The versioned JSON Schema files in ``schemas/``, generated from :mod:`streamtune.core.events`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from streamtune.core.events import SCHEMA_MODELS
from streamtune.core.settings import REPO_ROOT

SCHEMA_DIR = REPO_ROOT / "schemas"


def generate(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one payload, as the typed model defines it."""
    schema = SCHEMA_MODELS[name].model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render(name: str) -> str:
    return json.dumps(generate(name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SCHEMA_MODELS:
        path = directory / f"{name}.json"
        path.write_text(render(name), encoding="utf-8")
        paths.append(path)
    return paths


def load(name: str, directory: Path = SCHEMA_DIR) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    return result
