"""LBW's block IDs and layouts (SD's and Flux's), and the expansion of short layouts into the full one.

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
# LBW's BLOCKIDFLUX: the two text encoders, the embedders (IN), 19 double and 38 single blocks, the final layer
IDS_FLUX = ["CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT"]
FLUX_LENGTH = len(IDS_FLUX)  # 61
ALL_IDS = [*IDS_26, *IDS_FLUX]  # every block ID any layout names (report order)

LAYOUTS = {17: IDS_17, 26: IDS_26, 12: IDS_12, 20: IDS_20, FLUX_LENGTH: IDS_FLUX}
LENGTHS_FOR_ARCH = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20), "flux": (FLUX_LENGTH,)}
FULL_LAYOUT = {"sd1": IDS_26, "sd2": IDS_26, "sdxl": IDS_20, "flux": IDS_FLUX}
VALID_LENGTHS = (12, 17, 20, 26, FLUX_LENGTH)
_NAMES = {"sd1": "an SD1", "sd2": "an SD2", "sdxl": "an SDXL", "flux": "a Flux"}


def check_length(n: int, arch: str) -> None:
    """Refuse a vector length that LBW would ignore silently, or one meant for another model."""
    allowed = LENGTHS_FOR_ARCH.get(arch)
    if allowed is None:
        raise LoraMergeError(f"block weights need a known SD1/SD2/SDXL/Flux architecture (this LoRA is {arch})")
    if n == FLUX_LENGTH and arch != "flux":
        raise LoraMergeError(f"61 values is LBW's Flux layout, but this is {_NAMES[arch]} LoRA")
    if n not in allowed:
        other = [a for a, lengths in LENGTHS_FOR_ARCH.items() if n in lengths and a != arch and a != "flux"]
        hint = f" ({n} values is the {'/'.join(sorted({a.upper() for a in other}))} layout)" if other else ""
        raise LoraMergeError(f"{n} block weights for {_NAMES[arch]} LoRA: expected "
                             f"{' or '.join(map(str, allowed))}{hint}")


def expand(values: list[float]) -> dict[str, float]:
    """Block ID → ratio for every ID of the 26 list (of the Flux list for 61 values); IDs the
    layout does not name are 0."""
    ids = LAYOUTS[len(values)]
    full = dict.fromkeys(IDS_FLUX if ids is IDS_FLUX else IDS_26, 0.0)
    full.update(zip(ids, values, strict=True))
    return full
