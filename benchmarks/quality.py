"""Quality of a pipeline, offline: ``python -m benchmarks.quality --model tiny-sd3 [--transformer DIR] [--no-t5] --json FILE``.

Digit models are scored by the digit classifier (prompt accuracy, Fréchet distance); hub models by a CLIP score
when CLIP weights are cached locally (:mod:`evaluation.metrics`).
"""

from __future__ import annotations

import sys

from benchmarks import program
from common.io import write_json
from evaluation.metrics import DEFAULT_SEEDS, evaluate


def main(argv: list[str] | None = None) -> int:
    from common.cli import int_at_least
    from common.io import check_output
    from pipeline.pipeline_args import add_pipeline_args, add_sampler_args, pipeline_from_args

    ap = program.parser("quality", __doc__)
    ap.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory")
    add_pipeline_args(ap)
    ap.add_argument("--seeds", type=int_at_least(1), default=len(DEFAULT_SEEDS), help="seeds per prompt")
    add_sampler_args(ap)
    ap.add_argument("--json", required=True, help="output JSON file")

    def body(args) -> int:
        from pipeline.pipeline_args import check_pipeline_args

        checked = check_pipeline_args(args)
        check_output(args.json, "file", option="--json")
        spec, pipe = pipeline_from_args(args, checked)
        result = evaluate(pipe, spec, tuple(range(args.seeds)), steps=args.steps, guidance=args.guidance)
        result.update(transformer=args.transformer, t5=not args.no_t5, **program.environment(pipe.device, ("torch", "diffusers")))
        write_json(args.json, result)
        keys = ("prompt_accuracy", "frechet_distance", "clip_score", "n_images")
        print(" ".join(f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}" for k in keys if k in result))
        return 0

    return program.run(ap, argv, body)


if __name__ == "__main__":
    sys.exit(main())
