"""`genpipe models`: review the registry. list, show, compare, promote, archive.

A version is named `NAME` (its latest), `NAME@alias` or `NAME/VERSION`. The
numbers side by side in `compare` are flagged when they were scored on other
data, features, reference statistics or sample counts (see
`register.differences`); a reviewer should not read a gap between those.
"""

from __future__ import annotations

import argparse
import datetime
import io
import re
import sys
import tempfile
from pathlib import Path

from pipelines.errors import InvalidInput

ARCHIVED_TAG = "genpipe.archived"


def _client():
    from pipelines import tracking

    return tracking.client()


def resolve(c, ref: str):
    """The ModelVersion that `NAME`, `NAME@alias` or `NAME/VERSION` names."""
    from mlflow.exceptions import MlflowException

    m = re.fullmatch(r"([^@/]+)(?:@([\w-]+)|/(\d+))?", ref)
    if not m:
        raise InvalidInput(f"{ref!r}: expected NAME, NAME@alias or NAME/VERSION")
    name, alias, version = m.groups()
    try:
        if alias:
            return c.get_model_version_by_alias(name, alias)
        if version:
            return c.get_model_version(name, version)
        versions = c.search_model_versions(f"name = '{name}'")
    except MlflowException as e:
        raise InvalidInput(f"{ref}: {str(e).splitlines()[0]}") from None
    if not versions:
        raise InvalidInput(f"{ref}: no registered model of that name")
    return max(versions, key=lambda mv: int(mv.version))


def _aliases(c, name: str) -> dict[str, list[str]]:
    """Version -> its aliases."""
    by_version: dict[str, list[str]] = {}
    for alias, v in (c.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    return by_version


def _metric(mv) -> str:
    metric = mv.tags.get("primary_metric", "")
    return f"{metric}={mv.tags.get(f'metric.{metric}', '?')}" if metric else "-"


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def cmd_list(a: argparse.Namespace) -> int:
    c = _client()
    rows = [("model", "version", "aliases", "family", "dataset", "primary metric", "created")]
    for rm in c.search_registered_models():
        aliases = _aliases(c, rm.name)
        for mv in sorted(c.search_model_versions(f"name = '{rm.name}'"), key=lambda m: int(m.version)):
            state = aliases.get(str(mv.version), []) + (["archived"] if ARCHIVED_TAG in mv.tags else [])
            created = datetime.datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
            rows.append((rm.name, mv.version, ",".join(sorted(state)) or "-", mv.tags.get("family", "?"),
                         mv.tags.get("data_source", "?"), _metric(mv), created))
    print(_table(rows))
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    c = _client()
    mv = resolve(c, a.ref)
    t = mv.tags
    lineage = {k.removeprefix("lineage."): v for k, v in t.items() if k.startswith("lineage.")}
    lineage["register"] = mv.run_id
    metrics = [(k.removeprefix("metric."), v) for k, v in sorted(t.items()) if k.startswith("metric.")]
    print(f"{mv.name} v{mv.version}  aliases: {','.join(sorted(_aliases(c, mv.name).get(str(mv.version), []))) or '-'}"
          f"{'  (archived)' if ARCHIVED_TAG in t else ''}")
    print(f"family {t.get('family', '?')}; data {t.get('data_source', '?')} {t.get('data_hash', '?')}; "
          f"config {t.get('config_hash', '?')}; code {t.get('code_version', '?')}")
    print(f"scored by extractor {t.get('extractor_hash', '?')[:16]}, reference statistics "
          f"{t.get('reference_hash', '?')[:16]}, {t.get('eval_num_samples', '?')} samples ({t.get('sampler', '?')})")
    for line in _dataset_lines(c, lineage.get("prepare")):
        print(line)
    print(_table([("metric", "value"), *metrics]))
    print("lineage (MLflow runs):")
    print(_table([(f"  {stage}", rid) for stage, rid in lineage.items()]))
    print()
    print(mv.description or "(no model card)")
    return 0


def _dataset_lines(c, prepare_run: str | None) -> list[str]:
    """The prepare run's MLflow dataset input: where the images came from, the data version, what they are."""
    import json

    from mlflow.exceptions import MlflowException

    if not prepare_run:
        return ["dataset: - (no prepare run in the lineage)"]
    try:
        inputs = c.get_run(prepare_run).inputs.dataset_inputs
    except MlflowException as e:
        return [f"dataset: - (prepare run {prepare_run}: {str(e).splitlines()[0]})"]
    lines = []
    for di in inputs:
        ds = di.dataset
        uri = json.loads(ds.source or "{}").get("uri", ds.source)
        p = json.loads(ds.profile or "{}")
        splits = ", ".join(f"{k} {v}" for k, v in p.get("splits", {}).items())
        shape = f"{p.get('image_size', '?')}x{p.get('image_size', '?')}x{p.get('channels', '?')}"
        labels = f"{p.get('num_classes', '?')} classes ({p.get('labels') or 'unlabeled'})"
        skipped = f", bad files skipped: {p['bad_images_skipped']}" if p.get("bad_images_skipped") else ""
        lines.append(f"dataset {ds.name}: {uri} ({ds.source_type}), digest {ds.digest}")
        lines.append(f"  {p.get('images', '?')} images ({splits}), {shape}, {labels}{skipped}")
    return lines or ["dataset: - (the prepare run logged none)"]


def cmd_compare(a: argparse.Namespace) -> int:
    from pipelines import register

    if a.out and not Path(a.out).parent.is_dir():
        raise InvalidInput(f"--out {a.out}: directory {Path(a.out).parent} does not exist")
    c = _client()
    va, vb = resolve(c, a.a), resolve(c, a.b)
    ta, tb = ({**v.tags, "version": v.version} for v in (va, vb))
    names = sorted({k.removeprefix("metric.") for k in (*ta, *tb) if k.startswith("metric.")})
    label_a, label_b = f"{va.name} v{va.version}", f"{vb.name} v{vb.version}"
    rows = [("metric", label_a, label_b, "")]
    notes = {}
    for m in names:
        both = f"metric.{m}" in ta and f"metric.{m}" in tb  # a metric only one reports is shown as "-", not flagged
        why = register.differences(ta, tb, m) if both else []
        if why:
            notes.setdefault("; ".join(why), []).append(m)
        rows.append((m, ta.get(f"metric.{m}", "-"), tb.get(f"metric.{m}", "-"), "*" if why else ""))
    print(_table(rows))
    if notes:
        for why, ms in notes.items():
            print(f"* not comparable ({', '.join(ms)}): {why}")
    else:
        print("comparable: same data, extractor, reference statistics and sample count")
    png = side_by_side(c, [va, vb], [label_a, label_b])
    if a.out:
        Path(a.out).write_bytes(png)
        print(f"wrote both sample grids to {a.out}", file=sys.stderr)
    else:
        print(f"logged both sample grids to MLflow run {_log_comparison(c, png, label_a, label_b)}", file=sys.stderr)
    return 0


def side_by_side(c, versions, labels: list[str]) -> bytes:
    """One PNG: each version's sample grid under its label, left to right."""
    from mlflow.exceptions import MlflowException
    from PIL import Image, ImageDraw

    grids = []
    with tempfile.TemporaryDirectory() as tmp:
        for mv in versions:
            try:
                path = c.download_artifacts(mv.run_id, "samples.png", tmp)
            except (MlflowException, OSError) as e:
                raise InvalidInput(f"{mv.name} v{mv.version} has no samples.png: {str(e).splitlines()[0]}") from None
            grids.append(Image.open(path).convert("RGB"))
            Path(path).unlink()  # both versions may come from runs with the same artifact name
    scale = max(1, 256 // max(g.height for g in grids))  # 8x8 digits make a grid too small to judge
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    header, gap = 16, 8
    out = Image.new("RGB", (sum(g.width for g in grids) + gap * (len(grids) - 1),
                            header + max(g.height for g in grids)), "white")
    x = 0
    for g, label in zip(grids, labels):
        out.paste(g, (x, header))
        ImageDraw.Draw(out).text((x + 2, 2), label, fill="black")
        x += g.width + gap
    buf = io.BytesIO()
    out.save(buf, format="png")
    return buf.getvalue()


def _log_comparison(c, png: bytes, label_a: str, label_b: str) -> str:
    from pipelines import tracking

    exp = tracking.experiment_id(c, "genpipe-compare", str(tracking.genpipe_home() / "storage"))
    run = c.create_run(exp, run_name=f"{label_a} vs {label_b}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "compare.png"
        path.write_bytes(png)
        c.log_artifact(run.info.run_id, str(path))
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def cmd_promote(a: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    c = _client()
    mv = resolve(c, f"{a.name}/{a.version}")
    if ARCHIVED_TAG in mv.tags:
        raise InvalidInput(f"{a.name} v{a.version} is archived; it cannot take alias {a.alias}")
    try:
        c.set_registered_model_alias(a.name, a.alias, mv.version)
    except MlflowException as e:
        raise InvalidInput(f"alias {a.alias!r}: {str(e).splitlines()[0]}") from None
    print(f"{a.name}@{a.alias} -> v{mv.version} ({_metric(mv)})")
    return 0


def cmd_archive(a: argparse.Namespace) -> int:
    c = _client()
    mv = resolve(c, f"{a.name}/{a.version}")
    aliases = _aliases(c, a.name).get(str(mv.version), [])
    for alias in aliases:
        c.delete_registered_model_alias(a.name, alias)
    c.set_model_version_tag(a.name, mv.version, ARCHIVED_TAG, "true")
    print(f"{a.name} v{mv.version} archived{'; removed aliases ' + ', '.join(sorted(aliases)) if aliases else ''}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """`genpipe models ...` subcommands."""
    sub.add_parser("list", help="registered models and versions").set_defaults(fn=cmd_list)
    sp = sub.add_parser("show", help="one version: metrics, data, lineage, model card")
    sp.add_argument("ref", help="NAME, NAME@alias or NAME/VERSION")
    sp.set_defaults(fn=cmd_show)
    sp = sub.add_parser("compare", help="two versions' metrics side by side, and their sample grids")
    sp.add_argument("a", help="NAME, NAME@alias or NAME/VERSION")
    sp.add_argument("b", help="NAME, NAME@alias or NAME/VERSION")
    sp.add_argument("--out", help="write the grids' PNG here instead of logging it to MLflow")
    sp.set_defaults(fn=cmd_compare)
    sp = sub.add_parser("promote", help="point an alias at a version")
    sp.add_argument("name")
    sp.add_argument("version", type=int)
    sp.add_argument("--alias", default="champion")
    sp.set_defaults(fn=cmd_promote)
    sp = sub.add_parser("archive", help="retire a version: drop its aliases and mark it archived")
    sp.add_argument("name")
    sp.add_argument("version", type=int)
    sp.set_defaults(fn=cmd_archive)
