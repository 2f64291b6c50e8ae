"""The student decoding-loop guard on the kept Pseudo2Real splits: every system's WER with and without it.

Greedy students sometimes loop on one utterance up to the token cap ("very very
very ..."). The recipe's students now stop at a loop (``student.max_repeats``,
:func:`selfspeech.models.whisper.loop_cut`). That rule reads only the tokens
emitted so far, so decoding with it gives the unguarded hypothesis cut where the
rule first fires (:func:`~selfspeech.models.whisper.cut_loops`; tested against
the decoder). This script applies it to the hypotheses each kept split
(``benchmarks/results/pseudo2real_splits/``) decoded without the guard,
re-tokenised with the students' tokenizer (a re-encoding that does not decode back
to the same text is counted: ``round_trip_mismatches``), and scores every system
per split and pooled, as ``benchmarks/pseudo2real.py`` does.

What it does not redo: the lambda and system choices (source rehearsal curves)
and the students' best checkpoints (dev decoding) were made without the guard;
the eval hypotheses are the only thing it changes. The teacher (faster-whisper,
its own decoder) is left as it decoded.

Usage: python benchmarks/p2r_loop_guard.py [--max-repeats 4]
Writes benchmarks/results/pseudo2real_loop_guard.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_result  # noqa: E402
from p2r_pool import load_splits, pooled  # noqa: E402

from selfspeech.adapt.recipe import load_recipe  # noqa: E402
from selfspeech.data.versions import cpu_model  # noqa: E402
from selfspeech.eval.report import read_jsonl  # noqa: E402
from selfspeech.models.whisper import cut_loops, load_processor  # noqa: E402
from selfspeech.models.zoo import resolve_model  # noqa: E402

SPLITS = RESULTS / "pseudo2real_splits"
UNGUARDED = ("teacher",)   # decoded by faster-whisper, not by a greedy student


def guard_text(tok, text: str, max_repeats: int) -> tuple[str, bool]:
    """(the hypothesis a guarded decoder gives, whether the re-tokenisation decodes back to ``text``)."""
    ids = tok.encode(" " + text, add_special_tokens=False) if text else []
    same = tok.decode(ids, skip_special_tokens=True).strip() == text
    return tok.decode(cut_loops(ids, max_repeats), skip_special_tokens=True).strip(), same


def guard_split(run: dict, tok, max_repeats: int, out: Path) -> tuple[dict, dict]:
    """Guarded copies of a split's student hypotheses under ``out``: (the run entry for :func:`pooled`, counts)."""
    out.mkdir(parents=True, exist_ok=True)
    hyps, counts = {}, {}
    for system, path in run["hyps"].items():
        if system in UNGUARDED:
            hyps[system] = path
            continue
        rows, changed, mismatched, words_cut = [], 0, 0, 0
        for h in read_jsonl(path):
            text = h.get("text", "")
            new, same = guard_text(tok, text, max_repeats)
            changed += new != text
            mismatched += not same
            words_cut += len(text.split()) - len(new.split())
            rows.append({**h, "text": new})
        p = out / f"{system}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        hyps[system] = str(p)
        counts[system] = {"hypotheses_cut": changed, "words_cut": words_cut, "round_trip_mismatches": mismatched}
    return {**run, "hyps": hyps}, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "speechocean762" / "pseudo2real.yaml")
    ap.add_argument("--max-repeats", type=int, default=4, help="the guard's repeats (student.max_repeats)")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    tok = load_processor(resolve_model(recipe.student.init).hf_dir).tokenizer
    kept = load_splits(SPLITS)
    if not kept:
        raise SystemExit(f"no kept splits under {SPLITS}: run benchmarks/pseudo2real.py --seeds ... first")
    with tempfile.TemporaryDirectory() as tmp:
        guarded, counts = {}, {}
        for seed, run in kept.items():
            guarded[seed], counts[str(seed)] = guard_split(run, tok, args.max_repeats, Path(tmp) / f"split{seed}")
        per_split = {}
        for seed in kept:
            before = pooled({seed: kept[seed]}, recipe.normalizer)
            after = pooled({seed: guarded[seed]}, recipe.normalizer)
            per_split[str(seed)] = {"wer_unguarded": before["wer"], "wer": after["wer"], "paired": after["paired"],
                                    "best_label_free": after.get("best_label_free"),
                                    "label_free_choice": after.get("label_free_choice"),
                                    "cut": counts[str(seed)], "cpu_of_decoding": kept[seed]["summary"].get("cpu")}
        result = {"max_repeats": args.max_repeats, "student_tokenizer": recipe.student.init,
                  "applied_to": "eval hypotheses kept per split; lambda/system choices and checkpoints as made "
                                "without the guard; teacher unchanged",
                  "splits": per_split, "pooled_unguarded": pooled(kept, recipe.normalizer),
                  "pooled": pooled(guarded, recipe.normalizer), "cpu": cpu_model()}
    write_result("pseudo2real_loop_guard", result)
    p = result["pooled"]
    for k in sorted(p["wer"], key=p["wer"].get):
        print(f"{k:34s} {100 * result['pooled_unguarded']['wer'].get(k, float('nan')):6.2f} -> {100 * p['wer'][k]:6.2f}")


if __name__ == "__main__":
    main()
