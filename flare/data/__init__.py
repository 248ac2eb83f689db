"""Training data: chat rendering, label masks, packing into block-aligned rows, mixtures, resumable sampling.

From a chat JSONL file to batches for the objective::

    tok = ChatTokenizer.from_dir(model_dir)
    ds = PackedDataset.from_jsonl("chat.jsonl", tok, seq_len=4096, block_size=3)
    for batch in Sampler(ds, batch_size=8, seed=0, rank=rank, world_size=world_size): ...  # PackedBatch

Several sources, each packed separately, mixed by weight: ``Sampler({"math": ds_m, "chat": ds_c}, 8,
weights={"math": 0.4, "chat": 0.6})``. Resume with ``sampler.load_state_dict(saved)``.

Public API:

- ``ChatTokenizer.from_dir(path)``: tokenizer.json + chat template + special tokens of a directory.
- ``save_char_tokenizer(path, alphabet)``: a character-level ChatML tokenizer directory for toy tasks.
- ``find_mask_slot(tokenizer, model_vocab_size) -> MaskSlot``: the [MASK] row (named, spare, or to be added).
- ``parse_row(row) -> Conversation`` (raises ``RowRejected`` / ``SchemaError`` with a reason).
- ``render(conversation, tokenizer) -> Document``; ``render_text(conversation, template)``.
- ``read_jsonl(path, on_error=)``, ``write_jsonl(rows, path)``, ``load_chat_jsonl(path, on_error=, dedup=)``,
  ``load_documents(path, tokenizer, ...)``.
- ``Deduplicator``: exact dedup by sha256 of whitespace/NFC-normalised messages (case-sensitive).
- ``pack_documents(docs, seq_len, block_size, pad_id) -> PackedBatch`` (all rows of one source).
- ``PackedDataset`` (one source's rows; ``from_jsonl``, ``save``, ``load``), ``Mixture``, ``Sampler``.

Every drop is counted by reason in a ``collections.Counter`` (``PackedDataset.stats``).
"""

from flare.data.batch import PackedBatch
from flare.data.char_tokenizer import MASK_TOKEN, save_char_tokenizer
from flare.data.chat import render, render_text
from flare.data.conversation import Conversation, Message, RowRejected, SchemaError, parse_row
from flare.data.dataset import PackedDataset
from flare.data.dedup import Deduplicator
from flare.data.document import Document
from flare.data.jsonl import read_jsonl, write_jsonl
from flare.data.mask_token import MaskSlot, find_mask_slot
from flare.data.mixture import Mixture
from flare.data.packing import pack_documents
from flare.data.sampler import Sampler
from flare.data.sources import load_chat_jsonl, load_documents, tokenize_conversations
from flare.data.template import CHATML_TEMPLATE, TemplateError
from flare.data.tokenizers import ChatTokenizer

__all__ = [
    "CHATML_TEMPLATE", "MASK_TOKEN", "ChatTokenizer", "Conversation", "Deduplicator", "Document", "MaskSlot",
    "Message", "Mixture", "PackedBatch", "PackedDataset", "RowRejected", "Sampler", "SchemaError",
    "TemplateError", "find_mask_slot", "load_chat_jsonl", "load_documents", "pack_documents", "parse_row",
    "read_jsonl", "render", "render_text", "save_char_tokenizer", "tokenize_conversations", "write_jsonl",
]
