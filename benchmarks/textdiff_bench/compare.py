"""`textdiff-bench benchmark-compare`: two methods of `textdiff-bench benchmark` runs, paired by label count and seed, overall
and per group of test images (their image-level label), so that an effect can be traced to the images that carry it.

Paired differences matter at a few labels: the spread between seeds is larger than most effects.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from textdiff.data.studies import DataError, read_studies
from textdiff.plots import plot_paired


def read_rows(folders: list[str | Path]) -> list[dict]:
    rows = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise DataError(f"no benchmark results in '{folder}' (expected {path})")
        rows += json.loads(path.read_text())["rows"]
    return rows


def _by_run(rows: list[dict], method: str | None, side: str) -> tuple[str, dict[tuple[int, int], dict]]:
    """The side's method (the only one in its rows when not given) and its rows keyed by (labels, seed)."""
    methods = sorted({r["method"] for r in rows})
    if method is None:
        if len(methods) != 1:
            raise DataError(f"the {side} runs hold methods {methods}: choose one with --method-{side}")
        method = methods[0]
    chosen = {(r["labels"], r["seed"]): r for r in rows if r["method"] == method}
    if not chosen:
        raise DataError(f"no '{method}' rows in the {side} runs (they hold {methods})")
    return method, chosen


def compare(a_rows: list[dict], b_rows: list[dict], image_labels: dict[str, str],
            method_a: str | None = None, method_b: str | None = None) -> dict:
    """Per (labels, seed): Dice of a and b and a - b; their mean, spread, median and sign count (a few outlying seeds
    can carry a mean); mean Dice per image group."""
    method_a, a = _by_run(a_rows, method_a, "a")
    method_b, b = _by_run(b_rows, method_b, "b")
    keys = sorted(set(a) & set(b))
    if not keys:
        raise DataError(f"'{method_a}' and '{method_b}' share no (labels, seed) run to pair")
    pairs = [{"labels": n, "seed": s, "a": a[n, s]["dice"], "b": b[n, s]["dice"],
              "difference": a[n, s]["dice"] - b[n, s]["dice"],
              **({"b_area_oracle": b[n, s]["area_oracle"]["dice"]} if "area_oracle" in b[n, s] else {})}
             for n, s in keys]
    differences = [p["difference"] for p in pairs]
    groups = {}
    if all("per_image_dice" in a[k] and "per_image_dice" in b[k] for k in keys):
        scored = set.intersection(*(set(rows[k]["per_image_dice"]) for rows in (a, b) for k in keys))
        unscored = sorted(set(image_labels) - scored)
        if unscored:
            raise DataError(f"{len(unscored)} test images of the data (e.g. '{unscored[0]}') are not in every run: "
                            f"pass the benchmark's own --data")
        for group in sorted(set(image_labels.values())):
            images = [i for i, g in image_labels.items() if g == group]
            groups[group] = {"images": len(images), **{
                side: statistics.mean(rows[k]["per_image_dice"][i] for k in keys for i in images)
                for side, rows in (("a", a), ("b", b))}}
    return {"a": method_a, "b": method_b, "pairs": pairs, "mean_difference": statistics.mean(differences),
            "sd_difference": statistics.pstdev(differences),
            "median_difference": statistics.median(differences), "a_better": sum(d > 0 for d in differences),
            "groups": groups, "area_oracle": _area_oracles(a, b, keys)}


def _area_oracles(a: dict, b: dict, keys: list) -> dict:
    """Per side, over the paired runs: mean Dice, mean area-oracle Dice and the whole-area errors (none when the runs
    predate the oracle). b's oracle less b's Dice bounds what a report could add to b's masks."""
    if not all("area_oracle" in a[k] and "area_oracle" in b[k] for k in keys):
        return {}
    return {side: {"dice": statistics.mean(rows[k]["dice"] for k in keys),
                   "oracle_dice": statistics.mean(rows[k]["area_oracle"]["dice"] for k in keys),
                   **{count: sum(rows[k]["area_oracle"][count] for k in keys)
                      for count in ("areas", "missed_areas", "false_areas")}}
            for side, rows in (("a", a), ("b", b))}


def format_comparison(result: dict) -> str:
    a, b = result["a"], result["b"]
    lines = [f"| labels | seed | {a} | {b} | difference |", "|---|---|---|---|---|"]
    lines += [f"| {p['labels']} | {p['seed']} | {p['a']:.3f} | {p['b']:.3f} | {p['difference']:+.3f} |"
              for p in result["pairs"]]
    lines.append(f"\n{a} - {b}: {result['mean_difference']:+.3f} ± {result['sd_difference']:.3f} (median "
                 f"{result['median_difference']:+.3f}) over {len(result['pairs'])} pairs, {a} better in "
                 f"{result['a_better']}")
    if result["groups"]:
        lines += ["", f"| test images (image-level label) | images | {a} | {b} |", "|---|---|---|---|"]
        lines += [f"| {g} | {v['images']} | {v['a']:.3f} | {v['b']:.3f} |" for g, v in result["groups"].items()]
    if result["area_oracle"]:
        lines += ["", "| method | Dice | area oracle | headroom | true areas | missed | false |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {result[side]} | {v['dice']:.3f} | {v['oracle_dice']:.3f} | {v['oracle_dice'] - v['dice']:+.3f} | "
                  f"{v['areas']} | {v['missed_areas']} | {v['false_areas']} |" for side, v in result["area_oracle"].items()]
        lines.append("(area oracle: the masks with whole areas missed or drawn falsely fixed, the only errors a report "
                     "naming sides, zones and counts can correct; the headroom bounds what the report could add)")
    return "\n".join(lines)


def run_comparison(a_folders: list[str], b_folders: list[str], data: Path, out: Path,
                   method_a: str | None = None, method_b: str | None = None) -> dict:
    """Compare, print the tables, write `comparison.json` and `paired_dice.png` into `out`."""
    image_labels = {c.id: c.image_label or "(none)" for c in read_studies(Path(data) / "test")}
    result = compare(read_rows(a_folders), read_rows(b_folders), image_labels, method_a, method_b)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    ceilings = [(p["b"], p["b_area_oracle"]) for p in result["pairs"] if "b_area_oracle" in p]
    plot_paired([(p["b"], p["a"]) for p in result["pairs"]], out / "paired_dice.png", result["b"], result["a"], ceilings)
    print(format_comparison(result))
    return result
