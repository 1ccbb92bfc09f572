"""`imagen-ops`: thin commands that parse, load params.yaml, call the library, report.

Every command takes `--params PATH` and `-S KEY=VALUE` overrides (dotted keys, YAML values,
e.g. `-S stages.base.train.steps=200`). Path options default to the `paths` section of
params.yaml, from which dvc.yaml is generated (`imagen-ops pipeline write`).
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

from imagen_ops import __version__
from imagen_ops.config import IngestConfig, Params, SampleConfig, load_params
from imagen_ops.diffusion.samplers import SAMPLERS
from imagen_ops.pipeline import view_for

log = logging.getLogger("imagen_ops")


def _params(args: argparse.Namespace, *extra: str) -> Params:
    return load_params(args.params or "params.yaml", [*args.set, *extra])


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _path(value: str | None, default: str) -> Path:
    """A path option, or its default from params.yaml's `paths` section."""
    return Path(value if value is not None else default)


# ---------------------------------------------------------------------------- data


def cmd_synth(args: argparse.Namespace) -> None:
    from imagen_ops.data.ingest import ingest
    from imagen_ops.data.sources import synth_count, synth_source

    extra = [
        f"data.synth.{k}={v}" for k, v in (("n", args.n), ("seed", args.seed)) if v is not None
    ]
    params = _params(args, *extra)
    out = _path(args.out, params.paths.data)
    synth = params.data.synth
    records = synth_source(synth, workers=args.workers, have=synth_count(out, synth))
    report = ingest(
        records,
        out,
        params.data.ingest,
        _path(args.report, params.paths.ingest_report),
        progress=not args.quiet,
    )
    _out(json.dumps(report.to_dict(), indent=2))


def cmd_ingest(args: argparse.Namespace) -> None:
    from imagen_ops.data.ingest import ingest
    from imagen_ops.data.sources import open_source

    params = _params(args, *([f"data.ingest.format={args.format}"] if args.format else []))
    report = ingest(
        open_source(args.source, params.data.ingest),
        _path(args.out, params.paths.data),
        params.data.ingest,
        _path(args.report, params.paths.ingest_report),
        progress=not args.quiet,
    )
    _out(json.dumps(report.to_dict(), indent=2))


def cmd_prepare(args: argparse.Namespace) -> None:
    from imagen_ops.data.prepare import prepare

    params = _params(args)
    view = view_for(params, "prepare")
    sizes = sorted({view[f"stages.{name}.resolution"] for name in view.stage_names})
    manifest = prepare(
        _path(args.data, params.paths.data),
        _path(args.out, params.paths.prepared),
        sizes,
        view["data.prepare"],
        progress=not args.quiet,
    )
    _out(json.dumps(manifest, indent=2))


def cmd_encode_text(args: argparse.Namespace) -> None:
    from imagen_ops.data.prepare import PreparedData
    from imagen_ops.text.cache import build_cache
    from imagen_ops.text.encoders import load_text_encoder

    params = _params(args)
    text = view_for(params, "encode_text")["text"]
    prepared = _path(args.prepared, params.paths.prepared)
    captions = PreparedData.open(prepared).table["caption"].tolist()
    manifest = build_cache(
        captions,
        load_text_encoder(text),
        _path(args.out, params.paths.text_cache),
        extra_layers=[text.scorer_layer],  # the scorer reads its own layer
        progress=not args.quiet,
    )
    _out(json.dumps(manifest, indent=2))


def cmd_train_scorer(args: argparse.Namespace) -> None:
    from imagen_ops.train.scorer import ScorerPaths, train_scorer

    params = _params(args)
    p, view = params.paths, view_for(params, "train_scorer")
    paths = ScorerPaths(
        prepared=_path(args.prepared, p.prepared),
        cache=_path(args.cache, p.text_cache),
        out=_path(args.out, p.scorer),
        metrics=_path(args.metrics, p.scorer_metrics),
    )
    base = view.stage_names[0]
    resolution = view[f"stages.{base}.resolution"]
    report = train_scorer(view["scorer"], view["text"], resolution, paths, progress=not args.quiet)
    _out(json.dumps(report, indent=2))


# --------------------------------------------------------------------------- model


def cmd_summary(args: argparse.Namespace) -> None:
    from imagen_ops.models.summary import summarize

    params = _params(args)
    rows = summarize(params.stages, text_dim=args.text_dim, text_length=args.text_length)
    header = f"{'stage':<10}{'size':>6}{'params (M)':>12}{'GFLOP/fwd':>12}{'GFLOP/step':>12}"
    _out(header)
    for r in rows:
        _out(
            f"{r['stage']:<10}{r['resolution']:>6}{r['params'] / 1e6:>12.2f}"
            f"{r['gflops_forward']:>12.2f}{r['gflops_train_step']:>12.2f}"
        )


def cmd_train(args: argparse.Namespace) -> None:
    from imagen_ops.pipeline import train_settings
    from imagen_ops.registry.loading import resolve_stage_dir
    from imagen_ops.train.trainer import Trainer, TrainPaths

    params = _params(args)
    name, p = args.stage, params.paths
    if name not in params.stages:
        raise KeyError(f"no stage {name!r} in params (stages: {params.stage_names()})")
    if args.init_from:  # as if params.yaml said it: the tracked run's params name the source
        params = _params(args, f"stages.{name}.train.init_from={json.dumps(args.init_from)}")
    settings = train_settings(params, name)
    paths = TrainPaths(
        prepared=_path(args.prepared, p.prepared),
        cache=_path(args.cache, p.text_cache),
        out=_path(args.out, p.model(name)),
        checkpoints=_path(args.checkpoints, p.checkpoint_dir(name)),
        metrics=_path(args.metrics, p.train_metrics(name)),
    )
    source = settings.stage.train.init_from
    if source == "champion":
        source = f"models:/{params.registry.model_name}@champion"
    init_from = resolve_stage_dir(source, name, params.registry) if source else None
    tracker = None
    if params.registry.track_training and not args.no_track and _rank() == 0:
        from imagen_ops.registry.tracking import training_tracker

        tracker = training_tracker(params.registry, name)
    status, trainer = "FAILED", None
    try:  # a run that fails, even while setting up, never stays RUNNING
        trainer = Trainer(
            settings, paths, init_from=init_from, tracker=tracker, progress=not args.quiet
        )
        result = trainer.fit()
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.close(status)
        if trainer is not None:
            trainer.close()
    if _rank() == 0:
        _out(json.dumps(result.__dict__, indent=2))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


SAMPLE_OPTIONS = (
    "sampler",
    "steps",
    "guidance",
    "guidance_interval",
    "seed",
    "batch_size",
    "negative_prompt",
    "strength",
    "rerank",
)
"""`imagen-ops sample` options that set the params.yaml key `sample.<option>`."""


def cmd_sample(args: argparse.Namespace) -> None:
    from PIL import Image

    from imagen_ops.cascade import CASCADE_FILE, Cascade
    from imagen_ops.device import resolve_device
    from imagen_ops.images import image_format, make_grid, save_image, to_uint8
    from imagen_ops.registry.loading import cascade_dir, packaged_settings

    params = _params(args) if args.params or Path("params.yaml").is_file() else None
    if params is None and args.set:
        raise ValueError(
            f"-S {' '.join(args.set)}: no params.yaml here to apply it to; outside a project "
            "the model's packaged settings apply, changed by the flags (--steps, --guidance, "
            "--seed, ...)"
        )
    prompts = _prompts(args.prompts, args.prompts_file)
    image_format(args.out)  # a file name PIL cannot write fails now, not after sampling
    if args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images}: give 1 or more")
    image, mask, lowres = _sample_images(args)
    given = {k: getattr(args, k) for k in SAMPLE_OPTIONS}
    given = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in given.items()}
    # a bad flag fails now, not after the model loaded (a registry download); the ranges
    # do not depend on the defaults, which may be the packaged model's
    (params.sample if params else SampleConfig()).updated(**given)
    registry = params.registry if params else None
    source = args.model or (params.paths.models if params else None)
    if source is None:
        raise FileNotFoundError(
            "no params.yaml here: name the model with --model (a cascade folder or "
            "models:/NAME@ALIAS with MLFLOW_TRACKING_URI set)"
        )
    root = cascade_dir(source, registry)
    names, text = (params.stage_names(), params.text) if params else (None, None)
    cascade = Cascade.from_dir(root, names, text, resolve_device("auto"))
    # the project's sampling settings, else those the packaged model carries
    packaged = packaged_settings(root)[0]
    defaults = params.sample if params else packaged
    if params is not None and (root / CASCADE_FILE).is_file() and params.sample != packaged:
        differ = sorted(k for k, v in params.sample if getattr(packaged, k) != v)
        log.warning(
            "params.yaml's sample settings apply, not those %s carries (%s differ): the "
            "served model would give other images; run outside the project for its own",
            source,
            ", ".join(differ),
        )
    settings = defaults.updated(**given)
    if settings.rerank > 1 and cascade.scorer is None and params is not None:
        project = Path(params.paths.scorer)  # its format-3 scorer read params text.layer
        cascade.scorer = _optional_scorer(project, params.text.layer)
    prompts = [p for p in prompts for _ in range(args.num_images)]
    seeds = [settings.seed + k for k in range(len(prompts))]
    out = to_uint8(
        cascade.sample(
            prompts, settings, seeds, image=image, mask=mask, lowres=lowres, progress=not args.quiet
        )
    )
    path = Path(args.out)
    if args.grid:
        files = {path: make_grid(out, prompts)}
    elif len(out) == 1:
        files = {path: Image.fromarray(out[0])}
    else:
        names = [path.with_name(f"{path.stem}_{k:03d}{path.suffix}") for k in range(len(out))]
        files = {name: Image.fromarray(image_k) for name, image_k in zip(names, out, strict=True)}
    replaced = sum(file.exists() for file in files)
    for file, picture in files.items():
        save_image(picture, file)
    written = list(files)
    _out(
        f"wrote {len(out)} image(s) for {len(prompts)} prompt(s): {written[0]}"
        + (f" ... {written[-1]}" if len(written) > 1 else "")
        + (f" ({replaced} replaced)" if replaced else "")
    )


def _prompts(given: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line and the file (one per line; blank lines and lines
    starting with # skipped), each checked like a caption."""
    from imagen_ops.cascade import check_prompt

    found = [(f"prompt {k + 1}", p) for k, p in enumerate(given)]
    if prompts_file:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        found += [
            (f"{prompts_file} line {k + 1}", line)
            for k, line in enumerate(lines)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if not found:
        raise ValueError("no prompts: give them as arguments or with --prompts-file FILE")
    prompts = []
    for where, prompt in found:
        try:
            prompts.append(check_prompt(prompt))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return prompts


def _sample_images(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(image, mask, lowres) from --image / --mask / --strength (cascade.image_roles)."""
    from imagen_ops.cascade import image_roles
    from imagen_ops.images import read_image

    image, mask = (
        None if path is None else read_image(Path(path).read_bytes(), mask=name == "mask")
        for name, path in (("image", args.image), ("mask", args.mask))
    )
    return image_roles(image, mask, args.strength)


def cmd_params_apply(args: argparse.Namespace) -> None:
    import io

    from ruamel.yaml import YAML

    from imagen_ops.config import apply_overrides, deep_merge, flatten, parse_params, read_yaml
    from imagen_ops.files import write_text_atomic

    source = Path(args.params or "params.yaml")
    base = read_yaml(source.read_text()) or {}
    # the recipe's values with the -S overrides over them: what is written into the file
    patch = apply_overrides(read_yaml(Path(args.recipe).read_text()) or {}, args.set)
    merged = deep_merge(base, patch)
    parse_params(merged, f"{source} + {args.recipe}")  # validate before writing
    # Round-trip the file so its comments and layout survive; only the patch's leaves change.
    rt = YAML()
    rt.preserve_quotes = True
    rt.representer.add_representer(type(None), _null)  # not ruamel's empty value
    document = rt.load(source.read_text())
    _merge_in_place(document, patch)
    text = io.StringIO()
    rt.dump(document, text)
    out = Path(args.out) if args.out else source
    write_text_atomic(out, text.getvalue())
    changed = {k: v for k, v in flatten(merged).items() if flatten(base).get(k) != v}
    overridden = f" and {len(args.set)} -S override(s)" if args.set else ""
    _out(f"wrote {out}; {len(changed)} value(s) from {args.recipe}{overridden}:")
    for key, value in changed.items():
        _out(f"  {key}: {value}")


def cmd_params_show(args: argparse.Namespace) -> None:
    import yaml

    from imagen_ops.config import ConfigError

    resolved: Any = _params(args).model_dump(mode="json")
    for part in args.key.split(".") if args.key else []:
        if not isinstance(resolved, dict) or part not in resolved:
            raise ConfigError(f"params show: no parameter {args.key!r} (at {part!r})")
        resolved = resolved[part]
    if isinstance(resolved, dict):
        _out(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False).rstrip())
    else:  # one value: a string as it is (for shell use), anything else as JSON
        _out(resolved if isinstance(resolved, str) else json.dumps(resolved))


def _null(representer: Any, _: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


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
    from imagen_ops.cascade import Cascade, cascade_digest
    from imagen_ops.device import resolve_device
    from imagen_ops.eval.evaluate import EvalPaths, cascade_sampler, evaluate, held_out

    params = _params(args)
    p, view = params.paths, view_for(params, "evaluate")
    cfg, text = view["eval"], view["text"]
    scorer = _optional_scorer(_path(args.scorer, p.scorer), text.layer)
    prompts = held_out(
        _path(args.prepared, p.prepared),
        _path(args.cache, p.text_cache),
        text,
        cfg,
        scorer_layer=None if scorer is None else scorer.text_layer,
    )
    models = _path(args.models, p.models)
    cascade = Cascade.from_dir(models, view.stage_names, text, resolve_device(args.device))
    cascade.scorer = scorer
    paths = EvalPaths(
        out=_path(args.out, p.eval),
        metrics=_path(args.metrics, p.metrics),
        scores=_path(args.scores, p.scores),
        sweep=_path(args.sweep, p.guidance_sweep),
        feature_cache=_path(args.feature_cache, p.fid_cache),
        timings=_path(args.timings, p.timings),
    )
    result = evaluate(
        cfg,
        view["sample"],
        cascade_sampler(cascade, progress=not args.quiet),
        prompts,
        paths,
        stage_count=len(cascade.stages),
        model_sha256=cascade_digest(models, view.stage_names),
        device=args.device,
        scorer=cascade.scorer,
    )
    _out(json.dumps(result, indent=2))


def _optional_scorer(path: Path, text_layer: int):
    """The trained scorer at `path` (a format-3 one read `text_layer`), or None (with a log
    line) when there is none."""
    from imagen_ops.scorer import load_scorer

    if not (path / "config.json").is_file():
        log.warning("no scorer at %s: in_domain_clip_score is null (dvc repro train_scorer)", path)
        return None
    return load_scorer(path, cache_layer=text_layer)


def cmd_register(args: argparse.Namespace) -> None:
    """In the project `--root`: its params.yaml (unless --params), and its store, artifact
    root and alias lock, whose relative paths name the project's, as in the flow."""
    from contextlib import chdir

    from imagen_ops.registry.register import register_project

    root = Path(args.root)
    params = load_params(args.params or root / "params.yaml", args.set)
    with chdir(root):
        result = register_project(
            Path(), params, args.run_id, args.models, args.metrics, args.eval_dir
        )
    _out(json.dumps(result, indent=2))


def cmd_golden_make(args: argparse.Namespace) -> None:
    from imagen_ops.eval.golden import GOLDEN_FILE, make_golden, write_golden

    params = _params(args)
    out = _path(args.out, params.paths.golden)
    if (out / GOLDEN_FILE).is_file() and not args.force:
        raise FileExistsError(
            f"{out / GOLDEN_FILE} exists: the golden set is frozen (pass --force to replace it, "
            "then `dvc add` it: later gates compare on the new set)"
        )
    cfg = params.registry
    path = write_golden(out, make_golden(cfg.golden_per_category, cfg.golden_seed))
    _out(f"wrote {path}; version it with `dvc add {out}`")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from imagen_ops.registry.reproduce import reproduce

    params = _params(args)
    result = reproduce(args.model, Path(args.root), params.registry, keep=args.keep)
    _out(json.dumps({**result.__dict__, "identical": result.identical}, indent=2))
    if result.packaged_sha256 != result.expected_sha256:
        raise RuntimeError(
            f"{result.uri}: the weights it serves (sha256 {result.packaged_sha256}) are not "
            f"the ones registered ({result.expected_sha256}): its artifacts changed after "
            "registration"
        )
    if not result.identical:
        raise RuntimeError(
            f"{result.uri}: the rebuilt weights differ (sha256 {result.rebuilt_sha256}, "
            f"registered {result.expected_sha256}); same thread count and CPU type?"
        )


def cmd_pipeline_write(args: argparse.Namespace) -> None:
    from imagen_ops.files import write_text_atomic
    from imagen_ops.pipeline import prune_lock, render_dvc_yaml

    out = Path(args.out)
    read = out.parent / "params.yaml"  # the file dvc.yaml's params and commands read
    if args.set or (args.params and Path(args.params).resolve() != read.resolve()):
        given = " ".join([*(["--params", args.params] if args.params else []), *args.set])
        raise ValueError(
            f"pipeline write {given}: {out}'s stages read {read}, not these settings; write "
            "them there (`imagen-ops params apply RECIPE` merges a recipe) and run "
            "`imagen-ops pipeline write` alone"
        )
    params = _params(args)
    text = render_dvc_yaml(params)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise RuntimeError(
                f"{out} is not what params.yaml generates; run `imagen-ops pipeline write`"
            )
        _out(f"{out} is up to date")
        return
    write_text_atomic(out, text)
    stale = prune_lock(out.with_name("dvc.lock"), params)
    _out(f"wrote {out}" + (f"; dropped {', '.join(stale)} from dvc.lock" if stale else ""))


def cmd_promote(args: argparse.Namespace) -> None:
    from imagen_ops.eval.golden import find_golden
    from imagen_ops.registry.register import promote

    params = _params(args)
    decision = promote(
        params.registry,
        version=args.version,
        force=args.force,
        golden=None if args.force else find_golden(Path(params.paths.golden)),
        settings=params.sample,
    )
    _out(json.dumps(decision.to_dict(), indent=2))


# ---------------------------------------------------------------------------- main

EXAMPLES = {
    "cmd_synth": ["imagen-ops data synth --n 2000 --seed 1"],
    "cmd_ingest": [
        "imagen-ops data ingest ~/photos/captions.jsonl",
        "imagen-ops data ingest 'shards/train-{000..009}.tar'",
    ],
    "cmd_params_apply": ["imagen-ops params apply configs/quality.yaml"],
    "cmd_params_show": [
        "imagen-ops params show",
        "imagen-ops params show stages.base.train -S stages.base.train.steps=100",
    ],
    "cmd_pipeline_write": ["imagen-ops pipeline write", "imagen-ops pipeline write --check"],
    "cmd_prepare": ["imagen-ops prepare"],
    "cmd_encode_text": [
        "imagen-ops encode-text",
        "imagen-ops encode-text --params t5.yaml --out artifacts/text_cache_t5",
    ],
    "cmd_train_scorer": ["imagen-ops train-scorer -S scorer.steps=300"],
    "cmd_summary": ["imagen-ops model summary"],
    "cmd_train": [
        "imagen-ops train --stage base -S stages.base.train.steps=200",
        "imagen-ops train --stage sr64 --init-from champion",
    ],
    "cmd_sample": [
        'imagen-ops sample "a red circle and a blue square" --num-images 4 --grid',
        "imagen-ops sample --prompts-file prompts.txt --batch-size 8 --guidance 3 1",
        'imagen-ops sample "a star" --negative-prompt "a blue star" --seed 7',
        'imagen-ops sample "a green circle" --image small.png            # super-resolve',
        'imagen-ops sample "a green circle" --image in.png --strength 0.6  # image-to-image',
        'imagen-ops sample "a green circle" --image in.png --mask mask.png # inpaint',
        'MLFLOW_TRACKING_URI=sqlite:////srv/mlflow.db imagen-ops sample "a star" '
        "--model models:/imagen-ops@champion",
    ],
    "cmd_evaluate": ["imagen-ops evaluate -S eval.per_category=128"],
    "cmd_register": ["imagen-ops register"],
    "cmd_reproduce": ["imagen-ops reproduce models:/imagen-ops/3"],
    "cmd_golden_make": ["imagen-ops golden make && dvc add golden"],
    "cmd_promote": ["imagen-ops promote", "imagen-ops promote --version 4 --force"],
}


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--params", help="params file (default: params.yaml)")
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
    parser.add_argument("--version", action="version", version=f"imagen-ops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], None], help_: str, parent=sub):
        p = parent.add_parser(
            name,
            parents=[common],
            help=help_,
            description=help_,
            epilog="examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[fn.__name__]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(fn=fn)
        return p

    def path(p: argparse.ArgumentParser, flag: str, key: str, what: str) -> None:
        p.add_argument(flag, metavar="PATH", help=f"{what} (default: params.yaml {key})")

    data = sub.add_parser("data", help="create or import the raw data set (data/)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = add("synth", cmd_synth, "render the synthetic shapes data into data/", data_sub)
    p.add_argument("--n", type=int, help="number of scenes (data.synth.n)")
    p.add_argument("--seed", type=int, help="generator seed (data.synth.seed)")
    path(p, "--out", "paths.data", "the data set")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    path(p, "--report", "paths.reports/ingest.json", "the ingest report")
    p = add("ingest", cmd_ingest, "validate and import images with captions into data/", data_sub)
    p.add_argument("source", help="image folder, .jsonl/.csv manifest, .tar shard(s) or .parquet")
    path(p, "--out", "paths.data", "the data set")
    p.add_argument("--format", choices=get_args(IngestConfig.model_fields["format"].annotation))
    path(p, "--report", "paths.reports/ingest.json", "the ingest report")

    params_p = sub.add_parser("params", help="manage params.yaml")
    params_sub = params_p.add_subparsers(dest="params_command", required=True)
    p = add(
        "apply",
        cmd_params_apply,
        "write params.yaml with a recipe (configs/*.yaml) merged in, -S overrides over it",
        params_sub,
    )
    p.add_argument("recipe", help="partial params file, e.g. configs/quality.yaml")
    p.add_argument("--out", help="where to write (default: the --params file itself)")
    p = add(
        "show",
        cmd_params_show,
        "print every parameter, resolved: the file's values, config.py's defaults for the "
        "keys it leaves out, -S overrides over both",
        params_sub,
    )
    p.add_argument("key", nargs="?", help="a section or key, e.g. stages.base.train")

    pipeline = sub.add_parser("pipeline", help="the DVC stage graph generated from params.yaml")
    pipeline_sub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    p = add("write", cmd_pipeline_write, "write dvc.yaml from params.yaml", pipeline_sub)
    p.add_argument("--out", default="dvc.yaml", help="where to write (default: dvc.yaml)")
    p.add_argument("--check", action="store_true", help="fail if the file is not current")

    p = add("prepare", cmd_prepare, "pack data/ into per-resolution arrays (DVC stage prepare)")
    path(p, "--data", "paths.data", "the data set")
    path(p, "--out", "paths.prepared", "the packed arrays")
    p = add("encode-text", cmd_encode_text, "embed every caption once (DVC stage encode_text)")
    path(p, "--prepared", "paths.prepared", "the packed arrays")
    path(p, "--out", "paths.text_cache", "the embedding cache")

    p = add(
        "train-scorer",
        cmd_train_scorer,
        "train the contrastive text-image scorer (DVC stage train_scorer)",
    )
    path(p, "--prepared", "paths.prepared", "the packed arrays")
    path(p, "--cache", "paths.text_cache", "the embedding cache")
    path(p, "--out", "paths.scorer", "the trained scorer")
    path(p, "--metrics", "paths.reports/scorer.json", "its held-out hard-negative accuracy")

    model = sub.add_parser("model", help="inspect the cascade's networks")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    p = add("summary", cmd_summary, "parameters and FLOPs per stage", model_sub)
    p.add_argument("--text-dim", type=int, default=384, help="text embedding width")
    p.add_argument("--text-length", type=int, default=16, help="text tokens for FLOPs")

    p = add("train", cmd_train, "train one cascade stage (DVC stage train_NAME)")
    p.add_argument("--stage", required=True)
    path(p, "--prepared", "paths.prepared", "the packed arrays")
    path(p, "--cache", "paths.text_cache", "the embedding cache")
    path(p, "--out", "paths.models/STAGE", "the trained stage")
    path(p, "--checkpoints", "paths.checkpoints/STAGE", "resumable checkpoints")
    path(p, "--metrics", "paths.reports/train_STAGE.csv", "the training curve")
    p.add_argument(
        "--init-from",
        help="warm start: stage or cascade directory, models:/NAME@ALIAS or 'champion' "
        "(default: params.yaml stages.STAGE.train.init_from)",
    )
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")

    p = add("sample", cmd_sample, "generate images for prompts")
    p.add_argument("prompts", nargs="*", help="prompts (or --prompts-file)")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line (# comments)")
    p.add_argument(
        "--model",
        help="cascade folder or models:/NAME@ALIAS (default: paths.models); outside a project "
        "the registry is MLFLOW_TRACKING_URI and the packaged model's settings apply",
    )
    p.add_argument("--out", default="samples/sample.png", help="file (numbered if several)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--grid", action="store_true", help="one labelled grid instead of files")
    p.add_argument(
        "--image", metavar="PATH", help="alone: super-resolve it; see --strength, --mask"
    )
    p.add_argument("--mask", metavar="PATH", help="inpaint --image: white pixels are generated")
    setting = p.add_argument_group("settings (each sets params.yaml sample.<name>)")
    setting.add_argument("--sampler", choices=list(SAMPLERS))
    setting.add_argument("--steps", type=int, nargs="+", metavar="N", help="per stage or one")
    setting.add_argument(
        "--guidance", type=float, nargs="+", metavar="W", help="per stage or one for all"
    )
    setting.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="diffusion times where guidance applies (1: pure noise); w = 1 elsewhere",
    )
    setting.add_argument("--seed", type=int, help="image k gets seed + k")
    setting.add_argument("--batch-size", type=int, help="images per forward pass")
    setting.add_argument("--negative-prompt", help="what guidance steers away from")
    setting.add_argument(
        "--strength", type=float, help="image-to-image from --image: 1 = from pure noise"
    )
    setting.add_argument(
        "--rerank", type=int, metavar="N", help="best of N candidates by the scorer"
    )

    p = add("evaluate", cmd_evaluate, "sample held-out prompts, FID/KID/CLIP/alignment, sweep")
    path(p, "--prepared", "paths.prepared", "the packed arrays")
    path(p, "--cache", "paths.text_cache", "the embedding cache")
    path(p, "--models", "paths.models", "the trained stages")
    path(p, "--out", "paths.eval", "samples, grid and report")
    path(p, "--metrics", "paths.reports/metrics.json", "the metrics file")
    path(p, "--scores", "paths.reports/scores.json", "the headline numbers (DVC metrics)")
    path(p, "--sweep", "paths.reports/guidance_sweep.csv", "the guidance sweep")
    path(p, "--feature-cache", "paths.fid_cache", "real-image Inception features")
    path(p, "--timings", "paths.reports/timings.json", "sampling speed (untracked)")
    path(p, "--scorer", "paths.scorer", "the text-image scorer (in_domain_clip_score)")
    p.add_argument("--device", default="auto")

    p = add("register", cmd_register, "log the run and model to MLflow; gate the champion")
    p.add_argument("--root", default=".", help="project root (git + DVC; its params.yaml)")
    path(p, "--models", "paths.models", "the trained stages")
    path(p, "--metrics", "paths.reports/metrics.json", "the metrics file")
    path(p, "--eval-dir", "paths.eval", "grid and report")
    p.add_argument("--run-id", help="log into this MLflow run (the retraining flow's)")

    p = add("reproduce", cmd_reproduce, "rebuild a registered version and check it bit for bit")
    p.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--root", default=".", help="project root (git + DVC)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work tree")

    golden = sub.add_parser("golden", help="the golden prompt set that decides promotions")
    golden_sub = golden.add_subparsers(dest="golden_command", required=True)
    p = add("make", cmd_golden_make, "write the golden prompt set (then dvc add it)", golden_sub)
    path(p, "--out", "paths.golden", "the golden set folder")
    p.add_argument("--force", action="store_true", help="replace an existing set")

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
    except Exception as err:  # every failure is one line; -v shows the traceback
        if args.verbose:
            raise
        text = str(getattr(err, "message", None) or err)
        message = "; ".join(line.strip() for line in text.splitlines() if line.strip())
        log.error("%s: %s (-v: traceback)", type(err).__name__, message or "no message")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
