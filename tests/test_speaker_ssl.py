"""Self-supervised speaker verification: ECAPA-TDNN, NT-Xent, DINO, SSPS, the trainer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from selfspeech.models.ecapa import ECAPAConfig, ECAPATDNN, SpeakerEncoder
from selfspeech.objectives.speaker import (DINOHead, cosine_momentum, dino_loss, ema_update, nt_xent,
                                           update_center)
from selfspeech.objectives.ssps import SSPSConfig, SSPSQueues


def test_nt_xent_matches_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    loss, acc = nt_xent(z1, z2, t)
    # each anchor: positive cos 1, other views cos 0, 0 (self excluded) -> -log(e^2 / (e^2 + 2))
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0)))
    assert loss.item() == pytest.approx(expected, rel=1e-6) and acc.item() == 1.0
    # swapping the positives makes every positive the least similar candidate
    loss_bad, acc_bad = nt_xent(z1, z2.flip(0), t)
    assert loss_bad > loss and acc_bad.item() == 0.0


def test_dino_loss_centring_and_ema():
    s = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]])]
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    c = torch.zeros(2)
    loss = dino_loss(s, t, c, t_student=1.0, t_teacher=1.0)
    q = [torch.softmax(x, -1) for x in t]
    lp = [torch.log_softmax(x, -1) for x in s]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]                     # v != i: a crop never predicts itself
    expected = sum(-(q[i] * lp[v]).sum() for i, v in pairs) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    update_center(c, t, momentum=0.9)
    assert torch.allclose(c, torch.tensor([0.05, 0.05]))
    # a centre equal to a teacher output flattens that target to uniform
    flat = dino_loss([torch.zeros(1, 2), torch.zeros(1, 2)], [t[0], t[0]], t[0][0], 1.0, 1.0)
    assert flat.item() == pytest.approx(math.log(2), rel=1e-6)
    assert cosine_momentum(0.0) == pytest.approx(0.996) and cosine_momentum(1.0) == pytest.approx(1.0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update(a, b, 0.75)
    assert torch.allclose(a.weight, 0.75 * wa + 0.25 * wb)
    head = DINOHead(4, 8, 3, 5)
    assert head(torch.randn(2, 4)).abs().max() <= 1.0 + 1e-6     # cosines to the prototypes


def test_ecapa_masked_pooling_is_padding_invariant():
    torch.manual_seed(0)
    m = ECAPATDNN(ECAPAConfig.preset("tiny")).eval()
    x = torch.randn(2, 120, 40)
    e = m(x, torch.tensor([120, 70]))
    alone = m(x[1:, :70])
    assert e.shape == (2, 32) and torch.allclose(e[1], alone[0], atol=1e-4)
    with pytest.raises(ValueError, match="divisible"):
        ECAPAConfig(channels=30, scale=8)


def _queues(k=2, m=0, queue=6, n=6):
    q = SSPSQueues(SSPSConfig(k=k, m=m, queue=queue), n_items=n, ref_dim=2, pos_dim=3)
    return q


def test_ssps_queue_wraps_and_clusters_sample_from_the_right_cluster():
    q = _queues(queue=4)
    q.push_pos(torch.tensor([0, 1, 2]), [torch.ones(3, 3)])
    q.push_pos(torch.tensor([3, 4, 5]), [2 * torch.ones(3, 3)])
    assert q.pos_idx.tolist() == [4, 5, 2, 3] and int(q.pos_ptr) == 2   # oldest entries overwritten
    # two well separated groups of utterances: {0,1,2} and {3,4,5}
    ref = torch.tensor([[1, 0.05], [1, 0], [1, -0.05], [0.05, 1], [0, 1], [-0.05, 1]])
    q.push_ref(torch.arange(6), ref)
    assert q.cluster(seed=0)["skipped"] == 0
    a = q.assign.tolist()
    assert a[0] == a[1] == a[2] != a[3] == a[4] == a[5]
    gen = torch.Generator().manual_seed(0)
    rows, stats = q.sample(torch.tensor([3, 2]), gen, speaker_of=torch.tensor([0, 0, 0, 1, 1, 1]))
    # anchor 3 -> another utterance of its cluster in the queue (4 or 5); anchor 2 -> only 2 itself is
    # queued from its cluster, so no pseudo-positive: fallback (-1)
    assert q.pos_idx[rows[0]].item() in (4, 5) and rows[1].item() == -1
    assert stats["ssps_coverage"] == 0.5 and stats["ssps_speaker_acc"] == 1.0
    z = torch.zeros(2, 3)
    out = q.apply(0, z, rows)
    assert torch.equal(out[0], q.pos[0, rows[0]]) and torch.equal(out[1], z[1])
    # half-precision projections (autocast) keep the fp32 queue entry unrounded and their own values
    q.pos[0, rows[0]] = 1 + 2.0 ** -12                                     # not representable in bf16
    zh = torch.full((2, 3), 0.5, dtype=torch.bfloat16)
    out = q.apply(0, zh, rows)
    assert out.dtype == torch.float32 and torch.equal(out[0], q.pos[0, rows[0]])
    assert torch.equal(out[1], zh[1].float()) and torch.equal(zh, torch.full((2, 3), 0.5, dtype=torch.bfloat16))


def test_ssps_neighbour_clusters_exclude_own_cluster_when_m_positive():
    q = SSPSQueues(SSPSConfig(k=3, m=1, queue=8), n_items=6, ref_dim=2, pos_dim=1)
    ref = torch.tensor([[1, 0], [1, 0.02], [0.9, 0.44], [0.88, 0.48], [-1, 0], [-1, 0.02]])
    q.push_ref(torch.arange(6), ref)
    q.cluster(seed=0)
    c = q.assign.tolist()
    near = {c[0]: c[2], c[2]: c[0], c[4]: c[2]}                  # nearest other cluster by centroid cosine
    assert {k: q.neighbours[k, 0].item() for k in near} == near
    q.push_pos(torch.arange(6), [torch.arange(6.0)[:, None]])
    rows, _ = q.sample(torch.tensor([0, 4]), torch.Generator().manual_seed(1))
    got = q.pos_idx[rows].tolist()
    assert got[0] in (2, 3) and got[1] in (2, 3)                 # never from the anchor's own cluster


def test_ssps_rejects_k_above_queue_and_skips_unfilled():
    with pytest.raises(ValueError, match="larger than the reference queue"):
        SSPSQueues(SSPSConfig(k=10), n_items=5, ref_dim=2, pos_dim=2)
    with pytest.raises(ValueError, match="m \\+ 1 clusters"):
        SSPSConfig(k=2, m=2)
    q = _queues(k=3)
    q.push_ref(torch.tensor([0, 1]), torch.randn(2, 2))
    assert q.cluster()["skipped"] == 1 and (q.assign == -1).all()   # 2 filled < k = 3


def test_ssps_oracle_clusters_are_the_true_speakers_not_the_geometry():
    q = SSPSQueues(SSPSConfig(k=3, oracle=True, queue=8), n_items=6, ref_dim=2, pos_dim=1)
    ref = torch.tensor([[1, 0.05], [1, 0], [1, -0.05], [0.05, 1], [0, 1], [-0.05, 1]])
    q.push_ref(torch.arange(5), ref[:5])                          # item 5 not embedded yet
    speakers = torch.tensor([7, 9, 7, 9, 4, 4])                   # across the two geometric groups
    assert q.cluster(speaker_of=speakers)["skipped"] == 0        # 5 filled >= k not required
    a = q.assign.tolist()
    assert a[0] == a[2] and a[1] == a[3] and len({a[0], a[1], a[4]}) == 3 and a[5] == -1
    q.push_pos(torch.arange(5), [torch.arange(5.0)[:, None]])
    rows, stats = q.sample(torch.tensor([0, 1, 4]), torch.Generator().manual_seed(0), speakers)
    assert q.pos_idx[rows[:2]].tolist() == [2, 3] and rows[2].item() == -1   # 4's speaker-mate unqueued
    assert stats["ssps_speaker_acc"] == 1.0
    small = SSPSQueues(SSPSConfig(k=2, oracle=True), n_items=6, ref_dim=2, pos_dim=1)
    small.push_ref(torch.arange(6), ref)
    with pytest.raises(ValueError, match="set ssps.k >= 3"):
        small.cluster(speaker_of=speakers)
    with pytest.raises(ValueError, match="no 'speaker' field"):
        q.cluster()


def _speaker_corpus(tmp_path, n_spk=4, per=4):
    """Speakers differ by pitch and a formant-like resonance; utterances by duration and noise."""
    rng = np.random.default_rng(0)
    items = []
    for s in range(n_spk):
        for u in range(per):
            dur = 1.2 + 0.4 * u
            t = np.arange(int(dur * 16000)) / 16000
            f0 = 100 + 40 * s
            w = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
            w = (0.1 * w + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
            p = tmp_path / f"s{s}u{u}.wav"
            sf.write(p, w, 16000)
            items.append({"id": f"s{s}u{u}", "audio_filepath": str(p), "duration": dur, "speaker": f"s{s}"})
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(it) + "\n" for it in items))
    return m


def _sv_cfg(method, steps, ssps=True, **kw):
    from selfspeech.train.speaker import SpeakerSSLConfig

    base = dict(
        method=method, ecapa={"preset": "tiny"}, batch_size=8, segment_seconds=1.0, local_seconds=0.5, n_local=2,
        dino_out=32, dino_hidden=32, dino_bottleneck=16, projector=(32, 16), temperature=0.1,
        augment={"p_reverb": 0.0, "rir_pool": 4},
        ssps={"k": 4, "m": 0, "queue": 16, "start": 0.3, "ref_seconds": 1.5} if ssps else None,
        loop={"max_steps": steps, "lr": 3e-3, "log_every": 1, "ckpt_every": 3, "warmup_fraction": 0.1})
    return SpeakerSSLConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_speaker_ssl_trains_with_ssps_and_exports_an_encoder(tmp_path, method):
    from selfspeech.train.speaker import train_speaker

    torch.set_num_threads(1)
    m = _speaker_corpus(tmp_path)
    s = train_speaker(m, tmp_path / "out", _sv_cfg(method, 12), progress=False)
    assert s["steps"] == 12 and s["ssps_clusterings"] >= 2          # re-clustered at epoch starts
    assert s["padded_short"]["count"] == 0
    log = [json.loads(x) for x in open(tmp_path / "out" / "log.jsonl")]
    recs = [r for r in log if "loss" in r]
    assert any("ssps_coverage" in r for r in recs[4:]) and not any("ssps_coverage" in r for r in recs[:2])
    assert any("kmeans_filled" in r for r in recs)
    enc = SpeakerEncoder.load(tmp_path / "out")                    # run dir -> its encoder/
    e = enc.embed_batch([np.zeros(16000, np.float32) + 0.01, np.ones(8000, np.float32) * 0.1])
    assert e.shape == (2, 32) and np.isfinite(e).all()


def test_simclr_lowers_its_loss(tmp_path):
    from selfspeech.train.speaker import train_speaker

    torch.set_num_threads(1)
    m = _speaker_corpus(tmp_path)
    train_speaker(m, tmp_path / "out", _sv_cfg("simclr", 40, ssps=False, augment=None), progress=False)
    losses = [json.loads(x)["loss"] for x in open(tmp_path / "out" / "log.jsonl") if '"loss"' in x]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4]), losses


def test_simclr_without_projector_trains_the_embedding_itself(tmp_path):
    """projector None (sslsv's SSPS configs): NT-Xent and the SSPS positive queue on the 32-dim embedding."""
    from selfspeech.objectives.speaker_ssl import SpeakerSSLTask
    from selfspeech.train.speaker import SpeakerSSLConfig, train_speaker

    torch.set_num_threads(1)
    m = _speaker_corpus(tmp_path)
    cfg = _sv_cfg("simclr", 6, projector=None)
    assert SpeakerSSLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    task = SpeakerSSLTask(cfg, n_items=10)
    assert sum(p.numel() for p in task.head.parameters()) == 0 and task.ssps.pos.shape[-1] == 32
    s = train_speaker(m, tmp_path / "out", cfg, progress=False)
    assert s["steps"] == 6 and s["ssps_clusterings"] >= 1
    with pytest.raises(ValueError, match="projector"):  # a projector run does not resume as a head-less one
        train_speaker(m, tmp_path / "out", _sv_cfg("simclr", 6), progress=False)


def test_dino_ssps_resume_equals_uninterrupted(tmp_path):
    """Teacher EMA, centre, SSPS queues and clusters are checkpointed: a killed run resumes exactly."""
    import selfspeech.train.speaker as S
    from selfspeech.models.ssl import load_state

    torch.set_num_threads(1)
    m = _speaker_corpus(tmp_path)
    S.train_speaker(m, tmp_path / "full", _sv_cfg("dino", 8), progress=False)

    class Kill(Exception):
        pass

    orig = S.train_loop

    def killing(*a, **k):
        k["on_step"] = lambda rec: (_ for _ in ()).throw(Kill()) if rec["step"] == 7 else None
        return orig(*a, **k)

    S.train_loop = killing
    try:
        with pytest.raises(Kill):
            S.train_speaker(m, tmp_path / "cut", _sv_cfg("dino", 8), progress=False)
    finally:
        S.train_loop = orig
    S.train_speaker(m, tmp_path / "cut", _sv_cfg("dino", 8), progress=False)   # resumes from step 6
    a, b = load_state(tmp_path / "full" / "best"), load_state(tmp_path / "cut" / "best")
    assert any(k.startswith("ssps.") for k in a) and any(k.startswith("teacher_encoder.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_speaker_config_errors(tmp_path):
    from selfspeech.train.speaker import SpeakerSSLConfig, train_speaker

    with pytest.raises(ValueError, match="method"):
        SpeakerSSLConfig(method="byol")
    with pytest.raises(ValueError, match="metod: 'dino' is set under an unknown key; did you mean 'method'"):
        SpeakerSSLConfig.from_dict({"metod": "dino"})
    m = _speaker_corpus(tmp_path, n_spk=1, per=2)
    with pytest.raises(ValueError, match="batch_size"):
        train_speaker(m, tmp_path / "o", _sv_cfg("simclr", 2, ssps=False), progress=False)


def test_trained_encoder_plugs_into_pseudo2real_sc(tmp_path):
    """Pseudo2Real-SC takes a `sv train` folder as its extractor; its cache keys on the weights."""
    from selfspeech.cluster.extractors import extractor_fingerprint, get_extractor
    from selfspeech.cluster.speakers import embed_manifest
    from selfspeech.data.manifest import read_manifest
    from selfspeech.models.ecapa import save_speaker_encoder

    torch.manual_seed(0)
    model = ECAPATDNN(ECAPAConfig.preset("tiny"))
    save_speaker_encoder(model, tmp_path / "run" / "encoder")
    m = _speaker_corpus(tmp_path, n_spk=2, per=2)
    ex = get_extractor(str(tmp_path / "run"))
    emb = embed_manifest(list(read_manifest(m)), ex)
    assert len(emb) == 4 and all(v.shape == (32,) for v in emb.values())
    before = extractor_fingerprint(str(tmp_path / "run"))
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    save_speaker_encoder(model, tmp_path / "run" / "encoder")
    assert extractor_fingerprint(str(tmp_path / "run")) != before and "sha256" in before
    with pytest.raises(ValueError, match="sv train"):
        get_extractor(str(tmp_path / "nothing"))


def test_sv_embed_does_not_load_the_pseudo2real_pipeline(tmp_path):
    """`sv embed` depends on the cluster layer only: no module of selfspeech.adapt is imported."""
    import subprocess
    import sys

    m = _speaker_corpus(tmp_path, n_spk=2, per=1)
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom selfspeech.cli import app\n"
            f"res = CliRunner().invoke(app, ['sv', 'embed', 'melstats', {str(m)!r}, '--out', {str(tmp_path / 'e')!r},"
            " '--no-plot'])\nassert res.exit_code == 0, res.output\n"
            "print(sorted(n for n in sys.modules if n.startswith('selfspeech.adapt')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "e" / "utterances.npz").is_file()
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_sv_cli_train_embed_score(tmp_path):
    """The three commands chained; a broken utterance is skipped and counted, unknown trial ids too."""
    import yaml
    from typer.testing import CliRunner

    from selfspeech.cli import app

    torch.set_num_threads(1)
    m = _speaker_corpus(tmp_path, n_spk=3, per=3)
    cfg = _sv_cfg("simclr", 3, ssps=False).to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner()
    res = r.invoke(app, ["sv", "train", str(tmp_path / "c.yaml"), "--manifest", str(m), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    # --fork-from: the SSPS continuation of that run; a checkpoint that is not there is a one-line error
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(_sv_cfg("simclr", 3, ssps=True).to_dict()))
    res = r.invoke(app, ["sv", "train", str(tmp_path / "c2.yaml"), "--manifest", str(m), "--out", str(tmp_path / "f"),
                         "--fork-from", str(tmp_path / "run" / "keep" / "step-2")])
    assert res.exit_code == 2 and "no complete checkpoint to fork" in res.output and "keep_every" in res.output
    res = r.invoke(app, ["sv", "train", str(tmp_path / "c2.yaml"), "--manifest", str(m), "--out", str(tmp_path / "f"),
                         "--fork-from", str(tmp_path / "run" / "last")])
    assert res.exit_code == 0, res.output                                        # forked at the end: nothing left
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["steps"] == 3 and any(
        json.loads(x).get("event") == "fork" for x in open(tmp_path / "f" / "log.jsonl"))
    items = [json.loads(x) for x in open(m)]
    items.append({"id": "broken", "audio_filepath": str(tmp_path / "missing.wav"), "duration": 1.0, "speaker": "s0"})
    m2 = tmp_path / "m2.jsonl"
    m2.write_text("".join(json.dumps(it) + "\n" for it in items))
    res = r.invoke(app, ["sv", "embed", str(tmp_path / "run"), str(m2), "--out", str(tmp_path / "emb")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "emb" / "summary.json").read_text())
    assert summary["utterances"] == 9 and summary["speakers"] == 3 and [s["id"] for s in summary["skipped"]] == ["broken"]
    assert (tmp_path / "emb" / "embeddings.png").stat().st_size > 0
    res = r.invoke(app, ["sv", "score", str(tmp_path / "emb" / "utterances.npz"), "--manifest", str(m),
                         "--out", str(tmp_path / "score")])
    assert res.exit_code == 0, res.output
    met = json.loads((tmp_path / "score" / "metrics.json").read_text())
    assert met["trials"] == 36 and 0 <= met["cosine"]["eer"] <= 1                 # 9 utterances: every pair
    (tmp_path / "t.txt").write_text("s0u0 s0u1 target\ns0u0 ghost nontarget\ns1u0 s2u0 nontarget\n")
    res = r.invoke(app, ["sv", "score", str(tmp_path / "emb" / "utterances.npz"), "--trials", str(tmp_path / "t.txt"),
                         "--out", str(tmp_path / "score2")])
    assert res.exit_code == 2 and "ghost" in res.output
    res = r.invoke(app, ["sv", "score", str(tmp_path / "emb" / "utterances.npz"), "--trials", str(tmp_path / "t.txt"),
                         "--on-unknown", "skip", "--out", str(tmp_path / "score2")])
    assert res.exit_code == 0 and json.loads((tmp_path / "score2" / "metrics.json").read_text())["skipped_trials"] == 1


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_ssps_fork_continues_the_base_run_exactly_until_ssps_switches_on(tmp_path, method):
    """SSPS on a trained SimCLR/DINO (the paper's protocol): the fork resumes the kept base checkpoint
    (for DINO also its EMA teacher and centre, or the loss would differ before SSPS)."""
    from selfspeech.train.speaker import train_speaker

    torch.set_num_threads(1)
    m = _speaker_corpus(tmp_path)
    base_cfg = _sv_cfg(method, 12, ssps=False)
    base_cfg = type(base_cfg).from_dict({**base_cfg.to_dict(), "loop": {**base_cfg.to_dict()["loop"], "keep_every": 6}})
    train_speaker(m, tmp_path / "base", base_cfg, progress=False)
    kept = tmp_path / "base" / "keep" / "step-6"
    assert sorted(p.name for p in (tmp_path / "base" / "keep").iterdir()) == ["step-12", "step-6"]  # not 3, 9
    fork_cfg = _sv_cfg(method, 12, ssps=True)
    fork_cfg = type(fork_cfg).from_dict({**fork_cfg.to_dict(), "ssps": {**fork_cfg.to_dict()["ssps"], "start": 0.62}})
    s = train_speaker(m, tmp_path / "fork", fork_cfg, progress=False, fork_from=kept)
    assert s["steps"] == 12 and s["ssps_clusterings"] >= 1

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / run / "log.jsonl")) if "loss" in r}
    a, b = losses("base"), losses("fork")
    assert all(a[k] == b[k] for k in range(1, 8)), (a, b)       # shared prefix, and step 7 before SSPS is on
    assert any(a[k] != b[k] for k in range(9, 13))               # then pseudo-positives change the loss
    events = [json.loads(x) for x in open(tmp_path / "fork" / "log.jsonl")]
    assert any(e.get("event") == "fork" and e["step"] == 6 for e in events)
    # a fork that is not the same run (another learning rate) is refused, naming the difference
    other = type(fork_cfg).from_dict({**fork_cfg.to_dict(), "loop": {**fork_cfg.to_dict()["loop"], "lr": 1e-3}})
    with pytest.raises(ValueError, match=r"differs by more than .*speaker_ssl\.ssps.*speaker_ssl\.loop\.lr"):
        train_speaker(m, tmp_path / "bad", other, progress=False, fork_from=kept)
    with pytest.raises(FileNotFoundError, match="keep_every"):
        train_speaker(m, tmp_path / "bad2", fork_cfg, progress=False, fork_from=tmp_path / "base" / "keep" / "x")
