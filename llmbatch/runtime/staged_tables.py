"""StagedTables: remembers the block tables a CUDA graph's persistent buffer holds, so a step
whose padded tables are the same skips their copies.

A decode graph step copies its compact (bs, width) block tables host -> device staging ->
block_tables[:bs, :width] (cuda_graphs.py). A request's table grows by one block every
block_size tokens, so at batch 1 with 16-token blocks 15 steps in 16 copy the same ids: two
device operations between graph replays (a pinned upload and a device copy, ~1-2 us each plus
their gaps at batch 1, bench/RESULTS.md stop 20's profile) that change nothing.

Valid only while nothing but the owner's staging writes the buffer: the owner asks changed()
for every step it stages (capture's all-padding warm-ups included) and copies when told to.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


class StagedTables:
    def __init__(self) -> None:
        self._last: Optional[np.ndarray] = None   # the last copied (bs * width,) int32 ids
        self._last_bs = 0
        self.uploads = 0   # steps whose tables were copied (engine-level diagnostics, tests)

    def changed(self, tables: np.ndarray, bs: int) -> bool:
        """tables: this step's compact (bs * width,) padded ids as staged on the host. True
        (and remembered) when they differ from the last copied ones in batch size, width or
        any id: the caller must copy them. False: the device buffer already holds them."""
        last = self._last
        if (last is not None and bs == self._last_bs and last.shape == tables.shape
                and np.array_equal(last, tables)):
            return False
        self._last, self._last_bs = tables.copy(), bs
        self.uploads += 1
        return True
