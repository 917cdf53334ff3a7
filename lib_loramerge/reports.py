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
    lines += _verification_lines(report.verification)
    lines.append(f"time: {report.seconds:.2f} s")
    return "\n".join(lines)


def _verification_lines(verification) -> list[str]:
    """--verify: one summary line, and the modules nearest their bounds."""
    if verification is None:
        return []
    lines = [verification.summary()]
    for name, error, bound in verification.worst(3):
        lines.append(f"  {error:.3g} (bound {bound:.3g})  {name}")
    return lines


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
    lines += _verification_lines(report.verification)
    where = "" if report.device == "cpu" else " (small r×r decompositions on the CPU, where they are faster)"
    lines.append(f"time: {report.seconds:.2f} s on {report.device}{where}")
    return "\n".join(lines)


def _block_line(energy: dict, target_energy: dict, arch: str) -> list[str]:
    from .blocks.report import block_energy

    pooled = block_energy(energy, target_energy, arch) if energy else None
    if pooled is None:
        return []
    shown = [f"{b} {v:.3f}" for b, v in pooled.retained.items() if v is not None]
    return ["  per LBW block: " + ", ".join(shown)] if shown else []


def _rank_lines(ranks_by_kind: dict) -> list[str]:
    return [f"  {kind}: " + ", ".join(f"rank {r} ×{n}" for r, n in sorted(ranks.items()))
            for kind, ranks in ranks_by_kind.items()]


def format_extract_report(report, path) -> str:
    identical = [name for name, why in report.skipped if why == "identical in both checkpoints"]
    others = [(name, why) for name, why in report.skipped if why != "identical in both checkpoints"]
    lines = [f"wrote {display_path(path)} ({PRETTY.get(report.arch, report.arch)} LoRA: {report.tuned} − {report.base})",
             f"modules: {report.modules_out} written, {len(report.skipped)} skipped"
             + (f" ({len(identical)} identical in both checkpoints)" if identical else "")]
    lines += _rank_lines(report.ranks_by_kind)
    for name, why in others[:5]:
        lines.append(f"  skipped {name}: {why}")
    if len(others) > 5:
        lines.append(f"  … and {len(others) - 5} more skipped by --min-diff")
    summary = report.summary()
    if summary:
        lines.append(f"energy retained (fraction of ‖ΔW‖²): min {summary['retained_min']:.6f}, "
                     f"mean {summary['retained_mean']:.6f}")
        for w in summary["worst_retained"][:3]:
            lines.append(f"  {w['retained']:.6f}  {w['module']} (rank {w['rank']})")
        lines += _block_line(report.energy, report.target_energy, report.arch)
        unresolved = report.modules_out - summary["excess_resolved"]
        if summary["excess_max"] is None:
            lines.append("error over the optimal rank-k error: below fp32's resolution on every module "
                         "(≥ 99.9 % of ‖ΔW‖² kept)")
        else:
            lines.append(f"error over the optimal rank-k error (estimated from the sketch): max "
                         f"{100 * summary['excess_max']:.3f} %, {summary['excess_over_1_percent']} modules above 1 %"
                         + (f"; {unresolved} modules below fp32's resolution" if unresolved else ""))
            for w in summary["worst_excess"][:3]:
                lines.append(f"  {100 * w['excess']:.3f} %  {w['module']}")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"time: {report.seconds:.2f} s")
    return "\n".join(lines)


def format_resize_report(job) -> str:
    report = job.report
    lines = [f"wrote {display_path(job.path)} ({PRETTY.get(job.arch, job.arch)}, resized {', '.join(report.inputs)}: "
             f"{job.policy}; {job.size / 2**20:.2f} MiB"
             + (f" of {job.size_target / 2**20:.2f} MiB asked)" if job.size_target else ")"),
             f"modules: {report.modules_out} written, {len(report.dropped)} dropped"]
    lines += _rank_lines(report.ranks_by_kind)
    for name, why in report.dropped[:5]:
        lines.append(f"  dropped {name}: {why}")
    energy = report.energy_summary()
    if energy:
        lines.append(f"energy retained (fraction of ‖ΔW‖²): min {energy['min']:.6f}, mean {energy['mean']:.6f}")
        for w in energy["worst"][:3]:
            lines.append(f"  {w['energy']:.6f}  {w['module']} (rank {job.ranks[w['module']]} of "
                         f"{job.source_ranks.get(w['module'])})")
        lines += _block_line(report.energy, report.target_energy, job.arch)
    lines += [f"note: {n}" for n in report.notes]
    lines += _verification_lines(report.verification)
    lines.append(f"time: {report.seconds:.2f} s")
    return "\n".join(lines)
