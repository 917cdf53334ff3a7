"""LBW's block IDs and layouts, and the expansion of short layouts into the full one.

Every vector is placed by block ID into the 26-ID list (BASE, IN00…IN11, M00, OUT00…OUT11); IDs a
short layout does not name get 0, exactly as LBW's ``to26`` does (SDXL's IDs are the first
9 of each group in the same list).
"""

from __future__ import annotations

from ..errors import LoraMergeError

BASE = "BASE"
IDS_26 = [BASE, *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
IDS_17 = [BASE, "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))]
IDS_20 = [BASE, *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
IDS_12 = [BASE, "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))]
FLUX_LENGTH = 61

LAYOUTS = {17: IDS_17, 26: IDS_26, 12: IDS_12, 20: IDS_20}
LENGTHS_FOR_ARCH = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20)}
FULL_LAYOUT = {"sd1": IDS_26, "sd2": IDS_26, "sdxl": IDS_20}
VALID_LENGTHS = (12, 17, 20, 26, FLUX_LENGTH)


def check_length(n: int, arch: str) -> None:
    """Refuse a vector length that LBW would ignore silently, or one meant for another model."""
    allowed = LENGTHS_FOR_ARCH.get(arch)
    if allowed is None:
        raise LoraMergeError(f"block weights need a known SD1/SD2/SDXL architecture (this LoRA is {arch})")
    if n == FLUX_LENGTH:
        raise LoraMergeError("61 values is LBW's Flux layout; Flux LoRAs are not supported")
    if n not in allowed:
        other = [a for a, lengths in LENGTHS_FOR_ARCH.items() if n in lengths and a != arch]
        hint = f" ({n} values is the {'/'.join(sorted({a.upper() for a in other}))} layout)" if other else ""
        raise LoraMergeError(f"{n} block weights for an {arch.upper()} LoRA: expected "
                             f"{' or '.join(map(str, allowed))}{hint}")


def expand(values: list[float]) -> dict[str, float]:
    """Block ID → ratio for every ID of the 26 list; IDs the layout does not name are 0."""
    ids = LAYOUTS[len(values)]
    full = dict.fromkeys(IDS_26, 0.0)
    full.update(zip(ids, values, strict=True))
    return full
