"""The built-in causal transformer language model: token and position embeddings, pre-LayerNorm
blocks of multi-head causal self-attention and a GELU MLP, a final LayerNorm and a vocabulary head.
Written with plain ops (no fused attention) so that every layer is twice differentiable, as
second-order meta-learning needs."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops._checks import require_int, require_number
from .ops.vocab_head import linear_cross_entropy


def dropout_rate(where: str, p) -> float:
    """``p`` as a float in [0, 1); TypeError / ValueError naming ``where``'s argument 'dropout' otherwise."""
    return require_number(where, "dropout", p, low=0, high=1, high_open=True)


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head) + causal mask) V over n_heads heads; x: [B, S, D] -> [B, S, D]."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        d_model, n_heads = require_int("d_model", d_model, 1), require_int("n_heads", n_heads, 1)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        dropout = dropout_rate(type(self).__name__, dropout)
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Causal softmax of the scaled scores; q, k: [B, heads, S, d_head] -> [B, heads, S, S]."""
        S = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(causal, float("-inf")).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.reshape(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        weights = self.dropout(self.attention_weights(q, k))
        return self.proj((weights @ v).transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """tokens [B, S] (int64) -> logits [B, S, vocab]; with ``targets`` [B, S], the mean next-token
    cross-entropy instead, computed by the chunked, twice-differentiable vocabulary head
    (metakernels.ops.linear_cross_entropy) without materialising the logits."""

    def __init__(self, vocab: int = 256, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 max_len: int = 64, dropout: float = 0.0):
        super().__init__()
        vocab, d_model = require_int("vocab", vocab, 1), require_int("d_model", d_model, 1)
        max_len, n_layers = require_int("max_len", max_len, 1), require_int("n_layers", n_layers, 0)
        dropout = dropout_rate(type(self).__name__, dropout)
        self.max_len = max_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> the final LayerNorm's output [B, S, d_model]."""
        _check_tokens(type(self).__name__, "tokens", tokens)
        S = tokens.shape[-1]
        if S > self.max_len:
            raise ValueError(f"sequence length {S} exceeds max_len={self.max_len}")
        x = self.tok(tokens) + self.pos(torch.arange(S, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:
            return linear_cross_entropy(self.features(tokens), self.head.weight, self.head.bias, targets)
        return self.head(self.features(tokens))


class TransformerClassifier(TransformerLM):
    """tokens [B, S] (int64, ``pad`` after the text) -> logits [B, n_classes]: the LM's trunk, the mean of
    its features over the non-pad positions, and a linear head of ``n_classes`` outputs."""

    def __init__(self, n_classes: int, vocab: int = 256, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 max_len: int = 64, dropout: float = 0.0, pad: int = 0):
        super().__init__(vocab, d_model, n_heads, n_layers, max_len, dropout)
        self.head = nn.Linear(d_model, require_int("n_classes", n_classes, 1))
        self.pad = require_int("pad", pad, 0, vocab - 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = (tokens != self.pad).unsqueeze(-1).to(self.head.weight.dtype)
        pooled = (self.features(tokens) * keep).sum(-2) / keep.sum(-2).clamp_min(1.0)
        return self.head(pooled)


def _check_tokens(where: str, name: str, tokens) -> None:
    """TypeError / ValueError naming ``name`` unless ``tokens`` is an integer tensor [B, S]."""
    _check_integer(where, name, tokens)
    if tokens.dim() != 2:
        raise ValueError(f"{where}: {name} must have shape [batch, sequence], got {list(tokens.shape)}")


def _check_next_token_batch(where: str, tokens) -> None:
    """TypeError / ValueError unless ``tokens`` is an integer tensor [..., S+1] with S >= 1 (something to predict)."""
    _check_integer(where, "the batch's tokens", tokens)
    if tokens.dim() == 0 or tokens.shape[-1] < 2:
        raise ValueError(f"{where}: the batch's tokens must hold sequences of at least 2 tokens (the inputs and "
                         f"their next-token targets), got shape {list(tokens.shape)}")


def _check_integer(where: str, name: str, tokens) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype.is_complex \
            or tokens.dtype == torch.bool:
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"{where}: {name} must be an integer tensor of token ids, got {got}")


def lm_loss(f, batch) -> torch.Tensor:
    """Next-token cross-entropy of one task's batch of sequences [B, S+1]: predict tokens 1..S."""
    tokens = batch if isinstance(batch, torch.Tensor) else batch[0]
    _check_next_token_batch("lm_loss", tokens)
    logits = f(tokens[..., :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[..., 1:].reshape(-1))


def lm_loss_chunked_head(f, batch) -> torch.Tensor:
    """lm_loss through the chunked vocabulary head: ``f(tokens, targets=...)`` of a TransformerLM (or any
    model whose forward takes ``targets`` and returns the mean cross-entropy)."""
    tokens = batch if isinstance(batch, torch.Tensor) else batch[0]
    _check_next_token_batch("lm_loss_chunked_head", tokens)
    return f(tokens[..., :-1], targets=tokens[..., 1:])


def classification_loss(f, batch) -> torch.Tensor:
    """Cross-entropy of one task's (tokens [B, S], labels [B])."""
    tokens, labels = batch
    return F.cross_entropy(f(tokens), labels)


def classification_accuracy(f, batch) -> torch.Tensor:
    """Fraction of one task's (tokens [B, S], labels [B]) classified correctly."""
    tokens, labels = batch
    return (f(tokens).argmax(-1) == labels).to(torch.float32).mean()
