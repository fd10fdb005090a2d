"""Batches without padding work for PPO's forwards: a block of rollout rows (left-padded prompts, right-padded
completions) cut to the columns it uses (`token_window`), or its rows packed side by side into fewer rows with a
block-diagonal causal mask (`pack_rows`). Either way every real token gets the numbers of the padded batch (the
same tokens, positions and attention keys), within float rounding; pipeline/rollout.py and pipeline/update.py use
them, docs/performance.md measures what they save. For SFT (`sft.packing`), `RowPackedCollator` batches the rows
TRL packs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def token_window(attention_mask: torch.Tensor, mask: torch.Tensor, context: int) -> tuple[int, int]:
    """Columns [start, end) of some rollout rows that hold a real token of any of them: the left padding all
    their prompts share and the columns after their longest completion are cut. Attention masks those columns
    and position ids count real tokens only, so a forward on the window gives the real tokens the same numbers.
    """
    prompt_len = attention_mask[:, :context].sum(1).max()
    longest = mask.sum(1).max().long()
    prompt_len, longest = torch.stack([prompt_len.long(), longest]).tolist()  # one host sync, not two
    return context - prompt_len, context + longest


@dataclass
class PackedRows:
    """Rows of a rollout window packed into fewer, longer rows without padding between them: each original row's
    real tokens sit side by side in a bin, a block-diagonal causal mask keeps every sequence to its own tokens
    and position ids restart with each. `index` [B, n] is where (in the flattened [bins · L] output) the
    outputs of each row's columns `ctx − 1 … ctx + n − 2` are: the positions that predict its n completion
    tokens (past a row's last real token it points at that token; the mask zeroes those)."""

    input_ids: torch.Tensor  # [bins, L]
    position_ids: torch.Tensor  # [bins, L]
    attention_mask: torch.Tensor  # [bins, 1, L, L] bool, True = attend (scaled_dot_product_attention's form)
    index: torch.Tensor  # [B, n]
    last: torch.Tensor  # [B] flat position of each row's last real token (where the reward model's score is read)

    def unpack(self, outputs: torch.Tensor) -> torch.Tensor:
        """[bins, L, ...] model outputs → [B, n, ...] at the completion-predicting positions."""
        return outputs.reshape(-1, *outputs.shape[2:])[self.index]


def can_pack(model: Any) -> bool:
    """Packing hands the model a custom 4D boolean mask, the form torch's SDPA attention takes as is."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa"


def pack_rows(ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, context: int,
              n: int) -> PackedRows:
    """`PackedRows` of left-padded prompt + right-padded completion rows (a `token_window`), bins of a length L
    chosen to minimize bins · L (first-fit, longest rows first). Every token's numbers are those of the padded
    rows: the same tokens, positions and keys in its attention."""
    B, T = ids.shape
    real = attention_mask.bool()
    cols = torch.arange(T, device=ids.device).expand(B, T)
    first = torch.where(real, cols, T).min(1).values
    last = torch.where(real, cols, -1).max(1).values
    first_l, last_l = torch.stack([first, last]).tolist()
    lengths = [b - a + 1 for a, b in zip(first_l, last_l, strict=True)]
    bins, offsets, L = _first_fit(lengths)
    dest, src, seq = [], [], []
    for i, (a, length) in enumerate(zip(first_l, lengths, strict=True)):
        start = bins[i] * L + offsets[i]
        dest.extend(range(start, start + length))
        src.extend(range(i * T + a, i * T + a + length))
        seq.extend([i] * length)
    size = (max(bins) + 1) * L
    dest_t = torch.tensor(dest, device=ids.device)
    src_t = torch.tensor(src, device=ids.device)
    flat_ids = ids.new_zeros(size)
    flat_ids[dest_t] = ids.reshape(-1)[src_t]
    flat_pos = position_ids.new_zeros(size)
    flat_pos[dest_t] = position_ids.reshape(-1)[src_t]
    seq_ids = torch.arange(size, device=ids.device) + B  # a padding slot is a sequence of its own
    seq_ids[dest_t] = torch.tensor(seq, device=ids.device)
    seq_ids = seq_ids.view(-1, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
    mask = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal
    index = [[bins[i] * L + offsets[i] + min(context - 1 + t, last_l[i]) - first_l[i] for t in range(n)]
             for i in range(B)]
    last = [bins[i] * L + offsets[i] + lengths[i] - 1 for i in range(B)]
    return PackedRows(flat_ids.view(-1, L), flat_pos.view(-1, L), mask.unsqueeze(1),
                      torch.tensor(index, device=ids.device), torch.tensor(last, device=ids.device))


def _first_fit(lengths: list[int]) -> tuple[list[int], list[int], int]:
    """(bin, offset in it) of each length and the bin length L: first-fit decreasing, for the L among a few
    multiples of the longest that leaves the fewest slots (bins · L); attention's cost grows with L, so ties
    go to the shorter."""
    longest, best = max(lengths), None
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for L in (longest, 2 * longest, 3 * longest, 4 * longest):
        fill: list[int] = []
        bins, offsets = [0] * len(lengths), [0] * len(lengths)
        for i in order:
            k = next((k for k, used in enumerate(fill) if used + lengths[i] <= L), len(fill))
            if k == len(fill):
                fill.append(0)
            bins[i], offsets[i] = k, fill[k]
            fill[k] += lengths[i]
        if best is None or len(fill) * L < best[0]:
            best = (len(fill) * L, bins, offsets, L)
    assert best is not None
    return best[1], best[2], best[3]


class RowPackedCollator:
    """SFT batches of TRL's packed rows (`sft.packing`), each packed row a row of the batch.

    TRL's best-fit-decreasing packing fills rows of up to `max_length` tokens with whole demonstrations and
    records their lengths (`seq_lengths`); its own collator then flattens the whole batch into a single row
    ("padding-free"), which suits flash attention's variable-length kernels but makes SDPA and eager attention
    build one dense [N, N] mask over N = batch_size × max_length tokens: quadratic in the batch (on the bench's
    tiny model on a CPU, TRL 1.12's packed SFT runs at a sixth of its unpacked speed: docs/performance.md). Here the packed rows stay rows: position ids restart
    at each demonstration and no attention mask is passed, so transformers builds each row's block-diagonal
    causal mask from the position ids (its packed-sequence detection); a demonstration attends to itself only,
    as unpacked, at B · max_length² cost. The first token of each demonstration gets no label (the token
    before it belongs to another one); right padding (position id 0, label -100) is a one-token sequence of its
    own. tests/test_sft_masking.py checks the losses against the unpacked rows.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, return_position_ids=True,
                                                     pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        del batch["attention_mask"]  # with a mask, transformers would not read the sequences from the positions
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch

    def real_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's tokens without its right padding (what an attention mask would sum to): the trailing run of
        pad tokens at position 0 of each row. A demonstration is at least two tokens, so none of its tokens is
        such a one-token sequence, even when the pad token is the EOS."""
        pad = (batch["position_ids"] == 0) & (batch["input_ids"] == self.inner.pad_token_id)
        trailing = pad.flip(-1).long().cumprod(-1).sum()
        return batch["input_ids"].numel() - trailing


def separates_packed_sequences(model: Any) -> bool:
    """Whether `model`'s attention keeps packed sequences apart given restarting position ids and no attention
    mask (what `RowPackedCollator` relies on): two short sequences packed in one row must get the logits each
    gets alone. transformers' own causal masks do this; an architecture that builds its mask another way would
    let packed demonstrations attend to each other without a word, so `sft.packing` checks first."""
    vocab = model.get_input_embeddings().num_embeddings
    device = model.get_input_embeddings().weight.device
    a, b = torch.arange(2, 7, device=device) % vocab, torch.arange(7, 10, device=device) % vocab
    row = torch.cat([a, b])[None]
    restart = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).to(device)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b[None], use_cache=False).logits[0].float()
            packed = model(input_ids=row, position_ids=restart, use_cache=False).logits[0, len(a):].float()
            # The same row read as one sequence: what attending across the boundary does to the same tokens.
            mixed = model(input_ids=row, use_cache=False).logits[0, len(a):].float()
    finally:
        model.train(was_training)
    off, leak = (packed - alone).abs().max().item(), (mixed - alone).abs().max().item()
    # Exact up to float32 rounding, or (bf16, quantized weights: packed and alone round differently) far
    # closer to the sequence alone than attending across the boundary puts it.
    return off <= 1e-3 * (1 + alone.abs().max().item()) or off < 0.1 * leak
