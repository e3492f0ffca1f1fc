"""Teaches the bundled default model (qwenjax/assets/tiny-pydoc) to call tools, in Qwen3.5's tool-call format.

    python scripts/train_tool_model.py                     # fine-tunes the bundled model in place
    python scripts/train_tool_model.py --steps 4 --eval-per-tool 2 --out /tmp/tiny-pydoc-tools   # a quick trial

The model trained by scripts/train_default_model.py (with the MTP head of scripts/train_mtp_head.py) writes
Python-docs English and follows no instructions. This script
1. writes synthetic tool-use conversations with a fixed seed (`conversation`): six functions with typed
   parameters (`TOOLS`: weather, calculator, time, docs search, unit conversion, stock price), a random subset of
   them offered in a random order with varied descriptions, the user's question in varied phrasings. Three kinds:
   `call` (a question an offered tool answers: the reply is the call), `answer` (the call, its `tool` result, and
   an answer in text taken from the result) and `no_fit` (a docs question, chit-chat, or a question for a tool
   that is not offered: a text answer). Training values (cities, stock symbols, docs queries, time zones) come
   from the training pools; --made-up makes a share of them up per question, so that remembering values cannot
   lower the loss of a call's arguments, only copying them from the question can, and --copy-rows adds rows that
   only ask to repeat made-up values. Neither taught this model to copy within the step budget of a 2-core CPU
   (0.8 made up with 2,400 copy rows, and none: held-out argument accuracy 0 both times), so the default is none.
   The defaults pick the tool on 98% of held-out calls (40 steps of whole conversations gave 69-75%) but raise
   the docs held-out loss from 3.96 to 4.37 nats; with 2,400 docs pieces (--doc-pieces 2400 --short-docs 1.0
   --steps 220) it rose only to 4.02 and selection fell to 44%. The bundled weights are three runs in a row,
   each from the one before (--model): the defaults; then --doc-pieces 1500 --steps 200 (selection 100%, docs
   4.19); then --short-steps 10 --short-docs 1.0 --doc-pieces 2400 --conversations 300 --steps 120 --lr 5e-4
   (selection 100%, docs 4.07, under tests/test_default_model.py's floor of 4.16). The card keeps each run's
   record (`tool_finetune.continues`). Assistant turns are written as Qwen3.5's
   template renders a turn after the last question: an empty `<think>\\n\\n</think>\\n\\n` and then the call or
   the text. That is the text that follows both generation prompts (thinking on opens `<think>\\n`; off writes
   the whole empty block), so one training turn serves both;
2. fine-tunes the whole model in two phases, first on single questions without tools block or system message
   (short rows, many to a batch), then on whole conversations, each mixed with pieces of its Python-docs training
   split (so it keeps its English and its MTP head stays in step), with qwenjax's trainer
   (`qwenjax.train.loop.finetune`: only the assistant turns of a conversation carry the loss). The trainer's
   JSONL rows render `messages` without `tools`, so each row carries the tools block in its system message:
   `training_row` checks that the text it renders is the text the template renders with `tools=`;
3. measures, on the shipped bf16 weights: held-out conversations (another seed; cities, stock symbols, queries,
   time zones and docs questions never trained on) answered greedily from the chat template's prompt, as
   `qwenjax serve` prompts, and read by `qwenjax.serve.reply_parser.ReplyParser` (tool selection, arguments equal
   to the expected ones with their JSON types, no call where no tool fits, answers that state the tool result),
   with thinking on and off; the docs held-out loss; the MTP head as scripts/train_mtp_head.py measures it
   (greedy speculative acceptance from 24 held-out docs prompts of 32 tokens, 48 new). If the acceptance at k = 1
   fell below --mtp-target, the head alone is trained again on the new model's greedy continuations
   (scripts/train_mtp_head.py's method, from the current head) and measured again;
4. writes the weights (bf16) and the model card (training.json) into --out, each file replaced atomically; into
   the bundled directory only those two files (its tokenizer, config and chat template stay as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwenjax.demo import DEFAULT_MODEL_DIR, install_model_dir  # noqa: E402
from scripts.train_default_model import HOLDOUT_EVERY, heldout_loss, pieces, python_docs  # noqa: E402

# the conversations trained on (and TRAIN_SEED + 1, TRAIN_SEED + 2), the held-out ones, and held-out ones with the
# training pools' values
TRAIN_SEED, EVAL_SEED, SEEN_SEED = 0, 1, 101
KINDS = ("call", "answer", "no_fit")
REFUSAL = "Sorry, "  # how the answers to questions for a tool not offered begin
CALL_TEXT = "<tool_call>"  # in a reply to a conversation without tools, a call the server would not parse

# ---- what the user asks about: each pool split into training and held-out values --------------------------------
CITIES = {"train": ("Paris", "London", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Warsaw", "Dublin",
                    "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels", "Zurich", "Athens",
                    "Istanbul", "Cairo", "Nairobi", "Lagos", "Cape Town", "Dubai", "Mumbai", "Delhi", "Bangkok",
                    "Singapore", "Jakarta", "Manila", "Seoul", "Tokyo", "Beijing", "Shanghai", "Hong Kong", "Sydney",
                    "Melbourne", "Auckland", "Toronto", "Montreal", "Vancouver", "New York", "Boston", "Chicago",
                    "Denver", "Seattle", "San Francisco", "Los Angeles", "Miami", "Mexico City", "Lima", "Bogota",
                    "Santiago", "Buenos Aires", "Sao Paulo", "Reykjavik", "Edinburgh", "Geneva", "Osaka", "Budapest"),
          "eval": ("Lyon", "Munich", "Kyoto", "Porto", "Krakow", "Marseille", "Hamburg", "Valencia", "Perth",
                   "Calgary", "Houston", "Phoenix", "Bergen", "Seville", "Florence", "Busan", "Quito", "Accra",
                   "Hanoi", "Tallinn")}
SYMBOLS = {"train": ("AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA", "IBM", "ORCL", "INTC", "AMD", "META", "NFLX",
                     "ADBE", "CSCO", "QCOM", "PYPL", "SAP", "SONY", "UBER", "SHOP"),
           "eval": ("TXN", "CRM", "ASML", "NOW", "ABNB", "SNOW")}
QUERIES = {"train": ("asyncio", "json", "regular expressions", "list comprehensions", "context managers", "decorators",
                     "string formatting", "pathlib", "dataclasses", "generators", "exceptions", "f-strings",
                     "the with statement", "unittest", "logging", "itertools", "functools", "threading", "subprocess",
                     "type hints", "sorting", "dictionaries", "sets", "tuples", "slicing", "lambda", "closures",
                     "iterators", "the import system", "virtual environments", "collections", "datetime", "csv",
                     "sqlite3", "argparse", "random numbers", "bytes and bytearray", "unicode", "os.path", "socket"),
           "eval": ("multiprocessing", "enum", "typing.Protocol", "zipfile", "heapq", "abstract base classes",
                    "pickle", "the walrus operator")}
UNITS = (("miles", "kilometers", 1.609344), ("kilometers", "miles", 1 / 1.609344), ("kilograms", "pounds", 2.20462),
         ("pounds", "kilograms", 0.453592), ("feet", "meters", 0.3048), ("meters", "feet", 3.28084),
         ("liters", "gallons", 0.264172), ("gallons", "liters", 3.78541), ("inches", "centimeters", 2.54),
         ("centimeters", "inches", 1 / 2.54), ("ounces", "grams", 28.3495), ("grams", "ounces", 1 / 28.3495),
         ("celsius", "fahrenheit", None), ("fahrenheit", "celsius", None))
CONDITIONS = ("sunny", "cloudy", "rainy", "snowy", "windy", "foggy", "clear", "stormy")
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
                  "You are an assistant with access to tools.", "Use the tools when they help.")
CHITCHAT = (("Hi!", "Hello! How can I help you?"), ("Hello, who are you?", "I am a small assistant model."),
            ("Thanks!", "You are welcome."), ("Thank you for your help.", "Glad to help."),
            ("Good morning.", "Good morning! What can I do for you?"),
            ("What can you do?", "I can answer questions about Python and use the tools I am given."))


# Made-up training values (`made_up` of them, one per question) never repeat often enough to be remembered: the
# only way to lower the loss on a call's arguments is then to copy them from the question (the held-out values,
# real names, are never trained on). See the module docstring for why the default is none.
MADE_UP = 0.0  # the share of training values made up (--made-up)
_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "ch", "st", "tr",
           "gr", "pl", "sh", "th", "")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea", "y")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "t", "k", "x", "nd", "rt")


def made_up_word(rng, syllables: tuple[int, int] = (1, 4)) -> str:
    return "".join(_pick(rng, _ONSETS) + _pick(rng, _VOWELS) + _pick(rng, _CODAS)
                   for _ in range(int(rng.integers(*syllables))))


def made_up_city(rng) -> str:
    name = made_up_word(rng, (2, 4)).capitalize()
    r = rng.random()
    return (f"{_pick(rng, ('San', 'New', 'Port', 'Saint', 'Los', 'El', 'Fort'))} {name}" if r < 0.12
            else f"{name} {made_up_word(rng, (1, 3)).capitalize()}" if r < 0.2 else name)


def made_up_symbol(rng) -> str:
    return "".join(chr(65 + int(c)) for c in rng.integers(0, 26, size=int(rng.integers(2, 6))))


def made_up_query(rng) -> str:
    words = [made_up_word(rng) for _ in range(int(rng.integers(1, 4)))]
    r = rng.random()
    return ("_".join(words) if r < 0.2 else ".".join(words[:2]) if r < 0.35 else f"the {' '.join(words)}"
            if r < 0.45 else " ".join(words))


def made_up_zone(rng) -> str:
    city = made_up_city(rng).replace(" ", "_")
    return f"{_pick(rng, ('Europe', 'America', 'Asia', 'Africa', 'Australia', 'Pacific', 'Atlantic', 'Indian'))}/{city}"


def _value(rng, split: str, pools: dict, pool: tuple, make) -> str:
    return make(rng) if split == "train" and rng.random() < pools["made_up"] else _pick(rng, pool)


def _time_zones() -> dict[str, tuple[str, ...]]:
    """IANA zone names of the form Area/City (every fifth held out), and UTC."""
    import zoneinfo

    zones = sorted(z for z in zoneinfo.available_timezones() if z.count("/") == 1 and not z.startswith("Etc/"))
    return {"train": ("UTC", *(z for i, z in enumerate(zones) if i % 5)),
            "eval": tuple(z for i, z in enumerate(zones) if i % 5 == 0)}


def _docs_questions() -> dict[str, tuple[tuple[str, str], ...]]:
    """(a builtin or a method of a builtin type, the first sentence-like paragraph of its docstring), every fifth
    held out: the answers to docs questions, from the docs the model was trained on."""
    import builtins

    objects = [(f"{n}()", getattr(builtins, n)) for n in sorted(dir(builtins))
               if not n.startswith("_") and callable(getattr(builtins, n))
               and not (isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), BaseException))]
    for cls in (str, list, dict, set, bytes, int, float, tuple):
        objects += [(f"{cls.__name__}.{n}()", getattr(cls, n)) for n in sorted(vars(cls)) if not n.startswith("_")]
    out = []
    for name, obj in objects:
        paragraphs = [p.strip() for p in (obj.__doc__ or "").split("\n\n")]
        first = next((p for p in paragraphs if p[:1].isupper() and "->" not in p and ">>>" not in p), None)
        if first:
            first = " ".join(first.split())
            cut = first.rfind(". ", 0, 300)
            out.append((name, first if len(first) <= 300 else first[:cut + 1] if cut > 0 else first[:300]))
    return {"train": tuple(q for i, q in enumerate(out) if i % 5), "eval": tuple(q for i, q in enumerate(out)
                                                                                 if i % 5 == 0)}


# ---- the tools: schema, question, result, answer ---------------------------------------------------------------
def _tool(rng, name: str, descriptions: tuple, properties: dict, required: list) -> dict:
    """An OpenAI tool with one of `descriptions` (None: none), each property's description kept or dropped, and
    sometimes `additionalProperties: false` (as pydantic and agent SDKs write schemas)."""
    props = {}
    for key, (schema, described) in properties.items():
        props[key] = {**schema, "description": described} if described and rng.random() < 0.6 else dict(schema)
    params = {"type": "object", "properties": props, "required": required}
    if rng.random() < 0.25:
        params["additionalProperties"] = False
    description = descriptions[rng.integers(len(descriptions))]
    function = {"name": name, **({"description": description} if description else {}), "parameters": params}
    return {"type": "function", "function": function}


def _pick(rng, values):
    return values[rng.integers(len(values))]


def _number(rng) -> int | float:
    return int(rng.integers(1, 500)) if rng.random() < 0.6 else round(float(rng.integers(1, 2000)) / 4, 2)


# each tool's descriptions (None: none), one drawn per conversation
DESCRIPTIONS = {
    "get_weather": ("Get the current weather in a given city.", "Get the current weather for a location.",
                    "Look up today's weather in a city.", None),
    "calculator": ("Evaluate an arithmetic expression.", "A calculator: evaluates a math expression and returns the "
                   "result.", "Do arithmetic.", None),
    "get_time": ("Get the current time in a time zone.", "Returns the local time for an IANA time zone.", None),
    "search_docs": ("Search the Python documentation.", "Full-text search over the docs; returns matching page "
                    "titles.", None),
    "convert_units": ("Convert a value from one unit to another.", "Unit conversion.", None),
    "get_stock_price": ("Get the latest stock price for a ticker symbol.", "Stock quotes.", None)}


def weather(rng, split: str, pools: dict, tool: dict | None = None):
    key = "city" if rng.random() < 0.75 else "location"  # the parameter's name is read from the schema
    tool = tool or _tool(rng, "get_weather", DESCRIPTIONS["get_weather"],
                         {key: ({"type": "string"}, "The city, e.g. Paris" if key == "city" else "The city name"),
                          "unit": ({"type": "string", "enum": ["celsius", "fahrenheit"]}, "Temperature unit")}, [key])
    key = tool["function"]["parameters"]["required"][0]
    city = _value(rng, split, pools, CITIES[split], made_up_city)
    unit = _pick(rng, ("celsius", "fahrenheit")) if rng.random() < 0.3 else None
    if unit:
        question = _pick(rng, ("What's the weather in {c} in {u}?", "Give me the temperature in {c} in {u}.",
                               "How warm is it in {c}? Use {u}.", "Weather for {c} in {u}, please."))
    else:
        question = _pick(rng, ("What's the weather in {c}?", "What is the weather like in {c} today?",
                               "How's the weather in {c}?", "Is it raining in {c}?", "Is it cold in {c} right now?",
                               "weather in {c}", "Tell me the current weather for {c}.", "How hot is it in {c}?",
                               "Can you check the weather in {c} for me?", "Do I need an umbrella in {c} today?"))
    args = {key: city, **({"unit": unit} if unit else {})}
    temp, cond, unit = int(rng.integers(-10, 35)), _pick(rng, CONDITIONS), unit or "celsius"
    result = json.dumps({"city": city, "temperature": temp, "unit": unit, "condition": cond})
    answer = _pick(rng, ("It is {t} degrees {u} and {k} in {c}.", "{c}: {k}, {t} degrees {u}.",
                         "The weather in {c} is {k} with a temperature of {t} degrees {u}."))
    return (tool, question.format(c=city, u=unit), args, result, answer.format(t=temp, u=unit, k=cond, c=city),
            [str(temp), cond], f"Sorry, I have no way to look up the weather in {city}.")


def calculator(rng, split: str, pools: dict, tool: dict | None = None):
    tool = tool or _tool(rng, "calculator", DESCRIPTIONS["calculator"],
                         {"expression": ({"type": "string"}, "The expression, e.g. 2 * (3 + 4)")}, ["expression"])
    a, b, c = (int(rng.integers(1, 1000)) for _ in range(3))
    form = int(rng.integers(7))
    expression = (f"{a} + {b}", f"{a} - {b}", f"{a} * {b}", f"{a} / {b}", f"({a} + {b}) * {c}", f"{a} * {b} - {c}",
                  f"{a} + {b} + {c}")[form]
    value = eval(expression)  # noqa: S307 - an expression this function just wrote from integers
    if form < 3 and rng.random() < 0.2:  # words for the operator: the call writes the symbol
        spoken = expression.replace("+", "plus").replace("-", "minus").replace("*", "times")
        question = _pick(rng, ("What is {e}?", "How much is {e}?")).format(e=spoken)
    else:
        question = _pick(rng, ("What is {e}?", "Calculate {e}.", "What's {e}?", "Compute {e} please.",
                               "How much is {e}?", "{e} = ?", "Can you work out {e}?", "Solve {e}.")).format(
            e=expression)
    value = round(value, 4)
    shown = json.dumps(value)
    answer = _pick(rng, ("{e} = {r}.", "The result is {r}.", "That comes to {r}.")).format(e=expression, r=shown)
    return (tool, question, {"expression": expression}, json.dumps({"result": value}), answer, [shown],
            f"Sorry, I can't evaluate {expression} here.")


def get_time(rng, split: str, pools: dict, tool: dict | None = None):
    tool = tool or _tool(rng, "get_time", DESCRIPTIONS["get_time"],
                         {"timezone": ({"type": "string"}, "An IANA time zone, e.g. Europe/Paris")}, ["timezone"])
    zone = _value(rng, split, pools, pools["zones"][split], made_up_zone)
    question = _pick(rng, ("What time is it in {z}?", "What's the current time in {z}?", "time in {z}?",
                           "Tell me the time in the {z} time zone.", "Current time for {z}, please.")).format(z=zone)
    clock = f"{int(rng.integers(24)):02d}:{int(rng.integers(60)):02d}"
    answer = _pick(rng, ("It is {t} in {z}.", "The time in {z} is {t}.")).format(t=clock, z=zone)
    return (tool, question, {"timezone": zone}, json.dumps({"timezone": zone, "time": clock}), answer, [clock],
            f"Sorry, I can't tell the time in {zone}.")


def search_docs(rng, split: str, pools: dict, tool: dict | None = None):
    tool = tool or _tool(rng, "search_docs", DESCRIPTIONS["search_docs"],
                         {"query": ({"type": "string"}, "What to look for"),
                          "limit": ({"type": "integer"}, "How many results to return")}, ["query"])
    query = _value(rng, split, pools, QUERIES[split], made_up_query)
    limit = int(rng.integers(1, 11)) if rng.random() < 0.35 else None
    if limit:
        question = _pick(rng, ("Find {n} pages in the docs about {q}.", "Search the docs for {q} and show {n} "
                               "results.", "Give me the top {n} doc results for {q}.")).format(n=limit, q=query)
    else:
        question = _pick(rng, ("Search the docs for {q}.", "Find documentation about {q}.", "Look up {q} in the "
                               "Python docs.", "Where do the docs explain {q}?")).format(q=query)
    titles = [f"{query} ({_pick(rng, ('tutorial', 'reference', 'how-to', 'library'))})"
              for _ in range(min(limit or 2, 3))]
    answer = f"I found {len(titles)} page{'s' * (len(titles) > 1)} about {query}: {', '.join(titles)}."
    return (tool, question, {"query": query, **({"limit": limit} if limit else {})}, json.dumps({"results": titles}),
            answer, [titles[0]], f"Sorry, I can't search the documentation for {query} right now.")


def convert_units(rng, split: str, pools: dict, tool: dict | None = None):
    tool = tool or _tool(rng, "convert_units", DESCRIPTIONS["convert_units"],
                         {"value": ({"type": "number"}, "The amount to convert"),
                          "from": ({"type": "string"}, "Its unit"), "to": ({"type": "string"}, "The unit wanted")},
                         ["value", "from", "to"])
    src, dst, factor = _pick(rng, UNITS)
    value = _number(rng)
    question = _pick(rng, ("Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?",
                           "{v} {f} in {t}?", "Please convert {v} {f} into {t}.")).format(v=value, f=src, t=dst)
    out = (value * 9 / 5 + 32 if src == "celsius" else (value - 32) * 5 / 9) if factor is None else value * factor
    out = round(out, 2)
    shown = json.dumps(out)
    return (tool, question, {"value": value, "from": src, "to": dst}, json.dumps({"value": out, "unit": dst}),
            f"{value} {src} is {shown} {dst}.", [shown], f"Sorry, I can't convert {src} to {dst} here.")


def stock_price(rng, split: str, pools: dict, tool: dict | None = None):
    tool = tool or _tool(rng, "get_stock_price", DESCRIPTIONS["get_stock_price"],
                         {"symbol": ({"type": "string"}, "The ticker, e.g. AAPL")}, ["symbol"])
    symbol = _value(rng, split, pools, SYMBOLS[split], made_up_symbol)
    question = _pick(rng, ("What's the stock price of {s}?", "How is {s} trading today?", "Price of {s} shares?",
                           "Get me a quote for {s}.")).format(s=symbol)
    price = float(rng.integers(1000, 90000)) / 100
    shown = json.dumps(price)  # the answer copies the result's number as the result writes it
    return (tool, question, {"symbol": symbol}, json.dumps({"symbol": symbol, "price": price, "currency": "USD"}),
            f"{symbol} is trading at {shown} USD.", [shown], f"Sorry, I have no access to the price of {symbol}.")


TOOLS = {"get_weather": weather, "calculator": calculator, "get_time": get_time, "search_docs": search_docs,
         "convert_units": convert_units, "get_stock_price": stock_price}


def pools(made_up: float = MADE_UP) -> dict:
    """The time zones and docs questions of each split, and the share of training values made up."""
    return {"zones": _time_zones(), "docs": _docs_questions(), "made_up": made_up}


def conversation(rng, split: str, pools: dict, kind: str | None = None, tool: str | None = None,
                 exchanges: int = 1) -> dict:
    """One conversation: {"kind", "tools" (None or OpenAI tools), "messages" (ending with the assistant turn to
    learn or to predict), "expect" ({"name", "arguments"} for a call; {"facts"} for an answer; {} for no_fit)}.

    It has `exchanges` questions; `kind` (default: drawn) is the last one's (`tool`: the tool it asks for). The
    earlier ones are answered in full (a call, its result and the answer, or a text answer) and come before the
    last question, where the template writes assistant turns without their think block; several of them share one
    tools block, the bulk of a conversation's tokens."""
    names = list(TOOLS)
    kind = kind or _pick(rng, ("call",) * 9 + ("answer",) * 6 + ("no_fit",) * 5)
    if kind == "no_fit" and rng.random() < 0.25:  # no tools at all: every question answered in text
        offered = []
    else:
        offered = [str(n) for n in rng.choice(names, size=int(rng.integers(1, 4)), replace=False)]
        target = tool or _pick(rng, names)  # the last question's tool
        if kind != "no_fit" and target not in offered:
            offered[int(rng.integers(len(offered)))] = target
    schemas = {n: TOOLS[n](rng, split, pools)[0] for n in offered}
    messages = [{"role": "system", "content": _pick(rng, SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    if exchanges == 1 and rng.random() < 0.15:  # an earlier exchange in the history
        q, a = _pick(rng, CHITCHAT) if rng.random() < 0.5 else _docs_turn(rng, pools["docs"][split])
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    expect: dict = {}
    for i in range(exchanges):
        last = i == exchanges - 1
        now = kind if last else _pick(rng, ("answer", "answer", "no_fit")) if offered else "no_fit"
        if now == "no_fit":
            missing = [n for n in names if n not in offered]
            if rng.random() < 0.5:  # a question for a tool that is not offered
                asked = TOOLS[_pick(rng, missing)](rng, split, pools)
                q, a = asked[1], asked[6]
            else:  # a docs question or chit-chat
                q, a = _docs_turn(rng, pools["docs"][split]) if rng.random() < 0.75 else _pick(rng, CHITCHAT)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            expect = {}
            continue
        name = target if last else _pick(rng, offered)
        _, question, args, result, answer, facts, _ = TOOLS[name](rng, split, pools, schemas[name])
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": args}}]}]
        expect = {"name": name, "arguments": args}
        if now == "answer":
            messages += [{"role": "tool", "content": result}, {"role": "assistant", "content": answer}]
            expect = {"facts": facts}
    return {"kind": kind, "tools": [schemas[n] for n in offered] or None, "messages": messages, "expect": expect}


def _docs_turn(rng, docs) -> tuple[str, str]:
    name, text = _pick(rng, docs)
    return _pick(rng, ("What does {n} do?", "Explain {n}.", "What is {n} for?", "Tell me about {n}.")).format(
        n=name), text


def conversations(seed: int, split: str, n: int, exchanges: int | None = None,
                  made_up: float = MADE_UP) -> list[dict]:
    """`n` conversations of `exchanges` questions (default: 40% of one, the others of 2 to 4)."""
    rng, p = np.random.default_rng(seed), pools(made_up)
    return [conversation(rng, split, p, exchanges=exchanges or (1 if rng.random() < 0.4 else int(rng.integers(2, 5))))
            for _ in range(n)]


def heldout_conversations(per_tool: int, seed: int = EVAL_SEED, split: str = "eval") -> list[dict]:
    """`per_tool` call and `per_tool // 2` answer conversations per tool, and as many no_fit ones as calls / 2,
    drawn with another seed than training's. `split` "eval": cities, symbols, queries, zones and docs questions
    never trained on; "train": those of the training pools (never a made-up one), in conversations never trained
    on (numbers are drawn afresh in both)."""
    rng, p = np.random.default_rng(seed), pools(made_up=0.0)
    out = [conversation(rng, split, p, "call", name) for name in TOOLS for _ in range(per_tool)]
    out += [conversation(rng, split, p, "answer", name) for name in TOOLS for _ in range(max(1, per_tool // 2))]
    return out + [conversation(rng, split, p, "no_fit") for _ in range(max(1, len(TOOLS) * per_tool // 2))]


# ---- training rows ------------------------------------------------------------------------------------------------
def training_row(tokenizer, conv: dict) -> dict:
    """The conversation as a `qwenjax finetune` chat row: the trainer renders `messages` without `tools`, so the
    tools block goes into the system message, where the template writes it; checked to render the same text."""
    messages = conv["messages"]
    if conv["tools"]:
        marker = "\x00system\x00"
        with_tools = tokenizer.apply_chat_template([{"role": "system", "content": marker},
                                                    {"role": "user", "content": "x"}], tools=conv["tools"],
                                                   add_generation_prompt=False)
        block = with_tools[len("<|im_start|>system\n"):with_tools.index("\n\n" + marker)]
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        rest = messages[1:] if system else messages
        messages = [{"role": "system", "content": block + ("\n\n" + system if system else "")}, *rest]
    want = tokenizer.apply_chat_template(conv["messages"], tools=conv["tools"], add_generation_prompt=False)
    got = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if got != want:
        raise AssertionError(f"the tools block moved into the system message renders differently:\n{got[:400]}")
    return {"messages": messages}


# ---- held-out measurement ------------------------------------------------------------------------------------------
def same_typed(got, want) -> bool:
    """Equal with the same JSON type: numbers as numbers (1 and 1.0 alike, never a bool), strings as strings."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same_typed(got[k], want[k]) for k in want)
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and got == want
    return type(got) is type(want) and got == want


def replies(m, tokenizer, convs: list[dict], *, enable_thinking: bool, max_new_tokens: int = 96,
            batch: int = 24) -> list[tuple[str, str, list]]:
    """Each conversation's last assistant turn answered greedily from the template's prompt (as `qwenjax serve`
    renders it), read by the server's reply parser: (reasoning, content, tool calls)."""
    import qwenjax
    from qwenjax.serve.reply_parser import ReplyParser, collect

    prompts = [tokenizer.encode(tokenizer.apply_chat_template(c["messages"][:-1], tools=c["tools"],
                                                              enable_thinking=enable_thinking)) for c in convs]
    order = sorted(range(len(convs)), key=lambda i: len(prompts[i]))  # similar lengths batched together
    eos = tokenizer.token_to_id("<|im_end|>")
    out: list = [None] * len(convs)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        for i, ids in zip(rows, qwenjax.generate(m, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                                                 temperature=0.0, eos_token_ids=[eos])):
            parser = ReplyParser(enable_thinking, convs[i]["tools"], parse_tools=bool(convs[i]["tools"]))
            out[i] = collect(parser.feed(tokenizer.decode(ids, skip_special_tokens=True)) + parser.finish())
    return out


def score(convs: list[dict], answers: list[tuple[str, str, list]]) -> dict:
    """Tool selection (the first parsed call names the expected function) and arguments (and its arguments equal
    the expected ones, typed) over the `call` conversations, per tool and in all; no call and some text over the
    `no_fit` ones; no call and every fact of the tool's result stated over the `answer` ones."""
    per_tool: dict[str, list[tuple[bool, bool]]] = {}
    no_call, answered = [], []
    for conv, (_, content, calls) in zip(convs, answers):
        if conv["kind"] == "call":
            want = conv["expect"]
            picked = bool(calls) and calls[0].name == want["name"]
            typed = picked and same_typed(json.loads(calls[0].arguments), want["arguments"])
            per_tool.setdefault(want["name"], []).append((picked, typed))
        elif conv["kind"] == "no_fit":
            no_call.append(not calls and CALL_TEXT not in content and bool(content.strip()))
        else:
            answered.append(not calls and all(f in content for f in conv["expect"]["facts"]))
    flat = [r for rows in per_tool.values() for r in rows]
    mean = lambda xs: round(sum(xs) / len(xs), 4)
    return {"tool_selection_accuracy": mean([p for p, _ in flat]), "argument_accuracy": mean([t for _, t in flat]),
            "no_call_accuracy": mean(no_call), "answer_from_result_accuracy": mean(answered),
            "per_tool": {n: {"selection": mean([p for p, _ in rows]), "arguments": mean([t for _, t in rows])}
                         for n, rows in per_tool.items()},
            "conversations": {"call": len(flat), "no_fit": len(no_call), "answer": len(answered)}}


def tool_accuracy(m, tokenizer, convs: list[dict]) -> dict:
    out = {}
    for thinking in (True, False):
        answers = replies(m, tokenizer, convs, enable_thinking=thinking)
        out["thinking_on" if thinking else "thinking_off"] = result = score(convs, answers)
        print(f"thinking {'on' if thinking else 'off'}: selection {result['tool_selection_accuracy']:.1%}, arguments "
              f"{result['argument_accuracy']:.1%}, no call {result['no_call_accuracy']:.1%}, answers from results "
              f"{result['answer_from_result_accuracy']:.1%}; per tool {result['per_tool']}", flush=True)
    return out


# ---- the run --------------------------------------------------------------------------------------------------------
def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _replace_file(source: str, target: str) -> None:
    """`target` replaced by a copy of `source` in one rename (readable by all: it ships in the package)."""
    staged = f"{target}.tmp-{os.getpid()}"
    shutil.copyfile(source, staged)
    os.chmod(staged, 0o644)
    os.replace(staged, target)


def refresh_mtp_head(model_dir: str, work: str, train_texts: list[str], args) -> tuple[object, dict]:
    """scripts/train_mtp_head.py's method from the head the model has: the head alone trained on the model's own
    greedy continuations of training pieces. Returns (the model loaded from the run's export, the head's record)."""
    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer
    from qwenjax.train.loop import RunConfig, finetune
    from qwenjax.train.step import TrainConfig
    from scripts.train_mtp_head import greedy_continuations

    rng = np.random.default_rng(args.seed)
    tok = Tokenizer(model_dir)
    model = qwenjax.from_pretrained(model_dir, dtype="float32")
    chosen = [train_texts[i] for i in sorted(rng.choice(len(train_texts), size=args.mtp_pieces, replace=False))]
    texts = greedy_continuations(model, tok, chosen, args.continuation_tokens)
    data = os.path.join(work, "mtp.jsonl")
    _write_jsonl(data, [{"text": t} for t in texts])
    train = TrainConfig(learning_rate=args.mtp_lr, warmup_steps=min(10, args.mtp_steps // 10),
                        total_steps=args.mtp_steps, final_lr_ratio=0.05, weight_decay=0.1, seed=args.seed,
                        mtp_weight=1.0, mtp_only=True)
    run = RunConfig(pack_len=512, rows=8, save_every=args.mtp_steps)
    history = finetune(model, tok, data, os.path.join(work, "mtp-run"), train=train, run=run, overwrite=True)
    record = {"what": "the head alone trained again (from the head it had) on the fine-tuned model's greedy "
                      f"continuations of {args.continuation_tokens} tokens after the first 32 tokens of "
                      f"{len(texts)} training pieces, as scripts/train_mtp_head.py trains it",
              "steps": args.mtp_steps, "rows": 8, "pack_len": 512, "learning_rate": args.mtp_lr,
              "train_mtp_loss_last_20_steps": round(sum(h["mtp_loss"] for h in history[-20:]) / len(history[-20:]), 4)}
    return os.path.join(work, "mtp-run", "export"), record


def mtp_figures(model_dir: str, heldout: list[str]) -> dict:
    """The MTP head's held-out figures as scripts/train_mtp_head.py measures them, on the model in `model_dir`."""
    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer
    from scripts.train_mtp_head import PROMPT_TOKENS, acceptance, heldout_mtp

    m, tok = qwenjax.from_pretrained(model_dir, dtype="float32"), Tokenizer(model_dir)
    loss, top1 = heldout_mtp(m, tok, heldout, 512)
    print(f"MTP head, held out: loss {loss:.3f} nats at token t+2, top-1 accuracy {top1:.1%}", flush=True)
    return {"heldout_mtp_loss": round(loss, 4), "heldout_top1_t_plus_2": round(top1, 4),
            "greedy_speculative_acceptance_24_heldout_prompts_of_32_tokens_48_new":
                acceptance(m, tok, heldout[:24], prompt_tokens=PROMPT_TOKENS, new_tokens=48)}


def copy_exercises(seed: int, n: int) -> list[dict]:
    """`n` one-turn chat rows whose answer repeats a list of made-up values from the question (city and function
    names, ticker symbols, numbers, time zones): every answer token but the first can only be predicted by copying,
    the skill a call's arguments need (the docs model has none: it does not continue a repeated random sequence)."""
    rng = np.random.default_rng(seed)
    makers = (made_up_city, made_up_symbol, made_up_query, made_up_zone, made_up_word,
              lambda r: str(_number(r)))
    asks = ("Repeat after me: {x}", "Say {x}", "Copy this: {x}", "Write back {x}", "Echo: {x}", "{x}")
    rows = []
    for _ in range(n):
        make = makers[int(rng.integers(len(makers)))]
        values = [make(rng) if rng.random() < 0.8 else _pick(rng, makers)(rng) for _ in range(int(rng.integers(1, 7)))]
        text = _pick(rng, (" ", ", ", " ")).join(values)
        rows.append({"messages": [{"role": "user", "content": _pick(rng, asks).format(x=text)},
                                  {"role": "assistant", "content": text}]})
    return rows


def short_row(conv: dict) -> dict:
    """The conversation's last question and what answers it, without system message or tools: the first phase's
    rows (short, so a batch holds many questions)."""
    start = max(i for i, m in enumerate(conv["messages"]) if m["role"] == "user")
    return {"messages": conv["messages"][start:]}


def _phase(model_dir: str, tok, rows: list[dict], run_dir: str, *, steps: int, lr: float, pack_len: int,
           batch_rows: int, args) -> tuple[str, dict]:
    """`finetune` of the model in `model_dir` on `rows` (JSONL); returns (its export, its record for the card)."""
    import qwenjax
    from qwenjax.train.loop import RunConfig, finetune
    from qwenjax.train.step import TrainConfig

    data = f"{run_dir}.jsonl"
    _write_jsonl(data, rows)
    tokens = sum(len(tok.encode(tok.apply_chat_template(r["messages"], add_generation_prompt=False)
                                if "messages" in r else r["text"])) for r in rows)
    train = TrainConfig(learning_rate=lr, warmup_steps=min(args.warmup, steps // 10), total_steps=steps,
                        final_lr_ratio=0.1, weight_decay=0.1, seed=args.seed, mtp_weight=args.mtp_weight)
    run = RunConfig(pack_len=pack_len, rows=batch_rows, save_every=steps, strict_data=True)
    print(f"{os.path.basename(run_dir)}: {len(rows)} rows, {tokens / 1e6:.2f} M tokens; {steps} steps x "
          f"{batch_rows} x {pack_len} = {steps * batch_rows * pack_len / tokens:.2f} epochs", flush=True)
    t = time.time()
    history = finetune(qwenjax.from_pretrained(model_dir, dtype="float32"), tok, data, run_dir, train=train, run=run,
                       overwrite=True)  # a scratch directory: a rerun starts over
    last = history[-20:]
    return os.path.join(run_dir, "export"), {
        "rows": len(rows), "tokens": tokens, "steps": steps, "batch": f"{batch_rows} x {pack_len}",
        "learning_rate": lr, "warmup_steps": train.warmup_steps, "mtp_weight": args.mtp_weight,
        "train_loss_last_20_steps": round(sum(h["loss"] for h in last) / len(last), 4),
        "seconds": round(time.time() - t)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help="the model to fine-tune (default: the bundled one)")
    p.add_argument("--out", default=DEFAULT_MODEL_DIR, help="where the model goes (the bundled directory: its "
                   "weights and card replaced; another: the whole model written there)")
    p.add_argument("--short-questions", type=int, default=2400, help="phase 1: single questions and their answers "
                   "without system message or tools block (many per batch: the model learns which call a question "
                   "needs)")
    p.add_argument("--copy-rows", type=int, default=0, help="phase 1: copy exercises (`copy_exercises`)")
    p.add_argument("--short-docs", type=float, default=0.5, help="phase 1: the share of the docs rows mixed in")
    p.add_argument("--short-steps", type=int, default=100)
    p.add_argument("--short-lr", type=float, default=1e-3)
    p.add_argument("--conversations", type=int, default=600, help="phase 2: whole conversations with their tools")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--pack-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--continuations", type=int, default=160, help="docs training pieces whose first 32 tokens the "
                   "model continues greedily (--continuation-tokens) for the docs rows mixed into both phases")
    p.add_argument("--doc-pieces", type=int, default=600, help="docs training pieces mixed in as they are")
    p.add_argument("--mtp-weight", type=float, default=0.5, help="the MTP head trained beside the model")
    p.add_argument("--made-up", type=float, default=MADE_UP, help="the share of training cities, symbols, queries "
                   "and zones made up per question (the rest from the training pools)")
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--eval-per-tool", type=int, default=8, help="held-out call conversations per tool (half as "
                   "many answer conversations per tool, and no_fit ones: half the calls)")
    p.add_argument("--mtp-target", type=float, default=0.7728, help="the k=1 acceptance the head must keep (the "
                   "card's before this fine-tune); below it the head is trained again")
    p.add_argument("--mtp-steps", type=int, default=60)
    p.add_argument("--mtp-lr", type=float, default=1e-3)
    p.add_argument("--mtp-pieces", type=int, default=800, help="training pieces whose continuations the head "
                   "is trained on again")
    p.add_argument("--continuation-tokens", type=int, default=96, help="the length of the greedy continuations "
                   "(the docs rows, and the head's data if it is trained again)")
    p.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    args = p.parse_args()

    import qwenjax
    from qwenjax.inference.tokenizer import Tokenizer
    from scripts.train_mtp_head import greedy_continuations

    t0 = time.time()
    work = args.work or tempfile.mkdtemp(prefix="qwenjax-train-tools-")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(args.model, "training.json")) as f:
        card = json.load(f)
    tok = Tokenizer(args.model)
    texts = pieces(python_docs())
    train_texts = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY]
    heldout = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY == 0]
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(len(train_texts), size=args.continuations + args.doc_pieces, replace=False)
    # the model's own greedy docs text: it keeps the model's docs behaviour and trains the MTP head on what it will
    # draft against (scripts/train_mtp_head.py's data); and corpus pieces as they are
    continued = [train_texts[i] for i in sorted(chosen[:args.continuations])]
    docs = greedy_continuations(qwenjax.from_pretrained(args.model, dtype="float32"), tok, continued,
                                args.continuation_tokens)
    docs += [train_texts[i] for i in sorted(chosen[args.continuations:])]
    docs = [{"text": t} for t in docs if len(tok.encode(t)) < 512]  # both phases' rows hold them

    # without the tools block a question for a tool that is not offered reads as one for a tool that is
    short = [c for c in conversations(args.seed + 1, "train", args.short_questions, exchanges=1,
                                          made_up=args.made_up)
             if not (c["kind"] == "no_fit" and c["messages"][-1]["content"].startswith(REFUSAL))]
    convs = [c for c in conversations(args.seed, "train", args.conversations, made_up=args.made_up)
             if len(tok.encode(tok.apply_chat_template(c["messages"], tools=c["tools"], add_generation_prompt=False)))
             < args.pack_len]  # a few of 4 questions are longer
    copies = copy_exercises(args.seed + 2, args.copy_rows)
    short_docs = docs[:round(len(docs) * args.short_docs)]
    export, phase1 = _phase(args.model, tok, [short_row(c) for c in short] + copies + short_docs,
                            os.path.join(work, "short"),
                            steps=args.short_steps, lr=args.short_lr, pack_len=512, batch_rows=8, args=args)
    export, phase2 = _phase(export, tok, [training_row(tok, c) for c in convs] + docs, os.path.join(work, "whole"),
                            steps=args.steps, lr=args.lr, pack_len=args.pack_len, batch_rows=args.rows, args=args)

    heads = {"before": card["mtp_head"]["greedy_speculative_acceptance_24_heldout_prompts_of_32_tokens_48_new"]}
    mtp = mtp_figures(export, heldout)
    refreshed = None
    if mtp["greedy_speculative_acceptance_24_heldout_prompts_of_32_tokens_48_new"]["k=1"]["acceptance_rate"] \
            < args.mtp_target and args.mtp_steps:
        heads["after"] = mtp["greedy_speculative_acceptance_24_heldout_prompts_of_32_tokens_48_new"]
        export, refreshed = refresh_mtp_head(export, work, train_texts, args)
        mtp = mtp_figures(export, heldout)

    t_eval = time.time()
    trained = qwenjax.from_pretrained(export, dtype="float32")
    accuracy = tool_accuracy(trained, Tokenizer(export), heldout_conversations(args.eval_per_tool))
    print("held-out conversations, training-pool values:", flush=True)
    seen = tool_accuracy(trained, Tokenizer(export), heldout_conversations(args.eval_per_tool, SEEN_SEED, "train"))
    eval_seconds = time.time() - t_eval
    loss = heldout_loss(export, heldout, card["pack_len"])
    print(f"docs held-out loss {loss:.4f} nats/token (before: {card['heldout_loss']})", flush=True)

    card["heldout_loss_before_tool_finetune"] = card.get("heldout_loss_before_tool_finetune", card["heldout_loss"])
    card["heldout_loss"] = round(loss, 4)
    card["mtp_head"].update(mtp)
    card["mtp_head"].setdefault("acceptance_k1_before_tool_finetune", heads["before"]["k=1"]["acceptance_rate"])
    if refreshed is not None:
        card["mtp_head"]["trained_again_after_tool_finetune"] = {**refreshed, "acceptance_before": heads["after"]}
    card["what"] = ("A small Qwen3.5-architecture model (configs/qwen3.5-tiny-pydoc.json) trained from scratch by "
                    "scripts/train_default_model.py on Python's bundled documentation, then fine-tuned by "
                    "scripts/train_tool_model.py on synthetic tool-use conversations in Qwen3.5's tool-call format. "
                    "It writes Python-docs-like English; see tool_finetune.heldout for how well it calls tools.")
    earlier = card.get("tool_finetune")
    card["tool_finetune"] = {
        "command": "python scripts/train_tool_model.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "tools": list(TOOLS),
        "thinking": "every assistant turn trained as the template renders it after the question: an empty think "
                    "block, then the call or the answer (the continuation of both generation prompts)",
        "docs_rows": {"count": len(docs), "greedy_continuations": args.continuations,
                      "continuation_tokens": args.continuation_tokens, "corpus_pieces": args.doc_pieces,
                      "what": "the source model's greedy continuations of the first 32 tokens of docs training "
                              "pieces, and docs training pieces as they are (those under 512 tokens), in both phases"},
        "phase_1_short_questions": {**phase1, "questions": len(short), "seed": args.seed + 1,
                                    "copy_exercises": len(copies), "docs_rows": len(short_docs),
                                    **{k: sum(c["kind"] == k for c in short) for k in KINDS}},
        "phase_2_whole_conversations": {**phase2, "conversations": len(convs), "seed": args.seed,
                                        **{k: sum(c["kind"] == k for c in convs) for k in KINDS}},
        "heldout": {"what": f"conversations of seed {EVAL_SEED} (never trained on; their cities, stock symbols, "
                            "docs queries, time zones and docs questions are not in the training ones) answered "
                            "greedily in fp32 from the chat template's prompt and read by "
                            "qwenjax.serve.reply_parser; arguments must equal the expected ones with their JSON types",
                    "eval_per_tool": args.eval_per_tool, **accuracy, "seconds": round(eval_seconds)},
        "heldout_training_pool_values": {
            "what": f"conversations of seed {SEEN_SEED} (never trained on) whose cities, stock symbols, docs queries, "
                    "time zones and docs questions come from the training pools (numbers drawn afresh), measured "
                    "as heldout", **seen},
        "wall_seconds": round(time.time() - t0),
        # a fine-tune of a model this script made already: the record of that one, so the card holds the chain
        **({"continues": earlier} if earlier else {}),
    }
    with open(os.path.join(export, "training.json"), "w") as f:
        json.dump(card, f, indent=2)
    out = os.path.abspath(args.out)
    if out == os.path.abspath(DEFAULT_MODEL_DIR):  # the bundled model: only the files this script makes
        for name in ("model.safetensors", "training.json"):
            _replace_file(os.path.join(export, name), os.path.join(out, name))
    else:
        install_model_dir(export, out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
