"""The `jaxllm` command: a table of subcommands, each a function that adds its flags and a small handler
that calls an importable function."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys

import jax

from jaxllm import JaxllmError, autotrain, convert, plan
from jaxllm.config import check_number, load_config, to_json
from jaxllm.distributed import exit_lost_peer, lost_peer
from jaxllm.hf import hub
from jaxllm.load import load_model
from jaxllm.models.generation import GenerateConfig, generate_text, wrap
from jaxllm.prep import PrepConfig, prepare
from jaxllm.push import push
from jaxllm.train.loop import train
from jaxllm.train.run import check_complete

# jaxllm.evaluate (lm_eval) and jaxllm.prep.beam (apache_beam) are imported by their handlers: a missing
# extra is then its one-line error when that command runs, not an import error for every command.

OVERRIDES = "Override any config key with --config.section.key=value."
_PREP_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "prep_default.py")


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
            overrides.append(arg[len("--config.") :])
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _load(args: argparse.Namespace, overrides: list[str], complete: bool = False):
    """The config file with its overrides; `complete`: refuse a file that leaves a section out."""
    cfg = load_config(args.config, overrides)
    if complete:
        check_complete(cfg, args.config.partition(":")[0])
    return cfg


def _default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.partition(":")[0]))[0]
    return os.path.join("runs", name)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.epilog = OVERRIDES
    p.add_argument("--config", required=True, help="configs/<name>.py (optionally :arg)")
    p.add_argument("--workdir", default="", help="checkpoints, metrics and logs (default runs/<config name>)")


def _train(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    cfg = _load(args, overrides, complete=True)
    try:
        result = train(cfg, args.workdir or _default_workdir(args.config))
    except Exception as e:  # another process died: say so and stop now, not after the shutdown barrier
        if lost_peer(e):
            exit_lost_peer(e)
        raise
    if jax.process_index() == 0:
        print(json_line({k: v for k, v in result.items() if k != "sample"}))
    return 0


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.epilog = OVERRIDES
    autotrain.add_arguments(p)


def _finetune(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    result = autotrain.finetune(args, overrides, command)
    if jax.process_index() == 0:
        print(json_line({k: v for k, v in result.items() if k not in ("sample", "push_error")}))
    if result.get("push_error"):  # trained and exported; the upload alone failed
        print(f"jaxllm: error: {result['push_error']}", file=sys.stderr)
        return 1
    return 0


def _prep_args(p: argparse.ArgumentParser) -> None:
    p.epilog = OVERRIDES
    p.add_argument(
        "--input",
        action="append",
        required=True,
        help="glob, folder, tfds:NAME:SPLIT, or a data set split: a Hugging Face Hub id org/name[@rev] "
        "or a local folder, then :SPLIT or :CONFIG:SPLIT (default train) (repeatable); text, "
        ".jsonl/.json, .parquet, .csv, .arrow by extension",
    )
    p.add_argument("--output", required=True, help="folder for the shards, tokenizer.model, stats.json, report.md")
    p.add_argument("--config", default=_PREP_CONFIG, help="configs/prep_default.py form (default: that file)")
    p.add_argument(
        "--runner",
        default="local",
        help="local (every core of this machine) or an Apache Beam runner: DirectRunner, DataflowRunner, "
        "FlinkRunner, SparkRunner, ... (pip install 'jaxllm[beam]')",
    )
    p.add_argument(
        "--beam_options",
        default="",
        help="Beam pipeline flags in one string, e.g. '--project=P --region=R --temp_location=gs://B/tmp'",
    )


def _prep(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    prep_cfg = PrepConfig.from_config(_load(args, overrides))
    if args.runner == "local":
        if args.beam_options:
            raise JaxllmError("--beam_options needs a Beam --runner (DirectRunner, DataflowRunner, ...)")
        stats = prepare(args.input, args.output, prep_cfg)
    else:
        from jaxllm.prep.beam import prepare_beam  # apache_beam: an extra

        stats = prepare_beam(
            args.input, args.output, prep_cfg, runner=args.runner, options=shlex.split(args.beam_options)
        )
    out = stats["output"]
    folder = args.output if "://" in args.output else os.path.abspath(args.output)
    print(
        json.dumps(
            {
                "output": folder,
                "records": out["records"],
                "tokens": out["tokens"],
                "shards": len(out["shards"]),
                "report": os.path.join(folder, "report.md"),
            }
        )
    )
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.epilog = "Override any config key with --config.section.key=value, as for train."
    p.add_argument("--config", required=True, help="configs/<name>.py (optionally :arg), as for train")
    p.add_argument(
        "--topology",
        default="",
        help="a Cloud TPU slice (v4-32, v5p-512, v5e-256, v6e-64, ...) or local (this machine's devices); "
        "default: the config's mesh.slice, else local",
    )
    p.add_argument("--num_slices", type=int, default=1, help="TPU slices joined over DCN (the data axis spans them)")
    p.add_argument(
        "--search",
        action="store_true",
        help="try meshes, remat policies and grad_accum_steps; print the overrides of the fastest that fits",
    )
    p.add_argument("--max_compiles", type=int, default=8, help="with --search: compile at most this many settings")
    p.add_argument("--hbm_gib", type=float, default=0.0, help="memory per device to plan for (default: what it has)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument(
        "--no_cost",
        action="store_true",
        help="memory only: skip the step's cost (for scanned layers two more compiles, of 1 and 2 unrolled layers)",
    )


def _plan(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    cfg = _load(args, overrides, complete=True)
    hbm = args.hbm_gib or None
    args.topology = args.topology or cfg.get("mesh", {}).get("slice", "") or "local"
    if args.search:
        found = plan.search(
            cfg, args.topology, args.num_slices, hbm, args.max_compiles, log=(lambda line: None) if args.json else print
        )
        best = found["best"]
        if args.json:
            print(json_line({**(best or {"fits": False}), "overrides": found["overrides"], "tried": found["tried"]}))
        elif best is None:
            print(f"no setting among the {len(found['tried'])} compiled fits; raise --max_compiles or use more chips")
        else:
            print(plan.table(best))
            print("fastest setting that fits: " + " ".join(f"--config.{o}" for o in found["overrides"]))
        return 0 if best is not None else 1
    result = plan.plan(cfg, args.topology, args.num_slices, hbm, read_cost=not args.no_cost)
    print(json_line(result) if args.json else plan.table(result))
    return 0 if result["fits"] else 1


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)


def _config(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    print(to_json(_load(args, overrides)))
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from_hf", default="", help="a Hugging Face model folder or Hub id (org/name[@revision])")
    src.add_argument("--from_workdir", default="", help="a jaxllm training workdir (its latest checkpoint)")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (the jaxllm format's params)")
    p.add_argument(
        "--format",
        default="jaxllm",
        choices=("jaxllm", "safetensors"),
        help="with --from_hf: jaxllm (Orbax params to train from) or safetensors (a Hugging Face folder: "
        "turns pytorch_model*.bin weights into safetensors, tensors as stored)",
    )


def _convert(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    if not args.from_hf:
        if args.format != "jaxllm":
            raise JaxllmError("--format applies to --from_hf; --from_workdir writes a Hugging Face folder")
        convert.workdir_to_hf(args.from_workdir, args.output, dtype=args.dtype)
        print(f"wrote Hugging Face model folder {args.output}")
        return 0
    source = hub.local(args.from_hf, what="model")
    if args.format == "safetensors":
        if args.dtype != "float32":
            raise JaxllmError(
                "--dtype applies to --format=jaxllm; --format=safetensors keeps each tensor's stored dtype"
            )
        count = convert.hf_to_safetensors(source, args.output)
        print(f"wrote Hugging Face model folder {args.output} ({count} tensors in safetensors)")
        return 0
    convert.hf_to_checkpoint(source, args.output, dtype=args.dtype)
    print(f"wrote {args.output}/params; train from it with --config.checkpoint.init_from={args.output}")
    return 0


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir",
        required=True,
        help="a finetune run (its merged/, else adapter/, else model/), its "
        "--save_dir, or an export folder (jaxllm convert --from_workdir, a PEFT adapter)",
    )
    p.add_argument("--repo_id", required=True, help="the repository, ORG/NAME (created if missing)")
    p.add_argument(
        "--token",
        default=None,
        help="a Hub token with write access (default: HF_TOKEN, else the stored login); never printed or written",
    )
    p.add_argument(
        "--public", action="store_true", help="create the repository public (an existing one keeps its visibility)"
    )


def _push(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    print(json_line(push(args.workdir, args.repo_id, token=args.token, private=not args.public)))
    return 0


def _model_args(p: argparse.ArgumentParser, model_help: str) -> None:
    """--model, --revision and --adapter, as generate and eval take them."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--revision", default=None, help="branch, tag or commit of a --model Hub id (default: main)")
    p.add_argument("--adapter", default="", help="a PEFT LoRA adapter folder or Hub id applied to --model")


def _generate_args(p: argparse.ArgumentParser) -> None:
    _model_args(
        p,
        "a Hugging Face Hub id (org/name[@revision]), a Hugging Face "
        "folder (config.json + weights) or a jaxllm workdir",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt_file", default="", help="a file of prompts, one per line")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--greedy", action="store_true", help="same as --temperature=0")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8, help="prompts decoded together (left padding)")
    p.add_argument("--dtype", default="float32", help="params/compute dtype for a Hugging Face folder")
    p.add_argument("--width", type=int, default=75, help="wrap the output at this many characters; 0 = no wrap")


def _generate(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    check_number("--max_new_tokens", args.max_new_tokens, low=1, integer=True)
    check_number("--batch_size", args.batch_size, low=1, integer=True)
    check_number("--width", args.width, low=0, integer=True)  # 0 = no wrap
    prompts = args.prompt + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise JaxllmError("give a prompt: --prompt=TEXT (repeatable) or --prompt_file=FILE")
    gen = GenerateConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    model, params, tokenizer, add_bos = load_model(
        args.model, dtype=args.dtype, adapter=args.adapter, revision=args.revision
    )
    texts = generate_text(model, params, tokenizer, prompts, gen, add_bos=add_bos, batch_size=args.batch_size)
    for prompt, text in zip(prompts, texts):
        print(wrap(prompt + text, args.width) if args.width else prompt + text)
        print()
    return 0


def read_prompt_file(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 file of prompts, one per line (a line end of \\n or \\r\\n)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise JaxllmError(f"cannot read --prompt_file {path!r}: {e.strerror or e}") from None
    prompts = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        try:
            text = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise JaxllmError(
                f"--prompt_file {path!r} line {lineno} is not UTF-8 text (byte {e.start} of the "
                "line); save the file as UTF-8"
            ) from None
        if "\0" in text:
            raise JaxllmError(
                f"--prompt_file {path!r} line {lineno} holds a NUL byte: is it a binary file? "
                "Give a text file of prompts, one per line"
            )
        if text.strip():
            prompts.append(text)
    return prompts


def _eval_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, "a Hugging Face Hub id (org/name[@revision]), a Hugging Face folder or a jaxllm workdir")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated harness task names (hellaswag,arc_easy), globs (mmlu_*) or task YAML files",
    )
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch_size", type=int, default=8, help="rows scored together (split over the devices)")
    p.add_argument(
        "--limit", type=float, default=None, help="score the first N documents of each task (< 1: a fraction)"
    )
    p.add_argument("--include_path", default="", help="a folder of your own task YAML files")
    p.add_argument(
        "--output_path",
        default="",
        help="write the results JSON: a .json file, or a folder (then FOLDER/<model>/results_<time>.json, as lm_eval)",
    )
    p.add_argument("--seed", default="0,1234,1234,1234", help="python,numpy,torch,few-shot seeds, or one for all")
    p.add_argument("--dtype", default="float32", help="params/compute dtype for a Hugging Face folder")


def _eval(args: argparse.Namespace, overrides: list[str], command: list[str]) -> int:
    from jaxllm import evaluate  # without lm-evaluation-harness: the one line that says how to install it

    results = evaluate.evaluate(
        args.model,
        args.tasks,
        adapter=args.adapter,
        revision=args.revision,
        dtype=args.dtype,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        limit=args.limit,
        include_path=args.include_path,
        seed=evaluate.seeds(args.seed),
    )
    if jax.process_index() == 0:
        if args.output_path:
            print(f"wrote {evaluate.write_results(results, args.output_path, args.model)}")
        print(evaluate.table(results))
    return 0


# name -> (help, the function that adds its flags, the handler); `jaxllm --help` lists them in this order
COMMANDS = {
    "train": ("train (or resume) a model from a config file", _train_args, _train),
    "finetune": (
        "fine-tune a Hugging Face model folder (LoRA, QLoRA or "
        "full) with autotrain-style flags; writes a PEFT adapter (and a merged model)",
        _finetune_args,
        _finetune,
    ),
    "prep": (
        "clean, filter, deduplicate, augment, tokenize and shard a corpus into "
        "ArrayRecord files for data.source=array_record",
        _prep_args,
        _prep,
    ),
    "plan": (
        "compile a run's train step for a Cloud TPU slice (no TPU needed) or the local "
        "devices: does it fit, memory per chip, where it goes; --search finds a setting that fits",
        _plan_args,
        _plan,
    ),
    "config": ("print the resolved config (after overrides) as JSON", _config_args, _config),
    "convert": (
        "Hugging Face folder -> jaxllm params checkpoint, or workdir -> Hugging Face",
        _convert_args,
        _convert,
    ),
    "push": (
        "upload a finetune run's export (or a Hugging Face model or PEFT adapter "
        "folder) with a model card to a Hugging Face Hub model repository, private by default",
        _push_args,
        _push,
    ),
    "generate": ("continue prompts with a Hugging Face model folder or a training workdir", _generate_args, _generate),
    "eval": (
        "score a model on lm-evaluation-harness tasks (pip install 'jaxllm[eval]'); prints the harness's table",
        _eval_args,
        _eval,
    ),
}
ALIASES = {"llm": "finetune"}  # alias -> command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="Train and fine-tune decoder LLMs with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, aliases=[a for a, n in ALIASES.items() if n == name], help=text))
    return parser


def run(argv: list[str]) -> int:
    command = ["jaxllm", *argv]  # as typed, for a model card (the token removed there)
    argv, overrides = _split_config_flags(argv)
    args = _parser().parse_args(argv)
    _, _, handler = COMMANDS[ALIASES.get(args.command, args.command)]
    return handler(args, overrides, command)


def json_line(value) -> str:
    """`value` as one line of strict JSON: a non-finite number (a diverged loss) becomes "nan", "inf" or
    "-inf" as in metrics.jsonl, a NumPy scalar or array its Python value, anything else its str()."""

    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):  # NumPy / JAX scalars and arrays
            return plain(v.tolist())
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    return json.dumps(plain(value), allow_nan=False)


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(list(sys.argv[1:] if argv is None else argv))
    except JaxllmError as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", 2)  # 1: a failed upload, 2: any other error
    sys.exit(code)


if __name__ == "__main__":
    main()
