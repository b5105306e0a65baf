"""Entry point: `accelerate launch trainer/run.py --config configs/X.yaml key=value ...`

Config -> Accelerator -> train() -> close. Nothing else belongs here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch trainer/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train MCSE sentence embeddings.")
    p.add_argument("--config", required=True, help="YAML experiment file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError
    from trainer.engine import build_accelerator
    from trainer.evaluate import EvalDataError
    from trainer.model import ModelLoadError
    from trainer.train import train

    try:
        accelerator = build_accelerator(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg, accelerator)
    except ConfigError as exc:  # settings that only the loaded data or model can refute
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, EvalDataError, CheckpointError, ModelLoadError) as exc:
        # Problems of the inputs, named in one line; anything else is a bug and keeps its traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
