"""The trained sentence encoder as an MLflow pyfunc model (load, serve, register).

``mlflow.pyfunc.load_model("runs:/<run_id>/model").predict(["a sentence", ...])`` returns one
embedding per sentence, pooled as in evaluation. The model folder carries the exported
Hugging Face model and this package's code, so loading needs torch and transformers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np


class SentenceEncoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoTokenizer

        from trainer.model import MCSEModel

        path = context.artifacts["model_dir"]
        self.model = MCSEModel.load(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pooler = (context.model_config or {}).get("pooler", "cls_before_pooler")

    # The list[str] hint is MLflow's input schema: it validates inputs and converts a one-column
    # DataFrame (what its serving layer passes) into the list of sentences.
    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> np.ndarray:
        from trainer.evaluate import make_encoder

        if hasattr(model_input, "iloc"):  # a DataFrame: its first column holds the sentences
            sentences = [str(s) for s in model_input.iloc[:, 0].tolist()]
        else:
            sentences = [str(s) for s in model_input]
        encode = make_encoder(self.model, self.tokenizer, self.pooler, progress=False)
        return encode(sentences)


def save_pyfunc(model_dir: Path, out: Path, pooler: str) -> Path:
    """Write an MLflow model folder for an exported webmcse model directory."""
    import json

    from mlflow.models import infer_signature

    root = Path(__file__).resolve().parent.parent
    meta = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    dim = int(meta.get("hidden_size", 768))
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=SentenceEncoderModel(),
        artifacts={"model_dir": str(model_dir)},
        model_config={"pooler": pooler},
        code_paths=[str(root / "trainer"), str(root / "data_tools")],
        pip_requirements=["torch", "transformers", "numpy", "scipy", "tqdm", "pyyaml", "safetensors"],
        signature=infer_signature(["a sentence"], np.zeros((1, dim), dtype=np.float32)),
    )
    return out
