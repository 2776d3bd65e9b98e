"""Per-token Python loops as serving code writes them: the shared definitions of tests/ and bench/.

Both loops come from DeepSeek-V3.2 serving code (vLLM / SGLang style):

* :func:`read_indexer_cache`: the FP8 indexer-cache read through ``slot_mapping``.  The paged cache is a
  ``uint8`` tensor ``[num_pages, block_size * D + block_size * 4]``: per page, ``block_size`` rows of ``D``
  float8_e4m3fn bytes, then ``block_size`` float32 scales (the layout of DeepSeek's ``fp8_index`` cache).
  A negative slot is padding and leaves its output row zero.
* :func:`causal_window_offsets`: the causal window ``[ks, ke)`` of every query token of indexer prefill
  (vLLM's ``cu_seqlen_ks`` / ``cu_seqlen_ke``), one request after another.

``register_dsa_passes()`` finds these functions by scanning the loaded user modules (this file is user
code when the process runs from the repository, see ``dsa_inductor/loops/scan.py``) and lifts them for
Dynamo; eager calls run the loops below unchanged.  Import this module as ``serving_loops`` (the tests and
the bench put ``examples/`` on ``sys.path``).
"""

import torch


def read_indexer_cache(cache, slot_mapping, block_size: int, D: int):
    """Dequantized indexer keys of every token: float32 ``[len(slot_mapping), D]``.

    Args:
        cache: uint8 ``[num_pages, block_size * (D + 4)]`` paged FP8 cache (see the module docstring).
        slot_mapping: int32/int64 ``[T]`` slot of each token (``page * block_size + pos``); ``< 0`` = padding.
            May live on the CPU while ``cache`` is on a GPU (``.tolist()`` reads it either way).
        block_size: tokens per page.  D: head dim of the indexer keys.

    Raises:
        IndexError: a slot past the last page (from the indexing, as the loop does).
    """
    def scale_of(page, pos):
        base = block_size * D
        return cache[page, base + pos * 4:base + (pos + 1) * 4].view(torch.float32)

    out = torch.zeros(slot_mapping.shape[0], D, dtype=torch.float32, device=cache.device)
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        page, pos = divmod(slot, block_size)
        out[i] = cache[page, pos * D:(pos + 1) * D].view(torch.float8_e4m3fn).float() * scale_of(page, pos)
    return out


def causal_window_offsets(seq_lens, query_lens):
    """Per query token, the causal key window ``[ks, ke)`` into the concatenated keys of the batch.

    Args:
        seq_lens: int ``[B]`` key length of each request (context + new tokens).
        query_lens: int ``[B]`` new (query) tokens of each request, ``<= seq_lens``; 0 for a padded request.

    Returns:
        ``(ks, ke)``: int32 CPU tensors ``[sum(query_lens)]``.  For token ``t`` of request ``b``:
        ``ks = kv_start_b``, ``ke = kv_start_b + seq_len_b - q_len_b + t + 1``, with ``kv_start_b`` the sum of
        the previous requests' ``seq_lens``.
    """
    ks, ke = [], []
    kv_start = 0
    for seq_len, q_len in zip(seq_lens.tolist(), query_lens.tolist()):
        for t in range(q_len):
            ks.append(kv_start)
            ke.append(kv_start + seq_len - q_len + t + 1)
        kv_start += seq_len
    return torch.tensor(ks, dtype=torch.int32), torch.tensor(ke, dtype=torch.int32)


INDEX_SCALE = 128 ** -0.5  # DeepSeek-V3.2's indexer softmax scale (index head dim 128)


def indexer_scores_from_cache(q, weights, cache, slot_mapping, block_size: int, D: int):
    """The indexer's scores over keys read from the FP8 cache by the loop above: fp32 ``[1, S, T]``.

    ``q`` ``[1, S, H, D]`` (bf16, as the model computes it), ``weights`` ``[1, S, H]`` float; the score is
    transformers' ``DeepseekV32Indexer`` spelling.  Compiled, the loop is lifted, its read becomes
    ``dsa_inductor::gather_dequant``, and the index score's follow-up has the score kernel read the FP8 cache
    itself through the slots: no dequantized copy of the keys is made.
    """
    k = read_indexer_cache(cache, slot_mapping, block_size, D).unsqueeze(0)
    scores = torch.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * INDEX_SCALE)
    return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)


# callers: the substitution applies where compiled code *calls* a lifted function
def indexer_step(cache, slot_mapping, block_size: int, D: int):
    return read_indexer_cache(cache, slot_mapping, block_size, D) * 1.0


def offsets_step(seq_lens, query_lens):
    ks, ke = causal_window_offsets(seq_lens, query_lens)
    return ks, ke - ks


def _in_window(logits, seq_lens, query_lens):
    ks, ke = causal_window_offsets(seq_lens, query_lens)
    ks, ke = ks.to(logits.device), ke.to(logits.device)
    pos = torch.arange(logits.shape[-1], device=logits.device)
    return (pos >= ks[:, None]) & (pos < ke[:, None])


def prefill_topk_indices(logits, seq_lens, query_lens, k: int):
    """The indexer's prefill selection over the offsets: ``logits`` fp32 ``[sum(query_lens), sum(seq_lens)]``
    masked outside each token's ``[ks, ke)``, then the top ``min(k, N)`` key positions ``[T, k]`` (int64).
    Lifted, the offsets become tensors in the graph and the mask-then-topk rule takes ``ks`` / ``ke`` as
    ``row_starts`` / ``row_ends``."""
    keep = _in_window(logits, seq_lens, query_lens)
    return logits.masked_fill(~keep, float("-inf")).topk(min(k, logits.shape[-1]), dim=-1).indices


def prefill_window_softmax(logits, seq_lens, query_lens):
    """Softmax of each query token's ``[ks, ke)`` window of ``logits`` (as above), ``[T, N]``: the
    windowed-softmax rule's range form once the offsets are lifted."""
    keep = _in_window(logits, seq_lens, query_lens)
    return logits.masked_fill(~keep, float("-inf")).softmax(-1)
