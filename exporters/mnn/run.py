"""`toolkit export mnn`'s entry (declared in exporters/mnn/__init__.py): the layout chosen, options checked before
the checkpoint is loaded, the export, the closing line."""
from __future__ import annotations

from pathlib import Path

from toolkit.core.errors import ToolkitError
from toolkit.core.targets import Outcome, RunContext

LAYOUTS = ("engine", "module")


def run(src: Path, dest: Path, opts, ctx: RunContext) -> Outcome:
    from exporters.mnn import engine, exporter
    from toolkit.core.verify import verified_line

    if opts.layout not in LAYOUTS:
        raise ToolkitError(f"--layout {opts.layout} is not offered", "choose --layout engine (MNN's LLM engine "
                                                                     "folder) or module")
    engine.check_memory(opts.memory)
    exporter.check_options(None, opts.bits, opts.group_size, opts.hqq)
    bundle = ctx.load(src)
    if opts.layout == "engine":
        report = engine.export(bundle, dest, opts.bits, opts.group_size, opts.hqq, opts.memory, opts.verify,
                               ctx.force, ctx.threads, ctx.log)
        where = (f"verified through MNN.llm: its tokenizer, chat template, prefill + {exporter.DECODE_STEPS} steps "
                 "through its KV cache (")
        memory = f", {report.memory} memory"
    else:
        report = exporter.export(bundle, dest, opts.bits, opts.group_size, opts.hqq, opts.verify, ctx.force,
                                 ctx.threads)
        where = f"verified in MNN over prefill + {exporter.DECODE_STEPS} cached steps ("
        memory = ""
    v = report.verification
    checked = f"{where}{verified_line(v)})" if v else "not verified"
    grid = (f", group size {report.group_size or 'per channel'}{', hqq' if report.hqq else ''}"
            if opts.bits < 16 else "")
    if getattr(report, "gptq", None):
        grid += f", GPTQ's codes in {report.gptq['carried_layers']} layers"
    return Outcome(dest, f"{opts.layout} layout, {opts.bits}-bit{grid}{memory}: {report.size_bytes / 1e6:.1f} MB, "
                         f"{report.seconds:.1f} s; {checked}", [("warning", w) for w in report.warnings], report)
