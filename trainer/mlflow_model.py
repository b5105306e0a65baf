"""The trained sentence encoder as an MLflow pyfunc model (load, serve, register).

The tracker logs it as an MLflow 3 logged model of the run. ``mlflow.pyfunc.load_model(
"models:/<model id>")`` (or ``"runs:/<run id>/model"``) ``.predict(["a sentence", ...])``
returns one embedding per sentence, pooled as in evaluation. The model folder carries the
exported Hugging Face model and this package's code, so loading needs torch and transformers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.types.type_hints import TypeFromExample


class SentenceEncoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoTokenizer

        from trainer.model import MCSEModel

        path = context.artifacts["model_dir"]
        self.model = MCSEModel.load(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pooler = (context.model_config or {}).get("pooler", "cls_before_pooler")

    # TypeFromExample: MLflow checks inputs against the signature save_pyfunc writes (a string
    # column in, float32 embeddings of the encoder's width out) and hands predict the input
    # example's type, a list of sentences; a DataFrame is still accepted when called directly.
    def predict(self, context: Any, model_input: TypeFromExample,
                params: dict[str, Any] | None = None) -> np.ndarray:
        from trainer.evaluate import make_encoder

        if hasattr(model_input, "iloc"):  # a DataFrame: its first column holds the sentences
            sentences = [str(s) for s in model_input.iloc[:, 0].tolist()]
        else:
            sentences = [str(s) for s in model_input]
        encode = make_encoder(self.model, self.tokenizer, self.pooler, progress=False)
        return encode(sentences)


# What a user sees as the model's input example in MLflow (and what the serving layer validates).
INPUT_EXAMPLE = ["A man is playing a guitar.", "Two dogs run along the beach."]


def save_pyfunc(model_dir: Path, out: Path, pooler: str, mlflow_model: Any = None) -> Path:
    """Write an MLflow model folder for an exported webmcse model directory.

    ``mlflow_model`` is the :class:`mlflow.models.Model` record to fill in: the tracker passes one
    that names its logged model (model id, run id, artifact location), so the written ``MLmodel``
    file points back to the logged model it is uploaded to.
    """
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
        signature=infer_signature(INPUT_EXAMPLE, np.zeros((len(INPUT_EXAMPLE), dim), dtype=np.float32)),
        input_example=INPUT_EXAMPLE,
        mlflow_model=mlflow_model,
    )
    return out
