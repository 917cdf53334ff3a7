"""Reports as text: what the CLI prints and the tab shows after a merge or a bake (one wording for both)."""

from __future__ import annotations

from .arch import PRETTY
from .errors import display_path


def format_bake_report(report, path) -> str:
    lines = [f"wrote {display_path(path)} ({PRETTY.get(report.arch, report.arch)} checkpoint {report.checkpoint} + "
             f"{', '.join(report.inputs)})",
             f"modules baked: {report.modules_baked} into {report.keys_patched} tensors"]
    if report.by_block:
        lines.append("  per block: " + ", ".join(f"{b} {n}" for b, n in report.by_block.items()))
    if report.skipped_zero:
        lines.append(f"  {report.skipped_zero} modules skipped: strength or block weight 0")
    if report.unmatched:
        lines.append(f"unmatched modules (not baked): {len(report.unmatched)}")
        lines += [f"  {lora}: {module}: {why}" for lora, module, why in report.unmatched[:10]]
        if len(report.unmatched) > 10:
            lines.append(f"  … and {len(report.unmatched) - 10} more")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"time: {report.seconds:.2f} s")
    return "\n".join(lines)


def format_merge_report(report, path, arch: str) -> str:
    lines = [f"wrote {display_path(path)} ({PRETTY.get(arch, arch)}, {report.mode} of {len(report.inputs)} LoRA"
             f"{'s' if len(report.inputs) != 1 else ''}: {', '.join(report.inputs)})",
             f"modules: {report.modules_out} written, {len(report.dropped)} dropped"]
    for kind, ranks in report.ranks_by_kind.items():
        lines.append(f"  {kind}: " + ", ".join(f"rank {r} ×{n}" for r, n in sorted(ranks.items())))
    for name, why in report.dropped[:10]:
        lines.append(f"  dropped {name}: {why}")
    if len(report.dropped) > 10:
        lines.append(f"  … and {len(report.dropped) - 10} more dropped")
    energy = report.energy_summary()
    if energy:
        lines.append(f"energy retained (fraction of ‖ΔW‖²): min {energy['min']:.6f}, mean {energy['mean']:.6f}")
        for w in energy["worst"]:
            lines.append(f"  {w['energy']:.6f}  {w['module']}")
    lines += [f"note: {n}" for n in report.notes]
    where = "" if report.device == "cpu" else " (small r×r decompositions on the CPU, where they are faster)"
    lines.append(f"time: {report.seconds:.2f} s on {report.device}{where}")
    return "\n".join(lines)
