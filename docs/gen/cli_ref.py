"""The CLI reference, generated from the Typer app (``selfspeech.cli:app``).

The app is turned into its click command tree (``typer.main.get_command``); every leaf
command gives its help text (with its ``Example:`` line), its arguments and its options with
their defaults, exactly as ``selfspeech ... --help`` prints them.
"""
from __future__ import annotations

import re

import typer
from typer import _click

from selfspeech.cli import app


def commands(group=None, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(argv path, click command) of every leaf command below ``group``, sorted."""
    group = group if group is not None else typer.main.get_command(app)
    out = []
    for name, cmd in sorted(group.commands.items()):
        if getattr(cmd, "hidden", False):
            continue
        if hasattr(cmd, "commands"):
            out += commands(cmd, (*path, name))
        else:
            out.append(((*path, name), cmd))
    return out


def _text(text: str) -> str:
    """Help text as Markdown prose: rich's escapes undone, angle brackets shown, not read as HTML."""
    return (text or "").replace("\\[", "[").replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", _text(text)).replace("|", "\\|").strip()


def _help_blocks(help_text: str) -> tuple[str, list[str]]:
    """The help's prose, and its ``Example:`` lines as shell commands."""
    prose, examples = [], []
    for para in (help_text or "").strip().split("\n\n"):
        if para.lstrip().startswith("Example"):
            body = para.split(":", 1)[1]
            examples += [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
        else:
            prose.append(_text(" ".join(ln.strip() for ln in para.splitlines())))
    return "\n\n".join(prose), examples


def _params(cmd, ctx) -> tuple[list[str], list[str]]:
    """Markdown rows of the arguments and of the options."""
    args, opts = [], []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            req = "required" if p.required else "optional"
            args.append(f"| `{p.name.upper()}` | {req} | {_cell(getattr(p, 'help', '') or '')} |")
            continue
        record = p.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        default = ""
        m = re.search(r"\s*\[([^\[\]]*)\]\s*$", help_text)  # click's "[default: x; 0<=x<=1; required]"
        if m and any(k in m.group(1) for k in ("default:", "required", "<=", ">=", "<", ">")):
            extra = []
            for part in m.group(1).split("; "):
                if part.startswith("default: "):
                    default = f"`{part[len('default: '):]}`"
                elif part == "required":
                    default = "required"
                else:
                    extra.append(f"range {part}")
            help_text = help_text[: m.start()] + (f" ({', '.join(extra)})" if extra else "")
        opts.append(f"| `{names}` | {default} | {_cell(help_text)} |")
    return args, opts


def command_section(path: tuple[str, ...], cmd) -> str:
    ctx = _click.Context(cmd, info_name=" ".join(("selfspeech", *path)))
    prose, examples = _help_blocks(cmd.help)
    usage = " ".join(["[OPTIONS]"] + [(p.name.upper() if p.required else f"[{p.name.upper()}]")
                                      for p in cmd.params if p.param_type_name == "argument"])
    out = [f"## selfspeech {' '.join(path)}", "", prose, "", "```", f"selfspeech {' '.join(path)} {usage}", "```", ""]
    if examples:
        out += ["Example:", "", "```bash", *examples, "```", ""]
    args, opts = _params(cmd, ctx)
    if args:
        out += ["| argument | | what |", "| --- | --- | --- |", *args, ""]
    if opts:
        out += ["| option | default | what |", "| --- | --- | --- |", *opts, ""]
    return "\n".join(out)


def page() -> str:
    """The whole CLI reference (Markdown)."""
    cmds = commands()
    out = ["# CLI reference", "",
           "Every command of `selfspeech`, generated from the command-line app when the site is built: the "
           "same text `selfspeech COMMAND --help` (or `-h`) prints. A command prints its summary on stdout and "
           "its warnings, progress and errors on stderr; `--json` (`label`, `eval`, `data validate`, "
           "`data stats`, `decode-ctc`, `sv embed`, ...) prints the summary as one JSON object instead, for scripts. "
           "`selfspeech --version` prints the version. Exit codes: 0 when the command did its work (items that "
           "failed are counted in the summary), 1 when every item failed (or `data validate` found an error), "
           "2 when it refused before doing anything, with one line saying what is wrong and how to fix it.", "",
           "| command | what it does |", "| --- | --- |"]
    for path, cmd in cmds:
        name = " ".join(path)
        anchor = "selfspeech-" + "-".join(path)
        first = _cell((cmd.help or "").strip().split("\n\n")[0])
        out.append(f"| [`{name}`](#{anchor}) | {first} |")
    out.append("")
    out += [command_section(path, cmd) for path, cmd in cmds]
    return "\n".join(out)
