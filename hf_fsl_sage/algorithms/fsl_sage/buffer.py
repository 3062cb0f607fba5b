"""The uploads the server keeps per client for FSL-SAGE's alignment."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from ...splitting.split import Smashed


class UploadBuffer:
    """The most recent uploads ``(smashed, labels)`` of one client, at most ``size`` sequences, newest last.

    (With private labels the server keeps ``(gradient at the cut, None)`` per upload, the client the uploads.)
    """

    def __init__(self, size: int):
        self.size = size
        self.items: deque[tuple[Smashed, torch.Tensor]] = deque()

    def push(self, smashed: Smashed, labels: torch.Tensor | None) -> None:
        """Keep an upload, dropping the oldest ones beyond ``size`` sequences."""
        size, items = self.size, self.items
        items.append((smashed, labels))
        while self.num_sequences > size and len(items) > 1:
            items.popleft()
        s, y = items[0]
        if s.hidden_states.shape[0] > size:  # a single upload larger than the buffer keeps its newest rows
            items[0] = (s.map(lambda t: t[-size:]), None if y is None else y[-size:])

    @property
    def num_sequences(self) -> int:
        return sum(s.hidden_states.shape[0] for s, _ in self.items)

    def __iter__(self) -> Iterator[tuple[Smashed, torch.Tensor]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> list[tuple[Smashed, torch.Tensor]]:
        return list(self.items)

    def load_state_dict(self, state: list[tuple[Smashed, torch.Tensor]]) -> None:
        self.items = deque(state)
