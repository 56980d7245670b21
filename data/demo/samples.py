"""The demo corpora's samples: the vocabulary (names, items, words, cities) and one generator per
kind of record (reasoning word problems, general instructions, tool exchanges, format-breaking
DPO pairs). data.demo builds the demo corpus from them and data.demo.pipeline the pipeline's, so
neither of those imports the other's module for them.
"""
import json

from ..template import EOS_TOKEN, THINK_OPEN, THINK_CLOSE, TOOL_OPEN, TOOL_CLOSE

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jill", "Kofi", "Lena", "Mo", "Nina"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "coins", "cards"]
WORDS = ["river", "garden", "planet", "window", "silver", "rocket", "pencil", "forest", "candle", "bridge",
         "orange", "market", "castle", "winter", "yellow", "dragon", "button", "jacket", "mirror", "tunnel",
         "violin", "harbor", "meadow", "puzzle", "lantern", "cactus", "island", "saddle", "thunder", "marble"]
CITIES = ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Riga"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You are a careful tutor."]
TOOL_SYSTEM = ("You can call tools by writing <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. "
               "Tools: calculator(expression), get_weather(city).")


# ---------------------------------------------------------------- reasoning

def _reasoning(rng):
    """(question, think steps, final answer text, numeric answer)."""
    kind = rng.randrange(4)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b)
        friend = rng.choice([n for n in NAMES if n != name])
        r = a + b - c
        q = (f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {friend}. "
             f"How many {item} does {name} have now?")
        steps = [f"{name} starts with {a} {item}.", f"After buying {b} more: {a} + {b} = {a + b}.",
                 f"After giving away {c}: {a + b} - {c} = {r}."]
        ans = f"{name} has {r} {item}."
    elif kind == 1:
        a, b, k = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 6)
        r = a * b * k
        q = f"A box holds {a} rows of {b} {item}. How many {item} are in {k} boxes?"
        steps = [f"One box holds {a} x {b} = {a * b} {item}.", f"{k} boxes hold {a * b} x {k} = {r} {item}."]
        ans = f"There are {r} {item} in {k} boxes."
    elif kind == 2:
        per, days = rng.randint(5, 30), rng.randint(2, 9)
        total = per * days + rng.randint(1, 120)
        r = total - per * days
        q = f"{name} reads {per} pages a day for {days} days. The book has {total} pages. How many pages are left?"
        steps = [f"Pages read: {per} x {days} = {per * days}.", f"Pages left: {total} - {per * days} = {r}."]
        ans = f"{r} pages are left."
    else:
        a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9)
        r = (a + b) * c
        q = f"Compute ({a} + {b}) x {c}."
        steps = [f"First the parentheses: {a} + {b} = {a + b}.", f"Then multiply: {a + b} x {c} = {r}."]
        ans = f"The answer is {r}."
    return q, steps, ans, r


def _think(steps, answer):
    return f"{THINK_OPEN}\n" + "\n".join(steps) + f"\n{THINK_CLOSE}\n{answer}"


def reasoning_sample(rng):
    q, steps, ans, r = _reasoning(rng)
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": _think(steps, ans)}]
    if rng.random() < 0.2:
        msgs.insert(0, {"role": "system", "content": SYSTEMS[2]})
    return {"messages": msgs, "domain": "reasoning", "tags": ["math", "think"], "answer": str(r)}


# ---------------------------------------------------------------- general

def _task(rng):
    kind = rng.randrange(6)
    if kind == 0:
        w = rng.choice(WORDS)
        return "reverse", f"Reverse the word \"{w}\".", w[::-1]
    if kind == 1:
        ws = rng.sample(WORDS, rng.randint(2, 4))
        phrase = " ".join(ws)
        return "uppercase", f"Write \"{phrase}\" in capital letters.", phrase.upper()
    if kind == 2:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
        return ("sort", "Sort these numbers from smallest to largest: " + ", ".join(map(str, nums)) + ".",
                ", ".join(map(str, sorted(nums))))
    if kind == 3:
        w = rng.choice(WORDS)
        return "count", f"How many letters are in the word \"{w}\"?", f"The word \"{w}\" has {len(w)} letters."
    if kind == 4:
        a, b = rng.sample(range(0, 1000), 2)
        return "compare", f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger."
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return ("alphabetize", "Put these words in alphabetical order: " + ", ".join(ws) + ".",
            ", ".join(sorted(ws)))


def general_sample(rng):
    tag, q, a = _task(rng)
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    tags = [tag]
    if rng.random() < 0.25:
        tag2, q2, a2 = _task(rng)
        msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        tags.append(tag2)
        tags.append("multi_turn")
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEMS[:2])})
    if rng.random() < 0.25:
        # Exercise the ShareGPT reader with some of the demo corpus.
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in msgs],
                "domain": "general", "tags": tags}
    return {"messages": msgs, "domain": "general", "tags": tags}


# ---------------------------------------------------------------- tools

def _call(name, arguments):
    return TOOL_OPEN + json.dumps({"name": name, "arguments": arguments}) + TOOL_CLOSE


def _tool_exchange(rng):
    """(user question, call text, tool result text, final answer)."""
    if rng.random() < 0.5:
        a, b = rng.randint(10, 999), rng.randint(2, 99)
        op, sym, val = rng.choice([("times", "*", a * b), ("plus", "+", a + b), ("minus", "-", a - b)])
        q = f"What is {a} {op} {b}? Use the calculator."
        return q, _call("calculator", {"expression": f"{a}{sym}{b}"}), json.dumps({"result": val}), \
            f"{a} {op} {b} is {val}."
    city, t, cond = rng.choice(CITIES), rng.randint(-10, 35), rng.choice(CONDITIONS)
    q = f"What is the weather in {city} right now?"
    return q, _call("get_weather", {"city": city}), json.dumps({"city": city, "temperature_c": t, "condition": cond}), \
        f"It is {cond} in {city} and {t} degrees Celsius."


def tool_sample(rng):
    q, call, result, final = _tool_exchange(rng)
    msgs = [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": q},
            {"role": "assistant", "content": call}, {"role": "tool", "content": result},
            {"role": "assistant", "content": final}]
    return {"messages": msgs, "domain": "tool", "tags": ["tool_call"]}


# ---------------------------------------------------------------- DPO

def _corrupt(rng, chosen, kinds):
    kind = rng.choice(kinds)
    if kind == "unclosed_think":
        bad = chosen.replace(THINK_CLOSE, "", 1)
    elif kind == "missing_think_open":
        bad = chosen.replace(THINK_OPEN, "", 1)
    elif kind == "unpaired_tool_call":
        bad = chosen.replace(TOOL_CLOSE, "", 1)
    elif kind == "invalid_json":
        body = chosen[len(TOOL_OPEN):-len(TOOL_CLOSE)]
        broken = body.replace('"', "'") if rng.random() < 0.5 else body[:-1]
        bad = TOOL_OPEN + broken + TOOL_CLOSE
    elif kind == "text_after_eos":
        bad = chosen + EOS_TOKEN + rng.choice([" Anything else?", " I hope this helps.", "\nHUMAN: thanks"])
    elif kind == "misnested":
        # <think><tool_call> ... </think></tool_call>: each tag paired, but crossed.
        bad = chosen.replace(THINK_OPEN, THINK_OPEN + TOOL_OPEN, 1).replace(THINK_CLOSE, THINK_CLOSE + TOOL_CLOSE, 1)
    else:
        raise ValueError(kind)
    return kind, bad


def dpo_pair(rng):
    if rng.random() < 0.5:
        q, steps, ans, r = _reasoning(rng)
        prompt = [{"role": "user", "content": q}]
        chosen = _think(steps, ans)
        kinds = ["unclosed_think", "missing_think_open", "text_after_eos", "misnested"]
        domain = "reasoning"
    else:
        q, call, _, _ = _tool_exchange(rng)
        prompt = [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": q}]
        chosen = call
        kinds = ["unpaired_tool_call", "invalid_json", "text_after_eos"]
        domain = "tool"
    kind, rejected = _corrupt(rng, chosen, kinds)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "domain": domain, "tags": ["rejected:" + kind]}
