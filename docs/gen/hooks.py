"""MkDocs hook: the generated pages (CLI, config reference, benchmarks, changelog) are built from the
code and the result files on every build, in memory: nothing generated is committed, so nothing drifts.

``python docs/gen/hooks.py OUT_DIR`` writes the same pages to a folder, to read them without MkDocs.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
import cli_ref  # noqa: E402
import config_ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def pages() -> dict[str, str]:
    """Page path inside the site -> Markdown."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    return {"reference/cli.md": cli_ref.page(), "reference/config.md": config_ref.page(),
            "benchmarks.md": bench.page(), "changelog.md": changelog}


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, text in pages().items():
        files.append(File.generated(config, path, content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    """Guides embed an area of the benchmarks page with ``{{ benchmarks: AREA }}``: their figures are the files'."""
    return bench.embed(markdown)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "site-gen")
    for path, text in pages().items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(text)
        print(out / path)
