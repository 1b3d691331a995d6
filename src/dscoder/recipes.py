"""The packaged TOML recipes (``dscoder/configs/*.toml``; the repository's ``configs/`` points at them).

``--config`` takes a recipe file, or the bare name of a packaged recipe (``tiny``, ``sft-tiny`` ...): so
``--config configs/tiny.toml`` works from the repository root and ``--config tiny`` from anywhere, installed or not.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dscoder.errors import ConfigError


def _packaged() -> dict[str, Path]:
    folder = resources.files("dscoder") / "configs"
    return {p.name.removesuffix(".toml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def recipe_names() -> list[str]:
    """Names of the packaged recipes, sorted."""
    return sorted(_packaged())


def recipe_path(spec: str | Path) -> Path:
    """A recipe file: ``spec`` itself when it is a file, else the packaged recipe it names (``tiny``, ``tiny.toml``
    or ``configs/tiny.toml`` run from any folder); a ConfigError naming ``spec`` and the known names otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"{spec}: not a recipe file (a TOML file or a packaged recipe name)")
    if path.parent in (Path("."), Path("configs")):
        found = _packaged().get(path.name.removesuffix(".toml"))
        if found is not None:
            return found
    raise ConfigError(f"{spec}: config file not found (packaged recipes: {', '.join(recipe_names())})")
