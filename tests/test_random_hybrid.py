"""flare.testing.checkpoints.save_random_hybrid: a checkpoint written without transformers that transformers
loads as the same model (the real-sized benchmark model, here at a tiny size)."""

from __future__ import annotations

import json

import torch

import flare
from flare.testing.checkpoints import REAL_QWEN3_5, save_random_hybrid

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16)


def test_the_real_shape_is_qwen3_5_0_8b_sized():
    with torch.device("meta"):
        from flare.config import ModelConfig
        from flare.model import FlareModel

        model = FlareModel(ModelConfig.new_hybrid(**REAL_QWEN3_5))
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e9 < n < 0.8e9
    assert model.config.layer_types.count("full_attention") * 4 == model.config.num_hidden_layers
    assert model.config.tie_word_embeddings and model.config.attn_output_gate


def test_flare_and_transformers_load_the_same_random_hybrid(tmp_path):
    import transformers

    path = save_random_hybrid(tmp_path, seed=3, dtype=torch.float32, std=0.1, mask_token_id=127, **TINY)
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "qwen3_5_text" and raw["flare"]["mask_token_id"] == 127
    fm = flare.load_model(path)
    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in fm.parameters()) == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 127, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = fm.lm_head(fm.hidden_states(ids))
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    again = save_random_hybrid(tmp_path / "again", seed=3, dtype=torch.float32, std=0.1, **TINY)
    assert torch.equal(flare.load_model(again).model.embed_tokens.weight, fm.model.embed_tokens.weight)
