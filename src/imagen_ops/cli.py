"""`imagen-ops`: thin commands that parse, load params.yaml, call the library, report.

Every command takes `--params PATH` and `-S KEY=VALUE` overrides (dotted keys, YAML values,
e.g. `-S stages.base.train.steps=200`). Default paths match dvc.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

from imagen_ops.config import ConfigError, Params, SampleConfig, load_params

log = logging.getLogger("imagen_ops")

ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    FileNotFoundError,
    ValueError,
    KeyError,
    RuntimeError,
)


def _params(args: argparse.Namespace, *extra: str) -> Params:
    return load_params(args.params, [*args.set, *extra])


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


# ---------------------------------------------------------------------------- data


def cmd_synth(args: argparse.Namespace) -> None:
    from imagen_ops.data.ingest import ingest
    from imagen_ops.data.sources import synth_source

    extra = [
        f"data.synth.{k}={v}" for k, v in (("n", args.n), ("seed", args.seed)) if v is not None
    ]
    params = _params(args, *extra)
    records = synth_source(params.data.synth, workers=args.workers)
    report = ingest(
        records, Path(args.out), params.data.ingest, Path(args.report), progress=not args.quiet
    )
    _out(json.dumps(report.to_dict(), indent=2))


def cmd_ingest(args: argparse.Namespace) -> None:
    from imagen_ops.data.ingest import ingest
    from imagen_ops.data.sources import open_source

    params = _params(args, *([f"data.ingest.format={args.format}"] if args.format else []))
    report = ingest(
        open_source(args.source, params.data.ingest),
        Path(args.out),
        params.data.ingest,
        Path(args.report),
        progress=not args.quiet,
    )
    _out(json.dumps(report.to_dict(), indent=2))


def cmd_prepare(args: argparse.Namespace) -> None:
    from imagen_ops.data.prepare import prepare

    params = _params(args)
    sizes = sorted({s.resolution for s in params.stages.values()})
    manifest = prepare(
        Path(args.data), Path(args.out), sizes, params.data.prepare, progress=not args.quiet
    )
    _out(json.dumps(manifest, indent=2))


def cmd_encode_text(args: argparse.Namespace) -> None:
    from imagen_ops.data.prepare import PreparedData
    from imagen_ops.text.cache import build_cache
    from imagen_ops.text.encoders import load_text_encoder

    params = _params(args)
    captions = PreparedData.open(Path(args.prepared)).table["caption"].tolist()
    encoder = load_text_encoder(params.text)
    manifest = build_cache(
        captions,
        encoder,
        Path(args.out),
        batch_size=params.text.batch_size,
        progress=not args.quiet,
    )
    _out(json.dumps(manifest, indent=2))


# --------------------------------------------------------------------------- model


def cmd_summary(args: argparse.Namespace) -> None:
    from imagen_ops.models.summary import summarize

    params = _params(args)
    rows = summarize(params, text_dim=args.text_dim, text_length=args.text_length)
    header = f"{'stage':<10}{'size':>6}{'params (M)':>12}{'GFLOP/fwd':>12}{'GFLOP/step':>12}"
    _out(header)
    for r in rows:
        _out(
            f"{r['stage']:<10}{r['resolution']:>6}{r['params'] / 1e6:>12.2f}"
            f"{r['gflops_forward']:>12.2f}{r['gflops_train_step']:>12.2f}"
        )


def cmd_train(args: argparse.Namespace) -> None:
    from imagen_ops.train.trainer import Trainer, TrainPaths

    params = _params(args)
    name = args.stage
    paths = TrainPaths(
        prepared=Path(args.prepared),
        cache=Path(args.cache),
        out=Path(args.out or f"artifacts/models/{name}"),
        checkpoints=Path(args.checkpoints or f"artifacts/checkpoints/{name}"),
        metrics=Path(args.metrics or f"reports/train_{name}.csv"),
    )
    init_from = _resolve_init(args.init_from, name) if args.init_from else None
    tracker = None
    if params.registry.track_training and not args.no_track and _rank() == 0:
        from imagen_ops.registry.tracking import training_tracker

        tracker = training_tracker(params.registry, name)
    trainer = Trainer(
        params, name, paths, init_from=init_from, tracker=tracker, progress=not args.quiet
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.close(status)
        trainer.close()
    if _rank() == 0:
        _out(json.dumps(result.__dict__, indent=2))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _resolve_init(source: str, stage: str) -> Path:
    """A stage directory, a cascade directory holding the stage, or a models:/ URI."""
    if source.startswith(("models:/", "runs:/")):
        from imagen_ops.registry.pyfunc import download_cascade

        source = str(download_cascade(source))
    path = Path(source)
    if (path / stage / "config.json").is_file():
        return path / stage
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"--init-from {source}: no stage {stage!r} there (no config.json)")


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from imagen_ops.images import make_grid, to_uint8
    from imagen_ops.registry.pyfunc import load_cascade

    params = _params(args)
    overrides = {
        k: v
        for k, v in (("sampler", args.sampler), ("steps", args.steps), ("guidance", args.guidance))
        if v is not None
    }
    settings = params.sample.model_copy(update=overrides)
    cascade = load_cascade(args.model, params)
    prompts = [p for p in args.prompts for _ in range(args.num_images)]
    seeds = [args.seed + k for k in range(len(prompts))]
    with torch.inference_mode():
        images = to_uint8(cascade.sample(prompts, settings, seeds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1 and not args.grid:
        Image.fromarray(images[0]).save(out)
    elif args.grid:
        make_grid(images, prompts).save(out)
    else:
        for k, image in enumerate(images):
            Image.fromarray(image).save(out.with_name(f"{out.stem}_{k:03d}{out.suffix}"))
    _out(
        f"wrote {len(images)} image(s) for {len(args.prompts)} prompt(s) to {out}"
        f" (mean pixel {float(np.mean(images)):.1f})"
    )


def cmd_params_apply(args: argparse.Namespace) -> None:
    import io

    import yaml
    from ruamel.yaml import YAML

    from imagen_ops.config import deep_merge, flatten, parse_params
    from imagen_ops.files import write_text_atomic

    base = yaml.safe_load(Path(args.params).read_text()) or {}
    recipe = yaml.safe_load(Path(args.recipe).read_text()) or {}
    merged = deep_merge(base, recipe)
    parse_params(merged, f"{args.params} + {args.recipe}")  # validate before writing
    # Round-trip the file so its comments and layout survive; only the recipe's leaves change.
    rt = YAML()
    rt.preserve_quotes = True
    document = rt.load(Path(args.params).read_text())
    _merge_in_place(document, recipe)
    text = io.StringIO()
    rt.dump(document, text)
    out = Path(args.out or args.params)
    write_text_atomic(out, text.getvalue())
    changed = {k: v for k, v in flatten(merged).items() if flatten(base).get(k) != v}
    _out(f"wrote {out}; {len(changed)} value(s) from {args.recipe}:")
    for key, value in changed.items():
        _out(f"  {key}: {value}")


def _merge_in_place(document: Any, patch: dict[str, Any]) -> None:
    """Write the leaves of `patch` into a ruamel round-trip mapping, keeping its comments
    and the flow style of lists it replaces."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    for key, value in patch.items():
        old = document.get(key)
        if isinstance(value, dict) and isinstance(old, CommentedMap):
            _merge_in_place(old, value)
        elif isinstance(value, list) and isinstance(old, CommentedSeq):
            seq = CommentedSeq(value)
            if old.fa.flow_style():
                seq.fa.set_flow_style()
            document[key] = seq
        else:
            document[key] = value


# ----------------------------------------------------------- evaluation, registry


def cmd_evaluate(args: argparse.Namespace) -> None:
    from imagen_ops.eval.evaluate import EvalPaths, evaluate

    params = _params(args)
    paths = EvalPaths(
        Path(args.prepared),
        Path(args.cache),
        Path(args.models),
        Path(args.out),
        Path(args.metrics),
        Path(args.sweep),
        Path(args.feature_cache),
    )
    result = evaluate(params, paths, device=args.device, progress=not args.quiet)
    _out(json.dumps(result, indent=2))


def cmd_register(args: argparse.Namespace) -> None:
    from imagen_ops.registry.register import RegisterPaths, register

    params = _params(args)
    paths = RegisterPaths(
        Path(args.root), Path(args.models), Path(args.metrics), Path(args.eval_dir)
    )
    _out(json.dumps(register(params, paths, run_id=args.run_id), indent=2))


def cmd_promote(args: argparse.Namespace) -> None:
    from imagen_ops.registry.register import promote

    decision = promote(_params(args).registry, version=args.version, force=args.force)
    _out(json.dumps(decision.to_dict(), indent=2))


# ---------------------------------------------------------------------------- main


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. -S stages.base.train.steps=100 (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="imagen-ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], None], help_: str, parent=sub):
        p = parent.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    data = sub.add_parser("data", help="create or import the raw data set (data/)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = add("synth", cmd_synth, "render the synthetic shapes data into data/", data_sub)
    p.add_argument("--n", type=int, help="number of scenes (data.synth.n)")
    p.add_argument("--seed", type=int, help="generator seed (data.synth.seed)")
    p.add_argument("--out", default="data")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--report", default="reports/ingest.json")
    p = add("ingest", cmd_ingest, "validate and import images with captions into data/", data_sub)
    p.add_argument("source", help="image folder, .jsonl/.csv manifest, .tar shard(s) or .parquet")
    p.add_argument("--out", default="data")
    p.add_argument("--format", choices=["auto", "folder", "jsonl", "csv", "webdataset", "parquet"])
    p.add_argument("--report", default="reports/ingest.json")

    params_p = sub.add_parser("params", help="manage params.yaml")
    params_sub = params_p.add_subparsers(dest="params_command", required=True)
    p = add(
        "apply",
        cmd_params_apply,
        "write params.yaml with a recipe (configs/*.yaml) merged in",
        params_sub,
    )
    p.add_argument("recipe", help="partial params file, e.g. configs/quality.yaml")
    p.add_argument("--out", help="where to write (default: the --params file itself)")

    p = add("prepare", cmd_prepare, "pack data/ into per-resolution arrays (DVC stage prepare)")
    p.add_argument("--data", default="data")
    p.add_argument("--out", default="artifacts/prepared")
    p = add("encode-text", cmd_encode_text, "embed every caption once (DVC stage encode_text)")
    p.add_argument("--prepared", default="artifacts/prepared")
    p.add_argument("--out", default="artifacts/text_cache")

    model = sub.add_parser("model", help="inspect the cascade's networks")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    p = add("summary", cmd_summary, "parameters and FLOPs per stage", model_sub)
    p.add_argument("--text-dim", type=int, default=384, help="text embedding width")
    p.add_argument("--text-length", type=int, default=16, help="text tokens for FLOPs")

    p = add("train", cmd_train, "train one cascade stage (DVC stage train@NAME)")
    p.add_argument("--stage", required=True)
    p.add_argument("--prepared", default="artifacts/prepared")
    p.add_argument("--cache", default="artifacts/text_cache")
    p.add_argument("--out", help="default: artifacts/models/STAGE")
    p.add_argument("--checkpoints", help="default: artifacts/checkpoints/STAGE")
    p.add_argument("--metrics", help="default: reports/train_STAGE.csv")
    p.add_argument("--init-from", help="stage or cascade directory, or models:/NAME@ALIAS")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")

    p = add("sample", cmd_sample, "generate images for prompts")
    p.add_argument("prompts", nargs="+")
    p.add_argument(
        "--model",
        default="artifacts/models",
        help="cascade directory or models:/NAME@ALIAS (default: artifacts/models)",
    )
    p.add_argument("--out", default="samples/sample.png")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=get_args(SampleConfig.model_fields["sampler"].annotation))
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--grid", action="store_true", help="one labelled grid instead of files")

    p = add("evaluate", cmd_evaluate, "sample held-out prompts, FID/KID/CLIP/alignment, sweep")
    p.add_argument("--prepared", default="artifacts/prepared")
    p.add_argument("--cache", default="artifacts/text_cache")
    p.add_argument("--models", default="artifacts/models")
    p.add_argument("--out", default="artifacts/eval")
    p.add_argument("--metrics", default="reports/metrics.json")
    p.add_argument("--sweep", default="reports/guidance_sweep.csv")
    p.add_argument("--feature-cache", default="artifacts/fid_cache")
    p.add_argument("--device", default="auto")

    p = add("register", cmd_register, "log the run and model to MLflow; gate the champion")
    p.add_argument("--root", default=".", help="project root (git + DVC)")
    p.add_argument("--models", default="artifacts/models")
    p.add_argument("--metrics", default="reports/metrics.json")
    p.add_argument("--eval-dir", default="artifacts/eval")
    p.add_argument("--run-id", help="log into this MLflow run (the retraining flow's)")

    p = add("promote", cmd_promote, "move alias champion to a version if it passes the gate")
    p.add_argument("--version", help="model version (default: the challenger)")
    p.add_argument("--force", action="store_true", help="promote even if the gate says no")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.fn(args)
    except ERRORS as err:
        if args.verbose:
            raise
        log.error("%s: %s", type(err).__name__, err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
