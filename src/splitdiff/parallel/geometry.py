"""Row patches: which latent rows each rank owns, at every resolution of the U-Net.

The cut is made at the U-Net's lowest resolution and scaled up from there, so every
downsampling sees whole row pairs and each patch is the same patch at every level.
Uneven rank counts get patches that differ by one lowest-resolution row.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class RowSplit:
    lowest: tuple[int, ...]  # rows of each patch at the lowest resolution, top patch first
    width: int  # columns of the latent
    levels: int  # 2x downsamplings between the latent and the lowest resolution

    @classmethod
    def of(cls, height: int, width: int, parts: int, levels: int) -> RowSplit:
        scale = 2**levels
        for name, size in (("height", height), ("width", width)):
            if size % scale:
                raise UserError(f"latent {name} {size} is not a multiple of {scale}, the U-Net's downsampling factor")
        rows = height // scale
        if parts > rows:
            raise UserError(
                f"{parts} patches need one row each at the U-Net's lowest resolution, but a {height}-row latent "
                f"has only {rows} there; use at most {rows} ranks per image, or a larger image"
            )
        base, extra = divmod(rows, parts)
        return cls(tuple(base + (i < extra) for i in range(parts)), width, levels)

    @property
    def parts(self) -> int:
        return len(self.lowest)

    def rows(self, level: int) -> tuple[int, ...]:
        """Rows of every patch at `level` (0 = the latent's resolution)."""
        scale = 2 ** (self.levels - level)
        return tuple(r * scale for r in self.lowest)

    def start(self, index: int, level: int) -> int:
        return sum(self.rows(level)[:index])

    def cols(self, level: int) -> int:
        return self.width >> level

    def level_of(self, index: int, *, rows: int | None = None, tokens: int | None = None) -> int:
        """The level at which patch `index` has this many rows (or rows x columns tokens)."""
        for level in range(self.levels + 1):
            r = self.rows(level)[index]
            if rows == r or tokens == r * self.cols(level):
                return level
        raise ValueError(f"patch {index} has no level with rows={rows} tokens={tokens}")

    def band(self, index: int, level: int, fraction: float) -> int:
        """Rows of patch `index` that PCPP shows its neighbours: `fraction` of the patch, at least one."""
        r = self.rows(level)[index]
        return min(r, max(1, int(fraction * r + 0.5)))
