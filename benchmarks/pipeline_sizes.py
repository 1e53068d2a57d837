"""Real sizes: the weights of each model's whole served pipeline (transformer, text encoders, VAE decoder) in each
precision and pruning configuration, computed from the published configs (no download), and the least aggressive
configuration that meets each budget of the goal.

    python -m benchmarks.pipeline_sizes                       # every hub model of the registry
    python -m benchmarks.pipeline_sizes --models sd3-medium,flux.1-dev --goal sd3-medium=4,flux.1-dev=8

Writes ``pipeline_sizes.json`` and ``pipeline_sizes.md`` (``--out``; default ``artifacts/sizes/``) and prints the
Markdown. Sizes in GiB (2^30 bytes). The goal search runs twice: within what this project's exports quantize
(the transformer blocks' linears and the text encoders' linears; AdaLN modulations and embedding tables float16),
and with the AdaLN modulations and the embedding tables quantized too. How the figures are computed and
verified against real files: ``docs/scale.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks import program
from common.errors import UserError
from common.paths import REPO_ROOT

DEFAULT_GOAL = "sd3-medium=4,flux.1-dev=8"
COMPONENT_FORMATS = ("fp32", "fp16", "int8", "int4-g128", "int4-g64")
CANDIDATES = 4  # fitting configurations listed after the least aggressive one


def parse_goal(text: str, models: list[str]) -> dict[str, float]:
    """``"sd3-medium=4,flux.1-dev=8"`` -> ``{model: GiB}``; one line for a malformed item or a model not measured."""
    goal: dict[str, float] = {}
    for item in program.split_list(text):
        model, _, gib = item.partition("=")
        try:
            budget = float(gib)
        except ValueError:
            budget = -1.0
        if not model or budget <= 0:
            raise UserError(f"--goal {item!r}: give MODEL=GiB items, e.g. {DEFAULT_GOAL}")
        if model not in models:
            raise UserError(f"--goal {item!r}: {model} is not among --models ({', '.join(models)})")
        goal[model] = budget
    return goal


# The goal searches: (AdaLN modulations quantized, embedding tables quantized, title).
SCOPES = {
    "float_adaln": (False, False, "AdaLN modulations and embedding tables float16"),
    "export_scope": (True, False, "Within this project's export scope: AdaLN modulations quantized too (`prune --weight-bits 4 "
                                  "--quant-modulation`), embedding tables float16"),
    "adaln_and_embeddings_quantized": (True, True, "With the embedding tables quantized too (not exported by this project)"),
}


def _config_json(c, total: int, budget: float | None, gib: int) -> dict[str, Any]:
    return {"label": c.label(), "total_gib": round(total / gib, 3), "aggressiveness": list(c.aggressiveness()),
            **({"meets_goal": total <= budget * gib} if budget else {})}


def _search(weights, budget: float, *, can_drop_t5: bool, modulation: bool, embeddings: bool) -> dict[str, Any]:
    from families.pipeline_sizes import GIB, least_aggressive, pipeline_bytes, search_space

    configs = list(search_space(weights, can_drop_t5=can_drop_t5, modulation=modulation, embeddings=embeddings))
    fits = least_aggressive(weights, int(budget * GIB), configs)
    out: dict[str, Any] = {"searched": len(configs), "fitting": len(fits)}
    if fits:
        best, total = fits[0]
        out["least_aggressive"] = {**_config_json(best, total, budget, GIB), "bytes": pipeline_bytes(weights, best)}
        out["candidates"] = [_config_json(c, b, budget, GIB) for c, b in fits[1:1 + CANDIDATES]]
    else:
        smallest = min(configs, key=lambda c: sum(pipeline_bytes(weights, c).values()))
        out["smallest"] = _config_json(smallest, sum(pipeline_bytes(weights, smallest).values()), budget, GIB)
    return out


def measure(model: str, budget: float | None) -> dict[str, Any]:
    """One model's result: its components (parameters by role, config source), each component in each format,
    the named pipeline configurations and, with ``budget`` (GiB), the goal search."""
    from families.pipeline_sizes import GIB, Precision, component_bytes, named_configs, pipeline_bytes, pipeline_weights
    from families.registry import resolve_model

    spec = resolve_model(model)
    weights = pipeline_weights(spec)
    can_drop_t5 = spec.adapter.optional_text_encoder is not None
    components = {name: {"kind": w.kind, "class": w.cls, "config": w.source, "parameters": w.numel, "by_role": w.numel_by_role(),
                         "bytes": {f: component_bytes(w, Precision(f)) for f in COMPONENT_FORMATS}} for name, w in weights.items()}
    rows = []
    for name, c in named_configs(weights, can_drop_t5=can_drop_t5):
        b = pipeline_bytes(weights, c)
        rows.append({"name": name, **_config_json(c, sum(b.values()), budget, GIB), "bytes": b, "runnable": c.sparse24 != "compressed"})
    out: dict[str, Any] = {"family": spec.adapter.name, "description": spec.description, "components": components, "configs": rows,
                           "optional_text_encoder": spec.adapter.optional_text_encoder}
    if budget:
        out["goal"] = {"budget_gib": budget, **{key: _search(weights, budget, can_drop_t5=can_drop_t5, modulation=m, embeddings=e)
                                                for key, (m, e, _) in SCOPES.items()}}
    return out


def _gib(b: int | None) -> str:
    return "" if b is None else f"{b / 2**30:.2f}"


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Real sizes: the whole served pipeline's weights", "",
             "Computed from the components' configs (published ones for hub models, built on the meta device; no download). GiB = 2^30 bytes. "
             "INT8: per output channel, INT4: symmetric groups of 128 or 64 input columns, packed two codes a byte; one float16 scale "
             "per channel or group. Quantized: the transformer blocks' linears (the adapter's units: what stage 1 prunes) and the text "
             "encoders' linears; the AdaLN modulations, embedders, norms, biases, the output layer, the encoders' embedding tables and "
             "the VAE decoder stay float16 (float32 beside float32) unless a row says otherwise. VAE: the decoder only.", ""]
    for model, m in r["models"].items():
        lines += [f"## {model}", "", m["description"], "", "| component | class (config) | parameters | by role (M) | "
                  + " | ".join(COMPONENT_FORMATS) + " |", "|---|---|---|---|" + "---|" * len(COMPONENT_FORMATS)]
        for name, c in m["components"].items():
            roles = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in c["by_role"].items())
            lines.append(f"| {name} | {c['class']} ({c['config']}) | {c['parameters'] / 1e9:.3f}B | {roles} | "
                         + " | ".join(_gib(c["bytes"][f]) for f in COMPONENT_FORMATS) + " |")
        names = list(m["components"])
        budget = (m.get("goal") or {}).get("budget_gib")
        lines += ["", "| configuration | " + " | ".join(names) + " | total GiB |" + (f" ≤ {budget:g} GiB |" if budget else ""),
                  "|---|" + "---|" * len(names) + "---|" + ("---|" if budget else "")]
        for row in m["configs"]:
            mark = ("yes" if row["meets_goal"] else "") if budget else None
            name = row["name"] if row["runnable"] else f"{row['name']} *"
            lines.append(f"| {name} | " + " | ".join(_gib(row["bytes"].get(n)) if n in row["bytes"] else "dropped" for n in names)
                         + f" | {row['total_gib']:.2f} |" + (f" {mark} |" if mark is not None else ""))
        lines += ["", "\\* not runnable here: no runtime of this project runs a compressed 2:4 layout (with or without INT4)."]
        if budget:
            g = m["goal"]
            lines += ["", f"**Goal ≤ {budget:g} GiB.**", ""]
            for key, (_, _, title) in SCOPES.items():
                s = g[key]
                if "least_aggressive" in s:
                    best = s["least_aggressive"]
                    lines.append(f"- {title}: **{best['label']}**, {best['total_gib']:.2f} GiB ({s['fitting']} of {s['searched']} configurations fit). "
                                 "Next candidates: " + "; ".join(f"{c['label']} ({c['total_gib']:.2f})" for c in s["candidates"]) + ".")
                else:
                    lines.append(f"- {title}: none of {s['searched']} configurations fits; the smallest is {s['smallest']['label']}, "
                                 f"{s['smallest']['total_gib']:.2f} GiB.")
        lines.append("")
    lines += ["Least aggressive: the smallest structured ratio first, then the fewest dropped text encoders, then the coarsest format "
              "any role uses (float < INT8 < INT4 group 64 < INT4 group 128), then the sum of those ranks, then the larger total.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from families.registry import MODELS

    hub = [m for m, s in MODELS.items() if not s.local]
    p = program.parser("pipeline_sizes", __doc__)
    p.add_argument("--models", default=",".join(hub), help=f"comma-separated registry ids or diffusers directories (default: {', '.join(hub)})")
    p.add_argument("--goal", default=DEFAULT_GOAL, help=f"MODEL=GiB budgets to search (default {DEFAULT_GOAL}; '' for none)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "artifacts" / "sizes" / "pipeline_sizes.json", help="JSON path (the Markdown goes beside it)")

    def body(args) -> int:
        models = program.split_list(args.models)
        if not models:
            raise UserError("--models: give at least one registry id or diffusers directory")
        goal = parse_goal(args.goal, models)
        program.check_out(args.out)
        result = {"benchmark": "pipeline_sizes", **program.environment("cpu", ("torch", "diffusers", "transformers")),
                  "models": {m: measure(m, goal.get(m)) for m in models}}
        program.write(args.out, result, markdown(result), echo=True)
        return 0

    return program.run(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
