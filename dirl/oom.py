"""GPU out-of-memory: retry the same work with half the batch, down to 1, then stop with a clear error.

One helper for every stage that runs a model on batches (`dirl extract`, the Cellpose network of
`dirl segment`). `HalvingBatch` keeps the current batch size; on an out-of-memory error it drops the
failed attempt (and with it the exception's references to the batch's tensors), empties the allocator's
cache, halves the batch, logs a warning and retries the same rows. Rows that already succeeded are kept,
so the results come back in the original order, none skipped or repeated. A smaller batch then stays in
force for the rest of the run (the memory that ran out will be short again for the next batch). When the
batch is already 1, `GpuOutOfMemoryError` (a `DirlError`: one clear CLI line, exit 1) names the slide and
the setting to lower.

Two ways to use it:

* `map(fn, items)`: split `items` (anything with `len` and slicing: a tensor, an array) into
  consecutive chunks of the current batch size and return `[fn(chunk), ...]` in order;
* `run(fn)`: call `fn(batch_size)` once, for a library that batches internally (Cellpose's `run_net`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dirl.errors import DirlError

log = logging.getLogger(__name__)
T = TypeVar("T")


class GpuOutOfMemoryError(DirlError):
    """The model ran out of GPU memory even one item at a time."""


def is_oom(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA, or any RuntimeError saying 'out of memory')."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None
    )
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_cached_memory() -> None:
    """Return the caching allocator's free blocks to the device (no-op without CUDA/MPS)."""
    import gc

    torch = sys.modules.get("torch")
    if torch is None:
        return
    gc.collect()  # frames of the failed attempt may sit in reference cycles
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


class HalvingBatch:
    """Current batch size of one model on one slide (or run); halves on out-of-memory.

    `setting` is the configuration key the user lowers (e.g. ``extract.batch_size``), `slide` the slide
    named in the final error (may be set later, e.g. by the caller that knows it), `what` names the
    computation in messages."""

    def __init__(self, batch: int, *, setting: str, slide: str | None = None, what: str = "model"):
        if batch < 1:
            raise ValueError(f"batch size must be >= 1, got {batch}")
        self.batch, self.setting, self.slide, self.what = int(batch), setting, slide, what
        self.retries = 0

    # -- the two entry points
    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """`[fn(items[a:b]), ...]` over consecutive chunks of at most `self.batch` rows, in order."""
        out: list[T] = []
        n, a = len(items), 0
        while a < n:
            b = min(n, a + self.batch)
            ok, res = self._attempt(fn, items[a:b], b - a)
            if ok:
                out.append(res)
                a = b
            else:
                self._halve(b - a)
        return out

    def run(self, fn: Callable[[int], T]) -> T:
        """`fn(batch_size)` with the current batch size, halving and calling again on out-of-memory."""
        while True:
            ok, res = self._attempt(fn, self.batch, self.batch)
            if ok:
                return res
            self._halve(self.batch)

    # -- internals
    def _attempt(self, fn: Callable[[Any], T], arg: Any, size: int) -> tuple[bool, Any]:
        try:
            return True, fn(arg)
        except Exception as e:
            if not is_oom(e):
                raise
            if size <= 1:
                raise GpuOutOfMemoryError(self.message(e)) from e
            log.debug("out of memory at batch %d: %s", size, e)
        # the exception (and its traceback, which holds the attempt's tensors) is gone here
        return False, None

    def _halve(self, failed: int) -> None:
        free_cached_memory()
        self.batch = max(1, min(self.batch, failed) // 2)
        self.retries += 1
        log.warning(
            "%sGPU out of memory in %s at batch size %d: retrying with batch size %d (lower %s to avoid the retry)",
            self._where(),
            self.what,
            failed,
            self.batch,
            self.setting,
        )

    def _where(self) -> str:
        return f"slide {self.slide!r}: " if self.slide else ""

    def message(self, exc: BaseException | None = None) -> str:
        why = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})" if exc is not None and str(exc) else ""
        return (
            f"{self._where()}GPU out of memory in {self.what} even at batch size 1{why}. "
            f"Set a smaller {self.setting} (and check that nothing else is using the GPU), "
            "use a GPU with more memory, or run on the CPU"
        )
