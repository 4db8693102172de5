"""Continuous batching for chat completions: one decode step serves every active request.

A decode step of a small LM on a CPU is bound by reading the weights, not by arithmetic, so stepping B
sequences together costs little more than stepping one: the aggregate tokens/s grows with B. The engine runs
in one thread. A new request is prefilled alone (lowbit's ``LeanDecoder``, B = 1: a prefill is compute bound
already), in the server's worker thread where ``prefill`` is called so that it overlaps the engine's steps, and
its KV cache is copied into a free slot of a shared cache; then every step embeds one token per
active slot, runs each layer's projections and MLP once over all of them (``LeanDecoder``'s bound layer
callables: packed kernels, fused q/k/v and gate/up), and attends per row under a key mask (each row has its own
length and position). Finished or cancelled rows leave at once (the last active row moves into their slot, so
the active rows stay a prefix and the batch is exactly the active count); waiting requests join between steps.

Greedy rows give ``LeanDecoder``'s tokens (the same arithmetic per row; matmul blocking over a larger batch can
move the last bits). Sampling draws per row from its own generator (seeded if the request gave a seed).
Models the lean engine does not run, FastV pruning and quantized KV caches stay on the threaded path.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from lowbit.models.lean_decode import LeanDecoder, sampling_warpers, unsupported_reason
from lowbit.models.llava_generate import stop_token_ids
from lowbit.models.llava_model import LlavaModel

SLOT_CHUNK = 128  # the shared cache grows by this many positions when a longer request joins


def batchable_reason(model: LlavaModel) -> str | None:
    """Why ``BatchDecoder`` cannot serve ``model`` (None: it can)."""
    if model.prunes_inside_lm:
        return "FastV pruning inside the LM prefills each prompt its own way"
    if model.config.kv_bits:
        return "a quantized KV cache is transformers' cache"
    return unsupported_reason(model.language)


@dataclass
class Row:
    """One request in the batch: the tokens so far and how to pick and report the next ones."""

    embeds: torch.Tensor  # the prompt [1, T, D]
    max_new: int
    on_token: Callable[[int], bool]  # gets each new token id; False: stop this row (stop string, client gone)
    on_end: Callable[[list[int], BaseException | None], None]  # the answer's token ids (stop token excluded)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_new tokens (what throughput benchmarks measure)
    cancelled: Callable[[], bool] = lambda: False  # the client left: skip the prefill of a waiting row
    prefilled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (K [layers, KV, T, hd], V, logits)
    ids: list[int] = field(default_factory=list)
    pos: int = 0  # the position of the next token to feed
    generator: torch.Generator | None = None
    warpers: Any = None


class BatchDecoder:
    """The engine thread (see the module docstring); ``submit(row)`` from any thread."""

    def __init__(self, model: LlavaModel, slots: int) -> None:
        reason = batchable_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self.model, self.slots = model, slots
        self.stops = set(stop_token_ids(model.tokenizer, model.language))
        self.engine = LeanDecoder(model.language)  # the shared cache [layers, slots, KV, L, hd] and the layers
        self.prefiller = LeanDecoder(model.language)  # B = 1 prompts
        self.length = 0  # positions the shared cache holds
        self.rows: list[Row] = []  # active rows; rows[j] lives in slot j
        self.waiting: queue.Queue[Row | None] = queue.Queue()
        self._prefill_lock = threading.Lock()
        self.steps = 0  # decode steps run (tests and metrics read it)
        self.rows_stepped = 0  # sum over steps of the batch size
        self._thread = threading.Thread(target=self._loop, name="lowbit-batch-decode", daemon=True)
        self._thread.start()

    def submit(self, row: Row) -> None:
        self.waiting.put(row)

    @torch.inference_mode()
    def prefill(self, row: Row) -> None:
        """Run ``row``'s prompt now, in the calling thread (``row.prefilled``): a worker thread's prefill
        (compute bound) then overlaps the engine's decode steps (memory bound) instead of pausing them."""
        decoder = LeanDecoder(self.model.language)
        t = row.embeds.shape[1]
        with self._prefill_lock:  # one at a time: parallel prefills on few cores would all finish late
            logits = decoder.prefill(inputs_embeds=row.embeds, max_len=t)
        row.prefilled = (decoder.k_cache[:, 0], decoder.v_cache[:, 0], logits[0])  # type: ignore[index]

    def close(self) -> None:
        self.waiting.put(None)
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return len(self.rows)

    # -- the loop ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            while len(self.rows) < self.slots:  # admit: block only when nothing is decoding
                try:
                    row = self.waiting.get(block=not self.rows, timeout=None if not self.rows else 0)
                except queue.Empty:
                    break
                if row is None:
                    self._fail_all(RuntimeError("the server is shutting down"))
                    return
                self._admit(row)
            if self.rows:
                try:
                    self._step()
                except BaseException as exc:  # noqa: BLE001 - every row learns of it; the engine goes on
                    self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for row in self.rows:
            row.on_end(row.ids, exc)
        self.rows = []

    @torch.inference_mode()
    def _admit(self, row: Row) -> None:
        if row.cancelled():
            row.on_end(row.ids, None)
            return
        try:
            t = row.embeds.shape[1]
            if row.do_sample:
                row.warpers = sampling_warpers(row.temperature, 0, row.top_p)
                row.generator = torch.Generator().manual_seed(row.seed) if row.seed is not None else None
            if row.prefilled is None:
                logits = self.prefiller.prefill(inputs_embeds=row.embeds, max_len=t)
                keys, values = self.prefiller.k_cache[:, 0], self.prefiller.v_cache[:, 0]  # type: ignore[index]
            else:
                keys, values, logits = row.prefilled[0], row.prefilled[1], row.prefilled[2][None]
            row.pos = t
            if not self._take(row, logits[0]):
                return
            self._ensure_length(t + row.max_new)
            slot = len(self.rows)
            self.engine.k_cache[:, slot, :, :t] = keys[:, :, :t]  # type: ignore[index]
            self.engine.v_cache[:, slot, :, :t] = values[:, :, :t]  # type: ignore[index]
            row.prefilled = None  # the cache copy is the row's now
            self.rows.append(row)
        except BaseException as exc:  # noqa: BLE001 - this request fails, the others go on
            row.on_end(row.ids, exc)

    def _ensure_length(self, needed: int) -> None:
        """Grow the shared cache (slots x positions) to hold ``needed`` positions, keeping the active rows."""
        if needed <= self.length:
            return
        length = -(-needed // SLOT_CHUNK) * SLOT_CHUNK
        old_k, old_v, old_len = self.engine.k_cache, self.engine.v_cache, self.length
        self.engine.k_cache = self.engine.v_cache = None  # reset() allocates anew
        self.engine.reset(self.slots, length)
        if old_k is not None and self.rows:
            n = len(self.rows)
            self.engine.k_cache[:, :n, :, :old_len] = old_k[:, :n]  # type: ignore[index]
            self.engine.v_cache[:, :n, :, :old_len] = old_v[:, :n]  # type: ignore[index,operator]
        self.length = length

    def _take(self, row: Row, logits: torch.Tensor) -> bool:
        """Pick the row's next token from its logits [V]; False when the row is finished (and reported)."""
        if row.warpers is not None:
            scores = row.warpers(None, logits.float()[None])
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator)[0, 0])
        else:
            token = int(logits.argmax())
        if token in self.stops and not row.ignore_eos:
            row.on_end(row.ids, None)
            return False
        row.ids.append(token)
        if not row.on_token(token) or len(row.ids) >= row.max_new:
            row.on_end(row.ids, None)
            return False
        return True

    def _leave(self, j: int) -> None:
        """Row j is done: the last active row moves into its slot."""
        last = len(self.rows) - 1
        if j != last:
            upto = self.rows[last].pos
            kc, vc = self.engine.k_cache, self.engine.v_cache
            kc[:, j, :, :upto] = kc[:, last, :, :upto]  # type: ignore[index]
            vc[:, j, :, :upto] = vc[:, last, :, :upto]  # type: ignore[index]
            self.rows[j] = self.rows[last]
        self.rows.pop()

    @torch.inference_mode()
    def _step(self) -> None:
        eng, rows = self.engine, self.rows
        n = len(rows)
        tokens = torch.tensor([r.ids[-1] for r in rows], dtype=torch.long)
        pos = torch.tensor([r.pos for r in rows], dtype=torch.long)  # where each row's new token goes
        span = int(pos.max()) + 1
        mask = (torch.arange(span)[None, :] <= pos[:, None])[:, None, None, :]  # [n, 1, 1, span]
        cos, sin = eng.cos[pos][:, None, None, :], eng.sin[pos][:, None, None, :]  # [n, 1, 1, hd]
        slot = torch.arange(n)
        h = eng.embed(tokens[:, None])  # [n, 1, D]
        heads, kv_heads, hd = eng.heads, eng.kv_heads, eng.head_dim
        for i, layer in enumerate(eng.layers):
            x = eng._rms(h, layer.in_norm)
            q, k, v = layer.qkv(x)
            q = eng._rope(q.view(n, 1, heads, hd).transpose(1, 2), cos, sin)  # [n, H, 1, hd]
            k = eng._rope(k.view(n, 1, kv_heads, hd).transpose(1, 2), cos, sin)  # [n, KV, 1, hd]
            v = v.view(n, 1, kv_heads, hd).transpose(1, 2)
            kc, vc = eng.k_cache[i], eng.v_cache[i]  # type: ignore[index]  [slots, KV, L, hd]
            kc[slot, :, pos] = k[:, :, 0]
            vc[slot, :, pos] = v[:, :, 0]
            attn = F.scaled_dot_product_attention(q, kc[:n, :, :span], vc[:n, :, :span], attn_mask=mask,
                                                  enable_gqa=heads != kv_heads)  # [n, H, 1, hd]
            h = h + layer.o(attn.transpose(1, 2).reshape(n, 1, heads * hd))
            x = eng._rms(h, layer.post_norm)
            gate, up = layer.gate_up(x)
            h = h + layer.down(layer.act(gate) * up)
        logits = eng.lm_head(eng._rms(h[:, -1], eng.norm))  # [n, V]
        self.steps += 1
        self.rows_stepped += n
        for r in rows:
            r.pos += 1
        finished = [j for j, r in enumerate(rows) if not self._take(r, logits[j])]
        for j in reversed(finished):  # from the back: moving the last row never touches one still to leave
            self._leave(j)
