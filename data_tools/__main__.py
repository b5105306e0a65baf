"""`webmcse-data <verb>` / `python -m data_tools <verb>`: thin argument parsing only."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from data_tools.dedup import NEAR_DUP_DEFAULT
from data_tools.download import DownloadOptions
from data_tools.filters import RESIZE_FILTERS, RESIZE_MODES, FilterOptions, ImageOptions
from data_tools.sources import INPUT_FORMATS


def _no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (the summary is still printed)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="webmcse-data", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    sp = sub.add_parser("shard-pairs", help="images + captions -> pair shards",
                        description="Inputs: tables (jsonl/csv/tsv/parquet, .gz ok) with an image path or URL "
                                    "column, folders of images with sidecar captions, img2dataset output "
                                    "folders, COCO caption json files. See docs/DATA.md.")
    sp.add_argument("inputs", nargs="+", help="tables, folders, img2dataset folders or COCO json files")
    sp.add_argument("--out", required=True, help="output dataset folder")
    sp.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                    help="how to read every input (default: detect per input)")
    sp.add_argument("--image-col", help="column with the image path or URL (default: auto)")
    sp.add_argument("--caption-col", help="column with the caption(s) (default: auto)")
    sp.add_argument("--key-col", help="column with a unique sample key (default: 'key' or row)")
    sp.add_argument("--image-root", help="COCO json: folder holding the images (default: the json's folder)")
    sp.add_argument("--no-group-by-image", dest="group_by_image", action="store_false",
                    help="tables: one record per row, even when several rows name the same image "
                         "(default: rows of one image become one record with all their captions)")
    sp.add_argument("--allow-outside-paths", action="store_true",
                    help="read image paths that leave the table's folder (or the COCO image root): "
                         "'../x.jpg', absolute paths (default: dropped as path_outside_root)")
    sp.add_argument("--strict", action="store_true",
                    help="stop at the first malformed record (bad row, undecodable text, cut file, path outside "
                         "the table's folder, a worker failure), naming file and line, instead of counting it")
    sp.add_argument("--dedup", choices=["image", "pair", "none"], default="image",
                    help="exact dedup identity: image bytes, image+caption, or off")
    sp.add_argument("--near-dup-distance", type=int, default=NEAR_DUP_DEFAULT,
                    help="drop images whose 64-bit phash is within this Hamming distance of a kept one "
                         "(--dedup image only; -1: off)")
    sp.add_argument("--min-side", type=int, default=FilterOptions.min_side)
    sp.add_argument("--max-aspect", type=float, default=FilterOptions.max_aspect)
    sp.add_argument("--max-pixels", type=int, default=FilterOptions.max_pixels)
    sp.add_argument("--min-caption-chars", type=int, default=FilterOptions.min_caption_chars)
    sp.add_argument("--min-caption-words", type=int, default=FilterOptions.min_caption_words)
    sp.add_argument("--max-caption-chars", type=int, default=FilterOptions.max_caption_chars)
    sp.add_argument("--no-verify-decode", dest="verify_decode", action="store_false",
                    help="check image headers only, skip the full decode (faster; truncated files get through, "
                         "and no phash: near-dup dedup and --eval-images need the decode)")
    sp.add_argument("--resize-mode", choices=RESIZE_MODES, default="no",
                    help="as img2dataset's: keep_ratio (shorter side to --image-size), keep_ratio_largest (longer "
                         "side), center_crop (keep_ratio, then the centred square), border (keep_ratio_largest, "
                         "then white padding to the square), no (keep the downloaded bytes; default). Resized "
                         "images are stored as JPEG")
    sp.add_argument("--image-size", type=int, default=0, help="target side in pixels for --resize-mode")
    sp.add_argument("--upscale", action="store_true",
                    help="also enlarge images smaller than --image-size (default: keep them at their size, as "
                         "img2dataset's --resize_only_if_bigger)")
    sp.add_argument("--max-side", type=int, default=0,
                    help="older spelling of --resize-mode keep_ratio_largest --image-size N")
    sp.add_argument("--resize-filter", choices=RESIZE_FILTERS, default=ImageOptions.resize_filter,
                    help="how a downscale ends: fast (default: JPEGs decoded at a reduced DCT scale, then a "
                         "bilinear step under 2x) or area (an exact area average, img2dataset's filter: closer "
                         "to the ideal downscale for ~2 CPU-ms more per 640-px photo)")
    sp.add_argument("--jpeg-quality", type=int, default=ImageOptions.jpeg_quality)
    sp.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG")
    dl = DownloadOptions()
    sp.add_argument("--timeout", type=float, default=dl.timeout, help="seconds per download attempt")
    sp.add_argument("--retries", type=int, default=dl.retries, help="retries of transient download failures")
    sp.add_argument("--retry-backoff", type=float, default=dl.backoff,
                    help="seconds before the first retry (doubles per retry)")
    sp.add_argument("--max-image-bytes", type=int, default=dl.max_bytes, help="download size cap")
    sp.add_argument("--max-redirects", type=int, default=dl.max_redirects)
    sp.add_argument("--download-threads", type=int, default=dl.threads,
                    help="download threads per worker process, like img2dataset's --thread_count: "
                         "--workers x --download-threads requests are in flight")
    sp.add_argument("--user-agent", default=dl.user_agent, help="User-Agent header of downloads")
    sp.add_argument("--clip-model", help="score pairs with this open_clip model (or model-config .json)")
    sp.add_argument("--clip-pretrained", help="open_clip pretrained tag (default: random init, tests only)")
    grp = sp.add_mutually_exclusive_group()
    grp.add_argument("--clip-threshold", type=float, help="drop pairs scoring below this cosine")
    grp.add_argument("--clip-top-fraction", type=float, help="keep the best-scoring fraction of the dataset")
    sp.add_argument("--clip-device", default="cpu")
    sp.add_argument("--clip-batch-size", type=int, default=64, help="pairs per CLIP forward pass")
    sp.add_argument("--eval-sts", metavar="DIR",
                    help="drop training captions equal (after normalisation) to a sentence of the STS "
                         "evaluation sets in DIR (SentEval layout); counted as eval_overlap")
    sp.add_argument("--eval-images", metavar="DIR",
                    help="drop images that near-duplicate (phash) a photo of this held-out set (a pairs "
                         "dataset or a folder of images); counted as eval_overlap")
    sp.add_argument("--eval-near-dup-distance", type=int, default=NEAR_DUP_DEFAULT,
                    help="Hamming distance for --eval-images")
    sp.add_argument("--workers", type=int, default=1, help="processes (output is identical for any number)")
    sp.add_argument("--chunk-size", type=int, default=64, help="records per work unit")
    sp.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    sp.add_argument("--shard-bytes", type=int, default=1 << 30, help="bytes per shard (a shard closes at either)")
    sp.add_argument("--part", type=int, help="this machine's part of a partitioned run (0-based; needs --parts)")
    sp.add_argument("--parts", type=int, help="how many parts the input is split into (then: webmcse-data merge)")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    mode.add_argument("--resume", action="store_true", help="continue a killed run after its last complete shard")
    _no_progress(sp)

    sm = sub.add_parser("merge", help="build the dataset from the parts of a partitioned shard-pairs run",
                        description="Replays the parts' identity indexes in input order: the same duplicates, "
                                    "keys and counts as one machine would give. See docs/DATA.md.")
    sm.add_argument("dataset", help="the --out folder of the parts")
    sm.add_argument("--keep-parts", action="store_true", help="keep OUT/parts after the merge")
    sm.add_argument("--overwrite", action="store_true", help="replace a dataset built from other inputs")
    _no_progress(sm)

    st = sub.add_parser("shard-text", help="one sentence per line (.gz ok) -> text shards")
    st.add_argument("inputs", nargs="+")
    st.add_argument("--out", required=True)
    st.add_argument("--min-chars", type=int, default=1)
    st.add_argument("--dedup", action="store_true", help="drop exact duplicate sentences")
    st.add_argument("--shard-size", type=int, default=10_000)
    st.add_argument("--shard-bytes", type=int, default=1 << 30)
    st.add_argument("--strict", action="store_true", help="stop at the first undecodable line or cut file")
    st.add_argument("--overwrite", action="store_true")
    _no_progress(st)

    se = sub.add_parser("embed", help="add frozen image features (KEY.emb.npy) to a pairs dataset")
    se.add_argument("dataset")
    se.add_argument("--encoder", default="efficientnet_lite0",
                    help="efficientnet_lite0 | open_clip:MODEL[:PRETRAINED] | timm:NAME[:random]")
    se.add_argument("--batch-size", type=int, default=64)
    se.add_argument("--device", default="cpu")
    _no_progress(se)

    sv = sub.add_parser("verify", help="check a dataset against its manifest (exit 1 naming bad shards)")
    sv.add_argument("dataset")
    sv.add_argument("--decode", action="store_true", help="also decode every member of every sample")

    ss = sub.add_parser("stats", help="counts, drop reasons, caption and image size distributions")
    ss.add_argument("dataset")
    ss.add_argument("--plot", help="write histograms to this PNG")
    ss.add_argument("--limit", type=int, help="scan at most this many samples")

    sf = sub.add_parser("filter-clip", help="keep the best CLIP-scoring pairs of a dataset (rewrites shards)")
    sf.add_argument("dataset")
    g = sf.add_mutually_exclusive_group(required=True)
    g.add_argument("--top-fraction", type=float)
    g.add_argument("--threshold", type=float)
    sf.add_argument("--clip-model", help="score samples that lack clip_score with this open_clip model")
    sf.add_argument("--clip-pretrained")
    sf.add_argument("--clip-device", default="cpu")
    sf.add_argument("--clip-batch-size", type=int, default=64)
    _no_progress(sf)

    from data_tools import noise, score, split

    split.add_parser(sub)
    noise.add_parser(sub)
    score.add_parser(sub)

    fe = sub.add_parser("fetch-eval-data", help="download the SentEval STS suite into DIR")
    fe.add_argument("dir")
    fe.add_argument("--url", help="archive URL or local path to use instead of the default source")
    fe.add_argument("--timeout", type=float, default=60.0)
    fe.add_argument("--force", action="store_true", help="replace data already in DIR")
    return p


def _shard_pairs(args: argparse.Namespace) -> Any:
    from data_tools import commands
    from data_tools.clip_filter import ClipOptions

    opts = FilterOptions(min_caption_chars=args.min_caption_chars, min_caption_words=args.min_caption_words,
                         max_caption_chars=args.max_caption_chars, min_side=args.min_side,
                         max_aspect=args.max_aspect, max_pixels=args.max_pixels, verify_decode=args.verify_decode)
    mode, size = args.resize_mode, args.image_size
    if args.max_side:
        if mode != "no":
            raise ValueError("--max-side N is the older spelling of --resize-mode keep_ratio_largest --image-size N; "
                             "give one or the other")
        mode, size = "keep_ratio_largest", args.max_side
    images = ImageOptions(resize_mode=mode, image_size=size, upscale=args.upscale, jpeg_quality=args.jpeg_quality,
                          reencode=args.reencode, resize_filter=args.resize_filter)
    download = DownloadOptions(timeout=args.timeout, retries=args.retries, backoff=args.retry_backoff,
                               max_bytes=args.max_image_bytes, max_redirects=args.max_redirects,
                               threads=args.download_threads, user_agent=args.user_agent)
    clip = None
    if args.clip_model:
        clip = ClipOptions(model=args.clip_model, pretrained=args.clip_pretrained, threshold=args.clip_threshold,
                           top_fraction=args.clip_top_fraction, device=args.clip_device,
                           batch_size=args.clip_batch_size)
    elif args.clip_threshold is not None or args.clip_top_fraction is not None:
        raise ValueError("--clip-threshold/--clip-top-fraction need --clip-model")
    return commands.shard_pairs(
        args.inputs, args.out, image_col=args.image_col, caption_col=args.caption_col, key_col=args.key_col,
        input_format=args.input_format, image_root=args.image_root, strict=args.strict, filters=opts,
        dedup=args.dedup, near_dup_distance=args.near_dup_distance if args.near_dup_distance >= 0 else None,
        images=images, download=download, clip=clip, workers=args.workers, chunk_size=args.chunk_size,
        max_count=args.shard_size, max_bytes=args.shard_bytes, overwrite=args.overwrite, resume=args.resume,
        progress=args.progress, group_by_image=args.group_by_image, allow_outside_paths=args.allow_outside_paths,
        eval_sts=args.eval_sts, eval_images=args.eval_images, eval_near_dup_distance=args.eval_near_dup_distance,
        part=args.part, parts=args.parts)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data_tools import commands
    from data_tools.shards import DatasetError
    from data_tools.sources import InputError

    try:
        if args.verb == "shard-pairs":
            summary = _shard_pairs(args)
        elif args.verb == "merge":
            from data_tools.parts import merge

            summary = merge(args.dataset, overwrite=args.overwrite, keep_parts=args.keep_parts,
                            progress=args.progress)
        elif args.verb == "shard-text":
            summary = commands.shard_text(args.inputs, args.out, min_chars=args.min_chars,
                                          dedup=args.dedup, max_count=args.shard_size, max_bytes=args.shard_bytes,
                                          overwrite=args.overwrite, strict=args.strict, progress=args.progress)
        elif args.verb == "embed":
            summary = commands.embed(args.dataset, args.encoder, batch_size=args.batch_size,
                                     device=args.device, progress=args.progress)
        elif args.verb == "verify":
            from data_tools.check import verify

            report = verify(args.dataset, decode=args.decode)
            print(report.render())
            return 0 if report.ok else 1
        elif args.verb == "stats":
            from data_tools.check import stats

            print(stats(args.dataset, plot=args.plot, limit=args.limit).render())
            if args.plot:
                print(f"plot written to {args.plot}")
            return 0
        elif args.verb == "filter-clip":
            from data_tools.clip_filter import ClipOptions, filter_clip

            clip = (ClipOptions(model=args.clip_model, pretrained=args.clip_pretrained, device=args.clip_device,
                                batch_size=args.clip_batch_size) if args.clip_model else None)
            summary = filter_clip(args.dataset, top_fraction=args.top_fraction, threshold=args.threshold,
                                  clip=clip, progress=args.progress)
        elif args.verb == "split":
            from data_tools import split

            summary = split.run(args)
        elif args.verb == "corrupt":
            from data_tools import noise

            summary = noise.run(args)
        elif args.verb == "score-pairs":
            from data_tools import score

            summary = score.run(args)
        else:
            from data_tools.evaldata import fetch_eval_data

            print(fetch_eval_data(args.dir, url=args.url, timeout=args.timeout, force=args.force).render())
            return 0
    except (InputError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
