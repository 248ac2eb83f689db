"""Where an AR-Trust round's MASK groups sit when it drafts from every acceptance point (``redraft`` every or tree).

A round's rows: the clean chain ``[pending, d_1 .. d_M]``, then (tree only) a branch, then one MASK group of M
rows after each prefix ``pending, d_1 .. d_k`` (k = 0 .. M), each seeded at that clean boundary
(``flare.model.row_tree``). The branch (our extension, beyond the method) is a clean row holding ``second``, the
first draft row's likeliest token other than its draft, seeded right after ``pending``, and a MASK group seeded
after it. When the round rejects the first draft and the correction is that second choice, the branch row is
exactly a causal row over the committed context: its logits give one more token, and its group the next round's
drafts, conditioned on the correction. The cache then commits the path ``pending, second`` (row 0 and the
branch row) instead of a prefix of the chain (``ModelCache.commit``'s ``ends``).

Groups come after the branch so that no two neighbouring groups share a seed (rows of one seed that follow each
other form one group).
"""

from __future__ import annotations

import torch


class Groups:
    def __init__(self, N: int, mask_id: int, slots: int, device: torch.device, branch: bool) -> None:
        M = N - 1
        self.N, self.M, self.branch = N, M, branch
        self.clean = N + 1 if branch else N  # rows whose logits a round reads for its target (and branch) tokens
        self.lead = N + (1 + M if branch else 0)  # rows before group 0
        self.rows = self.lead + N * M
        arange = torch.arange(N + 1, device=device)
        groups = arange[1:].repeat_interleave(M)  # group k after the prefix of k + 1 clean rows
        own = [torch.zeros(N, dtype=torch.long, device=device)]
        if branch:  # the branch row after pending (a group of one), its group after the branch row
            own += [arange[1:2], torch.full((M,), N + 1, dtype=torch.long, device=device)]
        self.seeds = torch.cat(own + [groups]).expand(slots, -1)
        self.masks = torch.full((slots, self.clean * M), mask_id, dtype=torch.long, device=device)

    def tokens(self, pending: torch.Tensor, middle: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The round's rows [S, rows] from each slot's pending token [S], drafts (or placeholders) [S, M] and the
        branch's token [S] (read only with a branch)."""
        if not self.branch:
            return torch.cat([pending[:, None], middle, self.masks], dim=1)
        return torch.cat([pending[:, None], middle, second[:, None], self.masks], dim=1)

    def kept(self, accepted: torch.Tensor, hit: torch.Tensor | None) -> torch.Tensor:
        """[S, M]: the rows of the group whose drafts the next round verifies: the one seeded after the accepted
        prefix, or the branch's where ``hit``."""
        offsets = torch.arange(self.M, device=accepted.device)
        at = (self.lead + accepted * self.M)[:, None] + offsets
        return at if hit is None else torch.where(hit[:, None], self.N + 1 + offsets, at)
