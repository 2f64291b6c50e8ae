"""Self-supervised pretraining: masking, quantizers, loss terms, the three tasks, the shared loop, CTC."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from selfspeech.models.ssl import EncoderConfig, SpeechEncoder
from selfspeech.objectives import losses as L
from selfspeech.objectives.masking import span_mask, upsample_mask
from selfspeech.objectives.quantizers import GumbelQuantizer, RandomProjectionQuantizer, perplexity
from selfspeech.objectives.tasks import BestRQConfig, BiRQTask, build_task
from selfspeech.train.sampler import GroupResampledBatchSampler, group_probabilities

TINY = EncoderConfig.preset("tiny")


def test_span_mask_statistics_and_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([400, 250, 30])
    fr = []
    for _ in range(50):
        m = span_mask(lengths, 400, 0.65, 10, min_spans=2, generator=g)
        assert not m[1, 250:].any() and not m[2, 30:].any()   # never on padding
        fr.append(float(m[0].float().mean()))
    # wav2vec 2.0: 0.65 x 10 with overlaps masks about half the frames
    assert 0.42 < np.mean(fr) < 0.56
    with pytest.raises(ValueError, match="fewer frames"):
        span_mask(torch.tensor([5]), 5, 0.65, 10)
    up = upsample_mask(torch.tensor([[True, False, True]]), 4, 11)
    assert up.tolist() == [[True] * 4 + [False] * 4 + [True] * 3]


def test_negatives_never_the_positive_and_same_utterance():
    groups = torch.tensor([0] * 7 + [1] * 3 + [2])
    neg = L.sample_negatives(groups, 50, torch.Generator().manual_seed(1))
    for i in range(10):
        assert (neg[i] != i).all()
        assert (groups[neg[i]] == groups[i]).all()
    assert (neg[10] == -1).all()          # a lone masked frame has no distractor


def test_perplexity_and_quantizers():
    V = 16
    assert math.isclose(float(perplexity(torch.full((10, V), 1 / V))), V, rel_tol=1e-4)
    assert math.isclose(float(perplexity(torch.nn.functional.one_hot(torch.zeros(10, dtype=torch.long), V).float())),
                        1.0, rel_tol=1e-4)
    q = GumbelQuantizer(8, 12, groups=2, entries=V)
    x = torch.randn(40, 8, requires_grad=True)
    out = q(x, tau=2.0)
    assert out["q"].shape == (40, 12) and 2 <= float(out["code_perplexity"]) <= 2 * V
    out["q"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0   # straight-through gradient
    rpq = RandomProjectionQuantizer(20, 4, 64, books=2, seed=3)
    f = torch.randn(5, 7, 20)
    lab = rpq(f)
    assert lab.shape == (5, 7, 2) and torch.equal(lab, RandomProjectionQuantizer(20, 4, 64, 2, seed=3)(f))
    assert {"proj", "codebook"} <= set(rpq.state_dict())  # frozen, but checkpointed
    assert not any(p.requires_grad for p in rpq.parameters())


def test_losses_at_chance_for_uninformative_inputs():
    # a uniform predictor scores exactly log V on masked prediction
    logits = torch.zeros(2, 6, 1, 32)
    labels = torch.randint(0, 32, (2, 6, 1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    assert math.isclose(float(L.masked_cross_entropy(logits, labels, mask)["loss"]), math.log(32), rel_tol=1e-5)
    # identical targets everywhere: no evidence -> log(K + 1) nats (distractors equal to the positive are
    # removed in fairseq; here all distinct random targets with a constant context give ~chance)
    torch.manual_seed(0)
    N, K = 400, 20
    ctx = torch.randn(N, 16)
    tgt = torch.randn(N, 16)
    neg = L.sample_negatives(torch.zeros(N, dtype=torch.long), K)
    loss = float(L.contrastive_loss(ctx, tgt, neg, temperature=1.0)["loss"])
    assert abs(loss - L.chance_contrastive(K)) < 0.1
    # a perfect context (= its target) is far below chance
    good = float(L.contrastive_loss(tgt, tgt, neg, temperature=0.1)["loss"])
    assert good < 0.5 * L.chance_contrastive(K)
    assert float(L.diversity_loss(torch.tensor(640.0), 2, 320)) == 0.0


def test_encoder_lengths_and_padding_invariance():
    enc = SpeechEncoder(TINY).eval()
    x = torch.randn(2, 230, 80)
    lengths = torch.tensor([230, 120])
    y, yl = enc(x, lengths)
    assert yl.tolist() == TINY.out_lengths(lengths).tolist() and y.shape[1] == int(yl.max())
    alone, _ = enc(x[1:, :120], lengths[1:])
    assert torch.allclose(y[1, : yl[1]], alone[0, : yl[1]], atol=1e-4)  # padding does not leak in
    wave = EncoderConfig.preset("tiny", frontend="wave")
    assert wave.stride == 320 and wave.receptive_field == 400
    assert wave.out_lengths(torch.tensor([16000])).item() == 49


def test_birq_update_is_w1_dF_plus_w2_dG():
    torch.manual_seed(0)
    cfg = BestRQConfig(codes=32, w_anchor=2.4, w_self=0.1)
    task = BiRQTask(TINY, cfg).eval()  # eval: no dropout, so passes can be compared
    x, lengths = torch.randn(2, 300, 80), torch.tensor([300, 260])

    def grads(weights):
        task.zero_grad()
        torch.manual_seed(1)  # the same masks, noise and Gumbel draws each time
        terms = task(x, lengths)
        terms.pop("monitor")
        L.weighted_sum(terms, weights).backward()
        return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}

    both, f_only, g_only = grads(task.weights), grads({"self": 1.0}), grads({"anchor": 1.0})
    assert task.self_layer == round(0.7 * TINY.n_layers)
    for n, g in both.items():
        expect = cfg.w_self * f_only.get(n, torch.zeros_like(g)) + cfg.w_anchor * g_only.get(n, torch.zeros_like(g))
        assert torch.allclose(g, expect, atol=1e-5), n
    assert "head_self.weight" in f_only and "head_self.weight" not in g_only


def test_group_sampling_xlsr():
    p = group_probabilities({"a": 900, "b": 100}, alpha=1.0)
    assert math.isclose(p["a"], 0.9)
    assert math.isclose(group_probabilities({"a": 900, "b": 100}, 0.0)["b"], 0.5)
    half = group_probabilities({"a": 900, "b": 100}, 0.5)
    assert math.isclose(half["b"], 0.1 ** 0.5 / (0.9 ** 0.5 + 0.1 ** 0.5))
    s = GroupResampledBatchSampler([1.0] * 100, ["a"] * 90 + ["b"] * 10, alpha=0.0, batch_size=10, seed=0)
    drawn = [i for b in s.batches(0) for i in b]
    assert len(drawn) == 100 and sum(i >= 90 for i in drawn) == 50   # b upsampled to half
    assert s.batches(1) != s.batches(0)


# -- training on synthetic audio ---------------------------------------------------------------

def _corpus(tmp_path, n=12, text=False):
    rng = np.random.default_rng(0)
    items = []
    words = ["A", "BAD", "CAT", "DOG"]
    for i in range(n):
        dur = 1.4 + 0.1 * (i % 5)
        t = np.arange(int(dur * 16000)) / 16000
        w = 0.3 * np.sin(2 * np.pi * (150 + 50 * (i % 4)) * t * (1 + 0.3 * np.sin(2 * np.pi * 3 * t)))
        w = (w + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
        p = tmp_path / f"u{i}.wav"
        sf.write(p, w, 16000)
        items.append({"id": f"u{i}", "audio_filepath": str(p), "duration": dur, "speaker": f"s{i % 3}",
                      "group": "ab"[i % 2], "text": words[i % 4] if text else ""})
    items.append({"id": "short", "audio_filepath": str(p), "duration": 0.1, "speaker": "s0", "group": "a", "text": "A"})
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(it) + "\n" for it in items))
    return m


def _cfg(objective, steps, **loop):
    from selfspeech.train.pretrain import PretrainConfig

    task = {"entries": 16, "negatives": 10, "final_dim": 16} if objective == "wav2vec2" else {"codes": 64}
    return PretrainConfig(objective=objective, encoder={"preset": "tiny", "dropout": 0.0}, task=task,
                          loop={"max_steps": steps, "lr": 2e-3, "log_every": 1, "ckpt_every": 5,
                                "warmup_fraction": 0.1, **loop},
                          max_batch_seconds=12, group_field="group")


@pytest.mark.parametrize("objective", ["bestrq", "birq", "wav2vec2"])
def test_pretraining_lowers_the_loss(tmp_path, objective):
    from selfspeech.train.pretrain import pretrain

    torch.set_num_threads(1)
    m = _corpus(tmp_path)
    s = pretrain(m, tmp_path / "out", _cfg(objective, 150), progress=False)
    assert [x["id"] for x in s["skipped"]] == ["short"]               # counted, with its reason
    log = [json.loads(x) for x in open(tmp_path / "out" / "log.jsonl")]
    main = "contrastive" if objective == "wav2vec2" else "anchor"   # the objective, not its penalties
    losses = [r[main] for r in log if main in r]
    assert np.mean(losses[-20:]) < 0.9 * np.mean(losses[:10]), (losses[:10], losses[-20:])
    assert (tmp_path / "out" / "encoder" / "model.safetensors").is_file()


def test_pretraining_resume_equals_uninterrupted(tmp_path):
    from selfspeech.models.ssl import load_state
    from selfspeech.train.pretrain import pretrain

    torch.set_num_threads(1)
    m = _corpus(tmp_path)
    pretrain(m, tmp_path / "full", _cfg("birq", 12), progress=False)

    class Kill(Exception):
        pass

    import selfspeech.train.pretrain as P

    orig = P.train_loop

    def killing(*a, **k):
        k["on_step"] = lambda rec: (_ for _ in ()).throw(Kill()) if rec["step"] == 7 else None
        return orig(*a, **k)

    P.train_loop = killing
    try:
        with pytest.raises(Kill):
            pretrain(m, tmp_path / "cut", _cfg("birq", 12), progress=False)
    finally:
        P.train_loop = orig
    pretrain(m, tmp_path / "cut", _cfg("birq", 12), progress=False)   # resumes from step 5
    a, b = load_state(tmp_path / "full" / "best"), load_state(tmp_path / "cut" / "best")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x).get("step") for x in open(tmp_path / "cut" / "log.jsonl") if '"loss"' in x]
    assert steps == sorted(set(steps))                                  # no step logged twice
    with pytest.raises(ValueError, match="another config"):
        pretrain(m, tmp_path / "cut", _cfg("birq", 13), progress=False)


def test_resume_refuses_a_default_that_changed_since_the_run_started(tmp_path, capsys):
    """The run config stores the fully resolved config (presets and defaults filled in), so a changed
    default is caught; an older run config (overrides plus a ``resolved`` part) still resumes."""
    from selfspeech.train.pretrain import pretrain

    torch.set_num_threads(1)
    m, out = _corpus(tmp_path), tmp_path / "run"
    pretrain(m, out, _cfg("wav2vec2", 2), progress=False)
    (out / "finished.json").unlink()  # as if killed before the end: the next call resumes from last/
    saved_path = out / "last" / "run_config.json"
    saved = json.loads(saved_path.read_text())
    assert "resolved" not in saved and saved["pretrain"]["task"]["w_features"] == 0.0
    assert saved["pretrain"]["encoder"]["frontend"] == "wave" and "preset" not in saved["pretrain"]["encoder"]
    # as if the run had started when the default feature penalty was 10
    changed = json.loads(json.dumps(saved))
    changed["pretrain"]["task"]["w_features"] = 10.0
    saved_path.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=r"pretrain\.task\.w_features.*a default"):
        pretrain(m, out, _cfg("wav2vec2", 2), progress=False)
    # an older version's run config: sub-configs as overrides, the configs with defaults under `resolved`
    legacy = json.loads(json.dumps(saved))
    legacy["resolved"] = {"task": dict(legacy["pretrain"]["task"]), "encoder": dict(legacy["pretrain"]["encoder"])}
    legacy["pretrain"]["task"] = {"entries": 16, "negatives": 10, "final_dim": 16}
    legacy["pretrain"]["encoder"] = {"preset": "tiny", "dropout": 0.1}
    saved_path.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match=r"pretrain\.encoder\.dropout"):  # its overrides still count
        pretrain(m, out, _cfg("wav2vec2", 2), progress=False)
    legacy["pretrain"]["encoder"]["dropout"] = 0.0
    saved_path.write_text(json.dumps(legacy))
    pretrain(m, out, _cfg("wav2vec2", 2), progress=False)
    assert "without checking that the defaults" in capsys.readouterr().err
    # and an explicit override that differs is still refused, named by its dotted key
    with pytest.raises(ValueError, match=r"pretrain\.loop\.lr"):
        pretrain(m, out, _cfg("wav2vec2", 2, lr=1e-3), progress=False)


def test_ctc_finetune_phones_and_bad_input(tmp_path):
    from selfspeech.text.phones import Lexicon, Vocabulary
    from selfspeech.label.transcribe import transcribe_ctc
    from selfspeech.models.ctc import greedy_ctc
    from selfspeech.train.ctc import CTCConfig, finetune_ctc
    from selfspeech.train.pretrain import pretrain

    torch.set_num_threads(1)
    lex = tmp_path / "lex.txt"
    lex.write_text("A\tAH0\nA\tEY1\nBAD\tB AE1 D\nCAT\tK AE1 T\nDOG\tD AO1 G\n")
    L_ = Lexicon.read(lex)
    assert L_.convert("a bad cow") == (["AH", "B", "AE", "D"], ["COW"])
    v = Vocabulary.for_phones(L_)
    assert v.decode(greedy_ctc(torch.log_softmax(torch.tensor([[[0, 9, 0.], [0, 9, 0], [9, 0, 0], [0, 0, 9]]]), -1),
                               torch.tensor([4]))[0]) == f"{v.symbols[0]} {v.symbols[1]}"
    m = _corpus(tmp_path, text=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(m.read_text() + json.dumps({"id": "oov", "audio_filepath": str(tmp_path / "u0.wav"),
                                               "duration": 1.4, "text": "ZEBRA"}) + "\n")
    pretrain(m, tmp_path / "pt", _cfg("bestrq", 5), progress=False)
    cfg = CTCConfig(lexicon=str(lex), loop={"max_steps": 60, "lr": 3e-3, "eval_every": 20, "log_every": 5},
                    freeze_steps=5, mask_time_prob=0.0, max_batch_seconds=20)
    s = finetune_ctc(bad, m, tmp_path / "ctc", cfg, init=tmp_path / "pt" / "encoder", progress=False)
    assert s["skipped"]["train"]["missing_words"] == 1 and s["skipped"]["train"]["missing_word_list"] == {"ZEBRA": ["oov"]}
    assert s["skipped"]["train"]["too_short"] == 1
    log = [json.loads(x) for x in open(tmp_path / "ctc" / "log.jsonl") if '"loss"' in x]
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[0]["frozen"] and not log[-1]["frozen"]
    out = transcribe_ctc(tmp_path / "ctc" / "best", m, tmp_path / "hyp.jsonl")
    assert len(out.read_text().splitlines()) == 13
    beam = transcribe_ctc(tmp_path / "ctc" / "best", m, tmp_path / "hyp_beam.jsonl", beam=4)
    assert [json.loads(x)["id"] for x in beam.read_text().splitlines()] == [json.loads(x)["id"] for x in
                                                                            out.read_text().splitlines()]
    with pytest.raises(ValueError, match="expected ssl_encoder"):   # a checkpoint of another kind
        finetune_ctc(m, m, tmp_path / "ctc2", cfg, init=tmp_path / "pt" / "best", progress=False)


def test_ctc_init_seed_separates_the_initial_weights_from_the_loop_seed(tmp_path):
    from safetensors.torch import load_file

    from selfspeech.models.ctc import CTCModel
    from selfspeech.train.ctc import CTCConfig, finetune_ctc

    torch.set_num_threads(1)
    lex = tmp_path / "lex.txt"
    lex.write_text("A\tAH0\nBAD\tB AE1 D\nCAT\tK AE1 T\nDOG\tD AO1 G\n")
    m = _corpus(tmp_path, text=True)

    def head(name, seed, init_seed):   # one update of 1e-9 (a learning rate is > 0): about the initial weights
        cfg = CTCConfig(lexicon=str(lex), encoder={"preset": "tiny"}, init_seed=init_seed, mask_time_prob=0.0,
                        loop={"max_steps": 1, "lr": 1e-9, "eval_every": 1, "seed": seed}, max_batch_seconds=20)
        finetune_ctc(m, m, tmp_path / name, cfg, progress=False)
        return load_file(str(tmp_path / name / "best" / "model.safetensors"))["head.weight"]

    default0, default1 = head("a", 0, None), head("b", 1, None)
    assert not torch.allclose(default0, default1, atol=1e-3)
    assert torch.allclose(head("c", 1, 0), default0, atol=1e-7)     # order/masks of seed 1, weights of seed 0
    assert torch.allclose(head("d", 0, 1), default1, atol=1e-7)
    with pytest.raises(ValueError, match="head_init"):
        CTCModel(TINY, 5, head_init="xavier")
    assert not CTCModel(TINY, 5, head_init="zero").head.weight.any()


def test_ctc_reinit_top_keeps_lower_layers_and_draws_the_top_as_scratch_does(tmp_path):
    from safetensors.torch import load_file

    from selfspeech.models.ssl import load_state
    from selfspeech.train.ctc import CTCConfig, finetune_ctc
    from selfspeech.train.pretrain import pretrain

    torch.set_num_threads(1)
    lex = tmp_path / "lex.txt"
    lex.write_text("A\tAH0\nBAD\tB AE1 D\nCAT\tK AE1 T\nDOG\tD AO1 G\n")
    m = _corpus(tmp_path, text=True)
    pretrain(m, tmp_path / "pt", _cfg("bestrq", 3), progress=False)
    init = tmp_path / "pt" / "encoder"
    pre = load_state(init)
    n_layers = 1 + max(int(k.split(".")[1]) for k in pre if k.startswith("layers."))

    def initial(name, reinit, with_init=True):   # encoder frozen for the one update: the saved encoder is the initial one
        cfg = CTCConfig(lexicon=str(lex), encoder={} if with_init else dict(pre_encoder), reinit_top=reinit,
                        mask_time_prob=0.0, freeze_steps=1, loop={"max_steps": 1, "eval_every": 1},
                        max_batch_seconds=20)
        finetune_ctc(m, m, tmp_path / name, cfg, init=init if with_init else None, progress=False)
        return {k.removeprefix("encoder."): v for k, v in
                load_file(str(tmp_path / name / "best" / "model.safetensors")).items() if k.startswith("encoder.")}

    pre_encoder = json.loads((init / "config.json").read_text())["config"]
    kept, re1, scratch = initial("r0", None), initial("r1", 1), initial("s", None, with_init=False)
    top = (f"layers.{n_layers - 1}.", "out_norm.")
    for k, v in re1.items():
        assert torch.equal(v, kept[k]) == (not k.startswith(top)), k   # only the top layer and norm change
        if k.startswith(top):
            assert torch.equal(v, scratch[k]), k                       # ... to a scratch model's weights
    assert all(torch.equal(kept[k], pre[k]) for k in pre)
    with pytest.raises(ValueError, match=f"use 0..{n_layers}"):
        initial("bad", n_layers + 1)
    with pytest.raises(ValueError, match="give `init`"):
        initial("scratch_reinit", 1, with_init=False)


@pytest.mark.parametrize("objective", ["bestrq", "birq"])
def test_masked_only_head_gives_the_all_frames_loss(objective):
    # the heads run on the masked frames only (speed); the loss must be the textbook one: head on
    # every frame, cross-entropy over the masked ones
    torch.manual_seed(0)
    task = build_task(objective, TINY, {"codes": 64}).eval()
    x, lengths = torch.randn(3, 240, TINY.n_mels), torch.tensor([240, 200, 130])
    with torch.no_grad():
        got = task(x, lengths, 0, torch.Generator().manual_seed(5))
        states, mask, labels, xn, flen = task.masked_pass(x, lengths, torch.Generator().manual_seed(5))
        want = L.masked_cross_entropy(task.predict(states[-1], task.head, 1), labels, mask)
        assert mask.any() and not mask.all()
        assert torch.allclose(got["anchor"], want["loss"], atol=1e-6)
        assert got["monitor"]["accuracy"] == pytest.approx(float(want["accuracy"]))
        if objective == "birq":
            selfl = task.self_labels(xn, lengths, flen, states[-1].shape[1], None)
            own = L.masked_cross_entropy(task.predict(states[-1], task.head_self, 1), selfl, mask)
            assert torch.allclose(got["self"], own["loss"], atol=1e-6)


def test_config_diff_treats_an_option_added_later_as_unset():
    from selfspeech.train.loop import check_resume, config_diff

    old = {"ctc": {"lr": 1e-3}, "resolved": {"loop": {"seed": 0}}}
    new = {"ctc": {"lr": 1e-3, "init_seed": None}, "resolved": {"loop": {"seed": 0}}}
    assert config_diff(old, new) == {}
    assert check_resume(Path("run"), old, new) is None          # an older run resumes under the newer code
    assert config_diff(old, {"ctc": {"lr": 1e-3, "init_seed": 1}}) == {"ctc.init_seed": (None, 1),
                                                                      "resolved": ({"loop": {"seed": 0}}, None)}
    with pytest.raises(ValueError, match=r"ctc\.init_seed"):
        check_resume(Path("run"), old, {**new, "ctc": {"lr": 1e-3, "init_seed": 1}})


def test_check_resume_reads_an_older_run_config_with_a_resolved_part():
    """Older run configs held sub-configs as overrides (a preset name) beside a ``resolved`` part;
    they are compared resolved by today's defaults, without that part (which for CTC described the
    pretrained encoder, not the scratch one), and their overrides still count."""
    from selfspeech.train.ctc import CTCConfig
    from selfspeech.train.loop import check_resume, normalised

    given = normalised({"ctc": CTCConfig(targets="char", encoder={"preset": "tiny"}).to_dict(), "init": "enc"})
    assert "preset" not in given["ctc"]["encoder"] and given["ctc"]["encoder"]["d_model"] == 32
    old = json.loads(json.dumps(given))
    old["ctc"]["encoder"], old["resolved"] = {"preset": "tiny"}, {"encoder": {"d_model": 144}}
    assert "without checking that the defaults" in check_resume(Path("run"), old, given)
    old["ctc"]["encoder"] = {"preset": "small"}
    with pytest.raises(ValueError, match=r"ctc\.encoder\.d_model"):
        check_resume(Path("run"), old, given)
    assert check_resume(Path("run"), given, given) is None


def test_build_task_rejects_mismatched_frontend():
    with pytest.raises(ValueError, match="frontend 'wave'"):
        build_task("wav2vec2", TINY)
    with pytest.raises(ValueError, match="frontend 'mel'"):
        build_task("bestrq", EncoderConfig.preset("tiny", frontend="wave"))
    with pytest.raises(ValueError, match="unknown objective"):
        build_task("hubert", TINY)


def test_wav2vec2_feature_penalty_weight_follows_input_normalisation():
    # the waveform is normalised per utterance (as wav2vec 2.0 large / XLSR), whose fairseq recipe has
    # loss_weights [0.1, 0]; weight 10 (base, raw waveforms) kept our contrastive loss at chance
    torch.manual_seed(0)
    wave = EncoderConfig.preset("tiny", frontend="wave", dropout=0.0)
    x, lengths = torch.randn(2, 8000), torch.tensor([8000, 6400])
    small = {"entries": 16, "negatives": 10, "final_dim": 16}
    default = build_task("wav2vec2", wave, small)
    assert default.weights["features"] == 0.0
    base = build_task("wav2vec2", wave, {**small, "w_features": 10.0})
    base.load_state_dict(default.state_dict())
    default.eval(), base.eval()                  # argmax codes: the Gumbel noise draws from the global RNG
    with torch.no_grad():
        t0 = default(x, lengths, 0, generator=torch.Generator().manual_seed(1))
        t1 = base(x, lengths, 0, generator=torch.Generator().manual_seed(1))
    assert float(t1["features"]) > 0 and torch.isclose(t0["features"], t1["features"])
    extra = L.weighted_sum(t1, base.weights) - L.weighted_sum(t0, default.weights)
    assert torch.isclose(extra, 10.0 * t1["features"], rtol=1e-4)


def test_ctc_beam_search_beats_best_path_when_it_should():
    from selfspeech.models.ctc import beam_ctc, greedy_ctc

    # best path is blank,blank (p .36) -> "", but "a" has p = 1 - .36 - ... : the classic example
    p = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    lp = p.log()
    assert greedy_ctc(lp[None], torch.tensor([2]))[0] == []
    assert beam_ctc(lp, beam=4) == [1]          # P("a") = .4*.6 + .6*.4 + .4*.4 = .64 > .36
    # a confident sequence with a repeat through a blank decodes to both symbols
    conf = torch.full((5, 3), 1e-4)
    for t, v in enumerate([1, 0, 1, 2, 2]):
        conf[t, v] = 1.0
    assert beam_ctc(conf.log(), beam=3) == greedy_ctc(conf.log()[None], torch.tensor([5]))[0] == [1, 1, 2]


def test_unit_usage_report(tmp_path):
    from selfspeech.eval.units import load_wav2vec2_task, unit_usage, write_unit_report
    from selfspeech.train.pretrain import pretrain

    torch.set_num_threads(1)
    m = _corpus(tmp_path)
    pretrain(m, tmp_path / "w2v", _cfg("wav2vec2", 3), progress=False)
    task = load_wav2vec2_task(tmp_path / "w2v" / "best")
    items = [json.loads(x) for x in m.read_text().splitlines()][:12]
    hists = unit_usage(task, items, "group")
    assert set(hists) == {"a", "b"} and all(h.shape == (2, 16) for h in hists.values())
    frames = {g: sum(int(task.enc_cfg.out_lengths(torch.tensor([int(i["duration"] * 16000)])))
                     for i in items if i["group"] == g) for g in ("a", "b")}
    assert {g: int(h[0].sum()) for g, h in hists.items()} == frames     # every frame counted once per codebook
    res = write_unit_report(hists, tmp_path / "units")
    assert res["similarity"][0][0] == pytest.approx(1.0) and (tmp_path / "units" / "units_heatmap.png").is_file()
    pretrain(m, tmp_path / "brq", _cfg("bestrq", 2), progress=False)
    with pytest.raises(ValueError, match="needs a wav2vec2 task"):
        load_wav2vec2_task(tmp_path / "brq" / "best")


def test_birq_self_labels_nearest_code_by_default_gumbel_optional():
    from selfspeech.models.ssl import normalise_input

    torch.manual_seed(0)
    x, lengths = torch.randn(2, 300, 80), torch.tensor([300, 260])
    flen = TINY.out_lengths(lengths)
    xn = normalise_input(x, lengths)
    det = BiRQTask(TINY, BestRQConfig(codes=64))
    a = det.self_labels(xn, lengths, flen, int(flen.max()), torch.Generator().manual_seed(1))
    b = det.self_labels(xn, lengths, flen, int(flen.max()), torch.Generator().manual_seed(2))
    assert torch.equal(a, b)                                   # a function of audio and weights only
    noisy = BiRQTask(TINY, BestRQConfig(codes=64, self_tau=0.5))
    noisy.load_state_dict(det.state_dict())
    c = noisy.self_labels(xn, lengths, flen, int(flen.max()), torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)                               # Gumbel noise moves labels


def test_bestrq_mask_layout_from_the_config():
    from selfspeech.config import ConfigError
    from selfspeech.train.pretrain import PretrainConfig

    x, lengths = torch.randn(2, 400, 80), torch.tensor([400, 333])
    masks = {}
    for layout in ("aligned", "overlap"):
        cfg = PretrainConfig(objective="bestrq", encoder={"preset": "tiny"},
                             task={"codes": 32, "mask_layout": layout, "mask_prob": 0.5})
        task = build_task("bestrq", cfg.encoder_config(), vars(cfg.task)).eval()
        _, mask, _, _, flen = task.masked_pass(x, lengths, [torch.Generator().manual_seed(s) for s in (3, 4)])
        masks[layout] = mask
        terms = task(x, lengths, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
        assert terms["monitor"]["masked_frames"] == int(mask.sum())
    span = BestRQConfig().mask_span
    for row, n in zip(masks["aligned"], flen.tolist()):
        slots = row[: n // span * span].reshape(-1, span)
        assert (slots.all(1) | ~slots.any(1)).all() and not row[n // span * span:].any()   # whole slots only
    # 0.5 x 99 frames / 10 = 4.95 spans (5 here): aligned masks 50 frames, overlapping spans fewer
    assert int(masks["aligned"][0].sum()) == 50 and int(masks["overlap"][0].sum()) < 50
    lap = masks["overlap"][0][: flen[0] // span * span].reshape(-1, span)
    assert not (lap.all(1) | ~lap.any(1)).all()                        # overlapping spans start anywhere
    assert BestRQConfig().mask_layout == "overlap"                    # the papers' layout by default
    with pytest.raises(ConfigError, match="task.mask_layout"):
        PretrainConfig(objective="bestrq", encoder={"preset": "tiny"}, task={"mask_layout": "sideways"})
    with pytest.raises(ValueError, match="mask_layout"):
        BestRQConfig(mask_layout="sideways")
