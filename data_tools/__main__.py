"""`webmcse-data <verb>` / `python -m data_tools <verb>`: thin argument parsing only."""

from __future__ import annotations

import argparse
import logging
import sys

from data_tools.filters import FilterOptions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="webmcse-data", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    sp = sub.add_parser("shard-pairs", help="images + captions (tables or folders) -> pair shards")
    sp.add_argument("inputs", nargs="+", help="jsonl/csv/tsv/parquet tables (.gz ok) or folders")
    sp.add_argument("--out", required=True, help="output dataset folder")
    sp.add_argument("--image-col", help="column with the image path (default: auto)")
    sp.add_argument("--caption-col", help="column with the caption(s) (default: auto)")
    sp.add_argument("--key-col", help="column with a unique sample key (default: 'key' or row)")
    sp.add_argument("--dedup", choices=["image", "pair", "none"], default="image",
                    help="exact dedup identity: image bytes, image+caption, or off")
    sp.add_argument("--min-side", type=int, default=FilterOptions.min_side)
    sp.add_argument("--max-aspect", type=float, default=FilterOptions.max_aspect)
    sp.add_argument("--max-pixels", type=int, default=FilterOptions.max_pixels)
    sp.add_argument("--min-caption-chars", type=int, default=FilterOptions.min_caption_chars)
    sp.add_argument("--min-caption-words", type=int, default=FilterOptions.min_caption_words)
    sp.add_argument("--max-caption-chars", type=int, default=FilterOptions.max_caption_chars)
    sp.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing dataset")

    st = sub.add_parser("shard-text", help="one sentence per line (.gz ok) -> text shards")
    st.add_argument("inputs", nargs="+")
    st.add_argument("--out", required=True)
    st.add_argument("--min-chars", type=int, default=1)
    st.add_argument("--dedup", action="store_true", help="drop exact duplicate sentences")
    st.add_argument("--shard-size", type=int, default=10_000)
    st.add_argument("--overwrite", action="store_true")

    se = sub.add_parser("embed", help="add frozen image features (KEY.emb.npy) to a pairs dataset")
    se.add_argument("dataset")
    se.add_argument("--encoder", default="efficientnet_lite0",
                    help="efficientnet_lite0 | open_clip:MODEL[:PRETRAINED] | timm:NAME[:random]")
    se.add_argument("--batch-size", type=int, default=64)
    se.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data_tools import commands
    from data_tools.shards import DatasetError
    from data_tools.sources import InputError

    try:
        if args.verb == "shard-pairs":
            opts = FilterOptions(min_caption_chars=args.min_caption_chars,
                                 min_caption_words=args.min_caption_words,
                                 max_caption_chars=args.max_caption_chars, min_side=args.min_side,
                                 max_aspect=args.max_aspect, max_pixels=args.max_pixels)
            summary = commands.shard_pairs(args.inputs, args.out, image_col=args.image_col,
                                           caption_col=args.caption_col, key_col=args.key_col,
                                           filters=opts, dedup=args.dedup,
                                           max_count=args.shard_size, overwrite=args.overwrite)
        elif args.verb == "shard-text":
            summary = commands.shard_text(args.inputs, args.out, min_chars=args.min_chars,
                                          dedup=args.dedup, max_count=args.shard_size,
                                          overwrite=args.overwrite)
        else:
            summary = commands.embed(args.dataset, args.encoder, batch_size=args.batch_size,
                                     device=args.device)
    except (InputError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
