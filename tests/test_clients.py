"""The clients users point at `qwenjax serve`, installed from the registry (the `clients` extra), against a real
server on localhost: lm-evaluation-harness scores a multiple-choice task exactly as the model does in-process and
runs a generate_until task over chat. Marker `clients`: their own line in .ci/run (pyproject's addopts leave them
out of the main run)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Annotated

import numpy as np
import pytest
from pydantic import Field

from test_serve_api import _serving

pytestmark = pytest.mark.clients

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "tests", "lm_eval_tasks")


@pytest.fixture(scope="module")
def server():
    with _serving("--max-batch", "4", "--max-len", "2048") as s:
        yield s[1]


@pytest.fixture(scope="module")
def reference():
    import qwenjax
    from qwenjax.demo import DEFAULT_MODEL_DIR
    from qwenjax.inference.tokenizer import Tokenizer

    return qwenjax.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32"), Tokenizer(DEFAULT_MODEL_DIR)


def _lm_eval(out: str, *args: str) -> str:
    """Runs the harness's CLI (offline: the task's data is tests/lm_eval_tasks' JSON); its printed output."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", *args, "--include_path", TASKS, "--output_path",
                           out, "--log_samples"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


def _samples(out: str, task: str) -> list[dict]:
    path, = glob.glob(os.path.join(out, "**", f"samples_{task}_*.jsonl"), recursive=True)
    return sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])


def _continuation_logprob(m, tok, context: str, continuation: str) -> float:
    """The harness's own split (lm_eval.api.model._encode_pair for a causal model), scored in-process."""
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    logits = np.asarray(m(np.array([whole], np.int32))[0], np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    return float(sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_lm_eval_local_completions_scores_as_the_model(server, reference, tmp_path):
    m, tok = reference
    log = _lm_eval(str(tmp_path), "--model", "local-completions", "--tasks", "qwenjax_pydoc_mc", "--model_args",
                   f"model=tiny-pydoc,base_url={server}/v1/completions,num_concurrent=2,max_retries=1")
    assert "Using remote tokenizer" in log  # the server's /tokenizer_info and /tokenize, nothing from a hub
    results, = glob.glob(os.path.join(str(tmp_path), "**", "results_*.json"), recursive=True)
    printed = json.load(open(results))["results"]["qwenjax_pydoc_mc"]["acc,none"]
    correct = 0
    for sample in _samples(str(tmp_path), "qwenjax_pydoc_mc"):
        doc = sample["doc"]
        mine = [_continuation_logprob(m, tok, doc["question"], " " + c) for c in doc["choices"]]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        np.testing.assert_allclose(theirs, mine, atol=1e-4, err_msg=doc["question"])
        correct += int(np.argmax(mine) == doc["answer"])
    assert printed == pytest.approx(correct / 20)  # the accuracy printed is the in-process one


def test_lm_eval_local_chat_completions_answers(server, tmp_path):
    _lm_eval(str(tmp_path), "--model", "local-chat-completions", "--tasks", "qwenjax_pydoc_gen",
             "--apply_chat_template", "--model_args",
             f"model=tiny-pydoc,base_url={server}/v1/chat/completions,max_retries=1")
    samples = _samples(str(tmp_path), "qwenjax_pydoc_gen")
    assert len(samples) == 4 and all(s["resps"][0][0].strip() for s in samples), [s["resps"] for s in samples]


# ---- LangChain: structured output, by a JSON schema and by a forced function call --------------------------------
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server, method):
    """`ChatOpenAI.with_structured_output(Model, method=...)`: json_schema sends a strict response_format,
    function_calling a tool and tool_choice naming it (parallel_tool_calls false); either way a valid object."""
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Doc(BaseModel):
        """What a Python docs entry describes."""
        name: str = Field(max_length=30, description="the object's name")
        kind: Literal["function", "class", "module"]
        lines: int = Field(ge=1, le=9999)

    llm = ChatOpenAI(model="tiny-pydoc", base_url=f"{server}/v1", api_key="unused", temperature=0, max_tokens=200,
                     max_retries=0, extra_body=NO_THINKING)
    got = llm.with_structured_output(Doc, method=method, strict=True).invoke("Describe os.path.join.")
    assert isinstance(got, Doc) and 1 <= got.lines <= 9999 and len(got.name) <= 30, got


# ---- the OpenAI Agents SDK: an agent with a function tool, over Chat Completions ----------------------------------
@pytest.mark.parametrize("streamed", [False, True])
def test_openai_agents_runs_a_tool(server, streamed):
    """An agent with a function tool, the SDK's defaults (tool_choice left to the model) but one call a turn and
    the run ending at the tool's result (`stop_on_first_tool`): the bundled model, fine-tuned to call tools
    (scripts/train_tool_model.py), calls get_weather with a city (a made-up one: its card), and the tool's result
    is the agent's answer, streamed and not."""
    import asyncio

    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool,
                        set_tracing_disabled)
    from agents.items import ToolCallItem, ToolCallOutputItem
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no trace upload to OpenAI's servers
    calls = []

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=30)]) -> str:  # this model rambles in free text
        """The weather forecast for a city."""
        calls.append(city)
        return f"It is sunny in {city}, 21 degrees."

    model = OpenAIChatCompletionsModel(model="tiny-pydoc", openai_client=AsyncOpenAI(
        base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300))
    agent = Agent(name="weather", instructions="Answer weather questions with the get_weather tool.",
                  tools=[get_weather], model=model, tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(parallel_tool_calls=False, temperature=0,
                                               max_tokens=120, extra_body=NO_THINKING))
    question = "What is the weather in Paris?"

    async def run():
        if not streamed:
            return await Runner.run(agent, question, max_turns=2)
        result = Runner.run_streamed(agent, question, max_turns=2)
        events = [event async for event in result.stream_events()]
        assert any(e.type == "raw_response_event" for e in events)  # token deltas did stream
        return result

    result = asyncio.run(run())
    assert len(calls) == 1 and isinstance(calls[0], str) and calls[0], calls
    kinds = [type(item) for item in result.new_items]
    assert ToolCallItem in kinds and ToolCallOutputItem in kinds, kinds
    assert result.final_output == f"It is sunny in {calls[0]}, 21 degrees."
