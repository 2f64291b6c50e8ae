"""Every model this machine knows, one row each, for ``selfspeech models list`` (no network, no installs)."""
from __future__ import annotations

from dataclasses import dataclass

from selfspeech.models.sources import ModelError, format_params, inspect_dir, registered
from selfspeech.models.zoo import cached_hub_ids, list_models


@dataclass(frozen=True)
class CatalogueRow:
    name: str
    size: str          # parameter count, e.g. 39M (a built-in model not yet cached: its published size)
    languages: str     # multilingual | English | ? (unreadable)
    source: str        # pypi | hub | local (built-in, where it came from), registered, hub (downloaded by id)
    path: str          # the transformers dir (a CTranslate2 dir for a registered CTranslate2 model); - if none
    note: str = ""


def _described(name: str, path, source: str, note: str = "") -> CatalogueRow:
    try:
        info = inspect_dir(path, name)
    except ModelError as e:
        return CatalogueRow(name, "?", "?", source, str(path), f"unusable: {e}")
    return CatalogueRow(name, format_params(info.params), info.languages, source, str(path), note)


def catalogue() -> list[CatalogueRow]:
    """Built-in models (cached or not), registered names, then hub ids downloaded before."""
    rows = []
    for st in list_models():
        s = st.spec
        if st.paths is None:
            langs = "multilingual" if s.multilingual else "English"
            rows.append(CatalogueRow(s.name, s.params, langs, "pypi (not cached)", "-",
                                     f"{s.note}; from {s.hf_id} online, else PyPI {' + '.join(s.pypi.requirements)}"))
        else:
            rows.append(_described(s.name, st.paths.hf_dir, st.paths.source, s.note))
    rows += [_described(name, path, "registered") for name, path in sorted(registered().items())]
    rows += [_described(hf_id, paths.hf_dir, "hub") for hf_id, paths in sorted(cached_hub_ids().items())]
    return rows
