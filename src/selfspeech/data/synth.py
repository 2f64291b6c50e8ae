"""A small synthetic speech corpus in several English accents, made with eSpeak NG.

eSpeak NG comes from the ``espeakng-loader`` wheel (library plus voice data),
driven through ctypes (POSIX: dlopen/dlclose): no root, no system package, no
network. Accents are
English ones eSpeak models (American, RP, Scottish, Caribbean, ...) or
foreign-accented English: another language's voice reads the English text
with its own letter-to-sound rules, a shift that is systematic (one spelling,
one mispronunciation), which is what fine-tuning can learn. Speakers differ by
voice variant (``+m3``, ``+f2``), rate, pitch and pitch range; each utterance
gets light pink noise. Every draw is keyed by (seed, accent, speaker,
utterance): same arguments, same manifest, same samples.
"""
from __future__ import annotations

import _ctypes
import atexit
import ctypes
import json
import os
import shutil
import tempfile
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..audio.io import SAMPLE_RATE, write_audio
from .atomic import write_json
from .manifest import write_manifest
from .sentences import assign_sentences


class VoiceNotFoundError(ValueError):
    """An eSpeak voice or variant that the bundled espeak-ng-data does not have."""


class SynthError(RuntimeError):
    """eSpeak NG could not be loaded or failed to synthesise."""


# ---- ctypes binding; names and values from espeak-ng's speak_lib.h ----
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # like RETRIEVAL, but espeak_Synth returns when done
_POS_CHARACTER, _CHARS_UTF8, _EE_OK = 1, 1, 0
_RATE, _VOLUME, _PITCH, _RANGE, _PUNCTUATION, _CAPITALS, _WORDGAP = 1, 2, 3, 4, 5, 6, 7
_C = ctypes
# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); events unused
_SYNTH_CB = _C.CFUNCTYPE(_C.c_int, _C.POINTER(_C.c_short), _C.c_int, _C.c_void_p)


class _Voice(_C.Structure):
    # espeak_VOICE. ``languages`` holds (priority byte, NUL-terminated code)
    # pairs, so it is read as a raw pointer, not a C string.
    _fields_ = [("name", _C.c_char_p), ("languages", _C.c_void_p), ("identifier", _C.c_char_p),
                ("gender", _C.c_ubyte), ("age", _C.c_ubyte), ("variant", _C.c_ubyte),
                ("xx1", _C.c_ubyte), ("score", _C.c_int), ("spare", _C.c_void_p)]


_SIGNATURES = {  # name: (restype, argtypes)
    "espeak_Initialize": (_C.c_int, [_C.c_int, _C.c_int, _C.c_char_p, _C.c_int]),
    "espeak_SetSynthCallback": (None, [_SYNTH_CB]),
    "espeak_SetVoiceByName": (_C.c_int, [_C.c_char_p]),
    "espeak_SetParameter": (_C.c_int, [_C.c_int, _C.c_int, _C.c_int]),
    "espeak_Synth": (_C.c_int, [_C.c_char_p, _C.c_size_t, _C.c_uint, _C.c_int, _C.c_uint, _C.c_uint,
                                _C.c_void_p, _C.c_void_p]),
    "espeak_Synchronize": (_C.c_int, []),
    "espeak_Terminate": (_C.c_int, []),
    "espeak_ListVoices": (_C.POINTER(_C.POINTER(_Voice)), [_C.c_void_p]),
}


class _Library:
    """One freshly loaded and initialised libespeak-ng.

    eSpeak keeps synthesis state in C statics that neither espeak_Terminate
    nor espeak_Initialize resets (pitch-flutter phase, glottal cycle count,
    gain control): the same text comes out a few samples different on every
    call. A pristine load per utterance (~6 ms) makes the output depend on
    (text, voice, parameters) only.
    """

    def __init__(self, so_path: str, data_path: str) -> None:
        self.lib = lib = _C.CDLL(so_path, mode=_C.RTLD_LOCAL)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        # buflength 0 = default 60 ms chunks; options 0 = no phoneme events.
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if self.sample_rate <= 0:
            self.close(terminate=False)
            raise SynthError(f"espeak_Initialize failed with data path {data_path}")
        self.chunks: list[np.ndarray] = []
        # Keep a reference: a collected ctypes trampoline would be called after free.
        self._callback = _SYNTH_CB(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if wav and n > 0:  # wav == NULL marks the end; n == 0 is an event-only chunk
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue

    def close(self, terminate: bool = True) -> None:
        if terminate:
            self.lib.espeak_Terminate()
        handle = self.lib._handle
        del self.lib
        _ctypes.dlclose(handle)  # refcount 0 -> unloaded: the next load starts pristine


class _Engine:
    """What the bundled eSpeak offers, and synthesis with a fresh library each time."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:
            raise SynthError("eSpeak NG is missing: pip install espeakng-loader") from e
        # A private copy of the .so: loading the wheel's own path would share,
        # and our reloads would reset, an instance another library in this
        # process may use (a phonemizer, say). And a private view of the data.
        tmp, pid = tempfile.mkdtemp(prefix="selfspeech-espeak-"), os.getpid()
        atexit.register(lambda: os.getpid() == pid and shutil.rmtree(tmp, True))  # not in forked children
        self.so_path = os.path.join(tmp, "libespeak-ng-selfspeech.so")
        shutil.copyfile(espeakng_loader.get_library_path(), self.so_path)
        self.data_path = _mirror_data(espeakng_loader.get_data_path(), os.path.join(tmp, "espeak-ng-data"))
        try:
            lib = _Library(self.so_path, self.data_path)
        except OSError as e:
            raise SynthError(f"cannot load libespeak-ng from espeakng-loader ({e})") from None
        try:
            self.sample_rate = lib.sample_rate  # 22050 Hz for the bundled voices
            self.voices, self.aliases = _list_voices(lib.lib)
        finally:
            lib.close()
        self.libc = _C.CDLL(None)  # the C library libespeak-ng takes rand() from (POSIX)
        self.libc.srand.argtypes, self.libc.srand.restype = [_C.c_uint], None
        self.variants = sorted(p.name for p in (Path(self.data_path) / "voices" / "!v").iterdir())

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        ident = _resolve_voice(voice, self)
        lib = _Library(self.so_path, self.data_path)
        try:
            c = lib.lib
            if c.espeak_SetVoiceByName(ident.encode()) != _EE_OK:
                raise VoiceNotFoundError(_voice_message(voice, self))
            for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_VOLUME, 100),
                                 (_PUNCTUATION, 0), (_CAPITALS, 0), (_WORDGAP, 0)):
                c.espeak_SetParameter(param, int(value), 0)
            data = text.encode("utf-8") + b"\0"
            # libespeak-ng draws some noise from libc rand(): seed it from the
            # request, or that noise would depend on what ran before.
            self.libc.srand(zlib.crc32(repr((text, voice, rate, pitch, pitch_range)).encode()))
            # Synchronous mode returns once every chunk went through the callback;
            # espeak_Synchronize is then a no-op, kept in case the mode changes.
            err = c.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            c.espeak_Synchronize()
            if err != _EE_OK:
                raise SynthError(f"espeak_Synth failed with code {err} for {text[:60]!r} (voice {voice!r})")
            chunks = lib.chunks
        finally:
            lib.close()
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


def _mirror_data(src: str, dst: str) -> str:
    """Symlink espeak-ng-data into ``dst``, with voice variants stripped of breath noise.

    Breath (the ``breath`` lines of f2, f3, f5, ...) makes those voices differ
    between processes, an uninitialised read somewhere in libespeak-ng, so it
    goes. Whisper tiny.en barely notices: 26-30% WER on en-us with, 27-30% without.
    """
    source, out = Path(src), Path(dst)
    for sub, skip in (("", "voices"), ("voices", "!v")):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for p in (source / sub).iterdir():
            if p.name != skip:
                (out / sub / p.name).symlink_to(p)
    (out / "voices" / "!v").mkdir()
    for p in (source / "voices" / "!v").iterdir():
        lines = p.read_bytes().splitlines(keepends=True)
        kept = [ln for ln in lines if not ln.strip().lower().startswith(b"breath")]
        if len(kept) == len(lines):
            (out / "voices" / "!v" / p.name).symlink_to(p)
        else:
            (out / "voices" / "!v" / p.name).write_bytes(b"".join(kept))
    return str(out)


def _list_voices(lib) -> tuple[list[str], dict[str, str]]:
    """(primary language codes, alias -> voice file identifier).

    espeak_SetVoiceByName matches file and voice names, not language codes
    ("en-gb" is the file gmw/en, "fr-fr" is roa/fr), so every alias a user
    may type is mapped to the identifier, which it always accepts.
    """
    codes, aliases, best = set(), {}, {}
    arr, i = lib.espeak_ListVoices(None), 0
    while arr[i]:
        v, i = arr[i].contents, i + 1
        ident = v.identifier.decode("utf-8", "replace")
        pos, first = v.languages, True
        while pos and _C.string_at(pos, 1) != b"\0":  # a 0 priority byte ends the list
            prio, code = _C.string_at(pos, 1)[0], _C.string_at(pos + 1).decode("utf-8", "replace").lower()
            codes.update([code] if first else [])
            if prio < best.get(code, 256):  # lower number = better match for that code
                best[code], aliases[code] = prio, ident
            pos, first = pos + len(code.encode()) + 2, False
        for alias in (ident.lower(), ident.rsplit("/", 1)[-1].lower(), (v.name or b"").decode().lower()):
            aliases.setdefault(alias, ident)
    return sorted(codes), aliases


_LOCK = threading.Lock()  # eSpeak is global C state: one user at a time
_ENGINE: _Engine | None = None


def _engine() -> _Engine:
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def available_voices() -> list[str]:
    """Language codes of the bundled eSpeak voices (``en-us``, ``en-gb-scotland``, ``de``, ...)."""
    return list(_engine().voices)


def available_variants() -> list[str]:
    """Voice variants that may follow ``+`` (``m1``..``m8``, ``f1``..``f5``, ...)."""
    return list(_engine().variants)


def _voice_message(voice: str, eng: _Engine) -> str:
    return (f"eSpeak voice {voice!r} not found. Available voices: {', '.join(eng.voices)}. "
            f"Variants (append as '+name'): {', '.join(eng.variants)}")


def _resolve_voice(voice: str, eng: _Engine) -> str:
    """``"en-gb+m3"`` -> ``"gmw/en+m3"``; VoiceNotFoundError naming the voice otherwise."""
    # espeak_SetVoiceByName silently ignores an unknown '+variant': check both
    # halves here rather than synthesise with the wrong speaker.
    base, plus, variant = voice.partition("+")
    ident = eng.aliases.get(base.strip().lower())
    if ident is None or (plus and variant not in eng.variants):
        raise VoiceNotFoundError(_voice_message(voice, eng))
    return ident + plus + variant


def synthesize(text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50, pitch_range: int = 50,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speak ``text`` with eSpeak ``voice``; float32 mono audio at ``sample_rate``.

    ``voice`` is a language code, optionally with a variant (``"en-us+f2"``);
    ``rate`` is in words per minute (80-450), ``pitch`` and ``pitch_range`` are
    0-100 (50 = the voice's normal). Raises VoiceNotFoundError for an unknown
    voice or variant, ValueError for empty text. Thread-safe and deterministic.
    """
    if not text or not text.strip():
        raise ValueError("synthesize: empty text")
    eng = _engine()
    with _LOCK:
        pcm = eng.synth(text.strip(), voice, rate, pitch, pitch_range)
    if pcm.size == 0:
        raise SynthError(f"eSpeak produced no audio for {text[:60]!r} (voice {voice!r})")
    wav = pcm.astype(np.float32) / 32768.0
    if eng.sample_rate != sample_rate:
        wav = soxr.resample(wav, eng.sample_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(wav, dtype=np.float32)


# ---- accents and speakers ----
@dataclass(frozen=True)
class Accent:
    """One accent: an eSpeak language voice reading English text."""

    name: str
    voice: str  # eSpeak language code, without variant
    description: str
    native: bool = True  # False: another language's rules read the English text
    # Words per minute, +-10% per speaker. Slower than eSpeak's 175: at 175
    # Whisper tiny.en loses ~5 more points of WER even on en-us.
    rate: int = 145


# Whisper tiny.en WER % (int8, greedy, language="en", whisper normaliser) on
# make_accent_corpus(accents=(name,), speakers_per_accent=4, utts_per_speaker=10):
#   us 31.6  gb 30.5  rp 32.6  lancaster 36.5  nyc 37.5  caribbean 39.3
#   west_midlands 45.6  scottish 53.3  french 53.7  german 85.6
# An earlier draw (other sentences, 20-40 utts) gave us 24.6, scottish 42,
# french 51, and dutch 90, italian 99, polish 103, portuguese 112, finnish
# 117, spanish 132, swedish 136: voices Whisper hears as unrelated words are
# left out, gibberish is no accent to adapt to; so is Hindi, which has no
# rules for Latin letters and falls back to English. Numbers move by ~5
# points with the sentences drawn; the ~25-30% floor is eSpeak's formant
# voice, not the accent.
ACCENTS: dict[str, Accent] = {a.name: a for a in (
    Accent("us", "en-us", "General American"),
    Accent("gb", "en-gb", "British English (eSpeak's default English)"),
    Accent("rp", "en-gb-x-rp", "British Received Pronunciation"),
    Accent("scottish", "en-gb-scotland", "Scottish English"),
    Accent("caribbean", "en-029", "Caribbean English"),
    Accent("west_midlands", "en-gb-x-gbcwmd", "West Midlands English"),
    Accent("lancaster", "en-gb-x-gbclan", "Lancastrian English"),
    Accent("nyc", "en-us-nyc", "New York City English"),
    Accent("french", "fr", "English read with French letter-to-sound rules", native=False),
    Accent("german", "de", "English read with German letter-to-sound rules (very strong)", native=False),
)}

# Source: us, as low as any (gb, rp: within noise). Target: Scottish, 14-22
# points above us in every draw (default corpus, 6 speakers x 10 utts each:
# us 29.6, scottish 43.4) yet plainly English ("bank" -> "bunk", "concert" ->
# "corn set"): a systematic vowel shift that fine-tuning can learn. german is
# too far (86%); french is as hard as scottish but less intelligible.
DEFAULT_SOURCE_ACCENT = "us"
DEFAULT_TARGET_ACCENT = "scottish"

RECIPE_VERSION = 1  # bump when rendering changes, so old corpus folders are not resumed
# Male and female variants alternate across speakers; the odd ones (whisper,
# robots, croak, ...) are effects, not speakers.
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an accent plus a voice variant and prosody."""

    id: str
    accent: str
    voice: str  # "<language>+<variant>"
    rate: int
    pitch: int
    pitch_range: int


def get_accent(name: str) -> Accent:
    """Look up an accent by name; ValueError listing the known ones otherwise."""
    if name not in ACCENTS:
        raise ValueError(f"unknown accent {name!r}; known accents: {', '.join(ACCENTS)}")
    return ACCENTS[name]


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    # crc32 rather than hash(): str hashes are salted per process.
    return np.random.default_rng([int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k)
                                                for k in keys])


def make_speakers(accent: str, n: int, seed: int = 0) -> list[Speaker]:
    """``n`` seeded speakers of ``accent``, alternating male and female variants."""
    acc = get_accent(accent)
    rng = _rng(seed, "variants", acc.name)
    pools = [list(rng.permutation(MALE_VARIANTS)), list(rng.permutation(FEMALE_VARIANTS))]
    out = []
    for k in range(n):
        pool, r = pools[k % 2], _rng(seed, "speaker", acc.name, k)
        out.append(Speaker(
            id=f"{acc.name}_{k:02d}", accent=acc.name, voice=f"{acc.voice}+{pool[(k // 2) % len(pool)]}",
            rate=int(round(acc.rate * r.uniform(0.9, 1.1))),
            # A wide pitch range (lively intonation) is easier for Whisper than
            # eSpeak's flat default of 50: about 5 WER points on en-us.
            pitch=int(r.integers(35, 61)), pitch_range=int(r.integers(60, 91))))
    return out


# ---- rendering and the corpus ----
def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    # 1/f spectrum: sounds like room or fan noise, unlike hissy white noise.
    spec = np.fft.rfft(rng.standard_normal(n))
    noise = np.fft.irfft(spec / np.sqrt(np.maximum(np.arange(spec.size), 1.0)), n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _draw_utterance(spk: Speaker, rng: np.random.Generator) -> dict:
    return {"rate": int(round(spk.rate * rng.uniform(0.95, 1.05))),
            # Light noise: pink noise at 20 dB already costs tiny.en ~10 WER
            # points on eSpeak speech, which would drown the accent effect.
            "snr_db": round(float(rng.uniform(25.0, 40.0)), 1),
            "pad": (float(rng.uniform(0.1, 0.4)), float(rng.uniform(0.1, 0.4))),
            "peak": float(rng.uniform(0.3, 0.9))}


def render_utterance(text: str, spk: Speaker, rng: np.random.Generator,
                     sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, dict]:
    """One utterance of ``spk``: jittered rate, silence pads, noise at a sampled SNR, random level.

    Returns (audio, metadata). The metadata draws come first, so a caller can
    redo them without rendering (make_accent_corpus does when resuming).
    """
    meta = _draw_utterance(spk, rng)
    wav = synthesize(text, spk.voice, meta["rate"], spk.pitch, spk.pitch_range, sample_rate)
    speech_power = float(np.mean(wav**2)) + 1e-12
    lead, tail = (int(p * sample_rate) for p in meta["pad"])
    wav = np.concatenate([np.zeros(lead, np.float32), wav, np.zeros(tail, np.float32)])
    wav = wav + _pink_noise(wav.size, rng) * np.sqrt(speech_power / 10 ** (meta["snr_db"] / 10))
    wav *= meta["peak"] / (np.abs(wav).max() + 1e-9)  # recording levels differ
    return np.clip(wav, -1.0, 1.0).astype(np.float32), meta


def make_accent_corpus(out_dir: str | os.PathLike,
                       accents: tuple[str, ...] = (DEFAULT_SOURCE_ACCENT, DEFAULT_TARGET_ACCENT),
                       speakers_per_accent: int = 6, utts_per_speaker: int = 10, seed: int = 0,
                       sample_rate: int = SAMPLE_RATE, progress: bool = True) -> Path:
    """Synthesise a corpus under ``out_dir``; returns the path of its ``manifest.jsonl``.

    Audio goes to ``<accent>/<speaker>/<id>.flac``. Manifest lines carry id,
    audio_filepath (relative to out_dir), duration, text, speaker, group
    (= accent), accent, voice, rate and snr_db. Same arguments -> identical
    manifest and samples. Resumable: FLAC files already there are kept and the
    manifest is written atomically at the end; ``synth_config.json`` records
    the arguments, and resuming with other ones is refused (old files would
    no longer match their text). Sentence allocation: see assign_sentences.
    """
    out_dir, accents = Path(out_dir), tuple(accents)
    for name in accents:
        get_accent(name)
    if not accents or len(set(accents)) != len(accents):
        raise ValueError(f"need one or more distinct accents, got {accents}")
    if speakers_per_accent < 1 or utts_per_speaker < 1:
        raise ValueError("speakers_per_accent and utts_per_speaker must be >= 1")
    eng = _engine()
    for name in accents:  # fail before writing anything if a voice is missing
        _resolve_voice(ACCENTS[name].voice, eng)
    config = {"recipe": RECIPE_VERSION, "accents": list(accents), "speakers_per_accent": speakers_per_accent,
              "utts_per_speaker": utts_per_speaker, "seed": seed, "sample_rate": sample_rate,
              "accent_defs": [asdict(ACCENTS[a]) for a in accents]}
    _check_config(out_dir / "synth_config.json", config)
    texts = assign_sentences(len(accents), speakers_per_accent, utts_per_speaker, seed)
    from tqdm.auto import tqdm  # a project dependency, imported late to keep data/ light

    items = []
    bar = tqdm(total=len(accents) * speakers_per_accent * utts_per_speaker, desc="synth", unit="utt",
               disable=not progress)
    with bar:
        for a, name in enumerate(accents):
            for k, spk in enumerate(make_speakers(name, speakers_per_accent, seed)):
                for j, text in enumerate(texts[a][k]):
                    uid = f"{spk.id}_{j:03d}"
                    rel = Path(name) / spk.id / f"{uid}.flac"
                    rng = _rng(seed, "utt", uid)
                    if (out_dir / rel).exists():  # written atomically, so complete
                        meta = _draw_utterance(spk, rng)
                        frames = sf.info(str(out_dir / rel)).frames
                    else:
                        wav, meta = render_utterance(text, spk, rng, sample_rate)
                        write_audio(out_dir / rel, wav, sample_rate)
                        frames = wav.size
                    items.append({"id": uid, "audio_filepath": rel.as_posix(),
                                  "duration": round(frames / sample_rate, 4), "text": text,
                                  "speaker": spk.id, "group": name, "accent": name, "voice": spk.voice,
                                  "rate": meta["rate"], "snr_db": meta["snr_db"]})
                    bar.update(1)
    manifest = out_dir / "manifest.jsonl"
    write_manifest(manifest, items)
    return manifest


def _check_config(path: Path, config: dict) -> None:
    if path.exists():
        if json.loads(path.read_text(encoding="utf-8")) != config:
            raise ValueError(f"{path.parent} holds a corpus made with other settings ({path}); "
                             "use a fresh folder or delete that one")
        return
    write_json(path, config)
