"""`DecodeBudget`: the memory that image decoding may hold at once, shared by every request.

Each image's decode reserves what it will hold at its peak (`uploads.check_upload` estimates it from the
header) before it starts and gives it back when it ends; a reservation that does not fit waits, in
arrival order, for decodes in flight to end (a request waits for memory rather than failing). So the
sum of the estimates in flight never exceeds the total, however many requests arrive at once. (That
bounds what decodes hold, not the process's resident memory to the byte: the C allocator keeps some of
what finished decodes freed, tens of MB, for the next ones.) Runs on the event loop: `reserve` and
`release` are called from it, never from a thread.
"""

import asyncio
import collections


class DecodeBudget:
  """At most `total` bytes reserved at once; reservations are granted first come, first served (a
  large one is not overtaken forever by small ones)."""

  def __init__(self, total: int):
    if total < 1:
      raise ValueError(f'a decode budget of {total} bytes')
    self.total = int(total)
    self.in_use = 0
    self.peak = 0  # the most ever reserved at once
    self.waited = 0  # reservations that had to wait for others to end
    self._line: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

  async def reserve(self, amount: int) -> int:
    """Waits until `amount` bytes (at most the total: one image alone always fits) can be reserved,
    reserves them, and returns the amount to `release` later."""
    amount = max(0, min(int(amount), self.total))
    future = asyncio.get_running_loop().create_future()
    self._line.append((amount, future))
    self._grant()
    if not future.done():
      self.waited += 1
    try:
      await future
    except BaseException:  # cancelled while waiting, or just after being granted
      if future.cancelled():
        self._line = collections.deque(w for w in self._line if w[1] is not future)
      else:
        self.in_use -= amount
      self._grant()
      raise
    return amount

  def release(self, amount: int) -> None:
    self.in_use -= amount
    self._grant()

  def stats(self) -> dict:
    return {'budget_mb': round(self.total / 2**20, 1), 'in_use_mb': round(self.in_use / 2**20, 1),
            'peak_mb': round(self.peak / 2**20, 1), 'waited': self.waited, 'waiting': len(self._line)}

  def _grant(self) -> None:
    while self._line:
      amount, future = self._line[0]
      if future.cancelled():
        self._line.popleft()
        continue
      if self.in_use + amount > self.total:
        return
      self._line.popleft()
      self.in_use += amount
      self.peak = max(self.peak, self.in_use)
      future.set_result(None)
