"""The family-agnostic LightningModule: exact per-token loss, frozen parts kept frozen, generation-based eval."""
from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Callable

import lightning as L
import torch
import torchmetrics
from PIL import Image
from torch import nn

from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, Message, Sample
from vlm_finetune.fsdp import root_loss
from vlm_finetune.loss import token_loss_sum
from vlm_finetune.models.base import Family, Part
from vlm_finetune.running_strategy import (
    clip_gradients,
    head_weight,
    loss_rescale,
    needs_synced_generation,
    runs_vision_every_step,
)
from vlm_finetune.settings import EvalSettings, LossSettings, OptimizerSettings
from vlm_finetune.trainability import TrainablePlan, count_parameters, set_frozen_eval, unwrap

log = logging.getLogger(__name__)


def normalize_answer(text: str) -> str:
    """Case, surrounding punctuation and spacing do not make an answer wrong."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?,;:\"'")


class AnswerExactMatch(torchmetrics.Metric):
    """Fraction of generated answers equal to the reference after `normalize_answer` (synced across ranks)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        self.correct += sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
        self.total += len(references)

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                            min_ratio: float) -> torch.optim.lr_scheduler.LRScheduler:
    """`scheduler=cosine` (conf/scheduler/cosine.yaml binds the warmup and the floor; the module the rest)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(int(warmup_steps), total_steps, float(min_ratio)))


def step_contexts(offload_activations: bool, attention_backends: tuple, on_gpu: bool) -> contextlib.ExitStack:
    """What a training step's forward runs under: speed.offload_activations (what autograd saves for backward
    waits in host memory, pinned on GPUs) and speed.attention_backends (the SDPA kernels both towers and the
    LLM may use, best first). One per step: `with step_contexts(...):`."""
    stack = contextlib.ExitStack()
    if offload_activations:
        stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=on_gpu))
    if attention_backends:
        from torch.nn.attention import sdpa_kernel

        stack.enter_context(sdpa_kernel(list(attention_backends), set_priority=True))
    return stack


class VisionInEveryStep:
    """Runs the family's vision path on a text-only micro-batch too, where the images would have run (right
    after the token embedding), on the inputs of one small blank image made by the family's processor, and
    adds its features times 0 to the embeddings: the loss and every gradient stay exactly what they were (the
    vision path's gradients are 0 on this rank), but every rank gathers and releases the same parameters in
    the same order, forward and backward. The blank image never enters the sequence (no placeholder tokens,
    no positions, no attention)."""

    def __init__(self, family: Family, processor):
        self.family, self.processor = family, processor
        self._inputs: dict | None = None

    def blank_image_inputs(self) -> dict:
        if self._inputs is None:
            sample = Sample([Message("user", f"{IMAGE_PLACEHOLDER}\n."), Message("assistant", ".")],
                            [Image.new("RGB", (56, 56))])
            batch = self.processor.collate([self.processor.encode(sample)])
            self._inputs = {k: batch[k] for k in self.family.image_keys}
        return self._inputs

    def run(self, base: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The vision path on the blank image (image tensors in `dtype`, as a batch's are)."""
        inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype)
                  for k, v in self.blank_image_inputs().items()}
        return self.family.image_features(base, inputs)

    def needed(self, batch: dict) -> bool:
        keys = self.family.image_keys + self.family.video_keys  # a video-only micro-batch runs the tower too
        return bool(self.family.image_keys) and not any(k in batch for k in keys)

    @contextlib.contextmanager
    def around(self, base: nn.Module, batch: dict, once: bool = False):
        """While inside, a text-only `batch`'s forward runs the vision path; `once`: in the first forward only
        (generation: the images run in the prefill, not in the decoding steps)."""
        if not self.needed(batch):
            yield
            return
        embedding = self.family.input_embedding(base)
        fired = []

        def run_vision(module, args, output):
            if once and fired:
                return output
            fired.append(True)
            features = self.run(base, output.dtype, output.device)
            return output if features is None else output + features.sum().to(output.dtype) * 0.0

        handle = embedding.register_forward_hook(run_vision)
        try:
            yield
        finally:
            handle.remove()


def batch_loss_sum(family: Family, model: nn.Module, batch: dict, loss: LossSettings) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over supervised tokens, their count) of one micro-batch: the family gives
    the final hidden states and the output projection, the loss never builds full logits."""
    base = unwrap(model)
    hidden = family.hidden_states(base, batch)
    head = family.output_embedding(base)
    return token_loss_sum(hidden, head_weight(head), batch["labels"], getattr(head, "bias", None), loss)


class VLMModule(L.LightningModule):
    def __init__(self, model: nn.Module, family: Family, processor, plan: TrainablePlan, optimizer_factory: Callable,
                 optimizer: OptimizerSettings, scheduler_factory: Callable | None, loss: LossSettings,
                 evaluation: EvalSettings, question_types: list[str] = (), offload_activations: bool = False,
                 attention_backends: tuple = (), build_model: Callable[[], nn.Module] | None = None):
        """`optimizer_factory(param_groups)` and `scheduler_factory(optimizer, total_steps)` come from the
        `optimizer` and `scheduler` config groups (Hydra `_partial_`); no scheduler factory: a constant rate.
        `build_model`: the model is built in `configure_model` (under ZeRO-3 inside DeepSpeed's partitioned
        initialisation); `model` is then its structure on the meta device until fit starts."""
        super().__init__()
        self.model = model
        self._build_model = build_model
        self.family = family
        self.processor = processor
        self.plan = plan
        self.optimizer_factory = optimizer_factory
        self.optimizer_settings = optimizer
        self.scheduler_factory = scheduler_factory
        self.loss_settings = loss
        self.offload_activations = offload_activations
        self.attention_backends = tuple(attention_backends)  # SDPBackend members, best first; () = PyTorch's choice
        self.max_new_tokens = evaluation.max_new_tokens
        self.generate_in_validation = evaluation.generate
        self.val_accuracy = AnswerExactMatch()
        self.val_accuracy_by_type = nn.ModuleDict({t: AnswerExactMatch() for t in question_types})
        # captions: BLEU-4 and ROUGE-L F1 of the generated text against the reference (eval.caption_metrics)
        self.caption_metrics = evaluation.caption_metrics
        if self.caption_metrics:
            from torchmetrics.text import BLEUScore, ROUGEScore

            self.val_bleu = BLEUScore(n_gram=4, smooth=True)
            self.val_rouge = ROUGEScore(rouge_keys=("rougeL",))
        self.val_loss_sum = torchmetrics.SumMetric()
        self.val_token_count = torchmetrics.SumMetric()
        self._step_loss = 0.0
        self.data_counts = {"num_truncated": 0, "num_dropped_too_long": 0, "num_bad_records": 0}
        self.last_validation_step = -1
        self.vision_in_every_step = VisionInEveryStep(family, processor)  # used under ZeRO-3 and FSDP
        # checkpoints hold the trainable weights only (the frozen base comes from the model folder)
        self.strict_loading = False

    def configure_model(self) -> None:
        """Lightning calls this inside the strategy's model-construction context (ZeRO-3: `zero.Init`)."""
        if self._build_model is not None:
            self.model = self._build_model()
            self._build_model = None

    # -- modes ------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            set_frozen_eval(self.model, self.plan)  # Lightning calls train() at every fit/val switch
        return self

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self.model)
        log.info("parameters: %s trainable of %s total (%.3f%%)", f"{trainable:,}", f"{total:,}",
                 100 * trainable / max(total, 1))
        if self.logger is not None:
            self.logger.log_hyperparams({"trainable_parameters": trainable, "total_parameters": total})

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["data_counts"] = dict(self.data_counts)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.data_counts.update(checkpoint.get("data_counts", {}))
        if "state_dict" not in checkpoint:  # DeepSpeed's folder: the engine restores the weights itself
            return
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = trainable - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} trainable tensor(s), e.g. {sorted(missing)[0]}")

    # -- loss -------------------------------------------------------------------------------------
    def loss_sum_of(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        """(loss sum, supervised tokens) of a micro-batch through `model` (under FSDP: the root unit's forward
        method, fsdp.ROOT_LOSS)."""
        return batch_loss_sum(self.family, model, batch, self.loss_settings)

    def _loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        loss = root_loss(self.model) or (lambda b: self.loss_sum_of(self.model, b))
        if self._trainer is not None and runs_vision_every_step(self.trainer.strategy):
            with self.vision_in_every_step.around(unwrap(self.model), batch):
                return loss(batch)
        return loss(batch)

    def _saved_activations(self) -> contextlib.ExitStack:
        return step_contexts(self.offload_activations, self.attention_backends, self.device.type == "cuda")

    def _count_data_events(self, batch: dict) -> None:
        for key in self.data_counts:
            self.data_counts[key] += int(batch.get(key, 0))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._count_data_events(batch)
        world = self.trainer.world_size
        accumulate = self.trainer.accumulate_grad_batches
        local_step_tokens = torch.tensor(float(batch["num_step_supervised_tokens"]), device=self.device)
        step_tokens = float(self.trainer.strategy.reduce(local_step_tokens, reduce_op="sum"))
        if batch.get("empty"):
            loss_sum = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        else:
            with self._saved_activations():
                loss_sum, _ = self._loss_sum(batch)
        # Lightning divides by `accumulate` and DDP averages over ranks: undo both so the step's gradient
        # is d(sum of every supervised token's loss)/d(theta) / (supervised tokens of the global step).
        scale = accumulate * world / max(step_tokens, 1.0) * loss_rescale(self.trainer.strategy, accumulate)
        self._step_loss += float(loss_sum.detach()) / max(step_tokens, 1.0)
        if batch["last_in_step"]:
            step_loss = torch.tensor(self._step_loss, device=self.device)
            if world > 1:  # each rank holds its share of the step's per-token mean
                step_loss = self.trainer.strategy.reduce(step_loss, reduce_op="sum")
            self.log("train_loss", step_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
            self.log("train_step_tokens", step_tokens, on_step=True, on_epoch=False, batch_size=1)
            # the rate this step's update uses (the scheduler moves it after the optimizer step)
            self.log("lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]), on_step=True, on_epoch=False,
                     batch_size=1)
            self._step_loss = 0.0
        return loss_sum * scale

    # -- validation -------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._count_data_events(batch)
        if batch.get("empty"):
            return
        loss_sum, count = self._loss_sum(batch)
        self.val_loss_sum.update(loss_sum.detach())
        self.val_token_count.update(torch.tensor(float(count), device=self.device))
        if self.generate_in_validation:
            generated = self.generate(batch["generation"])
            # repeats that even out the ranks' shares are generated (collectives) but not scored
            counted = batch.get("counted") or [True] * len(generated)
            predictions = [p for p, keep in zip(generated, counted) if keep]
            answers = [a for a, keep in zip(batch["answers"], counted) if keep]
            types = [t for t, keep in zip(batch["question_types"], counted) if keep]
            self.val_accuracy.update(predictions, answers)
            if self.caption_metrics and predictions:
                self.val_bleu.update(predictions, [[a] for a in answers])
                self.val_rouge.update(predictions, answers)
            for qtype in self.val_accuracy_by_type:
                pairs = [(p, a) for p, a, t in zip(predictions, answers, types) if t == qtype]
                if pairs:
                    self.val_accuracy_by_type[qtype].update([p for p, _ in pairs], [a for _, a in pairs])

    def on_validation_epoch_end(self) -> None:
        self.last_validation_step = self.trainer.global_step
        tokens = self.val_token_count.compute()
        self.log("val_loss", self.val_loss_sum.compute() / tokens.clamp(min=1), prog_bar=True, sync_dist=False)
        self.val_loss_sum.reset()
        self.val_token_count.reset()
        if self.generate_in_validation:
            self.log("val_accuracy", self.val_accuracy.compute(), prog_bar=True)
            self.val_accuracy.reset()
            if self.caption_metrics:
                self.log("val_bleu", self.val_bleu.compute())
                self.log("val_rougeL", self.val_rouge.compute()["rougeL_fmeasure"])
                self.val_bleu.reset()
                self.val_rouge.reset()
            for qtype, metric in self.val_accuracy_by_type.items():
                if metric.total > 0 or self.trainer.world_size > 1:
                    self.log(f"val_accuracy_{qtype}", metric.compute())
                metric.reset()

    @torch.no_grad()
    def generate(self, prompt_batch: dict) -> list[str]:
        """Greedy answers for a left-padded prompt batch."""
        base = unwrap(self.model)
        dtype = next(base.parameters()).dtype
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prompt_batch.items()
                  if k in self.family.input_keys}
        for key, value in inputs.items():  # image tensors in the weights' dtype
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(dtype)
        strategy = self.trainer.strategy if self._trainer is not None else None
        synced = needs_synced_generation(strategy)
        every_rank = contextlib.nullcontext()
        if runs_vision_every_step(strategy) and self.vision_in_every_step.needed(inputs):
            if self.family.images_encoded_before_generation:  # where the image ranks run it
                self.vision_in_every_step.run(base, dtype, self.device)
            else:
                every_rank = self.vision_in_every_step.around(base, inputs, once=True)
        with every_rank:
            output = base.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   eos_token_id=self.processor.eos_token_id,
                                   pad_token_id=self.processor.pad_token_id, synced_gpus=synced)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [self.processor.decode(row) for row in new_tokens]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        projector_names = tuple(self.plan.part_modules[Part.PROJECTOR])
        settings = self.optimizer_settings
        groups: dict[str, list] = {"default": [], "projector": []}
        for name, param in unwrap(self.model).named_parameters():
            if not param.requires_grad:
                continue
            in_projector = any(f"{p}." in name for p in projector_names)
            groups["projector" if in_projector and settings.projector_lr else "default"].append(param)
        param_groups = [{"params": groups["default"], "lr": settings.lr}]
        if groups["projector"]:
            param_groups.append({"params": groups["projector"], "lr": settings.projector_lr})
        param_groups = [g for g in param_groups if g["params"]]
        optimizer = self.optimizer_factory(param_groups)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 \
            else int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
