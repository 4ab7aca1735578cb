"""The Splinter network (Ram et al., 2021) in plain PyTorch: a post-LN BERT encoder plus the QASS head.

Classes go bottom-up: embeddings and block -> encoder -> QASS head -> task models. Tensors are
(B, S, H) = (batch, sequence, hidden); Q is the number of question positions per row.

Module names are short (`qkv`, `ln_attn`, ...); transformers' checkpoint names live in exactly one place,
the key map in `splinter/checkpoint.py`. We chose that over mirroring the checkpoint tree because the
fused query/key/value projection (one GEMM instead of three) cannot mirror three separate checkpoint
tensors anyway, so a map is needed regardless, and one map is simpler than a map plus mirrored names.

One file over ~500 lines on purpose: the whole network, its input checks and its losses read best
bottom-up in one place (the inference precision helpers live in `splinter/precision.py`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splinter.config import SplinterConfig
from splinter.inputs import validate_inputs

# The QASS transforms use torch's default LayerNorm eps and erf-GELU regardless of the config: that is how
# the released checkpoints were trained (transformers hard-codes the same).
QASS_LAYER_NORM_EPS = 1e-5


@dataclass
class SplinterOutput:
    """What a forward pass returns; fields a model does not compute stay None."""

    last_hidden_state: Tensor
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    loss: Tensor | None = None


def _activation(name: str) -> Any:
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        # All three are the tanh approximation 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))); a partial, not a
        # lambda, so a whole model still pickles.
        return functools.partial(F.gelu, approximate="tanh")
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"unsupported hidden_act {name!r}")


def init_weights(module: nn.Module, std: float) -> None:
    """transformers' scheme: Linear/Embedding ~ N(0, std), zero biases and pad row, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None and m.weight.device.type != "meta":
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# What torch's own layers (Linear, Embedding, LayerNorm) and init_weights initialise parameters with.
_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
_INIT_LOCK = threading.Lock()


def _leave_as_is(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return tensor


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Modules built inside get uninitialised parameters (torch.empty): for a model whose every weight is
    about to be overwritten from a checkpoint.

    The random init of a base-size model costs seconds of CPU, and building on the "meta" device instead
    costs ~2 s once per process (a meta tensor's normal_ imports torch's compiler stack): both are on the
    critical path of every model actor's start. torch.nn.init is shared by the whole process, so builds
    under this context take turns (a lock), and the functions are restored however the build ends.
    """
    with _INIT_LOCK:
        saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
        try:
            for name in _INIT_FUNCTIONS:
                setattr(nn.init, name, _leave_as_is)
            yield
        finally:
            for name, function in saved.items():
                setattr(nn.init, name, function)


# ------------------------------------------------------------------------------------------------- encoder
class Block(nn.Module):
    """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: SplinterConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attn_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(h, 3 * h)  # fused query|key|value: one GEMM instead of three
        self.attn_out = nn.Linear(h, h)
        self.ln_attn = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ff_in = nn.Linear(h, config.intermediate_size)
        self.ff_out = nn.Linear(config.intermediate_size, h)
        self.ln_ff = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.act = _activation(config.hidden_act)

    def forward(self, x: Tensor, attn_bias: Tensor | None) -> Tensor:
        b, s, h = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.n_head, self.head_dim)  # (B, S, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, S, hd), views, no copy
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, nh, S, hd)
        y = y.transpose(1, 2).reshape(b, s, h)  # (B, S, H)
        x = self.ln_attn(x + self.drop(self.attn_out(y)))
        return self.ln_ff(x + self.drop(self.ff_out(self.act(self.ff_in(x)))))


class _Base(nn.Module):
    """What every Splinter network shares. Reading and writing checkpoint files is not the network's
    business: `splinter.checkpoint` builds these classes from files (it depends on this module, never
    the reverse)."""

    config: SplinterConfig
    has_qass: bool = False

    def init_weights(self) -> None:
        init_weights(self, self.config.initializer_range)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class SplinterModel(_Base):
    """The encoder: embeddings + post-LN transformer layers; returns last_hidden_state (B, S, H)."""

    # Input checks cost one small host sync per call: callers that check their inputs once at the
    # boundary (e.g. on the host, from numpy) switch them off for the hot loop; under torch.compile they
    # are skipped (a host sync would break the graph).
    check_inputs: bool = True

    def __init__(self, config: SplinterConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.wpe = nn.Embedding(config.max_position_embeddings, h)
        self.wtt = nn.Embedding(config.type_vocab_size, h)
        self.ln_emb = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        init_weights(self, config.initializer_range)

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """The forward pass without input checks; returns (B, S, H)."""
        s = input_ids.shape[1]
        # Without explicit ids, add the type-0 row and the first S position rows by broadcasting
        # instead of gathering (B, S, H) copies.
        tt = self.wtt.weight[0] if token_type_ids is None else self.wtt(token_type_ids)  # (H) | (B, S, H)
        pos = self.wpe.weight[:s] if position_ids is None else self.wpe(position_ids)  # (S, H) | (B, S, H)
        x = self.drop(self.ln_emb(self.wte(input_ids) + tt + pos))  # (B, S, H)
        attn_bias = None  # no mask: SDPA's fast path, nothing (B, h, S, S) is ever materialised
        if attention_mask is not None:
            # Additive bias (B, 1, 1, S) broadcast over heads and queries. An additive finfo.min (rather
            # than a boolean mask) keeps an all-padding row finite, as in transformers. Under autocast the
            # attention runs in the autocast dtype: fp32's min would round to -inf there.
            dtype = x.dtype
            if torch.is_autocast_enabled(x.device.type):
                dtype = torch.get_autocast_dtype(x.device.type)
            keep = attention_mask.to(dtype=dtype)
            attn_bias = ((1.0 - keep) * torch.finfo(dtype).min)[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, attn_bias)
        return x

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> SplinterOutput:
        if self.check_inputs and not torch.compiler.is_compiling():
            validate_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids)
        return SplinterOutput(self.encode(input_ids, attention_mask, token_type_ids, position_ids))


# ------------------------------------------------------------------------------------------------ QASS head
class FullyConnected(nn.Module):
    """LayerNorm(gelu(Linear(x))) with torch's default eps (see QASS_LAYER_NORM_EPS)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.ln = nn.LayerNorm(hidden, eps=QASS_LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(F.gelu(self.dense(x)))


class QASSHead(nn.Module):
    """Question-aware span selection: logits[b, q, s] = qs[b, q] . W . x_s[b, s] (start; end likewise)."""

    def __init__(self, config: SplinterConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.q_start = FullyConnected(h)
        self.q_end = FullyConnected(h)
        self.start = FullyConnected(h)
        self.end = FullyConnected(h)
        self.start_bilinear = nn.Linear(h, h, bias=False)
        self.end_bilinear = nn.Linear(h, h, bias=False)
        init_weights(self, config.initializer_range)

    def forward(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        b, q = positions.shape
        index = positions.unsqueeze(-1).expand(b, q, hidden.shape[-1])  # (B, Q, H)
        questions = torch.gather(hidden, 1, index)  # (B, Q, H)
        qs = self.start_bilinear(self.q_start(questions))  # (B, Q, H)
        qe = self.end_bilinear(self.q_end(questions))  # (B, Q, H)
        start_logits = torch.matmul(
            qs, self.start(hidden).transpose(1, 2)
        )  # (B, Q, H) @ (B, H, S) -> (B, Q, S)
        end_logits = torch.matmul(qe, self.end(hidden).transpose(1, 2))  # (B, Q, S)
        return start_logits, end_logits


def mask_logits(logits: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Set padded key positions of (B, Q, S) logits to finfo.min (mask broadcast as (B, 1, S)).

    transformers adds a (B, S) mask to (B, Q, S) logits, which lines the batch axis up with Q when Q > 1;
    we broadcast over questions explicitly instead.
    """
    if attention_mask is None:
        return logits
    pad = (attention_mask == 0)[:, None, :]  # (B, 1, S)
    return logits.masked_fill(pad, torch.finfo(logits.dtype).min)


def question_answering_loss(
    start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor
) -> Tensor:
    """transformers' QA loss: labels clamped to [0, S], S ignored, mean of start and end cross-entropy.

    Logits are (B, S) with labels (B,) or (B, 1), or (B, Q, S) with labels (B, Q).
    """
    s = start_logits.shape[-1]
    losses = []
    for logits, labels in ((start_logits, start_positions), (end_logits, end_positions)):
        if logits.dim() == 2 and labels.dim() > 1:
            labels = labels.squeeze(-1)
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"span labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:-1])} "
                "(one start and one end index per question)"
            )
        labels = labels.clamp(0, s)  # out-of-window answers become the ignored index S
        losses.append(F.cross_entropy(logits.reshape(-1, s), labels.reshape(-1), ignore_index=s))
    return (losses[0] + losses[1]) / 2


def pretraining_loss(
    start_logits: Tensor,
    end_logits: Tensor,
    start_positions: Tensor,
    end_positions: Tensor,
    ignore_index: int = 0,
) -> Tensor:
    """transformers' recurring-span loss over (B, Q, S) logits and (B, Q) labels.

    Labels are clamped to [0, S-1]; label `ignore_index` (the pad id 0, i.e. [CLS]) marks padded questions.
    """
    b, q, s = start_logits.shape
    losses = []
    for logits, labels in ((start_logits, start_positions), (end_logits, end_positions)):
        if labels.shape != (b, q):
            raise ValueError(
                f"span labels have shape {tuple(labels.shape)}, expected {(b, q)} (one per question)"
            )
        labels = labels.clamp(0, max(0, s - 1))
        losses.append(
            F.cross_entropy(logits.reshape(b * q, s), labels.reshape(b * q), ignore_index=ignore_index)
        )
    return (losses[0] + losses[1]) / 2


def first_question_positions(input_ids: Tensor, question_token_id: int) -> Tensor:
    """(B, 1): index of the first [QUESTION] per row, 0 (i.e. [CLS]) where there is none."""
    return (input_ids == question_token_id).to(torch.uint8).argmax(dim=-1, keepdim=True)


def all_question_positions(input_ids: Tensor, question_token_id: int, pad_position: int = 0) -> Tensor:
    """(B, Q): every [QUESTION] index per row in order, right-padded with `pad_position`.

    Q is the largest count in the batch (at least 1, so a batch without questions still gets one
    padded column, which the loss then ignores).
    """
    b, s = input_ids.shape
    is_q = input_ids == question_token_id  # (B, S)
    q = max(1, int(is_q.sum(dim=1).max()))
    idx = torch.arange(s, device=input_ids.device).expand(b, s)  # (B, S)
    # Non-question slots sort after every real index (key s), so the first Q columns hold questions in order.
    keys = torch.where(is_q, idx, s).sort(dim=1).values[:, :q]  # (B, Q)
    return keys.masked_fill(keys == s, pad_position)


# ------------------------------------------------------------------------------------------------ task models
class _WithQASS(_Base):
    has_qass = True
    # Set by `splinter.precision.to_mixed_precision`: the encoder runs under autocast in this dtype, while
    # LayerNorms, the QASS head and the logits stay fp32. bf16 logits step by ~0.06 at magnitude ~10, so
    # start + end sums would tie and the exact span search would pick by position instead of by score.
    autocast_dtype: torch.dtype | None = None

    def __init__(self, config: SplinterConfig) -> None:
        super().__init__()
        self.config = config
        self.splinter = SplinterModel(config)
        self.qass = QASSHead(config)

    def _encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        token_type_ids: Tensor | None,
        position_ids: Tensor | None,
        question_positions: Tensor | None,
    ) -> Tensor:
        if self.splinter.check_inputs and not torch.compiler.is_compiling():
            validate_inputs(
                self.config, input_ids, attention_mask, token_type_ids, position_ids, question_positions
            )
        if self.autocast_dtype is None:
            return self.splinter.encode(input_ids, attention_mask, token_type_ids, position_ids)
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype):
            hidden = self.splinter.encode(input_ids, attention_mask, token_type_ids, position_ids)
        return hidden.float()  # (B, S, H): the residual stream is fp32 already (fp32 LayerNorm outputs)

    def _span_logits(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """QASS logits (B, Q, S) in the head's own dtype, even inside a caller's autocast region."""
        head_dtype = self.qass.start_bilinear.weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            return self.qass(hidden.to(head_dtype), positions)


class SplinterForQuestionAnswering(_WithQASS):
    """Encoder + QASS head for extractive QA (transformers' SplinterForQuestionAnswering math)."""

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        question_positions: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
    ) -> SplinterOutput:
        """Logits are (B, S) for the first [QUESTION] per row when question_positions is None, else (B, Q, S).

        Loss (when both start_positions and end_positions are given): labels (B,) for (B, S) logits or
        (B, Q) for (B, Q, S) logits; out-of-range labels are clamped to S and ignored.
        """
        if (start_positions is None) != (end_positions is None):
            raise ValueError("pass both start_positions and end_positions to compute the loss, or neither")
        hidden = self._encode(input_ids, attention_mask, token_type_ids, position_ids, question_positions)
        squeeze = question_positions is None
        if squeeze:
            question_positions = first_question_positions(input_ids, self.config.question_token_id)  # (B, 1)
        start_logits, end_logits = self._span_logits(hidden, question_positions)  # (B, Q, S)
        start_logits = mask_logits(start_logits, attention_mask)
        end_logits = mask_logits(end_logits, attention_mask)
        if squeeze:
            start_logits, end_logits = start_logits.squeeze(1), end_logits.squeeze(1)  # (B, S)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return SplinterOutput(hidden, start_logits, end_logits, loss)


class SplinterForPreTraining(_WithQASS):
    """Encoder + QASS head for recurring span selection (transformers' SplinterForPreTraining math)."""

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        question_positions: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
    ) -> SplinterOutput:
        """Logits (B, Q, S); without question_positions, Q covers every [QUESTION] (right-padded with 0).

        Labels are (B, Q); padded questions carry label 0 and are ignored by the loss.
        """
        if question_positions is None and (start_positions is not None or end_positions is not None):
            raise TypeError("question_positions must be specified in order to calculate the loss")
        if (start_positions is None) != (end_positions is None):
            raise ValueError("pass both start_positions and end_positions to compute the loss, or neither")
        hidden = self._encode(input_ids, attention_mask, token_type_ids, position_ids, question_positions)
        if question_positions is None:
            question_positions = all_question_positions(
                input_ids, self.config.question_token_id, self.config.pad_token_id
            )
        start_logits, end_logits = self._span_logits(hidden, question_positions)  # (B, Q, S)
        start_logits = mask_logits(start_logits, attention_mask)
        end_logits = mask_logits(end_logits, attention_mask)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = pretraining_loss(
                start_logits,
                end_logits,
                start_positions,
                end_positions,
                ignore_index=self.config.pad_token_id,
            )
        return SplinterOutput(hidden, start_logits, end_logits, loss)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_flops_per_token(config: SplinterConfig, seq_len: int) -> float:
    """Forward FLOPs per token of encoder + QASS (2 per multiply-add; embeddings and norms ignored)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq_len * h  # projections + QK^T and AV
    qass = 2 * (2 * h * h) + 2 * 2 * h  # start/end transforms over all tokens + one logit column each
    return float(layers * per_layer + qass)


__all__ = [
    "SplinterOutput",
    "SplinterModel",
    "SplinterForQuestionAnswering",
    "SplinterForPreTraining",
    "QASSHead",
    "validate_inputs",
    "skipped_init",
    "question_answering_loss",
    "pretraining_loss",
    "first_question_positions",
    "all_question_positions",
    "mask_logits",
    "count_parameters",
    "model_flops_per_token",
    "init_weights",
]
