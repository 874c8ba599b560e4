"""Knowledge distillation of a binarized student from its full-precision teacher, as BinaryMoS trains.

loss = kl_weight * KL(teacher || student) on the logits (temperature 1, summed over tokens, divided by the batch
size) + mse_weight * sum over layers 1..L of MSE(student hidden state, teacher hidden state); no ground-truth
cross-entropy. `DistillationTrainer` is a plain ``transformers.Trainer``, so gradient accumulation, bf16
autocast, gradient checkpointing, multi-GPU and multi-node runs (accelerate / torchrun) come from transformers.
"""

from __future__ import annotations

import math
import tempfile
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments, default_data_collator

KL_WEIGHT = 1.0
MSE_WEIGHT = 10.0
WARMUP_RATIO = 0.03
CHECKPOINTING_FIELD = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                           if name in TrainingArguments.__dataclass_fields__)
"""The TrainingArguments field that turns gradient checkpointing on (renamed in recent transformers 5.x)."""


def distillation_loss(student: Any, teacher: Any, attention_mask: torch.Tensor | None = None,
                      kl_weight: float = KL_WEIGHT, mse_weight: float = MSE_WEIGHT) -> torch.Tensor:
    """The BinaryMoS loss for one batch.

    Args:
        student, teacher: model outputs with ``logits`` (B, T, V) and ``hidden_states`` (L + 1 tensors
            (B, T, D); index 0, the embeddings, is left out).
        attention_mask: (B, T), 0 at padding tokens (which then count in neither term), or None.

    Returns:
        A scalar float32 tensor.
    """
    kl_tokens = token_kl(student.logits, teacher.logits)
    mask = None if attention_mask is None else attention_mask.to(kl_tokens.dtype)
    if mask is not None:
        kl_tokens = kl_tokens * mask
    kl = kl_tokens.sum() / student.logits.shape[0]
    mse = sum(_masked_mse(s.float(), t.float(), mask)
              for s, t in zip(student.hidden_states[1:], teacher.hidden_states[1:], strict=True))
    return kl_weight * kl + mse_weight * mse


KL_CHUNK_FLOATS = 1 << 22
"""`token_kl` works on this many logits at a time (16 MB of float32 per temporary)."""


def token_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) of every token: logits (..., V) each -> (...,), computed in
    float32 (float64 stays float64), differentiable in both.

    The same value as ``(q * (log q - log p)).sum(-1)`` with ``log p, log q`` the log-softmaxes, but evaluated
    `KL_CHUNK_FLOATS` logits at a time with the gradient recomputed in the backward (d/ds = p - q): beside the two
    logits tensors, a step holds one gradient of their size, where the plain expression keeps about eight more
    (B, T, V) float32 tensors alive (log-softmaxes, q, the difference, the product, their gradients), 1.6 GB at
    4 x 256 tokens of SmolLM2's 49,152-word vocabulary."""
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher logits must have one shape, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    vocab = student.shape[-1]
    return _TokenKL.apply(student.reshape(-1, vocab), teacher.reshape(-1, vocab)).view(student.shape[:-1])


class _TokenKL(torch.autograd.Function):
    """`token_kl` on (R, V) logits -> (R,), chunked over rows."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(student, teacher)
        kl = student.new_empty(student.shape[0], dtype=_kl_dtype(student))
        for rows, log_p, log_q in _log_softmax_chunks(student, teacher):
            kl[rows] = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
        return kl

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        student, teacher = ctx.saved_tensors
        want_student, want_teacher = ctx.needs_input_grad
        grad_student = torch.empty_like(student) if want_student else None
        grad_teacher = torch.empty_like(teacher) if want_teacher else None
        for rows, log_p, log_q in _log_softmax_chunks(student, teacher):
            q, g = log_q.exp(), grad[rows, None].to(log_p.dtype)
            if want_student:
                grad_student[rows] = (log_p.exp() - q) * g
            if want_teacher:
                pointwise = q * (log_q - log_p)
                grad_teacher[rows] = (pointwise - q * pointwise.sum(dim=-1, keepdim=True)) * g
        return grad_student, grad_teacher


def _kl_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or the logits' dtype where it is wider."""
    return torch.promote_types(logits.dtype, torch.float32)


def _log_softmax_chunks(student: torch.Tensor, teacher: torch.Tensor
                        ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(rows, log_softmax(student[rows]), log_softmax(teacher[rows])) in `_kl_dtype`, for row ranges of about
    `KL_CHUNK_FLOATS` logits."""
    dtype = _kl_dtype(student)
    step = max(1, KL_CHUNK_FLOATS // max(1, student.shape[1]))
    for start in range(0, student.shape[0], step):
        rows = slice(start, start + step)
        yield (rows, F.log_softmax(student[rows].to(dtype), dim=-1),
               F.log_softmax(teacher[rows].to(dtype), dim=-1))


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (a - b)^2 over (B, T, D), over unmasked tokens only when mask (B, T) is given."""
    if mask is None:
        return F.mse_loss(a, b)
    per_token = (a - b).pow(2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is `distillation_loss` against a frozen teacher.

    Args:
        teacher: the full-precision model, put in eval mode and frozen. A teacher placed with its own
            ``device_map`` (sharded over devices, or offloaded to CPU or disk by accelerate) stays where it is and
            its outputs are brought to the student's device; any other teacher is moved to the training device.
            It runs under ``torch.no_grad`` and outside autocast: accelerate's autocast (``bf16=True``) wraps the
            student's forward only, so the teacher computes in its own dtype (load it in bfloat16 to halve its
            memory and time).
        kl_weight, mse_weight: weights of the two terms (paper: 1 and 10).
        args, kwargs: as for ``Trainer``; the dataset yields ``input_ids`` (and optionally ``attention_mask``).

    Both forwards run with ``use_cache=False``: a training step needs no KV cache, and building one costs memory.
    The loss is per batch, so the Trainer must divide it by the gradient accumulation steps: newer transformers
    read ``loss_is_scaled_for_ga = False``, older ones ``model_accepts_loss_kwargs = False``.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, teacher: nn.Module, kl_weight: float = KL_WEIGHT, mse_weight: float = MSE_WEIGHT,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher.eval().requires_grad_(False)
        if not getattr(teacher, "hf_device_map", None):
            self.teacher.to(self.args.device)
        self.kl_weight, self.mse_weight = kl_weight, mse_weight

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = {key: value for key, value in inputs.items() if key in ("input_ids", "attention_mask")}
        outputs = model(**inputs, output_hidden_states=True, use_cache=False)
        with torch.no_grad():
            target = self.teacher(**{k: v.to(self._teacher_input_device()) for k, v in inputs.items()},
                                  output_hidden_states=True, use_cache=False)
        device = outputs.logits.device
        target = types.SimpleNamespace(logits=target.logits.to(device),
                                       hidden_states=[h.to(device) for h in target.hidden_states])
        loss = distillation_loss(outputs, target, inputs.get("attention_mask"), self.kl_weight, self.mse_weight)
        return (loss, outputs) if return_outputs else loss


    def _teacher_input_device(self) -> torch.device:
        """Where the teacher's token ids go: its input embeddings' device (accelerate's hooks move them on from
        there when that module is offloaded and its weight sits on the meta device)."""
        device = self.teacher.get_input_embeddings().weight.device
        return self.args.device if device.type == "meta" else device


class TokenBlocks(torch.utils.data.Dataset):
    """Rows of a (num_blocks, seq_len) int64 tensor as ``{"input_ids": (seq_len,)}`` examples."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


def token_blocks(tokenizer: Any, texts: str | Sequence[str], seq_len: int) -> torch.Tensor:
    """Texts joined by blank lines, tokenized once and cut into non-overlapping blocks: (num_blocks, seq_len)
    int64; the remainder shorter than seq_len is dropped.

    Raises:
        ValueError: fewer than seq_len tokens.
    """
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    count = ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def distill(student: nn.Module, teacher: nn.Module, texts: str | Sequence[str] | torch.Tensor, *,
            tokenizer: Any = None, steps: int = 100, lr: float = 2e-5, seq_len: int = 256, batch_size: int = 2,
            gradient_accumulation_steps: int = 1, seed: int = 0, kl_weight: float = KL_WEIGHT,
            mse_weight: float = MSE_WEIGHT, bf16: bool = False, gradient_checkpointing: bool = False,
            output_dir: str | None = None, **training_args: Any) -> list[float]:
    """Train a `binarize`d student for ``steps`` optimizer steps with `DistillationTrainer`.

    The paper's recipe: AdamW, cosine schedule with 3% warmup, no weight decay. Deterministic for a given seed
    (data order and dropout; the routers' init is `binarize`'s ``seed``).

    Args:
        student: the model from `mosbits.hf.binarize`, trained in place.
        teacher: the full-precision model.
        texts: training text(s), cut into blocks of seq_len tokens (`token_blocks`), or token ids already cut,
            an int64 tensor (num_blocks, seq_len) (then ``tokenizer`` and ``seq_len`` are not used).
        tokenizer: the teacher's tokenizer; default ``AutoTokenizer.from_pretrained(teacher.name_or_path)``.
        steps: optimizer steps; each sees batch_size * gradient_accumulation_steps blocks (cycling the data).
        lr, seq_len, batch_size, gradient_accumulation_steps, seed, bf16, gradient_checkpointing: as named
            (``batch_size`` per device).
        kl_weight, mse_weight: weights of the two loss terms.
        output_dir: the Trainer's folder (nothing is saved there unless ``training_args`` asks); default a
            temporary folder.
        training_args: more ``transformers.TrainingArguments`` fields.

    Returns:
        The loss of every step.
    """
    if isinstance(texts, torch.Tensor):
        if texts.ndim != 2 or texts.dtype != torch.long:
            raise ValueError(f"texts as token ids must be int64 (num_blocks, seq_len), got {texts.dtype} "
                             f"{tuple(texts.shape)}")
        blocks = texts
    else:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(teacher.name_or_path)
        blocks = token_blocks(tokenizer, texts, seq_len)
    dataset = TokenBlocks(blocks)
    with tempfile.TemporaryDirectory(prefix="mosbits-distill-") as tmp:
        options = {
            "output_dir": output_dir or tmp, "max_steps": steps, "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps, "learning_rate": lr,
            "lr_scheduler_type": "cosine", "warmup_steps": math.ceil(WARMUP_RATIO * steps), "weight_decay": 0.0,
            "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": seed, "data_seed": seed,
            "bf16": bf16,
            CHECKPOINTING_FIELD: gradient_checkpointing, "dataloader_num_workers": 0,
            "dataloader_pin_memory": torch.cuda.is_available(),
            **training_args,
        }
        trainer = DistillationTrainer(model=student, args=TrainingArguments(**options), train_dataset=dataset,
                                      data_collator=default_data_collator, teacher=teacher,
                                      kl_weight=kl_weight, mse_weight=mse_weight)
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
