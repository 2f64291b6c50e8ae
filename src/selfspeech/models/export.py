"""Export a transformers Whisper checkpoint to CTranslate2 with ctranslate2's own converter."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from selfspeech.data.atomic import drop_stale, temp_prefix

TOKENIZER_FILES = ("tokenizer.json", "preprocessor_config.json")


class ExportError(RuntimeError):
    pass


def export_ctranslate2(model_dir: str | Path, out: str | Path, quantization: str = "float16") -> Path:
    """Convert ``model_dir`` into ``out`` (written beside it and renamed: atomic)."""
    import ctranslate2

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no config.json; expected a transformers save_pretrained directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    drop_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        conv = ctranslate2.converters.TransformersConverter(str(model_dir), copy_files=[
            f for f in TOKENIZER_FILES if (model_dir / f).is_file()], load_as_float16=False)
        conv.convert(str(tmp / "model"), quantization=quantization, force=True)
        if out.exists():
            shutil.rmtree(out)
        (tmp / "model").rename(out)
    except Exception as e:
        raise ExportError(f"{model_dir}: ctranslate2 conversion failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
