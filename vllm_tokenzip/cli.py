"""``tokenzip`` command line: build local models and media, run the demo, serve."""

from __future__ import annotations

import argparse
import json
import sys
import time

from vllm_tokenzip import media
from vllm_tokenzip.model_builder import FAMILIES, SIZES, build_model


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PART.FIELD=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_make_model(args: argparse.Namespace) -> int:
    family, _, size = args.name.partition("-")
    path = build_model(family, size or "tiny", dict(args.set), seed=args.seed, force=args.force)
    print(path)
    return 0


def cmd_make_media(args: argparse.Namespace) -> int:
    paths = [media.bigbuckbunny()]
    for moving in (True, False):
        for rate in (16000, 48000):
            paths.append(media.synthetic_clip(moving=moving, sample_rate=rate))
    paths += [media.speech_wav(sample_rate=rate) for rate in (16000, 48000)]
    print("\n".join(str(p) for p in paths))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vllm_tokenzip.demo import run_demo

    return run_demo(size=args.size, question=args.question, method=args.method, ratio=args.ratio)


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenzip_server.launcher import serve

    return serve(args, args.vllm_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenzip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    names = [f"{f}-{s}" for f in FAMILIES for s in SIZES]
    make = sub.add_parser("make-model", help="build a seeded random-weight checkpoint")
    make.add_argument("name", choices=names, help="family-size")
    make.add_argument("--set", action="append", type=_parse_override, default=[],
                      metavar="PART.FIELD=VALUE",
                      help="override a size field, e.g. text.num_hidden_layers=4")  # fmt: skip
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--force", action="store_true", help="rebuild even if cached")
    make.set_defaults(func=cmd_make_model)

    media_cmd = sub.add_parser("make-media", help="build the cached test media")
    media_cmd.set_defaults(func=cmd_make_media)

    demo = sub.add_parser("demo", help="serve the Omni model and send bigbuckbunny with sound")
    demo.add_argument("--size", choices=list(SIZES), default="tiny")
    demo.add_argument("--question", default="What happens in this clip, and what do you hear?")
    demo.add_argument("--method", default="omnizip", help="compression method (X-TokenZip-Method)")
    demo.add_argument(
        "--ratio", type=float, default=0.55, help="fraction of audio+video tokens to prune"
    )
    demo.set_defaults(func=cmd_demo)

    from tokenzip_server.launcher import configure_parser

    serve = sub.add_parser("serve", help="run vllm serve with the plugin's flags and middleware",
                           description="Run vLLM's OpenAI server with TokenZip.")  # fmt: skip
    configure_parser(serve)
    serve.set_defaults(func=cmd_serve)

    from vllm_tokenzip import bench

    bench.configure_parser(sub.add_parser("bench", help="load running servers: baseline vs ratios"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.vllm_args = rest
    started = time.monotonic()
    code = args.func(args)
    print(f"[tokenzip {args.command}: {time.monotonic() - started:.1f} s]", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
