"""Pre-allocated key/value caches with the transformers ``update`` protocol.

A transformers 5 attention layer calls ``cache.update(k, v, layer_idx, ...)`` and
attends over what it returns. :class:`KVCache` answers that call by writing ``k, v`` into
fixed buffers at the sequence indices set with :meth:`KVCache.set_positions` (a tensor,
so the write is the same kernel every step and can be captured in a CUDA graph) and
returning the whole buffers; which slots are visible is decided by the attention mask
built from the same indices. Rolling back is therefore free: lower the length and the
stale slots are masked out until they are overwritten.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache", "static_buffer"]


def check_active_rows(rows: int, capacity: int) -> None:
    """Raise ``ValueError`` unless ``1 <= rows <= capacity`` (rows a buffer may run)."""
    if not 1 <= rows <= capacity:
        raise ValueError(f"active rows must be in [1, {capacity}], got {rows}")


def static_buffer(t: torch.Tensor) -> torch.Tensor:
    """Mark a long-lived CUDA buffer as having a fixed address (CUDA graphs may then keep it
    in place instead of copying it); a no-op on other devices."""
    if t.is_cuda:
        torch._dynamo.mark_static_address(t)
    return t


class KVCache:
    """Static KV cache for ``num_layers`` layers, buffers ``[B, kv_heads, max_len, head_dim]``.

    Buffers are allocated up front by :meth:`allocate` (what backbones' ``setup_caches``
    does), or else on the first :meth:`update` of each layer, when the head layout is known.
    An engine that runs fewer rows than it allocated narrows the cache to its leading rows
    with :meth:`set_active_rows` (the buffers become views; nothing is copied).

    Args:
        num_layers: Number of layers sharing this object (the backbone: all of them).
        batch_size: ``B``.
        max_len: ``S``, the largest sequence index + 1 that can be written.
        single_layer: When True the ``layer_idx`` passed by the layer is ignored and slot 0
            is used (each MCTP head owns a one-layer cache while its block is a copy of a
            backbone layer with some other ``layer_idx``).

    Raises:
        ValueError: On non-positive sizes.
    """

    def __init__(
        self, num_layers: int, batch_size: int, max_len: int, *, single_layer: bool = False
    ) -> None:
        if num_layers < 1 or batch_size < 1 or max_len < 1:
            raise ValueError(
                f"num_layers ({num_layers}), batch_size ({batch_size}) and max_len ({max_len}) must be >= 1"
            )
        if single_layer and num_layers != 1:
            raise ValueError("single_layer=True needs num_layers=1")
        self.num_layers = num_layers
        self.capacity = batch_size
        self.batch_size = batch_size  # active rows (see set_active_rows)
        self.max_len = max_len
        self.single_layer = single_layer
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # the allocated [capacity, ...] buffers; keys/values are their leading active rows
        self._all_keys: list[torch.Tensor | None] = [None] * num_layers
        self._all_values: list[torch.Tensor | None] = [None] * num_layers
        self._positions: torch.Tensor | None = None
        self._visible: int | None = None
        self._start = 0

    @property
    def allocated(self) -> bool:
        """Whether every layer's buffers exist (after the first forward through the cache)."""
        return all(k is not None for k in self.keys)

    def allocate(
        self,
        num_kv_heads: int | list[int],
        head_dim: int | list[int],
        *,
        value_head_dim: int | list[int] | None = None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        """Allocate every layer's buffers up front (before the first forward).

        Args:
            num_kv_heads: Key/value heads, one int for all layers or one per layer.
            head_dim: Per-head key size, one int or one per layer.
            value_head_dim: Per-head value size when it differs from the key's (multi-head
                latent attention), one int or one per layer.
            dtype: Buffer dtype.
            device: Buffer device.

        Returns:
            ``self``.

        Raises:
            ValueError: If a per-layer list has the wrong length or a size is not positive.
        """
        heads = [num_kv_heads] * self.num_layers if isinstance(num_kv_heads, int) else num_kv_heads
        dims = [head_dim] * self.num_layers if isinstance(head_dim, int) else head_dim
        if value_head_dim is None:
            value_head_dim = dims
        vdims = (
            [value_head_dim] * self.num_layers
            if isinstance(value_head_dim, int)
            else value_head_dim
        )
        if not len(heads) == len(dims) == len(vdims) == self.num_layers:
            raise ValueError(
                f"need {self.num_layers} per-layer sizes, got {len(heads)} heads, "
                f"{len(dims)} key dims and {len(vdims)} value dims"
            )
        if min(heads) < 1 or min(dims) < 1 or min(vdims) < 1:
            raise ValueError(f"kv heads {heads} and head dims {dims}/{vdims} must be >= 1")
        for i, (h, d, dv) in enumerate(zip(heads, dims, vdims)):
            b, s = self.capacity, self.max_len
            self._all_keys[i] = static_buffer(torch.zeros(b, h, s, d, dtype=dtype, device=device))
            self._all_values[i] = static_buffer(
                torch.zeros(b, h, s, dv, dtype=dtype, device=device)
            )
        self.set_active_rows(self.batch_size)
        return self

    def set_active_rows(self, rows: int) -> None:
        """Run the leading ``rows`` rows only: :meth:`update` writes and returns ``[rows, ...]``
        views of the allocated buffers (the others keep what they hold). At full capacity the
        buffers themselves are used, so fixed-shape callers see the same tensors as before.

        Raises:
            ValueError: If ``rows`` is not in ``[1, capacity]``.
        """
        check_active_rows(rows, self.capacity)
        self.batch_size = rows
        full = rows == self.capacity
        for i, (k, v) in enumerate(zip(self._all_keys, self._all_values)):
            if k is not None and v is not None:
                self.keys[i] = k if full else k[:rows]
                self.values[i] = v if full else v[:rows]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows ``start .. stop - 1`` of this one: its buffers are views, so what
        a forward writes through it lands here (a 1-row prefill of a request joining a batch).

        Raises:
            ValueError: If the buffers are not allocated or the rows are out of range.
        """
        if not self.allocated:
            raise ValueError("allocate() the cache before taking row views")
        if not 0 <= start < stop <= self.capacity:
            raise ValueError(f"rows {start}..{stop} out of range for batch size {self.capacity}")
        view = KVCache(self.num_layers, stop - start, self.max_len, single_layer=self.single_layer)
        view._visible = None
        view._all_keys = [k[start:stop] for k in self._all_keys]  # type: ignore[index]
        view._all_values = [v[start:stop] for v in self._all_values]  # type: ignore[index]
        view.keys, view.values = list(view._all_keys), list(view._all_values)
        return view

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> KVCache:
        """A one-layer cache over existing buffers ``keys, values [B, kv_heads, S, D]`` whose
        next ``update`` writes at ``slots [T]`` and returns the whole buffers (what a compiled
        block region builds around one layer's buffers, see :mod:`mctp.engine.regions`)."""
        view = cls(1, keys.shape[0], keys.shape[2], single_layer=True)
        view.keys, view.values = [keys], [values]
        view._all_keys, view._all_values = [keys], [values]
        view._positions = slots
        return view

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(keys, values, slots)`` of layer ``i`` for :meth:`over`: its buffers (views of
        the slots ``start .. visible - 1`` set by :meth:`set_positions`) and the slots to
        write, counted from ``start``; None when a region cannot stand in for this cache now
        (buffers not allocated yet, positions not set)."""
        k, v = self.keys[0 if self.single_layer else i], self.values[0 if self.single_layer else i]
        if k is None or v is None or self._positions is None:
            return None
        if self._visible is None and not self._start:
            return k, v, self._positions
        window = slice(self._start, self._visible)
        slots = self._positions - self._start if self._start else self._positions
        return k[:, :, window], v[:, :, window], slots

    def set_positions(
        self, positions: torch.Tensor, *, visible: int | None = None, start: int = 0
    ) -> None:
        """Set the sequence indices ``[T]`` (long) the next ``update`` calls write to, and
        which slots they return: ``start .. visible - 1`` (``visible`` None: up to
        ``max_len``). The eager path reads only the slots a sequence has (and none before
        ``start``, which no row reads any more); fixed shapes read them all.

        Raises:
            ValueError: If ``start`` is negative or not below ``visible``.
        """
        stop = self.max_len if visible is None else visible
        if not 0 <= start < stop:
            raise ValueError(f"start must be in [0, {stop}), got {start}")
        self._positions = positions
        self._visible = None if visible is None or visible >= self.max_len else visible
        self._start = start

    def update(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key, value [B, kv_heads, T, D]`` at the current indices; return full buffers.

        Extra positional or keyword arguments (``cache_kwargs`` up to transformers 5.23,
        ``kwargs=`` from 5.24) are accepted and ignored: positions come from
        :meth:`set_positions`.

        Returns:
            ``(keys, values)``, each ``[B, kv_heads, max_len, D]``.

        Raises:
            RuntimeError: If :meth:`set_positions` was not called or shapes do not fit.
        """
        if self._positions is None:
            raise RuntimeError("KVCache.set_positions(...) must be called before the forward")
        i = 0 if self.single_layer else layer_idx
        if self.keys[i] is None:
            b, h, _, d = key.shape
            if b != self.batch_size:
                raise RuntimeError(f"cache batch size is {self.batch_size}, got keys for batch {b}")
            c = self.capacity
            self._all_keys[i] = static_buffer(key.new_zeros(c, h, self.max_len, d))
            self._all_values[i] = static_buffer(
                value.new_zeros(c, value.shape[1], self.max_len, value.shape[-1])
            )
            self.set_active_rows(self.batch_size)
        k_buf, v_buf = self.keys[i], self.values[i]
        assert k_buf is not None and v_buf is not None
        k_buf.index_copy_(2, self._positions, key.to(k_buf.dtype))
        v_buf.index_copy_(2, self._positions, value.to(v_buf.dtype))
        if self._visible is not None or self._start:
            window = slice(self._start, self._visible)
            return k_buf[:, :, window], v_buf[:, :, window]
        return k_buf, v_buf

    def reset(self) -> None:
        """Zero all buffers (not needed for correctness; masks hide stale slots)."""
        for buf in (*self._all_keys, *self._all_values):
            if buf is not None:
                buf.zero_()
