"""The `jaxllm` command. Thin: each subcommand parses flags and calls an importable function."""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxllm import JaxllmError


def _split_config_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` (or `--config.a.b v`) overrides from the other flags."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" not in arg:
                if i + 1 >= len(argv):
                    raise JaxllmError(f"{arg} needs a value: {arg}=VALUE")
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="Train and fine-tune decoder LLMs with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a model from a config file",
                       epilog="Override any config key with --config.section.key=value.")
    p.add_argument("--config", required=True, help="configs/<name>.py (optionally :arg)")
    p.add_argument("--workdir", default="", help="checkpoints, metrics and logs (default runs/<config name>)")
    p = sub.add_parser("config", help="print the resolved config (after overrides) as JSON")
    p.add_argument("--config", required=True)
    return parser


def _default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.partition(":")[0]))[0]
    return os.path.join("runs", name)


def run(argv: list[str]) -> int:
    from jaxllm.config import load_config, to_json

    argv, overrides = _split_config_flags(argv)
    args = _parser().parse_args(argv)
    cfg = load_config(args.config, overrides)
    if args.command == "config":
        print(to_json(cfg))
        return 0
    if args.command == "train":
        from jaxllm.train.loop import train

        result = train(cfg, args.workdir or _default_workdir(args.config))
        summary = {k: v for k, v in result.items() if k != "sample"}
        import jax

        if jax.process_index() == 0:
            print(json.dumps(summary, default=str))
        return 0
    return 2


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(list(sys.argv[1:] if argv is None else argv))
    except JaxllmError as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
