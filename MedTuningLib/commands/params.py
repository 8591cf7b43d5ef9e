"""``medtuning params``: parameter counts of an architecture under a tuning method (docs/method.md).

``--json`` prints one JSON object ``{"full", "tuned", "inserted", "head", "arch", "method", "modules"}``
on stdout and nothing else; with ``--events jsonl`` the figures are the ``done`` event's outputs.
Without either, a small table. Only builds the model (random weights); nothing is downloaded.
"""

from __future__ import annotations

import json


def _config(args):
    from MedTuningLib.engine.train import parse_backbone_args
    from MedTuningLib.models import AdapterConfig, ModelConfig

    adapter = AdapterConfig(alpha=args.alpha, local_branch=args.local_branch, global_branch=args.global_branch,
                            mix=args.mix, fusion=args.fusion)
    return ModelConfig(arch=args.arch, backbone=args.backbone, method=args.method, in_channels=args.in_channels,
                       num_classes=args.classes, img_size=args.img_size, depth=args.depth, adapter=adapter,
                       # the size overrides were accepted and ignored; they pass the same allow-list as in train
                       backbone_kwargs=parse_backbone_args(getattr(args, "backbone_args", None)),
                       decoder_width=getattr(args, "decoder_width", None))


def _table(report: dict) -> str:
    def m(n: int) -> str:
        return f"{n / 1e6:10.3f}M"

    lines = [f"{report['arch']} / {report['method']} ({report['backbone']})",
             f"  full (without inserted) {m(report['full'])}",
             f"  head-tuned              {m(report['head'])}",
             f"  inserted                {m(report['inserted'])}",
             f"  tuned                   {m(report['tuned'])}",
             "", f"  {'module':<32}{'params':>12}{'tuned':>12}"]
    for name, row in report["modules"].items():
        lines.append(f"  {name:<32}{row['params']:>12,}{row['tuned']:>12,}")
    return "\n".join(lines)


def run(args, ctx) -> dict:
    from MedTuningLib.models import build_model

    events = ctx.events
    cfg = _config(args)
    if events.jsonl:
        events.start("params", device="cpu")
    model = build_model(cfg)
    counts = model.param_report()
    report = {"full": counts["full"], "tuned": counts["tuned"], "inserted": counts["inserted"],
              "head": counts["head"], "arch": cfg.arch, "method": cfg.method, "backbone": cfg.backbone_name,
              "modules": counts["modules"]}
    if events.jsonl:
        return report
    if args.json:
        events.out.write(json.dumps(report) + "\n")
        events.out.flush()
        # stdout holds exactly the one JSON object: the closing human-readable lines go to stderr.
        events.out = events.err
        return {}
    events.out.write(_table(report) + "\n")
    return {}
