"""`peftlab finetune` end to end on tiny models: every method, both tasks, resume, signals, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from peftlab import registry
from peftlab.cli import finetune as _register_finetune  # noqa: F401
from peftlab.cli.app import app
from tests.conftest import make_bert_classifier, make_llama, one_line_error

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A tiny causal LM, a tiny BERT classifier (each with its tokenizer) and small datasets."""
    root = tmp_path_factory.mktemp("cli")
    bpe = AutoTokenizer.from_pretrained(FIXTURES / "bpe_tokenizer")
    llama = make_llama(vocab_size=len(bpe), pad_token_id=bpe.pad_token_id)
    llama.save_pretrained(root / "llama")
    bpe.save_pretrained(root / "llama")
    wordpiece = AutoTokenizer.from_pretrained(FIXTURES / "wordpiece_tokenizer")
    bert = make_bert_classifier(vocab_size=len(wordpiece), num_labels=2)
    bert.save_pretrained(root / "bert")
    wordpiece.save_pretrained(root / "bert")
    with (root / "alpaca.jsonl").open("w") as handle:
        for i in range(48):
            handle.write(json.dumps({"instruction": f"count on from {i}", "input": "",
                                     "output": " ".join(str(i + j) for j in range(4))}) + "\n")
    with (root / "sentiment.jsonl").open("w") as handle:
        # two sentences of the same token length, so length-grouped batches still mix the classes
        for i in range(48):
            text, label = ("i loved this film", "pos") if i % 2 else ("i hated the ending", "neg")
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    return root


def causal_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(ws / "llama"), "--data.train", str(ws / "alpaca.jsonl"),
            "--data.eval_fraction", "0.25", "--data.max_seq_len", "160", "--output.dir", str(out),
            "--batch_size", "4", "--max_steps", "6", "--lr", "3e-3", "--output.log_every", "2",
            "--output.tensorboard", "false", *extra]


def invoke(args: list[str]):
    result = runner.invoke(app, args)
    return result


ADAPTER_METHODS = sorted(set(registry.names()) - {"test-scale"})
METHOD_OPTIONS = {"bitfit": ["--method.add_missing", "true"]}  # Llama's linear layers have no biases


@pytest.mark.parametrize("method", ADAPTER_METHODS + ["qlora", "full", "lomo", "adalomo"])
def test_every_method_trains_a_causal_lm(workspace, tmp_path, method):
    if method == "qlora":
        pytest.importorskip("peftlab.quant.loading")
    result = invoke(causal_args(workspace, tmp_path / "run", "--method", method, *METHOD_OPTIONS.get(method, [])))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["method"] == method
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    artifact = Path(summary["artifact"])
    expected = "adapter_config.json" if method not in ("full", "lomo", "adalomo") else "config.json"
    assert (artifact / expected).is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("method, extra", [  # packed: several examples per block, told apart by position_ids
    ("lora", ["--data.packing", "true", "--data.max_seq_len", "480"]), ("full", [])])
def test_chunked_loss_trains_exactly_like_the_model_loss(workspace, tmp_path, method, extra):
    runs = {}
    for chunked in ("true", "false"):
        out = tmp_path / chunked
        result = invoke(causal_args(workspace, out, "--method", method, "--train.chunked_loss", chunked, *extra))
        assert result.exit_code == 0, result.output
        runs[chunked] = result.output, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss: chunked cross-entropy" in runs["true"][0]
    assert "loss: the model's own (train.chunked_loss is false)" in runs["false"][0]
    chunked, plain = runs["true"][1], runs["false"][1]
    assert [r["step"] for r in chunked] == [r["step"] for r in plain]
    for got, want in zip(chunked, plain):
        for key in ("loss", "eval_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got["step"])


def test_a_hooked_output_head_keeps_the_model_loss(workspace, tmp_path):
    result = invoke(causal_args(workspace, tmp_path / "run", "--max_steps", "2",
                                "--method.modules_to_save", '["lm_head"]'))
    assert result.exit_code == 0, result.output
    assert "loss: the model's own (the output embedding has forward hooks" in result.output


def test_classification_reports_accuracy_before_and_after(workspace, tmp_path):
    args = ["finetune", "--model", str(workspace / "bert"), "--data.train", str(workspace / "sentiment.jsonl"),
            "--data.format", "classification", "--data.eval_fraction", "0.25", "--output.dir", str(tmp_path / "run"),
            "--batch_size", "8", "--max_steps", "20", "--lr", "1e-2", "--output.tensorboard", "false"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_after"]["eval_accuracy"] == 1.0  # two separable sentences
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]


def test_resume_continues_exactly(workspace, tmp_path):
    common = ["--max_steps", "8", "--output.save_every", "4", "--method.dropout", "0.1"]
    straight = invoke(causal_args(workspace, tmp_path / "a", *common))
    assert straight.exit_code == 0, straight.output
    first = invoke(causal_args(workspace, tmp_path / "b", *common))
    assert first.exit_code == 0, first.output
    # pretend the run died after step 4: keep only that checkpoint and the metrics up to it
    run = tmp_path / "b"
    for leftover in ("summary.json",):
        (run / leftover).unlink()
    import shutil

    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-000008")
    metrics = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4]
    (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    resumed = invoke(causal_args(workspace, run, *common, "--resume"))
    assert resumed.exit_code == 0, resumed.output

    def losses(path):
        return [(r["step"], r["loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    assert losses(run) == losses(tmp_path / "a")
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(workspace, tmp_path):
    out = tmp_path / "run"
    # no periodic checkpoint before the signal (an epoch is a few steps): the only one is SIGTERM's
    args = causal_args(workspace, out, "--max_steps", "400", "--output.log_every", "1", "--lr", "1e-4",
                       "--output.save_every", "1000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftlab.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def trained_a_step() -> bool:  # a training record, not the evaluation before training ("eval_loss")
        path = out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return any("loss" in json.loads(line) for line in lines if line.endswith("}"))

    deadline = time.time() + 120
    while not trained_a_step():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr and "--resume" in stderr
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "loop.json").is_file()
    step = json.loads((checkpoints[0] / "loop.json").read_text())["step"]
    assert 0 < step < 400


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(workspace, tmp_path):
    out = tmp_path / "run"
    result = invoke(causal_args(workspace, out, "--train.optimizer", "sgd", "--lr", "1e30",
                                "--output.save_every", "1", "--train.max_grad_norm", "null"))
    assert result.exit_code == 1
    assert "not finite" in result.output and "last good checkpoint is" in result.output
    assert list((out / "checkpoints").iterdir())


bad = one_line_error


def test_bad_inputs_give_one_line_and_exit_code_2(workspace, tmp_path):
    out = str(tmp_path / "run")
    base = ["finetune", "--model", str(workspace / "llama"), "--output.dir", out]
    assert "does-not-exist.jsonl" in bad(base + ["--data.train", str(tmp_path / "does-not-exist.jsonl")])

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    assert "line 2" in bad(base + ["--data.train", str(broken)])

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "a"}\n')
    assert "output" in bad(base + ["--data.train", str(missing)])

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in bad(base + ["--data.train", str(empty)])

    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"text": "x", "label": 7}\n{"text": "y", "label": 0}\n')
    message = bad(["finetune", "--model", str(workspace / "bert"), "--data.train", str(labels), "--data.format",
                   "classification", "--data.num_labels", "2", "--output.dir", out])
    assert "7" in message and "label" in message

    data = ["--data.train", str(workspace / "alpaca.jsonl")]
    assert "did you mean 'lora'" in bad(base + data + ["--method", "lroa"])
    assert "did you mean 'train.lr'" in bad(base + data + ["train.lrr=1"])
    assert "did you mean 'method.alpha'" in bad(base + data + ["method.alhpa=3"])
    assert "gradient accumulation" in bad(base + data + ["--method", "lomo", "--grad_accum", "2"])
    assert "trains with its own fused optimizer" in bad(base + data + ["--method", "lomo", "--optimizer", "adamw"])
    assert "paged_adamw_8bit needs a CUDA GPU" in bad(base + data + ["--train.optimizer", "paged_adamw_8bit",
                                                                     "--max_steps", "1"])
    config = tmp_path / "bad.yaml"
    config.write_text("model: x\ndata:\n  train: y.jsonl\n  formatt: alpaca\n")
    assert bad(["finetune", str(config)]).startswith(f"error: {config}, line 4: unknown key 'data.formatt'")
    assert not (tmp_path / "run").exists()  # nothing was written


def test_bad_input_never_touches_a_finished_run(workspace, tmp_path):
    out = tmp_path / "run"
    assert invoke(causal_args(workspace, out)).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "already holds a finished run" in bad(causal_args(workspace, out))
    assert "unknown method" in bad(causal_args(workspace, out, "--method", "nope", "--output.overwrite", "true"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_debug_shows_the_traceback(workspace, tmp_path):
    result = invoke(["finetune", "--model", "x", "--data.train", "y.jsonl", "--method", "lroa", "--debug"])
    assert result.exit_code != 0 and result.exception is not None


def test_accelerate_launch_with_two_cpu_processes(workspace, tmp_path):
    out = tmp_path / "run"
    args = causal_args(workspace, out, "--max_steps", "4")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "peftlab.cli", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


def test_early_stopping_ends_the_run_when_eval_stops_improving(workspace, tmp_path):
    # SGD at lr 1e-30 leaves every weight bit-identical, so the eval loss can never improve
    out = tmp_path / "run"
    result = invoke(causal_args(workspace, out, "--train.optimizer", "sgd", "--lr", "1e-30", "--max_steps", "20",
                                "--output.eval_every", "1", "--output.early_stopping_patience", "2"))
    assert result.exit_code == 0, result.output
    assert "early stopping at step 3" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert (out / "checkpoints" / "step-000003").is_dir()
