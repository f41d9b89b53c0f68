"""Fill a local cache of the front-end files the Solara server normally fetches from a CDN.

The Solara server proxies its browser bundles (Vuetify app, RequireJS, Font Awesome)
and the files some widgets load (Vega for Altair charts, the grid layout of Mesa's
SolaraViz) from a public CDN, and caches them in ``SOLARA_ASSETS_PROXY_CACHE_DIR``. A
machine that reaches the npm registry but no CDN gets the same files with ``npm pack``.

The package names and versions are read from the installed Solara's own files (the page
template and the widget templates), so a Solara upgrade changes the list by itself.

Run ``python tests/browser/solara_assets.py [CACHE_DIR]`` (default:
``.cache/solara-assets`` at the repository root) or call :func:`fill_cache`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / ".cache" / "solara-assets"

# `{{cdn}}/NAME@VERSION/...` in the page template, `${this.getCdn()}/NAME@VERSION/...`
# in the widget templates. NAME may be scoped (@widgetti/solara-vuetify-app).
_CDN_REFERENCE = re.compile(
    r"(?:\{\{\s*cdn\s*\}\}|\$\{this\.getCdn\(\)\})/((?:@[\w.-]+/)?[\w.-]+)@([\w.^~*-]+)/"
)
# Widgets whose front-end files the dashboard needs: Altair charts and the grid layout.
_WIDGET_TEMPLATES = ("vegalite.vue", "gridlayout.vue", "gridlayout_v3.vue")


def solara_packages() -> list[str]:
    """The ``name@version`` specs the installed Solara loads from its CDN."""
    import solara
    import solara.server.settings

    base = Path(solara.__file__).parent
    files = [base / "server" / "templates" / "solara.html.j2"]
    files += [base / "widgets" / "vue" / name for name in _WIDGET_TEMPLATES]
    specs: set[str] = set()
    for path in files:
        if path.exists():
            specs.update(f"{n}@{v}" for n, v in _CDN_REFERENCE.findall(path.read_text()))
    # Font Awesome's path is a setting: "/font-awesome@4.5.0/css/font-awesome.min.css".
    fontawesome = solara.server.settings.assets.fontawesome_path.strip("/").split("/")[0]
    if "@" in fontawesome:
        specs.add(fontawesome)
    if not specs:
        raise RuntimeError(f"found no CDN references in {files}: has Solara's layout changed?")
    return sorted(specs)


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fill the Solara assets cache (apt-get install npm)")
    return npm


def _fetch(spec: str, cache: Path) -> None:
    """``npm pack`` one package and unpack it into ``cache/spec/``."""
    target = cache / spec
    if (target / "package.json").exists():
        return
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        done = subprocess.run(  # noqa: S603 - a fixed command, names from Solara's own files
            [_npm(), "pack", spec, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {spec} failed:\n{done.stderr.strip()}")
        (tarball,) = Path(tmp).glob("*.tgz")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as archive:
            archive.extractall(unpacked, filter="data")
        (root,) = unpacked.iterdir()  # npm tarballs hold one folder, usually "package"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        root.rename(target)


def fill_cache(cache: Path = DEFAULT_CACHE, specs: Iterable[str] | None = None) -> Path:
    """Make sure every package Solara loads from its CDN is unpacked under ``cache``.

    Already cached packages are skipped, so a second call costs nothing.

    Returns:
        The cache folder, for ``SOLARA_ASSETS_PROXY_CACHE_DIR``.
    """
    cache = cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    for spec in specs if specs is not None else solara_packages():
        _fetch(spec, cache)
    return cache


def main(argv: list[str] | None = None) -> int:
    """Command line: fill the cache and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", nargs="?", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    print(fill_cache(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
