"""The demo corpus of the Ring-Lite-Distill pipeline in miniature, and its held-out evaluation prompts.

Four ability families, each generated from templates (data.demo.samples' word lists plus a few more):
  reasoning              arithmetic word problems of 1, 2 or 3 steps; <think> lists the steps, the
                         final answer follows </think>
  instruction following  IFEval-style verifiable constraints: capital letters only, exactly N bullet
                         points, end with a given word, include / omit a word, JSON with given keys
  tool use               calculator and weather calls, <tool_call>{json}</tool_call>, a tool turn,
                         then the answer
  knowledge              facts about a fixed cast of people (city, pet, job, favourite colour),
                         taught by question and answer and by short biographies
plus the demo's general tasks (reverse, sort, count, ...) and DPO pairs whose rejected answers carry
the structural errors the report counts (unclosed or misnested tags, invalid tool JSON, text after
the end, a repeated answer).

Held out: an evaluation prompt is never a training prompt. For reasoning, instruction following and
tool use the prompt text decides: ``is_held_out(text)`` (a hash, ~10% of texts) is true for every
evaluation prompt and false for every training prompt (training generators draw again). Knowledge is
asked in question wordings that no training sample uses (the facts are the same, by design).

Everything derives from integer seeds: the corpus from ``seed`` (one generator per part, so parts can
be resized independently), the facts from ``KB_SEED``, the evaluation prompts from ``EVAL_SEED``.
"""
from __future__ import annotations

import hashlib
import json
import random

from .samples import CITIES, CONDITIONS, ITEMS, NAMES, SYSTEMS, TOOL_SYSTEM, WORDS, _corrupt, _task
from ..template import THINK_CLOSE, THINK_OPEN, TOOL_CLOSE, TOOL_OPEN

PIPELINE_VERSION = 1
KB_SEED = 4321
EVAL_SEED = 20261123
HELD_OUT_PER_256 = 26  # ~10% of prompt texts are evaluation-only

FAMILIES = ("reasoning", "instruction_following", "tool_use", "knowledge")

ADJECTIVES = ["quiet", "bright", "old", "small", "busy", "warm", "green", "tall", "calm", "wide", "dark", "cold",
              "soft", "loud", "clean", "round"]
END_WORDS = ["done", "thanks", "goodbye", "indeed", "always", "today", "finally", "enough"]
ANIMALS = ["cat", "dog", "parrot", "turtle", "rabbit", "horse", "goat", "owl"]
JOBS = ["baker", "pilot", "doctor", "farmer", "painter", "teacher", "sailor", "chef"]
COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "silver", "black"]
MORE_CITIES = CITIES + ["Rome", "Seoul", "Nairobi", "Bogota", "Madrid", "Vienna", "Lagos", "Denver", "Manila",
                        "Porto", "Kyoto", "Dublin", "Havana", "Prague", "Accra", "Tunis", "Bergen", "Cusco",
                        "Malmo", "Busan", "Quebec", "Zurich", "Athens", "Sydney", "Lhasa", "Recife", "Turin",
                        "Galway", "Osaka", "Split"]

# Knowledge: training and evaluation question wordings per relation, disjoint by construction; the
# evaluation wordings put words the corpus uses into sentences it never has (a word the model never
# saw could not be understood, whatever it knows).
RELATIONS = {
    "city": {"objects": CITIES, "fact": "{s} lives in {o}.",
             "train": ["Where does {s} live?", "In which city does {s} live?", "Tell me where {s} lives."],
             "eval": ["Which city does {s} live in?", "Name the city where {s} lives."]},
    "pet": {"objects": ANIMALS, "fact": "{s} has a pet {o}.",
            "train": ["What pet does {s} have?", "What kind of pet does {s} own?", "Tell me about {s}'s pet."],
            "eval": ["Which pet does {s} have?", "Name the pet that {s} has."]},
    "job": {"objects": JOBS, "fact": "{s} works as a {o}.",
            "train": ["What does {s} do for a living?", "What is {s}'s job?", "Tell me what job {s} has."],
            "eval": ["Which job does {s} have?", "Name the job that {s} has."]},
    "color": {"objects": COLORS, "fact": "{s}'s favourite color is {o}.",
              "train": ["What is {s}'s favourite color?", "Which color does {s} like most?",
                        "Tell me {s}'s favourite color."],
              "eval": ["Which color does {s} like?", "Name the color that {s} likes most."]},
}
BIO_PROMPTS = ["Tell me about {s}.", "Who is {s}?", "Describe {s}."]


def is_held_out(text: str) -> bool:
    """Whether a prompt text belongs to the evaluation side (about 10% of texts, by a hash)."""
    return hashlib.sha256(("held-out:" + text).encode("utf-8")).digest()[0] < HELD_OUT_PER_256


def knowledge_base(seed: int = KB_SEED) -> dict[str, dict[str, str]]:
    """{person: {relation: object}}: the facts the general data teaches."""
    rng = random.Random(f"{seed}:kb")
    return {n: {rel: rng.choice(spec["objects"]) for rel, spec in RELATIONS.items()} for n in NAMES}


# ---------------------------------------------------------------------------------------- generators
# Each returns (user prompt text, assistant answer text, what the evaluator checks).

def reasoning_problem(rng: random.Random, steps: int):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friend = rng.choice([n for n in NAMES if n != name])
    cur = rng.randint(2, 20)
    sentences, lines = [f"{name} has {cur} {item}."], []
    for _ in range(steps):
        b = rng.randint(1, 9)
        if b < cur and rng.random() < 0.5:
            verb, line = rng.choice([(f"{name} gives {b} to {friend}.", "After giving {b} away"),
                                     (f"{name} loses {b}.", "After losing {b}")])
            new = cur - b
            lines.append(f"{line.format(b=b)}: {cur} - {b} = {new}.")
        else:
            verb, line = rng.choice([(f"{name} buys {b} more.", "After buying {b} more"),
                                     (f"{name} finds {b} more.", "After finding {b} more")])
            new = cur + b
            lines.append(f"{line.format(b=b)}: {cur} + {b} = {new}.")
        sentences.append(verb)
        cur = new
    q = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = f"{THINK_OPEN}\n" + "\n".join(lines) + f"\n{THINK_CLOSE}\n{name} has {cur} {item}."
    return q, answer, {"answer": str(cur), "steps": steps}


def if_task(rng: random.Random, kind: str | None = None):
    kind = kind or rng.choice(["upper", "bullets", "end_with", "include", "omit", "json"])
    w1, w2 = rng.sample(WORDS, 2)
    a1, a2 = rng.sample(ADJECTIVES, 2)
    if kind == "upper":
        q = rng.choice(["Write a short sentence about the {a} and the {b}. Use only capital letters.",
                        "Say something about the {a} and the {b}, in capital letters only.",
                        "Describe the {a} and the {b} in one sentence. Answer in upper case."]).format(a=w1, b=w2)
        return q, f"THE {w1.upper()} AND THE {w2.upper()} ARE {a1.upper()}.", {"kind": "upper"}
    if kind == "bullets":
        n = rng.randint(2, 5)
        q = rng.choice(["List {n} things about the {a} and the {b}. Use exactly {n} bullet points.",
                        "Give exactly {n} bullet points about the {a} and the {b}.",
                        "Describe the {a} and the {b} in exactly {n} bullet points."]).format(n=n, a=w1, b=w2)
        adjs = rng.sample(ADJECTIVES, n)
        ans = "\n".join(f"- The {rng.choice([w1, w2])} is {a}." for a in adjs)
        return q, ans, {"kind": "bullets", "n": n}
    if kind == "end_with":
        x = rng.choice(END_WORDS)
        q = rng.choice(["Describe the {a} and the {b} in one sentence. End your answer with the word \"{x}\".",
                        "Write one sentence about the {a} and the {b}; the last word must be \"{x}\".",
                        "Say something about the {a} and the {b} and finish with the word \"{x}\"."]
                       ).format(a=w1, b=w2, x=x)
        return q, f"The {w1} is {a1} and the {w2} is {a2}, {x}", {"kind": "end_with", "word": x}
    if kind == "include":
        q = rng.choice(["Write a sentence about the {a} and the {b} that uses the word \"{k}\".",
                        "Describe the {a} and the {b}. Include the word \"{k}\".",
                        "Say something about the {a} and the {b} with the word \"{k}\" in it."]
                       ).format(a=w1, b=w2, k=a1)
        return q, f"The {w1} is {a1} and the {w2} is {a2}.", {"kind": "include", "word": a1}
    if kind == "omit":
        q = rng.choice(["Describe the {a} and the {b} without using the word \"{a}\".",
                        "Write a sentence about the {a} and the {b}. Do not use the word \"{a}\".",
                        "Say something about the {a} and the {b}, but never write the word \"{a}\"."]
                       ).format(a=w1, b=w2)
        return q, f"It is {a1}, and the {w2} is {a2}.", {"kind": "omit", "word": w1}
    if kind == "json":
        name = rng.choice(NAMES)
        if rng.random() < 0.5:
            age = rng.randint(5, 80)
            q = rng.choice(["{p} is {n} years old. Give {p}'s name and age as JSON with the keys \"name\" and \"age\".",
                            "Reply in JSON with the keys \"name\" and \"age\": {p} is {n} years old."]).format(p=name, n=age)
            return q, json.dumps({"name": name, "age": age}), {"kind": "json", "keys": ["name", "age"]}
        n, item = rng.randint(2, 60), rng.choice(ITEMS)
        q = rng.choice(["{p} has {n} {i}. Answer with JSON with the keys \"item\" and \"count\".",
                        "Reply in JSON with the keys \"item\" and \"count\": {p} has {n} {i}."]).format(p=name, n=n, i=item)
        return q, json.dumps({"item": item, "count": n}), {"kind": "json", "keys": ["item", "count"]}
    raise ValueError(kind)


def _call(name, arguments):
    return TOOL_OPEN + json.dumps({"name": name, "arguments": arguments}) + TOOL_CLOSE


def tool_exchange(rng: random.Random):
    """(question, call text, tool result, final answer, expected call)."""
    if rng.random() < 0.5:
        # Small numbers: in the JSON a number is another token than in the question (" 37" vs "37"), and
        # a 1.5M-parameter model learns that mapping only for numbers it sees often.
        a, b = rng.randint(2, 40), rng.randint(2, 12)
        op, sym, val = rng.choice([("times", "*", a * b), ("plus", "+", a + b), ("minus", "-", a - b)])
        q = rng.choice(["What is {a} {op} {b}? Use the calculator.", "Use the calculator to work out {a} {op} {b}.",
                        "Please calculate {a} {op} {b} with the calculator."]).format(a=a, op=op, b=b)
        call = {"name": "calculator", "arguments": {"expression": f"{a}{sym}{b}"}}
        return q, _call(**call), json.dumps({"result": val}), f"{a} {op} {b} is {val}.", call
    city, t, cond = rng.choice(MORE_CITIES), rng.randint(-10, 35), rng.choice(CONDITIONS)
    q = rng.choice(["What is the weather in {c} right now?", "How is the weather in {c} today?",
                    "Check the weather in {c} for me.", "What is it like outside in {c}?",
                    "Tell me the current weather in {c}.", "Look up the weather for {c}."]).format(c=city)
    call = {"name": "get_weather", "arguments": {"city": city}}
    result = json.dumps({"city": city, "temperature_c": t, "condition": cond})
    return q, _call(**call), result, f"It is {cond} in {city} and {t} degrees Celsius.", call


def knowledge_qa(rng: random.Random, kb: dict, wording: str = "train"):
    person = rng.choice(NAMES)
    rel = rng.choice(list(RELATIONS))
    spec = RELATIONS[rel]
    q = rng.choice(spec[wording]).format(s=person)
    obj = kb[person][rel]
    return q, spec["fact"].format(s=person, o=obj), {"relation": rel, "object": obj}


def knowledge_bio(rng: random.Random, kb: dict):
    person = rng.choice(NAMES)
    facts = kb[person]
    q = rng.choice(BIO_PROMPTS).format(s=person)
    ans = (f"{person} lives in {facts['city']} and works as a {facts['job']}. {person} has a pet "
           f"{facts['pet']}, and {person}'s favourite color is {facts['color']}.")
    return q, ans


# ---------------------------------------------------------------------------------------- training records
def _training_text(rng, make):
    """Draw until the prompt is not an evaluation prompt."""
    while True:
        out = make(rng)
        if not is_held_out(out[0]):
            return out


def reasoning_record(rng):
    steps = rng.choice([1, 2, 3])
    q, ans, info = _training_text(rng, lambda r: reasoning_problem(r, steps))
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
    if rng.random() < 0.2:
        msgs.insert(0, {"role": "system", "content": SYSTEMS[2]})
    return {"messages": msgs, "domain": "reasoning", "tags": [f"steps:{steps}"], "answer": info["answer"]}


def if_record(rng):
    q, ans, check = _training_text(rng, if_task)
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
            "domain": "instruction_following", "tags": [check["kind"]]}


def tool_record(rng):
    q, call, result, final, _ = _training_text(rng, tool_exchange)
    msgs = [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": q},
            {"role": "assistant", "content": call}, {"role": "tool", "content": result},
            {"role": "assistant", "content": final}]
    return {"messages": msgs, "domain": "tool", "tags": ["tool_call"]}


def knowledge_record(rng, kb):
    if rng.random() < 0.25:
        q, ans = knowledge_bio(rng, kb)
        tag = "bio"
    else:
        q, ans, info = knowledge_qa(rng, kb, "train")
        tag = info["relation"]
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
            "domain": "knowledge", "tags": [tag]}


def general_record(rng):
    tag, q, a = _task(rng)
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "domain": "general", "tags": [tag]}


def general_mix(rng, n, kb, shares):
    """n general-side records: {"general", "if", "tool", "knowledge"} drawn by ``shares``."""
    makers = {"general": general_record, "if": if_record, "tool": tool_record,
              "knowledge": lambda r: knowledge_record(r, kb)}
    kinds, weights = zip(*shares.items())
    return [makers[rng.choices(kinds, weights)[0]](rng) for _ in range(n)]


def dpo_record(rng, kb):
    """A format-repair pair: the chosen answer is well formed, the rejected one carries an error.
    Prompts from every family (reasoning and tool use most, as their answers have the tags)."""
    u = rng.random()
    if u < 0.35:
        steps = rng.choice([1, 2, 3])
        q, chosen, _ = _training_text(rng, lambda r: reasoning_problem(r, steps))
        prompt = [{"role": "user", "content": q}]
        kinds = ["unclosed_think", "missing_think_open", "text_after_eos", "misnested", "repeated_answer"]
        domain = "reasoning"
    elif u < 0.7:
        q, chosen, _, _, _ = _training_text(rng, tool_exchange)
        prompt = [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": q}]
        kinds = ["unpaired_tool_call", "invalid_json", "text_after_eos"]
        domain = "tool"
    elif u < 0.9:
        q, chosen, _ = _training_text(rng, if_task)
        prompt = [{"role": "user", "content": q}]
        kinds = ["text_after_eos", "repeated_answer"]
        domain = "instruction_following"
    else:
        q, chosen, _ = knowledge_qa(rng, kb, "train")
        prompt = [{"role": "user", "content": q}]
        kinds = ["text_after_eos", "repeated_answer"]
        domain = "knowledge"
    kind = rng.choice(kinds)
    if kind == "repeated_answer":
        tail = chosen.rsplit(THINK_CLOSE, 1)[-1].strip()
        rejected = chosen + "\n" + tail
    else:
        kind, rejected = _corrupt(rng, chosen, [kind])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "domain": domain, "tags": ["rejected:" + kind]}


PIPELINE_SIZES = {"base": 8000, "stage1_reasoning": 6000, "stage2_general": 3000, "stage2_reasoning": 4000,
                  "dpo": 1500}
BASE_SHARES = {"general": 0.2, "if": 0.3, "tool": 0.25, "knowledge": 0.25}


def pipeline_corpus(seed: int = 1234, sizes: dict | None = None) -> dict[str, list[dict]]:
    """{"base", "stage1_reasoning", "stage2_general", "stage2_reasoning", "dpo"}: JSON-ready records.

    base: general + instruction following + tool use + knowledge (the stand-in for Ling-Lite's
    general SFT); stage1: reasoning only; stage2: a fresh draw of each side, mixed 340 : 550 by the
    trainer's sampling weights; dpo: format-repair pairs."""
    sizes = dict(PIPELINE_SIZES, **(sizes or {}))
    kb = knowledge_base()
    r = {part: random.Random(f"{seed}:pipeline:{part}") for part in sizes}
    return {"base": general_mix(r["base"], sizes["base"], kb, BASE_SHARES),
            "stage1_reasoning": [reasoning_record(r["stage1_reasoning"]) for _ in range(sizes["stage1_reasoning"])],
            "stage2_general": general_mix(r["stage2_general"], sizes["stage2_general"], kb, BASE_SHARES),
            "stage2_reasoning": [reasoning_record(r["stage2_reasoning"]) for _ in range(sizes["stage2_reasoning"])],
            "dpo": [dpo_record(r["dpo"], kb) for _ in range(sizes["dpo"])]}


# ---------------------------------------------------------------------------------------- evaluation prompts
def _unique_held_out(rng, make, n, max_tries=200000):
    """n distinct held-out prompts from ``make(rng) -> (text, ...)`` (fewer if the space runs out)."""
    seen, out = set(), []
    for _ in range(max_tries):
        if len(out) == n:
            break
        item = make(rng)
        if item[0] in seen or not is_held_out(item[0]):
            continue
        seen.add(item[0])
        out.append(item)
    return out


def eval_prompts(n: int = 100, seed: int = EVAL_SEED) -> dict[str, list[dict]]:
    """{family: [{"family", "messages", "check"}]}, n prompts per family, none ever trained on.

    reasoning: n split evenly over 1, 2 and 3 steps; instruction following: the six constraint kinds
    in turn; tool use: calculator and weather questions; knowledge: the evaluation wordings."""
    rng = random.Random(f"{seed}:eval")
    out = {f: [] for f in FAMILIES}
    for steps in (1, 2, 3):
        k = n // 3 + (1 if steps <= n % 3 else 0)
        for q, _, info in _unique_held_out(rng, lambda r: reasoning_problem(r, steps), k):
            out["reasoning"].append({"family": "reasoning", "messages": [{"role": "user", "content": q}],
                                     "check": info})
    kinds = ["upper", "bullets", "end_with", "include", "omit", "json"]
    for i, kind in enumerate(kinds):
        k = n // len(kinds) + (1 if i < n % len(kinds) else 0)
        for q, _, check in _unique_held_out(rng, lambda r: if_task(r, kind), k):
            out["instruction_following"].append({"family": "instruction_following",
                                                 "messages": [{"role": "user", "content": q}], "check": check})
    for q, _, _, _, call in _unique_held_out(rng, tool_exchange, n):
        out["tool_use"].append({"family": "tool_use", "messages": [{"role": "system", "content": TOOL_SYSTEM},
                                                                   {"role": "user", "content": q}],
                                "check": {"call": call}})
    kb = knowledge_base()
    qs = [(spec_q.format(s=p), rel, kb[p][rel]) for p in NAMES for rel, spec in RELATIONS.items()
          for spec_q in spec["eval"]]
    random.Random(f"{seed}:knowledge").shuffle(qs)
    for q, rel, obj in qs[:n]:
        out["knowledge"].append({"family": "knowledge", "messages": [{"role": "user", "content": q}],
                                 "check": {"relation": rel, "object": obj,
                                           "others": [o for o in RELATIONS[rel]["objects"] if o != obj]}})
    return out
