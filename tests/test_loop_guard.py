"""A greedy student that falls into a decoding loop stops there, one copy of the repeated n-gram kept."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from selfspeech.models.whisper import cut_loops, greedy_decode, load_for_inference, load_processor, loop_cut


def test_loop_cut_finds_the_shortest_repeated_tail_and_keeps_one_copy():
    assert loop_cut([7, 1, 1, 1, 1]) == 2                      # a word four times: keep it once
    assert loop_cut([7, 1, 2, 1, 2, 1, 2, 1, 2]) == 3          # a two-token phrase four times
    assert loop_cut([7, 1, 1, 1]) is None                      # three times is speech ("no no no")
    assert loop_cut([1, 2, 1, 2, 1, 2, 1]) is None             # the tail must be whole copies
    assert loop_cut([3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], max_ngram=2) is None   # n-grams up to max_ngram only
    assert loop_cut([1, 1, 1, 1], max_repeats=0) is None and loop_cut([1, 1], max_repeats=1) is None
    assert loop_cut([5, 1, 1], max_repeats=2) == 2


def test_cut_loops_stops_where_the_rule_first_fires():
    # the single-token loop fires at the fourth 9, before the later phrase loop could
    assert cut_loops([4, 9, 9, 9, 9, 9, 9, 5, 6, 5, 6]) == [4, 9]
    assert cut_loops([4, 5, 6]) == [4, 5, 6]
    assert cut_loops([1, 1, 1, 1], max_repeats=0) == [1, 1, 1, 1]


def test_greedy_decode_with_the_guard_equals_the_rule_on_the_unguarded_tokens(tiny_whisper_dir):
    torch.set_num_threads(1)
    model, tok = load_for_inference(tiny_whisper_dir), load_processor(tiny_whisper_dir).tokenizer
    x = torch.randn(3, 80, 200, generator=torch.Generator().manual_seed(0))
    raw = greedy_decode(model, x, tok.prefix_tokens, 30)
    assert raw == greedy_decode(model, x, tok.prefix_tokens, 30, max_repeats=0)   # off: as before
    guarded = greedy_decode(model, x, tok.prefix_tokens, 30, max_repeats=4)
    assert guarded == [cut_loops(r) for r in raw]
    # a random model loops: the guard really cut something here
    assert sum(map(len, guarded)) < sum(map(len, raw))


def test_the_recipe_decodes_with_the_guard_and_its_decode_stages_key_on_it():
    from selfspeech.adapt.recipe import recipe_from_dict
    from selfspeech.adapt.student import Output, Student, decode_stage

    r = recipe_from_dict({"data": {"manifest": "m.jsonl"}})
    assert r.student.max_repeats == 4 and r.student.finetune.max_repeats == 4
    key = decode_stage(Student(r, "init", r.student.finetune, False), "x", Output("ft", "m"), "e.jsonl").config
    off = dataclasses.replace(r, student=dataclasses.replace(r.student, max_repeats=0))
    key_off = decode_stage(Student(off, "init", off.student.finetune, False), "x", Output("ft", "m"), "e.jsonl").config
    assert key["max_repeats"] == 4 and key_off["max_repeats"] == 0
    with pytest.raises(ValueError, match="max_repeats"):
        recipe_from_dict({"data": {"manifest": "m.jsonl"}, "student": {"max_repeats": -1}})
