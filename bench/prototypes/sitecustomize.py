"""Prototypes of the engine/server changes proposed in docs/PERFORMANCE.md, as monkeypatches.

Measurement aids only (nothing imports this): put this folder on PYTHONPATH and name the patches
in XLLM_PROTO, and every Python process started so (the server) applies them at start-up:

    PYTHONPATH=bench/prototypes python bench/cpu_targets.py --server-env XLLM_PROTO=threads,deps

    threads  torch.set_num_threads(1): one intra-op thread on the CPU
    push     one event-loop wake-up per engine step instead of one per streamed token
    prefill  every prefilling request in one forward per iteration (right-padded rows)
    deps     FastAPI's sync dependencies called on the event loop (no thread-pool hop)
    switch   sys.setswitchinterval(0.001): the GIL changes hands sooner
"""

import os

_want = set(filter(None, os.environ.get("XLLM_PROTO", "").split(",")))
if "threads" in _want:
    import torch

    torch.set_num_threads(1)
if "push" in _want:
    import threading

    from xllm.server.engine import events

    _lock = threading.Lock()
    _pending: dict = {}

    def _flush(loop):
        with _lock:
            batch = _pending.pop(loop, [])
        for queue, event in batch:
            queue.put_nowait(event)

    def push(self, event):
        """One event-loop wake-up per engine step instead of one per token."""
        with _lock:
            batch = _pending.setdefault(self._loop, [])
            first = not batch
            batch.append((self._events, event))
        if first:
            self._loop.call_soon_threadsafe(_flush, self._loop)

    events.RequestHandle.push = push
if "prefill" in _want:
    import torch

    from xllm.model.generate import attention_mask_4d
    from xllm.server.engine import worker
    from xllm.server.engine.scheduler import Phase

    def _prefill_batched(self):
        """All prefilling requests in one forward (right-padded), within prefill_chunk positions."""
        chunk = self.scheduler.prefill_chunk
        group = []
        for e in self.scheduler.running:
            if e.phase is not Phase.PREFILL or e.item.embeds is None:
                continue
            end = min(e.prefilled + chunk, e.prompt_len)
            q = max([t - s for _, s, t in group] + [end - e.prefilled])
            if group and q * (len(group) + 1) > chunk:
                break
            group.append((e, e.prefilled, end))
        if not group:
            return
        device = self.model.device
        q = max(t - s for _, s, t in group)
        hidden = group[0][0].item.embeds.shape[-1]
        embeds = torch.zeros(
            len(group), q, hidden, dtype=group[0][0].item.embeds.dtype, device=device
        )
        for i, (e, s, t) in enumerate(group):
            embeds[i, : t - s] = e.item.embeds[s:t]
        slots = torch.tensor([e.slot for e, _, _ in group], device=device)
        starts = torch.tensor([s for _, s, _ in group], device=device)
        try:
            with torch.inference_mode():
                positions = starts[:, None] + torch.arange(q, device=device)[None, :]
                kv_len = int(starts.max().item()) + q
                self.cache.bind(slots, positions, kv_len)
                mask = attention_mask_4d(positions, kv_len, embeds.dtype)
                out = self.model.llm(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=0,
                )
                last = torch.tensor([t - s - 1 for _, s, t in group], device=device)
                logits = out.logits[torch.arange(len(group), device=device), last].float()
        except Exception as exc:
            self._fail([e for e, _, _ in group], f"prefill failed: {exc}")
            return
        done, rows = [], []
        for i, (e, _, t) in enumerate(group):
            e.prefilled = e.length = t
            if t >= e.prompt_len:
                e.item.embeds = None
                e.phase = Phase.DECODE
                done.append(e)
                rows.append(i)
        if done:
            self._sample(done, logits[rows])

    worker.Engine._prefill_one_chunk = _prefill_batched
if "deps" in _want:
    import fastapi.dependencies.utils as _fdu

    async def _inline(func, *args, **kwargs):
        """Sync dependencies (no I/O in xllm's) called on the event loop, no thread hop."""
        return func(*args, **kwargs)

    _fdu.run_in_threadpool = _inline
if "switch" in _want:
    import sys as _sys

    _sys.setswitchinterval(0.001)
