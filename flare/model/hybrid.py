"""FlareModel: the decoder stack (hybrid GDN + attention, or dense attention) and the LM head.

Module names mirror the Hugging Face layout (``model.layers.{i}.self_attn`` / ``linear_attn``, ``lm_head``) so
that the checkpoint key map is the identity for Qwen3.5 and Llama-style checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flare.config import FULL_ATTENTION, ModelConfig
from flare.model.attention import Attention
from flare.model.cache import CommitRecord, ModelCache
from flare.model.context import ForwardContext, Layout, TwoStream
from flare.model.gated_deltanet import GatedDeltaNet
from flare.model.layers import RMSNorm, SwiGLU
from flare.model.noisy_blocks import NoisyBlocks
from flare.model.packed_linear import linear_path


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_types[layer_idx]
        if self.kind == FULL_ATTENTION:
            self.self_attn = Attention(config, layer_idx)
        else:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        eps, zc = config.rms_norm_eps, config.norm_zero_centered
        self.input_layernorm = RMSNorm(config.hidden_size, eps, zc)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, zc)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        mixer = self.self_attn if self.kind == FULL_ATTENTION else self.linear_attn
        x = x + mixer(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_zero_centered)


class FlareModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Recompute each decoder layer in the backward pass instead of keeping its activations.
        self.gradient_checkpointing = False
        # What AR-Trust's pacers learned decoding with this model, per mode's options (flare.decoding.pacer):
        # a later batch starts from it instead of trying every kind of round again.
        self.pacing: dict = {}
        # The torch.compile backend decoding's forwards last ran under (flare.engine.compiled; "" for eager).
        self.compiled_with = ""
        # How many of decoding's forwards compiled a graph (flare.engine.compiled): a pacer does not time the round
        # of one, whose seconds are the compiler's.
        self.compiles = 0

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "FlareModel":
        """Fresh weights for training from scratch: N(0, std) projections and embeddings, identity norms,
        Gated DeltaNet decays spread over A in [1, 16] (as Qwen3.5's initialisation)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
            elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
                p.fill_(1.0)
            elif "norm" in name:
                p.fill_(0.0 if self.config.norm_zero_centered else 1.0)
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, capacity: int = 128) -> ModelCache:
        return ModelCache.empty(self.config, batch_size, device=self.device, dtype=self.dtype, capacity=capacity)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: at least one token is needed")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = hi if hi >= self.config.vocab_size else lo
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        cache: ModelCache | None = None,
        valid: torch.Tensor | None = None,
        layout: Layout = None,
        record: CommitRecord | None = None,
        context: ForwardContext | None = None,
        advance: bool = True,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, E].

        Plain rows: with a cache they continue each sequence and are committed; ``valid`` [B, T] marks right
        padding (False) in a ragged batch, computed but ignored. ``layout`` selects the packed-training,
        two-stream or read-only inference-rows forward (see ``flare.model.context``). ``context``: the forward's
        context built beforehand by ``context`` from the same arguments (what a dry run does outside its fake
        tensors), instead of building it here. ``advance=False``: a causal forward's cache is written but its
        lengths are left for ``advance_cache`` (what a compiled forward does after its graph).
        """
        ctx = context or self.context(input_ids, cache=cache, valid=valid, layout=layout, record=record)
        if ctx.folded:  # a context run again (a replayed graph's, its mask rewritten in place) folds it afresh
            ctx.folded.clear()
        x = self.model.embed_tokens(input_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            x = checkpoint(layer, x, ctx, use_reentrant=False) if recompute else layer(x, ctx)
        if advance:
            self.advance_cache(ctx, input_ids.shape[1])
        return self.model.norm(x)

    @staticmethod
    def advance_cache(ctx: ForwardContext, T: int) -> None:
        """Count a causal forward's T rows (its valid ones: ``n_new``) as committed in its cache."""
        if ctx.mode == "causal" and ctx.cache is not None:
            if ctx.n_new is None:
                ctx.cache.advance(T, T, uniform=True)
            else:
                ctx.cache.advance(ctx.n_new, T)

    def context(
        self,
        input_ids: torch.Tensor,
        *,
        cache: ModelCache | None = None,
        valid: torch.Tensor | None = None,
        layout: Layout = None,
        record: CommitRecord | None = None,
    ) -> ForwardContext:
        """What a forward over ``input_ids`` needs besides its weights (positions, masks, segments, cache slots)."""
        ctx = ForwardContext.build(
            input_ids, rotary_dim=self.config.rotary_dim, head_dim=self.config.head_dim,
            rope_theta=self.config.rope_theta,
            dtype=self.dtype, cache=cache, valid_BT=valid, layout=layout, record=record,
        )
        if ctx.tree is not None and any(t != FULL_ATTENTION for t in self.config.layer_types):
            # The short conv's windows, made here rather than by the first GDN layer: a compiled forward then
            # finds them made (made inside it, the next call's guards saw a changed memo and recompiled).
            ctx.tree.windows(self.config.linear_conv_kernel_dim)
        return ctx

    @staticmethod
    def two_stream_input(x0: torch.Tensor, xt: torch.Tensor, doc_ids: torch.Tensor, block_size: int,
                         clean_readout: str = "token", noisy: NoisyBlocks | None = None,
                         ) -> tuple[torch.Tensor, TwoStream]:
        """The FLARE training row ``[x0 ; xt_1 ; ... ; xt_V]`` [B, (1 + V) L] and its layout; with ``noisy``,
        ``[x0 ; the kept blocks of xt]`` [B, L + noisy.rows] (``flare.model.noisy_blocks``)."""
        if xt.ndim != 3 or xt.shape[0] != x0.shape[0] or xt.shape[2] != x0.shape[1]:
            raise ValueError(f"xt must be [batch, views, L] matching x0 {tuple(x0.shape)}, got {tuple(xt.shape)}")
        B, V, L = xt.shape
        layout = TwoStream(doc_ids, block_size, V, clean_readout, noisy)
        if noisy is not None:
            return torch.cat([x0, noisy.select(xt)], dim=1), layout
        return torch.cat([x0, xt.reshape(B, V * L)], dim=1), layout

    def two_stream_hidden(
        self, x0: torch.Tensor, xt: torch.Tensor, doc_ids: torch.Tensor, block_size: int,
        clean_readout: str = "token", context: ForwardContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The FLARE training forward: clean rows x0 [B, L] and V noisy views xt [B, V, L] in one pass.

        Returns (clean hidden [B, L, E], noisy hidden [B, V, L, E]).
        """
        ids, layout = self.two_stream_input(x0, xt, doc_ids, block_size, clean_readout)
        B, V, L = xt.shape
        h = self.hidden_states(ids, layout=layout, context=context)
        return h[:, :L], h[:, L:].reshape(B, V, L, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits. The [MASK] row, an input-only token, is never predicted: its logit is -inf."""
        logits = self.lm_head(hidden)
        mask_id = self.config.mask_token_id
        if mask_id is not None:
            # In place: a copy would be another pass over [rows, vocabulary] (the head's backward needs only its
            # input and weight, so autograd allows it).
            logits[..., mask_id] = float("-inf")
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: ModelCache | None = None,
        valid: torch.Tensor | None = None,
        layout: Layout = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for every row. Checks the ids (a host sync): decoders call ``hidden_states``."""
        self.check_ids(input_ids)
        return self.logits(self.hidden_states(input_ids, cache=cache, valid=valid, layout=layout))

    def kernel_paths(self) -> dict[str, str]:
        """Which op form each Gated DeltaNet layer ran last, the attention path the last forward took (``sdpa``,
        ``sdpa_folded`` or ``flex``: ``flare.ops.attention.attention_path``), the linears' path
        (``flare.model.packed_linear``) and, where decoding's forwards ran compiled, the backend
        (``flare.engine.compiled``)."""
        attention = [layer.self_attn.last_path for layer in self.model.layers if layer.kind == FULL_ATTENTION]
        paths = {"attention": next((p for p in attention if p), "sdpa"), "linear": linear_path(self)}
        if self.compiled_with:
            paths["compile"] = self.compiled_with
        for i, layer in enumerate(self.model.layers):
            if layer.kind != FULL_ATTENTION and layer.linear_attn.last_path:
                paths[f"gdn.{i}"] = layer.linear_attn.last_path
        return paths
