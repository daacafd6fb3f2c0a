"""``edge-agent profile VERSION_DIR --data FILE``: write a version's drift reference profile.

The model's inputs come from the reference data; its outputs are computed by
running the model on them with onnxruntime (or taken from the data file when
it has arrays/columns named after the outputs). The profile lands in
``VERSION_DIR/drift_profile.json``; sign the version afterwards so the
signature covers it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def add_telemetry_commands(sub: Any) -> None:
    """Register ``profile`` on the ``edge-agent`` sub-command parser."""
    p = sub.add_parser(
        "profile",
        help="build a model version's drift reference profile from a reference data set",
        description="Profile a reference data set (NumPy .npy/.npz or CSV) for drift monitoring "
        "and write VERSION_DIR/drift_profile.json. Sign the version directory afterwards.",
    )
    p.add_argument("version_dir", type=Path, metavar="VERSION_DIR",
                   help="the model version directory, e.g. models/tabular_classifier/2")
    p.add_argument("--data", type=Path, required=True, metavar="FILE",
                   help=".npz (one array per input, by name), .npy (single-input models) or "
                   ".csv (columns NAME or NAME[i])")
    p.add_argument("--model-config", type=Path, metavar="CONFIG_PBTXT",
                   help="the model's config.pbtxt (default: VERSION_DIR/../config.pbtxt)")
    p.add_argument("--bins", type=int, default=10, help="quantile bins for PSI/JS (default 10)")
    p.add_argument("--fine-bins", type=int, default=100,
                   help="quantile bins for KS/Wasserstein, a multiple of --bins (default 100)")
    p.add_argument("--max-categories", type=int, default=50,
                   help="categories kept per categorical feature (default 50)")
    p.add_argument("--categorical-max-distinct", type=int, default=20,
                   help="integer features with at most this many distinct values are "
                   "categorical (default 20)")
    p.add_argument("--max-rows", type=int, help="use only the first N samples")
    p.add_argument("--no-outputs", action="store_true",
                   help="profile the inputs only (do not run the model)")
    p.add_argument("--quiet", action="store_true",
                   help="print only the profile's path on stdout (the reminder to sign the "
                   "version again still goes to stderr)")
    p.set_defaults(func=_profile)


def _profile(args: argparse.Namespace) -> int:
    from agent.errors import AgentError
    from agent.telemetry.drift.profiles import ProfileError

    try:
        return _run(args)
    except (ProfileError, AgentError) as exc:
        print(f"edge-agent profile: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"edge-agent profile: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _run(args: argparse.Namespace) -> int:
    # The heavy imports (protobuf, onnxruntime) only for this command.
    from agent.serving.model_config import complete_config, model_spec, parse_config_pbtxt
    from agent.serving.onnx_runtime import OnnxSession, SessionOptions
    from agent.telemetry.drift.profile_io import TensorInfo, read_reference_data, write_profile
    from agent.telemetry.drift.profiles import ProfileError, ProfileOptions, build_profile
    from agent.wire import model_config_pb2 as mc

    version_dir: Path = args.version_dir
    if not version_dir.is_dir():
        raise ProfileError(f"{version_dir} is not a directory")
    version = version_dir.resolve().name
    name = version_dir.resolve().parent.name
    if not version.isdigit():
        raise ProfileError(f"{version_dir}: a version directory is named by a number")
    config_path: Path | None = args.model_config
    if config_path is None and (version_dir.parent / "config.pbtxt").is_file():
        config_path = version_dir.parent / "config.pbtxt"
    declared = (
        parse_config_pbtxt(config_path.read_text(encoding="utf-8"), str(config_path))
        if config_path is not None
        else mc.ModelConfig()
    )
    model_file = version_dir / (declared.default_model_filename or "model.onnx")
    session = OnnxSession(model_file.read_bytes(), SessionOptions())
    config = complete_config(declared, name, session.inputs, session.outputs, 1)
    spec = model_spec(config, version, 1)
    inputs = [TensorInfo(t.name, t.datatype, t.dims) for t in spec.inputs]
    outputs = [TensorInfo(t.name, t.datatype, t.dims) for t in spec.outputs]
    options = ProfileOptions(
        bins=args.bins,
        fine_bins=args.fine_bins,
        max_categories=args.max_categories,
        categorical_max_distinct=args.categorical_max_distinct,
    )
    data = read_reference_data(args.data, [*inputs, *outputs], args.max_rows)
    missing = [t.name for t, s in zip(inputs, spec.inputs, strict=True)
               if t.name not in data and not s.optional]
    if missing:
        raise ProfileError(
            f"{args.data}: no data for input(s) {', '.join(missing)} of model '{name}'"
        )
    feeds = {t.name: data[t.name] for t in inputs if t.name in data}
    given = {t.name: data[t.name] for t in outputs if t.name in data}
    computed: dict[str, npt.NDArray[Any]] = {}
    if not args.no_outputs:
        wanted = [t.name for t in outputs if t.name not in given]
        if wanted:
            computed = _run_model(session, feeds, wanted, spec.max_batch_size)
    out_arrays = {**given, **computed}
    profile = build_profile(
        name,
        version,
        {t.name: (t.datatype, feeds[t.name]) for t in inputs if t.name in feeds},
        {t.name: (t.datatype, out_arrays[t.name]) for t in outputs if t.name in out_arrays},
        created_at=time.time(),
        options=options,
    )
    path = write_profile(version_dir, profile)
    if (version_dir / "model.sig").exists():
        note = ("note: model.sig no longer covers this directory; sign it again "
                "(edge-agent sign VERSION_DIR --private-key KEY), or the agent refuses it")
    else:
        note = "note: sign the version directory so its signature covers the profile"
    if args.quiet:
        # stdout stays the path alone (for scripts); the warning goes to stderr.
        print(path)
        print(note, file=sys.stderr)
        return EXIT_OK
    rows = next(iter(feeds.values())).shape[0]
    print(f"{path}: {rows} samples, model {name} version {version}")
    for tensor in profile.tensors:
        for f in tensor.features:
            if f.kind == "numeric":
                detail = (f"mean {f.mean:.4g}  std {f.std:.4g}  min {f.min:.4g}  max {f.max:.4g}"
                          f"  bins {len(f.proportions)}")
            else:
                top = ", ".join(
                    f"{c}={p:.2f}" for c, p in
                    list(zip(f.categories, f.frequencies.tolist(), strict=False))[:4]
                )
                detail = f"{len(f.categories)} categories: {top}"
            print(f"  {tensor.role:<6} {f.name:<24} {f.kind:<11} missing {f.missing_rate:.3f}  "
                  f"{detail}")
    print(note)
    return EXIT_OK


def _run_model(
    session: Any, feeds: dict[str, npt.NDArray[Any]], names: list[str], max_batch_size: int
) -> dict[str, npt.NDArray[Any]]:
    rows = next(iter(feeds.values())).shape[0]
    parts: dict[str, list[npt.NDArray[Any]]] = {n: [] for n in names}
    if max_batch_size > 0:
        step = min(max_batch_size, 256)
        for start in range(0, rows, step):
            chunk = {k: v[start : start + step] for k, v in feeds.items()}
            for n, r in zip(names, session.run(names, chunk), strict=True):
                parts[n].append(np.asarray(r))
        return {n: np.concatenate(p) for n, p in parts.items()}
    for i in range(rows):  # no batch axis: one sample per run
        for n, r in zip(names, session.run(names, {k: v[i] for k, v in feeds.items()}),
                        strict=True):
            parts[n].append(np.asarray(r))
    out: dict[str, npt.NDArray[Any]] = {}
    for n, p in parts.items():
        if len({a.shape for a in p}) == 1:
            out[n] = np.stack(p)
        else:  # variable output shapes: profile the values pooled
            out[n] = np.concatenate([a.reshape(1, -1) for a in p if a.size], axis=None)[:, None]
    return out
