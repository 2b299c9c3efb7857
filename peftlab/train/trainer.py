"""The training loop of ``peftlab finetune``, on accelerate. Read it top to bottom:

1. set up: seed, data, model (quantized and wrapped per the method), optimizer, schedule;
2. resume from the newest checkpoint if asked (same data order, RNG, optimizer and schedule);
3. evaluate once before training, so the final table can show before/after side by side;
4. loop over optimizer steps: micro-batches -> loss -> backward -> step; log, evaluate, checkpoint;
5. save the adapter (or the full model), the loss plot and the summary.

Ctrl-C / SIGTERM finish the current step, write a checkpoint and stop; a non-finite loss stops the
run and keeps the last good checkpoint.
"""
from __future__ import annotations

import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from rich.console import Console

from ..errors import PeftlabError
from . import setup
from .config import ADALOMO, LOMO, RunConfig
from .data import Collator, TokenizedDataset, batch_order, prepare_data
from .loss import causal_lm_loss, chunked_loss_obstacle, slice_tokens
from .report import Reporter
from .state import LoopState, list_checkpoints, load_checkpoint, save_checkpoint

FINAL_MARKER = "summary.json"


class TrainingStopped(PeftlabError):
    """The run stopped before its last step (signal or non-finite loss); a checkpoint tells where."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    seconds: float
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    artifact: Path


def finetune(config: RunConfig, resume: bool = False, console: Console | None = None) -> RunResult:
    """Run one finetuning job as configured; returns where everything went and the eval metrics."""
    return Trainer(config, resume, console or Console(stderr=True)).run()


class Trainer:
    def __init__(self, config: RunConfig, resume: bool, console: Console):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.console = config, console
        self.out = Path(config.output.dir)
        self.checkpoints = self.out / "checkpoints"
        _check_output_dir(self.out, resume, config.output.overwrite)
        probe_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.precision = setup.resolve_precision(config, probe_device)
        fused = config.train.optimizer in (LOMO, ADALOMO)
        self.accelerator = Accelerator(
            mixed_precision="no" if self.precision == "fp32" or fused else self.precision)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        set_seed(config.train.seed)
        self.resume = resume

        self.tokenizer = setup.load_tokenizer(config)
        self.data = prepare_data(config.data, self.tokenizer)
        self.collate = Collator.for_tokenizer(self.tokenizer)
        model = setup.load_model(config, setup.weights_dtype(config, self.precision), self.device, self.tokenizer,
                                 self.data.label_names)
        self.model = setup.prepare_model(config, model)
        self.optimizer = setup.build_optimizer(config, self.model)
        self.fused = fused
        per_epoch = math.ceil(self._batches_per_epoch() / config.train.grad_accum)
        self.total_steps = config.train.max_steps or per_epoch * config.train.epochs
        self.steps_per_epoch = per_epoch
        self.schedule = setup.build_schedule(config, self.optimizer, self.total_steps)
        if fused:  # LOMO all-reduces inside its hooks; a DDP wrapper would update before reducing
            self.train_model = self.model.to(self.device)
        else:
            self.train_model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.loss_chunk, self.loss_note = self._loss_plan()
        self.reporter = Reporter(self.out, self.total_steps, console, enabled=self.accelerator.is_main_process,
                                 tensorboard=config.output.tensorboard, resumed=resume)
        self._stop_signal: str | None = None

    def _loss_plan(self) -> tuple[int | None, str]:
        """Tokens per slice of the chunked causal-LM loss (None: the model's own loss), and a line saying which."""
        if self.config.task != "causal_lm":
            return None, "the model's own"
        if not self.config.train.chunked_loss:
            return None, "the model's own (train.chunked_loss is false)"
        if self.world > 1:  # the backbone would be called around the DDP wrapper, which syncs gradients
            return None, "the model's own (chunked loss runs on one process only)"
        obstacle = chunked_loss_obstacle(self.model)
        if obstacle is not None:
            return None, f"the model's own ({obstacle})"
        chunk = slice_tokens(self.model.get_output_embeddings().out_features)
        return chunk, f"chunked cross-entropy, {chunk}-token slices (the full logits are never built)"

    # --- data ------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch: a pure function of (seed, epoch), grouped by length to save padding."""
        return batch_order(len(self.data.train), self.config.train.batch_size * self.world,
                           seed=self.config.train.seed, epoch=epoch, drop_last=self.world > 1,
                           lengths=self.data.train.lengths)

    def _batches_per_epoch(self) -> int:
        return len(self._epoch_batches(0))

    def _micro_batches(self, loop: LoopState) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index in epoch, batch) from the loop position on; each process takes its slice."""
        size = self.config.train.batch_size
        epoch, start = loop.epoch, loop.batch_in_epoch
        while True:
            order = self._epoch_batches(epoch)
            for index in range(start, len(order)):
                mine = order[index][self.rank * size:(self.rank + 1) * size]
                yield epoch, index, self._to_device(self.collate([self.data.train[i] for i in mine]))
            epoch, start = epoch + 1, 0

    def _to_device(self, batch: dict) -> dict:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.config.task == "causal_lm":
            batch["use_cache"] = False  # with a cache, packed examples would attend across their boundaries
        return batch

    # --- the run ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        config, started = self.config, time.time()
        loop = self._resume_or_start()
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            self.console.print(str(self.model.summary()) if hasattr(self.model, "summary") else
                               f"full finetuning: {sum(p.numel() for p in self.model.parameters()):,} trainable parameters",
                               markup=False, highlight=False)
            self.console.print(f"loss: {self.loss_note}", markup=False, highlight=False, soft_wrap=True)
        # Handlers first: a signal during the evaluation before training stops after the first step.
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            before = _metrics_of(loop.history[0]) if loop.history else self._evaluate(loop, "before")
            self.reporter.start(loop.step)
            self._train(loop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.reporter.close()
        after = self._evaluate(loop, "after") if self.data.eval is not None else None
        return self._finish(loop, before, after, time.time() - started)

    def _resume_or_start(self) -> LoopState:
        if not self.resume:
            return LoopState()
        found = list_checkpoints(self.checkpoints)
        if not found:
            raise PeftlabError(f"--resume: {self.checkpoints} holds no checkpoint to resume from.")
        loop = load_checkpoint(found[-1], self.model, self.optimizer, self.schedule, self.accelerator.scaler)
        self.console.print(f"resuming from {found[-1]} (step {loop.step} of {self.total_steps})", markup=False)
        return loop

    def _train(self, loop: LoopState) -> None:
        config, accum = self.config, self.config.train.grad_accum
        batches = self._micro_batches(loop)
        window_loss, window_tokens, window_start = [], 0, time.time()
        self.train_model.train()
        while loop.step < self.total_steps:
            losses = []
            for micro in range(accum):
                epoch, index, batch = next(batches)
                loss = self._forward_backward(batch, last=micro == accum - 1, scale=1 / accum)
                losses.append(loss)
                window_tokens += _tokens(batch) * self.world
                loop.epoch, loop.batch_in_epoch = epoch, index + 1
            if not self.fused:  # fused optimizers already updated (and clipped) inside backward
                if config.train.max_grad_norm and self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), config.train.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            loop.step += 1
            window_loss.append(sum(losses) / len(losses))
            self.reporter.step(loop.step, {"loss": window_loss[-1], "lr": self.schedule.get_last_lr()[0]})

            if loop.step % config.output.log_every == 0 or loop.step == self.total_steps:
                elapsed = time.time() - window_start
                self.reporter.log({"step": loop.step, "epoch": loop.epoch, "loss": sum(window_loss) / len(window_loss),
                                   "lr": self.schedule.get_last_lr()[0], "tokens_per_s": window_tokens / elapsed,
                                   "memory_gib": _memory_gib(self.device)})
                loop.tokens_seen += window_tokens
                window_loss, window_tokens, window_start = [], 0, time.time()
            end_of_epoch = loop.step % self.steps_per_epoch == 0
            if self.data.eval is not None and self._due(loop.step, config.output.eval_every, end_of_epoch):
                if self._evaluate_and_check_patience(loop):
                    self.console.print(f"early stopping at step {loop.step}: no improvement in "
                                       f"{config.output.early_stopping_patience} evaluations")
                    self._save(loop)
                    break
            if self._due(loop.step, config.output.save_every, end_of_epoch):
                self._save(loop)
            if self._stop_signal:
                path = self._save(loop)
                raise TrainingStopped(f"stopped by {self._stop_signal} at step {loop.step}; checkpoint saved to "
                                      f"{path}; continue with --resume", 130 if self._stop_signal == "SIGINT" else 143)

    def _forward_backward(self, batch: dict, last: bool, scale: float) -> float:
        with self.accelerator.autocast():
            if self.loss_chunk:
                loss = causal_lm_loss(self.model, batch["input_ids"], labels=batch["labels"],
                                      attention_mask=batch.get("attention_mask"),
                                      position_ids=batch.get("position_ids"), chunk_size=self.loss_chunk)
            else:
                loss = self.train_model(**batch).loss
        if not torch.isfinite(loss).all():
            found = list_checkpoints(self.checkpoints)
            keep = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
            raise TrainingStopped(f"the loss became {loss.item()} (not finite); {keep}. Lower train.lr, or use "
                                  "train.precision bf16/fp32 instead of fp16.", 1)
        if self.fused:
            self.optimizer.backward(loss)
        elif last:
            self.accelerator.backward(loss * scale)
        else:
            with self.accelerator.no_sync(self.train_model):
                self.accelerator.backward(loss * scale)
        return loss.item()

    @staticmethod
    def _due(step: int, every: int | None, end_of_epoch: bool) -> bool:
        return step % every == 0 if every else end_of_epoch

    def _save(self, loop: LoopState) -> Path:
        path = self.checkpoints / f"step-{loop.step:06d}"
        if self.accelerator.is_main_process:
            path = save_checkpoint(self.checkpoints, loop, self.model, self.optimizer, self.schedule,
                                   self.accelerator.scaler, self.config.output.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop_signal:  # a second signal: stop at once
            raise KeyboardInterrupt
        self._stop_signal = name
        self.console.print(f"{name} received: finishing this step and writing a checkpoint (again to abort)")

    # --- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, loop: LoopState, when: str) -> dict[str, float] | None:
        if self.data.eval is None:
            return None
        dataset: TokenizedDataset = self.data.eval
        size = self.config.train.batch_size
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, count, correct
        self.train_model.eval()
        for start in range(self.rank * size, len(dataset), size * self.world):
            batch = self._to_device(self.collate([dataset[i] for i in range(start, min(start + size, len(dataset)))]))
            with self.accelerator.autocast():
                out = self.train_model(**batch)
            totals += _eval_counts(out, batch)
        self.train_model.train()
        totals = self.accelerator.reduce(totals, reduction="sum")
        loss = (totals[0] / totals[1]).item()
        metrics = {"eval_loss": loss}
        if self.config.task == "classification":
            metrics["eval_accuracy"] = (totals[2] / totals[1]).item()
        else:
            metrics["eval_perplexity"] = math.exp(min(loss, 50.0))
        loop.history.append({"step": loop.step, "when": when, **metrics})
        self.reporter.log({"step": loop.step, **metrics})
        return metrics

    def _evaluate_and_check_patience(self, loop: LoopState) -> bool:
        """Evaluate; return True when early stopping should end the run."""
        loss = self._evaluate(loop, "during")["eval_loss"]
        if loop.best_metric is None or loss < loop.best_metric:
            loop.best_metric, loop.evals_without_improvement = loss, 0
            return False
        loop.evals_without_improvement += 1
        patience = self.config.output.early_stopping_patience
        return patience is not None and loop.evals_without_improvement >= patience

    # --- the end ---------------------------------------------------------------------------
    def _finish(self, loop: LoopState, before: dict | None, after: dict | None, seconds: float) -> RunResult:
        self.accelerator.wait_for_everyone()
        artifact = self.out / ("adapter" if hasattr(self.model, "save") else "model")
        if self.accelerator.is_main_process:
            if hasattr(self.model, "save"):
                self.model.save(artifact)
            else:
                self.accelerator.unwrap_model(self.model).save_pretrained(artifact)
            self.tokenizer.save_pretrained(artifact)
            plot = self.reporter.plot_loss()
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            rows = [("method", self.config.method), ("steps", str(loop.step)), ("time", f"{seconds:.1f} s"),
                    ("trainable parameters", f"{trainable:,}"), ("saved", str(artifact)),
                    ("metrics", str(self.reporter.metrics_path))] + ([("loss plot", str(plot))] if plot else [])
            if loop.best_metric is not None:
                rows.insert(4, ("best eval loss", f"{loop.best_metric:.4f}"))
            self.reporter.summary(rows, before, after)
            summary = {"steps": loop.step, "seconds": seconds, "eval_before": before, "eval_after": after,
                       "artifact": str(artifact), "method": self.config.method, "trainable_parameters": trainable}
            from ..checkpoint import write_json

            write_json(self.out / FINAL_MARKER, summary)
        return RunResult(self.out, loop.step, seconds, before, after, artifact)


def _tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch; packed batches carry no attention mask."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in entry.items() if k.startswith("eval_")}


def _eval_counts(out: Any, batch: dict) -> torch.Tensor:
    """(summed loss, number of targets, correct predictions) of one batch."""
    labels = batch["labels"]
    logits = out.logits.float()
    if labels.dim() == 1:  # classification
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum()
        return torch.stack([loss.double(), torch.tensor(labels.numel(), device=logits.device).double(),
                            correct.double()])
    shifted, targets = logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    loss = torch.nn.functional.cross_entropy(shifted[mask], targets[mask], reduction="sum")
    correct = (shifted.argmax(-1)[mask] == targets[mask]).sum()
    return torch.stack([loss.double(), mask.sum().double(), correct.double()])


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    except ImportError:
        return 0.0


def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Never write over a good output unless asked."""
    if resume:
        return
    finished = (out / FINAL_MARKER).is_file()
    unfinished = (out / "checkpoints").is_dir()
    if (finished or unfinished) and not overwrite:
        what = "a finished run" if finished else "an unfinished run (checkpoints)"
        raise PeftlabError(f"output.dir {out} already holds {what}; pass --resume to continue it, choose another "
                           "output.dir, or set output.overwrite=true.")
    if overwrite and unfinished:
        shutil.rmtree(out / "checkpoints")
