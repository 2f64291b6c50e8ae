"""Export a transformers Whisper checkpoint to CTranslate2 with ctranslate2's own converter."""
from __future__ import annotations

from pathlib import Path

from selfspeech.data.atomic import write_dir

TOKENIZER_FILES = ("tokenizer.json", "preprocessor_config.json")


class ExportError(RuntimeError):
    pass


def export_ctranslate2(model_dir: str | Path, out: str | Path, quantization: str = "float16") -> Path:
    """Convert ``model_dir`` into ``out``; an existing ``out`` is replaced kill-safely (data.atomic.write_dir)."""
    import ctranslate2

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no config.json; expected a transformers save_pretrained directory")

    def convert(tmp: Path) -> None:
        conv = ctranslate2.converters.TransformersConverter(str(model_dir), copy_files=[
            f for f in TOKENIZER_FILES if (model_dir / f).is_file()], load_as_float16=False)
        conv.convert(str(tmp), quantization=quantization, force=True)  # force: tmp exists (empty)

    try:
        return write_dir(out, convert)
    except Exception as e:
        raise ExportError(f"{model_dir}: ctranslate2 conversion failed: {e}") from None
