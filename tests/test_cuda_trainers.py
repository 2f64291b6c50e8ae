"""Every training objective on a device under mixed precision, as the shared loop runs it.

The loop moves the module (``module.to(device)``) and each collated batch (tensors only;
generators and id lists stay) to the device and calls ``loss_fn(batch, step)`` under
autocast. Each case below builds a tiny module and batch on the CPU and computes the loss
and gradients twice from the same weights and inputs: fp32 on the CPU (the reference) and
bf16 autocast on the device. The losses must be finite, computed in fp32, and within
``RTOL``/``ATOL`` of the reference.

Contrastive losses (SimCLR's NT-Xent) divide cosine similarities by a temperature tau, so a
similarity drift of delta moves the loss by up to 2 delta / tau (the positive's logit and the
log-sum-exp, which is 1-Lipschitz in the max norm, each move by at most delta / tau). Their cases
therefore check two things: the similarity matrix the loss sees agrees with fp32 within
``COS_TOL`` (the encoder's half-precision accuracy), and the loss within ``ATOL + RTOL |ref|`` plus
that bound from the measured drift (the loss itself adds nothing in fp32). A flat loss tolerance
would hold or fail by the draw of the inputs: on tiny random encoders at tau = 0.1 the loss moved by
up to 0.3 nats over 12 input draws, nearly all from the convolutions' bf16 rounding.

The ``cuda`` tests need a GPU (skipped without one); the CPU test runs the same cases under
the CPU's bf16 autocast, so CI exercises the mixed-precision path of every objective.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from test_speaker_ssl import _sv_cfg
from test_ssl import _cfg

from selfspeech.accel import to_device
from selfspeech.models.ctc import CTCModel
from selfspeech.objectives import speaker_ssl
from selfspeech.objectives.ctc import CTCTask
from selfspeech.objectives.seq2seq import WhisperSeq2Seq
from selfspeech.objectives.speaker_ssl import SpeakerSSLTask
from selfspeech.objectives.ssps import SSPSConfig, SSPSQueues
from selfspeech.objectives.tasks import TASKS
from selfspeech.train.ctc import CTCConfig

CPU = torch.device("cpu")
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% per product); on tiny models at
# initialisation the losses moved by under 0.5% on the CPU; 3% + 0.02 nats leaves room for GPU kernels
RTOL, ATOL = 3e-2, 2e-2
# cosine similarities of bf16 embeddings from a tiny random ECAPA (training-mode batch norm over 8 crops of
# noise) drifted by up to 0.05 over 30 input draws on the CPU; twice that leaves room for GPU kernels
COS_TOL = 0.1


def on_cuda(test):
    """Marked ``cuda`` and skipped without a CUDA GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@dataclass
class Case:
    """``make()`` -> (module, loss_fn) from fixed seeds; ``batch()`` -> a fresh CPU batch (new generators)."""

    make: Callable[[], tuple[torch.nn.Module, Callable]]
    batch: Callable[[], dict]
    step: int = 0
    eval_mode: bool = False   # compare in eval mode: training draws noise from the device's own RNG
    temperature: float | None = None   # NT-Xent's tau: the loss tolerance follows the similarity drift


def _mel_batch(B: int = 2, T: int = 200, n_mels: int = 80) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"x": torch.randn(B, T, n_mels, generator=g), "lengths": torch.tensor([T, T - 40]),
            "seeds": [11, 12], "ids": ["a", "b"]}


def _wave_batch(B: int = 2, N: int = 16000) -> dict:
    g = torch.Generator().manual_seed(6)
    x = 0.1 * torch.randn(B, N, generator=g)
    x[1, N - 4000:] = 0.0
    return {"x": x, "lengths": torch.tensor([N, N - 4000]), "seeds": [21, 22], "ids": ["a", "b"]}


def _ssl_case(objective: str, eval_mode: bool = False) -> Case:
    cfg = _cfg(objective, 1)

    def make():
        torch.manual_seed(0)
        task = TASKS[objective][0](cfg.encoder_config(), cfg.task)
        return task, task.loss

    return Case(make, _wave_batch if objective == "wav2vec2" else _mel_batch, eval_mode=eval_mode)


def _ctc_case(freeze_steps: int = 0) -> Case:
    cfg = CTCConfig(targets="char", encoder={"preset": "tiny", "dropout": 0.0}, freeze_steps=freeze_steps,
                    mask_time_prob=0.3, mask_time_span=3, mask_channel_prob=0.2, mask_channel_span=4)

    def make():
        torch.manual_seed(0)
        model = CTCModel(cfg.encoder_config(), vocab_size=12)
        return model, CTCTask(model, cfg).loss

    return Case(make, lambda: {**_mel_batch(), "tokens": [[1, 2, 3, 4], [5, 6, 7]]})


N_ITEMS, SPEAKER_OF = 8, torch.arange(8) % 4


def _views_batch(method: str, with_ref: bool) -> dict:
    g = torch.Generator().manual_seed(7)
    secs = [1.0, 1.0] + ([0.5, 0.5] if method == "dino" else [])
    views = [0.1 * torch.randn(4, int(s * 16000), generator=g) for s in secs]
    out = {"views": views, "view_lengths": [torch.full((4,), v.shape[1]) for v in views],
           "indices": torch.tensor([0, 1, 2, 5]), "gen": torch.Generator().manual_seed(3)}
    if with_ref:
        out["ref"] = 0.1 * torch.randn(4, 24000, generator=g)
        out["ref_lengths"] = torch.full((4,), 24000)
    return out


def _speaker_case(method: str, ssps: bool = False) -> Case:
    cfg = _sv_cfg(method, 1, ssps=ssps)

    def make():
        torch.manual_seed(0)
        task = SpeakerSSLTask(cfg, N_ITEMS, SPEAKER_OF.clone())
        if ssps:  # queues filled, clustered, switched on: the loss draws pseudo-positives
            q, g = task.ssps, torch.Generator().manual_seed(1)
            q.push_ref(torch.arange(N_ITEMS), torch.randn(N_ITEMS, q.ref.shape[1], generator=g))
            q.push_pos(torch.arange(N_ITEMS), [torch.randn(N_ITEMS, q.pos.shape[2], generator=g)
                                               for _ in range(q.pos.shape[0])])
            assert q.cluster(seed=0)["skipped"] == 0
            q.active.fill_(True)
            task.fill_ref.fill_(True)
        return task, task.loss

    return Case(make, lambda: _views_batch(method, ssps), temperature=cfg.temperature if method == "simclr" else None)


def _whisper_case(model_dir) -> Case:
    def make():
        from transformers import WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32,
                                                                use_safetensors=True, attn_implementation="sdpa")
        return model.train(), WhisperSeq2Seq(model)

    def batch():
        g = torch.Generator().manual_seed(8)
        labels = torch.randint(0, 1000, (2, 7), generator=g)
        labels[1, 5:] = -100
        return {"input_features": torch.randn(2, 80, 120, generator=g), "labels": labels}

    return Case(make, batch)


CASES = {"ctc": lambda: _ctc_case(), "ctc-frozen": lambda: _ctc_case(freeze_steps=1),
         "wav2vec2": lambda: _ssl_case("wav2vec2"), "bestrq": lambda: _ssl_case("bestrq"),
         "birq": lambda: _ssl_case("birq"), "simclr": lambda: _speaker_case("simclr"),
         "dino": lambda: _speaker_case("dino"), "simclr-ssps": lambda: _speaker_case("simclr", ssps=True),
         "dino-ssps": lambda: _speaker_case("dino", ssps=True)}


def run_case(case: Case, device: torch.device, dtype: torch.dtype | None,
             seen: list | None = None) -> tuple[torch.Tensor, dict, list]:
    """Loss (detached, on the CPU), record and CPU gradients of one step of ``case`` on ``device``,
    under ``dtype`` autocast (None: fp32), moved as the training loop moves module and batch.

    ``seen``: gets the (2B, 2B) cosine-similarity matrix each NT-Xent call compared (CPU, fp32)."""
    module, loss_fn = case.make()
    module.to(device).train(not case.eval_mode)
    batch = to_device(case.batch(), device)
    torch.manual_seed(0)  # the CTC masks and the wav2vec 2.0 Gumbel noise draw from the global RNG
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx, _recording_similarities(seen):
        loss, rec = loss_fn(batch, case.step)
    loss.backward()
    grads = [p.grad.detach().float().cpu() for p in module.parameters() if p.grad is not None]
    return loss.detach().cpu(), rec, grads


@contextlib.contextmanager
def _recording_similarities(seen: list | None):
    """Wrap the speaker-SSL task's ``nt_xent`` to append the cosine similarities of its inputs to ``seen``."""
    if seen is None:
        yield
        return
    real = speaker_ssl.nt_xent

    def recording(z1, z2, temperature):
        z = torch.nn.functional.normalize(torch.cat([z1, z2]).detach().float(), dim=-1)
        seen.append((z @ z.T).cpu())
        return real(z1, z2, temperature)

    speaker_ssl.nt_xent = recording
    try:
        yield
    finally:
        speaker_ssl.nt_xent = real


def check_close(case: Case, device: torch.device) -> None:
    ref_sims, sims = ([], []) if case.temperature else (None, None)
    ref, ref_rec, ref_grads = run_case(case, CPU, None, ref_sims)
    got, rec, grads = run_case(case, device, torch.bfloat16, sims)
    assert got.dtype == torch.float32, f"the loss is {got.dtype}: computed in half precision"
    assert math.isfinite(float(got)) and math.isfinite(float(ref))
    tol = ATOL + RTOL * abs(float(ref))
    if case.temperature:
        assert len(sims) == len(ref_sims) == 1, "one NT-Xent call per step"
        drift = float((sims[0] - ref_sims[0]).abs().max())
        assert drift <= COS_TOL, f"bf16 moved a cosine similarity by {drift:.4f}"
        tol += 2 * drift / case.temperature
    assert abs(float(got) - float(ref)) <= tol, (float(got), float(ref), tol)
    assert len(grads) == len(ref_grads) and grads, "the same parameters get gradients"
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    if "ssps_coverage" in ref_rec:  # pseudo-positives were drawn, the same ones on both sides
        assert ref_rec["ssps_coverage"] > 0 and rec["ssps_coverage"] == ref_rec["ssps_coverage"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_under_cpu_bf16_autocast_is_close_to_fp32(name):
    torch.set_num_threads(1)
    check_close(CASES[name](), CPU)


def test_whisper_seq2seq_under_cpu_bf16_autocast_is_close_to_fp32(tiny_whisper_dir):
    torch.set_num_threads(1)
    check_close(_whisper_case(tiny_whisper_dir), CPU)


@on_cuda
@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_on_cuda_bf16_is_close_to_cpu_fp32(name):
    case = CASES[name]()
    if name == "wav2vec2":
        # trains on the GPU; the comparison needs the same codes, and the Gumbel noise comes from
        # the GPU's generator in training: compared in eval mode (argmax codes)
        loss, _, grads = run_case(case, torch.device("cuda"), torch.bfloat16)
        assert math.isfinite(float(loss)) and all(torch.isfinite(g).all() for g in grads)
        case.eval_mode = True
    check_close(case, torch.device("cuda"))


@on_cuda
def test_whisper_seq2seq_on_cuda_bf16_is_close_to_cpu_fp32(tiny_whisper_dir):
    check_close(_whisper_case(tiny_whisper_dir), torch.device("cuda"))


@on_cuda
def test_ssps_queues_cluster_and_sample_on_cuda_as_on_the_cpu():
    """Pushing (wrapping round the queue), k-means (sklearn on a CPU copy), the oracle clusters and
    sampling give the CPU's results."""
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False  # centroid order
    try:
        for oracle in (False, True):
            _same_queues_on_cuda(oracle)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _same_queues_on_cuda(oracle: bool) -> None:
    cpu = SSPSQueues(SSPSConfig(k=3, m=1, queue=10, oracle=oracle), n_items=12, ref_dim=4, pos_dim=5)
    dev = SSPSQueues(cpu.cfg, n_items=12, ref_dim=4, pos_dim=5).cuda()
    g = torch.Generator().manual_seed(0)
    ref, pos = torch.randn(12, 4, generator=g), torch.randn(12, 5, generator=g)
    speakers = torch.arange(12) % 3
    for q, d in ((cpu, CPU), (dev, torch.device("cuda"))):
        q.push_ref(torch.arange(12, device=d), ref.to(d))
        q.push_pos(torch.arange(12, device=d), [pos.to(d)])
        q.cluster(seed=0, speaker_of=speakers.to(d))
    for name in ("assign", "neighbours", "pos_idx", "pos_ptr"):
        assert torch.equal(getattr(cpu, name), getattr(dev, name).cpu()), name
    assert torch.allclose(cpu.centroids, dev.centroids.cpu(), atol=1e-5)
    idx = torch.tensor([0, 4, 7])
    rows, stats = cpu.sample(idx, torch.Generator().manual_seed(2), speakers)
    rows_d, stats_d = dev.sample(idx.cuda(), torch.Generator().manual_seed(2), speakers.cuda())
    assert rows_d.is_cuda and torch.equal(rows, rows_d.cpu()) and stats == stats_d
    z = torch.zeros(3, 5)
    assert torch.equal(cpu.apply(0, z, rows), dev.apply(0, z.cuda(), rows_d).cpu())


def test_ssps_push_of_more_entries_than_the_queue_keeps_the_last_ones():
    """A gathered batch larger than the queue: the last Q entries, where a sequential write leaves them."""
    q = SSPSQueues(SSPSConfig(k=2, queue=4), n_items=8, ref_dim=2, pos_dim=1)
    q.push_pos(torch.arange(3), [torch.zeros(3, 1)])                      # pointer at 3
    q.push_pos(torch.arange(3, 9) % 8, [torch.arange(3.0, 9.0)[:, None]])  # 6 entries into 4 rows
    # rows 3, 0, 1, 2, 3, 0 in turn: the last writes are entries 5, 6, 7 (rows 1-3) and 8 (row 0)
    assert q.pos_idx.tolist() == [0, 5, 6, 7] and int(q.pos_ptr) == 1
    assert q.pos[0, :, 0].tolist() == [8.0, 5.0, 6.0, 7.0]


@on_cuda
def test_speaker_ssl_after_update_reclusters_on_cuda():
    """The trainer's per-step hook (teacher EMA, SSPS activation, re-clustering) on device buffers."""
    case = _speaker_case("dino", ssps=True)
    task, loss_fn = case.make()
    task.cuda()
    assert task.speaker_of.is_cuda  # a (non-persistent) buffer: moves with the module
    loss, _ = loss_fn(to_device(case.batch(), torch.device("cuda")), 0)
    loss.backward()
    stats = task.after_update(step=1, progress=0.5, steps_per_epoch=1, seed=0)
    assert stats is not None and stats["kmeans_skipped"] == 0
    assert task.ssps.assign.is_cuda and (task.ssps.assign >= 0).all()
