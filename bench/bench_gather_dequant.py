"""Gather-dequant of the DSA indexer's FP8 K cache (D = 128, fp32 scale per token), as eager code reads it.

* decode context read: 4,194,304 slots of a ``[N, 128]`` uint8 cache + ``[N]`` fp32 scales (DeepSeek-V3.2
  reference layout), padding slots -1, fp32 out.  Minimum traffic: 128 + 4 bytes read and 512 bytes written
  per slot, plus the 8-byte slot index.  Two slot orders:
  - a random permutation of the cache (the worst case: every row and every scale a random 128 / 4-byte read);
  - pages of 64 slots in random page order, as a paged cache's decode context read gathers them (vLLM's
    ``cp_gather_indexer_k_quant_cache``: ``slot = block_table[req, t // 64] * 64 + t % 64``).
* paged prefill read: 8192 tokens of one sequence from the vLLM inline layout (pages of 64 tokens: 64 x 128
  FP8 bytes, then 64 fp32 scales), addressed through a block table.

    python bench/run.py --only gather_dequant
"""

from __future__ import annotations

import torch

from dsa_inductor.lowerings.gather_dequant import gather_dequant_reference
from harness import Case

FP8 = torch.float8_e4m3fn
BLOCK = 64
D = 128


def decode_read(k_cache, k_scale, slots):
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    return torch.where((slots < 0).unsqueeze(-1), 0.0, k)


def paged_read(kv_cache, block_table, positions):
    pages = kv_cache.view(kv_cache.shape[0], -1)
    values = pages[:, : BLOCK * D].view(-1, BLOCK, D)
    scales = pages[:, BLOCK * D:].view(torch.float32)
    page = block_table[positions // BLOCK]
    pos = positions % BLOCK
    return values.view(FP8)[page, pos].float() * scales[page, pos].unsqueeze(-1)


def paged_slots(n, generator, device, block=BLOCK):
    """``n`` slots in pages of ``block`` consecutive slots, the pages in random order: a paged cache's decode
    context read (``slot = block_table[req, t // block] * block + t % block``)."""
    pages = torch.randperm(n // block, device=device, generator=generator)
    return (pages[:, None] * block + torch.arange(block, device=device)).reshape(-1)


def _check_decode(args, eager, ours):
    k_cache, k_scale, slots = args
    ref = gather_dequant_reference(k_cache, k_scale.unsqueeze(-1), slots, zero_negative=True)
    for name, out in (("eager", eager), ("ours", ours)):
        if not torch.equal(out, ref):
            return f"{name} differs from the reference dequant"
    return None


def _check_paged(args, eager, ours):
    return None if torch.equal(eager, ours) else "differs from eager"


def cases(device="cuda"):
    n = 4_194_304

    def decode_inputs(paged=False):
        g = torch.Generator(device=device).manual_seed(0)
        k_cache = torch.randint(0, 256, (n, D), dtype=torch.uint8, device=device, generator=g)
        k_cache[(k_cache & 0x7F) == 0x7F] = 0  # no NaN bytes: the check compares with torch.equal
        k_scale = torch.rand(n, device=device, generator=g)
        slots = paged_slots(n, g, device) if paged else torch.randperm(n, device=device, generator=g)
        slots[torch.rand(n, device=device, generator=g) < 0.01] = -1
        return k_cache, k_scale, slots

    def paged_inputs(tokens=8192, num_pages=4096):
        g = torch.Generator(device=device).manual_seed(1)
        cache = torch.randint(0, 256, (num_pages, BLOCK * (D + 4)), dtype=torch.uint8, device=device, generator=g)
        cache[:, : BLOCK * D][(cache[:, : BLOCK * D] & 0x7F) == 0x7F] = 0
        scales = torch.rand(num_pages, BLOCK, device=device, generator=g)
        cache[:, BLOCK * D:] = scales.view(torch.uint8)
        table = torch.randperm(num_pages, device=device, generator=g)[: tokens // BLOCK]
        return cache.view(num_pages, BLOCK, D + 4), table, torch.arange(tokens, device=device)

    per_slot = D + 4 + D * 4 + 8
    return [
        Case("gather_dequant (FP8 + fp32 scale, decode read)", f"{n} slots, D={D}, fp32 out", decode_read,
             decode_inputs, min_bytes=n * per_slot, check=_check_decode),
        Case("gather_dequant (FP8 + fp32 scale, decode read, pages of 64)", f"{n} slots, D={D}, fp32 out",
             decode_read, lambda: decode_inputs(paged=True), min_bytes=n * per_slot, check=_check_decode),
        Case("gather_dequant (vLLM inline paged, block table)", f"8192 tokens, pages of {BLOCK}, D={D}",
             paged_read, paged_inputs, min_bytes=8192 * (D + 4 + D * 4 + 8), check=_check_paged),
    ]
