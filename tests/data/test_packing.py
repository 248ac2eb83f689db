"""Packing: documents stay whole in one row, start block-aligned, padding is unsupervised, tokens conserved."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from flare.data import (Document, PackedBatch, PackedDataset, Sampler, pack_documents, parse_row, render,
                        write_jsonl)
from flare.data.packing import best_fit_decreasing, padded_length

PAD = 0


def random_docs(n: int, seed: int, max_len: int = 40) -> list[Document]:
    """Documents whose first token (1000 + index) identifies them; a prompt part then a supervised part."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.randint(2, max_len)
        prompt = rng.randint(1, length - 1)
        ids = [1000 + i] + [rng.randint(1, 50) for _ in range(length - 1)]
        docs.append(Document(ids, [False] * prompt + [True] * (length - prompt)))
    return docs


def split_runs(rows: PackedBatch, b: int) -> list[tuple[int, list[int], list[bool]]]:
    """(start, ids, mask) of each doc-id run of row b; checks the runs are numbered 0, 1, 2, ... in order."""
    doc = rows.doc_ids[b].tolist()
    assert doc[0] == 0 and all(0 <= y - x <= 1 for x, y in zip(doc, doc[1:])), doc
    runs, start = [], 0
    for i in range(1, len(doc) + 1):
        if i == len(doc) or doc[i] != doc[start]:
            runs.append((start, rows.input_ids[b, start:i].tolist(), rows.loss_mask[b, start:i].tolist()))
            start = i
    return runs


def check_packing(rows: PackedBatch, docs: list[Document], seq_len: int, block_size: int) -> None:
    """Every (possibly truncated) doc appears exactly once, whole, block-aligned, padded without labels."""
    by_key = {d.input_ids[0]: d for d in docs}
    seen = Counter()
    assert rows.input_ids.shape[1] == seq_len and rows.input_ids.dtype == torch.long
    for b in range(rows.input_ids.shape[0]):
        for start, ids, mask in split_runs(rows, b):
            assert start % block_size == 0
            if ids[0] == PAD:  # the row's trailing padding: its own doc id, no label, only at the end
                assert set(ids) == {PAD} and not any(mask) and start + len(ids) == seq_len
                continue
            d = by_key[ids[0]]
            n = len(d)
            assert len(ids) == padded_length(n, block_size)
            assert ids[:n] == d.input_ids and mask[:n] == d.loss_mask
            assert set(ids[n:]) <= {PAD} and not any(mask[n:])
            seen[ids[0]] += 1
    assert seen == Counter(by_key.keys())


@pytest.mark.parametrize("block_size,seq_len", [(3, 48), (4, 64), (1, 40)])
def test_documents_whole_aligned_and_conserved(block_size, seq_len):
    docs = random_docs(60, seed=block_size)
    stats = Counter()
    rows = pack_documents(docs, seq_len, block_size, PAD, stats=stats)
    check_packing(rows, docs, seq_len, block_size)
    real = (rows.input_ids != PAD).sum().item()
    assert real == stats["tokens"] == sum(len(d) for d in docs)  # docs never contain PAD
    assert rows.loss_mask.sum().item() == sum(d.num_supervised for d in docs) == stats["supervised_tokens"]
    assert stats["pad_tokens"] == rows.input_ids.numel() - real
    # Best fit decreasing leaves little room: the row count is near the lower bound.
    need = sum(padded_length(len(d), block_size) for d in docs)
    assert rows.input_ids.shape[0] <= -(-need // seq_len) + 2


def test_long_documents_truncated_or_dropped_and_counted():
    docs = random_docs(20, seed=5, max_len=24) + [Document([2000] + [7] * 49, [False] * 10 + [True] * 40),
                                                  Document([3000] + [7] * 49, [False] * 45 + [True] * 5)]
    stats = Counter()
    rows = pack_documents(docs, 24, 3, PAD, stats=stats)
    # The second long document has no label left in its first 24 tokens: dropped, not packed label-free.
    kept = docs[:20] + [Document(docs[20].input_ids[:24], docs[20].loss_mask[:24])]
    check_packing(rows, kept, 24, 3)
    assert (stats["truncated"], stats["truncated_tokens"], stats["dropped_no_labels"]) == (2, 52, 1)
    assert stats["tokens"] == sum(len(d) for d in docs) - 52 - 24

    stats = Counter()
    rows = pack_documents(docs, 24, 3, PAD, overflow="drop", stats=stats)
    check_packing(rows, docs[:20], 24, 3)
    assert stats["dropped_too_long"] == 2 and stats["truncated"] == 0


def test_bad_arguments_and_empty_input():
    with pytest.raises(ValueError, match="multiple"):
        pack_documents([], 10, 3, PAD)
    with pytest.raises(ValueError, match="overflow"):
        pack_documents([], 12, 3, PAD, overflow="wrap")
    assert pack_documents([], 12, 3, PAD).input_ids.shape == (0, 12)


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    sizes = [rng.randint(1, 10) for _ in range(200)]
    bins = best_fit_decreasing(sizes, 10)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(sizes[i] for i in b) <= 10 for b in bins)
    assert len(best_fit_decreasing([3, 3, 3, 3, 6, 6], 9)) == 3  # optimal here


CHATS = [{"prompt": "What is 1+2?", "response": "3"},
         {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"},
                       {"role": "assistant", "content": "ok", "reasoning_content": "think"}]},
         {"prompt": "A longer question about nothing in particular?", "response": "A longer answer."}]


def test_labels_only_on_assistant_tokens_after_packing(char_tok):
    """Decoding each supervised run of each packed document gives exactly the assistant bodies."""
    convs = [parse_row(c) for c in CHATS] * 4
    docs = [render(c, char_tok) for c in convs]
    rows = pack_documents(docs, 96, 3, char_tok.pad_id)
    expected = Counter(4 * ["<think>\n\n</think>\n\n3<|im_end|>", "hello<|im_end|>",
                            "<think>\nthink\n</think>\n\nok<|im_end|>",
                            "<think>\n\n</think>\n\nA longer answer.<|im_end|>"])
    got = Counter()
    for b in range(rows.input_ids.shape[0]):
        for start, ids, mask in split_runs(rows, b):
            assert start % 3 == 0
            run = []
            for t, m in zip(ids + [None], mask + [False]):
                if m:
                    run.append(t)
                elif run:
                    got[char_tok.decode(run, skip_special_tokens=False)] += 1
                    run = []
    assert got == expected
    # The objective never trains across a document boundary or onto padding.
    ok = rows.next_target_ok
    assert not (ok & (rows.input_ids.roll(-1, 1) == char_tok.pad_id)).any()


def test_sources_packed_separately_never_mix(tmp_path, char_tok):
    """Two sources with disjoint letters (upper case: the ChatML role names are lower case): every sampled row
    holds tokens of one source only."""
    write_jsonl([{"prompt": "A" * k, "response": "B" * (k % 5 + 1)} for k in range(1, 30)], tmp_path / "ab.jsonl")
    write_jsonl([{"prompt": "X" * k, "response": "Y" * (k % 7 + 1)} for k in range(1, 30)], tmp_path / "xy.jsonl")
    ab = PackedDataset.from_jsonl(tmp_path / "ab.jsonl", char_tok, seq_len=60, block_size=3)
    xy = PackedDataset.from_jsonl(tmp_path / "xy.jsonl", char_tok, seq_len=60, block_size=3)
    assert (ab.name, xy.name) == ("ab", "xy") and ab.stats["documents"] == 29
    assert (ab.stats["lines"], ab.stats["rows"]) == (29, len(ab))  # counters of each stage stay apart
    marks = {n: {char_tok.token_id(c) for c in cs} for n, cs in (("ab", "AB"), ("xy", "XY"))}
    sampler = Sampler({"ab": ab, "xy": xy}, batch_size=4, weights={"ab": 1, "xy": 1}, seed=0)
    for _ in range(10):
        batch = next(sampler)
        for row, source in zip(batch.input_ids.tolist(), sampler.last_sources):
            other = marks["xy" if source == "ab" else "ab"]
            assert set(row) & marks[source] and not set(row) & other


def test_dataset_save_load_round_trip(tmp_path):
    rows = pack_documents(random_docs(30, seed=1), 48, 3, PAD)
    ds = PackedDataset(rows, "src", Counter(rows=7))
    ds.save(tmp_path / "src.pt")
    back = PackedDataset.load(tmp_path / "src.pt")
    assert back.name == "src" and back.stats["rows"] == 7 and len(back) == len(ds)
    a, b = ds[[0, 2]], back[[0, 2]]
    assert all(torch.equal(x, y) for x, y in ((a.input_ids, b.input_ids), (a.loss_mask, b.loss_mask),
                                              (a.doc_ids, b.doc_ids)))
    assert a.input_ids.dtype == torch.long and torch.equal(a.input_ids, rows.input_ids[[0, 2]])
